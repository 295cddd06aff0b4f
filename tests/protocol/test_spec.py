"""
docs/protocol.md, sentence by sentence, against a real server: the Twisted
adapter (L{imgresume.server.UploadServerFactory}) with its sans-IO machine,
over the memory storage (and the filesystem storage where the sentence is
about what storage answers), on an in-memory transport and a fake clock.

Every test quotes the sentences it checks in its docstring, on lines that
begin with C{>}; L{QuotesTests} checks that each quote is in the document,
so a sentence that changes there fails here until its test follows.
Timeouts and takeover are timing, checked on a real process in
L{tests.protocol.test_spec_process}.
"""

from __future__ import annotations

import hashlib
import inspect
import os
import re
import struct
import sys
import unicodedata
import zlib
from typing import Any

import blake3
import crc32c
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from imgresume import errors
from imgresume.errors import ErrorCode, Scope
from imgresume.protocol import (
    EMPTY_TAIL_SHA256,
    SKIPPED_UPLOAD_ID,
    Accepted,
    Ack,
    Completed,
    Data,
    Error,
    Finish,
    FrameType,
    Hello,
    Ping,
    Pong,
    Put,
    Resume,
    ServerLimits,
    Status,
    Upload,
    UploadStatusFrame,
    Welcome,
    encode,
)
from imgresume.protocol._frames import HEADER, MAGIC
from imgresume.server import UploadServerFactory
from imgresume.storage import memory
from imgresume.storage.filesystem import FilesystemStorage
from imgresume.storage.memory import MemoryStorage
from tests.support.processes import REPO_ROOT
from tests.support.runners import sync_run
from tests.support.storages import SlowStorage
from tests.support.wire import data_frame, frames_written, new_decoder

DOC = os.path.join(REPO_ROOT, "docs", "protocol.md")
CONTENT = bytes(range(256)) * 40  # 10240 bytes
SHA = hashlib.sha256(CONTENT).digest()
ID = "0a1b2c3d445566778899aabbccddeeff"


def frame(kind: int, body: bytes) -> bytes:
    """A frame of type C{kind} around C{body}, whatever they are."""
    return HEADER.pack(kind, len(body)) + body


def wire_str(raw: bytes) -> bytes:
    """A C{str} field holding C{raw}, UTF-8 or not."""
    return struct.pack(">H", len(raw)) + raw


def upload_body(name: bytes, size: int, sha256: bytes,
                metadata: list[tuple[bytes, bytes]] = ()) -> bytes:
    """An UPLOAD body built field by field, so it may break the rules."""
    body = wire_str(name) + struct.pack(">Q", size) + sha256
    body += struct.pack(">H", len(metadata))
    for key, value in metadata:
        body += wire_str(key) + wire_str(value)
    return body


class Server:
    """
    One real server (factory) over a storage, and connections to it, each
    driven with raw bytes; the frames it answers are decoded.
    """

    def __init__(self, storage: Any = None, limits: ServerLimits = ServerLimits(
            max_payload=4096, chunk_size=4096)) -> None:
        self.storage = storage if storage is not None else MemoryStorage()
        self.clock = Clock()
        self.factory = UploadServerFactory(self.storage, "spec", self.clock, limits=limits)

    def connect(self, client_id: str | None = "tester") -> "Connection":
        """A new connection; with C{client_id}, its handshake done."""
        connection = Connection(self)
        if client_id is not None:
            [welcome] = connection.send(encode(Hello(client_id)))
            assert isinstance(welcome, Welcome), welcome
            connection.welcome = welcome
        return connection

    def upload(self, name: str, content: bytes = CONTENT,
               metadata: dict[str, str] | None = None) -> Completed:
        """Upload C{content} whole as C{name} on a connection of its own."""
        c = self.connect()
        [accepted] = c.send(encode(Upload(name, len(content), hashlib.sha256(content).digest(),
                                          metadata or {})))
        assert isinstance(accepted, Accepted), accepted
        return c.send_all(content)


class Connection:
    """A server protocol on a StringTransport, fed raw bytes."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self.proto = server.factory.buildProtocol(None)
        self.transport = StringTransport()
        self.proto.makeConnection(self.transport)
        self.decoder = new_decoder()
        self.welcome: Welcome | None = None

    def send(self, *raw: bytes) -> list[Any]:
        """Feed bytes; the frames the server answered."""
        for piece in raw:
            self.proto.dataReceived(piece)
        return frames_written(self.transport, self.decoder)

    def send_all(self, content: bytes, start: int = 0) -> Completed:
        """Send C{content} from C{start} in 4 KiB packets and end it: the COMPLETED."""
        for pos in range(start, len(content), 4096):
            [ack] = self.send(data_frame(pos, content[pos : pos + 4096]))
            assert isinstance(ack, Ack), ack
        [completed] = self.send(data_frame(len(content), b""))
        return completed

    def lose(self) -> None:
        """The client goes away (its upload is released for a resume)."""
        self.proto.connectionLost(Failure(ConnectionDone("client left")))

    @property
    def closed(self) -> bool:
        """Whether the server closed the connection."""
        return self.transport.disconnecting

    def still_ready(self) -> bool:
        """Whether the connection is open and answers PING (it is in a reading state)."""
        return not self.closed and self.send(encode(Ping(7))) == [Pong(7)]


def quotes(text: str) -> list[str]:
    """
    The quoted passages of a docstring: runs of lines that begin with '>',
    joined; a line that is only '>' separates two passages.
    """
    out: list[str] = []
    current: list[str] = []
    for line in (text or "").splitlines() + [""]:
        line = line.strip()
        if line.startswith(">") and line != ">":
            current.append(line[1:].strip())
        elif current:
            out.append(" ".join(current))
            current = []
    return out


def normalised(text: str) -> str:
    """C{text} with runs of white space made one space."""
    return re.sub(r"\s+", " ", text)


class QuotesTests(SynchronousTestCase):
    """The sentences the tests of this module quote are in docs/protocol.md."""

    def test_every_quote_is_in_the_document(self) -> None:
        """Each quote of a test here is, word for word, in docs/protocol.md."""
        doc = normalised(open(DOC, encoding="utf-8").read())
        found = 0
        module = sys.modules[__name__]
        for _, cls in inspect.getmembers(module, inspect.isclass):
            if cls.__module__ != __name__ or not issubclass(cls, SynchronousTestCase):
                continue
            for name, method in inspect.getmembers(cls, inspect.isfunction):
                if not name.startswith("test_"):
                    continue
                for quote in quotes(method.__doc__):
                    found += 1
                    self.assertIn(quote, doc, f"{cls.__name__}.{name}")
        self.assertGreater(found, 30)

    def test_error_table(self) -> None:
        """
        The table of section 4 lists every code with the scope and retry of
        its exception class.

        > Every error has a **scope** that says what it ends:
        """
        doc = open(DOC, encoding="utf-8").read()
        rows = re.findall(
            r"^\| 0x([0-9A-F]{4}) \| ([A-Z_]+) \| (connection|command|transfer) \| (yes|no) \|",
            doc, re.M)
        table = {ErrorCode(int(code, 16)): (name, Scope(scope), retry == "yes")
                 for code, name, scope, retry in rows}
        self.assertEqual(set(table), set(ErrorCode))
        for code, (name, scope, retryable) in table.items():
            cls = errors.error_for_code(code, "")
            self.assertEqual((code.name, cls.scope, cls.retryable), (name, scope, retryable))


class FramingTests(SynchronousTestCase):
    """Section 1: transport and framing."""

    def test_unknown_frame_type(self) -> None:
        """
        An unknown frame type is MALFORMED_FRAME, before and after the
        handshake, and closes; over 65 536 bytes of body it is
        FRAME_TOO_LARGE first.

        > So are a frame type that is not in §2,
        >
        > every frame except DATA and PUT: at most **65 536** bytes of body (a frame of an
        > unknown type too: over that it is `FRAME_TOO_LARGE`, else `MALFORMED_FRAME`);
        """
        server = Server()
        for c in (server.connect(None), server.connect()):
            [error] = c.send(frame(0x42, b"\0" * 65536))
            self.assertEqual(error.code, ErrorCode.MALFORMED_FRAME)
            self.assertTrue(c.closed)
        c = server.connect()
        [error] = c.send(HEADER.pack(0x42, 65537))
        self.assertEqual(error.code, ErrorCode.FRAME_TOO_LARGE)
        self.assertTrue(c.closed)

    def test_strings_and_kv(self) -> None:
        """
        A str that is not UTF-8 outside UPLOAD's name and metadata, and a
        key named twice in a kv, are MALFORMED_FRAME.

        > So are a frame type that is not in §2, a `str`
        > that is not UTF-8, and a `kv` that names a key twice (HELLO and WELCOME
        > options as well as UPLOAD metadata).
        >
        > * a key named twice in a `kv` (options or metadata): `MALFORMED_FRAME`;
        """
        hello = MAGIC + b"\0\x01\0\x01"
        server = Server()
        for body in (
            hello + wire_str(b"caf\xe9") + b"\0\0",
            hello + wire_str(b"c") + b"\0\x02" + wire_str(b"k") + wire_str(b"1")
            + wire_str(b"k") + wire_str(b"2"),
        ):
            c = server.connect(None)
            [error] = c.send(frame(FrameType.HELLO, body))
            self.assertEqual(error.code, ErrorCode.MALFORMED_FRAME)
            self.assertTrue(c.closed)
        c = server.connect()
        [error] = c.send(frame(FrameType.UPLOAD, upload_body(
            b"a.tif", 10, SHA, [(b"k", b"1"), (b"k", b"2")])))
        self.assertEqual(error.code, ErrorCode.MALFORMED_FRAME)
        self.assertTrue(c.closed)

    def test_user_text_not_utf8(self) -> None:
        """
        Bytes that are not UTF-8 in UPLOAD's name are INVALID_NAME, in its
        metadata (key or value) INVALID_METADATA; the connection stays ready.

        > so bytes there
        > that are not UTF-8 are answered with `INVALID_NAME` (in the name) or
        > `INVALID_METADATA` (in the metadata), errors of command scope: the
        > connection stays `ready` (§4).
        >
        > * a `str` that is not UTF-8: in UPLOAD's name `INVALID_NAME`, in UPLOAD's
        > metadata `INVALID_METADATA` (both command scope: the connection stays
        > `ready`), anywhere else `MALFORMED_FRAME`;
        """
        c = Server().connect()
        for body, code in (
            (upload_body(b"scan-\xff.tif", 10, SHA), ErrorCode.INVALID_NAME),
            (upload_body(b"a\xed\xa0\x80.tif", 10, SHA), ErrorCode.INVALID_NAME),
            (upload_body(b"a.tif", 10, SHA, [(b"k", b"\xc3")]), ErrorCode.INVALID_METADATA),
            (upload_body(b"a.tif", 10, SHA, [(b"\xff", b"v")]), ErrorCode.INVALID_METADATA),
        ):
            [error] = c.send(frame(FrameType.UPLOAD, body))
            self.assertEqual(error.code, code)
            self.assertTrue(c.still_ready())
        [accepted] = c.send(encode(Upload("a.tif", len(CONTENT), SHA)))
        self.assertIsInstance(accepted, Accepted)

    def test_data_before_welcome(self) -> None:
        """
        DATA before WELCOME: FRAME_TOO_LARGE with a payload, UNEXPECTED_FRAME
        empty; both close.

        > Before WELCOME `max_payload` counts as 0: a DATA frame with a payload is
        > then `FRAME_TOO_LARGE`, an empty one `UNEXPECTED_FRAME`.
        >
        > DATA before WELCOME is
        > `FRAME_TOO_LARGE` if it has a payload (§1);
        """
        server = Server()
        for payload, code in ((b"x", ErrorCode.FRAME_TOO_LARGE),
                              (b"", ErrorCode.UNEXPECTED_FRAME)):
            c = server.connect(None)
            [error] = c.send(data_frame(0, payload))
            self.assertEqual(error.code, code)
            self.assertTrue(c.closed)


class HandshakeTests(SynchronousTestCase):
    """Section 2: HELLO and WELCOME."""

    def test_client_id_characters(self) -> None:
        """
        Client ids of 1-128 characters from the set are welcome; an empty
        one, a longer one, and one with any other character (space, slash,
        a non-ASCII letter, NUL) are HANDSHAKE_REJECTED and close.

        > | client_id | str | 1–128 characters, each one of `A-Z a-z 0-9 . _ @ : + -` (ASCII: 1–128 bytes) |
        >
        > then a client id with any other character, empty, or over 128 characters is
        > `HANDSHAKE_REJECTED`. Both close the connection.
        """
        server = Server()
        every = "ABCXYZabcxyz0189._@:+-"
        for good in (every, "x", "u" * 128):
            [welcome] = server.connect(None).send(encode(Hello(good)))
            self.assertIsInstance(welcome, Welcome, good)
        for bad in ("", "u" * 129, "a b", "a/b", "caf\u00e9", "a\0", "a,b", "a#b"):
            c = server.connect(None)
            [error] = c.send(encode(Hello(bad)))
            self.assertEqual(error.code, ErrorCode.HANDSHAKE_REJECTED, repr(bad))
            self.assertTrue(c.closed)

    def test_versions_first(self) -> None:
        """
        No shared version is UNSUPPORTED_VERSION, even when the client id
        is bad too.

        > It checks the versions first: no shared version is `UNSUPPORTED_VERSION`;
        """
        c = Server().connect(None)
        [error] = c.send(encode(Hello("bad id", 2, 3)))
        self.assertEqual(error.code, ErrorCode.UNSUPPORTED_VERSION)
        self.assertTrue(c.closed)

    def test_welcome_options(self) -> None:
        """
        WELCOME announces the if-exists policies, the late digest and the window.

        > `if-exists` = the policies for a name already taken that the server applies, comma-separated: `rename,skip,fail`
        >
        > A server announces the policies it applies in WELCOME: `if-exists` =
        > `rename,skip,fail`.
        """
        welcome = Server().connect().welcome
        self.assertEqual(welcome.options["if-exists"], "rename,skip,fail")
        self.assertEqual(welcome.options["late-digest"], "1")


class UploadTests(SynchronousTestCase):
    """Section 2: UPLOAD, the order of its checks, and RESUME's owner."""

    def test_check_order(self) -> None:
        """
        Where several rules are broken, the first in the documented order is
        reported; each is a command error and the connection stays ready.

        > The server checks an UPLOAD in this order and answers the first failure with
        > an ERROR of command scope (the connection stays `ready`): a `size` over
        > `max_file_size` is `FILE_TOO_LARGE`; a name that is not UTF-8 or over 1024
        > bytes is `INVALID_NAME`; metadata with too many entries, a bad key, a value
        > over 4096 bytes or not UTF-8, or an `if-exists` it does not define is
        > `INVALID_METADATA`; then the name rules of §6 are `INVALID_NAME`.
        """
        server = Server(limits=ServerLimits(max_payload=4096, chunk_size=4096,
                                            max_file_size=1000))
        c = server.connect()
        bad_meta = [(b"bad key", b"v")]
        for body, code in (
            (upload_body(b"\xff", 1001, SHA, bad_meta), ErrorCode.FILE_TOO_LARGE),
            (upload_body(b"\xff", 10, SHA, bad_meta), ErrorCode.INVALID_NAME),
            (upload_body(b"n" * 1025, 10, SHA, bad_meta), ErrorCode.INVALID_NAME),
            (upload_body(b"../x", 10, SHA, bad_meta), ErrorCode.INVALID_METADATA),
            (upload_body(b"../x", 10, SHA, [(b"if-exists", b"replace")]),
             ErrorCode.INVALID_METADATA),
            (upload_body(b"../x", 10, SHA, [(b"k", b"v" * 4097)]), ErrorCode.INVALID_METADATA),
            (upload_body(b"../x", 10, SHA, [(b"k%d" % i, b"") for i in range(65)]),
             ErrorCode.INVALID_METADATA),
            (upload_body(b"../x", 10, SHA), ErrorCode.INVALID_NAME),
        ):
            [error] = c.send(frame(FrameType.UPLOAD, body))
            self.assertEqual(error.code, code, body[:40])
            self.assertTrue(c.still_ready())

    def test_resume_by_another_client(self) -> None:
        """
        Another client's RESUME and STATUS get UNKNOWN_UPLOAD, the same
        answer as for an id nobody created.

        > Only the client that created an upload may resume it: a RESUME from another
        > `client_id` is answered `UNKNOWN_UPLOAD`, exactly as for an id that never
        > existed, so the existence of another client's upload does not leak. The
        > same holds for STATUS.
        """
        server = Server()
        [accepted] = server.connect("alice").send(encode(Upload("a.tif", 10, SHA)))
        upload_id = accepted.upload_id
        never = "f" * 32
        for command in (Resume, Status):
            mallory = server.connect("mallory")
            [theirs] = mallory.send(encode(command(upload_id)))
            [none] = mallory.send(encode(command(never)))
            self.assertEqual(theirs.code, ErrorCode.UNKNOWN_UPLOAD)
            self.assertEqual(
                (theirs.code, theirs.offset, theirs.retry_after_ms,
                 theirs.message.replace(upload_id, never)),
                (none.code, none.offset, none.retry_after_ms, none.message))
        [status] = server.connect("alice").send(encode(Status(upload_id)))
        self.assertIsInstance(status, UploadStatusFrame)


class AcceptedTests(SynchronousTestCase):
    """Section 2: what ACCEPTED carries, on the memory and the filesystem storage."""

    def servers(self) -> list[Server]:
        root = self.mktemp()
        return [Server(), Server(FilesystemStorage(root, run=sync_run))]

    def test_name_normalised(self) -> None:
        """
        ACCEPTED echoes the NFC form of a name sent decomposed (NFD);
        COMPLETED's path is complete/ and that form.

        > | name | str | the name given at UPLOAD, as the server stores it: NFC-normalised (§6), so its bytes may differ from the ones UPLOAD carried |
        >
        > The server NFC-normalises it (so the same visible name from two
        > clients is one file) and echoes the normalised name in ACCEPTED; COMPLETED's
        > `path` is `complete/` followed by it.
        """
        nfd = unicodedata.normalize("NFD", "r\u00e9sum\u00e9/\u00c5ngstr\u00f6m.tif")
        nfc = unicodedata.normalize("NFC", nfd)
        self.assertNotEqual(nfd, nfc)
        for server in self.servers():
            c = server.connect()
            [accepted] = c.send(encode(Upload(nfd, len(CONTENT), SHA)))
            self.assertEqual(accepted.name, nfc)
            self.assertEqual(c.send_all(CONTENT).path, "complete/" + nfc)

    def test_empty_tail(self) -> None:
        """
        A new upload, and a resumed one with nothing stored, have offset 0
        and an empty tail whose digest is the SHA-256 of no bytes.

        > | tail_length | u32 | its length; 0 exactly when nothing is stored (`offset` 0) |
        > | tail_sha256 | sha256 | SHA-256 of the bytes **stored** in that range. When `tail_length` is 0 the range is empty and this is the SHA-256 of no bytes, `e3b0c442…7852b855` (not 32 zero bytes) |
        """
        self.assertEqual(EMPTY_TAIL_SHA256, hashlib.sha256(b"").digest())
        self.assertTrue(EMPTY_TAIL_SHA256.hex().startswith("e3b0c442"))
        self.assertTrue(EMPTY_TAIL_SHA256.hex().endswith("7852b855"))
        for server in self.servers():
            c = server.connect()
            [fresh] = c.send(encode(Upload("a.tif", len(CONTENT), SHA)))
            c.lose()
            [resumed] = server.connect().send(encode(Resume(fresh.upload_id)))
            for accepted in (fresh, resumed):
                self.assertEqual(
                    (accepted.offset, accepted.tail_start, accepted.tail_length,
                     accepted.tail_sha256), (0, 0, 0, EMPTY_TAIL_SHA256))

    def test_tail_ends_at_offset(self) -> None:
        """
        On every resume the tail ends at the offset, holds at least one
        byte, and carries the SHA-256 of the stored bytes in it.

        > | tail_start | u64 | start of the last committed range; always `tail_start + tail_length == offset` |
        """
        for server in self.servers():
            c = server.connect()
            [accepted] = c.send(encode(Upload("a.tif", len(CONTENT), SHA)))
            upload_id = accepted.upload_id
            for end in (4096, 8192, 10000):
                c.send(data_frame(c.proto.machine.offset,
                                  CONTENT[c.proto.machine.offset : end]))
                c.lose()
                c = server.connect()
                [accepted] = c.send(encode(Resume(upload_id)))
                self.assertEqual(accepted.offset, end)
                self.assertGreater(accepted.tail_length, 0)
                self.assertEqual(accepted.tail_start + accepted.tail_length, accepted.offset)
                self.assertEqual(accepted.tail_sha256, hashlib.sha256(
                    CONTENT[accepted.tail_start : accepted.offset]).digest())


class DataTests(SynchronousTestCase):
    """Section 2: DATA, the order of its checks, and PING beside it."""

    def test_check_order(self) -> None:
        """
        Where several checks fail, the first in the documented order is
        reported, with the offset to continue from; the transfer goes on.

        > The server checks a DATA frame in this order and answers the first failure
        > (each a transfer error, §4): an `offset` other than the server's offset is
        > `OFFSET_MISMATCH`; a payload reaching past `size` is `SIZE_EXCEEDED`; a wrong
        > `crc32` is `CHECKSUM_MISMATCH`; then an empty payload ends the upload, which
        > is `INCOMPLETE` if the server's offset is below `size`. So an empty DATA at
        > the wrong offset is `OFFSET_MISMATCH`, never `INCOMPLETE`.
        """
        c = Server().connect()
        c.send(encode(Upload("a.tif", 10, hashlib.sha256(b"0123456789").digest())))
        c.send(data_frame(0, b"0123"))
        bad_crc = zlib.crc32(b"x") ^ 1
        for raw, code in (
            (encode(Data(0, bad_crc, b"0123456789x")), ErrorCode.OFFSET_MISMATCH),
            (encode(Data(4, bad_crc, b"456789x")), ErrorCode.SIZE_EXCEEDED),
            (encode(Data(4, bad_crc, b"456")), ErrorCode.CHECKSUM_MISMATCH),
            (data_frame(10, b""), ErrorCode.OFFSET_MISMATCH),
            (data_frame(2, b""), ErrorCode.OFFSET_MISMATCH),
            (data_frame(4, b""), ErrorCode.INCOMPLETE),
        ):
            [error] = c.send(raw)
            self.assertEqual((error.code, error.offset), (code, 4))
        [ack] = c.send(data_frame(4, b"456789"))
        self.assertEqual(ack, Ack(10))
        [completed] = c.send(data_frame(10, b""))
        self.assertIsInstance(completed, Completed)

    def test_pong_overtakes_acks(self) -> None:
        """
        With a DATA frame's write under way, a PING sent after it is
        answered at once; the ACK follows when the write ends.

        > PING is legal in `ready` and `receiving`; the server answers PONG as soon as
        > it reads the PING. That may be before the ACKs of DATA frames sent before
        > the PING, whose answers wait for their writes: a PONG says nothing about
        > earlier DATA, and the ACKs keep their order among themselves.
        """
        slow = SlowStorage(MemoryStorage())
        c = Server(slow).connect()
        c.send(encode(Upload("a.tif", len(CONTENT), SHA)))
        answers = c.send(data_frame(0, CONTENT[:4096]), data_frame(4096, CONTENT[4096:8192]),
                         encode(Ping(1)))
        self.assertEqual(answers, [Pong(1)])
        while slow.pending:
            slow.pending.pop(0).callback(None)
        self.assertEqual(c.send(), [Ack(4096), Ack(8192)])


class StateTests(SynchronousTestCase):
    """Section 3: states and buffering."""

    def test_frame_not_legal(self) -> None:
        """
        DATA, FINISH and AUTH in ready, and UPLOAD while receiving, are
        UNEXPECTED_FRAME and close.

        > Any frame that is not legal in the current state is answered with
        > `UNEXPECTED_FRAME` and the connection closes.
        >
        > * a frame that is not legal in the current state (§3), including DATA or
        > FINISH with no upload open: `UNEXPECTED_FRAME`;
        """
        server = Server()
        for raw in (data_frame(0, b"x"), encode(Finish(SHA)), frame(FrameType.AUTH, b"\0" * 32)):
            c = server.connect()
            [error] = c.send(raw)
            self.assertEqual(error.code, ErrorCode.UNEXPECTED_FRAME)
            self.assertTrue(c.closed)
        c = server.connect()
        c.send(encode(Upload("a.tif", len(CONTENT), SHA)))
        [error] = c.send(encode(Upload("b.tif", len(CONTENT), SHA)))
        self.assertEqual(error.code, ErrorCode.UNEXPECTED_FRAME)
        self.assertTrue(c.closed)

    def test_buffering_is_bounded(self) -> None:
        """
        With storage that does not finish its writes, a client that keeps
        sending DATA finds the server stops reading once it holds about two
        batches and a frame; nothing sent is lost once writes go on.

        > A connection buffers at most about two batches and one frame before
        > the server stops reading it: the batch of DATA payloads being written, the
        > one being gathered behind it (each up to twice `max_payload`, at least
        > 8 MiB), and the frame being received.
        """
        payload = 1 << 20
        slow = SlowStorage(MemoryStorage())
        server = Server(slow, ServerLimits(max_payload=payload, chunk_size=payload))
        batch = server.factory.batch_limit
        self.assertEqual(batch, max(2 * payload, 8 << 20))
        content = bytes(range(256)) * (4 * batch // 256)
        c = server.connect()
        c.send(encode(Upload("big.tif", len(content), hashlib.sha256(content).digest())))
        fed = 0
        while c.transport.producerState == "producing" and fed < len(content):
            c.send(data_frame(fed, content[fed : fed + payload]))
            fed += payload
        self.assertEqual(c.transport.producerState, "paused")
        self.assertLessEqual(fed, 2 * batch + 2 * payload)
        while c.transport.producerState == "paused" or slow.pending:
            if slow.pending:
                slow.pending.pop(0).callback(None)
            elif fed < len(content):
                break
        while fed < len(content):
            c.send(data_frame(fed, content[fed : fed + payload]))
            fed += payload
            while slow.pending:
                slow.pending.pop(0).callback(None)
        c.send(data_frame(len(content), b""))
        while slow.pending:
            slow.pending.pop(0).callback(None)
        answers = c.send()
        self.assertIsInstance(answers[-1], Completed)
        self.assertEqual(slow.storage.read_completed(answers[-1].path), content)


class IdleTests(SynchronousTestCase):
    """Section 3a, the part that does not need real time: the server's own waits."""

    def test_storage_wait_is_not_idle(self) -> None:
        """
        A client waiting for a write that takes three idle timeouts is not
        timed out; after the ACK, a silent one is, within one idle timeout.

        > The time does not run while the server waits for its own storage.
        """
        slow = SlowStorage(MemoryStorage())
        server = Server(slow)
        idle = server.factory.idle_timeout
        c = server.connect()
        c.send(encode(Upload("a.tif", len(CONTENT), SHA)))
        self.assertEqual(c.send(data_frame(0, CONTENT[:4096])), [])
        server.clock.advance(3 * idle)
        self.assertEqual((c.send(), c.closed), ([], False))
        slow.pending.pop(0).callback(None)
        self.assertEqual(c.send(), [Ack(4096)])
        server.clock.advance(idle)
        [error] = c.send()
        self.assertEqual(error.code, ErrorCode.TIMEOUT)


class NameTests(SynchronousTestCase):
    """Section 6: remote names and the alternates of a taken one."""

    def test_colon_accepted_devices_refused(self) -> None:
        """
        C:/x and a timestamp with colons are stored as given; device names
        are refused, with an extension, in any case, in any component.

        > `C:/x` is accepted, as the directory `C:` holding `x` (and
        > `10:30.tif` is a common name).
        >
        > Windows device names (`CON`, `PRN`, `AUX`, `NUL`,
        > `CONIN$`, `CONOUT$`, `COM1`–`COM9`, `LPT1`–`LPT9` and their superscript-digit
        > forms, with or without an extension, in any case: `nul.tif` too).
        """
        server = Server()
        for name in ("C:/x", "10:30.tif"):
            self.assertEqual(server.upload(name).path, "complete/" + name)
        c = server.connect()
        for name in ("CON", "prn.tif", "a/Aux.tar.gz", "nul.tif", "CONIN$", "conout$.txt",
                     "COM1", "lpt9.log", "COM\u00b9", "x/LPT\u00b3.tif"):
            [error] = c.send(encode(Upload(name, 10, SHA)))
            self.assertEqual(error.code, ErrorCode.INVALID_NAME, name)
        self.assertTrue(c.still_ready())

    def test_alternates(self) -> None:
        """
        The second k.tar.gz is k.tar.<8 hex>.gz, README's is README.<8 hex>;
        with that taken too, the whole id, then the id and -1.

        > The alternate names, first free one wins,
        > insert a tag before the extension of the last component, that is before its
        > last dot: `<stem>.<tag><suffix>`, where the tag is the upload id's first 8
        > hex digits, then the whole id, then the id followed by `-1`, `-2`, … So
        > `k.tar.gz` becomes `k.tar.0a1b2c3d.gz`, and a name without a dot, `README`,
        > becomes `README.0a1b2c3d`.
        """
        server = Server()
        server.upload("k.tar.gz")
        server.upload("d/README")
        self.patch(memory, "new_upload_id", lambda: ID)
        self.assertEqual(server.upload("k.tar.gz").path, "complete/k.tar.0a1b2c3d.gz")
        self.assertEqual(server.upload("d/README").path, "complete/d/README.0a1b2c3d")
        del server.storage._uploads[ID]
        self.assertEqual(server.upload("k.tar.gz").path, f"complete/k.tar.{ID}.gz")
        del server.storage._uploads[ID]
        self.assertEqual(server.upload("k.tar.gz").path, f"complete/k.tar.{ID}-1.gz")
        self.assertEqual(server.storage.read_completed("complete/k.tar.gz"), CONTENT)


class IfExistsTests(SynchronousTestCase):
    """Section 6a: a name already taken."""

    def ask(self, c: Connection, name: str, policy: str, content: bytes = CONTENT) -> Any:
        """UPLOAD C{content} as C{name} with if-exists C{policy}: the one answer."""
        [answer] = c.send(encode(Upload(name, len(content), hashlib.sha256(content).digest(),
                                        {"if-exists": policy, "dpi": "600"})))
        return answer

    def test_rename(self) -> None:
        """
        rename, asked for or not, stores at the name when free, else beside.

        > | `rename` (the default, also when the key is absent) | stores the file at its name if that is free, else beside what is there, under the first free alternate name (§6) |
        """
        server = Server()
        c = server.connect()
        self.assertIsInstance(self.ask(c, "a.tif", "rename"), Accepted)
        self.assertEqual(c.send_all(CONTENT).path, "complete/a.tif")
        accepted = self.ask(c, "a.tif", "rename")
        self.assertEqual(c.send_all(CONTENT).path,
                         f"complete/a.{accepted.upload_id[:8]}.tif")
        accepted = server.connect().send(encode(Upload("a.tif", len(CONTENT), SHA)))[0]
        self.assertIsInstance(accepted, Accepted)

    def test_skip_same_file(self) -> None:
        """
        skip with the same size and SHA-256 stored at the name: COMPLETED at
        once, no upload made, nothing stored again; the connection is ready.

        > | `skip` | stores nothing if the file there has the UPLOAD's `size` and SHA-256: it reads that file back, and answers the UPLOAD with COMPLETED (upload id 16 zero bytes, the stored file's size, SHA-256 and `path`).
        >
        > An UPLOAD is answered with COMPLETED directly, without ACCEPTED, only when
        > it asked for `if-exists` = `skip` and a file of its name has its size and
        > SHA-256 (§6a): `upload_id` is then 16 zero bytes (no upload was made),
        > `size` and `sha256` are the stored file's, read back by the server, and
        > `path` is where it lies.
        """
        for server in (Server(), Server(FilesystemStorage(self.mktemp(), run=sync_run))):
            server.upload("scans/a.tif")
            c = server.connect()
            completed = self.ask(c, "scans/a.tif", "skip")
            self.assertEqual(completed, Completed(SKIPPED_UPLOAD_ID, len(CONTENT), SHA,
                                                  "complete/scans/a.tif"))
            self.assertTrue(c.still_ready())
        memory_server = Server()
        memory_server.upload("a.tif")
        self.ask(memory_server.connect(), "a.tif", "skip")
        self.assertEqual(len(memory_server.storage._uploads), 1)
        self.assertEqual(list(memory_server.storage.files), ["complete/a.tif"])

    def test_skip_other_file(self) -> None:
        """
        skip with nothing at the name, or another file there (another size,
        or the same size and other bytes), or a directory: uploaded as for
        rename.

        > Otherwise (nothing there, or another file) it goes on as for `rename` |
        """
        server = Server()
        c = server.connect()
        self.assertIsInstance(self.ask(c, "a.tif", "skip"), Accepted)
        self.assertEqual(c.send_all(CONTENT).path, "complete/a.tif")
        server.upload("d/x.tif")
        other = bytes(reversed(CONTENT))
        for name, content in (("a.tif", CONTENT[:-1]), ("a.tif", other), ("d", CONTENT)):
            accepted = self.ask(c, name, "skip", content)
            self.assertIsInstance(accepted, Accepted)
            path = c.send_all(content).path
            self.assertNotEqual(path, "complete/" + name)
            self.assertEqual(server.storage.read_completed(path), content)

    def test_skip_needs_the_digest(self) -> None:
        """
        skip without the SHA-256 (late digest), or an if-exists value not
        defined, is INVALID_METADATA; the connection stays ready.

        > `skip` needs the SHA-256 in the UPLOAD (not 32 zero bytes with FINISH to
        > come): without it the UPLOAD is refused with `INVALID_METADATA`. Any other
        > value is `INVALID_METADATA` too.
        """
        c = Server().connect()
        for upload in (Upload("a.tif", 10, None, {"if-exists": "skip"}),
                       Upload("a.tif", 10, SHA, {"if-exists": "overwrite"}),
                       Upload("a.tif", 10, SHA, {"if-exists": "Skip"})):
            [error] = c.send(encode(upload))
            self.assertEqual(error.code, ErrorCode.INVALID_METADATA)
            self.assertTrue(c.still_ready())
        [accepted] = c.send(encode(Upload("a.tif", 10, None, {"if-exists": "fail"})))
        self.assertIsInstance(accepted, Accepted)

    def test_fail(self) -> None:
        """
        fail: NAME_TAKEN if a file or a directory has the name (command
        scope, not retryable); stored at the name when it is free.

        > | `fail` | refuses the UPLOAD with `NAME_TAKEN` if anything has the name.
        >
        > | 0x0107 | NAME_TAKEN | command | no | the UPLOAD asked for `if-exists` = `fail` and a completed file has its name (§6a): nothing was stored under another name.
        """
        server = Server()
        c = server.connect()
        self.assertIsInstance(self.ask(c, "d/a.tif", "fail"), Accepted)
        self.assertEqual(c.send_all(CONTENT).path, "complete/d/a.tif")
        for name in ("d/a.tif", "d"):
            error = self.ask(c, name, "fail")
            self.assertEqual((error.code, error.retry_after_ms),
                             (ErrorCode.NAME_TAKEN, 0))
            self.assertIn(f"complete/{name} already exists", error.message)
            self.assertTrue(c.still_ready())
        self.assertEqual(list(server.storage.files), ["complete/d/a.tif"])

    def test_fail_taken_meanwhile(self) -> None:
        """
        fail, with the name taken while the upload is under way: completion
        is NAME_TAKEN too, the upload kept; resumed on another server (the
        policy with it) and ended once the name is free, it completes there.

        > If the name is taken while the upload is under way, completion is refused with `NAME_TAKEN` as well (never renamed); the upload is kept whole, and ending it again after a RESUME succeeds once the name is free |
        >
        > The key is stored with the other
        > metadata, so a resume on another server keeps the policy.
        """
        storage = MemoryStorage()
        server = Server(storage)
        c = server.connect()
        accepted = self.ask(c, "a.tif", "fail")
        for pos in range(0, len(CONTENT), 4096):
            c.send(data_frame(pos, CONTENT[pos : pos + 4096]))
        other = bytes(reversed(CONTENT))
        self.assertEqual(server.upload("a.tif", other).path, "complete/a.tif")
        [error] = c.send(data_frame(len(CONTENT), b""))
        self.assertEqual(error.code, ErrorCode.NAME_TAKEN)
        self.assertTrue(c.still_ready())
        self.assertEqual(list(storage.files), ["complete/a.tif"])
        second = Server(storage)
        c = second.connect()
        [resumed] = c.send(encode(Resume(accepted.upload_id)))
        self.assertEqual(resumed.offset, len(CONTENT))
        [error] = c.send(data_frame(len(CONTENT), b""))
        self.assertEqual(error.code, ErrorCode.NAME_TAKEN)
        del storage.files["complete/a.tif"]  # a consumer moved it away
        c = second.connect()
        c.send(encode(Resume(accepted.upload_id)))
        [completed] = c.send(data_frame(len(CONTENT), b""))
        self.assertEqual(completed.path, "complete/a.tif")
        self.assertEqual(storage.read_completed("complete/a.tif"), CONTENT)

    def test_name_only_and_decided_at_upload(self) -> None:
        """
        skip looks at the name only: an identical file under an alternate
        name does not count.  A file that takes the name while a skip
        upload is under way is not compared: the upload is stored beside.

        > `skip` and `fail` look at the name itself
        > only, not at the alternate names of earlier renamed uploads, and decide when
        > the UPLOAD is answered: a file that takes the name later, while a `skip`
        > upload is under way, is not compared, and that upload is stored beside it as
        > for `rename` (COMPLETED's `path` says so).
        """
        server = Server()
        server.upload("a.tif", b"first")
        beside = server.upload("a.tif").path
        self.assertNotEqual(beside, "complete/a.tif")
        c = server.connect()
        self.assertIsInstance(self.ask(c, "a.tif", "skip"), Accepted)
        c.lose()
        c = server.connect()
        self.assertIsInstance(self.ask(c, "b.tif", "skip"), Accepted)
        server.upload("b.tif")  # the same bytes take the name meanwhile
        path = c.send_all(CONTENT).path
        self.assertNotEqual(path, "complete/b.tif")
        self.assertEqual(server.storage.read_completed(path), CONTENT)


PUT_LIMITS = ServerLimits(max_payload=4096, chunk_size=4096, max_put=4096)


def put_frame(upload_id: str, content: bytes = CONTENT[:1000], name: str = "p.tif",
              metadata: dict[str, str] | None = None, crc32: int | None = None) -> bytes:
    """An encoded PUT of C{content}."""
    return encode(Put(upload_id, name, hashlib.sha256(content).digest(), metadata or {},
                      zlib.crc32(content) if crc32 is None else crc32, content))


class PutSpecTests(SynchronousTestCase):
    """PUT (0x11), section 2, against a server that announces put."""

    def test_announced(self) -> None:
        """
        WELCOME's put is at most max_payload; without it a PUT is refused.

        > `put` = the largest file in bytes the server takes whole in one PUT (decimal, at most `max_payload` and `max_file_size`; absent or `0`: the server takes no PUT)
        >
        > A PUT to a
        > server that did not announce `put` is `UNEXPECTED_FRAME`
        """
        c = Server(limits=ServerLimits(max_payload=4096, chunk_size=4096, max_put=1 << 20)
                   ).connect()
        self.assertEqual(c.welcome.options["put"], "4096")
        old = Server().connect()
        self.assertNotIn("put", old.welcome.options)
        [error] = old.send(put_frame("01" * 16))
        self.assertEqual(error.code, ErrorCode.UNEXPECTED_FRAME)
        self.assertTrue(old.transport.disconnecting)

    def test_answered_once_in_order(self) -> None:
        """
        Pipelined PUTs are answered one frame each, in order.

        > The server answers a PUT with **exactly one frame**: COMPLETED (its
        > `upload_id` the PUT's;
        >
        > The server stores the PUTs of a connection **at
        > the same time**, up to a bound of its own (imgresume: 4 per connection),
        > and answers them strictly in order
        """
        server = Server(limits=PUT_LIMITS)
        c = server.connect()
        answers = c.send(put_frame("01" * 16, name="a.tif") + put_frame("02" * 16, name="b.tif")
                         + put_frame("03" * 16, name="../c") + put_frame("04" * 16))
        self.assertEqual([type(a).__name__ for a in answers],
                         ["Completed", "Completed", "Error", "Completed"])
        self.assertEqual([answers[0].upload_id, answers[1].upload_id, answers[3].upload_id],
                         ["01" * 16, "02" * 16, "04" * 16])
        self.assertEqual(answers[2].code, ErrorCode.INVALID_NAME)

    def test_checks_in_order(self) -> None:
        """
        Each check's error, of command scope: the connection stays ready.

        > a
        > payload over `put` is `FILE_TOO_LARGE`; a name that is not UTF-8 or over
        > 1024 bytes is `INVALID_NAME`; bad metadata is `INVALID_METADATA` (as for
        > UPLOAD); a wrong `crc32` is `CHECKSUM_MISMATCH`
        """
        c = Server(limits=PUT_LIMITS).connect()
        cases = [
            (put_frame("01" * 16, b"x" * 4097, name="a\udcff"), ErrorCode.FILE_TOO_LARGE),
            (put_frame("01" * 16, name="a\udcff", metadata={"if-exists": "x"}),
             ErrorCode.INVALID_NAME),
            (put_frame("01" * 16, metadata={"if-exists": "x"}, crc32=1),
             ErrorCode.INVALID_METADATA),
            (put_frame("01" * 16, crc32=1), ErrorCode.CHECKSUM_MISMATCH),
        ]
        for raw, code in cases:
            [error, pong] = c.send(raw, encode(Ping(5)))
            self.assertEqual((error.code, pong), (code, Pong(5)))

    def test_repeat(self) -> None:
        """
        The same PUT again is answered alike, and stored once.

        > A PUT repeated with the same `upload_id` (by the same client) after
        > its file was stored is answered with the same COMPLETED
        """
        server = Server(limits=PUT_LIMITS)
        [first] = server.connect().send(put_frame("01" * 16))
        [again] = server.connect().send(put_frame("01" * 16))
        self.assertEqual(first, again)
        self.assertEqual(list(server.storage.files), ["complete/p.tif"])


class IntegrityTests(SynchronousTestCase):
    """§2b: the integrity algorithms of a connection, against a real server."""

    def hello(self, c: Connection, options: dict[str, str]) -> Welcome:
        [welcome] = c.send(encode(Hello("tester", options=options)))
        assert isinstance(welcome, Welcome), welcome
        return welcome

    def test_choice(self) -> None:
        """
        The server chooses, per key the client sent, the first name it knows.

        > The server answers
        > each key the client sent with the key in the singular, in WELCOME:
        > `checksum` = the first name of `checksums` it knows, `digest` = the first
        > name of `digests` it knows; a list of names it knows none of is answered
        > `crc32`, or `sha256`.
        """
        server = Server()
        welcome = self.hello(server.connect(None), {"checksums": "crc32c,crc32",
                                                    "digests": "blake3,sha256"})
        self.assertEqual((welcome.options["checksum"], welcome.options["digest"]),
                         ("crc32c", "blake3"))
        welcome = self.hello(server.connect(None), {"checksums": "adler32,crc32",
                                                    "digests": "md5"})
        self.assertEqual((welcome.options["checksum"], welcome.options["digest"]),
                         ("crc32", "sha256"))
        welcome = self.hello(server.connect(None), {"digests": "sha256"})
        self.assertNotIn("checksum", welcome.options)

    def test_old_client(self) -> None:
        """
        A client that negotiates nothing: no keys in WELCOME, CRC-32 on DATA,
        SHA-256 for the file, exactly as before.

        > A peer that negotiates nothing uses `crc32` and `sha256`. A HELLO without
        > `checksums` (or `digests`) gets no `checksum` (`digest`) in WELCOME: that is
        > every client from before negotiation, and it is served exactly as before.
        """
        server = Server()
        c = server.connect()
        assert c.welcome is not None
        self.assertFalse({"checksum", "digest"} & set(c.welcome.options))
        [accepted] = c.send(encode(Upload("a.tif", len(CONTENT), SHA)))
        self.assertEqual(accepted.tail_sha256, hashlib.sha256(b"").digest())
        completed = c.send_all(CONTENT)  # data_frame: zlib CRC-32
        self.assertEqual(completed.sha256, SHA)

    def test_crc32c_on_data(self) -> None:
        """
        With CRC-32C chosen, DATA carries it; a CRC-32 there is refused.

        > the **checksum** of every DATA payload (the u32 DATA calls `crc32`):
        """
        c = Server().connect(None)
        self.hello(c, {"checksums": "crc32c"})
        [accepted] = c.send(encode(Upload("a.tif", 6, hashlib.sha256(b"abcdef").digest())))
        [error] = c.send(encode(Data(0, zlib.crc32(b"abcdef"), b"abcdef")))
        self.assertEqual(error.code, ErrorCode.CHECKSUM_MISMATCH)
        [ack] = c.send(encode(Data(0, crc32c.crc32c(b"abcdef"), b"abcdef")))
        self.assertEqual(ack, Ack(6))

    def test_digest_fixed_at_creation(self) -> None:
        """
        A BLAKE3 upload: ACCEPTED's digests are BLAKE3; a RESUME from a
        SHA-256 connection is refused, and the connection stays ready; one
        from a BLAKE3 connection is served.

        > **An upload's digest is fixed when it is created**: it is the digest of the
        > connection that sent the UPLOAD, stored with the upload, and every digest
        > of that upload — ACCEPTED's `sha256` and `tail_sha256`, FINISH, COMPLETED
        > — is in that algorithm, on whichever server it is resumed. A RESUME of an
        > upload created with another digest than the connection's is refused with
        > `DIGEST_ALGORITHM_MISMATCH` (command scope, not retryable; the connection
        > stays `ready`), whose message names both
        """
        server = Server()
        c = server.connect(None)
        self.hello(c, {"digests": "blake3"})
        declared = blake3.blake3(CONTENT).digest()
        [accepted] = c.send(encode(Upload("a.tif", len(CONTENT), declared)))
        self.assertEqual(accepted.tail_sha256, blake3.blake3(b"").digest())
        [ack] = c.send(data_frame(0, CONTENT[:4096]))
        c.lose()
        other = server.connect(None)
        self.hello(other, {"digests": "sha256"})
        [error] = other.send(encode(Resume(accepted.upload_id)))
        self.assertEqual(error.code, ErrorCode.DIGEST_ALGORITHM_MISMATCH)
        self.assertIn("BLAKE3", error.message)
        self.assertIn("SHA-256", error.message)
        self.assertTrue(other.still_ready())
        same = server.connect(None)
        self.hello(same, {"digests": "blake3"})
        [resumed] = same.send(encode(Resume(accepted.upload_id)))
        self.assertEqual((resumed.offset, resumed.sha256), (4096, declared))
        self.assertEqual(resumed.tail_sha256, blake3.blake3(CONTENT[:4096]).digest())
        completed = same.send_all(CONTENT, 4096)
        self.assertEqual(completed.sha256, declared)

"""
Tests for L{imgresume.protocol._server.ServerConnection}, the sans-IO server
state machine, driven with raw client frames and no reactor.
"""

from __future__ import annotations

import struct
import zlib

from twisted.trial.unittest import SynchronousTestCase

from imgresume.errors import (
    ChecksumMismatch,
    DigestMismatch,
    ErrorCode,
    FrameTooLarge,
    HandshakeRejected,
    Incomplete,
    InternalError,
    MalformedFrame,
    OffsetMismatch,
    ShuttingDown,
    StorageError,
    Timeout,
    UnexpectedFrame,
    UnsupportedVersion,
    UploadBusy,
)
from imgresume.protocol._frames import (
    HEADER,
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
    Resume,
    Upload,
    Welcome,
    encode,
)
from imgresume.protocol._server import (
    ChunkReceived,
    ConnectionFailed,
    FinishRequested,
    HelloReceived,
    ResumeRequested,
    ServerConnection,
    ServerLimits,
    ServerState,
    UploadRequested,
)
from tests.support.wire import data_frame as data
from tests.support.wire import drain, new_decoder

UPLOAD_ID = "0123456789abcdef0123456789abcdef"
DIGEST = b"\x11" * 32
LIMITS = ServerLimits(max_payload=1024, chunk_size=512, max_file_size=1 << 20)


def sent_frames(server: ServerConnection) -> list:
    """Drain and decode what the server queued for the client."""
    dec = new_decoder()
    dec.feed(b"".join(server.data_to_send()))
    out = drain(dec)
    assert dec.buffered == 0
    return out


def fed(server: ServerConnection, *frames) -> object:
    """Feed encoded C{frames} and return the next event."""
    for frame in frames:
        server.receive_data(frame if isinstance(frame, bytes) else encode(frame))
    return server.next_event()


def handshaken(limits: ServerLimits = LIMITS) -> ServerConnection:
    """A server in READY after a HELLO, its output drained."""
    server = ServerConnection("srv-1", limits)
    event = fed(server, Hello("client-1"))
    assert isinstance(event, HelloReceived), event
    server.accept_hello()
    server.data_to_send()
    return server


def receiving(size: int = 100, offset: int = 0) -> ServerConnection:
    """A server in RECEIVING for an upload of C{size} bytes stored up to C{offset}."""
    server = handshaken()
    event = fed(server, Upload("a.jpg", size, DIGEST))
    assert isinstance(event, UploadRequested), event
    server.upload_opened(UPLOAD_ID, "a.jpg", size, DIGEST, offset)
    server.data_to_send()
    return server


class _any:
    """Equal to anything, for fields a test does not pin."""

    def __eq__(self, other: object) -> bool:
        return True

    def __repr__(self) -> str:
        return "<any>"


#: One client-encodable instance of every frame type.
EVERY_FRAME = {
    FrameType.HELLO: Hello("client-1"),
    FrameType.WELCOME: Welcome(1, "x", 1, 1, 1),
    FrameType.UPLOAD: Upload("a.jpg", 10, DIGEST),
    FrameType.RESUME: Resume(UPLOAD_ID),
    FrameType.ACCEPTED: Accepted(UPLOAD_ID, "a.jpg", 10, DIGEST, 0),
    FrameType.DATA: Data(0, zlib.crc32(b""), b""),
    FrameType.ACK: Ack(1),
    FrameType.COMPLETED: Completed(UPLOAD_ID, 10, DIGEST, "/a.jpg"),
    FrameType.ERROR: Error(ErrorCode.TIMEOUT, "x"),
    FrameType.PING: Ping(1),
    FrameType.PONG: Pong(1),
    FrameType.FINISH: Finish(DIGEST),
}

#: How to reach each state that reads frames, and what is legal there.
READING_STATES = {
    ServerState.AWAIT_HELLO: (
        lambda: ServerConnection("srv-1", LIMITS), {FrameType.HELLO}
    ),
    ServerState.READY: (handshaken, {FrameType.UPLOAD, FrameType.RESUME, FrameType.PING}),
    ServerState.RECEIVING: (receiving, {FrameType.DATA, FrameType.PING}),
}


class HappyPathTests(SynchronousTestCase):
    """A fresh upload and a resumed one, start to end."""

    def test_hello_welcome(self) -> None:
        """HELLO yields HelloReceived; accept_hello sends WELCOME with the limits."""
        server = ServerConnection("srv-1", LIMITS)
        self.assertEqual(server.state, ServerState.AWAIT_HELLO)
        hello = Hello("client-1", 1, 2, {"agent": "t"})
        self.assertEqual(fed(server, hello), HelloReceived(hello))
        self.assertEqual(server.state, ServerState.CHECKING_HELLO)
        self.assertIsNone(server.client_id)
        self.assertEqual(server.data_to_send(), [])
        server.accept_hello({"region": "eu"})
        self.assertEqual(
            server.data_to_send(),
            [encode(Welcome(1, "srv-1", 1024, 1 << 20, 512,
                            {"late-digest": "1", "if-exists": "rename,skip,fail",
                             "region": "eu"}))],
        )
        self.assertEqual(server.state, ServerState.READY)
        self.assertEqual(server.client_id, "client-1")

    def test_fresh_upload_then_another(self) -> None:
        """UPLOAD, DATA, ACK, the empty DATA and COMPLETED; then a second upload."""
        server = handshaken()
        for number in range(2):
            upload = Upload(f"img{number}.jpg", 10, DIGEST, {"camera": "x"})
            self.assertEqual(fed(server, upload), UploadRequested(upload))
            self.assertEqual(server.state, ServerState.OPENING)
            self.assertEqual(server.data_to_send(), [])

            server.upload_opened(UPLOAD_ID, upload.name, 10, DIGEST, 0)
            self.assertEqual(
                server.data_to_send(),
                [encode(Accepted(UPLOAD_ID, upload.name, 10, DIGEST, 0))],
            )
            self.assertEqual(server.state, ServerState.RECEIVING)
            self.assertEqual((server.upload_id, server.size, server.offset), (UPLOAD_ID, 10, 0))

            self.assertEqual(fed(server, data(0, b"012345")), ChunkReceived(0, b"012345"))
            self.assertEqual((server.state, server.chunks_pending), (ServerState.RECEIVING, 1))
            server.chunk_written(6)
            self.assertEqual(server.data_to_send(), [encode(Ack(6))])
            self.assertEqual((server.state, server.chunks_pending), (ServerState.RECEIVING, 0))

            self.assertEqual(fed(server, data(6, b"6789")), ChunkReceived(6, b"6789"))
            server.chunk_written(10)
            self.assertEqual(sent_frames(server), [Ack(10)])

            self.assertEqual(fed(server, data(10, b"")), FinishRequested(10))
            self.assertEqual(server.state, ServerState.COMPLETING)
            server.upload_completed(UPLOAD_ID, 10, DIGEST, "/srv/img.jpg")
            self.assertEqual(
                server.data_to_send(),
                [encode(Completed(UPLOAD_ID, 10, DIGEST, "/srv/img.jpg"))],
            )
            self.assertEqual(server.state, ServerState.READY)
            self.assertEqual((server.upload_id, server.size, server.offset), (None, 0, 0))

    def test_empty_file(self) -> None:
        """A zero-byte upload finishes with the empty DATA at offset 0."""
        server = receiving(size=0)
        self.assertEqual(fed(server, data(0, b"")), FinishRequested(0))

    def test_data_exactly_max_payload(self) -> None:
        """A DATA payload of exactly max_payload is accepted."""
        server = receiving(size=4096)
        payload = b"p" * LIMITS.max_payload
        self.assertEqual(fed(server, data(0, payload)), ChunkReceived(0, payload))

    def test_resume(self) -> None:
        """RESUME yields ResumeRequested; ACCEPTED carries the offset and tail."""
        server = handshaken()
        self.assertEqual(fed(server, Resume(UPLOAD_ID)), ResumeRequested(UPLOAD_ID))
        self.assertEqual(server.state, ServerState.OPENING)
        server.upload_opened(UPLOAD_ID, "a.jpg", 100, DIGEST, 40, (30, 10, b"\x22" * 32))
        self.assertEqual(
            sent_frames(server),
            [Accepted(UPLOAD_ID, "a.jpg", 100, DIGEST, 40, 30, 10, b"\x22" * 32)],
        )
        self.assertEqual(server.offset, 40)
        self.assertEqual(fed(server, data(40, b"abc")), ChunkReceived(40, b"abc"))

    def test_resume_already_complete(self) -> None:
        """upload_completed answers a RESUME directly from OPENING with COMPLETED."""
        server = handshaken()
        fed(server, Resume(UPLOAD_ID))
        server.upload_completed(UPLOAD_ID, 100, DIGEST, "/srv/a.jpg")
        self.assertEqual(sent_frames(server), [Completed(UPLOAD_ID, 100, DIGEST, "/srv/a.jpg")])
        self.assertEqual(server.state, ServerState.READY)

    def test_ping_ready(self) -> None:
        """PING in READY is answered with PONG and yields no event."""
        server = handshaken()
        self.assertIsNone(fed(server, Ping(77)))
        self.assertEqual(sent_frames(server), [Pong(77)])
        self.assertEqual(server.state, ServerState.READY)

    def test_ping_receiving(self) -> None:
        """PING in RECEIVING is answered with PONG; the upload state is untouched."""
        server = receiving(offset=5)
        self.assertIsNone(fed(server, Ping(2**64 - 1)))
        self.assertEqual(sent_frames(server), [Pong(2**64 - 1)])
        self.assertEqual((server.state, server.offset), (ServerState.RECEIVING, 5))


class IllegalFrameTests(SynchronousTestCase):
    """Every frame type not legal in a state ends the connection."""

    def assertFatal(self, server: ServerConnection, event, error_type, where="") -> None:
        """C{event} ended the connection with one ERROR frame of C{error_type}."""
        self.assertIsInstance(event, ConnectionFailed, where)
        self.assertIsInstance(event.error, error_type, where)
        self.assertEqual(server.state, ServerState.CLOSED, where)
        out = sent_frames(server)
        self.assertEqual(len(out), 1, where)
        self.assertIsInstance(out[0], Error, where)
        self.assertEqual(out[0].code, error_type.code, where)

    def test_every_illegal_frame_in_every_state(self) -> None:
        """Each frame type illegal in AWAIT_HELLO, READY or RECEIVING is UnexpectedFrame."""
        checked = 0
        for state, (make, legal) in READING_STATES.items():
            for kind, frame in EVERY_FRAME.items():
                if kind in legal:
                    continue
                server = make()
                self.assertEqual(server.state, state)
                where = f"{kind.name} in {state.name}"
                self.assertFatal(server, fed(server, frame), UnexpectedFrame, where)
                self.assertIsNone(server.next_event(), where)
                checked += 1
        self.assertEqual(checked, 11 + 9 + 10)

    def test_illegal_after_pending_answer(self) -> None:
        """A frame buffered while an answer is pending is judged in the new state."""
        server = ServerConnection("srv-1", LIMITS)
        self.assertIsInstance(fed(server, Hello("c"), Hello("c")), HelloReceived)
        self.assertIsNone(server.next_event())
        server.accept_hello()
        server.data_to_send()
        self.assertFatal(server, server.next_event(), UnexpectedFrame)

    def test_unsupported_version(self) -> None:
        """A HELLO whose version range excludes 1 is UnsupportedVersion."""
        for vmin, vmax in [(2, 3), (0, 0), (2, 1)]:
            server = ServerConnection("srv-1", LIMITS)
            self.assertFatal(
                server, fed(server, Hello("c", vmin, vmax)), UnsupportedVersion, (vmin, vmax)
            )

    def test_version_range_including_one(self) -> None:
        """A HELLO offering 0-5 is accepted."""
        server = ServerConnection("srv-1", LIMITS)
        self.assertIsInstance(fed(server, Hello("c", 0, 5)), HelloReceived)

    def test_bad_client_id(self) -> None:
        """Empty, over-long or oddly-charactered client ids are HandshakeRejected."""
        for client_id in ["", "a" * 129, "has space", "semi;colon", "\u00e9", "a/b", "x\n"]:
            server = ServerConnection("srv-1", LIMITS)
            self.assertFatal(
                server, fed(server, Hello(client_id)), HandshakeRejected, repr(client_id)
            )

    def test_good_client_ids(self) -> None:
        """Client ids of 1-128 characters of the documented set are accepted."""
        for client_id in ["a", "a" * 128, "host.example:42", "me@host+x_y-z"]:
            server = ServerConnection("srv-1", LIMITS)
            self.assertIsInstance(fed(server, Hello(client_id)), HelloReceived, client_id)

    def test_data_too_large_after_handshake(self) -> None:
        """A DATA header above max_payload fails the connection before its body arrives."""
        server = receiving(size=1 << 20)
        server.receive_data(HEADER.pack(FrameType.DATA, 12 + LIMITS.max_payload + 1))
        self.assertFatal(server, server.next_event(), FrameTooLarge)

    def test_data_payload_before_handshake(self) -> None:
        """Before WELCOME, a DATA frame with a payload is too large."""
        server = ServerConnection("srv-1", LIMITS)
        self.assertFatal(server, fed(server, data(0, b"x")), FrameTooLarge)

    def test_control_frame_too_large(self) -> None:
        """A control frame header over 64 KiB fails the connection."""
        server = handshaken()
        server.receive_data(HEADER.pack(FrameType.UPLOAD, 65537))
        self.assertFatal(server, server.next_event(), FrameTooLarge)

    def test_malformed_frame(self) -> None:
        """A frame that does not parse fails the connection with MALFORMED_FRAME."""
        server = handshaken()
        server.receive_data(HEADER.pack(FrameType.PING, 3) + b"abc")
        self.assertFatal(server, server.next_event(), MalformedFrame)

    def test_bytes_after_closed_ignored(self) -> None:
        """Once CLOSED, received bytes are dropped and produce nothing."""
        server = handshaken()
        fed(server, Ack(1))
        server.data_to_send()
        server.receive_data(encode(Upload("a", 1, DIGEST)) + encode(Ping(1)))
        self.assertEqual(server.buffered, 0)
        self.assertIsNone(server.next_event())
        self.assertEqual(server.data_to_send(), [])
        self.assertEqual(server.state, ServerState.CLOSED)

    def test_frames_after_fatal_one_in_same_read(self) -> None:
        """Frames arriving in the same read after a fatal one are never processed."""
        server = handshaken()
        event = fed(server, encode(Ack(1)) + encode(Ping(5)))
        self.assertFatal(server, event, UnexpectedFrame)
        self.assertIsNone(server.next_event())
        self.assertEqual(server.data_to_send(), [])


class CommandErrorTests(SynchronousTestCase):
    """UPLOAD checks the machine answers itself; the connection stays READY."""

    def assertRefused(self, upload: Upload, code: ErrorCode) -> None:
        """C{upload} is answered with one ERROR C{code}, no event, still READY."""
        server = handshaken()
        self.assertIsNone(fed(server, upload))
        out = sent_frames(server)
        self.assertEqual([type(f) for f in out], [Error])
        self.assertEqual(out[0].code, code)
        self.assertEqual(server.state, ServerState.READY)
        # The connection is usable: a good UPLOAD goes through.
        self.assertIsInstance(fed(server, Upload("ok", 1, DIGEST)), UploadRequested)

    def assertAllowed(self, upload: Upload) -> None:
        """C{upload} passes the machine's checks."""
        server = handshaken()
        self.assertEqual(fed(server, upload), UploadRequested(upload))

    def test_file_too_large(self) -> None:
        """A declared size above max_file_size is FILE_TOO_LARGE; at the limit is fine."""
        self.assertRefused(
            Upload("a", LIMITS.max_file_size + 1, DIGEST), ErrorCode.FILE_TOO_LARGE
        )
        self.assertAllowed(Upload("a", LIMITS.max_file_size, DIGEST))

    def test_name_too_long(self) -> None:
        """A name over 1024 UTF-8 bytes (not characters) is INVALID_NAME."""
        self.assertRefused(Upload("\u00e9" * 513, 1, DIGEST), ErrorCode.INVALID_NAME)
        self.assertAllowed(Upload("\u00e9" * 512, 1, DIGEST))

    def test_too_many_metadata_entries(self) -> None:
        """65 metadata entries are INVALID_METADATA; 64 are fine."""
        many = {f"k{i}": "v" for i in range(65)}
        self.assertRefused(Upload("a", 1, DIGEST, many), ErrorCode.INVALID_METADATA)
        many.pop("k0")
        self.assertAllowed(Upload("a", 1, DIGEST, many))

    def test_bad_metadata_key(self) -> None:
        """Empty, over-long or oddly-charactered keys are INVALID_METADATA."""
        for key in ["", "k" * 129, "a b", "a:b", "cl\u00e9"]:
            self.assertRefused(Upload("a", 1, DIGEST, {key: "v"}), ErrorCode.INVALID_METADATA)
        self.assertAllowed(Upload("a", 1, DIGEST, {"k" * 128: "v", "A.b_c-9": ""}))

    def test_long_metadata_value(self) -> None:
        """A value over 4096 UTF-8 bytes is INVALID_METADATA; 4096 bytes are fine."""
        self.assertRefused(
            Upload("a", 1, DIGEST, {"k": "\u00e9" * 2049}), ErrorCode.INVALID_METADATA
        )
        self.assertAllowed(Upload("a", 1, DIGEST, {"k": "\u00e9" * 2048}))


    def test_name_not_utf8(self) -> None:
        """
        A name whose bytes are not UTF-8 is INVALID_NAME, a command error:
        the frame is well formed, its text is the user's (not MALFORMED_FRAME,
        which would close the connection).
        """
        name = b"scan-\xff.tif"
        body = (struct.pack(">H", len(name)) + name + struct.pack(">Q", 1) + DIGEST
                + b"\0\0")
        raw = HEADER.pack(FrameType.UPLOAD, len(body)) + body
        self.assertRefused(raw, ErrorCode.INVALID_NAME)

    def test_metadata_not_utf8(self) -> None:
        """A metadata key or value whose bytes are not UTF-8 is INVALID_METADATA."""
        for key, value in ((b"k", b"\xff"), (b"\xc3", b"v")):
            body = (b"\0\x01a" + struct.pack(">Q", 1) + DIGEST + b"\0\x01"
                    + struct.pack(">H", len(key)) + key + struct.pack(">H", len(value)) + value)
            raw = HEADER.pack(FrameType.UPLOAD, len(body)) + body
            self.assertRefused(raw, ErrorCode.INVALID_METADATA)

    def test_if_exists(self) -> None:
        """
        The metadata key if-exists takes rename, skip or fail (the event
        carries it; rename when absent); skip needs the SHA-256 in UPLOAD.
        """
        for policy in ("rename", "skip", "fail"):
            upload = Upload("a", 1, DIGEST, {"if-exists": policy})
            self.assertEqual(fed(handshaken(), upload), UploadRequested(upload, policy))
        self.assertEqual(fed(handshaken(), Upload("a", 1, DIGEST)).if_exists, "rename")
        for value in ("overwrite", "SKIP", ""):
            self.assertRefused(Upload("a", 1, DIGEST, {"if-exists": value}),
                               ErrorCode.INVALID_METADATA)
        self.assertRefused(Upload("a", 1, None, {"if-exists": "skip"}),
                           ErrorCode.INVALID_METADATA)
        upload = Upload("a", 1, None, {"if-exists": "fail"})
        self.assertEqual(fed(handshaken(), upload), UploadRequested(upload, "fail"))

    def test_upload_skipped(self) -> None:
        """upload_skipped() answers the UPLOAD with COMPLETED for no upload; READY again."""
        server = handshaken()
        fed(server, Upload("a", 10, DIGEST, {"if-exists": "skip"}))
        server.upload_skipped(10, DIGEST, "complete/a")
        self.assertEqual(sent_frames(server), [Completed("0" * 32, 10, DIGEST, "complete/a")])
        self.assertEqual(server.state, ServerState.READY)
        self.assertRaises(RuntimeError, server.upload_skipped, 10, DIGEST, "complete/a")


class TransferErrorTests(SynchronousTestCase):
    """DATA checks the machine answers itself; the transfer goes on."""

    def assertTransferError(self, server: ServerConnection, frame: bytes, code, offset) -> None:
        """C{frame} is answered with one ERROR C{code} at C{offset}, still RECEIVING."""
        self.assertIsNone(fed(server, frame))
        self.assertEqual(sent_frames(server), [Error(code, _any(), offset, _any())])
        self.assertEqual(server.state, ServerState.RECEIVING)
        self.assertEqual(server.offset, offset)

    def test_offset_mismatch(self) -> None:
        """A DATA not at the stored offset is OFFSET_MISMATCH carrying that offset."""
        server = receiving(size=100, offset=40)
        self.assertTransferError(server, data(0, b"abc"), ErrorCode.OFFSET_MISMATCH, 40)
        self.assertTransferError(server, data(41, b"abc"), ErrorCode.OFFSET_MISMATCH, 40)
        self.assertEqual(fed(server, data(40, b"abc")), ChunkReceived(40, b"abc"))

    def test_offset_mismatch_is_retryable(self) -> None:
        """The OFFSET_MISMATCH ERROR frame says nothing about retrying later."""
        server = receiving(offset=3)
        fed(server, data(0, b"x"))
        [error] = sent_frames(server)
        self.assertEqual(error.retry_after_ms, 0)
        self.assertIn("continue from 3", error.message)

    def test_checksum_mismatch(self) -> None:
        """A payload not matching its CRC-32 is CHECKSUM_MISMATCH; the resend works."""
        server = receiving(size=100, offset=10)
        bad = encode(Data(10, zlib.crc32(b"abc") ^ 1, b"abc"))
        self.assertTransferError(server, bad, ErrorCode.CHECKSUM_MISMATCH, 10)
        self.assertEqual(fed(server, data(10, b"abc")), ChunkReceived(10, b"abc"))

    def test_size_exceeded(self) -> None:
        """A packet reaching past the declared size is SIZE_EXCEEDED."""
        server = receiving(size=10, offset=8)
        self.assertTransferError(server, data(8, b"abc"), ErrorCode.SIZE_EXCEEDED, 8)
        self.assertEqual(fed(server, data(8, b"ab")), ChunkReceived(8, b"ab"))

    def test_incomplete(self) -> None:
        """The empty DATA before all bytes are stored is INCOMPLETE."""
        server = receiving(size=10, offset=4)
        self.assertTransferError(server, data(4, b""), ErrorCode.INCOMPLETE, 4)

    def test_finish_at_wrong_offset(self) -> None:
        """An empty DATA at the declared size but not the stored offset is OFFSET_MISMATCH."""
        server = receiving(size=10, offset=4)
        self.assertTransferError(server, data(10, b""), ErrorCode.OFFSET_MISMATCH, 4)

    def test_one_answer_per_packet(self) -> None:
        """A window of packets behind a bad one gets one ERROR each, in order."""
        server = receiving(size=100)
        server.receive_data(
            data(0, b"aaaa")
            + encode(Data(4, 0, b"bbbb"))
            + data(8, b"cccc")
            + data(12, b"dddd")
        )
        self.assertEqual(server.next_event(), ChunkReceived(0, b"aaaa"))
        server.chunk_written(4)
        self.assertIsNone(server.next_event())
        out = sent_frames(server)
        self.assertEqual(out[0], Ack(4))
        self.assertEqual(
            [(f.code, f.offset) for f in out[1:]],
            [
                (ErrorCode.CHECKSUM_MISMATCH, 4),
                (ErrorCode.OFFSET_MISMATCH, 4),
                (ErrorCode.OFFSET_MISMATCH, 4),
            ],
        )
        self.assertEqual(fed(server, data(4, b"bbbb")), ChunkReceived(4, b"bbbb"))


class FailTests(SynchronousTestCase):
    """fail() answers a pending event; the error's scope picks the next state."""

    def writing(self) -> ServerConnection:
        """A server writing a chunk at 0..4 of a 100-byte upload."""
        server = receiving(size=100)
        fed(server, data(0, b"abcd"))
        self.assertEqual((server.state, server.chunks_pending), (ServerState.RECEIVING, 1))
        return server

    def test_transfer_error_from_a_write_ends_the_upload(self) -> None:
        """
        Storage failing a chunk ends the upload on this connection whatever
        the scope (later chunks may already be on their way): READY.
        """
        server = self.writing()
        fed(server, data(4, b"efgh"))
        self.assertIsNone(server.fail(ChecksumMismatch("disk disagrees", offset=0)))
        self.assertEqual(sent_frames(server), [Error(ErrorCode.CHECKSUM_MISMATCH, "disk disagrees", 0)])
        self.assertEqual((server.state, server.upload_id, server.chunks_pending),
                         (ServerState.READY, None, 0))

    def test_transfer_scope_from_completing(self) -> None:
        """A TRANSFER error while completing returns to RECEIVING at its offset."""
        server = receiving(size=4, offset=4)
        fed(server, data(4, b""))
        self.assertEqual(server.state, ServerState.COMPLETING)
        server.fail(Incomplete("only 2 bytes on disk", offset=2))
        self.assertEqual([f.code for f in sent_frames(server)], [ErrorCode.INCOMPLETE])
        self.assertEqual((server.state, server.offset), (ServerState.RECEIVING, 2))
        self.assertEqual(fed(server, data(2, b"cd")), ChunkReceived(2, b"cd"))

    def test_command_scope_from_writing(self) -> None:
        """A COMMAND error while writing ends the upload; the connection is READY."""
        server = self.writing()
        self.assertIsNone(server.fail(StorageError("disk on fire")))
        self.assertEqual([f.code for f in sent_frames(server)], [ErrorCode.STORAGE_ERROR])
        self.assertEqual(server.state, ServerState.READY)
        self.assertEqual((server.upload_id, server.size, server.offset), (None, 0, 0))
        self.assertIsInstance(fed(server, Upload("b", 1, DIGEST)), UploadRequested)

    def test_command_scope_from_completing(self) -> None:
        """A DIGEST_MISMATCH at completion ends the upload; the connection is READY."""
        server = receiving(size=0)
        fed(server, data(0, b""))
        server.fail(DigestMismatch("sha256 differs"))
        self.assertEqual([f.code for f in sent_frames(server)], [ErrorCode.DIGEST_MISMATCH])
        self.assertEqual(server.state, ServerState.READY)

    def test_command_scope_from_opening(self) -> None:
        """A COMMAND error opening an upload is sent with its retry hint in ms."""
        server = handshaken()
        fed(server, Resume(UPLOAD_ID))
        server.fail(UploadBusy("someone else", retry_after=2.5))
        self.assertEqual(
            sent_frames(server), [Error(ErrorCode.UPLOAD_BUSY, "someone else", 0, 2500)]
        )
        self.assertEqual(server.state, ServerState.READY)

    def test_transfer_scope_from_opening(self) -> None:
        """A TRANSFER error opening an upload (no transfer yet) ends the command."""
        server = handshaken()
        fed(server, Resume(UPLOAD_ID))
        server.fail(OffsetMismatch("odd", offset=3))
        self.assertEqual([f.code for f in sent_frames(server)], [ErrorCode.OFFSET_MISMATCH])
        self.assertEqual(server.state, ServerState.READY)

    def test_connection_scope(self) -> None:
        """A CONNECTION error closes: ConnectionFailed, one ERROR, state CLOSED."""
        server = self.writing()
        error = InternalError("bug")
        event = server.fail(error)
        self.assertEqual(event, ConnectionFailed(error))
        self.assertEqual([f.code for f in sent_frames(server)], [ErrorCode.INTERNAL_ERROR])
        self.assertEqual(server.state, ServerState.CLOSED)

    def test_fail_needs_a_pending_event(self) -> None:
        """fail() with no storage work pending is a caller bug: RuntimeError."""
        server = handshaken()
        self.assertRaises(RuntimeError, server.fail, InternalError("bug"))
        self.assertEqual(server.state, ServerState.READY)

    def test_close_from_any_state(self) -> None:
        """close() sends its error once; closing again sends nothing."""
        server = receiving()
        error = Timeout("idle", retry_after=1)
        self.assertEqual(server.close(error), ConnectionFailed(error))
        self.assertEqual(sent_frames(server), [Error(ErrorCode.TIMEOUT, "idle", 0, 1000)])
        self.assertEqual(server.state, ServerState.CLOSED)
        self.assertIsInstance(server.close(ShuttingDown("bye")), ConnectionFailed)
        self.assertEqual(server.data_to_send(), [])

    def test_long_message_truncated(self) -> None:
        """Error messages go out cut to 1024 UTF-8 bytes without splitting a character."""
        server = self.writing()
        server.fail(StorageError("\u00e9" * 1000))
        [error] = sent_frames(server)
        self.assertEqual(error.message, "\u00e9" * 512)


class PendingTests(SynchronousTestCase):
    """One event at a time: nothing more is read while an answer is pending."""

    def test_chunks_keep_coming_while_written(self) -> None:
        """
        Chunks are handed out while earlier ones are still being written (so
        storage can batch them); ACKs go out in order as they are written.
        """
        server = receiving(size=100)
        server.receive_data(data(0, b"aa") + data(2, b"bb") + encode(Ping(9)))
        self.assertEqual(server.next_event(), ChunkReceived(0, b"aa"))
        self.assertEqual(server.next_event(), ChunkReceived(2, b"bb"))
        self.assertIsNone(server.next_event())
        self.assertEqual(server.chunks_pending, 2)
        self.assertEqual(sent_frames(server), [Pong(9)])
        self.assertRaises(RuntimeError, server.chunk_written, 4)  # out of order
        server.chunk_written(2)
        server.chunk_written(4)
        self.assertEqual(sent_frames(server), [Ack(2), Ack(4)])
        self.assertEqual(server.buffered, 0)

    def test_acknowledgement_below_chunk_end(self) -> None:
        """
        A storage that commits in larger units acknowledges less than it
        holds; the next packet still continues at the end of the last one.
        """
        server = receiving(size=100)
        server.receive_data(data(0, b"aaaa") + data(4, b"bbbb"))
        self.assertEqual(server.next_event(), ChunkReceived(0, b"aaaa"))
        self.assertEqual(server.next_event(), ChunkReceived(4, b"bbbb"))
        server.chunk_written(4, durable=0)
        self.assertRaises(RuntimeError, server.chunk_written, 8, durable=9)
        server.chunk_written(8, durable=8)
        self.assertEqual(sent_frames(server), [Ack(0), Ack(8)])
        self.assertEqual((server.offset, server.durable), (8, 8))

    def test_finish_waits_for_pending_chunks(self) -> None:
        """The empty DATA right behind a chunk completes only once that chunk is durable."""
        server = receiving(size=2)
        server.receive_data(data(0, b"aa") + data(2, b""))
        self.assertEqual(server.next_event(), ChunkReceived(0, b"aa"))
        self.assertIsNone(server.next_event())
        self.assertEqual(server.state, ServerState.FINISHING)
        server.chunk_written(2)
        self.assertEqual(server.next_event(), FinishRequested(2))
        self.assertEqual(server.state, ServerState.COMPLETING)

    def test_pending_hello(self) -> None:
        """An UPLOAD sent right behind HELLO is read only after accept_hello."""
        server = ServerConnection("srv-1", LIMITS)
        upload = Upload("a", 1, DIGEST)
        self.assertIsInstance(fed(server, Hello("c"), upload), HelloReceived)
        self.assertIsNone(server.next_event())
        server.accept_hello()
        self.assertEqual(server.next_event(), UploadRequested(upload))

    def test_pending_hello_then_large_data(self) -> None:
        """DATA buffered behind HELLO is checked against the negotiated limit."""
        server = ServerConnection("srv-1", LIMITS)
        payload = b"z" * 100
        server.receive_data(
            encode(Hello("c")) + encode(Upload("a", 100, DIGEST)) + data(0, payload)
        )
        self.assertIsInstance(server.next_event(), HelloReceived)
        server.accept_hello()
        self.assertIsInstance(server.next_event(), UploadRequested)
        server.upload_opened(UPLOAD_ID, "a", 100, DIGEST, 0)
        self.assertEqual(server.next_event(), ChunkReceived(0, payload))

    def test_wrong_state_answers(self) -> None:
        """Answers given in the wrong state raise RuntimeError and change nothing."""
        cases = [
            (lambda: ServerConnection("s", LIMITS), lambda s: s.accept_hello()),
            (handshaken, lambda s: s.accept_hello()),
            (handshaken, lambda s: s.upload_opened(UPLOAD_ID, "a", 1, DIGEST, 0)),
            (handshaken, lambda s: s.chunk_written(1)),
            (handshaken, lambda s: s.upload_completed(UPLOAD_ID, 1, DIGEST, "/a")),
            (receiving, lambda s: s.chunk_written(1)),
            (receiving, lambda s: s.upload_opened(UPLOAD_ID, "a", 1, DIGEST, 0)),
            (receiving, lambda s: s.upload_completed(UPLOAD_ID, 1, DIGEST, "/a")),
        ]
        for make, answer in cases:
            server = make()
            before = (server.state, server.upload_id, server.offset)
            self.assertRaises(RuntimeError, answer, server)
            self.assertEqual((server.state, server.upload_id, server.offset), before)
            self.assertEqual(server.data_to_send(), [])

    def test_answer_after_close(self) -> None:
        """An answer arriving after the connection closed raises RuntimeError."""
        server = handshaken()
        fed(server, Upload("a", 1, DIGEST))
        server.close(ShuttingDown("bye"))
        self.assertRaises(
            RuntimeError, server.upload_opened, UPLOAD_ID, "a", 1, DIGEST, 0
        )


def late(size: int = 10, offset: int = 0) -> ServerConnection:
    """A server in RECEIVING for an upload opened without its SHA-256."""
    server = handshaken()
    event = fed(server, Upload("a.jpg", size, None))
    assert event == UploadRequested(Upload("a.jpg", size, None)), event
    server.upload_opened(UPLOAD_ID, "a.jpg", size, None, offset)
    server.data_to_send()
    return server


class LateDigestTests(SynchronousTestCase):
    """Uploads whose SHA-256 comes at the end, in FINISH (docs/protocol.md)."""

    def test_offered(self) -> None:
        """WELCOME tells the client it may send the digest at the end."""
        server = ServerConnection("srv-1", LIMITS)
        fed(server, Hello("client-1"))
        server.accept_hello({"window": "8"})
        [welcome] = sent_frames(server)
        self.assertEqual(welcome.options, {"late-digest": "1", "window": "8",
                                           "if-exists": "rename,skip,fail"})

    def test_finish_carries_the_digest(self) -> None:
        """FINISH after the last byte asks to complete with its digest."""
        server = late()
        self.assertEqual(fed(server, data(0, b"0123456789")), ChunkReceived(0, b"0123456789"))
        server.chunk_written(10)
        self.assertEqual(sent_frames(server), [Ack(10)])
        self.assertEqual(fed(server, Finish(DIGEST)), FinishRequested(10, DIGEST))
        self.assertEqual(server.state, ServerState.COMPLETING)

    def test_finish_waits_for_pending_chunks(self) -> None:
        """A FINISH right behind chunks still being written waits for them."""
        server = late()
        self.assertIsInstance(fed(server, data(0, b"0123456789")), ChunkReceived)
        self.assertIsNone(fed(server, Finish(DIGEST)))
        self.assertEqual(server.state, ServerState.FINISHING)
        server.chunk_written(10)
        self.assertEqual(server.next_event(), FinishRequested(10, DIGEST))

    def test_finish_too_early(self) -> None:
        """FINISH before every byte is INCOMPLETE; the upload goes on."""
        server = late()
        fed(server, data(0, b"01234"))
        server.chunk_written(5)
        self.assertIsNone(fed(server, Finish(DIGEST)))
        [ack, error] = sent_frames(server)
        self.assertEqual((error.code, error.offset), (ErrorCode.INCOMPLETE, 5))
        self.assertEqual(server.state, ServerState.RECEIVING)

    def test_empty_data_refused(self) -> None:
        """An upload opened without its digest cannot end with an empty DATA."""
        server = late(size=0)
        event = fed(server, data(0, b""))
        self.assertIsInstance(event, ConnectionFailed)
        self.assertIsInstance(event.error, UnexpectedFrame)
        self.assertIn("FINISH", event.error.message)

    def test_finish_refused_for_declared_digest(self) -> None:
        """An upload that declared its digest ends with an empty DATA, not FINISH."""
        server = receiving(size=0)
        event = fed(server, Finish(DIGEST))
        self.assertIsInstance(event, ConnectionFailed)
        self.assertIsInstance(event.error, UnexpectedFrame)

    def test_resent_after_completion_failure(self) -> None:
        """
        When completion finds damaged bytes (INCOMPLETE from storage), the
        client resends them and FINISH again, with the digest.
        """
        server = late()
        fed(server, data(0, b"0123456789"))
        server.chunk_written(10)
        fed(server, Finish(DIGEST))
        server.fail(Incomplete("stored bytes from 4 are damaged", offset=4))
        self.assertEqual(server.state, ServerState.RECEIVING)
        fed(server, data(4, b"456789"))
        server.chunk_written(10)
        self.assertEqual(fed(server, Finish(DIGEST)), FinishRequested(10, DIGEST))

    def test_next_upload_declares_again(self) -> None:
        """After a late-digest upload, the next upload's own rule applies."""
        server = late(size=0)
        self.assertEqual(fed(server, Finish(DIGEST)), FinishRequested(0, DIGEST))
        server.upload_completed(UPLOAD_ID, 0, DIGEST, "complete/a.jpg")
        fed(server, Upload("b.jpg", 0, DIGEST))
        server.upload_opened(UPLOAD_ID, "b.jpg", 0, DIGEST, 0)
        self.assertEqual(fed(server, data(0, b"")), FinishRequested(0, None))


class RefusalListTests(SynchronousTestCase):
    """
    What the machine refuses by itself it also lists, for the caller's logs,
    counts and hooks (L{ServerConnection.refusals}).
    """

    def test_upload_refusals_listed(self) -> None:
        """A refused UPLOAD is listed with its frame and error, once."""
        server = handshaken()
        big = Upload("a", LIMITS.max_file_size + 1, DIGEST)
        bad = Upload("b", 1, DIGEST, {"a b": "v"})
        self.assertIsNone(fed(server, big, bad))
        refused = server.refusals()
        self.assertEqual([(r.upload, r.error.code) for r in refused],
                         [(big, ErrorCode.FILE_TOO_LARGE), (bad, ErrorCode.INVALID_METADATA)])
        self.assertEqual(server.refusals(), [])

    def test_refusal_listed_before_the_next_event(self) -> None:
        """A refusal and the UPLOAD after it in one read: the refusal is there with the event."""
        server = handshaken()
        good = Upload("ok", 1, DIGEST)
        self.assertEqual(fed(server, Upload("n" * 1025, 1, DIGEST), good), UploadRequested(good))
        [refusal] = server.refusals()
        self.assertEqual(refusal.error.code, ErrorCode.INVALID_NAME)

    def test_transfer_refusals_listed(self) -> None:
        """Refused DATA packets and ends of upload are listed without an UPLOAD."""
        server = receiving(size=10, offset=4)
        fed(server, data(0, b"abc"))
        fed(server, encode(Data(4, 1, b"abc")))
        fed(server, data(4, b""))
        self.assertEqual(
            [(r.upload, r.error.code) for r in server.refusals()],
            [(None, ErrorCode.OFFSET_MISMATCH), (None, ErrorCode.CHECKSUM_MISMATCH),
             (None, ErrorCode.INCOMPLETE)])

    def test_accepted_requests_not_listed(self) -> None:
        """Nothing is listed for requests handed out as events."""
        server = receiving(size=10)
        self.assertEqual(fed(server, data(0, b"abc")), ChunkReceived(0, b"abc"))
        self.assertEqual(server.refusals(), [])

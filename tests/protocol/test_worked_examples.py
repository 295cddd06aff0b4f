"""
The worked examples in docs/protocol.md are real: every hex block decodes to
the frame its caption names and re-encodes to the same bytes, and the frames
a server sends in them are what a real server (the Twisted adapter over the
memory storage) sends for the client frames before them.
"""

import hashlib
import os
import re
import zlib

from blake3 import blake3
from crc32c import crc32c
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from imgresume.protocol import SKIPPED_UPLOAD_ID, FrameDecoder, Hello, ServerLimits, encode
from imgresume.protocol._decoder import control_limit
from imgresume.server import UploadServerFactory
from imgresume.storage import memory
from imgresume.storage.interfaces import NewUpload
from imgresume.storage.memory import MemoryStorage
from tests.support.processes import REPO_ROOT

DOC = os.path.join(REPO_ROOT, "docs", "protocol.md")
CAPTION = re.compile(r"^(C->S|S->C) ([A-Z_]+)")
#: The class of each frame, by the name captions give it.
CLASSES = {"UPLOAD_STATUS": "UploadStatusFrame"}


def examples() -> list[tuple[str, bytes]]:
    """(frame name, bytes) for every captioned hex block in section 7."""
    text = open(DOC, encoding="utf-8").read()
    section = text[text.index("## 7. Worked examples"):]
    out: list[tuple[str, bytearray]] = []
    for block in re.findall(r"```\n(.*?)```", section, re.S):
        for line in block.splitlines():
            m = CAPTION.match(line)
            if m:
                out.append((m.group(2), bytearray()))
            elif line.strip():
                out[-1][1].extend(bytes.fromhex(line))
    return [(name, bytes(raw)) for name, raw in out]


class WorkedExampleTests(SynchronousTestCase):
    def test_every_block_round_trips(self) -> None:
        """Each hex block is exactly one frame of the captioned type."""
        found = examples()
        self.assertEqual(len(found), 38)
        for name, raw in found:
            decoder = FrameDecoder(control_limit(4 << 20))
            decoder.feed(raw)
            frame = decoder.next_frame()
            self.assertEqual(type(frame).__name__, CLASSES.get(name, name.title()))
            self.assertEqual(decoder.buffered, 0, name)
            self.assertEqual(encode(frame), raw, name)

    def test_example_values(self) -> None:
        """The example's file, digests and CRCs are the ones the text states."""
        content = bytes.fromhex("49492a00000000000000")
        frames = {}
        for name, raw in examples():
            decoder = FrameDecoder(control_limit(4 << 20))
            decoder.feed(raw)
            frames.setdefault(name, []).append(decoder.next_frame())
        sha = hashlib.sha256(content).digest()
        self.assertEqual(frames["UPLOAD"][0].sha256, sha)
        self.assertEqual(frames["UPLOAD"][0].metadata, {"dpi": "600"})
        first, second, final = frames["DATA"][:3]
        self.assertEqual(first.payload + second.payload, content)
        self.assertEqual(first.crc32, zlib.crc32(first.payload))
        self.assertEqual(second.crc32, zlib.crc32(second.payload))
        self.assertEqual((final.offset, final.payload), (10, b""))
        resumed = frames["ACCEPTED"][1]
        self.assertEqual(resumed.offset, 6)
        self.assertEqual(resumed.tail_sha256, hashlib.sha256(content[:6]).digest())
        self.assertEqual(frames["COMPLETED"][0].path, "complete/scans/a.tif")
        self.assertEqual(frames["ERROR"][0].offset, 6)
        late = frames["UPLOAD"][1]
        self.assertEqual((late.size, late.sha256), (10, None))  # 32 zero bytes
        self.assertEqual(frames["FINISH"][0].sha256, sha)
        # The same file uploaded again: if-exists.
        welcome = frames["WELCOME"][2]
        self.assertEqual(welcome.options, {"late-digest": "1", "window": "32",
                                           "if-exists": "rename,skip,fail"})
        skip, refuse = frames["UPLOAD"][2:4]
        self.assertEqual(skip.metadata, {"dpi": "600", "if-exists": "skip"})
        self.assertEqual(refuse.metadata, {"dpi": "600", "if-exists": "fail"})
        skipped = frames["COMPLETED"][1]
        self.assertEqual((skipped.upload_id, skipped.size, skipped.sha256, skipped.path),
                         (SKIPPED_UPLOAD_ID, 10, sha, "complete/scans/a.tif"))
        self.assertEqual(frames["ERROR"][1].code, 0x0107)
        # Negotiated integrity: CRC-32C and BLAKE3.
        hello, again = frames["HELLO"][2:4]
        self.assertEqual(hello.options, {"checksums": "crc32c,crc32", "digests": "blake3"})
        self.assertEqual(again.options, {"checksums": "crc32c,crc32", "digests": "sha256"})
        chosen, refusing = frames["WELCOME"][4:6]
        self.assertEqual((chosen.options["checksum"], chosen.options["digest"]),
                         ("crc32c", "blake3"))
        self.assertEqual((refusing.options["checksum"], refusing.options["digest"]),
                         ("crc32c", "sha256"))
        b3 = blake3(content).digest()
        self.assertEqual(b3.hex(), "d0973dc9b89baef84e0750b34dc138f196fecdaf8af1a2b51a544622f9374e0e")
        upload, accepted = frames["UPLOAD"][4], frames["ACCEPTED"][2]
        self.assertEqual((upload.sha256, accepted.sha256), (b3, b3))
        self.assertEqual(accepted.tail_sha256, blake3(b"").digest())
        data = frames["DATA"][3]
        self.assertEqual((data.offset, data.payload), (0, content[:6]))
        self.assertEqual(data.crc32, crc32c(content[:6]))
        self.assertEqual((crc32c(content[:6]), crc32c(content[6:])), (0x82390E18, 0x48674BC7))
        self.assertEqual(frames["ERROR"][2].code, 0x0205)
        # The upload's digest algorithm in UPLOAD_STATUS.
        self.assertEqual(frames["HELLO"][4].options, {"status-fields": "digest"})
        self.assertEqual(frames["STATUS"][0].upload_id, accepted.upload_id)
        status = frames["UPLOAD_STATUS"][0]
        self.assertEqual((status.name, status.size, status.complete, status.offset, status.busy,
                          status.owner, status.created_ms, status.updated_ms, status.path,
                          status.fields),
                         ("scans/a.tif", 10, False, 6, False, "", 1796000000000,
                          1796000000000, "", {"digest": "blake3"}))


def raw_examples() -> dict[str, list[bytes]]:
    """The bytes of every example frame, by name, in the order of the document."""
    out: dict[str, list[bytes]] = {}
    for name, raw in examples():
        out.setdefault(name, []).append(raw)
    return out


class RealServerTests(SynchronousTestCase):
    """
    What the examples show a server sending is byte for byte what
    imgresume's server sends (upload id and server id fixed as in the
    example).
    """

    def server(self, storage: MemoryStorage, server_id: str = "node-a") -> tuple:
        factory = UploadServerFactory(storage, server_id, Clock())
        proto = factory.buildProtocol(None)
        transport = StringTransport()
        proto.makeConnection(transport)
        proto.dataReceived(encode(Hello("scanner-7")))
        welcome = transport.value()
        transport.clear()
        return proto, transport, welcome

    def test_fresh_upload(self) -> None:
        """
        The ACCEPTED of the fresh upload, empty tail included, and the ACK:
        as the server sends them.
        """
        raw = raw_examples()
        self.patch(memory, "new_upload_id", lambda: "00112233445566778899aabbccddeeff")
        proto, transport, _ = self.server(MemoryStorage())
        proto.dataReceived(raw["UPLOAD"][0])
        self.assertEqual(transport.value(), raw["ACCEPTED"][0])
        transport.clear()
        proto.dataReceived(raw["DATA"][0])
        self.assertEqual(transport.value(), raw["ACK"][0])

    def test_if_exists(self) -> None:
        """
        The WELCOME with the server's options, the COMPLETED of a skipped
        UPLOAD and the NAME_TAKEN of a refused one: as the server sends them.
        """
        raw = raw_examples()
        storage = MemoryStorage()
        storage.files["complete/scans/a.tif"] = bytes.fromhex("49492a00000000000000")
        proto, transport, welcome = self.server(storage, "node-b")
        self.assertEqual(welcome, raw["WELCOME"][2])
        proto.dataReceived(raw["UPLOAD"][2])
        self.assertEqual(transport.value(), raw["COMPLETED"][1])
        transport.clear()
        proto.dataReceived(raw["UPLOAD"][3])
        self.assertEqual(transport.value(), raw["ERROR"][1])
        self.assertEqual(list(storage.files), ["complete/scans/a.tif"])

    def test_put(self) -> None:
        """
        The WELCOME announcing put, and the COMPLETED answering the PUT (and
        the same PUT again): as a server with the default --max-put sends them.
        """
        raw = raw_examples()
        content = bytes.fromhex("49492a00000000000000")
        put = FrameDecoder(control_limit(4 << 20, 4 << 20))
        put.feed(raw["PUT"][0])
        frame = put.next_frame()
        self.assertEqual((frame.upload_id, frame.name, bytes(frame.payload), frame.crc32,
                          frame.sha256, frame.metadata),
                         ("00112233445566778899aabbccddeeff", "scans/a.tif", content,
                          0x9BA28FDE, hashlib.sha256(content).digest(), {"dpi": "600"}))
        storage = MemoryStorage()
        factory = UploadServerFactory(storage, "node-b", Clock(),
                                      limits=ServerLimits(max_put=4 << 20))
        for _ in range(2):
            proto = factory.buildProtocol(None)
            transport = StringTransport()
            proto.makeConnection(transport)
            proto.dataReceived(encode(Hello("scanner-7")))
            self.assertEqual(transport.value(), raw["WELCOME"][3])
            transport.clear()
            proto.dataReceived(raw["PUT"][0])
            self.assertEqual(transport.value(), raw["COMPLETED"][2])
        self.assertEqual(list(storage.files), ["complete/scans/a.tif"])

    def test_negotiated_integrity(self) -> None:
        """
        The WELCOMEs choosing CRC-32C with BLAKE3 and then SHA-256, the
        ACCEPTED with BLAKE3's empty tail, the ACK of a CRC-32C packet and
        the refusal of a RESUME in the other digest: as the server sends them.
        """
        raw = raw_examples()
        self.patch(memory, "new_upload_id", lambda: "00112233445566778899aabbccddeeff")
        storage = MemoryStorage()
        for server_id, hello, welcome in (("node-a", 2, 4), ("node-b", 3, 5)):
            factory = UploadServerFactory(storage, server_id, Clock())
            proto = factory.buildProtocol(None)
            transport = StringTransport()
            proto.makeConnection(transport)
            proto.dataReceived(raw["HELLO"][hello])
            self.assertEqual(transport.value(), raw["WELCOME"][welcome])
            transport.clear()
            if server_id == "node-a":
                proto.dataReceived(raw["UPLOAD"][4])
                self.assertEqual(transport.value(), raw["ACCEPTED"][2])
                transport.clear()
                proto.dataReceived(raw["DATA"][3])
                self.assertEqual(transport.value(), raw["ACK"][2])
                proto.transport.loseConnection()
                proto.connectionLost(Failure(ConnectionDone()))
            else:
                proto.dataReceived(raw["RESUME"][1])
                self.assertEqual(transport.value(), raw["ERROR"][2])

    def test_status_fields(self) -> None:
        """
        The UPLOAD_STATUS with the upload's digest algorithm, to the HELLO
        asking for it, as the server sends it; and to a HELLO that does not
        ask (every client before the option), the same frame ending at
        C{path}, as every server before the option sent it.
        """
        raw = raw_examples()
        self.patch(memory, "new_upload_id", lambda: "00112233445566778899aabbccddeeff")
        storage = MemoryStorage(now=lambda: 1796000000.0)
        content = bytes.fromhex("49492a00000000000000")
        writer = self.successResultOf(storage.create(NewUpload(
            "scans/a.tif", 10, blake3(content).digest(), {}, "scanner-7", digest="blake3")))
        self.successResultOf(writer.write(0, content[:6]))
        self.successResultOf(writer.release())
        with_fields = raw["UPLOAD_STATUS"][0]
        tail = bytes.fromhex("0001 0006 646967657374 0006 626c616b6533")
        without = bytes([0x0F]) + (len(with_fields) - 5 - len(tail)).to_bytes(4, "big") \
            + with_fields[5:-len(tail)]
        for hello, expected in ((raw["HELLO"][4], with_fields),
                                (encode(Hello("scanner-7")), without)):
            proto = UploadServerFactory(storage, "node-b", Clock()).buildProtocol(None)
            transport = StringTransport()
            proto.makeConnection(transport)
            proto.dataReceived(hello)
            transport.clear()
            proto.dataReceived(raw["STATUS"][0])
            self.assertEqual(transport.value(), expected)
        decoder = FrameDecoder(control_limit(4 << 20))
        decoder.feed(without)
        self.assertIsNone(decoder.next_frame().fields)

# -*- test-case-name: tests.server.test_faults -*-
"""
What the server does about what peers get wrong (L{imgresume.server._faults}),
driven over in-memory transports with a fake clock: text from peers is
escaped in every log line; requests the protocol machine refuses by itself
are counted and told to the hooks like any refused upload; and a peer
sending garbage as fast as it can is logged at a bounded rate, one summary
line per interval.
"""

from __future__ import annotations

import hashlib
import io
import zlib
from typing import Any

from twisted.internet.task import Clock
from twisted.internet.testing import EventLoggingObserver, StringTransport
from twisted.logger import (
    LogLevel,
    formatEvent,
    globalLogPublisher,
    textFileLogObserver,
)
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from imgresume.errors import ErrorCode
from imgresume.protocol import (
    Accepted,
    Completed,
    Data,
    Error,
    Hello,
    ServerLimits,
    Upload,
    encode,
)
from imgresume.server import UploadServerFactory
from imgresume.storage.memory import MemoryStorage
from tests.support.wire import frames_written, new_decoder

CONTENT = bytes(range(256)) * 16
SHA = hashlib.sha256(CONTENT).digest()
LIMITS = ServerLimits(max_payload=65536, chunk_size=4096, max_file_size=1 << 20)


class Recorder:
    """Upload events the hooks would get."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []

    def emit(self, event: dict[str, Any]) -> None:
        self.events.append(event)


class ServerCase(SynchronousTestCase):
    """A server factory on a memory storage and a fake clock, its logs and hook events kept."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.storage = MemoryStorage()
        self.recorder = Recorder()
        self.factory = UploadServerFactory(
            self.storage, "node-a", self.clock, limits=LIMITS, handshake_timeout=10,
            idle_timeout=600, events=self.recorder)
        self.factory.doStart()
        self.addCleanup(self.factory.doStop)
        self.log = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        self.text = io.StringIO()
        observer = textFileLogObserver(self.text)
        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)

    def connect(self, client_id: str | None = "scanner-7") -> tuple[Any, StringTransport]:
        proto = self.factory.buildProtocol(None)
        transport = StringTransport()
        proto.makeConnection(transport)
        if client_id is not None:
            proto.dataReceived(encode(Hello(client_id)))
        return proto, transport

    def frames(self, transport: StringTransport) -> list[Any]:
        return frames_written(transport, new_decoder())

    def counter(self, name: str, **labels: str) -> float:
        return self.factory.metrics.registry.get(name).value(**labels)

    def warnings(self) -> list[str]:
        return [formatEvent(e) for e in self.log if e["log_level"] == LogLevel.warn]


class LogInjectionTests(ServerCase):
    """Every peer-supplied string in a log line is escaped."""

    def test_name_with_controls(self) -> None:
        """
        A name with NUL, ESC and CR (terminal escapes, a forged line) is
        refused (INVALID_NAME) and logged as one line with visible escapes;
        no raw control character reaches the log.
        """
        proto, transport = self.connect()
        name = "scan\x00\x1b[2J\r2026-01-01T00:00:00+0000 [-] FORGED.tif"
        proto.dataReceived(encode(Upload(name, len(CONTENT), SHA)))
        [error] = self.frames(transport)[1:]
        self.assertEqual(error.code, ErrorCode.INVALID_NAME)
        text = self.text.getvalue()
        for raw in "\x00\x1b\r":
            self.assertNotIn(raw, text)
        escaped = "scan\\x00\\x1b[2J\\r2026-01-01T00:00:00+0000 [-] FORGED.tif"
        lines = text.splitlines()
        self.assertEqual(len(lines), len(self.log))  # one line per event
        [refused] = [line for line in lines if "error INVALID_NAME" in line]
        self.assertIn(f"new upload {escaped} (4.0 KiB) by scanner-7: error INVALID_NAME",
                      refused)
        self.assertFalse([line for line in lines if "FORGED" in line and line is not refused])
        # The structured field is escaped as well (for JSON logs); the hook
        # gets the name as sent, in JSON.
        [event] = [e for e in self.log if e.get("log_level") == LogLevel.warn]
        self.assertEqual(event["name"], escaped)
        self.assertEqual(self.recorder.events[-1]["name"], name)

    def test_upload_requested_is_escaped(self) -> None:
        """
        The info line of an upload requested shows the invisible characters
        a valid name may hold (a zero-width space, a no-break space) escaped.
        """
        proto, transport = self.connect()
        proto.dataReceived(encode(Upload("a\u200bb\u00a0\u00e9.tif", len(CONTENT), SHA)))
        [line] = [formatEvent(e) for e in self.log
                  if e.get("log_format", "").startswith("upload requested")]
        self.assertEqual(line, f"upload requested: a\\u200bb\\xa0\u00e9.tif "
                               f"({len(CONTENT)} bytes) by scanner-7")

    def test_name_refused_by_the_machine(self) -> None:
        """A name the machine refuses (over 1024 bytes) is logged escaped and cut short."""
        proto, transport = self.connect()
        proto.dataReceived(encode(Upload("\x1b" * 1100, 1, SHA)))
        [line] = [w for w in self.warnings() if w.startswith("upload refused")]
        self.assertNotIn("\x1b", line)
        self.assertIn("\\x1b" * 10, line)
        self.assertIn("more characters", line)


class MachineRefusalTests(ServerCase):
    """Requests the protocol machine refuses by itself are counted and told to the hooks."""

    def assertRefusal(self, upload: Upload, code: ErrorCode) -> dict[str, Any]:
        proto, transport = self.connect()
        proto.dataReceived(encode(upload))
        [error] = self.frames(transport)[1:]
        self.assertIsInstance(error, Error)
        self.assertEqual(error.code, code)
        [event] = self.recorder.events[-1:]
        self.assertEqual(event["event"], "upload.failed")
        self.assertEqual(event["error"]["code"], code.name)
        self.assertEqual((event["client_id"], event["size"], event["upload_id"]),
                         ("scanner-7", upload.size, None))
        self.assertEqual(self.counter("imgresume_uploads_failed_total", code=code.name), 1)
        self.assertTrue(any(w.startswith("upload refused: ") and code.name in w
                            for w in self.warnings()), self.warnings())
        return event

    def test_file_too_large(self) -> None:
        """FILE_TOO_LARGE: upload.failed with the name and size, counted."""
        event = self.assertRefusal(Upload("big.tif", LIMITS.max_file_size + 1, SHA),
                                   ErrorCode.FILE_TOO_LARGE)
        self.assertEqual((event["name"], event["sha256"]), ("big.tif", SHA.hex()))

    def test_invalid_metadata(self) -> None:
        """INVALID_METADATA: upload.failed with the metadata sent, counted."""
        event = self.assertRefusal(Upload("a.tif", 1, SHA, {"bad key": "v"}),
                                   ErrorCode.INVALID_METADATA)
        self.assertEqual(event["metadata"], {"bad key": "v"})

    def test_name_too_long(self) -> None:
        """A name over 1024 bytes: INVALID_NAME, upload.failed, counted."""
        self.assertRefusal(Upload("n" * 1025, 1, SHA), ErrorCode.INVALID_NAME)

    def test_refusal_then_upload_in_one_read(self) -> None:
        """
        A refused UPLOAD and a good one arriving together give their events
        in order, each with its own name.
        """
        proto, transport = self.connect()
        proto.dataReceived(encode(Upload("big.tif", LIMITS.max_file_size + 1, SHA))
                           + encode(Upload("ok.tif", len(CONTENT), SHA)))
        self.assertEqual([(e["event"], e["name"]) for e in self.recorder.events],
                         [("upload.failed", "big.tif"), ("upload.created", "ok.tif")])
        self.assertIsInstance(self.frames(transport)[-1], Accepted)

    def test_transfer_errors_counted(self) -> None:
        """
        A DATA packet the machine refuses (a bad CRC-32) is counted by code;
        the transfer goes on, so no upload.failed: the upload completes.
        """
        proto, transport = self.connect()
        proto.dataReceived(encode(Upload("a.tif", len(CONTENT), SHA)))
        proto.dataReceived(encode(Data(0, zlib.crc32(CONTENT) ^ 1, CONTENT)))
        proto.dataReceived(encode(Data(0, zlib.crc32(CONTENT), CONTENT)))
        proto.dataReceived(encode(Data(len(CONTENT), 0, b"")))
        self.assertIsInstance(self.frames(transport)[-1], Completed)
        self.assertEqual(
            self.counter("imgresume_transfer_errors_total", code="CHECKSUM_MISMATCH"), 1)
        self.assertEqual([e["event"] for e in self.recorder.events],
                         ["upload.created", "upload.completed"])

    def test_connection_errors_counted(self) -> None:
        """A connection closed with an ERROR frame is counted by code."""
        proto, transport = self.connect(client_id=None)
        proto.dataReceived(b"GET / HTTP/1.1\r\n\r\n" + b"x" * 64)
        self.assertTrue(transport.disconnecting)
        [code] = [c for c in ("MALFORMED_FRAME", "FRAME_TOO_LARGE")
                  if self.counter("imgresume_connection_errors_total", code=c)]
        self.assertEqual(self.counter("imgresume_connection_errors_total", code=code), 1)


class HostileInputTests(ServerCase):
    """A peer's faults are logged at a bounded rate: a few lines, then a summary."""

    def test_garbage_connections(self) -> None:
        """
        1,000 connections from one peer, each sending garbage, give five
        full lines (and their close lines), then one summary line a minute
        later, not 2,000 lines.
        """
        for _ in range(1000):
            proto, transport = self.connect(client_id=None)
            proto.dataReceived(b"\x00" * 64)
            proto.connectionLost(Failure(Exception("gone")))
        warnings = self.warnings()
        self.assertEqual(len(warnings), 5, warnings)
        self.assertTrue(all(w.startswith("closing connection from 192.168.1.1:54321")
                            for w in warnings))
        infos = [e for e in self.log if e["log_level"] == LogLevel.info
                 and e.get("log_format", "").startswith("connection from")]
        self.assertEqual(len(infos), 5)
        self.clock.advance(60)
        [summary] = self.warnings()[5:]
        self.assertRegex(summary, r"^peer 192\.168\.1\.1: 995 more in the last 60 s, not "
                                  r"logged one by one: 995 [A-Z_]+$")
        self.assertLess(len(self.text.getvalue()), 5000)

    def test_bad_requests_on_one_connection(self) -> None:
        """Many refused requests on one connection: five lines, then a summary."""
        proto, transport = self.connect()
        for _ in range(300):
            proto.dataReceived(encode(Upload("a.tif", LIMITS.max_file_size + 1, SHA)))
        self.assertEqual(len(self.warnings()), 5)
        self.assertEqual(len(self.recorder.events), 300)  # every one is still counted
        self.clock.advance(60)
        self.assertEqual(self.warnings()[-1],
                         "peer 192.168.1.1: 295 more in the last 60 s, not logged one by "
                         "one: 295 FILE_TOO_LARGE")

    def test_invalid_names(self) -> None:
        """Many UPLOADs with names storage would refuse: five lines, then a summary."""
        proto, transport = self.connect()
        for _ in range(300):
            proto.dataReceived(encode(Upload("../\x1b.tif", 1, SHA)))
        self.assertEqual(len(self.warnings()), 5)
        self.assertFalse([e for e in self.log if e["log_level"] == LogLevel.info
                          and "upload requested" in e.get("log_format", "")])
        self.clock.advance(60)
        self.assertEqual(self.warnings()[-1],
                         "peer 192.168.1.1: 295 more in the last 60 s, not logged one by "
                         "one: 295 INVALID_NAME")

    def test_connections_closed_before_handshake(self) -> None:
        """Connections that close without a word (port scans, TCP checks) are bounded too."""
        for _ in range(50):
            proto, transport = self.connect(client_id=None)
            proto.connectionLost(Failure(Exception("gone")))
        infos = [e for e in self.log if e.get("log_format", "").startswith("connection from")]
        self.assertEqual(len(infos), 5)
        self.clock.advance(60)
        self.assertEqual(self.warnings(),
                         ["peer 192.168.1.1: 45 more in the last 60 s, not logged one by "
                          "one: 45 closed before the handshake"])

    def test_good_clients_are_not_limited(self) -> None:
        """Uploads that go well are logged in full, however many."""
        for i in range(20):
            proto, transport = self.connect()
            proto.dataReceived(encode(Upload(f"{i}.tif", len(CONTENT), SHA)))
            proto.dataReceived(encode(Data(0, zlib.crc32(CONTENT), CONTENT)))
            proto.dataReceived(encode(Data(len(CONTENT), 0, b"")))
            proto.connectionLost(Failure(Exception("done")))
        completed = [e for e in self.log
                     if e.get("log_format", "").startswith("completed upload")]
        self.assertEqual(len(completed), 20)
        self.assertEqual(self.warnings(), [])

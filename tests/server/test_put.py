"""
The PUT frame on the server: L{UploadServerProtocol} over an in-memory
transport, with L{MemoryStorage}.  A whole small file stored in one step,
PUTs pipelined on one connection, stored at once and answered in order, a repeat stored
once, the errors (each of command scope: the connection stays ready), the
memory budget, the log and the hook event of a stored file, and a server
that does not offer PUT.
"""

from __future__ import annotations

import hashlib
import zlib
from typing import Any

import attrs
from twisted.internet.defer import Deferred, fail
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import EventLoggingObserver, StringTransport
from twisted.logger import globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from imgresume.errors import (
    ErrorCode,
    Scope,
    StorageError,
    StorageFull,
    UploadBusy,
    error_for_code,
)
from imgresume.protocol import (
    HEALTH_CHECK_CLIENT_ID,
    SKIPPED_UPLOAD_ID,
    Completed,
    Error,
    Hello,
    Ping,
    Pong,
    Put,
    ServerLimits,
    Upload,
    encode,
)
from imgresume.server import UploadServerFactory
from imgresume.storage.memory import MemoryStorage
from tests.support.wire import frames_written, new_decoder

CONTENT = bytes(range(256)) * 40  # 10240 bytes
SHA = hashlib.sha256(CONTENT).digest()
ID1 = "11" * 16
ID2 = "22" * 16
LIMITS = ServerLimits(max_payload=1 << 20, chunk_size=4096, max_put=64 * 1024)


def put(upload_id: str = ID1, name: str = "a.tif", content: bytes = CONTENT,
        metadata: dict[str, str] | None = None, sha256: bytes | None = None,
        crc32: int | None = None) -> bytes:
    """An encoded PUT of C{content}."""
    return encode(Put(upload_id, name, hashlib.sha256(content).digest() if sha256 is None
                      else sha256, metadata or {},
                      zlib.crc32(content) if crc32 is None else crc32, content))


class SlowWhole:
    """A storage whose store_whole waits until the test fires it."""

    def __init__(self, storage: Any) -> None:
        self.storage = storage
        self.pending: list[Deferred] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self.storage, name)

    def store_whole(self, request: Any) -> Deferred:
        gate: Deferred = Deferred()
        self.pending.append(gate)
        result = self.storage.store_whole(request)
        return gate.addCallback(lambda _: result)


class Harness:
    """A server protocol on a StringTransport, and a decoder for its output."""

    def __init__(self, storage: Any, limits: ServerLimits = LIMITS, **kw: Any) -> None:
        self.clock = Clock()
        self.events: list[dict] = []
        self.factory = UploadServerFactory(storage, "test-server", self.clock, limits=limits,
                                           events=self, **kw)
        self.proto = self.factory.buildProtocol(None)
        self.transport = StringTransport()
        self.proto.makeConnection(self.transport)
        self.decoder = new_decoder(limits.max_payload)

    def emit(self, event: dict) -> None:
        self.events.append(event)

    def send(self, *frames: bytes) -> list:
        self.proto.dataReceived(b"".join(frames))
        return frames_written(self.transport, self.decoder)

    def handshake(self, client_id: str = "tester") -> Any:
        [welcome] = self.send(encode(Hello(client_id)))
        return welcome


class PutTests(SynchronousTestCase):
    """A PUT stores a whole file in one step and is answered with COMPLETED."""

    def test_welcome_announces_put(self) -> None:
        """WELCOME's option put is the largest file a PUT may carry."""
        welcome = Harness(MemoryStorage()).handshake()
        self.assertEqual(welcome.options["put"], str(64 * 1024))

    def test_put_capped_by_max_payload(self) -> None:
        """The announced put is at most max_payload."""
        limits = ServerLimits(max_payload=8192, chunk_size=4096, max_put=1 << 20)
        self.assertEqual(Harness(MemoryStorage(), limits).handshake().options["put"], "8192")

    def test_stored(self) -> None:
        """COMPLETED carries the client's upload id; the file is in complete/."""
        storage = MemoryStorage()
        h = Harness(storage)
        h.handshake()
        [done] = h.send(put(metadata={"dpi": "600"}))
        self.assertEqual(done, Completed(ID1, len(CONTENT), SHA, "complete/a.tif"))
        self.assertEqual(storage.read_completed(done.path), CONTENT)
        self.assertEqual(h.factory.metrics.uploads_completed.value(), 1)
        self.assertEqual(h.factory.open_uploads("tester"), 0)

    def test_one_log_line_per_file(self) -> None:
        """A stored file costs one log line, naming its path, size and digest."""
        h = Harness(MemoryStorage())
        h.handshake()
        logged = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        h.send(put(), put(ID2, "b.tif"))
        lines = [e for e in logged if e.get("log_namespace", "").startswith("imgresume")]
        self.assertEqual(len(lines), 2)
        self.assertEqual(lines[0]["path"], "complete/a.tif")
        self.assertEqual(lines[0]["sha256"], SHA.hex())

    def test_completed_event_as_normal_path(self) -> None:
        """The hooks get upload.completed with the fields of the normal path."""
        h = Harness(MemoryStorage())
        h.handshake()
        h.send(put(metadata={"dpi": "600"}))
        [event] = h.events
        self.assertEqual(event["event"], "upload.completed")
        self.assertEqual(
            {k: event[k] for k in ("client_id", "upload_id", "name", "size", "sha256",
                                   "metadata", "offset", "path", "repeat")},
            {"client_id": "tester", "upload_id": ID1, "name": "a.tif",
             "size": len(CONTENT), "sha256": SHA.hex(), "metadata": {"dpi": "600"},
             "offset": len(CONTENT), "path": "complete/a.tif", "repeat": False})

    def test_pipelined_stored_at_once_answered_in_order(self) -> None:
        """
        PUTs sent before the first is answered are stored at the same time;
        the second stored first is still answered second, and a PING behind
        them is answered after both.
        """
        storage = SlowWhole(MemoryStorage())
        h = Harness(storage)
        h.handshake()
        self.assertEqual(h.send(put(ID1, "a.tif"), put(ID2, "b.tif"), encode(Ping(7))), [])
        self.assertEqual(len(storage.pending), 2)  # both being stored
        first, second = storage.pending
        storage.pending.clear()
        second.callback(None)
        self.assertEqual(frames_written(h.transport, h.decoder), [])  # waits for ID1
        first.callback(None)
        one, two, pong = frames_written(h.transport, h.decoder)
        self.assertEqual((one.upload_id, one.path), (ID1, "complete/a.tif"))
        self.assertEqual((two.upload_id, two.path), (ID2, "complete/b.tif"))
        self.assertEqual(pong, Pong(7))

    def test_puts_at_once_bounded(self) -> None:
        """
        At most C{puts_at_once} PUTs of a connection are stored at once; the
        next waits in the buffer until one is answered.
        """
        storage = SlowWhole(MemoryStorage())
        h = Harness(storage, limits=attrs.evolve(LIMITS, puts_at_once=2))
        h.handshake()
        ids = [f"{i}" * 32 for i in range(1, 5)]
        h.send(*(put(i, f"{i[0]}.tif") for i in ids))
        self.assertEqual(len(storage.pending), 2)
        storage.pending.pop(0).callback(None)
        self.assertEqual([f.upload_id for f in frames_written(h.transport, h.decoder)],
                         ids[:1])
        self.assertEqual(len(storage.pending), 2)  # the third started
        for gate in list(storage.pending):
            storage.pending.remove(gate)
            gate.callback(None)
        storage.pending.pop(0).callback(None)
        self.assertEqual([f.upload_id for f in frames_written(h.transport, h.decoder)],
                         ids[1:])

    def test_command_behind_puts_waits(self) -> None:
        """
        An UPLOAD sent behind PUTs still being stored is taken once they are
        all answered, its ACCEPTED after their COMPLETEDs.
        """
        storage = SlowWhole(MemoryStorage())
        h = Harness(storage)
        h.handshake()
        upload = encode(Upload("big.tif", 10, SHA))
        self.assertEqual(h.send(put(ID1, "a.tif"), upload), [])
        self.assertEqual(len(storage.pending), 1)
        storage.pending.pop(0).callback(None)
        done, accepted = frames_written(h.transport, h.decoder)
        self.assertEqual(done.upload_id, ID1)
        self.assertEqual((accepted.name, accepted.size), ("big.tif", 10))

    def test_error_among_puts_in_order(self) -> None:
        """
        A PUT that fails in storage, and one the machine refuses itself (a
        bad checksum), are answered with their ERRORs in their turn; the
        PUTs around them are stored.
        """
        storage = SlowWhole(MemoryStorage())
        h = Harness(storage)
        h.handshake()
        bad = put("33" * 16, "c.tif", crc32=1)
        h.send(put(ID1, "a.tif"), put(ID2, "b.tif"), bad)
        first, second = storage.pending
        storage.pending.clear()
        second.errback(StorageFull("No space left on device"))
        first.callback(None)
        one, two, three = frames_written(h.transport, h.decoder)
        self.assertEqual(one.upload_id, ID1)
        self.assertEqual(two.code, ErrorCode.STORAGE_FULL)
        self.assertEqual(three.code, ErrorCode.CHECKSUM_MISMATCH)
        self.assertEqual(h.send(put(ID2, "b.tif")), [])
        storage.pending.pop(0).callback(None)
        [again] = frames_written(h.transport, h.decoder)
        self.assertEqual(again.path, "complete/b.tif")

    def test_connection_lost_waits_for_puts(self) -> None:
        """
        A connection lost while PUTs are being stored is closed (its
        C{closed} fires) only once storage is done with them.
        """
        storage = SlowWhole(MemoryStorage())
        h = Harness(storage)
        h.handshake()
        h.send(put(ID1, "a.tif"), put(ID2, "b.tif"))
        h.proto.connectionLost(Failure(ConnectionDone()))
        self.assertNoResult(h.proto.closed)
        storage.pending.pop(0).callback(None)
        self.assertNoResult(h.proto.closed)
        storage.pending.pop(0).callback(None)
        self.successResultOf(h.proto.closed)
        self.assertEqual(h.factory.memory.used, 0)
        # Stored all the same, and told so, though nobody hears the answer.
        self.assertEqual([e["upload_id"] for e in h.events if e["event"] == "upload.completed"],
                         [ID1, ID2])

    def test_stored_after_fatal_error(self) -> None:
        """
        A PUT whose store ends after the connection was closed by a fault
        (a frame that is not legal) is told as stored, and nothing is
        answered on the closed connection.
        """
        storage = SlowWhole(MemoryStorage())
        h = Harness(storage)
        h.handshake()
        h.send(put(ID1, "a.tif"))
        [error] = h.send(encode(Hello("again")))
        self.assertEqual(error.code, ErrorCode.UNEXPECTED_FRAME)
        storage.pending.pop(0).callback(None)
        self.assertEqual(frames_written(h.transport, h.decoder), [])
        self.assertEqual([e["upload_id"] for e in h.events if e["event"] == "upload.completed"],
                         [ID1])

    def test_payload_counted_in_memory_budget(self) -> None:
        """While a PUT is being stored, its payload counts in the server's memory."""
        storage = SlowWhole(MemoryStorage())
        h = Harness(storage)
        h.handshake()
        h.send(put())
        self.assertGreaterEqual(h.factory.memory.used, len(CONTENT))
        self.assertEqual(h.factory.open_uploads("tester"), 1)
        storage.pending.pop(0).callback(None)
        self.assertEqual(h.factory.memory.used, 0)
        self.assertEqual(h.factory.open_uploads("tester"), 0)

    def test_repeat_stores_once(self) -> None:
        """The same PUT again (a lost answer) is answered alike; one file is stored."""
        storage = MemoryStorage()
        h = Harness(storage)
        h.handshake()
        [first] = h.send(put())
        other = Harness(storage)
        other.handshake()
        [again] = other.send(put())
        self.assertEqual(first, again)
        self.assertEqual(list(storage.files), ["complete/a.tif"])

    def test_skip(self) -> None:
        """if-exists=skip with the same file there: COMPLETED with 16 zero bytes, no event."""
        storage = MemoryStorage()
        h = Harness(storage)
        h.handshake()
        h.send(put())
        [skipped] = h.send(put(ID2, metadata={"if-exists": "skip"}))
        self.assertEqual(skipped, Completed(SKIPPED_UPLOAD_ID, len(CONTENT), SHA,
                                            "complete/a.tif"))
        self.assertEqual(len(h.events), 1)

    def test_rename(self) -> None:
        """A taken name is renamed, as for UPLOAD."""
        h = Harness(MemoryStorage())
        h.handshake()
        h.send(put())
        [second] = h.send(put(ID2, content=b"other"))
        self.assertEqual(second.path, "complete/a.22222222.tif")

    def test_empty_file(self) -> None:
        """An empty file is a PUT with no payload."""
        storage = MemoryStorage()
        h = Harness(storage)
        h.handshake()
        [done] = h.send(put(content=b""))
        self.assertEqual((done.size, storage.read_completed(done.path)), (0, b""))


class PutErrorTests(SynchronousTestCase):
    """Each refusal of a PUT is an ERROR of command scope: the connection stays ready."""

    def refused(self, frame: bytes, storage: Any = None, **kw: Any) -> Error:
        h = Harness(storage if storage is not None else MemoryStorage(), **kw)
        h.handshake()
        [error, pong] = h.send(frame, encode(Ping(1)))
        self.assertIsInstance(error, Error)
        self.assertEqual(pong, Pong(1))  # still ready
        self.assertFalse(h.transport.disconnecting)
        return error

    def test_over_put_limit(self) -> None:
        """A file over the announced put is FILE_TOO_LARGE."""
        error = self.refused(put(content=b"x" * (64 * 1024 + 1)))
        self.assertEqual(error.code, ErrorCode.FILE_TOO_LARGE)

    def test_name_not_utf8(self) -> None:
        """A name that is not UTF-8 is INVALID_NAME."""
        self.assertEqual(self.refused(put(name="a\udcff")).code, ErrorCode.INVALID_NAME)

    def test_name_rules(self) -> None:
        """A name the rules of section 6 refuse is INVALID_NAME."""
        self.assertEqual(self.refused(put(name="../x")).code, ErrorCode.INVALID_NAME)

    def test_bad_metadata(self) -> None:
        """An unknown if-exists is INVALID_METADATA."""
        error = self.refused(put(metadata={"if-exists": "overwrite"}))
        self.assertEqual(error.code, ErrorCode.INVALID_METADATA)

    def test_crc(self) -> None:
        """A payload that does not match its CRC-32 is CHECKSUM_MISMATCH; nothing stored."""
        storage = MemoryStorage()
        error = self.refused(put(crc32=zlib.crc32(CONTENT) ^ 1), storage)
        self.assertEqual(error.code, ErrorCode.CHECKSUM_MISMATCH)
        self.assertEqual(storage.files, {})

    def test_digest(self) -> None:
        """A payload that does not hash to the PUT's SHA-256 is DIGEST_MISMATCH."""
        storage = MemoryStorage()
        error = self.refused(put(sha256=b"\1" * 32), storage)
        self.assertEqual(error.code, ErrorCode.DIGEST_MISMATCH)
        self.assertEqual(storage.files, {})

    def test_name_taken(self) -> None:
        """if-exists=fail with a file at the name is NAME_TAKEN."""
        storage = MemoryStorage()
        storage.files["complete/a.tif"] = b"old"
        error = self.refused(put(metadata={"if-exists": "fail"}), storage)
        self.assertEqual(error.code, ErrorCode.NAME_TAKEN)

    def test_storage_full(self) -> None:
        """A storage out of space is STORAGE_FULL, retryable."""
        storage = MemoryStorage()
        storage.store_whole = lambda request: fail(StorageFull("disk full"))
        error = self.refused(put(), storage)
        self.assertEqual(error.code, ErrorCode.STORAGE_FULL)

    def retried(self, error: Exception) -> Error:
        """
        C{error} from store_whole: refused (the connection stays ready)
        with nothing held, and the same PUT sent again is stored.
        """
        storage = MemoryStorage()
        real, answers = storage.store_whole, [fail(error)]
        storage.store_whole = lambda request: answers.pop() if answers else real(request)
        h = Harness(storage)
        h.handshake()
        [refused, pong] = h.send(put(), encode(Ping(1)))
        self.assertIsInstance(refused, Error)
        self.assertEqual(pong, Pong(1))
        self.assertFalse(h.transport.disconnecting)
        self.assertEqual(h.factory.memory.used, 0)
        self.assertEqual(h.factory.open_uploads("tester"), 0)
        [done] = h.send(put())
        self.assertEqual(done, Completed(ID1, len(CONTENT), SHA, "complete/a.tif"))
        return refused

    def test_busy_retryable(self) -> None:
        """
        UploadBusy (another server holds the request's file) is UPLOAD_BUSY
        with the storage's retry hint: a client takes it for a retryable
        error of command scope; the PUT sent again is stored.
        """
        error = self.retried(UploadBusy("upload 11 is being stored", retry_after=2.5))
        self.assertEqual((error.code, error.retry_after_ms), (ErrorCode.UPLOAD_BUSY, 2500))
        seen = error_for_code(error.code, error.message, error.offset,
                              error.retry_after_ms / 1000)
        self.assertTrue(seen.retryable)
        self.assertIs(seen.scope, Scope.COMMAND)
        self.assertEqual(seen.retry_after, 2.5)

    def test_storage_error_retryable(self) -> None:
        """
        A retryable StorageError (a repeat that finds the request's file
        written moments ago, perhaps a stale view) is STORAGE_ERROR with the
        storage's message and retry hint, retryable, of command scope.
        """
        error = self.retried(StorageError("upload 11 was written moments ago; retry in 8 s",
                                          retry_after=7.5))
        self.assertEqual((error.code, error.retry_after_ms), (ErrorCode.STORAGE_ERROR, 7500))
        self.assertIn("moments ago", error.message)
        seen = error_for_code(error.code, error.message, error.offset,
                              error.retry_after_ms / 1000)
        self.assertTrue(seen.retryable)
        self.assertIs(seen.scope, Scope.COMMAND)

    def test_quota(self) -> None:
        """A client with its share of open uploads is refused with QUOTA_EXCEEDED."""
        storage = MemoryStorage()
        h = Harness(storage, max_uploads_per_client=1)
        h.handshake()
        h.send(encode(Upload("open.tif", 10, SHA)))
        other = h.factory.buildProtocol(None)
        transport = StringTransport()
        other.makeConnection(transport)
        other.dataReceived(encode(Hello("tester")) + put())
        decoder = new_decoder()
        _welcome, error = frames_written(transport, decoder)
        self.assertEqual(error.code, ErrorCode.QUOTA_EXCEEDED)

    def test_health_check_may_only_ping(self) -> None:
        """A health-check session that sends PUT is closed, as for UPLOAD."""
        h = Harness(MemoryStorage())
        h.proto._handshake.health_only = True
        h.handshake(HEALTH_CHECK_CLIENT_ID)
        [error] = h.send(put())
        self.assertEqual(error.code, ErrorCode.HANDSHAKE_REJECTED)
        self.assertTrue(h.transport.disconnecting)

    def test_put_before_welcome(self) -> None:
        """A PUT before the handshake is UNEXPECTED_FRAME (a small one) and closes."""
        h = Harness(MemoryStorage())
        [error] = h.send(put(content=b"x"))
        self.assertEqual(error.code, ErrorCode.UNEXPECTED_FRAME)
        self.assertTrue(h.transport.disconnecting)


class NotOfferedTests(SynchronousTestCase):
    """A server that does not offer PUT: old clients see no change."""

    def test_no_option(self) -> None:
        """Without max_put, WELCOME has no put option."""
        welcome = Harness(MemoryStorage(), ServerLimits()).handshake()
        self.assertNotIn("put", welcome.options)

    def test_storage_without_store_whole(self) -> None:
        """A storage without store_whole is not offered PUT."""

        class Old:
            def __getattr__(self, name: str) -> Any:
                if name == "store_whole":
                    raise AttributeError(name)
                return getattr(self.storage, name)

            storage = MemoryStorage()

        welcome = Harness(Old()).handshake()
        self.assertNotIn("put", welcome.options)

    def test_put_refused(self) -> None:
        """A PUT to a server that did not offer it is UNEXPECTED_FRAME and closes."""
        h = Harness(MemoryStorage(), ServerLimits())
        h.handshake()
        [error] = h.send(put(content=b"x"))
        self.assertEqual(error.code, ErrorCode.UNEXPECTED_FRAME)
        self.assertTrue(h.transport.disconnecting)


class PutOptionTests(SynchronousTestCase):
    """C{twistd imgresume --max-put} and C{--puts-at-once}."""

    def limits(self, *args: str) -> ServerLimits:
        from imgresume.server.tap import Options

        options = Options()
        options.parseOptions(["--storage", self.mktemp(), "--skip-storage-check", *args])
        return options["limits"]

    def test_defaults(self) -> None:
        """PUTs up to 4 MiB, four of a connection stored at once."""
        limits = self.limits()
        self.assertEqual((limits.max_put, limits.puts_at_once), (4 << 20, 4))

    def test_set(self) -> None:
        limits = self.limits("--max-put", "1M", "--puts-at-once", "1")
        self.assertEqual((limits.max_put, limits.puts_at_once), (1 << 20, 1))

    def test_at_least_one(self) -> None:
        """0 PUTs at once would never answer one: a usage error."""
        from twisted.python.usage import UsageError

        for bad in ("0", "-2", "many"):
            self.assertRaises(UsageError, self.limits, "--puts-at-once", bad)

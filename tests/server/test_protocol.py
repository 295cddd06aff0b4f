"""
The server's Twisted adapter (UploadServerProtocol) driven over an in-memory
transport with a fake clock: storage calls, backpressure, timeouts, errors
and release of ownership.
"""

import hashlib
from typing import Any

from twisted.internet.defer import fail
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from imgresume.errors import ErrorCode, StorageError, StorageFull
from imgresume.protocol import (
    Accepted,
    Ack,
    Completed,
    Data,
    Error,
    Finish,
    Hello,
    Ping,
    Pong,
    Resume,
    ServerLimits,
    Upload,
    Welcome,
    encode,
)
from imgresume.server import UploadServerFactory
from imgresume.storage.memory import MemoryStorage
from tests.support.storages import SlowStorage
from tests.support.wire import data_frame as data
from tests.support.wire import frames_written, new_decoder

CONTENT = bytes(range(256)) * 40  # 10240 bytes
SHA = hashlib.sha256(CONTENT).digest()


class Harness:
    """A server protocol on a StringTransport, and a decoder for its output."""

    def __init__(self, storage: Any, limits: ServerLimits = ServerLimits(chunk_size=4096)):
        self.clock = Clock()
        self.factory = UploadServerFactory(
            storage, "test-server", self.clock, limits=limits,
            handshake_timeout=10, idle_timeout=60,
        )
        self.proto = self.factory.buildProtocol(None)
        self.transport = StringTransport()
        self.proto.makeConnection(self.transport)
        self.decoder = new_decoder()

    def send(self, *frames: bytes) -> list:
        for raw in frames:
            self.proto.dataReceived(raw)
        return self.received()

    def received(self) -> list:
        return frames_written(self.transport, self.decoder)

    def handshake(self) -> Welcome:
        [welcome] = self.send(encode(Hello("tester")))
        return welcome

    def start(self, name: str = "a.tif") -> Accepted:
        self.handshake()
        [accepted] = self.send(encode(Upload(name, len(CONTENT), SHA)))
        return accepted


class HappyPathTests(SynchronousTestCase):
    def test_upload_then_second_upload_on_same_connection(self) -> None:
        """A whole upload completes; the connection then takes another one."""
        storage = MemoryStorage()
        h = Harness(storage)
        welcome = h.handshake()
        self.assertEqual((welcome.server_id, welcome.chunk_size), ("test-server", 4096))
        self.assertEqual(welcome.options["window"], str(h.factory.max_window))
        [acc] = h.send(encode(Upload("a.tif", len(CONTENT), SHA, {"dpi": "600"})))
        self.assertEqual((acc.offset, acc.size, acc.sha256), (0, len(CONTENT), SHA))
        acks = h.send(data(0, CONTENT[:4096]), data(4096, CONTENT[4096:]))
        self.assertEqual(acks, [Ack(4096), Ack(len(CONTENT))])
        [done] = h.send(data(len(CONTENT), b""))
        self.assertIsInstance(done, Completed)
        self.assertEqual(storage.read_completed(done.path), CONTENT)
        [acc2] = h.send(encode(Upload("b.tif", 0, hashlib.sha256(b"").digest())))
        [done2] = h.send(data(0, b""))
        self.assertEqual(done2.size, 0)
        self.assertNotEqual(acc2.upload_id, acc.upload_id)

    def test_resume_on_a_second_server(self) -> None:
        """Another server over the same storage resumes at the stored offset."""
        storage = MemoryStorage()
        first = Harness(storage)
        acc = first.start()
        first.send(data(0, CONTENT[:4096]))
        first.proto.connectionLost(Failure(Exception("gone")))
        second = Harness(storage)
        second.handshake()
        [resumed] = second.send(encode(Resume(acc.upload_id)))
        self.assertEqual(resumed.offset, 4096)
        self.assertEqual(resumed.tail_sha256, hashlib.sha256(CONTENT[:4096]).digest())
        second.send(data(4096, CONTENT[4096:]))
        [done] = second.send(data(len(CONTENT), b""))
        self.assertEqual(storage.read_completed(done.path), CONTENT)

    def test_late_digest_resumed_on_a_second_server(self) -> None:
        """
        An upload opened without its SHA-256 is resumed elsewhere (ACCEPTED
        says the digest is still to come) and ends with FINISH; a wrong
        digest there is DIGEST_MISMATCH.
        """
        storage = MemoryStorage()
        first = Harness(storage)
        first.handshake()
        [acc] = first.send(encode(Upload("a.tif", len(CONTENT), None)))
        self.assertEqual(acc.sha256, None)
        first.send(data(0, CONTENT[:4096]))
        first.proto.connectionLost(Failure(Exception("gone")))
        second = Harness(storage)
        second.handshake()
        [resumed] = second.send(encode(Resume(acc.upload_id)))
        self.assertEqual((resumed.offset, resumed.sha256), (4096, None))
        second.send(data(4096, CONTENT[4096:]))
        [done] = second.send(encode(Finish(SHA)))
        self.assertEqual((done.sha256, storage.read_completed(done.path)), (SHA, CONTENT))
        [acc2] = second.send(encode(Upload("b.tif", 2, None)))
        second.send(data(0, b"ab"))
        [error] = second.send(encode(Finish(SHA)))
        self.assertEqual(error.code, ErrorCode.DIGEST_MISMATCH)

    def test_resume_of_completed_upload_answers_completed(self) -> None:
        """A client that lost COMPLETED gets it again on RESUME."""
        storage = MemoryStorage()
        h = Harness(storage)
        acc = h.start()
        h.send(data(0, CONTENT))
        [done] = h.send(data(len(CONTENT), b""))
        again = Harness(storage)
        again.handshake()
        self.assertEqual(again.send(encode(Resume(acc.upload_id))), [done])

    def test_ping(self) -> None:
        """PING is answered with PONG in the ready state."""
        h = Harness(MemoryStorage())
        h.handshake()
        self.assertEqual(h.send(encode(Ping(42))), [Pong(42)])


class ErrorTests(SynchronousTestCase):
    def test_busy_while_another_connection_owns_it(self) -> None:
        """A second connection resuming an owned upload gets UPLOAD_BUSY."""
        storage = MemoryStorage()
        owner = Harness(storage)
        acc = owner.start()
        other = Harness(storage)
        other.handshake()
        [err] = other.send(encode(Resume(acc.upload_id)))
        self.assertEqual(err.code, ErrorCode.UPLOAD_BUSY)
        self.assertGreater(err.retry_after_ms, 0)
        owner.proto.connectionLost(Failure(Exception("gone")))
        [ok] = other.send(encode(Resume(acc.upload_id)))
        self.assertIsInstance(ok, Accepted)

    def test_unknown_upload(self) -> None:
        """RESUME of an id nobody created is UNKNOWN_UPLOAD; the connection stays usable."""
        h = Harness(MemoryStorage())
        h.handshake()
        [err] = h.send(encode(Resume("0" * 32)))
        self.assertEqual(err.code, ErrorCode.UNKNOWN_UPLOAD)
        self.assertEqual(h.send(encode(Ping(1))), [Pong(1)])

    def test_invalid_name(self) -> None:
        """A path trick in the name is refused with INVALID_NAME."""
        h = Harness(MemoryStorage())
        h.handshake()
        [err] = h.send(encode(Upload("../../etc/passwd", 1, SHA)))
        self.assertEqual(err.code, ErrorCode.INVALID_NAME)

    def test_offset_mismatch_then_continue(self) -> None:
        """A packet at the wrong offset gets the stored offset; the right one is accepted."""
        h = Harness(MemoryStorage())
        h.start()
        h.send(data(0, CONTENT[:4096]))
        [err] = h.send(data(0, CONTENT[:4096]))
        self.assertEqual((err.code, err.offset), (ErrorCode.OFFSET_MISMATCH, 4096))
        self.assertEqual(h.send(data(4096, CONTENT[4096:])), [Ack(len(CONTENT))])

    def test_storage_full_keeps_upload_resumable(self) -> None:
        """STORAGE_FULL is reported, ownership released, the upload resumable."""
        storage = MemoryStorage()
        h = Harness(storage)
        acc = h.start()
        h.send(data(0, CONTENT[:4096]))
        writer = h.proto.writer
        writer.write_batch = lambda chunks: fail(StorageFull("no space left on storage"))
        [err] = h.send(data(4096, CONTENT[4096:8192]))
        self.assertEqual(err.code, ErrorCode.STORAGE_FULL)
        self.assertIsNone(h.proto.writer)
        again = Harness(storage)
        again.handshake()
        [resumed] = again.send(encode(Resume(acc.upload_id)))
        self.assertEqual(resumed.offset, 4096)

    def test_unexpected_exception_is_internal_error(self) -> None:
        """A bug in storage becomes INTERNAL_ERROR and a close, not a silent drop."""
        h = Harness(MemoryStorage())
        h.start()
        h.proto.writer.write_batch = lambda chunks: fail(ZeroDivisionError())
        [err] = h.send(data(0, CONTENT[:4096]))
        self.assertEqual(err.code, ErrorCode.INTERNAL_ERROR)
        self.assertTrue(h.transport.disconnecting)
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)

    def test_garbage_closes_with_error(self) -> None:
        """Bytes that are not a HELLO get MALFORMED_FRAME and a close."""
        h = Harness(MemoryStorage())
        [err] = h.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        self.assertIsInstance(err, Error)
        self.assertIn(err.code, (ErrorCode.MALFORMED_FRAME, ErrorCode.FRAME_TOO_LARGE))
        self.assertTrue(h.transport.disconnecting)


class FlowTests(SynchronousTestCase):
    def test_chunks_gathered_into_batches_while_storage_writes(self) -> None:
        """
        While one batch is being written the next chunks are gathered into
        one batch (one flush for all), and once the gathered bytes reach the
        limit and a frame waits, reading pauses; every chunk is acknowledged
        in order.
        """
        slow = SlowStorage(MemoryStorage())
        limits = ServerLimits(max_payload=4096, chunk_size=4096)
        h = Harness(slow, limits)
        h.factory.batch_limit = 8192
        content = bytes(range(256)) * 64  # four chunks of 4096
        h.handshake()
        h.send(encode(Upload("b.tif", len(content), hashlib.sha256(content).digest())))
        chunks = [data(o, content[o : o + 4096]) for o in range(0, len(content), 4096)]
        h.send(*chunks)
        self.assertEqual(h.transport.producerState, "paused")
        self.assertEqual(slow.batches, [[0]])
        slow.pending.pop(0).callback(None)
        self.assertEqual(h.received(), [Ack(4096)])
        self.assertEqual(slow.batches, [[0], [4096, 8192]])
        self.assertEqual(h.transport.producerState, "producing")
        slow.pending.pop(0).callback(None)
        self.assertEqual(h.received(), [Ack(8192), Ack(12288)])
        self.assertEqual(slow.batches[-1], [12288])
        slow.pending.pop(0).callback(None)
        self.assertEqual(h.received(), [Ack(16384)])
        h.send(data(len(content), b""))
        slow.pending.pop(0).callback(None)
        [done] = h.received()
        self.assertEqual(slow.storage.read_completed(done.path), content)

    def test_error_waits_behind_pending_acknowledgements(self) -> None:
        """A bad packet's ERROR is sent only after the ACKs of the packets before it."""
        slow = SlowStorage(MemoryStorage())
        h = Harness(slow)
        h.start()
        bad = encode(Data(4096, 12345, CONTENT[4096:8192]))
        self.assertEqual(h.send(data(0, CONTENT[:4096]), bad), [])
        slow.pending.pop(0).callback(None)
        ack, err = h.received()
        self.assertEqual(ack, Ack(4096))
        self.assertEqual((err.code, err.offset), (ErrorCode.CHECKSUM_MISMATCH, 4096))

    def test_connection_lost_during_write_releases_after_it(self) -> None:
        """Ownership is released only after the write in flight has finished."""
        slow = SlowStorage(MemoryStorage())
        h = Harness(slow)
        h.start()
        h.send(data(0, CONTENT[:4096]))
        h.proto.connectionLost(Failure(Exception("client vanished")))
        self.assertEqual(slow.released, 0)
        self.assertNoResult(h.proto.closed)
        slow.pending.pop(0).callback(None)
        self.assertEqual(slow.released, 1)
        self.successResultOf(h.proto.closed)

    def test_handshake_timeout(self) -> None:
        """A client that says nothing is told TIMEOUT and disconnected."""
        h = Harness(MemoryStorage())
        h.clock.advance(10)
        [err] = h.received()
        self.assertEqual(err.code, ErrorCode.TIMEOUT)
        self.assertTrue(h.transport.disconnecting)

    def test_idle_timeout_releases_upload(self) -> None:
        """A silent client mid-upload is timed out and its upload released."""
        storage = MemoryStorage()
        h = Harness(storage)
        acc = h.start()
        h.clock.advance(59)
        self.assertEqual(h.received(), [])
        h.clock.advance(1)
        [err] = h.received()
        self.assertEqual(err.code, ErrorCode.TIMEOUT)
        h.proto.connectionLost(Failure(Exception("closed")))
        again = Harness(storage)
        again.handshake()
        [resumed] = again.send(encode(Resume(acc.upload_id)))
        self.assertIsInstance(resumed, Accepted)

    def test_idle_timeout_despite_takeover_checks(self) -> None:
        """
        A silent client holding an upload is timed out although the takeover
        check asks storage about its upload every second (that is the
        server's work, not a byte from the client).
        """
        h = Harness(MemoryStorage())
        h.factory.takeover_idle = 10
        h.factory.startFactory()
        self.addCleanup(h.factory.stopFactory)
        h.start()
        for _ in range(59):
            h.clock.advance(1)
        self.assertEqual(h.received(), [])
        h.clock.advance(1)
        [err] = h.received()
        self.assertEqual(err.code, ErrorCode.TIMEOUT)

    def test_idle_timeout_counts_from_the_last_byte(self) -> None:
        """A byte from the client (a PING) starts the idle time again."""
        h = Harness(MemoryStorage())
        h.start()
        h.clock.advance(50)
        self.assertEqual(h.send(encode(Ping(1))), [Pong(1)])
        h.clock.advance(59)
        self.assertEqual(h.received(), [])
        h.clock.advance(1)
        [err] = h.received()
        self.assertEqual(err.code, ErrorCode.TIMEOUT)

    def test_unresponsive_peer_is_aborted(self) -> None:
        """A peer that does not let the close finish is aborted after the grace period."""
        h = Harness(MemoryStorage())
        h.clock.advance(10)
        self.assertFalse(h.transport.disconnected)
        h.clock.advance(5)
        self.assertTrue(h.transport.disconnected)

    def test_shutdown_tells_clients(self) -> None:
        """Stopping the server sends SHUTTING_DOWN to connected clients."""
        h = Harness(MemoryStorage())
        h.start()
        h.factory.shutdown()
        [err] = h.received()
        self.assertEqual(err.code, ErrorCode.SHUTTING_DOWN)
        self.assertTrue(h.transport.disconnecting)


class StorageErrorTests(SynchronousTestCase):
    def test_storage_error_on_complete_is_reported(self) -> None:
        """A failing completion is STORAGE_ERROR, retryable, upload kept."""
        storage = MemoryStorage()
        h = Harness(storage)
        h.start()
        h.send(data(0, CONTENT))
        h.proto.writer.complete = lambda sha256: fail(StorageError("read-back failed: EIO"))
        [err] = h.send(data(len(CONTENT), b""))
        self.assertEqual(err.code, ErrorCode.STORAGE_ERROR)
        self.assertIn("EIO", err.message)
        self.assertIsNone(h.proto.writer)


class TakeoverTests(SynchronousTestCase):
    def test_silent_owner_yields_to_newer_connection(self) -> None:
        """A zombie owner yields when asked; its late packets are never written."""
        storage = MemoryStorage()
        zombie = Harness(storage)
        acc = zombie.start()
        zombie.send(data(0, CONTENT[:4096]))
        newer = Harness(storage)
        newer.handshake()
        [busy] = newer.send(encode(Resume(acc.upload_id)))
        self.assertEqual(busy.code, ErrorCode.UPLOAD_BUSY)
        zombie.clock.advance(zombie.factory.takeover_idle)
        zombie.factory.check_takeovers()
        [err] = zombie.received()
        self.assertEqual(err.code, ErrorCode.UPLOAD_TAKEN_OVER)
        self.assertIsNone(zombie.proto.writer)
        self.assertTrue(zombie.transport.disconnecting)
        [resumed] = newer.send(encode(Resume(acc.upload_id)))
        self.assertEqual(resumed.offset, 4096)
        # The zombie's packets arrive late: nothing answers, nothing is stored.
        self.assertEqual(zombie.send(data(4096, b"\xff" * 4096)), [])
        newer.send(data(4096, CONTENT[4096:]))
        [done] = newer.send(data(len(CONTENT), b""))
        self.assertEqual(storage.read_completed(done.path), CONTENT)

    def test_active_owner_keeps_its_upload(self) -> None:
        """Two live clients: the one writing keeps the upload, the other stays busy."""
        storage = MemoryStorage()
        owner = Harness(storage)
        acc = owner.start()
        other = Harness(storage)
        other.handshake()
        [busy] = other.send(encode(Resume(acc.upload_id)))
        self.assertEqual(busy.code, ErrorCode.UPLOAD_BUSY)
        owner.clock.advance(owner.factory.takeover_idle - 1)
        owner.send(data(0, CONTENT[:4096]))
        owner.clock.advance(2)
        owner.factory.check_takeovers()
        self.assertEqual(owner.received(), [])
        self.assertIsNotNone(owner.proto.writer)
        [still_busy] = other.send(encode(Resume(acc.upload_id)))
        self.assertEqual(still_busy.code, ErrorCode.UPLOAD_BUSY)

    def test_silent_owner_not_asked_keeps_upload(self) -> None:
        """Silence alone does not cost a connection its upload."""
        h = Harness(MemoryStorage())
        h.start()
        h.clock.advance(h.factory.takeover_idle * 3)
        h.factory.check_takeovers()
        self.assertEqual(h.received(), [])
        self.assertIsNotNone(h.proto.writer)


class QuotaTests(SynchronousTestCase):
    def test_open_uploads_per_client_are_limited(self) -> None:
        """A client over its quota of open uploads is told so; finishing one frees a slot."""
        storage = MemoryStorage()
        clock = Clock()
        factory = UploadServerFactory(storage, "s", clock, max_uploads_per_client=2)
        harnesses = []
        for _ in range(3):
            h = Harness(storage)
            h.factory = factory
            h.proto = factory.buildProtocol(None)
            h.transport = StringTransport()
            h.proto.makeConnection(h.transport)
            h.handshake()
            harnesses.append(h)
        a, b, c = harnesses
        a.send(encode(Upload("a.tif", len(CONTENT), SHA)))
        b.send(encode(Upload("b.tif", len(CONTENT), SHA)))
        [err] = c.send(encode(Upload("c.tif", len(CONTENT), SHA)))
        self.assertEqual(err.code, ErrorCode.QUOTA_EXCEEDED)
        self.assertGreater(err.retry_after_ms, 0)
        self.assertEqual(factory.open_uploads("tester"), 2)
        a.send(data(0, CONTENT))
        [done] = a.send(data(len(CONTENT), b""))
        self.assertIsInstance(done, Completed)
        [ok] = c.send(encode(Upload("c.tif", len(CONTENT), SHA)))
        self.assertIsInstance(ok, Accepted)
        b.proto.connectionLost(Failure(Exception("gone")))
        self.assertEqual(factory.open_uploads("tester"), 1)


class StatusTests(SynchronousTestCase):
    def test_status_of_partial_and_complete(self) -> None:
        """STATUS answers offset and ownership, and COMPLETE with the path."""
        from imgresume.protocol import Status, UploadStatusFrame

        storage = MemoryStorage()
        owner = Harness(storage)
        acc = owner.start()
        owner.send(data(0, CONTENT[:4096]))
        asker = Harness(storage)
        asker.handshake()
        [st] = asker.send(encode(Status(acc.upload_id)))
        self.assertIsInstance(st, UploadStatusFrame)
        self.assertEqual((st.offset, st.busy, st.complete, st.size),
                         (4096, True, False, len(CONTENT)))
        owner.send(data(4096, CONTENT[4096:]))
        [done] = owner.send(data(len(CONTENT), b""))
        [st] = asker.send(encode(Status(acc.upload_id)))
        self.assertEqual((st.complete, st.path, st.busy), (True, done.path, False))
        [err] = asker.send(encode(Status("ab" * 16)))
        self.assertEqual(err.code, ErrorCode.UNKNOWN_UPLOAD)
        self.assertEqual(asker.send(encode(Ping(3))), [Pong(3)])


class MemoryLimitTests(SynchronousTestCase):
    def test_server_wide_chunk_memory_limit(self) -> None:
        """
        When all connections together hold the server's memory for received
        data, a large frame whose header arrives is not let in: its
        connection stops reading.  Once writes make room for all of it, that
        connection reads on, and nothing is lost.
        """
        slow = SlowStorage(MemoryStorage())
        payload = bytes(range(256)) * 512  # 128 KiB: more than a small frame
        size = len(payload)
        content = payload * 2
        limits = ServerLimits(max_payload=size, chunk_size=size)
        a = Harness(slow, limits)
        b = Harness(slow, limits)
        b.factory = a.factory
        b.proto = a.factory.buildProtocol(None)
        b.transport = StringTransport()
        b.proto.makeConnection(b.transport)
        a.factory.chunk_memory_limit = 2 * size
        for h, name in ((a, "a.tif"), (b, "b.tif")):
            h.handshake()
            h.send(encode(Upload(name, len(content), hashlib.sha256(content).digest())))
        a.send(data(0, payload), data(size, payload))
        self.assertEqual(a.factory.chunk_bytes, 2 * size)
        first = data(0, payload)
        b.send(first[:100])
        self.assertEqual(b.transport.producerState, "paused")
        self.assertEqual(a.factory.chunk_bytes, 2 * size)
        self.assertEqual(len(slow.pending), 1)  # only a's first batch
        slow.pending.pop(0).callback(None)
        self.assertEqual(a.received(), [Ack(size)])
        # a's second chunk is being written: still no room for b's frame.
        self.assertEqual(slow.batches, [[0], [size]])
        self.assertEqual(b.transport.producerState, "paused")
        slow.pending.pop(0).callback(None)
        self.assertEqual(a.received(), [Ack(2 * size)])
        self.assertEqual(b.transport.producerState, "producing")
        b.send(first[100:], data(size, payload))
        while slow.pending:
            slow.pending.pop(0).callback(None)
        self.assertEqual(b.received(), [Ack(size), Ack(2 * size)])
        self.assertEqual(a.factory.chunk_bytes, 0)
        self.assertEqual(b.transport.producerState, "producing")


class TakeoverCheckFailureTests(SynchronousTestCase):
    def test_failed_takeover_check_keeps_the_upload(self) -> None:
        """A storage error while checking for a takeover is logged; the upload goes on."""
        h = Harness(MemoryStorage())
        h.start()
        h.proto.writer.takeover_requested = lambda: fail(StorageError("EIO"))
        h.clock.advance(h.factory.takeover_idle)
        h.factory.check_takeovers()
        self.assertEqual(h.received(), [])
        self.assertIsNotNone(h.proto.writer)
        self.assertEqual(h.send(data(0, CONTENT)), [Ack(len(CONTENT))])

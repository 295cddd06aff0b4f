# -*- test-case-name: tests.http.test_body -*-
"""
Request bodies on their way into storage (L{imgresume.http._body}, through
the resource): written as they arrive, reading paused while the disk lags,
a cut body keeping what arrived, one writer per upload with 423 and the
takeover of a silent PATCH, and the digest a completion is checked
against when the bytes came through several servers.
"""

from __future__ import annotations

import hashlib
from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.trial.unittest import SynchronousTestCase

from imgresume.storage.memory import MemoryStorage
from tests.support.http import TusServer, metadata, repr_digest

OCTETS = {"Content-Type": "application/offset+octet-stream", "Tus-Resumable": "1.0.0"}


def patch(offset: int, **extra: str) -> dict[str, str]:
    return {**OCTETS, "Upload-Offset": str(offset), **extra}


class _HeldWriter:
    """A writer whose writes wait until the test fires them."""

    def __init__(self, writer: Any, held: list[Deferred]) -> None:
        self.writer, self.held = writer, held
        self.info = writer.info

    @property
    def offset(self) -> int:
        return self.writer.offset

    def write_batch(self, chunks: Any) -> Deferred:
        gate: Deferred = Deferred()
        self.held.append(gate)
        result = self.writer.write_batch(chunks)
        return gate.addCallback(lambda _: result)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.writer, name)


class _HeldStorage:
    """A L{MemoryStorage} whose writers' writes are held (L{_HeldWriter})."""

    def __init__(self) -> None:
        self.storage = MemoryStorage()
        self.held: list[Deferred] = []

    def create(self, request: Any) -> Deferred:
        return self.storage.create(request).addCallback(_HeldWriter, self.held)

    def resume(self, upload_id: str, client_id: Any = None) -> Deferred:
        return self.storage.resume(upload_id, client_id).addCallback(_HeldWriter, self.held)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.storage, name)

    def release_one(self) -> None:
        """Let the oldest held write finish."""
        self.held.pop(0).callback(None)


def stored(storage: MemoryStorage, location: str) -> bytes:
    return bytes(storage._uploads[location.rsplit("/", 1)[-1]].data)


class StreamingTests(SynchronousTestCase):
    """Bytes go to storage as they arrive, never held whole."""

    def test_written_before_the_end(self) -> None:
        """Half a PATCH body is in storage before the rest arrives; no answer yet."""
        server = TusServer()
        location = server.create(2000)
        wire = server.wire()
        wire.send(wire.head("PATCH", location, patch(0), 2000) + b"a" * 1000)
        self.assertEqual(stored(server.storage, location), b"a" * 1000)
        self.assertEqual(wire.answers(), [])
        wire.send(b"b" * 1000)
        [answer] = wire.answers()
        self.assertEqual((answer.status, answer["Upload-Offset"]), (204, "2000"))

    def test_chunked_body(self) -> None:
        """A body in chunked transfer coding streams alike."""
        server = TusServer()
        location = server.create(6, **{"Upload-Metadata": metadata(filename="ch")})
        wire = server.wire()
        head = wire.head("PATCH", location, {**patch(0), "Transfer-Encoding": "chunked"},
                         None)
        wire.send(head + b"3\r\nabc\r\n")
        self.assertEqual(stored(server.storage, location), b"abc")
        wire.send(b"3\r\ndef\r\n0\r\n\r\n")
        self.assertEqual(wire.answers()[0].status, 204)
        self.assertEqual(server.storage.read_completed("complete/ch"), b"abcdef")

    def test_back_pressure(self) -> None:
        """
        While more than max_pending bytes wait for the disk, reading pauses;
        it resumes once writes catch up, and the answer waits for them.
        """
        storage = _HeldStorage()
        server = TusServer(storage=storage, max_pending=100)
        location = server.create(1000)
        wire = server.wire()
        wire.send(wire.head("PATCH", location, patch(0), 1000) + b"x" * 50)
        self.assertEqual(wire.transport.producerState, "producing")
        wire.send(b"x" * 200)  # 50 being written, 200 waiting
        self.assertEqual(wire.transport.producerState, "paused")
        storage.release_one()  # the first write done, the 200 go to the disk
        self.assertEqual(wire.transport.producerState, "producing")
        wire.send(b"x" * 750)  # the body is in; 750 wait for the 200
        storage.release_one()
        self.assertEqual(wire.answers(), [])
        storage.release_one()
        [answer] = wire.answers()
        self.assertEqual((answer.status, answer["Upload-Offset"]), (204, "1000"))

    def test_cut_mid_body(self) -> None:
        """
        A connection lost mid-body: what arrived is written and the upload
        released; a HEAD on another server answers exactly that, and a PATCH
        there goes on from it.
        """
        server = TusServer()
        location = server.create(100, **{"Upload-Metadata": metadata(filename="cut")})
        wire = server.wire()
        wire.send(wire.head("PATCH", location, patch(0), 100) + b"1" * 60)
        wire.lose()
        other = TusServer(storage=server.storage)
        head = other.wire().request("HEAD", location)
        self.assertEqual(head["Upload-Offset"], "60")
        data = b"1" * 60 + b"2" * 40
        answer = other.wire().request(
            "PATCH", location, patch(60, **{"Repr-Digest": repr_digest(data)}), b"2" * 40)
        self.assertEqual(answer.status, 204)
        self.assertEqual(server.storage.read_completed("complete/cut"), data)

    def test_cut_then_same_server(self) -> None:
        """
        After a cut, the same server goes on with the SHA-256 of what it
        received: no digest from the client needed, no resumed event.
        """
        server = TusServer()
        location = server.create(10, **{"Upload-Metadata": metadata(filename="same")})
        wire = server.wire()
        wire.send(wire.head("PATCH", location, patch(0), 10) + b"abcd")
        wire.lose()
        answer = server.wire().request("PATCH", location, patch(4), b"efghij")
        self.assertEqual(answer["Repr-Digest"], repr_digest(b"abcdefghij"))
        self.assertEqual([e["event"] for e in server.events],
                         ["upload.created", "upload.completed"])

    def test_cut_with_checksum(self) -> None:
        """A body cut before its Upload-Checksum could be checked: nothing stored."""
        server = TusServer()
        location = server.create(10)
        wire = server.wire()
        wire.send(wire.head("PATCH", location, patch(0, **{"Upload-Checksum": "md5 " + "A" * 22 + "=="}), 10)
                  + b"abc")
        wire.lose()
        self.assertEqual(server.wire().request("HEAD", location)["Upload-Offset"], "0")


class OneWriterTests(SynchronousTestCase):
    """One writer per upload: 423 while a PATCH runs, takeover of a silent one."""

    def test_busy_then_takeover(self) -> None:
        """
        A second PATCH while one is running gets 423 with Retry-After and asks
        the first to yield; once the first has been silent for takeover-idle
        it yields (its later bytes are never written), and the retry succeeds
        from what the first made durable.
        """
        server = TusServer(takeover_idle=5.0)
        location = server.create(100, **{"Upload-Metadata": metadata(filename="t")})
        zombie = server.wire()
        zombie.send(zombie.head("PATCH", location, patch(0), 100) + b"z" * 30)
        other = TusServer(storage=server.storage)
        busy = other.wire().request("PATCH", location, patch(30), b"n" * 70)
        self.assertEqual(busy.status, 423)
        self.assertEqual(busy["Retry-After"], "1")
        server.clock.advance(6)
        server.uploads.check_takeovers()
        zombie.send(b"z" * 70)  # late bytes: never written
        [late] = zombie.answers()
        self.assertEqual(late.status, 423)
        retry = other.wire().request("PATCH", location, patch(30), b"n" * 70)
        self.assertEqual(retry.status, 204)
        self.assertEqual(server.storage.read_completed("complete/t"), b"z" * 30 + b"n" * 70)

    def test_not_silent_keeps_it(self) -> None:
        """A PATCH that keeps sending does not yield, however long it takes."""
        server = TusServer(takeover_idle=5.0)
        location = server.create(100)
        wire = server.wire()
        wire.send(wire.head("PATCH", location, patch(0), 100) + b"a" * 10)
        self.assertEqual(TusServer(storage=server.storage).wire().request(
            "PATCH", location, patch(10), b"b").status, 423)
        for _ in range(5):
            server.clock.advance(2)
            wire.send(b"a" * 10)
            server.uploads.check_takeovers()
        wire.send(b"a" * 40)
        self.assertEqual(wire.answers()[0].status, 204)


class DigestTests(SynchronousTestCase):
    """What a completion is checked against when the client gives no digest."""

    def two_servers(self, stored_sha256: Any = None) -> tuple[TusServer, TusServer, str]:
        first = TusServer()

        def digest(writer: Any) -> Deferred:
            data = first.storage._uploads[writer.info.upload_id].data
            return succeed(hashlib.sha256(bytes(data)).digest())

        second = TusServer(storage=first.storage,
                           stored_sha256=digest if stored_sha256 else None)
        location = first.create(6, **{"Upload-Metadata": metadata(filename="two")})
        first.wire().request("PATCH", location, patch(0), b"abc")
        return first, second, location

    def test_received_by_one_server(self) -> None:
        """Every byte through one server: checked against what it received."""
        server = TusServer()
        location = server.create(6, **{"Upload-Metadata": metadata(filename="one")})
        server.wire().request("PATCH", location, patch(0), b"abc")
        answer = server.wire().request("PATCH", location, patch(3), b"def")
        self.assertEqual(answer["Repr-Digest"], repr_digest(b"abcdef"))

    def test_stored_digest(self) -> None:
        """
        Bytes through two servers, no Repr-Digest: the second reads the
        stored digest; the events say it resumed, then completed.
        """
        first, second, location = self.two_servers(stored_sha256=True)
        answer = second.wire().request("PATCH", location, patch(3), b"def")
        self.assertEqual(answer.status, 204)
        self.assertEqual(first.storage.read_completed("complete/two"), b"abcdef")
        self.assertEqual([e["event"] for e in second.events],
                         ["upload.resumed", "upload.completed"])

    def test_no_way_to_verify(self) -> None:
        """Without a stored digest nor Repr-Digest: 500 saying to send one; kept."""
        first, second, location = self.two_servers()
        answer = second.wire().request("PATCH", location, patch(3), b"def")
        self.assertEqual(answer.status, 500)
        self.assertIn(b"Repr-Digest", answer.body)
        answer = second.wire().request(
            "PATCH", location, patch(6, **{"Repr-Digest": repr_digest(b"abcdef")}))
        self.assertEqual(answer.status, 204)
        self.assertEqual(first.storage.read_completed("complete/two"), b"abcdef")


class RefusedMidWriteTests(SynchronousTestCase):
    """A body refused while one of its writes runs."""

    def test_release_waits_for_the_write(self) -> None:
        """
        The writer is released only once the running write is done (a writer
        takes one call at a time), and the answer is 413.
        """
        storage = _HeldStorage()
        server = TusServer(storage=storage)
        location = server.create(10)
        wire = server.wire()
        wire.send(wire.head("PATCH", location, {**patch(0), "Transfer-Encoding": "chunked"},
                            None) + b"4\r\nabcd\r\n")
        self.assertEqual(len(storage.held), 1)
        wire.send(b"8\r\nefghijkl\r\n0\r\n\r\n")  # passes Upload-Length
        upload_id = location.rsplit("/", 1)[-1]
        self.assertIn(upload_id, storage.storage._owned)
        storage.release_one()
        self.assertNotIn(upload_id, storage.storage._owned)
        [answer] = wire.answers()
        self.assertEqual(answer.status, 413)
        self.assertEqual(server.wire().request("HEAD", location)["Upload-Offset"], "4")


class EarlyAnswerTests(SynchronousTestCase):
    """A body refused with much still to come is answered at once (plain TCP)."""

    MiB = 1 << 20

    def test_offset_mismatch(self) -> None:
        """
        A 10 MiB PATCH at the wrong offset: 409 at once, with Connection:
        close, and the sending side half-closed; the rest of the body is read
        and dropped, and the connection closed at its end.
        """
        server = TusServer()
        location = server.create(20 * self.MiB)
        wire = server.wire(tcp=True)
        wire.send(wire.head("PATCH", location, patch(5), 10 * self.MiB) + b"x" * 1000)
        [answer] = wire.answers()
        self.assertEqual((answer.status, answer["Upload-Offset"]), (409, "0"))
        self.assertEqual(answer["Connection"], "close")
        self.assertTrue(wire.transport.write_closed)
        wire.send(b"x" * (10 * self.MiB - 1000))
        self.assertEqual(len(wire.answers()), 1)
        self.assertTrue(wire.transport.disconnecting)

    def test_busy(self) -> None:
        """A large PATCH to an upload another request writes: 423 at once."""
        server = TusServer()
        location = server.create(20 * self.MiB)
        first = server.wire()
        first.send(first.head("PATCH", location, patch(0), 20 * self.MiB) + b"a")
        second = server.wire(tcp=True)
        second.send(second.head("PATCH", location, patch(1), 2 * self.MiB))
        [answer] = second.answers()
        self.assertEqual(answer.status, 423)
        self.assertEqual(answer["Retry-After"], "1")

    def test_small_body_waits(self) -> None:
        """With 1 MiB or less to come, the answer waits for the body's end, as usual."""
        server = TusServer()
        location = server.create(20)
        wire = server.wire(tcp=True)
        wire.send(wire.head("PATCH", location, patch(5), 10) + b"x")
        self.assertEqual(wire.answers(), [])
        wire.send(b"x" * 9)
        self.assertEqual(wire.answers()[0].status, 409)
        self.assertFalse(wire.transport.write_closed)

    def test_not_tcp(self) -> None:
        """On a transport that cannot half-close safely (TLS), the answer waits."""
        server = TusServer()
        location = server.create(20 * self.MiB)
        wire = server.wire()
        wire.send(wire.head("PATCH", location, patch(5), 10 * self.MiB) + b"x")
        self.assertEqual(wire.answers(), [])


class SlowDiskTests(SynchronousTestCase):
    """A PATCH held up by the disk, not by its client, is not taken over."""

    def test_waiting_for_disk_keeps_it(self) -> None:
        """
        A body whose write is still running (reading paused for it) is not
        silent, however long the disk takes: it keeps the upload.
        """
        storage = _HeldStorage()
        server = TusServer(storage=storage, takeover_idle=5.0, max_pending=10)
        location = server.create(100)
        wire = server.wire()
        wire.send(wire.head("PATCH", location, patch(0), 100) + b"a" * 50)
        self.assertEqual(TusServer(storage=storage.storage).wire().request(
            "PATCH", location, patch(0), b"b").status, 423)
        server.clock.advance(60)
        server.uploads.check_takeovers()
        storage.release_one()
        wire.send(b"a" * 50)
        storage.release_one()
        self.assertEqual(wire.answers()[0].status, 204)

# -*- test-case-name: tests.client.test_session -*-
"""
Tests for uploads that share connections: L{UploadConnection} frame by
frame over a L{StringTransport} (several uploads after one handshake, no
stall timer while idle, the server closing an idle connection), and
L{UploadSession} and L{Uploader.upload_batch} against a real server
protocol over an in-memory storage, joined through L{iosim} on one fake
clock (files over one connection, a break mid-batch, refused files, retries
through a new connection, lanes of a batch); and the "retrying" reports of
an upload that cannot connect (refused, DNS failure).
"""

from __future__ import annotations

import hashlib
import os
import random
import zlib
from typing import Any

from zope.interface import implementer

from twisted.internet.defer import Deferred, fail
from twisted.internet.error import ConnectionRefusedError, DNSLookupError
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from imgresume import integrity
from imgresume.client import (
    BatchItem,
    ConnectionBroken,
    FileOutcome,
    Journal,
    Progress,
    Stalled,
    UploadFailed,
    Uploader,
)
from imgresume.client._attempt import UploadAttempt
from imgresume.client._connection import UploadConnection
from imgresume.client._journal import journal_key
from imgresume.client._source import LocalFile
from imgresume.errors import ErrorCode, HandshakeRejected, InvalidName, Timeout, UnknownUpload
from imgresume.protocol import (
    Accepted,
    Ack,
    Completed,
    Data,
    Error,
    Hello,
    Upload,
    Welcome,
    encode,
)
from tests.support.memorynet import InstantReactor, MemoryNetwork
from tests.support.runners import sync_run
from tests.support.wire import frames_written, new_decoder

CHUNK = 4096


class NetworkTestCase(SynchronousTestCase):
    """An L{Uploader} against a L{MemoryNetwork}, and local files to upload."""

    def setUp(self) -> None:
        self.work = os.path.abspath(self.mktemp())
        os.makedirs(self.work)
        self.clock = InstantReactor()
        self.network = MemoryNetwork(self.clock)

    def uploader(self, **kwargs: Any) -> Uploader:
        """An uploader with small chunks, fast retries and no journal by default."""
        kwargs.setdefault("journal", None)
        kwargs.setdefault("backoff_base", 0.01)
        kwargs.setdefault("backoff_max", 0.1)
        kwargs.setdefault("chunk_size", CHUNK)
        kwargs.setdefault("window", 4)
        return Uploader(self.network, reactor=self.clock, client_id="unit", run=sync_run,
                        rng=random.Random(7), **kwargs)

    def files(self, count: int, size: int = 3 * CHUNK + 17) -> list[tuple[str, bytes]]:
        """C{count} local files of C{size} reproducible bytes each: (path, bytes)."""
        made = []
        for i in range(count):
            path = os.path.join(self.work, f"f{i:02d}.tif")
            content = random.Random(i).randbytes(size)
            with open(path, "wb") as f:
                f.write(content)
            made.append((path, content))
        return made

    def handshakes(self) -> int:
        """Connections the server accepted."""
        return int(self.network.factory.metrics.connections.value())


class SessionTests(NetworkTestCase):
    """L{UploadSession}: one connection for file after file."""

    def test_files_share_one_connection(self) -> None:
        """
        Five files uploaded on one session travel over one connection with
        one handshake; each is stored and verified; closing the session
        closes the connection.
        """
        session = self.uploader().session()
        results = []
        for path, content in self.files(5):
            result = self.network.run(session.upload(path))
            self.assertEqual(self.network.storage.read_completed(result.path), content)
            self.assertEqual(result.sha256, integrity.digest_of("blake3", content).hex())
            self.assertEqual((result.attempts, result.servers), (1, ["mem"]))
            results.append(result)
        self.assertEqual(session.connections, 1)
        self.assertEqual(self.handshakes(), 1)
        self.network.run(session.close())
        self.assertTrue(self.network.pumps[0].clientIO.disconnected)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_queued_uploads_run_in_order(self) -> None:
        """
        Uploads asked for without waiting run one after another, in call
        order, on the one connection.
        """
        session = self.uploader().session()
        finished: list[str] = []
        ds = []
        for path, _ in self.files(3):
            d = session.upload(path)
            d.addCallback(lambda r: finished.append(r.name) or r)
            ds.append(d)
        for d in ds:
            self.network.run(d)
        self.assertEqual(finished, ["f00.tif", "f01.tif", "f02.tif"])
        self.assertEqual(session.connections, 1)
        self.network.run(session.close())

    def test_break_mid_batch(self) -> None:
        """
        The connection breaks in the middle of the second file: that file
        resumes from the offset the server proves on a new connection, and
        the third file follows on that new connection.
        """
        session = self.uploader().session()
        (p1, c1), (p2, c2), (p3, c3) = self.files(3, size=12 * CHUNK)
        cut: list[int] = []

        def progress(p: Progress) -> None:
            if p.phase == "uploading" and p.done >= 6 * CHUNK and not cut:
                cut.append(p.done)
                self.network.cut()

        first = self.network.run(session.upload(p1))
        second = self.network.run(session.upload(p2, progress=progress))
        third = self.network.run(session.upload(p3))
        self.assertEqual(cut, [6 * CHUNK])
        self.assertEqual(first.attempts, 1)
        self.assertEqual(second.attempts, 2)
        self.assertEqual(len(second.resumed_at), 1)
        self.assertGreaterEqual(second.resumed_at[0], 6 * CHUNK)
        self.assertLess(second.bytes_sent, 2 * len(c2))
        self.assertEqual(third.attempts, 1)
        self.assertEqual(session.connections, 2)
        for result, content in ((first, c1), (second, c2), (third, c3)):
            self.assertEqual(self.network.storage.read_completed(result.path), content)
        self.network.run(session.close())

    def test_refused_file_keeps_the_connection(self) -> None:
        """
        A file the server refuses outright (INVALID_NAME, answering the
        UPLOAD) fails at once, and the next file uses the same connection.
        """
        session = self.uploader().session()
        (p1, _), (p2, c2) = self.files(2)
        with self.assertRaises(UploadFailed) as caught:
            self.network.run(session.upload(p1, "bad/../name.tif"))
        self.assertIsInstance(caught.exception.cause, InvalidName)
        result = self.network.run(session.upload(p2))
        self.assertEqual(self.network.storage.read_completed(result.path), c2)
        self.assertEqual(session.connections, 1)
        self.network.run(session.close())

    def test_retry_reconnects(self) -> None:
        """
        A retry goes through the endpoint again: a journal entry for an
        upload the server does not know is answered UNKNOWN_UPLOAD, and the
        fresh upload is made on a new connection.
        """
        journal = Journal(os.path.join(self.work, "journal.json"))
        [(path, content)] = self.files(1)
        source = self.successResultOf(LocalFile.open(path, sync_run))
        key = journal_key(source.fingerprint, repr(self.network), "f00.tif")
        source.close()
        journal.remember(key, "0" * 32, hashlib.sha256(content).hexdigest())
        session = self.uploader(journal=journal).session()
        result = self.network.run(session.upload(path))
        self.assertEqual(result.attempts, 2)
        self.assertEqual(session.connections, 2)
        self.assertEqual(journal.lookup(key)["upload_id"], result.upload_id)
        self.network.run(session.close())

    def test_closed_session(self) -> None:
        """After close(), upload() fails at once and opens nothing."""
        session = self.uploader().session()
        self.network.run(session.close())
        [(path, _)] = self.files(1)
        self.failureResultOf(session.upload(path), RuntimeError)
        self.assertEqual(self.network.pumps, [])

    def test_async_with(self) -> None:
        """C{async with} closes the session (and its connection) at the end."""
        uploader = self.uploader()
        [(path, content)] = self.files(1)

        async def go() -> Any:
            async with uploader.session() as session:
                return await session.upload(path)

        result = self.network.run(Deferred.fromCoroutine(go()))
        self.assertEqual(self.network.storage.read_completed(result.path), content)
        self.assertTrue(self.network.pumps[0].clientIO.disconnected)


class BatchTests(NetworkTestCase):
    """L{Uploader.upload_batch}: a queue of files over a few sessions."""

    def test_parallel_lanes(self) -> None:
        """
        Ten files with parallel=3: three connections (one handshake each),
        every file stored, outcomes in the order given, each reported once
        as it ended.
        """
        files = self.files(10)
        reported: list[FileOutcome] = []
        batch = self.network.run(self.uploader().upload_batch(
            [path for path, _ in files], parallel=3, on_outcome=reported.append))
        self.assertEqual(batch.connections, 3)
        self.assertEqual(self.handshakes(), 3)
        self.assertEqual([o.item.path for o in batch.outcomes], [p for p, _ in files])
        self.assertEqual(sorted(o.item.path for o in reported), [p for p, _ in files])
        self.assertEqual((batch.failed, batch.not_started), ([], []))
        for outcome, (_, content) in zip(batch.outcomes, files, strict=True):
            self.assertTrue(outcome.ok)
            self.assertEqual(self.network.storage.read_completed(outcome.result.path), content)
        self.assertTrue(all(p.clientIO.disconnected for p in self.network.pumps))

    def test_failures_do_not_stop_the_batch(self) -> None:
        """
        A file the server refuses and a file that does not exist fail; the
        others are stored; the failures carry their causes.
        """
        (p0, _), _, (p2, c2) = self.files(3)
        items = [BatchItem(p0, "a/./b.tif"), BatchItem(os.path.join(self.work, "gone.tif")),
                 BatchItem(p2, "scans/c.tif", {"dpi": "600"})]
        batch = self.network.run(self.uploader().upload_batch(items, parallel=2))
        bad_name, missing, good = batch.outcomes
        self.assertIsInstance(bad_name.error.cause, InvalidName)
        self.assertIsInstance(missing.error.cause, FileNotFoundError)
        self.assertEqual((good.name, good.result.path), ("scans/c.tif", "complete/scans/c.tif"))
        self.assertEqual(self.network.storage.read_completed(good.result.path), c2)
        self.assertEqual(len(batch.failed), 2)

    def test_stop_on_failure(self) -> None:
        """
        With stop_on_failure and one lane, the first failure stops the
        batch: the files after it are not started.
        """
        (p0, _), (p1, _), (p2, _) = self.files(3)
        items = [BatchItem(p0), BatchItem(p1, "../x.tif"), BatchItem(p2)]
        batch = self.network.run(self.uploader().upload_batch(
            items, parallel=1, stop_on_failure=True))
        self.assertEqual([o.ok for o in batch.outcomes], [True, False])
        self.assertEqual(batch.not_started, [items[2]])

    def test_fewer_files_than_lanes(self) -> None:
        """Two files with parallel=8 open two connections, not eight."""
        batch = self.network.run(self.uploader().upload_batch(
            [p for p, _ in self.files(2)], parallel=8))
        self.assertEqual(batch.connections, 2)

    def test_parallel_must_be_positive(self) -> None:
        """parallel=0 is a ValueError."""
        self.failureResultOf(self.uploader().upload_batch(["x"], parallel=0), ValueError)


@implementer(IStreamClientEndpoint)
class FailingEndpoint:
    """An endpoint whose every connection fails with C{error}; it shows as C{text}."""

    def __init__(self, error: Exception, text: str) -> None:
        self.error = error
        self.text = text

    def connect(self, factory: Any) -> Deferred[Any]:
        return fail(self.error)

    def __repr__(self) -> str:
        return self.text  # what the uploader names the peer by


class RetryReportTests(SynchronousTestCase):
    """What an upload reports while it waits to retry (issue 12, item 4)."""

    def upload(self, error: Exception) -> tuple[list[Progress], UploadFailed]:
        """Upload through an endpoint failing with C{error}: the retry reports, the failure."""
        path = os.path.abspath(self.mktemp())
        with open(path, "wb") as f:
            f.write(b"x" * 100)
        clock = Clock()
        uploader = Uploader(FailingEndpoint(error, "tcp:127.0.0.1:7000"), reactor=clock,
                            client_id="unit", run=sync_run, journal=None, max_attempts=3,
                            backoff_base=1.0, backoff_max=4.0, rng=random.Random(7))
        reports: list[Progress] = []
        d = uploader.upload(path, progress=reports.append)
        clock.pump([1.0] * 20)
        failure = self.failureResultOf(d, UploadFailed)
        return [p for p in reports if p.phase == "retrying"], failure.value

    def test_refused(self) -> None:
        """
        A refused connection: a "retrying" report per retry, saying by whom,
        which retry of how many and when; then the failure says the same.
        """
        retries, failed = self.upload(ConnectionRefusedError())
        self.assertEqual(len(retries), 2)
        self.assertRegex(retries[0].note,
                         r"\Aconnection refused by 127\.0\.0\.1:7000, retry 1/2 in \d\.\d s\Z")
        self.assertRegex(retries[1].note, r", retry 2/2 in \d\.\d s\Z")
        self.assertEqual((retries[0].done, retries[0].total), (0, 100))
        self.assertIn("gave up after 3 attempts without progress (last: connection refused "
                      "by 127.0.0.1:7000)", str(failed))

    def test_dns_failure(self) -> None:
        """A DNS failure is a network failure (retried), not a local file that cannot be read."""
        retries, failed = self.upload(DNSLookupError("no-such-host.invalid"))
        self.assertTrue(retries[0].note.startswith("DNS lookup failed for 127.0.0.1:7000, retry"))
        self.assertIn("(last: DNS lookup failed for 127.0.0.1:7000)", str(failed))
        self.assertNotIn("local file", str(failed))
        self.assertIsInstance(failed.cause, DNSLookupError)


class ConnectionHarness:
    """An L{UploadConnection} over a L{StringTransport}, with a fake clock."""

    def __init__(self, test: SynchronousTestCase) -> None:
        self.test = test
        self.clock = Clock()
        self.connection = UploadConnection(self.clock, client_id="unit", stall_timeout=10.0)
        self.transport = StringTransport()
        self.connection.makeConnection(self.transport)
        self.decoder = new_decoder()

    def sent(self) -> list[Any]:
        """Frames the client wrote since the last call."""
        return frames_written(self.transport, self.decoder)

    def receive(self, frame: Any) -> list[Any]:
        """Deliver a server frame; return what the client wrote in answer."""
        self.connection.dataReceived(encode(frame))
        return self.sent()

    def welcome(self) -> None:
        """The handshake, done."""
        self.test.assertEqual(self.sent(), [Hello("unit", options=integrity.hello_options("sha256"))])
        self.test.assertEqual(self.receive(Welcome(1, "unit-server", 1024, 1 << 40, 1024)), [])
        self.test.assertEqual(self.test.successResultOf(self.connection.welcomed).server_id,
                              "unit-server")

    def attempt(self, content: bytes, **kwargs: Any) -> tuple[UploadAttempt, Upload]:
        """An attempt to upload C{content} (one small file), and its request."""
        path = os.path.abspath(self.test.mktemp())
        with open(path, "wb") as f:
            f.write(content)
        source = self.test.successResultOf(LocalFile.open(path, sync_run))
        self.test.addCleanup(source.close)
        request = Upload(os.path.basename(path), len(content), hashlib.sha256(content).digest())
        return UploadAttempt(source, request, chunk_size=64, **kwargs), request


class UploadConnectionTests(SynchronousTestCase):
    """L{UploadConnection} frame by frame."""

    def complete(self, h: ConnectionHarness, content: bytes, upload_id: str) -> Completed:
        """Run one upload of C{content} to its end; return the COMPLETED given."""
        attempt, request = h.attempt(content)
        self.assertEqual(h.connection.run(attempt) and h.sent(), [request])
        accepted = Accepted(upload_id, request.name, request.size, request.sha256, 0)
        self.assertEqual(h.receive(accepted),
                         [Data(0, zlib.crc32(content), content)])
        self.assertEqual(h.receive(Ack(len(content))), [Data(len(content), 0, b"")])
        completed = Completed(upload_id, len(content), request.sha256, "complete/x")
        h.receive(completed)
        self.assertEqual(self.successResultOf(attempt.result), completed)
        return completed

    def test_two_uploads_one_handshake(self) -> None:
        """
        After COMPLETED the connection is idle; the next upload starts
        with its UPLOAD, without a new HELLO.
        """
        h = ConnectionHarness(self)
        h.welcome()
        self.complete(h, b"first file", "ab" * 16)
        self.assertTrue(h.connection.idle)
        self.complete(h, b"second", "cd" * 16)
        self.assertFalse(h.transport.disconnecting)

    def test_no_stall_timer_while_idle(self) -> None:
        """
        Between uploads the client waits for nothing: no stall timer runs,
        however long the connection idles; the next upload arms it again.
        """
        h = ConnectionHarness(self)
        h.welcome()
        self.assertEqual(h.clock.getDelayedCalls(), [])
        h.clock.advance(3600)
        self.assertTrue(h.connection.idle)
        attempt, _ = h.attempt(b"x")
        h.connection.run(attempt)
        h.clock.advance(10)
        self.failureResultOf(attempt.result, Stalled)
        self.assertTrue(h.transport.disconnected)
        self.assertFalse(h.connection.idle)

    def test_server_closes_idle_connection(self) -> None:
        """
        An ERROR while idle (the server's idle timeout) ends the connection
        quietly: it is no longer idle, and nothing fails.
        """
        h = ConnectionHarness(self)
        h.welcome()
        h.receive(Error(ErrorCode.TIMEOUT, "no frame for too long in state ready"))
        self.assertFalse(h.connection.idle)
        self.assertTrue(h.transport.disconnecting)
        attempt, _ = h.attempt(b"x")
        self.assertRaises(RuntimeError, h.connection.run, attempt)

    def test_handshake_rejected(self) -> None:
        """A refused handshake fails C{welcomed} with the server's error, and closes."""
        h = ConnectionHarness(self)
        h.sent()
        h.receive(Error(ErrorCode.HANDSHAKE_REJECTED, "who are you"))
        self.failureResultOf(h.connection.welcomed, HandshakeRejected)
        self.assertTrue(h.transport.disconnecting)

    def test_handshake_stalls(self) -> None:
        """A server that never answers HELLO fails C{welcomed} with Stalled."""
        h = ConnectionHarness(self)
        h.clock.advance(10)
        self.failureResultOf(h.connection.welcomed, Stalled)
        self.assertTrue(h.transport.disconnected)

    def test_connection_lost_mid_upload(self) -> None:
        """
        The connection closing under an upload fails it with
        ConnectionBroken; close() afterwards fires at once.
        """
        h = ConnectionHarness(self)
        h.welcome()
        attempt, _ = h.attempt(b"payload")
        h.connection.run(attempt)
        h.connection.connectionLost(Failure(ConnectionBroken("gone")))
        self.failureResultOf(attempt.result, ConnectionBroken)
        self.successResultOf(h.connection.close())
        self.assertEqual(h.clock.getDelayedCalls(), [])

    def test_close_waits_for_the_close(self) -> None:
        """close() fires once the transport reports the connection lost."""
        h = ConnectionHarness(self)
        h.welcome()
        d = h.connection.close()
        self.assertTrue(h.transport.disconnecting)
        self.assertNoResult(d)
        h.connection.connectionLost(Failure(ConnectionBroken("closed")))
        self.successResultOf(d)

    def test_error_answering_upload_keeps_connection(self) -> None:
        """
        UNKNOWN_UPLOAD answering a RESUME fails the attempt; the connection
        stays idle and usable.
        """
        h = ConnectionHarness(self)
        h.welcome()
        attempt, _ = h.attempt(b"x")
        attempt.upload_id = "ef" * 16
        h.connection.run(attempt)
        h.receive(Error(ErrorCode.UNKNOWN_UPLOAD, "no such upload"))
        self.failureResultOf(attempt.result, UnknownUpload)
        self.assertTrue(h.connection.idle)

    def test_connection_error_during_upload(self) -> None:
        """A connection-scope ERROR during an upload fails it and closes."""
        h = ConnectionHarness(self)
        h.welcome()
        attempt, _ = h.attempt(b"x")
        h.connection.run(attempt)
        h.receive(Error(ErrorCode.TIMEOUT, "silent"))
        self.failureResultOf(attempt.result, Timeout)
        self.assertTrue(h.transport.disconnecting)
        self.assertFalse(h.connection.idle)

    def test_end_waits_for_the_journal(self) -> None:
        """
        The upload is not ended (no final empty DATA) before the journal
        write that records its id is done, however soon every byte is
        acknowledged; then it ends at once.
        """
        h = ConnectionHarness(self)
        h.welcome()
        recorded: Deferred[None] = Deferred()
        ids: list[str] = []
        content = b"tiny"
        attempt, request = h.attempt(content, on_upload_id=lambda i: ids.append(i) or recorded)
        h.connection.run(attempt)
        h.sent()
        h.receive(Accepted("ab" * 16, request.name, request.size, request.sha256, 0))
        self.assertEqual(h.receive(Ack(len(content))), [])
        self.assertEqual(ids, ["ab" * 16])
        recorded.callback(None)
        self.assertEqual(h.sent(), [Data(len(content), 0, b"")])

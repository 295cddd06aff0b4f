# -*- test-case-name: tests.client.test_uploader -*-
"""
Tests for L{imgresume.client}: L{Uploader} against real servers on
127.0.0.1 sockets in this process (breaks, failover between two servers over
one storage directory, the journal, non-retryable errors, stalls, a backend
that comes up late, attempt limits), and L{UploadAttempt} driven frame by
frame over a L{StringTransport} (offset mismatches, residual checks, stalls).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import time
import zlib
from typing import Any

import attrs

from twisted.internet import reactor
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.error import ConnectError
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock, deferLater
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase

from imgresume import integrity
from imgresume.client import (
    IfExistsNotOffered,
    Journal,
    Progress,
    ResidualMismatch,
    SourceChanged,
    Stalled,
    UploadFailed,
    Uploader,
    UploadInterrupted,
)
from imgresume.client._attempt import UploadAttempt
from imgresume.client._connection import UploadConnection
from imgresume.client._journal import journal_key
from imgresume.client._source import LocalFile
from imgresume.errors import ErrorCode, FileTooLarge, InvalidName, NameTaken, StorageFull
from imgresume.protocol import (
    ClientConnection,
    ServerConnection,
    Accepted,
    Ack,
    Completed,
    Data,
    Error,
    Hello,
    Resume,
    ServerLimits,
    Upload,
    Welcome,
    decode_body,
    encode,
)
from imgresume.storage.memory import MemoryStorage
from imgresume.testing import free_tcp_port
from tests.support.runners import sync_run
from tests.support.servers import (
    CHUNK,
    WINDOW,
    RoundRobinEndpoint,
    ServerTestCase,
    endpoint_of,
)
from tests.support.wire import frames_written, new_decoder


class SilentProtocol(Protocol):
    """Accepts a connection and never says anything."""

    def connectionMade(self) -> None:
        self.factory.protocols.append(self)
        self.lost: Deferred[None] = Deferred()

    def connectionLost(self, reason: Any) -> None:
        self.lost.callback(None)


class UploadTests(ServerTestCase):
    """Uploads that need no reconnection."""

    async def test_plain_upload(self) -> None:
        """
        A file is uploaded in one attempt; the result describes the stored
        file and the bytes sent, and progress ends with a "done" report.
        """
        storage = MemoryStorage()
        _, listening = self.start_server(storage)
        path, content = self.local_file(2 * 1024 * 1024 + 17)
        reports: list[Progress] = []
        result = await self.uploader(endpoint_of(listening)).upload(
            path, "scans/a.tif", metadata={"dpi": "600"}, progress=reports.append
        )
        # The digest negotiated by default: BLAKE3.
        digest = integrity.digest_of("blake3", content).hex()
        self.assertEqual(result.digest, "blake3")
        self.assertEqual(result.name, "scans/a.tif")
        self.assertEqual(len(result.upload_id), 32)
        self.assertEqual(result.size, len(content))
        self.assertEqual(result.sha256, digest)
        self.assertEqual(result.path, "complete/scans/a.tif")
        self.assertEqual(result.resumed_at, [])
        self.assertEqual(result.bytes_sent, len(content))
        self.assertEqual(result.attempts, 1)
        self.assertEqual(result.servers, ["node-a"])
        self.assertEqual(storage.read_completed(result.path), content)
        # The server takes the digest at the end: no hashing before sending.
        self.assertEqual({r.phase for r in reports}, {"uploading", "done"})
        self.assertEqual(reports[-1], Progress("scans/a.tif", "done", len(content),
                                               len(content), "node-a", result.path))
        json.dumps(result.to_json())  # JSON-ready

    async def test_server_without_late_digest(self) -> None:
        """
        To a server that does not offer to take the SHA-256 at the end, the
        client hashes first (a "hashing" phase) and declares it in UPLOAD.
        """
        self.patch(ClientConnection, "late_digest_offered", property(lambda self: False))
        storage = MemoryStorage()
        _, listening = self.start_server(storage)
        path, content = self.local_file(100_000)
        reports: list[Progress] = []
        result = await self.uploader(endpoint_of(listening)).upload(
            path, "a.tif", progress=reports.append)
        self.assertEqual(reports[0].phase, "hashing")
        self.assertEqual(result.sha256, integrity.digest_of("blake3", content).hex())
        [upload] = storage._uploads.values()
        self.assertEqual(upload.info.sha256, integrity.digest_of("blake3", content))

    async def test_default_name(self) -> None:
        """Without a name, the file's base name is the remote name."""
        storage = MemoryStorage()
        _, listening = self.start_server(storage)
        path, content = self.local_file(1000, "page-7.tif")
        result = await self.uploader(endpoint_of(listening)).upload(path)
        self.assertEqual(result.name, "page-7.tif")
        self.assertEqual(storage.read_completed("complete/page-7.tif"), content)

    async def test_zero_byte_file(self) -> None:
        """An empty file completes: one empty DATA packet, nothing sent."""
        storage = MemoryStorage()
        _, listening = self.start_server(storage)
        path, _ = self.local_file(0, "empty.tif")
        result = await self.uploader(endpoint_of(listening)).upload(path)
        self.assertEqual(result.size, 0)
        self.assertEqual(result.sha256, integrity.digest_of("blake3", b"").hex())
        self.assertEqual(result.bytes_sent, 0)
        self.assertEqual(result.attempts, 1)
        self.assertEqual(storage.read_completed(result.path), b"")

    async def test_exactly_one_chunk(self) -> None:
        """A file of exactly one chunk is one DATA packet, then the end."""
        storage = MemoryStorage()
        _, listening = self.start_server(storage)
        path, content = self.local_file(CHUNK)
        result = await self.uploader(endpoint_of(listening)).upload(path)
        self.assertEqual(result.bytes_sent, CHUNK)
        self.assertEqual(result.sha256, integrity.digest_of("blake3", content).hex())
        self.assertEqual(storage.read_completed(result.path), content)

    async def test_window_of_one(self) -> None:
        """With a window of 1, each packet waits for the previous ACK; it still works."""
        storage = MemoryStorage()
        _, listening = self.start_server(storage)
        path, content = self.local_file(CHUNK * 5 + 3)
        result = await self.uploader(endpoint_of(listening), window=1).upload(path)
        self.assertEqual(result.bytes_sent, len(content))
        self.assertEqual(storage.read_completed(result.path), content)

    async def test_server_chunk_size(self) -> None:
        """Without a chunk size of its own, the client uses the server's."""
        storage = MemoryStorage()
        _, listening = self.start_server(
            storage, limits=ServerLimits(chunk_size=32 * 1024, max_payload=32 * 1024)
        )
        path, content = self.local_file(200 * 1024)
        result = await self.uploader(endpoint_of(listening), chunk_size=None).upload(path)
        self.assertEqual(storage.read_completed(result.path), content)

    async def test_two_uploads_same_name(self) -> None:
        """A second file under a taken name is stored beside the first."""
        storage = MemoryStorage()
        _, listening = self.start_server(storage)
        uploader = self.uploader(endpoint_of(listening))
        path1, content1 = self.local_file(1000, "one.tif", seed=1)
        path2, content2 = self.local_file(1000, "two.tif", seed=2)
        first = await uploader.upload(path1, "x.tif")
        second = await uploader.upload(path2, "x.tif")
        self.assertEqual(first.path, "complete/x.tif")
        self.assertNotEqual(second.path, first.path)
        self.assertEqual(storage.read_completed(second.path), content2)
        self.assertEqual(storage.read_completed(first.path), content1)

    async def test_local_file_shrinks_mid_upload(self) -> None:
        """
        A local file that shrinks mid-upload (so it can no longer be read to
        its size) fails at once, without retries, as a changed source.
        """
        storage = MemoryStorage()
        _, listening = self.start_server(storage)
        path, _ = self.local_file(CHUNK * 8)
        uploader = self.uploader(endpoint_of(listening), window=1, max_attempts=10)

        def progress(p) -> None:
            if p.phase == "uploading" and p.done >= CHUNK:
                os.truncate(path, 0)

        with self.assertRaises(UploadFailed) as caught:
            await uploader.upload(path, progress=progress)
        self.assertIn("source changed during upload", str(caught.exception))
        self.assertIsInstance(caught.exception.cause, SourceChanged)

    async def test_missing_local_file(self) -> None:
        """A local file that cannot be opened fails at once with UploadFailed."""
        uploader = self.uploader(f"tcp:127.0.0.1:{free_tcp_port()}")
        with self.assertRaises(UploadFailed) as caught:
            await uploader.upload(os.path.join(self.work, "nope.tif"))
        self.assertIsInstance(caught.exception.cause, FileNotFoundError)
        self.assertIn("nope.tif", str(caught.exception))


class ResumeTests(ServerTestCase):
    """Breaks in the middle of an upload."""

    async def test_cut_mid_upload(self) -> None:
        """
        The server aborts the connection after some data: the client
        reconnects and resumes from the proven offset, sending the cut-off
        window again at most.
        """
        storage = MemoryStorage(busy_retry_after=0.05)
        factory, listening = self.start_server(storage, cut_after=700 * 1024)
        path, content = self.local_file(2 * 1024 * 1024 + 5)
        result = await self.uploader(endpoint_of(listening)).upload(path)
        self.assertTrue(factory.cut_done)
        self.assertEqual(result.attempts, 2)
        self.assertEqual(len(result.resumed_at), 1)
        self.assertGreater(result.resumed_at[0], 0)
        self.assertLessEqual(result.resumed_at[0], 700 * 1024)
        self.assertGreaterEqual(result.bytes_sent, len(content))
        self.assertLessEqual(result.bytes_sent, len(content) + WINDOW * CHUNK)
        self.assertEqual(result.sha256, integrity.digest_of("blake3", content).hex())
        self.assertEqual(storage.read_completed(result.path), content)

    async def test_failover_to_second_server(self) -> None:
        """
        Two servers over one storage directory behind a round-robin
        endpoint: the first dies mid-upload (stops listening, connection
        cut); the upload resumes and completes on the second.
        """
        root = os.path.join(self.work, "shared")
        listening_a: list[Any] = []
        factory_a, port_a = self.start_server(
            self.fs_storage(root), "node-a", cut_after=600 * 1024,
            on_cut=lambda: listening_a[0].stopListening(),
        )
        listening_a.append(port_a)
        _, port_b = self.start_server(self.fs_storage(root), "node-b")
        endpoint = RoundRobinEndpoint([
            TCP4ClientEndpoint(reactor, "127.0.0.1", port_a.getHost().port),
            TCP4ClientEndpoint(reactor, "127.0.0.1", port_b.getHost().port),
        ])
        path, content = self.local_file(2 * 1024 * 1024)
        result = await self.uploader(endpoint).upload(path, "scans/b.tif")
        self.assertTrue(factory_a.cut_done)
        self.assertEqual(result.servers[0], "node-a")
        self.assertEqual(result.servers[-1], "node-b")
        self.assertEqual(len(result.resumed_at), 1)
        self.assertGreater(result.resumed_at[0], 0)
        self.assertLessEqual(result.bytes_sent, len(content) + WINDOW * CHUNK)
        with open(os.path.join(root, result.path), "rb") as f:
            self.assertEqual(f.read(), content)

    async def test_backend_down_at_start(self) -> None:
        """
        Nothing listens when the upload starts; the server comes up 0.3 s
        later and the upload completes, without claiming a resume.
        """
        port = free_tcp_port()
        storage = MemoryStorage()
        started: list[Any] = []

        def start() -> None:
            started.append(self.start_server(storage, port=port))

        call = reactor.callLater(0.3, start)
        self.addCleanup(lambda: call.active() and call.cancel())
        path, content = self.local_file(300 * 1024)
        result = await self.uploader(f"tcp:127.0.0.1:{port}", max_attempts=100).upload(path)
        self.assertEqual(len(started), 1)
        self.assertGreater(result.attempts, 1)
        self.assertEqual(result.resumed_at, [])
        self.assertEqual(result.bytes_sent, len(content))
        self.assertEqual(storage.read_completed(result.path), content)


class JournalResumeTests(ServerTestCase):
    """A client that gave up (or died) resumes from its journal."""

    async def partial_upload(self, storage: Any, journal: Journal,
                             size: int = 2 * 1024 * 1024) -> tuple[str, bytes, int, str]:
        """
        Start an upload that makes progress, then lose the server for good
        (it stops listening and cuts the connection): the uploader gives up.

        @return: the local path, its bytes, the port the server used and
            the endpoint string.
        """
        listening: list[Any] = []
        factory, port = self.start_server(
            storage, cut_after=size // 3, on_cut=lambda: listening[0].stopListening()
        )
        listening.append(port)
        port_number = port.getHost().port
        endpoint = endpoint_of(port)
        path, content = self.local_file(size)
        uploader = self.uploader(endpoint, journal=journal, max_attempts=2)
        with self.assertRaises(UploadFailed) as caught:
            await uploader.upload(path)
        self.assertTrue(factory.cut_done)
        self.assertIsInstance(caught.exception.cause, ConnectError)
        self.assertIn("2 attempts", str(caught.exception))
        return path, content, port_number, endpoint

    def journal_entries(self, journal: Journal) -> dict[str, Any]:
        """The journal file's entries ({} when there is no file), read afresh."""
        return Journal(journal.path).entries()

    def assertCompleteEntry(self, journal: Journal, upload_id: str) -> None:
        """The journal holds one entry: C{upload_id}, marked complete."""
        [entry] = self.journal_entries(journal).values()
        self.assertEqual((entry["upload_id"], entry.get("complete")), (upload_id, True))

    async def test_resume_from_journal(self) -> None:
        """
        After an UploadFailed, the journal holds the upload id; a new
        Uploader with the same journal, against a fresh server on the same
        storage, resumes it and then marks the entry complete.
        """
        root = os.path.join(self.work, "storage")
        journal = Journal(os.path.join(self.work, "state", "journal.json"))
        path, content, port, endpoint = await self.partial_upload(
            self.fs_storage(root), journal
        )
        [entry] = self.journal_entries(journal).values()
        # The digest goes at the end (FINISH): none recorded while unfinished.
        self.assertIsNone(entry["sha256"])
        self.assertTrue(os.path.isdir(os.path.join(root, "incoming", entry["upload_id"])))

        self.start_server(self.fs_storage(root), "node-b", port=port)
        result = await self.uploader(endpoint, journal=Journal(journal.path)).upload(path)
        self.assertEqual(result.upload_id, entry["upload_id"])
        self.assertEqual(result.attempts, 1)
        self.assertEqual(len(result.resumed_at), 1)
        self.assertGreater(result.resumed_at[0], 0)
        self.assertLess(result.bytes_sent, len(content))
        self.assertEqual(result.bytes_sent, len(content) - result.resumed_at[0])
        self.assertFalse(result.already_complete)
        self.assertCompleteEntry(journal, result.upload_id)
        [entry] = self.journal_entries(journal).values()
        self.assertEqual(entry["sha256"], integrity.digest_of("blake3", content).hex())
        with open(os.path.join(root, result.path), "rb") as f:
            self.assertEqual(f.read(), content)

    async def test_restart_ignores_journal(self) -> None:
        """restart=True starts a new upload (new id, every byte sent) despite the journal."""
        storage = MemoryStorage(busy_retry_after=0.05)
        journal = Journal(os.path.join(self.work, "journal.json"))
        path, content, port, endpoint = await self.partial_upload(storage, journal)
        [entry] = self.journal_entries(journal).values()
        self.start_server(storage, "node-b", port=port)
        result = await self.uploader(endpoint, journal=journal).upload(path, restart=True)
        self.assertNotEqual(result.upload_id, entry["upload_id"])
        self.assertEqual(result.resumed_at, [])
        self.assertEqual(result.bytes_sent, len(content))
        self.assertCompleteEntry(journal, result.upload_id)
        self.assertEqual(storage.read_completed(result.path), content)

    async def test_local_file_changed_residual_mismatch(self) -> None:
        """
        The local file changed after a partial upload, yet its fingerprint
        (size, mtime, inode) still matches the journal entry: the server's
        tail no longer matches the local bytes, so the client starts a fresh
        upload of the new content instead of continuing the old residual.
        """
        storage = MemoryStorage(busy_retry_after=0.05)
        journal = Journal(os.path.join(self.work, "journal.json"))
        path, content, port, endpoint = await self.partial_upload(storage, journal)
        [entry] = self.journal_entries(journal).values()
        st = os.stat(path)
        new_content = random.Random(99).randbytes(len(content))
        with open(path, "r+b") as f:  # same inode
            f.write(new_content)
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))

        self.start_server(storage, "node-b", port=port)
        result = await self.uploader(endpoint, journal=journal).upload(path)
        self.assertNotEqual(result.upload_id, entry["upload_id"])
        self.assertEqual(result.sha256, integrity.digest_of("blake3", new_content).hex())
        self.assertEqual(result.resumed_at, [])
        self.assertEqual(storage.read_completed(result.path), new_content)
        self.assertCompleteEntry(journal, result.upload_id)

    async def test_unknown_upload_starts_fresh(self) -> None:
        """
        A journal entry naming an upload the server does not know (expired,
        aborted) is answered UNKNOWN_UPLOAD; the client starts a fresh upload.
        """
        storage = MemoryStorage()
        _, listening = self.start_server(storage)
        endpoint = endpoint_of(listening)
        path, content = self.local_file(100 * 1024)
        journal = Journal(os.path.join(self.work, "journal.json"))
        source = self.successResultOf(LocalFile.open(path, sync_run))
        self.addCleanup(source.close)
        key = journal_key(source.fingerprint, endpoint, "scan.tif")
        journal.remember(key, "0" * 32, hashlib.sha256(content).hexdigest())
        result = await self.uploader(endpoint, journal=journal).upload(path)
        self.assertNotEqual(result.upload_id, "0" * 32)
        self.assertEqual(result.attempts, 2)
        self.assertEqual(result.resumed_at, [])
        self.assertEqual(result.bytes_sent, len(content))
        self.assertEqual(storage.read_completed(result.path), content)
        self.assertEqual(journal.lookup(key)["upload_id"], result.upload_id)

    async def test_journal_marks_small_uploads_complete(self) -> None:
        """
        The journal entry written when an upload is accepted is marked
        complete once it completes, even when the upload is too small for
        the first write to have finished before.
        """
        storage = MemoryStorage()
        _, listening = self.start_server(storage)
        journal = Journal(os.path.join(self.work, "journal.json"))
        uploader = self.uploader(endpoint_of(listening), journal=journal)
        results = []
        for i in range(8):
            path, _ = self.local_file(i, f"tiny-{i}.tif", seed=i)
            results.append(await uploader.upload(path))
        entries = self.journal_entries(journal).values()
        self.assertEqual(sorted(e["upload_id"] for e in entries),
                         sorted(r.upload_id for r in results))
        self.assertTrue(all(e["complete"] for e in entries))
        self.assertEqual(journal.upload_ids(), [])

    async def test_completed_file_confirmed_not_sent_again(self) -> None:
        """
        Uploading a file the journal knows complete sends no byte and does
        not hash it: one RESUME, answered COMPLETED, gives the first
        upload's result, and no second copy is stored.  With restart=True
        it is uploaded again, as a new upload stored beside the first.
        """
        storage = MemoryStorage()
        factory, listening = self.start_server(storage)
        journal = Journal(os.path.join(self.work, "journal.json"))
        path, content = self.local_file(300 * 1024)
        first = await self.uploader(endpoint_of(listening), journal=journal).upload(path)
        phases: list[str] = []
        again = await self.uploader(endpoint_of(listening), journal=Journal(journal.path)).upload(
            path, progress=lambda p: phases.append(p.phase))
        self.assertEqual((again.upload_id, again.path), (first.upload_id, first.path))
        self.assertEqual((again.bytes_sent, again.attempts, again.resumed_at), (0, 1, []))
        self.assertTrue(again.already_complete)
        self.assertFalse(first.already_complete)
        self.assertEqual(phases, ["done"])
        self.assertEqual(len(factory.protocols), 2)
        fresh = await self.uploader(endpoint_of(listening), journal=journal).upload(
            path, restart=True)
        self.assertNotEqual(fresh.upload_id, first.upload_id)
        self.assertEqual(fresh.bytes_sent, len(content))
        self.assertNotEqual(fresh.path, first.path)
        self.assertEqual(storage.read_completed(fresh.path), content)
        self.assertCompleteEntry(journal, fresh.upload_id)


class FailureTests(ServerTestCase):
    """Uploads that cannot complete."""

    async def test_cancelled(self) -> None:
        """
        Cancelling the Deferred of C{upload()} stops that upload as
        L{Uploader.interrupt} does: it fails with UploadInterrupted saying
        what the server acknowledged, and its connection is closed.
        """
        factory, listening = self.start_server(MemoryStorage())
        path, _ = self.local_file(8 * 1024 * 1024)
        acknowledged: list[int] = []
        upload = self.uploader(endpoint_of(listening), window=1).upload(
            path, progress=lambda p: p.phase == "uploading" and acknowledged.append(p.done))
        while not [a for a in acknowledged if a > 0]:
            await deferLater(reactor, 0.01, lambda: None)
        upload.cancel()
        with self.assertRaises(UploadInterrupted) as caught:
            await upload
        self.assertGreater(caught.exception.acknowledged, 0)
        self.assertIn("interrupted", str(caught.exception))
        while factory.connections:
            await deferLater(reactor, 0.01, lambda: None)

    async def test_invalid_name(self) -> None:
        """A name the server refuses fails at once: one connection, InvalidName."""
        factory, listening = self.start_server(MemoryStorage())
        path, _ = self.local_file(1000)
        with self.assertRaises(UploadFailed) as caught:
            await self.uploader(endpoint_of(listening)).upload(path, "../x")
        self.assertIsInstance(caught.exception.cause, InvalidName)
        self.assertEqual(len(factory.protocols), 1)

    async def test_file_too_large(self) -> None:
        """A file over the server's limit fails at once: one connection, FileTooLarge."""
        factory, listening = self.start_server(
            MemoryStorage(), limits=ServerLimits(max_file_size=1000)
        )
        path, _ = self.local_file(1001)
        with self.assertRaises(UploadFailed) as caught:
            await self.uploader(endpoint_of(listening)).upload(path)
        self.assertIsInstance(caught.exception.cause, FileTooLarge)
        self.assertEqual(len(factory.protocols), 1)

    async def test_stalled_server(self) -> None:
        """
        A server that accepts connections and never answers is abandoned
        after the stall timeout, each attempt; the upload fails with Stalled.
        """
        factory = Factory.forProtocol(SilentProtocol)
        factory.noisy = False
        factory.protocols = []
        listening = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(listening.stopListening)
        path, _ = self.local_file(1000)
        started = time.monotonic()
        uploader = self.uploader(endpoint_of(listening), stall_timeout=0.3, max_attempts=2)
        with self.assertRaises(UploadFailed) as caught:
            await uploader.upload(path)
        elapsed = time.monotonic() - started
        self.assertIsInstance(caught.exception.cause, Stalled)
        self.assertLess(elapsed, 3.0)
        self.assertEqual(len(factory.protocols), 2)
        await DeferredList([p.lost for p in factory.protocols])

    async def test_max_attempts(self) -> None:
        """
        Nothing ever listens: the uploader gives up after max_attempts
        connection attempts, says so, and takes bounded time.
        """
        started = time.monotonic()
        uploader = self.uploader(f"tcp:127.0.0.1:{free_tcp_port()}", max_attempts=3)
        path, _ = self.local_file(1000)
        with self.assertRaises(UploadFailed) as caught:
            await uploader.upload(path)
        self.assertLess(time.monotonic() - started, 2.0)
        self.assertIn("3 attempts", str(caught.exception))
        self.assertIsInstance(caught.exception.cause, ConnectError)


class IfExistsTests(ServerTestCase):
    """The uploader's if_exists: the server's answer to a name already taken."""

    async def test_skip_same_file(self) -> None:
        """
        Without a journal, the same file sent again with if_exists="skip" is
        not stored again: it is hashed first, nothing is sent, the result
        says skipped with the stored path and no upload id.
        """
        storage = MemoryStorage()
        _, listening = self.start_server(storage)
        path, content = self.local_file(100_000)
        first = await self.uploader(endpoint_of(listening)).upload(path, "a.tif")
        reports: list[Progress] = []
        again = await self.uploader(endpoint_of(listening), if_exists="skip").upload(
            path, "a.tif", progress=reports.append)
        self.assertEqual((again.skipped, again.path, again.upload_id, again.bytes_sent),
                         (True, first.path, "", 0))
        self.assertFalse(again.already_complete)
        self.assertEqual(again.sha256, integrity.digest_of("blake3", content).hex())
        self.assertEqual(reports[0].phase, "hashing")
        self.assertEqual(reports[-1], Progress("a.tif", "done", len(content), len(content),
                                               "node-a", "complete/a.tif"))
        self.assertEqual(list(storage.files), ["complete/a.tif"])
        self.assertEqual(len(storage._uploads), 1)
        self.assertFalse(first.skipped)
        self.assertTrue(json.dumps(again.to_json()))

    async def test_skip_other_file_is_renamed(self) -> None:
        """A different file under the name is not skipped: stored beside, path says where."""
        storage = MemoryStorage()
        _, listening = self.start_server(storage)
        path, _ = self.local_file(1000)
        await self.uploader(endpoint_of(listening)).upload(path, "a.tif")
        other, content = self.local_file(1000, "other.tif", seed=1)
        result = await self.uploader(endpoint_of(listening), if_exists="skip").upload(
            other, "a.tif")
        self.assertFalse(result.skipped)
        self.assertNotEqual(result.path, "complete/a.tif")
        self.assertEqual(storage.read_completed(result.path), content)

    async def test_fail(self) -> None:
        """if_exists="fail" with the name taken: UploadFailed (NameTaken), nothing stored."""
        storage = MemoryStorage()
        _, listening = self.start_server(storage)
        path, _ = self.local_file(1000)
        await self.uploader(endpoint_of(listening)).upload(path, "a.tif")
        with self.assertRaises(UploadFailed) as caught:
            await self.uploader(endpoint_of(listening), if_exists="fail").upload(path, "a.tif")
        self.assertIsInstance(caught.exception.cause, NameTaken)
        self.assertIn("complete/a.tif already exists", str(caught.exception))
        self.assertEqual(list(storage.files), ["complete/a.tif"])

    async def test_server_that_does_not_offer_it(self) -> None:
        """
        A server whose WELCOME does not offer if-exists (an older one) is
        sent nothing for skip or fail: the file fails with
        IfExistsNotOffered, on the same connection the next file (rename,
        which every server does) goes on.
        """
        original = ServerConnection.accept_hello

        def older(machine: ServerConnection, options: Any = None) -> None:
            original(machine, options)
            raw = machine._out.pop()
            welcome = decode_body(raw[0], memoryview(raw[5:]))
            machine._out.append(encode(attrs.evolve(welcome, options={
                k: v for k, v in welcome.options.items() if k != "if-exists"})))

        self.patch(ServerConnection, "accept_hello", older)
        storage = MemoryStorage()
        _, listening = self.start_server(storage)
        path, _ = self.local_file(1000)
        for policy in ("skip", "fail"):
            with self.assertRaises(UploadFailed) as caught:
                await self.uploader(endpoint_of(listening), if_exists=policy).upload(path)
            self.assertIsInstance(caught.exception.cause, IfExistsNotOffered)
            self.assertIn(f"does not offer if-exists={policy}", str(caught.exception))
        self.assertEqual((storage._uploads, storage.files), ({}, {}))
        result = await self.uploader(endpoint_of(listening), if_exists="rename").upload(path)
        self.assertEqual(result.path, "complete/scan.tif")

    def test_policy_checked(self) -> None:
        """An if_exists the protocol does not define is a ValueError at once."""
        self.assertRaises(ValueError, Uploader, "tcp:127.0.0.1:1", if_exists="overwrite")


class BackoffTests(SynchronousTestCase):
    """L{Uploader.backoff}: exponential, capped, jittered, never below retry_after."""

    def uploader(self, **kwargs: Any) -> Uploader:
        """An Uploader on a fake clock with a seeded random generator."""
        return Uploader(
            TCP4ClientEndpoint(Clock(), "127.0.0.1", 1), reactor=Clock(), journal=None,
            run=sync_run, rng=random.Random(1234), **kwargs,
        )

    def test_jitter_range(self) -> None:
        """Each delay lies in [ceiling/2, ceiling], ceiling = min(max, base * 2**(n-1))."""
        uploader = self.uploader(backoff_base=0.25, backoff_max=20.0)
        for failures in range(1, 15):
            ceiling = min(20.0, 0.25 * 2 ** (failures - 1))
            for _ in range(50):
                delay = uploader.backoff(failures)
                self.assertGreaterEqual(delay, ceiling / 2)
                self.assertLessEqual(delay, ceiling)

    def test_jitter_varies(self) -> None:
        """The delays for one failure count are not all equal (there is jitter)."""
        uploader = self.uploader(backoff_base=1.0, backoff_max=8.0)
        self.assertGreater(len({uploader.backoff(3) for _ in range(20)}), 1)

    def test_retry_after(self) -> None:
        """A server's retry_after hint is a lower bound on the delay."""
        uploader = self.uploader(backoff_base=0.01, backoff_max=0.1)
        for failures in range(1, 6):
            self.assertEqual(uploader.backoff(failures, retry_after=2.5), 2.5)
        self.assertLessEqual(uploader.backoff(8, retry_after=0.001), 0.1)


class AttemptHarness:
    """
    An L{UploadAttempt} on an L{UploadConnection} over a L{StringTransport},
    with a fake clock.
    """

    def __init__(self, test: SynchronousTestCase, content: bytes,
                 upload_id: str | None = None, window: int = 2, chunk: int = 4) -> None:
        path = os.path.abspath(test.mktemp())
        with open(path, "wb") as f:
            f.write(content)
        self.source = test.successResultOf(LocalFile.open(path, sync_run))
        test.addCleanup(self.source.close)
        self.content = content
        self.sha = hashlib.sha256(content).digest()
        self.request = Upload("a.tif", len(content), self.sha)
        self.clock = Clock()
        self.progress: list[int] = []
        self.ids: list[str] = []
        self.attempt = UploadAttempt(
            self.source, self.request, upload_id=upload_id, window=window, chunk_size=chunk,
            on_progress=self.progress.append, on_upload_id=self.ids.append,
        )
        self.connection = UploadConnection(self.clock, client_id="unit", stall_timeout=10.0)
        self.transport = StringTransport()
        self.connection.makeConnection(self.transport)
        self.decoder = new_decoder()
        test.assertEqual(self.sent(), [Hello("unit", options=integrity.hello_options("sha256"))])

    def start(self, welcome: Welcome | None = None) -> list[Any]:
        """
        Deliver the server's WELCOME (which the client does not answer),
        then run the attempt; return what the client wrote.
        """
        if self.receive(welcome or self.welcome()) != []:
            raise AssertionError("the client answered WELCOME on its own")
        self.connection.run(self.attempt)
        return self.sent()

    def sent(self) -> list[Any]:
        """Frames the client wrote since the last call."""
        return frames_written(self.transport, self.decoder)

    def receive(self, frame: Any) -> list[Any]:
        """Deliver a server frame; return what the client wrote in answer."""
        self.connection.dataReceived(encode(frame))
        return self.sent()

    def data(self, offset: int, length: int) -> Data:
        """The DATA frame the client should send for this range."""
        payload = self.content[offset:offset + length]
        return Data(offset, zlib.crc32(payload), payload)

    def welcome(self) -> Welcome:
        """A WELCOME with room for the test's small packets."""
        return Welcome(1, "unit-server", 1024, 1 << 40, 1024)

    def accepted(self, offset: int = 0, **kwargs: Any) -> Accepted:
        """An ACCEPTED for this file at C{offset}; C{kwargs} override fields."""
        kwargs.setdefault("size", len(self.content))
        kwargs.setdefault("sha256", self.sha)
        return Accepted("ab" * 16, "a.tif", offset=offset, **kwargs)


class UploadAttemptTests(SynchronousTestCase):
    """L{UploadAttempt} frame by frame, without sockets."""

    CONTENT = bytes(range(16))

    def test_offset_mismatch_continues_from_carried_offset(self) -> None:
        """
        An OFFSET_MISMATCH answer rewinds: once every packet in flight is
        answered, the client continues from the offset the last answer
        carried, and completes.
        """
        h = AttemptHarness(self, self.CONTENT)
        self.assertEqual(h.start(), [h.request])
        self.assertEqual(h.receive(h.accepted()), [h.data(0, 4), h.data(4, 4)])
        mismatch = Error(ErrorCode.OFFSET_MISMATCH, "8 bytes are stored", offset=8)
        self.assertEqual(h.receive(mismatch), [])  # one packet still in flight
        self.assertEqual(h.receive(mismatch), [h.data(8, 4), h.data(12, 4)])
        self.assertEqual(h.receive(Ack(12)), [])
        self.assertEqual(h.receive(Ack(16)), [Data(16, 0, b"")])
        completed = Completed("ab" * 16, 16, h.sha, "complete/a.tif")
        self.assertEqual(h.receive(completed), [])
        self.assertEqual(self.successResultOf(h.attempt.result), completed)
        self.assertEqual(h.attempt.stats.rewinds, 2)
        self.assertEqual(h.attempt.stats.bytes_sent, 16)
        self.assertEqual(h.progress, [0, 12, 16])
        # The connection is ready for the next file, and no timer runs.
        self.assertTrue(h.attempt.reusable)
        self.assertTrue(h.connection.idle)
        self.assertFalse(h.transport.disconnecting)
        self.assertEqual(h.clock.getDelayedCalls(), [])

    def test_window_advertised_by_the_server(self) -> None:
        """The client keeps no more packets in flight than the server's WELCOME asks."""
        h = AttemptHarness(self, self.CONTENT)
        welcome = Welcome(1, "unit-server", 1024, 1 << 40, 1024, {"window": "1"})
        self.assertEqual(h.start(welcome), [h.request])
        self.assertEqual(h.receive(h.accepted()), [h.data(0, 4)])
        self.assertEqual(h.receive(Ack(4)), [h.data(4, 4)])

    def test_resume_verified_tail(self) -> None:
        """A RESUME whose tail matches the local bytes continues from its offset."""
        h = AttemptHarness(self, self.CONTENT, upload_id="ab" * 16)
        self.assertEqual(h.start(), [Resume("ab" * 16)])
        tail = hashlib.sha256(self.CONTENT[4:8]).digest()
        frames = h.receive(h.accepted(8, tail_start=4, tail_length=4, tail_sha256=tail))
        self.assertEqual(frames, [h.data(8, 4), h.data(12, 4)])
        self.assertEqual(h.ids, ["ab" * 16])
        self.assertNoResult(h.attempt.result)

    def test_resume_tail_mismatch(self) -> None:
        """
        A RESUME whose stored tail differs from the local bytes ends the
        attempt with ResidualMismatch and sends no data.
        """
        h = AttemptHarness(self, self.CONTENT, upload_id="ab" * 16)
        h.start()
        wrong = hashlib.sha256(b"XXXX").digest()
        frames = h.receive(h.accepted(8, tail_start=4, tail_length=4, tail_sha256=wrong))
        self.assertEqual(frames, [])
        self.failureResultOf(h.attempt.result, ResidualMismatch)
        self.assertTrue(h.transport.disconnecting)

    def test_resume_other_file(self) -> None:
        """An ACCEPTED for another size or SHA-256 is a ResidualMismatch too."""
        for kwargs in ({"size": 17}, {"sha256": b"\1" * 32}):
            h = AttemptHarness(self, self.CONTENT, upload_id="ab" * 16)
            h.start()
            self.assertEqual(h.receive(h.accepted(0, **kwargs)), [])
            self.failureResultOf(h.attempt.result, ResidualMismatch)
            self.assertEqual(h.ids, [])
            self.assertTrue(h.transport.disconnecting)

    def test_stall_timeout(self) -> None:
        """With no frame for the stall timeout, the attempt aborts with Stalled."""
        h = AttemptHarness(self, self.CONTENT)
        h.clock.advance(9)
        h.start()
        h.clock.advance(9)
        self.assertNoResult(h.attempt.result)
        h.clock.advance(1)
        self.failureResultOf(h.attempt.result, Stalled)
        self.assertTrue(h.transport.disconnected)  # aborted, not closed
        self.assertEqual(h.clock.getDelayedCalls(), [])

    def test_command_error_ends_attempt(self) -> None:
        """
        A command-scope ERROR (INVALID_NAME) answering the UPLOAD ends the
        attempt with that error and leaves the connection ready for the
        next file.
        """
        h = AttemptHarness(self, self.CONTENT)
        h.start()
        h.receive(Error(ErrorCode.INVALID_NAME, "no"))
        self.failureResultOf(h.attempt.result, InvalidName)
        self.assertTrue(h.attempt.reusable)
        self.assertTrue(h.connection.idle)
        self.assertFalse(h.transport.disconnecting)
        self.assertEqual(h.clock.getDelayedCalls(), [])

    def test_command_error_after_accepted_closes(self) -> None:
        """
        A command-scope ERROR after ACCEPTED (DATA may be in flight) ends
        the attempt and closes the connection: it carries no further file.
        """
        h = AttemptHarness(self, self.CONTENT)
        h.start()
        h.receive(h.accepted())
        h.receive(Error(ErrorCode.STORAGE_FULL, "full", retry_after_ms=1000))
        self.failureResultOf(h.attempt.result, StorageFull)
        self.assertFalse(h.attempt.reusable)
        self.assertFalse(h.connection.idle)
        self.assertTrue(h.transport.disconnecting)

"""
Tests for L{imgresume.storage.filesystem}: the conformance suite, then what
only the filesystem backend promises (proven offsets after torn writes,
locks across instances and processes, flush failures, crash safety of
metadata and completion, no writes outside the root).
"""

from __future__ import annotations

import builtins
import errno
import fcntl
import hashlib
import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import time
import tracemalloc
import zlib

from twisted.internet import defer
from twisted.internet.testing import EventLoggingObserver
from twisted.logger import globalLogPublisher
from twisted.python.failure import Failure
from twisted.python.filepath import FilePath
from twisted.trial.unittest import TestCase

from imgresume.errors import (
    Incomplete,
    InvalidName,
    StorageError,
    StorageFull,
    UnknownUpload,
    UploadAlreadyComplete,
    UploadBusy,
    UploadTakenOver,
)
from imgresume.names import is_upload_id, new_upload_id
from imgresume.storage.filesystem import (
    FilesystemStorage,
    _durable,
    _journal,
    _layout,
    _locks,
    _publish,
)
from imgresume.storage.filesystem._journal import RECORD_SIZE
from imgresume.storage.interfaces import (
    DURABLE_ACK,
    PROVEN_OFFSET,
    SHARED,
    CompletedFileMoved,
    CompletedUpload,
    NewerRecordFormat,
    NewUpload,
    TailCheck,
)
from imgresume.storage.filesystem.gc import collect_garbage
from tests.support.processes import REPO_ROOT
from tests.support.runners import QueuedRunner, sync_run
from tests.support.storage_conformance import (
    EMPTY_TAIL,
    PAYLOAD,
    StorageConformanceMixin,
    request,
)



class FilesystemMixin:
    """Helpers for tests on a L{FilesystemStorage} in a temporary root."""

    def tempPath(self) -> FilePath:
        """
        A path that does not exist yet, in a fresh temporary directory removed
        after the test (not C{mktemp()}: under pytest that is relative to the
        working directory, the repository).
        """
        d = tempfile.mkdtemp(prefix="imgresume-test-")
        self.addCleanup(shutil.rmtree, d, True)
        return FilePath(d).child("x")

    def makeStorage(self):
        self.root = self.tempPath()
        return FilesystemStorage(self.root, sync_run)

    def makeSibling(self, storage):
        return FilesystemStorage(self.root.path, sync_run)

    def readCompleted(self, storage, path):
        return self.root.preauthChild(path).getContent()

    def settleWhole(self, storage):
        storage.whole.now = lambda: time.time() + 60  # past _whole.FRESH

    def moveCompleted(self, storage, path):
        consumed = self.root.child("consumed")
        if not consumed.exists():
            consumed.makedirs()
        src = self.root.preauthChild(path)
        src.moveTo(consumed.child(f"{len(consumed.listdir())}-{src.basename()}"))

    def storeDamaged(self, writer, offset):
        real = writer._pwrite
        data_fd = writer._data_fd

        def damaging(fd, data, at):
            if fd == data_fd and at <= offset < at + len(data):
                data = bytearray(data)
                data[offset - at] ^= 0xFF
                writer._pwrite = real
            return real(fd, data, at)

        writer._pwrite = damaging

    def upath(self, upload_id: str, name: str = "") -> FilePath:
        p = self.root.child("incoming").child(upload_id)
        return p.child(name) if name else p

    def flipByte(self, upload_id: str, name: str, offset: int) -> None:
        with open(self.upath(upload_id, name).path, "r+b") as f:
            f.seek(offset)
            b = f.read(1)
            f.seek(offset)
            f.write(bytes([b[0] ^ 0xFF]))

    def appendTo(self, upload_id: str, name: str, data: bytes) -> None:
        with open(self.upath(upload_id, name).path, "ab") as f:
            f.write(data)

    def meta(self, upload_id: str) -> dict:
        return json.loads(self.upath(upload_id, "meta.json").getContent())

    def partial(self, data: bytes = PAYLOAD, upto: int = 5000, chunk: int = 1000):
        """Create an upload, write C{data[:upto]} in chunks and release it."""
        writer = self.create(data)
        for pos in range(0, upto, chunk):
            self.successResultOf(writer.write(pos, data[pos : min(upto, pos + chunk)]))
        self.successResultOf(writer.release())
        return writer.info.upload_id

    def resumed(self, upload_id: str, storage=None):
        storage = storage or self.makeSibling(self.storage)
        return self.successResultOf(storage.resume(upload_id))


class FilesystemStorageTests(FilesystemMixin, StorageConformanceMixin, TestCase):
    """L{FilesystemStorage} passes the conformance suite."""

    def test_guaranteesAll(self) -> None:
        """The filesystem backend declares every guarantee."""
        self.assertLessEqual(
            {DURABLE_ACK, SHARED, PROVEN_OFFSET}, self.storage.guarantees
        )


class FilesystemLayoutTests(FilesystemMixin, TestCase):
    """The on-disk layout and record formats of L{FilesystemStorage}."""

    def setUp(self) -> None:
        self.storage = self.makeStorage()

    def create(self, data=PAYLOAD, name="a.tiff", **kw):
        return self.successResultOf(self.storage.create(request(data, name, **kw)))

    def test_createLayout(self) -> None:
        """create() makes the upload directory with its four files and meta."""
        writer = self.create(metadata={"k": "v"}, client_id="cli")
        upload_id = writer.info.upload_id
        self.assertEqual(
            sorted(self.upath(upload_id).listdir()),
            ["data", "journal", "lease", "lock", "meta.json"],
        )
        meta = self.meta(upload_id)
        self.assertEqual(
            meta,
            {
                "format": 1,
                "upload_id": upload_id,
                "name": "a.tiff",
                "size": len(PAYLOAD),
                "sha256": hashlib.sha256(PAYLOAD).hexdigest(),
                "digest": "sha256",
                "checksum": "crc32",
                "metadata": {"k": "v"},
                "client_id": "cli",
                "created": meta["created"],
                "state": "partial",
            },
        )
        self.assertIsInstance(meta["created"], float)

    def test_journalRecords(self) -> None:
        """Each write appends one 20-byte record naming its range and CRC."""
        writer = self.create()
        self.successResultOf(writer.write(0, PAYLOAD[:100]))
        self.successResultOf(writer.write(100, PAYLOAD[100:250]))
        raw = self.upath(writer.info.upload_id, "journal").getContent()
        self.assertEqual(len(raw), 2 * RECORD_SIZE)
        for i, (off, length) in enumerate([(0, 100), (100, 150)]):
            rec = raw[i * 20 : (i + 1) * 20]
            body = _journal.RECORD.pack(
                off, length, zlib.crc32(PAYLOAD[off : off + length])
            )
            self.assertEqual(rec, body + zlib.crc32(body).to_bytes(4, "big"))

    def test_longWriteSplitIntoRecords(self) -> None:
        """A write longer than one record may cover uses several records."""
        self.patch(_journal, "MAX_RECORD_LENGTH", 400)
        writer = self.create()
        self.successResultOf(writer.write(0, PAYLOAD[:1000]))
        raw = self.upath(writer.info.upload_id, "journal").getContent()
        self.assertEqual(len(raw), 3 * RECORD_SIZE)
        self.successResultOf(writer.release())
        again = self.resumed(writer.info.upload_id)
        self.assertEqual(again.offset, 1000)
        self.assertEqual(again.tail.start, 800)

    def test_completeLayout(self) -> None:
        """
        After completion only meta.json (state complete, with the path) and
        the lock remain; the file lies under complete/.
        """
        writer = self.create(b"abc")
        self.successResultOf(writer.write(0, b"abc"))
        self.successResultOf(writer.complete())
        upload_id = writer.info.upload_id
        self.assertEqual(sorted(self.upath(upload_id).listdir()), ["lease", "lock", "meta.json"])
        meta = self.meta(upload_id)
        self.assertEqual((meta["state"], meta["path"]), ("complete", "complete/a.tiff"))
        self.assertEqual(self.root.descendant(["complete", "a.tiff"]).getContent(), b"abc")

    def test_abortRemovesEverything(self) -> None:
        """abort() removes the upload directory."""
        writer = self.create()
        self.successResultOf(writer.write(0, b"abc"))
        self.successResultOf(writer.abort())
        self.assertFalse(self.upath(writer.info.upload_id).exists())

    def test_positionalWritesOnly(self) -> None:
        """
        Data and journal are not opened with O_APPEND and writes do not
        depend on the file position.
        """
        writer = self.create()
        for fd in (writer._data_fd, writer._journal_fd):
            self.assertFalse(fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_APPEND)
        self.successResultOf(writer.write(0, PAYLOAD[:10]))
        os.lseek(writer._data_fd, 0, os.SEEK_SET)
        os.lseek(writer._journal_fd, 0, os.SEEK_SET)
        self.successResultOf(writer.write(10, PAYLOAD[10:20]))
        self.successResultOf(writer.release())
        self.assertEqual(
            self.upath(writer.info.upload_id, "data").getContent(), PAYLOAD[:20]
        )
        self.assertEqual(self.resumed(writer.info.upload_id).offset, 20)

    def test_metaWriteUsesSameDirectory(self) -> None:
        """meta.json (and the lease) are replaced by a rename from a temp file beside them."""
        calls = []

        def replace(src, dst):
            calls.append((src, dst))
            self.assertEqual(os.path.dirname(src), os.path.dirname(dst))
            self.assertTrue(json.loads(FilePath(src).getContent()))
            return os.replace(src, dst)

        self.patch(_durable, "_replace", replace)
        self.create()
        self.assertEqual([os.path.basename(dst) for _, dst in calls], ["lease", "meta.json"])

    def test_defaultRunUsesThreads(self) -> None:
        """Without C{run}, disk work goes to the reactor's thread pool."""
        storage = FilesystemStorage(self.tempPath().path)

        async def go():
            writer = await storage.create(request(b"hi"))
            await writer.write(0, b"hi")
            return await writer.complete()

        d = defer.Deferred.fromCoroutine(go())
        d.addCallback(lambda c: self.assertEqual(c.path, "complete/a.tiff"))
        return d

    def test_logEvents(self) -> None:
        """Resume logs the proven offset and how much was cut."""
        events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        upload_id = self.partial(upto=3000)
        self.appendTo(upload_id, "data", b"junk")
        self.resumed(upload_id)
        resumed = [e for e in events if "unproven" in e]
        self.assertEqual(len(resumed), 1)
        self.assertEqual((resumed[0]["offset"], resumed[0]["unproven"]), (3000, 4))
        self.assertEqual(resumed[0]["upload_id"], upload_id)


class ProvenOffsetTests(FilesystemMixin, TestCase):
    """
    A resume proves its offset from the journal and the stored bytes,
    whatever a crash or a stale view left past it.
    """

    def setUp(self) -> None:
        self.storage = self.makeStorage()

    def create(self, data=PAYLOAD, name="a.tiff"):
        return self.successResultOf(self.storage.create(request(data, name)))

    def assertProven(self, upload_id, offset, tail_start, tail_length):
        writer = self.resumed(upload_id)
        self.assertEqual(writer.offset, offset)
        self.assertEqual(
            writer.tail,
            TailCheck(
                tail_start,
                tail_length,
                hashlib.sha256(PAYLOAD[tail_start : tail_start + tail_length]).digest(),
            ),
        )
        # Nothing is cut at resume: a host with a stale view must not delete
        # bytes another host stored; what lies past the offset is overwritten.
        self.assertGreaterEqual(self.upath(upload_id, "data").getsize(), offset)
        self.assertGreaterEqual(
            self.upath(upload_id, "journal").getsize(), writer._count * RECORD_SIZE
        )
        return writer

    def test_garbagePastEnd(self) -> None:
        """Bytes in the data file past the last record are not trusted, then overwritten."""
        upload_id = self.partial(upto=5000)
        self.appendTo(upload_id, "data", b"\xff" * 3000)
        writer = self.assertProven(upload_id, 5000, 4000, 1000)
        self.writeAll(writer, PAYLOAD, start=5000)
        completed = self.successResultOf(writer.complete())
        self.assertEqual(self.readCompleted(self.storage, completed.path), PAYLOAD)

    def writeAll(self, writer, data, start=0, chunk=4096):
        for pos in range(start, len(data), chunk):
            self.successResultOf(writer.write(pos, data[pos : pos + chunk]))

    def test_dataLongerThanJournal(self) -> None:
        """
        Correct bytes past the last record (written, never journaled) do not
        count: only journaled ranges are proven.
        """
        upload_id = self.partial(upto=5000)
        self.appendTo(upload_id, "data", PAYLOAD[5000:8000])
        self.assertProven(upload_id, 5000, 4000, 1000)

    def test_tornJournalRecord(self) -> None:
        """A partial record at the end of the journal is ignored, then overwritten."""
        upload_id = self.partial(upto=5000)
        self.appendTo(upload_id, "data", PAYLOAD[5000:6000])
        rec = _journal.pack_record(5000, 1000, zlib.crc32(PAYLOAD[5000:6000]))
        self.appendTo(upload_id, "journal", rec[:13])
        writer = self.assertProven(upload_id, 5000, 4000, 1000)
        self.successResultOf(writer.write(5000, PAYLOAD[5000:5500]))
        self.successResultOf(writer.release())
        self.assertProven(upload_id, 5500, 5000, 500)

    def test_recordWithoutData(self) -> None:
        """A valid record whose bytes never reached the data file is dropped."""
        upload_id = self.partial(upto=5000)
        rec = _journal.pack_record(5000, 1000, zlib.crc32(PAYLOAD[5000:6000]))
        self.appendTo(upload_id, "journal", rec)
        self.assertProven(upload_id, 5000, 4000, 1000)

    def test_recordWithShortData(self) -> None:
        """A valid record whose bytes only partly reached the file is dropped."""
        upload_id = self.partial(upto=5000)
        self.appendTo(upload_id, "data", PAYLOAD[5000:5500])
        rec = _journal.pack_record(5000, 1000, zlib.crc32(PAYLOAD[5000:6000]))
        self.appendTo(upload_id, "journal", rec)
        self.assertProven(upload_id, 5000, 4000, 1000)

    def test_lastRangeCorrupt(self) -> None:
        """
        If the last range's stored bytes do not match its CRC (an unsynced
        or stale tail), the record is dropped and the one before proven.
        """
        upload_id = self.partial(upto=5000)
        self.flipByte(upload_id, "data", 4500)
        self.assertProven(upload_id, 4000, 3000, 1000)

    def test_severalBadTailRecords(self) -> None:
        """Dropping walks back over as many bad ranges as there are."""
        upload_id = self.partial(upto=5000)
        self.flipByte(upload_id, "data", 4500)
        self.flipByte(upload_id, "data", 3500)
        self.assertProven(upload_id, 3000, 2000, 1000)

    def test_damagedRecordEndsJournal(self) -> None:
        """A record failing its own CRC ends the journal, valid ones after too."""
        upload_id = self.partial(upto=5000)
        self.flipByte(upload_id, "journal", 2 * RECORD_SIZE + 3)
        self.assertProven(upload_id, 2000, 1000, 1000)

    def test_nonContiguousRecordEndsJournal(self) -> None:
        """A record that does not start where the previous ended ends it."""
        upload_id = self.partial(upto=5000)
        rec = _journal.pack_record(6000, 10, zlib.crc32(PAYLOAD[6000:6010]))
        self.appendTo(upload_id, "journal", rec)
        self.assertProven(upload_id, 5000, 4000, 1000)

    def test_recordPastSizeEndsJournal(self) -> None:
        """A record reaching past the declared size ends the journal."""
        upload_id = self.partial(upto=5000)
        junk = b"x" * (len(PAYLOAD) + 1 - 5000)
        self.appendTo(upload_id, "data", junk)
        self.appendTo(upload_id, "journal", _journal.pack_record(
            5000, len(junk), zlib.crc32(junk)))
        self.assertProven(upload_id, 5000, 4000, 1000)

    def test_staleViewDeletesNothing(self) -> None:
        """
        A host whose view of the journal is a moment old proves a lower
        offset, but deletes nothing: once its view catches up, the bytes
        another host stored are proven again.
        """
        upload_id = self.partial(upto=5000)
        journal = self.upath(upload_id, "journal")
        full = journal.getContent()
        journal.setContent(full[: 3 * RECORD_SIZE])  # what the stale host sees
        writer = self.assertProven(upload_id, 3000, 2000, 1000)
        self.assertEqual(self.upath(upload_id, "data").getsize(), 5000)
        self.successResultOf(writer.release())
        journal.setContent(full)  # the view catches up
        self.assertProven(upload_id, 5000, 4000, 1000)

    def test_zeroedJournal(self) -> None:
        """A journal of zeros (a hole never written) proves nothing."""
        upload_id = self.partial(upto=5000)
        self.upath(upload_id, "journal").setContent(b"\0" * 100)
        writer = self.resumed(upload_id)
        self.assertEqual((writer.offset, writer.tail), (0, EMPTY_TAIL))
        self.writeAll(writer, PAYLOAD)
        completed = self.successResultOf(writer.complete())
        self.assertEqual(self.readCompleted(self.storage, completed.path), PAYLOAD)

    def test_fsyncFailureDuringResume(self) -> None:
        """If cutting back cannot be flushed, resume fails and frees the lock."""
        upload_id = self.partial(upto=5000)
        realFsync = os.fsync

        def failing(fd):
            raise OSError(errno.EIO, "I/O error")

        self.patch(os, "fsync", failing)
        f = self.failureResultOf(self.storage.resume(upload_id), StorageError)
        self.assertNotIn(self.root.path, f.value.message)
        self.patch(os, "fsync", realFsync)
        self.assertEqual(self.resumed(upload_id, self.storage).offset, 5000)


class LockingTests(FilesystemMixin, TestCase):
    """Write ownership across instances and processes."""

    def setUp(self) -> None:
        self.storage = self.makeStorage()

    def create(self, data=PAYLOAD, name="a.tiff"):
        return self.successResultOf(self.storage.create(request(data, name)))

    def test_ofdLockIsPerOpenFile(self) -> None:
        """
        Two opens of the lock file in one process exclude each other, and
        closing the refused one keeps the holder's lock (unlike lockf).
        """
        if not _locks.HAVE_OFD:
            raise self.skipTest("no OFD locks on this platform")
        path = self.tempPath().path
        FilePath(path).touch()
        fd1 = os.open(path, os.O_RDWR)
        fd2 = os.open(path, os.O_RDWR)
        fd3 = os.open(path, os.O_RDWR)
        self.addCleanup(os.close, fd1)
        self.addCleanup(os.close, fd3)
        self.assertTrue(_locks.try_lock(fd1))
        self.assertFalse(_locks.try_lock(fd2))
        os.close(fd2)
        self.assertFalse(_locks.try_lock(fd3))

    def test_secondInstanceBusy(self) -> None:
        """
        A second storage on the same root (another server) sees the upload
        but cannot own it while the first does.
        """
        writer = self.create()
        self.successResultOf(writer.write(0, b"abc" * 10))
        other = self.makeSibling(self.storage)
        f = self.failureResultOf(other.resume(writer.info.upload_id), UploadBusy)
        self.assertEqual(f.value.retry_after, 1.0)
        self.successResultOf(writer.release())
        self.assertEqual(self.resumed(writer.info.upload_id, other).offset, 30)

    def test_lostLockIsFencedByGeneration(self) -> None:
        """
        A writer whose lock vanished behind its back (an NFS lock lost in a
        partition) may not write once a newer writer holds the lease.
        """
        writer = self.create()
        self.successResultOf(writer.write(0, PAYLOAD[:100]))
        writer._lock.release()  # the lock is lost; the writer does not know
        self.storage._unclaim(writer.info.upload_id)
        newer = self.resumed(writer.info.upload_id)
        self.assertGreater(newer.generation, writer.generation)
        self.failureResultOf(writer.write(100, b"stale" * 20), UploadTakenOver)
        self.successResultOf(newer.write(100, PAYLOAD[100:200]))
        with open(self.upath(writer.info.upload_id, "data").path, "rb") as f:
            self.assertEqual(f.read(), PAYLOAD[:200])

    def test_withoutOFDLocks(self) -> None:
        """
        Where OFD locks are missing, lockf plus the process table still keep
        two instances in one process apart.
        """
        self.patch(_locks, "HAVE_OFD", False)
        writer = self.create()
        other = self.makeSibling(self.storage)
        upload_id = writer.info.upload_id
        self.failureResultOf(other.resume(upload_id), UploadBusy)
        self.successResultOf(writer.release())
        mine = self.resumed(upload_id, other)
        self.failureResultOf(self.storage.resume(upload_id), UploadBusy)
        self.successResultOf(mine.release())
        self.resumed(upload_id, self.storage)

    def lockHolder(self, path: str) -> subprocess.Popen:
        """Start a process that locks C{path} and answers 'locked' or 'busy'."""
        code = (
            "import os, sys\n"
            "from imgresume.storage.filesystem._locks import try_lock as _try_lock\n"
            "fd = os.open(sys.argv[1], os.O_RDWR)\n"
            "print('locked' if _try_lock(fd) else 'busy', flush=True)\n"
            "sys.stdin.readline()\n"
        )
        env = dict(os.environ, PYTHONPATH=REPO_ROOT)
        proc = subprocess.Popen(
            [sys.executable, "-c", code, path],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
            text=True,
        )

        def stop():
            if proc.poll() is None:
                proc.stdin.close()
                proc.wait(10)
            proc.stdout.close()

        self.addCleanup(stop)
        return proc

    def test_lockHeldByAnotherProcess(self) -> None:
        """
        While another process (another server) holds an upload's lock, resume
        is refused; once it exits, resume succeeds.  And while this process
        owns the upload, the other process cannot lock it.
        """
        writer = self.create()
        upload_id = writer.info.upload_id
        lock = self.upath(upload_id, "lock").path
        child = self.lockHolder(lock)
        self.assertEqual(child.stdout.readline().strip(), "busy")
        child.stdin.close()
        child.wait(10)
        self.successResultOf(writer.release())

        child = self.lockHolder(lock)
        self.assertEqual(child.stdout.readline().strip(), "locked")
        self.failureResultOf(self.storage.resume(upload_id), UploadBusy)
        child.stdin.close()
        child.wait(10)
        self.resumed(upload_id, self.storage)

    def test_releaseWaitsForRunningWrite(self) -> None:
        """
        release() called while a write is still on the disk thread runs
        after it, so no fd is closed under a running write.
        """
        run = QueuedRunner()
        storage = FilesystemStorage(self.root, run)
        d = storage.create(request())
        run.step()
        writer = self.successResultOf(d)
        wd = writer.write(0, b"abc")
        rd = writer.release()
        self.assertEqual(len(run), 1)
        self.assertNoResult(wd)
        run.step()
        self.assertEqual(self.successResultOf(wd), 3)
        self.assertEqual(len(run), 2)  # the release, then the read-back
        run.step()
        self.successResultOf(rd)
        run.step()  # the read-back finds its descriptor closed and stops
        self.assertEqual(self.resumed(writer.info.upload_id).offset, 3)


class ReadBackTests(FilesystemMixin, TestCase):
    """
    Completion's verification by reading back: it follows the writes on the
    disk threads, so complete() only waits for the last bytes.
    """

    def setUp(self) -> None:
        self.root = self.tempPath()
        self.run = QueuedRunner()
        self.verified: list[float] = []

        def timings(what, seconds):
            if what == "verify":
                self.verified.append(seconds)

        self.storage = FilesystemStorage(self.root, self.run, timings=timings)

    def runAll(self) -> None:
        """Run the queued disk work, and what it queues, until none is left."""
        self.run.run_all()

    def create(self, data: bytes = PAYLOAD):
        d = self.storage.create(request(data))
        self.runAll()
        return self.successResultOf(d)

    def test_noBufferPerUpload(self) -> None:
        """
        Open uploads hold no read buffer of their own (the disk threads
        share theirs): 32 open writers cost far less than 32 MiB.
        """
        tracemalloc.start()
        self.addCleanup(tracemalloc.stop)
        before = tracemalloc.get_traced_memory()[0]
        writers = [self.create() for _ in range(32)]
        grown = tracemalloc.get_traced_memory()[0] - before
        self.assertLess(grown, 4 << 20)
        for writer in writers:
            d = writer.release()
            self.runAll()
            self.successResultOf(d)

    def test_verifiedAsWritten(self) -> None:
        """
        Each flushed batch is read back before complete() is called; the
        completion reads nothing more and checks the whole digest.
        """
        writer = self.create()
        for pos in range(0, len(PAYLOAD), 4096):
            d = writer.write(pos, PAYLOAD[pos : pos + 4096])
            self.runAll()
            self.successResultOf(d)
        self.assertEqual(len(self.verified), 3)
        d = writer.complete()
        self.runAll()
        self.assertEqual(self.successResultOf(d).sha256, hashlib.sha256(PAYLOAD).digest())
        self.assertEqual(len(self.verified), 3)

    def test_completeWaitsForReadBack(self) -> None:
        """
        complete() called while the last bytes are still unread checks the
        digest only after they are read back.
        """
        writer = self.create()
        d = writer.write(0, PAYLOAD)
        self.run.step()
        self.assertEqual(self.successResultOf(d), len(PAYLOAD))
        self.assertEqual(len(self.run), 1)  # the read-back, not run yet
        done = writer.complete()
        self.assertNoResult(done)
        self.assertEqual(self.verified, [])
        self.runAll()
        self.assertEqual(len(self.verified), 1)
        self.successResultOf(done)

    def test_resumeVerifiesStoredPrefix(self) -> None:
        """
        A resumed upload reads back the prefix other connections stored
        once its first new bytes are flushed: not before, so that the first
        acknowledgement after a resume does not wait behind it.
        """
        writer = self.create()
        d = writer.write(0, PAYLOAD[:5000])
        self.runAll()
        self.successResultOf(d)
        d = writer.release()
        self.runAll()
        self.successResultOf(d)
        self.verified.clear()
        d = self.storage.resume(writer.info.upload_id)
        self.runAll()
        again = self.successResultOf(d)
        self.assertEqual(again.offset, 5000)
        self.assertEqual(self.verified, [])
        d = again.write(5000, PAYLOAD[5000:])
        self.runAll()
        self.successResultOf(d)
        self.assertEqual(len(self.verified), 1)  # the prefix and the new bytes
        d = again.complete()
        self.runAll()
        completed = self.successResultOf(d)
        self.assertEqual(self.root.preauthChild(completed.path).getContent(), PAYLOAD)

    def test_bytesDamagedBeforeReadBack(self) -> None:
        """
        Bytes that change on the disk after their flush but before they are
        read back are found: the upload is cut back to the damaged range.
        """
        writer = self.create()
        d = writer.write(0, PAYLOAD[:4096])
        d.addCallback(lambda _: self.flipByte(writer.info.upload_id, "data", 100))
        self.runAll()
        self.successResultOf(d)
        d = writer.write(4096, PAYLOAD[4096:])
        self.runAll()
        self.successResultOf(d)
        d = writer.complete()
        self.runAll()
        self.assertEqual(self.failureResultOf(d, Incomplete).value.offset, 0)
        d = writer.write(0, PAYLOAD)
        self.runAll()
        self.successResultOf(d)
        d = writer.complete()
        self.runAll()
        self.successResultOf(d)

    def test_readBackFailure(self) -> None:
        """
        A stored file found shorter than its flushed offset when read back
        fails complete() with a StorageError naming the upload; the upload
        stays resumable.
        """
        writer = self.create()
        d = writer.write(0, PAYLOAD)
        d.addCallback(lambda _: os.truncate(self.upath(writer.info.upload_id, "data").path, 10))
        self.runAll()
        self.successResultOf(d)
        d = writer.complete()
        self.runAll()
        f = self.failureResultOf(d, StorageError)
        self.assertIn(writer.info.upload_id, f.value.message)
        self.assertIn("resume", f.value.message)
        d = writer.release()
        self.runAll()
        self.successResultOf(d)


class FailureTests(FilesystemMixin, TestCase):
    """Full disks, failed flushes and I/O errors."""

    def setUp(self) -> None:
        self.storage = self.makeStorage()

    def create(self, data=PAYLOAD, name="a.tiff"):
        return self.successResultOf(self.storage.create(request(data, name)))

    def failingPwrite(self, err, when=lambda fd: True):
        real = os.pwrite

        def pwrite(fd, data, offset):
            if when(fd):
                # Store a part, as a filling disk does, then fail.
                real(fd, bytes(data[:7]), offset)
                raise OSError(err, os.strerror(err))
            return real(fd, data, offset)

        return pwrite

    def test_noSpaceOnData(self) -> None:
        """
        ENOSPC while writing data is StorageFull; nothing is acknowledged,
        and the writer goes on (overwriting the partial bytes) once space is back.
        """
        writer = self.create()
        self.successResultOf(writer.write(0, PAYLOAD[:100]))
        writer._pwrite = self.failingPwrite(errno.ENOSPC)
        self.failureResultOf(writer.write(100, PAYLOAD[100:200]), StorageFull)
        self.assertEqual(writer.offset, 100)
        writer._pwrite = os.pwrite
        self.assertEqual(self.successResultOf(writer.write(100, PAYLOAD[100:200])), 200)
        self.successResultOf(writer.release())
        self.assertEqual(self.resumed(writer.info.upload_id).offset, 200)

    def test_quotaOnJournal(self) -> None:
        """EDQUOT while writing the journal is StorageFull too; resumable after."""
        writer = self.create()
        self.successResultOf(writer.write(0, PAYLOAD[:100]))
        journal_fd = writer._journal_fd
        writer._pwrite = self.failingPwrite(errno.EDQUOT, lambda fd: fd == journal_fd)
        self.failureResultOf(writer.write(100, PAYLOAD[100:200]), StorageFull)
        upload_id = writer.info.upload_id
        self.successResultOf(writer.release())
        self.assertEqual(self.resumed(upload_id).offset, 100)

    def test_fsyncFailurePoisons(self) -> None:
        """
        A failed data flush fails the write, and every later call, with
        StorageError; the upload is freed and re-proven by the next owner.
        """
        writer = self.create()
        self.successResultOf(writer.write(0, PAYLOAD[:100]))

        def fdatasync(fd):
            raise OSError(errno.EIO, "Input/output error")

        writer._fdatasync = fdatasync
        f = self.failureResultOf(writer.write(100, PAYLOAD[100:200]), StorageError)
        self.assertIn("Input/output error", f.value.message)
        writer._fdatasync = os.fdatasync  # a later "successful" flush is no proof
        for d in (writer.write(100, PAYLOAD[100:200]), writer.complete(),
                  writer.abort()):
            self.failureResultOf(d, StorageError)
        self.successResultOf(writer.release())
        again = self.resumed(writer.info.upload_id)
        self.assertEqual(again.offset, 100)

    def test_journalFsyncFailurePoisons(self) -> None:
        """A failed journal flush poisons too; the next owner re-proves."""
        writer = self.create()
        self.successResultOf(writer.write(0, PAYLOAD[:100]))
        journal_fd = writer._journal_fd

        def fdatasync(fd):
            if fd == journal_fd:
                raise OSError(errno.EIO, "Input/output error")
            os.fdatasync(fd)

        writer._fdatasync = fdatasync
        self.failureResultOf(writer.write(100, PAYLOAD[100:200]), StorageError)
        self.failureResultOf(writer.write(100, PAYLOAD[100:200]), StorageError)
        # The lock is free already: a poisoned writer gives up the upload.
        again = self.resumed(writer.info.upload_id, self.storage)
        # The record and its bytes did reach the page cache here, and
        # verify, so they count; on a real failure they would be dropped.
        self.assertIn(again.offset, (100, 200))
        self.successResultOf(writer.release())

    def test_ioErrorOnWrite(self) -> None:
        """Other write errors are StorageError naming no absolute path."""
        writer = self.create()
        writer._pwrite = self.failingPwrite(errno.EIO)
        f = self.failureResultOf(writer.write(0, PAYLOAD[:100]), StorageError)
        self.assertNotIn(self.root.path, f.value.message)
        self.assertIn(writer.info.upload_id, f.value.message)
        self.successResultOf(writer.release())
        self.assertEqual(self.resumed(writer.info.upload_id).offset, 0)

    def test_unreadableMeta(self) -> None:
        """A meta.json that is not a valid record is a StorageError."""
        writer = self.create()
        self.successResultOf(writer.release())
        self.upath(writer.info.upload_id, "meta.json").setContent(b"{trunc")
        self.failureResultOf(
            self.storage.resume(writer.info.upload_id), StorageError
        )

    def test_directoryWithoutMeta(self) -> None:
        """An upload directory left without meta.json is not an upload."""
        writer = self.create()
        self.successResultOf(writer.release())
        self.upath(writer.info.upload_id, "meta.json").remove()
        self.failureResultOf(
            self.storage.resume(writer.info.upload_id), UnknownUpload
        )

    def test_crashBeforeMetaRename(self) -> None:
        """
        A crash between writing meta.json's temp file and renaming it leaves
        the old meta.json whole: here, a failed first rename at create leaves
        no upload, and one at completion leaves the upload partial.
        """
        def crash(src, dst):
            raise OSError(errno.EIO, "simulated crash")

        self.patch(_durable, "_replace", crash)
        self.failureResultOf(self.storage.create(request()), StorageError)
        self.assertEqual(self.root.child("incoming").listdir(), [])

        self.patch(_durable, "_replace", os.replace)
        writer = self.create(b"abc")
        self.successResultOf(writer.write(0, b"abc"))
        self.patch(_durable, "_replace", crash)
        self.failureResultOf(writer.complete(), StorageError)
        upload_id = writer.info.upload_id
        self.assertEqual(self.meta(upload_id)["state"], "partial")
        self.assertEqual(self.root.child("complete").listdir(), [])
        self.successResultOf(writer.release())
        self.patch(_durable, "_replace", os.replace)
        again = self.resumed(upload_id)
        self.assertEqual(again.offset, 3)
        self.assertEqual(self.successResultOf(again.complete()).path, "complete/a.tiff")

    def test_crashBeforeLink(self) -> None:
        """
        A completion that stopped after recording "completing" is finished by
        the next resume, which reports the upload complete.
        """
        def crash(*a, **kw):
            raise OSError(errno.EIO, "simulated crash")

        writer = self.create(b"abc")
        self.successResultOf(writer.write(0, b"abc"))
        self.patch(_publish, "_link", crash)
        self.failureResultOf(writer.complete(), StorageError)
        upload_id = writer.info.upload_id
        self.assertEqual(self.meta(upload_id)["state"], "completing")
        self.successResultOf(writer.release())
        self.patch(_publish, "_link", os.link)
        f = self.failureResultOf(
            self.makeSibling(self.storage).resume(upload_id), UploadAlreadyComplete
        )
        self.assertEqual(f.value.completed.path, "complete/a.tiff")
        self.assertEqual(self.readCompleted(None, "complete/a.tiff"), b"abc")
        self.assertEqual(self.meta(upload_id)["state"], "complete")
        self.assertFalse(self.upath(upload_id, "data").exists())

    def test_crashAfterLink(self) -> None:
        """
        A completion that linked the file but did not record "complete" is
        recognised (same file) and finished under the same path.
        """
        writer = self.create(b"abc")
        self.successResultOf(writer.write(0, b"abc"))
        calls = []

        def crashOnSecond(src, dst):
            calls.append(dst)
            if len(calls) == 2:
                raise OSError(errno.EIO, "simulated crash")
            os.replace(src, dst)

        self.patch(_durable, "_replace", crashOnSecond)
        self.failureResultOf(writer.complete(), StorageError)
        self.successResultOf(writer.release())
        self.patch(_durable, "_replace", os.replace)
        upload_id = writer.info.upload_id
        self.assertEqual(self.meta(upload_id)["state"], "completing")
        f = self.failureResultOf(self.storage.resume(upload_id), UploadAlreadyComplete)
        self.assertEqual(f.value.completed.path, "complete/a.tiff")
        self.assertEqual(self.root.child("complete").listdir(), ["a.tiff"])

    def test_completedFileMissing(self) -> None:
        """A completion record whose file is gone is reported, not hidden."""
        writer = self.create(b"abc")
        self.successResultOf(writer.write(0, b"abc"))
        completed = self.successResultOf(writer.complete())
        self.root.preauthChild(completed.path).remove()
        f = self.failureResultOf(self.storage.resume(completed.upload_id), StorageError)
        self.assertIn("complete/a.tiff", f.value.message)


class NoClobberTests(FilesystemMixin, TestCase):
    """Completed files are never replaced and nothing lands outside the root."""

    def setUp(self) -> None:
        self.storage = self.makeStorage()
        self.outside = self.tempPath()
        self.outside.makedirs()

    def create(self, data=PAYLOAD, name="a.tiff"):
        return self.successResultOf(self.storage.create(request(data, name)))

    def finish(self, data: bytes, name: str):
        writer = self.create(data, name)
        self.successResultOf(writer.write(0, data))
        return writer, writer.complete()

    def test_existingFileKept(self) -> None:
        """A file already at the name (put there by anyone) is kept."""
        self.root.child("complete").makedirs()
        self.root.descendant(["complete", "a.tiff"]).setContent(b"theirs")
        writer, d = self.finish(b"mine", "a.tiff")
        completed = self.successResultOf(d)
        self.assertEqual(completed.path, f"complete/a.{writer.info.upload_id[:8]}.tiff")
        self.assertEqual(self.readCompleted(None, "complete/a.tiff"), b"theirs")
        self.assertEqual(self.readCompleted(None, completed.path), b"mine")

    def test_lostRaceForName(self) -> None:
        """If the name is taken between the check and the link, another is used."""
        def racingLink(src, dst, **kw):
            self.root.descendant(["complete", "a.tiff"]).setContent(b"racer")
            self.patch(_publish, "_link", os.link)
            return os.link(src, dst, **kw)

        self.patch(_publish, "_link", racingLink)
        writer, d = self.finish(b"mine", "a.tiff")
        completed = self.successResultOf(d)
        self.assertNotEqual(completed.path, "complete/a.tiff")
        self.assertEqual(self.readCompleted(None, "complete/a.tiff"), b"racer")
        self.assertEqual(self.readCompleted(None, completed.path), b"mine")
        self.assertEqual(self.meta(writer.info.upload_id)["path"], completed.path)

    def test_symlinkedDirectoryAtCreate(self) -> None:
        """A symlink planted in complete/ makes create() fail."""
        self.root.child("complete").makedirs()
        self.outside.linkTo(self.root.descendant(["complete", "evil"]))
        self.failureResultOf(
            self.storage.create(request(b"x", "evil/a.tiff")), StorageError
        )

    def test_symlinkedDirectoryAtComplete(self) -> None:
        """
        A symlink planted in complete/ after the upload started makes
        complete() fail, writes nothing outside the root, and leaves the
        upload resumable.
        """
        writer = self.create(b"abc", "deep/er/a.tiff")
        self.successResultOf(writer.write(0, b"abc"))
        self.root.descendant(["complete", "deep"]).makedirs()
        self.outside.linkTo(self.root.descendant(["complete", "deep", "er"]))
        f = self.failureResultOf(writer.complete(), StorageError)
        self.assertIn("symlink", f.value.message)
        self.assertNotIn(self.outside.path, f.value.message)
        self.assertEqual(self.outside.listdir(), [])
        self.assertEqual(self.meta(writer.info.upload_id)["state"], "partial")
        self.successResultOf(writer.release())
        self.assertEqual(self.resumed(writer.info.upload_id).offset, 3)

    def test_symlinkedCompleteDirectory(self) -> None:
        """complete/ itself being a symlink is refused too."""
        self.root.makedirs()
        self.outside.linkTo(self.root.child("complete"))
        self.failureResultOf(self.storage.create(request(b"x", "a.tiff")), StorageError)
        self.assertEqual(self.outside.listdir(), [])

    def test_symlinkAtLeaf(self) -> None:
        """A symlink at the final name is an existing file: kept, name moved."""
        target = self.outside.child("target")
        target.setContent(b"outside")
        self.root.child("complete").makedirs()
        target.linkTo(self.root.descendant(["complete", "a.tiff"]))
        writer, d = self.finish(b"mine", "a.tiff")
        completed = self.successResultOf(d)
        self.assertNotEqual(completed.path, "complete/a.tiff")
        self.assertEqual(target.getContent(), b"outside")

    def test_parentIsFile(self) -> None:
        """A file where a directory of the name should be is InvalidName."""
        self.root.child("complete").makedirs()
        self.root.descendant(["complete", "scans"]).setContent(b"f")
        self.failureResultOf(
            self.storage.create(request(b"x", "scans/a.tiff")), InvalidName
        )


class CompletedIdentityTests(FilesystemMixin, TestCase):
    """
    A completion records the identity of the file it published, and a
    resume answers "complete" only while that file is still at its path.
    """

    def setUp(self) -> None:
        self.storage = self.makeStorage()

    def upload(self, data: bytes = PAYLOAD, name: str = "a.tiff"):
        writer = self.successResultOf(self.storage.create(request(data, name)))
        self.successResultOf(writer.write(0, data))
        return self.successResultOf(writer.complete())

    def rewriteMeta(self, upload_id: str, change, age: float = 3600.0) -> None:
        """Change meta.json, recorded C{age} seconds ago."""
        meta = self.meta(upload_id)
        change(meta)
        path = self.upath(upload_id, "meta.json")
        path.setContent(json.dumps(meta).encode())
        os.utime(path.path, (time.time() - age,) * 2)

    def test_identityRecorded(self) -> None:
        """meta.json of a completed upload names the published file's inode, size and mtime."""
        completed = self.upload()
        st = os.stat(self.root.preauthChild(completed.path).path)
        self.assertEqual(
            self.meta(completed.upload_id)["file"],
            {"inode": st.st_ino, "size": st.st_size, "mtime_ns": st.st_mtime_ns},
        )

    def test_sameInodeOtherFile(self) -> None:
        """
        A file with the recorded inode number and size but another
        modification time is another file (inode numbers are reused once a
        moved file is deleted): not reported complete.
        """
        completed = self.upload()
        self.rewriteMeta(completed.upload_id, lambda m: m["file"].update(mtime_ns=1))
        f = self.failureResultOf(self.storage.resume(completed.upload_id), CompletedFileMoved)
        self.assertIn("now holds another file", f.value.message)

    def test_staleViewRightAfterCompletion(self) -> None:
        """
        Moments after the completion was recorded, the recorded inode with
        other attributes is taken for this host's stale view of a file
        another host just published (about 1 s on GlusterFS): a plain,
        retryable StorageError, neither "moved" nor "complete".
        """
        completed = self.upload()
        self.rewriteMeta(completed.upload_id, lambda m: m["file"].update(size=1), age=0)
        f = self.failureResultOf(self.storage.resume(completed.upload_id), StorageError)
        self.assertNotIsInstance(f.value, CompletedFileMoved)
        self.assertTrue(f.value.retryable)
        self.assertIn("moments ago", f.value.message)

    def test_symlinkAtRecordedPath(self) -> None:
        """A symlink put at the recorded path (even to the file) is not the file."""
        completed = self.upload()
        final = self.root.preauthChild(completed.path)
        moved = self.root.child("moved.tiff")
        final.moveTo(moved)
        moved.linkTo(final)
        self.failureResultOf(self.storage.resume(completed.upload_id), CompletedFileMoved)

    def test_recordWithoutIdentity(self) -> None:
        """
        A completion recorded before identities were kept (format 1, no
        C{file}) is checked by the file's size: the same file is complete,
        one of another size is another file.
        """
        completed = self.upload()
        self.rewriteMeta(completed.upload_id, lambda m: m.pop("file"))
        f = self.failureResultOf(
            self.storage.resume(completed.upload_id), UploadAlreadyComplete
        )
        self.assertEqual(f.value.completed, completed)
        final = self.root.preauthChild(completed.path)
        final.remove()
        final.setContent(b"another file")
        self.failureResultOf(self.storage.resume(completed.upload_id), CompletedFileMoved)

    def test_movedWithinCompleteAndBack(self) -> None:
        """A file renamed away and back (the same inode, untouched) is still the file."""
        completed = self.upload()
        final = self.root.preauthChild(completed.path)
        final.moveTo(self.root.child("elsewhere"))
        self.root.child("elsewhere").moveTo(final)
        f = self.failureResultOf(
            self.storage.resume(completed.upload_id), UploadAlreadyComplete
        )
        self.assertEqual(f.value.completed, completed)


class CutBackCrashTests(FilesystemMixin, TestCase):
    """
    When completion finds stored bytes damaged it cuts the upload back to
    the first bad range.  A crash at any point of that cut-back, with any
    of its unflushed steps lost or kept, must leave a state the offset
    proof handles: the proof checks only the last record's bytes, so no
    record may ever name bytes the data file no longer holds.
    """

    def setUp(self) -> None:
        self.storage = self.makeStorage()

    def cutBack(self):
        """
        Write PAYLOAD with a byte damaged at 5000, complete (which cuts back
        to 5000), and record the cut-back's truncations and flushes.

        @return: the upload id, the data and journal before the cut-back,
            the operations C{(what, file, length)} in order, and the offset
            it cut back to.
        """
        writer = self.successResultOf(self.storage.create(request(PAYLOAD)))
        self.storeDamaged(writer, 5000)
        for pos in range(0, len(PAYLOAD), 1000):
            self.successResultOf(writer.write(pos, PAYLOAD[pos : pos + 1000]))
        upload_id = writer.info.upload_id
        before = {n: self.upath(upload_id, n).getContent() for n in ("data", "journal")}
        names = {writer._data_fd: "data", writer._journal_fd: "journal"}
        ops = []
        real_truncate, real_sync = os.ftruncate, writer._fsync

        def ftruncate(fd, length):
            ops.append(("truncate", names[fd], length))
            real_truncate(fd, length)

        def fsync(fd):
            ops.append(("sync", names[fd], None))
            real_sync(fd)

        self.patch(os, "ftruncate", ftruncate)
        writer._ftruncate = ftruncate
        writer._fsync = fsync
        f = self.failureResultOf(writer.complete(), Incomplete)
        self.patch(os, "ftruncate", real_truncate)
        self.successResultOf(writer.release())
        return upload_id, before, ops, f.value.offset

    def crashStates(self, before, ops):
        """
        Every state a crash can leave: after each prefix of C{ops}, with
        each truncation not yet followed by a flush of its file either lost
        or kept.  Yields (description, {file: content}).
        """
        for k in range(len(ops) + 1):
            done = ops[:k]
            unsure = [
                i for i, (what, name, _) in enumerate(done)
                if what == "truncate" and ("sync", name, None) not in done[i + 1 :]
            ]
            for kept_mask in range(1 << len(unsure)):
                lost = {i for j, i in enumerate(unsure) if not kept_mask & (1 << j)}
                files = dict(before)
                for i, (what, name, length) in enumerate(done):
                    if what == "truncate" and i not in lost:
                        files[name] = files[name][:length]
                yield f"crash after {done}, losing {[done[i] for i in lost]}", files

    def test_crashDuringCutBack(self) -> None:
        """
        In every crash state of the cut-back, every record of the journal
        names bytes the data file holds; a resume proves no offset past the
        cut once any part of it persisted; and resending from the proven
        offset completes the upload with the right bytes.
        """
        upload_id, before, ops, start = self.cutBack()
        self.assertEqual(start, 5000)
        self.assertEqual(len(ops), 4)
        states = 0
        for description, files in self.crashStates(before, ops):
            states += 1
            root = FilePath(tempfile.mkdtemp(prefix="imgresume-crash-"))
            self.addCleanup(shutil.rmtree, root.path, True)
            root = root.child("root")
            self.root.copyTo(root)
            udir = root.descendant(["incoming", upload_id])
            for name, content in files.items():
                udir.child(name).setContent(content)
            journal = files["journal"]
            for i in range(0, len(journal) - RECORD_SIZE + 1, RECORD_SIZE):
                rec = _journal.parse_record(journal[i : i + RECORD_SIZE])
                if rec is None:
                    break
                self.assertLessEqual(
                    rec[0] + rec[1], len(files["data"]),
                    f"{description}: journal record {i // RECORD_SIZE} names bytes "
                    f"{rec[0]}..{rec[0] + rec[1]} but data holds {len(files['data'])}",
                )
            storage = FilesystemStorage(root, sync_run)
            writer = self.successResultOf(storage.resume(upload_id))
            if files != before:
                self.assertLessEqual(writer.offset, start, description)
            for _ in range(3):  # the damaged range may be found (and cut) again
                for pos in range(writer.offset, len(PAYLOAD), 1000):
                    self.successResultOf(writer.write(pos, PAYLOAD[pos : pos + 1000]))
                outcome: list = []
                writer.complete().addBoth(outcome.append)
                if not (isinstance(outcome[0], Failure) and outcome[0].check(Incomplete)):
                    break
            completed = outcome[0]
            self.assertIsInstance(completed, CompletedUpload, description)
            self.assertEqual(root.preauthChild(completed.path).getContent(), PAYLOAD,
                             description)
        self.assertGreaterEqual(states, 7)


class FenceTests(FilesystemMixin, TestCase):
    """
    The fence (the lease re-read before every write and before completion)
    fails closed: a lease that cannot be read refuses the write, with a
    retryable StorageError, and the writer gives the upload up.
    """

    def setUp(self) -> None:
        self.storage = self.makeStorage()

    def started(self):
        writer = self.successResultOf(self.storage.create(request(PAYLOAD)))
        self.successResultOf(writer.write(0, PAYLOAD[:100]))
        return writer

    def failLeaseReads(self, errno_: int) -> list:
        """Make reading any lease fail with C{errno_} (as after read_small's retries)."""
        real = _layout.read_small
        calls = []

        def read_small(path):
            if os.path.basename(path) == "lease":
                calls.append(path)
                raise OSError(errno_, os.strerror(errno_))
            return real(path)

        self.patch(_layout, "read_small", read_small)
        return calls

    def assertRefused(self, writer, d, reason: str) -> None:
        """The write was refused, nothing stored, and the upload given up."""
        f = self.failureResultOf(d, StorageError)
        self.assertTrue(f.value.retryable)
        self.assertIn("lease", f.value.message)
        self.assertIn(reason, f.value.message)
        upload_id = writer.info.upload_id
        self.assertEqual(self.upath(upload_id, "data").getsize(), 100)
        self.failureResultOf(writer.write(100, PAYLOAD[100:200]), StorageError)
        # The lock is free at once: another server resumes and re-proves.
        self.patch(_layout, "read_small", _durable.read_small)
        self.assertEqual(self.resumed(upload_id).offset, 100)
        self.successResultOf(writer.release())

    def test_garbageLease(self) -> None:
        """A lease that is not a valid record refuses the write."""
        writer = self.started()
        self.upath(writer.info.upload_id, "lease").setContent(b"\0\0garbage")
        self.assertRefused(writer, writer.write(100, PAYLOAD[100:200]), "not a valid lease")

    def test_missingLease(self) -> None:
        """A lease file that is gone refuses the write."""
        writer = self.started()
        self.upath(writer.info.upload_id, "lease").remove()
        self.assertRefused(writer, writer.write(100, PAYLOAD[100:200]), "missing")

    def test_leaseReadError(self) -> None:
        """EIO reading the lease refuses the write."""
        writer = self.started()
        self.failLeaseReads(errno.EIO)
        self.assertRefused(writer, writer.write(100, PAYLOAD[100:200]),
                           os.strerror(errno.EIO))

    def test_leaseStaleAfterRetries(self) -> None:
        """
        ESTALE reading the lease is retried (another host replacing it),
        and refuses the write once the retries are spent.
        """
        writer = self.started()
        lease = self.upath(writer.info.upload_id, "lease").path
        real_open = open
        attempts = []

        def stale_open(path, *args, **kwargs):
            if path == lease:
                attempts.append(path)
                raise OSError(errno.ESTALE, os.strerror(errno.ESTALE))
            return real_open(path, *args, **kwargs)

        self.patch(_durable.time, "sleep", lambda seconds: None)
        self.patch(builtins, "open", stale_open)
        d = writer.write(100, PAYLOAD[100:200])
        self.patch(builtins, "open", real_open)
        self.assertEqual(len(attempts), 5)
        self.assertRefused(writer, d, os.strerror(errno.ESTALE))

    def test_unreadableLeaseAtCompletion(self) -> None:
        """Completion re-reads the lease too: unreadable, nothing is published."""
        writer = self.successResultOf(self.storage.create(request(b"abc")))
        self.successResultOf(writer.write(0, b"abc"))
        self.upath(writer.info.upload_id, "lease").setContent(b"{}")
        f = self.failureResultOf(writer.complete(), StorageError)
        self.assertIn("lease", f.value.message)
        self.assertEqual(self.meta(writer.info.upload_id)["state"], "partial")
        self.assertEqual(self.root.child("complete").listdir(), [])
        again = self.resumed(writer.info.upload_id)
        self.assertEqual(self.successResultOf(again.complete()).path, "complete/a.tiff")


class PublicationFailureTests(FilesystemMixin, TestCase):
    """
    A flush that fails while a completed file is published poisons the
    writer, as a failed data flush does; the publication is then proven
    again from fresh opens by the next resume before anyone is told the
    upload is complete.
    """

    def setUp(self) -> None:
        self.storage = self.makeStorage()
        self.flushed: list[tuple[str, int]] = []
        self.failing = True
        real = os.fsync

        def fsync(fd):
            st = os.fstat(fd)
            kind = "dir" if stat.S_ISDIR(st.st_mode) else "file"
            self.flushed.append((kind, st.st_ino))
            if self.failing and kind == "dir" and st.st_ino == self.completeDir():
                raise OSError(errno.EIO, os.strerror(errno.EIO))
            real(fd)

        self.patch(os, "fsync", fsync)

    def completeDir(self) -> int:
        try:
            return os.stat(self.root.child("complete").path).st_ino
        except FileNotFoundError:
            return -1

    def failedCompletion(self):
        writer = self.successResultOf(self.storage.create(request(b"abc")))
        self.successResultOf(writer.write(0, b"abc"))
        f = self.failureResultOf(writer.complete(), StorageError)
        self.assertIn(os.strerror(errno.EIO), f.value.message)
        self.assertEqual(self.meta(writer.info.upload_id)["state"], "completing")
        return writer

    def test_failedDirectoryFlushPoisons(self) -> None:
        """
        After the complete/ directory's flush failed, the writer is done:
        a retried complete() on it fails even once flushes work again (a
        retried flush that "succeeds" proves nothing), and the upload is
        free for the next owner at once.
        """
        writer = self.failedCompletion()
        self.failing = False
        f = self.failureResultOf(writer.complete(), StorageError)
        self.assertIn("unusable", f.value.message)
        self.assertEqual(self.meta(writer.info.upload_id)["state"], "completing")
        # No release() needed: the poisoned writer gave the lock up.
        f = self.failureResultOf(
            self.makeSibling(self.storage).resume(writer.info.upload_id),
            UploadAlreadyComplete,
        )
        self.assertEqual(f.value.completed.path, "complete/a.tiff")
        self.successResultOf(writer.release())

    def test_resumeProvesPublicationFromFreshOpens(self) -> None:
        """
        The resume that finishes such a completion opens the published name
        anew and flushes the file and its directory through the new
        descriptors before it answers UploadAlreadyComplete.
        """
        writer = self.failedCompletion()
        self.successResultOf(writer.release())
        self.failing = False
        del self.flushed[:]
        f = self.failureResultOf(
            self.makeSibling(self.storage).resume(writer.info.upload_id),
            UploadAlreadyComplete,
        )
        published = os.stat(self.root.preauthChild(f.value.completed.path).path)
        self.assertIn(("file", published.st_ino), self.flushed)
        self.assertIn(("dir", self.completeDir()), self.flushed)
        self.assertLess(self.flushed.index(("file", published.st_ino)),
                        self.flushed.index(("dir", self.completeDir())))
        self.assertEqual(self.meta(writer.info.upload_id)["state"], "complete")

    def test_failingAgainOnResume(self) -> None:
        """
        While the directory cannot be flushed, no resume says the upload is
        complete: it stays "completing" and the resume fails, retryably.
        """
        writer = self.failedCompletion()
        self.successResultOf(writer.release())
        for _ in range(2):
            f = self.failureResultOf(
                self.makeSibling(self.storage).resume(writer.info.upload_id), StorageError
            )
            self.assertTrue(f.value.retryable)
            self.assertEqual(self.meta(writer.info.upload_id)["state"], "completing")
        self.failing = False
        self.failureResultOf(
            self.makeSibling(self.storage).resume(writer.info.upload_id),
            UploadAlreadyComplete,
        )


class FormatTests(FilesystemMixin, TestCase):
    """
    meta.json carries the lowest format that describes it; a server reads
    every format up to its own and refuses a newer one clearly.
    """

    def setUp(self) -> None:
        self.storage = self.makeStorage()

    def create(self, data=PAYLOAD, name="a.tiff"):
        return self.successResultOf(self.storage.create(request(data, name)))

    def writeMeta(self, upload_id: str, meta: dict) -> None:
        self.upath(upload_id, "meta.json").setContent(json.dumps(meta).encode())

    def test_lateDigestIsFormat2(self) -> None:
        """
        An upload whose digest comes at the end (sha256 null) is format 2,
        which a server of format 1 cannot read; one with its digest is
        format 1, and so is the late-digest upload once completed.
        """
        declared = self.successResultOf(self.storage.create(request(b"abc")))
        self.assertEqual(self.meta(declared.info.upload_id)["format"], 1)
        late = self.successResultOf(self.storage.create(request(b"abc", sha256=None)))
        upload_id = late.info.upload_id
        self.assertEqual(self.meta(upload_id)["format"], 2)
        self.successResultOf(late.write(0, b"abc"))
        self.successResultOf(late.complete(hashlib.sha256(b"abc").digest()))
        meta = self.meta(upload_id)
        self.assertEqual((meta["format"], meta["state"]), (1, "complete"))

    def test_deferredSizeIsFormat4(self) -> None:
        """
        An upload whose size is not declared yet is format 4 (its size is
        only a bound, which a server of format 3 would take for the size);
        once declared, its record is the format it would have had, and the
        client index's entry names the declared size.
        """
        writer = self.successResultOf(self.storage.create(NewUpload(
            "d.tiff", 9000, None, client_id="alice", size_deferred=True)))
        upload_id = writer.info.upload_id
        meta = self.meta(upload_id)
        self.assertEqual((meta["format"], meta["size"], meta["size_deferred"]),
                         (4, 9000, True))
        self.successResultOf(writer.write(0, b"abc"))
        self.successResultOf(writer.declare_size(5))
        meta = self.meta(upload_id)
        self.assertEqual((meta["format"], meta["size"]), (2, 5))
        self.assertNotIn("size_deferred", meta)
        self.assertEqual(self.root.child("clients").child("c-alice").listdir(),
                         [f"{upload_id}.5"])

    def test_newerFormatRefused(self) -> None:
        """
        A record written by a newer imgresume (format 5) is refused by
        resume and status with a retryable error naming both formats, and
        left alone by garbage collection.
        """
        upload_id = self.partial(upto=3000)
        meta = self.meta(upload_id)
        meta["format"] = 5
        self.writeMeta(upload_id, meta)
        message = (f"upload {upload_id} was written by a newer imgresume (format 5); "
                   "this server understands format 4 and older")
        for d in (self.storage.resume(upload_id), self.storage.status(upload_id)):
            f = self.failureResultOf(d, NewerRecordFormat)
            self.assertIsInstance(f.value, StorageError)
            self.assertTrue(f.value.retryable)
            self.assertIn(message, f.value.message)
            self.assertEqual((f.value.found, f.value.understood), (5, 4))
        report = collect_garbage(self.root.path, older_than=0.0, now=time.time() + 10**9)
        self.assertEqual([(e.upload_id, e.action) for e in report.kept],
                         [(upload_id, "invalid")])
        self.assertTrue(self.upath(upload_id, "data").exists())
        meta["format"] = 3
        self.writeMeta(upload_id, meta)
        self.assertEqual(self.resumed(upload_id).offset, 3000)

    def test_newerFormatOfCompletedUpload(self) -> None:
        """A completed upload's newer record is refused too, not reported complete."""
        writer = self.successResultOf(self.storage.create(request(b"abc")))
        self.successResultOf(writer.write(0, b"abc"))
        completed = self.successResultOf(writer.complete())
        meta = self.meta(completed.upload_id)
        meta["format"] = 7
        self.writeMeta(completed.upload_id, meta)
        f = self.failureResultOf(self.storage.resume(completed.upload_id), NewerRecordFormat)
        self.assertIn("(format 7)", f.value.message)

    def test_format1RecordsRead(self) -> None:
        """
        Records as earlier releases wrote them (format 1: no published-file
        identity, and a null sha256 from the release that added the digest
        at the end) are resumed and completed.
        """
        for sha256 in (hashlib.sha256(PAYLOAD).hexdigest(), None):
            upload_id = self.partial(upto=3000)
            meta = self.meta(upload_id)
            self.writeMeta(upload_id, {
                "format": 1, "upload_id": upload_id, "name": "old.tiff",
                "size": len(PAYLOAD), "sha256": sha256, "metadata": {},
                "client_id": "", "created": meta["created"], "state": "partial",
            })
            writer = self.resumed(upload_id)
            self.assertEqual(writer.offset, 3000)
            self.assertEqual(writer.info.sha256, sha256 and bytes.fromhex(sha256))
            for pos in range(3000, len(PAYLOAD), 4000):
                self.successResultOf(writer.write(pos, PAYLOAD[pos : pos + 4000]))
            digest = None if sha256 else hashlib.sha256(PAYLOAD).digest()
            completed = self.successResultOf(writer.complete(digest))
            self.assertEqual(self.readCompleted(None, completed.path), PAYLOAD)
            self.assertEqual(self.meta(upload_id)["format"], 1)
            f = self.failureResultOf(self.storage.resume(upload_id), UploadAlreadyComplete)
            self.assertEqual(f.value.completed, completed)

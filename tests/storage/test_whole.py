# -*- test-case-name: tests.storage.test_whole -*-
"""
Tests for the filesystem backend's one-step store of a whole small file
(L{imgresume.storage.filesystem._whole}, L{FilesystemStorage.store_whole}):
its system calls and flushes, a crash at every step, grouped directory
flushes (L{imgresume.storage.filesystem._dirsync}), two servers given the
same request at once, and garbage collection of C{.put} files.  The
conformance cases are in C{tests/support/storage_conformance.py}.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import shutil
import stat
import tempfile
import threading
import time
from typing import Any, Callable

import attrs
from twisted.python.filepath import FilePath
from twisted.trial.unittest import TestCase

from imgresume.errors import DigestMismatch, StorageError, StorageFull, UploadBusy
from imgresume.names import new_upload_id
from imgresume.storage.filesystem import FilesystemStorage, _whole
from imgresume.storage.filesystem._dirsync import DirectorySync
from imgresume.storage.filesystem.gc import collect_garbage
from imgresume.storage.interfaces import CompletedFileMoved, CompletedUpload, WholeUpload
from tests.support.runners import sync_run
from tests.support.storage_conformance import PAYLOAD, request

#: The calls L{Recorder} sees: C{os} functions, C{fcntl.fcntl}, and the
#: indirections of C{_whole} (bound at import, so patched by name).
_OS_CALLS = ("open", "close", "fsync", "fdatasync", "pwrite", "pread", "preadv",
             "link", "unlink", "stat", "lstat", "fstat", "posix_fadvise",
             "ftruncate", "mkdir", "rename", "replace", "write", "read", "listdir")


class Killed(BaseException):
    """A simulated SIGKILL: raised at the chosen call and by every call after it."""


class Recorder:
    """
    Records (and may fail) the system calls made through C{os}, C{fcntl}
    and C{_whole}'s indirections while installed on a test: C{calls} lists
    C{(name, kind)} with C{kind} "dir" or "file" for flushes.
    """

    def __init__(self, case: TestCase) -> None:
        self.calls: list[tuple[str, str]] = []
        self.fail_at: int | None = None
        self.failure: Callable[[], BaseException] = lambda: OSError(errno.EIO, "injected")
        self.killed = False
        self.opened: set[int] = set()
        self.real: dict[str, Any] = {n: getattr(os, n) for n in _OS_CALLS}
        self.real_fcntl = fcntl.fcntl
        self.real_whole = (_whole._link, _whole._fdatasync)
        for name in _OS_CALLS:
            setattr(os, name, self._wrap(name, self.real[name]))
        fcntl.fcntl = self._wrap("fcntl", self.real_fcntl)
        _whole._link = self._wrap("link", self.real["link"])
        _whole._fdatasync = self._wrap("fdatasync", self.real["fdatasync"])
        case.addCleanup(self.uninstall)

    def uninstall(self) -> None:
        """Put the real calls back.  Idempotent."""
        for name in _OS_CALLS:
            setattr(os, name, self.real[name])
        fcntl.fcntl = self.real_fcntl
        _whole._link, _whole._fdatasync = self.real_whole

    def _wrap(self, name: str, real: Callable[..., Any]) -> Callable[..., Any]:
        def call(*args: Any, **kwargs: Any) -> Any:
            if self.killed:
                raise Killed()
            kind = ""
            if name in ("fsync", "fdatasync"):
                mode = self.real["fstat"](args[0]).st_mode
                kind = "dir" if stat.S_ISDIR(mode) else "file"
            if self.fail_at is not None and len(self.calls) == self.fail_at:
                self.calls.append((name, kind))
                error = self.failure()
                if isinstance(error, Killed):
                    self.killed = True
                elif name == "close":
                    # On Linux a close that fails has closed the descriptor.
                    real(*args, **kwargs)
                    self.opened.discard(args[0])
                raise error
            self.calls.append((name, kind))
            result = real(*args, **kwargs)
            if name == "open":
                self.opened.add(result)
            elif name == "close":
                self.opened.discard(args[0])
            return result
        return call

    def flushes(self) -> list[tuple[str, str]]:
        return [c for c in self.calls if c[0] in ("fsync", "fdatasync")]

    def reap(self) -> None:
        """What the kernel does for a killed process: close its files (and locks)."""
        for fd in self.opened:
            try:
                self.real["close"](fd)
            except OSError:
                pass
        self.opened.clear()


class WholeMixin:
    """A L{FilesystemStorage} in a fresh temporary root."""

    def setUp(self) -> None:
        d = tempfile.mkdtemp(prefix="imgresume-whole-")
        self.addCleanup(shutil.rmtree, d, True)
        self.root = FilePath(d).child("root")
        self.storage = FilesystemStorage(self.root, sync_run)

    def whole(self, data: bytes = PAYLOAD, name: str = "a.tiff", **kw: Any) -> WholeUpload:
        kw.setdefault("upload_id", new_upload_id())
        kw.setdefault("client_id", "client-1")
        return WholeUpload(name=name, data=data, sha256=hashlib.sha256(data).digest(), **kw)

    def completeFiles(self) -> dict[str, bytes]:
        """Every file under complete/, by path relative to the root."""
        found = {}
        base = self.root.child("complete").path
        for top, _, files in os.walk(base):
            for f in files:
                p = os.path.join(top, f)
                found["complete/" + os.path.relpath(p, base)] = open(p, "rb").read()
        return found

    def incoming(self) -> list[str]:
        try:
            return sorted(self.root.child("incoming").listdir())
        except OSError:
            return []

    def putPath(self, request: WholeUpload) -> str:
        key = _whole.put_key(request.client_id, request.upload_id)
        return self.root.descendant(["incoming", key + _whole.PUT_SUFFIX]).path


class BudgetTests(WholeMixin, TestCase):
    """What one store_whole costs in system calls and flushes."""

    def test_flushBudget(self) -> None:
        """
        One flush of the data file, one of C{incoming/}, one of the
        C{complete/} directory that receives the name: three in all, against
        16 for the same file through create, write and complete.
        """
        self.successResultOf(self.storage.store_whole(self.whole(name="warm.tiff")))
        rec = Recorder(self)
        done = self.successResultOf(self.storage.store_whole(self.whole()))
        self.assertEqual(done.path, "complete/a.tiff")
        self.assertEqual(rec.flushes(), [("fdatasync", "file"), ("fsync", "dir"),
                                         ("fsync", "dir")])
        del rec.calls[:]
        writer = self.successResultOf(self.storage.create(request(PAYLOAD, "b.tiff")))
        self.successResultOf(writer.write(0, PAYLOAD))
        self.successResultOf(writer.complete())
        self.assertGreaterEqual(len(rec.flushes()), 14)

    def test_callBudget(self) -> None:
        """
        One store_whole of a file at the top of C{complete/} makes at most
        22 system calls (the normal path: over 100 in the storage alone),
        none of them a C{mkdir} that fails, none a C{realpath} walk.
        """
        self.successResultOf(self.storage.store_whole(self.whole(name="warm.tiff")))
        rec = Recorder(self)
        self.successResultOf(self.storage.store_whole(self.whole()))
        one_step = list(rec.calls)
        del rec.calls[:]
        writer = self.successResultOf(self.storage.create(request(PAYLOAD, "b.tiff")))
        self.successResultOf(writer.write(0, PAYLOAD))
        self.successResultOf(writer.complete())
        normal = list(rec.calls)
        self.assertLessEqual(len(one_step), 22, one_step)
        self.assertNotIn("mkdir", [c[0] for c in one_step])
        self.assertNotIn("lstat", [c[0] for c in one_step])
        self.assertGreater(len(normal), 4 * len(one_step), normal)


class CrashTests(WholeMixin, TestCase):
    """
    A failure or a kill at every system call of store_whole leaves either
    the published, verified file or only a C{.put} file that garbage
    collection removes; the request repeated then publishes exactly one file.
    """

    def prepare(self) -> FilesystemStorage:
        """A fresh root, used once (so its directories exist), left empty."""
        d = tempfile.mkdtemp(prefix="imgresume-crash-")
        self.addCleanup(shutil.rmtree, d, True)
        self.root = FilePath(d).child("root")
        storage = FilesystemStorage(self.root, sync_run)
        self.successResultOf(storage.store_whole(self.whole(name="warm.tiff")))
        self.root.child("complete").child("warm.tiff").remove()
        for entry in self.incoming():
            self.root.child("incoming").child(entry).remove()
        return storage

    def steps(self) -> int:
        """How many calls one store_whole makes (on a prepared root)."""
        storage = self.prepare()
        rec = Recorder(self)
        self.successResultOf(storage.store_whole(self.whole(PAYLOAD, "d/a.tiff")))
        rec.uninstall()
        return len(rec.calls)

    def crashAt(self, i: int, failure: Callable[[], BaseException]) -> None:
        """Store in a fresh root with call C{i} failing; then check and repeat."""
        storage = self.prepare()
        req = self.whole(PAYLOAD, "d/a.tiff")
        rec = Recorder(self)
        rec.fail_at, rec.failure = i, failure
        try:
            storage.store_whole(req).addErrback(lambda f: None)
        except Killed:
            pass
        if rec.killed:
            rec.reap()
        else:
            leaked = set(rec.opened)
            rec.reap()
            self.assertEqual(leaked, set(), f"descriptors left open after call {i} failed")
        rec.uninstall()
        step = rec.calls[i] if i < len(rec.calls) else ("none", "")
        what = f"{failure().__class__.__name__} at call {i} {step}"
        put = os.path.basename(self.putPath(req))
        done_mark = put.removesuffix(".put") + ".done"
        published = self.completeFiles()
        leftovers = self.incoming()
        if published:
            # Published means verified: the bytes, at one name; the .put
            # marked published unless the crash came just before the mark.
            self.assertEqual(list(published.values()), [PAYLOAD], what)
            self.assertIn(leftovers, ([put], [done_mark, put]), what)
        else:
            # Nothing published: at most the .put, which gc removes.
            self.assertIn(leftovers, ([], [put]), what)
            if leftovers:
                # Half the time the repeat finds the .put (and redoes it).
                report = collect_garbage(self.root.path, 3600, now=time.time() + 7200,
                                         dry_run=bool(i % 2))
                self.assertEqual([e.name for e in report.removed],
                                 ["incoming/" + put], what)
        later = FilesystemStorage(self.root, sync_run)
        later.whole.now = lambda: time.time() + 60  # past FRESH: redone, not "retry"
        done = self.successResultOf(later.store_whole(req))
        self.assertEqual(self.completeFiles(), {done.path: PAYLOAD}, what)
        self.assertEqual(self.incoming(), [done_mark, put], what)

    def test_failureAtEveryStep(self) -> None:
        """An OSError at each call: clean-up runs; state and repeat as promised."""
        for i in range(self.steps()):
            self.crashAt(i, lambda: OSError(errno.EIO, "injected"))

    def test_killAtEveryStep(self) -> None:
        """A kill at each call (nothing runs after it, the files close): the same."""
        for i in range(self.steps()):
            self.crashAt(i, Killed)

    def test_retryAfterEndOfWindow(self) -> None:
        """
        The retry hint of a repeat that finds a C{.put} cut short moments
        ago is the rest of the FRESH window (and a margin): the first repeat
        after it is answered for certain.  Never less than the busy hint.
        """
        req = self.whole()
        put = self.putPath(req)
        os.makedirs(os.path.dirname(put))
        with open(put, "wb") as f:
            f.write(b"half")
        written = os.stat(put).st_mtime
        self.storage.whole.now = lambda: written + 3
        first = self.failureResultOf(self.storage.store_whole(req), StorageError).value
        self.assertAlmostEqual(first.retry_after, _whole.FRESH - 3 + _whole.FRESH_MARGIN,
                               delta=0.2)
        self.assertIn("retry in 8 s", first.message)
        self.storage.whole.now = lambda: written + _whole.FRESH - 0.1
        f = self.failureResultOf(self.storage.store_whole(req), StorageError)
        self.assertEqual(f.value.retry_after, 1.0)
        self.storage.whole.now = lambda: written + 3 + first.retry_after
        done = self.successResultOf(self.storage.store_whole(req))
        self.assertEqual(self.completeFiles(), {done.path: PAYLOAD})

    def test_unpublishedPutRedone(self) -> None:
        """
        A C{.put} a killed server left before publication: a repeat moments
        later is told to retry (what it sees may be a stale view of a
        publication); once the file is older than FRESH, a repeat stores
        it again in a new file, never rewriting the old one in place.
        """
        req = self.whole()
        put = self.putPath(req)
        os.makedirs(os.path.dirname(put))
        with open(put, "wb") as f:
            f.write(b"half")
        old = os.open(put, os.O_RDONLY)
        self.addCleanup(os.close, old)
        f = self.failureResultOf(self.storage.store_whole(req), StorageError)
        self.assertTrue(f.value.retryable)
        self.assertIn("moments ago", f.value.message)
        self.assertEqual(self.completeFiles(), {})
        self.storage.whole.now = lambda: time.time() + 60
        done = self.successResultOf(self.storage.store_whole(req))
        self.assertEqual(self.completeFiles(), {done.path: PAYLOAD})
        self.assertEqual(os.stat(put).st_nlink, 3)  # .put, .done, published
        # The old file was let go, not rewritten.
        self.assertEqual(os.fstat(old).st_nlink, 0)
        self.assertEqual(os.pread(old, 100, 0), b"half")

    def test_repeatAfterPublishedRemoved(self) -> None:
        """
        A consumer removes the published file (it copied it elsewhere): the
        C{.put} keeps its C{.done} name, so a repeat is told the file was
        published and moved (L{CompletedFileMoved}), not stored again.
        """
        req = self.whole()
        done = self.successResultOf(self.storage.store_whole(req))
        os.unlink(os.path.join(self.root.path, done.path))
        self.assertEqual(os.stat(self.putPath(req)).st_nlink, 2)
        self.storage.whole.now = lambda: time.time() + 60  # past FRESH
        self.failureResultOf(self.storage.store_whole(req), CompletedFileMoved)
        self.assertEqual(self.completeFiles(), {})

    def test_staleLinkCount(self) -> None:
        """
        A mount whose cached attributes still show the published C{.put}
        with one link (GlusterFS, moments after another host's link) finds
        the published name anyway: the same bytes get the same answer, other
        bytes DigestMismatch, and the published file is never rewritten.
        """
        req = self.whole()
        done = self.successResultOf(self.storage.store_whole(req))
        put = os.stat(self.putPath(req))
        real = os.fstat

        def stale(fd):
            st = real(fd)
            if (st.st_dev, st.st_ino) == (put.st_dev, put.st_ino):
                fields = list(st[:10])
                fields[stat.ST_NLINK] = 1
                return os.stat_result(fields)
            return st

        self.patch(os, "fstat", stale)
        self.assertEqual(self.successResultOf(self.storage.store_whole(req)), done)
        other = WholeUpload(req.upload_id, req.name, b"other",
                            hashlib.sha256(b"other").digest(), client_id=req.client_id)
        f = self.failureResultOf(self.storage.store_whole(other), StorageError)
        self.assertIn("moments ago", f.value.message)
        self.storage.whole.now = lambda: time.time() + 60
        self.failureResultOf(self.storage.store_whole(other), DigestMismatch)
        self.patch(os, "fstat", real)
        self.assertEqual(self.completeFiles(), {done.path: PAYLOAD})

    def test_staleSizeAndLinks(self) -> None:
        """
        A view of the published C{.put} as it was when created (one link,
        no bytes; GlusterFS for about a second): "retry", never a second
        publication, never DigestMismatch.
        """
        req = self.whole()
        done = self.successResultOf(self.storage.store_whole(req))
        put = os.stat(self.putPath(req))
        real_fstat, real_pread = os.fstat, os.pread

        def stale(fd):
            st = real_fstat(fd)
            if (st.st_dev, st.st_ino) == (put.st_dev, put.st_ino):
                fields = list(st[:10])
                fields[stat.ST_NLINK], fields[stat.ST_SIZE] = 1, 0
                return os.stat_result(fields)
            return st

        self.patch(os, "fstat", stale)
        self.patch(os, "pread", lambda fd, n, offset: b"")
        f = self.failureResultOf(self.storage.store_whole(req), StorageError)
        self.assertTrue(f.value.retryable)
        self.patch(os, "fstat", real_fstat)
        self.patch(os, "pread", real_pread)
        self.assertEqual(self.completeFiles(), {done.path: PAYLOAD})
        self.assertEqual(self.successResultOf(self.storage.store_whole(req)), done)

    def test_diskFull(self) -> None:
        """ENOSPC while writing: StorageFull, nothing published, no file left."""
        real = os.pwrite

        def full(fd, data, offset):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        self.patch(os, "pwrite", full)
        self.failureResultOf(self.storage.store_whole(self.whole()), StorageFull)
        self.patch(os, "pwrite", real)
        self.assertEqual(self.completeFiles(), {})
        self.assertEqual(self.incoming(), [])

    def test_storedBytesDiffer(self) -> None:
        """
        Bytes read back that are not those written (a failing disk): a
        retryable StorageError, not DigestMismatch; nothing published.
        """
        real = os.pread

        def damaged(fd, n, offset):
            data = bytearray(real(fd, n, offset))
            data[0] ^= 0xFF
            return bytes(data)

        self.patch(os, "pread", damaged)
        f = self.failureResultOf(self.storage.store_whole(self.whole()), StorageError)
        self.assertTrue(f.value.retryable)
        self.assertEqual(self.completeFiles(), {})
        self.assertEqual(self.incoming(), [])

    def test_verifyReceived(self) -> None:
        """
        With C{verify="received"} the digest is taken of the bytes received,
        in memory: nothing is read back (no C{pread}, no cache dropped), the
        flushes are the same three, and a request whose bytes do not match
        its digest is refused with DigestMismatch, nothing published.
        """
        storage = FilesystemStorage(self.root, sync_run, verify="received")
        self.successResultOf(storage.store_whole(self.whole(name="warm.tiff")))
        rec = Recorder(self)
        done = self.successResultOf(storage.store_whole(self.whole()))
        self.assertEqual(self.completeFiles()[done.path], PAYLOAD)
        called = [c[0] for c in rec.calls]
        self.assertNotIn("pread", called)
        self.assertNotIn("posix_fadvise", called)
        self.assertEqual(rec.flushes(), [("fdatasync", "file"), ("fsync", "dir"),
                                         ("fsync", "dir")])
        bad = attrs.evolve(self.whole(name="bad.tiff"), sha256=b"\0" * 32)
        self.failureResultOf(storage.store_whole(bad), DigestMismatch)
        self.assertNotIn("complete/bad.tiff", self.completeFiles())

    def test_publishedFileMovedAway(self) -> None:
        """
        A repeat whose published file a consumer moved away (on the same
        filesystem, so the inode lives on): CompletedFileMoved, nothing
        published again.
        """
        req = self.whole()
        done = self.successResultOf(self.storage.store_whole(req))
        self.root.preauthChild(done.path).moveTo(self.root.child("taken.tiff"))
        f = self.failureResultOf(self.storage.store_whole(req), StorageError)
        self.assertIn("moments ago", f.value.message)  # perhaps a stale view
        self.storage.whole.now = lambda: time.time() + 60
        f = self.failureResultOf(self.storage.store_whole(req), CompletedFileMoved)
        self.assertEqual(f.value.completed.upload_id, req.upload_id)
        self.assertEqual(self.completeFiles(), {})


class TwoServerTests(WholeMixin, TestCase):
    """Two servers (two L{FilesystemStorage} on one root) given one request."""

    def test_busyWhileHeld(self) -> None:
        """While another server holds the request's file: UploadBusy with retry_after."""
        req = self.whole()
        put = self.putPath(req)
        os.makedirs(os.path.dirname(put))
        fd = os.open(put, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
        self.addCleanup(os.close, fd)
        from imgresume.storage.filesystem._locks import try_lock
        self.assertTrue(try_lock(fd))
        other = FilesystemStorage(self.root, sync_run, busy_retry_after=2.5)
        f = self.failureResultOf(other.store_whole(req), UploadBusy)
        self.assertEqual(f.value.retry_after, 2.5)
        self.assertEqual(self.completeFiles(), {})

    def test_sameRequestAtOnce(self) -> None:
        """
        Threads of two instances storing one request at once: every answer
        is the one publication or UploadBusy, and one file is stored.
        """
        for round in range(10):
            req = self.whole(name=f"r{round}.tiff")
            servers = [FilesystemStorage(self.root, sync_run) for _ in range(2)]
            results: list[Any] = []
            barrier = threading.Barrier(4)

            def go(server):
                barrier.wait()
                try:
                    results.append(server.whole.store(req))
                except (UploadBusy, StorageError) as e:
                    # Busy; or, if one opened the file between another's
                    # create and lock, "retry" until the file is not fresh.
                    self.assertTrue(e.retryable, e)
                    results.append(e)

            threads = [threading.Thread(target=go, args=(servers[i % 2],))
                       for i in range(4)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            done = [r for r in results if isinstance(r, CompletedUpload)]
            servers[0].whole.now = lambda: time.time() + 60
            again = self.successResultOf(servers[0].store_whole(req))
            self.assertEqual({r.path for r in done + [again]}, {f"complete/r{round}.tiff"})
        self.assertEqual(len(self.completeFiles()), 10)


class DirectorySyncTests(TestCase):
    """L{DirectorySync}: flushes shared, and each caller covered by one that started after it."""

    def test_grouped(self) -> None:
        """
        N threads that changed one directory together cause fewer than N
        flushes, and each returns only after a flush that started after its
        change.
        """
        clock = [0]
        mutex = threading.Lock()
        flushes: list[tuple[int, int]] = []

        def tick() -> int:
            with mutex:
                clock[0] += 1
                return clock[0]

        def fsync(fd):
            start = tick()
            time.sleep(0.02)
            flushes.append((start, tick()))

        sync = DirectorySync(fsync)
        fd = os.open(tempfile.gettempdir(), os.O_RDONLY)
        self.addCleanup(os.close, fd)
        seen: list[tuple[int, int]] = []
        n = 12
        barrier = threading.Barrier(n)

        def caller():
            barrier.wait()
            changed = tick()
            sync.sync((1, 1), fd)
            seen.append((changed, tick()))

        threads = [threading.Thread(target=caller) for _ in range(n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        self.assertEqual(len(seen), n)
        self.assertLess(len(flushes), n)
        for changed, returned in seen:
            self.assertTrue(
                any(changed < start and end < returned for start, end in flushes),
                (changed, returned, flushes))
        self.assertEqual(sync._dirs, {})

    def test_failureReported(self) -> None:
        """A failed flush fails its callers (and is not retried for them)."""
        calls = []

        def fsync(fd):
            calls.append(fd)
            raise OSError(errno.EIO, "injected")

        sync = DirectorySync(fsync)
        self.assertRaises(OSError, sync.sync, (1, 2), 7)
        self.assertEqual(calls, [7])

    def test_einvalTolerated(self) -> None:
        """A filesystem that cannot flush directories (EINVAL) is not an error."""
        def fsync(fd):
            raise OSError(errno.EINVAL, "no")

        DirectorySync(fsync).sync((1, 3), 7)

    def test_storesGroupFlushes(self) -> None:
        """
        Through store_whole: N threads storing files into one directory
        flush C{complete/} fewer than N times.
        """
        d = tempfile.mkdtemp(prefix="imgresume-whole-")
        self.addCleanup(shutil.rmtree, d, True)
        storage = FilesystemStorage(os.path.join(d, "root"), sync_run)
        self.successResultOf(storage.store_whole(WholeUpload(
            new_upload_id(), "warm", b"", hashlib.sha256(b"").digest())))
        complete = os.stat(os.path.join(d, "root", "complete")).st_ino
        flushed = []

        def fsync(fd):
            if os.fstat(fd).st_ino == complete:
                flushed.append(fd)
            time.sleep(0.02)
            os.fsync(fd)

        storage.whole.dirsync.fsync = fsync
        n = 10
        barrier = threading.Barrier(n)

        def go(i):
            data = b"%d" % i
            barrier.wait()
            storage.whole.store(WholeUpload(new_upload_id(), f"f{i}", data,
                                            hashlib.sha256(data).digest()))

        threads = [threading.Thread(target=go, args=(i,)) for i in range(n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        self.assertEqual(len(os.listdir(os.path.join(d, "root", "complete"))), n + 1)
        self.assertLess(len(flushed), n)


class GarbageTests(WholeMixin, TestCase):
    """Garbage collection of C{.put} files."""

    def put(self, published: bool, age: float) -> tuple[WholeUpload, str]:
        req = self.whole(name=f"{new_upload_id()}.tiff")
        if published:
            self.successResultOf(self.storage.store_whole(req))
        put = self.putPath(req)
        if not published:
            os.makedirs(os.path.dirname(put), exist_ok=True)
            with open(put, "wb") as f:
                f.write(b"half")
        then = time.time() - age
        os.utime(put, (then, then))
        return req, put

    def test_collected(self) -> None:
        """
        Unpublished C{.put} files go after C{older_than}, published ones
        after the records' retention; fresh and locked ones stay; the
        published files in C{complete/} always stay.
        """
        _, abandoned = self.put(False, 7200)
        _, fresh = self.put(False, 60)
        _, locked = self.put(False, 7200)
        _, old_record = self.put(True, 40 * 86400)
        _, recent_record = self.put(True, 7200)
        fd = os.open(locked, os.O_RDWR)
        self.addCleanup(os.close, fd)
        from imgresume.storage.filesystem._locks import try_lock
        self.assertTrue(try_lock(fd))
        dry = collect_garbage(self.root.path, 3600, dry_run=True)
        report = collect_garbage(self.root.path, 3600)
        self.assertEqual(
            sorted(e.name for e in dry.removed), sorted(e.name for e in report.removed))
        removed = {e.name: e for e in report.removed}
        old_mark = old_record.removesuffix(".put") + ".done"
        self.assertEqual(set(removed), {
            "incoming/" + os.path.basename(abandoned),
            "incoming/" + os.path.basename(old_record),
            "incoming/" + os.path.basename(old_mark)})
        self.assertEqual(removed["incoming/" + os.path.basename(abandoned)].size, 4)
        self.assertEqual(removed["incoming/" + os.path.basename(old_record)].size, 0)
        self.assertEqual([e.name for e in report.skipped_busy],
                         ["incoming/" + os.path.basename(locked)])
        for path in (fresh, locked, recent_record):
            self.assertTrue(os.path.exists(path), path)
        for path in (abandoned, old_record, old_mark):
            self.assertFalse(os.path.exists(path), path)
        self.assertEqual(len(self.completeFiles()), 2)

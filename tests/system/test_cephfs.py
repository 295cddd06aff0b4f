# -*- test-case-name: tests.system.test_cephfs -*-
"""
imgresume on CephFS: one filesystem of a one-node Ceph cluster mounted twice
with C{ceph-fuse} (C{bash .ci/ceph.sh up}), one mount per server, as if each
server ran on its own host.  Each mount is its own client session of the MDS
with its own caches (the ceph client's and the kernel's FUSE page cache),
left at their defaults.

The same three layers as C{tests/system/test_gluster.py}:

  - L{CephFSFactsTests}: the properties of the filesystem the design relies
    on (docs/sharedfs.md), checked through the two mounts, plus a record of
    how soon each mount sees the other's writes;
  - L{CephFSStorageHandoverTests}: L{FilesystemStorage} on each mount
    handing one upload to the other with no pause;
  - L{ClusterOnCephFSTests}: real C{twistd} servers, each on its own mount,
    behind the real balancer, SIGKILLed mid-upload.

Measurements are logged and printed on stderr as C{[sharedfs] cephfs: ...}
lines; C{pytest -s} or C{-rP} shows them.

Without the mounts every test skips with a loud reason; with
C{IMGRESUME_REQUIRE_CEPH=1} they fail instead.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import random
import signal
import threading
import time

from twisted.internet import defer, reactor
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from imgresume.testing import LocalCluster
from imgresume.client import Progress, Uploader
from imgresume.errors import UploadBusy
from imgresume.storage.filesystem import FilesystemStorage, _try_lock
from imgresume.storage.interfaces import NewUpload
from tests.support.sharedfs import require_cephfs_mounts
from tests.system.test_gluster import (
    FLOCK,
    ask,
    converged_sha256,
    lock_prober,
    ofd_lock,
    report,
    sha256_file,
    stop,
    sync_run,
)

#: How long a mount may take to show another mount's change before a test
#: calls it a failure (CephFS revokes capabilities within milliseconds).
CONVERGE = 10.0
#: How long a view that is only recorded (not relied on) is watched.
WATCH = 1.0


def stale_for(fresh, limit: float = WATCH) -> float | None:
    """
    Poll C{fresh()} until it returns true.

    @return: the seconds it took, or None if it was still false after
        C{limit} seconds.
    """
    start = time.monotonic()
    while True:
        if fresh():
            return time.monotonic() - start
        if time.monotonic() - start > limit:
            return None
        time.sleep(0.002)


def describe(times: list[float | None]) -> str:
    """'0.001..0.004 s' or 'stale after 1.0 s in 3 of 3' for L{stale_for} results."""
    seen = [t for t in times if t is not None]
    never = len(times) - len(seen)
    parts = []
    if seen:
        parts.append(f"fresh after {min(seen):.3f}..{max(seen):.3f} s")
    if never:
        parts.append(f"STILL STALE after {WATCH} s in {never} of {len(times)}")
    return ", ".join(parts)


class CephFSFactsTests(TestCase):
    """
    What docs/sharedfs.md says the design assumes of a shared filesystem,
    checked on CephFS through two C{ceph-fuse} mounts.
    """

    def setUp(self) -> None:
        self.dirs = require_cephfs_mounts(self, 2)

    def paths(self, name: str) -> list[str]:
        """C{name} in the test directory, as seen through each mount."""
        return [os.path.join(d, name) for d in self.dirs]

    def test_exclusive_create_across_mounts(self) -> None:
        """
        O_CREAT|O_EXCL and mkdir are exclusive across mounts, even when the
        losing mount has just looked the name up and cached its absence, and
        when both mounts race for the same name.
        """
        for i in range(10):
            a, b = self.paths(f"f{i}")[i % 2], self.paths(f"f{i}")[(i + 1) % 2]
            self.assertFalse(os.path.exists(b))  # b caches "no such file"
            os.close(os.open(a, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644))
            with self.assertRaises(FileExistsError):
                os.open(b, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
            da, db = self.paths(f"d{i}")[i % 2], self.paths(f"d{i}")[(i + 1) % 2]
            self.assertFalse(os.path.exists(db))
            os.mkdir(da)
            with self.assertRaises(FileExistsError):
                os.mkdir(db)
        for i in range(10):
            barrier = threading.Barrier(2)
            won: list[str] = []

            def create(path: str, barrier=barrier, won=won) -> None:
                barrier.wait()
                try:
                    os.close(os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644))
                except FileExistsError:
                    return
                won.append(path)

            threads = [threading.Thread(target=create, args=(p,))
                       for p in self.paths(f"race{i}")]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            self.assertEqual(len(won), 1, won)

    def test_link_never_replaces(self) -> None:
        """
        link() through one mount fails with EEXIST on a name made through
        the other (completion relies on it never clobbering a file), and
        the new name is the same file through both mounts.
        """
        a1, a2 = self.paths("a")
        x1, x2 = self.paths("x")
        n1, n2 = self.paths("n")
        for path, data in ((a1, b"A" * 1000), (x1, b"X" * 10)):
            with open(path, "wb") as f:
                f.write(data)
                os.fsync(f.fileno())
        with self.assertRaises(FileExistsError):
            os.link(a2, x2)
        os.link(a2, n2)
        with open(x2, "rb") as f:
            self.assertEqual(f.read(), b"X" * 10)
        expected = hashlib.sha256(b"A" * 1000).hexdigest()
        self.assertEqual(converged_sha256(n1, expected)[0], expected)
        self.assertEqual(os.stat(n1).st_ino, os.stat(a2).st_ino)

    def test_rename_is_atomic(self) -> None:
        """
        A reader on mount 2 of a file that mount 1 keeps replacing by rename
        (as meta.json is) always reads one whole version, never a mix, a
        partial file or ENOENT.  Recorded: how many renames and reads were
        made and the slowest of each (with the MDS's early replies on, Ceph's
        default, both mounts stall for up to the MDS's 5 s tick every few
        renames; docs/sharedfs.md), how many distinct versions mount 2 saw
        (on a coherent filesystem, nearly all) and any read errors.  It runs
        for 2 s, longer (up to 15 s) until 10 renames were made.
        """
        target1, target2 = self.paths("meta.json")

        def version(i: int) -> bytes:
            return (b"%08d" % i) * 512

        with open(target1, "wb") as f:
            f.write(version(0))
        stop_writer = threading.Event()
        written = [0]
        slowest = {"rename": 0.0, "read": 0.0}

        def writer() -> None:
            i = 1
            while not stop_writer.is_set():
                start = time.monotonic()
                tmp = os.path.join(self.dirs[0], f".meta.json.{i}.tmp")
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
                os.write(fd, version(i))
                os.fsync(fd)
                os.close(fd)
                os.replace(tmp, target1)
                slowest["rename"] = max(slowest["rename"], time.monotonic() - start)
                written[0] = i
                i += 1

        thread = threading.Thread(target=writer)
        thread.start()
        reads = torn = 0
        errors: dict[str, int] = {}
        seen: set[bytes] = set()
        started = time.monotonic()
        try:
            while time.monotonic() - started < 2.0 or (
                written[0] < 10 and time.monotonic() - started < 15.0
            ):
                start = time.monotonic()
                try:
                    with open(target2, "rb") as f:
                        data = f.read()
                    slowest["read"] = max(slowest["read"], time.monotonic() - start)
                except OSError as e:
                    name = errno.errorcode.get(e.errno, str(e.errno))
                    errors[name] = errors.get(name, 0) + 1
                    continue
                reads += 1
                if data != data[:8] * 512 or len(data) != 4096:
                    torn += 1
                else:
                    seen.add(data[:8])
        finally:
            stop_writer.set()
            thread.join()
        report("cephfs: rename: {renames} renames through mount 1 in {secs:.1f} s (slowest "
               "create+write+fsync+rename {rename:.3f} s); mount 2 read {reads} times (slowest "
               "open+read {read:.3f} s), saw {versions} distinct versions, errors {errors}",
               renames=written[0], secs=time.monotonic() - started, reads=reads,
               versions=len(seen), errors=errors, **slowest)
        self.assertEqual(torn, 0)
        self.assertNotIn("ENOENT", errors)
        self.assertGreater(reads, 0)
        self.assertGreaterEqual(written[0], 3)

    def test_ofd_lock_seen_across_mounts_and_processes(self) -> None:
        """
        An OFD lock taken through mount 1 (as C{_try_lock} takes it) is busy
        through mount 2, through another open of mount 1, and for another
        process; it is free again through mount 2 once the holder unlocks,
        once it only closes its fd, and once a holding process is SIGKILLed.
        """
        p1, p2 = self.paths("lock")
        os.close(os.open(p1, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644))
        fd1 = os.open(p1, os.O_RDWR)
        self.assertTrue(ofd_lock(fd1))
        again = os.open(p1, os.O_RDWR)  # another open through the same mount
        self.assertFalse(_try_lock(again))
        os.close(again)  # closing it keeps fd1's lock
        fd2 = os.open(p2, os.O_RDWR)
        self.addCleanup(os.close, fd2)
        other2 = os.open(p2, os.O_RDWR)
        self.addCleanup(os.close, other2)
        self.assertFalse(ofd_lock(fd2))
        other = lock_prober(p2)
        self.addCleanup(stop, other)
        self.assertEqual(ask(other), "busy")
        # Explicit unlock (as release() does).
        fcntl.fcntl(fd1, fcntl.F_OFD_SETLK, FLOCK.pack(fcntl.F_UNLCK, os.SEEK_SET, 0, 0, 0))
        unlocked = time.monotonic()
        while not ofd_lock(fd2):
            self.assertLess(time.monotonic() - unlocked, CONVERGE, "lock not released")
            time.sleep(0.001)
        after_unlock = time.monotonic() - unlocked
        self.assertEqual(ask(other), "busy")
        self.assertFalse(ofd_lock(other2))
        os.close(os.dup(fd2))  # closing a dup keeps an OFD lock
        self.assertFalse(ofd_lock(other2))
        # Close without unlocking: the lock goes with the last fd.
        fcntl.fcntl(fd2, fcntl.F_OFD_SETLK, FLOCK.pack(fcntl.F_UNLCK, os.SEEK_SET, 0, 0, 0))
        self.assertTrue(ofd_lock(fd1))
        os.close(fd1)
        closed = time.monotonic()
        while not ofd_lock(fd2):
            self.assertLess(time.monotonic() - closed, CONVERGE, "lock kept after close")
            time.sleep(0.001)
        after_close = time.monotonic() - closed
        fcntl.fcntl(fd2, fcntl.F_OFD_SETLK, FLOCK.pack(fcntl.F_UNLCK, os.SEEK_SET, 0, 0, 0))
        # Another process on mount 1 holds it and is SIGKILLed.
        holder = lock_prober(p1)
        self.addCleanup(stop, holder)
        self.assertEqual(ask(holder), "locked")
        self.assertFalse(ofd_lock(other2))
        holder.send_signal(signal.SIGKILL)
        holder.wait()
        killed = time.monotonic()
        while not ofd_lock(other2):
            self.assertLess(time.monotonic() - killed, CONVERGE, "lock of a killed process kept")
            time.sleep(0.001)
        after_kill = time.monotonic() - killed
        self.assertEqual(ask(other), "busy")
        report("cephfs: locks: free through mount 2 {unlock:.4f} s after an explicit unlock "
               "through mount 1, {close:.4f} s after a close, {kill:.4f} s after the holding "
               "process was SIGKILLed", unlock=after_unlock, close=after_close, kill=after_kill)

    def test_writes_seen_through_the_other_mount(self) -> None:
        """
        Record how soon mount 2 sees bytes written through mount 1:

          - handover: mount 2 read the file and closed it; mount 1 opens,
            writes, fsyncs and closes; mount 2 opens it again;
          - concurrent: both mounts keep the file open (as a writer and a
            server looking at the upload do); mount 1 writes past the end
            (as uploads grow), with and without fsync, or overwrites bytes
            in place, leaving the size as it was.

        Not asserted, except what the offset proof relies on: sizes
        (stat, fstat) and a read after POSIX_FADV_DONTNEED are fresh within
        L{CONVERGE}.  ceph-fuse keeps the kernel's page cache across opens
        (FOPEN_KEEP_CACHE) and drops it when the MDS revokes the client's
        cache capability; a reader that filled its page cache while the
        file was open elsewhere for writing had no such capability, and its
        plain reads may stay stale.
        """
        p1, p2 = self.paths("grow")
        with open(p1, "wb") as f:
            f.write(b"\0" * 65536)
            os.fsync(f.fileno())
        rounds = 3
        handover: list[float | None] = []
        for r in range(rounds):
            with open(p2, "rb") as f:
                f.read()
            data = os.urandom(4096)
            fd = os.open(p1, os.O_RDWR)
            os.pwrite(fd, data, 4096 * r)
            os.fsync(fd)
            os.close(fd)

            def reopened(offset: int = 4096 * r, data: bytes = data) -> bool:
                with open(p2, "rb") as f:
                    f.seek(offset)
                    return f.read(len(data)) == data

            handover.append(stale_for(reopened))
        report("cephfs: handover (mount 1 wrote+fsynced+closed, mount 2 reopened): {v}",
               v=describe(handover))

        for fsync, grow in ((True, True), (False, True), (True, False)):
            # (Sizes are only watched when they change.)
            views: dict[str, list[float | None]] = {
                **({"stat": [], "fstat": []} if grow else {}),
                "read on the open fd": [], "read on a new open": [], "read after DONTNEED": [],
            }
            writer = os.open(p1, os.O_RDWR)
            reader = os.open(p2, os.O_RDONLY)
            try:
                for r in range(rounds):
                    size = os.fstat(reader).st_size
                    os.pread(reader, size, 0)  # mount 2 has it all in its page cache
                    data = os.urandom(4096 if not grow else 65536)
                    # Overwrite the last page, and grow by 60 KiB, or not.
                    at = size - 4096
                    os.pwrite(writer, data, at)
                    if fsync:
                        os.fsync(writer)
                    new = at + len(data)

                    def read_new_open(data: bytes = data, at: int = at) -> bool:
                        fd = os.open(p2, os.O_RDONLY)
                        try:
                            return os.pread(fd, len(data), at) == data
                        finally:
                            os.close(fd)

                    def read_after_dontneed(data: bytes = data, at: int = at,
                                            reader: int = reader) -> bool:
                        os.posix_fadvise(reader, 0, 0, os.POSIX_FADV_DONTNEED)
                        return os.pread(reader, len(data), at) == data

                    # Order matters: the DONTNEED read refreshes the others.
                    if grow:
                        views["stat"].append(
                            stale_for(lambda n=new: os.stat(p2).st_size == n))
                        views["fstat"].append(
                            stale_for(lambda n=new, r=reader: os.fstat(r).st_size == n))
                    views["read on the open fd"].append(stale_for(
                        lambda d=data, a=at, r=reader: os.pread(r, len(d), a) == d))
                    views["read on a new open"].append(stale_for(read_new_open))
                    views["read after DONTNEED"].append(
                        stale_for(read_after_dontneed, CONVERGE))
            finally:
                os.close(writer)
                os.close(reader)
            for what, times in views.items():
                report("cephfs: concurrent, {how}{sync} through mount 1: {what} through "
                       "mount 2: {v}", how="append" if grow else "overwrite in place",
                       sync="+fsync" if fsync else " (no fsync)", what=what,
                       v=describe(times))
            for what in ("stat", "fstat") if grow else ():
                self.assertEqual(views[what].count(None), 0, f"{what} through mount 2 stale")
            self.assertEqual(views["read after DONTNEED"].count(None), 0,
                             "a read after POSIX_FADV_DONTNEED stayed stale")

    def test_dropping_the_page_cache_reads_a_shorter_file_fresh(self) -> None:
        """
        The offset proof reads the last journaled range back after
        POSIX_FADV_DONTNEED.  A mount that caches a longer, older version
        of a file (the other mount has truncated and rewritten it) must then
        read what the OSDs hold, not its cache.
        """
        p1, p2 = self.paths("shrunk")
        for size in (4096, 65536, 1 << 20):
            old = b"A" * size
            with open(p2, "wb") as f:  # mount 2 writes and caches it
                f.write(old)
                os.fsync(f.fileno())
            with open(p2, "rb") as f:
                self.assertEqual(f.read(), old)
            fd = os.open(p1, os.O_RDWR)  # mount 1 cuts it and rewrites the end
            os.ftruncate(fd, size // 4)
            os.pwrite(fd, b"B" * (size // 8), size // 4)
            os.fsync(fd)
            os.close(fd)
            fd = os.open(p2, os.O_RDONLY)
            try:
                plain = os.pread(fd, size, 0)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                fresh = os.pread(fd, size, 0)
            finally:
                os.close(fd)
            report("cephfs: {size} bytes cut to {cut} through mount 1: mount 2 read {plain} "
                   "bytes ({stale}), {fresh} bytes after DONTNEED",
                   size=size, cut=size // 4 + size // 8, plain=len(plain),
                   stale="stale" if plain == old else "fresh", fresh=len(fresh))
            self.assertEqual(fresh, b"A" * (size // 4) + b"B" * (size // 8))


class CephFSStorageHandoverTests(TestCase):
    """
    One upload handed between L{FilesystemStorage} instances on the two
    mounts with no pause between release and resume: a resume proves at
    most what was written (on CephFS, normally exactly that).
    """

    def setUp(self) -> None:
        self.dirs = require_cephfs_mounts(self, 2)
        self.storages = [FilesystemStorage(d, sync_run) for d in self.dirs]

    def start(self, source: bytes, storage: int = 0):
        request = NewUpload(name="scan.tif", size=len(source),
                            sha256=hashlib.sha256(source).digest(), client_id="test")
        return self.successResultOf(self.storages[storage].create(request))

    def write(self, writer, source: bytes, end: int, chunk: int) -> None:
        while writer.offset < end:
            pos = writer.offset
            self.assertEqual(
                self.successResultOf(writer.write(pos, source[pos : min(end, pos + chunk)])),
                min(end, pos + chunk),
            )

    def check_resumed(self, writer, source: bytes, acked: int) -> None:
        """A resume proved at most C{acked}, and its tail is the source's bytes."""
        self.assertLessEqual(writer.offset, acked, "resume proved a higher offset than was written")
        tail = writer.tail
        self.assertEqual(tail.start + tail.length, writer.offset)
        self.assertEqual(tail.sha256,
                         hashlib.sha256(source[tail.start : tail.start + tail.length]).digest())

    def complete_and_check(self, writer, source: bytes, through: int) -> None:
        """Complete, and read the file back through the other mount."""
        completed = self.successResultOf(writer.complete())
        expected = hashlib.sha256(source).hexdigest()
        path = os.path.join(self.dirs[through], *completed.path.split("/"))
        digest, waited = converged_sha256(path, expected)
        self.assertEqual(digest, expected)
        report("cephfs: completed file read through mount {m} matched after {waited:.3f} s",
               m=through + 1, waited=waited)

    def test_resume_right_after_release_on_another_mount(self) -> None:
        """
        Write through mount 1 while mount 2 has the upload's files cached,
        release, and resume at once through mount 2: the proven offset is
        at most the one written; writing on through mount 2 completes, and
        the file read through mount 1 is the source.
        """
        chunk = 64 * 1024
        source = os.urandom(40 * chunk + 1234)
        writer = self.start(source)
        upload = os.path.join(self.dirs[1], "incoming", writer.info.upload_id)
        self.write(writer, source, 2 * chunk, chunk)
        for name in ("journal", "data"):  # mount 2 looks at the upload
            with open(os.path.join(upload, name), "rb") as f:
                f.read()
        self.failureResultOf(self.storages[1].resume(writer.info.upload_id), UploadBusy)
        self.write(writer, source, 20 * chunk, chunk)
        acked = writer.offset
        self.successResultOf(writer.release())
        second = self.successResultOf(self.storages[1].resume(writer.info.upload_id))
        self.check_resumed(second, source, acked)
        report("cephfs: handover mount 1 -> 2 right after release: {acked} bytes written, "
               "mount 2 proved {proven}", acked=acked, proven=second.offset)
        self.write(second, source, len(source), chunk)
        self.complete_and_check(second, source, 0)

    def handovers(self, size: int, chunk: int, count: int) -> None:
        rng = random.Random(size)
        source = os.urandom(size)
        writer = self.start(source)
        upload_id = writer.info.upload_id
        where = 0
        lower = lost = 0
        step = size // (count + 1)
        started = time.monotonic()
        for n in range(1, count + 1):
            self.write(writer, source, min(size, n * step + rng.randrange(chunk)), chunk)
            acked = writer.offset
            self.successResultOf(writer.release())
            where = 1 - where
            writer = self.successResultOf(self.storages[where].resume(upload_id))
            self.check_resumed(writer, source, acked)
            if writer.offset < acked:
                lower += 1
                lost += acked - writer.offset
        self.write(writer, source, size, chunk)
        self.complete_and_check(writer, source, 1 - where)
        report("cephfs: {count} handovers of a {size}-byte upload across 2 mounts in "
               "{secs:.2f} s: {lower} resumes proved a lower offset than written, {lost} "
               "bytes to resend", count=count, size=size, secs=time.monotonic() - started,
               lower=lower, lost=lost)

    def test_many_handovers_within_one_upload(self) -> None:
        """
        20 handovers between the 2 mounts within one 4 MiB upload, each
        resume right after the previous owner released: every proven offset
        is at most what was written and matches its tail, and the completed
        file is the source.
        """
        self.handovers(4 * 1024 * 1024 + 333, 64 * 1024, 20)

    def test_many_handovers_of_a_small_upload(self) -> None:
        """
        The same with a 48 KiB upload in 1 KiB chunks: every write lands in
        pages the other mount has cached.
        """
        self.handovers(48 * 1024 + 7, 1024, 20)

    def test_resume_on_a_mount_that_wrote_the_upload_a_moment_ago(self) -> None:
        """
        Mount 1 writes half, mount 2 takes over and writes nearly all the
        rest, and mount 1 (a restarted server on the same host) resumes at
        once.  It must prove at most what mount 2 acknowledged (recorded:
        how often it proved less), delete nothing, and the upload must
        complete right.
        """
        chunk = 64 * 1024
        stale = 0
        rounds = 3
        for _ in range(rounds):
            source = os.urandom(20 * chunk)
            first = self.start(source)
            self.write(first, source, 10 * chunk, chunk)
            self.successResultOf(first.release())
            second = self.successResultOf(self.storages[1].resume(first.info.upload_id))
            self.check_resumed(second, source, 10 * chunk)
            self.write(second, source, 19 * chunk, chunk)
            acked = second.offset
            self.successResultOf(second.release())
            third = self.successResultOf(self.storages[0].resume(first.info.upload_id))
            self.check_resumed(third, source, acked)
            if third.offset < acked:
                stale += 1
                self.successResultOf(third.release())
                time.sleep(1.5)
                third = self.successResultOf(self.storages[0].resume(first.info.upload_id))
                self.assertEqual(third.offset, acked, "a stale resume deleted stored bytes")
            self.write(third, source, len(source), chunk)
            self.complete_and_check(third, source, 1)
        report("cephfs: a mount resuming an upload it wrote a moment ago proved less than "
               "was acknowledged in {stale} of {rounds} rounds", stale=stale, rounds=rounds)

    def test_resume_while_owned_elsewhere_is_busy(self) -> None:
        """
        While mount 1's writer owns the upload, a resume through mount 2 gets
        UploadBusy (the OFD lock is seen across mounts); after the release,
        mount 2 resumes it and mount 1 gets UploadBusy.
        """
        source = os.urandom(300 * 1024)
        writer = self.start(source)
        self.write(writer, source, 100 * 1024, 32 * 1024)
        self.failureResultOf(self.storages[1].resume(writer.info.upload_id), UploadBusy)
        acked = writer.offset
        self.successResultOf(writer.release())
        second = self.successResultOf(self.storages[1].resume(writer.info.upload_id))
        self.check_resumed(second, source, acked)
        self.failureResultOf(self.storages[0].resume(writer.info.upload_id), UploadBusy)
        self.write(second, source, len(source), 32 * 1024)
        self.complete_and_check(second, source, 0)


CHUNK = 256 * 1024
WINDOW = 4


class ClusterOnCephFSTests(TestCase):
    """
    Two real C{twistd imgresume} servers, the first on mount 1 and the
    second on mount 2, behind C{twistd imgresume-lb}: a failover to the
    surviving server moves the upload to the other mount.  The in-process
    uploader sends through the balancer while the serving server is
    SIGKILLed.
    """

    timeout = 120

    def setUp(self) -> None:
        self.dirs = require_cephfs_mounts(self, 2)
        self.work = os.path.abspath(self.mktemp())
        os.makedirs(self.work)
        self.cluster = LocalCluster(self.work, servers=2, storage=self.dirs).start()
        self.addCleanup(self.cluster.stop)

    def uploader(self) -> Uploader:
        return Uploader(self.cluster.lb_endpoint, reactor=reactor, journal=None,
                        chunk_size=CHUNK, window=WINDOW, client_id="test",
                        backoff_base=0.05, backoff_max=0.5, max_attempts=30)

    def make_file(self, size: int) -> tuple[str, str]:
        path = os.path.join(self.work, "scan.tif")
        with open(path, "wb") as f:
            f.write(os.urandom(size))
        return path, sha256_file(path)

    def check_stored(self, relpath: str, expected: str) -> None:
        """The completed file read through both mounts."""
        for d in self.dirs:
            digest, _ = converged_sha256(os.path.join(d, *relpath.split("/")), expected)
            self.assertEqual(digest, expected, f"stored file through {d}")

    async def test_sigkill_serving_server_mid_upload(self) -> None:
        """
        The server receiving the upload is SIGKILLed a third of the way in;
        the client resumes through the balancer on the server on the other
        mount and completes, the file is the source through both mounts,
        and at most a window of chunks is sent twice.
        """
        size = 24 * 1024 * 1024 + 12345
        path, digest = self.make_file(size)
        killed: list[str] = []

        def progress(p: Progress) -> None:
            if not killed and p.phase == "uploading" and p.server_id and p.done > size // 3:
                killed.append(p.server_id)
                self.cluster.kill(p.server_id)

        started = time.monotonic()
        result = await self.uploader().upload(path, "scans/scan.tif", progress=progress)
        took = time.monotonic() - started
        self.assertEqual(len(killed), 1)
        self.assertEqual(result.sha256, digest)
        self.check_stored(result.path, digest)
        self.assertEqual(result.servers[0], killed[0])
        self.assertNotIn(killed[0], result.servers[1:])
        self.assertGreater(result.resumed_at[0], 0)
        report("cephfs failover: killed {killed}, resumed at {resumed} via {servers}, "
               "{extra} bytes sent twice, {took:.1f} s for {size} bytes", killed=killed[0],
               resumed=result.resumed_at, servers=result.servers,
               extra=result.bytes_sent - size, took=took, size=size)
        self.assertLessEqual(result.bytes_sent, size + WINDOW * CHUNK)

    async def test_serving_server_sigkilled_three_times(self) -> None:
        """
        A 32 MiB upload during which the serving server is SIGKILLed three
        times (each killed server restarted at once, on its own mount, in a
        thread; the upload moves to whichever server answers first, on the
        other mount or restarted on the same one) completes with the
        source's SHA-256 and re-sends at most a window of chunks per kill.
        """
        size = 32 * 1024 * 1024
        kills = 3
        path, digest = self.make_file(size)
        killed: list[str] = []
        restarts: list[defer.Deferred] = []
        serving = {"server": None, "since": 0}

        def progress(p: Progress) -> None:
            if p.phase != "uploading" or not p.server_id:
                return
            if p.server_id != serving["server"]:
                serving.update(server=p.server_id, since=p.done)
            if (len(killed) < kills
                    and p.done > size * (len(killed) + 1) // (kills + 2)
                    and p.done - serving["since"] >= WINDOW * CHUNK
                    and self.cluster.servers[p.server_id].running):
                killed.append(p.server_id)
                serving["server"] = None
                self.cluster.kill(p.server_id)
                restarts.append(deferToThread(self.cluster.start_node,
                                              self.cluster.servers[p.server_id]))

        result = await self.uploader().upload(path, "scans/big.tif", progress=progress)
        await defer.gatherResults(restarts, consumeErrors=True)
        self.assertEqual(len(killed), kills)
        self.assertEqual(result.sha256, digest)
        self.check_stored(result.path, digest)
        report("cephfs chaos: {kills} kills ({killed}), served by {servers}, resumed at "
               "{resumed}, {extra} bytes sent twice (bound {bound})", kills=kills,
               killed=killed, servers=result.servers, resumed=result.resumed_at,
               extra=result.bytes_sent - size, bound=kills * WINDOW * CHUNK)
        self.assertLessEqual(result.bytes_sent, size + kills * WINDOW * CHUNK)

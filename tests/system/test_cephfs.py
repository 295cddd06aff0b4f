# -*- test-case-name: tests.system.test_cephfs -*-
"""
imgresume on CephFS: one filesystem of a one-node Ceph cluster mounted twice
with C{ceph-fuse} (C{bash .ci/ceph.sh up}), one mount per server, as if each
server ran on its own host.  Each mount is its own client session of the MDS
with its own caches (the ceph client's and the kernel's FUSE page cache),
left at their defaults.

The shared-filesystem suite (L{tests.support.sharedfs_suite}) on it:

  - L{CephFSFactsTests}: the facts the design relies on, plus a record of
    how soon each mount sees the other's writes (CephFS is coherent: sizes
    and reads after POSIX_FADV_DONTNEED are fresh at once);
  - L{CephFSStorageHandoverTests}: L{FilesystemStorage} on each mount
    handing one upload to the other with no pause;
  - L{ClusterOnCephFSTests}: real C{twistd} servers, each on its own mount,
    behind the real balancer, SIGKILLed mid-upload.

Renames through one mount may stall for up to the MDS's tick with early
replies on (C{rename_patience}).  Measurements are printed as
C{[sharedfs] cephfs: ...} lines.

Without the mounts every test skips with a loud reason; with
C{IMGRESUME_REQUIRE_CEPH=1} they fail instead.
"""

from __future__ import annotations

import os
import time

from twisted.trial.unittest import TestCase

from tests.support.marks import slow
from tests.support.sharedfs import CONVERGE, require_cephfs_mounts
from tests.support.sharedfs_suite import (
    ClusterMixin,
    FilesystemFactsMixin,
    SharedFilesystem,
    StorageHandoverMixin,
)

CEPHFS = SharedFilesystem(
    name="cephfs", require=require_cephfs_mounts, mounts=2,
    poll=0.001, rename_patience=15.0, min_renames=3, sizes_may_lag=False,
)


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


class CephFSFactsTests(FilesystemFactsMixin, TestCase):
    """
    What docs/sharedfs.md says the design assumes of a shared filesystem,
    checked on CephFS through two C{ceph-fuse} mounts.
    """

    fs = CEPHFS

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
        p1, p2 = self.paths("grow")[:2]
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
        self.report("handover (mount 1 wrote+fsynced+closed, mount 2 reopened): {v}",
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
                self.report("concurrent, {how}{sync} through mount 1: {what} through "
                            "mount 2: {v}", how="append" if grow else "overwrite in place",
                            sync="+fsync" if fsync else " (no fsync)", what=what,
                            v=describe(times))
            for what in ("stat", "fstat") if grow else ():
                self.assertEqual(views[what].count(None), 0, f"{what} through mount 2 stale")
            self.assertEqual(views["read after DONTNEED"].count(None), 0,
                             "a read after POSIX_FADV_DONTNEED stayed stale")


class CephFSStorageHandoverTests(StorageHandoverMixin, TestCase):
    """
    L{StorageHandoverMixin} between the two CephFS mounts: a resume proves
    at most what was written (on CephFS, normally exactly that).
    """

    fs = CEPHFS


class ClusterOnCephFSTests(ClusterMixin, TestCase):
    """
    Two real C{twistd imgresume} servers, the first on mount 1 and the
    second on mount 2, behind C{twistd imgresume-lb}: a failover to the
    surviving server moves the upload to the other mount.
    """

    fs = CEPHFS

    @slow  # a kill loop: test_sigkill_serving_server_mid_upload is the quick one
    async def test_serving_server_sigkilled_three_times(self) -> None:
        """
        A 32 MiB upload during which the serving server is SIGKILLed three
        times (each killed server restarted at once, on its own mount, in a
        thread; the upload moves to whichever server answers first, on the
        other mount or restarted on the same one) completes with the
        source's SHA-256 and re-sends at most a window of chunks per kill.
        """
        await self.sigkill_repeatedly(32 * 1024 * 1024, kills=3)

# -*- test-case-name: tests.system.test_gluster -*-
"""
imgresume on GlusterFS: a replica-2 volume mounted three times over FUSE
(C{bash .ci/glusterfs.sh up}), one mount per server, as if every server ran
on its own host.  Each mount has its own attribute, entry and data caches
(left at GlusterFS's defaults), so one "host" sees another's writes late.

The shared-filesystem suite (L{tests.support.sharedfs_suite}) on it:

  - L{VolumeFactsTests}: the facts the design relies on, plus how long a
    mount keeps showing the old state of a file another mount wrote;
  - L{StorageHandoverTests}: L{FilesystemStorage} on different mounts
    handing one upload to each other with no pause, where the new owner's
    view may be stale;
  - L{ClusterOnGlusterTests}: real C{twistd} servers, each on its own mount,
    behind the real balancer, SIGKILLed mid-upload.

What GlusterFS may do that a coherent filesystem does not: a mount may
report the size it cached for about a second, also after
POSIX_FADV_DONTNEED (C{sizes_may_lag}).  Measurements (how long a mount
stays stale, how often a resume proved a lower offset) are printed as
C{[sharedfs] gluster: ...} lines.

Without the mounts every test skips with a loud reason; with
C{IMGRESUME_REQUIRE_SHAREDFS=1} (as C{.ci/run} sets) they fail instead.
"""

from __future__ import annotations

import os
import time

from twisted.trial.unittest import TestCase

from tests.support.marks import slow
from tests.support.sharedfs import CONVERGE, require_gluster_mounts
from tests.support.sharedfs_suite import (
    ClusterMixin,
    FilesystemFactsMixin,
    SharedFilesystem,
    StorageHandoverMixin,
)

GLUSTERFS = SharedFilesystem(
    name="gluster", require=require_gluster_mounts, mounts=3,
    poll=0.01, rename_patience=2.0, min_renames=11, sizes_may_lag=True,
)


class VolumeFactsTests(FilesystemFactsMixin, TestCase):
    """
    What docs/sharedfs.md says the design assumes of a shared filesystem,
    checked on the GlusterFS volume through different mounts.
    """

    fs = GLUSTERFS

    def test_write_fsync_then_read_through_another_mount(self) -> None:
        """
        Write + fsync + close through mount 1, then look through mount 2,
        which had the file cached: record how long stat, open + fstat, and
        read (plain, and after dropping the page cache as the offset proof
        does) kept showing the old state.  Not asserted, except that every
        view converges.
        """
        p1, p2 = self.paths("grow")[:2]
        with open(p1, "wb") as f:
            f.write(b"\0" * 4096)
            os.fsync(f.fileno())
        stale = {"stat": [], "fstat": [], "read": [], "read after DONTNEED": []}
        rounds = 5
        for r in range(rounds):
            # mount 2 looks at the file, as a server peeking at an upload would
            size = os.stat(p2).st_size
            with open(p2, "rb") as f:
                f.read()
            data = os.urandom(65536)
            fd = os.open(p1, os.O_RDWR)
            os.pwrite(fd, data, size)
            os.fsync(fd)
            os.close(fd)
            written = time.monotonic()
            new = size + len(data)
            pending = set(stale)
            while pending:
                now = time.monotonic() - written
                self.assertLess(now, CONVERGE, f"mount 2 still stale for {pending}")
                if "stat" in pending and os.stat(p2).st_size == new:
                    stale["stat"].append(now)
                    pending.discard("stat")
                fd = os.open(p2, os.O_RDONLY)
                try:
                    if "fstat" in pending and os.fstat(fd).st_size == new:
                        stale["fstat"].append(now)
                        pending.discard("fstat")
                    if "read" in pending and os.pread(fd, len(data), size) == data:
                        stale["read"].append(now)
                        pending.discard("read")
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                    if "read after DONTNEED" in pending and os.pread(fd, len(data), size) == data:
                        stale["read after DONTNEED"].append(now)
                        pending.discard("read after DONTNEED")
                finally:
                    os.close(fd)
                time.sleep(0.005)
        for what, times in stale.items():
            self.report("after write+fsync+close through mount 1, {what} through mount 2 was "
                        "stale for {low:.3f}..{high:.3f} s (stale in {n} of {rounds} rounds)",
                        what=what, low=min(times), high=max(times),
                        n=sum(t > 0.05 for t in times), rounds=rounds)


class StorageHandoverTests(StorageHandoverMixin, TestCase):
    """L{StorageHandoverMixin} across the three GlusterFS mounts."""

    fs = GLUSTERFS


class ClusterOnGlusterTests(ClusterMixin, TestCase):
    """
    Three real C{twistd imgresume} servers, each with its storage on its own
    mount of the volume, behind C{twistd imgresume-lb}.
    """

    fs = GLUSTERFS

    @slow  # a kill loop: test_sigkill_serving_server_mid_upload is the quick one
    async def test_serving_server_sigkilled_five_times(self) -> None:
        """
        A 64 MiB upload during which the serving server is SIGKILLed five
        times (each killed server restarted at once, on its own mount, in a
        thread) completes with the source's SHA-256, and re-sends at most a
        window of chunks per kill.
        """
        await self.sigkill_repeatedly(64 * 1024 * 1024, kills=5)

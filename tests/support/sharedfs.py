# -*- test-case-name: tests.system.test_gluster,tests.system.test_cephfs -*-
"""
Finding the GlusterFS mounts that C{.ci/glusterfs.sh up} makes and the
CephFS mounts that C{.ci/ceph.sh up} makes, for the tests that run imgresume
on a real distributed filesystem (L{tests.support.sharedfs_suite}, run by
C{tests/system/test_gluster.py} and C{tests/system/test_cephfs.py}), and
measuring what one mount sees of another's writes and locks.  A helper
module, not tests.

The mounts are three FUSE mounts of one volume on this machine; each behaves
like the mount of another host (own attribute, entry and data caches).  They
are found in C{$IMGRESUME_GLUSTER_MOUNTS} (colon-separated) or else in
L{MOUNTS_FILE}, which the script writes.

Without them the tests skip with a loud reason, unless
C{IMGRESUME_REQUIRE_SHAREDFS=1} (set by C{.ci/run}): then they fail, so a
broken CI setup cannot pass by skipping.

The CephFS mounts are two C{ceph-fuse} mounts of one filesystem, each its own
client session with its own caches.  They are found in
C{$IMGRESUME_CEPHFS_MOUNTS} or else in L{CEPHFS_MOUNTS_FILE}; without them
the tests skip loudly, or fail when C{IMGRESUME_REQUIRE_CEPH=1}.
"""

from __future__ import annotations

import errno
import fcntl
import os
import shutil
import struct
import subprocess
import sys
import time
import uuid
import warnings
from collections.abc import Callable
from unittest import SkipTest

from twisted.logger import Logger
from twisted.trial.unittest import TestCase

from tests.support.cluster import sha256_file
from tests.support.processes import child_env

log = Logger()

#: Written by C{.ci/glusterfs.sh up}: one mount point a line.
MOUNTS_FILE = "/run/imgresume-ci/gluster-mounts"
#: Overrides L{MOUNTS_FILE}: mount points separated by ":".
MOUNTS_ENV = "IMGRESUME_GLUSTER_MOUNTS"
#: "1": a missing shared filesystem fails the tests instead of skipping them.
REQUIRE_ENV = "IMGRESUME_REQUIRE_SHAREDFS"
#: Written by C{.ci/ceph.sh up}: one CephFS mount point a line.
CEPHFS_MOUNTS_FILE = "/run/imgresume-ci/cephfs-mounts"
#: Overrides L{CEPHFS_MOUNTS_FILE}: mount points separated by ":".
CEPHFS_MOUNTS_ENV = "IMGRESUME_CEPHFS_MOUNTS"
#: "1": missing CephFS mounts fail the tests instead of skipping them.
CEPH_REQUIRE_ENV = "IMGRESUME_REQUIRE_CEPH"
#: How long a directory made through one mount may take to appear in another.
VISIBLE_WITHIN = 10.0
#: How long a mount may take to show another mount's change before a test
#: calls it a failure (GlusterFS's default attribute and metadata cache
#: timeouts are 1 s; CephFS revokes capabilities within milliseconds).
CONVERGE = 10.0
#: The struct flock the filesystem storage packs for F_OFD_SETLK.
FLOCK = struct.Struct("hhqqi0q")


class SharedFSUnavailable(UserWarning):
    """The shared-filesystem tests are being skipped."""


def _listed_mounts(env: str, path: str) -> list[str]:
    """The mount points in C{$env} (colon-separated) if set, else in C{path}."""
    text = os.environ.get(env)
    if text:
        return [p for p in text.split(":") if p]
    try:
        with open(path, encoding="utf-8") as f:
            return [line.strip() for line in f if line.strip()]
    except OSError:
        return []


def gluster_mounts() -> list[str]:
    """
    The mount points of the test volume: from C{$IMGRESUME_GLUSTER_MOUNTS}
    if set, else from L{MOUNTS_FILE}; empty if neither names any.
    """
    return _listed_mounts(MOUNTS_ENV, MOUNTS_FILE)


def cephfs_mounts() -> list[str]:
    """
    The mount points of the test CephFS: from C{$IMGRESUME_CEPHFS_MOUNTS}
    if set, else from L{CEPHFS_MOUNTS_FILE}; empty if neither names any.
    """
    return _listed_mounts(CEPHFS_MOUNTS_ENV, CEPHFS_MOUNTS_FILE)


def _problem(mounts: list[str], n: int, env: str = MOUNTS_ENV,
             path: str = MOUNTS_FILE) -> str | None:
    """Why C{mounts} cannot serve a test needing C{n} of them, or None."""
    source = f"${env}" if os.environ.get(env) else path
    if not mounts:
        return f"no mounts listed (looked in ${env} and {path})"
    if len(mounts) < n:
        return f"{source} lists {len(mounts)} mounts, the test needs {n}"
    for m in mounts[:n]:
        if not os.path.isdir(m):
            return f"{m} (listed in {source}) is not a directory"
        if not os.path.ismount(m):
            return f"{m} (listed in {source}) is not mounted"
        if not os.access(m, os.W_OK | os.X_OK):
            return f"{m} is not writable by this user"
    return None


_GLUSTER_MISSING = (
    "GlusterFS not mounted: run `bash .ci/glusterfs.sh up` (needs root and /dev/fuse)"
)
_CEPHFS_MISSING = "CephFS not mounted: run `bash .ci/ceph.sh up` (needs root and /dev/fuse)"


def _fail_or_skip(testcase: TestCase, problem: str, missing: str = _GLUSTER_MISSING,
                  require_env: str = REQUIRE_ENV) -> None:
    reason = f"{missing}; {problem}"
    if os.environ.get(require_env) == "1":
        testcase.fail(f"{reason} [{require_env}=1: failing instead of skipping]")
    warnings.warn(f"SKIPPING shared-filesystem test: {reason}", SharedFSUnavailable,
                  stacklevel=3)
    raise SkipTest(reason)


def wait_visible(path: str, timeout: float = VISIBLE_WITHIN) -> float:
    """
    Wait until C{path} exists (as seen through its own mount).

    @return: the seconds it took.
    @raise AssertionError: not visible within C{timeout}.
    """
    start = time.monotonic()
    while not os.path.exists(path):
        if time.monotonic() - start > timeout:
            raise AssertionError(f"{path} is not visible after {timeout} s")
        time.sleep(0.01)
    return time.monotonic() - start


def _rmtree(path: str, timeout: float = 10.0) -> None:
    """C{rm -r}, retrying while entries made through other mounts appear late."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            shutil.rmtree(path)
            return
        except FileNotFoundError:
            return
        except OSError as e:
            if e.errno not in (errno.ENOTEMPTY, errno.ESTALE, errno.EBUSY) or (
                time.monotonic() > deadline
            ):
                raise
            time.sleep(0.1)


def require_gluster_mounts(testcase: TestCase, n: int = 3) -> list[str]:
    """
    A fresh directory on the shared volume for this test, as seen through
    each of C{n} mounts (one per simulated host), removed after the test.

    It is created through the first mount and waited for until visible
    through the others.

    @raise SkipTest: the mounts are missing (with a loud reason); when
        C{$IMGRESUME_REQUIRE_SHAREDFS} is C{1} the test fails instead.
    """
    mounts = gluster_mounts()
    problem = _problem(mounts, n)
    if problem is not None:
        _fail_or_skip(testcase, problem)
    return _test_dirs(testcase, mounts[:n], lambda why: _fail_or_skip(testcase, why))


def _test_dirs(testcase: TestCase, mounts: list[str],
               fail: Callable[[str], None]) -> list[str]:
    """
    A fresh directory made through C{mounts[0]}, waited for until visible
    through the others, removed after the test: its path through each mount.
    C{fail(problem)} skips or fails the test.
    """
    name = f"test-{os.getpid()}-{uuid.uuid4().hex[:12]}"
    dirs = [os.path.join(m, name) for m in mounts]
    try:
        os.mkdir(dirs[0])
    except OSError as e:
        fail(f"cannot make a directory in {mounts[0]}: {e}")
    testcase.addCleanup(_rmtree, dirs[0])
    for d in dirs[1:]:
        try:
            wait_visible(d)
        except AssertionError:
            fail(
                f"{dirs[0]} made through {mounts[0]} is not visible as {d}: "
                "are these mounts of one volume?",
            )
    return dirs


def require_cephfs_mounts(testcase: TestCase, n: int = 2) -> list[str]:
    """
    A fresh directory on the test CephFS for this test, as seen through each
    of C{n} C{ceph-fuse} mounts (one per simulated host), removed after the
    test; as L{require_gluster_mounts}.

    @raise SkipTest: the mounts are missing (with a loud reason); when
        C{$IMGRESUME_REQUIRE_CEPH} is C{1} the test fails instead.
    """
    mounts = cephfs_mounts()

    def fail(problem: str) -> None:
        _fail_or_skip(testcase, problem, _CEPHFS_MISSING, CEPH_REQUIRE_ENV)

    problem = _problem(mounts, n, CEPHFS_MOUNTS_ENV, CEPHFS_MOUNTS_FILE)
    if problem is not None:
        fail(problem)
    return _test_dirs(testcase, mounts[:n], fail)


# --- measuring through the mounts -------------------------------------------


def report(message: str, **fields: object) -> None:
    """Log a measurement and print it where a test run's reader sees it."""
    text = message.format(**fields)
    log.info("[sharedfs] " + message, **fields)
    print(f"[sharedfs] {text}", file=sys.stderr, flush=True)


def ofd_lock(fd: int) -> bool:
    """Try an exclusive OFD lock on the whole file; False if busy."""
    try:
        fcntl.fcntl(fd, fcntl.F_OFD_SETLK, FLOCK.pack(fcntl.F_WRLCK, os.SEEK_SET, 0, 0, 0))
    except OSError as e:
        if e.errno in (errno.EAGAIN, errno.EACCES):
            return False
        raise
    return True


def ofd_unlock(fd: int) -> None:
    """Release the OFD lock C{fd} holds on the whole file."""
    fcntl.fcntl(fd, fcntl.F_OFD_SETLK, FLOCK.pack(fcntl.F_UNLCK, os.SEEK_SET, 0, 0, 0))


def converged_sha256(path: str, expected: str, timeout: float = CONVERGE) -> tuple[str, float]:
    """
    The SHA-256 of C{path}, re-read until it equals C{expected} or
    C{timeout} passes (a mount may show another's writes late).

    @return: the last digest and the seconds it took.
    """
    start = time.monotonic()
    while True:
        try:
            digest = sha256_file(path)
        except OSError:
            digest = ""
        waited = time.monotonic() - start
        if digest == expected or waited > timeout:
            return digest, waited
        time.sleep(0.05)


def lock_prober(path: str) -> subprocess.Popen:
    """
    Start another process that opens C{path} and, for each line read from
    its stdin, answers whether it could take the OFD lock ("locked"/"busy").
    """
    code = (
        "import os, sys\n"
        "from imgresume.storage.filesystem._locks import try_lock as _try_lock\n"
        "fd = os.open(sys.argv[1], os.O_RDWR)\n"
        "for line in sys.stdin:\n"
        "    print('locked' if _try_lock(fd) else 'busy', flush=True)\n"
    )
    return subprocess.Popen(
        [sys.executable, "-c", code, path], env=child_env(), text=True,
        stdin=subprocess.PIPE, stdout=subprocess.PIPE,
    )


def ask(proc: subprocess.Popen) -> str:
    """Ask a L{lock_prober} to try the lock: "locked" or "busy"."""
    proc.stdin.write("?\n")
    proc.stdin.flush()
    return proc.stdout.readline().strip()


def stop(proc: subprocess.Popen) -> None:
    """Kill a L{lock_prober} (if still running) and close its pipes."""
    if proc.poll() is None:
        proc.kill()
    proc.wait()
    for f in (proc.stdin, proc.stdout):
        if f is not None:
            f.close()

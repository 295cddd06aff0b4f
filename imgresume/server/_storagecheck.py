# -*- test-case-name: tests.storage.test_selftest,tests.server.test_startup -*-
"""
The checks of a storage directory a server runs before it starts
listening: that it can use the directory at all (L{check_storage_root}),
then the storage self-test (L{verify_storage}).  Each refusal says what is
wrong and how to fix it.
"""

from __future__ import annotations

from twisted.logger import Logger

from imgresume.storage.filesystem.selftest import (
    SCRATCH,
    Check,
    access_problem,
    check_storage,
    fatal,
    warnings,
)

log = Logger()


class StorageUnusable(Exception):
    """The storage directory cannot be used at all (missing, not writable, ...)."""

    def __init__(self, root: str, problem: str, remedy: str) -> None:
        self.root = root
        self.problem = problem
        self.remedy = remedy
        super().__init__(f"--storage: {problem}; {remedy}")


class StorageCheckFailed(Exception):
    """The storage self-test found a guarantee the storage needs missing."""

    def __init__(self, root: str, failed: list[Check]) -> None:
        self.root = root
        self.failed = failed
        lines = "".join(f"\n  {c.name}: {c.detail}" for c in failed)
        remedies = [c.remedy for c in failed if c.remedy]
        if any(c.name == SCRATCH for c in failed):
            # Nothing can be created there: no filesystem guarantee is the
            # matter, and starting anyway would only fail every upload.
            advice = (f"The server cannot create files in {root}"
                      + (f": {'; '.join(remedies)}." if remedies else ". Fix that first.")
                      + " `imgresume check-storage --storage DIR` shows every check.")
        else:
            advice = (
                "The shared filesystem lacks what the storage needs to keep uploads "
                "safe (see docs/storage.md, \"Storage self-test\"). "
                "`imgresume check-storage --storage DIR` shows every check; "
                "--skip-storage-check starts the server anyway (unsafe).")
        super().__init__(f"storage self-test failed for {root}:{lines}\n{advice}")


def check_storage_root(root: str) -> None:
    """
    Refuse a storage directory this process cannot use at all: missing, not
    a directory, on a read-only filesystem, not writable by this user.  Run
    by C{twistd imgresume} before the self-test, even with
    C{--skip-storage-check} (which skips tests of guarantees, not this).

    @raise StorageUnusable: with what is wrong and how to fix it.
    """
    problem = access_problem(root)
    if problem is not None:
        raise StorageUnusable(root, *problem)


def verify_storage(root: str) -> list[Check]:
    """
    Run the storage self-test (L{check_storage}) on C{root} and log the
    result: one warning event per warning.  Blocking (it spawns a child
    process and syncs files): call it before the reactor runs, as
    C{twistd imgresume} does in C{makeService}, or on a thread.

    @raise StorageCheckFailed: a fatal check failed.
    """
    checks = check_storage(root)
    failed = fatal(checks)
    if failed:
        raise StorageCheckFailed(root, failed)
    for check in warnings(checks):
        log.warn("storage self-test warning: {check}: {detail}",
                 check=check.name, detail=check.detail, root=root)
    log.info("storage self-test of {root} passed ({count} checks, {warnings} warnings)",
             root=root, count=len(checks), warnings=len(warnings(checks)))
    return checks

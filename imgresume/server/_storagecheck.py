# -*- test-case-name: tests.storage.test_selftest -*-
"""The storage self-test as run by a server before it starts listening."""

from __future__ import annotations

from twisted.logger import Logger

from imgresume.storage.filesystem.selftest import Check, check_storage, fatal, warnings

log = Logger()


class StorageCheckFailed(Exception):
    """The storage self-test found a guarantee the storage needs missing."""

    def __init__(self, root: str, failed: list[Check]) -> None:
        self.root = root
        self.failed = failed
        lines = "".join(f"\n  {c.name}: {c.detail}" for c in failed)
        super().__init__(
            f"storage self-test failed for {root}:{lines}\n"
            "The shared filesystem lacks what the storage needs to keep uploads "
            "safe (see docs/storage.md, \"Storage self-test\"). "
            "`imgresume check-storage --storage DIR` shows every check; "
            "--skip-storage-check starts the server anyway."
        )


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

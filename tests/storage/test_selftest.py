# -*- test-case-name: tests.storage.test_selftest -*-
"""
Tests for L{imgresume.storage.filesystem.selftest} (what the filesystem under a storage
root really provides), for the C{imgresume check-storage} and C{imgresume
gc} commands, and for a server that refuses to start on a storage that
fails the self-test.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import time

from twisted.internet.testing import EventLoggingObserver
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import TestCase

from imgresume.testing import twistd_argv, wait_until_connectable
from imgresume.server import _storagecheck
from imgresume.server.tap import Options as ServerOptions
from imgresume.server.tap import makeService
from imgresume.storage.filesystem import FilesystemStorage, selftest
from imgresume.storage.filesystem.selftest import (
    ATOMIC_RENAME,
    EXCLUSIVE_CREATE,
    EXCLUSIVE_CREATE_CHILD,
    FREE_SPACE,
    FSYNC_DIRECTORY,
    FSYNC_FILE,
    HARD_LINK,
    LOCK_CHILD,
    LOCK_OPENS,
    LOCK_RELEASE,
    ONE_FILESYSTEM,
    POSITIONAL_WRITES,
    SCRATCH,
    Check,
    check_storage,
    fatal,
    warnings,
)
from tests.support.processes import child_env
from tests.support.runners import sync_run
from tests.support.storage_conformance import PAYLOAD, request

#: procfs refuses to create anything in it, even for root: a real
#: directory on which the self-test's first fatal check fails.
UNUSABLE = "/proc"


def imgresume(*args: str) -> subprocess.CompletedProcess:
    """Run the C{imgresume} command (C{python -m imgresume}) and capture it."""
    return subprocess.run(
        [sys.executable, "-m", "imgresume", *args], env=child_env(), capture_output=True,
        text=True, timeout=60, cwd="/",
    )


class TempRoot:
    def setUp(self) -> None:
        self.root = tempfile.mkdtemp(prefix="imgresume-selftest-")
        self.addCleanup(shutil.rmtree, self.root, True)

    def checks(self) -> dict[str, Check]:
        result = check_storage(self.root)
        self.assertEqual(
            [e for e in os.listdir(self.root) if e.startswith(".selftest-")], [],
            "the scratch directory was left behind",
        )
        return {c.name: c for c in result}


class CheckStorageTests(TempRoot, TestCase):
    """L{check_storage} on a local temporary directory, real and with broken primitives."""

    def test_passesOnLocalDirectory(self) -> None:
        """
        Every probe passes on a local filesystem (free space may only warn),
        in a fixed order, and the scratch directory is gone afterwards.
        """
        result = check_storage(self.root)
        self.assertEqual(
            [c.name for c in result],
            [SCRATCH, EXCLUSIVE_CREATE, EXCLUSIVE_CREATE_CHILD, ATOMIC_RENAME, HARD_LINK,
             LOCK_OPENS, LOCK_CHILD, LOCK_RELEASE, FSYNC_FILE, FSYNC_DIRECTORY,
             POSITIONAL_WRITES, FREE_SPACE, ONE_FILESYSTEM],
        )
        self.assertEqual(fatal(result), [])
        for check in result:
            if check.name != FREE_SPACE:
                self.assertIs(check.ok, True, check)
            self.assertTrue(check.detail)
        self.assertEqual(os.listdir(self.root), [])

    def test_usedStorage(self) -> None:
        """On a storage in use, incoming/ and complete/ are checked to share a filesystem."""
        storage = FilesystemStorage(self.root, sync_run)
        writer = self.successResultOf(storage.create(request()))
        self.successResultOf(writer.write(0, PAYLOAD))
        self.successResultOf(writer.complete())
        check = self.checks()[ONE_FILESYSTEM]
        self.assertIs(check.ok, True)
        self.assertIn("are on one filesystem", check.detail)

    def test_linkFails(self) -> None:
        """A filesystem without hard links fails the link check (fatal)."""

        def link(*args, **kwargs):
            raise OSError(errno.EPERM, "Operation not permitted")

        self.patch(os, "link", link)
        check = self.checks()[HARD_LINK]
        self.assertIs(check.ok, False)
        self.assertIn("Operation not permitted (EPERM)", check.detail)

    def test_linkClobbers(self) -> None:
        """A link that does not refuse an existing name fails the link check."""
        real = os.link

        def link(src, dst, **kwargs):
            try:
                real(src, dst, **kwargs)
            except FileExistsError:
                pass

        self.patch(os, "link", link)
        check = self.checks()[HARD_LINK]
        self.assertIs(check.ok, False)
        self.assertIn("existing name succeeded", check.detail)

    def test_renameFails(self) -> None:
        """A rename that cannot replace a file fails the rename check (fatal)."""

        def replace(src, dst, **kwargs):
            raise OSError(errno.EEXIST, "File exists")

        self.patch(os, "replace", replace)
        check = self.checks()[ATOMIC_RENAME]
        self.assertIs(check.ok, False)
        self.assertIn("File exists", check.detail)

    def test_renameDoesNothing(self) -> None:
        """A rename that silently leaves the old file fails the rename check."""
        self.patch(os, "replace", lambda src, dst, **kwargs: None)
        self.assertIs(self.checks()[ATOMIC_RENAME].ok, False)

    def test_exclusiveCreateIgnored(self) -> None:
        """A filesystem that ignores O_EXCL fails the exclusive-create check."""
        real = os.open

        def open_(path, flags, *args, **kwargs):
            return real(path, flags & ~os.O_EXCL, *args, **kwargs)

        self.patch(os, "open", open_)
        check = self.checks()[EXCLUSIVE_CREATE]
        self.assertIs(check.ok, False)
        self.assertIn("O_EXCL", check.detail)

    def test_lockNotExclusive(self) -> None:
        """
        A lock that does not exclude (here: the lock function always says
        yes without locking) fails both lock checks.
        """
        self.patch(selftest, "try_lock", lambda fd: True)
        checks = self.checks()
        self.assertIs(checks[LOCK_OPENS].ok, False)
        self.assertIs(checks[LOCK_CHILD].ok, False)
        self.assertIn("not shared", checks[LOCK_CHILD].detail)

    def test_lockUnavailable(self) -> None:
        """No locks at all (NFS mounted with no lock daemon: ENOLCK) is fatal."""

        def try_lock(fd):
            raise OSError(errno.ENOLCK, "No locks available")

        self.patch(selftest, "try_lock", try_lock)
        check = self.checks()[LOCK_OPENS]
        self.assertIs(check.ok, False)
        self.assertIn("No locks available", check.detail)

    def test_fdatasyncFails(self) -> None:
        """A failing fdatasync fails the fsync check (fatal)."""

        def fdatasync(fd):
            raise OSError(errno.EIO, "Input/output error")

        self.patch(os, "fdatasync", fdatasync)
        check = self.checks()[FSYNC_FILE]
        self.assertIs(check.ok, False)
        self.assertIn("EIO", check.detail)

    def test_directoryFsyncEinvalWarns(self) -> None:
        """A filesystem that cannot fsync directories (EINVAL) only warns."""
        real = os.fsync

        def fsync(fd):
            if stat.S_ISDIR(os.fstat(fd).st_mode):
                raise OSError(errno.EINVAL, "Invalid argument")
            return real(fd)

        self.patch(os, "fsync", fsync)
        result = check_storage(self.root)
        check = {c.name: c for c in result}[FSYNC_DIRECTORY]
        self.assertIsNone(check.ok)
        self.assertIn(check, warnings(result))
        self.assertEqual(fatal(result), [])

    def test_directoryFsyncOtherErrorFatal(self) -> None:
        """Any other error from a directory fsync is fatal."""

        def fsync(fd):
            raise OSError(errno.EIO, "Input/output error")

        self.patch(os, "fsync", fsync)
        self.assertIs(self.checks()[FSYNC_DIRECTORY].ok, False)

    def test_childCannotRun(self) -> None:
        """Without a working child process, the cross-process checks fail, with the reason."""
        self.patch(sys, "executable", os.path.join(self.root, "no-python"))
        checks = self.checks()
        self.assertIs(checks[EXCLUSIVE_CREATE_CHILD].ok, False)
        self.assertIn("child process", checks[EXCLUSIVE_CREATE_CHILD].detail)
        self.assertIs(checks[LOCK_CHILD].ok, False)

    def test_unusableRoot(self) -> None:
        """A root where nothing can be created fails at once, and nothing is left."""
        result = check_storage(UNUSABLE)
        self.assertEqual(result[0].name, SCRATCH)
        self.assertIs(result[0].ok, False)
        self.assertIn("cannot create a directory", result[0].detail)

    def test_missingRoot(self) -> None:
        """A root that does not exist fails the scratch check."""
        result = check_storage(os.path.join(self.root, "missing"))
        self.assertIs(result[0].ok, False)
        self.assertIn("ENOENT", result[0].detail)

    def test_lowFreeSpaceWarns(self) -> None:
        """Less free space than asked for is a warning, not a failure."""
        result = check_storage(self.root, min_free=1 << 60)
        check = {c.name: c for c in result}[FREE_SPACE]
        self.assertIsNone(check.ok)
        self.assertTrue(check.detail.startswith("only "))

    def test_checkJson(self) -> None:
        """A check serialises as name, ok and detail."""
        self.assertEqual(Check("x", None, "y").to_json(), {"name": "x", "ok": None, "detail": "y"})


class CheckStorageCommandTests(TempRoot, TestCase):
    """C{imgresume check-storage} as a subprocess."""

    def test_table(self) -> None:
        """On a usable directory: a table of checks and exit status 0."""
        proc = imgresume("check-storage", "--storage", self.root)
        self.assertEqual(proc.returncode, 0, proc.stderr)
        lines = proc.stdout.splitlines()
        self.assertTrue(any(line.startswith(HARD_LINK) and " ok " in line for line in lines))
        self.assertIn("storage usable", lines[-1])

    def test_json(self) -> None:
        """--json prints one object with every check."""
        proc = imgresume("check-storage", "--storage", self.root, "--json")
        self.assertEqual(proc.returncode, 0, proc.stderr)
        data = json.loads(proc.stdout)
        self.assertTrue(data["ok"])
        self.assertIn(LOCK_CHILD, [c["name"] for c in data["checks"]])

    def test_failure(self) -> None:
        """A failed fatal check: FAIL in the table and exit status 1."""
        proc = imgresume("check-storage", "--storage", UNUSABLE)
        self.assertEqual(proc.returncode, 1, proc.stderr)
        self.assertIn("FAIL", proc.stdout)
        self.assertIn("failed", proc.stdout.splitlines()[-1])

    def test_usage(self) -> None:
        """Without --storage: a usage error, with examples in the help."""
        proc = imgresume("check-storage")
        self.assertEqual(proc.returncode, 2)
        self.assertIn("--storage DIR is required", proc.stderr)
        self.assertIn("imgresume check-storage --storage /mnt/shared", proc.stderr)


class GcCommandTests(TempRoot, TestCase):
    """C{imgresume gc} as a subprocess, on uploads made in this process."""

    def abandoned(self) -> str:
        storage = FilesystemStorage(self.root, sync_run)
        writer = self.successResultOf(storage.create(request(name="old.tiff")))
        self.successResultOf(writer.write(0, PAYLOAD[:4000]))
        self.successResultOf(writer.release())
        upload_id = writer.info.upload_id
        when = time.time() - 3 * 86400
        d = os.path.join(self.root, "incoming", upload_id)
        for name in os.listdir(d):
            os.utime(os.path.join(d, name), (when, when))
        return upload_id

    def test_dryRunJson(self) -> None:
        """--dry-run --json reports the abandoned upload and removes nothing."""
        upload_id = self.abandoned()
        proc = imgresume("gc", "--storage", self.root, "--older-than", "2d",
                         "--dry-run", "--json")
        self.assertEqual(proc.returncode, 0, proc.stderr)
        report = json.loads(proc.stdout)
        self.assertTrue(report["dry_run"])
        [entry] = report["removed"]
        self.assertEqual((entry["upload_id"], entry["name"], entry["action"]),
                         (upload_id, "old.tiff", "expired-partial"))
        self.assertGreater(report["bytes_freed"], 4000)
        self.assertTrue(os.path.exists(os.path.join(self.root, "incoming", upload_id)))

    def test_removes(self) -> None:
        """Without --dry-run it removes, and prints each upload with size and age."""
        upload_id = self.abandoned()
        proc = imgresume("gc", "--storage", self.root, "--older-than", "2d")
        self.assertEqual(proc.returncode, 0, proc.stderr)
        first, last = proc.stdout.splitlines()
        self.assertIn(upload_id, first)
        self.assertIn("old.tiff", first)
        self.assertIn("3.0 d", first)
        self.assertTrue(last.startswith("1 removed"), last)
        self.assertFalse(os.path.exists(os.path.join(self.root, "incoming", upload_id)))

    def test_keepsYoungUploads(self) -> None:
        """An upload younger than --older-than stays."""
        upload_id = self.abandoned()
        proc = imgresume("gc", "--storage", self.root, "--older-than", "4d")
        self.assertEqual(proc.returncode, 0, proc.stderr)
        self.assertTrue(proc.stdout.startswith("0 removed"), proc.stdout)
        self.assertTrue(os.path.exists(os.path.join(self.root, "incoming", upload_id)))

    def test_usage(self) -> None:
        """--older-than is required; its help has examples."""
        proc = imgresume("gc", "--storage", self.root)
        self.assertEqual(proc.returncode, 2)
        self.assertIn("--older-than DURATION is required", proc.stderr)
        self.assertIn("imgresume gc --storage /srv/imgresume --older-than 7d --dry-run",
                      proc.stderr)


class ServerStorageCheckTests(TestCase):
    """The server runs the self-test before it starts."""

    def options(self, *args: str, storage: str | None = None) -> ServerOptions:
        if storage is None:
            storage = tempfile.mkdtemp(prefix="imgresume-selftest-")
            self.addCleanup(shutil.rmtree, storage, True)
        options = ServerOptions()
        options.parseOptions(["--storage", storage, "--listen", "tcp:0:interface=127.0.0.1", *args])
        return options

    def test_refusesOnFatalCheck(self) -> None:
        """makeService exits with the failed checks named when a fatal check fails."""
        self.patch(_storagecheck, "check_storage", lambda root: [
            Check(HARD_LINK, False, "cannot link a file: Operation not permitted"),
            Check(FSYNC_DIRECTORY, None, "EINVAL"),
        ])
        e = self.assertRaises(SystemExit, makeService, self.options())
        self.assertIn("storage self-test failed", str(e.code))
        self.assertIn("hard link: cannot link a file", str(e.code))
        self.assertNotIn("EINVAL", str(e.code))

    def test_warningsLogged(self) -> None:
        """Warnings do not stop the server; each is logged."""
        events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        self.patch(_storagecheck, "check_storage", lambda root: [
            Check(FSYNC_DIRECTORY, None, "cannot fsync a directory"),
        ])
        service = makeService(self.options())
        self.assertIsNotNone(service.getServiceNamed("gc"))
        [warning] = [e for e in events if e.get("check") == FSYNC_DIRECTORY]
        self.assertEqual(warning["detail"], "cannot fsync a directory")

    def test_skip(self) -> None:
        """--skip-storage-check does not run the self-test."""
        ran = []
        self.patch(_storagecheck, "check_storage", lambda root: ran.append(root) or [])
        makeService(self.options("--skip-storage-check"))
        self.assertEqual(ran, [])

    def test_twistdRefusesUnusableStorage(self) -> None:
        """
        A real C{twistd imgresume} on a directory where nothing can be
        created exits non-zero before listening, saying why on stderr; with
        --skip-storage-check it starts.
        """
        work = tempfile.mkdtemp(prefix="imgr-")
        self.addCleanup(shutil.rmtree, work, True)
        sock = os.path.join(work, "s.sock")
        argv = twistd_argv("--logfile", os.path.join(work, "log"), "imgresume",
                           "--listen", f"unix:{sock}", "--storage", UNUSABLE)
        proc = subprocess.run(argv, env=child_env(), capture_output=True, text=True,
                              timeout=60, cwd=work)
        self.assertNotEqual(proc.returncode, 0)
        self.assertIn("storage self-test failed for /proc", proc.stderr)
        self.assertIn("scratch directory: cannot create a directory in /proc", proc.stderr)
        self.assertFalse(os.path.exists(sock))

        server = subprocess.Popen(argv + ["--skip-storage-check"], env=child_env(), cwd=work,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.addCleanup(server.wait)
        self.addCleanup(server.terminate)
        wait_until_connectable(sock, proc=server)

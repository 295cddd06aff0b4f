# -*- test-case-name: tests.storage.test_maintenance -*-
"""
Tests for L{imgresume.storage.filesystem.gc} (garbage collection of abandoned
uploads), for the server's L{GarbageCollectorService}, and, on real
processes, for a C{twistd imgresume} server that expires an abandoned
upload and keeps a completed file.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from typing import Any

from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.internet.testing import EventLoggingObserver, MemoryReactorClock
from twisted.logger import globalLogPublisher
from twisted.python import usage
from twisted.trial.unittest import TestCase

from imgresume.testing import LocalCluster
from imgresume.errors import StorageError, UnknownUpload, UploadAlreadyComplete
from imgresume.names import new_upload_id
from imgresume.protocol import ChunkAcked, ClientConnection, ErrorReceived, Upload
from imgresume.protocol import UploadAccepted, UploadCompleted, Welcomed
from imgresume.server import make_server_service
from imgresume.server._gc import GarbageCollectorService
from imgresume.server.tap import Options as ServerOptions
from imgresume.storage.filesystem import FilesystemStorage, _locks, _publish
from imgresume.storage.filesystem.gc import (
    BUSY,
    COMPLETING,
    EXPIRED_PARTIAL,
    EXPIRED_RECORD,
    FRESH_INCOMPLETE,
    FRESH_PARTIAL,
    INCOMPLETE_CREATE,
    RECENT_RECORD,
    STALE_SCRATCH,
    STRAY_TEMP,
    GcReport,
    collect_garbage,
)
from tests.support.processes import child_env
from tests.support.runners import sync_run
from tests.support.storage_conformance import PAYLOAD, request

HOUR = 3600.0
DAY = 86400.0


class StorageFixture:
    """A L{FilesystemStorage} in a fresh temporary root, and ways to age it."""

    def setUp(self) -> None:
        self.root = tempfile.mkdtemp(prefix="imgresume-gc-")
        self.addCleanup(shutil.rmtree, self.root, True)
        self.storage = FilesystemStorage(self.root, sync_run)

    def udir(self, upload_id: str) -> str:
        return os.path.join(self.root, "incoming", upload_id)

    def create(self, data: bytes = PAYLOAD, name: str = "a.tiff"):
        return self.successResultOf(self.storage.create(request(data, name)))

    def partial(self, data: bytes = PAYLOAD, upto: int = 5000, name: str = "a.tiff") -> str:
        """An upload with C{data[:upto]} written, released by its writer."""
        writer = self.create(data, name)
        self.successResultOf(writer.write(0, data[:upto]))
        self.successResultOf(writer.release())
        return writer.info.upload_id

    def completed(self, data: bytes = PAYLOAD, name: str = "done.tiff"):
        writer = self.create(data, name)
        self.successResultOf(writer.write(0, data))
        return writer.info.upload_id, self.successResultOf(writer.complete())

    def age(self, path: str, seconds: float) -> None:
        """Set the times of C{path} and, for a directory, of all it holds."""
        when = time.time() - seconds
        if os.path.isdir(path):
            for entry in os.listdir(path):
                os.utime(os.path.join(path, entry), (when, when))
        os.utime(path, (when, when))

    def gc(self, older_than: float = HOUR, **kw: Any) -> GcReport:
        return collect_garbage(self.root, older_than, **kw)

    def actions(self, entries) -> dict[str, str]:
        return {e.upload_id: e.action for e in entries}


class CollectGarbageTests(StorageFixture, TestCase):
    """L{collect_garbage} on uploads made by a real L{FilesystemStorage}."""

    def test_expiredPartialRemoved(self) -> None:
        """A partial upload untouched for longer than the threshold is removed."""
        upload_id = self.partial(upto=5000)
        self.age(self.udir(upload_id), 2 * HOUR)
        report = self.gc()
        self.assertFalse(os.path.exists(self.udir(upload_id)))
        [entry] = report.removed
        self.assertEqual(entry.upload_id, upload_id)
        self.assertEqual(entry.name, "a.tiff")
        self.assertEqual(entry.action, EXPIRED_PARTIAL)
        self.assertGreaterEqual(entry.size, 5000)
        self.assertLess(abs(entry.age - 2 * HOUR), 60)
        self.assertEqual(report.bytes_freed, entry.size)
        self.assertEqual(report.skipped_busy, [])

    def test_freshPartialKept(self) -> None:
        """A partial upload touched recently is kept, and reported as such."""
        upload_id = self.partial()
        self.age(self.udir(upload_id), HOUR / 2)
        report = self.gc()
        self.assertTrue(os.path.exists(os.path.join(self.udir(upload_id), "meta.json")))
        self.assertEqual(report.removed, [])
        self.assertEqual(self.actions(report.kept), {upload_id: FRESH_PARTIAL})

    def test_newestFileCounts(self) -> None:
        """
        An upload is as young as its most recently changed file: an old
        meta.json and data with a fresh lease (a writer just took it) is kept.
        """
        upload_id = self.partial()
        self.age(self.udir(upload_id), 2 * HOUR)
        os.utime(os.path.join(self.udir(upload_id), "lease"))
        report = self.gc()
        self.assertEqual(self.actions(report.kept), {upload_id: FRESH_PARTIAL})

    def test_heldUploadSkipped(self) -> None:
        """
        An old upload whose writer still holds it is skipped, not removed;
        the writer goes on and completes it.
        """
        writer = self.create()
        self.successResultOf(writer.write(0, PAYLOAD[:3000]))
        upload_id = writer.info.upload_id
        self.age(self.udir(upload_id), 2 * DAY)
        report = self.gc(older_than=0)
        self.assertEqual(report.removed, [])
        self.assertEqual(self.actions(report.skipped_busy), {upload_id: BUSY})
        self.successResultOf(writer.write(3000, PAYLOAD[3000:]))
        completed = self.successResultOf(writer.complete())
        with open(os.path.join(self.root, completed.path), "rb") as f:
            self.assertEqual(f.read(), PAYLOAD)

    def test_heldByAnotherProcessSkipped(self) -> None:
        """An upload locked by another process (another server) is skipped."""
        upload_id = self.partial()
        self.age(self.udir(upload_id), 2 * DAY)
        child = subprocess.Popen(
            [sys.executable, "-c",
             "import sys\n"
             "from imgresume.storage.filesystem._locks import acquire as _acquire\n"
             "lock = _acquire(sys.argv[1], 'x', 1.0)\n"
             "print('held', flush=True)\n"
             "sys.stdin.read()\n",
             os.path.join(self.udir(upload_id), "lock")],
            env=child_env(), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        )
        self.addCleanup(child.wait)
        self.addCleanup(child.stdin.close)
        self.assertEqual(child.stdout.readline(), b"held\n")
        child.stdout.close()
        report = self.gc()
        self.assertEqual(self.actions(report.skipped_busy), {upload_id: BUSY})
        self.assertTrue(os.path.exists(os.path.join(self.udir(upload_id), "meta.json")))

    def test_completedFileNeverTouched(self) -> None:
        """
        However old, a completed file under complete/ stays, byte for byte,
        even when its record in incoming/ expires and is removed.
        """
        upload_id, completed = self.completed()
        final = os.path.join(self.root, completed.path)
        self.age(final, 90 * DAY)
        self.age(self.udir(upload_id), 90 * DAY)
        report = self.gc(older_than=0)
        self.assertEqual(self.actions(report.removed), {upload_id: EXPIRED_RECORD})
        with open(final, "rb") as f:
            self.assertEqual(f.read(), PAYLOAD)
        self.assertEqual(os.listdir(os.path.join(self.root, "complete")), ["done.tiff"])
        # The completed file's bytes were not counted as freed.
        self.assertLess(report.bytes_freed, len(PAYLOAD))

    def test_recordKeptUntilItsOwnThreshold(self) -> None:
        """
        The record of a completed upload outlives the partial-upload
        threshold (a resume still answers "already complete") and is removed
        only after its own, longer one.
        """
        upload_id, completed = self.completed()
        self.age(self.udir(upload_id), 10 * DAY)
        report = self.gc(older_than=HOUR)
        self.assertEqual(self.actions(report.kept), {upload_id: RECENT_RECORD})
        f = self.failureResultOf(self.storage.resume(upload_id), UploadAlreadyComplete)
        self.assertEqual(f.value.completed, completed)
        report = self.gc(older_than=HOUR, completed_records_older_than=5 * DAY)
        self.assertEqual(self.actions(report.removed), {upload_id: EXPIRED_RECORD})
        self.failureResultOf(self.storage.resume(upload_id), UnknownUpload)
        self.assertTrue(os.path.exists(os.path.join(self.root, completed.path)))

    def test_completingLeftAndReported(self) -> None:
        """
        An upload caught between "completing" and "complete" is never
        removed, however old; it is reported, and a resume finishes it.
        """
        writer = self.create(name="c.tiff")
        self.successResultOf(writer.write(0, PAYLOAD))

        def broken_link(*args, **kwargs):
            raise OSError(errno.EIO, "Input/output error")

        self.patch(_publish, "_link", broken_link)
        self.failureResultOf(writer.complete(), StorageError)
        self.successResultOf(writer.release())
        upload_id = writer.info.upload_id
        with open(os.path.join(self.udir(upload_id), "meta.json")) as f:
            self.assertEqual(json.load(f)["state"], "completing")
        self.age(self.udir(upload_id), 90 * DAY)
        report = self.gc(older_than=0, completed_records_older_than=0)
        self.assertEqual(report.removed, [])
        self.assertEqual(self.actions(report.kept), {upload_id: COMPLETING})
        self.patch(_publish, "_link", os.link)
        f = self.failureResultOf(self.storage.resume(upload_id), UploadAlreadyComplete)
        with open(os.path.join(self.root, f.value.completed.path), "rb") as data:
            self.assertEqual(data.read(), PAYLOAD)

    def test_dryRunRemovesNothingReportsTheSame(self) -> None:
        """A dry run reports exactly what a real run then removes, and removes nothing."""
        old = self.partial(upto=4000)
        fresh = self.partial(upto=1000, name="b.tiff")
        orphan = self.incompleteCreate()
        self.age(self.udir(old), 2 * HOUR)
        self.age(self.udir(orphan), 2 * HOUR)
        tmp = self.strayTemp(fresh, 2 * HOUR)
        before = sorted(self.walk())
        now = time.time()
        dry = self.gc(dry_run=True, now=now)
        self.assertEqual(sorted(self.walk()), before)
        self.assertTrue(dry.dry_run)
        real = self.gc(now=now)
        self.assertFalse(real.dry_run)
        self.assertEqual(dry.removed, real.removed)
        self.assertEqual(dry.kept, real.kept)
        self.assertEqual(dry.bytes_freed, real.bytes_freed)
        self.assertEqual(
            sorted((e.upload_id, e.action) for e in real.removed),
            sorted([(old, EXPIRED_PARTIAL), (orphan, INCOMPLETE_CREATE), (fresh, STRAY_TEMP)]),
        )
        self.assertFalse(os.path.exists(tmp))
        self.assertTrue(os.path.exists(self.udir(fresh)))

    def incompleteCreate(self) -> str:
        """A directory as a crash during create leaves it: files, no meta.json."""
        upload_id = new_upload_id()
        d = self.udir(upload_id)
        os.makedirs(d)
        for name in ("lock", "data", "journal"):
            with open(os.path.join(d, name), "wb") as f:
                f.write(b"x" * 10 if name == "data" else b"")
        return upload_id

    def strayTemp(self, upload_id: str, age: float) -> str:
        path = os.path.join(self.udir(upload_id), f".meta.json.{os.urandom(6).hex()}.tmp")
        with open(path, "wb") as f:
            f.write(b"{}")
        self.age(path, age)
        return path

    def walk(self) -> list[str]:
        return [os.path.join(d, f) for d, _, files in os.walk(self.root) for f in files]

    def test_incompleteCreateCleaned(self) -> None:
        """
        Upload directories without meta.json (a crash during create) are
        removed once old; a young one (a create in progress) is kept.
        """
        old = self.incompleteCreate()
        young = self.incompleteCreate()
        self.age(self.udir(old), 2 * HOUR)
        report = self.gc()
        self.assertEqual(self.actions(report.removed), {old: INCOMPLETE_CREATE})
        self.assertEqual(report.removed[0].size, 10)
        self.assertEqual(self.actions(report.kept), {young: FRESH_INCOMPLETE})
        self.assertFalse(os.path.exists(self.udir(old)))
        self.assertTrue(os.path.exists(self.udir(young)))

    def test_incompleteCreateLockedSkipped(self) -> None:
        """A directory without meta.json whose lock is held (a slow create) is skipped."""
        upload_id = self.incompleteCreate()
        self.age(self.udir(upload_id), 2 * HOUR)
        lock = _locks.acquire(os.path.join(self.udir(upload_id), "lock"), upload_id, 1)
        self.addCleanup(lock.release)
        report = self.gc()
        self.assertEqual(self.actions(report.skipped_busy), {upload_id: BUSY})
        self.assertTrue(os.path.exists(self.udir(upload_id)))

    def test_strayTempFilesCleaned(self) -> None:
        """Old temporary files of atomic rewrites go; young ones and their upload stay."""
        upload_id = self.partial()
        old = self.strayTemp(upload_id, 2 * HOUR)
        young = self.strayTemp(upload_id, 60)
        report = self.gc()
        self.assertEqual([(e.upload_id, e.action) for e in report.removed],
                         [(upload_id, STRAY_TEMP)])
        self.assertEqual(report.removed[0].name,
                         f"incoming/{upload_id}/{os.path.basename(old)}")
        self.assertFalse(os.path.exists(old))
        self.assertTrue(os.path.exists(young))
        self.assertEqual(self.actions(report.kept), {upload_id: FRESH_PARTIAL})
        writer = self.successResultOf(self.storage.resume(upload_id))
        self.assertEqual(writer.offset, 5000)
        self.successResultOf(writer.release())

    def test_removedUploadIsUnknown(self) -> None:
        """A resume of a removed upload answers UnknownUpload, from any instance."""
        upload_id = self.partial()
        self.age(self.udir(upload_id), 2 * DAY)
        self.gc()
        self.failureResultOf(self.storage.resume(upload_id), UnknownUpload)
        other = FilesystemStorage(self.root, sync_run)
        self.failureResultOf(other.resume(upload_id), UnknownUpload)

    def test_removalOrderMetaFirst(self) -> None:
        """
        meta.json is the first file removed, under the lock: an upload half
        removed (here: the rest refuses to go) is unknown, never resumable.
        """
        upload_id = self.partial()
        self.age(self.udir(upload_id), 2 * DAY)
        removed: list[str] = []
        held: list[bool] = []
        real_unlink = os.unlink

        def unlink(path, *args, **kwargs):
            if os.path.dirname(path) == self.udir(upload_id):
                removed.append(os.path.basename(path))
                lock = os.path.join(self.udir(upload_id), "lock")
                probe = os.open(lock, os.O_RDWR) if os.path.exists(lock) else None
                if probe is not None:
                    held.append(not _locks.try_lock(probe))
                    os.close(probe)
                if os.path.basename(path) == "data":
                    raise OSError(errno.EIO, "Input/output error")
            return real_unlink(path, *args, **kwargs)

        self.patch(os, "unlink", unlink)
        report = self.gc()
        self.assertEqual(removed[:2], ["meta.json", "data"])
        self.assertTrue(all(held))
        self.assertEqual(report.removed, [])
        [error] = report.kept
        self.assertEqual(error.action, "error")
        self.assertIn("Input/output error", error.detail)
        self.failureResultOf(self.storage.resume(upload_id), UnknownUpload)
        # The next run, unpatched, finishes the job.
        self.patch(os, "unlink", real_unlink)
        self.age(self.udir(upload_id), 2 * DAY)
        report = self.gc()
        self.assertEqual(self.actions(report.removed), {upload_id: INCOMPLETE_CREATE})
        self.assertFalse(os.path.exists(self.udir(upload_id)))

    def test_foreignEntriesIgnored(self) -> None:
        """Entries of incoming/ that are not upload directories are left alone."""
        os.makedirs(os.path.join(self.root, "incoming", "lost+found"))
        with open(os.path.join(self.root, "incoming", new_upload_id()), "wb") as f:
            f.write(b"a file named like an id")
        for name in os.listdir(os.path.join(self.root, "incoming")):
            self.age(os.path.join(self.root, "incoming", name), 90 * DAY)
        before = sorted(os.listdir(os.path.join(self.root, "incoming")))
        report = self.gc(older_than=0, completed_records_older_than=0)
        self.assertEqual(report.removed + report.kept + report.skipped_busy, [])
        self.assertEqual(sorted(os.listdir(os.path.join(self.root, "incoming"))), before)

    def test_staleScratchDirectory(self) -> None:
        """A self-test scratch directory left by a killed self-test goes after an hour."""
        old = os.path.join(self.root, ".selftest-0123456789ab")
        young = os.path.join(self.root, ".selftest-ba9876543210")
        for d in (old, young):
            os.mkdir(d)
            with open(os.path.join(d, "lock"), "wb"):
                pass
        self.age(old, 2 * HOUR)
        self.age(young, HOUR / 2)
        report = self.gc(older_than=1)
        self.assertEqual(self.actions(report.removed), {".selftest-0123456789ab": STALE_SCRATCH})
        self.assertFalse(os.path.exists(old))
        self.assertTrue(os.path.exists(young))

    def test_logEventPerRemoval(self) -> None:
        """One log event per removed upload, with its id, name, size and age."""
        ids = [self.partial(name=f"{i}.tiff") for i in range(2)]
        for upload_id in ids:
            self.age(self.udir(upload_id), 2 * DAY)
        events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        self.gc()
        removed = [e for e in events if e.get("action") == EXPIRED_PARTIAL]
        self.assertEqual(sorted(e["upload_id"] for e in removed), sorted(ids))
        for e in removed:
            self.assertIn(e["upload_id"], e["log_format"].format(**e))
            self.assertGreater(e["size"], 0)

    def test_emptyOrMissingStorage(self) -> None:
        """A storage root nothing was ever uploaded to gives an empty report."""
        report = self.gc()
        self.assertEqual((report.removed, report.kept, report.skipped_busy), ([], [], []))

    def test_negativeAgeRefused(self) -> None:
        """A negative threshold is a mistake, not "remove everything"."""
        self.assertRaises(ValueError, self.gc, older_than=-1)
        self.assertRaises(ValueError, self.gc, completed_records_older_than=-1)

    def test_stopEndsRunEarly(self) -> None:
        """C{stop} returning true ends the run before the next upload."""
        upload_id = self.partial()
        self.age(self.udir(upload_id), 2 * DAY)
        report = self.gc(stop=lambda: True)
        self.assertEqual(report.removed, [])
        self.assertTrue(os.path.exists(self.udir(upload_id)))

    def test_jsonReport(self) -> None:
        """The report serialises to JSON with every entry's fields."""
        upload_id = self.partial()
        self.age(self.udir(upload_id), 2 * DAY)
        data = json.loads(json.dumps(self.gc(dry_run=True).to_json()))
        self.assertTrue(data["dry_run"])
        [entry] = data["removed"]
        self.assertEqual(entry["upload_id"], upload_id)
        self.assertEqual(
            set(entry), {"upload_id", "name", "size", "age", "action", "detail"}
        )


class GarbageCollectorServiceTests(TestCase):
    """L{GarbageCollectorService}: periodic, never overlapping, surviving errors."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.calls: list[tuple[Any, tuple, dict]] = []
        self.pending: list[defer.Deferred] = []

    def runner(self, f, *args, **kwargs):
        """The disk runner: records the call and returns an unfired Deferred."""
        self.calls.append((f, args, kwargs))
        d: defer.Deferred = defer.Deferred()
        self.pending.append(d)
        return d

    def service(self) -> GarbageCollectorService:
        service = GarbageCollectorService("/storage", self.runner, self.clock, 10, 60, 600)
        service.startService()
        return service

    def report(self) -> GcReport:
        return GcReport("/storage", 60, 600, False, 0.0)

    def test_runsEveryIntervalOnTheRunner(self) -> None:
        """
        Every interval, C{collect_garbage} is handed to the runner (the disk
        thread pool) with the thresholds; the first run is one interval in.
        """
        service = self.service()
        self.assertEqual(self.calls, [])
        self.clock.advance(10)
        [(f, args, kwargs)] = self.calls
        self.assertIs(f, collect_garbage)
        self.assertEqual(args, ("/storage", 60))
        self.assertEqual(kwargs["completed_records_older_than"], 600)
        self.assertFalse(kwargs["stop"]())
        self.pending[0].callback(self.report())
        self.assertIsNotNone(service.last)
        self.clock.advance(10)
        self.assertEqual(len(self.calls), 2)

    def test_neverOverlaps(self) -> None:
        """A run still going when the next is due is not joined by another."""
        self.service()
        self.clock.advance(10)
        self.clock.pump([10] * 5)
        self.assertEqual(len(self.calls), 1)
        self.pending[0].callback(self.report())
        self.clock.advance(10)
        self.assertEqual(len(self.calls), 2)

    def test_survivesErrors(self) -> None:
        """A failed run is logged; the next one happens as usual."""
        events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        self.service()
        self.clock.advance(10)
        self.pending[0].errback(OSError(errno.EIO, "Input/output error"))
        self.assertEqual(len(self.flushLoggedErrors(OSError)), 1)
        self.assertTrue(any("gc: garbage collection failed" in e["log_format"] for e in events))
        self.clock.advance(10)
        self.assertEqual(len(self.calls), 2)

    def test_summaryLogged(self) -> None:
        """Each finished run logs one summary event."""
        events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        self.service()
        self.clock.advance(10)
        report = self.report()
        report.bytes_freed = 2048
        self.pending[0].callback(report)
        [summary] = [e for e in events if "bytes_freed" in e]
        self.assertEqual(summary["bytes_freed"], 2048)
        self.assertEqual(summary["freed"], "2.0 KiB")

    def test_stopWaitsForTheRunAndEndsIt(self) -> None:
        """
        Stopping asks a run in progress to end early and waits for it; no
        run starts afterwards.
        """
        service = self.service()
        self.clock.advance(10)
        stopped = service.stopService()
        self.assertNoResult(stopped)
        self.assertTrue(self.calls[0][2]["stop"]())
        self.pending[0].callback(self.report())
        self.successResultOf(stopped)
        self.clock.advance(100)
        self.assertEqual(len(self.calls), 1)

    def test_stopDoesNotWaitForever(self) -> None:
        """A run stuck on the filesystem holds up shutdown for stop_grace seconds only."""
        service = self.service()
        self.clock.advance(10)
        stopped = service.stopService()
        self.clock.advance(service.stop_grace - 1)
        self.assertNoResult(stopped)
        self.clock.advance(1)
        self.successResultOf(stopped)
        self.pending[0].callback(self.report())

    def test_zeroIntervalRefused(self) -> None:
        """An interval of 0 is "disabled", which the server handles by not building one."""
        self.assertRaises(ValueError, GarbageCollectorService, "/s", self.runner, self.clock, 0, 1)

    def test_makeServerService(self) -> None:
        """
        A server on a storage directory has a C{gc} service on its thread
        pool; C{gc_interval=0} leaves it out.
        """
        root = tempfile.mkdtemp(prefix="imgresume-gc-")
        self.addCleanup(shutil.rmtree, root, True)
        reactor = MemoryReactorClock()
        top = make_server_service("tcp:0", root, reactor=reactor, gc_interval=30,
                                expire_after=120, expire_records_after=3600)
        gc = top.getServiceNamed("gc")
        self.assertIs(gc, top.gc)
        self.assertEqual((gc.interval, gc.expire_after, gc.expire_records_after),
                         (30, 120, 3600))
        self.assertEqual(gc.root, os.path.abspath(root))
        top = make_server_service("tcp:0", root, reactor=reactor, gc_interval=0)
        self.assertIsNone(top.gc)
        self.assertNotIn("gc", [s.name for s in top])


class ServerOptionsTests(TestCase):
    """The garbage-collection options of C{twistd imgresume}."""

    def parse(self, *args: str) -> ServerOptions:
        root = tempfile.mkdtemp(prefix="imgresume-gc-")
        self.addCleanup(shutil.rmtree, root, True)
        options = ServerOptions()
        options.parseOptions(["--storage", root, *args])
        return options

    def test_defaults(self) -> None:
        """Every 15 minutes, partial uploads after 7 days, records after 30."""
        options = self.parse()
        self.assertEqual(options["gc-interval"], 900)
        self.assertEqual(options["expire-after"], 7 * DAY)
        self.assertEqual(options["expire-records-after"], 30 * DAY)
        self.assertFalse(options["skip-storage-check"])

    def test_durations(self) -> None:
        """The options take durations; --gc-interval 0 disables collection."""
        options = self.parse("--gc-interval", "0", "--expire-after", "36h")
        self.assertEqual(options["gc-interval"], 0)
        self.assertEqual(options["expire-after"], 36 * HOUR)

    def test_invalid(self) -> None:
        """A zero expiry, or a value that is no duration, is a usage error."""
        self.assertRaises(usage.UsageError, self.parse, "--expire-after", "0")
        self.assertRaises(usage.UsageError, self.parse, "--gc-interval", "often")

    def test_helpMentionsOptions(self) -> None:
        """--help documents the new options."""
        text = ServerOptions().getUsage()
        for option in ("--gc-interval", "--expire-after", "--skip-storage-check"):
            self.assertIn(option, text)


class BlockingClient:
    """A blocking client over a UNIX socket, driving the sans-IO machine."""

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.settimeout(15)
        self.sock.connect(path)
        self.machine = ClientConnection("gc-test")
        self.machine.hello()
        self.flush()
        self.welcome = self.wait(Welcomed).welcome

    def flush(self) -> None:
        for chunk in self.machine.data_to_send():
            self.sock.sendall(chunk)

    def wait(self, kind: type) -> Any:
        while True:
            event = self.machine.next_event()
            if event is None:
                data = self.sock.recv(65536)
                if not data:
                    raise ConnectionError("server closed the connection")
                self.machine.receive_data(data)
            elif isinstance(event, ErrorReceived):
                raise event.error
            elif isinstance(event, kind):
                return event

    def upload(self, name: str, content: bytes, upto: int | None = None) -> str:
        """Send C{content[:upto]}; with no C{upto}, all of it and complete."""
        self.machine.upload(Upload(name, len(content), hashlib.sha256(content).digest()))
        self.flush()
        accepted = self.wait(UploadAccepted).accepted
        end = len(content) if upto is None else upto
        step = min(64 * 1024, self.welcome.max_payload)
        for pos in range(0, end, step):
            self.machine.send_data(pos, content[pos : min(end, pos + step)])
            self.flush()
            self.wait(ChunkAcked)
        if upto is None:
            self.machine.finish()
            self.flush()
            self.wait(UploadCompleted)
        return accepted.upload_id

    def close(self) -> None:
        self.sock.close()


class ServerExpiresUploadsTests(TestCase):
    """A real C{twistd imgresume} process collects garbage as configured."""

    timeout = 60

    def test_abandonedUploadRemovedCompletedKept(self) -> None:
        """
        With --gc-interval 0.5s --expire-after 1s, a partial upload is kept
        while its client's connection holds it, and removed within seconds
        of the client being cut off; a completed file (and its record) stay.
        """
        work = tempfile.mkdtemp(prefix="imgresume-gc-")
        self.addCleanup(shutil.rmtree, work, True)
        cluster = LocalCluster(
            work, servers=1, server_args=["--gc-interval", "0.5s", "--expire-after", "1s"]
        )
        self.addCleanup(cluster.stop)
        node = cluster.servers["node-1"]
        cluster.start_node(node)
        storage = cluster.storage

        done = os.urandom(300 * 1024)
        client = BlockingClient(node.address)
        done_id = client.upload("kept/done.tif", done)
        cut = os.urandom(1024 * 1024)
        partial_id = client.upload("cut.tif", cut, upto=256 * 1024)
        partial_dir = os.path.join(storage, "incoming", partial_id)

        # Idle for longer than --expire-after, but the connection holds it.
        time.sleep(2.5)
        self.assertTrue(os.path.exists(os.path.join(partial_dir, "meta.json")))

        client.close()  # cut off
        deadline = time.monotonic() + 15
        while os.path.exists(partial_dir) and time.monotonic() < deadline:
            time.sleep(0.1)
        self.assertFalse(os.path.exists(partial_dir), "abandoned upload not removed")

        with open(os.path.join(storage, "complete", "kept", "done.tif"), "rb") as f:
            self.assertEqual(hashlib.sha256(f.read()).digest(), hashlib.sha256(done).digest())
        with open(os.path.join(storage, "incoming", done_id, "meta.json")) as f:
            self.assertEqual(json.load(f)["state"], "complete")
        # The event is logged just after the removal: wait for it too.
        expected = f"removed abandoned partial upload {partial_id}"
        while True:
            with open(node.log) as f:
                log = f.read()
            if expected in log or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        self.assertIn("storage self-test of", log)
        self.assertIn(expected, log)
        self.assertNotIn(f"record of a completed upload {done_id}", log)

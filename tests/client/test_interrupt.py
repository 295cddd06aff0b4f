# -*- test-case-name: tests.client.test_interrupt -*-
"""
Tests for interrupted uploads in the library (issue 12, item 1):
L{Uploader.interrupt} stops the uploads under way (each fails with
L{UploadInterrupted}, naming the signal, the upload and the bytes the server
acknowledged), refuses new ones, fails a batch with its result so far, and
waits for the journal; a real reactor's shutdown does the same through a
C{before shutdown} trigger that the uploader holds only while uploads run.
Against a real server protocol over an in-memory storage, through
L{iosim}, on one fake clock.
"""

from __future__ import annotations

import os
import random
import signal
from typing import Any

from zope.interface import implementer

from twisted.internet.interfaces import IReactorCore
from twisted.trial.unittest import SynchronousTestCase

from imgresume.client import (
    BatchItem,
    FileOutcome,
    Journal,
    Progress,
    UploadFailed,
    UploadInterrupted,
    Uploader,
)
from tests.support.memorynet import InstantReactor, MemoryNetwork
from tests.support.runners import sync_run

CHUNK = 4096


@implementer(IReactorCore)
class ShutdownReactor(InstantReactor):
    """An L{InstantReactor} that keeps system event triggers, so a test can fire them."""

    def __init__(self) -> None:
        super().__init__()
        self.triggers: dict[object, tuple[str, str, Any]] = {}

    def addSystemEventTrigger(self, phase: str, event: str, f: Any, *args: Any) -> object:
        key = object()
        self.triggers[key] = (phase, event, f)
        return key

    def removeSystemEventTrigger(self, key: object) -> None:
        del self.triggers[key]

    def shutdown_triggers(self) -> list[Any]:
        """The C{before shutdown} triggers now registered."""
        return [f for phase, event, f in self.triggers.values()
                if (phase, event) == ("before", "shutdown")]


class InterruptTestCase(SynchronousTestCase):
    """An uploader over a L{MemoryNetwork}, and files to upload."""

    def setUp(self) -> None:
        self.work = os.path.abspath(self.mktemp())
        os.makedirs(self.work)
        self.clock = ShutdownReactor()
        self.network = MemoryNetwork(self.clock)
        self.journal = Journal(os.path.join(self.work, "journal.json"))

    def uploader(self, **kwargs: Any) -> Uploader:
        kwargs.setdefault("journal", self.journal)
        return Uploader(self.network, reactor=self.clock, client_id="unit", run=sync_run,
                        chunk_size=CHUNK, window=1, backoff_base=0.01, backoff_max=0.1,
                        rng=random.Random(3), **kwargs)

    def file(self, name: str, size: int = 40 * CHUNK) -> str:
        path = os.path.join(self.work, name)
        with open(path, "wb") as f:
            f.write(random.Random(name).randbytes(size))
        return path

    def interrupt_at(self, uploader: Uploader, offset: int, number: int | None
                     ) -> Any:
        """A progress callback that interrupts C{uploader} once C{offset} is acknowledged."""
        done: list[Any] = []

        def progress(p: Progress) -> None:
            if p.phase == "uploading" and p.done >= offset and not done:
                done.append(self.clock.callLater(0, lambda: done.append(
                    uploader.interrupt(number))))

        progress.done = done  # type: ignore[attr-defined]
        return progress


class UploaderInterruptTests(InterruptTestCase):
    """L{Uploader.interrupt}."""

    def test_upload_under_way(self) -> None:
        """
        An upload interrupted mid-transfer fails with L{UploadInterrupted}
        (an L{UploadFailed}): the signal, the upload id, the bytes the
        server acknowledged; its connection is closed, the journal keeps the
        upload for a resume, and the Deferred interrupt() returned fires.
        A later upload on the interrupted uploader fails at once.
        """
        uploader = self.uploader()
        progress = self.interrupt_at(uploader, 10 * CHUNK, signal.SIGTERM)
        d = uploader.upload(self.file("a.tif"), progress=progress)
        with self.assertRaises(UploadInterrupted) as caught:
            self.network.run(d)
        e = caught.exception
        self.assertIsInstance(e, UploadFailed)
        self.assertEqual(e.signal, signal.SIGTERM)
        self.assertGreaterEqual(e.acknowledged, 10 * CHUNK)
        self.assertLess(e.acknowledged, 40 * CHUNK)
        self.assertIn("a.tif: interrupted by SIGTERM; the server acknowledged", str(e))
        [entry] = self.journal._load().values()
        self.assertEqual(entry["upload_id"], e.upload_id)
        self.successResultOf(progress.done[1])
        self.assertTrue(self.network.pumps[0].clientIO.disconnected)
        later = uploader.upload(self.file("b.tif"))
        failure = self.failureResultOf(later, UploadInterrupted)
        self.assertIsNone(failure.value.acknowledged)
        self.assertEqual(len(self.network.pumps), 1)  # nothing connected for it

    def test_resumes_after(self) -> None:
        """A new uploader resumes the interrupted upload from the journal."""
        uploader = self.uploader()
        path = self.file("a.tif")
        d = uploader.upload(path, progress=self.interrupt_at(uploader, 8 * CHUNK, None))
        with self.assertRaises(UploadInterrupted) as caught:
            self.network.run(d)
        self.assertIsNone(caught.exception.signal)
        result = self.network.run(self.uploader().upload(path))
        self.assertEqual(result.upload_id, caught.exception.upload_id)
        self.assertGreaterEqual(result.resumed_at[0], caught.exception.acknowledged)
        with open(path, "rb") as f:
            self.assertEqual(self.network.storage.read_completed(result.path), f.read())

    def test_batch(self) -> None:
        """
        An interrupted batch fails with L{UploadInterrupted} whose C{batch}
        holds what was done: the file stored before, the files interrupted
        (not reported to on_outcome, not counted as failed), the files not
        started.
        """
        uploader = self.uploader()
        paths = [self.file(f"f{i}.tif", (4 if i == 0 else 40) * CHUNK) for i in range(5)]
        reported: list[FileOutcome] = []
        progress = self.interrupt_at(uploader, 20 * CHUNK, signal.SIGINT)
        d = uploader.upload_batch(paths, parallel=2, on_outcome=reported.append,
                                  progress=progress)
        with self.assertRaises(UploadInterrupted) as caught:
            self.network.run(d)
        batch = caught.exception.batch
        self.assertEqual(caught.exception.signal, signal.SIGINT)
        self.assertIn("of 5 files unfinished", str(caught.exception))
        self.assertEqual([o.item.path for o in reported], [paths[0]])
        self.assertTrue(batch.outcomes[0].ok)
        self.assertEqual(batch.failed, [])
        self.assertEqual(len(batch.interrupted), 2)
        self.assertTrue(all(o.error.signal == signal.SIGINT for o in batch.interrupted))
        self.assertEqual(len(batch.outcomes) + len(batch.not_started), 5)
        self.assertEqual(batch.not_started, [BatchItem(p) for p in paths[3:]])

    def test_nothing_under_way(self) -> None:
        """interrupt() with nothing under way fires at once."""
        self.successResultOf(self.uploader().interrupt())


class ShutdownTests(InterruptTestCase):
    """A reactor's shutdown interrupts the uploads under way."""

    def test_trigger_only_while_uploading(self) -> None:
        """
        The uploader holds a C{before shutdown} trigger while an upload runs,
        and removes it when none does.
        """
        uploader = self.uploader()
        self.assertEqual(self.clock.shutdown_triggers(), [])
        d = uploader.upload(self.file("a.tif", 3 * CHUNK))
        self.assertEqual(len(self.clock.shutdown_triggers()), 1)
        self.network.run(d)
        self.assertEqual(self.clock.shutdown_triggers(), [])

    def test_shutdown(self) -> None:
        """
        Firing the trigger (as C{reactor.stop()} does) interrupts the upload
        under way; the trigger's Deferred, which the reactor waits for,
        fires once the upload stopped and the journal was written.
        """
        uploader = self.uploader()
        d = uploader.upload(self.file("a.tif"))
        for _ in range(30):  # some packets go out
            for pump in self.network.pumps:
                pump.pump()
        [trigger] = self.clock.shutdown_triggers()
        waited = trigger()
        with self.assertRaises(UploadInterrupted) as caught:
            self.network.run(d)
        self.assertIsNone(caught.exception.signal)
        self.successResultOf(waited)
        # Fired, it is the reactor's to forget (removing it would warn).
        self.assertEqual(self.clock.shutdown_triggers(), [trigger])

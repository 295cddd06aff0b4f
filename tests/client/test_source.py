# -*- test-case-name: tests.client.test_source -*-
"""
Tests for a local file that changes while it is uploaded (issue 12, item
2): L{LocalFile.check_unchanged} says what changed (size, modification
time, status-change time, the file at the path); an upload checks before
its end and before each resume, so a file appended to or rewritten during
the upload fails with L{SourceChanged} and is never completed on the
server.  Against a real server protocol over an in-memory storage, through
L{iosim}, on one fake clock.
"""

from __future__ import annotations

import os
import random
import time
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from imgresume.client import Progress, SourceChanged, UploadFailed, Uploader
from imgresume.client._source import LocalFile
from tests.support.memorynet import InstantReactor, MemoryNetwork
from tests.support.runners import sync_run

CHUNK = 4096


def later() -> None:
    """Let the filesystem's clock tick, so that a change gets new times."""
    time.sleep(0.05)


class CheckUnchangedTests(SynchronousTestCase):
    """L{LocalFile.check_unchanged} on a real file."""

    def setUp(self) -> None:
        self.path = os.path.abspath(self.mktemp())
        with open(self.path, "wb") as f:
            f.write(b"x" * 10_000)
        self.source = self.successResultOf(LocalFile.open(self.path, sync_run))
        self.addCleanup(self.source.close)
        later()

    def changed(self) -> str:
        """What check_unchanged says."""
        return str(self.failureResultOf(self.source.check_unchanged(), SourceChanged).value)

    def test_unchanged(self) -> None:
        """A file left alone (read, even) passes."""
        self.successResultOf(self.source.sha256())
        self.successResultOf(self.source.check_unchanged())

    def test_grew_and_shrank(self) -> None:
        """Appending or truncating changes the size."""
        with open(self.path, "ab") as f:
            f.write(b"y")
        self.assertEqual(self.changed(), "it grew from 10000 to 10001 bytes")
        os.truncate(self.path, 5)
        self.assertEqual(self.changed(), "it shrank from 10000 to 5 bytes")

    def test_rewritten(self) -> None:
        """Rewriting in place changes the modification time."""
        with open(self.path, "r+b") as f:
            f.write(b"z")
        self.assertEqual(self.changed(), "it was modified (its modification time changed)")

    def test_rewritten_mtime_restored(self) -> None:
        """Setting the modification time back after a rewrite changes the status-change time."""
        st = os.stat(self.path)
        with open(self.path, "r+b") as f:
            f.write(b"z")
        os.utime(self.path, ns=(st.st_atime_ns, st.st_mtime_ns))
        self.assertIn("its status-change time changed", self.changed())

    def test_replaced_and_removed(self) -> None:
        """Another file renamed over the path, or the path removed."""
        other = self.path + ".new"
        with open(other, "wb") as f:
            f.write(b"x" * 10_000)
        os.replace(other, self.path)
        self.assertIn("is now another file (replaced)", self.changed())
        os.unlink(self.path)
        self.assertIn("was removed or renamed", self.changed())


class UploadOfChangingFileTests(SynchronousTestCase):
    """An upload whose local file changes under it."""

    def setUp(self) -> None:
        self.work = os.path.abspath(self.mktemp())
        os.makedirs(self.work)
        self.clock = InstantReactor()
        self.network = MemoryNetwork(self.clock)
        self.path = os.path.join(self.work, "scan.tif")
        with open(self.path, "wb") as f:
            f.write(random.Random(1).randbytes(20 * CHUNK))
        later()

    def upload(self, change: Any, at: int, **kwargs: Any) -> UploadFailed:
        """Upload, calling C{change()} once C{at} bytes are acknowledged; the failure."""
        done: list[int] = []

        def progress(p: Progress) -> None:
            if p.phase == "uploading" and p.done >= at and not done:
                done.append(p.done)
                change()

        uploader = Uploader(self.network, reactor=self.clock, client_id="unit", run=sync_run,
                            journal=None, chunk_size=CHUNK, window=1, backoff_base=0.01,
                            **kwargs)
        with self.assertRaises(UploadFailed) as caught:
            self.network.run(uploader.upload(self.path, progress=progress))
        self.assertEqual(self.network.factory.metrics.uploads_completed.value(), 0)
        return caught.exception

    def test_appended(self) -> None:
        """
        Bytes appended mid-upload: the upload fails before its end (it was
        stored cut short and verified); no retry.
        """
        def append() -> None:
            with open(self.path, "ab") as f:
                f.write(b"more")

        failed = self.upload(append, 5 * CHUNK)
        self.assertIsInstance(failed.cause, SourceChanged)
        self.assertEqual(str(failed), f"scan.tif: source changed during upload: it grew from "
                                      f"{20 * CHUNK} to {20 * CHUNK + 4} bytes")
        self.assertEqual(len(self.network.pumps), 1)
        self.assertGreaterEqual(failed.acknowledged, 19 * CHUNK)

    def test_rewritten_ahead(self) -> None:
        """Bytes not yet sent rewritten in place: caught before the digest goes out."""
        def rewrite() -> None:
            with open(self.path, "r+b") as f:
                f.seek(15 * CHUNK)
                f.write(b"new bytes")

        failed = self.upload(rewrite, 2 * CHUNK)
        self.assertIn("source changed during upload: it was modified", str(failed))

    def test_changed_before_resume(self) -> None:
        """
        The connection breaks and the file changes before the resume: the
        resume is not made, the upload fails as a changed source.
        """
        def cut_and_change() -> None:
            self.network.cut()
            with open(self.path, "ab") as f:
                f.write(b"more")

        failed = self.upload(cut_and_change, 5 * CHUNK, max_attempts=5)
        self.assertIsInstance(failed.cause, SourceChanged)
        self.assertEqual(len(self.network.pumps), 1)  # no second connection

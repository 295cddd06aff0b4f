# -*- test-case-name: tests.storage.test_maintenance -*-
"""
The server's periodic garbage collection of abandoned uploads: a service
that runs L{collect_garbage} on the disk thread pool.
"""

from __future__ import annotations

import threading
from typing import Any, Callable

from twisted.application.service import Service
from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from imgresume.sizes import format_size
from imgresume.storage.filesystem.gc import (
    COMPLETING,
    DEFAULT_RECORDS_OLDER_THAN,
    ERROR,
    GcReport,
    collect_garbage,
)

log = Logger()


class GarbageCollectorService(Service):
    """
    Every C{interval} seconds, removes abandoned uploads from a filesystem
    storage with L{collect_garbage}, run through C{run} (the server's disk
    thread pool; never the reactor thread).  A run that outlasts the
    interval is never overlapped: the next one starts at the first interval
    boundary after it ends.  A failed run is logged and the next one
    happens as usual.  Stopping the service ends a run in progress early
    (between two uploads) and waits for it, at most L{stop_grace} seconds.

    @ivar last: the L{GcReport} of the last finished run, or C{None}.
    """

    name = "gc"
    #: Longest wait, when stopping, for a run in progress.
    stop_grace = 10.0

    def __init__(
        self,
        root: str,
        run: Callable[..., Deferred[Any]],
        clock: Any,
        interval: float,
        expire_after: float,
        expire_records_after: float = DEFAULT_RECORDS_OLDER_THAN,
        metrics: Any = None,
    ) -> None:
        """
        @param metrics: a L{imgresume.metrics.ServerMetrics} told about each
            finished run, or None.
        """
        if interval <= 0:
            raise ValueError("the interval must be more than 0")
        self.root = root
        self.run = run
        self.clock = clock
        self.interval = interval
        self.expire_after = expire_after
        self.expire_records_after = expire_records_after
        self.metrics = metrics
        self.last: GcReport | None = None
        self._loop: LoopingCall | None = None
        self._running: Deferred[None] | None = None
        self._stopping = threading.Event()

    def startService(self) -> None:
        super().startService()
        self._stopping.clear()
        self._loop = LoopingCall(self.collect)
        self._loop.clock = self.clock
        # The first run one interval after start: not while the server is
        # still busy starting (and its peers restarting with it).
        self._loop.start(self.interval, now=False).addErrback(
            lambda f: log.failure("garbage collection timer failed", f)
        )

    def stopService(self) -> Deferred[None]:
        super().stopService()
        self._stopping.set()
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        running, self._running = self._running, None
        if running is None:
            return succeed(None)
        # Wait for the run (it ends at the next upload), but not forever:
        # shutdown must not hang on a stuck filesystem.
        finished: Deferred[None] = Deferred()

        def fire(result: Any = None) -> Any:
            if not finished.called:
                finished.callback(None)
            return result

        running.addBoth(fire)
        timer = self.clock.callLater(self.stop_grace, fire)
        finished.addCallback(lambda _: timer.cancel() if timer.active() else None)
        return finished

    def collect(self) -> Deferred[None]:
        """
        Run one collection (the L{LoopingCall} waits for the Deferred, so
        runs never overlap).  Fires with C{None} whatever happened.
        """
        d = maybeDeferred(
            self.run, collect_garbage, self.root, self.expire_after,
            completed_records_older_than=self.expire_records_after,
            stop=self._stopping.is_set,
        )
        d.addCallbacks(self._collected, self._failed)
        self._running = d

        def done(result: None) -> None:
            if self._running is d:
                self._running = None

        d.addCallback(done)
        return d

    def _collected(self, report: GcReport) -> None:
        self.last = report
        if self.metrics is not None:
            self.metrics.gc_report(report)
        completing = sum(1 for e in report.kept if e.action == COMPLETING)
        errors = sum(1 for e in report.kept if e.action == ERROR)
        log.info(
            "gc: removed {removed} ({freed} freed), {busy} busy, {kept} kept "
            "({completing} completing, {errors} errors)",
            removed=len(report.removed),
            freed=format_size(report.bytes_freed),
            bytes_freed=report.bytes_freed,
            busy=len(report.skipped_busy),
            kept=len(report.kept),
            completing=completing,
            errors=errors,
        )

    def _failed(self, failure: Failure) -> None:
        log.failure("gc: garbage collection failed; trying again in {interval} s",
                    failure, interval=self.interval)

# -*- test-case-name: tests.server.test_hooks -*-
"""
Hooks: telling another system (an archive, OCR, an indexer) about upload
events as they happen.

The protocol adapter builds one event per upload created, resumed,
completed or failed (L{imgresume.server._upload_events}) and hands it to
its factory's L{IUploadEvents}.  L{HookDispatcher} is the one that delivers
them: it queues each event for every target, a command or a URL (the
targets are in L{imgresume.server._hook_targets}), and runs at most
C{concurrency} deliveries at once, retrying a failed one with exponential
backoff.  Nothing here ever waits on the upload or makes it wait: C{emit}
only appends to a bounded queue, and processes and HTTP requests are
asynchronous.  A hook that fails is logged, never fatal.

Delivery is best effort, at least once while the server runs: see
C{docs/hooks.md}.  L{HookConfig} is the configuration C{twistd imgresume}
builds from its C{--hook-*} options (L{parse_command} reads
C{--hook-command}).
"""

from __future__ import annotations

import collections
import json
import os
import shlex
import shutil
from typing import Any, Mapping, Sequence

import attrs
from twisted.application.service import Service
from twisted.internet.defer import (
    CancelledError,
    Deferred,
    DeferredList,
    TimeoutError,
    maybeDeferred,
    succeed,
)
from twisted.internet.interfaces import IDelayedCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from imgresume.server._hook_targets import CommandHook, HookFailed, URLHook
from imgresume.server._upload_events import IUploadEvents

log = Logger()


@attrs.frozen
class HookConfig:
    """
    The hooks of a server (C{twistd imgresume --hook-command/--hook-url}).

    @ivar command: argv of a program run once per event with the JSON on
        its stdin; exit status 0 is success.
    @ivar url: an C{http://} or C{https://} URL the JSON is POSTed to; a
        2xx answer is success.
    @ivar attempts: tries per event and target before giving up.
    @ivar backoff: seconds before the first retry; doubled each time, up to
        C{max_backoff}.
    @ivar timeout: seconds one attempt may take (the process is killed, the
        request aborted).
    @ivar concurrency: deliveries running at once (all targets together).
    @ivar max_queue: deliveries held (queued, waiting to retry or running);
        past it the oldest queued one is dropped with a warning.
    """

    command: tuple[str, ...] | None = None
    url: str | None = None
    attempts: int = 5
    backoff: float = 1.0
    max_backoff: float = 300.0
    timeout: float = 30.0
    concurrency: int = 4
    max_queue: int = 10_000

    @property
    def enabled(self) -> bool:
        return bool(self.command) or bool(self.url)


def parse_command(text: str) -> tuple[str, ...]:
    """
    Split C{--hook-command} as a POSIX shell would, without running a shell,
    and find the program on C{PATH}.

    @raise ValueError: empty, unbalanced quotes, or no such program.
    """
    argv = shlex.split(text)
    if not argv:
        raise ValueError("the hook command is empty")
    program = shutil.which(argv[0])
    if program is None:
        raise ValueError(f"{argv[0]}: no such executable program (on PATH or as given)")
    return (os.path.abspath(program), *argv[1:])


# ---------------------------------------------------------------------------
# The dispatcher


@attrs.define(eq=False)
class _Delivery:
    """One event on its way to one target."""

    target: Any
    event: Mapping[str, Any]
    body: bytes
    attempts: int = 0
    running: Deferred[None] | None = None


@implementer(IUploadEvents)
class HookDispatcher(Service):
    """
    Delivers every emitted event to every target, C{concurrency} at a time,
    retrying each failed attempt after C{backoff}, then twice that, and so
    on (at most C{max_backoff}), C{attempts} times in all.  Holds at most
    C{max_queue} deliveries; past that the oldest queued one is dropped and
    logged.  Events are started in the order emitted, but retries and
    concurrency mean they may arrive in any order.

    A child of the server's service (named C{"hooks"}); stopping it gives
    deliveries in progress and queued ones (retries included, at once) up
    to C{stop_grace} seconds, then abandons the rest, logged.
    """

    name = "hooks"

    def __init__(
        self,
        targets: Sequence[Any],
        clock: Any,
        *,
        attempts: int = 5,
        backoff: float = 1.0,
        max_backoff: float = 300.0,
        timeout: float = 30.0,
        concurrency: int = 4,
        max_queue: int = 10_000,
        stop_grace: float = 5.0,
        metrics: Any = None,
    ) -> None:
        if attempts < 1 or concurrency < 1 or max_queue < 1:
            raise ValueError("attempts, concurrency and max_queue must be at least 1")
        self.targets = list(targets)
        self.clock = clock
        self.attempts = attempts
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.timeout = timeout
        self.concurrency = concurrency
        self.max_queue = max_queue
        self.stop_grace = stop_grace
        self.metrics = metrics
        self._ready: collections.deque[_Delivery] = collections.deque()
        self._waiting: dict[_Delivery, IDelayedCall] = {}
        self._inflight: set[_Delivery] = set()
        self._pumping = False
        self._stopping = False
        self._closed = False
        self._idle: list[Deferred[None]] = []
        if metrics is not None:
            metrics.hook_pending.set_function(self.pending)

    @classmethod
    def from_config(cls, config: HookConfig, reactor: Any, metrics: Any = None
                    ) -> HookDispatcher:
        """The dispatcher for C{config}'s command and URL."""
        targets: list[Any] = []
        if config.command:
            targets.append(CommandHook(config.command, reactor))
        if config.url:
            targets.append(URLHook(config.url, reactor, connect_timeout=config.timeout))
        return cls(
            targets, reactor, attempts=config.attempts, backoff=config.backoff,
            max_backoff=config.max_backoff, timeout=config.timeout,
            concurrency=config.concurrency, max_queue=config.max_queue, metrics=metrics,
        )

    def pending(self) -> int:
        """Deliveries queued, waiting to retry, or running."""
        return len(self._ready) + len(self._waiting) + len(self._inflight)

    def when_idle(self) -> Deferred[None]:
        """A Deferred that fires once nothing is pending (for tests and stopping)."""
        if not self.pending():
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._idle.append(d)
        return d

    # IUploadEvents ---------------------------------------------------------

    def emit(self, event: dict[str, Any]) -> None:
        if self._closed:
            log.warn("hooks stopped: {event} of upload {upload_id} not delivered",
                     event=event["event"], upload_id=event.get("upload_id"))
            self._count("dropped", len(self.targets))
            return
        body = json.dumps(event, sort_keys=True, separators=(",", ":")).encode() + b"\n"
        for target in self.targets:
            while self.pending() >= self.max_queue and (self._ready or self._waiting):
                self._drop_oldest()
            self._ready.append(_Delivery(target, event, body))
        self._pump()

    # Internals -----------------------------------------------------------

    def _count(self, result: str, n: int = 1) -> None:
        if self.metrics is not None and n:
            self.metrics.hook_deliveries.inc(n, result=result)

    def _drop_oldest(self) -> None:
        if self._ready:
            victim = self._ready.popleft()
        else:
            victim = next(iter(self._waiting))
            self._waiting.pop(victim).cancel()
        log.warn(
            "hook queue full ({limit} deliveries pending): dropped {event} of upload "
            "{upload_id} for {target}",
            limit=self.max_queue, event=victim.event["event"],
            upload_id=victim.event.get("upload_id"), target=str(victim.target),
            event_id=victim.event.get("id"),
        )
        self._count("dropped")

    def _pump(self) -> None:
        if self._pumping:
            return  # a delivery ended synchronously inside the loop below
        self._pumping = True
        try:
            while self._ready and len(self._inflight) < self.concurrency:
                self._start(self._ready.popleft())
        finally:
            self._pumping = False
        if not self.pending():
            idle, self._idle = self._idle, []
            for d in idle:
                d.callback(None)

    def _start(self, delivery: _Delivery) -> None:
        delivery.attempts += 1
        self._inflight.add(delivery)
        d = maybeDeferred(delivery.target.deliver, delivery.event, delivery.body)
        delivery.running = d
        d.addTimeout(self.timeout, self.clock)
        d.addCallbacks(self._delivered, self._attempt_failed,
                       callbackArgs=(delivery,), errbackArgs=(delivery,))
        d.addErrback(lambda f: log.failure("hook dispatcher bug", f))
        d.addBoth(lambda _: self._pump())

    def _delivered(self, _: None, delivery: _Delivery) -> None:
        self._inflight.discard(delivery)
        delivery.running = None
        log.debug("hook {target}: {event} of upload {upload_id} delivered",
                  target=str(delivery.target), event=delivery.event["event"],
                  upload_id=delivery.event.get("upload_id"))
        self._count("delivered")

    def _attempt_failed(self, failure: Failure, delivery: _Delivery) -> None:
        self._inflight.discard(delivery)
        delivery.running = None
        if failure.check(CancelledError) and self._closed:
            return  # abandoned at stop; counted there
        if self.metrics is not None:
            self.metrics.hook_attempt_failures.inc()
        if failure.check(TimeoutError):
            reason = f"no answer within {self.timeout:g} s"
        elif failure.check(HookFailed):
            reason = str(failure.value)
        else:
            reason = f"{failure.type.__name__}: {failure.getErrorMessage()}"
        fields = dict(
            target=str(delivery.target), event=delivery.event["event"],
            upload_id=delivery.event.get("upload_id"), event_id=delivery.event.get("id"),
            attempt=delivery.attempts, attempts=self.attempts, reason=reason,
        )
        if delivery.attempts >= self.attempts or self._closed:
            log.error(
                "hook {target} failed for {event} of upload {upload_id} (attempt "
                "{attempt} of {attempts}): {reason}; giving up on this event", **fields)
            self._count("failed")
            return
        if self._stopping:
            # Stopping: one more immediate try while the grace period lasts.
            log.warn("hook {target} failed for {event} of upload {upload_id} "
                     "(attempt {attempt} of {attempts}): {reason}", **fields)
            self._ready.append(delivery)
            return
        delay = min(self.backoff * 2 ** (delivery.attempts - 1), self.max_backoff)
        log.warn(
            "hook {target} failed for {event} of upload {upload_id} (attempt "
            "{attempt} of {attempts}): {reason}; retrying in {delay:g} s",
            delay=delay, **fields)
        self._waiting[delivery] = self.clock.callLater(delay, self._retry, delivery)

    def _retry(self, delivery: _Delivery) -> None:
        del self._waiting[delivery]
        self._ready.appendleft(delivery)
        self._pump()

    # Service ---------------------------------------------------------------

    def stopService(self) -> Deferred[None]:
        super().stopService()
        self._stopping = True
        # Retries happen now, not after their backoff.
        for delivery, call in list(self._waiting.items()):
            call.cancel()
            self._ready.append(delivery)
        self._waiting.clear()
        self._pump()
        finished: Deferred[None] = Deferred()
        idle = self.when_idle()
        timer = self.clock.callLater(self.stop_grace, lambda: finished.called or
                                     finished.callback(None))
        idle.addCallback(lambda _: finished.called or finished.callback(None))

        def abandon(_: Any) -> Deferred[Any]:
            if timer.active():
                timer.cancel()
            self._closed = True
            lost = [*self._ready, *self._inflight]
            self._ready.clear()
            for delivery in list(self._inflight):
                if delivery.running is not None:
                    delivery.running.cancel()
            self._inflight.clear()
            if lost:
                log.error(
                    "hooks: {count} deliveries abandoned at stop (uploads {upload_ids})",
                    count=len(lost),
                    upload_ids=", ".join(sorted({str(d.event.get("upload_id"))
                                                 for d in lost})[:20]),
                )
                self._count("dropped", len(lost))
            for d in self._idle:
                d.callback(None)
            self._idle = []
            closing = [maybeDeferred(t.close) for t in self.targets]
            return DeferredList(closing, consumeErrors=True)

        finished.addCallback(abandon)
        finished.addCallback(lambda _: None)
        return finished


__all__ = ["HookConfig", "HookDispatcher", "parse_command"]

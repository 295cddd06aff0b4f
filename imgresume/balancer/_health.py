# -*- test-case-name: tests.balancer.test_health -*-
"""
Active health checks: the balancer asks every backend, at a fixed interval,
whether it still speaks the imgresume protocol, and takes it out of the
rotation when it does not.

One check of one backend is a L{imgresume.balancer._check.HealthCheck}: a
short imgresume conversation (HELLO, WELCOME, PING, PONG) within a timeout.
L{HealthChecker} is the service that runs the checks (one L{LoopingCall} per
backend, so a slow backend never delays the others and never has two checks
at once) and turns their results into L{BackendTracker.mark_down} and
L{BackendTracker.mark_up} calls: C{fall} failures in a row mark a backend down
until C{rise} successes in a row mark it up again.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, replace
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from ..logs import escape
from ._check import HEALTH_CLIENT_ID, CheckResult, HealthCheck
from ._scheduler import Backend, BackendTracker

log = Logger()


@dataclass(frozen=True)
class HealthStatus:
    """
    The checker's view of one backend. Returned by
    L{HealthChecker.status_of}; replaced, never mutated.

    @ivar healthy: L{False} once C{fall} checks in a row have failed, L{True}
        again once C{rise} checks in a row have passed. Every backend starts
        healthy, as in the tracker.
    @ivar failures: consecutive failed checks (0 after a success).
    @ivar successes: consecutive passed checks (0 after a failure).
    @ivar checks: checks completed so far (cancelled ones excluded).
    @ivar last_reason: the reason of the last failed check, or L{None}.
    @ivar server_id: the server id from the last WELCOME, or L{None}.
    """

    healthy: bool = True
    failures: int = 0
    successes: int = 0
    checks: int = 0
    last_reason: str | None = None
    server_id: str | None = None


class HealthChecker(Service):
    """
    Checks every backend of a L{BackendTracker} every C{interval} seconds and
    marks backends down and up in it. A sibling of the listener in the
    balancer's L{MultiService}, built by
    L{imgresume.balancer.tap.makeService}.

    Each backend has its own L{LoopingCall}: checks of different backends run
    concurrently, and the next check of a backend starts only after the
    previous one has ended (at the next interval boundary).

    A backend is marked down (L{BackendTracker.mark_down} without expiry)
    after C{fall} consecutive failed checks, and up (L{BackendTracker.mark_up})
    after C{rise} consecutive passed checks. One log event is emitted per
    transition.
    """

    def __init__(
        self,
        tracker: BackendTracker,
        clock: IReactorTime,
        *,
        interval: float = 2.0,
        timeout: float = 1.0,
        fall: int = 2,
        rise: int = 1,
        client_id: str = HEALTH_CLIENT_ID,
        send_proxy: bool = False,
        connect_only: bool = False,
        metrics: Any = None,
    ) -> None:
        """
        @param tracker: the balancer's tracker; its backends are checked.
        @param clock: the reactor (or a L{twisted.internet.task.Clock}) for
            the interval and the timeout. Connecting uses each backend's own
            endpoint.
        @param interval: seconds between the starts of two checks of one
            backend; 0 disables checking.
        @param timeout: seconds one check may take, connect included.
        @param fall: consecutive failures that mark a backend down.
        @param rise: consecutive successes that mark a down backend up.
        @param send_proxy: start every check with a PROXY protocol v2 header
            (command LOCAL), for backends that require one from the
            balancer (C{--send-proxy}).
        @param connect_only: a check is only a TCP connect (C{--check-mode
            connect}), for backends whose protocol the balancer cannot speak
            (TLS terminated at the servers).
        @param metrics: a L{imgresume.metrics.BalancerMetrics} that counts
            every check's result, or None.
        """
        if not interval >= 0:
            raise ValueError(f"interval must be >= 0, not {interval!r}")
        if not timeout > 0:
            raise ValueError(f"timeout must be > 0, not {timeout!r}")
        if fall < 1 or rise < 1:
            raise ValueError(f"fall and rise must be >= 1, not {fall!r}, {rise!r}")
        self.tracker = tracker
        self.clock = clock
        self.interval = interval
        self.timeout = timeout
        self.fall = fall
        self.rise = rise
        self.client_id = client_id
        self.send_proxy = send_proxy
        self.connect_only = connect_only
        self.metrics = metrics
        self._status = {backend: HealthStatus() for backend in tracker.backends}
        self._loops: list[LoopingCall] = []
        self._inflight: dict[Backend, HealthCheck] = {}
        self._nonces = itertools.count(1)

    def status_of(self, backend: Backend) -> HealthStatus:
        """
        What the checker knows about C{backend}.
        """
        return self._status[backend]

    def startService(self) -> None:
        super().startService()
        if self.interval == 0:
            log.info("active health checks are disabled (check interval 0)")
            return
        log.info(
            "health checks of {count} backends every {interval:g}s"
            " (timeout {timeout:g}s, down after {fall} failures, up after"
            " {rise} successes)",
            count=len(self.tracker.backends),
            interval=self.interval,
            timeout=self.timeout,
            fall=self.fall,
            rise=self.rise,
        )
        for backend in self.tracker.backends:
            loop = LoopingCall(self._check_once, backend)
            loop.clock = self.clock
            self._loops.append(loop)
            loop.start(self.interval, now=True).addErrback(
                lambda f, name=backend.name: log.failure(
                    "health checks of {backend} stopped by an unexpected error",
                    f,
                    backend=name,
                )
            )

    def stopService(self) -> Deferred[Any]:
        """
        Stop checking: no new checks start, and checks in flight are
        cancelled (connect attempts stopped, connections aborted) without
        counting as failures. The result fires once their connections are
        closed.
        """
        super().stopService()
        loops, self._loops = self._loops, []
        for loop in loops:
            if loop.running:
                loop.stop()
        checks = list(self._inflight.values())
        ended = [check.when_ended() for check in checks]
        for check in checks:
            check.cancel()
        return DeferredList(ended).addCallback(lambda _: None)

    def _check_once(self, backend: Backend) -> Deferred[None]:
        check = HealthCheck(
            backend, self.clock, self.timeout, next(self._nonces), self.client_id,
            self.send_proxy, self.connect_only,
        )
        self._inflight[backend] = check
        d = check.when_ended().addCallback(self._checked, backend)
        check.start()
        return d

    def _checked(self, result: CheckResult | None, backend: Backend) -> None:
        del self._inflight[backend]
        if result is None or not self.running:
            return
        if self.metrics is not None:
            self.metrics.health_checks.inc(
                backend=backend.name, result="pass" if result.healthy else "fail")
        status = self._status[backend]
        if result.healthy:
            status = replace(
                status,
                failures=0,
                successes=status.successes + 1,
                checks=status.checks + 1,
                server_id=result.server_id,
            )
            if not status.healthy and status.successes >= self.rise:
                status = replace(status, healthy=True)
                self._status[backend] = status
                self.tracker.mark_up(backend)
                log.info(
                    "backend {backend} is up: passed {successes} health"
                    " check(s) in a row (server {serverID}); {up} of"
                    " {total} backends up",
                    backend=backend.name,
                    successes=status.successes,
                    serverID=escape(result.server_id),
                    up=self._healthy_count(),
                    total=len(self._status),
                )
        else:
            status = replace(
                status,
                failures=status.failures + 1,
                successes=0,
                checks=status.checks + 1,
                last_reason=result.reason,
                server_id=result.server_id or status.server_id,
            )
            if status.healthy and status.failures >= self.fall:
                status = replace(status, healthy=False)
                self._status[backend] = status
                self.tracker.mark_down(backend)
                up = self._healthy_count()
                fields = dict(
                    backend=backend.name,
                    reason=escape(result.reason),
                    failures=status.failures,
                    up=up,
                    total=len(self._status),
                )
                if up:
                    log.warn(
                        "backend {backend} is down: {reason} ({failures}"
                        " health checks failed in a row); {up} of {total}"
                        " backends up",
                        **fields,
                    )
                else:
                    log.error(
                        "backend {backend} is down: {reason} ({failures}"
                        " health checks failed in a row); every backend is"
                        " down, so clients are tried on all of them",
                        **fields,
                    )
        self._status[backend] = status

    def _healthy_count(self) -> int:
        return sum(1 for status in self._status.values() if status.healthy)

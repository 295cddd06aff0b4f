# -*- test-case-name: tests.balancer.test_health -*-
"""
Active health checks: the balancer asks every backend, at a fixed interval,
whether it still speaks the imgresume protocol, and takes it out of the
rotation when it does not.

One check of one backend (L{_Check}) is a complete, short imgresume
conversation driven by the sans-IO L{ClientConnection}::

    connect --> HELLO --> WELCOME --> PING(nonce) --> PONG(nonce) --> close

all within C{timeout} seconds. Anything else fails the check: a refused or
slow connect, a backend that accepts and says nothing, bytes that are not
imgresume frames, an ERROR frame (C{SHUTTING_DOWN}, C{INTERNAL_ERROR}...), a
PONG with the wrong nonce, or a close before the PONG.

L{HealthChecker} is the service that runs the checks (one L{LoopingCall} per
backend, so a slow backend never delays the others and never has two checks
at once) and turns their results into L{BackendTracker.markDown} and
L{BackendTracker.markUp} calls: C{fall} failures in a row mark a backend down
until C{rise} successes in a row mark it up again.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, replace
from typing import Any, Literal

from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredList, maybeDeferred
from twisted.internet.interfaces import IAddress, IDelayedCall, IReactorTime
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from imgresume.errors import ImgresumeError
from imgresume.protocol import (
    HEALTH_CHECK_CLIENT_ID,
    ClientConnection,
    ErrorReceived,
    Ponged,
    Welcomed,
)

from ._proxy import _describeFailure
from ._proxyheader import localHeader
from ._scheduler import Backend, BackendTracker

log = Logger()

#: The client id the checker sends in its HELLO, so that servers (and their
#: logs) can tell health checks from uploads.
HEALTH_CLIENT_ID = HEALTH_CHECK_CLIENT_ID


@dataclass(frozen=True)
class CheckResult:
    """
    What one health check of one backend found.

    @ivar healthy: the backend answered WELCOME and then PONG with the nonce
        that was sent, within the timeout.
    @ivar reason: why the check failed, for logs (C{"refused"}, C{"no
        WELCOME within 1s"}, C{"answered SHUTTING_DOWN: ..."}); empty when
        healthy.
    @ivar serverID: the server id from the backend's WELCOME, if one came.
    """

    healthy: bool
    reason: str = ""
    serverID: str | None = None


@dataclass(frozen=True)
class HealthStatus:
    """
    The checker's view of one backend. Returned by
    L{HealthChecker.statusOf}; replaced, never mutated.

    @ivar healthy: L{False} once C{fall} checks in a row have failed, L{True}
        again once C{rise} checks in a row have passed. Every backend starts
        healthy, as in the tracker.
    @ivar failures: consecutive failed checks (0 after a success).
    @ivar successes: consecutive passed checks (0 after a failure).
    @ivar checks: checks completed so far (cancelled ones excluded).
    @ivar lastReason: the reason of the last failed check, or L{None}.
    @ivar serverID: the server id from the last WELCOME, or L{None}.
    """

    healthy: bool = True
    failures: int = 0
    successes: int = 0
    checks: int = 0
    lastReason: str | None = None
    serverID: str | None = None


_Phase = Literal["idle", "connecting", "welcome", "pong", "closing", "ended"]


class _CheckProtocol(Protocol):
    """
    The connection of one health check. Thin on purpose: every event goes to
    its L{_Check}.
    """

    def __init__(self, check: _Check) -> None:
        self._check = check

    def connectionMade(self) -> None:
        self._check.connected(self.transport)

    def dataReceived(self, data: bytes) -> None:
        self._check.received(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._check.lost(reason)


class _CheckFactory(Factory):
    """
    Builds the one L{_CheckProtocol} of a check. Quiet: one is made per
    check.
    """

    noisy = False

    def __init__(self, check: _Check) -> None:
        self._check = check

    def buildProtocol(self, addr: IAddress) -> _CheckProtocol:
        return _CheckProtocol(self._check)


class _Check:
    """
    One health check of one backend, from connect to close.

    Made and started by L{HealthChecker}; usable alone in tests. The result
    is delivered by L{whenEnded} only once the connection is really closed (or
    the connect attempt really given up), so that a check never outlives
    itself and the next check of the same backend never overlaps it.
    """

    def __init__(
        self,
        backend: Backend,
        clock: IReactorTime,
        timeout: float,
        nonce: int,
        clientID: str = HEALTH_CLIENT_ID,
        sendProxy: bool = False,
        connectOnly: bool = False,
    ) -> None:
        self.backend = backend
        self._sendProxy = sendProxy
        self._connectOnly = connectOnly
        self._clock = clock
        self._timeout = timeout
        self._nonce = nonce
        self._machine = ClientConnection(clientID)
        self._phase: _Phase = "idle"
        self._result: CheckResult | None = None
        self._cancelled = False
        self._serverID: str | None = None
        self._attempt: Deferred[Any] | None = None
        self._transport: Any = None
        self._timer: IDelayedCall | None = None
        self._waiting: list[Deferred[CheckResult | None]] = []

    def start(self) -> None:
        """
        Connect to the backend and start the conversation.
        """
        self._phase = "connecting"
        self._timer = self._clock.callLater(self._timeout, self._timedOut)
        attempt = maybeDeferred(self.backend.endpoint.connect, _CheckFactory(self))
        self._attempt = attempt
        attempt.addCallbacks(self._connectSucceeded, self._connectFailed)

    def whenEnded(self) -> Deferred[CheckResult | None]:
        """
        A new Deferred that fires once the check is over and its connection
        closed: with the L{CheckResult}, or with L{None} if the check was
        cancelled. Never fails.
        """
        d: Deferred[CheckResult | None] = Deferred()
        if self._phase == "ended":
            d.callback(None if self._cancelled else self._result)
        else:
            self._waiting.append(d)
        return d

    def cancel(self) -> None:
        """
        Give up: stop connecting, or abort the connection. The check ends
        with no result (see L{whenEnded}) as soon as the connection is gone.
        """
        if self._phase == "ended" or self._cancelled:
            return
        self._cancelled = True
        if self._result is None:
            self._result = CheckResult(False, "cancelled")
        if self._phase == "connecting" and self._attempt is not None:
            self._attempt.cancel()
        elif self._transport is not None:
            self._transport.abortConnection()
        else:
            self._end()

    # -- events ----------------------------------------------------------

    def _connectSucceeded(self, protocol: _CheckProtocol) -> None:
        # connectionMade has already run; nothing more to do.
        self._attempt = None

    def _connectFailed(self, failure: Failure) -> None:
        self._attempt = None
        if self._result is None:
            self._result = CheckResult(False, f"connect failed: {_describeFailure(failure)}")
        # Otherwise the attempt was cancelled by the timeout or by cancel(),
        # which have already given the reason.
        self._end()

    def connected(self, transport: Any) -> None:
        """
        The connection is made: send HELLO. Called by the check's protocol.
        """
        self._transport = transport
        if self._phase != "connecting":
            # Cancelled or timed out, yet an endpoint connected anyway.
            transport.abortConnection()
            return
        if self._connectOnly:
            # --check-mode connect: the backend speaks TLS or wants client
            # credentials the balancer does not have; accepting is the check.
            self._decide(CheckResult(True, ""))
            transport.loseConnection()
            return
        self._phase = "welcome"
        if self._sendProxy:
            # A server that trusts the balancer's PROXY headers requires one;
            # LOCAL says "the balancer's own connection".
            transport.write(localHeader())
        self._machine.hello()
        self._flush()

    def received(self, data: bytes) -> None:
        """
        Bytes from the backend. Called by the check's protocol.
        """
        if self._phase not in ("welcome", "pong"):
            return
        self._machine.receive_data(data)
        while self._phase in ("welcome", "pong"):
            try:
                event = self._machine.next_event()
            except ImgresumeError as e:
                self._fail(f"not an imgresume answer: {e.code.name}: {e.message}")
                return
            except Exception as e:
                # The decoder should only raise ImgresumeError; whatever a
                # backend sends must not break the checker.
                self._fail(f"not an imgresume answer: {type(e).__name__}: {e}")
                return
            if event is None:
                return
            if isinstance(event, Welcomed) and self._phase == "welcome":
                self._serverID = event.welcome.server_id
                self._phase = "pong"
                self._machine.ping(self._nonce)
                self._flush()
            elif isinstance(event, Ponged) and self._phase == "pong":
                if event.nonce != self._nonce:
                    self._fail(f"PONG carried nonce {event.nonce}, not {self._nonce}")
                    return
                self._decide(CheckResult(True, "", self._serverID))
                self._transport.loseConnection()
            elif isinstance(event, ErrorReceived):
                error = event.error
                self._fail(f"answered {error.code.name}: {error.message}")
            else:
                expected = "WELCOME" if self._phase == "welcome" else "PONG"
                self._fail(f"answered {type(event).__name__} instead of {expected}")

    def lost(self, reason: Failure) -> None:
        """
        The connection is gone. Called by the check's protocol.
        """
        if self._result is None:
            expected = "WELCOME" if self._phase == "welcome" else "PONG"
            self._result = CheckResult(
                False,
                f"closed the connection before {expected}: {reason.getErrorMessage()}",
                self._serverID,
            )
        self._transport = None
        self._end()

    def _timedOut(self) -> None:
        self._timer = None
        if self._phase == "connecting":
            self._decide(CheckResult(False, f"connect timed out after {self._timeout:g}s"))
            if self._attempt is not None:
                self._attempt.cancel()
            else:
                self._end()
        elif self._phase in ("welcome", "pong"):
            expected = "WELCOME" if self._phase == "welcome" else "PONG"
            self._fail(f"no {expected} within {self._timeout:g}s")
        elif self._phase == "closing" and self._transport is not None:
            # A verdict is in but the close is stuck: stop waiting.
            self._transport.abortConnection()

    # -- internals -------------------------------------------------------

    def _flush(self) -> None:
        out = self._machine.data_to_send()
        if out:
            self._transport.writeSequence(out)

    def _decide(self, result: CheckResult) -> None:
        if self._result is None:
            self._result = result
        if self._phase != "connecting":
            self._phase = "closing"

    def _fail(self, reason: str) -> None:
        self._decide(CheckResult(False, reason, self._serverID))
        self._transport.abortConnection()

    def _end(self) -> None:
        if self._phase == "ended":
            return
        self._phase = "ended"
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        waiting, self._waiting = self._waiting, []
        for d in waiting:
            d.callback(None if self._cancelled else self._result)


class HealthChecker(Service):
    """
    Checks every backend of a L{BackendTracker} every C{interval} seconds and
    marks backends down and up in it. A sibling of the listener in the
    balancer's L{MultiService}, built by
    L{imgresume.balancer.tap.makeService}.

    Each backend has its own L{LoopingCall}: checks of different backends run
    concurrently, and the next check of a backend starts only after the
    previous one has ended (at the next interval boundary).

    A backend is marked down (L{BackendTracker.markDown} without expiry)
    after C{fall} consecutive failed checks, and up (L{BackendTracker.markUp})
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
        clientID: str = HEALTH_CLIENT_ID,
        sendProxy: bool = False,
        connectOnly: bool = False,
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
        @param sendProxy: start every check with a PROXY protocol v2 header
            (command LOCAL), for backends that require one from the
            balancer (C{--send-proxy}).
        @param connectOnly: a check is only a TCP connect (C{--check-mode
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
        self.clientID = clientID
        self.sendProxy = sendProxy
        self.connectOnly = connectOnly
        self.metrics = metrics
        self._status = {backend: HealthStatus() for backend in tracker.backends}
        self._loops: list[LoopingCall] = []
        self._inflight: dict[Backend, _Check] = {}
        self._nonces = itertools.count(1)

    def statusOf(self, backend: Backend) -> HealthStatus:
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
            loop = LoopingCall(self._checkOnce, backend)
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
        ended = [check.whenEnded() for check in checks]
        for check in checks:
            check.cancel()
        return DeferredList(ended).addCallback(lambda _: None)

    def _checkOnce(self, backend: Backend) -> Deferred[None]:
        check = _Check(
            backend, self.clock, self.timeout, next(self._nonces), self.clientID,
            self.sendProxy, self.connectOnly,
        )
        self._inflight[backend] = check
        d = check.whenEnded().addCallback(self._checked, backend)
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
                serverID=result.serverID,
            )
            if not status.healthy and status.successes >= self.rise:
                status = replace(status, healthy=True)
                self._status[backend] = status
                self.tracker.markUp(backend)
                log.info(
                    "backend {backend} is up: passed {successes} health"
                    " check(s) in a row (server {serverID}); {up} of"
                    " {total} backends up",
                    backend=backend.name,
                    successes=status.successes,
                    serverID=result.serverID,
                    up=self._healthyCount(),
                    total=len(self._status),
                )
        else:
            status = replace(
                status,
                failures=status.failures + 1,
                successes=0,
                checks=status.checks + 1,
                lastReason=result.reason,
                serverID=result.serverID or status.serverID,
            )
            if status.healthy and status.failures >= self.fall:
                status = replace(status, healthy=False)
                self._status[backend] = status
                self.tracker.markDown(backend)
                up = self._healthyCount()
                fields = dict(
                    backend=backend.name,
                    reason=result.reason,
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

    def _healthyCount(self) -> int:
        return sum(1 for status in self._status.values() if status.healthy)

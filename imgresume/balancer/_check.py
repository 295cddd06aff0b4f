# -*- test-case-name: tests.balancer.test_health,tests.server.test_proxy_protocol -*-
"""
One health check of one backend (L{HealthCheck}): a complete, short
imgresume conversation driven by the sans-IO L{ClientConnection}::

    connect --> HELLO --> WELCOME --> PING(nonce) --> PONG(nonce) --> close

all within C{timeout} seconds. Anything else fails the check: a refused or
slow connect, a backend that accepts and says nothing, bytes that are not
imgresume frames, an ERROR frame (C{SHUTTING_DOWN}, C{INTERNAL_ERROR}...), a
PONG with the wrong nonce, or a close before the PONG.

The checks are scheduled, and their results turned into the tracker's
verdicts, by L{imgresume.balancer._health.HealthChecker}.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.interfaces import IAddress, IDelayedCall, IReactorTime
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.python.failure import Failure

from ..addresses import local_header
from ..errors import ImgresumeError
from ..protocol import (
    HEALTH_CHECK_CLIENT_ID,
    ClientConnection,
    ErrorReceived,
    Ponged,
    Welcomed,
)
from ._backend import describe_failure
from ._scheduler import Backend

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
    @ivar server_id: the server id from the backend's WELCOME, if one came.
    """

    healthy: bool
    reason: str = ""
    server_id: str | None = None


_Phase = Literal["idle", "connecting", "welcome", "pong", "closing", "ended"]


class _CheckProtocol(Protocol):
    """
    The connection of one health check. Thin on purpose: every event goes to
    its L{HealthCheck}.
    """

    def __init__(self, check: HealthCheck) -> None:
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

    def __init__(self, check: HealthCheck) -> None:
        self._check = check

    def buildProtocol(self, addr: IAddress) -> _CheckProtocol:
        return _CheckProtocol(self._check)


class HealthCheck:
    """
    One health check of one backend, from connect to close.

    Made and started by L{imgresume.balancer._health.HealthChecker}; usable
    alone in tests. The result
    is delivered by L{when_ended} only once the connection is really closed (or
    the connect attempt really given up), so that a check never outlives
    itself and the next check of the same backend never overlaps it.
    """

    def __init__(
        self,
        backend: Backend,
        clock: IReactorTime,
        timeout: float,
        nonce: int,
        client_id: str = HEALTH_CLIENT_ID,
        send_proxy: bool = False,
        connect_only: bool = False,
    ) -> None:
        self.backend = backend
        self._send_proxy = send_proxy
        self._connect_only = connect_only
        self._clock = clock
        self._timeout = timeout
        self._nonce = nonce
        self._machine = ClientConnection(client_id)
        self._phase: _Phase = "idle"
        self._result: CheckResult | None = None
        self._cancelled = False
        self._server_id: str | None = None
        self._attempt: Deferred[Any] | None = None
        self._transport: Any = None
        self._timer: IDelayedCall | None = None
        self._waiting: list[Deferred[CheckResult | None]] = []

    def start(self) -> None:
        """
        Connect to the backend and start the conversation.
        """
        self._phase = "connecting"
        self._timer = self._clock.callLater(self._timeout, self._timed_out)
        attempt = maybeDeferred(self.backend.endpoint.connect, _CheckFactory(self))
        self._attempt = attempt
        attempt.addCallbacks(self._connect_succeeded, self._connect_failed)

    def when_ended(self) -> Deferred[CheckResult | None]:
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
        with no result (see L{when_ended}) as soon as the connection is gone.
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

    def _connect_succeeded(self, protocol: _CheckProtocol) -> None:
        # connectionMade has already run; nothing more to do.
        self._attempt = None

    def _connect_failed(self, failure: Failure) -> None:
        self._attempt = None
        if self._result is None:
            self._result = CheckResult(False, f"connect failed: {describe_failure(failure)}")
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
        if self._connect_only:
            # --check-mode connect: the backend speaks TLS or wants client
            # credentials the balancer does not have; accepting is the check.
            self._decide(CheckResult(True, ""))
            transport.loseConnection()
            return
        self._phase = "welcome"
        if self._send_proxy:
            # A server that trusts the balancer's PROXY headers requires one;
            # LOCAL says "the balancer's own connection".
            transport.write(local_header())
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
                self._server_id = event.welcome.server_id
                self._phase = "pong"
                self._machine.ping(self._nonce)
                self._flush()
            elif isinstance(event, Ponged) and self._phase == "pong":
                if event.nonce != self._nonce:
                    self._fail(f"PONG carried nonce {event.nonce}, not {self._nonce}")
                    return
                self._decide(CheckResult(True, "", self._server_id))
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
                self._server_id,
            )
        self._transport = None
        self._end()

    def _timed_out(self) -> None:
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
        self._decide(CheckResult(False, reason, self._server_id))
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

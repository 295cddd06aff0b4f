# -*- test-case-name: tests.balancer.test_proxy -*-
"""
Which backend gets the next client: the backends, their tracked state and the
schedulers that order them.

This module does no I/O. L{BackendTracker} records what the proxy reports
(connect succeeded, connect failed, connection closed) and answers "is this
backend usable now?"; a L{Scheduler} turns that into the ordered list of
backends one client connection will try. The proxy in L{._proxy} is the only
caller of the connect callbacks; the active health checker in L{._health}
drives L{BackendTracker.mark_up} and L{BackendTracker.mark_down}.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Protocol, Sequence

from twisted.internet.interfaces import IReactorTime, IStreamClientEndpoint


@dataclass(frozen=True, eq=False)
class Backend:
    """
    One backend server: a name for logs and error messages (normally the
    endpoint string it was configured with) and the endpoint to connect to.

    Built once at startup by L{imgresume.balancer.tap.makeService} (or
    L{imgresume.balancer.build_balancer}); compared by identity, so the same
    address listed twice is two backends (a crude weight).
    """

    name: str
    endpoint: IStreamClientEndpoint = field(repr=False)


@dataclass(frozen=True)
class BackendState:
    """
    A snapshot of what the tracker knows about one backend. Returned by
    L{BackendTracker.state_of}; never mutated, replaced on every change.

    @ivar active: connections currently proxied to this backend.
    @ivar total: connections ever proxied to this backend.
    @ivar failures: consecutive failed connect attempts (reset by a success
        or L{BackendTracker.mark_up}).
    @ivar last_failure: reactor time of the last failed connect, or L{None}.
    @ivar down_until: reactor time until which the backend is marked down,
        C{math.inf} for "until marked up", or L{None} when it is up.
    """

    active: int = 0
    total: int = 0
    failures: int = 0
    last_failure: float | None = None
    down_until: float | None = None


class BackendTracker:
    """
    Per-backend bookkeeping, in the spirit of txloadbalancer's host tracker.

    The proxy calls L{connect_succeeded}, L{connect_failed} and
    L{connection_closed}; schedulers call L{is_up} and read L{backends}; the
    health checker (L{imgresume.balancer.HealthChecker}) calls L{mark_up} and
    L{mark_down}. A failed connect passively marks the backend down for
    C{eject_for} seconds.
    """

    def __init__(
        self,
        backends: Sequence[Backend],
        clock: IReactorTime,
        eject_for: float = 2.0,
    ) -> None:
        """
        @param backends: the backends, in round-robin order; at least one.
        @param clock: where "now" comes from (the reactor, or a
            L{twisted.internet.task.Clock} in tests).
        @param eject_for: seconds a backend stays marked down after a failed
            connect.
        """
        if not backends:
            raise ValueError("a balancer needs at least one backend")
        if eject_for < 0:
            raise ValueError(f"eject_for must be >= 0, not {eject_for!r}")
        self._backends = tuple(backends)
        self._clock = clock
        self.eject_for = eject_for
        self._states = {backend: BackendState() for backend in self._backends}

    @property
    def backends(self) -> tuple[Backend, ...]:
        """
        All backends, in configured order, up or down.
        """
        return self._backends

    def state_of(self, backend: Backend) -> BackendState:
        """
        The current state snapshot of C{backend}.
        """
        return self._states[backend]

    def is_up(self, backend: Backend) -> bool:
        """
        Whether C{backend} should be offered to new clients: it is not marked
        down, or its down period has run out.
        """
        down_until = self._states[backend].down_until
        return down_until is None or self._clock.seconds() >= down_until

    def connect_succeeded(self, backend: Backend) -> None:
        """
        A connection to C{backend} was made and now carries a client: count
        it, and take the success as proof the backend is up, ending a passive
        ejection. A mark from L{mark_down} without a duration (the health
        checker's verdict, which a TCP connect alone does not overturn)
        stays until L{mark_up}.
        """
        state = self._states[backend]
        down_until = state.down_until
        if down_until is not None and not math.isinf(down_until):
            down_until = None
        self._states[backend] = replace(
            state,
            active=state.active + 1,
            total=state.total + 1,
            failures=0,
            down_until=down_until,
        )

    def connection_closed(self, backend: Backend) -> None:
        """
        A connection previously reported to L{connect_succeeded} has closed.
        """
        state = self._states[backend]
        self._states[backend] = replace(state, active=max(0, state.active - 1))

    def connect_failed(self, backend: Backend) -> None:
        """
        Connecting to C{backend} was refused, timed out or otherwise failed:
        count the failure and mark the backend down for C{eject_for} seconds.
        """
        state = self._states[backend]
        self._states[backend] = replace(
            state,
            failures=state.failures + 1,
            last_failure=self._clock.seconds(),
        )
        self.mark_down(backend, self.eject_for)

    def mark_down(self, backend: Backend, duration: float | None = None) -> None:
        """
        Stop offering C{backend} to new clients, for C{duration} seconds or,
        if L{None}, until L{mark_up}. Existing connections are left alone.
        A shorter period never cuts short a longer one already in force.
        """
        until = math.inf if duration is None else self._clock.seconds() + duration
        state = self._states[backend]
        if state.down_until is not None and state.down_until > until:
            return
        self._states[backend] = replace(state, down_until=until)

    def mark_up(self, backend: Backend) -> None:
        """
        Offer C{backend} to new clients again and forget its consecutive
        failures.
        """
        self._states[backend] = replace(
            self._states[backend], down_until=None, failures=0
        )


class Scheduler(Protocol):
    """
    Chooses the order in which one client connection tries the backends.

    The proxy calls L{plan} once per accepted client and walks the result,
    trying each backend at most once. Implementations read a
    L{BackendTracker}; least-connections would sort by
    L{BackendState.active}.
    """

    def plan(self) -> Sequence[Backend]:
        """
        Every backend exactly once, best candidate first. Backends that are
        down come last (tried only when all the up ones have failed), never
        omitted: a balancer with every backend marked down still tries them.
        """


class RoundRobinScheduler:
    """
    Round-robin over the backends that are up; the L{Scheduler} that
    C{imgresume-lb} uses. Built by L{imgresume.balancer.build_balancer}, called
    by the proxy once per client connection.

    Each plan starts at the up backend following the one the previous plan
    started at, so while a backend is down its turns go evenly to the others
    instead of all to its successor.
    """

    def __init__(self, tracker: BackendTracker) -> None:
        self._tracker = tracker
        self._next = 0

    def plan(self) -> list[Backend]:
        """
        See L{Scheduler.plan}.
        """
        backends = self._tracker.backends
        count = len(backends)
        rotated = [(self._next + i) % count for i in range(count)]
        up = [i for i in rotated if self._tracker.is_up(backends[i])]
        down = [i for i in rotated if i not in up]
        order = up + down
        self._next = (order[0] + 1) % count
        return [backends[i] for i in order]

"""
A TCP relay for tests that can freeze one connection: the network between a
client and a server stalls without a close (half-open TCP), and later wakes
up and delivers what was in flight.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.endpoints import clientFromString
from twisted.internet.protocol import Factory, Protocol


class _Upstream(Protocol):
    def __init__(self, down: "_Downstream") -> None:
        self.down = down

    def connectionMade(self) -> None:
        self.down.upstream_ready(self)

    def dataReceived(self, data: bytes) -> None:
        if self.down.frozen:
            self.down.held_up.append(data)  # the server's answers, lost in the stall
        elif self.down.transport is not None and self.down.connected:
            self.down.transport.write(data)

    def connectionLost(self, reason: Any) -> None:
        self.down.upstream_closed = True
        if not self.down.frozen and self.down.connected:
            self.down.transport.loseConnection()


class _Downstream(Protocol):
    """One client connection; forwards to a fresh upstream connection."""

    def __init__(self, relay: "FreezingRelay") -> None:
        self.relay = relay
        self.frozen = False
        self.upstream: _Upstream | None = None
        self.upstream_closed = False
        self.pending: list[bytes] = []  # before the upstream connects
        self.held_down: list[bytes] = []  # client bytes caught in the stall
        self.held_up: list[bytes] = []
        self.delivered_after_thaw = 0

    def connectionMade(self) -> None:
        self.relay.connections.append(self)
        d = self.relay.upstream_endpoint.connect(Factory.forProtocol(lambda: _Upstream(self)))
        d.addErrback(lambda f: self.transport.loseConnection())

    def upstream_ready(self, upstream: _Upstream) -> None:
        self.upstream = upstream
        for data in self.pending:
            upstream.transport.write(data)
        self.pending = []

    def dataReceived(self, data: bytes) -> None:
        if self.frozen:
            self.held_down.append(data)
        elif self.upstream is None:
            self.pending.append(data)
        else:
            self.upstream.transport.write(data)

    def connectionLost(self, reason: Any) -> None:
        # A frozen connection stays half-open upstream: the server must not
        # learn that the client is gone.
        if not self.frozen and self.upstream is not None:
            self.upstream.transport.loseConnection()

    def freeze(self) -> None:
        """Stop forwarding in both directions, without closing anything."""
        self.frozen = True

    def thaw(self) -> None:
        """Deliver the client's stalled bytes to the server, then close."""
        self.frozen = False
        if self.upstream is not None and not self.upstream_closed:
            for data in self.held_down:
                self.upstream.transport.write(data)
                self.delivered_after_thaw += len(data)
            self.upstream.transport.loseConnection()


class FreezingRelay(Factory):
    """Listens for clients; each gets its own connection to C{upstream}."""

    def __init__(self, reactor: Any, upstream: str) -> None:
        self.upstream_endpoint = clientFromString(reactor, upstream)
        self.connections: list[_Downstream] = []

    def buildProtocol(self, addr: Any) -> _Downstream:
        return _Downstream(self)

# -*- test-case-name: tests.balancer.test_proxy -*-
"""
The proxy: one L{FrontendProtocol} per accepted client, joined to one backend
connection with portforward-style backpressure.

Life of a client connection::

    connecting --backend connected--> proxying --either side closes--> closed
        |                                                                ^
        +--every backend failed--> rejected (ERROR frame, drain) --------+

While connecting, the scheduler's plan is walked one backend at a time; a
refused or timed-out backend is reported to the tracker and the next one is
tried. Meanwhile at most C{_EARLY_HIGH_WATER} bytes are read from the client
and held; then reading is paused until a backend is connected. (Reading is
not paused outright, as portforward does, because a paused socket cannot
notice its client leave, and the connect attempt could not be cancelled.)
Once connected, two plain sockets are relayed with splice(2) by a
L{SpliceRelay} (L{imgresume.balancer._splice}) until either ends; then, and
for TLS or PROXY-protocol transports from the start, the two transports are
registered as streaming producers of each other, so neither direction
buffers more than a transport's own high-water mark.
"""

from __future__ import annotations

from typing import Any, Literal

from twisted.internet.abstract import FileDescriptor
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.interfaces import IAddress, IDelayedCall, IReactorTime
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure

from ..addresses import ConnectionsPerAddress, address_key, describe_address, proxy_header
from ..errors import ErrorCode
from ..logs import escape
from ..metrics import BalancerMetrics, Registry
from ._backend import (
    NO_BACKEND,
    NO_BACKEND_RETRY_AFTER_MS,
    BackendFactory,
    BackendProtocol,
    close_after_flush,
    describe_failure,
    error_frame,
)
from ._scheduler import Backend, BackendTracker, Scheduler
from ._splice import SpliceRelay, Splicer

log = Logger()

# While connecting, client bytes are held up to this much, then reading is
# paused until a backend is connected.
_EARLY_HIGH_WATER = 64 * 1024
# A wrapping transport (TLS, HAProxy) may still deliver what it has already
# decoded after being paused: at most about one read's worth. Anything beyond
# this is a bug or an attack, and the client is dropped rather than buffered.
_MAX_EARLY_BYTES = 4 * _EARLY_HIGH_WATER


_State = Literal["connecting", "proxying", "rejected", "closed"]


class FrontendProtocol(Protocol):
    """
    One client connection to the balancer, from accept to close. Built by
    L{BalancerFactory} for every client the listening endpoint accepts.

    It asks the factory's scheduler for a plan and connects to the backends
    in that order until one accepts, holding at most 64 KiB from the client
    meanwhile; then it forwards bytes both ways with the two transports
    registered as each other's streaming producer. If no backend accepts, it
    sends the client one NO_BACKEND ERROR frame and closes.
    """

    factory: BalancerFactory

    def __init__(self) -> None:
        self._state: _State = "connecting"
        self._plan: list[Backend] = []
        self._tried: list[tuple[Backend, str]] = []
        self._attempt: Backend | None = None
        self._connecting: Deferred[Any] | None = None
        self._connect_timer: IDelayedCall | None = None
        self._timed_out = False
        self._backend: Backend | None = None
        self._peer: BackendProtocol | None = None
        self._early: list[bytes] = []
        self._early_bytes = 0
        self._early_paused = False
        self._linger_call: IDelayedCall | None = None
        self._closed_by: str | None = None
        self._bytes_up = 0
        self._bytes_down = 0
        self._address: str | None | Literal[False] = None
        self._relay: SpliceRelay | None = None

    # -- client side ---------------------------------------------------

    def connectionMade(self) -> None:
        self._id = self.factory.new_connection_id()
        self._client = escape(describe_address(self.transport.getPeer()))
        self._opened_at = self.factory.reactor.seconds()
        self.factory.metrics.connections.inc()
        self.factory.metrics.connections_active.inc()
        self._address = self.factory.admit(self.transport.getPeer())
        if self._address is False:
            self._refuse_too_many()
            return
        self._plan = list(self.factory.scheduler.plan())
        self._candidates = len(self._plan)
        self._connect_next()

    def dataReceived(self, data: bytes) -> None:
        if self._state == "proxying":
            assert self._peer is not None
            self._bytes_up += len(data)
            self.factory.metrics.bytes.inc(len(data), direction="up")
            self._peer.transport.write(data)
        elif self._state == "connecting":
            self._early_bytes += len(data)
            if self._early_bytes > _MAX_EARLY_BYTES:
                log.warn(
                    "client {client} sent {earlyBytes} bytes while reading was"
                    " paused; dropping it",
                    connection=self._id,
                    client=self._client,
                    earlyBytes=self._early_bytes,
                )
                self.transport.abortConnection()
                return
            self._early.append(data)
            if self._early_bytes >= _EARLY_HIGH_WATER and not self._early_paused:
                # Nowhere to send more yet: stop reading.
                self._early_paused = True
                self.transport.pauseProducing()
        # "rejected": discarded, so that closing does not reset the
        # connection under the ERROR frame. "closed": nothing to do.

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        previous, self._state = self._state, "closed"
        self.factory.metrics.connections_active.dec()
        if isinstance(self._address, str):
            self.factory.release(self._address)
            self._address = None
        if self._closed_by is None:
            self._closed_by = "client"
        if self._linger_call is not None and self._linger_call.active():
            self._linger_call.cancel()
        self._linger_call = None
        if previous == "connecting" and self._connecting is not None:
            assert self._attempt is not None
            log.info(
                "client {client} disconnected while connecting to {backend};"
                " connect attempt cancelled",
                connection=self._id,
                client=self._client,
                backend=self._attempt.name,
            )
            # Errbacks into _backend_failed, which sees the "closed" state.
            self._connecting.cancel()
        elif previous == "proxying":
            assert self._peer is not None and self._backend is not None
            close_after_flush(self._peer.transport)
            log.info(
                "closed {client} <-> {backend} (closed by {closedBy}):"
                " {bytesUp} bytes up, {bytesDown} bytes down in"
                " {duration:.3f}s",
                connection=self._id,
                client=self._client,
                backend=self._backend.name,
                closedBy=self._closed_by,
                bytesUp=self._bytes_up,
                bytesDown=self._bytes_down,
                duration=self.factory.reactor.seconds() - self._opened_at,
            )

    # -- backend side ----------------------------------------------------

    def backend_data_received(self, data: bytes) -> None:
        """
        Bytes from the backend, to be forwarded to the client. Called by
        this connection's backend protocol.
        """
        self._bytes_down += len(data)
        self.factory.metrics.bytes.inc(len(data), direction="down")
        self.transport.write(data)

    def backend_connection_lost(self, reason: Failure) -> None:
        """
        The backend connection ended: close the client side once what the
        backend sent has been flushed. Called by this connection's backend
        protocol.
        """
        assert self._backend is not None
        self.factory.tracker.connection_closed(self._backend)
        if self._state == "proxying":
            self._closed_by = "backend"
            close_after_flush(self.transport)

    # -- connecting ----------------------------------------------------

    def _connect_next(self) -> None:
        if not self._plan:
            self._reject()
            return
        backend = self._attempt = self._plan.pop(0)
        self._timed_out = False
        d = maybeDeferred(backend.endpoint.connect, BackendFactory(self))
        self._connecting = d
        self._connect_timer = self.factory.reactor.callLater(
            self.factory.connect_timeout, self._connect_timed_out, d
        )
        d.addCallbacks(
            self._backend_connected,
            self._backend_failed,
            callbackArgs=(backend,),
            errbackArgs=(backend,),
        )
        d.addErrback(
            lambda f: log.failure(
                "unexpected error while connecting client {client}",
                f,
                connection=self._id,
                client=self._client,
            )
        )

    def _connect_timed_out(self, attempt: Deferred[Any]) -> None:
        self._connect_timer = None
        self._timed_out = True
        attempt.cancel()

    def _connect_done(self) -> None:
        self._connecting = None
        if self._connect_timer is not None and self._connect_timer.active():
            self._connect_timer.cancel()
        self._connect_timer = None

    def _backend_connected(self, peer: BackendProtocol, backend: Backend) -> None:
        self._connect_done()
        self._backend = backend
        self._peer = peer
        self.factory.tracker.connect_succeeded(backend)
        if self._state != "connecting":
            # Not reachable while connects are cancelled on client loss;
            # never leave a backend connection behind if it happens anyway.
            peer.transport.loseConnection()
            return
        self._state = "proxying"
        peer_transport = peer.transport
        # The backend learns the client's real address before any byte.
        header = (
            proxy_header(self.transport.getPeer(), self.transport.getHost())
            if self.factory.send_proxy
            else b""
        )
        early, self._early = b"".join(self._early), []
        self._bytes_up += len(early)
        self.factory.metrics.bytes.inc(len(early), direction="up")
        log.info(
            "client {client} -> backend {backend}"
            " (attempt {attempt} of {candidates})",
            connection=self._id,
            client=self._client,
            backend=backend.name,
            attempt=len(self._tried) + 1,
            candidates=self._candidates,
        )
        self._relay = self.factory.splicer.relay(
            self.factory.reactor, self.transport, peer_transport, self,
            {"connection": self._id, "client": self._client},
        )
        if self._relay is not None:
            self._relay.start(header + early)
        else:
            self._relay_buffered(header + early, b"")

    # -- relaying ------------------------------------------------------

    def _relay_buffered(self, up: bytes, down: bytes, taken_back: bool = False) -> None:
        """
        Relay through the Twisted transports from now on, C{up} and C{down}
        first: a full write buffer on one side pauses reading on the other.
        C{taken_back}: from a splice relay, which left both not reading.
        """
        assert self._peer is not None
        peer_transport = self._peer.transport
        if self._early_paused or taken_back:
            self.transport.resumeProducing()
        if taken_back:
            peer_transport.resumeProducing()
        peer_transport.registerProducer(self.transport, True)
        self.transport.registerProducer(peer_transport, True)
        if up:
            peer_transport.write(up)
        if down:
            self.transport.write(down)

    def relay_counted(self, up: int, down: int) -> None:
        """Bytes the splice relay moved; called by L{SpliceRelay}."""
        metrics = self.factory.metrics.bytes
        if up:
            self._bytes_up += up
            metrics.inc(up, direction="up")
        if down:
            self._bytes_down += down
            metrics.inc(down, direction="down")

    def relay_handed_back(self, up: bytes, down: bytes) -> None:
        """
        The splice relay ended (end of stream, a socket error, splice
        refused): relay the rest through the transports, which find the end
        or the error themselves. Called by L{SpliceRelay}.
        """
        self._relay = None
        self._relay_buffered(up, down, taken_back=True)

    def _backend_failed(self, failure: Failure, backend: Backend) -> None:
        self._connect_done()
        if self._state != "connecting":
            # The client left and connectionLost cancelled this attempt.
            return
        if self._timed_out:
            reason = f"timed out after {self.factory.connect_timeout:g}s"
        else:
            reason = describe_failure(failure)
        tracker = self.factory.tracker
        tracker.connect_failed(backend)
        self.factory.metrics.connect_failures.inc(backend=backend.name)
        self._tried.append((backend, reason))
        log.warn(
            "backend {backend} failed for client {client}: {reason};"
            " marked down for {ejectFor:g}s, {remaining} left to try",
            connection=self._id,
            client=self._client,
            backend=backend.name,
            reason=reason,
            failures=tracker.state_of(backend).failures,
            ejectFor=tracker.eject_for,
            remaining=len(self._plan),
        )
        self._connect_next()

    # -- no backend ------------------------------------------------------

    def _reject(self) -> None:
        self._state = "rejected"
        self.factory.metrics.refused.inc(reason="no_backend")
        self._early = []
        tried = ", ".join(f"{b.name} {reason}" for b, reason in self._tried)
        count = len(self._tried)
        message = (
            f"no backend available: tried {count}"
            f" backend{'' if count == 1 else 's'} ({tried})"
        )
        log.error(
            "no backend available for client {client}: {message}",
            connection=self._id,
            client=self._client,
            message=message,
            tried=[b.name for b, _ in self._tried],
        )
        self._send_error_and_close(
            error_frame(NO_BACKEND, message, NO_BACKEND_RETRY_AFTER_MS)
        )

    def _refuse_too_many(self) -> None:
        self._state = "rejected"
        self.factory.metrics.refused.inc(reason="too_many")
        limit = self.factory.limit
        key = address_key(self.transport.getPeer())
        assert key is not None  # only counted clients are refused
        log.warn(
            "client {client} refused: {limit} connections from {address} already"
            " open (--max-connections-per-address)",
            connection=self._id,
            client=self._client,
            address=key,
            limit=limit.maximum,
        )
        self._send_error_and_close(
            error_frame(ErrorCode.HANDSHAKE_REJECTED, limit.refusal(key))
        )

    def _send_error_and_close(self, frame: bytes) -> None:
        self.transport.write(frame)
        # Keep reading (and discarding) so that closing with unread client
        # bytes does not turn into a TCP reset that can destroy the frame
        # before the client reads it. A plain socket transport can send its
        # FIN right after the frame; wrapped ones (TLS, HAProxy) cannot
        # half-close, so they close when the client does or when the linger
        # period ends.
        if self._early_paused:
            self.transport.resumeProducing()
        if isinstance(self.transport, FileDescriptor):
            self.transport.loseWriteConnection()
        self._linger_call = self.factory.reactor.callLater(
            self.factory.reject_linger, self.transport.loseConnection
        )


class BalancerFactory(Factory):
    """
    The listening side of the balancer: builds a L{FrontendProtocol} for each
    accepted client and holds what they share (scheduler, tracker, reactor,
    timeouts). Built by L{imgresume.balancer.build_balancer}; handed to a
    server endpoint by L{imgresume.balancer.tap.makeService}.
    """

    protocol = FrontendProtocol

    def __init__(
        self,
        scheduler: Scheduler,
        tracker: BackendTracker,
        reactor: IReactorTime,
        connect_timeout: float = 5.0,
        reject_linger: float = 2.0,
        send_proxy: bool = False,
        max_per_address: int = 0,
        metrics: BalancerMetrics | None = None,
        splice: bool = True,
    ) -> None:
        """
        @param scheduler: orders the backends for each new client.
        @param tracker: told about every connect outcome and close.
        @param reactor: the clock for timeouts (endpoints carry their own
            reactor for connecting).
        @param connect_timeout: seconds to wait for one backend to accept
            before trying the next.
        @param reject_linger: after sending a NO_BACKEND ERROR frame, seconds
            to wait for the client to close before closing it.
        @param send_proxy: write a PROXY protocol v2 header with the client's
            address to each backend connection before relaying.
        @param max_per_address: client connections allowed at once per client
            IP address (UNIX socket clients are not counted); 0 for no limit.
        @param metrics: where connections, bytes and connect failures are
            counted (default: a registry of its own); it also reads the
            tracker's per-backend state at each scrape.
        @param splice: relay plain-socket pairs with splice(2) where the
            platform has it (see L{imgresume.balancer._splice}); C{False}
            relays everything through the transports' buffers.
        """
        self.scheduler = scheduler
        self.tracker = tracker
        self.reactor = reactor
        self.connect_timeout = connect_timeout
        self.reject_linger = reject_linger
        self.send_proxy = send_proxy
        #: Client connections open per client address, and their limit.
        self.limit = ConnectionsPerAddress(max_per_address)
        self._last_connection_id = 0
        self.metrics = metrics if metrics is not None else BalancerMetrics(Registry())
        self.metrics.watch(tracker)
        #: Whether and how client connections are relayed with splice(2).
        self.splicer = Splicer(splice)

    def startFactory(self) -> None:
        self.splicer.announce()

    def stopFactory(self) -> None:
        self.splicer.stop()

    def new_connection_id(self) -> int:
        """
        A fresh number identifying one client connection in the logs.
        Called by L{FrontendProtocol.connectionMade}.
        """
        self._last_connection_id += 1
        return self._last_connection_id

    def admit(self, peer: IAddress) -> str | None | Literal[False]:
        """
        Count a new client connection from C{peer}: its address key (to
        L{release} when it closes), L{None} if it is not counted (a UNIX
        socket client), or C{False} if C{max_per_address} connections from the
        same address are already open (then nothing is counted).
        """
        key = address_key(peer)
        if key is None:
            return None
        if not self.limit.acquire(key):
            return False
        return key

    def release(self, key: str) -> None:
        """A client connection counted by L{admit} under C{key} closed."""
        self.limit.release(key)

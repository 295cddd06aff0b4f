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
Once connected, the two transports are registered as streaming producers of
each other, so neither direction buffers more than a transport's own
high-water mark.
"""

from __future__ import annotations

import os
import struct
from typing import Any, Literal

from twisted.internet.abstract import FileDescriptor
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.error import (
    ConnectError,
    ConnectionRefusedError,
    DNSLookupError,
    NoRouteError,
)
from twisted.internet.interfaces import IAddress, IDelayedCall, IReactorTime
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure

from ..metrics import BalancerMetrics, Registry
from ._proxyheader import addressKey, proxyHeader
from ._scheduler import Backend, BackendTracker, Scheduler

log = Logger()

# The imgresume ERROR frame, encoded here rather than imported so the balancer
# does not depend on the protocol package: header = u8 type + u32 body length;
# body = u16 code + u64 offset + u32 retry_after_ms + u16 message length +
# UTF-8 message. All big-endian.
_FRAME_HEADER = struct.Struct(">BI")
_ERROR_BODY = struct.Struct(">HQIH")
_ERROR_FRAME_TYPE = 0x09
NO_BACKEND = 0x0008
HANDSHAKE_REJECTED = 0x0005
_NO_BACKEND_RETRY_AFTER_MS = 1000
_MAX_ERROR_MESSAGE = 1024

# While connecting, client bytes are held up to this much, then reading is
# paused until a backend is connected.
_EARLY_HIGH_WATER = 64 * 1024
# A wrapping transport (TLS, HAProxy) may still deliver what it has already
# decoded after being paused: at most about one read's worth. Anything beyond
# this is a bug or an attack, and the client is dropped rather than buffered.
_MAX_EARLY_BYTES = 4 * _EARLY_HIGH_WATER


def _errorFrame(
    code: int, message: str, retryAfterMs: int = 0, offset: int = 0
) -> bytes:
    """
    Encode one imgresume ERROR frame. Messages longer than
    C{_MAX_ERROR_MESSAGE} bytes are cut (on a character boundary) and end in
    C{"..."}.
    """
    encoded = message.encode("utf-8")
    if len(encoded) > _MAX_ERROR_MESSAGE:
        cut = encoded[: _MAX_ERROR_MESSAGE - 3].decode("utf-8", "ignore")
        encoded = cut.encode("utf-8") + b"..."
    body = _ERROR_BODY.pack(code, offset, retryAfterMs, len(encoded)) + encoded
    return _FRAME_HEADER.pack(_ERROR_FRAME_TYPE, len(body)) + body


def _describeAddress(address: IAddress) -> str:
    """
    A short form of a peer address for logs: C{host:port}, C{unix:path}.
    """
    host = getattr(address, "host", None)
    port = getattr(address, "port", None)
    if host is not None and port is not None:
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    name = getattr(address, "name", None)
    if name is not None:
        if isinstance(name, bytes):
            name = name.decode("utf-8", "replace")
        return f"unix:{name}"
    return str(address)


def _describeFailure(failure: Failure) -> str:
    """
    A short reason for a failed connect, for logs and the ERROR message.
    """
    if failure.check(ConnectionRefusedError):
        return "refused"
    if failure.check(DNSLookupError):
        return "DNS lookup failed"
    if failure.check(NoRouteError):
        return "no route"
    errno = getattr(failure.value, "osError", None)
    if failure.check(ConnectError) and isinstance(errno, int):
        return os.strerror(errno)
    return failure.getErrorMessage() or failure.type.__name__


def _closeAfterFlush(transport: Any) -> None:
    """
    Close the survivor of a proxied pair once its write buffer is flushed.

    Its producer (the other, now closed, transport) is unregistered first: a
    transport that drains its buffer while its streaming producer is paused
    resumes the producer instead of finishing its own close.
    """
    transport.unregisterProducer()
    transport.loseConnection()


class _BackendProtocol(Protocol):
    """
    The balancer's connection to one backend. Thin on purpose: everything it
    hears goes to its L{FrontendProtocol}.
    """

    def __init__(self, frontend: FrontendProtocol) -> None:
        self._frontend = frontend

    def dataReceived(self, data: bytes) -> None:
        self._frontend.backendDataReceived(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._frontend.backendConnectionLost(reason)


class _BackendFactory(Factory):
    """
    Builds the one L{_BackendProtocol} of a connect attempt. Quiet: one is
    made per client connection.
    """

    noisy = False

    def __init__(self, frontend: FrontendProtocol) -> None:
        self._frontend = frontend

    def buildProtocol(self, addr: IAddress) -> _BackendProtocol:
        return _BackendProtocol(self._frontend)


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
        self._connectTimer: IDelayedCall | None = None
        self._timedOut = False
        self._backend: Backend | None = None
        self._peer: _BackendProtocol | None = None
        self._early: list[bytes] = []
        self._earlyBytes = 0
        self._earlyPaused = False
        self._lingerCall: IDelayedCall | None = None
        self._closedBy: str | None = None
        self._bytesUp = 0
        self._bytesDown = 0
        self._address: str | None | Literal[False] = None

    # -- client side ---------------------------------------------------

    def connectionMade(self) -> None:
        self._id = self.factory.newConnectionID()
        self._client = _describeAddress(self.transport.getPeer())
        self._openedAt = self.factory.reactor.seconds()
        self.factory.metrics.connections.inc()
        self.factory.metrics.connections_active.inc()
        self._address = self.factory.admit(self.transport.getPeer())
        if self._address is False:
            self._refuseTooMany()
            return
        self._plan = list(self.factory.scheduler.plan())
        self._candidates = len(self._plan)
        self._connectNext()

    def dataReceived(self, data: bytes) -> None:
        if self._state == "proxying":
            assert self._peer is not None
            self._bytesUp += len(data)
            self.factory.metrics.bytes.inc(len(data), direction="up")
            self._peer.transport.write(data)
        elif self._state == "connecting":
            self._earlyBytes += len(data)
            if self._earlyBytes > _MAX_EARLY_BYTES:
                log.warn(
                    "client {client} sent {earlyBytes} bytes while reading was"
                    " paused; dropping it",
                    connection=self._id,
                    client=self._client,
                    earlyBytes=self._earlyBytes,
                )
                self.transport.abortConnection()
                return
            self._early.append(data)
            if self._earlyBytes >= _EARLY_HIGH_WATER and not self._earlyPaused:
                # Nowhere to send more yet: stop reading.
                self._earlyPaused = True
                self.transport.pauseProducing()
        # "rejected": discarded, so that closing does not reset the
        # connection under the ERROR frame. "closed": nothing to do.

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        previous, self._state = self._state, "closed"
        self.factory.metrics.connections_active.dec()
        if isinstance(self._address, str):
            self.factory.release(self._address)
            self._address = None
        if self._closedBy is None:
            self._closedBy = "client"
        if self._lingerCall is not None and self._lingerCall.active():
            self._lingerCall.cancel()
        self._lingerCall = None
        if previous == "connecting" and self._connecting is not None:
            assert self._attempt is not None
            log.info(
                "client {client} disconnected while connecting to {backend};"
                " connect attempt cancelled",
                connection=self._id,
                client=self._client,
                backend=self._attempt.name,
            )
            # Errbacks into _backendFailed, which sees the "closed" state.
            self._connecting.cancel()
        elif previous == "proxying":
            assert self._peer is not None and self._backend is not None
            _closeAfterFlush(self._peer.transport)
            log.info(
                "closed {client} <-> {backend} (closed by {closedBy}):"
                " {bytesUp} bytes up, {bytesDown} bytes down in"
                " {duration:.3f}s",
                connection=self._id,
                client=self._client,
                backend=self._backend.name,
                closedBy=self._closedBy,
                bytesUp=self._bytesUp,
                bytesDown=self._bytesDown,
                duration=self.factory.reactor.seconds() - self._openedAt,
            )

    # -- backend side ----------------------------------------------------

    def backendDataReceived(self, data: bytes) -> None:
        """
        Bytes from the backend, to be forwarded to the client. Called by
        this connection's backend protocol.
        """
        self._bytesDown += len(data)
        self.factory.metrics.bytes.inc(len(data), direction="down")
        self.transport.write(data)

    def backendConnectionLost(self, reason: Failure) -> None:
        """
        The backend connection ended: close the client side once what the
        backend sent has been flushed. Called by this connection's backend
        protocol.
        """
        assert self._backend is not None
        self.factory.tracker.connectionClosed(self._backend)
        if self._state == "proxying":
            self._closedBy = "backend"
            _closeAfterFlush(self.transport)

    # -- connecting ----------------------------------------------------

    def _connectNext(self) -> None:
        if not self._plan:
            self._reject()
            return
        backend = self._attempt = self._plan.pop(0)
        self._timedOut = False
        d = maybeDeferred(backend.endpoint.connect, _BackendFactory(self))
        self._connecting = d
        self._connectTimer = self.factory.reactor.callLater(
            self.factory.connectTimeout, self._connectTimedOut, d
        )
        d.addCallbacks(
            self._backendConnected,
            self._backendFailed,
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

    def _connectTimedOut(self, attempt: Deferred[Any]) -> None:
        self._connectTimer = None
        self._timedOut = True
        attempt.cancel()

    def _connectDone(self) -> None:
        self._connecting = None
        if self._connectTimer is not None and self._connectTimer.active():
            self._connectTimer.cancel()
        self._connectTimer = None

    def _backendConnected(self, peer: _BackendProtocol, backend: Backend) -> None:
        self._connectDone()
        self._backend = backend
        self._peer = peer
        self.factory.tracker.connectSucceeded(backend)
        if self._state != "connecting":
            # Not reachable while connects are cancelled on client loss;
            # never leave a backend connection behind if it happens anyway.
            peer.transport.loseConnection()
            return
        self._state = "proxying"
        peerTransport = peer.transport
        if self._earlyPaused:
            self.transport.resumeProducing()
        # Flow control both ways: a full write buffer on one side pauses
        # reading on the other.
        peerTransport.registerProducer(self.transport, True)
        self.transport.registerProducer(peerTransport, True)
        if self.factory.sendProxy:
            # The backend learns the client's real address before any byte.
            peerTransport.write(
                proxyHeader(self.transport.getPeer(), self.transport.getHost())
            )
        early, self._early = self._early, []
        for chunk in early:
            self._bytesUp += len(chunk)
            peerTransport.write(chunk)
        self.factory.metrics.bytes.inc(sum(map(len, early)), direction="up")
        log.info(
            "client {client} -> backend {backend}"
            " (attempt {attempt} of {candidates})",
            connection=self._id,
            client=self._client,
            backend=backend.name,
            attempt=len(self._tried) + 1,
            candidates=self._candidates,
        )

    def _backendFailed(self, failure: Failure, backend: Backend) -> None:
        self._connectDone()
        if self._state != "connecting":
            # The client left and connectionLost cancelled this attempt.
            return
        if self._timedOut:
            reason = f"timed out after {self.factory.connectTimeout:g}s"
        else:
            reason = _describeFailure(failure)
        tracker = self.factory.tracker
        tracker.connectFailed(backend)
        self.factory.metrics.connect_failures.inc(backend=backend.name)
        self._tried.append((backend, reason))
        log.warn(
            "backend {backend} failed for client {client}: {reason};"
            " marked down for {ejectFor:g}s, {remaining} left to try",
            connection=self._id,
            client=self._client,
            backend=backend.name,
            reason=reason,
            failures=tracker.stateOf(backend).failures,
            ejectFor=tracker.ejectFor,
            remaining=len(self._plan),
        )
        self._connectNext()

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
        self._sendErrorAndClose(
            _errorFrame(NO_BACKEND, message, _NO_BACKEND_RETRY_AFTER_MS)
        )

    def _refuseTooMany(self) -> None:
        self._state = "rejected"
        self.factory.metrics.refused.inc(reason="too_many")
        limit = self.factory.maxPerAddress
        key = addressKey(self.transport.getPeer())
        log.warn(
            "client {client} refused: {limit} connections from {address} already"
            " open (--max-connections-per-address)",
            connection=self._id,
            client=self._client,
            address=key,
            limit=limit,
        )
        self._sendErrorAndClose(_errorFrame(
            HANDSHAKE_REJECTED,
            f"too many connections from {key}: at most {limit} at a time per"
            " client address; close some, then retry",
        ))

    def _sendErrorAndClose(self, frame: bytes) -> None:
        self.transport.write(frame)
        # Keep reading (and discarding) so that closing with unread client
        # bytes does not turn into a TCP reset that can destroy the frame
        # before the client reads it. A plain socket transport can send its
        # FIN right after the frame; wrapped ones (TLS, HAProxy) cannot
        # half-close, so they close when the client does or when the linger
        # period ends.
        if self._earlyPaused:
            self.transport.resumeProducing()
        if isinstance(self.transport, FileDescriptor):
            self.transport.loseWriteConnection()
        self._lingerCall = self.factory.reactor.callLater(
            self.factory.rejectLinger, self.transport.loseConnection
        )


class BalancerFactory(Factory):
    """
    The listening side of the balancer: builds a L{FrontendProtocol} for each
    accepted client and holds what they share (scheduler, tracker, reactor,
    timeouts). Built by L{imgresume.balancer.buildBalancer}; handed to a
    server endpoint by L{imgresume.balancer.tap.makeService}.
    """

    protocol = FrontendProtocol

    def __init__(
        self,
        scheduler: Scheduler,
        tracker: BackendTracker,
        reactor: IReactorTime,
        connectTimeout: float = 5.0,
        rejectLinger: float = 2.0,
        sendProxy: bool = False,
        maxPerAddress: int = 0,
        metrics: BalancerMetrics | None = None,
    ) -> None:
        """
        @param scheduler: orders the backends for each new client.
        @param tracker: told about every connect outcome and close.
        @param reactor: the clock for timeouts (endpoints carry their own
            reactor for connecting).
        @param connectTimeout: seconds to wait for one backend to accept
            before trying the next.
        @param rejectLinger: after sending a NO_BACKEND ERROR frame, seconds
            to wait for the client to close before closing it.
        @param sendProxy: write a PROXY protocol v2 header with the client's
            address to each backend connection before relaying.
        @param maxPerAddress: client connections allowed at once per client
            IP address (UNIX socket clients are not counted); 0 for no limit.
        @param metrics: where connections, bytes and connect failures are
            counted (default: a registry of its own); it also reads the
            tracker's per-backend state at each scrape.
        """
        self.scheduler = scheduler
        self.tracker = tracker
        self.reactor = reactor
        self.connectTimeout = connectTimeout
        self.rejectLinger = rejectLinger
        self.sendProxy = sendProxy
        self.maxPerAddress = maxPerAddress
        self._perAddress: dict[str, int] = {}
        self._lastConnectionID = 0
        self.metrics = metrics if metrics is not None else BalancerMetrics(Registry())
        self.metrics.watch(tracker)

    def newConnectionID(self) -> int:
        """
        A fresh number identifying one client connection in the logs.
        Called by L{FrontendProtocol.connectionMade}.
        """
        self._lastConnectionID += 1
        return self._lastConnectionID

    def admit(self, peer: IAddress) -> str | None | Literal[False]:
        """
        Count a new client connection from C{peer}: its address key (to
        L{release} when it closes), L{None} if it is not counted (a UNIX
        socket client), or C{False} if C{maxPerAddress} connections from the
        same address are already open (then nothing is counted).
        """
        key = addressKey(peer)
        if key is None:
            return None
        count = self._perAddress.get(key, 0)
        if self.maxPerAddress and count >= self.maxPerAddress:
            return False
        self._perAddress[key] = count + 1
        return key

    def release(self, key: str) -> None:
        """A client connection counted by L{admit} under C{key} closed."""
        count = self._perAddress.pop(key, 0) - 1
        if count > 0:
            self._perAddress[key] = count

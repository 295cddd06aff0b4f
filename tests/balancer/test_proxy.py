# -*- test-case-name: tests.balancer.test_proxy -*-
"""
Tests for L{imgresume.balancer}: the tracker and scheduler (pure, on a
L{Clock}), the proxy over L{StringTransport}s, the proxy over real TCP
sockets on 127.0.0.1, the twistd options, and the real C{twistd imgresume-lb}
in a subprocess. The active health checks are in L{tests.balancer.test_health}.
"""

from __future__ import annotations

import errno
import hashlib
import os
import random
import shutil
import socket
import struct
import sys
import tempfile
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from zope.interface import implementer

from twisted.internet import reactor
from twisted.internet.defer import (
    Deferred,
    DeferredList,
    inlineCallbacks,
    succeed,
)
from twisted.internet.endpoints import (
    TCP4ClientEndpoint,
    TCP4ServerEndpoint,
    clientFromString,
    connectProtocol,
    serverFromString,
)
from twisted.internet.error import (
    ConnectError,
    ConnectionDone,
    ConnectionRefusedError,
)
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.protocol import Factory, ProcessProtocol, Protocol
from twisted.internet.task import Clock, deferLater
from twisted.internet.testing import (
    EventLoggingObserver,
    MemoryReactor,
    MemoryReactorClock,
    StringTransport,
)
from twisted.logger import globalLogPublisher
from twisted.python import usage
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase

from imgresume.balancer import (
    Backend,
    BackendTracker,
    BalancerFactory,
    FrontendProtocol,
    HealthChecker,
    RoundRobinScheduler,
    build_balancer,
)
from imgresume.balancer._backend import describe_failure, error_frame
from imgresume.balancer.tap import Options, makeService
from tests.support.processes import REPO_ROOT



def expectedErrorFrame(message: str) -> bytes:
    """
    The NO_BACKEND ERROR frame as the wire format spells it, built here
    independently of the balancer's encoder.
    """
    text = message.encode("utf-8")
    body = struct.pack(">HQIH", 0x0008, 0, 1000, len(text)) + text
    return struct.pack(">BI", 0x09, len(body)) + body


def refusedPort() -> int:
    """
    A 127.0.0.1 port that nothing listens on (bound, then released).
    """
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def buffered(transport: Any) -> int:
    """
    Bytes a socket transport holds in its write buffer.
    """
    return len(transport.dataBuffer) - transport.offset + transport._tempDataLen


def events(observer: EventLoggingObserver, text: str) -> list[dict[str, Any]]:
    """
    The captured log events whose format string contains C{text}.
    """
    return [e for e in observer if text in (e.get("log_format") or "")]


@implementer(IStreamClientEndpoint)
class HangingEndpoint:
    """
    A client endpoint whose connect attempts never complete on their own;
    records attempts and cancellations.
    """

    def __init__(self) -> None:
        self.attempts: list[Deferred[Any]] = []
        self.factories: list[Any] = []
        self.cancelled = 0
        self.attempted: Deferred[None] = Deferred()

    def _cancel(self, d: Deferred[Any]) -> None:
        self.cancelled += 1

    def connect(self, factory: Any) -> Deferred[Any]:
        d: Deferred[Any] = Deferred(self._cancel)
        self.attempts.append(d)
        self.factories.append(factory)
        if not self.attempted.called:
            self.attempted.callback(None)
        return d


@implementer(IStreamClientEndpoint)
class RefusingEndpoint:
    """
    A client endpoint that refuses every connect at once.
    """

    def connect(self, factory: Any) -> Deferred[Any]:
        d: Deferred[Any] = Deferred()
        d.errback(ConnectionRefusedError())
        return d


class TrackerTests(TestCase):
    """
    Tests for L{BackendTracker}: per-backend counts and passive ejection.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1000)
        self.a = Backend("a", RefusingEndpoint())
        self.b = Backend("b", RefusingEndpoint())
        self.tracker = BackendTracker([self.a, self.b], self.clock, eject_for=2.0)

    def test_initialState(self) -> None:
        """
        Every backend starts up, with no connections and no failures.
        """
        self.assertEqual(self.tracker.backends, (self.a, self.b))
        for backend in (self.a, self.b):
            state = self.tracker.state_of(backend)
            self.assertTrue(self.tracker.is_up(backend))
            self.assertEqual(
                (state.active, state.total, state.failures, state.last_failure),
                (0, 0, 0, None),
            )

    def test_needsBackends(self) -> None:
        """
        A tracker with no backends, or a negative eject period, is refused.
        """
        self.assertRaises(ValueError, BackendTracker, [], self.clock)
        self.assertRaises(ValueError, BackendTracker, [self.a], self.clock, -1)

    def test_activeCounts(self) -> None:
        """
        Successful connects count up C{active} and C{total}; closes count
        C{active} down, never below zero.
        """
        self.tracker.connect_succeeded(self.a)
        self.tracker.connect_succeeded(self.a)
        self.tracker.connection_closed(self.a)
        state = self.tracker.state_of(self.a)
        self.assertEqual((state.active, state.total), (1, 2))
        self.tracker.connection_closed(self.a)
        self.tracker.connection_closed(self.a)
        self.assertEqual(self.tracker.state_of(self.a).active, 0)

    def test_failureEjectsForAWhile(self) -> None:
        """
        A failed connect records the time, counts a consecutive failure and
        marks the backend down for C{eject_for} seconds only.
        """
        self.tracker.connect_failed(self.a)
        state = self.tracker.state_of(self.a)
        self.assertEqual((state.failures, state.last_failure), (1, 1000.0))
        self.assertFalse(self.tracker.is_up(self.a))
        self.assertTrue(self.tracker.is_up(self.b))
        self.clock.advance(1.9)
        self.assertFalse(self.tracker.is_up(self.a))
        self.clock.advance(0.1)
        self.assertTrue(self.tracker.is_up(self.a))
        self.tracker.connect_failed(self.a)
        self.assertEqual(self.tracker.state_of(self.a).failures, 2)

    def test_successResetsFailures(self) -> None:
        """
        A successful connect clears the consecutive failure count and any
        down mark, keeping the time of the last failure.
        """
        self.tracker.connect_failed(self.a)
        self.tracker.connect_succeeded(self.a)
        state = self.tracker.state_of(self.a)
        self.assertEqual((state.failures, state.last_failure), (0, 1000.0))
        self.assertTrue(self.tracker.is_up(self.a))

    def test_markDownAndUp(self) -> None:
        """
        The health-checker seam: C{markDown()} without a duration holds until
        C{markUp()}; neither a shorter passive ejection nor a successful
        client connect ends it.
        """
        self.tracker.mark_down(self.b)
        self.tracker.connect_failed(self.b)
        self.clock.advance(3600)
        self.assertFalse(self.tracker.is_up(self.b))
        self.tracker.connect_succeeded(self.b)
        self.assertFalse(self.tracker.is_up(self.b))
        self.assertEqual(self.tracker.state_of(self.b).active, 1)
        self.tracker.mark_up(self.b)
        self.assertTrue(self.tracker.is_up(self.b))
        self.assertEqual(self.tracker.state_of(self.b).failures, 0)


class RoundRobinSchedulerTests(TestCase):
    """
    Tests for L{RoundRobinScheduler.plan}.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.backends = [Backend(name, RefusingEndpoint()) for name in "abc"]
        self.tracker = BackendTracker(self.backends, self.clock, eject_for=2.0)
        self.scheduler = RoundRobinScheduler(self.tracker)

    def names(self) -> str:
        return "".join(b.name for b in self.scheduler.plan())

    def test_rotates(self) -> None:
        """
        Each plan lists every backend once, starting one further along.
        """
        self.assertEqual(
            [self.names() for _ in range(4)], ["abc", "bca", "cab", "abc"]
        )

    def test_downBackendsLast(self) -> None:
        """
        A backend that is down goes to the end of every plan, and its turns
        are shared evenly by the others.
        """
        self.tracker.connect_failed(self.backends[1])
        self.assertEqual(
            [self.names() for _ in range(4)], ["acb", "cab", "acb", "cab"]
        )
        self.clock.advance(2.0)
        self.assertEqual(self.names(), "abc")

    def test_allDownStillPlans(self) -> None:
        """
        With every backend down, plans still list them all, in rotation.
        """
        for backend in self.backends:
            self.tracker.connect_failed(backend)
        self.assertEqual([self.names() for _ in range(3)], ["abc", "bca", "cab"])

    @settings(max_examples=200, deadline=None)
    @given(
        count=st.integers(1, 6),
        steps=st.lists(
            st.tuples(st.sampled_from(["fail", "up", "plan", "tick"]), st.integers(0, 5))
        ),
    )
    def test_planInvariants(self, count: int, steps: list[tuple[str, int]]) -> None:
        """
        Whatever happened before, a plan is a permutation of the backends
        with every up backend before every down one.
        """
        clock = Clock()
        backends = [Backend(str(i), RefusingEndpoint()) for i in range(count)]
        tracker = BackendTracker(backends, clock, eject_for=2.0)
        scheduler = RoundRobinScheduler(tracker)
        for action, index in steps + [("plan", 0)]:
            backend = backends[index % count]
            if action == "fail":
                tracker.connect_failed(backend)
            elif action == "up":
                tracker.mark_up(backend)
            elif action == "tick":
                clock.advance(index / 2)
            else:
                plan = scheduler.plan()
                self.assertEqual(sorted(map(id, plan)), sorted(map(id, backends)))
                flags = [tracker.is_up(b) for b in plan]
                self.assertEqual(flags, sorted(flags, reverse=True))


class ErrorFrameTests(TestCase):
    """
    Tests for the balancer's private ERROR frame encoder.
    """

    def test_layout(self) -> None:
        """
        The frame is type 0x09, a u32 body length, then code, offset,
        retry-after and a length-prefixed UTF-8 message, all big-endian.
        """
        frame = error_frame(0x0008, "no backend: \N{SNOWMAN}", 1000)
        self.assertEqual(frame, expectedErrorFrame("no backend: \N{SNOWMAN}"))
        self.assertEqual(frame[:5], b"\x09\x00\x00\x00\x1f")

    def test_longMessageCut(self) -> None:
        """
        An overlong message is cut to 1024 bytes on a character boundary.
        """
        frame = error_frame(0x0008, "\N{SNOWMAN}" * 1000, 1000)
        (length,) = struct.unpack(">H", frame[5 + 14 : 5 + 16])
        message = frame[5 + 16 :]
        self.assertEqual(len(message), length)
        self.assertLessEqual(length, 1024)
        self.assertTrue(message.decode("utf-8").endswith("..."))


class DescribeFailureTests(TestCase):
    """
    Tests for the short connect-failure reasons used in logs and messages.
    """

    def test_reasons(self) -> None:
        """
        Refusals read "refused", OS errors their C{strerror}, anything else
        its message.
        """
        self.assertEqual(describe_failure(Failure(ConnectionRefusedError())), "refused")
        self.assertEqual(
            describe_failure(Failure(ConnectError(errno.ENOENT))),
            os.strerror(errno.ENOENT),
        )
        self.assertEqual(describe_failure(Failure(ValueError("odd"))), "odd")


class FrontendMemoryTests(TestCase):
    """
    Tests for L{FrontendProtocol} over L{StringTransport}s and a L{Clock}:
    the connecting phase, without sockets.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.hanging = HangingEndpoint()
        self.second = HangingEndpoint()
        self.backends = [Backend("hang", self.hanging), Backend("second", self.second)]
        self.tracker = BackendTracker(self.backends, self.clock)
        self.factory = BalancerFactory(
            RoundRobinScheduler(self.tracker),
            self.tracker,
            self.clock,
            connect_timeout=5.0,
        )
        self.client = StringTransport()
        self.proto = self.factory.buildProtocol(self.client.getPeer())
        self.proto.makeConnection(self.client)

    def completeConnect(self, endpoint: HangingEndpoint) -> StringTransport:
        """
        Make the last connect attempt on C{endpoint} succeed; return the
        backend-side transport.
        """
        peer = endpoint.factories[-1].buildProtocol(None)
        transport = StringTransport()
        peer.makeConnection(transport)
        endpoint.attempts[-1].callback(peer)
        return transport

    def test_pausedUntilConnected(self) -> None:
        """
        While connecting, the client is read until 64 KiB are held, then
        paused; once a backend accepts, the held bytes are forwarded, the
        transports are cross-registered as streaming producers and reading
        resumes.
        """
        self.assertEqual(self.client.producerState, "producing")
        self.proto.dataReceived(b"x" * (64 * 1024 - 1))
        self.assertEqual(self.client.producerState, "producing")
        self.proto.dataReceived(b"y")
        self.assertEqual(self.client.producerState, "paused")
        backend = self.completeConnect(self.hanging)
        self.assertEqual(self.client.producerState, "producing")
        self.assertEqual(backend.value(), b"x" * (64 * 1024 - 1) + b"y")
        self.assertIs(backend.producer, self.client)
        self.assertTrue(backend.streaming)
        self.assertIs(self.client.producer, backend)
        self.assertTrue(self.client.streaming)

    def test_earlyDataForwarded(self) -> None:
        """
        Bytes a wrapping transport delivers despite the pause are held and
        forwarded, in order, before anything else.
        """
        self.proto.dataReceived(b"early ")
        backend = self.completeConnect(self.hanging)
        self.proto.dataReceived(b"late")
        self.assertEqual(backend.value(), b"early late")

    def test_earlyDataBounded(self) -> None:
        """
        More than 256 KiB delivered while connecting (possible only from a
        wrapping transport that ignores the pause) drops the client rather
        than buffering it.
        """
        self.proto.dataReceived(b"x" * (256 * 1024))
        self.assertFalse(self.client.disconnecting)
        self.proto.dataReceived(b"x")
        self.assertTrue(self.client.disconnected)

    def test_timeoutTriesNext(self) -> None:
        """
        A backend that does not accept within the connect timeout is
        cancelled, counted as failed and skipped for the next one.
        """
        self.clock.advance(4.9)
        self.assertEqual((self.hanging.cancelled, self.second.attempts), (0, []))
        self.clock.advance(0.1)
        self.assertEqual(self.hanging.cancelled, 1)
        self.assertEqual(len(self.second.attempts), 1)
        self.assertEqual(self.tracker.state_of(self.backends[0]).failures, 1)
        self.completeConnect(self.second)
        self.assertEqual(self.client.producerState, "producing")
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_clientLeavesWhileConnecting(self) -> None:
        """
        A client that leaves while its backend is connecting cancels the
        attempt and its timer; the backend is not blamed.
        """
        self.proto.connectionLost(ConnectionDone())
        self.assertEqual(self.hanging.cancelled, 1)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual(self.second.attempts, [])
        self.assertEqual(self.tracker.state_of(self.backends[0]).failures, 0)

    def test_rejectLingers(self) -> None:
        """
        When every backend fails, the client gets the ERROR frame, reading
        resumes (to drain, not buffer) and the connection closes after the
        linger period if the client does not close first.
        """
        self.clock.advance(5.0)
        self.clock.advance(5.0)
        self.assertTrue(self.client.value().startswith(b"\x09"))
        self.assertEqual(self.client.producerState, "producing")
        self.proto.dataReceived(b"ignored" * 1000)
        self.assertFalse(self.client.disconnecting)
        self.clock.advance(self.factory.reject_linger)
        self.assertTrue(self.client.disconnecting)


class NamedBackend(Protocol):
    """
    A test backend: announces its name on a line, then echoes.
    """

    def connectionMade(self) -> None:
        self.lost: Deferred[None] = Deferred()
        self.factory.connections.append(self)
        self.transport.write(self.factory.name + b"\n")

    def dataReceived(self, data: bytes) -> None:
        self.transport.write(data)

    def connectionLost(self, reason: Any) -> None:
        self.lost.callback(None)


class SlowEcho(Protocol):
    """
    A test backend that echoes, stopping reading for 50 ms after every
    4 MiB, and keeps a hash of what it received.
    """

    def connectionMade(self) -> None:
        self.lost: Deferred[None] = Deferred()
        self.factory.connections.append(self)
        self.received = 0
        self.digest = hashlib.sha256()

    def dataReceived(self, data: bytes) -> None:
        before = self.received
        self.received += len(data)
        self.digest.update(data)
        self.transport.write(data)
        if self.received // (4 << 20) != before // (4 << 20):
            self.transport.pauseProducing()
            reactor.callLater(0.05, self.transport.resumeProducing)

    def connectionLost(self, reason: Any) -> None:
        self.lost.callback(None)


class SendThenClose(Protocol):
    """
    A test backend that sends C{factory.payload} and closes.
    """

    def connectionMade(self) -> None:
        self.lost: Deferred[None] = Deferred()
        self.factory.connections.append(self)
        self.transport.write(self.factory.payload)
        self.transport.loseConnection()

    def connectionLost(self, reason: Any) -> None:
        self.lost.callback(None)


class Collect(Protocol):
    """
    A test backend that only collects what it receives and, when closed,
    fires C{factory.finished} with it.
    """

    def connectionMade(self) -> None:
        self.lost: Deferred[None] = Deferred()
        self.factory.connections.append(self)
        self.data = bytearray()

    def dataReceived(self, data: bytes) -> None:
        self.data += data

    def connectionLost(self, reason: Any) -> None:
        self.lost.callback(None)
        self.factory.finished.callback(bytes(self.data))


class Client(Protocol):
    """
    A test client: collects bytes, lets a test wait for an amount of them
    and for the close.
    """

    def __init__(self, greeting: bytes = b"") -> None:
        self.greeting = greeting
        self.data = bytearray()
        self.closed: Deferred[Any] = Deferred()
        self._waiting: list[tuple[int, Deferred[bytes]]] = []

    def connectionMade(self) -> None:
        if self.greeting:
            self.transport.write(self.greeting)

    def dataReceived(self, data: bytes) -> None:
        self.data += data
        ready = [(n, d) for n, d in self._waiting if len(self.data) >= n]
        for n, d in ready:
            self._waiting.remove((n, d))
            d.callback(bytes(self.data[:n]))

    def receive(self, count: int) -> Deferred[bytes]:
        """
        Fire with the first C{count} bytes once they have arrived.
        """
        if len(self.data) >= count:
            return succeed(bytes(self.data[:count]))
        d: Deferred[bytes] = Deferred()
        self._waiting.append((count, d))
        return d

    def connectionLost(self, reason: Any) -> None:
        self.closed.callback(reason.value)


class TrackedFrontend(FrontendProtocol):
    """
    A L{FrontendProtocol} that records how often its client transport was
    paused for backpressure and the largest write buffers it saw.
    """

    def connectionMade(self) -> None:
        self.lost: Deferred[None] = Deferred()
        self.pauses = 0
        self.maxToBackend = 0
        self.maxToClient = 0
        self.factory.frontends.append(self)
        super().connectionMade()
        # Count only pauses after the initial one made while connecting.
        pause = self.transport.pauseProducing

        def countingPause() -> None:
            self.pauses += 1
            pause()

        self.transport.pauseProducing = countingPause

    def dataReceived(self, data: bytes) -> None:
        super().dataReceived(data)
        if self._peer is not None:
            self.maxToBackend = max(self.maxToBackend, buffered(self._peer.transport))

    def backend_data_received(self, data: bytes) -> None:
        super().backend_data_received(data)
        self.maxToClient = max(self.maxToClient, buffered(self.transport))

    def connectionLost(self, reason: Any) -> None:
        super().connectionLost(reason)
        self.lost.callback(None)


class TrackedBalancerFactory(BalancerFactory):
    """
    A L{BalancerFactory} that builds L{TrackedFrontend}s and keeps them.
    """

    protocol = TrackedFrontend

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.frontends: list[TrackedFrontend] = []


#: The accept queue of the listeners of L{BalancerOnSockets}.
BACKLOG = 1024


class BalancerOnSockets:
    """
    A mixin for L{TestCase}s of a balancer on real sockets of 127.0.0.1, in
    process: test backends, a balancer (L{TrackedBalancerFactory}) and test
    clients, each closed at cleanup. Each test waits for every connection it
    caused to close, so trial's unclean-reactor check doubles as a leak
    check. Listeners queue up to L{BACKLOG} connections, so that hundreds of
    clients connecting at once are not left to SYN retransmissions.
    """

    addCleanup: Any

    def setUp(self) -> None:
        self.observer = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        self.backendConnections: list[Any] = []
        self.addCleanup(self.allClosed)

    def allClosed(self) -> Deferred[Any]:
        """
        Wait until every backend-side and balancer-side connection is gone.
        """
        frontends = getattr(self, "factory", None)
        waits = [c.lost for c in self.backendConnections]
        if frontends is not None:
            waits += [f.lost for f in frontends.frontends]
        return DeferredList(waits)

    @inlineCallbacks
    def listenBackend(self, protocol: type[Protocol], **attrs: Any) -> Any:
        """
        Start a test backend on an ephemeral port; return its endpoint string.
        """
        factory = Factory.forProtocol(protocol)
        factory.noisy = False
        factory.connections = self.backendConnections
        for name, value in attrs.items():
            setattr(factory, name, value)
        port = yield TCP4ServerEndpoint(reactor, 0, backlog=BACKLOG, interface="127.0.0.1").listen(
            factory
        )
        self.addCleanup(port.stopListening)
        return f"tcp:127.0.0.1:{port.getHost().port}"

    @inlineCallbacks
    def startBalancer(self, backends: list[Any], **kwargs: Any) -> Any:
        """
        Start a balancer over C{backends} (endpoint strings or L{Backend}s)
        on an ephemeral port of 127.0.0.1 (or on the server endpoint string
        C{listen}); return that port number.
        """
        parsed = [
            b if isinstance(b, Backend) else Backend(b, clientFromString(reactor, b))
            for b in backends
        ]
        self.tracker = BackendTracker(parsed, reactor, eject_for=kwargs.pop("eject_for", 2.0))
        listen = kwargs.pop("listen", None)
        self.factory = TrackedBalancerFactory(
            RoundRobinScheduler(self.tracker), self.tracker, reactor, **kwargs
        )
        self.factory.noisy = False
        endpoint = (
            serverFromString(reactor, listen) if listen is not None
            else TCP4ServerEndpoint(reactor, 0, backlog=BACKLOG, interface="127.0.0.1")
        )
        port = yield endpoint.listen(self.factory)
        self.addCleanup(port.stopListening)
        return port.getHost().port

    @inlineCallbacks
    def connect(self, port: int, client: Client | None = None) -> Any:
        """
        Connect a test client to C{port}; it is closed at cleanup.
        """
        client = client or Client()
        yield connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), client)
        self.addCleanup(lambda: client.closed)
        self.addCleanup(client.transport.loseConnection)
        return client


class RealSocketTests(BalancerOnSockets, TestCase):
    """
    Tests of the balancer with real TCP sockets on 127.0.0.1, in process.
    """

    @inlineCallbacks
    def test_roundRobin(self) -> None:
        """
        Successive clients land on the three backends in turn, and bytes
        round-trip through each.
        """
        names = [b"zero", b"one", b"two"]
        backends = []
        for name in names:
            backends.append((yield self.listenBackend(NamedBackend, name=name)))
        port = yield self.startBalancer(backends)
        seen = []
        for i in range(6):
            client = yield self.connect(port)
            line = yield client.receive(len(names[i % 3]) + 1)
            seen.append(line.rstrip(b"\n"))
            client.transport.write(b"ping %d" % i)
            echoed = yield client.receive(len(line) + 6)
            self.assertEqual(echoed[len(line) :], b"ping %d" % i)
            client.transport.loseConnection()
            yield client.closed
        self.assertEqual(seen, names * 2)
        accepted = events(self.observer, "-> backend")
        self.assertEqual([e["backend"] for e in accepted], backends * 2)
        yield self.allClosed()
        for backend in self.tracker.backends:
            state = self.tracker.state_of(backend)
            self.assertEqual((state.active, state.total), (0, 2))
        closed = events(self.observer, "closed {client}")
        self.assertEqual(len(closed), 6)
        self.assertEqual((closed[0]["bytesUp"], closed[0]["bytesDown"]), (6, 11))

    @inlineCallbacks
    def test_refusedBackendSkipped(self) -> None:
        """
        A client whose turn falls on a refusing backend is moved to the next
        one instead of being dropped; the refusing backend is then left out
        of the rotation.
        """
        first = yield self.listenBackend(NamedBackend, name=b"first")
        dead = f"tcp:127.0.0.1:{refusedPort()}"
        third = yield self.listenBackend(NamedBackend, name=b"third")
        port = yield self.startBalancer([first, dead, third])
        seen = []
        for i in range(4):
            client = yield self.connect(port)
            line = yield client.receive(6)
            seen.append(line)
            client.transport.loseConnection()
            yield client.closed
        self.assertEqual(seen[:2], [b"first\n", b"third\n"])
        self.assertNotIn(b"", seen)
        [failed] = events(self.observer, "failed for client")
        self.assertEqual((failed["backend"], failed["reason"]), (dead, "refused"))
        deadState = self.tracker.state_of(self.tracker.backends[1])
        self.assertEqual((deadState.failures, deadState.total), (1, 0))
        self.assertFalse(self.tracker.is_up(self.tracker.backends[1]))

    @inlineCallbacks
    def test_unixBackend(self) -> None:
        """
        A C{unix:} backend endpoint string works like a C{tcp:} one.
        """
        # Short, absolute and private: socket paths are limited to ~100 bytes.
        directory = tempfile.mkdtemp(prefix="imgresume-lb-")
        self.addCleanup(shutil.rmtree, directory, True)
        path = os.path.join(directory, "backend.sock")
        factory = Factory.forProtocol(NamedBackend)
        factory.name = b"unix"
        factory.connections = self.backendConnections
        factory.noisy = False
        unixPort = yield serverFromString(reactor, f"unix:{path}").listen(factory)
        self.addCleanup(unixPort.stopListening)
        port = yield self.startBalancer([f"unix:{path}"])
        client = yield self.connect(port)
        self.assertEqual((yield client.receive(5)), b"unix\n")

    @inlineCallbacks
    def test_noBackend(self) -> None:
        """
        When every backend refuses, a client that has already sent bytes
        receives exactly one NO_BACKEND ERROR frame, then a clean close.
        """
        dead = [f"tcp:127.0.0.1:{refusedPort()}" for _ in range(2)]
        port = yield self.startBalancer(dead)
        client = yield self.connect(port, Client(greeting=b"HELLO" * 1000))
        reason = yield client.closed
        message = (
            f"no backend available: tried 2 backends"
            f" ({dead[0]} refused, {dead[1]} refused)"
        )
        self.assertEqual(bytes(client.data), expectedErrorFrame(message))
        self.assertIsInstance(reason, ConnectionDone)
        [rejected] = events(self.observer, "no backend available")
        self.assertEqual(rejected["tried"], dead)

    @inlineCallbacks
    def test_largeTransferSlowBackend(self) -> None:
        """
        32 MiB echoed through the balancer by a backend that keeps pausing
        arrive intact both ways, while the balancer pauses the client and
        never holds more than a few hundred KiB in either write buffer. This
        is the buffered path (C{--no-splice}, and TLS); the splice relay's
        own bound is tested in L{tests.balancer.test_splice}.
        """
        size = 32 << 20
        payload = random.Random(1).randbytes(size)
        backend = yield self.listenBackend(SlowEcho)
        port = yield self.startBalancer([backend], splice=False)
        client = yield self.connect(port)
        client.transport.write(payload)
        echoed = yield client.receive(size)
        [server] = self.backendConnections
        self.assertEqual(server.received, size)
        self.assertEqual(server.digest.digest(), hashlib.sha256(payload).digest())
        self.assertEqual(hashlib.sha256(echoed).digest(), hashlib.sha256(payload).digest())
        [frontend] = self.factory.frontends
        self.assertGreater(frontend.pauses, 0)
        self.assertLess(frontend.maxToBackend, 512 * 1024)
        self.assertLess(frontend.maxToClient, 512 * 1024)

    @inlineCallbacks
    def test_backendClosesFirst(self) -> None:
        """
        When the backend sends and closes, the client gets every byte
        before the close.
        """
        payload = os.urandom(1 << 20)
        backend = yield self.listenBackend(SendThenClose, payload=payload)
        port = yield self.startBalancer([backend])
        client = yield self.connect(port)
        yield client.closed
        self.assertEqual(bytes(client.data), payload)
        [closed] = events(self.observer, "closed {client}")
        self.assertEqual(closed["closedBy"], "backend")

    @inlineCallbacks
    def test_clientClosesFirst(self) -> None:
        """
        When the client sends and closes, the backend gets every byte
        before the close.
        """
        payload = os.urandom(1 << 20)
        finished: Deferred[bytes] = Deferred()
        backend = yield self.listenBackend(Collect, finished=finished)
        port = yield self.startBalancer([backend])
        client = yield self.connect(port)
        client.transport.write(payload)
        client.transport.loseConnection()
        received = yield finished
        self.assertEqual(received, payload)
        yield self.allClosed()
        [closed] = events(self.observer, "closed {client}")
        self.assertEqual((closed["closedBy"], closed["bytesUp"]), ("client", 1 << 20))

    @inlineCallbacks
    def test_clientLeavesWhileConnecting(self) -> None:
        """
        A client that disconnects while the balancer is still connecting to
        a backend cancels the attempt: no timer, no connection, no blame.
        """
        hanging = HangingEndpoint()
        port = yield self.startBalancer([Backend("hanging", hanging)], connect_timeout=30)
        client = yield self.connect(port)
        yield hanging.attempted
        client.transport.loseConnection()
        yield self.factory.frontends[0].lost
        self.assertEqual(hanging.cancelled, 1)
        state = self.tracker.state_of(self.tracker.backends[0])
        self.assertEqual((state.active, state.failures), (0, 0))
        self.assertEqual(len(events(self.observer, "disconnected while connecting")), 1)


class OptionsTests(TestCase):
    """
    Tests for the C{imgresume-lb} command line and L{makeService}.
    """

    def test_backendRequired(self) -> None:
        """
        Without any --backend the command line is a usage error that says so.
        """
        error = self.assertRaises(usage.UsageError, Options().parseOptions, [])
        self.assertIn("--backend", str(error))

    def test_defaults(self) -> None:
        """
        Defaults: listen on 127.0.0.1:7000, 5 s connect timeout, 2 s eject.
        """
        options = Options()
        options.parseOptions(["--backend", "tcp:127.0.0.1:7001"])
        self.assertEqual(options["listen"], "tcp:7000:interface=127.0.0.1")
        self.assertEqual(options["connect-timeout"], 5.0)
        self.assertEqual(options["eject-for"], 2.0)
        self.assertEqual(options["backends"], ["tcp:127.0.0.1:7001"])
        self.assertEqual(
            (options["check-interval"], options["check-timeout"], options["fall"], options["rise"]),
            (2.0, 1.0, 2, 1),
        )

    def test_healthOptions(self) -> None:
        """
        The health check options take durations and counts; 0 disables the
        checks; a zero timeout and counts below 1 are usage errors.
        """
        options = Options()
        options.parseOptions(
            ["-b", "tcp:h:1", "--check-interval", "500ms", "--check-timeout", "0.25",
             "--fall", "3", "--rise", "2"]
        )
        self.assertEqual(
            (options["check-interval"], options["check-timeout"], options["fall"], options["rise"]),
            (0.5, 0.25, 3, 2),
        )
        options = Options()
        options.parseOptions(["-b", "tcp:h:1", "--check-interval", "0"])
        self.assertEqual(options["check-interval"], 0)
        for option, bad in [
            ("--check-interval", "-1"),
            ("--check-timeout", "0"),
            ("--fall", "0"),
            ("--rise", "-2"),
            ("--rise", "many"),
        ]:
            self.assertRaises(
                usage.UsageError,
                Options().parseOptions,
                ["-b", "tcp:h:1", option, bad],
            )

    def test_repeatedBackends(self) -> None:
        """
        --backend (or -b) may be repeated and keeps its order.
        """
        options = Options()
        options.parseOptions(
            ["-b", "tcp:h:1", "--backend", "unix:/s", "--connect-timeout", "0.5",
             "--eject-for", "1500ms"]
        )
        self.assertEqual(options["backends"], ["tcp:h:1", "unix:/s"])
        self.assertEqual(options["connect-timeout"], 0.5)
        self.assertEqual(options["eject-for"], 1.5)

    def test_badSeconds(self) -> None:
        """
        Negative or non-numeric durations, and a zero connect timeout, are
        usage errors; units are accepted.
        """
        for option, bad in [
            ("--eject-for", "-1"),
            ("--eject-for", "soon"),
            ("--eject-for", "nan"),
            ("--connect-timeout", "0"),
        ]:
            self.assertRaises(
                usage.UsageError,
                Options().parseOptions,
                ["-b", "tcp:h:1", option, bad],
            )

    def test_helpExplains(self) -> None:
        """
        The help text keeps its examples and explains the failure behaviour.
        """
        text = Options().getUsage()
        self.assertIn("  --backend unix:/run/imgresume-1.sock\n", text)
        self.assertIn("NO_BACKEND", text)
        for word in ("--check-interval", "--check-timeout", "--fall", "--rise", "PING"):
            self.assertIn(word, text)

    def test_public_listen_needs_backends_authenticate_or_insecure(self) -> None:
        """
        Listening beyond this host is refused unless the operator says the
        backends authenticate clients, or accepts --insecure.
        """
        base = ["--backend", "tcp:127.0.0.1:9001"]
        error = self.assertRaises(
            usage.UsageError, Options().parseOptions, ["--listen", "tcp:7000", *base])
        self.assertIn("--backends-authenticate", str(error))
        for flag in ("--backends-authenticate", "--insecure"):
            options = Options()
            options.parseOptions(["--listen", "tcp:7000", flag, *base])
            self.assertTrue(options[flag.lstrip("-")])
        Options().parseOptions(["--listen", "tcp:7000:interface=127.0.0.1", *base])
        Options().parseOptions(["--listen", "unix:/run/lb.sock", *base])

    def test_makeService(self) -> None:
        """
        L{makeService} listens where told, with a balancer over the given
        backends in order.
        """
        options = Options()
        options.parseOptions(
            ["--listen", "tcp:7100:interface=127.0.0.1", "-b", "tcp:h:1", "-b", "tcp:h:2",
             "--check-interval", "3", "--check-timeout", "0.5", "--fall", "4", "--rise", "2"]
        )
        memory = MemoryReactorClock()
        service = makeService(options, reactor=memory)
        service.startService()
        self.addCleanup(service.stopService)
        [(portNumber, factory, _, interface)] = memory.tcpServers
        self.assertEqual((portNumber, interface), (7100, "127.0.0.1"))
        self.assertIsInstance(factory, BalancerFactory)
        self.assertEqual(
            [b.name for b in factory.tracker.backends], ["tcp:h:1", "tcp:h:2"]
        )
        self.assertEqual(factory.connect_timeout, 5.0)
        checker = service.getServiceNamed("health")
        self.assertIsInstance(checker, HealthChecker)
        self.assertIs(checker.tracker, factory.tracker)
        self.assertEqual(
            (checker.interval, checker.timeout, checker.fall, checker.rise),
            (3.0, 0.5, 4, 2),
        )
        # The first round of checks starts at once, one per backend.
        self.assertEqual(
            sorted((host, port) for host, port, *_ in memory.tcpClients),
            [("h", 1), ("h", 2)],
        )

    def test_badEndpoint(self) -> None:
        """
        An endpoint string of an unknown type is reported as a usage error.
        """
        options = Options()
        options.parseOptions(["-b", "tpc:h:1"])
        self.assertRaises(usage.UsageError, makeService, options, MemoryReactor())

    def test_buildBalancer(self) -> None:
        """
        L{build_balancer} parses backend endpoint strings into a ready
        factory.
        """
        factory = build_balancer(
            MemoryReactor(), ["tcp:h:1", "unix:/tmp/x.sock"], connect_timeout=1.5
        )
        self.assertEqual(factory.connect_timeout, 1.5)
        self.assertEqual(len(factory.tracker.backends), 2)


class _TwistdProcess(ProcessProtocol):
    """
    Collects a subprocess's output and fires C{ended} when it exits.
    """

    def __init__(self) -> None:
        self.output = bytearray()
        self.ended: Deferred[Any] = Deferred()

    def outReceived(self, data: bytes) -> None:
        self.output += data

    errReceived = outReceived

    def processEnded(self, reason: Any) -> None:
        self.ended.callback(reason.value)


class TwistdTests(TestCase):
    """
    Runs the real C{twistd -n --pidfile= imgresume-lb} as a subprocess.
    """

    timeout = 20

    @inlineCallbacks
    def test_roundTrip(self) -> None:
        """
        Bytes round-trip through a twistd-run balancer to an in-test backend,
        and the balancer logs the connection; SIGTERM stops it.
        """
        backendFactory = Factory.forProtocol(NamedBackend)
        backendFactory.name = b"inproc"
        backendFactory.connections = connections = []
        backendFactory.noisy = False
        backendPort = yield TCP4ServerEndpoint(
            reactor, 0, interface="127.0.0.1"
        ).listen(backendFactory)
        self.addCleanup(backendPort.stopListening)
        lbPort = refusedPort()

        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in [str(REPO_ROOT), env.get("PYTHONPATH")] if p
        )
        process = _TwistdProcess()
        transport = reactor.spawnProcess(
            process,
            sys.executable,
            [
                sys.executable,
                "-c",
                "from twisted.scripts.twistd import run; run()",
                "-n",
                "--pidfile=",
                "imgresume-lb",
                "--listen",
                f"tcp:{lbPort}:interface=127.0.0.1",
                "--backend",
                f"tcp:127.0.0.1:{backendPort.getHost().port}",
            ],
            env=env,
            path=str(REPO_ROOT),
        )

        def stop() -> Deferred[Any]:
            if process.ended.called:
                return process.ended
            transport.signalProcess("TERM")
            return process.ended

        self.addCleanup(stop)

        client = None
        for _ in range(150):
            if process.ended.called:
                self.fail(f"twistd exited early:\n{process.output.decode()}")
            try:
                client = yield connectProtocol(
                    TCP4ClientEndpoint(reactor, "127.0.0.1", lbPort), Client()
                )
                break
            except ConnectionRefusedError:
                yield deferLater(reactor, 0.1, lambda: None)
        self.assertIsNotNone(client, process.output.decode())
        self.assertEqual((yield client.receive(7)), b"inproc\n")
        client.transport.write(b"round trip")
        self.assertEqual((yield client.receive(17)), b"inproc\nround trip")
        client.transport.loseConnection()
        yield client.closed
        yield DeferredList([c.lost for c in connections])
        yield stop()
        output = process.output.decode()
        self.assertIn(f"-> backend tcp:127.0.0.1:{backendPort.getHost().port}", output)
        self.assertIn("closed 127.0.0.1:", output)

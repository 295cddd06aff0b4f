# -*- test-case-name: tests.balancer.test_health -*-
"""
Tests for the balancer's active health checks (L{imgresume.balancer.HealthChecker}):
the check conversation and the fall/rise counting on a L{Clock} with scripted
in-memory connections; the checker against in-process servers on real
sockets; and real C{twistd} processes (a SIGKILLed server taken out of the
rotation and put back, the balancer itself SIGKILLed and restarted in the
middle of an upload).
"""

from __future__ import annotations

import hashlib
import math
import os
import time
from typing import Any, Callable

from zope.interface import implementer

from twisted.internet import reactor
from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock, deferLater
from twisted.internet.testing import (
    EventLoggingObserver,
    StringTransportWithDisconnection,
)
from twisted.internet.threads import deferToThread
from twisted.logger import LogLevel, globalLogPublisher
from twisted.test import iosim
from twisted.trial.unittest import TestCase

from imgresume.testing import LocalCluster
from imgresume.balancer import (
    HEALTH_CLIENT_ID,
    Backend,
    BackendTracker,
    HealthChecker,
    RoundRobinScheduler,
    build_balancer,
)
from imgresume.client import Progress, Uploader
from imgresume.errors import ErrorCode
from imgresume.protocol import encode
from imgresume.protocol._frames import Error, Hello, Ping, Pong, Welcome
from imgresume.server import UploadServerFactory
from imgresume.protocol import HEALTH_CHECK_CLIENT_ID
from imgresume.storage.memory import MemoryStorage
from tests.support.wire import decode_frames

CHUNK = 256 * 1024
WINDOW = 4


def welcome(serverID: str = "node-1") -> bytes:
    """
    An encoded WELCOME frame from a server called C{serverID}.
    """
    return encode(Welcome(1, serverID, 4 * 1024 * 1024, 1 << 40, 1024 * 1024))


def framesSent(transport: StringTransportWithDisconnection) -> list[Any]:
    """
    The frames the checker wrote to C{transport}, decoded.
    """
    return decode_frames(transport.value())


def transitions(observer: EventLoggingObserver, text: str) -> list[dict[str, Any]]:
    """
    The captured log events whose format string contains C{text}.
    """
    return [e for e in observer if text in (e.get("log_format") or "")]


class Attempt:
    """
    One connect attempt made to a L{ScriptedEndpoint}; the test decides how
    it ends.
    """

    def __init__(self, factory: Any) -> None:
        self.factory = factory
        self.cancelled = False
        self.deferred: Deferred[Any] = Deferred(self._cancel)
        self.transport: StringTransportWithDisconnection | None = None
        self.protocol: Any = None

    def _cancel(self, d: Deferred[Any]) -> None:
        self.cancelled = True

    @property
    def pending(self) -> bool:
        """
        The attempt is connecting, or its connection is open.
        """
        if not self.deferred.called:
            return True
        return self.transport is not None and self.transport.connected

    def accept(self) -> StringTransportWithDisconnection:
        """
        Complete the connect: the checker's protocol gets an in-memory
        transport that reports closes back to it.
        """
        self.protocol = self.factory.buildProtocol(None)
        self.transport = StringTransportWithDisconnection()
        self.transport.protocol = self.protocol
        self.protocol.makeConnection(self.transport)
        self.deferred.callback(self.protocol)
        return self.transport

    def refuse(self) -> None:
        """
        Fail the connect as a refused TCP connection would.
        """
        self.deferred.errback(ConnectionRefusedError())

    def answer(self, data: bytes) -> None:
        """
        Deliver C{data} from the backend to the checker.
        """
        self.protocol.dataReceived(data)

    def answerHealthy(self, serverID: str = "node-1") -> None:
        """
        Play a healthy server: accept, WELCOME the HELLO, PONG the PING.
        """
        transport = self.accept()
        self.answer(welcome(serverID))
        [hello, ping] = framesSent(transport)
        self.answer(encode(Pong(ping.nonce)))


@implementer(IStreamClientEndpoint)
class ScriptedEndpoint:
    """
    A client endpoint whose connect attempts are recorded and completed (or
    not) by the test.
    """

    def __init__(self) -> None:
        self.attempts: list[Attempt] = []

    def connect(self, factory: Any) -> Deferred[Any]:
        attempt = Attempt(factory)
        self.attempts.append(attempt)
        return attempt.deferred

    @property
    def last(self) -> Attempt:
        """
        The latest connect attempt.
        """
        return self.attempts[-1]


@implementer(IStreamClientEndpoint)
class InMemoryServerEndpoint:
    """
    A client endpoint that joins each connection to a real
    L{UploadServerFactory} protocol through L{iosim}.
    """

    def __init__(self, serverFactory: UploadServerFactory) -> None:
        self.serverFactory = serverFactory
        self.pumps: list[iosim.IOPump] = []

    def connect(self, factory: Any) -> Deferred[Any]:
        client = factory.buildProtocol(None)
        server = self.serverFactory.buildProtocol(None)
        pump = iosim.connect(
            server,
            iosim.FakeTransport(server, isServer=True),
            client,
            iosim.FakeTransport(client, isServer=False),
            greet=False,
        )
        self.pumps.append(pump)
        return succeed(client)


class CheckerTestCase(TestCase):
    """
    A checker over two scripted backends on a L{Clock}.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1000)
        self.a = Backend("a", ScriptedEndpoint())
        self.b = Backend("b", ScriptedEndpoint())
        self.tracker = BackendTracker([self.a, self.b], self.clock)
        self.observer = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)

    def checker(self, **kw: Any) -> HealthChecker:
        """
        A started checker (stopped at cleanup) with 2 s interval, 1 s timeout,
        fall 2 and rise 1 unless told otherwise.
        """
        kw.setdefault("interval", 2.0)
        kw.setdefault("timeout", 1.0)
        checker = HealthChecker(self.tracker, self.clock, **kw)
        checker.startService()
        self.addCleanup(lambda: checker.running and checker.stopService())
        return checker

    def endpoint(self, backend: Backend) -> ScriptedEndpoint:
        """
        The scripted endpoint of C{backend}.
        """
        endpoint = backend.endpoint
        assert isinstance(endpoint, ScriptedEndpoint)
        return endpoint


class ConversationTests(CheckerTestCase):
    """
    What one health check says and which answers it accepts.
    """

    def test_healthyConversation(self) -> None:
        """
        A check sends HELLO with the health client id, PING only after
        WELCOME, and on the matching PONG closes the connection politely
        (not an abort); the backend stays up and the next check starts one
        interval after the first.
        """
        checker = self.checker()
        attempt = self.endpoint(self.a).last
        transport = attempt.accept()
        [hello] = framesSent(transport)
        self.assertEqual(hello, Hello(HEALTH_CLIENT_ID))
        attempt.answer(welcome("node-7"))
        [_, ping] = framesSent(transport)
        self.assertIsInstance(ping, Ping)
        self.assertTrue(transport.connected)
        attempt.answer(encode(Pong(ping.nonce)))
        self.assertFalse(transport.connected)
        self.assertFalse(transport.disconnected, "closed with abortConnection")
        status = checker.status_of(self.a)
        self.assertEqual(
            (status.healthy, status.checks, status.failures, status.server_id),
            (True, 1, 0, "node-7"),
        )
        self.assertTrue(self.tracker.is_up(self.a))
        self.clock.advance(1.9)
        self.assertEqual(len(self.endpoint(self.a).attempts), 1)
        self.clock.advance(0.1)
        self.assertEqual(len(self.endpoint(self.a).attempts), 2)
        self.assertEqual(transitions(self.observer, "is down"), [])

    def test_realServerAnswers(self) -> None:
        """
        The real server protocol (over memory storage, joined in memory)
        passes the check; the server does not log health-check connections.
        """
        server = UploadServerFactory(MemoryStorage(), "node-9", self.clock)
        endpoint = InMemoryServerEndpoint(server)
        backend = Backend("real", endpoint)
        self.tracker = BackendTracker([backend], self.clock)
        checker = self.checker()
        [pump] = endpoint.pumps
        pump.flush()
        status = checker.status_of(backend)
        self.assertEqual((status.checks, status.healthy, status.server_id), (1, True, "node-9"))
        self.assertEqual(server.connections, set())
        self.assertEqual(transitions(self.observer, "handshake from"), [])
        self.assertEqual(HEALTH_CLIENT_ID, HEALTH_CHECK_CLIENT_ID)

    def assertFailed(self, checker: HealthChecker, backend: Backend, reason: str) -> None:
        """
        The one check of C{backend} so far failed for C{reason} (a prefix).
        """
        status = checker.status_of(backend)
        self.assertEqual((status.checks, status.failures), (1, 1))
        assert status.last_reason is not None
        self.assertTrue(
            status.last_reason.startswith(reason), f"{status.last_reason!r} !~ {reason!r}"
        )

    def test_refused(self) -> None:
        """
        A refused connect fails the check at once.
        """
        checker = self.checker()
        self.endpoint(self.a).last.refuse()
        self.assertFailed(checker, self.a, "connect failed: refused")

    def test_connectTimeout(self) -> None:
        """
        A connect that does not complete within the timeout is cancelled and
        fails the check.
        """
        checker = self.checker(timeout=0.5)
        attempt = self.endpoint(self.a).last
        self.clock.advance(0.49)
        self.assertFalse(attempt.cancelled)
        self.assertEqual(checker.status_of(self.a).checks, 0)
        self.clock.advance(0.01)
        self.assertTrue(attempt.cancelled)
        self.assertFailed(checker, self.a, "connect timed out after 0.5s")

    def test_silentBackend(self) -> None:
        """
        A backend that accepts and says nothing fails the check at the
        timeout: the connection is aborted.
        """
        checker = self.checker()
        transport = self.endpoint(self.a).last.accept()
        self.clock.advance(0.99)
        self.assertTrue(transport.connected)
        self.clock.advance(0.01)
        self.assertTrue(transport.disconnected, "aborted")
        self.assertFailed(checker, self.a, "no WELCOME within 1s")

    def test_noPong(self) -> None:
        """
        A backend that WELCOMEs but never answers the PING fails the check.
        """
        checker = self.checker()
        attempt = self.endpoint(self.a).last
        attempt.accept()
        attempt.answer(welcome())
        self.clock.advance(1)
        self.assertFailed(checker, self.a, "no PONG within 1s")
        self.assertEqual(checker.status_of(self.a).server_id, "node-1")

    def test_garbage(self) -> None:
        """
        A backend that answers with bytes that are not imgresume frames (an
        HTTP server, say) fails the check at once, without waiting for the
        timeout.
        """
        checker = self.checker()
        attempt = self.endpoint(self.a).last
        transport = attempt.accept()
        attempt.answer(b"HTTP/1.1 400 Bad Request\r\n\r\n")
        self.assertTrue(transport.disconnected)
        self.assertFailed(checker, self.a, "not an imgresume answer: ")

    def test_errorAnswer(self) -> None:
        """
        A server that answers HELLO with an ERROR (here SHUTTING_DOWN) fails
        the check, and the reason names the error.
        """
        checker = self.checker()
        attempt = self.endpoint(self.a).last
        attempt.accept()
        attempt.answer(encode(Error(ErrorCode.SHUTTING_DOWN, "server is shutting down", 0, 500)))
        self.assertFailed(checker, self.a, "answered SHUTTING_DOWN: server is shutting down")

    def test_errorInsteadOfPong(self) -> None:
        """
        An ERROR in answer to the PING fails the check too.
        """
        checker = self.checker()
        attempt = self.endpoint(self.a).last
        attempt.accept()
        attempt.answer(welcome())
        attempt.answer(encode(Error(ErrorCode.INTERNAL_ERROR, "oops")))
        self.assertFailed(checker, self.a, "answered INTERNAL_ERROR: oops")

    def test_wrongNonce(self) -> None:
        """
        A PONG that does not echo the nonce sent fails the check.
        """
        checker = self.checker()
        attempt = self.endpoint(self.a).last
        transport = attempt.accept()
        attempt.answer(welcome())
        [_, ping] = framesSent(transport)
        attempt.answer(encode(Pong(ping.nonce + 1)))
        self.assertFailed(checker, self.a, "PONG carried nonce")

    def test_pongBeforeWelcome(self) -> None:
        """
        A PONG before any WELCOME is not a healthy server.
        """
        checker = self.checker()
        attempt = self.endpoint(self.a).last
        attempt.accept()
        attempt.answer(encode(Pong(1)))
        self.assertFailed(checker, self.a, "answered Ponged instead of WELCOME")

    def test_closedBeforeAnswer(self) -> None:
        """
        A backend that closes the connection before WELCOME fails the check.
        """
        checker = self.checker()
        transport = self.endpoint(self.a).last.accept()
        transport.loseConnection()
        self.assertFailed(checker, self.a, "closed the connection before WELCOME")


class CountingTests(CheckerTestCase):
    """
    Fall and rise: when consecutive results change what the tracker says.
    """

    def test_fallMarksDown(self) -> None:
        """
        With fall 2, one failure changes nothing; the second marks the backend
        down in the tracker with no expiry and logs one event with the
        reason; later failures log nothing more.
        """
        checker = self.checker(fall=2)
        self.endpoint(self.b).last.answerHealthy()
        self.endpoint(self.a).last.refuse()
        self.assertTrue(self.tracker.is_up(self.a))
        self.assertTrue(checker.status_of(self.a).healthy)
        self.clock.advance(2)
        self.endpoint(self.b).last.answerHealthy()
        self.endpoint(self.a).last.refuse()
        self.assertFalse(self.tracker.is_up(self.a))
        self.assertEqual(self.tracker.state_of(self.a).down_until, math.inf)
        self.assertFalse(checker.status_of(self.a).healthy)
        [down] = transitions(self.observer, "is down")
        self.assertEqual(down["log_level"], LogLevel.warn)
        self.assertEqual(
            (down["backend"], down["reason"], down["failures"], down["up"], down["total"]),
            ("a", "connect failed: refused", 2, 1, 2),
        )
        for _ in range(3):
            self.clock.advance(2)
            self.endpoint(self.b).last.answerHealthy()
            self.endpoint(self.a).last.refuse()
        self.assertEqual(len(transitions(self.observer, "is down")), 1)
        self.assertEqual(checker.status_of(self.a).failures, 5)
        self.clock.advance(3600)
        self.assertFalse(self.tracker.is_up(self.a))

    def test_failuresMustBeConsecutive(self) -> None:
        """
        A success between two failures resets the count: the backend is not
        marked down.
        """
        checker = self.checker(fall=2)
        self.endpoint(self.a).last.refuse()
        self.clock.advance(2)
        self.endpoint(self.a).last.answerHealthy()
        self.clock.advance(2)
        self.endpoint(self.a).last.refuse()
        self.assertTrue(self.tracker.is_up(self.a))
        self.assertEqual(checker.status_of(self.a).failures, 1)

    def test_riseMarksUp(self) -> None:
        """
        With rise 2, a down backend needs two passed checks in a row to be
        marked up (a failure in between starts over); one event is logged.
        """
        self.checker(fall=1, rise=2)
        endpoint = self.endpoint(self.a)
        endpoint.last.refuse()
        self.endpoint(self.b).last.answerHealthy()
        self.assertFalse(self.tracker.is_up(self.a))
        for outcome in ["healthy", "refuse", "healthy"]:
            self.clock.advance(2)
            self.endpoint(self.b).last.answerHealthy()
            if outcome == "healthy":
                endpoint.last.answerHealthy("node-a")
            else:
                endpoint.last.refuse()
            self.assertFalse(self.tracker.is_up(self.a), outcome)
        self.assertEqual(transitions(self.observer, "is up"), [])
        self.clock.advance(2)
        self.endpoint(self.b).last.answerHealthy()
        endpoint.last.answerHealthy("node-a")
        self.assertTrue(self.tracker.is_up(self.a))
        self.assertEqual(self.tracker.state_of(self.a).down_until, None)
        [up] = transitions(self.observer, "is up")
        self.assertEqual(
            (up["backend"], up["successes"], up["serverID"], up["up"], up["total"]),
            ("a", 2, "node-a", 2, 2),
        )

    def test_everyBackendDown(self) -> None:
        """
        When the last healthy backend goes down the event is an error that
        says clients are still tried on every backend; the scheduler still
        plans them all.
        """
        self.checker(fall=1)
        self.endpoint(self.a).last.refuse()
        self.endpoint(self.b).last.refuse()
        [first, last] = transitions(self.observer, "is down")
        self.assertEqual(first["log_level"], LogLevel.warn)
        self.assertEqual(last["log_level"], LogLevel.error)
        self.assertIn("every backend is down", last["log_format"])
        self.assertEqual(set(RoundRobinScheduler(self.tracker).plan()), {self.a, self.b})


class SchedulingTests(CheckerTestCase):
    """
    When checks run: concurrency, no overlap, disabling, stopping.
    """

    def test_concurrentWithoutOverlap(self) -> None:
        """
        Both backends are checked at once. A backend whose check hangs (the
        timeout is longer than the interval) never has two checks at once,
        while the other backend keeps being checked every interval.
        """
        checker = self.checker(interval=1.0, timeout=5.0)
        slow, fast = self.endpoint(self.a), self.endpoint(self.b)
        self.assertEqual((len(slow.attempts), len(fast.attempts)), (1, 1))
        for _ in range(4):
            fast.last.answerHealthy()
            self.clock.advance(1)
            self.assertEqual(len(slow.attempts), 1)
        self.assertEqual(len(fast.attempts), 5)
        self.clock.advance(0.99)
        self.assertEqual(len(slow.attempts), 1)
        self.clock.advance(0.01)
        self.assertTrue(slow.attempts[0].cancelled)
        self.assertEqual(checker.status_of(self.a).failures, 1)
        self.clock.advance(1)
        self.assertEqual(len(slow.attempts), 2)
        self.assertEqual(sum(a.pending for a in slow.attempts), 1)

    def test_intervalZeroDisables(self) -> None:
        """
        With interval 0 the checker connects nowhere and schedules nothing.
        """
        checker = self.checker(interval=0)
        self.clock.advance(60)
        self.assertEqual(self.endpoint(self.a).attempts, [])
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual(len(transitions(self.observer, "disabled")), 1)
        self.assertIsNone(self.successResultOf(checker.stopService()))

    def test_stopCancelsInFlight(self) -> None:
        """
        Stopping the service cancels a connect in progress and aborts an open
        check connection; neither counts as a failure, the result fires once
        both are over, and nothing is left scheduled.
        """
        checker = self.checker(fall=1)
        connecting = self.endpoint(self.a).last
        transport = self.endpoint(self.b).last.accept()
        d = checker.stopService()
        self.assertIsNone(self.successResultOf(d))
        self.assertTrue(connecting.cancelled)
        self.assertTrue(transport.disconnected)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        for backend in (self.a, self.b):
            self.assertEqual(checker.status_of(backend).checks, 0)
            self.assertTrue(self.tracker.is_up(backend))
        self.clock.advance(10)
        self.assertEqual(len(self.endpoint(self.a).attempts), 1)
        self.assertEqual(transitions(self.observer, "is down"), [])

    def test_badSettings(self) -> None:
        """
        Negative intervals, non-positive timeouts and fall or rise below 1
        are refused.
        """
        for kw in [
            {"interval": -1},
            {"interval": math.nan},
            {"timeout": 0},
            {"fall": 0},
            {"rise": 0},
        ]:
            self.assertRaises(ValueError, HealthChecker, self.tracker, self.clock, **kw)


async def waitFor(predicate: Callable[[], bool], timeout: float, what: str) -> float:
    """
    Poll C{predicate} on the real reactor until it holds; return how long
    that took. Fail after C{timeout} seconds.
    """
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"not {what} after {timeout}s")
        await deferLater(reactor, 0.02, lambda: None)
    return time.monotonic() - start


class Silent(Protocol):
    """
    Accepts and never says anything.
    """


class RealSocketTests(TestCase):
    """
    The checker and the balancer over real TCP sockets on 127.0.0.1, in front
    of in-process servers with memory storage.
    """

    timeout = 30
    INTERVAL = 0.1
    CHECK_TIMEOUT = 0.5
    FALL = 2

    async def listen(self, factory: Factory, port: int = 0) -> Any:
        """
        Listen with C{factory} on 127.0.0.1 (port 0: any free port).
        """
        listening = await TCP4ServerEndpoint(reactor, port, interface="127.0.0.1").listen(factory)
        self.addCleanup(lambda: listening.connected and listening.stopListening())
        return listening

    async def startBalancer(self, backends: list[str]) -> None:
        """
        A balancer over C{backends} with a fast checker, both stopped at
        cleanup.
        """
        self.observer = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        self.factory = build_balancer(reactor, backends, connect_timeout=2.0)
        self.lb = await self.listen(self.factory)
        self.checker = HealthChecker(
            self.factory.tracker,
            reactor,
            interval=self.INTERVAL,
            timeout=self.CHECK_TIMEOUT,
            fall=self.FALL,
        )
        self.checker.startService()
        self.addCleanup(self.checker.stopService)

    async def startServers(self, count: int) -> None:
        """
        C{count} in-process imgresume servers called node-1... on TCP.
        """
        self.servers: list[UploadServerFactory] = []
        self.ports: list[Any] = []
        for i in range(1, count + 1):
            factory = UploadServerFactory(MemoryStorage(), f"node-{i}", reactor)
            self.servers.append(factory)
            self.ports.append(await self.listen(factory))
        self.addCleanup(self.drainServers)

    def drainServers(self) -> Deferred[Any]:
        """
        Wait until every server connection is closed.
        """
        return DeferredList(
            [p.closed for server in self.servers for p in list(server.connections)]
        )

    async def upload(self, count: int) -> list[Any]:
        """
        Upload C{count} small files through the balancer, one after another.
        """
        path = self.mktemp()
        with open(path, "wb") as f:
            f.write(os.urandom(3 * 1024))
        uploader = Uploader(
            f"tcp:127.0.0.1:{self.lb.getHost().port}",
            reactor=reactor,
            journal=None,
            client_id="test",
            backoff_base=0.05,
            backoff_max=0.2,
        )
        return [await uploader.upload(path, f"f{i}.tif") for i in range(count)]

    async def test_stoppedBackendOutOfRotationAndBack(self) -> None:
        """
        A backend that stops listening is marked down within about
        interval * fall; no client is even tried on it (no failed connect
        for a client is logged) and every upload lands elsewhere at the
        first attempt. Once it listens again it is marked up and used.
        """
        await self.startServers(3)
        await self.startBalancer(
            [f"tcp:127.0.0.1:{port.getHost().port}" for port in self.ports]
        )
        tracker = self.factory.tracker
        b1, b2, b3 = tracker.backends
        await waitFor(
            lambda: all(self.checker.status_of(b).checks for b in tracker.backends),
            5,
            "checked",
        )
        portNumber = self.ports[1].getHost().port
        await self.ports[1].stopListening()
        took = await waitFor(lambda: not tracker.is_up(b2), 5, "marked down")
        self.assertLess(took, self.INTERVAL * self.FALL + self.CHECK_TIMEOUT + 2.0)
        self.assertFalse(self.checker.status_of(b2).healthy)
        self.assertIn("connect failed: refused", self.checker.status_of(b2).last_reason)
        before = tracker.state_of(b2).total

        results = await self.upload(6)
        self.assertEqual({r.servers[0] for r in results}, {"node-1", "node-3"})
        self.assertEqual([r.attempts for r in results], [1] * 6)
        self.assertEqual(tracker.state_of(b2).total, before)
        self.assertEqual(transitions(self.observer, "failed for client"), [])
        self.assertGreaterEqual(tracker.state_of(b1).total, 3)
        self.assertGreaterEqual(tracker.state_of(b3).total, 3)

        self.ports[1] = await self.listen(self.servers[1], portNumber)
        await waitFor(lambda: tracker.is_up(b2), 5, "marked up")
        results = await self.upload(6)
        self.assertEqual({r.servers[0] for r in results}, {"node-1", "node-2", "node-3"})
        self.assertEqual(tracker.state_of(b2).total, before + 2)
        [down] = transitions(self.observer, "is down")
        [up] = transitions(self.observer, "is up")
        self.assertEqual((down["backend"], up["backend"]), (b2.name, b2.name))

    async def test_silentListenerMarkedDown(self) -> None:
        """
        A TCP listener that accepts and never answers is marked down (no
        WELCOME within the timeout) while a real server next to it stays up.
        """
        await self.startServers(1)
        silent = await self.listen(Factory.forProtocol(Silent))
        await self.startBalancer(
            [
                f"tcp:127.0.0.1:{self.ports[0].getHost().port}",
                f"tcp:127.0.0.1:{silent.getHost().port}",
            ]
        )
        real, hanging = self.factory.tracker.backends
        await waitFor(lambda: not self.factory.tracker.is_up(hanging), 5, "marked down")
        self.assertEqual(
            self.checker.status_of(hanging).last_reason,
            f"no WELCOME within {self.CHECK_TIMEOUT:g}s",
        )
        self.assertTrue(self.factory.tracker.is_up(real))
        self.assertTrue(self.checker.status_of(real).healthy)


class ClusterTests(TestCase):
    """
    Real C{twistd imgresume} servers and a real C{twistd imgresume-lb} with
    health checks every 0.2 s, as child processes.
    """

    timeout = 90

    def setUp(self) -> None:
        self.work = os.path.abspath(self.mktemp())
        os.makedirs(self.work)
        self.cluster = LocalCluster(self.work, servers=3, lb_args=["--check-interval", "0.2"])
        self.cluster.start()
        self.addCleanup(self.cluster.stop)

    def uploader(self, **kw: Any) -> Uploader:
        """
        An uploader through the cluster's balancer, quick to retry.
        """
        kw.setdefault("backoff_base", 0.05)
        kw.setdefault("backoff_max", 0.5)
        kw.setdefault("digest", "sha256")  # the tests compare SHA-256s
        return Uploader(
            self.cluster.lb_endpoint,
            reactor=reactor,
            journal=None,
            chunk_size=CHUNK,
            window=WINDOW,
            client_id="test",
            **kw,
        )

    def makeFile(self, name: str, size: int) -> tuple[str, str]:
        """
        A file of C{size} random bytes; its path and SHA-256.
        """
        path = os.path.join(self.work, name)
        data = os.urandom(size)
        with open(path, "wb") as f:
            f.write(data)
        return path, hashlib.sha256(data).hexdigest()

    def storedSHA256(self, path: str) -> str:
        """
        The SHA-256 of a completed file on the cluster's storage.
        """
        with open(os.path.join(self.cluster.storage, path), "rb") as f:
            return hashlib.sha256(f.read()).hexdigest()

    def lbLog(self) -> str:
        """
        What the balancer has logged so far.
        """
        with open(self.cluster.lb.log, encoding="utf-8", errors="replace") as f:
            return f.read()

    async def test_killedServerOutOfRotationAndBack(self) -> None:
        """
        A SIGKILLed server is marked down by the health checks; uploads then
        all land on the other two at the first attempt and the balancer
        never tries a client on the dead one. Restarted, it is marked up and
        gets clients again.
        """
        dead = f"unix:{self.cluster.servers['node-1'].address}"
        self.cluster.kill("node-1")
        await waitFor(lambda: f"backend {dead} is down" in self.lbLog(), 10, "marked down")
        path, digest = self.makeFile("small.tif", 3 * CHUNK + 1)
        results = [await self.uploader().upload(path, f"a{i}.tif") for i in range(4)]
        for r in results:
            self.assertIn(r.servers, (["node-2"], ["node-3"]))
            self.assertEqual(r.attempts, 1)
            self.assertEqual(self.storedSHA256(r.path), digest)
        # Only what follows the down event counts: LocalCluster's own probe
        # of the balancer may still be connecting when node-1 is killed.
        afterDown = self.lbLog().split(f"backend {dead} is down", 1)[1]
        self.assertNotIn(f"backend {dead} failed for client", afterDown)
        self.assertNotIn(f"-> backend {dead}", afterDown)

        await deferToThread(self.cluster.start_node, self.cluster.servers["node-1"])
        await waitFor(lambda: f"backend {dead} is up" in self.lbLog(), 10, "marked up")
        results = [await self.uploader().upload(path, f"b{i}.tif") for i in range(3)]
        self.assertIn(["node-1"], [r.servers for r in results])
        self.assertEqual([r.attempts for r in results], [1, 1, 1])

    async def test_balancerRestartMidUpload(self) -> None:
        """
        The balancer is SIGKILLed a third of the way into a 24 MiB upload and
        restarted on the same port: the client reconnects through it and
        resumes once, re-sending at most its window, and the stored file's
        SHA-256 is right.
        """
        size = 24 * 1024 * 1024 + 4321
        path, digest = self.makeFile("big.tif", size)
        restarted: list[Deferred[None]] = []

        def progress(p: Progress) -> None:
            if not restarted and p.phase == "uploading" and p.done > size // 3:
                self.cluster.kill("lb")
                restarted.append(deferToThread(self.cluster.start_node, self.cluster.lb))

        result = await self.uploader(max_attempts=50).upload(path, "big.tif", progress=progress)
        await restarted[0]
        self.assertEqual(result.sha256, digest)
        self.assertEqual(self.storedSHA256(result.path), digest)
        self.assertEqual(len(result.resumed_at), 1)
        self.assertGreater(result.resumed_at[0], 0)
        self.assertLessEqual(result.bytes_sent, size + WINDOW * CHUNK)


class ConnectModeTests(TestCase):
    async def test_connect_only_checks_pass_on_accept(self) -> None:
        """--check-mode connect: a backend that accepts (even one speaking TLS) is healthy."""
        from twisted.internet import reactor
        from twisted.internet.endpoints import TCP4ServerEndpoint, clientFromString
        from twisted.internet.protocol import Factory, Protocol

        port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(
            Factory.forProtocol(Protocol))
        self.addCleanup(port.stopListening)
        backend = Backend("tls-ish", clientFromString(
            reactor, f"tcp:127.0.0.1:{port.getHost().port}"))
        tracker = BackendTracker([backend], reactor)
        checker = HealthChecker(tracker, reactor, interval=0.05, timeout=1, fall=1,
                                connect_only=True)
        checker.startService()
        self.addCleanup(checker.stopService)
        from twisted.internet.task import deferLater

        await deferLater(reactor, 0.3, lambda: None)
        status = checker.status_of(backend)
        self.assertGreater(status.checks, 1)
        self.assertEqual(status.failures, 0)
        self.assertTrue(tracker.is_up(backend))

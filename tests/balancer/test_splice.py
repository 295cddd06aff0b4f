# -*- test-case-name: tests.balancer.test_splice -*-
"""
Tests for L{imgresume.balancer._splice} and L{imgresume.balancer._pipes}:
the pipe pool, and the splice relay on real sockets of 127.0.0.1 (bytes
intact and in order around the pipes' capacity, backpressure with its
memory measured, half and abrupt closes, many connections, the PROXY header
and early bytes), the buffered path kept for TLS, the fallback when splice
is refused, and C{--no-splice}.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import random
import shutil
import stat
import struct
import tempfile
import termios
from typing import Any, Callable

from zope.interface import implementer

from twisted.internet import reactor
from twisted.internet.abstract import FileDescriptor
from twisted.internet.defer import Deferred, gatherResults, inlineCallbacks
from twisted.internet.endpoints import (
    TCP4ClientEndpoint,
    clientFromString,
    connectProtocol,
    serverFromString,
)
from twisted.internet.error import ConnectionLost
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import deferLater
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase

from imgresume.balancer import Backend, build_balancer
from imgresume.balancer import _pipes, _splice
from imgresume.balancer._pipes import LARGE_PIPE, SMALL_PIPE, PipePool
from imgresume.balancer._splice import SpliceRelay, can_splice
from imgresume.balancer.tap import Options, makeService
from tests.balancer.test_proxy import BalancerOnSockets, Client, Collect, buffered, events
from tests.support.tls import PKI

MiB = 1 << 20
#: Sizes around the capacity of both kinds of pipe.
SIZES = [1, SMALL_PIPE - 1, SMALL_PIPE, SMALL_PIPE + 1, MiB - 1, MiB, MiB + 1, 4 * MiB + 17]
#: The PROXY protocol v2 signature.
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"

if not _splice.SPLICE_AVAILABLE:
    skip = "splice(2) needs Linux and Python 3.10 or later"


def fd_is_open(fd: int) -> bool:
    """Whether C{fd} is an open descriptor of this process."""
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


def tcp_limit(name: str) -> int:
    """The largest TCP buffer the kernel allows: C{tcp_rmem} or C{tcp_wmem}."""
    with open(f"/proc/sys/net/ipv4/{name}") as f:
        return int(f.read().split()[2])


def kernel_queue(transport: Any, request: int) -> int:
    """Bytes in a socket's receive (FIONREAD) or send (TIOCOUTQ) queue."""
    raw = fcntl.ioctl(transport.getHandle().fileno(), request, b"\0\0\0\0")
    return struct.unpack("i", raw)[0]


class Echo(Protocol):
    """A test backend that echoes; C{abort_after} bytes in, it aborts."""

    abort_after: int | None = None

    def connectionMade(self) -> None:
        self.lost: Deferred[None] = Deferred()
        self.received = 0
        self.factory.connections.append(self)

    def dataReceived(self, data: bytes) -> None:
        self.received += len(data)
        self.transport.write(data)
        if self.abort_after is not None and self.received >= self.abort_after:
            self.transport.abortConnection()

    def connectionLost(self, reason: Any) -> None:
        self.lost.callback(None)


class AbortingEcho(Echo):
    """An L{Echo} that aborts its connection after 1 MiB."""

    abort_after = MiB


class Stalled(Protocol):
    """
    A test backend that reads nothing until L{resume}; then it hashes what
    it receives and fires C{factory.received} once C{factory.expected}
    bytes have come.
    """

    def connectionMade(self) -> None:
        self.lost: Deferred[None] = Deferred()
        self.received = 0
        self.digest = hashlib.sha256()
        self.factory.connections.append(self)
        self.transport.pauseProducing()

    def resume(self) -> None:
        self.transport.resumeProducing()

    def dataReceived(self, data: bytes) -> None:
        self.received += len(data)
        self.digest.update(data)
        if self.received == self.factory.expected:
            self.factory.received.callback(self.digest.digest())

    def connectionLost(self, reason: Any) -> None:
        self.lost.callback(None)


class SendAndHalfClose(Protocol):
    """
    A test backend that sends C{factory.payload}, then closes its writing
    side only (TCP half-close).
    """

    def connectionMade(self) -> None:
        self.lost: Deferred[None] = Deferred()
        self.factory.connections.append(self)
        self.transport.write(self.factory.payload)
        self.transport.loseWriteConnection()

    def connectionLost(self, reason: Any) -> None:
        self.lost.callback(None)


@implementer(IStreamClientEndpoint)
class GatedEndpoint:
    """A client endpoint that connects only once C{gate} has fired."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.gate: Deferred[None] = Deferred()
        self.attempted: Deferred[None] = Deferred()

    def connect(self, factory: Any) -> Deferred[Any]:
        self.attempted.callback(None)
        return self.gate.addCallback(lambda _: self.inner.connect(factory))


class PipePoolTests(SynchronousTestCase):
    """
    Tests for L{PipePool}: reuse, the number of large pipes, and closing.
    """

    def test_reuse(self) -> None:
        """
        A pipe given back empty is the next one taken; the pool counts the
        pipes in use.
        """
        pool = PipePool()
        self.addCleanup(pool.close)
        first = pool.take()
        self.assertEqual(pool.in_use, 1)
        pool.give(first)
        self.assertEqual((pool.in_use, pool.idle), (0, 1))
        self.assertIs(pool.take(), first)
        pool.give(first)

    def test_largeThenSmall(self) -> None:
        """
        The first C{large} pipes open at once get the large size; the next
        ones keep the kernel's default; closing a large one makes room for
        another.
        """
        pool = PipePool(keep=0, large=2, large_size=4 * SMALL_PIPE)
        pipes = [pool.take() for _ in range(3)]
        self.assertEqual([p.size for p in pipes], [4 * SMALL_PIPE] * 2 + [SMALL_PIPE])
        pool.give(pipes[0])
        self.assertFalse(fd_is_open(pipes[0].r))
        again = pool.take()
        self.assertEqual(again.size, 4 * SMALL_PIPE)
        for pipe in [again, *pipes[1:]]:
            pool.give(pipe)

    def test_keep(self) -> None:
        """
        At most C{keep} idle pipes stay open; the others are closed.
        """
        pool = PipePool(keep=2)
        self.addCleanup(pool.close)
        pipes = [pool.take() for _ in range(3)]
        for pipe in pipes:
            pool.give(pipe)
        self.assertEqual(pool.idle, 2)
        self.assertEqual([fd_is_open(p.w) for p in pipes], [True, True, False])

    def test_notEmpty(self) -> None:
        """
        A pipe given back with bytes in it is closed, never reused.
        """
        pool = PipePool()
        self.addCleanup(pool.close)
        pipe = pool.take()
        os.write(pipe.w, b"left over")
        pool.give(pipe, empty=False)
        self.assertEqual(pool.idle, 0)
        self.assertFalse(fd_is_open(pipe.r))

    def test_close(self) -> None:
        """
        Closing the pool closes its idle pipes and every pipe given back
        afterwards; L{PipePool.clear} only closes the idle ones.
        """
        pool = PipePool()
        idle, busy = pool.take(), pool.take()
        pool.give(idle)
        pool.clear()
        self.assertFalse(fd_is_open(idle.r))
        pool.give(pool.take())
        pool.close()
        self.assertEqual(pool.idle, 0)
        pool.give(busy)
        self.assertFalse(fd_is_open(busy.w))


class CanSpliceTests(SynchronousTestCase):
    """
    Tests for L{can_splice}: plain socket transports only.
    """

    def test_transports(self) -> None:
        """
        A file descriptor transport can be spliced; an in-memory or TLS one
        cannot, and nothing can where splice is not available.
        """
        plain = FileDescriptor()
        plain.fileno = lambda: 3  # type: ignore[method-assign]
        self.assertTrue(can_splice(plain))
        self.assertFalse(can_splice(StringTransport()))
        tls = FileDescriptor()
        tls.fileno = lambda: 3  # type: ignore[method-assign]
        tls.TLS = True  # type: ignore[attr-defined]
        self.assertFalse(can_splice(tls))
        self.patch(_splice, "SPLICE_AVAILABLE", False)
        self.assertFalse(can_splice(plain))


class SpliceRelayTests(BalancerOnSockets, TestCase):
    """
    The balancer's splice relay on real sockets of 127.0.0.1, in process.
    C{self.calls} counts the splices made.
    """

    def setUp(self) -> None:
        super().setUp()
        self.calls = 0
        real = _splice.splice

        def counting(src: int, dst: int, count: int) -> int:
            self.calls += 1
            return real(src, dst, count)

        self.patch(_splice, "splice", counting)

    def relay(self) -> SpliceRelay:
        """The splice relay of the only client connection."""
        [frontend] = self.factory.frontends
        relay = frontend._relay
        self.assertIsInstance(relay, SpliceRelay)
        return relay

    @inlineCallbacks
    def echoAll(self, port: int, sizes: list[int], seed: int = 2) -> Any:
        """
        One client per size, one after the other: each sends that many
        random bytes, gets them echoed, and closes.
        """
        rnd = random.Random(seed)
        for size in sizes:
            payload = rnd.randbytes(size)
            client = yield self.connect(port)
            client.transport.write(payload)
            echoed = yield client.receive(size)
            self.assertEqual(hashlib.sha256(echoed).digest(), hashlib.sha256(payload).digest())
            client.transport.loseConnection()
            yield client.closed

    @inlineCallbacks
    def assertRelayed(self, sizes: list[int]) -> Any:
        """
        Every connection closed, logged with its bytes both ways, and gave
        its pipes back.
        """
        yield self.allClosed()
        closed = events(self.observer, "closed {client}")
        self.assertEqual([(e["bytesUp"], e["bytesDown"]) for e in closed],
                         [(size, size) for size in sizes])
        pool = self.factory.splicer.pool
        if pool is not None:
            self.assertEqual(pool.in_use, 0)

    @inlineCallbacks
    def settled(self, measure: Callable[[], Any]) -> Any:
        """Wait until C{measure()} gives the same value 5 times, 50 ms apart."""
        last, same = None, 0
        for _ in range(400):
            yield deferLater(reactor, 0.05, lambda: None)
            now = measure()
            same = same + 1 if now == last else 0
            if same == 4:
                return now
            last = now
        self.fail(f"never settled: {last}")

    @inlineCallbacks
    def test_sizesAroundPipeCapacity(self) -> None:
        """
        Bytes arrive intact and in order both ways, for sizes just below, at
        and above the capacity of a pipe (large and default); each
        connection is spliced and logged with its byte counts.
        """
        backend = yield self.listenBackend(Echo)
        port = yield self.startBalancer([backend])
        yield self.echoAll(port, SIZES)
        yield self.assertRelayed(SIZES)
        # At least one splice in and one out per direction and connection.
        self.assertGreaterEqual(self.calls, 4 * len(SIZES))
        self.assertEqual(self.factory.metrics.bytes.value(direction="up"), sum(SIZES))
        self.assertEqual(self.factory.metrics.bytes.value(direction="down"), sum(SIZES))

    @inlineCallbacks
    def test_sizesSmallPipes(self) -> None:
        """
        The same with every pipe at the kernel's default size, as when the
        large ones are all in use.
        """
        self.patch(_pipes, "LARGE_PIPES", 0)
        backend = yield self.listenBackend(Echo)
        port = yield self.startBalancer([backend])
        yield self.echoAll(port, SIZES, seed=3)
        yield self.assertRelayed(SIZES)
        self.assertGreater(self.calls, 4 * MiB // SMALL_PIPE)

    @inlineCallbacks
    def test_unixBackend(self) -> None:
        """
        A UNIX socket backend is spliced like a TCP one.
        """
        directory = tempfile.mkdtemp(prefix="imgresume-lb-")
        self.addCleanup(shutil.rmtree, directory, True)
        path = os.path.join(directory, "backend.sock")
        factory = Factory.forProtocol(Echo)
        factory.connections = self.backendConnections
        factory.noisy = False
        unixPort = yield serverFromString(reactor, f"unix:{path}").listen(factory)
        self.addCleanup(unixPort.stopListening)
        port = yield self.startBalancer([f"unix:{path}"])
        yield self.echoAll(port, [MiB + 1])
        yield self.assertRelayed([MiB + 1])
        self.assertGreater(self.calls, 0)

    @inlineCallbacks
    def test_slowBackendPausesClient(self) -> None:
        """
        A backend that stops reading makes the relay stop reading from the
        client: the balancer then holds at most one pipe's worth, and the
        kernel's socket queues stay bounded while the client still has most
        of its 64 MiB to send. Once the backend reads again, every byte
        arrives intact.
        """
        size = 64 * MiB
        payload = random.Random(4).randbytes(size)
        received: Deferred[bytes] = Deferred()
        backend = yield self.listenBackend(Stalled, expected=size, received=received)
        port = yield self.startBalancer([backend])
        client = yield self.connect(port)
        client.transport.write(payload)
        yield self.settled(lambda: len(self.backendConnections))
        relay = self.relay()
        [frontend] = self.factory.frontends
        toBackend = frontend._peer.transport

        def measure() -> tuple[int, ...]:
            return (
                kernel_queue(frontend.transport, termios.FIONREAD),
                relay.held("up"),
                kernel_queue(toBackend, termios.TIOCOUTQ),
            )

        unread, held, unsent = yield self.settled(measure)
        self.assertFalse(relay._client.reading)
        self.assertGreaterEqual(relay.pauses, 1)
        self.assertLessEqual(held, LARGE_PIPE)
        self.assertLessEqual(relay.largest, LARGE_PIPE)
        # The kernel's queues on the balancer's two sockets stay within the
        # TCP buffer limits (measured here: ~1.6 MB unread, ~4 MB unsent,
        # ~150 KB in the pipe); the rest waits in the client.
        self.assertLessEqual(unread, tcp_limit("tcp_rmem"))
        self.assertLessEqual(unsent, tcp_limit("tcp_wmem"))
        self.assertGreater(buffered(client.transport), 0)
        self.backendConnections[0].resume()
        digest = yield received
        self.assertEqual(digest, hashlib.sha256(payload).digest())

    @inlineCallbacks
    def test_slowClientPausesBackend(self) -> None:
        """
        The other way: a client that stops reading makes the relay stop
        reading from the backend, holding at most one pipe's worth; when the
        client reads again, it gets every byte.
        """
        size = 16 * MiB
        payload = random.Random(5).randbytes(size)
        backend = yield self.listenBackend(SendAndHalfClose, payload=payload)
        port = yield self.startBalancer([backend])
        client = yield self.connect(port)
        client.transport.pauseProducing()
        yield self.settled(lambda: len(self.backendConnections))
        relay = self.relay()
        yield self.settled(lambda: relay.held("down"))
        self.assertFalse(relay._backend.reading)
        self.assertGreaterEqual(relay.pauses, 1)
        self.assertLessEqual(relay.held("down"), LARGE_PIPE)
        client.transport.resumeProducing()
        yield client.closed
        self.assertEqual(hashlib.sha256(client.data).digest(), hashlib.sha256(payload).digest())

    @inlineCallbacks
    def test_clientHalfCloses(self) -> None:
        """
        A client that sends and then half-closes has every byte delivered,
        then both sides are closed, as on the buffered path.
        """
        payload = os.urandom(MiB + 1)
        finished: Deferred[bytes] = Deferred()
        backend = yield self.listenBackend(Collect, finished=finished)
        port = yield self.startBalancer([backend])
        client = yield self.connect(port)
        client.transport.write(payload)
        client.transport.loseWriteConnection()
        self.assertEqual((yield finished), payload)
        yield client.closed
        yield self.allClosed()
        [closed] = events(self.observer, "closed {client}")
        self.assertEqual((closed["closedBy"], closed["bytesUp"]), ("client", MiB + 1))
        self.assertGreater(self.calls, 0)

    @inlineCallbacks
    def test_backendHalfCloses(self) -> None:
        """
        A backend that sends and then half-closes has every byte delivered
        to the client before the client is closed.
        """
        payload = os.urandom(3 * MiB + 5)
        backend = yield self.listenBackend(SendAndHalfClose, payload=payload)
        port = yield self.startBalancer([backend])
        client = yield self.connect(port)
        yield client.closed
        self.assertEqual(bytes(client.data), payload)
        yield self.allClosed()
        [closed] = events(self.observer, "closed {client}")
        self.assertEqual((closed["closedBy"], closed["bytesDown"]), ("backend", 3 * MiB + 5))
        self.assertGreater(self.calls, 0)

    @inlineCallbacks
    def test_clientAborts(self) -> None:
        """
        A client that resets its connection mid-stream has its backend
        connection closed, and the relay gives its pipes back.
        """
        backend = yield self.listenBackend(Echo)
        port = yield self.startBalancer([backend])
        client = yield self.connect(port)
        client.transport.write(os.urandom(8 * MiB))
        yield client.receive(MiB)
        client.transport.abortConnection()
        yield self.backendConnections[0].lost
        yield self.allClosed()
        [closed] = events(self.observer, "closed {client}")
        self.assertEqual(closed["closedBy"], "client")
        self.assertEqual(self.factory.splicer.pool.in_use, 0)

    @inlineCallbacks
    def test_backendAborts(self) -> None:
        """
        A backend that resets its connection mid-stream has its client
        closed, and the relay gives its pipes back.
        """
        backend = yield self.listenBackend(AbortingEcho)
        port = yield self.startBalancer([backend])
        client = yield self.connect(port)
        client.transport.write(os.urandom(8 * MiB))
        yield client.closed
        yield self.allClosed()
        [closed] = events(self.observer, "closed {client}")
        self.assertEqual(closed["closedBy"], "backend")
        self.assertEqual(self.factory.splicer.pool.in_use, 0)

    @inlineCallbacks
    def test_manyConnections(self) -> None:
        """
        200 clients at once, each echoing its own bytes, all get them back
        intact; afterwards no pipe is in use, and every pipe made is closed
        or idle in the pool.
        """
        count, size = 200, 300 * 1024 + 7
        backend = yield self.listenBackend(Echo)
        made, closed = [], []

        class CountedPipe(_pipes.Pipe):
            def __init__(self, *args: Any) -> None:
                super().__init__(*args)
                made.append(self)

            def close(self) -> None:
                closed.append(self)
                super().close()

        self.patch(_pipes, "Pipe", CountedPipe)
        port = yield self.startBalancer([backend])
        clients = yield gatherResults([self.connect(port) for _ in range(count)])
        payloads = [os.urandom(size) for _ in range(count)]
        for client, payload in zip(clients, payloads):
            client.transport.write(payload)
        echoed = yield gatherResults([c.receive(size) for c in clients])
        self.assertEqual(echoed, payloads)
        for client in clients:
            client.transport.loseConnection()
        yield gatherResults([c.closed for c in clients])
        yield self.assertRelayed([size] * count)
        pool = self.factory.splicer.pool
        self.assertLessEqual(pool.idle, _pipes.POOL_KEEP)
        self.assertEqual(len(made) - len(closed), pool.idle)

    @inlineCallbacks
    def test_earlyBytesAndProxyHeader(self) -> None:
        """
        With C{send_proxy}, the backend gets the PROXY header, then the
        bytes the client sent while the balancer was connecting (more than
        it holds, so it paused), then the rest, in order.
        """
        finished: Deferred[bytes] = Deferred()
        backendString = yield self.listenBackend(Collect, finished=finished)
        gated = GatedEndpoint(clientFromString(reactor, backendString))
        port = yield self.startBalancer([Backend("gated", gated)], send_proxy=True)
        payload = os.urandom(3 * MiB)
        client = yield self.connect(port)
        client.transport.write(payload)
        yield gated.attempted
        [frontend] = self.factory.frontends
        yield self.settled(lambda: frontend._early_paused)
        self.assertTrue(frontend._early_paused)
        gated.gate.callback(None)
        yield deferLater(reactor, 0.1, lambda: None)
        client.transport.loseConnection()
        data = yield finished
        self.assertEqual(data[:12], V2_SIGNATURE)
        (length,) = struct.unpack(">H", data[14:16])
        self.assertEqual(data[16 + length:], payload)
        self.assertGreater(self.calls, 0)

    @inlineCallbacks
    def test_reactorDropsSocket(self) -> None:
        """
        When the reactor drops one of the relay's sockets (a hang-up, or its
        own shutdown), the relay hands back and that side is closed as the
        reactor would close it; the other side follows.
        """
        backend = yield self.listenBackend(Echo)
        port = yield self.startBalancer([backend])
        client = yield self.connect(port)
        client.transport.write(b"x" * 1000)
        yield client.receive(1000)
        relay = self.relay()
        relay._backend.connectionLost(Failure(ConnectionLost("dropped")))
        self.assertFalse(relay.active)
        yield client.closed
        yield self.allClosed()
        [closed] = events(self.observer, "closed {client}")
        self.assertEqual(closed["closedBy"], "backend")


class BufferedPathTests(BalancerOnSockets, TestCase):
    """
    Where the balancer does not splice: TLS on either side, splice refused
    by the kernel, or turned off.
    """

    def setUp(self) -> None:
        super().setUp()
        self.calls = 0
        self.failures = 0

    def countSplices(self, fail: Callable[[int, int], int | None] | None = None) -> None:
        """
        Count splices in C{self.calls}; C{fail(src, call)} may return an
        errno for a splice to raise instead of moving anything.
        """
        real = _splice.splice

        def counting(src: int, dst: int, count: int) -> int:
            self.calls += 1
            code = fail(src, self.calls) if fail else None
            if code is not None:
                self.failures += 1
                raise OSError(code, os.strerror(code))
            return real(src, dst, count)

        self.patch(_splice, "splice", counting)

    @inlineCallbacks
    def echo(self, port: int, size: int, endpoint: Any = None) -> Any:
        """A client (on C{endpoint}) sends C{size} bytes and gets them back."""
        payload = os.urandom(size)
        endpoint = endpoint or TCP4ClientEndpoint(reactor, "127.0.0.1", port)
        client = yield connectProtocol(endpoint, Client())
        client.transport.write(payload)
        echoed = yield client.receive(size)
        self.assertEqual(hashlib.sha256(echoed).digest(), hashlib.sha256(payload).digest())
        client.transport.loseConnection()
        yield client.closed

    @inlineCallbacks
    def test_tlsBackend(self) -> None:
        """
        A TLS (C{tls:}/C{ssl:}) backend is relayed through buffers, intact.
        """
        self.countSplices()
        pki = PKI(self.mktemp())
        factory = Factory.forProtocol(Echo)
        factory.connections = self.backendConnections
        factory.noisy = False
        tlsPort = yield serverFromString(reactor, pki.ssl_listen()).listen(factory)
        self.addCleanup(tlsPort.stopListening)
        port = yield self.startBalancer([pki.tls_client("127.0.0.1", tlsPort.getHost().port)])
        yield self.echo(port, 2 * MiB + 3)
        yield self.allClosed()
        self.assertEqual(self.calls, 0)
        [closed] = events(self.observer, "closed {client}")
        self.assertEqual(closed["bytesDown"], 2 * MiB + 3)

    @inlineCallbacks
    def test_tlsFrontend(self) -> None:
        """
        A balancer listening with C{ssl:} relays through buffers, intact.
        """
        self.countSplices()
        pki = PKI(self.mktemp())
        backend = yield self.listenBackend(Echo)
        port = yield self.startBalancer([backend], listen=pki.ssl_listen())
        endpoint = clientFromString(reactor, pki.tls_client("127.0.0.1", port))
        yield self.echo(port, MiB + 3, endpoint)
        yield self.allClosed()
        self.assertEqual(self.calls, 0)

    @inlineCallbacks
    def test_spliceRefused(self) -> None:
        """
        When the first splice fails with EINVAL (a kernel or socket without
        splice), that connection is relayed through buffers, intact; the
        balancer says so once and splices no more.
        """
        self.countSplices(lambda src, call: errno.EINVAL)
        backend = yield self.listenBackend(Echo)
        port = yield self.startBalancer([backend])
        for _ in range(2):
            yield self.echo(port, MiB + 1)
        yield self.allClosed()
        self.assertEqual(self.calls, 1)
        self.assertIsNone(self.factory.splicer.pool)
        [refused] = events(self.observer, "splice(2) refused")
        self.assertEqual(refused["errno"], errno.EINVAL)
        self.assertEqual(refused["log_level"].name, "warn")

    @inlineCallbacks
    def test_refusedWithBytesInPipe(self) -> None:
        """
        When splice fails while a pipe holds bytes (here: writing out of the
        pipe fails on the 9th splice), those bytes are delivered through the
        buffers, in order, before the rest.
        """

        def fromPipeOnce(src: int, call: int) -> int | None:
            if call >= 9 and not self.failures and stat.S_ISFIFO(os.fstat(src).st_mode):
                return errno.EINVAL
            return None

        self.countSplices(fromPipeOnce)
        backend = yield self.listenBackend(Echo)
        port = yield self.startBalancer([backend])
        yield self.echo(port, 8 * MiB + 1)
        yield self.allClosed()
        self.assertEqual(self.failures, 1)
        self.assertIsNone(self.factory.splicer.pool)

    @inlineCallbacks
    def test_noPipe(self) -> None:
        """
        When no pipe can be made (here: EMFILE, out of descriptors), the
        connection is relayed through buffers, intact, with a warning; the
        balancer still tries to splice the next one.
        """

        def noPipe(*args: Any) -> None:
            raise OSError(errno.EMFILE, os.strerror(errno.EMFILE))

        self.patch(_pipes, "Pipe", noPipe)
        backend = yield self.listenBackend(Echo)
        port = yield self.startBalancer([backend])
        yield self.echo(port, MiB + 1)
        yield self.echo(port, 1000)
        yield self.allClosed()
        warnings = events(self.observer, "no pipe for client")
        self.assertEqual(len(warnings), 2)
        self.assertEqual(warnings[0]["errno"], errno.EMFILE)
        self.assertEqual(warnings[0]["log_level"].name, "warn")
        self.assertIsNotNone(self.factory.splicer.pool)
        self.assertEqual(self.factory.splicer.pool.in_use, 0)
        closed = events(self.observer, "closed {client}")
        self.assertEqual([e["bytesUp"] for e in closed], [MiB + 1, 1000])

    @inlineCallbacks
    def test_socketErrorKeepsSplice(self) -> None:
        """
        Any other splice error (here ECONNRESET, injected while the socket
        is fine) hands the connection to the buffered path, which finds out
        for itself; the balancer keeps splicing later connections.
        """
        self.countSplices(lambda src, call: errno.ECONNRESET if call == 1 else None)
        backend = yield self.listenBackend(Echo)
        port = yield self.startBalancer([backend])
        yield self.echo(port, MiB + 1)
        yield self.echo(port, MiB + 1)
        yield self.allClosed()
        self.assertEqual(self.failures, 1)
        self.assertIsNotNone(self.factory.splicer.pool)
        self.assertGreater(self.calls, 1)
        self.assertEqual(events(self.observer, "splice(2) refused"), [])

    @inlineCallbacks
    def test_noSplice(self) -> None:
        """
        With C{splice=False} (C{--no-splice}) nothing is spliced and the
        balancer says how it relays when it starts listening.
        """
        self.countSplices()
        backend = yield self.listenBackend(Echo)
        port = yield self.startBalancer([backend], splice=False)
        yield self.echo(port, MiB + 1)
        yield self.allClosed()
        self.assertEqual(self.calls, 0)
        [started] = events(self.observer, "relaying with")
        self.assertEqual((started["mode"], started["splice"]), ("buffers (--no-splice)", False))
        self.assertGreater(started["openFiles"], 0)


class NoSpliceOptionTests(SynchronousTestCase):
    """
    Tests for C{--no-splice} on the command line.
    """

    def factory(self, *extra: str) -> Any:
        options = Options()
        options.parseOptions(["-b", "tcp:h:1", "--check-interval", "0", *extra])
        service = makeService(options, reactor=MemoryReactorClock())
        service.startService()
        self.addCleanup(service.stopService)
        return service.getServiceNamed("listener").factory

    def test_default(self) -> None:
        """
        By default the balancer splices.
        """
        self.assertIsNotNone(self.factory().splicer.pool)

    def test_noSplice(self) -> None:
        """
        C{--no-splice} turns the splice relay off; C{--help} explains it;
        L{build_balancer} takes C{splice=False} too.
        """
        self.assertIsNone(self.factory("--no-splice").splicer.pool)
        self.assertIn("--no-splice", Options().getUsage())
        built = build_balancer(MemoryReactorClock(), ["tcp:h:1"], splice=False)
        self.assertIsNone(built.splicer.pool)

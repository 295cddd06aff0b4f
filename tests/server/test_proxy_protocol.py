# -*- test-case-name: tests.server.test_proxy_protocol -*-
"""
The real client address behind a balancer: the PROXY protocol header
(C{imgresume.addresses}: the balancer's v2 encoder, the server's v1/v2
parser, the address a connection is counted by), the server's trust of PROXY
headers from configured networks only and its per-address connection limit
(C{imgresume.server._proxytrust}), the balancer's own per-address limit and
health checks with a LOCAL header, and a real C{twistd imgresume-lb
--send-proxy} cluster.
"""

from __future__ import annotations

import glob
import hashlib
import ipaddress
import os
import re
import socket
import time
from typing import Any

from twisted.internet import reactor
from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import (
    TCP4ClientEndpoint,
    TCP4ServerEndpoint,
    connectProtocol,
)
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock, deferLater
from twisted.internet.testing import EventLoggingObserver, StringTransport
from twisted.logger import formatEvent, globalLogPublisher
from twisted.protocols.haproxy import proxyEndpoint
from twisted.protocols.haproxy._v2parser import V2Parser
from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase, TestCase

from imgresume.addresses import (
    SIGNATURE,
    ProxyHeaderError,
    address_key,
    local_header,
    parse_proxy_header,
    proxy_header,
)
from imgresume.balancer import Backend, build_balancer
from imgresume.balancer._check import HealthCheck
from imgresume.client import Uploader
from imgresume.testing import LocalCluster
from imgresume.errors import ErrorCode
from imgresume.protocol import Error, Hello, Welcome, encode
from imgresume.server import UploadServerFactory
from imgresume.server._proxytrust import ProxyTrustFactory, TrustedProxies
from imgresume.server.tap import Options as ServerOptions
from imgresume.storage.memory import MemoryStorage
from tests.support.cluster import KillServingServer
from tests.support.wire import decode_frames as frames

CLIENT4 = IPv4Address("TCP", "203.0.113.7", 40001)
SERVER4 = IPv4Address("TCP", "198.51.100.1", 9000)
CLIENT6 = IPv6Address("TCP", "2001:db8::7", 40002)
SERVER6 = IPv6Address("TCP", "2001:db8::1", 9000)
BALANCER = IPv4Address("TCP", "10.0.0.5", 55000)
STRANGER = IPv4Address("TCP", "192.0.2.99", 55001)
HELLO = encode(Hello("tester"))


def v1(source: IPv4Address | IPv6Address, dest: IPv4Address | IPv6Address) -> bytes:
    """A PROXY v1 header."""
    family = b"TCP6" if isinstance(source, IPv6Address) else b"TCP4"
    return b"PROXY %s %s %s %d %d\r\n" % (
        family, source.host.encode(), dest.host.encode(), source.port, dest.port)


# -- the encoder ---------------------------------------------------------


class EncoderTests(SynchronousTestCase):
    """
    L{proxyHeader} and L{localHeader} against Twisted's own v2 parser.
    """

    def roundTrip(self, header: bytes) -> Any:
        info, rest = V2Parser().feed(header + b"after")
        self.assertEqual(rest, b"after")
        return info

    def test_ipv4(self) -> None:
        """An IPv4 client gives a TCP4 header that parses back to the same addresses."""
        header = proxy_header(CLIENT4, SERVER4)
        self.assertEqual(header[:12], SIGNATURE)
        self.assertEqual(header[12:14], b"\x21\x11")
        self.assertEqual(len(header), 16 + 12)
        info = self.roundTrip(header)
        self.assertEqual(info.source, CLIENT4)
        self.assertEqual(info.destination, SERVER4)

    def test_ipv6(self) -> None:
        """An IPv6 client gives a TCP6 header with the same addresses and ports."""
        header = proxy_header(CLIENT6, SERVER6)
        self.assertEqual(header[12:14], b"\x21\x21")
        self.assertEqual(len(header), 16 + 36)
        info = self.roundTrip(header)
        self.assertIsInstance(info.source, IPv6Address)
        self.assertEqual(ipaddress.ip_address(info.source.host), ipaddress.ip_address(CLIENT6.host))
        self.assertEqual(info.source.port, CLIENT6.port)
        self.assertEqual(
            ipaddress.ip_address(info.destination.host), ipaddress.ip_address(SERVER6.host))
        self.assertEqual(info.destination.port, SERVER6.port)

    def test_ipv4MappedIsIPv4(self) -> None:
        """A client on a dual-stack listener (C{::ffff:a.b.c.d}) is sent as TCP4."""
        info = self.roundTrip(proxy_header(
            IPv6Address("TCP", "::ffff:203.0.113.7", 5), IPv6Address("TCP", "::ffff:10.0.0.1", 7)))
        self.assertEqual(info.source, IPv4Address("TCP", "203.0.113.7", 5))
        self.assertEqual(info.destination, IPv4Address("TCP", "10.0.0.1", 7))

    def test_mixedFamilies(self) -> None:
        """An IPv4 client on an IPv6 address is sent as TCP6, the IPv4 side mapped."""
        info = self.roundTrip(proxy_header(CLIENT4, SERVER6))
        self.assertEqual(
            ipaddress.ip_address(info.source.host).ipv4_mapped,
            ipaddress.ip_address(CLIENT4.host))

    def test_unixClientIsUnspec(self) -> None:
        """A UNIX socket client gives PROXY with family UNSPEC: no address to believe."""
        header = proxy_header(UNIXAddress(None), UNIXAddress(b"/run/lb.sock"))
        self.assertEqual(header, SIGNATURE + b"\x21\x00\x00\x00")
        info = self.roundTrip(header)
        self.assertIsNone(info.source)
        self.assertIsNone(info.destination)

    def test_local(self) -> None:
        """The health check's header is command LOCAL with no address."""
        header = local_header()
        self.assertEqual(header, SIGNATURE + b"\x20\x00\x00\x00")
        info = self.roundTrip(header)
        self.assertIsNone(info.source)

    def test_twistedWrapperAcceptsIt(self) -> None:
        """
        Twisted's own C{haproxy:} wrapper (what HAProxy-style servers use)
        takes the header when it arrives with the first frame.
        """
        from twisted.protocols.haproxy._wrapper import HAProxyWrappingFactory

        seen: list[Any] = []

        class Inner(Protocol):
            def dataReceived(self, data: bytes) -> None:
                seen.append((self.transport.getPeer(), data))

        proto = HAProxyWrappingFactory(Factory.forProtocol(Inner)).buildProtocol(BALANCER)
        proto.makeConnection(StringTransport(peerAddress=BALANCER))
        proto.dataReceived(proxy_header(CLIENT4, SERVER4) + HELLO)
        self.assertEqual(seen, [(CLIENT4, HELLO)])


# -- the header parser and the trust list -----------------------------------


class ParserTests(SynchronousTestCase):
    """
    L{parseProxyHeader}: v1 and v2 from as many reads as it takes, malformed
    headers refused with a reason.
    """

    def test_v1(self) -> None:
        """A v1 TCP4 header and the bytes after it."""
        info, rest = parse_proxy_header(v1(CLIENT4, SERVER4) + HELLO)
        self.assertEqual((info.source, info.destination, rest), (CLIENT4, SERVER4, HELLO))

    def test_v1ipv6(self) -> None:
        """A v1 TCP6 header."""
        info, _ = parse_proxy_header(v1(CLIENT6, SERVER6))
        self.assertEqual(info.source, CLIENT6)

    def test_v2Canonical(self) -> None:
        """IPv6 addresses from a v2 header come out compressed (for logs and counting)."""
        info, _ = parse_proxy_header(proxy_header(CLIENT6, SERVER6))
        self.assertEqual(info.source.host, "2001:db8::7")

    def test_v1Unknown(self) -> None:
        """C{PROXY UNKNOWN} (which Twisted's own parser refuses) names no client."""
        for line in (b"PROXY UNKNOWN\r\n", b"PROXY UNKNOWN ffff::1 ffff::2 1 2\r\n"):
            info, rest = parse_proxy_header(line + b"x")
            self.assertIsNone(info.source)
            self.assertEqual(rest, b"x")

    def test_incomplete(self) -> None:
        """Every proper prefix of a header asks for more bytes, v1 and v2 alike."""
        for header in (v1(CLIENT4, SERVER4), proxy_header(CLIENT6, SERVER6), local_header()):
            for n in range(1, len(header)):
                self.assertIsNone(parse_proxy_header(header[:n]), (header, n))
            self.assertIsNotNone(parse_proxy_header(header))

    def test_malformed(self) -> None:
        """Malformed headers raise L{ProxyHeaderError}, never anything else."""
        bad = [
            HELLO,
            b"GET / HTTP/1.1\r\n",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 notaport 1\r\n",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 70000 1\r\n",
            b"PROXY TCP4 not.an.ip.addr 5.6.7.8 1 1\r\n",
            b"PROXY TCP4 ::1 ::2 1 1\r\n",
            b"PROXY TCP5 1.2.3.4 5.6.7.8 1 1\r\n",
            b"PROXY TCP4 \xff\xfe 5.6.7.8 1 1\r\n",
            b"PROXY " + b"1" * 200,
            SIGNATURE + b"\x31\x11\x00\x0c" + b"\x00" * 12,  # version 3
            SIGNATURE + b"\x21\x11\x00\x04" + b"\x00" * 4,  # too short for TCP4
            SIGNATURE + b"\x21\x41\x00\x00",  # family 4
        ]
        for data in bad:
            self.assertRaises(ProxyHeaderError, parse_proxy_header, data)


class TrustedProxiesTests(SynchronousTestCase):
    """
    L{TrustedProxies}: the C{--proxy-protocol-from} list.
    """

    def test_parseAndTrust(self) -> None:
        """Networks, single addresses and C{unix}; repeated values add up."""
        trusted = TrustedProxies.parse(["10.0.0.0/24, 127.0.0.1", "2001:db8::/64"])
        self.assertTrue(trusted.trusts(BALANCER))
        self.assertTrue(trusted.trusts(IPv4Address("TCP", "127.0.0.1", 1)))
        self.assertTrue(trusted.trusts(IPv6Address("TCP", "2001:db8::5", 1)))
        self.assertTrue(trusted.trusts(IPv6Address("TCP", "::ffff:10.0.0.9", 1)))
        self.assertFalse(trusted.trusts(STRANGER))
        self.assertFalse(trusted.trusts(IPv4Address("TCP", "127.0.0.2", 1)))
        self.assertFalse(trusted.trusts(UNIXAddress(None)))
        self.assertTrue(TrustedProxies.parse(["unix"]).trusts(UNIXAddress(None)))
        self.assertFalse(TrustedProxies.parse([]))
        self.assertEqual(str(TrustedProxies.parse(["unix,10.0.0.0/8"])), "10.0.0.0/8,unix")

    def test_badItems(self) -> None:
        """Typos and host bits in a network are refused, naming the item."""
        for spec in ("10.0.0.5/24", "example.com", "10.0.0.0/33", "local"):
            e = self.assertRaises(ValueError, TrustedProxies.parse, [spec])
            self.assertIn(repr(spec), str(e))

    def test_serverOptions(self) -> None:
        """C{twistd imgresume} parses, repeats and checks both options."""
        storage = self.mktemp()
        os.makedirs(storage)
        options = ServerOptions()
        options.parseOptions([
            "--storage", storage, "--proxy-protocol-from", "127.0.0.1/32,unix",
            "--proxy-protocol-from", "::1", "--max-connections-per-address", "5",
        ])
        self.assertEqual(options["proxy-protocol-from"], ["127.0.0.1/32,unix", "::1"])
        self.assertEqual(options["max-connections-per-address"], 5)
        self.assertEqual(ServerOptions().parseOptions(["--storage", storage]), None)
        for bad in (["--proxy-protocol-from", "10.1.2.3/8"],
                    ["--max-connections-per-address", "-1"],
                    ["--listen", "haproxy:tcp:0:interface=127.0.0.1",
                     "--proxy-protocol-from", "unix"]):
            self.assertRaises(usage.UsageError, ServerOptions().parseOptions,
                              ["--storage", storage, *bad])

    def test_addressKey(self) -> None:
        """Connections are counted by IP address, a mapped one as IPv4; UNIX peers are not."""
        self.assertEqual(address_key(CLIENT4), "203.0.113.7")
        self.assertEqual(address_key(IPv6Address("TCP", "::ffff:203.0.113.7", 9)), "203.0.113.7")
        self.assertEqual(address_key(IPv6Address("TCP", "2001:DB8:0::7", 9)), "2001:db8::7")
        self.assertIsNone(address_key(UNIXAddress(b"/x")))


# -- the server side, in memory ----------------------------------------------


class ServerHarness:
    """
    An L{UploadServerFactory} on a memory storage behind a
    L{ProxyTrustFactory}, connections on L{StringTransport}s, a fake clock.
    """

    def __init__(self, trusted: str = "10.0.0.0/24,unix", limit: int = 0) -> None:
        self.clock = Clock()
        self.server = UploadServerFactory(
            MemoryStorage(), "test-server", self.clock, handshake_timeout=10,
            idle_timeout=60, takeover_check_interval=0,
        )
        self.factory = ProxyTrustFactory(
            self.server, self.clock, TrustedProxies.parse([trusted]), limit,
            header_timeout=10, refuse_linger=2,
        )

    def connect(self, peer: Any = BALANCER, *chunks: bytes) -> tuple[Any, StringTransport]:
        proto = self.factory.buildProtocol(peer)
        transport = StringTransport(peerAddress=peer, hostAddress=SERVER4)
        proto.makeConnection(transport)
        for chunk in chunks:
            proto.dataReceived(chunk)
        return proto, transport

    def close(self, proto: Any) -> None:
        from twisted.internet.error import ConnectionDone
        from twisted.python.failure import Failure

        proto.connectionLost(Failure(ConnectionDone()))


class ServerTrustTests(SynchronousTestCase):
    """
    The server honours PROXY headers from trusted peers only, and requires
    one from them.
    """

    def setUp(self) -> None:
        self.log = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        self.h = ServerHarness()

    def messages(self) -> list[str]:
        return [formatEvent(e) for e in self.log]

    def assertWelcomed(self, transport: StringTransport) -> None:
        [frame] = frames(transport.value())
        self.assertIsInstance(frame, Welcome)
        self.assertFalse(transport.disconnecting)

    def test_trustedV2(self) -> None:
        """A trusted peer's v2 header sets the address the server protocol sees and logs."""
        proto, transport = self.h.connect(BALANCER, proxy_header(CLIENT4, SERVER4) + HELLO)
        self.assertWelcomed(transport)
        inner = proto.wrappedProtocol
        self.assertEqual(inner.transport.getPeer(), CLIENT4)
        self.assertEqual(inner.transport.getHost(), SERVER4)
        self.assertEqual(inner.peer, "203.0.113.7:40001")
        self.assertIn("handshake from 203.0.113.7:40001: client tester", self.messages())

    def test_trustedV1(self) -> None:
        """A trusted peer's v1 header, IPv4 and IPv6."""
        for client, server in ((CLIENT4, SERVER4), (CLIENT6, SERVER6)):
            proto, transport = self.h.connect(BALANCER, v1(client, server) + HELLO)
            self.assertWelcomed(transport)
            self.assertEqual(proto.wrappedProtocol.transport.getPeer(), client)
        self.assertIn("handshake from [2001:db8::7]:40002: client tester", self.messages())

    def test_splitHeader(self) -> None:
        """
        A header that arrives a byte at a time (first read far below the 16
        bytes Twisted's wrapper needs) works, for v1 and v2.
        """
        for header in (proxy_header(CLIENT6, SERVER6), v1(CLIENT4, SERVER4)):
            proto, transport = self.h.connect(BALANCER)
            for i in range(len(header)):
                proto.dataReceived(header[i:i + 1])
            self.assertIsNotNone(proto.wrappedProtocol)
            proto.dataReceived(HELLO)
            self.assertWelcomed(transport)
        self.assertIn("handshake from [2001:db8::7]:40002: client tester", self.messages())

    def test_unixPeerTrusted(self) -> None:
        """With C{unix} in the list, a UNIX socket peer (a local balancer) must send a header."""
        proto, transport = self.h.connect(UNIXAddress(None), proxy_header(CLIENT4, SERVER4), HELLO)
        self.assertWelcomed(transport)
        self.assertEqual(proto.wrappedProtocol.peer, "203.0.113.7:40001")

    def test_untrustedHeaderIsGarbage(self) -> None:
        """
        A peer outside the trusted networks that sends a PROXY header gets
        no say about its address: the server protocol sees the header as a
        bad frame.  (The frame decoder checks the length before the type, so
        both headers, whose first bytes read as an unknown type and a huge
        length, are answered FRAME_TOO_LARGE; MALFORMED_FRAME is as good.)
        """
        for header in (proxy_header(CLIENT4, SERVER4), v1(CLIENT4, SERVER4)):
            proto, transport = self.h.connect(STRANGER, header + HELLO)
            self.assertEqual(proto.wrappedProtocol.transport.getPeer(), STRANGER)
            [error] = frames(transport.value())
            self.assertIn(error.code, (ErrorCode.MALFORMED_FRAME, ErrorCode.FRAME_TOO_LARGE))
            self.assertTrue(transport.disconnecting)
        self.assertFalse([m for m in self.messages() if "203.0.113.7" in m])

    def test_untrustedWithoutHeader(self) -> None:
        """An untrusted peer without a header is served directly, under its own address."""
        _, transport = self.h.connect(STRANGER, HELLO)
        self.assertWelcomed(transport)
        self.assertIn("handshake from 192.0.2.99:55001: client tester", self.messages())

    def test_trustedWithoutHeader(self) -> None:
        """A trusted peer that starts with anything but a PROXY header is closed, with a reason."""
        proto, transport = self.h.connect(BALANCER, HELLO)
        self.assertEqual(transport.value(), b"")
        self.assertTrue(transport.disconnecting)
        self.assertIsNone(proto.wrappedProtocol)
        self.assertIn(
            "closing connection from trusted proxy 10.0.0.5:55000: no PROXY header: "
            "the connection started with other bytes", self.messages())

    def test_trustedMalformedHeader(self) -> None:
        """A malformed header from a trusted peer closes the connection."""
        _, transport = self.h.connect(BALANCER, b"PROXY TCP4 1.2.3.4 5.6.7.8 x 1\r\n")
        self.assertTrue(transport.disconnecting)
        self.assertIn("closing connection from trusted proxy 10.0.0.5:55000: malformed "
                      "PROXY v1 header (ValueError)", self.messages())

    def test_trustedSilent(self) -> None:
        """A trusted peer that never completes its header is closed after the timeout."""
        _, transport = self.h.connect(BALANCER, SIGNATURE[:5])
        self.h.clock.advance(9.9)
        self.assertFalse(transport.disconnecting)
        self.h.clock.advance(0.2)
        self.assertTrue(transport.disconnecting)
        self.assertIn("closing connection from trusted proxy 10.0.0.5:55000: no complete "
                      "PROXY header within 10 s", self.messages())

    def test_localHeader(self) -> None:
        """A LOCAL header (a balancer's health check) is served under the balancer's address."""
        proto, transport = self.h.connect(BALANCER, local_header() + HELLO)
        self.assertWelcomed(transport)
        self.assertEqual(proto.wrappedProtocol.transport.getPeer(), BALANCER)

    def test_closeReachesServer(self) -> None:
        """Closing the connection closes the server protocol (its upload is released)."""
        proto, _ = self.h.connect(BALANCER, proxy_header(CLIENT4, SERVER4) + HELLO)
        inner = proto.wrappedProtocol
        self.assertIn(inner, self.h.server.connections)
        self.h.close(proto)
        self.assertNotIn(inner, self.h.server.connections)
        self.assertTrue(inner.closed.called)


class ServerLimitTests(SynchronousTestCase):
    """
    C{--max-connections-per-address} on the server, counted by real client
    address.
    """

    def setUp(self) -> None:
        self.log = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        self.h = ServerHarness(limit=2)

    def via(self, client: Any) -> tuple[Any, StringTransport]:
        return self.h.connect(BALANCER, proxy_header(client, SERVER4) + HELLO)

    def assertRefused(self, transport: StringTransport, address: str) -> None:
        [error] = frames(transport.value())
        self.assertIsInstance(error, Error)
        self.assertEqual(error.code, ErrorCode.HANDSHAKE_REJECTED)
        self.assertEqual(
            error.message, f"too many connections from {address}: at most 2 at a time "
            "per client address; close some, then retry")

    def test_limit(self) -> None:
        """
        The third connection from one real client address gets one
        HANDSHAKE_REJECTED frame and is closed after the linger period; other
        addresses are not affected; closing one connection frees a slot.
        """
        first, _ = self.via(IPv4Address("TCP", "203.0.113.7", 1))
        self.via(IPv4Address("TCP", "203.0.113.7", 2))
        third, t3 = self.via(IPv4Address("TCP", "203.0.113.7", 3))
        self.assertRefused(t3, "203.0.113.7")
        self.assertIsNone(third.wrappedProtocol)
        third.dataReceived(HELLO)  # read and dropped while lingering
        self.assertFalse(t3.disconnecting)
        self.h.clock.advance(2)
        self.assertTrue(t3.disconnecting)
        self.h.close(third)
        _, other = self.via(CLIENT6)
        self.assertIsInstance(frames(other.value())[0], Welcome)
        self.h.close(first)
        _, again = self.via(IPv4Address("TCP", "203.0.113.7", 4))
        self.assertIsInstance(frames(again.value())[0], Welcome)
        self.assertTrue([e for e in self.log if "refused" in e.get("log_format", "")])

    def test_directClientsCounted(self) -> None:
        """Untrusted peers are counted by their own address; UNIX peers without a header are not."""
        h = ServerHarness(trusted="10.0.0.0/24", limit=1)
        h.connect(STRANGER, HELLO)
        _, t = h.connect(IPv4Address("TCP", STRANGER.host, 1), HELLO)
        [error] = frames(t.value())
        self.assertEqual(error.code, ErrorCode.HANDSHAKE_REJECTED)
        for _ in range(3):
            _, t = h.connect(UNIXAddress(None), HELLO)
            self.assertIsInstance(frames(t.value())[0], Welcome)

    def test_localNotCounted(self) -> None:
        """The balancer's own (LOCAL) connections never use a client's slots."""
        for _ in range(5):
            _, t = self.h.connect(BALANCER, local_header() + HELLO)
            self.assertIsInstance(frames(t.value())[0], Welcome)

    def test_unlimited(self) -> None:
        """0 means no limit."""
        h = ServerHarness(limit=0)
        for port in range(100):
            _, t = h.connect(BALANCER, proxy_header(IPv4Address("TCP", "203.0.113.7", port),
                                                   SERVER4) + HELLO)
            self.assertIsInstance(frames(t.value())[0], Welcome)


# -- the balancer, on real sockets -----------------------------------------------


class Recorder(Protocol):
    """A backend that records what it receives."""

    def connectionMade(self) -> None:
        self.factory.connections.append(self)
        self.received = b""

    def dataReceived(self, data: bytes) -> None:
        self.received += data


class Client(Protocol):
    """A client that records what it receives and when it is closed."""

    def __init__(self) -> None:
        self.received = b""
        self.closed: Deferred[None] = Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason: Any) -> None:
        self.closed.callback(None)


async def waitFor(predicate: Any, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await deferLater(reactor, 0.01, lambda: None)


class BalancerTests(TestCase):
    """
    C{--send-proxy} and C{--max-connections-per-address} on the balancer,
    over real TCP sockets on 127.0.0.1.
    """

    async def listen(self, factory: Factory) -> int:
        port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(factory)
        self.addCleanup(port.stopListening)
        return port.getHost().port

    async def balancer(self, **kw: Any) -> tuple[int, Factory]:
        backend = Factory.forProtocol(Recorder)
        backend.connections = []
        backendPort = await self.listen(backend)
        self.factory = build_balancer(reactor, [f"tcp:127.0.0.1:{backendPort}"], **kw)
        return await self.listen(self.factory), backend

    async def connect(self, port: int) -> Client:
        client = await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), Client())

        def close() -> Deferred[None]:
            if not client.closed.called:
                client.transport.loseConnection()
            return client.closed

        self.addCleanup(close)
        return client

    async def test_sendProxy(self) -> None:
        """
        The backend receives a v2 header with the client's own address and
        port before the client's first byte.
        """
        lbPort, backend = await self.balancer(send_proxy=True)
        client = await self.connect(lbPort)
        client.transport.write(b"hello")
        await waitFor(lambda: backend.connections and backend.connections[0].received.endswith(
            b"hello"))
        info, rest = V2Parser().feed(backend.connections[0].received)
        self.assertEqual(rest, b"hello")
        me = client.transport.getHost()
        self.assertEqual((info.source.host, info.source.port), (me.host, me.port))
        self.assertEqual(info.destination.port, lbPort)

    async def test_noHeaderByDefault(self) -> None:
        """Without C{sendProxy}, bytes go through untouched."""
        lbPort, backend = await self.balancer()
        client = await self.connect(lbPort)
        client.transport.write(b"hello")
        await waitFor(lambda: backend.connections and backend.connections[0].received)
        self.assertEqual(backend.connections[0].received, b"hello")

    async def test_limit(self) -> None:
        """
        The N+1th client connection from one address gets a
        HANDSHAKE_REJECTED ERROR frame and is closed; closing one frees a slot.
        """
        lbPort, backend = await self.balancer(max_per_address=2)
        first = await self.connect(lbPort)
        await self.connect(lbPort)
        await waitFor(lambda: len(backend.connections) == 2)
        third = await self.connect(lbPort)
        await third.closed
        [error] = frames(third.received)
        self.assertEqual(error.code, ErrorCode.HANDSHAKE_REJECTED)
        self.assertIn("too many connections from 127.0.0.1: at most 2", error.message)
        self.assertEqual(len(backend.connections), 2)
        first.transport.loseConnection()
        await waitFor(lambda: self.factory.limit.open_counts() == {"127.0.0.1": 1})
        fourth = await self.connect(lbPort)
        fourth.transport.write(b"x")
        await waitFor(lambda: len(backend.connections) == 3)

    async def test_healthCheckSendsLocal(self) -> None:
        """
        A server that trusts the balancer passes its health check only when
        the check sends a (LOCAL) header; without one it closes the check.
        """
        clock = reactor
        server = UploadServerFactory(MemoryStorage(), "trusting", clock,
                                     takeover_check_interval=0)
        port = await self.listen(ProxyTrustFactory(
            server, clock, TrustedProxies.parse(["127.0.0.1"])))
        backend = Backend("b", TCP4ClientEndpoint(reactor, "127.0.0.1", port))
        results = []
        for send in (True, False):
            check = HealthCheck(backend, reactor, 2.0, 7, send_proxy=send)
            ended = check.when_ended()
            check.start()
            results.append(await ended)
        self.assertTrue(results[0].healthy, results[0])
        self.assertEqual(results[0].server_id, "trusting")
        self.assertFalse(results[1].healthy)

    async def test_twistedHaproxyEndpointBehindBalancer(self) -> None:
        """
        A server listening with Twisted's C{haproxy:} endpoint gets the
        client's address from C{--send-proxy} too (the header always comes
        in one write, so the wrapper's 16-byte first read holds).
        """
        seen: list[Any] = []

        class Inner(Protocol):
            def dataReceived(self, data: bytes) -> None:
                seen.append(self.transport.getPeer())

        port = await proxyEndpoint(TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1")).listen(
            Factory.forProtocol(Inner))
        self.addCleanup(port.stopListening)
        factory = build_balancer(reactor, [f"tcp:127.0.0.1:{port.getHost().port}"],
                                send_proxy=True)
        lbPort = await self.listen(factory)
        client = await self.connect(lbPort)
        client.transport.write(b"x")
        await waitFor(lambda: seen)
        self.assertEqual(seen[0].port, client.transport.getHost().port)


# -- real processes --------------------------------------------------------------


class SendProxyClusterTests(TestCase):
    """
    C{twistd imgresume-lb --send-proxy} in front of C{twistd imgresume
    --proxy-protocol-from 127.0.0.1/32,unix} servers (on UNIX sockets).
    """

    timeout = 90

    def setUp(self) -> None:
        self.work = os.path.abspath(self.mktemp())
        os.makedirs(self.work)
        self.cluster = LocalCluster(
            self.work, servers=2,
            server_args=["--proxy-protocol-from", "127.0.0.1/32,unix"],
            lb_args=["--send-proxy", "--check-interval", "0.2"],
        ).start()
        self.addCleanup(self.cluster.stop)

    def serverLogs(self) -> str:
        text = ""
        for path in glob.glob(os.path.join(self.work, "logs", "node-*.log")):
            with open(path, errors="replace") as f:
                text += f.read()
        return text

    def lbLog(self) -> str:
        with open(self.cluster.lb.log, errors="replace") as f:
            return f.read()

    def makeFile(self, size: int) -> tuple[str, str]:
        path = os.path.join(self.work, "scan.tif")
        with open(path, "wb") as f:
            f.write(os.urandom(size))
        with open(path, "rb") as f:
            return path, hashlib.sha256(f.read()).hexdigest()

    def uploader(self) -> Uploader:
        return Uploader(self.cluster.lb_endpoint, reactor=reactor, journal=None,
                        chunk_size=256 * 1024, window=4, client_id="test",
                        backoff_base=0.05, backoff_max=0.5, digest="sha256")

    def assertNoProxyTrouble(self) -> None:
        self.assertNotIn("trusted proxy", self.serverLogs())
        self.assertNotIn("is down", self.lbLog())

    async def test_serverLogsClientPort(self) -> None:
        """
        A client's handshake is logged by the server with the client's own
        source port; an upload through the balancer completes; the health
        checks (LOCAL headers) keep both servers up.
        """
        host, port = self.cluster.lb.address
        with socket.create_connection((host, port), timeout=10) as s:
            myPort = s.getsockname()[1]
            s.sendall(HELLO)
            received = b""
            while not frames(received):
                chunk = s.recv(65536)
                self.assertTrue(chunk, "closed before WELCOME")
                received += chunk
            self.assertIsInstance(frames(received)[0], Welcome)
        path, digest = self.makeFile(3 * 256 * 1024 + 5)
        result = await self.uploader().upload(path, "a.tif")
        self.assertEqual(result.sha256, digest)
        deadline = time.monotonic() + 10
        while f"handshake from 127.0.0.1:{myPort}: client tester" not in self.serverLogs():
            self.assertLess(time.monotonic(), deadline, self.serverLogs())
            await deferLater(reactor, 0.05, lambda: None)
        handshakes = re.findall(r"handshake from (\S+): client test\b", self.serverLogs())
        self.assertTrue(handshakes)
        self.assertTrue(all(re.fullmatch(r"127\.0\.0\.1:\d+", h) for h in handshakes), handshakes)
        await deferLater(reactor, 0.6, lambda: None)  # a few health checks
        self.assertNoProxyTrouble()

    async def test_failover(self) -> None:
        """The serving server is SIGKILLed mid-upload; the client resumes on the other."""
        size = 24 * 1024 * 1024 + 77
        path, digest = self.makeFile(size)
        kill = KillServingServer(self.cluster, after=size // 3)
        result = await self.uploader().upload(path, "big.tif", progress=kill)
        kill.check(self, result)
        self.assertEqual(result.sha256, digest)
        self.assertGreater(result.resumed_at[0], size // 3)
        self.assertNotIn("trusted proxy", self.serverLogs())

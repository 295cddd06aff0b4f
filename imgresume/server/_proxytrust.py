# -*- test-case-name: tests.server.test_proxy_protocol -*-
"""
Who a connection really comes from, and how many connections it may have.

L{ProxyTrustFactory} wraps a server's protocol factory:

  - A connection whose transport peer is in one of the networks the server
    trusts (L{TrustedProxies}: C{--proxy-protocol-from}) must start with a
    PROXY protocol header, version 1 or 2 (parsed with Twisted's parsers,
    L{twisted.protocols.haproxy}).  The client address it carries becomes
    what C{transport.getPeer()} returns to the wrapped protocol, so its logs
    name the real client.  A missing, malformed or late header closes the
    connection, with a logged reason.
  - A connection from anywhere else is handed to the wrapped protocol as it
    is: a PROXY header it sends is not honoured, it is just bytes (which the
    imgresume protocol refuses as C{MALFORMED_FRAME}).
  - Connections are counted per real client address (C{--max-connections-
    per-address}).  One more than allowed gets one C{HANDSHAKE_REJECTED}
    ERROR frame and is closed; closing a connection frees its slot.

Unlike Twisted's own C{haproxy:} endpoint (which trusts every peer, and
gives up on a first read shorter than 16 bytes), this decides the header
version from as many reads as it takes.
"""

from __future__ import annotations

import ipaddress
import struct
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from twisted.internet.abstract import FileDescriptor
from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.interfaces import IAddress, IDelayedCall, IReactorTime
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.protocols.haproxy._exceptions import InvalidProxyHeader
from twisted.protocols.haproxy._info import ProxyInfo
from twisted.protocols.haproxy._v1parser import V1Parser
from twisted.protocols.haproxy._v2parser import V2Parser
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from twisted.python.failure import Failure
from zope.interface import directlyProvides, providedBy

from imgresume.errors import ErrorCode
from imgresume.protocol import Error, encode

log = Logger()

#: Default of C{--max-connections-per-address}.
DEFAULT_MAX_CONNECTIONS_PER_ADDRESS = 64

#: The keyword of C{--proxy-protocol-from} that trusts UNIX socket peers.
UNIX_KEYWORD = "unix"

_V2_SIGNATURE = V2Parser.PREFIX
_V1_SIGNATURE = V1Parser.PROXYSTR + b" "
#: Longest v1 header, CRLF included (HAProxy's proxy-protocol.txt).
_V1_MAX = 107

_Network = ipaddress.IPv4Network | ipaddress.IPv6Network
_IP = ipaddress.IPv4Address | ipaddress.IPv6Address


def _ip(address: IAddress | None) -> _IP | None:
    """
    The IP address of a Twisted TCP address (an IPv4-mapped IPv6 address as
    IPv4, a scope id dropped), or L{None} for UNIX and other addresses.
    """
    if not isinstance(address, (IPv4Address, IPv6Address)):
        return None
    try:
        ip = ipaddress.ip_address(address.host.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def addressKey(address: IAddress | None) -> str | None:
    """
    What connections are counted by: the client's IP address in its
    canonical text form (C{::ffff:192.0.2.1} counts as C{192.0.2.1}), or
    L{None} for a peer without one (a UNIX socket), which is not counted.
    """
    ip = _ip(address)
    return None if ip is None else str(ip)


def describeAddress(address: IAddress | None) -> str:
    """A peer for logs: C{192.0.2.1:5000}, C{[2001:db8::1]:5000}, C{unix:PATH}."""
    if isinstance(address, (IPv4Address, IPv6Address)):
        host = address.host
        return f"[{host}]:{address.port}" if ":" in host else f"{host}:{address.port}"
    if isinstance(address, UNIXAddress):
        name = address.name
        if isinstance(name, bytes):
            name = name.decode("utf-8", "replace")
        return f"unix:{name}" if name else "unix"
    return str(address)


@dataclass(frozen=True)
class TrustedProxies:
    """
    The peers whose PROXY headers a server believes (and requires).

    @ivar networks: IP networks; a TCP peer in one of them is trusted.
    @ivar unix: whether UNIX socket peers are trusted.  A UNIX peer has no
        address to check, so this trusts whoever may open the socket file:
        its permissions decide.
    """

    networks: tuple[_Network, ...] = ()
    unix: bool = False

    @classmethod
    def parse(cls, specs: Iterable[str]) -> TrustedProxies:
        """
        Read C{--proxy-protocol-from} values: each a comma-separated list of
        networks in CIDR form (C{10.0.0.0/24}, C{2001:db8::/64}), single
        addresses (C{127.0.0.1}) and the keyword C{unix}.

        @raise ValueError: with a message naming the bad item, also for a
            network written with host bits set (C{10.0.0.5/24}: did it mean
            C{10.0.0.0/24} or C{10.0.0.5/32}?).
        """
        networks: list[_Network] = []
        unix = False
        for spec in specs:
            for item in (part.strip() for part in spec.split(",")):
                if not item:
                    continue
                if item.lower() == UNIX_KEYWORD:
                    unix = True
                    continue
                try:
                    network = ipaddress.ip_network(item.strip("[]"), strict=True)
                except ValueError as e:
                    raise ValueError(
                        f"{item!r} is not a network (CIDR such as 10.0.0.0/24 or "
                        f"2001:db8::/64), an address, or {UNIX_KEYWORD!r}: {e}"
                    ) from None
                if isinstance(network, ipaddress.IPv6Network) and (
                    network.network_address.ipv4_mapped is not None
                    and network.prefixlen >= 96
                ):
                    # ::ffff:10.0.0.0/104 is 10.0.0.0/8: peers are compared unmapped.
                    network = ipaddress.ip_network(
                        f"{network.network_address.ipv4_mapped}/{network.prefixlen - 96}"
                    )
                if network not in networks:
                    networks.append(network)
        return cls(tuple(networks), unix)

    def __bool__(self) -> bool:
        return bool(self.networks) or self.unix

    def trusts(self, peer: IAddress) -> bool:
        """Whether a connection from transport peer C{peer} must send a PROXY header."""
        if isinstance(peer, UNIXAddress):
            return self.unix
        ip = _ip(peer)
        return ip is not None and any(
            ip.version == net.version and ip in net for net in self.networks
        )

    def __str__(self) -> str:
        items = [str(n) for n in self.networks] + ([UNIX_KEYWORD] if self.unix else [])
        return ",".join(items) or "nobody"


class ProxyHeaderError(Exception):
    """A connection from a trusted proxy did not start with a usable PROXY header."""


def _checkedAddress(address: IAddress | None, version: int) -> IAddress | None:
    """
    A parsed address, checked (Twisted's v1 parser takes any text as a host
    and any integer as a port) and in canonical form (its v2 parser writes
    IPv6 addresses uncompressed: C{0:0:0:0:0:0:0:1}; an IPv4-mapped IPv6
    address becomes the IPv4 address).
    """
    if not isinstance(address, (IPv4Address, IPv6Address)):
        return address
    try:
        ip = ipaddress.ip_address(address.host)
    except ValueError:
        raise ProxyHeaderError(f"PROXY v{version} header: bad address {address.host!r}")
    if (ip.version == 4) != isinstance(address, IPv4Address):
        raise ProxyHeaderError(f"PROXY v{version} header: {ip} in the wrong family")
    if not 0 <= address.port <= 0xFFFF:
        raise ProxyHeaderError(f"PROXY v{version} header: bad port {address.port}")
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return IPv4Address(address.type, str(ip.ipv4_mapped), address.port)
    return type(address)(address.type, str(ip), address.port)


def parseProxyHeader(data: bytes) -> tuple[ProxyInfo, bytes] | None:
    """
    Parse the PROXY header (v1 or v2) at the start of C{data}, the bytes a
    trusted connection has sent so far.

    @return: L{None} if more bytes are needed; otherwise the header's
        L{ProxyInfo} (C{source} and C{destination} are L{None} for C{LOCAL},
        C{UNKNOWN} and C{UNSPEC} headers) and the bytes that followed it.
    @raise ProxyHeaderError: the bytes cannot begin a PROXY header, or they
        begin a malformed one.
    """
    if _V2_SIGNATURE.startswith(data[:12]):
        if len(data) < 16:
            return None  # Twisted's V2Parser cannot decide on fewer bytes
        if data[12] >> 4 != 2:
            raise ProxyHeaderError(f"PROXY v2 signature with version {data[12] >> 4}")
        size = 16 + struct.unpack("!H", data[14:16])[0]
        if len(data) < size:
            return None
        try:
            info = V2Parser.parse(data[:size])
        except (InvalidProxyHeader, KeyError, ValueError, struct.error) as e:
            raise ProxyHeaderError(f"malformed PROXY v2 header ({type(e).__name__})")
        version, rest = 2, data[size:]
    elif _V1_SIGNATURE.startswith(data[: len(_V1_SIGNATURE)]):
        if len(data) < len(_V1_SIGNATURE):
            return None
        end = data.find(b"\r\n", 0, _V1_MAX)
        if end < 0:
            if len(data) >= _V1_MAX:
                raise ProxyHeaderError(f"PROXY v1 header longer than {_V1_MAX} bytes")
            return None
        line = data[:end]
        try:
            if line == b"PROXY UNKNOWN" or line.startswith(b"PROXY UNKNOWN "):
                # Valid per the specification; Twisted's parser refuses the
                # bare form.
                info = ProxyInfo(line, None, None)
            else:
                info = V1Parser.parse(line)
        except (InvalidProxyHeader, ValueError) as e:  # UnicodeDecodeError is one
            raise ProxyHeaderError(f"malformed PROXY v1 header ({type(e).__name__})")
        version, rest = 1, data[end + 2:]
    else:
        raise ProxyHeaderError("no PROXY header: the connection started with other bytes")
    return ProxyInfo(
        info.header,
        _checkedAddress(info.source, version),
        _checkedAddress(info.destination, version),
    ), rest


class ConnectionsPerAddress:
    """
    Open connections counted by client address, with an upper bound.

    @ivar maximum: connections allowed per address; 0 for no limit.
    """

    def __init__(self, maximum: int) -> None:
        if maximum < 0:
            raise ValueError(f"maximum must be >= 0, not {maximum!r}")
        self.maximum = maximum
        self._open: Counter[str] = Counter()

    def acquire(self, key: str) -> bool:
        """Count one more connection from C{key}, unless it already has the maximum."""
        if self.maximum and self._open[key] >= self.maximum:
            return False
        self._open[key] += 1
        return True

    def release(self, key: str) -> None:
        """One connection from C{key} is gone."""
        self._open[key] -= 1
        if self._open[key] <= 0:
            del self._open[key]

    def count(self, key: str) -> int:
        """Connections open from C{key}."""
        return self._open[key]


def tooManyConnectionsFrame(key: str, maximum: int) -> bytes:
    """
    The ERROR frame a connection over the per-address limit receives.
    C{HANDSHAKE_REJECTED}: the server refuses this client before the
    handshake, for who (where) it is, and the code is not retryable, so an
    imgresume client stops instead of opening yet more connections.
    """
    return encode(Error(
        ErrorCode.HANDSHAKE_REJECTED,
        f"too many connections from {key}: at most {maximum} at a time per client "
        "address; close some, then retry",
    ))


class ProxyTrustProtocol(ProtocolWrapper):
    """
    One connection through a L{ProxyTrustFactory}: reads the PROXY header if
    the peer is trusted, applies the per-address limit, and only then builds
    and connects the wrapped protocol (so that its C{connectionMade} already
    sees the real client in C{transport.getPeer()}).
    """

    def __init__(self, factory: ProxyTrustFactory) -> None:
        super().__init__(factory, None)  # type: ignore[arg-type]
        self._state = "new"  # -> header -> open | refused -> closed
        self._buffer = b""
        self._info: ProxyInfo | None = None
        self._key: str | None = None
        self._timer: IDelayedCall | None = None

    def logPrefix(self) -> str:
        if self.wrappedProtocol is None:
            return type(self).__name__
        return super().logPrefix()

    def makeConnection(self, transport: Any) -> None:
        # As ProtocolWrapper.makeConnection, but the wrapped protocol is only
        # connected once the real client is known.
        directlyProvides(self, providedBy(transport))
        self.factory.registerProtocol(self)
        Protocol.makeConnection(self, transport)

    def connectionMade(self) -> None:
        if self.factory.trusted.trusts(self.transport.getPeer()):
            self._state = "header"
            self._timer = self.factory.clock.callLater(
                self.factory.headerTimeout, self._headerTimedOut
            )
        else:
            self._open(b"")

    def getPeer(self) -> IAddress:
        if self._info is not None and self._info.source is not None:
            return self._info.source
        return self.transport.getPeer()

    def getHost(self) -> IAddress:
        if self._info is not None and self._info.destination is not None:
            return self._info.destination
        return self.transport.getHost()

    def dataReceived(self, data: bytes) -> None:
        if self._state == "open":
            self.wrappedProtocol.dataReceived(data)
        elif self._state == "header":
            self._buffer += data
            try:
                parsed = parseProxyHeader(self._buffer)
            except ProxyHeaderError as e:
                self._dropProxy(str(e))
                return
            if parsed is None:
                return
            self._cancelTimer()
            self._info, rest = parsed
            self._buffer = b""
            self._open(rest)
        # "refused", "closed": read and thrown away (see _refuse).

    def connectionLost(self, reason: Failure) -> None:
        self._state = "closed"
        self._cancelTimer()
        if self._key is not None:
            self.factory.limit.release(self._key)
            self._key = None
        self.factory.unregisterProtocol(self)
        if self.wrappedProtocol is not None:
            self.wrappedProtocol.connectionLost(reason)
            self.wrappedProtocol = None

    # -- internals ---------------------------------------------------------

    def _open(self, rest: bytes) -> None:
        peer = self.getPeer()
        if self._info is not None and self._info.source is not None:
            log.debug(
                "PROXY header from {proxy}: client {client}",
                proxy=describeAddress(self.transport.getPeer()),
                client=describeAddress(self._info.source),
            )
        # LOCAL / UNKNOWN / UNSPEC headers (a health check, a client of the
        # proxy on a UNIX socket) name no client: not counted.
        key = None if self._info is not None and self._info.source is None else (
            addressKey(peer))
        if key is not None and not self.factory.limit.acquire(key):
            self._refuse(peer, key)
            return
        self._key = key
        protocol = self.factory.wrappedFactory.buildProtocol(peer)
        if protocol is None:
            self._state = "closed"
            self.transport.loseConnection()
            return
        self.wrappedProtocol = protocol
        self._state = "open"
        protocol.makeConnection(self)
        if rest and self._state == "open":
            protocol.dataReceived(rest)

    def _refuse(self, peer: IAddress, key: str) -> None:
        limit = self.factory.limit
        log.warn(
            "connection from {client} refused: {count} connections from {address}"
            " already open (--max-connections-per-address {maximum})",
            client=describeAddress(peer), address=key, count=limit.count(key),
            maximum=limit.maximum,
        )
        self._state = "refused"
        self.transport.write(tooManyConnectionsFrame(key, limit.maximum))
        # Keep reading (and dropping) what the client sends: closing with
        # unread bytes would reset the connection, and a reset can destroy
        # the ERROR frame before the client reads it.  A socket sends FIN
        # now; any transport is closed after the linger period.
        if isinstance(self.transport, FileDescriptor):
            self.transport.loseWriteConnection()
        self._timer = self.factory.clock.callLater(
            self.factory.refuseLinger, self.transport.loseConnection
        )

    def _dropProxy(self, reason: str) -> None:
        log.warn(
            "closing connection from trusted proxy {proxy}: {reason}",
            proxy=describeAddress(self.transport.getPeer()), reason=reason,
        )
        self._state = "closed"
        self._cancelTimer()
        self._buffer = b""
        self.transport.loseConnection()

    def _headerTimedOut(self) -> None:
        self._timer = None
        self._dropProxy(f"no complete PROXY header within {self.factory.headerTimeout:g} s")

    def _cancelTimer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None


class ProxyTrustFactory(WrappingFactory):
    """
    Wraps a server's protocol factory with PROXY header trust and the
    per-address connection limit (see the module docstring).  Built by
    L{imgresume.server.makeServerService}.
    """

    protocol = ProxyTrustProtocol  # type: ignore[assignment]
    noisy = False

    def __init__(
        self,
        wrappedFactory: Factory,
        clock: IReactorTime,
        trusted: TrustedProxies = TrustedProxies(),
        maxPerAddress: int = DEFAULT_MAX_CONNECTIONS_PER_ADDRESS,
        headerTimeout: float = 30.0,
        refuseLinger: float = 2.0,
    ) -> None:
        """
        @param trusted: peers that must (and alone may) send a PROXY header.
        @param maxPerAddress: connections allowed at once per real client
            address; 0 for no limit.
        @param headerTimeout: seconds a trusted peer has to send its header.
        @param refuseLinger: seconds a connection refused for the limit is
            kept open (reading and dropping) for its ERROR frame to arrive.
        """
        super().__init__(wrappedFactory)
        self.clock = clock
        self.trusted = trusted
        self.limit = ConnectionsPerAddress(maxPerAddress)
        self.headerTimeout = headerTimeout
        self.refuseLinger = refuseLinger

    def buildProtocol(self, addr: IAddress) -> ProxyTrustProtocol:
        return self.protocol(self)  # type: ignore[call-arg]

    def logPrefix(self) -> str:
        wrapped = self.wrappedFactory
        prefix = wrapped.logPrefix() if hasattr(wrapped, "logPrefix") else type(wrapped).__name__
        return f"{prefix} (PROXY from {self.trusted})" if self.trusted else prefix

# -*- test-case-name: tests.server.test_proxy_protocol -*-
"""
Who a connection really comes from, and how many connections it may have.

L{ProxyTrustFactory} wraps a server's protocol factory:

  - A connection whose transport peer is in one of the networks the server
    trusts (L{TrustedProxies}: C{--proxy-protocol-from}) must start with a
    PROXY protocol header, version 1 or 2 (read by
    L{imgresume.addresses.parse_proxy_header} with Twisted's parsers,
    L{twisted.protocols.haproxy}).  The client address it carries becomes
    what C{transport.getPeer()} returns to the wrapped protocol, so its logs
    name the real client.  A missing, malformed or late header closes the
    connection, with a logged reason.
  - A connection from anywhere else is handed to the wrapped protocol as it
    is: a PROXY header it sends is not honoured, it is just bytes (which the
    imgresume protocol refuses as C{MALFORMED_FRAME}).
  - Connections are counted per real client address (C{--max-connections-
    per-address}, L{imgresume.addresses.ConnectionsPerAddress}).  One more
    than allowed gets one C{HANDSHAKE_REJECTED} ERROR frame and is closed;
    closing a connection frees its slot.

Unlike Twisted's own C{haproxy:} endpoint (which trusts every peer, and
gives up on a first read shorter than 16 bytes), this decides the header
version from as many reads as it takes.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from twisted.internet.abstract import FileDescriptor
from twisted.internet.address import UNIXAddress
from twisted.internet.interfaces import IAddress, IDelayedCall, IReactorTime
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.protocols.haproxy._info import ProxyInfo
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from twisted.python.failure import Failure
from zope.interface import directlyProvides, providedBy

from imgresume.addresses import (
    ConnectionsPerAddress,
    ProxyHeaderError,
    address_key,
    client_ip,
    describe_address,
    parse_proxy_header,
)
from imgresume.errors import ErrorCode
from imgresume.logs import escape
from imgresume.protocol import Error, encode

log = Logger()

#: Default of C{--max-connections-per-address}.
DEFAULT_MAX_CONNECTIONS_PER_ADDRESS = 64

#: The keyword of C{--proxy-protocol-from} that trusts UNIX socket peers.
UNIX_KEYWORD = "unix"

_Network = ipaddress.IPv4Network | ipaddress.IPv6Network


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
        ip = client_ip(peer)
        return ip is not None and any(
            ip.version == net.version and ip in net for net in self.networks
        )

    def __str__(self) -> str:
        items = [str(n) for n in self.networks] + ([UNIX_KEYWORD] if self.unix else [])
        return ",".join(items) or "nobody"


def too_many_connections_frame(limit: ConnectionsPerAddress, key: str) -> bytes:
    """
    The ERROR frame a connection from C{key} over the per-address C{limit}
    receives.  C{HANDSHAKE_REJECTED}: the server refuses this client before
    the handshake, for who (where) it is, and the code is not retryable, so
    an imgresume client stops instead of opening yet more connections.
    """
    return encode(Error(ErrorCode.HANDSHAKE_REJECTED, limit.refusal(key)))


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
                self.factory.header_timeout, self._header_timed_out
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
                parsed = parse_proxy_header(self._buffer)
            except ProxyHeaderError as e:
                self._drop_proxy(str(e))
                return
            if parsed is None:
                return
            self._cancel_timer()
            self._info, rest = parsed
            self._buffer = b""
            self._open(rest)
        # "refused", "closed": read and thrown away (see _refuse).

    def connectionLost(self, reason: Failure) -> None:
        self._state = "closed"
        self._cancel_timer()
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
                proxy=escape(describe_address(self.transport.getPeer())),
                client=escape(describe_address(self._info.source)),
            )
        # LOCAL / UNKNOWN / UNSPEC headers (a health check, a client of the
        # proxy on a UNIX socket) name no client: not counted.
        key = None if self._info is not None and self._info.source is None else (
            address_key(peer))
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
            client=escape(describe_address(peer)), address=escape(key),
            count=limit.count(key),
            maximum=limit.maximum,
        )
        self._state = "refused"
        self.transport.write(too_many_connections_frame(limit, key))
        # Keep reading (and dropping) what the client sends: closing with
        # unread bytes would reset the connection, and a reset can destroy
        # the ERROR frame before the client reads it.  A socket sends FIN
        # now; any transport is closed after the linger period.
        if isinstance(self.transport, FileDescriptor):
            self.transport.loseWriteConnection()
        self._timer = self.factory.clock.callLater(
            self.factory.refuse_linger, self.transport.loseConnection
        )

    def _drop_proxy(self, reason: str) -> None:
        log.warn(
            "closing connection from trusted proxy {proxy}: {reason}",
            proxy=escape(describe_address(self.transport.getPeer())), reason=escape(reason),
        )
        self._state = "closed"
        self._cancel_timer()
        self._buffer = b""
        self.transport.loseConnection()

    def _header_timed_out(self) -> None:
        self._timer = None
        self._drop_proxy(f"no complete PROXY header within {self.factory.header_timeout:g} s")

    def _cancel_timer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None


class ProxyTrustFactory(WrappingFactory):
    """
    Wraps a server's protocol factory with PROXY header trust and the
    per-address connection limit (see the module docstring).  Built by
    L{imgresume.server.make_server_service}.
    """

    protocol = ProxyTrustProtocol  # type: ignore[assignment]
    noisy = False

    def __init__(
        self,
        wrapped_factory: Factory,
        clock: IReactorTime,
        trusted: TrustedProxies = TrustedProxies(),
        max_per_address: int = DEFAULT_MAX_CONNECTIONS_PER_ADDRESS,
        header_timeout: float = 30.0,
        refuse_linger: float = 2.0,
    ) -> None:
        """
        @param wrapped_factory: the server's protocol factory.
        @param trusted: peers that must (and alone may) send a PROXY header.
        @param max_per_address: connections allowed at once per real client
            address; 0 for no limit.
        @param header_timeout: seconds a trusted peer has to send its header.
        @param refuse_linger: seconds a connection refused for the limit is
            kept open (reading and dropping) for its ERROR frame to arrive.
        """
        super().__init__(wrapped_factory)
        self.clock = clock
        self.trusted = trusted
        self.limit = ConnectionsPerAddress(max_per_address)
        self.header_timeout = header_timeout
        self.refuse_linger = refuse_linger

    def buildProtocol(self, addr: IAddress) -> ProxyTrustProtocol:
        return self.protocol(self)  # type: ignore[call-arg]

    def logPrefix(self) -> str:
        wrapped = self.wrappedFactory
        prefix = wrapped.logPrefix() if hasattr(wrapped, "logPrefix") else type(wrapped).__name__
        return f"{prefix} (PROXY from {self.trusted})" if self.trusted else prefix

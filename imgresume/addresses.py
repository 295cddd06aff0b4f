# -*- test-case-name: tests.server.test_proxy_protocol -*-
"""
Client addresses and the PROXY protocol header, for the balancer and the
server alike.

The balancer writes a PROXY protocol version 2 header in front of every
backend connection (C{twistd imgresume-lb --send-proxy}); a server that
trusts it reads the header (C{twistd imgresume --proxy-protocol-from}) and
takes the client's real address from it (see C{docs/server.md}, I{Real
client addresses behind a balancer}).  Both count connections per client
address (C{--max-connections-per-address}) and name peers in their logs.
What they share lives here, once:

  - L{address_key}, L{describe_address}: what a connection is counted by,
    and how a peer is written in logs;
  - L{ConnectionsPerAddress}: the per-address connection count and its
    limit;
  - L{proxy_header}, L{local_header}: the v2 header the balancer writes;
  - L{parse_proxy_header}: a v1 or v2 header as a server reads it (with
    Twisted's parsers, L{twisted.protocols.haproxy}), from as many reads as
    it takes.

The v2 format, from HAProxy's C{proxy-protocol.txt}::

    12 bytes  signature \\r\\n\\r\\n\\0\\r\\nQUIT\\n
     1 byte   version (high nibble, 2) | command (low: 0 LOCAL, 1 PROXY)
     1 byte   family (high: 0 UNSPEC, 1 INET, 2 INET6, 3 UNIX)
              | transport (low: 0 UNSPEC, 1 STREAM)
     2 bytes  length of what follows, big-endian
     then     source address, destination address, source port,
              destination port (4+4+2+2 bytes for INET, 16+16+2+2 for INET6)

Clients whose address has no PROXY v2 form that helps a server (UNIX
sockets, anything not IP) get C{PROXY} with family C{UNSPEC} and no address:
the server then uses the connection's own addresses.  The balancer's own
connections (health checks) send C{LOCAL}.

A ground-floor module: it imports only the standard library and Twisted.
"""

from __future__ import annotations

import ipaddress
import struct
from collections import Counter

from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.interfaces import IAddress
from twisted.protocols.haproxy._exceptions import InvalidProxyHeader
from twisted.protocols.haproxy._info import ProxyInfo
from twisted.protocols.haproxy._v1parser import V1Parser
from twisted.protocols.haproxy._v2parser import V2Parser

__all__ = [
    "SIGNATURE",
    "ConnectionsPerAddress",
    "ProxyHeaderError",
    "address_key",
    "client_ip",
    "describe_address",
    "local_header",
    "parse_proxy_header",
    "proxy_header",
]

#: The v2 signature (Twisted's C{V2Parser.PREFIX}).
SIGNATURE: bytes = V2Parser.PREFIX

_V1_SIGNATURE = V1Parser.PROXYSTR + b" "
#: Longest v1 header, CRLF included (HAProxy's proxy-protocol.txt).
_V1_MAX = 107

_LOCAL = 0x20
_PROXY = 0x21
_UNSPEC = 0x00
_TCP4 = 0x11
_TCP6 = 0x21
_HEAD = struct.Struct("!BBH")
_PORTS = struct.Struct("!HH")

IP = ipaddress.IPv4Address | ipaddress.IPv6Address


# -- addresses ---------------------------------------------------------------


def _literal_ip(address: IAddress | None) -> IP | None:
    """
    The IP address of a Twisted TCP address as written (an IPv6 scope id,
    C{fe80::1%eth0}, dropped), or L{None} for anything else (UNIX, unknown,
    a host that is not a literal address).
    """
    if not isinstance(address, (IPv4Address, IPv6Address)):
        return None
    try:
        return ipaddress.ip_address(address.host.split("%", 1)[0])
    except ValueError:
        return None


def _unmapped(ip: IP) -> IP:
    """C{::ffff:192.0.2.1} as C{192.0.2.1}; other addresses unchanged."""
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def client_ip(address: IAddress | None) -> IP | None:
    """
    The IP address of a Twisted TCP address (an IPv4-mapped IPv6 address as
    IPv4, a scope id dropped), or L{None} for UNIX and other addresses.
    """
    ip = _literal_ip(address)
    return None if ip is None else _unmapped(ip)


def address_key(address: IAddress | None) -> str | None:
    """
    What client connections are counted by (C{--max-connections-per-address},
    in the balancer and in the server): the client's IP address in its
    canonical text form (C{::ffff:192.0.2.1} counts as C{192.0.2.1}), or
    L{None} for a peer without one (a UNIX socket), which is not counted.
    """
    ip = client_ip(address)
    return None if ip is None else str(ip)


def describe_address(address: IAddress | None) -> str:
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


class ConnectionsPerAddress:
    """
    Open connections counted by client address (an L{address_key}), with an
    upper bound.  Held by the balancer's factory and by the server's
    L{imgresume.server._proxytrust.ProxyTrustFactory}; their protocols
    L{acquire} a slot when a client connects and L{release} it when it goes.

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

    def open_counts(self) -> dict[str, int]:
        """Open connections per address that has any (a copy)."""
        return dict(self._open)

    def refusal(self, key: str) -> str:
        """
        The message of the C{HANDSHAKE_REJECTED} ERROR frame a connection
        from C{key} over the limit receives.
        """
        return (
            f"too many connections from {key}: at most {self.maximum} at a time per"
            " client address; close some, then retry"
        )


# -- the header the balancer writes ----------------------------------------------


def _ip_and_port(address: IAddress | None) -> tuple[IP, int] | None:
    """
    The IP address (unmapped) and port of a Twisted TCP address, or L{None}
    for anything else or a port out of range.
    """
    ip = client_ip(address)
    if ip is None or not 0 <= address.port <= 0xFFFF:  # type: ignore[union-attr]
        return None
    return ip, address.port  # type: ignore[union-attr]


def local_header() -> bytes:
    """
    A v2 header with the C{LOCAL} command: "this connection is the proxy's
    own, use its real addresses".  What the balancer's health checks send.
    """
    return SIGNATURE + _HEAD.pack(_LOCAL, _UNSPEC, 0)


def proxy_header(source: IAddress | None, destination: IAddress | None) -> bytes:
    """
    A v2 header with the C{PROXY} command for a client connection.

    @param source: the client's address (the client transport's
        C{getPeer()}).
    @param destination: the address the client connected to (its
        C{getHost()}).
    @return: the header: C{TCP4} when both addresses are IPv4 (an
        IPv4-mapped IPv6 address counts as IPv4), C{TCP6} when both are IP
        and one is IPv6 (the IPv4 one is then mapped), and family C{UNSPEC}
        with no address when either is not an IP address (a UNIX socket
        client), which tells the server to use the connection's own
        addresses.
    """
    src, dst = _ip_and_port(source), _ip_and_port(destination)
    if src is None or dst is None:
        return SIGNATURE + _HEAD.pack(_PROXY, _UNSPEC, 0)
    (src_ip, src_port), (dst_ip, dst_port) = src, dst
    if src_ip.version == dst_ip.version == 4:
        family, body = _TCP4, src_ip.packed + dst_ip.packed
    else:
        family = _TCP6
        body = b"".join(
            (ip if ip.version == 6 else ipaddress.IPv6Address(f"::ffff:{ip}")).packed
            for ip in (src_ip, dst_ip)
        )
    body += _PORTS.pack(src_port, dst_port)
    return SIGNATURE + _HEAD.pack(_PROXY, family, len(body)) + body


# -- the header a server reads -------------------------------------------------


class ProxyHeaderError(Exception):
    """A connection from a trusted proxy did not start with a usable PROXY header."""


def _checked_address(address: IAddress | None, version: int) -> IAddress | None:
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


def parse_proxy_header(data: bytes) -> tuple[ProxyInfo, bytes] | None:
    """
    Parse the PROXY header (v1 or v2) at the start of C{data}, the bytes a
    trusted connection has sent so far.  Unlike Twisted's own C{haproxy:}
    endpoint (which gives up on a first read shorter than 16 bytes), this
    decides the header version from as many reads as it takes.

    @return: L{None} if more bytes are needed; otherwise the header's
        L{ProxyInfo} (C{source} and C{destination} are L{None} for C{LOCAL},
        C{UNKNOWN} and C{UNSPEC} headers) and the bytes that followed it.
    @raise ProxyHeaderError: the bytes cannot begin a PROXY header, or they
        begin a malformed one.
    """
    if SIGNATURE.startswith(data[:12]):
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
        _checked_address(info.source, version),
        _checked_address(info.destination, version),
    ), rest

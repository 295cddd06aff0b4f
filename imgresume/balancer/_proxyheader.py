# -*- test-case-name: tests.server.test_proxy_protocol -*-
"""
The PROXY protocol version 2 header the balancer writes to a backend before
anything else (C{--send-proxy}), so that the server knows the client's real
address (see C{docs/server.md}, I{Real client addresses behind a balancer}).

Only the encoder lives here; servers parse the header with Twisted's own
parser (L{twisted.protocols.haproxy}).  The format, from HAProxy's
C{proxy-protocol.txt}::

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
"""

from __future__ import annotations

import ipaddress
import struct

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.interfaces import IAddress

#: The v2 signature (the same bytes as Twisted's C{V2Parser.PREFIX}).
SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"

_LOCAL = 0x20
_PROXY = 0x21
_UNSPEC = 0x00
_TCP4 = 0x11
_TCP6 = 0x21
_HEAD = struct.Struct("!BBH")
_PORTS = struct.Struct("!HH")

_IP = ipaddress.IPv4Address | ipaddress.IPv6Address


def _ipOf(address: IAddress | None) -> tuple[_IP, int] | None:
    """
    The IP address and port of a Twisted TCP address, or L{None} for
    anything else (UNIX, unknown, a host that is not a literal address).
    IPv6 scope ids (C{fe80::1%eth0}) have no place in the header and are
    dropped.
    """
    if not isinstance(address, (IPv4Address, IPv6Address)):
        return None
    try:
        ip = ipaddress.ip_address(address.host.split("%", 1)[0])
    except ValueError:
        return None
    if not 0 <= address.port <= 0xFFFF:
        return None
    return ip, address.port


def _unmapped(ip: _IP) -> _IP:
    """C{::ffff:192.0.2.1} as C{192.0.2.1}; other addresses unchanged."""
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def addressKey(address: IAddress | None) -> str | None:
    """
    What the balancer counts client connections by
    (C{--max-connections-per-address}): the client's IP address in canonical
    text form (an IPv4-mapped address as IPv4), or L{None} for a client
    without one (a UNIX socket), which is not counted.
    """
    found = _ipOf(address)
    return None if found is None else str(_unmapped(found[0]))


def localHeader() -> bytes:
    """
    A v2 header with the C{LOCAL} command: "this connection is the proxy's
    own, use its real addresses".  What the balancer's health checks send.
    """
    return SIGNATURE + _HEAD.pack(_LOCAL, _UNSPEC, 0)


def proxyHeader(source: IAddress | None, destination: IAddress | None) -> bytes:
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
    src, dst = _ipOf(source), _ipOf(destination)
    if src is None or dst is None:
        return SIGNATURE + _HEAD.pack(_PROXY, _UNSPEC, 0)
    (srcIP, srcPort), (dstIP, dstPort) = src, dst
    srcIP, dstIP = _unmapped(srcIP), _unmapped(dstIP)
    if srcIP.version == dstIP.version == 4:
        family, body = _TCP4, srcIP.packed + dstIP.packed
    else:
        family = _TCP6
        body = b"".join(
            (ip if ip.version == 6 else ipaddress.IPv6Address(f"::ffff:{ip}")).packed
            for ip in (srcIP, dstIP)
        )
    body += _PORTS.pack(srcPort, dstPort)
    return SIGNATURE + _HEAD.pack(_PROXY, family, len(body)) + body

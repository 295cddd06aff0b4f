# -*- test-case-name: tests.test_endpoints,tests.test_tls,tests.cli.test_startup -*-
"""Questions about Twisted endpoint strings that option parsing needs answered."""

from __future__ import annotations

import ipaddress
import re


def _split(description: str) -> list[str]:
    """Split an endpoint string on unescaped colons, as Twisted does."""
    parts, current, escaped = [], [], False
    for ch in description:
        if escaped:
            current.append(ch)
            escaped = False
        elif ch == "\\":
            escaped = True
        elif ch == ":":
            parts.append("".join(current))
            current = []
        else:
            current.append(ch)
    parts.append("".join(current))
    return parts


def _is_loopback(host: str) -> bool:
    if host in ("localhost", "localhost."):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def is_local_only(description: str) -> bool:
    """
    Whether a server endpoint string can only be reached from this host: a
    UNIX socket, or TCP/TLS (C{ssl:}, C{mtls:}) bound to a loopback
    interface (possibly wrapped in C{haproxy:}).  Anything unknown counts as
    reachable from outside.
    """
    parts = _split(description)
    kind = parts[0].lower()
    if kind == "haproxy":
        return is_local_only(description.split(":", 1)[1]) if len(parts) > 1 else False
    if kind == "unix":
        return True
    if kind in ("tcp", "tcp6", "ssl", "mtls"):
        for part in parts[1:]:
            if part.startswith("interface="):
                return _is_loopback(part[len("interface="):])
    return False


def requires_client_certificate(description: str) -> bool:
    """
    Whether a server endpoint string is TLS that refuses clients without a
    certificate from its CA: C{mtls:} (L{imgresume.tls}).  Only then can
    the server take a client's identity from its certificate.
    """
    return _split(description)[0].lower() == "mtls"


def _arguments(parts: list[str]) -> tuple[list[str], dict[str, str]]:
    """The positional and keyword arguments of a split endpoint string."""
    args = [p for p in parts[1:] if "=" not in p]
    kwargs = dict(p.split("=", 1) for p in parts[1:] if "=" in p)
    return args, kwargs


def endpoint_address(description: str) -> str:
    """
    Where a client endpoint string leads, for messages: C{HOST:PORT} for
    C{tcp:}, C{ssl:} and C{tls:} (C{[HOST]:PORT} for an IPv6 address), the
    path for C{unix:}, else the string itself.
    """
    parts = _split(description)
    kind = parts[0].lower()
    args, kwargs = _arguments(parts)
    if kind in ("tcp", "ssl", "tls"):
        host = kwargs.get("host", args[0] if args else "?")
        port = kwargs.get("port", args[1] if len(args) > 1 else "?")
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    if kind == "unix":
        return kwargs.get("path", args[0] if args else description)
    return description


_HOST_PORT = re.compile(
    r"\A(?:\[(?P<ipv6>[0-9A-Fa-f:.]+)\]|(?P<host>[^:\[\]\\=]+)):(?P<port>\d+)\Z")


#: The client endpoint types C{clientFromString} knows without plugins.
_BUILT_IN_CLIENT_TYPES = frozenset({"tcp", "ssl", "unix"})


def _client_endpoint_types() -> set[str]:
    """The endpoint types C{clientFromString} knows: its own and its plugins'."""
    from twisted.internet.interfaces import IStreamClientEndpointStringParserWithReactor
    from twisted.plugin import getPlugins

    types = set(_BUILT_IN_CLIENT_TYPES)
    parsers = getPlugins(IStreamClientEndpointStringParserWithReactor)
    types.update(p.prefix.lower() for p in parsers)
    return types


def _names_an_endpoint_type(host_port: re.Match[str]) -> bool:
    """
    Whether C{WORD:DIGITS} is an endpoint string of a plugin's type (e.g.
    C{tls:7000}) rather than a host and port.  Only a bare word can be such
    a prefix: a host name with a dot or an IP address is taken as a host
    without loading the plugins, which costs a start-up a tenth of a second.
    """
    host = host_port.group("host")
    if host is None or "." in host:
        return False
    return host.lower() in _client_endpoint_types()


def client_endpoint(description: str) -> str:
    """
    The client endpoint string for what a user gave as C{--to}:
    C{HOST:PORT} and C{[IPV6]:PORT} stand for C{tcp:HOST:PORT}; anything
    else is taken as an endpoint string, whose port (for C{tcp:}, C{ssl:}
    and C{tls:}) must be a number from 1 to 65535.

    @raise ValueError: with a message for people, naming the problem.
    """
    parts = _split(description)
    kind = parts[0].lower()
    m = _HOST_PORT.match(description)
    if kind not in _BUILT_IN_CLIENT_TYPES and m is not None and not _names_an_endpoint_type(m):
        host = m.group("ipv6") or m.group("host")
        return f"tcp:{host.replace(':', chr(92) + ':')}:{m.group('port')}"
    if kind in ("tcp", "ssl", "tls"):
        args, kwargs = _arguments(parts)
        port = kwargs.get("port", args[1] if len(args) > 1 else None)
        if port is None:
            raise ValueError(f"{description}: no port (give {kind}:HOST:PORT)")
        if not port.isdigit() or not 1 <= int(port) <= 65535:
            raise ValueError(f"{description}: the port must be a number from 1 to 65535, "
                             f"not {port!r}")
    return description

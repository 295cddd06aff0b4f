# -*- test-case-name: tests.test_endpoints,tests.test_tls -*-
"""Questions about Twisted endpoint strings that option parsing needs answered."""

from __future__ import annotations

import ipaddress


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

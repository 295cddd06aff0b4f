# -*- test-case-name: tests.system.test_haproxy_tus -*-
"""
The shipped HAProxy configuration for the tus door in HTTP mode,
C{docs/examples/haproxy-tus.cfg}, adapted to a local test run by
L{render_tus_config}: only addresses, paths, logging and check intervals
change, so the test runs what operators copy.  Used by
C{tests/system/test_haproxy_tus.py}.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from imgresume.testing._haproxy import (
    EXAMPLE_CONFIG,
    FAST_CHECKS,
    adapt_config,
    server_lines,
    set_value,
)

#: The shipped example configuration for tus over HTTPS.
TUS_EXAMPLE_CONFIG = EXAMPLE_CONFIG.replace("haproxy.cfg", "haproxy-tus.cfg")

#: The backend section of the tus example, whose servers the tests replace.
TUS_BACKEND = "imgresume_tus"


def render_tus_config(
    template: str,
    *,
    bind: str,
    crt: str,
    ca_file: str,
    servers: Sequence[tuple[str, str, str]],
    stats_socket: str,
    log: str = "stderr format raw local0 info",
    check_timing: Mapping[str, str] = FAST_CHECKS,
) -> str:
    """
    Adapt the tus example C{template} to a local test run.

    Changed, and nothing else: the global C{log} target and C{stats socket}
    path; the frontend's C{bind} address and its C{crt} (a PEM holding the
    certificate and its key); the backend's C{ca-file} and the check
    intervals named in C{check_timing} on C{default-server}; the C{server}
    lines (replaced by C{servers}: name, address, the name its certificate
    is checked for); the L{SYSTEM_ONLY} global settings are dropped.

    @raise ValueError: the template lacks a directive this function expects
        to change (the example and this function drifted apart).
    """
    def change(section: str, words: list[str], indent: str, line: str,
               seen: set[str]) -> list[str] | None:
        key = words[0]
        if section == "frontend" and key == "bind":
            seen.add("bind")
            return [set_value(f"{indent}bind {bind} {' '.join(words[2:])}", "crt", crt)]
        if section == "backend" and key == "default-server":
            seen.add("default-server")
            line = set_value(line, "ca-file", ca_file)
            for word, value in check_timing.items():
                line = set_value(line, word, value)
            return [line]
        if section == "backend" and key == "server":
            return server_lines(seen, [f"{indent}server {name} {address} verifyhost {host}"
                                       for name, address, host in servers])
        return None

    return adapt_config(template, change, log=log, stats_socket=stats_socket,
                        expected=("bind", "default-server", "server"))

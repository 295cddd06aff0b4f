# -*- test-case-name: tests.system.test_haproxy_tus -*-
"""
The shipped HAProxy configuration for the tus door in HTTP mode,
C{docs/examples/haproxy-tus.cfg}, adapted to a local test run by
L{render_tus_config}: only addresses, paths, logging and check intervals
change, so the test runs what operators copy.  Used by
C{tests/system/test_haproxy_tus.py}.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

from imgresume.testing._haproxy import EXAMPLE_CONFIG, FAST_CHECKS, SYSTEM_ONLY

#: The shipped example configuration for tus over HTTPS.
TUS_EXAMPLE_CONFIG = EXAMPLE_CONFIG.replace("haproxy.cfg", "haproxy-tus.cfg")

#: The backend section of the tus example, whose servers the tests replace.
TUS_BACKEND = "imgresume_tus"


def _set(line: str, word: str, value: str) -> str:
    """C{line} with the value after C{word} replaced; exactly one must be there."""
    line, n = re.subn(rf"(\s{re.escape(word)}\s+)\S+", lambda m: m.group(1) + value, line)
    if n != 1:
        raise ValueError(f"{line.strip()!r} has no single {word!r} setting")
    return line


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
    out: list[str] = []
    seen: set[str] = set()
    section = ""
    for line in template.splitlines():
        words = line.split()
        indent = line[: len(line) - len(line.lstrip())]
        if not words or words[0].startswith("#") or not indent:
            section = words[0] if words and not indent and not words[0].startswith("#") \
                else section
            out.append(line)
            continue
        key = words[0]
        if section == "global" and key in SYSTEM_ONLY:
            seen.add(key)
        elif section == "global" and key == "log":
            seen.add("log")
            out.append(f"{indent}log {log}")
        elif section == "global" and words[:2] == ["stats", "socket"]:
            seen.add("stats socket")
            out.append(f"{indent}stats socket {stats_socket} mode 600 level admin")
        elif section == "frontend" and key == "bind":
            seen.add("bind")
            out.append(_set(f"{indent}bind {bind} {' '.join(words[2:])}", "crt", crt))
        elif section == "backend" and key == "default-server":
            seen.add("default-server")
            line = _set(line, "ca-file", ca_file)
            for word, value in check_timing.items():
                line = _set(line, word, value)
            out.append(line)
        elif section == "backend" and key == "server":
            if "server" not in seen:
                seen.add("server")
                out.extend(f"{indent}server {name} {address} verifyhost {host}"
                           for name, address, host in servers)
        else:
            out.append(line)
    missing = {"log", "stats socket", "bind", "default-server", "server", *SYSTEM_ONLY} - seen
    if missing:
        raise ValueError(f"the template lacks {', '.join(sorted(missing))}")
    return "\n".join(out) + "\n"

# -*- test-case-name: tests.system.test_haproxy -*-
"""
A real C{haproxy} in front of N real C{twistd imgresume} servers that
listen with the PROXY protocol, all child processes over one storage
directory.  The HAProxy configuration is rendered from the shipped example,
C{docs/examples/haproxy.cfg}, by L{render_config}: only addresses, paths,
logging and check intervals change, so the tests run what operators copy.
Used by C{tests/system/test_haproxy.py}.
"""

from __future__ import annotations

import concurrent.futures
import os
import re
import shutil
import signal
import socket
import time
from collections.abc import Callable, Iterable, Mapping, Sequence

from imgresume.testing._cluster import LocalCluster, Node
from imgresume.protocol import Hello, encode

#: The shipped example configuration, the template of every test config.
EXAMPLE_CONFIG = os.path.join(
    os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
    "docs", "examples", "haproxy.cfg",
)

#: The client id of the health check's HELLO.
CHECK_CLIENT_ID = "haproxy-check"

#: The backend section of the example, whose servers the tests replace.
BACKEND = "imgresume_servers"

#: Check intervals for tests: a dead server is DOWN in about 0.3 s.
FAST_CHECKS = {
    "inter": "200ms", "fastinter": "100ms", "downinter": "200ms", "fall": "2", "rise": "2",
}

#: Global settings of the example that only make sense for a system-wide
#: install (a chroot would hide the servers' UNIX sockets; user and group
#: would drop the privileges needed to reach them).
SYSTEM_ONLY = ("chroot", "user", "group")


def check_hello() -> bytes:
    """The HELLO frame the health check sends (see the example's comments)."""
    return encode(Hello(CHECK_CLIENT_ID))


def find_haproxy() -> str | None:
    """The C{haproxy} binary: on C{PATH}, or where Debian installs it."""
    found = shutil.which("haproxy")
    if found is None and os.access("/usr/sbin/haproxy", os.X_OK):
        found = "/usr/sbin/haproxy"
    return found


def set_value(line: str, word: str, value: str) -> str:
    """C{line} with the value after C{word} replaced; exactly one must be there."""
    line, n = re.subn(rf"(\s{re.escape(word)}\s+)\S+", lambda m: m.group(1) + value, line)
    if n != 1:
        raise ValueError(f"{line.strip()!r} has no single {word!r} setting")
    return line


#: Adapts one directive of a section other than C{global}:
#: C{change(section, words, indent, line, seen)} returns the lines to put
#: in its place (adding the names of what it changed to C{seen}), or None
#: to keep it.
Change = Callable[[str, list[str], str, str, set[str]], "list[str] | None"]


def adapt_config(template: str, change: Change, *, log: str, stats_socket: str,
                 expected: Iterable[str] = ()) -> str:
    """
    Copy the HAProxy configuration C{template} with what every test run
    changes: the global C{log} target and C{stats socket} path, the
    L{SYSTEM_ONLY} global settings dropped; every other directive goes
    through C{change}.

    @raise ValueError: C{log}, C{stats socket}, a L{SYSTEM_ONLY} setting
        or a name in C{expected} was not seen (the template and its
        renderer drifted apart).
    """
    out: list[str] = []
    seen: set[str] = set()
    section = ""
    for line in template.splitlines():
        words = line.split()
        indent = line[: len(line) - len(line.lstrip())]
        if not words or words[0].startswith("#") or not indent:
            if words and not words[0].startswith("#"):
                section = words[0]
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
        else:
            new = change(section, words, indent, line, seen)
            out.extend([line] if new is None else new)
    missing = {"log", "stats socket", *SYSTEM_ONLY, *expected} - seen
    if missing:
        raise ValueError(f"the template lacks {', '.join(sorted(missing))}")
    return "\n".join(out) + "\n"


def render_config(
    template: str,
    *,
    bind: str,
    servers: Sequence[tuple[str, str]],
    stats_socket: str,
    log: str = "stderr format raw local0 info",
    check_timing: Mapping[str, str] = FAST_CHECKS,
    hard_stop_after: str | None = None,
) -> str:
    """
    Adapt the example configuration C{template} to a local test run.

    Changed, and nothing else: the global C{log} target, the C{stats socket}
    path, the frontend's C{bind} address, the C{server} lines of the backend
    (replaced by C{servers}, pairs of name and address), the values of the
    check-interval keywords of C{default-server} named in C{check_timing},
    and C{hard-stop-after} if C{hard_stop_after} is given; the
    L{SYSTEM_ONLY} global settings are dropped.

    @raise ValueError: the template lacks a directive this function expects
        to change (the example and this function drifted apart).
    """
    def change(section: str, words: list[str], indent: str, line: str,
               seen: set[str]) -> list[str] | None:
        key = words[0]
        if section == "global" and key == "hard-stop-after":
            seen.add(key)
            return [f"{indent}{key} {hard_stop_after or words[1]}"]
        if section == "frontend" and key == "bind":
            seen.add("bind")
            return [f"{indent}bind {bind}"]
        if section == "backend" and key == "default-server":
            seen.add("default-server")
            for word, value in check_timing.items():
                line = set_value(line, word, value)
            return [line]
        if section == "backend" and key == "server":
            return server_lines(seen, [f"{indent}server {name} {address}"
                                       for name, address in servers])
        return None

    return adapt_config(template, change, log=log, stats_socket=stats_socket, expected=(
        "bind", "default-server", "server", "hard-stop-after"))


def server_lines(seen: set[str], lines: list[str]) -> list[str]:
    """C{lines} in place of the first C{server} line of a backend, nothing for the others."""
    if "server" in seen:
        return []
    seen.add("server")
    return lines


def show_stat(stats_socket: str, timeout: float = 5.0) -> dict[str, dict[str, str]]:
    """
    Ask HAProxy's runtime API for C{show stat}: one row per proxy and
    server, keyed C{"proxy/server"} (e.g. C{"imgresume_servers/node-1"},
    C{"imgresume_servers/BACKEND"}), each a dict of the CSV columns.
    """
    text = runtime_command(stats_socket, "show stat", timeout)
    lines = [line for line in text.splitlines() if line.strip()]
    header = lines[0].lstrip("# ").split(",")
    rows = {}
    for line in lines[1:]:
        row = dict(zip(header, line.split(",")))
        rows[f"{row['pxname']}/{row['svname']}"] = row
    return rows


def runtime_command(stats_socket: str, command: str, timeout: float = 5.0) -> str:
    """Send one command to HAProxy's runtime API and return its answer."""
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(timeout)
        s.connect(stats_socket)
        s.sendall(command.encode() + b"\n")
        chunks = []
        while chunk := s.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks).decode()


class HAProxyCluster(LocalCluster):
    """
    L{LocalCluster} with HAProxy as the balancer.  The servers listen on
    C{haproxy:unix:...} (PROXY protocol on short UNIX socket paths); HAProxy
    runs in master-worker mode in the foreground, logging to stderr, which
    is captured in C{logs/lb.log.stderr}.

    @ivar config: the path of the rendered HAProxy configuration.
    @ivar stats_socket: the path of HAProxy's runtime API socket.
    """

    def __init__(
        self,
        directory: str,
        haproxy: str,
        servers: int = 3,
        *,
        template: str | None = None,
        plain: Sequence[str] = (),
        server_args: Sequence[str] = (),
        check_timing: Mapping[str, str] = FAST_CHECKS,
        hard_stop_after: str | None = None,
    ) -> None:
        """
        @param haproxy: the path of the C{haproxy} binary.
        @param template: the configuration to adapt (default: the example).
        @param plain: names of servers that listen I{without} the PROXY
            protocol, a misconfiguration the health check must catch.
        """
        super().__init__(directory, servers=servers, server_args=server_args)
        for name, node in self.servers.items():
            i = node.argv.index("--listen") + 1
            if name not in plain:
                node.argv[i] = f"haproxy:{node.argv[i]}"
        if template is None:
            with open(EXAMPLE_CONFIG) as f:
                template = f.read()
        self.stats_socket = os.path.join(self.sockets, "admin.sock")
        port = self.lb.address[1]
        self.config = os.path.join(self.directory, "haproxy.cfg")
        with open(self.config, "w") as f:
            f.write(render_config(
                template,
                bind=f"127.0.0.1:{port}",
                servers=[(name, node.address) for name, node in self.servers.items()],
                stats_socket=self.stats_socket,
                check_timing=check_timing,
                hard_stop_after=hard_stop_after,
            ))
        self.lb = Node("lb", [haproxy, "-W", "-db", "-f", self.config],
                       ("127.0.0.1", port), self._log("lb"))

    @property
    def haproxy_log(self) -> str:
        """Everything HAProxy wrote to stderr so far (its log and warnings)."""
        with open(self.lb.log + ".stderr", errors="replace") as f:
            return f.read()

    def server_log(self, name: str) -> str:
        """The log file of one server."""
        with open(self.servers[name].log, errors="replace") as f:
            return f.read()

    def start(self) -> HAProxyCluster:
        """Start the servers (in parallel), then HAProxy; wait until all are UP."""
        with concurrent.futures.ThreadPoolExecutor(len(self.servers)) as pool:
            for future in [pool.submit(self.start_node, n) for n in self.servers.values()]:
                future.result()
        self.start_node(self.lb)
        return self

    def restart(self, name: str) -> None:
        """Start a server again (after L{kill})."""
        self.start_node(self.servers[name])

    def reload(self) -> None:
        """Reload HAProxy as C{systemctl reload} does (SIGUSR2 to the master)."""
        self.lb.proc.send_signal(signal.SIGUSR2)

    def status(self) -> dict[str, dict[str, str]]:
        """C{show stat} rows of the backend's servers, keyed by server name."""
        prefix = f"{BACKEND}/"
        return {key[len(prefix):]: row for key, row in show_stat(self.stats_socket).items()
                if key.startswith(prefix)}

    def wait_for_status(self, wanted: Mapping[str, str], timeout: float = 10.0) -> None:
        """
        Block until every server named in C{wanted} has that C{status}
        (C{"UP"}, C{"DOWN"}, ...) in HAProxy's runtime API.

        @raise TimeoutError: with the last statuses seen.
        """
        deadline = time.monotonic() + timeout
        while True:
            try:
                rows = self.status()
            except OSError:  # not listening yet, or a reload in progress
                rows = {}
            seen = {name: rows.get(name, {}).get("status") for name in wanted}
            if seen == dict(wanted):
                return
            if time.monotonic() > deadline:
                checks = {n: rows.get(n, {}).get("check_status") for n in wanted}
                raise TimeoutError(f"wanted {dict(wanted)}, HAProxy says {seen} "
                                   f"(last checks {checks})")
            time.sleep(0.05)

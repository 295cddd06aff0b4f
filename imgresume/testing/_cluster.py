# -*- test-case-name: tests.system.test_failover,tests.system.test_tls_cluster -*-
"""
A local cluster of real processes: N C{twistd imgresume} servers over one
storage directory and one C{twistd imgresume-lb} in front of them.  Used by
C{make demo} and by the failover tests.

Servers listen on UNIX sockets in a short-named temporary directory (no
port races; socket paths are limited to about 100 bytes), or on free TCP
ports of 127.0.0.1 through any server endpoint string C{server_listen}
makes (C{ssl:}, C{mtls:}...); the balancer listens on a free TCP port on
127.0.0.1.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from typing import Callable, Iterable, Sequence

import attrs


def free_tcp_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_processes(procs: Iterable[subprocess.Popen | None], timeout: float = 10.0) -> None:
    """
    SIGTERM every process of C{procs} still running, then wait for each;
    SIGKILL one still there after C{timeout} seconds.
    """
    procs = [proc for proc in procs if proc is not None]
    for proc in procs:
        if proc.poll() is None:
            proc.terminate()
    for proc in procs:
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def wait_until_connectable(address: str | tuple[str, int], timeout: float = 15.0,
                           proc: subprocess.Popen | None = None) -> None:
    """Block until a UNIX path or (host, port) accepts connections."""
    deadline = time.monotonic() + timeout
    family = socket.AF_UNIX if isinstance(address, str) else socket.AF_INET
    while True:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before listening")
        try:
            with socket.socket(family) as s:
                s.connect(address)
                return
        except OSError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"nothing listening on {address} after {timeout} s")
            time.sleep(0.05)


@attrs.define
class Node:
    """One process of the cluster."""

    name: str
    argv: list[str]
    address: str | tuple[str, int]
    log: str
    proc: subprocess.Popen | None = None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


def twistd_argv(*args: str) -> list[str]:
    """Run twistd with this interpreter, in the foreground, without a pid file."""
    return [sys.executable, "-c", "from twisted.scripts.twistd import run; run()",
            "-n", "--pidfile=", *args]


class LocalCluster:
    """
    Start, kill and stop a balancer and servers as child processes.

    @ivar lb_endpoint: the client endpoint string of the balancer.
    """

    def __init__(self, directory: str, servers: int = 3,
                 storage: str | Sequence[str] | None = None,
                 server_args: Sequence[str] = (), lb_args: Sequence[str] = (),
                 server_listen: Callable[[int], str] | None = None) -> None:
        """
        @param storage: one directory shared by every server, or one per
            server (e.g. one mount of a distributed filesystem each, as if
            every server ran on its own host).
        @param server_listen: given a free TCP port on 127.0.0.1, the server
            endpoint string a server listens on there (e.g. C{lambda port:
            f"mtls:{port}:interface=127.0.0.1:..."}); the balancer relays to
            it as C{tcp:127.0.0.1:PORT}.  By default servers listen on UNIX
            sockets.
        """
        self.directory = os.path.abspath(directory)
        if storage is None:
            storage = os.path.join(self.directory, "storage")
        mounts = [storage] * servers if isinstance(storage, str) else list(storage)
        if len(mounts) != servers:
            raise ValueError(f"{servers} servers but {len(mounts)} storage directories")
        for path in mounts:
            if "://" not in path:  # an object store (s3://...) needs no directory
                os.makedirs(path, exist_ok=True)
        #: The storage directory as the first server sees it.
        self.storage = mounts[0]
        os.makedirs(os.path.join(self.directory, "logs"), exist_ok=True)
        self.sockets = tempfile.mkdtemp(prefix="imgr-")
        self.servers: dict[str, Node] = {}
        for i, mount in enumerate(mounts, 1):
            name = f"node-{i}"
            address: str | tuple[str, int]
            if server_listen is None:
                address = os.path.join(self.sockets, f"{name}.sock")
                listen = f"unix:{address}"
            else:
                address = ("127.0.0.1", free_tcp_port())
                listen = server_listen(address[1])
            self.servers[name] = Node(
                name,
                twistd_argv(
                    "--logfile", self._log(name), "imgresume", "--listen", listen,
                    "--storage", mount, "--server-id", name, *server_args,
                ),
                address,
                self._log(name),
            )
        port = free_tcp_port()
        backends = [
            a for n in self.servers.values()
            for a in ("--backend", f"unix:{n.address}" if isinstance(n.address, str)
                      else f"tcp:{n.address[0]}:{n.address[1]}")
        ]
        self.lb = Node(
            "lb",
            twistd_argv("--logfile", self._log("lb"), "imgresume-lb",
                        "--listen", f"tcp:{port}:interface=127.0.0.1", *backends, *lb_args),
            ("127.0.0.1", port),
            self._log("lb"),
        )
        self.lb_endpoint = f"tcp:127.0.0.1:{port}"
        #: The balancer's TCP port on 127.0.0.1.
        self.lb_port = port

    def _log(self, name: str) -> str:
        return os.path.join(self.directory, "logs", f"{name}.log")

    def _env(self) -> dict[str, str]:
        env = dict(os.environ)
        # The checkout holding imgresume/ (not imgresume/ itself, whose
        # subpackages, such as http, would shadow the standard library's).
        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
        return env

    def _spawn(self, node: Node) -> None:
        if isinstance(node.address, str) and os.path.exists(node.address):
            os.unlink(node.address)  # a stale socket left by a SIGKILL
        with open(node.log + ".stderr", "ab") as stderr:
            node.proc = subprocess.Popen(
                node.argv, env=self._env(), stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL, stderr=stderr,
            )

    def start_node(self, node: Node) -> None:
        """Start (or restart) one process and wait until it listens."""
        self._spawn(node)
        self._wait_listening(node)

    def _wait_listening(self, node: Node) -> None:
        """
        Wait until C{node} listens; if it exits or never listens, raise with
        the end of its standard error and log, so that a failed start says
        why.
        """
        try:
            wait_until_connectable(node.address, proc=node.proc)
        except (RuntimeError, TimeoutError) as e:
            raise type(e)(f"{node.name}: {e}\n{self._tails(node)}") from None

    @staticmethod
    def _tails(node: Node, lines: int = 30) -> str:
        parts = []
        for path in (node.log + ".stderr", node.log):
            try:
                with open(path, errors="replace") as f:
                    tail = f.readlines()[-lines:]
            except OSError as e:
                tail = [f"(cannot read: {e})\n"]
            parts.append(f"--- last lines of {path}:\n" + "".join(tail))
        return "".join(parts)

    def start(self) -> "LocalCluster":
        """
        Start every server (all at once, then wait until each listens), then
        the balancer.  If one fails to start, every process started is
        stopped again before the error is raised.
        """
        try:
            for node in self.servers.values():
                self._spawn(node)
            for node in self.servers.values():
                self._wait_listening(node)
            self.start_node(self.lb)
        except BaseException:
            self.stop()
            raise
        return self

    def kill(self, name: str) -> None:
        """SIGKILL one process (a server name, or "lb") and reap it."""
        node = self.lb if name == "lb" else self.servers[name]
        if node.proc is not None and node.proc.poll() is None:
            node.proc.send_signal(signal.SIGKILL)
            node.proc.wait()

    def stop(self) -> None:
        """Terminate every process still running (SIGTERM, then SIGKILL)."""
        stop_processes(node.proc for node in [self.lb, *self.servers.values()])
        shutil.rmtree(self.sockets, ignore_errors=True)

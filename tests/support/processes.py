"""
Real processes for tests: the repository's root and an environment that
imports this checkout, a Python child run to completion without blocking the
reactor (L{run_python}) or watched and signalled while it runs
(L{PythonChild}, L{wait_until}), and a real C{twistd imgresume} child on a
UNIX socket, for one test (L{TwistdServer}; L{incoming_bytes} of its
storage) or for all the tests of a class (L{SharedTwistdServer}).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase

#: The checkout the tests run from (the directory holding C{imgresume/}).
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def child_env(**extra: str) -> dict[str, str]:
    """This process's environment, with the repository first on PYTHONPATH."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [REPO_ROOT, env.get("PYTHONPATH")]))
    env.update(extra)
    return env


class _Collect(ProcessProtocol):
    """Collects a child's stdout and stderr; C{ended} fires with its exit code."""

    def __init__(self) -> None:
        self.out = bytearray()
        self.err = bytearray()
        self.ended: Deferred[int | None] = Deferred()

    def outReceived(self, data: bytes) -> None:
        self.out += data

    def errReceived(self, data: bytes) -> None:
        self.err += data

    def processEnded(self, reason: Any) -> None:
        self.ended.callback(getattr(reason.value, "exitCode", None))


async def run_python(
    args: list[str], env: dict[str, str], timeout: float = 30.0
) -> tuple[str, str, int | None]:
    """
    Run C{python ARGS} to completion without blocking the reactor; kill it
    after C{timeout} seconds.

    @return: its stdout, stderr and exit code.
    """
    proto = _Collect()
    transport = reactor.spawnProcess(
        proto, sys.executable, [sys.executable, *args], env=env, path=REPO_ROOT
    )

    def kill() -> None:
        proto.err += f"\n[killed after {timeout:g} s]".encode()
        transport.signalProcess("KILL")

    timer = reactor.callLater(timeout, kill)
    try:
        code = await proto.ended
    finally:
        if timer.active():
            timer.cancel()
    return proto.out.decode(), proto.err.decode(), code


class TwistdServer:
    """
    A real C{twistd -n imgresume} child process listening on a UNIX socket,
    over a storage directory.  Start with L{start}; L{stop} sends SIGTERM.
    """

    def __init__(self, test: TestCase, *options: str) -> None:
        # Short path: UNIX socket paths are limited to about 100 bytes.
        self.socket_dir = tempfile.mkdtemp(prefix="imgr-")
        test.addCleanup(shutil.rmtree, self.socket_dir, True)
        self.socket = os.path.join(self.socket_dir, "s.sock")
        self.endpoint = f"unix:{self.socket}"
        self.storage = os.path.abspath(test.mktemp())
        os.makedirs(self.storage)
        self.options = list(options)
        self.proto = _Collect()
        self.transport: Any = None
        test.addCleanup(self.stop)

    async def start(self, timeout: float = 15.0) -> "TwistdServer":
        """Spawn the server and wait until its socket accepts connections."""
        self.transport = reactor.spawnProcess(
            self.proto, sys.executable,
            [sys.executable, "-c", "from twisted.scripts.twistd import run; run()",
             "-n", "--pidfile=", "imgresume", "--listen", self.endpoint,
             "--storage", self.storage, "--server-id", "twistd-node", *self.options],
            env=child_env(), path=self.storage,
        )
        for _ in range(int(timeout / 0.05)):
            if self.proto.ended.called:
                raise AssertionError(f"twistd exited early:\n{self.log()}")
            if self._accepts():
                return self
            await deferLater(reactor, 0.05, lambda: None)
        raise AssertionError(f"twistd did not listen within {timeout:g} s:\n{self.log()}")

    def _accepts(self) -> bool:
        with socket.socket(socket.AF_UNIX) as s:
            try:
                s.connect(self.socket)
            except OSError:
                return False
        return True

    def log(self) -> str:
        """Everything the server wrote so far."""
        return (self.proto.out + self.proto.err).decode(errors="replace")

    def stop(self) -> Deferred[Any]:
        """SIGTERM the server (if running); fires when it has exited."""
        if self.transport is not None and not self.proto.ended.called:
            self.transport.signalProcess("TERM")
        return self.proto.ended

    def stored(self, path: str) -> bytes:
        """The bytes of a completed file (a C{path} from an upload result)."""
        with open(os.path.join(self.storage, path), "rb") as f:
            return f.read()


class SharedTwistdServer:
    """
    A real C{twistd -n imgresume} child on a UNIX socket for all the tests
    of one class, where they do not disturb each other (each its own
    connections and upload names): one start instead of one a test.

    Started by the first test that calls L{start}, as a C{subprocess} child
    (not the reactor's, so Trial's janitor leaves it running between
    tests); stopped by L{stop}, which the class's C{tearDownClass} calls
    (pytest and unittest run it; Trial does not, and the child ends with
    the run: L{start} registers L{stop} with C{atexit}).
    """

    def __init__(self, *options: str) -> None:
        self.options = list(options)
        self.proc: subprocess.Popen | None = None
        self.socket = ""
        self.socket_dir = ""

    def start(self, timeout: float = 15.0) -> "SharedTwistdServer":
        """The running server, started (blocking until it listens) if it is not."""
        if self.proc is not None and self.proc.poll() is None:
            return self
        import atexit

        from imgresume.testing import wait_until_connectable

        self.stop()
        self.socket_dir = tempfile.mkdtemp(prefix="imgr-")
        self.socket = os.path.join(self.socket_dir, "s.sock")
        storage = os.path.join(self.socket_dir, "storage")
        os.makedirs(storage)
        self.proc = subprocess.Popen(
            [sys.executable, "-c", "from twisted.scripts.twistd import run; run()",
             "-n", "--pidfile=", "--logfile", os.path.join(self.socket_dir, "twistd.log"),
             "imgresume", "--listen", f"unix:{self.socket}", "--storage", storage,
             "--server-id", "twistd-node", *self.options],
            env=child_env(), cwd=storage, stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        atexit.register(self.stop)
        try:
            wait_until_connectable(self.socket, timeout=timeout, proc=self.proc)
        except (RuntimeError, TimeoutError) as e:
            raise AssertionError(f"twistd did not listen: {e}\n{self.log()}") from None
        return self

    def log(self) -> str:
        """The server's log so far."""
        try:
            with open(os.path.join(self.socket_dir, "twistd.log"), errors="replace") as f:
                return f.read()
        except OSError as e:
            return f"(no log: {e})"

    def stop(self) -> None:
        """SIGTERM the server (if running), wait for it, remove its files."""
        from imgresume.testing import stop_processes

        stop_processes([self.proc])
        self.proc = None
        if self.socket_dir:
            shutil.rmtree(self.socket_dir, ignore_errors=True)
            self.socket_dir = ""


class PythonChild:
    """
    A Python child process a test watches and signals while it runs (where
    L{run_python} only waits for the end): its output so far, L{signal},
    and L{ended}.  With C{use_pty}, its stdin, stdout and stderr are one
    terminal (everything it writes is in L{out}).
    """

    def __init__(self, args: list[str], env: dict[str, str], *, use_pty: bool = False) -> None:
        self.proto = _Collect()
        self.transport = reactor.spawnProcess(
            self.proto, sys.executable, [sys.executable, *args], env=env, path=REPO_ROOT,
            usePTY=use_pty)

    @property
    def out(self) -> str:
        """What the child wrote on stdout so far."""
        return self.proto.out.decode(errors="replace")

    @property
    def err(self) -> str:
        """What the child wrote on stderr so far."""
        return self.proto.err.decode(errors="replace")

    def signal(self, name: str) -> None:
        """Send the signal C{name} ("INT", "TERM", "KILL")."""
        self.transport.signalProcess(name)

    async def ended(self, timeout: float = 60.0) -> int | None:
        """Its exit code (None if a signal killed it), SIGKILLing it after C{timeout}."""
        def kill() -> None:
            self.proto.err += f"\n[killed after {timeout:g} s]".encode()
            self.transport.signalProcess("KILL")

        timer = reactor.callLater(timeout, kill)
        try:
            return await self.proto.ended
        finally:
            if timer.active():
                timer.cancel()


async def wait_until(condition: Any, timeout: float = 30.0, what: str = "a condition") -> None:
    """Poll C{condition()} every 20 ms until it is true; fail after C{timeout} s."""
    for _ in range(int(timeout / 0.02)):
        if condition():
            return
        await deferLater(reactor, 0.02, lambda: None)
    raise AssertionError(f"{what} did not happen within {timeout:g} s")


def incoming_bytes(storage: str) -> int:
    """Bytes the unfinished uploads of a filesystem storage hold (their data files)."""
    total = 0
    incoming = os.path.join(storage, "incoming")
    for upload_id in os.listdir(incoming) if os.path.isdir(incoming) else []:
        try:
            total += os.path.getsize(os.path.join(incoming, upload_id, "data"))
        except OSError:
            pass
    return total

# -*- test-case-name: tests.cli.test_startup -*-
"""
What the C{imgresume} command imports as it starts, in a fresh process
(L{imgresume.cli}'s commands are imported only when they run): an upload
to a plain C{tcp:} endpoint imports no server, storage, balancer, key-file
or TLS code; C{--help} and a run with nothing to send import neither the
reactor nor the client's network code.
"""

from __future__ import annotations

import json
import os
import pty
import select
import subprocess
import sys

from twisted.trial.unittest import SynchronousTestCase

from tests.support.processes import REPO_ROOT, child_env

#: Run the command, and write the names of the modules it imported (JSON)
#: to the file named by $IMGRESUME_TEST_MODULES as the process exits.
PROBE = """
import atexit, json, os, sys

def dump():
    names = sorted(m for m, module in sys.modules.items() if module is not None)
    with open(os.environ["IMGRESUME_TEST_MODULES"], "w") as f:
        json.dump(names, f)

atexit.register(dump)
from imgresume.cli import main
main()
"""

#: What a plain tcp: upload must not import: the server side, the storage,
#: the balancer, key files (no --key-file), metrics, TLS, the plugins
#: (no scan of twisted.plugins for an endpoint type), and rich (stderr is
#: not a terminal here: no live display).
NOT_FOR_A_TCP_UPLOAD = (
    "imgresume.server", "imgresume.storage", "imgresume.balancer", "imgresume.tls",
    "imgresume.keys", "imgresume.metrics", "imgresume.logs", "imgresume.testing",
    "imgresume.demo", "OpenSSL", "cryptography", "service_identity",
    "twisted.internet.ssl", "twisted.internet._sslverify", "twisted.protocols.tls",
    "twisted.application", "twisted.plugins", "automat", "rich", "imgresume.cli._live",
)


def imported(names: list[str], prefixes: tuple[str, ...]) -> list[str]:
    """The C{names} that are one of C{prefixes} or inside one."""
    return [n for n in names if any(n == p or n.startswith(p + ".") for p in prefixes)]


class StartupImportTests(SynchronousTestCase):
    """The modules C{imgresume} imports for a command, in a child process."""

    def setUp(self) -> None:
        self.work = os.path.abspath(self.mktemp())
        os.makedirs(self.work)

    def command(self, *args: str, stderr: int | None = None,
                ) -> tuple[list[str], subprocess.CompletedProcess[str]]:
        """
        Run C{imgresume ARGS}: the modules it imported, and the process
        (its stderr to the file descriptor C{stderr} if given).
        """
        listing = os.path.join(self.work, "modules.json")
        env = child_env(IMGRESUME_TEST_MODULES=listing, XDG_STATE_HOME=self.work)
        done = subprocess.run([sys.executable, "-c", PROBE, *args], env=env, cwd=REPO_ROOT,
                              stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE if stderr is None else stderr,
                              text=True, timeout=120)
        with open(listing, encoding="utf-8") as f:
            return json.load(f), done

    def on_a_terminal(self, *args: str) -> tuple[list[str], str]:
        """Run C{imgresume ARGS} with stderr a pseudo-terminal: the modules, stderr."""
        controller, terminal = pty.openpty()
        self.addCleanup(os.close, controller)
        try:
            names, _ = self.command(*args, stderr=terminal)
        finally:
            os.close(terminal)
        seen = b""
        while select.select([controller], [], [], 0)[0]:
            try:
                block = os.read(controller, 65536)
            except OSError:
                break
            if not block:
                break
            seen += block
        return names, seen.decode("utf-8", "replace")

    def a_file(self) -> str:
        """A small file to upload."""
        path = os.path.join(self.work, "scan.tif")
        with open(path, "wb") as f:
            f.write(b"x" * 1000)
        return path

    def test_tcp_upload(self) -> None:
        """
        An upload to a tcp: endpoint (here refused: port 1) runs the client
        on the reactor, and imports no server, storage, key-file or TLS code.
        """
        names, done = self.command("upload", "--max-attempts", "1",
                                   "--to", "tcp:127.0.0.1:1", self.a_file())
        self.assertEqual(done.returncode, 1, done.stderr)
        self.assertIn("connection refused", done.stderr)
        for needed in ("twisted.internet.reactor", "imgresume.client._uploader",
                       "imgresume.client._journal"):
            self.assertIn(needed, names)
        self.assertEqual(imported(names, NOT_FOR_A_TCP_UPLOAD), [])

    def test_json_upload(self) -> None:
        """C{--json}: no live display, no rich, and the JSON row on stdout."""
        names, done = self.command("upload", "--json", "--no-journal", "--max-attempts", "1",
                                   "--to", "tcp:127.0.0.1:1", self.a_file())
        self.assertEqual(done.returncode, 1, done.stderr)
        self.assertEqual(json.loads(done.stdout.splitlines()[0])["status"], "failed")
        self.assertEqual(imported(names, NOT_FOR_A_TCP_UPLOAD), [])

    def test_terminal_upload_draws_with_rich(self) -> None:
        """
        With stderr a terminal the live display is drawn, with rich; with
        C{--json} it is not, and rich is not imported.
        """
        args = ("upload", "--no-journal", "--max-attempts", "1", "--to", "tcp:127.0.0.1:1",
                self.a_file())
        names, seen = self.on_a_terminal(*args)
        self.assertIn("rich.progress", names)
        self.assertIn("connection refused", seen)
        names, seen = self.on_a_terminal("upload", "--json", *args[1:])
        self.assertEqual(imported(names, ("rich", "imgresume.cli._live")), [])
        self.assertIn("connection refused", seen)

    def test_host_port_upload(self) -> None:
        """C{--to HOST:PORT} with an IP address is TCP too: no plugin scan, no TLS."""
        names, done = self.command("upload", "--no-journal", "--max-attempts", "1",
                                   "--to", "127.0.0.1:1", self.a_file())
        self.assertIn("connection refused", done.stderr)
        self.assertEqual(imported(names, NOT_FOR_A_TCP_UPLOAD), [])

    def test_ssl_upload_has_tls(self) -> None:
        """An ssl: endpoint gets TLS: pyOpenSSL is imported as usual."""
        names, done = self.command("upload", "--no-journal", "--max-attempts", "1",
                                   "--to", "ssl:127.0.0.1:1", self.a_file())
        self.assertIn("connection refused", done.stderr)
        self.assertIn("OpenSSL.SSL", names)
        self.assertEqual(imported(names, ("imgresume.server", "imgresume.storage")), [])

    def test_help(self) -> None:
        """C{imgresume --help} imports no command, no reactor, no client."""
        names, done = self.command("--help")
        self.assertEqual(done.returncode, 0, done.stderr)
        self.assertIn("upload", done.stdout)
        self.assertEqual(imported(names, (
            "twisted.internet.reactor", "twisted.internet.defer", "imgresume.client",
            "imgresume.cli._upload", "imgresume.cli._status", "imgresume.cli._storage",
            "imgresume.cli._keys", *NOT_FOR_A_TCP_UPLOAD)), [])

    def test_nothing_to_upload(self) -> None:
        """
        An upload of an empty directory ends before the reactor or the
        client's network code is imported.
        """
        empty = os.path.join(self.work, "empty")
        os.makedirs(empty)
        names, done = self.command("upload", "--to", "tcp:127.0.0.1:1", empty)
        self.assertEqual(done.returncode, 0, done.stderr)
        self.assertIn("no files to upload", done.stderr)
        self.assertIn("imgresume.client._collect", names)
        self.assertEqual(imported(names, (
            "twisted.internet.reactor", "twisted.internet.endpoints", "imgresume.protocol",
            "imgresume.client._uploader", "imgresume.client._session",
            *NOT_FOR_A_TCP_UPLOAD)), [])

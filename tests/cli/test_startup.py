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
#: the balancer, key files (no --key-file), metrics, TLS, and the plugins
#: (no scan of twisted.plugins for an endpoint type).
NOT_FOR_A_TCP_UPLOAD = (
    "imgresume.server", "imgresume.storage", "imgresume.balancer", "imgresume.tls",
    "imgresume.keys", "imgresume.metrics", "imgresume.logs", "imgresume.testing",
    "imgresume.demo", "OpenSSL", "cryptography", "service_identity",
    "twisted.internet.ssl", "twisted.internet._sslverify", "twisted.protocols.tls",
    "twisted.application", "twisted.plugins", "automat",
)


def imported(names: list[str], prefixes: tuple[str, ...]) -> list[str]:
    """The C{names} that are one of C{prefixes} or inside one."""
    return [n for n in names if any(n == p or n.startswith(p + ".") for p in prefixes)]


class StartupImportTests(SynchronousTestCase):
    """The modules C{imgresume} imports for a command, in a child process."""

    def setUp(self) -> None:
        self.work = os.path.abspath(self.mktemp())
        os.makedirs(self.work)

    def command(self, *args: str) -> tuple[list[str], subprocess.CompletedProcess[str]]:
        """Run C{imgresume ARGS}: the modules it imported, and the process."""
        listing = os.path.join(self.work, "modules.json")
        env = child_env(IMGRESUME_TEST_MODULES=listing, XDG_STATE_HOME=self.work)
        done = subprocess.run([sys.executable, "-c", PROBE, *args], env=env, cwd=REPO_ROOT,
                              capture_output=True, text=True, timeout=120)
        with open(listing, encoding="utf-8") as f:
            return json.load(f), done

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

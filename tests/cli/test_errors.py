# -*- test-case-name: tests.cli.test_errors -*-
"""
Errors that say what is wrong (issue 12, item 4, the client's side), on
real processes where they are about processes: the real C{python -m
imgresume upload} against a real C{twistd imgresume} (through a TCP relay
in this process where a TCP address is needed).

  - L{RetryStateTests}: a closed port shows every retry as it is planned,
    in plain mode and on a terminal; a DNS failure says so;
  - L{EndpointTests}: C{HOST:PORT} and C{[::1]:PORT} work, a port that is
    not a number is a usage error;
  - L{FileSelectionTests}: a missing file says "no such file" while the
    others are sent; hidden files are skipped, C{--include}/C{--exclude}
    choose; C{--dry-run} (C{-n}) lists without connecting;
  - L{DiskFullTests}: the summary of a file that failed on a full disk
    counts what was sent and what the server holds;
  - L{HelpTests}: C{imgresume keys add --help}'s usage line, and the
    examples of C{twistd imgresume-lb --help} and C{imgresume upload
    --help} parse with the real option parsers.
"""

from __future__ import annotations

import json
import os
import random
import re
import shlex
import socket
import subprocess
import sys

from blake3 import blake3
from twisted.internet import reactor
from twisted.internet.defer import maybeDeferred
from twisted.python import usage
from twisted.trial.unittest import SkipTest, SynchronousTestCase, TestCase

from imgresume.testing import free_tcp_port
from tests.support.processes import PythonChild, TwistdServer, child_env, run_python
from tests.support.relay import FreezingRelay

MiB = 1024 * 1024


class CommandTestCase(TestCase):
    """Runs C{python -m imgresume ...} with its own state directory and files."""

    timeout = 90

    def setUp(self) -> None:
        self.work = os.path.abspath(self.mktemp())
        os.makedirs(self.work)
        self.env = child_env(XDG_STATE_HOME=os.path.join(self.work, "state"))

    def make_file(self, name: str, size: int = 1000, seed: int = 0) -> tuple[str, bytes]:
        """A file of C{size} reproducible bytes below the test's directory."""
        path = os.path.join(self.work, *name.split("/"))
        os.makedirs(os.path.dirname(path), exist_ok=True)
        content = random.Random(seed).randbytes(size)
        with open(path, "wb") as f:
            f.write(content)
        return path, content

    def imgresume(self, *args: str, timeout: float = 60.0) -> object:
        """Run the command; the Deferred fires with (stdout, stderr, exit code)."""
        return run_python(["-m", "imgresume", *args], self.env, timeout=timeout)

    def relay_to(self, server: TwistdServer, interface: str = "127.0.0.1") -> int:
        """A TCP port on C{interface} that relays to C{server}; closed at cleanup."""
        port = reactor.listenTCP(0, FreezingRelay(reactor, server.endpoint), interface=interface)
        self.addCleanup(lambda: maybeDeferred(port.stopListening))
        return port.getHost().port


class RetryStateTests(CommandTestCase):
    """What the command shows while it cannot reach the servers."""

    async def test_closed_port_plain(self) -> None:
        """
        Nothing listens: each retry is reported on stderr as it is planned
        ("connection refused by HOST:PORT, retry 1/2 in ... s"), then the
        file fails naming the refusal; exit 1.  (Before, nothing was shown
        until the end.)
        """
        path, _ = self.make_file("one.tif")
        port = free_tcp_port()
        out, err, code = await self.imgresume(
            "upload", "--to", f"127.0.0.1:{port}", "--max-attempts", "3",
            "--backoff-max", "0.2s", path)
        self.assertEqual(code, 1, err)
        where = f"127.0.0.1:{port}"
        self.assertRegex(err, rf"imgresume: one\.tif: connection refused by {re.escape(where)}, "
                              r"retry 1/2 in \d+\.\d s\n")
        self.assertRegex(err, rf"imgresume: one\.tif: connection refused by {re.escape(where)}, "
                              r"retry 2/2 in \d+\.\d s\n")
        self.assertIn(f"gave up after 3 attempts without progress (last: connection refused "
                      f"by {where})", err)

    async def test_closed_port_terminal(self) -> None:
        """On a terminal, the live display shows the retry state in the file's line."""
        path, _ = self.make_file("one.tif")
        port = free_tcp_port()
        child = PythonChild(
            ["-m", "imgresume", "upload", "--to", f"tcp:127.0.0.1:{port}", "--max-attempts", "3",
             "--backoff-max", "0.2s", path], self.env, use_pty=True)
        code = await child.ended()
        self.assertEqual(code, 1, child.out)
        self.assertRegex(child.out, rf"one\.tif: connection refused by 127\.0\.0\.1:{port}, "
                                    r"retry 1/2 in \d+\.\d s")
        self.assertIn("one.tif FAILED: gave up after 3 attempts", child.out)

    async def test_dns_failure(self) -> None:
        """
        A host name that does not resolve is reported as a DNS failure,
        retries included, not as "cannot read the local file".
        """
        path, _ = self.make_file("one.tif")
        out, err, code = await self.imgresume(
            "upload", "--to", "tcp:no-such-host.invalid:7000", "--max-attempts", "2",
            "--backoff-max", "0.1s", path)
        self.assertEqual(code, 1, err)
        self.assertIn("one.tif: DNS lookup failed for no-such-host.invalid:7000, retry 1/1", err)
        self.assertIn("(last: DNS lookup failed for no-such-host.invalid:7000)", err)
        self.assertNotIn("local file", err)


class EndpointTests(CommandTestCase):
    """What C{--to} accepts."""

    async def test_host_port(self) -> None:
        """C{--to 127.0.0.1:PORT} (no C{tcp:}) is C{tcp:127.0.0.1:PORT}: the upload works."""
        server = await TwistdServer(self).start()
        port = self.relay_to(server)
        path, content = self.make_file("one.tif", 70_000)
        out, err, code = await self.imgresume("upload", "--to", f"127.0.0.1:{port}", "--json",
                                              path)
        self.assertEqual(code, 0, err)
        self.assertEqual(server.stored(json.loads(out)["path"]), content)

    async def test_ipv6_host_port(self) -> None:
        """C{--to [::1]:PORT} is TCP to the IPv6 loopback address."""
        try:
            socket.socket(socket.AF_INET6).close()
            port = self.relay_to(await TwistdServer(self).start(), interface="::1")
        except OSError as e:
            raise SkipTest(f"no IPv6 loopback here: {e}")
        path, content = self.make_file("six.tif", 70_000)
        out, err, code = await self.imgresume("upload", "--to", f"[::1]:{port}", "--json", path)
        self.assertEqual(code, 0, err)
        self.assertEqual(json.loads(out)["digest"]["hex"], blake3(content).hexdigest())

    async def test_port_not_a_number(self) -> None:
        """C{tcp:host:notaport} is a usage error that says so, not an C{int()} traceback."""
        path, _ = self.make_file("one.tif")
        out, err, code = await self.imgresume("upload", "--to", "tcp:host:notaport", path)
        self.assertEqual(code, 2, err)
        self.assertIn("imgresume: --to tcp:host:notaport: the port must be a number from 1 "
                      "to 65535, not 'notaport'", err)
        self.assertNotIn("int()", err)
        self.assertNotIn("Traceback", err)


class FileSelectionTests(CommandTestCase):
    """Which files go, and what is said about the others."""

    async def test_missing_file_others_sent(self) -> None:
        """
        A PATH that does not exist is refused with "no such file"; the files
        beside it are stored; the command exits 1 at the end, without the
        usage text.
        """
        server = await TwistdServer(self).start()
        a, content_a = self.make_file("a.tif", 5000, 1)
        b, content_b = self.make_file("b.tif", 6000, 2)
        missing = os.path.join(self.work, "nope.tif")
        out, err, code = await self.imgresume("upload", "--to", server.endpoint, "--json",
                                              a, missing, b)
        self.assertEqual(code, 1, err)
        self.assertIn(f"imgresume: refused: {missing}: no such file or directory", err)
        self.assertNotIn("Options:", err)
        rows = {r["local"]: r for r in map(json.loads, out.splitlines())}
        self.assertEqual(server.stored(rows[a]["path"]), content_a)
        self.assertEqual(server.stored(rows[b]["path"]), content_b)
        self.assertEqual((rows[missing]["status"], rows[missing]["refused"]), ("refused", True))

    def tree(self) -> str:
        """A directory with hidden files and directories beside ordinary ones."""
        for name in ["scans/a.tif", "scans/b.jpg", "scans/sub/c.tif", "scans/.DS_Store",
                     "scans/.git/config", "scans/sub/.hidden.tif"]:
            self.make_file(name, 3000, len(name))
        return os.path.join(self.work, "scans")

    def stored_names(self, server: TwistdServer) -> list[str]:
        complete = os.path.join(server.storage, "complete")
        return sorted(os.path.relpath(os.path.join(d, f), complete).replace(os.sep, "/")
                      for d, _, names in os.walk(complete) for f in names)

    async def test_hidden_skipped(self) -> None:
        """
        Hidden files (and files in hidden directories) of a directory upload
        are skipped, not refused: exit 0, the summary counts them.  (Before,
        a .DS_Store failed the batch on every run.)
        """
        server = await TwistdServer(self).start()
        out, err, code = await self.imgresume("upload", "--to", server.endpoint, self.tree())
        self.assertEqual(code, 0, err)
        self.assertEqual(self.stored_names(server), ["a.tif", "b.jpg", "sub/c.tif"])
        self.assertIn("3 of 3 files stored and verified", err)
        self.assertIn("3 skipped (hidden or excluded; --dry-run lists them)", err)
        self.assertNotIn("refused", err)

    async def test_include_exclude(self) -> None:
        """
        C{--include '*.tif' --exclude '*'}: the first rule that matches
        decides (and a wildcard does not take hidden files); a pattern with
        a trailing / excludes a directory.
        """
        server = await TwistdServer(self).start()
        out, err, code = await self.imgresume(
            "upload", "--to", server.endpoint, "--include", "*.tif", "--exclude", "*",
            self.tree())
        self.assertEqual(code, 0, err)
        self.assertEqual(self.stored_names(server), ["a.tif", "sub/c.tif"])
        self.assertIn("4 skipped", err)
        out, err, code = await self.imgresume(
            "upload", "--to", server.endpoint, "--exclude", "sub/", "--prefix", "p",
            self.tree())
        self.assertEqual(code, 0, err)
        self.assertEqual(self.stored_names(server), ["a.tif", "p/a.tif", "p/b.jpg", "sub/c.tif"])

    async def test_dry_run(self) -> None:
        """
        C{--dry-run} and C{-n} list what would be sent, what the journal
        says is stored and what is skipped, with no server running at all;
        exit 0, and nothing is sent.
        """
        server = await TwistdServer(self).start()
        root = self.tree()
        out, err, code = await self.imgresume(
            "upload", "--to", server.endpoint, os.path.join(root, "a.tif"))
        self.assertEqual(code, 0, err)
        await server.stop()
        self.make_file("scans/d.tif", 2 * MiB, 9)
        for flag in ("--dry-run", "-n"):
            out, err, code = await self.imgresume(
                "upload", "--to", server.endpoint, flag, root, os.path.join(root, "a.tif"))
            self.assertEqual(code, 1, err)  # a.tif twice: the second is refused
            lines = out.splitlines()
            self.assertIn(f"send    b.jpg (2.9 KiB) from {os.path.join(root, 'b.jpg')}", lines)
            self.assertIn(f"send    d.tif (2.0 MiB) from {os.path.join(root, 'd.tif')}", lines)
            self.assertIn(f"skip    {os.path.join(root, '.DS_Store')} (hidden)", lines)
            self.assertIn(f"skip    {os.path.join(root, '.git')}{os.sep} (hidden)", lines)
            [stored] = [line for line in lines if line.startswith("stored ")]
            self.assertRegex(stored, r"^stored  a\.tif \(2\.9 KiB\) from .*a\.tif, stored by an "
                                     r"earlier run as upload [0-9a-f]{32}")
            self.assertIn("imgresume: dry run: 3 to send (2.0 MiB), 0 to resume, 1 already "
                          "stored, 3 skipped, 1 refused or unreadable; nothing was sent, no "
                          "server was asked", err)

    def test_n_means_dry_run(self) -> None:
        """
        C{-n} is C{--dry-run} in C{upload} as in C{gc}; C{upload --name}
        has no short form any more.
        """
        from imgresume.cli import Options

        path, _ = self.make_file("a.tif")
        config = Options()
        config.parseOptions(["upload", "--to", "h:1", "-n", path])
        self.assertTrue(config.subOptions["dry-run"])
        config = Options()
        config.parseOptions(["gc", "--storage", self.work, "--older-than", "7d", "-n"])
        self.assertTrue(config.subOptions["dry-run"])
        config = Options()
        config.parseOptions(["upload", "--to", "h:1", "-n", "x.tif", path])
        self.assertEqual(config.subOptions["files"], ["x.tif", path])
        self.assertIsNone(config.subOptions["name"])


class DiskFullTests(CommandTestCase):
    """A server whose disk fills up mid-upload."""

    def mount_small_tmpfs(self, where: str, size: str) -> None:
        """Mount a tmpfs of C{size} on C{where} for the test, or skip."""
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", where],
                              capture_output=True, text=True)
        if proc.returncode:
            raise SkipTest(f"DISK-FULL TEST SKIPPED: cannot mount tmpfs ({proc.stderr.strip()})")
        self.addCleanup(subprocess.run, ["umount", "-l", where])

    async def test_summary_counts_what_was_stored(self) -> None:
        """
        A 24 MiB file onto an 8 MiB storage: the file fails (STORAGE_FULL),
        and the summary says how much was sent and how much the server
        acknowledged (kept for a resume), not "0 B sent".
        """
        server = TwistdServer(self)
        self.mount_small_tmpfs(server.storage, "8m")
        await server.start()
        path, _ = self.make_file("big.tif", 24 * MiB)
        out, err, code = await self.imgresume(
            "upload", "--to", server.endpoint, "--max-attempts", "2", "--backoff-max", "0.1s",
            "--json", path)
        self.assertEqual(code, 1, err)
        [row] = map(json.loads, out.splitlines())
        self.assertEqual((row["status"], row["cause"]), ("failed", "StorageFull"))
        self.assertGreater(row["bytes_acknowledged"], MiB)
        m = re.search(r"imgresume: 0 of 1 files stored and verified; (\S+ \S+) sent in .*; "
                      r"(\S+ \S+) of the unfinished files acknowledged by the servers", err)
        self.assertIsNotNone(m, err)
        self.assertNotEqual(m.group(1), "0 B")
        self.assertNotEqual(m.group(2), "0 B")


class HelpTests(SynchronousTestCase):
    """The help texts say true things."""

    def test_keys_add_usage_line(self) -> None:
        """C{imgresume keys add --help} starts with the subcommand's own usage line."""
        proc = subprocess.run(
            [sys.executable, "-m", "imgresume", "keys", "add", "--help"],
            capture_output=True, text=True, env=child_env(), timeout=60)
        self.assertEqual(proc.returncode, 0, proc.stderr)
        self.assertEqual(proc.stdout.splitlines()[0],
                         "imgresume keys add --keys FILE CLIENT_ID [--rotate]")

    def examples(self, longdesc: str, program: str) -> list[list[str]]:
        """The example command lines of a help text (continuation lines joined)."""
        text = longdesc.split("Example", 1)[1].replace("\\\n", " ")
        return [shlex.split(line)[1:] for line in text.splitlines()
                if line.strip().startswith(program + " ")]

    def test_balancer_help_example(self) -> None:
        """
        The examples of C{twistd imgresume-lb --help} parse with twistd's
        real option parser, the secure-by-default rule included.  (Before,
        its one example listened beyond this host and was refused.)
        """
        from twisted.scripts.twistd import ServerOptions

        from imgresume.balancer.tap import Options

        found = self.examples(Options.longdesc, "twistd")
        self.assertEqual(len(found), 2)
        for args in found:
            ServerOptions().parseOptions(args)

    def test_upload_help_examples(self) -> None:
        """The examples of C{imgresume upload --help} parse with the real parser."""
        from imgresume.cli import Options, UploadOptions

        found = self.examples(UploadOptions.longdesc, "imgresume")
        self.assertGreaterEqual(len(found), 4)
        for args in found:
            try:
                Options().parseOptions(args)
            except usage.UsageError as e:
                self.fail(f"{args}: {e}")

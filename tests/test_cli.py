# -*- test-case-name: tests.test_cli -*-
"""
Tests for L{imgresume.cli}: C{python -m imgresume upload} as a child process
against a real C{twistd imgresume} child (output, exit codes, usage errors,
a dead endpoint), and L{ProgressBar} rendering with a fake clock.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import shutil
import tempfile
import time
from typing import Any

from twisted.trial.unittest import SynchronousTestCase, TestCase

from imgresume.cli import UploadOptions
from imgresume.cli._progress import ProgressBar
from imgresume.client import Progress
from tests.test_client_blocking import TwistdServer, child_env, run_python

RESULT_FIELDS = {"name", "upload_id", "size", "sha256", "path", "resumed_at", "bytes_sent"}


class CommandTestCase(TestCase):
    """Runs C{python -m imgresume upload ...} with its own state directory."""

    timeout = 60

    def setUp(self) -> None:
        self.work = os.path.abspath(self.mktemp())
        os.makedirs(self.work)
        self.state = os.path.join(self.work, "state")

    def make_file(self, name: str, size: int, seed: int = 0) -> tuple[str, bytes]:
        """A file of C{size} reproducible bytes in the test's directory."""
        path = os.path.join(self.work, name)
        content = random.Random(seed).randbytes(size)
        with open(path, "wb") as f:
            f.write(content)
        return path, content

    def imgresume(self, *args: str) -> Any:
        """Run the command; the Deferred fires with (stdout, stderr, exit code)."""
        return run_python(
            ["-m", "imgresume", *args], child_env(XDG_STATE_HOME=self.state)
        )

    def journal(self) -> Any:
        """The default journal's contents, or None if it was never written."""
        try:
            with open(os.path.join(self.state, "imgresume", "journal.json")) as f:
                return json.load(f)
        except FileNotFoundError:
            return None


class UploadCommandTests(CommandTestCase):
    """C{imgresume upload} against a real server."""

    async def test_json_one_file(self) -> None:
        """
        --json prints one JSON object describing the verified upload; the
        exit code is 0 and the journal ends empty.
        """
        server = await TwistdServer(self).start()
        path, content = self.make_file("scan.tif", 1024 * 1024 + 3)
        out, err, code = await self.imgresume(
            "upload", "--to", server.endpoint, "--json", "--chunk-size", "64K",
            "--name", "scans/2026/a.tif", path,
        )
        self.assertEqual(code, 0, err)
        [line] = out.splitlines()
        result = json.loads(line)
        self.assertLessEqual(RESULT_FIELDS, set(result))
        self.assertEqual(result["name"], "scans/2026/a.tif")
        self.assertEqual(result["size"], len(content))
        self.assertEqual(result["sha256"], hashlib.sha256(content).hexdigest())
        self.assertEqual(result["path"], "complete/scans/2026/a.tif")
        self.assertEqual(result["resumed_at"], [])
        self.assertEqual(result["bytes_sent"], len(content))
        self.assertRegex(result["upload_id"], r"\A[0-9a-f]{32}\Z")
        self.assertEqual(server.stored(result["path"]), content)
        self.assertEqual(self.journal(), {})

    async def test_two_files(self) -> None:
        """Two files in one command: two JSON lines, in order, both stored."""
        server = await TwistdServer(self).start()
        path1, content1 = self.make_file("one.tif", 200 * 1024, 1)
        path2, content2 = self.make_file("two.tif", 0, 2)
        out, err, code = await self.imgresume(
            "upload", "--to", server.endpoint, "--json", path1, path2
        )
        self.assertEqual(code, 0, err)
        results = [json.loads(line) for line in out.splitlines()]
        self.assertEqual([r["name"] for r in results], ["one.tif", "two.tif"])
        self.assertEqual(server.stored(results[0]["path"]), content1)
        self.assertEqual(server.stored(results[1]["path"]), content2)

    async def test_plain_output(self) -> None:
        """
        Without --json (and stderr not a terminal, so no progress bar) one
        line per file says where it is stored; --no-journal writes no journal.
        """
        server = await TwistdServer(self).start()
        path, content = self.make_file("one.tif", 1000)
        out, err, code = await self.imgresume(
            "upload", "--to", server.endpoint, "--no-journal", path
        )
        self.assertEqual(code, 0, err)
        digest = hashlib.sha256(content).hexdigest()
        self.assertEqual(
            out, f"one.tif: 1000 bytes stored at complete/one.tif, sha256 {digest} verified\n"
        )
        self.assertIsNone(self.journal())

    async def test_dead_endpoint(self) -> None:
        """
        Nothing listens: after --max-attempts the command exits 1 and says
        "upload failed" on stderr, quickly.
        """
        socket_dir = tempfile.mkdtemp(prefix="imgr-")
        self.addCleanup(shutil.rmtree, socket_dir, True)
        path, _ = self.make_file("one.tif", 1000)
        started = time.monotonic()
        out, err, code = await self.imgresume(
            "upload", "--to", f"unix:{os.path.join(socket_dir, 'none.sock')}",
            "--max-attempts", "2", "--backoff-max", "0.1s", "--connect-timeout", "1s", path,
        )
        self.assertEqual(code, 1, err)
        self.assertEqual(out, "")
        self.assertIn("upload failed", err)
        self.assertIn("one.tif", err)
        self.assertLess(time.monotonic() - started, 15)


class UsageTests(CommandTestCase):
    """Mistakes on the command line exit 2 with a message naming the problem."""

    async def assertUsageError(self, message: str, *args: str) -> None:
        """Run the command with C{args}: exit 2, C{message} and the usage on stderr."""
        out, err, code = await self.imgresume(*args)
        self.assertEqual(code, 2, err)
        self.assertIn(message, err)
        self.assertIn("Options:", err)  # the usage text follows

    async def test_missing_to(self) -> None:
        """No --to."""
        path, _ = self.make_file("a.tif", 10)
        await self.assertUsageError("--to ENDPOINT is required", "upload", path)

    async def test_missing_file(self) -> None:
        """A FILE that does not exist."""
        await self.assertUsageError(
            "nope.tif: not a regular file",
            "upload", "--to", "tcp:127.0.0.1:1", os.path.join(self.work, "nope.tif"),
        )

    async def test_name_with_two_files(self) -> None:
        """--name with more than one FILE."""
        path1, _ = self.make_file("a.tif", 10)
        path2, _ = self.make_file("b.tif", 10)
        await self.assertUsageError(
            "--name works with a single FILE only",
            "upload", "--to", "tcp:127.0.0.1:1", "--name", "x.tif", path1, path2,
        )

    async def test_no_command(self) -> None:
        """No subcommand at all."""
        await self.assertUsageError("name a command")

    async def test_bad_endpoint(self) -> None:
        """A --to that is not an endpoint string is a usage error, not a traceback."""
        path, _ = self.make_file("a.tif", 10)
        out, err, code = await self.imgresume("upload", "--to", "tpc:host:1", path)
        self.assertEqual(code, 2, err)
        self.assertIn("not a usable endpoint", err)
        self.assertNotIn("Traceback", err)

    async def test_options_after_files(self) -> None:
        """Options may follow the FILEs, as the help's own example does."""
        path, _ = self.make_file("a.tif", 10)
        out, err, code = await self.imgresume("upload", path, "--to", "tpc:host:1", "--json")
        self.assertEqual(code, 2, err)
        self.assertIn("not a usable endpoint", err)


class OptionsTests(SynchronousTestCase):
    """L{UploadOptions} parsing, in process."""

    def test_durations_and_sizes(self) -> None:
        """Durations and sizes take units; numbers become numbers."""
        path = os.path.abspath(self.mktemp())
        open(path, "wb").close()
        options = UploadOptions()
        options.parseOptions([
            "--to", "tcp:h:1", "--stall-timeout", "2m", "--connect-timeout", "500ms",
            "--backoff-max", "3", "--chunk-size", "256K", "--window", "8",
            "--max-attempts", "5", path,
        ])
        self.assertEqual(options["stall-timeout"], 120.0)
        self.assertEqual(options["connect-timeout"], 0.5)
        self.assertEqual(options["backoff-max"], 3.0)
        self.assertEqual(options["chunk-size"], 256 * 1024)
        self.assertEqual((options["window"], options["max-attempts"]), (8, 5))
        self.assertEqual(options["files"], [path])

    def test_bad_numbers(self) -> None:
        """A duration or count that does not parse is a usage error."""
        from twisted.python.usage import UsageError

        path = os.path.abspath(self.mktemp())
        open(path, "wb").close()
        for bad in (["--max-attempts", "many"], ["--stall-timeout", "soon"],
                    ["--chunk-size", "big"]):
            self.assertRaises(
                UsageError, UploadOptions().parseOptions, ["--to", "tcp:h:1", *bad, path]
            )


class ProgressBarTests(SynchronousTestCase):
    """L{ProgressBar} on a fake clock, an 80-column terminal and a StringIO."""

    def setUp(self) -> None:
        self.patch(shutil, "get_terminal_size", lambda fallback=(80, 24): os.terminal_size((80, 24)))
        self.now = 100.0
        self.stream = io.StringIO()
        self.bar = ProgressBar(self.stream, hz=10, clock=lambda: self.now)

    def test_uploading_line(self) -> None:
        """
        A report mid-upload draws name, bar, percentage, sizes, rate since
        the phase began, ETA and server, on exactly 79 columns.
        """
        self.bar(Progress("a.tif", "uploading", 0, 4096, "node-a"))
        self.now = 102.0
        self.bar(Progress("a.tif", "uploading", 1024, 4096, "node-a"))
        line = self.stream.getvalue().split("\r")[-1]
        self.assertEqual(len(line), 79)
        self.assertTrue(line.startswith("a.tif ["), line)
        self.assertIn("]  25% 1.0 KiB/4.0 KiB 512 B/s ETA 6s via node-a", line)
        bar = line[line.index("[") + 1:line.index("]")]
        self.assertEqual(bar.count("#"), len(bar) // 4)

    def test_render(self) -> None:
        """render() alone: the hashing phase is labelled; without a rate the ETA is "?"."""
        self.bar(Progress("b.tif", "hashing", 0, 1000))
        line = self.bar.render(Progress("b.tif", "hashing", 0, 1000), self.now)
        self.assertTrue(line.startswith("b.tif hashing [...."), line)
        self.assertIn("   0% 0 B/1000 B 0 B/s ETA ?", line)
        self.assertNotIn("via", line)

    def test_done(self) -> None:
        """The "done" report is always drawn, without rate or ETA, and ends the line."""
        self.bar(Progress("a.tif", "uploading", 0, 2048, "node-a"))
        self.now += 0.01  # within the redraw interval: still drawn
        self.bar(Progress("a.tif", "done", 2048, 2048, "node-a"))
        last = self.stream.getvalue().split("\r")[-1]
        self.assertTrue(last.endswith("\n"))
        self.assertIn("a.tif done [####", last)
        self.assertIn("100% 2.0 KiB/2.0 KiB via node-a", last)
        self.assertNotIn("ETA", last)

    def test_throttled(self) -> None:
        """At most hz redraws a second: reports in between are skipped."""
        self.bar(Progress("a.tif", "uploading", 0, 100))
        drawn = self.stream.getvalue()
        self.now += 0.05
        self.bar(Progress("a.tif", "uploading", 10, 100))
        self.assertEqual(self.stream.getvalue(), drawn)
        self.now += 0.06
        self.bar(Progress("a.tif", "uploading", 20, 100))
        self.assertEqual(self.stream.getvalue().count("\r"), 2)

    def test_empty_file_and_long_name(self) -> None:
        """A zero-byte file is 100%; a long name is cut to 30 characters."""
        name = "n" * 50 + ".tif"
        self.bar(Progress(name, "done", 0, 0))
        line = self.stream.getvalue()
        self.assertIn("n" * 30 + " done [", line)
        self.assertNotIn("n" * 31, line)
        self.assertIn("100% 0 B/0 B", line)

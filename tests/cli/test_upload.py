# -*- test-case-name: tests.cli.test_upload -*-
"""
Tests for L{imgresume.cli}: C{python -m imgresume upload} as a child process
against a real C{twistd imgresume} child (output, exit codes, usage errors,
a dead endpoint), the upload command's batches in process against an
in-memory server (what it prints for directories, refused names, failures
and reruns), and the progress displays with fake clocks.

The directory upload interrupted by SIGKILL and run again is in
L{tests.cli.test_directory_upload}.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import re
import shutil
import signal
import tempfile
import time
from typing import Any

import attrs
from blake3 import blake3
from rich.console import Console
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.python.usage import UsageError
from twisted.trial.unittest import SynchronousTestCase, TestCase

from imgresume.cli import UploadOptions
from imgresume.cli._live import BatchProgress, ProgressBar
from imgresume.cli._progress import BatchTally, PlainProgress, format_eta
from imgresume.cli._report import EXIT_SOURCE_CHANGED, exit_code
from imgresume.cli._upload import BatchCommand
from imgresume.client import BatchItem, FileOutcome, Journal, Progress, UploadFailed, Uploader
from imgresume.client._results import UploadResult
from imgresume.protocol import ServerLimits
from imgresume.storage.memory import MemoryStorage
from tests.support.processes import TwistdServer, child_env, run_python
from tests.support.memorynet import InstantReactor, MemoryNetwork
from tests.support.runners import sync_run

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
        """The default journal's entries, or None if it was never written."""
        path = os.path.join(self.state, "imgresume", "journal.json")
        return Journal(path).entries() if os.path.exists(path) else None


class UploadCommandTests(CommandTestCase):
    """C{imgresume upload} against a real server."""

    async def test_json_one_file(self) -> None:
        """
        --json prints one JSON object describing the verified upload (and
        the local path); the exit code is 0 and the journal marks the
        upload complete.
        """
        server = await TwistdServer(self).start()
        path, content = self.make_file("scan.tif", 1024 * 1024 + 3)
        out, err, code = await self.imgresume(
            "upload", "--to", server.endpoint, "--json", "--chunk-size", "64K",
            "--name", "scans/2026/a.tif", "--digest", "sha256", path,
        )
        self.assertEqual(code, 0, err)
        [line] = out.splitlines()
        result = json.loads(line)
        self.assertLessEqual(RESULT_FIELDS, set(result))
        self.assertEqual(result["name"], "scans/2026/a.tif")
        self.assertEqual(result["size"], len(content))
        self.assertEqual(result["sha256"], hashlib.sha256(content).hexdigest())
        self.assertEqual(result["digest"], {"algorithm": "sha256", "hex": result["sha256"]})
        self.assertEqual(result["path"], "complete/scans/2026/a.tif")
        self.assertEqual(result["resumed_at"], [])
        self.assertEqual(result["bytes_sent"], len(content))
        self.assertRegex(result["upload_id"], r"\A[0-9a-f]{32}\Z")
        self.assertEqual(result["local"], path)
        self.assertFalse(result["already_complete"])
        self.assertEqual(server.stored(result["path"]), content)
        [entry] = self.journal().values()
        self.assertEqual((entry["upload_id"], entry["complete"]), (result["upload_id"], True))

    async def test_two_files(self) -> None:
        """
        Two files in one command: two JSON lines, in the order the files
        finish, both stored.
        """
        server = await TwistdServer(self).start()
        path1, content1 = self.make_file("one.tif", 200 * 1024, 1)
        path2, content2 = self.make_file("two.tif", 0, 2)
        out, err, code = await self.imgresume(
            "upload", "--to", server.endpoint, "--json", path1, path2
        )
        self.assertEqual(code, 0, err)
        results = sorted((json.loads(line) for line in out.splitlines()),
                         key=lambda r: r["name"])
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
        digest = blake3(content).hexdigest()  # the default digest
        self.assertEqual(
            out, f"one.tif: 1000 bytes stored at complete/one.tif, blake3 {digest} verified\n"
        )
        self.assertIsNone(self.journal())

    async def test_if_exists_skip_stores_once(self) -> None:
        """
        An identical file uploaded twice with --no-journal and --if-exists
        skip is stored once: the second run sends nothing, says "skipped:
        already stored as PATH", and with --json reports skipped with the
        path; exit 0.
        """
        server = await TwistdServer(self).start()
        path, content = self.make_file("big-scan.tiff", 300 * 1024)
        digest = blake3(content).hexdigest()  # the default digest
        runs = []
        for extra in (("--max-put", "0"), ("--max-put", "0", "--json")):
            runs.append(await self.imgresume(
                "upload", "--to", server.endpoint, "--no-journal", "--if-exists", "skip",
                *extra, path))
        (out1, err1, code1), (out2, err2, code2) = runs
        self.assertEqual((code1, code2), (0, 0), err1 + err2)
        self.assertEqual(out1, f"big-scan.tiff: {len(content)} bytes stored at "
                               f"complete/big-scan.tiff, blake3 {digest} verified\n")
        row = json.loads(out2)
        self.assertEqual((row["skipped"], row["path"], row["bytes_sent"], row["upload_id"]),
                         (True, "complete/big-scan.tiff", 0, ""))
        out3, err3, code3 = await self.imgresume(
            "upload", "--to", server.endpoint, "--no-journal", "--if-exists", "skip",
            "--max-put", "0", path)
        self.assertEqual(code3, 0, err3)
        self.assertEqual(out3, f"big-scan.tiff: skipped: already stored as "
                               f"complete/big-scan.tiff ({len(content)} bytes, blake3 {digest} "
                               "verified by the server)\n")
        stored = os.listdir(os.path.join(server.storage, "complete"))
        self.assertEqual(stored, ["big-scan.tiff"])
        self.assertEqual(server.stored("complete/big-scan.tiff"), content)

    async def test_if_exists_skip_put(self) -> None:
        """
        A small file sent whole in a PUT with --if-exists skip: the first
        run stores it, a second one (the same PUT: the same upload id) is
        answered skipped with the stored path, its bytes counted as sent;
        one file in complete/.
        """
        server = await TwistdServer(self).start()
        path, content = self.make_file("small-scan.tiff", 64 * 1024)
        runs = []
        for _ in range(2):
            runs.append(await self.imgresume(
                "upload", "--to", server.endpoint, "--no-journal", "--if-exists", "skip",
                "--json", path))
        (out1, err1, code1), (out2, err2, code2) = runs
        self.assertEqual((code1, code2), (0, 0), err1 + err2)
        first, second = json.loads(out1), json.loads(out2)
        self.assertEqual((first["skipped"], first["path"], first["bytes_sent"]),
                         (False, "complete/small-scan.tiff", len(content)))
        self.assertRegex(first["upload_id"], r"\A[0-9a-f]{32}\Z")
        self.assertEqual((second["skipped"], second["path"], second["bytes_sent"],
                          second["upload_id"]),
                         (True, "complete/small-scan.tiff", len(content), ""))
        self.assertEqual(os.listdir(os.path.join(server.storage, "complete")),
                         ["small-scan.tiff"])
        self.assertEqual(server.stored("complete/small-scan.tiff"), content)

    async def test_if_exists_rename_and_fail(self) -> None:
        """
        By default (rename) a second, different file of the name is stored
        beside it and its line names the real path; with --if-exists fail
        a third is refused with NAME_TAKEN and the command exits 1.
        """
        server = await TwistdServer(self).start()
        path, _ = self.make_file("big-scan.tiff", 1000, 1)
        out, err, code = await self.imgresume("upload", "--to", server.endpoint,
                                              "--no-journal", path)
        self.assertEqual(code, 0, err)
        path, content = self.make_file("big-scan.tiff", 1000, 2)
        out, err, code = await self.imgresume("upload", "--to", server.endpoint,
                                              "--no-journal", path)
        self.assertEqual(code, 0, err)
        renamed = re.fullmatch(
            r"big-scan.tiff: 1000 bytes stored at (complete/big-scan\.[0-9a-f]{8}\.tiff), "
            r"blake3 [0-9a-f]{64} verified\n", out)
        self.assertIsNotNone(renamed, out)
        self.assertEqual(server.stored(renamed.group(1)), content)
        path, _ = self.make_file("big-scan.tiff", 1000, 3)
        out, err, code = await self.imgresume("upload", "--to", server.endpoint,
                                              "--no-journal", "--if-exists", "fail", path)
        self.assertEqual((out, code), ("", 1))
        self.assertIn("complete/big-scan.tiff already exists (if-exists=fail)", err)
        self.assertEqual(len(os.listdir(os.path.join(server.storage, "complete"))), 2)

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
        """
        A FILE that does not exist is not a usage error (issue 12): it is
        refused with "no such file", without the usage text, and the
        command exits 1 (the files beside it are still sent: see
        L{tests.cli.test_errors}).
        """
        missing = os.path.join(self.work, "nope.tif")
        out, err, code = await self.imgresume("upload", "--to", "tcp:127.0.0.1:1", missing)
        self.assertEqual(code, 1, err)
        self.assertIn(f"imgresume: refused: {missing}: no such file", err)
        self.assertNotIn("Options:", err)

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
        path = os.path.abspath(self.mktemp())
        open(path, "wb").close()
        for bad in (["--max-attempts", "many"], ["--stall-timeout", "soon"],
                    ["--chunk-size", "big"], ["--parallel", "some"]):
            self.assertRaises(
                UsageError, UploadOptions().parseOptions, ["--to", "tcp:h:1", *bad, path]
            )

    def test_directories_and_parallel(self) -> None:
        """
        Directories and files may be mixed; --parallel defaults to 4 and
        takes 1 to 64; --prefix takes a remote directory.
        """
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        path = os.path.join(directory, "a.tif")
        open(path, "wb").close()
        options = UploadOptions()
        options.parseOptions(["--to", "tcp:h:1", directory, path])
        self.assertEqual((options["files"], options["parallel"]), ([directory, path], 4))
        options = UploadOptions()
        options.parseOptions(["--to", "tcp:h:1", "-P", "64", "--prefix", "scans/2026/",
                              directory])
        self.assertEqual((options["parallel"], options["prefix"]), (64, "scans/2026/"))

    def test_batch_usage_errors(self) -> None:
        """
        --parallel out of range, a --prefix the name rules refuse, --name
        with a directory, and --name with --prefix are usage errors that say
        so.
        """
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        path = os.path.join(directory, "a.tif")
        open(path, "wb").close()
        cases = [
            (["--parallel", "0", path], "--parallel must be from 1 to 64"),
            (["--parallel", "65", path], "--parallel must be from 1 to 64"),
            (["--prefix", "../up", path], "--prefix:"),
            (["--name", "x.tif", directory], "--name works with a single FILE only"),
            (["--name", "x.tif", "--prefix", "p", path], "do not go together"),
        ]
        for args, message in cases:
            with self.assertRaises(UsageError) as caught:
                UploadOptions().parseOptions(["--to", "tcp:h:1", *args])
            self.assertIn(message, str(caught.exception))


    def test_quiet_and_verbose(self) -> None:
        """C{-v} is a flag like rsync's; C{-q} with C{-v} is a usage error."""
        path = os.path.abspath(__file__)
        options = UploadOptions()
        options.parseOptions(["--to", "tcp:h:1", "-v", path])
        self.assertTrue(options["verbose"])
        with self.assertRaises(UsageError) as caught:
            UploadOptions().parseOptions(["--to", "tcp:h:1", "-q", "-v", path])
        self.assertIn("--quiet and --verbose", str(caught.exception))

    def test_if_exists(self) -> None:
        """--if-exists is rename by default, takes skip or fail, and nothing else."""
        path = os.path.abspath(self.mktemp())
        open(path, "wb").close()
        options = UploadOptions()
        options.parseOptions(["--to", "tcp:h:1", path])
        self.assertEqual(options["if-exists"], "rename")
        for policy in ("skip", "fail", "rename"):
            options = UploadOptions()
            options.parseOptions(["--to", "tcp:h:1", "--if-exists", policy, path])
            self.assertEqual(options["if-exists"], policy)
        with self.assertRaises(UsageError) as caught:
            UploadOptions().parseOptions(["--to", "tcp:h:1", "--if-exists", "replace", path])
        self.assertIn("--if-exists must be rename, skip or fail", str(caught.exception))


class ProgressBarTests(SynchronousTestCase):
    """
    L{ProgressBar} (drawn with rich) on a fake clock, an 80-column terminal
    without colours and a StringIO.
    """

    def setUp(self) -> None:
        self.now = 100.0
        self.stream = io.StringIO()
        console = Console(file=self.stream, force_terminal=True, width=80, height=24,
                          color_system=None, highlight=False)
        self.bar = ProgressBar(self.stream, hz=10, clock=lambda: self.now, console=console)
        self.addCleanup(self.bar.close)

    def lines(self) -> list[str]:
        """The bar's live lines now."""
        assert self.bar._display is not None
        return self.bar._display.lines()

    def test_uploading_line(self) -> None:
        """
        A report mid-upload draws name, bar, percentage, sizes, rate since
        the phase began, ETA and server, within 80 columns.
        """
        self.bar(Progress("a.tif", "uploading", 0, 4096, "node-a"))
        self.now = 102.0
        self.bar(Progress("a.tif", "uploading", 1024, 4096, "node-a"))
        [line] = self.lines()
        self.assertLessEqual(len(line), 80)
        self.assertTrue(line.startswith("a.tif "), line)
        self.assertIn(" 25% 1.0 KiB/4.0 KiB 512 B/s ETA 6s via node-a", line)
        self.assertIn("via node-a", self.stream.getvalue())

    def test_render(self) -> None:
        """The hashing phase is labelled; without a rate the ETA is "?"; no server yet."""
        self.bar(Progress("b.tif", "hashing", 0, 1000))
        [line] = self.lines()
        self.assertTrue(line.startswith("b.tif hashing "), line)
        self.assertIn("0% 0 B/1000 B 0 B/s ETA ?", line)
        self.assertNotIn("via", line)

    def test_done(self) -> None:
        """The "done" report is always written, without rate or ETA, and ends the line."""
        self.bar(Progress("a.tif", "uploading", 0, 2048, "node-a"))
        self.now += 0.01  # within the redraw interval: still written
        self.bar(Progress("a.tif", "done", 2048, 2048, "node-a"))
        text = self.stream.getvalue()
        self.assertIn("a.tif done: 2.0 KiB, via node-a\n", text)
        self.assertNotIn("ETA", text.split("a.tif done:")[-1])
        self.assertIsNone(self.bar._display)

    def test_done_shows_path(self) -> None:
        """The "done" line ends with the path the file is stored at."""
        self.bar(Progress("a.tif", "done", 2048, 2048, "node-a", "complete/a.0a1b2c3d.tif"))
        self.assertTrue(self.stream.getvalue().endswith(
            "a.tif done: 2.0 KiB, via node-a, stored as complete/a.0a1b2c3d.tif\n"),
            self.stream.getvalue()[-200:])

    def test_throttled(self) -> None:
        """At most hz redraws a second: reports in between are skipped."""
        self.bar(Progress("a.tif", "uploading", 0, 100))
        drawn = self.stream.getvalue()
        self.now += 0.05
        self.bar(Progress("a.tif", "uploading", 10, 100))
        self.assertEqual(self.stream.getvalue(), drawn)
        self.now += 0.06
        self.bar(Progress("a.tif", "uploading", 20, 100))
        self.assertNotEqual(self.stream.getvalue(), drawn)

    def test_retrying(self) -> None:
        """A retry is drawn at once, unthrottled: the name, why and when."""
        self.bar(Progress("a.tif", "uploading", 0, 100))
        self.now += 0.01
        self.bar(Progress("a.tif", "retrying", 0, 100, note="connection refused by h:1, "
                          "retry 1/9 in 0.2 s"))
        self.assertEqual(self.lines()[-1], "a.tif: connection refused by h:1, retry 1/9 in 0.2 s")
        self.assertIn("a.tif: connection refused by h:1, retry 1/9 in 0.2 s",
                      self.stream.getvalue())

    def test_empty_file_and_long_name(self) -> None:
        """A zero-byte file is 100%; a long name is cut to 30 characters on the bar."""
        name = "n" * 50 + ".tif"
        self.bar(Progress(name, "uploading", 0, 0, "n"))
        [line] = self.lines()
        self.assertTrue(line.startswith("n" * 30 + " "), line)
        self.assertNotIn("n" * 31, line)
        self.assertIn("100% 0 B/0 B", line)


class BatchCommandTests(SynchronousTestCase):
    """
    The upload command's batch (L{BatchCommand}) in process, against a real
    server protocol over an in-memory storage: what it prints on stdout and
    stderr (not a terminal here) and the exit code.
    """

    def setUp(self) -> None:
        self.work = os.path.abspath(self.mktemp())
        os.makedirs(self.work)
        self.clock = InstantReactor()
        self.storage = MemoryStorage(busy_retry_after=0.05)
        self.journal = Journal(os.path.join(self.work, "journal.json"))

    def network(self, **factory_kwargs: Any) -> MemoryNetwork:
        """A new in-memory server, over the test's one storage."""
        return MemoryNetwork(self.clock, self.storage, **factory_kwargs)

    def tree(self, names: list[str], size: int = 5000) -> str:
        """A directory of files at C{names} (relative, "/"-separated); its path."""
        root = os.path.join(self.work, "scans")
        for i, name in enumerate(names):
            path = os.path.join(root, *name.split("/"))
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "wb") as f:
                f.write(random.Random(i).randbytes(size + i))
        return root

    def command(self, network: MemoryNetwork, *args: str, terminal: bool = False,
                command: type[BatchCommand] = BatchCommand) -> tuple[str, str, int]:
        """
        Run C{imgresume upload --to ... ARGS} in process: stdout, stderr
        (a terminal if C{terminal}), exit code.
        """
        config = UploadOptions()
        config.parseOptions(["--to", "tcp:unused:1", *args])
        uploader = Uploader(network, reactor=self.clock, client_id="unit", run=sync_run,
                            journal=None if config["no-journal"] else self.journal,
                            chunk_size=1024, backoff_base=0.01, backoff_max=0.1)
        out, err = io.StringIO(), io.StringIO()
        if terminal:
            self.patch(err, "isatty", lambda: True)
        code = network.run(Deferred.fromCoroutine(
            command(self.clock, config, uploader, out, err).run()))
        return out.getvalue(), err.getvalue(), code

    def test_directory_json(self) -> None:
        """
        A directory with --json --parallel 2: one JSON object per file,
        the refused hidden file's too; each stored file under its relative
        path; a summary naming the failure; exit code 1.  (A hidden file is
        skipped unless a rule includes it, as here, to be refused by name.)
        """
        root = self.tree(["a.tif", "sub/b.tif", "sub/deeper/c.tif", ".hidden.tif", "d.tif"])
        network = self.network()
        out, err, code = self.command(network, "--json", "--parallel", "2",
                                      "--include", ".hidden.tif", root)
        self.assertEqual(code, 1, err)
        rows = [json.loads(line) for line in out.splitlines()]
        [refused] = [r for r in rows if r.get("refused")]
        self.assertEqual(refused["local"], os.path.join(root, ".hidden.tif"))
        self.assertIn("hidden names are not allowed", refused["error"])
        stored = {r["name"]: r for r in rows if "upload_id" in r}
        self.assertEqual(sorted(stored), ["a.tif", "d.tif", "sub/b.tif", "sub/deeper/c.tif"])
        for name, row in stored.items():
            with open(row["local"], "rb") as f:
                self.assertEqual(self.storage.read_completed(row["path"]), f.read())
            self.assertEqual(row["path"], f"complete/{name}")
        self.assertIn("imgresume: 4 of 5 files stored and verified", err)
        self.assertIn("over 2 connections", err)
        self.assertIn("imgresume: 1 failed:", err)
        self.assertIn(f"  {refused['local']}: refused: ", err)
        self.assertEqual(network.factory.metrics.connections.value(), 2)

    def test_rerun_confirms_without_sending(self) -> None:
        """
        Running the same command again confirms every file with the server
        (one RESUME each, answered COMPLETED) and sends no byte; without
        --json each file gets a line saying so.
        """
        root = self.tree([f"f{i}.tif" for i in range(6)])
        out, err, code = self.command(self.network(), "--parallel", "3", "--prefix", "b7", root)
        self.assertEqual(code, 0, err)
        self.assertEqual(len(out.splitlines()), 6)
        self.assertTrue(all(" bytes stored at complete/b7/f" in line for line in out.splitlines()))
        again = self.network()
        out, err, code = self.command(again, "--parallel", "3", "--prefix", "b7", root)
        self.assertEqual(code, 0, err)
        self.assertEqual(len(out.splitlines()), 6)
        for line in out.splitlines():
            self.assertRegex(line, r"^b7/f\d\.tif: already stored at complete/b7/f\d\.tif by "
                                   r"an earlier run")
        self.assertIn("6 of 6 files stored and verified (6 already complete from an earlier "
                      "run); 0 B sent", err)
        self.assertEqual(again.factory.metrics.uploads_completed.value(), 6)
        self.assertLess(again.factory.metrics.received_bytes.value(), 6 * 200)

    def test_restart_sends_again(self) -> None:
        """
        --restart ignores the journal: every file is uploaded again as a
        new upload, stored beside the first copy.
        """
        root = self.tree(["a.tif", "b.tif"])
        self.command(self.network(), "--json", root)
        out, err, code = self.command(self.network(), "--json", "--restart", root)
        self.assertEqual(code, 0, err)
        rows = [json.loads(line) for line in out.splitlines()]
        self.assertEqual(sorted(r["name"] for r in rows), ["a.tif", "b.tif"])
        for row in rows:
            self.assertFalse(row["already_complete"])
            self.assertNotEqual(row["path"], f"complete/{row['name']}")
            self.assertEqual(row["bytes_sent"], row["size"])

    def test_failed_upload(self) -> None:
        """
        A file the server refuses (too large) fails with a line on stderr
        and a JSON object saying why; the other file is stored; the summary
        lists the failure; exit code 1.
        """
        root = self.tree(["small.tif", "zbig.tif"])
        with open(os.path.join(root, "zbig.tif"), "ab") as f:
            f.write(b"x" * 20000)
        network = self.network(limits=ServerLimits(max_file_size=10000))
        out, err, code = self.command(network, "--json", "--parallel", "1", root)
        self.assertEqual(code, 1)
        small, big = [json.loads(line) for line in out.splitlines()]
        self.assertEqual(small["name"], "small.tif")
        self.assertEqual((big["name"], big["cause"]), ("zbig.tif", "FileTooLarge"))
        self.assertEqual(big["local"], os.path.join(root, "zbig.tif"))
        self.assertIn("imgresume: upload failed: zbig.tif:", err)
        self.assertIn(f"  {big['local']}: zbig.tif: ", err)
        self.assertEqual(network.factory.metrics.connections.value(), 1)

    def test_fail_fast_refused(self) -> None:
        """
        --fail-fast with a refused name stops before anything is sent:
        exit code 1, no connection.
        """
        root = self.tree(["a.tif", "sub/NUL.tif"])
        network = self.network()
        out, err, code = self.command(network, "--fail-fast", root)
        self.assertEqual((out, code), ("", 1))
        self.assertIn("reserved Windows device name", err)
        self.assertIn("nothing uploaded", err)
        self.assertEqual(network.pumps, [])

    def test_fail_fast_failed_upload(self) -> None:
        """
        --fail-fast with one lane: after a failed upload no further file
        starts, and the summary says how many were not started.
        """
        root = self.tree(["a.tif", "b.tif", "c.tif"])
        with open(os.path.join(root, "a.tif"), "ab") as f:
            f.write(b"x" * 20000)
        network = self.network(limits=ServerLimits(max_file_size=10000))
        out, err, code = self.command(network, "--fail-fast", "--parallel", "1", root)
        self.assertEqual(code, 1)
        self.assertEqual(out, "")
        self.assertIn("imgresume: 2 not started (--fail-fast)", err)

    def test_terminal(self) -> None:
        """
        With stderr a terminal, the live display reports every file there
        (stored or FAILED) and stdout stays empty; the summary follows.
        """
        self.patch(shutil, "get_terminal_size", lambda fallback=(80, 24): os.terminal_size((80, 24)))
        root = self.tree(["a.tif", "b.tif", "zbig.tif"])
        with open(os.path.join(root, "zbig.tif"), "ab") as f:
            f.write(b"x" * 20000)
        network = self.network(limits=ServerLimits(max_file_size=10000))
        out, err, code = self.command(network, root, terminal=True)
        self.assertEqual((out, code), ("", 1))
        self.assertRegex(err, r"a\.tif done: 4\.9 KiB, via [^ ]+, stored as ")
        self.assertRegex(err, r"b\.tif done: 4\.9 KiB, via [^ ]+, stored as ")
        self.assertIn("zbig.tif FAILED: ", err)
        self.assertNotIn("imgresume: upload failed", err)
        self.assertIn("/3 files ", err)  # the total line
        self.assertIn("\x1b[2K", err)  # the live lines are redrawn in place
        self.assertTrue(err.endswith("without being sent again\n"), err[-200:])

    def test_interrupted(self) -> None:
        """
        Interrupted (SIGINT) once the first file is stored: exit 130, a JSON
        object per unfinished file (status "interrupted", the bytes
        acknowledged, or null for a file no server answered about), and
        "interrupted: 3 of 4 files unfinished" on stderr; the stored file's
        line stands.
        """
        class InterruptedAfterFirst(BatchCommand):
            def _outcome(self, outcome: FileOutcome) -> None:
                super()._outcome(outcome)
                self.uploader.interrupt(signal.SIGINT)

        root = self.tree(["a.tif", "b.tif", "c.tif", "d.tif"], size=50_000)
        out, err, code = self.command(self.network(), "--json", "--parallel", "2", root,
                                      command=InterruptedAfterFirst)
        self.assertEqual(code, 130, err)
        rows = [json.loads(line) for line in out.splitlines()]
        self.assertEqual([r["status"] for r in rows],
                         ["stored", "interrupted", "interrupted", "interrupted"])
        unfinished = {r["name"]: r for r in rows[1:]}
        self.assertEqual(sorted(unfinished), ["b.tif", "c.tif", "d.tif"])
        self.assertIsNone(unfinished["d.tif"]["bytes_acknowledged"])
        self.assertIn("imgresume: interrupted: 3 of 4 files unfinished; run the same command "
                      "again to resume", err)
        self.assertNotIn("not started (--fail-fast)", err)

    def test_empty_directory(self) -> None:
        """An empty directory: nothing to upload, exit code 0, no connection."""
        root = os.path.join(self.work, "empty")
        os.makedirs(root)
        network = self.network()
        out, err, code = self.command(network, root)
        self.assertEqual((out, code), ("", 0))
        self.assertIn("no files to upload", err)
        self.assertEqual(network.pumps, [])


def outcome(name: str, size: int, ok: bool = True, already: bool = False) -> FileOutcome:
    """A file's outcome as the batch reports it."""
    if not ok:
        return FileOutcome(BatchItem(f"/d/{name}", name),
                           error=UploadFailed(f"{name}: gave up after 3 attempts"))
    result = UploadResult(name, "ab" * 16, size, "00" * 32, f"complete/{name}", [], size,
                          1, ["node-a"], 0.1, already)
    return FileOutcome(BatchItem(f"/d/{name}", name), result=result)


class ExitCodeTests(SynchronousTestCase):
    """L{exit_code}: the exit code of a run, from what happened to its files."""

    def failed(self, cause: BaseException) -> FileOutcome:
        return FileOutcome(BatchItem("/d/x", "x"), error=UploadFailed("x: why", cause))

    def test_codes(self) -> None:
        """
        0 when all is stored; 1 for a failure, a refusal or a file not
        started; 3 when a file's source changed (or the server found its
        digest wrong), over 1; 128 + the signal when interrupted, over all.
        """
        from imgresume.client import BatchResult, SourceChanged, UploadInterrupted
        from imgresume.errors import DigestMismatch, StorageFull

        def code(outcomes: list, refused: list = (), not_started: list = (),
                 interrupted: Any = None) -> int:
            return exit_code(BatchResult(outcomes, list(not_started), 1), list(refused),
                             interrupted)

        ok = outcome("a", 1)
        self.assertEqual(code([ok]), 0)
        self.assertEqual(code([ok, self.failed(StorageFull("full"))]), 1)
        self.assertEqual(code([ok], refused=["r"]), 1)
        self.assertEqual(code([ok], not_started=[BatchItem("/d/y")]), 1)
        changed = self.failed(SourceChanged("it grew"))
        self.assertEqual(code([changed, self.failed(StorageFull("full"))]),
                         EXIT_SOURCE_CHANGED)
        self.assertEqual(code([self.failed(DigestMismatch("no"))]), 3)
        self.assertEqual(code([changed], interrupted=UploadInterrupted("x", signal=15)), 143)


class BatchTallyTests(SynchronousTestCase):
    """L{BatchTally}: the counts behind the batch displays."""

    def test_counts(self) -> None:
        """
        Bytes done count stored files whole and files under way by their
        acknowledged offset; bytes sent count only what this run sent (not
        the offset a resume starts from); a failed file's bytes leave the
        ETA; the rate is over the time since the batch began.
        """
        now = [0.0]
        tally = BatchTally({"a": 1000, "b": 2000, "c": 500}, lambda: now[0])
        tally.report(Progress("a", "hashing", 1000, 1000))
        tally.report(Progress("a", "uploading", 0, 1000, "n"))
        tally.report(Progress("b", "uploading", 1500, 2000, "n"))  # resumed at 1500
        tally.report(Progress("a", "uploading", 600, 1000, "n"))
        tally.report(Progress("b", "uploading", 1700, 2000, "n"))
        now[0] = 2.0
        self.assertEqual(tally.sent, 800)
        self.assertEqual(tally.bytes_done, 2300)
        self.assertEqual(tally.rate(), 400.0)
        self.assertEqual(tally.eta(), (3500 - 2300) / 400)
        tally.finished(outcome("a", 1000))
        tally.finished(outcome("c", 500, ok=False))
        self.assertEqual((tally.stored, tally.failed), (1, 1))
        self.assertEqual(list(tally.active), ["b"])
        self.assertEqual(tally.eta(), (3000 - 2700) / 400)
        self.assertEqual(tally.files_text(), "2/3 files, 1 failed")
        self.assertEqual(tally.describe(),
                         "2/3 files, 1 failed, 1 in progress; 2.6 KiB/3.4 KiB, 400 B/s, ETA 1s")

    def test_eta_format(self) -> None:
        """ETAs read as seconds, minutes or hours; unknown is "?"."""
        self.assertEqual([format_eta(s) for s in (None, 4.4, 185, 7500)],
                         ["ETA ?", "ETA 4s", "ETA 3m05s", "ETA 2h05m"])


class BatchProgressTests(SynchronousTestCase):
    """
    L{BatchProgress} (drawn with rich) on a fake clock, an 80x24 terminal
    without colours and a StringIO.
    """

    def setUp(self) -> None:
        self.now = 100.0
        self.stream = io.StringIO()
        self.tally = BatchTally({"a.tif": 4096, "b.tif": 4096}, lambda: self.now)
        self.display = self.make(self.tally)

    def make(self, tally: BatchTally, height: int = 24) -> BatchProgress:
        """A display of C{tally} on a C{height}-line terminal writing to the stream."""
        console = Console(file=self.stream, force_terminal=True, width=80, height=height,
                          color_system=None, highlight=False)
        return BatchProgress(self.stream, tally, hz=10, console=console)

    def test_live_lines(self) -> None:
        """
        A line per file under way (name, bar, percentage, sizes, rate since
        the phase began, ETA, server), then the total line; each redraw
        first moves back up over the lines drawn before and clears them.
        """
        self.display(Progress("a.tif", "uploading", 0, 4096, "node-a"))
        self.now += 1
        self.display(Progress("a.tif", "uploading", 1024, 4096, "node-a"))
        self.display(Progress("b.tif", "hashing", 2048, 4096))
        last = self.display.lines()
        self.assertEqual(len(last), 3)
        self.assertTrue(last[0].startswith("a.tif "), last[0])
        self.assertIn(" 25% 1.0 KiB/4.0 KiB 1.0 KiB/s ETA 3s via node-a", last[0])
        self.assertTrue(last[1].startswith("b.tif hashing "), last[1])
        self.assertTrue(last[2].startswith("0/2 files "), last[2])
        self.assertIn("1.0 KiB/8.0 KiB", last[2])
        self.assertIn("\x1b[1A\x1b[2K", self.stream.getvalue())
        self.assertTrue(all(len(line) <= 80 for line in last))

    def test_finished_lines_stay(self) -> None:
        """
        A finished file leaves a line above the live ones: done (or already
        complete) with its size, server and the path it is stored at, or
        FAILED with the reason; close() clears the live lines only.
        """
        self.display(Progress("a.tif", "uploading", 0, 4096, "node-a"))
        self.display.finished(outcome("a.tif", 4096))
        self.display.finished(outcome("b.tif", 4096, ok=False))
        self.display.close()
        text = self.stream.getvalue()
        self.assertIn("a.tif done: 4.0 KiB, via node-a, stored as complete/a.tif\n", text)
        self.assertIn("b.tif FAILED: gave up after 3 attempts\n", text)
        self.assertTrue(text.endswith("\x1b[2K"), repr(text[-40:]))
        self.assertEqual(self.display.lines()[0].split()[0], "2/2")
        self.assertEqual((self.tally.stored, self.tally.failed), (1, 1))

    def test_single_file_has_no_total(self) -> None:
        """With one file there is no total line."""
        tally = BatchTally({"a.tif": 10}, lambda: self.now)
        display = self.make(tally)
        display(Progress("a.tif", "uploading", 5, 10, "n"))
        self.assertEqual(len(display.lines()), 1)

    def test_more_files_than_rows(self) -> None:
        """
        More files under way than the terminal has rows for: the first
        ones, the total, and a line saying how many more, all on screen.
        """
        names = [f"p{i}.tif" for i in range(10)]
        tally = BatchTally({name: 100 for name in names}, lambda: self.now)
        display = self.make(tally, height=6)
        for name in names:
            display(Progress(name, "uploading", 10, 100, "n"))
        lines = display.lines()
        self.assertEqual(len(lines), 4)
        self.assertEqual([line.split()[0] for line in lines[:2]], names[:2])
        self.assertTrue(lines[2].startswith("0/10 files "), lines[2])
        self.assertEqual(lines[3], "... and 8 more under way")

    def test_throttled(self) -> None:
        """At most hz redraws a second; reports in between are only counted."""
        self.display(Progress("a.tif", "uploading", 0, 4096))
        drawn = self.stream.getvalue()
        self.now += 0.05
        self.display(Progress("a.tif", "uploading", 1024, 4096))
        self.assertEqual(self.stream.getvalue(), drawn)
        self.assertEqual(self.tally.sent, 1024)
        self.now += 0.06
        self.display(Progress("a.tif", "uploading", 2048, 4096))
        self.assertNotEqual(self.stream.getvalue(), drawn)

    def test_retrying(self) -> None:
        """
        A file waiting to retry is labelled so, and the status line says
        why and when, drawn at once; its acknowledged bytes still count.
        """
        self.display(Progress("a.tif", "uploading", 1024, 4096, "node-a"))
        self.now += 0.01
        self.display(Progress("a.tif", "retrying", 1024, 4096, "node-a",
                              note="connection refused by 127.0.0.1:7000, retry 3/9 in 2.1 s"))
        self.assertIn("a.tif: connection refused by 127.0.0.1:7000, retry 3/9 in 2.1 s",
                      self.stream.getvalue())
        last = self.display.lines()
        self.assertTrue(last[0].startswith("a.tif waiting "), last[0])
        self.assertNotIn("ETA", last[0])
        self.assertEqual(last[-1],
                         "a.tif: connection refused by 127.0.0.1:7000, retry 3/9 in 2.1 s")
        self.assertEqual(self.tally.bytes_done, 1024)

    def test_resumed_elsewhere(self) -> None:
        """
        After a retry, the file's first report from a server says on the
        status line where it resumed and from which offset; the line goes
        after a few seconds.
        """
        self.display(Progress("a.tif", "uploading", 1024, 4096, "node-a"))
        self.display(Progress("a.tif", "retrying", 1024, 4096, "node-a",
                              note="connection lost, retry 1/9 in 0.1 s"))
        self.now += 0.2
        self.display(Progress("a.tif", "uploading", 1024, 4096, "node-b"))
        self.assertEqual(self.display.lines()[-1],
                         "a.tif: resuming at 1.0 KiB on node-b (another server)")
        self.assertIn("resuming at 1.0 KiB on node-b", self.stream.getvalue())
        self.now += 10
        self.display(Progress("a.tif", "uploading", 2048, 4096, "node-b"))
        self.assertNotIn("resuming", "\n".join(self.display.lines()))

    def test_connecting(self) -> None:
        """A file hashed and not yet uploading is shown connecting."""
        self.display(Progress("a.tif", "hashing", 4096, 4096))
        self.assertTrue(self.display.lines()[0].startswith("a.tif connecting "))

    def test_already_complete(self) -> None:
        """A file an earlier run finished is labelled so."""
        self.display.finished(outcome("a.tif", 4096, already=True))
        self.assertIn("a.tif already complete: 4.0 KiB, via node-a, already stored as "
                      "complete/a.tif\n", self.stream.getvalue())

    def test_stored_path(self) -> None:
        """
        Every finished line names the path the file is stored at, beyond
        the width of the terminal (it is not cut); a skipped file says it
        was already stored there.
        """
        result = UploadResult("big-scan.tiff", "ab" * 16, 4096, "00" * 32,
                              "complete/" + "big-scan" * 10 + ".e0af5ecb.tiff", [], 4096, 1,
                              ["node-3"], 0.1)
        self.display.finished(FileOutcome(BatchItem("/d/big-scan.tiff"), result=result))
        skipped = attrs.evolve(result, name="b.tif", upload_id="", bytes_sent=0, skipped=True,
                               path="complete/b.tif")
        self.display.finished(FileOutcome(BatchItem("/d/b.tif"), result=skipped))
        text = self.stream.getvalue()
        self.assertIn("big-scan.tiff done: 4.0 KiB, via node-3, stored as complete/"
                      + "big-scan" * 10 + ".e0af5ecb.tiff\n", text)
        self.assertIn("b.tif skipped: already stored as complete/b.tif (4.0 KiB, via node-3)\n",
                      text)
        self.assertEqual(self.tally.stored, 2)

    def test_verbose(self) -> None:
        """
        With C{-v}, every retry and resume also leaves a line above the
        live ones, which the status line alone does not.
        """
        for verbose in (True, False):
            self.stream = io.StringIO()
            display = self.make(BatchTally({"a.tif": 4096}, lambda: self.now))
            display.verbose = verbose
            display(Progress("a.tif", "uploading", 1024, 4096, "node-a"))
            display(Progress("a.tif", "retrying", 1024, 4096, "node-a",
                             note="connection lost, retry 1/9 in 0.2 s"))
            display(Progress("a.tif", "uploading", 1024, 4096, "node-b"))
            display.close()
            text = self.stream.getvalue()
            self.assertEqual("imgresume: a.tif: connection lost, retry 1/9 in 0.2 s\n" in text,
                             verbose)
            self.assertEqual("imgresume: a.tif: resuming at 1.0 KiB on node-b (another "
                             "server)\n" in text, verbose)

    def test_names_are_not_markup(self) -> None:
        """A file name with rich markup in it is shown as it is."""
        self.display.finished(outcome("[bold]x[/bold].tif", 10, ok=False))
        self.assertIn("[bold]x[/bold].tif FAILED: gave up", self.stream.getvalue())


class PlainProgressTests(SynchronousTestCase):
    """L{PlainProgress} on a fake reactor clock."""

    def test_periodic_lines(self) -> None:
        """A line every interval from start() until close(); none before the first interval."""
        clock = Clock()
        stream = io.StringIO()
        tally = BatchTally({"a.tif": 100, "b.tif": 100}, clock.seconds)
        display = PlainProgress(stream, tally, clock, interval=10.0)
        display.start()
        display(Progress("a.tif", "uploading", 0, 100, "n"))
        clock.advance(5)
        display(Progress("a.tif", "uploading", 50, 100, "n"))
        self.assertEqual(stream.getvalue(), "")
        clock.advance(5)
        display.finished(outcome("b.tif", 100))
        clock.advance(10)
        display.close()
        clock.advance(30)
        self.assertEqual(stream.getvalue().splitlines(), [
            "imgresume: 0/2 files, 1 in progress; 50 B/200 B, 5 B/s, ETA 30s",
            "imgresume: 1/2 files, 1 in progress; 150 B/200 B, 2 B/s, ETA 20s",
        ])
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_retry_lines(self) -> None:
        """Every retry gets a line at once, between the periodic ones."""
        clock = Clock()
        stream = io.StringIO()
        display = PlainProgress(stream, BatchTally({"a.tif": 100}, clock.seconds), clock)
        display(Progress("a.tif", "retrying", 0, 100,
                         note="connection refused by 127.0.0.1:7000, retry 1/9 in 0.2 s"))
        self.assertEqual(stream.getvalue(), "imgresume: a.tif: connection refused by "
                                            "127.0.0.1:7000, retry 1/9 in 0.2 s\n")

    def test_verbose_resume_lines(self) -> None:
        """
        With C{-v}, the first report after a retry gets a line too: where
        the file resumes and from which offset; without it, none.
        """
        for verbose, expected in ((True, 1), (False, 0)):
            clock = Clock()
            stream = io.StringIO()
            display = PlainProgress(stream, BatchTally({"a.tif": 4096}, clock.seconds), clock,
                                    verbose=verbose)
            display(Progress("a.tif", "uploading", 1024, 4096, "node-a"))
            display(Progress("a.tif", "retrying", 1024, 4096, "node-a",
                             note="connection lost, retry 1/9 in 0.2 s"))
            display(Progress("a.tif", "uploading", 1024, 4096, "node-b"))
            display(Progress("a.tif", "uploading", 2048, 4096, "node-b"))
            lines = stream.getvalue().splitlines()
            self.assertEqual(lines[0], "imgresume: a.tif: connection lost, retry 1/9 in 0.2 s")
            self.assertEqual(lines[1:], [
                "imgresume: a.tif: resuming at 1.0 KiB on node-b (another server)",
            ][:expected])

# -*- test-case-name: tests.cli.test_interrupt -*-
"""
Interrupted uploads never exit 0 (issue 12, item 1), on real processes: the
real C{python -m imgresume upload} against a real C{twistd imgresume}, sent
SIGINT or SIGTERM mid-transfer, exits 130 or 143, says which files are
unfinished (a JSON object each with C{--json}), leaves a journal the same
command resumes from, and the rerun completes with the stored bytes
verified.  Also L{Interruptions} and L{run_on_reactor} in process.
"""

from __future__ import annotations

import json
import os
import random
import signal

from blake3 import blake3
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase, TestCase

from imgresume.cli._run import Interruptions
from tests.support.processes import (
    PythonChild,
    TwistdServer,
    child_env,
    incoming_bytes,
    run_python,
    wait_until,
)

#: Small packets, one in flight: a transfer slow enough to interrupt.
SLOW = ("--chunk-size", "16K", "--window", "1")

#: The file interrupted: still sending for a second or more after the
#: server holds 1 MiB of it, even on a fast machine.
LARGE = 8 * 1024 * 1024


class InterruptTests(TestCase):
    """C{imgresume upload} interrupted by a signal, then run again."""

    timeout = 120

    def setUp(self) -> None:
        self.work = os.path.abspath(self.mktemp())
        os.makedirs(self.work)
        self.env = child_env(XDG_STATE_HOME=os.path.join(self.work, "state"))

    def make_file(self, name: str, size: int, seed: int) -> tuple[str, bytes]:
        """A file of C{size} reproducible bytes below the test's directory."""
        path = os.path.join(self.work, *name.split("/"))
        os.makedirs(os.path.dirname(path), exist_ok=True)
        content = random.Random(seed).randbytes(size)
        with open(path, "wb") as f:
            f.write(content)
        return path, content

    async def interrupt_mid_transfer(self, server: TwistdServer, argv: list[str],
                                     signal_name: str) -> tuple[int | None, str, str]:
        """Run the command; once the server holds 1 MiB of it, send the signal."""
        child = PythonChild(argv, self.env)
        await wait_until(lambda: incoming_bytes(server.storage) >= 1024 * 1024
                         or child.proto.ended.called, what="1 MiB stored")
        self.assertFalse(child.proto.ended.called, child.err)
        child.signal(signal_name)
        code = await child.ended()
        return code, child.out, child.err

    async def test_sigint_json(self) -> None:
        """
        SIGINT (Ctrl-C) mid-transfer with --json: exit 130, one JSON object
        for the unfinished file (status "interrupted", the bytes the server
        acknowledged, its upload id), "interrupted: 1 of 1 files
        unfinished" on stderr; the same command run again resumes from the
        journal's upload past the acknowledged offset, exits 0, and the
        stored file is the local one.
        """
        server = await TwistdServer(self).start()
        path, content = self.make_file("scan.tif", LARGE, 1)
        argv = ["-m", "imgresume", "upload", "--to", server.endpoint, "--json", *SLOW, path]
        code, out, err = await self.interrupt_mid_transfer(server, argv, "INT")
        self.assertEqual(code, 130, err)
        [row] = [json.loads(line) for line in out.splitlines()]
        self.assertEqual(row["status"], "interrupted")
        self.assertEqual((row["local"], row["name"], row["size"]),
                         (path, "scan.tif", len(content)))
        self.assertGreater(row["bytes_acknowledged"], 0)
        self.assertLess(row["bytes_acknowledged"], len(content))
        self.assertRegex(row["upload_id"], r"\A[0-9a-f]{32}\Z")
        self.assertIn("imgresume: interrupted: 1 of 1 files unfinished; run the same command "
                      "again to resume", err)
        self.assertNotIn("Traceback", err)

        out, err, code = await run_python(argv, self.env, timeout=90)
        self.assertEqual(code, 0, err)
        [result] = [json.loads(line) for line in out.splitlines()]
        self.assertEqual(result["upload_id"], row["upload_id"])
        self.assertEqual(len(result["resumed_at"]), 1)
        self.assertGreaterEqual(result["resumed_at"][0], row["bytes_acknowledged"])
        self.assertEqual(result["bytes_sent"], len(content) - result["resumed_at"][0])
        digest = blake3(content).hexdigest()  # the default digest
        self.assertEqual(result["digest"], {"algorithm": "blake3", "hex": digest})
        self.assertEqual(blake3(server.stored(result["path"])).hexdigest(), digest)

    async def test_sigterm_batch(self) -> None:
        """
        SIGTERM during a directory upload (plain output): exit 143; stderr
        names the files unfinished (the large one with its acknowledged
        bytes) and says "interrupted: N of 3 files unfinished"; no line on
        stdout claims an unfinished file stored; the rerun stores every
        file, the finished ones confirmed without being sent again.
        """
        server = await TwistdServer(self).start()
        files = dict([self.make_file("scans/a-small.tif", 100_000, 2),
                      self.make_file("scans/b-large.tif", LARGE, 3),
                      self.make_file("scans/c-later.tif", 100_000, 4)])
        root = os.path.join(self.work, "scans")
        argv = ["-m", "imgresume", "upload", "--to", server.endpoint, "--parallel", "1",
                *SLOW, root]
        code, out, err = await self.interrupt_mid_transfer(server, argv, "TERM")
        self.assertEqual(code, 143, err)
        self.assertRegex(err, r"imgresume: interrupted: 2 of 3 files unfinished; run the same "
                              r"command again to resume")
        large = os.path.join(root, "b-large.tif")
        self.assertRegex(err, rf"  {large}: \d+ of {LARGE} bytes acknowledged")
        self.assertIn(f"  {os.path.join(root, 'c-later.tif')}: not started", err)
        self.assertEqual(out.splitlines(), [
            f"a-small.tif: 100000 bytes stored at complete/a-small.tif, blake3 "
            f"{blake3(files[os.path.join(root, 'a-small.tif')]).hexdigest()} verified"])

        out, err, code = await run_python([*argv, "--json"], self.env, timeout=90)
        self.assertEqual(code, 0, err)
        results = {r["name"]: r for r in map(json.loads, out.splitlines())}
        self.assertTrue(results["a-small.tif"]["already_complete"])
        self.assertGreater(results["b-large.tif"]["resumed_at"][0], 0)
        for local, content in files.items():
            result = results[os.path.basename(local)]
            self.assertEqual(server.stored(result["path"]), content)


class InterruptionsTests(SynchronousTestCase):
    """L{Interruptions}: the signal handlers of the command, in process."""

    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()
        self.reactor.running = True
        for number in (signal.SIGINT, signal.SIGTERM):
            self.addCleanup(signal.signal, number, signal.getsignal(number))

    def test_first_signal_stops_the_reactor(self) -> None:
        """
        The first SIGTERM is remembered (exit code 143) and stops the
        reactor from the reactor thread; without one there is no exit code.
        """
        stopped: list[bool] = []
        self.reactor.callFromThread = lambda f, *a: f(*a)  # type: ignore[method-assign]
        self.reactor.stop = lambda: stopped.append(True)  # type: ignore[method-assign]
        caught = Interruptions(self.reactor)
        self.assertIsNone(caught.exit_code())
        caught.install()
        self.assertEqual(signal.getsignal(signal.SIGINT), caught._received)
        caught._received(signal.SIGTERM, None)
        self.assertEqual((caught.signal, caught.exit_code(), stopped),
                         (signal.SIGTERM, 143, [True]))

    def test_second_signal_kills(self) -> None:
        """A second signal restores the default action and sends itself again."""
        sent: list[tuple[int, int]] = []
        self.patch(os, "kill", lambda pid, number: sent.append((pid, number)))
        self.reactor.callFromThread = lambda f, *a: None  # type: ignore[method-assign]
        caught = Interruptions(self.reactor)
        caught.install()
        caught._received(signal.SIGINT, None)
        caught._received(signal.SIGINT, None)
        self.assertEqual(sent, [(os.getpid(), signal.SIGINT)])
        self.assertEqual(signal.getsignal(signal.SIGINT), signal.SIG_DFL)

# -*- test-case-name: tests.cli.test_directory_upload -*-
"""
A directory upload on real processes: C{python -m imgresume upload DIR
--parallel 3} against a real C{twistd imgresume}, SIGKILLed mid-batch and
run again to completion.  The server's metrics prove that the files shared
connections; every stored file's SHA-256 is checked, and no file is stored
twice.
"""

from __future__ import annotations

import json
import os
import random
import re
import sys
import urllib.request
from typing import Any

from blake3 import blake3
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from imgresume.testing import free_tcp_port
from tests.support.processes import REPO_ROOT, TwistdServer, child_env, run_python


class _KillAfterLines(ProcessProtocol):
    """
    Collects a child's stdout; once C{lines} complete lines have come, kills
    it with SIGKILL.  C{ended} fires when it is gone.
    """

    def __init__(self, lines: int) -> None:
        self.lines = lines
        self.out = bytearray()
        self.err = bytearray()
        self.killed = False
        self.ended: Deferred[None] = Deferred()

    def outReceived(self, data: bytes) -> None:
        self.out += data
        if not self.killed and self.out.count(b"\n") >= self.lines:
            self.killed = True
            self.transport.signalProcess("KILL")

    def errReceived(self, data: bytes) -> None:
        self.err += data

    def processEnded(self, reason: Any) -> None:
        self.ended.callback(None)


def metric(port: int, name: str) -> float:
    """One unlabelled sample of the server's /metrics (blocking)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        text = r.read().decode()
    m = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
    assert m is not None, f"{name} not in the metrics"
    return float(m.group(1))


class DirectoryUploadTests(TestCase):
    """C{imgresume upload DIR --parallel 3}, interrupted and run again."""

    timeout = 180

    def make_tree(self, root: str) -> dict[str, bytes]:
        """
        30 files below C{root}, by remote name: a large one first (it is
        still uploading when the first run is killed) and 29 small ones,
        some in subdirectories.
        """
        rng = random.Random(2026)
        files = {"a-large.tif": rng.randbytes(6 * 1024 * 1024)}
        for i in range(29):
            files[f"{'day-2/' if i % 3 else ''}page-{i:02d}.tif"] = rng.randbytes(
                rng.randrange(64 * 1024, 256 * 1024))
        for name, content in files.items():
            path = os.path.join(root, *name.split("/"))
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "wb") as f:
                f.write(content)
        return files

    async def test_sigkill_and_rerun(self) -> None:
        """
        The first run is SIGKILLed after it reported five files; the same
        command run again resumes the large file from the offset the server
        proves, confirms the files the first run finished (the small ones
        by the same PUT, which stores nothing twice), uploads the rest and
        exits 0.  Every file is stored
        once, under its relative path, with its SHA-256; the two runs used
        at most three connections each for 30 files.
        """
        metrics_port = free_tcp_port()
        server = await TwistdServer(
            self, "--metrics", f"tcp:{metrics_port}:interface=127.0.0.1").start()
        work = os.path.abspath(self.mktemp())
        root = os.path.join(work, "scans")
        files = self.make_tree(root)
        env = child_env(XDG_STATE_HOME=os.path.join(work, "state"))
        argv = ["-m", "imgresume", "upload", "--to", server.endpoint, "--parallel", "3",
                "--json", "--chunk-size", "16K", "--window", "1", root]
        connections_before = await deferToThread(
            metric, metrics_port, "imgresume_connections_total")

        first = _KillAfterLines(5)
        reactor.spawnProcess(first, sys.executable, [sys.executable, *argv], env=env,
                             path=REPO_ROOT)
        await first.ended
        self.assertTrue(first.killed, first.err.decode())
        complete_lines = first.out.split(b"\n")[:-1]  # not a line cut by the kill
        finished_first = {json.loads(line)["name"] for line in complete_lines}
        self.assertGreaterEqual(len(finished_first), 5)
        self.assertLess(len(finished_first), len(files))
        self.assertNotIn("a-large.tif", finished_first)

        out, err, code = await run_python(argv, env, timeout=120)
        self.assertEqual(code, 0, err)
        results = {r["name"]: r for r in map(json.loads, out.splitlines())}
        self.assertEqual(sorted(results), sorted(files))
        for name, content in files.items():
            result = results[name]
            digest = blake3(content).hexdigest()  # the default digest
            self.assertEqual(result["digest"], {"algorithm": "blake3", "hex": digest}, name)
            self.assertEqual(result["path"], f"complete/{name}")
            self.assertEqual(blake3(server.stored(result["path"])).hexdigest(), digest)
            if result["already_complete"]:
                # A resumed upload is confirmed by its RESUME, nothing sent;
                # a small file stored whole is confirmed by the same PUT (its
                # bytes sent again, the server storing nothing twice).
                small = len(content) <= 4 * 1024 * 1024  # --max-put's default
                self.assertEqual(result["bytes_sent"], len(content) if small else 0, name)
        # What the first run reported (and perhaps a few more it finished
        # before the kill landed) is confirmed, not sent again.
        already = {name for name, r in results.items() if r["already_complete"]}
        self.assertLessEqual(finished_first, already)
        self.assertLess(len(already), len(files))
        large = results["a-large.tif"]
        self.assertEqual(len(large["resumed_at"]), 1)
        self.assertGreater(large["resumed_at"][0], 0)
        self.assertEqual(large["bytes_sent"], large["size"] - large["resumed_at"][0])
        stored = [os.path.relpath(os.path.join(d, f), os.path.join(server.storage, "complete"))
                  for d, _, names in os.walk(os.path.join(server.storage, "complete"))
                  for f in names]
        self.assertEqual(sorted(stored), sorted(files))  # nothing stored twice
        self.assertIn("imgresume: 30 of 30 files stored and verified", err)
        connections = await deferToThread(metric, metrics_port, "imgresume_connections_total")
        self.assertLessEqual(connections - connections_before, 6)

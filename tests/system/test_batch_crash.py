"""
A scanner's batch of small files, sent as PUTs, survives a server SIGKILLed
in the middle of it (issue 16): the real C{imgresume upload DIR --parallel
4} console script through a real C{twistd imgresume-lb} to three real
C{twistd imgresume} servers on one storage directory.  The command exits
0, every file is in C{complete/} exactly once with its source's SHA-256
(no renamed duplicate), and what is left in C{incoming/} is what garbage
collection removes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

from twisted.trial.unittest import SynchronousTestCase

from imgresume.testing import LocalCluster
from tests.support.cluster import sha256_file
from tests.support.marks import slow
from tests.support.processes import child_env

#: The console script of this environment (what a user runs).
IMGRESUME = os.path.join(os.path.dirname(sys.executable), "imgresume")
#: Files per subdirectory of the batch: a few directories, as a scanner makes.
DIRECTORIES = 3


class BatchKillTestCase(SynchronousTestCase):
    """Upload a directory of small files while one server is SIGKILLed."""

    def setUp(self) -> None:
        self.work = os.path.abspath(self.mktemp())
        os.makedirs(self.work)

    def start_cluster(self) -> None:
        """Three servers and a balancer (in the test, so a skipped test starts none)."""
        self.cluster = LocalCluster(self.work, servers=3).start()
        self.addCleanup(self.cluster.stop)
        self.complete = os.path.join(self.cluster.storage, "complete")

    def write_batch(self, count: int, low: int, high: int) -> dict[str, str]:
        """C{count} files of C{low} to C{high} random bytes; their SHA-256 by name."""
        source = os.path.join(self.work, "batch")
        digests = {}
        sizes = os.urandom(count * 4)
        for i in range(count):
            name = f"d{i % DIRECTORIES}/scan-{i:05d}.tif"
            size = low + int.from_bytes(sizes[4 * i:4 * i + 4], "big") % (high - low + 1)
            data = os.urandom(size)
            path = os.path.join(source, name)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "wb") as f:
                f.write(data)
            digests[name] = sha256_file(path)
        return digests

    def stored(self) -> list[str]:
        """The files in complete/, by path relative to it."""
        found = []
        for top, _dirs, files in os.walk(self.complete):
            found += [os.path.relpath(os.path.join(top, f), self.complete) for f in files]
        return found

    def stored_by(self, server: str) -> int:
        """How many files C{server} logged as stored in one step."""
        with open(self.cluster.servers[server].log, encoding="utf-8", errors="replace") as f:
            return sum(" in one step: upload " in line and "stored " in line for line in f)

    def upload_with_kill(self, digests: dict[str, str], journal: bool,
                         kill_after: int) -> tuple[list[dict], str]:
        """
        Run C{imgresume upload batch --parallel 4} and SIGKILL one server
        once C{kill_after} files are stored; the per-file JSON results and
        the name of the server killed.
        """
        # Retries at most a second apart: a client that waits no longer than
        # that must still get through the storage's window of doubt about a
        # PUT cut short by the kill (it used to give up after 10 attempts).
        args = [IMGRESUME, "upload", "--to", self.cluster.lb_endpoint, "--parallel", "4",
                "--json", "--quiet", "--backoff-max", "1s", "batch"]
        if not journal:
            args.insert(-1, "--no-journal")
        env = child_env(XDG_STATE_HOME=os.path.join(self.work, "state"))
        with open(os.path.join(self.work, "upload.err"), "wb") as err:
            proc = subprocess.Popen(args, env=env, cwd=self.work, stdout=subprocess.PIPE,
                                    stderr=err)
            killed, stored = None, 0
            deadline = time.monotonic() + 60
            while killed is None and time.monotonic() < deadline and proc.poll() is None:
                stored = len(self.stored())
                if stored >= kill_after:
                    # The server that has stored most is surely serving some.
                    killed = max(self.cluster.servers, key=self.stored_by)
                    self.cluster.kill(killed)
                else:
                    time.sleep(0.002)
            out, _ = proc.communicate(timeout=120)
        with open(os.path.join(self.work, "upload.err"), encoding="utf-8") as f:
            errors = f.read()
        self.assertIsNotNone(killed, f"the batch ended before {kill_after} files were "
                             f"stored: {errors}")
        self.assertLess(stored, len(digests), "killed after the batch was stored")
        self.assertEqual(proc.returncode, 0, errors)
        results = [json.loads(line) for line in out.decode().splitlines() if line.strip()]
        return results, killed

    def check_storage(self, digests: dict[str, str], results: list[dict]) -> None:
        """Every file once, its bytes; no other file; incoming/ left to GC."""
        self.assertEqual(sorted(self.stored()), sorted(digests))
        for name, digest in digests.items():
            self.assertEqual(sha256_file(os.path.join(self.complete, name)), digest, name)
        self.assertEqual(sorted(r["path"] for r in results),
                         sorted(f"complete/{name}" for name in digests))
        self.cluster.stop()
        gc = subprocess.run(
            [IMGRESUME, "gc", "--storage", self.cluster.storage, "--older-than", "0s",
             "--records-older-than", "0s", "--json"],
            env=child_env(), capture_output=True, timeout=60)
        self.assertEqual(gc.returncode, 0, gc.stderr.decode())
        report = json.loads(gc.stdout)
        self.assertEqual(report.get("errors", []), [])
        left = []
        for top, _dirs, files in os.walk(self.cluster.storage):
            if not os.path.relpath(top, self.complete).startswith(os.pardir):
                continue  # complete/ itself
            left += [os.path.join(top, f) for f in files]
        self.assertEqual(left, [])
        # GC never touches complete/.
        self.assertEqual(sorted(self.stored()), sorted(digests))

    def run_batch(self, count: int, journal: bool) -> None:
        self.start_cluster()
        digests = self.write_batch(count, 64 * 1024, 256 * 1024)
        results, killed = self.upload_with_kill(digests, journal, kill_after=count // 3)
        self.assertGreater(self.stored_by(killed), 0)
        # The kill cut PUTs short: they went again through another server.
        moved = [r for r in results if r["servers"][0] == killed and len(r["servers"]) > 1]
        self.assertNotEqual(moved, [])
        self.assertNotIn(killed, [s for r in moved for s in r["servers"][1:]])
        self.check_storage(digests, results)


class BatchKillTests(BatchKillTestCase):
    """A batch of a hundred small files; one server SIGKILLed a third of the way."""

    def test_no_journal(self) -> None:
        """Without a journal: every file stored once, verified, nothing left over."""
        self.run_batch(120, journal=False)

    def test_journal(self) -> None:
        """With the journal: the same."""
        self.run_batch(120, journal=True)


class LargeBatchKillTests(BatchKillTestCase):
    """The issue's size: 300 files of 64 to 256 KiB."""

    @slow
    def test_no_journal(self) -> None:
        """Without a journal: every file stored once, verified, nothing left over."""
        self.run_batch(300, journal=False)

    @slow
    def test_journal(self) -> None:
        """With the journal: the same."""
        self.run_batch(300, journal=True)

"""
Failover on real processes: `twistd imgresume` servers and a `twistd
imgresume-lb` balancer as child processes over one storage directory, real
TCP and UNIX sockets, SIGKILL at the worst moment.
"""

import json
import os
import signal
import subprocess
import sys
import time

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from imgresume.testing import LocalCluster
from imgresume.client import Uploader
from tests.support.cluster import KillServingServer, sha256_file, write_random
from tests.support.processes import child_env

CHUNK = 256 * 1024
WINDOW = 4


class ClusterTestCase(TestCase):
    timeout = 120

    def setUp(self) -> None:
        self.work = os.path.abspath(self.mktemp())
        os.makedirs(self.work)
        self.cluster = LocalCluster(self.work, servers=3).start()
        self.addCleanup(self.cluster.stop)

    def uploader(self, **kw) -> Uploader:
        kw.setdefault("backoff_base", 0.05)
        kw.setdefault("backoff_max", 0.5)
        return Uploader(self.cluster.lb_endpoint, reactor=reactor, journal=None,
                        chunk_size=CHUNK, window=WINDOW, client_id="test", digest="sha256",
                        **kw)

    def stored_sha256(self, path: str) -> str:
        return sha256_file(os.path.join(self.cluster.storage, path))


class ServerKilledTests(ClusterTestCase):
    async def test_sigkill_serving_server_mid_upload(self) -> None:
        """The server receiving the upload is SIGKILLed; the client finishes on another."""
        size = 48 * 1024 * 1024 + 12345
        path = os.path.join(self.work, "scan.tif")
        digest = write_random(path, size)
        kill = KillServingServer(self.cluster, after=size // 3)
        result = await self.uploader().upload(path, "scans/scan.tif", progress=kill)
        kill.check(self, result)
        self.assertEqual(result.sha256, digest)
        self.assertEqual(self.stored_sha256(result.path), digest)
        self.assertEqual(len(result.resumed_at), len(result.servers) - 1)
        self.assertGreater(result.resumed_at[0], size // 3)
        # Never starts over: at most a window of chunks is sent twice.
        self.assertLessEqual(result.bytes_sent, size + WINDOW * CHUNK)

    async def test_backend_down_before_upload(self) -> None:
        """A server that is already dead is skipped by the balancer."""
        self.cluster.kill("node-1")
        self.cluster.kill("node-2")
        path = os.path.join(self.work, "small.tif")
        digest = write_random(path, 3 * CHUNK + 1)
        results = [await self.uploader().upload(path, f"f{i}.tif") for i in range(3)]
        for r in results:
            self.assertEqual(r.servers, ["node-3"])
            self.assertEqual(self.stored_sha256(r.path), digest)
            self.assertEqual(r.attempts, 1)

    async def test_all_servers_dead_then_one_returns(self) -> None:
        """With every server down the client retries until one comes back."""
        for name in self.cluster.servers:
            self.cluster.kill(name)
        path = os.path.join(self.work, "x.tif")
        digest = write_random(path, CHUNK)
        d = self.uploader(max_attempts=50).upload(path)
        await deferLater(0.5)
        await deferToThread(self.cluster.start_node, self.cluster.servers["node-2"])
        result = await d
        self.assertEqual(result.sha256, digest)
        self.assertGreater(result.attempts, 1)
        self.assertEqual(result.servers[-1], "node-2")


class ClientKilledTests(ClusterTestCase):
    def run_cli(self, *args: str) -> subprocess.Popen:
        return subprocess.Popen(
            [sys.executable, "-m", "imgresume", "upload", "--to", self.cluster.lb_endpoint,
             "--chunk-size", str(CHUNK), "--json", "--digest", "sha256", *args],
            env={**child_env(), "XDG_STATE_HOME": os.path.join(self.work, "state")},
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=self.work,
        )

    def journal_bytes(self) -> int:
        incoming = os.path.join(self.cluster.storage, "incoming")
        total = 0
        for entry in os.listdir(incoming) if os.path.isdir(incoming) else []:
            journal = os.path.join(incoming, entry, "journal")
            if os.path.exists(journal):
                total += os.path.getsize(journal)
        return total

    def test_sigkill_client_and_rerun(self) -> None:
        """A client SIGKILLed mid-upload resumes when the same command runs again."""
        size = 24 * 1024 * 1024
        path = os.path.join(self.work, "big.tif")
        digest = write_random(path, size)
        first = self.run_cli(path)
        deadline = time.monotonic() + 60
        while self.journal_bytes() < 20 * 40 and time.monotonic() < deadline:
            self.assertIsNone(first.poll(), first.stderr.read() if first.poll() is not None else "")
            time.sleep(0.005)
        first.send_signal(signal.SIGKILL)
        first.wait()
        self.assertGreater(self.journal_bytes(), 0)
        second = self.run_cli(path)
        out, err = second.communicate(timeout=90)
        self.assertEqual(second.returncode, 0, err.decode())
        result = json.loads(out.decode().strip())
        for field in ("name", "upload_id", "size", "sha256", "path", "resumed_at", "bytes_sent"):
            self.assertIn(field, result)
        self.assertEqual(result["sha256"], digest)
        self.assertEqual(self.stored_sha256(result["path"]), digest)
        self.assertEqual(len(result["resumed_at"]), 1)
        self.assertGreater(result["resumed_at"][0], 0)
        self.assertEqual(result["bytes_sent"], size - result["resumed_at"][0])


class TwistdPluginTests(TestCase):
    def test_twistd_lists_plugins(self) -> None:
        """`twistd --help` lists both imgresume subcommands."""
        out = subprocess.run(
            [sys.executable, "-c", "from twisted.scripts.twistd import run; run()", "--help"],
            env=child_env(), capture_output=True, text=True, check=True, cwd="/",
        ).stdout
        self.assertIn("imgresume ", out)
        self.assertIn("imgresume-lb", out)

    def test_server_usage_error(self) -> None:
        """`twistd imgresume` without --storage says what is missing."""
        proc = subprocess.run(
            [sys.executable, "-c", "from twisted.scripts.twistd import run; run()",
             "-n", "imgresume", "--listen", "tcp:0"],
            env=child_env(), capture_output=True, text=True, cwd="/",
        )
        self.assertNotEqual(proc.returncode, 0)
        self.assertIn("--storage DIR is required", proc.stdout + proc.stderr)


def deferLater(seconds: float) -> Deferred:
    from twisted.internet.task import deferLater as _later

    return _later(reactor, seconds, lambda: None)

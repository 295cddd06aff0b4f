# -*- test-case-name: tests.system.test_tus -*-
"""
tus clients written by others (tuspy, tus-js-client under Node) against
real C{twistd imgresume --http} processes: one server, then three over one
storage directory behind C{twistd imgresume-lb --check-mode connect} with
the serving server SIGKILLed mid-upload.  The client's own retry logic
finishes on another server; the stored file is byte-identical; the bytes
sent again are under one PATCH's worth.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SkipTest, SynchronousTestCase, TestCase

from tests.support.cluster import sha256_file, write_random
from tests.support.tus import (
    NODE_SCRIPT,
    TusCluster,
    node_client,
    patch_offsets,
    trust_ca,
    tuspy,
    upload_killing_serving,
)

MiB = 1 << 20


class TusClusterTestCase(TestCase):
    timeout = 180

    def start(self, servers: int) -> TusCluster:
        self.work = os.path.abspath(self.mktemp())
        os.makedirs(self.work)
        cluster = TusCluster(self.work, servers=servers).start_for(self)
        self.cluster = cluster
        return cluster

    def stored(self, name: str) -> str:
        return sha256_file(os.path.join(self.cluster.storage, "complete", name))

    def check_resent(self, offsets: list[int], patch: int) -> None:
        """Offsets never go back past a PATCH's start: re-sent < one PATCH."""
        for before, after in zip(offsets, offsets[1:]):
            self.assertGreaterEqual(after, before, offsets)
        self.assertLessEqual(len(offsets), 64 * MiB // patch + 4, offsets)


class TuspyTests(TusClusterTestCase):
    """tuspy (the Python tus client) uploads through real servers."""

    async def test_one_server(self) -> None:
        """A file uploaded in several PATCHes is stored whole and verified."""
        client, _ = tuspy()
        cluster = self.start(1)
        path = os.path.join(self.work, "scan.tif")
        digest = write_random(path, 5 * MiB + 123)
        url = f"http://127.0.0.1:{cluster.http['node-1']}/files/"

        def upload() -> str:
            up = client.TusClient(url).uploader(
                path, chunk_size=MiB, metadata={"filename": "scans/scan.tif"})
            up.upload()
            return up.url

        location = await deferToThread(upload)
        self.assertIn("/files/", location)
        self.assertEqual(self.stored("scans/scan.tif"), digest)

    async def test_sigkill_serving_server(self) -> None:
        """
        Through the balancer, the server holding the upload is SIGKILLed;
        tuspy's own retries (HEAD, then PATCH from the proven offset) finish
        on another server, the stored file is byte-identical, and no PATCH
        starts before the one that was cut.
        """
        client, _ = tuspy()
        cluster = self.start(3)
        size = 48 * MiB + 4567
        patch = 4 * MiB
        path = os.path.join(self.work, "big.tif")
        digest = write_random(path, size)
        offsets = patch_offsets(self)

        def upload() -> str:
            up = client.TusClient(cluster.url).uploader(
                path, chunk_size=patch, retries=10, retry_delay=1,
                metadata={"filename": "big.tif"})
            up.upload()
            return up.url

        _, killed = await upload_killing_serving(cluster, size // 3, upload)
        self.assertEqual(len(killed), 1, cluster.logs())
        self.assertEqual(self.stored("big.tif"), digest)
        self.check_resent(offsets, patch)


class NodeClientTests(TusClusterTestCase):
    """tus-js-client 4.3.1 under Node uploads through real servers."""

    def run_node(self, path: str, endpoint: str, chunk: str, name: str,
                 defer: bool = False) -> dict:
        cache, why = node_client()
        if cache is None:
            raise SkipTest(why)
        script = os.path.join(self.work, "upload.mjs")
        with open(script, "w") as f:
            f.write(NODE_SCRIPT)
        extra = ["", "defer"] if defer else []  # no Authorization; uploadLengthDeferred
        out = subprocess.run(["node", script, cache, path, endpoint, chunk, name, *extra],
                             capture_output=True, text=True, timeout=150)
        lines = out.stdout.strip().splitlines()
        self.assertTrue(lines, out.stderr)
        return json.loads(lines[-1])

    async def test_one_patch_killed_mid_body(self) -> None:
        """
        The whole file in one PATCH, its server SIGKILLed mid-body: what
        was made durable is kept (the retry starts past 0), and
        tus-js-client's retries finish on another server.
        """
        self.start(3)
        size = 64 * MiB + 99
        path = os.path.join(self.work, "one.bin")
        digest = write_random(path, size)
        result, killed = await upload_killing_serving(
            self.cluster, size // 3, self.run_node, path, self.cluster.url, "inf", "js/one.bin")
        self.assertNotIn("error", result, self.cluster.logs())
        self.assertEqual(len(killed), 1)
        self.assertEqual(self.stored("js/one.bin"), digest)
        offsets = result["offsets"]
        self.assertEqual(offsets[0], 0)
        self.assertGreater(len(offsets), 1, offsets)
        self.assertGreater(offsets[1], 0, offsets)
        self.check_resent(offsets, size)

    async def test_chunked_killed(self) -> None:
        """Chunked PATCHes through the balancer, the serving server SIGKILLed."""
        self.start(3)
        size = 40 * MiB + 7
        patch = 4 * MiB
        path = os.path.join(self.work, "chunked.bin")
        digest = write_random(path, size)
        result, _ = await upload_killing_serving(
            self.cluster, size // 3, self.run_node, path, self.cluster.url, str(patch),
            "js/chunked.bin")
        self.assertNotIn("error", result, self.cluster.logs())
        self.assertEqual(self.stored("js/chunked.bin"), digest)
        self.check_resent(result["offsets"], patch)

    async def test_length_deferred_killed(self) -> None:
        """
        tus-js-client with uploadLengthDeferred (creation-defer-length) on
        a stream of unknown length: chunked PATCHes through the balancer
        without a length, the serving server SIGKILLed; its retries (HEAD
        answering Upload-Defer-Length on another server) go on, the last
        PATCH declares Upload-Length, and the stored file is byte-identical.
        """
        self.start(3)
        size = 40 * MiB + 11
        patch = 4 * MiB
        path = os.path.join(self.work, "deferred.bin")
        digest = write_random(path, size)
        result, killed = await upload_killing_serving(
            self.cluster, size // 3, self.run_node, path, self.cluster.url, str(patch),
            "js/deferred.bin", True)
        self.assertNotIn("error", result, self.cluster.logs())
        self.assertEqual(len(killed), 1)
        self.assertEqual(self.stored("js/deferred.bin"), digest)
        self.check_resent(result["offsets"], patch)
        self.assertTrue(result["lengths"], result)
        self.assertEqual({length for _, length in result["lengths"]}, {size})
        self.assertGreater(result["lengths"][0][0], size // 3)


class ChildPathTests(SynchronousTestCase):
    """The clusters' children import this checkout, and the standard library's http."""

    def test_cluster_pythonpath(self) -> None:
        """
        LocalCluster puts the checkout first on PYTHONPATH, not imgresume/
        itself (where imgresume/http would shadow the standard library's
        http, and twistd could not start).
        """
        from imgresume.testing import LocalCluster

        cluster = LocalCluster(self.mktemp(), servers=1)
        self.addCleanup(cluster.stop)
        first = cluster._env()["PYTHONPATH"].split(os.pathsep)[0]
        self.assertTrue(os.path.isfile(os.path.join(first, "imgresume", "__init__.py")))
        out = subprocess.run(
            [sys.executable, "-c", "import http.client, imgresume.http; print('ok')"],
            env=cluster._env(), cwd="/", capture_output=True, text=True)
        self.assertEqual(out.stdout.strip(), "ok", out.stderr)


class SecureTests(TusClusterTestCase):
    """The secure set-up: --keys and --http over TLS, tuspy with a bearer key."""

    async def test_keys_over_tls(self) -> None:
        """
        A server with --keys serving tus over ssl:: tuspy, checking the
        server's certificate and sending Authorization: Bearer, uploads; a
        request without the key gets 401.
        """
        client, _ = tuspy()
        import requests

        from imgresume.keys import add_client
        from tests.support.tls import PKI

        self.work = os.path.abspath(self.mktemp())
        os.makedirs(self.work)
        pki = PKI(os.path.join(self.work, "pki"))
        keys = os.path.join(self.work, "keys.json")
        key = add_client(keys, "scanner-7")
        cluster = TusCluster(self.work, servers=1, server_args=("--keys", keys),
                             http=lambda port: pki.ssl_listen(port))
        cluster.start_for(self)
        self.cluster = cluster
        url = f"https://127.0.0.1:{cluster.http['node-1']}/files/"
        path = os.path.join(self.work, "secret.tif")
        digest = write_random(path, 3 * MiB + 1)
        trust_ca(self, pki.ca_file)  # tuspy's requests trust the test CA

        def upload() -> tuple[int, str]:
            refused = requests.post(url, headers={"Tus-Resumable": "1.0.0",
                                                  "Upload-Length": "1"}, verify=pki.ca_file)
            tus = client.TusClient(url, headers={
                "Authorization": f"Bearer scanner-7:{key.hex()}"})
            tus.uploader(path, chunk_size=MiB, metadata={"filename": "secret.tif"}).upload()
            return refused.status_code, refused.text

        status, reason = await deferToThread(upload)
        self.assertEqual(status, 401)
        self.assertIn("Bearer", reason)
        self.assertEqual(self.stored("secret.tif"), digest)

# -*- test-case-name: tests.system.test_haproxy_tus -*-
"""
The tus door behind a real HAProxy in HTTP mode: the C{haproxy} binary
running the shipped C{docs/examples/haproxy-tus.cfg} (adapted only in
addresses, paths, logging and check intervals, L{render_tus_config}),
HTTPS on both sides, in front of three real C{twistd imgresume --keys
--http ssl:...} processes over one storage directory.  tuspy uploads with
its bearer key; the server holding the upload is SIGKILLed mid-upload;
HAProxy's health check (C{OPTIONS /files/}) marks it DOWN; tuspy's own
retries finish on another server, byte for byte.

Skipped when HAProxy or tuspy is missing; with
C{IMGRESUME_REQUIRE_HAPROXY=1} (as in CI) a missing HAProxy is a failure.
"""

from __future__ import annotations

import os
import subprocess
import time

from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SkipTest, SynchronousTestCase, TestCase

from imgresume.keys import add_client
from imgresume.testing import (
    TUS_BACKEND,
    TUS_EXAMPLE_CONFIG,
    find_haproxy,
    render_tus_config,
    show_stat,
)
from tests.support.cluster import sha256_file, write_random
from tests.support.tls import PKI
from tests.support.tus import (
    TusCluster,
    patch_offsets,
    trust_ca,
    tuspy,
    upload_killing_serving,
)

MiB = 1 << 20
HAPROXY = find_haproxy()
REQUIRED = os.environ.get("IMGRESUME_REQUIRE_HAPROXY") == "1"


def haproxy_or_skip(test: SynchronousTestCase) -> str:
    """The C{haproxy} binary; else skip C{test}, or fail it if HAProxy is required."""
    if HAPROXY is None:
        why = "haproxy is not installed (Debian: apt-get install -y haproxy)"
        if REQUIRED:
            test.fail(why + ", and IMGRESUME_REQUIRE_HAPROXY=1 requires it.")
        raise SkipTest(why)
    return HAPROXY


def example() -> str:
    with open(TUS_EXAMPLE_CONFIG) as f:
        return f.read()


def haproxy_pem(pki: PKI, directory: str) -> str:
    """The certificate and key of C{pki}'s server in one PEM, as HAProxy's C{crt} takes."""
    pem, key = pki.server
    path = os.path.join(directory, "haproxy.pem")
    with open(path, "wb") as out:
        for part in (pem, key):
            with open(part, "rb") as f:
                out.write(f.read())
    return path


class HAProxyTusCluster(TusCluster):
    """
    L{TusCluster} with HAProxy (the tus example, HTTPS both sides) in place
    of C{imgresume-lb}: servers with C{--keys} serving tus on C{ssl:}.
    """

    def __init__(self, directory: str, haproxy: str, servers: int = 3) -> None:
        directory = os.path.abspath(directory)
        self.pki = PKI(os.path.join(directory, "pki"))
        self.keys = os.path.join(directory, "keys.json")
        self.key = add_client(self.keys, "scanner-7")
        super().__init__(directory, servers=servers, server_args=("--keys", self.keys),
                         http=lambda port: self.pki.ssl_listen(port))
        self.stats_socket = os.path.join(self.sockets, "admin.sock")
        self.config = os.path.join(self.directory, "haproxy-tus.cfg")
        with open(self.config, "w") as f:
            f.write(render_tus_config(
                example(), bind=f"127.0.0.1:{self.lb_port}",
                crt=haproxy_pem(self.pki, self.directory), ca_file=self.pki.ca_file,
                servers=[(name, f"127.0.0.1:{port}", "localhost")
                         for name, port in self.http.items()],
                stats_socket=self.stats_socket))
        self.argv["lb"] = [haproxy, "-W", "-db", "-f", self.config]
        self.url = f"https://127.0.0.1:{self.lb_port}/files/"
        self.authorization = f"Bearer scanner-7:{self.key.hex()}"

    def status(self) -> dict[str, str]:
        """HAProxy's status (UP, DOWN, ...) of each server."""
        prefix = f"{TUS_BACKEND}/"
        return {key[len(prefix):]: row["status"] for key, row in
                show_stat(self.stats_socket).items() if key.startswith(prefix)}

    def wait_for(self, name: str, status: str, timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        seen = None
        while time.monotonic() < deadline:
            try:
                seen = self.status().get(name)
            except OSError:
                seen = None
            if seen == status:
                return
            time.sleep(0.05)
        raise TimeoutError(f"{name} is {seen}, not {status}\n{self.logs()}")

    def logs(self) -> str:
        text = super().logs()
        try:
            with open(self.log("lb") + ".stderr", errors="replace") as f:
                text += "\n== haproxy\n" + f.read()[-4000:]
        except OSError:
            pass
        return text


class ConfigTests(SynchronousTestCase):
    """The example as HAProxy reads it, and its rendering."""

    def test_rendered_config_valid(self) -> None:
        """C{haproxy -c} accepts the rendered example (certificate files included)."""
        haproxy = haproxy_or_skip(self)
        cluster = HAProxyTusCluster(self.mktemp(), haproxy, servers=2)
        self.addCleanup(cluster.stop)
        out = subprocess.run([haproxy, "-c", "-f", cluster.config],
                             capture_output=True, text=True)
        self.assertEqual(out.returncode, 0, out.stdout + out.stderr)

    def test_render_changes_only_what_it_says(self) -> None:
        """Rendering keeps the check, TLS and timeouts, and refuses a drifted template."""
        text = render_tus_config(example(), bind="127.0.0.1:1", crt="/t/c.pem",
                                 ca_file="/t/ca.pem", servers=[("n", "127.0.0.1:2", "h")],
                                 stats_socket="/t/s")
        self.assertIn("http-check send meth OPTIONS uri /files/", text)
        self.assertIn("http-check expect status 204", text)
        self.assertIn("bind 127.0.0.1:1 ssl crt /t/c.pem alpn http/1.1", text)
        self.assertIn("ssl verify required ca-file /t/ca.pem", text)
        self.assertIn("server n 127.0.0.1:2 verifyhost h", text)
        self.assertNotIn("chroot", text.split("defaults")[0].replace("# ", ""))
        with self.assertRaises(ValueError):
            render_tus_config(example().replace("    bind ", "    #bind "), bind="x", crt="c",
                              ca_file="a", servers=[], stats_socket="s")


class TuspyThroughHAProxyTests(TestCase):
    """tuspy through HAProxy (HTTP mode, HTTPS both sides) to three servers."""

    timeout = 180

    async def test_sigkill_serving_server(self) -> None:
        """
        The server holding the upload is SIGKILLed mid-upload: HAProxy's
        OPTIONS check marks it DOWN, tuspy's retries (HEAD, then PATCH
        from the proven offset) finish on another server, the stored file
        is byte-identical, and no PATCH starts before the one cut.
        """
        haproxy = haproxy_or_skip(self)
        client, _ = tuspy()
        self.work = os.path.abspath(self.mktemp())
        cluster = HAProxyTusCluster(self.work, haproxy).start_for(self)
        for name in cluster.http:
            await deferToThread(cluster.wait_for, name, "UP")
        size = 40 * MiB + 4321
        patch = 4 * MiB
        path = os.path.join(self.work, "behind-haproxy.tif")
        digest = write_random(path, size)
        trust_ca(self, cluster.pki.ca_file)
        offsets = patch_offsets(self)

        def upload() -> str:
            tus = client.TusClient(cluster.url, headers={"Authorization": cluster.authorization})
            up = tus.uploader(path, chunk_size=patch, retries=10, retry_delay=1,
                              metadata={"filename": "behind-haproxy.tif"})
            up.upload()
            return up.url

        url, killed = await upload_killing_serving(cluster, size // 3, upload)
        self.assertEqual(len(killed), 1, cluster.logs())
        self.assertTrue(url.startswith(cluster.url), url)
        self.assertEqual(sha256_file(
            os.path.join(cluster.storage, "complete", "behind-haproxy.tif")), digest)
        for a, b in zip(offsets, offsets[1:]):
            self.assertGreaterEqual(b, a, offsets)
        self.assertLessEqual(len(offsets), size // patch + 4, offsets)
        await deferToThread(cluster.wait_for, killed[0], "DOWN")

# -*- test-case-name: tests.system.test_haproxy -*-
"""
imgresume behind a real HAProxy: the C{haproxy} binary (master-worker mode,
in the foreground) in front of three real C{twistd imgresume} processes
that listen with the PROXY protocol, over one storage directory.  HAProxy
runs with the shipped C{docs/examples/haproxy.cfg}, adapted only in
addresses, paths, logging and check intervals (L{render_config}).

Skipped, loudly, when HAProxy is not installed; with
C{IMGRESUME_REQUIRE_HAPROXY=1} (as in CI) a missing HAProxy is a failure.
"""

from __future__ import annotations

import atexit
import os
import re
import shutil
import subprocess
import tempfile
import time
import warnings
from typing import Any, ClassVar
from unittest import SkipTest

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.protocol import Factory
from twisted.internet.task import deferLater
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface import implementer

from imgresume.testing import (
    BACKEND,
    CHECK_CLIENT_ID,
    EXAMPLE_CONFIG,
    FAST_CHECKS,
    HAProxyCluster,
    check_hello,
    find_haproxy,
    render_config,
    runtime_command,
)
from imgresume.client import Progress, Uploader
from imgresume.errors import ErrorCode
from imgresume.protocol import Error, Welcome, encode
from tests.support.cluster import KillServingServer, sha256_file, write_random

CHUNK = 256 * 1024
WINDOW = 4
HAPROXY = find_haproxy()
REQUIRED = os.environ.get("IMGRESUME_REQUIRE_HAPROXY") == "1"
NOT_INSTALLED = (
    "HAPROXY IS NOT INSTALLED (no `haproxy` on PATH or in /usr/sbin): the tests of "
    "imgresume behind HAProxy did NOT run. Install it (Debian: apt-get install -y haproxy)"
)
if HAPROXY is None and not REQUIRED:
    warnings.warn(NOT_INSTALLED + "; IMGRESUME_REQUIRE_HAPROXY=1 makes this a failure.",
                  stacklevel=1)

# The twisted/twisted#12501 bug the client-address test runs into; see the
# test's docstring.

#: What HAProxy logs when C{hard-stop-after} ends a soft-stop after a reload.
HARD_STOP = r"performing a hard-stop|hard-stopped"


def haproxy_or_skip(test: SynchronousTestCase) -> str:
    """The C{haproxy} binary; else skip C{test}, or fail it if HAProxy is required."""
    if HAPROXY is None:
        if REQUIRED:
            test.fail(NOT_INSTALLED + ", and IMGRESUME_REQUIRE_HAPROXY=1 requires them.")
        raise SkipTest(NOT_INSTALLED + "; IMGRESUME_REQUIRE_HAPROXY=1 makes this a failure.")
    return HAPROXY


def example() -> str:
    """The text of the shipped example configuration."""
    with open(EXAMPLE_CONFIG) as f:
        return f.read()


@implementer(IStreamClientEndpoint)
class RecordingEndpoint:
    """A client endpoint that records the local port of every connection it makes."""

    def __init__(self, wrapped: IStreamClientEndpoint) -> None:
        self.wrapped = wrapped
        self.ports: list[int] = []

    def connect(self, factory: Factory) -> Deferred:
        def record(protocol):
            self.ports.append(protocol.transport.getHost().port)
            return protocol

        return self.wrapped.connect(factory).addCallback(record)


class ExampleConfigTests(SynchronousTestCase):
    """The shipped example configuration, without running it."""

    def test_hello_bytes(self) -> None:
        """
        The health check sends exactly the HELLO frame of client
        C{haproxy-check}, and the byte-by-byte breakdown in the comment
        above it adds up to the same bytes.
        """
        text = example()
        [sent] = re.findall(r"^\s*tcp-check send-binary ([0-9a-f]+)$", text, re.MULTILINE)
        self.assertEqual(bytes.fromhex(sent), check_hello())
        self.assertEqual(check_hello()[15:28], CHECK_CLIENT_ID.encode())
        comment = text[text.index("# HELLO for client id"):text.index("tcp-check send-binary")]
        digits = re.findall(r"^[ \t]*#[ \t]+((?:[0-9a-f]{2,}[ \t]*)+)", comment, re.MULTILINE)
        self.assertEqual("".join(digits).replace(" ", ""), sent)

    def test_expect_matches_welcome_only(self) -> None:
        """
        The expect rule matches the hex dump (uppercase, as HAProxy makes
        it) of a real WELCOME, and not of ERROR frames, even ones that
        contain a 0x02 byte (which a plain C{expect binary 02} would accept).
        """
        [regex] = re.findall(r"^\s*tcp-check expect min-recv 7 rbinary (\S+)$", example(),
                             re.MULTILINE)
        welcome = encode(Welcome(1, "node-a", 4 << 20, 1 << 40, 1 << 20))
        self.assertRegex(welcome.hex().upper(), regex)
        for error in [
            Error(ErrorCode.SHUTTING_DOWN, "server is shutting down", retry_after_ms=512),
            Error(ErrorCode.OFFSET_MISMATCH, "continue from 6", offset=6),
        ]:
            frame = encode(error)
            self.assertIn(b"\x02", frame)
            self.assertNotRegex(frame.hex().upper(), regex)

    def test_documented_verbatim(self) -> None:
        """C{docs/haproxy.md} shows the example exactly as shipped."""
        with open(os.path.join(os.path.dirname(EXAMPLE_CONFIG), "..", "haproxy.md")) as f:
            blocks = re.findall(r"^```haproxy\n(.*?)^```$", f.read(), re.MULTILINE | re.DOTALL)
        self.assertEqual(blocks, [example()])

    def test_render_changes_only_local_settings(self) -> None:
        """
        The test configuration differs from the example only in the
        addresses, paths, logging, check intervals and system-only settings
        L{render_config} documents.
        """
        rendered = render_config(
            example(), bind="127.0.0.1:7777", servers=[("n1", "/s/n1.sock"), ("n2", "/s/n2.sock")],
            stats_socket="/s/admin.sock", hard_stop_after="1s",
        )
        before = [line for line in example().splitlines() if line.strip()]
        after = [line for line in rendered.splitlines() if line.strip()]
        removed = [line.split() for line in before if line not in after]
        added = [line.split() for line in after if line not in before]
        self.assertEqual(sorted(words[0] for words in removed), [
            "bind", "chroot", "default-server", "group", "hard-stop-after", "log",
            "server", "server", "server", "stats", "user",
        ])
        default_server = added.pop(4)
        self.assertEqual(added, [
            ["log", "stderr", "format", "raw", "local0", "info"],
            ["hard-stop-after", "1s"],
            ["stats", "socket", "/s/admin.sock", "mode", "600", "level", "admin"],
            ["bind", "127.0.0.1:7777"],
            ["server", "n1", "/s/n1.sock"],
            ["server", "n2", "/s/n2.sock"],
        ])
        # default-server: the same words, only the check intervals changed.
        [shipped] = [words for words in removed if words[0] == "default-server"]
        self.assertEqual(len(default_server), len(shipped))
        for i, (old, new) in enumerate(zip(shipped, default_server)):
            if i and shipped[i - 1] in FAST_CHECKS:
                self.assertEqual(new, FAST_CHECKS[shipped[i - 1]])
            else:
                self.assertEqual(new, old)

    def test_render_refuses_a_drifted_template(self) -> None:
        """A template missing a directive the tests adapt is an error, not ignored."""
        drifted = example().replace("stats socket", "# stats socket")
        with self.assertRaises(ValueError) as caught:
            render_config(drifted, bind="x", servers=[], stats_socket="y")
        self.assertIn("stats socket", str(caught.exception))

    def test_example_is_valid(self) -> None:
        """C{haproxy -c} accepts the example exactly as shipped."""
        haproxy = haproxy_or_skip(self)
        check = subprocess.run([haproxy, "-c", "-f", EXAMPLE_CONFIG],
                               capture_output=True, text=True, cwd="/", check=False)
        self.assertEqual(check.returncode, 0, check.stdout + check.stderr)


class HAProxyTestCase(TestCase):
    """
    Starts HAProxy and three servers for each test and stops them
    afterwards; or, with L{share_cluster}, once for all the tests of the
    class.
    """

    timeout = 60
    #: Keyword arguments of L{HAProxyCluster} for the tests of a class.
    cluster_args: ClassVar[dict[str, Any]] = {}
    #: One cluster for all the tests of the class, for tests that kill,
    #: restart or reload nothing: started by the first test, stopped by
    #: C{tearDownClass} (at exit under Trial, which runs no class fixtures).
    share_cluster: ClassVar[bool] = False
    _shared: ClassVar[HAProxyCluster | None] = None

    def setUp(self) -> None:
        haproxy = haproxy_or_skip(self)
        self.work = os.path.abspath(self.mktemp())
        os.makedirs(self.work)
        if self.share_cluster:
            self.cluster = self._shared_cluster(haproxy)
        else:
            self.cluster = HAProxyCluster(self.work, haproxy, servers=3, **self.cluster_args)
            self.addCleanup(self.cluster.stop)
            self.cluster.start()
        self.endpoint = RecordingEndpoint(
            TCP4ClientEndpoint(reactor, "127.0.0.1", self.cluster.lb.address[1])
        )

    @classmethod
    def _shared_cluster(cls, haproxy: str) -> HAProxyCluster:
        cluster = cls._shared
        if cluster is None or not all(
                node.running for node in [cluster.lb, *cluster.servers.values()]):
            if cluster is not None:
                cluster.stop()
            work = tempfile.mkdtemp(prefix="imgr-haproxy-")
            cluster = cls._shared = HAProxyCluster(work, haproxy, servers=3,
                                                   **cls.cluster_args)
            atexit.register(cls._stop_shared, cluster)
            cluster.start()
        return cluster

    @staticmethod
    def _stop_shared(cluster: HAProxyCluster) -> None:
        cluster.stop()
        shutil.rmtree(cluster.directory, ignore_errors=True)

    @classmethod
    def tearDownClass(cls) -> None:
        if cls._shared is not None:
            cls._stop_shared(cls._shared)
            cls._shared = None
        super().tearDownClass()

    def wait_all_up(self) -> None:
        self.cluster.wait_for_status({name: "UP" for name in self.cluster.servers})

    def uploader(self, **kw) -> Uploader:
        kw.setdefault("backoff_base", 0.05)
        kw.setdefault("backoff_max", 0.5)
        return Uploader(self.endpoint, reactor=reactor, journal=None, chunk_size=CHUNK,
                        window=WINDOW, client_id="test", digest="sha256", **kw)

    def stored_sha256(self, path: str) -> str:
        return sha256_file(os.path.join(self.cluster.storage, path))

    async def wait_for_log(self, read, pattern: str, timeout: float = 10.0) -> str:
        """
        Poll C{read()}, letting the reactor run, until C{pattern} (a regex)
        occurs or C{timeout} seconds have passed; return the last text.
        """
        deadline = time.monotonic() + timeout
        while True:
            text = read()
            if re.search(pattern, text, re.MULTILINE) or time.monotonic() > deadline:
                return text
            await deferLater(reactor, 0.05, lambda: None)


class UploadTests(HAProxyTestCase):
    """Plain uploads through HAProxy, on one cluster."""

    share_cluster = True

    async def test_upload(self) -> None:
        """An upload through HAProxy is stored with the right SHA-256."""
        self.wait_all_up()
        path = os.path.join(self.work, "scan.tif")
        digest = write_random(path, 5 * CHUNK + 123)
        result = await self.uploader().upload(path, "scans/scan.tif")
        self.assertEqual(result.sha256, digest)
        self.assertEqual(self.stored_sha256(result.path), digest)
        self.assertEqual(result.attempts, 1)
        self.assertEqual(result.resumed_at, [])
        self.assertIn(result.servers[0], self.cluster.servers)

    async def test_server_logs_client_address(self) -> None:
        """
        The PROXY protocol v2 header tells the server the client's real
        address: its log shows the "connection from" event with 127.0.0.1
        and the client's own source port, not HAProxy's side of the
        connection (a UNIX socket here).  (Twisted's HAProxyProtocolWrapper
        calls connectionMade before the PROXY header has been read,
        twisted/twisted#12501, so the server reads the peer lazily.)
        """
        self.wait_all_up()
        path = os.path.join(self.work, "small.tif")
        write_random(path, CHUNK)
        result = await self.uploader().upload(path)
        [port] = self.endpoint.ports
        server = result.servers[0]
        # HAProxy saw the client at that address and sent it to that server...
        haproxy_log = await self.wait_for_log(
            lambda: self.cluster.haproxy_log, rf"^127\.0\.0\.1:{port} .* {BACKEND}/{server} "
        )
        self.assertRegex(haproxy_log, rf"(?m)^127\.0\.0\.1:{port} .* {BACKEND}/{server} ")
        # ...and the server learnt it from the PROXY header: in the handshake
        # line, and in the line that ends the connection (logged when the
        # client has closed it, which may be a moment after the completion).
        address = rf"127\.0\.0\.1:{port}(?!\d)"
        log = await self.wait_for_log(lambda: self.cluster.server_log(server),
                                      rf"connection from {address}")
        self.assertRegex(log, rf"handshake from {address}")
        self.assertRegex(log, rf"connection from {address}")


class FailoverTests(HAProxyTestCase):
    """A server dies in the middle of an upload."""

    async def test_sigkill_serving_server_mid_upload(self) -> None:
        """
        The server receiving the upload is SIGKILLed; HAProxy closes the
        client's connection, the client reconnects through HAProxy, lands on
        another server and resumes: one resume, at an offset past the kill,
        at most a window of chunks sent twice, the stored file intact.
        """
        self.wait_all_up()
        size = 32 * 1024 * 1024 + 12345
        path = os.path.join(self.work, "scan.tif")
        digest = write_random(path, size)
        kill = KillServingServer(self.cluster, after=size // 3)
        result = await self.uploader().upload(path, "scans/scan.tif", progress=kill)
        kill.check(self, result)
        self.assertEqual(result.sha256, digest)
        self.assertEqual(self.stored_sha256(result.path), digest)
        self.assertEqual(len(result.resumed_at), 1)
        self.assertGreater(result.resumed_at[0], size // 3)
        self.assertLessEqual(result.bytes_sent, size + WINDOW * CHUNK)


class HealthCheckTests(HAProxyTestCase):
    """HAProxy's protocol-level health check and connection retries."""

    def test_killed_server_down_restarted_up(self) -> None:
        """
        A SIGKILLed server is marked DOWN by the health check, and UP again
        once restarted; HAProxy logs both transitions.
        """
        self.wait_all_up()
        for row in self.cluster.status().values():
            if row["svname"] != "BACKEND":
                self.assertEqual(row["check_status"], "L7OK")  # the WELCOME matched
        self.cluster.kill("node-2")
        self.cluster.wait_for_status({"node-1": "UP", "node-2": "DOWN", "node-3": "UP"})
        self.cluster.restart("node-2")
        self.cluster.wait_for_status({"node-1": "UP", "node-2": "UP", "node-3": "UP"})
        log = self.cluster.haproxy_log
        down = log.index(f"Server {BACKEND}/node-2 is DOWN")
        self.assertIn(f"Server {BACKEND}/node-2 is UP", log[down:])
        # The check is an imgresume handshake, with the PROXY header: L7OK
        # above means the WELCOME matched.  (Servers do not log health checks.)

    async def test_refused_connection_redispatched(self) -> None:
        """
        A dead server that HAProxy still believes UP (its health check is
        disabled here, as in the seconds before a check notices) refuses the
        connection; HAProxy retries on another server, so every upload
        succeeds at the first attempt, and its counters show redispatches.
        """
        self.wait_all_up()
        runtime_command(self.cluster.stats_socket, f"disable health {BACKEND}/node-1")
        self.cluster.kill("node-1")
        path = os.path.join(self.work, "small.tif")
        digest = write_random(path, CHUNK + 1)
        for i in range(4):
            result = await self.uploader().upload(path, f"f{i}.tif")
            self.assertEqual(result.attempts, 1)
            self.assertNotIn("node-1", result.servers)
            self.assertEqual(self.stored_sha256(result.path), digest)
        row = self.cluster.status()["node-1"]
        self.assertEqual(row["status"], "no check")
        self.assertGreaterEqual(int(row["wredis"]), 1)


class MisconfiguredServerTests(HAProxyTestCase):
    """A server that listens without the PROXY protocol."""

    cluster_args: ClassVar[dict[str, Any]] = {"plain": ("node-3",)}

    async def test_server_without_proxy_protocol_kept_down(self) -> None:
        """
        A server started with C{--listen unix:...} instead of
        C{haproxy:unix:...} takes HAProxy's PROXY header for a malformed
        frame; the check, which wants a WELCOME, keeps it DOWN, and uploads
        go to the others.  (A check that only connected, as without
        C{option tcp-check}, would have let it in.)
        """
        self.cluster.wait_for_status({"node-1": "UP", "node-2": "UP", "node-3": "DOWN"})
        path = os.path.join(self.work, "small.tif")
        write_random(path, CHUNK)
        for i in range(3):
            result = await self.uploader().upload(path, f"f{i}.tif")
            self.assertEqual(result.attempts, 1)
            self.assertNotIn("node-3", result.servers)
        # node-3 refused every check's PROXY header as a bad frame.
        self.assertRegex(self.cluster.server_log("node-3"), "FRAME_TOO_LARGE|MALFORMED_FRAME")


class ReloadTests(HAProxyTestCase):
    """Reloading HAProxy while an upload is in flight."""

    cluster_args: ClassVar[dict[str, Any]] = {"hard_stop_after": "500ms"}

    async def test_reload_mid_upload(self) -> None:
        """
        HAProxy is reloaded (SIGUSR2 to the master, what C{systemctl
        reload} does) in the middle of an upload.  The old worker keeps the
        connection until C{hard-stop-after} (500 ms here) and then closes
        it; the client reconnects through the new worker and resumes, and
        no server was harmed.  (The client is held still until the old
        worker has hard-stopped: on loopback the upload would otherwise
        finish first.)
        """
        self.wait_all_up()
        size = 32 * 1024 * 1024
        path = os.path.join(self.work, "scan.tif")
        digest = write_random(path, size)
        reloaded: list[int] = []

        def progress(p: Progress) -> None:
            if not reloaded and p.phase == "uploading" and p.done > size // 4:
                reloaded.append(p.done)
                self.cluster.reload()
                # Block the reactor, and so the client, until the cut.
                deadline = time.monotonic() + 10
                while (not re.search(HARD_STOP, self.cluster.haproxy_log)
                       and time.monotonic() < deadline):
                    time.sleep(0.02)

        result = await self.uploader().upload(path, "scan.tif", progress=progress)
        self.assertEqual(len(reloaded), 1)
        self.assertEqual(result.sha256, digest)
        self.assertEqual(self.stored_sha256(result.path), digest)
        self.assertEqual(len(result.resumed_at), 1)
        self.assertGreater(result.resumed_at[0], size // 4)
        self.assertLessEqual(result.bytes_sent, size + WINDOW * CHUNK)
        for node in self.cluster.servers.values():
            self.assertTrue(node.running)
        log = self.cluster.haproxy_log
        self.assertIn("Reloading HAProxy", log)
        self.assertRegex(log, HARD_STOP)

# -*- test-case-name: tests.test_metrics -*-
"""
Tests for L{imgresume.metrics}: the registry and its text rendering, the
counters a server keeps as uploads go through it (driven in memory, and
over real TCP with a filesystem storage), and, on real processes, the
C{--metrics} endpoints of C{twistd imgresume} and C{twistd imgresume-lb}.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import threading
import time
import urllib.error
import urllib.request
import zlib
from typing import Any

from twisted.internet import reactor
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock, deferLater
from twisted.internet.testing import StringTransport
from twisted.internet.threads import deferToThread
from twisted.python.failure import Failure
from twisted.trial.unittest import SkipTest, SynchronousTestCase, TestCase

from imgresume.testing import LocalCluster, free_tcp_port
from imgresume.client import Uploader
from imgresume.metrics import CONTENT_TYPE, BalancerMetrics, Registry, ServerMetrics
from imgresume.protocol import Data, Hello, Resume, Status, Upload, encode
from imgresume.server import UploadServerFactory, make_server_service
from imgresume.storage.memory import MemoryStorage
from tests.support.wire import frames_written

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def _unescape(value: str) -> str:
    out, i = [], 0
    while i < len(value):
        ch = value[i]
        if ch == "\\" and i + 1 < len(value):
            nxt = value[i + 1]
            out.append({"n": "\n", "\\": "\\", '"': '"'}.get(nxt, "\\" + nxt))
            i += 2
        else:
            out.append(ch)
            i += 1
    return "".join(out)


def parse(text: str) -> tuple[Samples, dict[str, str], dict[str, str]]:
    """
    A tiny parser of the text exposition format: the samples
    C{{(name, ((label, value), ...)): value}}, and the TYPE and HELP of
    each metric family.  Strict about what it understands.
    """
    samples: Samples = {}
    types: dict[str, str] = {}
    helps: dict[str, str] = {}
    for line in text.split("\n"):
        if not line:
            continue
        if line.startswith("# TYPE "):
            name, kind = line[len("# TYPE "):].split(" ")
            types[name] = kind
            continue
        if line.startswith("# HELP "):
            name, _, doc = line[len("# HELP "):].partition(" ")
            helps[name] = _unescape(doc)
            continue
        assert not line.startswith("#"), line
        head, _, value = line.rpartition(" ")
        labels: list[tuple[str, str]] = []
        if "{" in head:
            name, _, rest = head.partition("{")
            assert rest.endswith("}"), line
            rest = rest[:-1]
            while rest:
                key, _, rest = rest.partition('="')
                i, raw = 0, []
                while rest[i] != '"':
                    raw.append(rest[i : i + 2] if rest[i] == "\\" else rest[i])
                    i += 2 if rest[i] == "\\" else 1
                labels.append((key, _unescape("".join(raw))))
                rest = rest[i + 1:].removeprefix(",")
        else:
            name = head
        samples[(name, tuple(labels))] = float(value)
    return samples, types, helps


def value(samples: Samples, name: str, **labels: str) -> float:
    """One sample's value, labels in any order; 0 if absent."""
    for (n, pairs), v in samples.items():
        if n == name and dict(pairs) == labels:
            return v
    return 0.0


def scrape(port: int) -> tuple[Samples, str]:
    """GET /metrics on 127.0.0.1:C{port} (blocking; run it in a thread)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        return parse(r.read().decode("utf-8"))[0], r.headers["Content-Type"]


class RegistryTests(SynchronousTestCase):
    """The registry (C{prometheus_client} behind our calls) and the text it renders."""

    def test_counter_with_labels(self) -> None:
        """
        A counter renders HELP and TYPE lines under its C{_total} name, one
        sample per label value, escaped; an unlabelled counter shows 0
        before its first increment; no C{_created} sample appears.
        """
        r = Registry()
        plain = r.counter("things_total", "Things.\nSecond line \\ backslash.")
        failed = r.counter("failed_total", "Failures by code.", ["code"])
        failed.inc(code="DIGEST_MISMATCH")
        failed.inc(2, code='odd "value"\n\\')
        text = r.render().decode()
        self.assertIn("# HELP things_total Things.\\nSecond line \\\\ backslash.\n", text)
        self.assertIn("# TYPE things_total counter\n", text)
        self.assertIn("things_total 0.0\n", text)
        self.assertNotIn("_created", text)
        samples, types, helps = parse(text)
        self.assertEqual(types, {"things_total": "counter", "failed_total": "counter"})
        self.assertEqual(helps["things_total"], "Things.\nSecond line \\ backslash.")
        self.assertEqual(value(samples, "failed_total", code="DIGEST_MISMATCH"), 1)
        self.assertEqual(value(samples, "failed_total", code='odd "value"\n\\'), 2)
        self.assertEqual(failed.value(code="DIGEST_MISMATCH"), 1)
        plain.inc(0.5)
        self.assertEqual(value(parse(r.render().decode())[0], "things_total"), 0.5)
        self.assertRaises(ValueError, plain.inc, -1)
        self.assertRaises(ValueError, failed.inc, 1, reason="x")
        self.assertRaises(ValueError, failed.inc, 1)
        self.assertTrue(text.endswith("\n"))

    def test_gauge(self) -> None:
        """
        A gauge is set, moved, or read from a function at each render; the
        balancer's per-backend gauges are read from its tracker.
        """
        r = Registry()
        g = r.gauge("open", "Open things.")
        g.set(5)
        g.dec(2)
        state = {"n": 4}
        live = r.gauge("live", "Read at each render.")
        live.set_function(lambda: state["n"])
        samples, types, _ = parse(r.render().decode())
        self.assertEqual(types["open"], "gauge")
        self.assertEqual(value(samples, "open"), 3)
        self.assertEqual(value(samples, "live"), 4)
        state["n"] = 1
        self.assertEqual(value(parse(r.render().decode())[0], "live"), 1)

        class Tracker:
            backends = [Named("a"), Named("b")]
            up = {"a": True, "b": False}

            def is_up(self, b: Any) -> bool:
                return self.up[b.name]

            def state_of(self, b: Any) -> Any:
                return Active(3 if b.name == "a" else 0)

        lb = BalancerMetrics(Registry())
        samples, types, _ = parse(lb.registry.render().decode())
        self.assertEqual(types["imgresume_lb_backend_up"], "gauge")
        tracker = Tracker()
        lb.watch(tracker)
        samples = parse(lb.registry.render().decode())[0]
        self.assertEqual(value(samples, "imgresume_lb_backend_up", backend="a"), 1)
        self.assertEqual(value(samples, "imgresume_lb_backend_up", backend="b"), 0)
        self.assertEqual(
            value(samples, "imgresume_lb_backend_connections_active", backend="a"), 3)
        self.assertIn(("imgresume_lb_connect_failures_total", (("backend", "b"),)), samples)
        tracker.up["b"] = True
        self.assertEqual(value(parse(lb.registry.render().decode())[0],
                               "imgresume_lb_backend_up", backend="b"), 1)

    def test_histogram(self) -> None:
        """
        A histogram renders cumulative buckets in order, +Inf last, then
        its sum and count.
        """
        r = Registry()
        h = r.histogram("latency_seconds", "Latency.", buckets=[0.1, 1, 0.01])
        for v in (0.005, 0.05, 0.05, 0.5, 7):
            h.observe(v)
        text = r.render().decode()
        samples, types, _ = parse(text)
        self.assertEqual(types["latency_seconds"], "histogram")
        buckets = [line.split(" ")[0] for line in text.splitlines()
                   if line.startswith("latency_seconds_bucket")]
        self.assertEqual(buckets, [
            'latency_seconds_bucket{le="0.01"}', 'latency_seconds_bucket{le="0.1"}',
            'latency_seconds_bucket{le="1.0"}', 'latency_seconds_bucket{le="+Inf"}',
        ])
        self.assertEqual(
            [value(samples, "latency_seconds_bucket", le=le)
             for le in ("0.01", "0.1", "1.0", "+Inf")],
            [1, 3, 4, 5])
        self.assertAlmostEqual(value(samples, "latency_seconds_sum"), 7.605)
        self.assertEqual(value(samples, "latency_seconds_count"), 5)
        self.assertEqual(h.count(), 5)
        self.assertNotIn("_created", text)

    def test_threads(self) -> None:
        """Increments and observations from many threads at once are all counted."""
        r = Registry()
        c = r.counter("n_total", "N.")
        h = r.histogram("h_seconds", "H.")

        def work() -> None:
            for _ in range(5000):
                c.inc()
                h.observe(0.001)

        threads = [threading.Thread(target=work) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        self.assertEqual(c.value(), 40000)
        self.assertEqual(h.count(), 40000)

    def test_names(self) -> None:
        """
        Bad metric or label names, a counter not named C{_total}, and a
        name used twice, are refused.
        """
        r = Registry()
        self.assertRaises(ValueError, r.counter, "bad-name_total", "x")
        self.assertRaises(ValueError, r.gauge, "bad name", "x")
        self.assertRaises(ValueError, r.histogram, "ok", "x", labelnames=["le"])
        self.assertRaises(ValueError, r.counter, "ok_total", "x", ["__reserved"])
        self.assertRaises(ValueError, r.counter, "things", "x")
        r.counter("once_total", "x")
        self.assertRaises(ValueError, r.gauge, "once_total", "x")

    def test_registries_are_separate(self) -> None:
        """Two servers in one process count separately."""
        a, b = ServerMetrics(Registry()), ServerMetrics(Registry())
        a.uploads_created.inc()
        self.assertEqual(b.uploads_created.value(), 0)
        self.assertEqual(value(parse(a.registry.render().decode())[0],
                               "imgresume_uploads_created_total"), 1)

    def test_documented_names(self) -> None:
        """
        A server's and a balancer's registries expose exactly the metric
        names and types docs/metrics.md lists, and nothing else.
        """
        doc = open(os.path.join(os.path.dirname(__file__), "..", "docs", "metrics.md"),
                   encoding="utf-8").read()
        server_doc, _, lb_doc = doc.partition("## Balancer metrics")
        row = re.compile(r"^\| `(imgresume_[a-z_]+)` \| (counter|gauge|histogram) \|", re.M)
        for metrics, section in ((ServerMetrics(Registry()), server_doc),
                                 (BalancerMetrics(Registry()), lb_doc)):
            types = parse(metrics.registry.render().decode())[1]
            self.assertEqual(types, dict(row.findall(section)))

    def test_promtool(self) -> None:
        """
        C{promtool check metrics} accepts what a busy server and balancer
        render (skipped without promtool, from the Debian package
        C{prometheus}).
        """
        promtool = shutil.which("promtool")
        if promtool is None:
            raise SkipTest("promtool is not installed (Debian package prometheus)")
        server = ServerMetrics(Registry())
        server.uploads_created.inc()
        server.uploads_failed.inc(code="TIMEOUT")
        server.storage_timing("fdatasync", 0.003)
        lb = BalancerMetrics(Registry())
        lb.refused.inc(reason="no_backend")
        for metrics in (server, lb):
            run = subprocess.run([promtool, "check", "metrics"],
                                 input=metrics.registry.render(), capture_output=True,
                                 timeout=30)
            self.assertEqual((run.returncode, run.stdout + run.stderr), (0, b""))


class Named:
    """A stand-in backend: just a name."""

    def __init__(self, name: str) -> None:
        self.name = name


class Active:
    """A stand-in backend state: its active connections."""

    def __init__(self, active: int) -> None:
        self.active = active


CONTENT = bytes(range(256)) * 40
SHA = hashlib.sha256(CONTENT).digest()


class ServerCountsTests(SynchronousTestCase):
    """The counters of a server driven in memory (fake clock, no sockets)."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.factory = UploadServerFactory(
            MemoryStorage(), "test-server", self.clock, handshake_timeout=10,
            idle_timeout=60,
        )
        self.metrics = self.factory.metrics

    def connect(self) -> Any:
        proto = self.factory.buildProtocol(None)
        transport = StringTransport()
        proto.makeConnection(transport)
        proto.dataReceived(encode(Hello("tester")))
        return proto, transport

    def frames(self, transport: StringTransport) -> list:
        return frames_written(transport)

    def samples(self) -> Samples:
        return parse(self.metrics.registry.render().decode())[0]

    def test_upload(self) -> None:
        """
        An upload counts as created then completed; its payload as stored
        bytes; the connection and the upload as active while open.
        """
        proto, transport = self.connect()
        proto.dataReceived(encode(Upload("a.tif", len(CONTENT), SHA)))
        s = self.samples()
        self.assertEqual(value(s, "imgresume_uploads_created_total"), 1)
        self.assertEqual(value(s, "imgresume_uploads_active"), 1)
        self.assertEqual(value(s, "imgresume_connections_active"), 1)
        proto.dataReceived(encode(Data(0, zlib.crc32(CONTENT), CONTENT)))
        proto.dataReceived(encode(Data(len(CONTENT), 0, b"")))
        s = self.samples()
        self.assertEqual(value(s, "imgresume_uploads_completed_total"), 1)
        self.assertEqual(value(s, "imgresume_stored_bytes_total"), len(CONTENT))
        self.assertGreater(value(s, "imgresume_received_bytes_total"), len(CONTENT))
        self.assertEqual(value(s, "imgresume_uploads_active"), 0)
        self.assertEqual(value(s, "imgresume_connections_total"), 1)
        proto.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(value(self.samples(), "imgresume_connections_active"), 0)

    def test_failures_by_code(self) -> None:
        """
        Failed uploads are counted by error code: an unknown resume, a
        digest mismatch, an upload cut by the idle timeout.  A STATUS of an
        unknown upload is not an upload failure.
        """
        proto, transport = self.connect()
        proto.dataReceived(encode(Status("0" * 32)))
        self.assertEqual(
            [k for k in self.samples() if k[0] == "imgresume_uploads_failed_total"], [])
        proto.dataReceived(encode(Resume("0" * 32)))
        proto.dataReceived(encode(Upload("b.tif", len(CONTENT), b"\1" * 32)))
        proto.dataReceived(encode(Data(0, zlib.crc32(CONTENT), CONTENT)))
        proto.dataReceived(encode(Data(len(CONTENT), 0, b"")))
        proto.dataReceived(encode(Upload("c.tif", len(CONTENT), SHA)))
        self.clock.advance(61)
        s = self.samples()
        self.assertEqual(value(s, "imgresume_uploads_failed_total", code="UNKNOWN_UPLOAD"), 1)
        self.assertEqual(value(s, "imgresume_uploads_failed_total", code="DIGEST_MISMATCH"), 1)
        self.assertEqual(value(s, "imgresume_uploads_failed_total", code="TIMEOUT"), 1)
        self.assertEqual(value(s, "imgresume_uploads_created_total"), 2)
        self.assertEqual(value(s, "imgresume_uploads_completed_total"), 0)


class ServerEndpointTests(TestCase):
    """A server with a filesystem storage, over real TCP, scraped over HTTP."""

    timeout = 30

    async def test_scrape_after_upload(self) -> None:
        """
        After an upload over TCP, C{/metrics} shows it created and
        completed, its bytes, and one fdatasync latency per flush (data and
        journal of every chunk) and one write latency per chunk.
        """
        work = os.path.abspath(self.mktemp())
        os.makedirs(os.path.join(work, "storage"))
        top = make_server_service(
            "tcp:0:interface=127.0.0.1", os.path.join(work, "storage"), reactor=reactor,
            server_id="metrics-test", gc_interval=0,
            metrics_listen="tcp:0:interface=127.0.0.1",
        )
        top.startService()
        self.addCleanup(top.stopService)
        port = (await top.listener._waitingForPort).getHost().port
        metrics_port = (
            await top.getServiceNamed("metrics")._waitingForPort).getHost().port
        size, chunk = 300_000, 64 * 1024
        path = os.path.join(work, "scan.tif")
        with open(path, "wb") as f:
            f.write(os.urandom(size))
        result = await Uploader(
            f"tcp:127.0.0.1:{port}", reactor=reactor, journal=None, client_id="tester",
            chunk_size=chunk,
        ).upload(path, "scans/scan.tif")
        self.assertEqual(result.size, size)
        s, content_type = await deferToThread(scrape, metrics_port)
        self.assertEqual(content_type, CONTENT_TYPE)
        chunks = -(-size // chunk)
        self.assertEqual(value(s, "imgresume_uploads_created_total"), 1)
        self.assertEqual(value(s, "imgresume_uploads_completed_total"), 1)
        self.assertEqual(value(s, "imgresume_stored_bytes_total"), size)
        self.assertGreater(value(s, "imgresume_received_bytes_total"), size)
        self.assertEqual(value(s, "imgresume_uploads_active"), 0)
        # One write (two fdatasyncs) per batch; chunks arriving together share one.
        writes = value(s, "imgresume_storage_write_seconds_count")
        self.assertTrue(1 <= writes <= chunks, writes)
        self.assertEqual(value(s, "imgresume_storage_fdatasync_seconds_count"), 2 * writes)
        self.assertEqual(
            value(s, "imgresume_storage_fdatasync_seconds_bucket", le="+Inf"), 2 * writes)
        self.assertEqual(value(s, "imgresume_build_info", version=__import__(
            "imgresume").__version__), 1)


    async def test_paths_methods_and_formats(self) -> None:
        """
        Only C{/metrics} is served (C{/} answers 404), only to GET (POST
        answers 405); Prometheus asking for OpenMetrics gets it, with the
        same series and no C{_created} ones.
        """
        work = os.path.abspath(self.mktemp())
        os.makedirs(work)
        top = make_server_service(
            "tcp:0:interface=127.0.0.1", work, reactor=reactor, server_id="paths-test",
            gc_interval=0, metrics_listen="tcp:0:interface=127.0.0.1")
        top.startService()
        self.addCleanup(top.stopService)
        port = (await top.getServiceNamed("metrics")._waitingForPort).getHost().port
        base = f"http://127.0.0.1:{port}"

        def status(path: str, method: str = "GET") -> int:
            try:
                with urllib.request.urlopen(urllib.request.Request(
                        base + path, method=method, data=b"" if method == "POST" else None),
                        timeout=5) as r:
                    return r.status
            except urllib.error.HTTPError as e:
                return e.code

        def openmetrics() -> tuple[str, str]:
            request = urllib.request.Request(base + "/metrics", headers={
                "Accept": "application/openmetrics-text; version=1.0.0"})
            with urllib.request.urlopen(request, timeout=5) as r:
                return r.headers["Content-Type"], r.read().decode()

        self.assertEqual(await deferToThread(status, "/"), 404)
        self.assertEqual(await deferToThread(status, "/metrics", "POST"), 405)
        content_type, text = await deferToThread(openmetrics)
        self.assertTrue(content_type.startswith("application/openmetrics-text"), content_type)
        self.assertIn("\nimgresume_uploads_created_total 0.0\n", text)
        self.assertTrue(text.endswith("# EOF\n"))
        self.assertIsNone(re.search(r"^\w+_created(\{|\s)", text, re.M))


class ProcessTests(TestCase):
    """C{--metrics} on real C{twistd imgresume} and C{twistd imgresume-lb} processes."""

    timeout = 60

    async def test_server_and_balancer(self) -> None:
        """
        An upload through the balancer shows on the server's endpoint and on
        the balancer's (bytes both ways, the backend up and passing its
        health checks); once the server is killed, the balancer's gauge
        says the backend is down.
        """
        work = os.path.abspath(self.mktemp())
        os.makedirs(work)
        server_metrics, lb_metrics = free_tcp_port(), free_tcp_port()
        cluster = LocalCluster(
            work, servers=1,
            server_args=["--metrics", f"tcp:{server_metrics}:interface=127.0.0.1"],
            lb_args=["--metrics", f"tcp:{lb_metrics}:interface=127.0.0.1",
                     "--check-interval", "0.2", "--check-timeout", "0.5", "--fall", "1"],
        )
        cluster.start()
        self.addCleanup(cluster.stop)
        path = os.path.join(work, "scan.tif")
        size = 1_000_000
        with open(path, "wb") as f:
            f.write(os.urandom(size))
        # By UPLOAD and DATA (put_max=0): a PUT counts in completed only.
        await Uploader(cluster.lb_endpoint, reactor=reactor, journal=None,
                       client_id="tester", chunk_size=256 * 1024, put_max=0).upload(path)

        s, _ = await deferToThread(scrape, server_metrics)
        self.assertEqual(value(s, "imgresume_uploads_created_total"), 1)
        self.assertEqual(value(s, "imgresume_uploads_completed_total"), 1)
        self.assertEqual(value(s, "imgresume_stored_bytes_total"), size)
        self.assertTrue(1 <= value(s, "imgresume_storage_write_seconds_count") <= 4)

        backend = f"unix:{cluster.servers['node-1'].address}"
        s, _ = await deferToThread(scrape, lb_metrics)
        self.assertEqual(value(s, "imgresume_lb_backend_up", backend=backend), 1)
        self.assertGreaterEqual(
            value(s, "imgresume_lb_health_checks_total", backend=backend, result="pass"), 1)
        self.assertGreater(value(s, "imgresume_lb_bytes_total", direction="up"), size)
        self.assertGreater(value(s, "imgresume_lb_bytes_total", direction="down"), 0)
        self.assertGreaterEqual(value(s, "imgresume_lb_connections_total"), 1)

        cluster.kill("node-1")
        deadline = time.monotonic() + 10
        while True:
            s, _ = await deferToThread(scrape, lb_metrics)
            if value(s, "imgresume_lb_backend_up", backend=backend) == 0:
                break
            self.assertLess(time.monotonic(), deadline, "backend never marked down")
            await deferLater(reactor, 0.1, lambda: None)
        self.assertGreaterEqual(
            value(s, "imgresume_lb_health_checks_total", backend=backend, result="fail"), 1)

# -*- test-case-name: tests.test_metrics -*-
"""
Prometheus metrics without a dependency: a small registry of counters,
gauges and histograms rendered in the text exposition format 0.0.4, the
metrics of a server (L{ServerMetrics}) and of a balancer
(L{BalancerMetrics}), and a twisted.web listener serving them at
C{/metrics} (L{metrics_service}).

Every server or balancer builds its own L{Registry} and passes it down, so
several can run in one process (tests).  Updates are thread-safe: the disk
threads of a server observe their latencies directly.  See
C{docs/metrics.md} for every metric.
"""

from __future__ import annotations

import math
import re
import threading
from typing import Any, Callable, Mapping, Sequence

#: The Content-Type of the text exposition format.
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

#: Buckets (seconds) for disk latencies: a local SSD flushes in well under a
#: millisecond, a network filesystem in milliseconds, a sick one in seconds.
DISK_BUCKETS: tuple[float, ...] = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)

_NAME_RE = re.compile(r"^[a-zA-Z_:][a-zA-Z0-9_:]*$")
_LABEL_RE = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")

LabelValues = Mapping[str, Any]


def _format_value(value: float) -> str:
    """A sample value as Prometheus writes it: integers without a fraction."""
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if float(value).is_integer() and abs(value) < 2**53:
        return str(int(value))
    return repr(float(value))


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _escape_label(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels_text(pairs: Sequence[tuple[str, str]]) -> str:
    if not pairs:
        return ""
    return "{" + ",".join(f'{k}="{_escape_label(v)}"' for k, v in pairs) + "}"


class _Metric:
    """What every metric shares: a name, a help text, label names, a lock."""

    kind = "untyped"

    def __init__(self, name: str, documentation: str, labelnames: Sequence[str] = ()) -> None:
        if not _NAME_RE.match(name):
            raise ValueError(f"invalid metric name {name!r}")
        for label in labelnames:
            if not _LABEL_RE.match(label) or label.startswith("__") or label == "le":
                raise ValueError(f"invalid label name {label!r} for {name}")
        self.name = name
        self.documentation = documentation
        self.labelnames = tuple(labelnames)
        self._lock = threading.Lock()

    def _key(self, labels: LabelValues) -> tuple[str, ...]:
        if len(labels) != len(self.labelnames) or set(labels) != set(self.labelnames):
            raise ValueError(
                f"{self.name} takes labels {self.labelnames}, not {tuple(labels)}"
            )
        return tuple(str(labels[n]) for n in self.labelnames)

    def _pairs(self, key: tuple[str, ...]) -> list[tuple[str, str]]:
        return list(zip(self.labelnames, key))

    def samples(self) -> list[tuple[str, list[tuple[str, str]], float]]:
        """(name, label pairs, value) of every sample, for rendering."""
        raise NotImplementedError


class Counter(_Metric):
    """
    A value that only goes up.  Without labels it starts at 0 and is always
    rendered; a labelled child appears once first incremented.
    """

    kind = "counter"

    def __init__(self, name: str, documentation: str, labelnames: Sequence[str] = ()) -> None:
        super().__init__(name, documentation, labelnames)
        self._values: dict[tuple[str, ...], float] = {} if labelnames else {(): 0.0}

    def inc(self, amount: float = 1.0, **labels: Any) -> None:
        """Add C{amount} (not negative) to the child named by C{labels}."""
        if amount < 0:
            raise ValueError("a counter cannot go down")
        key = self._key(labels)
        with self._lock:
            self._values[key] = self._values.get(key, 0.0) + amount

    def value(self, **labels: Any) -> float:
        """The current value of one child (0 if never incremented)."""
        key = self._key(labels)
        with self._lock:
            return self._values.get(key, 0.0)

    def samples(self) -> list[tuple[str, list[tuple[str, str]], float]]:
        with self._lock:
            items = sorted(self._values.items())
        return [(self.name, self._pairs(key), value) for key, value in items]


class Gauge(_Metric):
    """
    A value that goes up and down: set directly, or read from a function at
    each scrape (L{set_function}) when the truth lives elsewhere (a set of
    connections, a tracker's state).
    """

    kind = "gauge"

    def __init__(self, name: str, documentation: str, labelnames: Sequence[str] = ()) -> None:
        super().__init__(name, documentation, labelnames)
        self._values: dict[tuple[str, ...], float] = {} if labelnames else {(): 0.0}
        self._function: Callable[[], Any] | None = None

    def set(self, value: float, **labels: Any) -> None:
        key = self._key(labels)
        with self._lock:
            self._values[key] = float(value)

    def inc(self, amount: float = 1.0, **labels: Any) -> None:
        key = self._key(labels)
        with self._lock:
            self._values[key] = self._values.get(key, 0.0) + amount

    def dec(self, amount: float = 1.0, **labels: Any) -> None:
        self.inc(-amount, **labels)

    def set_function(self, function: Callable[[], Any]) -> None:
        """
        Read the gauge from C{function} at every scrape (in the thread that
        renders: the reactor's).  Without labels it returns a number; with
        labels, an iterable of C{(labels dict, number)}.
        """
        self._function = function

    def value(self, **labels: Any) -> float:
        """The current value of one child (0 if never set)."""
        key = self._key(labels)
        for pairs, value in self._current():
            if tuple(v for _, v in pairs) == key:
                return value
        return 0.0

    def _current(self) -> list[tuple[list[tuple[str, str]], float]]:
        if self._function is None:
            with self._lock:
                items = sorted(self._values.items())
            return [(self._pairs(key), value) for key, value in items]
        result = self._function()
        if not self.labelnames:
            return [([], float(result))]
        return [(self._pairs(self._key(labels)), float(value)) for labels, value in result]

    def samples(self) -> list[tuple[str, list[tuple[str, str]], float]]:
        return [(self.name, pairs, value) for pairs, value in self._current()]


class Histogram(_Metric):
    """Observations counted into fixed cumulative buckets, with their sum and count."""

    kind = "histogram"

    def __init__(
        self, name: str, documentation: str, buckets: Sequence[float] = DISK_BUCKETS,
        labelnames: Sequence[str] = (),
    ) -> None:
        super().__init__(name, documentation, labelnames)
        bounds = sorted(float(b) for b in buckets if not math.isinf(b))
        if not bounds or len(set(bounds)) != len(bounds):
            raise ValueError(f"{name}: buckets must be distinct and at least one")
        self.buckets = tuple(bounds)
        # Per child: per-bucket (not cumulative) counts, +Inf last; sum.
        self._counts: dict[tuple[str, ...], list[int]] = {}
        self._sums: dict[tuple[str, ...], float] = {}
        if not labelnames:
            self._counts[()] = [0] * (len(bounds) + 1)
            self._sums[()] = 0.0

    def observe(self, value: float, **labels: Any) -> None:
        key = self._key(labels)
        index = len(self.buckets)
        for i, bound in enumerate(self.buckets):
            if value <= bound:
                index = i
                break
        with self._lock:
            counts = self._counts.get(key)
            if counts is None:
                counts = self._counts[key] = [0] * (len(self.buckets) + 1)
                self._sums[key] = 0.0
            counts[index] += 1
            self._sums[key] += value

    def count(self, **labels: Any) -> int:
        """How many observations one child has."""
        key = self._key(labels)
        with self._lock:
            return sum(self._counts.get(key, ()))

    def samples(self) -> list[tuple[str, list[tuple[str, str]], float]]:
        with self._lock:
            children = sorted((k, list(c), self._sums[k]) for k, c in self._counts.items())
        out = []
        for key, counts, total in children:
            pairs = self._pairs(key)
            running = 0
            for bound, n in zip((*self.buckets, math.inf), counts):
                running += n
                le = "+Inf" if math.isinf(bound) else _format_value(bound)
                out.append((f"{self.name}_bucket", [*pairs, ("le", le)], running))
            out.append((f"{self.name}_sum", pairs, total))
            out.append((f"{self.name}_count", pairs, running))
        return out


class Registry:
    """The metrics of one server or balancer, rendered together."""

    def __init__(self) -> None:
        self._metrics: dict[str, _Metric] = {}
        self._lock = threading.Lock()

    def _add(self, metric: _Metric) -> Any:
        with self._lock:
            if metric.name in self._metrics:
                raise ValueError(f"metric {metric.name} is already registered")
            self._metrics[metric.name] = metric
        return metric

    def counter(self, name: str, documentation: str, labelnames: Sequence[str] = ()) -> Counter:
        return self._add(Counter(name, documentation, labelnames))

    def gauge(self, name: str, documentation: str, labelnames: Sequence[str] = ()) -> Gauge:
        return self._add(Gauge(name, documentation, labelnames))

    def histogram(
        self, name: str, documentation: str, buckets: Sequence[float] = DISK_BUCKETS,
        labelnames: Sequence[str] = (),
    ) -> Histogram:
        return self._add(Histogram(name, documentation, buckets, labelnames))

    def get(self, name: str) -> _Metric:
        """The metric registered as C{name}."""
        return self._metrics[name]

    def render(self) -> bytes:
        """Every metric in the text exposition format 0.0.4."""
        with self._lock:
            metrics = list(self._metrics.values())
        lines = []
        for metric in metrics:
            lines.append(f"# HELP {metric.name} {_escape_help(metric.documentation)}")
            lines.append(f"# TYPE {metric.name} {metric.kind}")
            for name, pairs, value in metric.samples():
                lines.append(f"{name}{_labels_text(pairs)} {_format_value(value)}")
        return ("\n".join(lines) + "\n").encode("utf-8")


# ---------------------------------------------------------------------------
# What a server and a balancer measure


def _build_info(registry: Registry) -> None:
    import imgresume

    info = registry.gauge("imgresume_build_info", "Always 1; the version running.",
                          ["version"])
    info.set(1, version=imgresume.__version__)


class ServerMetrics:
    """
    The metrics of one upload server (C{twistd imgresume}).  Built by
    L{imgresume.server.make_server_service}; updated by the protocol factory
    (L{upload_event} for each upload event, and directly for bytes,
    connections and takeovers), by the storage's disk threads
    (L{storage_timing}) and by garbage collection (L{gc_report}).
    """

    def __init__(self, registry: Registry) -> None:
        self.registry = r = registry
        _build_info(r)
        self.uploads_created = r.counter(
            "imgresume_uploads_created_total", "Uploads started (created) on this server.")
        self.uploads_resumed = r.counter(
            "imgresume_uploads_resumed_total", "Uploads resumed on this server.")
        self.uploads_completed = r.counter(
            "imgresume_uploads_completed_total",
            "Uploads completed (verified and in place) on this server, including "
            "resumes answered from the record of an earlier completion.")
        self.uploads_failed = r.counter(
            "imgresume_uploads_failed_total",
            "Upload requests and uploads that ended on their connection with an error, "
            "by error code.", ["code"])
        self.transfer_errors = r.counter(
            "imgresume_transfer_errors_total",
            "DATA packets and ends of upload refused (the transfer goes on from the "
            "offset the error gives), by error code.", ["code"])
        self.connection_errors = r.counter("imgresume_connection_errors_total", "Connections "
                                           "closed with an ERROR frame, by error code.", ["code"])
        self.received_bytes = r.counter(
            "imgresume_received_bytes_total", "Bytes read from client connections.")
        self.stored_bytes = r.counter(
            "imgresume_stored_bytes_total",
            "Payload bytes made durable and acknowledged to clients.")
        self.connections = r.counter(
            "imgresume_connections_total", "Client connections accepted, health checks too.")
        self.connections_active = r.gauge(
            "imgresume_connections_active", "Client connections open now.")
        self.uploads_active = r.gauge(
            "imgresume_uploads_active", "Uploads open (written) on this server now.")
        self.takeover_requests = r.counter(
            "imgresume_takeover_requests_total",
            "Resumes that found the upload held by another connection and asked it to "
            "yield (answered UPLOAD_BUSY).")
        self.takeover_yields = r.counter(
            "imgresume_takeover_yields_total",
            "Uploads this server gave up to a newer connection after their own "
            "connection went silent.")
        self.fdatasync_seconds = r.histogram(
            "imgresume_storage_fdatasync_seconds",
            "Time of one fdatasync of an upload's data or journal file.")
        self.write_seconds = r.histogram(
            "imgresume_storage_write_seconds",
            "Time of one durable write: data pwrite and fdatasync, journal pwrite and "
            "fdatasync.")
        self.gc_runs = r.counter(
            "imgresume_gc_runs_total", "Garbage collection runs finished.")
        self.gc_removed_uploads = r.counter(
            "imgresume_gc_removed_uploads_total",
            "Abandoned uploads and expired records removed by garbage collection.")
        self.gc_freed_bytes = r.counter(
            "imgresume_gc_freed_bytes_total", "Bytes freed by garbage collection.")
        self.hook_deliveries = r.counter(
            "imgresume_hook_deliveries_total",
            "Event deliveries to hooks by outcome: delivered, failed (every attempt "
            "failed), dropped (queue full or server stopping).", ["result"])
        self.hook_attempt_failures = r.counter(
            "imgresume_hook_attempt_failures_total",
            "Hook attempts that failed (each retry counts).")
        self.hook_pending = r.gauge(
            "imgresume_hook_pending", "Hook deliveries queued, waiting to retry or running.")

    def upload_event(self, event: Mapping[str, Any]) -> None:
        """Count one upload event (see L{imgresume.server._upload_events.upload_event})."""
        kind = event["event"]
        if kind == "upload.created":
            self.uploads_created.inc()
        elif kind == "upload.resumed":
            self.uploads_resumed.inc()
        elif kind == "upload.completed":
            self.uploads_completed.inc()
        elif kind == "upload.failed":
            code = event["error"]["code"]
            self.uploads_failed.inc(code=code)
            if code == "UPLOAD_BUSY":
                self.takeover_requests.inc()

    def storage_timing(self, what: str, seconds: float) -> None:
        """
        A disk latency from the storage's threads: C{"fdatasync"} (one
        flush) or C{"write"} (one whole durable write).
        """
        if what == "fdatasync":
            self.fdatasync_seconds.observe(seconds)
        elif what == "write":
            self.write_seconds.observe(seconds)

    def gc_report(self, report: Any) -> None:
        """A garbage collection run finished with this L{GcReport}."""
        self.gc_runs.inc()
        self.gc_removed_uploads.inc(len(report.removed))
        self.gc_freed_bytes.inc(report.bytes_freed)


class BalancerMetrics:
    """
    The metrics of one balancer (C{twistd imgresume-lb}).  Built by
    L{imgresume.balancer.tap.makeService} (or given to
    L{imgresume.balancer.build_balancer}); updated by the proxy and the
    health checker.  L{watch} reads the per-backend gauges from a
    L{BackendTracker} at each scrape.
    """

    def __init__(self, registry: Registry) -> None:
        self.registry = r = registry
        _build_info(r)
        self.connections = r.counter(
            "imgresume_lb_connections_total", "Client connections accepted.")
        self.connections_active = r.gauge(
            "imgresume_lb_connections_active", "Client connections open now.")
        self.bytes = r.counter(
            "imgresume_lb_bytes_total",
            "Bytes relayed: up (client to backend) and down (backend to client).",
            ["direction"])
        self.refused = r.counter(
            "imgresume_lb_refused_total",
            "Clients answered with an ERROR and closed: no_backend (every backend "
            "failed), too_many (--max-connections-per-address).", ["reason"])
        self.connect_failures = r.counter(
            "imgresume_lb_connect_failures_total",
            "Failed connects to a backend (refused, timed out...).", ["backend"])
        self.health_checks = r.counter(
            "imgresume_lb_health_checks_total",
            "Health checks finished, by backend and result (pass, fail).",
            ["backend", "result"])
        self.backend_up = r.gauge(
            "imgresume_lb_backend_up",
            "1 if the backend is offered to new clients (not marked down by health "
            "checks or a failed connect), else 0.", ["backend"])
        self.backend_connections = r.gauge(
            "imgresume_lb_backend_connections_active",
            "Client connections relayed to the backend now.", ["backend"])
        self.bytes.inc(0, direction="up")
        self.bytes.inc(0, direction="down")

    def watch(self, tracker: Any) -> None:
        """Read the per-backend gauges from C{tracker} at each scrape."""
        self.backend_up.set_function(lambda: [
            ({"backend": b.name}, 1 if tracker.is_up(b) else 0) for b in tracker.backends
        ])
        self.backend_connections.set_function(lambda: [
            ({"backend": b.name}, tracker.state_of(b).active) for b in tracker.backends
        ])
        for backend in tracker.backends:
            self.connect_failures.inc(0, backend=backend.name)
            for result in ("pass", "fail"):
                self.health_checks.inc(0, backend=backend.name, result=result)


# ---------------------------------------------------------------------------
# Serving them


def metrics_resource(registry: Registry) -> Any:
    """A twisted.web resource tree: the registry at C{/metrics}, nothing else."""
    from twisted.web.resource import Resource

    class MetricsPage(Resource):
        isLeaf = True

        def render_GET(self, request: Any) -> bytes:
            request.setHeader(b"Content-Type", CONTENT_TYPE.encode("ascii"))
            request.setHeader(b"Cache-Control", b"no-store")
            return registry.render()

    root = Resource()
    root.putChild(b"metrics", MetricsPage())
    return root


def metrics_service(reactor: Any, endpoint: str, registry: Registry) -> Any:
    """
    A service that serves C{registry} over HTTP at C{/metrics} on the
    server endpoint string C{endpoint} (C{tcp:9101:interface=127.0.0.1}).
    Requests are not logged: a scraper comes every few seconds.
    """
    from twisted.web.server import Site

    from imgresume._listen import ListenerService

    class QuietSite(Site):
        noisy = False

        def log(self, request: Any) -> None:
            pass

    service = ListenerService(reactor, endpoint, QuietSite(metrics_resource(registry)))
    service.setName("metrics")
    return service


__all__ = [
    "CONTENT_TYPE", "DISK_BUCKETS", "Counter", "Gauge", "Histogram", "Registry",
    "ServerMetrics", "BalancerMetrics", "metrics_resource", "metrics_service",
]

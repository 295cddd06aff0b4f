# -*- test-case-name: tests.test_metrics -*-
"""
The metrics of a server (L{ServerMetrics}) and of a balancer
(L{BalancerMetrics}) on C{prometheus_client}, and a twisted.web listener
serving them at C{/metrics} with the library's Twisted resource
(L{metrics_service}).

Every server or balancer builds its own L{Registry} (a
C{prometheus_client.CollectorRegistry}) and passes it down, so several can
run in one process (tests).  L{Counter}, L{Gauge} and L{Histogram} are the
library's metrics behind the call our callers make: labels as keyword
arguments (C{failed.inc(code="TIMEOUT")}), and C{value()} for tests.
Updates are thread-safe: the disk threads of a server observe their
latencies directly.  See C{docs/metrics.md} for every metric.

C{_created} samples are turned off for the whole process
(C{prometheus_client.disable_created_metrics}): imgresume documents none,
and each would double the series of every counter and histogram.
"""

from __future__ import annotations

import re
from typing import Any, Callable, Iterator, Mapping, Sequence

import prometheus_client
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4

prometheus_client.disable_created_metrics()

#: The Content-Type of the text exposition format a plain scrape gets
#: (Prometheus itself negotiates OpenMetrics).
CONTENT_TYPE = CONTENT_TYPE_PLAIN_0_0_4

#: Buckets (seconds) for disk latencies: a local SSD flushes in well under a
#: millisecond, a network filesystem in milliseconds, a sick one in seconds.
DISK_BUCKETS: tuple[float, ...] = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)


_NAME_RE = re.compile(r"^[a-zA-Z_:][a-zA-Z0-9_:]*$")


def _check_name(name: str) -> None:
    """
    Refuse a name outside the classic character set: prometheus_client
    accepts any UTF-8 now, which older scrapers and promtool do not.
    """
    if not _NAME_RE.match(name):
        raise ValueError(f"invalid metric name {name!r}")


class _Metric:
    """A library metric and the registry it is in; labels as keyword arguments."""

    def __init__(self, registry: Registry, metric: Any, name: str) -> None:
        self.name = name
        self._registry = registry
        self._metric = metric

    def _child(self, labels: Mapping[str, Any]) -> Any:
        return self._metric.labels(**labels) if labels else self._metric

    def value(self, **labels: Any) -> float:
        """The current value of one child (0 if it has none yet)."""
        found = self._registry.get_sample_value(self.name, {k: str(v) for k, v in labels.items()})
        return 0.0 if found is None else found


class Counter(_Metric):
    """A C{prometheus_client.Counter}: a value that only goes up."""

    def inc(self, amount: float = 1.0, **labels: Any) -> None:
        """Add C{amount} (not negative) to the child named by C{labels}."""
        self._child(labels).inc(amount)


class Gauge(_Metric):
    """
    A C{prometheus_client.Gauge}: set directly, or (without labels) read
    from a function at each scrape (L{set_function}) when the truth lives
    elsewhere (a set of connections, a queue).
    """

    def set(self, value: float, **labels: Any) -> None:
        self._child(labels).set(value)

    def inc(self, amount: float = 1.0, **labels: Any) -> None:
        self._child(labels).inc(amount)

    def dec(self, amount: float = 1.0, **labels: Any) -> None:
        self._child(labels).dec(amount)

    def set_function(self, function: Callable[[], float]) -> None:
        """
        Read the gauge from C{function} at every scrape, in the thread that
        serves it (one of the reactor's pool).
        """
        self._metric.set_function(function)


class Histogram(_Metric):
    """A C{prometheus_client.Histogram}: observations in fixed cumulative buckets."""

    def observe(self, value: float, **labels: Any) -> None:
        self._child(labels).observe(value)

    def count(self, **labels: Any) -> int:
        """How many observations one child has."""
        found = self._registry.get_sample_value(
            self.name + "_count", {k: str(v) for k, v in labels.items()})
        return 0 if found is None else int(found)


class Registry(prometheus_client.CollectorRegistry):
    """
    The metrics of one server or balancer: a C{CollectorRegistry} that
    makes them (L{counter}, L{gauge}, L{histogram}) and renders them
    (L{render}).
    """

    def __init__(self) -> None:
        super().__init__()
        self._ours: dict[str, _Metric] = {}

    def counter(self, name: str, documentation: str, labelnames: Sequence[str] = ()) -> Counter:
        """A counter; C{name} ends in C{_total}, which is how it is exposed."""
        _check_name(name)
        if not name.endswith("_total"):
            raise ValueError(f"counter {name} must end in _total")
        metric = prometheus_client.Counter(name, documentation, labelnames, registry=self)
        return self._keep(Counter(self, metric, name))

    def gauge(self, name: str, documentation: str, labelnames: Sequence[str] = ()) -> Gauge:
        _check_name(name)
        metric = prometheus_client.Gauge(name, documentation, labelnames, registry=self)
        return self._keep(Gauge(self, metric, name))

    def histogram(
        self, name: str, documentation: str, buckets: Sequence[float] = DISK_BUCKETS,
        labelnames: Sequence[str] = (),
    ) -> Histogram:
        _check_name(name)
        metric = prometheus_client.Histogram(
            name, documentation, labelnames, registry=self, buckets=sorted(buckets))
        return self._keep(Histogram(self, metric, name))

    def _keep(self, metric: Any) -> Any:
        self._ours[metric.name] = metric
        return metric

    def get(self, name: str) -> _Metric:
        """The metric registered as C{name}."""
        return self._ours[name]

    def render(self) -> bytes:
        """Every metric in the text exposition format 0.0.4."""
        return prometheus_client.generate_latest(self)


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
        #: The per-backend gauges, read from the tracker L{watch} gives.
        self.backends = _BackendGauges()
        r.register(self.backends)
        self.bytes.inc(0, direction="up")
        self.bytes.inc(0, direction="down")

    def watch(self, tracker: Any) -> None:
        """Read the per-backend gauges from C{tracker} at each scrape."""
        self.backends.tracker = tracker
        for backend in tracker.backends:
            self.connect_failures.inc(0, backend=backend.name)
            for result in ("pass", "fail"):
                self.health_checks.inc(0, backend=backend.name, result=result)


class _BackendGauges:
    """
    A C{prometheus_client} collector of C{imgresume_lb_backend_up} and
    C{imgresume_lb_backend_connections_active}, read from a
    L{imgresume.balancer.BackendTracker} at each scrape.
    """

    def __init__(self) -> None:
        self.tracker: Any = None

    def describe(self) -> list[GaugeMetricFamily]:
        return self._families()

    def collect(self) -> Iterator[GaugeMetricFamily]:
        up, active = families = self._families()
        tracker = self.tracker
        for backend in tracker.backends if tracker is not None else ():
            up.add_metric([backend.name], 1 if tracker.is_up(backend) else 0)
            active.add_metric([backend.name], tracker.state_of(backend).active)
        return iter(families)

    @staticmethod
    def _families() -> list[GaugeMetricFamily]:
        return [
            GaugeMetricFamily(
                "imgresume_lb_backend_up",
                "1 if the backend is offered to new clients (not marked down by health "
                "checks or a failed connect), else 0.", labels=["backend"]),
            GaugeMetricFamily(
                "imgresume_lb_backend_connections_active",
                "Client connections relayed to the backend now.", labels=["backend"]),
        ]


# ---------------------------------------------------------------------------
# Serving them


def metrics_resource(registry: Registry) -> Any:
    """
    A twisted.web resource tree: C{prometheus_client}'s Twisted resource
    for C{registry} at C{/metrics}, nothing else.
    """
    from prometheus_client.twisted import MetricsResource
    from twisted.web.resource import Resource

    root = Resource()
    root.putChild(b"metrics", MetricsResource(registry))
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

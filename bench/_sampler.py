"""
Sampling a running cluster from the harness, in background threads: every
process's resident set (VmRSS, from /proc) and every process's open
connections (the C{*_connections_active} gauges of its metrics endpoint).
"""

from __future__ import annotations

import re
import threading
import time
import urllib.request
from typing import Any

from bench._common import now

_ACTIVE = re.compile(r"^imgresume_(?:lb_)?connections_active (\d+)", re.MULTILINE)


def connections_active(url: str) -> int:
    """Client connections a server or balancer has open now, from its metrics."""
    with urllib.request.urlopen(url, timeout=5) as r:
        text = r.read().decode()
    m = _ACTIVE.search(text)
    if m is None:
        raise ValueError(f"{url}: no connections_active gauge")
    return int(m.group(1))


class ClusterSampler:
    """
    Samples C{cluster} every C{interval} seconds until L{stop}: the peak RSS
    of each process, the peak open connections of each one, and the peak of
    the servers' connections added up over one round of scrapes (uploads
    open at once).  The series are kept too, as (time, {node: value}).

    The scrapes run in a thread of their own, so a busy reactor that answers
    late slows only them, not the RSS samples.
    """

    def __init__(self, cluster: Any, interval: float = 0.1) -> None:
        self.cluster = cluster
        self.interval = interval
        self.peak_rss: dict[str, int] = {}
        self.peak_connections: dict[str, int] = {}
        self.peak_servers_total = 0
        self.rss_series: list[tuple[float, dict[str, int]]] = []
        self.connections_series: list[tuple[float, dict[str, int]]] = []
        self.scrape_errors = 0
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._loop, args=(f,), daemon=True)
                         for f in (self._sample_rss, self._sample_connections)]

    def start(self) -> ClusterSampler:
        for t in self._threads:
            t.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join()

    def _loop(self, sample: Any) -> None:
        while not self._stop.is_set():
            t = time.monotonic()
            sample()
            self._stop.wait(max(0.0, self.interval - (time.monotonic() - t)))

    def _sample_rss(self) -> None:
        rss = self.cluster.rss()
        self.rss_series.append((now(), rss))
        for node, value in rss.items():
            self.peak_rss[node] = max(self.peak_rss.get(node, 0), value)

    def _sample_connections(self) -> None:
        counts = {}
        for node in self.cluster.metrics_ports:
            try:
                counts[node] = connections_active(self.cluster.metrics_url(node))
            except (OSError, ValueError):
                self.scrape_errors += 1
                continue
            self.peak_connections[node] = max(self.peak_connections.get(node, 0),
                                              counts[node])
        self.connections_series.append((now(), counts))
        total = sum(n for node, n in counts.items() if node != "lb")
        self.peak_servers_total = max(self.peak_servers_total, total)

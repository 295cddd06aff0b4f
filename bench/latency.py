"""
The latency group: one stream over an emulated long link (L{bench._delayrelay}
in front of the receiver: C{opts.rtt_ms} round trip, C{opts.link_rate}
bytes/s each way).  In the same rounds: the plain TCP copy through the relay
(what the link carries: the divisor), imgresume with the client's default
window (or C{--window}) and with a window of 1 (stop-and-wait).
"""

from __future__ import annotations

import inspect
import itertools
import json
import os
import subprocess
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from bench import baselines
from bench._common import (
    MiB,
    Workdir,
    log,
    median,
    per_gib,
    run_python,
    settle,
    spawn_python,
    write_random,
)
from bench.imgresume_runs import Cluster

#: Rounds (each runs the three methods in a rotated order) and stream size.
ROUNDS = 3
SIZE = {"quick": 256 * MiB, "full": 512 * MiB}
#: Stop-and-wait is ~6x slower: it uploads this fraction of the file size.
STOP_AND_WAIT_SHARE = 8
#: The steady state is measured between these fractions of the file.
STEADY = (0.1, 0.9)


class Relay:
    """
    C{python -m bench._delayrelay} in front of a port, as a context
    manager: one relay process per measurement.  After it, C{connections}
    holds what the relay measured per connection and C{cpu} its CPU seconds.
    """

    def __init__(self, work: Workdir, rtt_ms: float, rate: float) -> None:
        self.stderr = work.sub("logs", "delayrelay.stderr")
        self.rtt_ms = rtt_ms
        self.rate = rate
        self.connections: list[dict[str, Any]] = []
        self.cpu = 0.0
        self.limit = 0

    @contextmanager
    def __call__(self, target_port: int) -> Iterator[int]:
        proc = spawn_python("bench._delayrelay", [
            "--to", f"127.0.0.1:{target_port}", "--delay-ms", str(self.rtt_ms / 2),
            "--rate", f"{self.rate:.0f}"], stderr=self.stderr)
        try:
            assert proc.stdout is not None
            first = proc.stdout.readline()
            if not first:
                raise RuntimeError(f"the delay relay did not start; see {self.stderr}")
            hello = json.loads(first)
            self.limit = hello["limit"]
            yield hello["port"]
        finally:
            proc.terminate()
            try:
                out, _ = proc.communicate(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                out, _ = proc.communicate()
        for line in out.splitlines():
            event = json.loads(line)
            if event.get("event") == "connection":
                self.connections.append(event)
            elif event.get("event") == "exit":
                self.cpu = event["cpu"]

    def figures(self) -> dict[str, Any]:
        """The client-to-server direction of the connection that carried the most."""
        up = max((c["up"] for c in self.connections if c["up"]), key=lambda u: u["bytes"])
        busy = up["last_out"] - up["first_out"]
        return {
            "cpu": self.cpu,
            "limit": self.limit,
            "delivered_rate": up["bytes"] / busy if busy > 0 else None,
            "peak_held": up["peak_held"],
            "source_pauses": up["source_pauses"],
            "min_delay_ms": up["min_delay"] * 1e3,
            "max_delay_ms": up["max_delay"] * 1e3,
            "late_ms_mean": up["late_sum"] / max(1, up["timer_fires"]) * 1e3,
            "late_ms_max": up["late_max"] * 1e3,
        }


def client_default_window() -> int:
    """The Uploader's default window (packets in flight), from its signature."""
    from imgresume.client import Uploader

    return int(inspect.signature(Uploader).parameters["window"].default)


def steady_rate(times: list[float], offsets: list[int], size: int) -> float | None:
    """Bytes/s acknowledged between the ACKs at STEADY's fractions of C{size}."""
    marks = []
    for share in STEADY:
        i = next((k for k, o in enumerate(offsets) if o >= share * size), None)
        if i is None:
            return None
        marks.append(i)
    (i, j) = marks
    return (offsets[j] - offsets[i]) / (times[j] - times[i]) if times[j] > times[i] else None


def tcp_copy(work: Workdir, src: str, relay: Relay) -> dict[str, Any]:
    """The plain TCP copy (+ fsync) through a relay: what the link carries."""
    m = baselines.tcp_copy(work, [src], True, "tcp-copy-relay", via=relay)
    m["relay"] = relay.figures()
    m["steady_rate"] = m["relay"]["delivered_rate"]
    m["cpu"]["relay"] = relay.cpu
    return m


def upload(cluster: Cluster, src: str, relay: Relay, window: int | None,
           chunk_size: int | None, name: str) -> dict[str, Any]:
    """
    One upload of C{src} from a fresh client process to node-1 through a
    relay (into storage the caller has emptied).  The rate is from connecting to the last ACK (the stream); the
    steady rate from the ACKs between STEADY's fractions of the file.
    """
    before = cluster.cpu()
    with relay(cluster.ports["node-1"]) as port:
        spec = {"endpoint": f"tcp:127.0.0.1:{port}", "files": [[src, f"{name}.bin"]],
                "window": window, "chunk_size": chunk_size}
        res = run_python("bench._client", [json.dumps(spec)])
    server_cpu = cluster.cpu()["node-1"] - before["node-1"]
    [up] = res["uploads"]
    if up["error"]:
        raise RuntimeError(f"{name}: {up['error']}")
    first = up["trace"][0]
    acks, offsets = up["acks"], up["ack_offsets"]
    gaps = sorted(b - a for a, b in itertools.pairwise(acks[1:]))
    return {
        "name": name,
        "bytes": up["size"],
        "window": window or client_default_window(),
        "seconds": up["all_acked"] - up["hashed"],
        "to_completed_seconds": up["end"] - up["hashed"],
        "handshake_seconds": first["accepted"] - first["connect_start"],
        "steady_rate": steady_rate(acks, offsets, up["size"]),
        "ack_interval_ms": gaps[len(gaps) // 2] * 1e3 if gaps else None,
        "bytes_sent": up["bytes_sent"],
        "attempts": up["attempts"],
        "relay": relay.figures(),
        "cpu": {"client": res["cpu"] - (res["hash_cpu"] or 0.0), "server": server_cpu,
                "relay": relay.cpu},
    }


def _file(work: Workdir, name: str, size: int) -> str:
    path = work.sub("src", name)
    if not os.path.exists(path) or os.path.getsize(path) != size:
        log(f"writing {size >> 20} MiB of random data to {path}")
        write_random(path, size)
    return path


def latency(work: Workdir, opts: Any) -> dict[str, Any]:
    """
    The plain TCP copy, imgresume (default window) and imgresume (window 1)
    through the delay relay, in rotated order, ROUNDS rounds.
    """
    size = SIZE[opts.mode]
    src = _file(work, "latency.bin", size)
    small = _file(work, "latency-small.bin", size // STOP_AND_WAIT_SHARE)
    cluster = Cluster(work, "latency", servers=1).start()
    link = {"rtt_ms": opts.rtt_ms, "rate": opts.link_rate}

    def relay() -> Relay:
        return Relay(work, opts.rtt_ms, opts.link_rate)

    runs: list[tuple[str, Callable[[], dict[str, Any]]]] = [
        ("tcp-copy-relay", lambda: tcp_copy(work, src, relay())),
        ("imgresume-relay", lambda: upload(cluster, src, relay(), opts.window,
                                           opts.chunk_size, "imgresume-relay")),
        ("imgresume-relay-w1", lambda: upload(cluster, small, relay(), 1,
                                              opts.chunk_size, "imgresume-relay-w1")),
    ]
    samples: dict[str, list[dict[str, Any]]] = defaultdict(list)
    try:
        for r in range(ROUNDS):
            for name, run in runs[r % len(runs):] + runs[:r % len(runs)]:
                settle(work.sub("dst"))
                cluster.clear_storage()
                log(f"latency ({opts.rtt_ms:g} ms RTT, {opts.link_rate / 1e6:g} MB/s), "
                    f"round {r + 1}/{ROUNDS}: {name}")
                samples[name].append(run())
        settle(work.sub("dst"))
        cluster.clear_storage()
    finally:
        cluster.stop()
    return {"samples": dict(samples), "link": link, "size": size}


# -- figures and table (bench.report calls these) ------------------------------

#: The issue's target (issue 5, item 3): the default window fills a 50 ms link.
TARGET_X_LINK = 0.9


def _figures(samples: list[dict[str, Any]]) -> dict[str, Any]:
    nbytes = samples[0]["bytes"]
    seconds = median([m["seconds"] for m in samples])
    relays = [m["relay"] for m in samples]
    out: dict[str, Any] = {
        "bytes": nbytes, "rounds": len(samples), "seconds": seconds,
        "rate": nbytes / seconds,
        "steady_rate": median([m["steady_rate"] for m in samples if m["steady_rate"]]),
        "cpu_s_per_gib": {r: median([per_gib(m["cpu"][r], nbytes) for m in samples])
                          for r in samples[0]["cpu"]},
        "relay": {
            "limit": relays[0]["limit"],
            "peak_held": max(r["peak_held"] for r in relays),
            "min_delay_ms": min(r["min_delay_ms"] for r in relays),
            "late_ms_mean": median([r["late_ms_mean"] for r in relays]),
            "late_ms_max": max(r["late_ms_max"] for r in relays),
        },
    }
    if "window" in samples[0]:
        out.update(
            window=samples[0]["window"],
            handshake_ms=median([m["handshake_seconds"] for m in samples]) * 1e3,
            ack_interval_ms=median([m["ack_interval_ms"] for m in samples
                                    if m["ack_interval_ms"] is not None]),
            to_completed_rate=nbytes / median([m["to_completed_seconds"] for m in samples]),
            attempts=max(m["attempts"] for m in samples),
        )
    return out


def summarise(group: dict[str, Any]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Medians per method, ratios to the TCP copy through the relay, the target."""
    fig = {name: _figures(samples) for name, samples in group["samples"].items()}
    base = fig.get("tcp-copy-relay")
    for f in fig.values():
        f["x_link"] = f["rate"] / base["rate"] if base else None
        f["steady_x_link"] = f["steady_rate"] / base["steady_rate"] if base else None
    link = group["link"]
    win, stop = fig.get("imgresume-relay"), fig.get("imgresume-relay-w1")
    if win and stop:
        # A window of W packets carries at most W packets per stop-and-wait cycle.
        win["ceiling_rate"] = win["window"] * stop["steady_rate"]
        win["ceiling_x_link"] = win["ceiling_rate"] / base["steady_rate"] if base else None
    relays = [f["relay"] for f in fig.values()]
    summary = {"link": link, "methods": fig, "relay": {
        "limit": relays[0]["limit"],
        "peak_held": max(r["peak_held"] for r in relays),
        "min_delay_ms": min(r["min_delay_ms"] for r in relays),
        "late_ms_mean": median([r["late_ms_mean"] for r in relays]),
        "late_ms_max": max(r["late_ms_max"] for r in relays),
    }}
    targets = []
    if win and base:
        targets.append({
            "target": f"{link['rtt_ms']:g} ms RTT link, imgresume window {win['window']} "
                      f">= {TARGET_X_LINK}x the TCP copy through the same relay",
            "value": win["x_link"], "met": win["x_link"] >= TARGET_X_LINK,
            "shown": f"{win['x_link']:.2f}x",
            "also": f"steady state {win['steady_x_link']:.2f}x"
                    + (f"; window 1: {stop['x_link']:.2f}x" if stop else ""),
        })
    return summary, targets


def table_lines(summary: dict[str, Any]) -> list[str]:
    """The latency group's part of the terminal table."""
    link = summary["link"]
    fig = summary["methods"]
    head = f"{link['rtt_ms']:g} ms RTT link, {link['rate'] / 1e6:g} MB/s cap (delay relay)"
    header = (f"{head:<46} {'MB/s':>8} {'x link':>7} {'steady':>8} {'x link':>7}"
              "   CPU s/GiB c / s / relay")
    lines = [header]
    for f in fig.values():
        if "window" not in f:
            label = "plain TCP copy + fsync through the relay"
        else:
            what = ("stop-and-wait" if f["window"] == 1 else
                    "client default" if f["window"] == client_default_window() else "--window")
            label = f"imgresume, window {f['window']} ({what}), {f['bytes'] >> 20} MiB"
        cpu = " / ".join("-" if f["cpu_s_per_gib"].get(r) is None
                         else f"{f['cpu_s_per_gib'][r]:.2f}"
                         for r in ("client", "server", "relay"))
        lines.append(f"{label:<46} {f['rate'] / 1e6:>8.1f} {f['x_link']:>6.2f}x "
                     f"{f['steady_rate'] / 1e6:>8.1f} {f['steady_x_link']:>6.2f}x   {cpu}")
        if "window" in f:
            lines.append(
                f"    connect -> ACCEPTED {f['handshake_ms']:.0f} ms; one ACK every "
                f"{f['ack_interval_ms']:.1f} ms (median); to COMPLETED "
                f"{f['to_completed_rate'] / 1e6:.1f} MB/s"
                + (f"; {f['attempts']} connections" if f["attempts"] > 1 else ""))
        if "ceiling_rate" in f:
            lines.append(
                f"    window ceiling ({f['window']} x the stop-and-wait rate) "
                f"{f['ceiling_rate'] / 1e6:.1f} MB/s = {f['ceiling_x_link']:.2f}x link")
    r = summary["relay"]
    lines.append(
        f"  relay (all runs): holds <= {r['limit'] / 1e6:.1f} MB per direction, peak "
        f"{r['peak_held'] / 1e6:.1f}; delay >= {r['min_delay_ms']:.1f} ms; timer late "
        f"{r['late_ms_mean']:.2f} ms mean, {r['late_ms_max']:.1f} max")
    return lines

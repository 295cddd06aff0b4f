"""
The scale group: C{--scale-uploads} (1,000) image-sized files uploaded at
once, every one over its own connection, through a real C{twistd
imgresume-lb} to 3 real C{twistd imgresume} servers sharing one storage
directory, with the servers' and the balancer's memory watched.

The uploads are spread over C{--client-procs} client processes
(L{bench._scale_client}: the public L{Uploader}, one per file, each with
its own client id).  Each process opens its uploads (hashing them the way
the client does); DATA waits at a gate until every upload of every process is ACCEPTED, so
that all connections are open and uploading at the same time; then the
harness says go.  Afterwards every stored file under C{complete/} is hashed
and compared with its source.

Servers and balancer are set up as an operator would for this load: an
accept queue of L{BACKLOG} on every listener (Twisted's default, 50, drops
SYNs of a burst of connections), no per-address connection limit (every
benchmark client is 127.0.0.1), the open-files limit raised to the hard
limit (by the harness, for itself and every process it starts), metrics on
(for the connection counts).  The clients' kernel send buffers are capped
(L{bench._scale_client.SEND_BUFFER}): on their own hosts they would not
share this kernel's TCP memory.
"""

from __future__ import annotations

import hashlib
import json
import os
import queue
import shutil
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from imgresume import integrity

from bench._common import (
    ROOT,
    MiB,
    Workdir,
    child_env,
    image_sizes,
    last_json,
    log,
    now,
    per_gib,
    percentile,
    proc_hwm,
    settle,
)
from bench._sampler import ClusterSampler

#: Accept queue of the servers' and the balancer's listeners.
BACKLOG = 1024
#: The issue's target: peak RSS per server, in bytes (150 MB).
TARGET_RSS = 150_000_000
#: Largest file with --quick (smaller files, same number of connections).
QUICK_MAX_SIZE = 2_000_000
#: Longest the gate stays shut after the first upload is accepted: below
#: the client's stall timeout (60 s), after which a held connection gives up.
GATE_WAIT = 45.0
MB = 1e6


def scale(work: Workdir, opts: Any) -> dict[str, Any]:
    """
    C{opts.scale_uploads} files (200 KB to 20 MB, log-uniform; up to 2 MB
    with --quick) uploaded at once through the balancer to 3 servers.
    """
    from bench.imgresume_runs import Cluster

    n = opts.scale_uploads
    high = QUICK_MAX_SIZE if opts.mode == "quick" else 20_000_000
    sizes = image_sizes(n, high=high)
    src = work.sub("src", "scale")
    log(f"scale: writing {n} files, {sum(sizes) / MB:.0f} MB in all")
    files = _write_sources(src, sizes)
    cluster = Cluster(work, "scale", servers=3, backlog=BACKLOG, metrics=True).start()
    try:
        settle()
        log(f"scale: {n} uploads at once in {opts.client_procs} client processes")
        m = run(cluster, files, opts.client_procs, work, opts.window)
    finally:
        cluster.stop()
        cluster.clear_storage()
        shutil.rmtree(src, ignore_errors=True)
    return {"samples": {"imgresume-scale": [m]}, "sizes": sizes}


def _write_sources(d: str, sizes: list[int]) -> list[tuple[str, str]]:
    """Random files of C{sizes} bytes in C{d}: [(path, SHA-256 hex)]."""
    os.makedirs(d, exist_ok=True)
    out = []
    for i, size in enumerate(sizes):
        path = os.path.join(d, f"img-{i:04d}.bin")
        h = hashlib.sha256()
        with open(path, "wb") as f:
            left = size
            while left:
                block = os.urandom(min(4 * MiB, left))
                h.update(block)
                f.write(block)
                left -= len(block)
        out.append((path, h.hexdigest()))
    return out


# -- the run ------------------------------------------------------------------


def run(cluster: Any, files: list[tuple[str, str]], procs: int, work: Workdir,
        window: int | None = None) -> dict[str, Any]:
    """
    Upload every file at once through the balancer (gated, see the module
    docstring), sampling memory and connections; then verify the storage.
    """
    entries = [[p, f"scale/{os.path.basename(p)}", f"scale-client-{i:04d}"]
               for i, (p, _) in enumerate(files)]
    specs = [{"endpoint": cluster.endpoint("lb"), "files": entries[i::procs],
              "window": window} for i in range(procs) if entries[i::procs]]
    stderr = work.sub("logs", "client-scale.stderr")
    sampler = ClusterSampler(cluster).start()
    cpu0 = cluster.cpu()
    t0 = now()
    events: queue.Queue[tuple[int, dict[str, Any]]] = queue.Queue()
    clients = [_spawn(spec, stderr, i, events) for i, spec in enumerate(specs)]
    try:
        go, gate = _open_gate(clients, events)
        results = _collect(clients, stderr)
    finally:
        for proc, _ in clients:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        sampler.stop()
    cpu1 = cluster.cpu()
    hwm = {}
    for node in cluster.procs:
        try:
            hwm[node] = proc_hwm(cluster.pid(node))
        except OSError:
            pass
    uploads = [u for r in results for u in r["uploads"]]
    done = [u for u in uploads if not u["error"]]
    log(f"scale: verifying {len(done)} stored files")
    verified = _verify(cluster.storage, dict(zip((e[1] for e in entries),
                                                  (h for _, h in files))), done)
    return {
        "name": "imgresume-scale",
        "files": len(uploads),
        "client_procs": len(specs),
        "bytes": sum(u["size"] for u in done),
        "failures": len(uploads) - len(done),
        "errors": sorted({u["error"] for u in uploads if u["error"]})[:10],
        **verified,
        "gate": gate,
        "before_go_seconds": go - t0,
        "seconds": max(u["end"] for u in uploads) - go,
        "per_file_seconds": [u["end"] - max(go, u["accepted"] or go) for u in done],
        "connections": sum(u["connections"] for u in uploads),
        "retry_reasons": _merge([r["retry_reasons"] for r in results]),
        "cpu": {
            "client": sum(r["cpu"] for r in results),
            "server": sum(cpu1[k] - cpu0[k] for k in cpu1 if k != "lb" and k in cpu0),
            "lb": cpu1.get("lb", 0.0) - cpu0.get("lb", 0.0),
        },
        "peak_rss": sampler.peak_rss,
        "hwm": hwm,
        "peak_connections": sampler.peak_connections,
        "open_at_once": sampler.peak_servers_total,
        "scrape_errors": sampler.scrape_errors,
        "client_maxrss": [r["maxrss"] for r in results],
        "rss_series": [(round(t - go, 2), rss) for t, rss in sampler.rss_series],
        "connections_series": [(round(t - go, 2), n) for t, n in sampler.connections_series],
        # every upload, times in seconds from go
        "uploads": [{**{k: u.get(k) for k in ("name", "size", "error", "connections",
                                                "servers")},
                     **{k: round(u[k] - go, 3) if u.get(k) else None
                        for k in ("start", "accepted", "end")}} for u in uploads],
    }


def _spawn(spec: dict[str, Any], stderr: str, i: int,
           events: queue.Queue[tuple[int, dict[str, Any]]]) -> tuple[subprocess.Popen, list]:
    """Start one client process; a thread puts its stdout events on C{events}."""
    with open(stderr, "a") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "bench._scale_client", json.dumps(spec)],
            env=child_env(), cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=err, text=True,
        )
    lines: list[str] = []

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            events.put((i, json.loads(line)))
        events.put((i, {"event": "exit"}))

    threading.Thread(target=read, daemon=True).start()
    return proc, lines


def _open_gate(clients: list[tuple[subprocess.Popen, list]],
               events: queue.Queue[tuple[int, dict[str, Any]]]) -> tuple[float, dict[str, Any]]:
    """
    Wait until every client process has all its uploads accepted (or until
    L{GATE_WAIT} after the first was), then tell them all to go.
    """
    ready: dict[int, dict[str, Any]] = {}
    first: float | None = None
    timed_out = False
    while len(ready) < len(clients):
        timeout = None if first is None else max(0.0, first + GATE_WAIT - now())
        try:
            i, event = events.get(timeout=timeout)
        except queue.Empty:
            timed_out = True
            break
        if event["event"] == "accepted":
            first = event["t"] if first is None else min(first, event["t"])
        elif event["event"] in ("ready", "exit"):
            ready.setdefault(i, event)
    go = now()
    for proc, _ in clients:
        assert proc.stdin is not None
        try:
            proc.stdin.write("go\n")
            proc.stdin.close()
        except BrokenPipeError:
            pass
    log(f"scale: go ({sum(e.get('accepted', 0) for e in ready.values())} uploads accepted"
        f"{', gate timed out' if timed_out else ''})")
    return go, {
        "accepted": sum(e.get("accepted", 0) for e in ready.values()),
        "ended_before_go": sum(e.get("ended", 0) for e in ready.values()),
        "first_accepted": first, "timed_out": timed_out,
    }


def _collect(clients: list[tuple[subprocess.Popen, list]], stderr: str) -> list[dict[str, Any]]:
    results = []
    for proc, lines in clients:
        proc.wait(timeout=3600)
        with open(stderr) as f:
            err = f.read()
        results.append(last_json(proc, "".join(lines), err))
    return results


def _verify(storage: str, expected: dict[str, str], done: list[dict[str, Any]]) -> dict[str, Any]:
    """
    Hash every stored file the clients were told is complete and compare it
    with its source; count what is under complete/ in all.
    """

    def check(u: dict[str, Any]) -> str:
        path = os.path.join(storage, u["path"])
        try:
            h = hashlib.sha256()
            # The digest the client reported, in the upload's algorithm.
            reported = integrity.new_digest(u.get("digest", "sha256"))
            with open(path, "rb") as f:
                while block := f.read(4 * MiB):
                    h.update(block)
                    reported.update(block)
        except FileNotFoundError:
            return "missing"
        same = h.hexdigest() == expected[u["name"]] and reported.digest().hex() == u["sha256"]
        return "ok" if same else "mismatch"

    with ThreadPoolExecutor(2) as pool:
        outcomes = list(pool.map(check, done))
    stored = sum(len(fs) for _, _, fs in os.walk(os.path.join(storage, "complete")))
    return {
        "verified": outcomes.count("ok"),
        "missing": outcomes.count("missing"),
        "mismatched": outcomes.count("mismatch"),
        "stored_files": stored,
    }


def _merge(counts: list[dict[str, int]]) -> dict[str, int]:
    out: dict[str, int] = {}
    for c in counts:
        for k, v in c.items():
            out[k] = out.get(k, 0) + v
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


# -- figures ----------------------------------------------------------------


def summarise(group: dict[str, Any]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The scale group's figures and its targets (stated, never asserted)."""
    [m] = group["samples"]["imgresume-scale"]
    per_file = m["per_file_seconds"]
    servers = [k for k in m["hwm"] if k != "lb"]
    worst = max((m["hwm"][k] for k in servers), default=0)
    fig = {
        **{k: m[k] for k in ("files", "client_procs", "failures", "verified", "missing",
                             "mismatched", "stored_files", "connections", "retry_reasons",
                             "peak_rss", "hwm", "peak_connections", "open_at_once",
                             "gate", "before_go_seconds", "bytes", "seconds",
                             "client_maxrss", "errors")},
        "lost": m["missing"] + m["mismatched"],
        "p50": percentile(per_file, 50), "p99": percentile(per_file, 99),
        "rate": m["bytes"] / m["seconds"] if m["seconds"] > 0 else float("nan"),
        "cpu_s_per_gib": {r: per_gib(v, m["bytes"]) for r, v in m["cpu"].items()},
        "worst_server_hwm": worst,
    }
    n = m["files"]
    targets = [
        {"target": f"{n} uploads at once through the balancer: all complete and verified",
         "value": fig["verified"], "met": fig["verified"] == n and fig["lost"] == 0,
         "shown": f"{fig['verified']} of {n}",
         "also": f"{fig['failures']} failed, {fig['lost']} lost; {m['open_at_once']} "
                 "connections open at once on the servers"},
        {"target": f"peak RSS per server < {TARGET_RSS / MB:.0f} MB at {n} connections",
         "value": worst, "met": worst < TARGET_RSS, "shown": f"{worst / MB:.0f} MB",
         "also": "VmHWM of the largest server; balancer "
                 f"{m['hwm'].get('lb', 0) / MB:.0f} MB"},
    ]
    return fig, targets


def table_lines(f: dict[str, Any]) -> list[str]:
    """The scale group's lines of the table."""

    def mb(x: float) -> str:
        return f"{x / MB:.0f}"

    nodes = sorted(f["hwm"], key=lambda k: (k == "lb", k))
    c = f["cpu_s_per_gib"]
    gate = f["gate"]
    timed_out = " (gate timed out)" if gate["timed_out"] else ""
    peaks = ", ".join(f"{k} {f['peak_connections'].get(k, '?')}" for k in nodes)
    rss = ", ".join(f"{k} {mb(f['hwm'][k])} ({mb(f['peak_rss'].get(k, 0))})" for k in nodes)
    clients = ", ".join(mb(x) for x in f["client_maxrss"])
    cpu = " / ".join(f"{c.get(r, float('nan')):.2f}" for r in ("client", "server", "lb"))
    lines = [
        (f"scale: {f['files']} uploads at once ({f['client_procs']} client processes), "
         "lb + 3 servers"),
        (f"  open at once: {gate['accepted']} uploads accepted before go{timed_out}; "
         f"peak connections {peaks}; servers together {f['open_at_once']}"),
        (f"  complete and verified (SHA-256 of complete/ against the source): "
         f"{f['verified']} of {f['files']}; failed {f['failures']}, lost {f['lost']}; "
         f"{f['stored_files']} files stored"),
        (f"  connections {f['connections']} for {f['files']} uploads "
         f"({f['connections'] - f['files']} retries)"),
        (f"  per file, go -> verified: p50 {f['p50']:.2f} s, p99 {f['p99']:.2f} s; "
         f"{mb(f['bytes'])} MB in {f['seconds']:.1f} s = {f['rate'] / MB:.1f} MB/s "
         "aggregate"),
        f"  before go (clients start, connect, UPLOAD accepted): {f['before_go_seconds']:.1f} s",
        f"  peak RSS MB (VmHWM; sampled every 0.1 s): {rss}; clients {clients}",
        f"  CPU s/GiB client / server / lb: {cpu}",
    ]
    for reason, k in list(f["retry_reasons"].items())[:3]:
        lines.append(f"  reconnected {k}x: {reason}")
    for error in f["errors"][:3]:
        lines.append(f"  failed: {error}")
    return lines

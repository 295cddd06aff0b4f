"""
imgresume measured as users run it: real C{twistd imgresume} servers on TCP
loopback over a C{FilesystemStorage} on the disk under test, a real
C{twistd imgresume-lb} in front, and the client (L{bench._client}, the
public L{Uploader}) in its own process.

Every integrity check is on, because the product has no switch to turn
any off: the client hashes the whole file (SHA-256, while it sends; FINISH
carries it), every DATA packet carries a CRC-32 the server checks, the
server fsyncs data and journal before each ACK and reads every stored byte
back (as it is flushed, cached pages dropped) to check the SHA-256 before
COMPLETED.

CPU: servers and balancer from /proc/<pid>/stat (all threads) before and
after each measurement; the client from getrusage inside its process.
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import threading
import time
from collections.abc import Sequence
from typing import Any

from bench._common import (
    Workdir,
    child_env,
    last_json,
    now,
    proc_cpu,
    proc_rss,
    raise_nofile,
    run_python,
    settle,
    spawn_python,
)


class Cluster:
    """
    C{servers} imgresume servers on free TCP ports of 127.0.0.1 sharing one
    storage directory, and a balancer in front of them.  Per-address
    connection limits are off (every benchmark client is 127.0.0.1) and so
    is garbage collection; everything else is the default.  With C{backlog},
    every listener's accept queue is that long (Twisted's default is 50);
    with C{metrics}, every process serves its metrics on a port of its own
    (L{metrics_url}).  Every process may open as many files as the hard
    limit allows (the harness raises its own soft limit; they inherit it).
    """

    def __init__(self, work: Workdir, name: str, servers: int, *,
                 backlog: int | None = None, metrics: bool = False) -> None:
        from imgresume.testing import free_tcp_port, twistd_argv

        raise_nofile()  # for this process, and every process it starts
        self.work = work
        self.storage = work.fresh(f"storage-{name}")
        self.argv: dict[str, list[str]] = {}
        self.ports: dict[str, int] = {}
        self.metrics_ports: dict[str, int] = {}
        queue = f":backlog={backlog}" if backlog else ""

        def extra(node: str) -> list[str]:
            if not metrics:
                return []
            self.metrics_ports[node] = free_tcp_port()
            return ["--metrics", f"tcp:{self.metrics_ports[node]}:interface=127.0.0.1"]

        self.procs: dict[str, subprocess.Popen] = {}
        self._lock = threading.Lock()
        for i in range(1, servers + 1):
            node = f"node-{i}"
            port = free_tcp_port()
            self.ports[node] = port
            self.argv[node] = twistd_argv(
                "--logfile", work.sub("logs", f"{name}-{node}.log"), "imgresume",
                "--listen", f"tcp:{port}:interface=127.0.0.1{queue}", "--storage",
                self.storage, "--server-id", node, "--max-connections-per-address", "0",
                "--gc-interval", "0", *extra(node),
            )
        port = free_tcp_port()
        self.ports["lb"] = port
        self.argv["lb"] = twistd_argv(
            "--logfile", work.sub("logs", f"{name}-lb.log"), "imgresume-lb",
            "--listen", f"tcp:{port}:interface=127.0.0.1{queue}",
            *[a for n in self.servers for a in ("--backend", f"tcp:127.0.0.1:{self.ports[n]}")],
            "--max-connections-per-address", "0", *extra("lb"),
        )
        self.stderr = work.sub("logs", f"{name}.stderr")

    @property
    def servers(self) -> list[str]:
        return [n for n in self.argv if n != "lb"]

    def endpoint(self, node: str) -> str:
        return f"tcp:127.0.0.1:{self.ports[node]}"

    def metrics_url(self, node: str) -> str:
        """Where C{node} serves its metrics (a cluster made with C{metrics=True})."""
        return f"http://127.0.0.1:{self.metrics_ports[node]}/metrics"

    def start_node(self, node: str) -> None:
        from imgresume.testing import wait_until_connectable

        with open(self.stderr, "ab") as err:
            proc = subprocess.Popen(
                self.argv[node], env=child_env(), stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL, stderr=err,
            )
        with self._lock:
            self.procs[node] = proc
        wait_until_connectable(("127.0.0.1", self.ports[node]), timeout=60, proc=proc)

    def start(self) -> Cluster:
        for node in self.argv:  # servers first, then the balancer
            self.start_node(node)
        return self

    def kill(self, node: str) -> None:
        """SIGKILL one process and reap it."""
        with self._lock:
            proc = self.procs.get(node)
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs.values():
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def pid(self, node: str) -> int:
        return self.procs[node].pid

    def cpu(self) -> dict[str, float]:
        """CPU seconds so far of every running process."""
        out = {}
        with self._lock:
            procs = dict(self.procs)
        for node, proc in procs.items():
            try:
                out[node] = proc_cpu(proc.pid)
            except OSError:
                pass
        return out

    def rss(self) -> dict[str, int]:
        out = {}
        with self._lock:
            procs = dict(self.procs)
        for node, proc in procs.items():
            try:
                out[node] = proc_rss(proc.pid)
            except OSError:
                pass
        return out

    def clear_storage(self) -> None:
        """Remove stored uploads between measurements (servers keep running)."""
        settle(os.path.join(self.storage, "complete"), os.path.join(self.storage, "incoming"))


def _cpu_delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {k: after[k] - before[k] for k in after if k in before}


def _run_client(spec: dict[str, Any], stderr: str) -> dict[str, Any]:
    proc = spawn_python("bench._client", [json.dumps(spec)], stderr=stderr)
    out, _ = proc.communicate(timeout=3600)
    with open(stderr) as f:
        err = f.read()
    return last_json(proc, out, err)


# -- single stream --------------------------------------------------------


def single_stream(cluster: Cluster, src: str, via: str, work: Workdir,
                  window: int | None = None, chunk_size: int | None = None,
                  digest: str | None = None) -> dict[str, Any]:
    """
    One upload of C{src} from a fresh client process, C{via} "direct" (to
    node-1) or "lb" (through the balancer to its only server), asking for
    C{digest} as C{imgresume upload --digest} does (None: the client's
    default); the sample names the digest the upload used.
    """
    cluster.clear_storage()
    endpoint = cluster.endpoint("node-1" if via == "direct" else "lb")
    spec = {"endpoint": endpoint, "files": [[src, f"single-{via}.bin"]],
            "window": window, "chunk_size": chunk_size, "digest": digest}
    before = cluster.cpu()
    res = _run_client(spec, work.sub("logs", "client.stderr"))
    cpu = _cpu_delta(before, cluster.cpu())
    [up] = res["uploads"]
    if up["error"]:
        raise RuntimeError(f"imgresume {via}: {up['error']}")
    size = up["size"]
    acks = up.get("acks") or []
    gaps = sorted(b - a for a, b in itertools.pairwise(acks[1:]))  # after the first ACK
    return {
        "name": f"imgresume-{via}",
        "bytes": size,
        "seconds": up["end"] - up["start"],
        "hash_seconds": up["hashed"] - up["start"],
        "transfer_seconds": up["end"] - up["hashed"],
        # from the last ACK to COMPLETED: the server's SHA-256 read-back and rename
        "completion_seconds": up["end"] - up["all_acked"] if "all_acked" in up else None,
        # median time between two ACKs: the server's cycle per DATA packet
        "ack_interval_ms": gaps[len(gaps) // 2] * 1e3 if gaps else None,
        "packets": len(acks) - 1,
        "bytes_sent": up["bytes_sent"],
        "attempts": up["attempts"],
        "digest": up["digest"],
        "cpu": {
            "client": res["cpu"],
            "client_hash": res["hash_cpu"],
            "client_transfer": res["cpu"] - (res["hash_cpu"] or 0.0),
            "server": cpu.get("node-1", 0.0),
            **({"lb": cpu.get("lb", 0.0)} if via == "lb" else {}),
        },
    }


def storage_only(work: Workdir, src: str, chunk_size: int | None = None,
                 digest: str | None = None) -> dict[str, Any]:
    """
    The server's storage path alone (L{bench._storage_only}): the same file
    stored in the same packets by C{FilesystemStorage}, with the digest
    C{digest} (None: the default) and the default checksum, no network, no
    reactor: how fast one stream could go if the protocol cost nothing.
    """
    root = work.fresh("storage-only")
    res = run_python("bench._storage_only", [src, root, str(chunk_size or (1 << 20)),
                                             *([digest] if digest else [])])
    return {
        "name": "imgresume-storage-only",
        "bytes": res["bytes"],
        "seconds": res["seconds"],
        "write_seconds": res["write_seconds"],
        "completion_seconds": res["complete_seconds"],
        "write_ms_median": res["write_ms_median"],
        "pwrite_seconds": res["pwrite_seconds"],
        "fdatasync_seconds": res["fdatasync_seconds"],
        "packets": res["writes"],
        "cpu": {"server": res["cpu"]},
    }


# -- many clients -----------------------------------------------------------


def many_clients(cluster: Cluster, files: Sequence[str], procs: int,
                 work: Workdir) -> dict[str, Any]:
    """
    Every file uploaded at once through the balancer, one Uploader and one
    client id per file, spread over C{procs} client processes.  Server and balancer RSS are
    sampled every 0.2 s.
    """
    cluster.clear_storage()
    # Every upload is its own client (its own client id), as if from its own host.
    entries = [[p, f"many/{os.path.basename(p)}", f"bench-client-{i:04d}"]
               for i, p in enumerate(files)]
    groups = [entries[i::procs] for i in range(procs)]
    specs = [{"endpoint": cluster.endpoint("lb"), "files": g} for g in groups if g]
    before = cluster.cpu()
    stderr = work.sub("logs", "client-many.stderr")
    running = [spawn_python("bench._client", [json.dumps(s)], stderr=stderr) for s in specs]
    peak: dict[str, int] = {}
    outs = []
    for proc in running:
        while proc.poll() is None:
            for node, rss in cluster.rss().items():
                peak[node] = max(peak.get(node, 0), rss)
            time.sleep(0.2)
        out, _ = proc.communicate()
        outs.append((proc, out))
    cpu = _cpu_delta(before, cluster.cpu())
    with open(stderr) as f:
        err = f.read()
    results = [last_json(proc, out, err) for proc, out in outs]
    uploads = [u for r in results for u in r["uploads"]]
    done = [u for u in uploads if not u["error"]]
    return {
        "name": "imgresume-many",
        "bytes": sum(u["size"] for u in done),
        "files": len(uploads),
        "client_procs": len(specs),
        "failures": len(uploads) - len(done),
        "errors": sorted({u["error"] for u in uploads if u["error"]})[:10],
        "seconds": max(u["end"] for u in uploads) - min(u["start"] for u in uploads),
        "per_file_seconds": [u["end"] - u["start"] for u in done],
        "per_file_hash_seconds": [u["hashed"] - u["start"] for u in done],
        "attempts": sum(u.get("attempts", 0) for u in done),
        "servers_used": sorted({s for u in done for s in u["servers"]}),
        "retry_reasons": _merge([r.get("retry_reasons", {}) for r in results]),
        "cpu": {
            "client": sum(r["cpu"] for r in results),
            "server": sum(v for k, v in cpu.items() if k != "lb"),
            "lb": cpu.get("lb", 0.0),
            **{k: v for k, v in cpu.items() if k != "lb"},
        },
        "peak_rss": peak,
        "client_maxrss": [r["maxrss"] for r in results],
    }


def _merge(counts: list[dict[str, int]]) -> dict[str, int]:
    out: dict[str, int] = {}
    for c in counts:
        for k, v in c.items():
            out[k] = out.get(k, 0) + v
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


# -- resume -------------------------------------------------------------


def resume(cluster: Cluster, src: str, kill_at: Sequence[float], work: Workdir) -> dict[str, Any]:
    """
    Upload C{src} through the balancer and SIGKILL the server it is writing
    to at each fraction in C{kill_at}; the client (default backoff) resumes
    on another server.  A killed server is restarted (in a thread) once the
    client has a resumed byte acknowledged.
    """
    cluster.clear_storage()
    spec = {"endpoint": cluster.endpoint("lb"), "files": [[src, "resume.bin"]],
            "kill_at": list(kill_at)}
    stderr = work.sub("logs", "client-resume.stderr")
    proc = spawn_python("bench._client", [json.dumps(spec)], stderr=stderr)
    killed: list[dict[str, Any]] = []
    restarts: list[threading.Thread] = []
    last = ""
    assert proc.stdout is not None
    down: list[str] = []
    for line in proc.stdout:
        event = json.loads(line)
        if event.get("event") == "kill":
            node = event["server"]
            killed.append({"server": node, "t": now(), "offset": event["offset"]})
            cluster.kill(node)
            down.append(node)
        elif event.get("event") == "resumed":
            # Restart only now: a starting server's storage self-test would
            # compete for the disk with the resume being measured.
            for node in down:
                t = threading.Thread(target=cluster.start_node, args=(node,))
                t.start()
                restarts.append(t)
            down = []
        last = line
    proc.wait()
    for t in restarts:
        t.join()
    with open(stderr) as f:
        err = f.read()
    res = last_json(proc, last, err)
    [up] = res["uploads"]
    if up["error"]:
        raise RuntimeError(f"resume run: {up['error']}")
    return {"name": "imgresume-resume", "bytes": up["size"], "upload": up,
            "killed": killed, "resumes": analyse_resumes(up, killed)}


def analyse_resumes(up: dict[str, Any], killed: list[dict[str, Any]]) -> dict[str, Any]:
    """
    From the client's connection trace: for the first connection, connect
    to first ACK (the fresh baseline); for every break, the client's wait
    before reconnecting, and from the reconnect to ACCEPTED and to the
    first resumed byte acknowledged.
    """
    trace = up["trace"]
    first = trace[0]
    fresh = first["first_ack"] - first["connect_start"] if "first_ack" in first else None
    breaks = []
    i = 0
    while i < len(trace) - 1:
        broken = trace[i]
        j = i + 1
        # the first later connection that got a resumed byte acknowledged
        k = j
        while k < len(trace) and "first_ack" not in trace[k]:
            k += 1
        if k == len(trace):
            break
        ok = trace[k]
        lost = broken.get("lost")
        kill = killed[len(breaks)]["t"] if len(killed) > len(breaks) else None
        breaks.append({
            "server_killed": broken.get("server"),
            "resumed_on": ok.get("server"),
            "connections": k - i,
            "kill_to_lost": (lost - kill) if (lost and kill) else None,
            "lost_to_reconnect": trace[j]["connect_start"] - lost if lost else None,
            "reconnect_to_accepted": ok["accepted"] - trace[j]["connect_start"],
            "reconnect_to_first_ack": ok["first_ack"] - trace[j]["connect_start"],
            "connected_to_first_ack": ok["first_ack"] - ok["connected"],
            "acked_before": broken.get("last_ack"),
            "resumed_from": ok["accepted_offset"],
        })
        i = k
    return {
        "fresh_connect_to_first_ack": fresh,
        "breaks": breaks,
        "bytes_resent": up["bytes_sent"] - up["size"],
    }

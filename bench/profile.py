"""
Where the time goes in the direct single stream: the server sampled by
C{py-spy record --native --idle --threads} attached to its pid, the client
run under py-spy, both as raw collapsed stacks in the results directory,
then every sample put in one bucket (fsync, sha256, crc32, file writes and
reads, socket I/O, copies, waits, or the innermost Python function) per
thread role (reactor thread or disk/hash worker threads).

  python -m bench --only profile [--quick]

py-spy is a PyPI package (pip install py-spy); without it this group says
so and stops.  Profiling slows the processes down: the profiled run's
figures are not benchmark figures.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter, defaultdict
from typing import Any

from bench._common import Workdir, last_json, log, now, spawn_python
from bench.imgresume_runs import Cluster

RATE = 50  # samples per second: --native stops the process per sample; keep it rare

#: (bucket, test on one frame's function name), tried from the innermost frame out.
_RULES: list[tuple[str, Any]] = [
    ("fsync/fdatasync", lambda n: "fsync" in n or "fdatasync" in n),
    ("sha256", lambda n: "sha256" in n.lower()),
    ("crc32", lambda n: "crc32" in n.lower()),
    ("pwrite (file write)", lambda n: "pwrite" in n),
    ("pread/fadvise (file read)", lambda n: "pread" in n or "fadvise" in n),
    ("socket send", lambda n: n in {"send", "__send", "__libc_send", "sendmsg",
                                    "__libc_sendmsg", "writev", "__writev", "sock_send",
                                    "sock_sendall", "sock_sendmsg"}),
    ("socket recv", lambda n: n in {"recv", "__recv", "__libc_recv", "recvfrom",
                                    "sock_recv", "sock_recv_into", "sock_recv_guts"}),
    ("idle: epoll wait", lambda n: "epoll_wait" in n),
    ("idle: thread/lock wait", lambda n: "pthread_cond" in n or n.startswith("sem_")
     or "sem_wait" in n or "sem_clockwait" in n or "PyThread_acquire_lock" in n),
    ("memcpy/memmove (copies)", lambda n: "memcpy" in n or "memmove" in n),
    ("malloc/free/mmap", lambda n: n in {"malloc", "free", "munmap", "mmap", "_int_malloc",
                                         "_int_free", "__munmap", "__mmap", "realloc"}),
]
IDLE = {"idle: epoll wait", "idle: thread/lock wait"}


def _name(frame: str) -> str:
    return frame.split(" (", 1)[0]


def _bucket(frames: list[str]) -> str:
    names = [_name(f) for f in frames]
    if "take_gil" in names:
        return "waiting for the GIL"
    for frame, name in zip(reversed(frames), reversed(names)):
        for bucket, test in _RULES:
            if test(name):
                return bucket
    for frame in reversed(frames):
        if ".py:" in frame:
            name, where = frame.split(" (", 1)
            path = where.rsplit(":", 1)[0]
            return f"py: {name} ({'/'.join(path.split('/')[-2:])})"
    return f"native: {names[-1] if names else '?'}"


def _role(frames: list[str]) -> str:
    text = ";".join(frames)
    if "_threadworker" in text or "threadpool" in text or "_bootstrap_inner" in text:
        return "worker threads"
    return "reactor thread"


def summarise_raw(path: str) -> dict[str, Any]:
    """Bucket counts per thread role from a py-spy raw (collapsed) file."""
    roles: dict[str, Counter] = defaultdict(Counter)
    threads: dict[str, set] = defaultdict(set)
    with open(path) as f:
        for line in f:
            line = line.rstrip("\n")
            if not line:
                continue
            stack, _, count = line.rpartition(" ")
            frames = stack.split(";")
            thread, frames = frames[0], frames[1:]
            if any(f.startswith("_find_and_load") for f in frames):
                continue  # imports at start-up, before the upload
            role = _role(frames)
            threads[role].add(thread)
            roles[role][_bucket(frames)] += int(count)
    return {
        role: {"samples": sum(c.values()), "threads": len(threads[role]),
               "buckets": dict(c.most_common())}
        for role, c in roles.items()
    }


def _text(title: str, summary: dict[str, Any], wall: float, top: int = 8) -> list[str]:
    """Per role: busy seconds (samples not waiting) and the biggest buckets of them."""
    lines = [f"{title}:"]
    for role, data in sorted(summary.items()):
        busy = {k: v for k, v in data["buckets"].items() if k not in IDLE}
        total = sum(busy.values()) or 1
        lines.append(f"  {role} ({data['threads']} thread(s)): busy {total / RATE:.2f} s "
                     f"of the {wall:.2f} s upload; of that busy time:")
        for bucket, n in list(busy.items())[:top]:
            lines.append(f"    {100 * n / total:5.1f}%  {n / RATE:5.2f} s  {bucket}")
    return lines


def profile_single(work: Workdir, src: str, opts: Any) -> dict[str, Any]:
    spy = shutil.which("py-spy") or os.path.join(os.path.dirname(sys.executable), "py-spy")
    if not os.path.exists(spy):
        note = "py-spy is not installed (pip install py-spy): profile SKIPPED"
        log("!" * 20 + " " + note)
        return {"notes": [note]}
    os.makedirs(opts.outdir, exist_ok=True)
    server_out = os.path.join(opts.outdir, "profile-server.txt")
    client_out = os.path.join(opts.outdir, "profile-client.txt")
    cluster = Cluster(work, "profile", servers=1).start()
    try:
        cluster.clear_storage()
        flags = ["--native", "--threads", "--idle", "--rate", str(RATE),
                 "--format", "raw"]
        with open(work.sub("logs", "py-spy.log"), "ab") as err:
            server_spy = subprocess.Popen(
                [spy, "record", *flags, "-o", server_out, "--pid", str(cluster.pid("node-1"))],
                stdout=subprocess.DEVNULL, stderr=err,
            )
        time.sleep(1.5)  # attached
        spec = {"endpoint": cluster.endpoint("node-1"), "files": [[src, "profiled.bin"]],
                "window": opts.window, "chunk_size": opts.chunk_size}
        log("profile: direct single stream under py-spy")
        t0 = now()
        proc = spawn_python("bench._client", [json.dumps(spec)],
                            stderr=work.sub("logs", "py-spy-client.log"),
                            prefix=[spy, "record", *flags, "-o", client_out, "--"])
        out, _ = proc.communicate(timeout=3600)
        seconds = now() - t0
        server_spy.send_signal(signal.SIGINT)
        server_spy.wait(timeout=60)
        with open(work.sub("logs", "py-spy-client.log")) as f:
            res = last_json(proc, out, f.read())
    finally:
        cluster.stop()
    [up] = res["uploads"]
    server = summarise_raw(server_out)
    client = summarise_raw(client_out)
    wall = up["end"] - up["start"]
    acks = up.get("acks") or []
    gaps = sorted(b - a for a, b in itertools.pairwise(acks[1:]))
    text = "\n".join(
        [(f"profile of the direct single stream (py-spy --native, {RATE} Hz; slowed by "
          f"the sampling): {up['size'] >> 20} MiB in {wall:.2f} s: client hashing "
          f"{up['hashed'] - up['start']:.2f} s, connect to last ACK "
          f"{up.get('all_acked', up['end']) - up['hashed']:.2f} s ({len(gaps) + 1} packets, "
          f"median {1e3 * gaps[len(gaps) // 2] if gaps else float('nan'):.2f} ms apart), "
          f"last ACK to COMPLETED {up['end'] - up.get('all_acked', up['end']):.2f} s")]
        + _text("server", server, wall)
        + _text("client", client, wall)
        + [(f"(raw stacks: {os.path.relpath(server_out)}, {os.path.relpath(client_out)}; "
            "the server's include the second before and after the upload, idle)")]
    )
    return {"server": server, "client": client, "upload": up, "seconds": seconds,
            "raw": [server_out, client_out], "text": text}

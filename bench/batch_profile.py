"""
The batch-profile group (issue 16, item 1): where one small file's time
goes, reproducibly, so the figures can be taken again after each change.

  python -m bench --only batch-profile [--profile-files 200]

C{--profile-files} (200) files of 256 KiB, uploaded straight to ONE real
C{twistd imgresume} (no balancer) by L{bench._batch_trace}: the public
C{Uploader.upload_batch}, what C{imgresume upload DIR} runs, with every
frame it sends and receives timestamped.

 1. Timeline, C{--parallel 1}, journal off, then on, and C{--parallel 4}:
    each file split into the protocol's steps: a file of at most the
    server's C{put} (all of them here) goes whole in one PUT, up to two in
    flight per connection (L{bench._frames.PUT_STEPS}); a larger one
    through UPLOAD (L{bench._frames.STEPS}, shown only when a batch had
    one).  Median ms per step, the frames per file, files/s, CPU per file of
    client and server.  Nothing is sampled or traced in these runs.
 2. System calls: the same run (journal off) with C{strace -f -ttt -T -y}
    attached to the server: calls per file and their time, by call and by
    what they touched (a PUT's C{incoming/<key>.put} and C{<key>.done},
    directories...; L{bench._strace}), by step of the one-step store, and
    by protocol phase (how many PUTs were in flight).  strace slows every
    call down: its counts are exact, its times are not the run's.
 3. CPU: C{--parallel 4} under py-spy (server attached, client started
    under it), if py-spy is installed: each role's busy time per file and
    what it was spent on (buckets of L{bench.profile}).
 4. The client's hashing alone, per file, in this process: the digest
    the client used (BLAKE3 by default; it hashes each file once) and the
    checksum of a PUT's payload (CRC-32C).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from typing import Any

from bench import _frames, _strace
from bench._common import Workdir, last_json, log, median, now, spawn_python
from bench.batch import KiB, write_sources
from bench.imgresume_runs import Cluster
from imgresume import integrity

SIZE = 256 * KiB
#: The py-spy run uploads the files this many times (enough samples at 50 Hz).
PYSPY_REPEAT = 5
#: Longest a traced run may take, per file (strace slows the server ~3x).
SECONDS_PER_FILE = 0.5


def _client(cluster: Cluster, src: str, parallel: int, journal: str | None,
            work: Workdir, files: int, prefix: list[str] | None = None,
            repeat: int = 1) -> dict[str, Any]:
    spec = {"endpoint": cluster.endpoint("node-1"), "dir": src, "parallel": parallel,
            "journal": journal, "repeat": repeat}
    files *= repeat
    cpu0 = cluster.cpu().get("node-1", 0.0)
    proc = spawn_python("bench._batch_trace", [json.dumps(spec)],
                        stderr=work.sub("logs", "batch-trace.stderr"), prefix=prefix or ())
    try:
        out, _ = proc.communicate(timeout=60 + SECONDS_PER_FILE * files)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise
    with open(work.sub("logs", "batch-trace.stderr")) as f:
        res = last_json(proc, out, f.read()[-3000:])
    res["server_cpu"] = cluster.cpu().get("node-1", 0.0) - cpu0
    failed = [o for o in res["outcomes"] if o["error"]]
    if failed:
        raise RuntimeError(f"{len(failed)} uploads failed, e.g. {failed[0]['error']}")
    return res


def timeline(res: dict[str, Any]) -> dict[str, Any]:
    """
    Median ms per step over the files (a PUT's steps, L{_frames.PUT_STEPS},
    and an UPLOAD's, L{_frames.STEPS}), frames per file, CPU per file.  The
    files are those the frames show completed; C{completed_frames} counts
    the COMPLETED frames received, which should be the same number.
    """
    conns = res["connections"]
    files = [f for conn in conns for f in _frames.split_files(conn)]
    puts = [f for f in files if f["kind"] == "put"]
    uploads = [f for f in files if f["kind"] != "put"]
    steps: dict[str, list[float]] = {}
    for f in files:
        for step, seconds in _frames.step_times(f).items():
            steps.setdefault(step, []).append(seconds)
    n = len(files)

    def per(total: float, count: int) -> float:
        return total / count if count else float("nan")

    return {
        "files": n,
        "puts": len(puts),
        "uploads": len(uploads),
        "completed_frames": sum(_frames.completed_frames(conn) for conn in conns),
        "seconds": res["t1"] - res["t0"],
        "files_per_s": n / (res["t1"] - res["t0"]),
        "ms_median": {k: 1e3 * median(v) for k, v in steps.items()},
        "ms_mean": {k: 1e3 * sum(v) / len(v) for k, v in steps.items()},
        "data_frames": per(sum(f["data_frames"] for f in uploads), len(uploads)),
        "ack_frames": per(sum(f["ack_frames"] for f in uploads), len(uploads)),
        "puts_in_flight": per(sum(f["in_flight"] for f in puts), len(puts)),
        "connections": len(conns),
        "client_cpu_ms": 1e3 * per(res["cpu"], n),
        "server_cpu_ms": 1e3 * per(res["server_cpu"], n),
        "digest": res.get("digest"),
    }


def timeline_of(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """L{timeline} over several runs of the same batch: every file of every run."""
    merged = {
        "connections": [c for r in runs for c in r["connections"]],
        "t0": 0.0, "t1": sum(r["t1"] - r["t0"] for r in runs),
        "cpu": sum(r["cpu"] for r in runs), "server_cpu": sum(r["server_cpu"] for r in runs),
        "digest": runs[0].get("digest"),
    }
    out = timeline(merged)
    out["rounds"] = len(runs)
    out["connections"] //= len(runs)
    return out


def _boundaries(res: dict[str, Any]) -> list[tuple[float, str]]:
    """The connections' phases (L{_frames.phases}), [(time, phase starting then)], sorted."""
    return sorted(p for conn in res["connections"] for p in _frames.phases(conn))


def _strace_run(cluster: Cluster, src: str, work: Workdir, files: int) -> dict[str, Any]:
    strace = shutil.which("strace")
    if strace is None:
        return {"note": "strace is not installed (Debian: apt-get install -y strace): "
                        "system calls SKIPPED"}
    out = work.sub("logs", "batch-profile.strace")
    proc = subprocess.Popen([strace, "-f", "-qq", "-ttt", "-T", "-y", "-o", out,
                             "-p", str(cluster.pid("node-1"))],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(1.0)  # attached to every thread
        res = _client(cluster, src, 1, None, work, files)
        time.sleep(0.5)  # the last clean-up after COMPLETED
    finally:
        proc.send_signal(signal.SIGINT)  # detaches; the server runs on
        proc.wait(timeout=30)
    steps = _boundaries(res)
    with open(out) as f:
        calls = [c for c in _strace.parse(f) if steps and steps[0][0] <= c["t"]]
    n = timeline(res)["files"]
    t = _strace.tally(calls, n, steps)
    t["groups"] = _strace.grouped(t["rows"])
    t["put_steps"] = _strace.put_steps(t["rows"])
    t["seconds"] = res["t1"] - res["t0"]
    return t


def _pyspy_run(cluster: Cluster, src: str, work: Workdir, files: int,
               outdir: str) -> dict[str, Any]:
    from bench.profile import RATE

    spy = shutil.which("py-spy") or os.path.join(os.path.dirname(sys.executable), "py-spy")
    if not os.path.exists(spy):
        return {"note": "py-spy is not installed (pip install py-spy): CPU profile SKIPPED"}
    os.makedirs(outdir, exist_ok=True)
    server_out = os.path.join(outdir, "batch-profile-server.txt")
    client_out = os.path.join(outdir, "batch-profile-client.txt")
    flags = ["--native", "--threads", "--idle", "--rate", str(RATE), "--format", "raw"]
    with open(work.sub("logs", "py-spy-batch.log"), "ab") as err:
        server_spy = subprocess.Popen(
            [spy, "record", *flags, "-o", server_out, "--pid", str(cluster.pid("node-1"))],
            stdout=subprocess.DEVNULL, stderr=err)
    try:
        time.sleep(1.5)
        res = _client(cluster, src, 4, None, work, files,
                      prefix=[spy, "record", *flags, "-o", client_out, "--"],
                      repeat=PYSPY_REPEAT)
    finally:
        server_spy.send_signal(signal.SIGINT)
        server_spy.wait(timeout=60)
    n = timeline(res)["files"]
    out = {"files": n, "seconds": res["t1"] - res["t0"], "raw": [server_out, client_out]}
    for role, path in (("server", server_out), ("client", client_out)):
        summary = summarise_batch_raw(path)
        out[role] = {}
        for thread_role, data in summary.items():
            busy = data["buckets"]
            out[role][thread_role] = {
                "threads": data["threads"],
                "busy_ms_per_file": 1e3 * sum(busy.values()) / RATE / n,
                "buckets_ms_per_file": {k: 1e3 * v / RATE / n for k, v in busy.items()},
            }
    return out


_FILE_CALLS = frozenset({
    "open", "open64", "openat", "openat64", "mkdir", "mkdirat", "rename", "renameat", "link",
    "linkat", "unlink", "unlinkat", "rmdir", "close", "close_nocancel", "stat", "stat64",
    "lstat", "lstat64", "fstat", "fstat64", "fstatat", "fstatat64", "newfstatat",
    "fxstatat", "fxstatat64", "statx", "fcntl", "fcntl64", "lseek", "lseek64", "write",
    "pwrite", "pwrite64", "read", "ftruncate", "ftruncate64",
})

#: Coarse buckets for a stack, tried on each frame from the innermost out:
#: (bucket, test on the frame's function name, test on its file).
_COARSE: list[tuple[str, Any]] = [
    ("fsync/fdatasync", lambda n, f: "fsync" in n or "fdatasync" in n),
    ("hashing (BLAKE3, SHA-256, CRC-32C, CRC-32)",
     lambda n, f: any(h in n.lower() for h in ("blake3", "sha256", "crc32"))),
    ("file reads (pread, fadvise)", lambda n, f: "pread" in n or "fadvise" in n),
    ("socket send/recv", lambda n, f: n in {"send", "__send", "__libc_send", "sendmsg",
                                           "recv", "__recv", "__libc_recv", "recvfrom",
                                           "sock_send", "sock_recv", "sock_recv_into"}),
    ("other file system calls (open, mkdir, rename, link, unlink, close, stat)",
     lambda n, f: not f and n.lstrip("_").replace("libc_", "") in _FILE_CALLS),
    ("garbage collector", lambda n, f: n.startswith("gc_") or "collect" in n and not f),
    ("path walks (os.path.realpath, os.makedirs)",
     lambda n, f: f in ("posixpath.py", "os.py", "genericpath.py")),
    ("logging", lambda n, f: "twisted/logger" in f or "python/log.py" in f
     or "logfile.py" in f),
    ("json (meta.json, lease)", lambda n, f: f.startswith("json/")),
    ("metrics", lambda n, f: "imgresume/metrics" in f),
    ("protocol (frames, state machines)", lambda n, f: "imgresume/protocol" in f),
    ("storage (Python)", lambda n, f: "imgresume/storage" in f),
    ("server adapter (Python)", lambda n, f: "imgresume/server" in f),
    ("client (Python)", lambda n, f: "imgresume/client" in f),
    ("Deferreds", lambda n, f: "internet/defer.py" in f),
    ("thread pool hand-off", lambda n, f: "_threads/" in f or "threadpool" in f
     or "_signals.py" in f),
    ("reactor, transports", lambda n, f: "twisted/internet" in f),
]


def _frame(frame: str) -> tuple[str, str]:
    """(function name, file) of one py-spy frame, "name (file:line)"."""
    name, _, where = frame.partition(" (")
    return name, where.rsplit(":", 1)[0] if ".py:" in where else ""


def coarse_bucket(frames: list[str]) -> str:
    """The coarse bucket (L{_COARSE}) of one stack, frames outermost first."""
    for frame in reversed(frames):
        name, path = _frame(frame)
        for bucket, test in _COARSE:
            if test(name, path):
                return bucket
    return "other"


def storage_op(frames: list[str]) -> str:
    """The outermost imgresume function of a disk thread's stack (the storage operation)."""
    for frame in frames:
        name, path = _frame(frame)
        if "imgresume/" in path:
            return name
    return "-"


def summarise_batch_raw(path: str) -> dict[str, Any]:
    """
    Samples per thread role from a py-spy raw file: not waiting, by coarse
    bucket; on disk threads, by storage operation and coarse bucket.
    """
    from collections import Counter, defaultdict

    from bench.profile import IDLE, _bucket, _role

    roles: dict[str, Counter] = defaultdict(Counter)
    threads: dict[str, set] = defaultdict(set)
    with open(path) as f:
        for line in f:
            stack, _, count = line.rstrip("\n").rpartition(" ")
            if not stack:
                continue
            frames = stack.split(";")
            thread, frames = frames[0], frames[1:]
            if any(fr.startswith("_find_and_load") for fr in frames) or _bucket(frames) in IDLE:
                continue
            role = _role(frames)
            threads[role].add(thread)
            bucket = coarse_bucket(frames)
            if role == "worker threads":
                bucket = f"{storage_op(frames)}: {bucket}"
            roles[role][bucket] += int(count)
    return {role: {"threads": len(threads[role]), "buckets": dict(c.most_common())}
            for role, c in roles.items()}


def _hashing(src: str, digest: str = integrity.DEFAULT_DIGEST,
             checksum: str = integrity.DEFAULT_CHECKSUM) -> dict[str, Any]:
    """
    CPU ms per file of what the client computes over each file's bytes:
    its C{digest} (once per file: it names the PUT and fills it) and the
    C{checksum} of the PUT's payload, as the client calls them
    (L{imgresume.integrity}).
    """
    names = sorted(os.listdir(src))
    blobs = []
    for name in names:
        with open(os.path.join(src, name), "rb") as f:
            blobs.append(f.read())
    t0 = time.process_time()
    for b in blobs:
        integrity.digest_of(digest, b)
    t1 = time.process_time()
    for b in blobs:
        integrity.checksum(checksum, b)
    t2 = time.process_time()
    n = len(blobs) or 1
    return {"digest": digest, "checksum": checksum,
            "digest_ms": 1e3 * (t1 - t0) / n, "checksum_ms": 1e3 * (t2 - t1) / n}


def batch_profile(work: Workdir, opts: Any) -> dict[str, Any]:
    files = opts.profile_files
    src = work.sub("src", "batch-profile")
    log(f"batch-profile: writing {files} files of 256 KiB")
    write_sources(src, files, SIZE)
    cluster = Cluster(work, "batch-profile", servers=1).start()
    journal = work.sub("batch-profile-journal.json")
    out: dict[str, Any] = {"files": files, "size": SIZE, "notes": []}
    t0 = now()
    try:
        runs = [("parallel 1, no journal", 1, None), ("parallel 1, journal", 1, journal),
                ("parallel 4, no journal", 4, None)]
        log("batch-profile: warm-up")
        _client(cluster, src, 1, None, work, files)
        results: dict[str, list[dict[str, Any]]] = {name: [] for name, _, _ in runs}
        rounds = opts.batch_repeat
        for r in range(rounds):
            for name, parallel, j in runs[r % len(runs):] + runs[:r % len(runs)]:
                cluster.clear_storage()
                if j and os.path.exists(j):
                    os.unlink(j)
                log(f"batch-profile: round {r + 1}/{rounds}: {name}")
                results[name].append(_client(cluster, src, parallel, j, work, files))
        out["timeline"] = {name: timeline_of(rs) for name, rs in results.items()}
        cluster.clear_storage()
        log("batch-profile: parallel 1 under strace")
        out["strace"] = _strace_run(cluster, src, work, files)
        cluster.clear_storage()
        log("batch-profile: parallel 4 under py-spy")
        out["pyspy"] = _pyspy_run(cluster, src, work, files, opts.outdir)
        cluster.clear_storage()
    finally:
        cluster.stop()
        shutil.rmtree(src, ignore_errors=True)
    first = next(iter(results.values()))[0]
    out["hashing"] = _hashing_after(files, first.get("digest") or integrity.DEFAULT_DIGEST)
    out["seconds"] = now() - t0
    for part in ("strace", "pyspy"):
        if "note" in out[part]:
            out["notes"].append(out[part]["note"])
    out["text"] = text(out)
    return out


def _hashing_after(files: int, digest: str) -> dict[str, Any]:
    d = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"bench-hash-{os.getpid()}")
    try:
        write_sources(d, min(files, 200), SIZE)
        return _hashing(d, digest)
    finally:
        shutil.rmtree(d, ignore_errors=True)


# -- the text ----------------------------------------------------------------


def _ms(v: float | None, width: int) -> str:
    """A figure in C{width} columns, "-" where there is none (no such step in a run)."""
    return f"{'-':>{width}}" if v is None or v != v else f"{v:>{width}.2f}"


def _step_table(lines: list[str], tl: dict[str, Any], names: list[str], title: str,
                steps: list[str]) -> None:
    lines.append(f"  {title:<50}" + "".join(f"{n:>24}" for n in names))
    for step in steps:
        lines.append(f"    {step:<48}" + "".join(
            _ms(tl[n]["ms_median"].get(step), 24) for n in names))


def text(p: dict[str, Any]) -> str:
    """What the table prints for this group."""
    tl = p["timeline"]
    names = list(tl)
    first = tl[names[0]]
    lines = [f"batch-profile: {p['files']} files of {p['size'] // KiB} KiB straight to one "
             "server (Uploader.upload_batch, frames timestamped), "
             f"{first['rounds']} round(s)"]
    lines.append(f"  {'files per round: PUT / UPLOAD':<50}" + "".join(
        f"{tl[n]['puts'] // tl[n]['rounds']:>14} / {tl[n]['uploads'] // tl[n]['rounds']:<7}"
        for n in names))
    for n in names:
        if tl[n]["files"] != tl[n]["completed_frames"]:
            lines.append(f"  WARNING: {n}: {tl[n]['files']} files found in the frames, but "
                         f"{tl[n]['completed_frames']} COMPLETED frames received")
    if any(tl[n]["puts"] for n in names):
        _step_table(lines, tl, names, "PUT: ms per file (median)",
                    [s for s, _, _ in _frames.PUT_STEPS])
    if any(tl[n]["uploads"] for n in names):
        _step_table(lines, tl, names, "UPLOAD: ms per file (median)",
                    [s for s, _, _ in _frames.STEPS] + [_frames.UPLOAD_TOTAL])
    lines.append(f"  {'files/s (all rounds)':<50}" + "".join(
        f"{tl[n]['files_per_s']:>24.0f}" for n in names))
    lines.append(f"  {'CPU ms per file: client / server':<50}" + "".join(
        f"{tl[n]['client_cpu_ms']:>14.2f} / {tl[n]['server_cpu_ms']:<7.2f}" for n in names))
    if first["puts"]:
        lines.append(f"  frames per file: PUT, COMPLETED: 1 round trip, "
                     f"{first['puts_in_flight']:.2f} PUTs in flight (itself included) when "
                     f"one is sent; HELLO/WELCOME once per connection ({first['connections']})")
    if first["uploads"]:
        lines.append(f"  frames per UPLOAD file: UPLOAD, ACCEPTED, {first['data_frames']:.1f} "
                     f"DATA, {first['ack_frames']:.1f} ACK, FINISH, COMPLETED: 3 round trips "
                     "in series")
    h = p["hashing"]
    lines.append(
        f"  client CPU per file over the bytes: {integrity.title(h['digest'])} (once per file) "
        f"{h['digest_ms']:.2f} ms, {integrity.title(h['checksum'])} (per PUT) "
        f"{h['checksum_ms']:.2f} ms")
    st = p["strace"]
    if "rows" in st:
        lines.append(
            f"  server system calls per file (strace -f, parallel 1; times inflated by "
            f"strace): {st['calls_working']:.0f} calls taking {st['ms_working']:.2f} ms, "
            "plus waits")
        lines.append(f"    {'group':<64} {'calls':>6} {'failed':>6} {'ms':>7}")
        for g in st["groups"]:
            if g["per_file"]:
                lines.append(f"    {g['group']:<64} {g['per_file']:>6.2f} "
                             f"{g['failed_per_file']:>6.2f} {g['ms_per_file']:>7.3f}")
        if any(r["per_file"] for r in st.get("put_steps", ())):
            lines.append("    a PUT's one-step store, by step (calls, ms):")
            for r in st["put_steps"]:
                if r["per_file"]:
                    lines.append(f"      {r['step']:<62} {r['per_file']:>6.2f} "
                                 f"{r['ms_per_file']:>7.3f}")
        lines.append(f"    by call and target, the 25 costliest:")
        for r in [r for r in st["rows"] if r["key"][0] not in _strace.WAITS][:25]:
            call, k = r["key"]
            lines.append(f"      {call + ' ' + k:<40} {r['per_file']:>6.2f} "
                         f"{r['failed_per_file']:>6.2f} {r['ms_per_file']:>7.3f}")
        lines.append("    by protocol phase (calls, ms; waits left out):")
        for r in st["steps"]:
            lines.append(f"      {r['key']:<60} {r['per_file']:>6.1f} {r['ms_per_file']:>7.2f}")
    py = p["pyspy"]
    if "server" in py:
        lines.append(f"  threads' time (py-spy --native --idle, parallel 4; {py['files']} "
                     f"uploads in {py['seconds']:.1f} s; ms per file not waiting for work, "
                     "CPU or blocked in a call such as fsync; slowed by the sampling):")
        for role in ("server", "client"):
            for thread_role, d in sorted(py[role].items()):
                lines.append(f"    {role} {thread_role} ({d['threads']}): "
                             f"{d['busy_ms_per_file']:.2f} ms")
                for k, v in list(d["buckets_ms_per_file"].items())[:10]:
                    if v >= 0.05:
                        lines.append(f"      {v:6.2f}  {k}")
    return "\n".join(lines)

"""
The batch group (issue 16): a scanner's batch of small files, uploaded with
the real command, C{imgresume upload DIR --parallel N --no-journal}, through
a real C{twistd imgresume-lb} to 3 real C{twistd imgresume} servers on one
storage directory, against C{rsync -r --append-verify DIR} to an rsync
daemon on the same disk, without and with C{--fsync}, interleaved rounds.

Three batches (L{BATCHES}; smaller ones with --quick): 1,000 x 256 KiB,
400 x 2 MiB and 10,000 x 64 KiB files of random bytes, written once per
run into the work directory.  For each run: the command's wall time (spawn
to exit, so the client's interpreter start-up is in it; that start-up is
measured on its own each round, by the same command on an empty directory),
CPU of the client (wait4), servers and balancer (/proc), the servers' peak
RSS (VmHWM reset before each run, and VmRSS sampled every 0.1 s), failures
as the command reports them (C{--json}: one line per file), and then the
storage checked: every source file under C{complete/} with the right
SHA-256, nothing else there, no partial upload left in C{incoming/}.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from bench import tus
from bench._common import (
    ROOT,
    Workdir,
    child_env,
    log,
    median,
    now,
    proc_hwm,
    settle,
    wait_rusage,
)

KiB = 1 << 10
MiB = 1 << 20
MB = 1e6

#: (key, files, bytes per file, most rounds): the full run's batches, and
#: --quick's.  The 10,000-file batch runs once: its target is not a ratio
#: (all stored, memory bounded), and a round takes about 2 minutes here.
BATCHES = [("256k", 1000, 256 * KiB, None), ("2m", 400, 2 * MiB, None),
           ("64k", 10000, 64 * KiB, 1)]
QUICK_BATCHES = [("256k", 200, 256 * KiB, None), ("2m", 100, 2 * MiB, None),
                 ("64k", 1000, 64 * KiB, 1)]
#: The issue's targets (issue 16): imgresume's files/s over rsync's, best of rounds.
TARGET_VS_RSYNC_FSYNC = 1.0
TARGET_256K_VS_RSYNC = 0.5
#: Peak RSS per server for the 10,000 x 64 KiB batch, bytes (150 MB).
TARGET_RSS = 150_000_000

IMGRESUME = "imgresume"
RSYNC = "rsync-append-verify"
RSYNC_FSYNC = "rsync-append-verify-fsync"
#: tus-node-server receiving from tus-js-client (bench/tus.py), 1,000 x 256 KiB only.
TUS = tus.BATCH
METHODS = [IMGRESUME, RSYNC, RSYNC_FSYNC, TUS]

_SUMMARY = re.compile(r"over (\d+) connections?")


def label(key: str, files: int, size: int) -> str:
    """C{1,000 x 256 KiB}."""
    unit = f"{size // MiB} MiB" if size >= MiB else f"{size // KiB} KiB"
    return f"{files:,} x {unit}"


def cli_argv() -> list[str]:
    """The C{imgresume} command of this interpreter's environment."""
    script = os.path.join(os.path.dirname(sys.executable), "imgresume")
    return [script] if os.path.exists(script) else [sys.executable, "-m", "imgresume"]


def write_sources(d: str, files: int, size: int) -> dict[str, str]:
    """C{files} random files of C{size} bytes in C{d}: {relative path: SHA-256 hex}."""
    if os.path.isdir(d):
        shutil.rmtree(d)
    os.makedirs(d)
    digests = {}
    for i in range(files):
        name = f"scan-{i:05d}.bin"
        data = os.urandom(size)
        with open(os.path.join(d, name), "wb") as f:
            f.write(data)
        digests[name] = hashlib.sha256(data).hexdigest()
    os.sync()
    return digests


def timeout_for(files: int) -> float:
    """How long one command may take before the harness kills it: 0.1 s a file, + 2 min."""
    return 120.0 + 0.1 * files


def reset_hwm(pids: dict[str, int]) -> None:
    """Reset each process's peak RSS (VmHWM) to its current RSS."""
    for pid in pids.values():
        try:
            with open(f"/proc/{pid}/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            pass


# -- one run of the command ------------------------------------------------------


def run_cli(argv: list[str], work: Workdir, tag: str, timeout: float) -> dict[str, Any]:
    """
    Run C{argv} to its end (killed after C{timeout} s): wall seconds, exit
    code, CPU (wait4), stdout lines and the end of stderr.
    """
    out_path = work.sub("logs", f"cli-{tag}.out")
    err_path = work.sub("logs", f"cli-{tag}.err")
    with open(out_path, "w") as out, open(err_path, "w") as err:
        t0 = now()
        proc = subprocess.Popen(argv, env=child_env(), cwd=ROOT, stdin=subprocess.DEVNULL,
                                stdout=out, stderr=err)
        timed_out = False
        try:
            rc, cpu = wait_rusage(proc, timeout=timeout)
        except TimeoutError:
            timed_out = True
            proc.wait()
            rc, cpu = proc.returncode, float("nan")
        seconds = now() - t0
    with open(out_path) as f:
        lines = f.read().splitlines()
    with open(err_path) as f:
        err_text = f.read()
    return {"seconds": seconds, "exit": rc, "cpu": cpu, "timed_out": timed_out,
            "stdout": lines, "stderr": err_text[-2000:]}


def startup(cluster: Any, work: Workdir) -> dict[str, Any]:
    """
    The command's fixed cost: C{imgresume upload} of an empty directory
    (interpreter start-up, imports, the uploader made; no connection).
    """
    empty = work.fresh("batch-empty")
    r = run_cli([*cli_argv(), "upload", "--to", cluster.endpoint("lb"), "--no-journal",
                 empty], work, "startup", 60.0)
    return {"seconds": r["seconds"], "cpu": r["cpu"]}


def imgresume_batch(cluster: Any, src: str, digests: dict[str, str], parallel: int,
                    work: Workdir) -> dict[str, Any]:
    """
    C{imgresume upload --to LB --parallel N --no-journal --json SRC} into
    empty storage, then the storage checked against the sources.
    """
    from bench._sampler import ClusterSampler

    cluster.clear_storage()
    pids = {node: cluster.pid(node) for node in cluster.procs}
    reset_hwm(pids)
    boot = startup(cluster, work)
    sampler = ClusterSampler(cluster).start()
    cpu0 = cluster.cpu()
    files = len(digests)
    argv = [*cli_argv(), "upload", "--to", cluster.endpoint("lb"), "--parallel",
            str(parallel), "--no-journal", "--json", src]
    try:
        r = run_cli(argv, work, "batch", timeout_for(files))
    finally:
        sampler.stop()
    cpu1 = cluster.cpu()
    hwm = {}
    for node, pid in pids.items():
        try:
            hwm[node] = proc_hwm(pid)
        except OSError:
            pass
    rows = []
    for line in r["stdout"]:
        if line.startswith("{"):
            try:
                rows.append(json.loads(line))
            except ValueError:
                pass
    failed = [row for row in rows if row.get("error")]
    stored_ok = len(rows) - len(failed)
    m = _SUMMARY.search(r["stderr"])
    cpu = {k: cpu1[k] - cpu0[k] for k in cpu1 if k in cpu0}
    return {
        "name": IMGRESUME,
        "argv": " ".join(argv),
        "files": files,
        "bytes": sum(os.path.getsize(os.path.join(src, n)) for n in digests),
        "seconds": r["seconds"],
        "exit": r["exit"],
        "timed_out": r["timed_out"],
        "reported_ok": stored_ok,
        "failures": files - stored_ok,
        "errors": sorted({row["error"] for row in failed})[:5]
        + ([r["stderr"].strip().splitlines()[-1]] if r["exit"] and r["stderr"].strip() else []),
        "connections": int(m.group(1)) if m else None,
        "startup": boot,
        "cpu": {
            "client": r["cpu"],
            "server": sum(v for k, v in cpu.items() if k != "lb"),
            "lb": cpu.get("lb", 0.0),
            **{k: v for k, v in cpu.items() if k != "lb"},
        },
        "hwm": hwm,
        "peak_rss": sampler.peak_rss,
        **verify(cluster.storage, digests),
    }


def verify(storage: str, digests: dict[str, str]) -> dict[str, Any]:
    """
    Every source under C{complete/} with its SHA-256, and nothing else
    there; what is left in C{incoming/}: upload directories, of which
    partial ones still hold a C{data} file, and the one-step store's files
    (docs/storage.md, "Storing a small file in one step"): a C{.put} with
    more than one link is a published file kept to answer a repeat (with
    its C{.done} mark), one with a single link was cut short (partial).
    """
    complete = os.path.join(storage, "complete")
    stored = set()
    for dirpath, _, names in os.walk(complete):
        for name in names:
            stored.add(os.path.relpath(os.path.join(dirpath, name), complete)
                       .replace(os.sep, "/"))

    def check(name: str) -> str:
        h = hashlib.sha256()
        try:
            with open(os.path.join(complete, name), "rb") as f:
                while block := f.read(MiB):
                    h.update(block)
        except FileNotFoundError:
            return "missing"
        return "ok" if h.hexdigest() == digests[name] else "mismatch"

    present = [n for n in digests if n in stored]
    with ThreadPoolExecutor(2) as pool:
        outcomes = list(pool.map(check, present))
    incoming = os.path.join(storage, "incoming")
    entries = os.listdir(incoming) if os.path.isdir(incoming) else []
    dirs = [e for e in entries if os.path.isdir(os.path.join(incoming, e))]
    puts = [e for e in entries if e.endswith(".put")]
    cut_short = sum(os.stat(os.path.join(incoming, e)).st_nlink == 1 for e in puts)
    partial = sum(os.path.exists(os.path.join(incoming, d, "data")) for d in dirs)
    return {
        "verified": outcomes.count("ok"),
        "mismatched": outcomes.count("mismatch") + outcomes.count("missing"),
        "missing": len(digests) - len(present),
        "extra": len(stored - set(digests)),
        "incoming_dirs": len(dirs),
        "incoming_puts": len(puts) - cut_short,
        "incoming_partial": partial + cut_short,
    }


# -- the group ---------------------------------------------------------------


def batch(work: Workdir, opts: Any) -> dict[str, Any]:
    """
    Each batch of L{BATCHES} (L{QUICK_BATCHES} with --quick): imgresume,
    rsync and rsync --fsync, C{opts.batch_repeat} rounds in rotated order
    (the 10,000-file batch: one).
    """
    from bench import baselines
    from bench.imgresume_runs import Cluster

    batches = QUICK_BATCHES if opts.mode == "quick" else BATCHES
    parallel = opts.batch_parallel
    notes = []
    rsyncd = baselines.RsyncDaemon(work)
    if rsyncd.available:
        rsyncd.start()
    else:
        notes.append(baselines.rsync_missing_note())
    tusd = tus.baseline(work, opts.tus, opts.tus_cache, notes)
    try:
        cluster = Cluster(work, "batch", servers=3).start()
    except BaseException:
        rsyncd.stop()
        tusd.stop()
        raise
    samples: dict[str, dict[str, list[dict[str, Any]]]] = {}
    shapes = {}
    try:
        for key, files, size, most in batches:
            name = label(key, files, size)
            src = work.sub("src", f"batch-{key}")
            log(f"batch {name}: writing {files * size / MB:.0f} MB of sources")
            digests = write_sources(src, files, size)
            shapes[key] = {"files": files, "size": size, "label": name}
            runs = [(IMGRESUME, lambda: imgresume_batch(cluster, src, digests, parallel, work))]
            if rsyncd.available:
                runs += [
                    (RSYNC, lambda: rsyncd.upload_tree(src, False, timeout_for(files))),
                    (RSYNC_FSYNC, lambda: rsyncd.upload_tree(src, True, timeout_for(files))),
                ]
            if key == "256k" and tusd.available:  # a second reference (issue 13)
                runs.append((TUS, lambda: tusd.upload_batch(src, digests, parallel,
                                                            timeout_for(files))))
            got: dict[str, list[dict[str, Any]]] = defaultdict(list)
            left_out: set[str] = set()
            rounds = min(opts.batch_repeat, most or opts.batch_repeat)
            for r in range(rounds):
                order = runs[r % len(runs):] + runs[:r % len(runs)]
                for method, run in order:
                    if method in left_out:
                        continue
                    settle(work.sub("dst"))
                    cluster.clear_storage()
                    log(f"batch {name}, round {r + 1}/{rounds}: {method}")
                    try:
                        m = run()
                    except RuntimeError as e:
                        if method != TUS:
                            raise
                        notes.append(tus.failed_note(f"{TUS} ({name})", r + 1, e))
                        left_out.add(method)
                        got.pop(method, None)
                        continue
                    got[method].append(m)
                    log(f"  {m['files'] / m['seconds']:.0f} files/s "
                        f"({m['seconds']:.2f} s), {m.get('failures', 0)} failed")
            samples[key] = dict(got)
            settle(work.sub("dst"))
            cluster.clear_storage()
            shutil.rmtree(src, ignore_errors=True)
    finally:
        cluster.stop()
        rsyncd.stop()
        tusd.stop()
    return {"samples": samples, "batches": shapes, "parallel": parallel, "notes": notes,
            "rounds": opts.batch_repeat}


# -- figures ---------------------------------------------------------------------


def figures(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """One method's figures over its rounds: best and median files/s, CPU per file."""
    files = samples[0]["files"]
    nbytes = samples[0]["bytes"]
    seconds = [s["seconds"] for s in samples]
    best, med = min(seconds), median(seconds)
    fig: dict[str, Any] = {
        "files": files, "bytes": nbytes, "rounds": len(samples), "seconds_all": seconds,
        "files_per_s": files / best, "files_per_s_median": files / med,
        "mb_per_s": nbytes / best / MB, "mb_per_s_median": nbytes / med / MB,
        "failures": sum(s.get("failures", 0) for s in samples),
    }
    cpu: dict[str, float] = {}
    for role in sorted({r for s in samples for r in s["cpu"]}):
        per_file = []
        for s in samples:
            v = s["cpu"].get(role)
            if v is None:
                continue
            if role == "client" and "startup" in s:
                v -= s["startup"]["cpu"]  # the command's fixed cost, shown apart
            per_file.append(1e3 * v / files)
        cpu[role] = median(per_file)
    fig["cpu_ms_per_file"] = cpu
    if "startup" in samples[0]:
        fig["startup_seconds"] = median([s["startup"]["seconds"] for s in samples])
        fig["startup_cpu"] = median([s["startup"]["cpu"] for s in samples])
        after = [s["seconds"] - s["startup"]["seconds"] for s in samples]
        fig["files_per_s_after_startup"] = files / min(after)
        for key in ("verified", "missing", "mismatched", "extra", "incoming_partial"):
            fig[key] = sum(s[key] for s in samples)
        fig["checked"] = files * len(samples)
        fig["incoming_dirs"] = max(s["incoming_dirs"] for s in samples)
        fig["incoming_puts"] = max(s.get("incoming_puts", 0) for s in samples)
        fig["connections"] = [s.get("connections") for s in samples]
        nodes = sorted({k for s in samples for k in s["hwm"]})
        fig["hwm"] = {k: max(s["hwm"].get(k, 0) for s in samples) for k in nodes}
        fig["peak_rss"] = {k: max(s["peak_rss"].get(k, 0) for s in samples) for k in nodes}
        fig["errors"] = sorted({e for s in samples for e in s.get("errors", [])})[:5]
        fig["exit"] = [s["exit"] for s in samples]
    elif "verified" in samples[0]:  # tus: each upload's stored file checked
        for key in ("verified", "missing", "mismatched", "errors"):
            fig[key] = sum(s[key] for s in samples)
        fig["checked"] = files * len(samples)
        fig["problems"] = [p for s in samples for p in s.get("problems", [])][:3]
        fig["files_per_s_in_process"] = files / min(s["in_process_seconds"] for s in samples)
    return fig


def ratio(a: dict[str, Any] | None, b: dict[str, Any] | None,
          key: str = "files_per_s") -> float | None:
    """C{a}'s files/s over C{b}'s (None when either is missing)."""
    if not a or not b or not b.get(key):
        return None
    return a[key] / b[key]


def summarise(group: dict[str, Any]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The batch group's figures per batch, and issue 16's targets (stated, not asserted)."""
    fig: dict[str, Any] = {"parallel": group["parallel"], "batches": {}}
    targets: list[dict[str, Any]] = []
    for key, by_method in group["samples"].items():
        shape = group["batches"][key]
        f = {m: figures(s) for m, s in by_method.items() if s}
        img, rs, rsf = f.get(IMGRESUME), f.get(RSYNC), f.get(RSYNC_FSYNC)
        for m in f.values():
            m["x_rsync_fsync"] = ratio(m, rsf)
            m["x_rsync"] = ratio(m, rs)
            m["x_rsync_fsync_median"] = ratio(m, rsf, "files_per_s_median")
        if img:
            img["x_rsync_fsync_after_startup"] = (
                img["files_per_s_after_startup"] / rsf["files_per_s"] if rsf else None)
        if img and TUS in f:
            f[TUS]["imgresume_x"] = ratio(img, f[TUS])
        fig["batches"][key] = {"label": shape["label"], "methods": f}
        targets += batch_targets(key, shape["label"], img, rsf, rs)
    return fig, targets


def _verdict_ratio(value: float | None, floor: float) -> bool | None:
    return None if value is None else value >= floor


def batch_targets(key: str, name: str, img: dict[str, Any] | None,
                  rsf: dict[str, Any] | None, rs: dict[str, Any] | None) -> list[dict[str, Any]]:
    """Issue 16's targets for one batch, from its figures."""
    if img is None:
        return []
    out = []
    failures = (f"{img['failures']} failed, {img['missing'] + img['mismatched']} "
                "missing or wrong in complete/")
    if key in ("256k", "2m"):
        v = ratio(img, rsf)
        out.append({
            "target": f"batch {name}: imgresume >= {TARGET_VS_RSYNC_FSYNC}x "
                      "rsync -r --append-verify --fsync (files/s, best of rounds)",
            "value": v, "met": _verdict_ratio(v, TARGET_VS_RSYNC_FSYNC),
            "also": (f"{img['files_per_s']:.0f} against {rsf['files_per_s']:.0f} files/s; "
                     f"median {_x(ratio(img, rsf, 'files_per_s_median'))}; without the client's "
                     f"{img['startup_seconds']:.2f} s start-up "
                     f"{_x(img['files_per_s_after_startup'] / rsf['files_per_s'])}; {failures}")
            if rsf else "rsync missing: not measured",
        })
    if key == "256k":
        v = ratio(img, rs)
        out.append({
            "target": f"batch {name}: imgresume >= {TARGET_256K_VS_RSYNC}x "
                      "rsync -r --append-verify (no --fsync)",
            "value": v, "met": _verdict_ratio(v, TARGET_256K_VS_RSYNC),
            "also": (f"{img['files_per_s']:.0f} against {rs['files_per_s']:.0f} files/s"
                     if rs else "rsync missing: not measured"),
        })
    if key == "64k":
        servers = {k: v for k, v in img["hwm"].items() if k != "lb"}
        worst = max(servers.values(), default=0)
        lost = img["missing"] + img["mismatched"] + img["extra"] + img["incoming_partial"]
        out.append({
            "target": f"batch {name}: completes with 0 failures, every file verified "
                      "in complete/",
            "value": img["failures"] + lost, "met": img["failures"] == 0 and lost == 0
            and img["verified"] == img["checked"],
            "shown": f"{img['verified']} of {img['checked']} verified",
            "also": (f"{failures}, {img['extra']} extra, {img['incoming_partial']} partial "
                     f"left; {img['files_per_s']:.0f} files/s, "
                     f"{_x(ratio(img, rsf))} rsync --fsync, {_x(ratio(img, rs))} rsync"),
        })
        out.append({
            "target": f"batch {name}: peak RSS per server <= {TARGET_RSS / MB:.0f} MB",
            "value": worst, "met": worst <= TARGET_RSS, "shown": f"{worst / MB:.0f} MB",
            "also": f"VmHWM of the largest server; balancer {img['hwm'].get('lb', 0) / MB:.0f} MB",
        })
    return out


# -- the table -----------------------------------------------------------------------


def _x(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}x"


LABELS = {
    IMGRESUME: "imgresume upload --parallel {p}",
    RSYNC: "rsync -r --append-verify",
    RSYNC_FSYNC: "rsync -r --append-verify --fsync",
    TUS: "tus-js-client x{p} -> tus-node-server",
}


def table_lines(fig: dict[str, Any]) -> list[str]:
    """The batch group's lines of the table."""
    p = fig["parallel"]
    lines = [
        f"batches of small files (imgresume: lb + 3 servers, --parallel {p}, --no-journal; "
        "files/s best / median of rounds)",
    ]
    for key, b in fig["batches"].items():
        lines.append(f"{b['label']:<38} {'files/s':>13} {'MB/s':>7} {'x rsync+fs':>10} "
                     f"{'x rsync':>8}  CPU ms/file c / s / lb  fail")
        for method, f in b["methods"].items():
            cpu = " / ".join(f"{f['cpu_ms_per_file'][r]:.2f}" if r in f["cpu_ms_per_file"]
                             else "-" for r in ("client", "server", "lb"))
            rate = f"{f['files_per_s']:.0f} / {f['files_per_s_median']:.0f}"
            lines.append(f"  {LABELS.get(method, method).format(p=p):<36} {rate:>13} "
                         f"{f['mb_per_s']:>7.1f} {_x(f['x_rsync_fsync']):>10} "
                         f"{_x(f['x_rsync']):>8}  {cpu:<22} {f['failures']:>4}")
            if method == IMGRESUME:
                rss = ", ".join(f"{k} {v / MB:.0f}" for k, v in f["hwm"].items())
                lines.append(
                    f"    client start-up {f['startup_seconds']:.2f} s, "
                    f"{f['startup_cpu']:.2f} CPU s (not in CPU ms/file); without it "
                    f"{f['files_per_s_after_startup']:.0f} files/s = "
                    f"{_x(f['x_rsync_fsync_after_startup'])} rsync --fsync")
                lines.append(
                    f"    complete/: {f['verified']} of {f['checked']} verified (SHA-256), "
                    f"{f['missing']} missing, {f['mismatched']} wrong, {f['extra']} extra; "
                    f"incoming/: {f['incoming_dirs']} upload dirs and "
                    f"{f.get('incoming_puts', 0)} published .put files left (until GC), "
                    f"{f['incoming_partial']} partial; connections {f['connections']}")
                lines.append(f"    peak RSS MB (VmHWM): {rss}")
                for e in f["errors"][:3]:
                    lines.append(f"    failed: {e[:150]}")
            if method == TUS:
                lines.append(
                    f"    imgresume {_x(f.get('imgresume_x'))} of this (files/s); without "
                    f"Node's start-up {f['files_per_s_in_process']:.0f} files/s; one PATCH per "
                    "file, NO fsync, NO checksum")
                lines.append(
                    f"    stored: {f['verified']} of {f['checked']} SHA-256 ok, "
                    f"{f['missing']} missing, {f['mismatched']} wrong")
                for e in f["problems"]:
                    lines.append(f"    failed: {e[:150]}")
    return lines

"""
The benchmark groups.  Each one measures its own baselines in the same run,
interleaved with the imgresume measurements they are compared to, and
returns C{{"samples": {name: [measurement, ...]}, ...}}.
"""

from __future__ import annotations

import os
from collections import defaultdict
from collections.abc import Callable
from typing import Any

from bench import baselines, tus, tus_imgresume
from bench._common import Workdir, image_sizes, log, settle, write_random
from bench.imgresume_runs import (
    Cluster,
    many_clients,
    resume,
    single_stream,
    storage_only,
)
from bench.batch import batch
from bench.latency import latency
from bench.scale import scale


def _source(work: Workdir, size: int) -> str:
    """The single-stream source file (random bytes), written once per run."""
    path = work.sub("src", "single.bin")
    if not os.path.exists(path) or os.path.getsize(path) != size:
        log(f"writing {size >> 20} MiB of random data to {path}")
        write_random(path, size)
    return path


def _settle_all(work: Workdir, *clusters: Cluster) -> None:
    settle(work.sub("dst"), work.sub("storage-only"))
    for c in clusters:
        c.clear_storage()


def single(work: Workdir, opts: Any) -> dict[str, Any]:
    """
    One file of C{opts.size} bytes: the plain TCP copy (without and with
    fsync), dd conv=fsync, the rsync daemon (--append-verify, without and
    with --fsync), tus-node-server with tus-js-client (one PATCH, and
    16 MiB PATCHes), imgresume direct and through the balancer;
    C{opts.repeat} rounds, each in a rotated order.
    """
    src = _source(work, opts.size)
    notes = []
    rsyncd = baselines.RsyncDaemon(work)
    if rsyncd.available:
        rsyncd.start()
    else:
        notes.append(baselines.rsync_missing_note())
    tusd = tus.baseline(work, opts.tus, opts.tus_cache, notes)
    try:
        cluster = Cluster(work, "single", servers=1).start()
    except BaseException:
        rsyncd.stop()
        tusd.stop()
        raise
    runs: list[tuple[str, Callable[[], dict[str, Any]]]] = [
        ("tcp-copy", lambda: baselines.tcp_copy(work, [src], False, "tcp-copy")),
        ("tcp-copy-fsync", lambda: baselines.tcp_copy(work, [src], True, "tcp-copy-fsync")),
        ("dd-fsync", lambda: baselines.dd_fsync(work, src)),
    ]
    if rsyncd.available:
        runs += [
            ("rsync-append-verify", lambda: rsyncd.upload(src, fsync=False)),
            ("rsync-append-verify-fsync", lambda: rsyncd.upload(src, fsync=True)),
        ]
    tus_imgr = tus_imgresume.start(work, tusd, notes) if tusd.available else None
    if tusd.available:
        runs += [
            (tus.ONE_PATCH, lambda: tusd.upload(src, None)),
            (tus.CHUNKED, lambda: tusd.upload(src, tus.CHUNK)),
        ]
    if tus_imgr is not None:
        runs += [(tus_imgresume.DIRECT, lambda: tus_imgr.upload(src, "direct")),
                 (tus_imgresume.LB, lambda: tus_imgr.upload(src, "lb"))]
    runs += [
        ("imgresume-storage-only", lambda: storage_only(work, src, opts.chunk_size,
                                                        opts.digest)),
        ("imgresume-direct", lambda: single_stream(cluster, src, "direct", work,
                                                   opts.window, opts.chunk_size, opts.digest)),
        ("imgresume-lb", lambda: single_stream(cluster, src, "lb", work,
                                               opts.window, opts.chunk_size, opts.digest)),
    ]
    samples: dict[str, list[dict[str, Any]]] = defaultdict(list)
    left_out: set[str] = set()
    try:
        for r in range(opts.repeat):
            order = runs[r % len(runs):] + runs[:r % len(runs)]
            for name, run in order:
                if name in left_out:
                    continue
                _settle_all(work, cluster)
                log(f"single, round {r + 1}/{opts.repeat}: {name}")
                try:
                    samples[name].append(run())
                except RuntimeError as e:
                    if not name.startswith("tus-"):
                        raise
                    # an npm-installed baseline failing must not lose the group
                    notes.append(tus.failed_note(name, r + 1, e))
                    left_out.add(name)
                    samples.pop(name, None)
        _settle_all(work, cluster)
    finally:
        cluster.stop()
        rsyncd.stop()
        tusd.stop()
        if tus_imgr is not None:
            tus_imgr.stop()
    return {"samples": dict(samples), "notes": notes, "size": opts.size,
            "tus": tusd.describe() if tus.ONE_PATCH in samples else None}


def concurrency(work: Workdir, opts: Any) -> dict[str, Any]:
    """
    C{opts.clients} image-sized files (200 KB to 20 MB, log-uniform) at
    once: the plain TCP copy of all of them (each fsynced), then imgresume
    through the balancer to 3 servers.
    """
    sizes = image_sizes(opts.clients)
    d = work.sub("src", "many")
    os.makedirs(d, exist_ok=True)
    files = []
    log(f"writing {opts.clients} files, {sum(sizes) / 1e6:.0f} MB in all")
    for i, size in enumerate(sizes):
        files.append(write_random(os.path.join(d, f"img-{i:04d}.bin"), size))
    cluster = Cluster(work, "many", servers=3).start()
    samples: dict[str, list[dict[str, Any]]] = defaultdict(list)
    try:
        for r in range(opts.many_repeat):
            _settle_all(work, cluster)
            log(f"concurrency, round {r + 1}/{opts.many_repeat}: tcp-copy-many-fsync")
            samples["tcp-copy-many-fsync"].append(
                baselines.tcp_copy(work, files, True, "tcp-copy-many-fsync"))
            _settle_all(work, cluster)
            log(f"concurrency, round {r + 1}/{opts.many_repeat}: imgresume-many "
                f"({opts.clients} uploads in {opts.client_procs} processes)")
            samples["imgresume-many"].append(
                many_clients(cluster, files, opts.client_procs, work))
        _settle_all(work, cluster)
    finally:
        cluster.stop()
    return {"samples": dict(samples), "sizes": sizes}


def resume_cost(work: Workdir, opts: Any) -> dict[str, Any]:
    """
    One upload of the single-stream file through the balancer to 3 servers,
    the serving server SIGKILLed at C{opts.kills} evenly spaced points.
    """
    src = _source(work, opts.size)
    cluster = Cluster(work, "resume", servers=3).start()
    n = opts.kills
    kill_at = [(i + 1) / (n + 1) for i in range(n)]
    try:
        _settle_all(work, cluster)
        log(f"resume: {n} SIGKILLs during a {opts.size >> 20} MiB upload")
        m = resume(cluster, src, kill_at, work)
        _settle_all(work, cluster)
    finally:
        cluster.stop()
    return {"samples": {"imgresume-resume": [m]}}


def batch_profile(work: Workdir, opts: Any) -> dict[str, Any]:
    from bench.batch_profile import batch_profile as run

    return run(work, opts)


def profile(work: Workdir, opts: Any) -> dict[str, Any]:
    from bench.profile import profile_single

    src = _source(work, opts.size)
    return profile_single(work, src, opts)


GROUPS: dict[str, Callable[[Workdir, Any], dict[str, Any]]] = {
    "single": single,
    "concurrency": concurrency,
    "resume": resume_cost,
    "profile": profile,
    "scale": scale,
    "latency": latency,
    "batch": batch,
    "batch-profile": batch_profile,
}
#: What runs without --only (the profiles are on demand: --only profile or
#: --profile, --only batch-profile).
DEFAULT = ["single", "concurrency", "resume", "latency", "scale", "batch"]

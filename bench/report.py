"""
Turn the groups' measurements into figures: medians over the rounds,
ratios against the baselines of the same run, the issue's targets (stated,
never asserted), a short table for the terminal and the JSON file.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

from bench import batch, latency, scale, tus, tus_imgresume
from bench._common import GiB, median, per_gib, percentile

MB = 1e6
#: The issue's targets (issue 5, item 2).
TARGET_VS_RSYNC = 1.0
TARGET_LB_VS_DIRECT = 0.95  # issue 13, item 4
TARGET_RESUME_MS = 20.0
#: Issue 13: imgresume direct, end to end, over tus-node-server (one PATCH).
TARGET_VS_TUS = 1.5
#: Issue 14: tus over imgresume (tus-js-client, one PATCH) over tus-node-server
#: with the same client, and through the balancer (3 servers) over direct.
TARGET_TUS_DOOR_VS_TUS = 1.5
TARGET_TUS_DOOR_LB = 0.9
#: Issue 13: imgresume direct with C{--digest sha256}, end to end, over rsync.
TARGET_SHA256_VS_RSYNC = 0.7
#: The digest the client asks for by default (the targets above are for it).
DEFAULT_DIGEST = "blake3"


def _med(samples: list[dict[str, Any]], key: str) -> float:
    values = [s[key] for s in samples if s.get(key) is not None]
    return median(values)


def _cpu_per_gib(samples: list[dict[str, Any]]) -> dict[str, float]:
    roles = {r for s in samples for r in s["cpu"]}
    return {
        r: median([per_gib(s["cpu"][r], s["bytes"]) for s in samples
                   if s["cpu"].get(r) is not None])
        for r in sorted(roles)
    }


def _stream_figures(samples: list[dict[str, Any]]) -> dict[str, Any]:
    nbytes = samples[0]["bytes"]
    seconds = _med(samples, "seconds")
    out: dict[str, Any] = {
        "bytes": nbytes, "rounds": len(samples), "seconds": seconds,
        "rate": nbytes / seconds, "seconds_all": [s["seconds"] for s in samples],
        "cpu_s_per_gib": _cpu_per_gib(samples),
    }
    if "transfer_seconds" in samples[0]:
        out["hash_seconds"] = _med(samples, "hash_seconds")
        out["transfer_seconds"] = _med(samples, "transfer_seconds")
        out["transfer_rate"] = nbytes / out["transfer_seconds"]
        out["bytes_resent"] = max(s["bytes_sent"] - s["bytes"] for s in samples)
        out["completion_seconds"] = _med(samples, "completion_seconds")
        out["ack_interval_ms"] = _med(samples, "ack_interval_ms")
        out["packets"] = samples[0].get("packets")
    if "patches" in samples[0]:
        out["patches"] = samples[0]["patches"]
    if samples[0].get("digest"):
        out["digest"] = samples[0]["digest"]  # the upload's, as the client reported it
    if "write_ms_median" in samples[0]:
        for key in ("write_seconds", "completion_seconds", "write_ms_median",
                    "pwrite_seconds", "fdatasync_seconds"):
            out[key] = _med(samples, key)
        out["packets"] = samples[0]["packets"]
    return out


def summarise(groups: dict[str, Any]) -> dict[str, Any]:
    """Figures per group and the targets, from the raw measurements."""
    summary: dict[str, Any] = {}
    targets: list[dict[str, Any]] = []
    if "single" in groups and "samples" in groups["single"]:
        fig = {n: _stream_figures(s) for n, s in groups["single"]["samples"].items()}
        base = fig.get("tcp-copy-fsync")
        rsync = fig.get("rsync-append-verify")
        tus_one = fig.get(tus.ONE_PATCH)
        for f in fig.values():
            f["x_tcp_fsync"] = f["rate"] / base["rate"] if base else None
            f["x_rsync"] = f["rate"] / rsync["rate"] if rsync else None
            f["x_tus"] = f["rate"] / tus_one["rate"] if tus_one else None
            if "transfer_rate" in f:
                f["transfer_x_tcp_fsync"] = f["transfer_rate"] / base["rate"] if base else None
                f["transfer_x_rsync"] = f["transfer_rate"] / rsync["rate"] if rsync else None
                f["transfer_x_tus"] = f["transfer_rate"] / tus_one["rate"] if tus_one else None
        if tus_one:
            tus_one["setup"] = groups["single"].get("tus")
        summary["single"] = fig
        direct, lb = fig.get("imgresume-direct"), fig.get("imgresume-lb")
        digest = direct.get("digest", DEFAULT_DIGEST) if direct else DEFAULT_DIGEST
        if direct and digest != DEFAULT_DIGEST:
            # The default-settings targets are not what this run measured.
            for name in (f"imgresume direct >= {TARGET_VS_RSYNC}x rsync --append-verify "
                         "(end to end, hashing included)",
                         f"imgresume direct >= {TARGET_VS_TUS}x tus-node-server + "
                         "tus-js-client (one PATCH; end to end)"):
                targets.append({"target": name, "value": None, "met": None,
                                "also": f"default settings; this run used --digest {digest}"})
        elif direct and rsync:
            targets.append({
                "target": f"imgresume direct >= {TARGET_VS_RSYNC}x rsync --append-verify "
                          "(end to end, hashing included)",
                "value": direct["x_rsync"], "met": direct["x_rsync"] >= TARGET_VS_RSYNC,
                "also": f"transfer only {direct['transfer_x_rsync']:.2f}x; vs rsync "
                        f"--append-verify --fsync "
                        f"{direct['rate'] / fig['rsync-append-verify-fsync']['rate']:.2f}x"
                        if "rsync-append-verify-fsync" in fig else "",
            })
        elif direct:
            targets.append({"target": "imgresume direct >= 1.0x rsync", "value": None,
                            "met": None, "also": "rsync missing: not measured"})
        if direct and digest == DEFAULT_DIGEST:
            targets.append(tus_target(direct, tus_one, fig.get(tus.CHUNKED)))
        targets += tus_door_targets(fig, tus_one)
        if direct:
            targets.append(sha256_target(direct, rsync))
        if direct and lb:
            v = lb["transfer_rate"] / direct["transfer_rate"]
            targets.append({
                "target": f"balancer >= {TARGET_LB_VS_DIRECT}x direct (transfer rates)",
                "value": v, "met": v >= TARGET_LB_VS_DIRECT,
                "also": f"end to end {lb['rate'] / direct['rate']:.2f}x",
            })
    if "concurrency" in groups and "samples" in groups["concurrency"]:
        s = groups["concurrency"]["samples"]
        fig = {}
        for name, samples in s.items():
            per_file = [x for m in samples for x in m["per_file_seconds"]]
            f = _stream_figures(samples)
            f.update(
                files=samples[0]["files"], p50=percentile(per_file, 50),
                p99=percentile(per_file, 99),
                failures=sum(m.get("failures", 0) for m in samples),
            )
            if "peak_rss" in samples[0]:
                f["peak_rss"] = {k: max(m["peak_rss"].get(k, 0) for m in samples)
                                 for k in samples[0]["peak_rss"]}
                f["attempts"] = sum(m["attempts"] for m in samples)
                f["retry_reasons"] = {}
                for m in samples:
                    for k, v in m.get("retry_reasons", {}).items():
                        f["retry_reasons"][k] = f["retry_reasons"].get(k, 0) + v
            fig[name] = f
        base = fig.get("tcp-copy-many-fsync")
        for f in fig.values():
            f["x_tcp_many"] = f["rate"] / base["rate"] if base else None
            f["p50_x_tcp_many"] = f["p50"] / base["p50"] if base else None
        summary["concurrency"] = fig
        many = fig.get("imgresume-many")
        if many:
            targets.append({
                "target": f"{many['files']} concurrent uploads through the balancer: "
                          "0 failures",
                "value": many["failures"], "met": many["failures"] == 0,
                "also": f"{many['attempts']} connections for "
                        f"{many['files'] * len(s['imgresume-many'])} uploads",
            })
    if "resume" in groups and "samples" in groups["resume"]:
        [m] = groups["resume"]["samples"]["imgresume-resume"]
        r = m["resumes"]
        breaks = r["breaks"]
        first_ack = [b["reconnect_to_first_ack"] for b in breaks]
        fig = {
            "kills": len(m["killed"]),
            "breaks": len(breaks),
            "fresh_connect_to_first_ack_ms": (r["fresh_connect_to_first_ack"] or 0) * 1e3,
            "reconnect_to_first_ack_ms_median": median(first_ack) * 1e3,
            "reconnect_to_first_ack_ms_max": max(first_ack, default=float("nan")) * 1e3,
            "reconnect_to_accepted_ms_median":
                median([b["reconnect_to_accepted"] for b in breaks]) * 1e3,
            "lost_to_reconnect_ms_median":
                median([b["lost_to_reconnect"] for b in breaks
                        if b["lost_to_reconnect"] is not None]) * 1e3,
            "kill_to_lost_ms_median":
                median([b["kill_to_lost"] for b in breaks if b["kill_to_lost"] is not None])
                * 1e3,
            "bytes_resent": r["bytes_resent"],
            "acked_bytes_lost": max(
                [(b["acked_before"] or 0) - b["resumed_from"] for b in breaks], default=0),
            "connections_per_resume": [b["connections"] for b in breaks],
        }
        fresh = fig["fresh_connect_to_first_ack_ms"]
        fig["x_fresh"] = fig["reconnect_to_first_ack_ms_median"] / fresh if fresh else None
        summary["resume"] = fig
        if breaks:
            v = fig["reconnect_to_first_ack_ms_median"]
            targets.append({
                "target": f"first resumed byte acknowledged <= {TARGET_RESUME_MS:g} ms "
                          "after reconnecting (median)",
                "value": v, "met": v <= TARGET_RESUME_MS,
                "also": f"max {fig['reconnect_to_first_ack_ms_max']:.1f} ms over "
                        f"{len(breaks)} resumes",
            })
    if "scale" in groups and "samples" in groups["scale"]:
        summary["scale"], scale_targets = scale.summarise(groups["scale"])
        targets += scale_targets
    if "latency" in groups and "samples" in groups["latency"]:
        summary["latency"], latency_targets = latency.summarise(groups["latency"])
        targets += latency_targets
    if "batch" in groups and "samples" in groups["batch"]:
        summary["batch"], batch_targets = batch.summarise(groups["batch"])
        targets += batch_targets
    summary["targets"] = targets
    return summary


def tus_target(direct: dict[str, Any], one: dict[str, Any] | None,
               chunked: dict[str, Any] | None) -> dict[str, Any]:
    """Issue 13's target against tus-node-server, from the single group's figures."""
    name = (f"imgresume direct >= {TARGET_VS_TUS}x tus-node-server + tus-js-client "
            "(one PATCH; end to end)")
    if one is None:
        return {"target": name, "value": None, "met": None,
                "also": "tus-node-server not available: not measured"}
    v = direct["rate"] / one["rate"]
    also = f"{direct['rate'] / MB:.0f} against {one['rate'] / MB:.0f} MB/s"
    if chunked:
        also += f"; vs 16 MiB PATCHes {direct['rate'] / chunked['rate']:.2f}x"
    return {"target": name, "value": v, "met": v >= TARGET_VS_TUS,
            "also": also + "; tus-node-server: no fsync, no checksum"}


def tus_door_targets(fig: dict[str, Any], one: dict[str, Any] | None) -> list[dict[str, Any]]:
    """
    Issue 14's targets for tus over imgresume, when its rows ran: direct
    over tus-node-server (the same client, one PATCH), and through the
    balancer to 3 servers over direct.
    """
    direct, lb = fig.get(tus_imgresume.DIRECT), fig.get(tus_imgresume.LB)
    targets: list[dict[str, Any]] = []
    if direct:
        name = (f"tus over imgresume direct >= {TARGET_TUS_DOOR_VS_TUS}x tus-node-server "
                "(tus-js-client, one PATCH)")
        if one is None:
            targets.append({"target": name, "value": None, "met": None,
                             "also": "tus-node-server not available: not measured"})
        else:
            v = direct["rate"] / one["rate"]
            targets.append({
                "target": name, "value": v, "met": v >= TARGET_TUS_DOOR_VS_TUS,
                "also": f"{direct['rate'] / MB:.0f} against {one['rate'] / MB:.0f} MB/s; "
                        "imgresume fsyncs and checks the SHA-256, tus-node-server neither"})
    if direct and lb:
        v = lb["rate"] / direct["rate"]
        targets.append({
            "target": f"tus over imgresume through the balancer (3 servers) >= "
                      f"{TARGET_TUS_DOOR_LB}x direct",
            "value": v, "met": v >= TARGET_TUS_DOOR_LB,
            "also": f"{lb['rate'] / MB:.0f} against {direct['rate'] / MB:.0f} MB/s"})
    return targets


# -- the table ---------------------------------------------------------------


def sha256_target(direct: dict[str, Any], rsync: dict[str, Any] | None) -> dict[str, Any]:
    """Issue 13's target for SHA-256 digests, from the single group's figures."""
    name = (f"with --digest sha256: imgresume direct >= {TARGET_SHA256_VS_RSYNC}x rsync "
            "--append-verify (end to end, hashing included)")
    if direct.get("digest") != "sha256":
        return {"target": name, "value": None, "met": None,
                "also": "run python -m bench --only single --digest sha256"}
    if rsync is None:
        return {"target": name, "value": None, "met": None, "also": "rsync missing"}
    v = direct["x_rsync"]
    return {"target": name, "value": v, "met": v >= TARGET_SHA256_VS_RSYNC,
            "also": f"transfer only {direct['transfer_x_rsync']:.2f}x"}


def tus_note(f: dict[str, Any]) -> str:
    """The lines under the tus rows: what ran, and what it does not do."""
    one, chunked = f.get(tus.ONE_PATCH, {}), f.get(tus.CHUNKED, {})
    setup = one.get("setup") or {}
    versions = ", ".join(f"{k} {v}" for k, v in (setup.get("packages") or {}).items())
    patches = " / ".join(str(x["patches"]) for x in (one, chunked) if x.get("patches"))
    return (f"    tus: {versions or '?'}, node {setup.get('node') or '?'}; {patches} PATCH "
            "requests\n    tus-node-server: NO fsync, NO checksum (it has neither); the "
            "bench checks the stored file's SHA-256 after each run")


def _r(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}x"


def _cpu(c: dict[str, float], *roles: str) -> str:
    return " / ".join("-" if c.get(r) is None else f"{c[r]:.2f}" for r in roles)


LABELS = {
    "tcp-copy": "plain TCP copy, no fsync",
    "tcp-copy-fsync": "plain TCP copy + fsync",
    "dd-fsync": "dd bs=1M conv=fsync",
    "rsync-append-verify": "rsync daemon --append-verify",
    "rsync-append-verify-fsync": "rsync daemon --append-verify --fsync",
    tus.ONE_PATCH: "tus-node-server + tus-js-client, one PATCH",
    tus.CHUNKED: "tus-node-server + tus-js-client, 16 MiB",
    tus_imgresume.DIRECT: "tus-js-client -> imgresume --http, one PATCH",
    tus_imgresume.LB: "tus-js-client -> lb -> 3 x imgresume --http",
    "imgresume-storage-only": "imgresume storage alone (no net, no reactor)",
    "imgresume-direct": "imgresume client -> server",
    "imgresume-lb": "imgresume client -> lb -> server",
}


def table(results: dict[str, Any]) -> str:
    s = results["summary"]
    lines = []
    cfg = results["config"]
    mach = results["machine"]
    single = ""
    if "single" in s:
        digest = s["single"].get("imgresume-direct", {}).get("digest")
        single = f"{cfg['size'] >> 20} MiB single stream, " + (
            f"imgresume with --digest {digest}, " if digest else "")
    lines.append(
        f"imgresume bench ({cfg['mode']}; {single}"
        f"{cfg['repeat']} round(s); {mach['cpus']} CPUs; load "
        f"{mach['loadavg_start'][0]:.1f} -> {mach.get('loadavg_end', [0])[0]:.1f})"
    )
    lines.append("MB/s = 10^6 bytes/s, median of the rounds; CPU = CPU seconds per GiB "
                 "moved, client / server / balancer")
    if "single" in s:
        f = s["single"]
        lines.append("")
        lines.append(f"{'single stream':<46} {'MB/s':>8} {'x tcp+fsync':>11} "
                     f"{'x rsync -av':>11} {'x tus':>6}   CPU s/GiB c / s / lb")
        for name, fig in f.items():
            label = LABELS.get(name, name)
            if "transfer_rate" in fig:
                lines.append(
                    f"{label + ', end to end':<46} {fig['rate'] / MB:>8.1f} "
                    f"{_r(fig['x_tcp_fsync']):>11} {_r(fig['x_rsync']):>11} "
                    f"{_r(fig.get('x_tus')):>6}   "
                    f"{_cpu(fig['cpu_s_per_gib'], 'client', 'server', 'lb')}")
                hashing = f"  of which hashing {fig['hash_seconds']:.2f} s; transfer"
                lines.append(
                    f"{hashing:<46} "
                    f"{fig['transfer_rate'] / MB:>8.1f} {_r(fig['transfer_x_tcp_fsync']):>11} "
                    f"{_r(fig['transfer_x_rsync']):>11} {_r(fig.get('transfer_x_tus')):>6}   "
                    f"{_cpu(fig['cpu_s_per_gib'], 'client_transfer', 'server', 'lb')}")
                lines.append(
                    f"    {fig['packets']} packets, one ACK every {fig['ack_interval_ms']:.2f} ms "
                    f"(median); last ACK -> COMPLETED (read-back) "
                    f"{fig['completion_seconds']:.2f} s")
            else:
                lb = ("lb",) if "lb" in fig["cpu_s_per_gib"] else ()
                lines.append(
                    f"{label:<46} {fig['rate'] / MB:>8.1f} {_r(fig['x_tcp_fsync']):>11} "
                    f"{_r(fig['x_rsync']):>11} {_r(fig.get('x_tus')):>6}   "
                    f"{_cpu(fig['cpu_s_per_gib'], 'client', 'server', *lb)}")
            if name == tus.CHUNKED or (name == tus.ONE_PATCH and tus.CHUNKED not in f):
                lines.append(tus_note(f))
            if "write_ms_median" in fig:
                lines.append(
                    f"    {fig['packets']} writes of {fig['bytes'] // fig['packets'] >> 10} KiB, "
                    f"{fig['write_ms_median']:.2f} ms each (median; pwrite "
                    f"{fig['pwrite_seconds']:.2f} s, fdatasync {fig['fdatasync_seconds']:.2f} s "
                    f"in all); completion (read-back) {fig['completion_seconds']:.2f} s")
    if "concurrency" in s:
        f = s["concurrency"]
        lines.append("")
        lines.append(f"{'many files at once':<46} {'MB/s':>8} {'x tcp-many':>11} "
                     f"{'p50 / p99 s':>15} {'fail':>5}   CPU s/GiB c / s / lb")
        for name, fig in f.items():
            label = (f"plain TCP copy + fsync, {fig['files']} files" if name.startswith("tcp")
                     else f"imgresume, {fig['files']} clients, lb + 3 servers")
            lines.append(
                f"{label:<46} {fig['rate'] / MB:>8.1f} {_r(fig['x_tcp_many']):>11} "
                f"{fig['p50']:>7.2f} / {fig['p99']:<5.2f} {fig['failures']:>5}   "
                f"{_cpu(fig['cpu_s_per_gib'], 'client', 'server', 'lb')}")
            if "peak_rss" in fig:
                rss = ", ".join(f"{k} {v / 2**20:.0f}" for k, v in fig["peak_rss"].items())
                lines.append(f"{'  peak RSS MiB: ' + rss:<46}")
                for reason, n in list(fig["retry_reasons"].items())[:3]:
                    lines.append(f"  reconnected {n}x: {reason}")
    if "resume" in s:
        f = s["resume"]
        lines.append("")
        lines.append(f"resume after SIGKILL of the serving server ({f['breaks']} resumes):")
        lines.append(f"  fresh upload, connect -> first ACK          "
                     f"{f['fresh_connect_to_first_ack_ms']:8.1f} ms  (baseline)")
        lines.append(f"  reconnect -> first resumed byte ACKed       "
                     f"{f['reconnect_to_first_ack_ms_median']:8.1f} ms median, "
                     f"{f['reconnect_to_first_ack_ms_max']:.1f} max  ({_r(f['x_fresh'])} fresh)")
        lines.append(f"  reconnect -> ACCEPTED (proof of offset)     "
                     f"{f['reconnect_to_accepted_ms_median']:8.1f} ms median")
        lines.append(f"  break -> reconnect (client backoff)         "
                     f"{f['lost_to_reconnect_ms_median']:8.1f} ms median")
        lines.append(f"  bytes re-sent                               "
                     f"{f['bytes_resent'] / 2**20:8.1f} MiB in all "
                     f"({f['bytes_resent'] / max(1, f['breaks']) / 2**20:.1f} per resume); "
                     f"ACKed bytes lost: {f['acked_bytes_lost']}")
    if "scale" in s:
        lines += ["", *scale.table_lines(s["scale"])]
    if "latency" in s:
        lines += ["", *latency.table_lines(s["latency"])]
    if "batch" in s:
        lines += ["", *batch.table_lines(s["batch"])]
    if s.get("targets"):
        lines.append("")
        lines.append("targets (issue 5; batch: issue 16; tus: issues 13 and 14), stated not "
                     "asserted:")
        for t in s["targets"]:
            v = t["value"]
            shown = t.get("shown") or (
                "-" if v is None else f"{v:.1f} ms" if "ms" in t["target"]
                else str(v) if isinstance(v, int) else f"{v:.2f}x")
            verdict = {True: "met", False: "NOT MET", None: "not measured"}[t["met"]]
            lines.append(f"  {t['target']}: {shown} -- {verdict}" +
                         (f"  ({t['also']})" if t.get("also") else ""))
    for g, data in results["groups"].items():
        for note in data.get("notes", []):
            lines.append(f"NOTE ({g}): {note}")
        if "error" in data:
            lines.append(f"ERROR ({g}): {data['error'].splitlines()[-1]}")
    return "\n".join(lines)


def write_json(results: dict[str, Any], outdir: str) -> str:
    os.makedirs(outdir, exist_ok=True)
    path = os.path.join(outdir, f"bench-{time.strftime('%Y%m%d-%H%M%S')}.json")
    with open(path, "w") as f:
        json.dump(results, f, indent=1, default=str)
    latest = os.path.join(outdir, "latest.json")
    with open(latest, "w") as f:
        json.dump(results, f, indent=1, default=str)
    return path


__all__ = ["GiB", "summarise", "table", "write_json"]

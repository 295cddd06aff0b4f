"""
python -m bench: run the imgresume benchmarks (docs/benchmarks.md).

  python -m bench                  # full run: 1 GiB streams, 200 clients, batches (< 15 min)
  python -m bench --quick          # 256 MiB streams, 50 clients, small batches (~3 min)
  python -m bench --only single    # one group: single, concurrency, resume, latency, scale,
                                   # batch, profile, batch-profile
  python -m bench --out bench/results/

Every figure is printed as a ratio against baselines measured in the same
run; all measurements go to a JSON file in --out (and latest.json there).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import traceback

from bench import groups, report
from bench._common import ROOT, GiB, MiB, Workdir, log, machine_info


def parse_args(argv: list[str]) -> argparse.Namespace:
    from bench._delayrelay import parse_rate
    from imgresume.integrity import DIGESTS
    from imgresume.sizes import parse_size

    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="small sizes: 256 MiB streams (3 rounds), 50 clients, batches "
                        "of 200 / 100 / 1,000 files (1 round)")
    p.add_argument("--only", action="append", choices=sorted(groups.GROUPS),
                   help="run only this group (repeatable); the groups it compares "
                        "against are measured inside it")
    p.add_argument("--profile", action="store_true",
                   help="also run the profile group (py-spy on server and client)")
    p.add_argument("--out", default=os.path.join(ROOT, "bench", "results"),
                   help="directory for the JSON results and profiles [bench/results/]")
    p.add_argument("--size", type=parse_size, help="single-stream file size "
                   "[1G; 256M with --quick]")
    p.add_argument("--digest", choices=sorted(DIGESTS),
                   help="the whole-file digest of the single stream's imgresume rows, as "
                        "imgresume upload --digest [the client's default, blake3]; with "
                        "sha256 the bench states issue 13's target for it")
    p.add_argument("--repeat", type=int, help="rounds of the single-stream group "
                   "[5; 3 with --quick]")
    p.add_argument("--clients", type=int, help="concurrent uploads [200; 50 with --quick]")
    p.add_argument("--client-procs", type=int, default=4,
                   help="client processes sharing the concurrent uploads [4]")
    p.add_argument("--scale-uploads", type=int, default=1000,
                   help="uploads open at once in the scale group [1000; files up to "
                        "2 MB instead of 20 MB with --quick]")
    p.add_argument("--many-repeat", type=int, help="rounds of the concurrency group "
                   "[3; 1 with --quick]")
    p.add_argument("--kills", type=int,
                   help="SIGKILLs during the resume upload [5; 3 with --quick]")
    p.add_argument("--window", type=int, help="client window (packets in flight) [client default]")
    p.add_argument("--chunk-size", type=parse_size,
                   help="client payload per packet [what the server recommends]")
    p.add_argument("--rtt-ms", type=float, default=50.0,
                   help="round trip of the latency group's emulated link [50]")
    p.add_argument("--link-rate", type=parse_rate, default=parse_rate("100M"),
                   help="bandwidth cap of that link, bytes/s each way, decimal "
                        "suffixes k M G [100M]")
    p.add_argument("--batch-parallel", type=int, default=4,
                   help="the batch group's imgresume upload --parallel [4]")
    p.add_argument("--batch-repeat", type=int,
                   help="rounds of the batch group [3; 1 with --quick]")
    p.add_argument("--profile-files", type=int, default=200,
                   help="files of 256 KiB in the batch-profile group [200]")
    p.add_argument("--no-tus", dest="tus", action="store_false",
                   help="skip the tus-node-server baseline (it needs node and npm; the "
                        "bench installs its npm packages on first use)")
    p.add_argument("--tus-cache", help="where the bench installs the tus npm packages "
                   "[$XDG_CACHE_HOME/imgresume-bench/tus, ~/.cache/... by default]")
    p.add_argument("--workdir", help="where the temporary files go (the disk under "
                   "test) [the system temp dir]")
    p.add_argument("--keep", action="store_true", help="keep the work directory")
    args = p.parse_args(argv)
    quick = args.quick
    args.mode = "quick" if quick else "full"
    args.size = args.size or (256 * MiB if quick else GiB)
    args.repeat = args.repeat or (3 if quick else 5)
    args.clients = args.clients or (50 if quick else 200)
    args.many_repeat = args.many_repeat or (1 if quick else 3)
    args.kills = args.kills or (3 if quick else 5)
    args.batch_repeat = args.batch_repeat or (1 if quick else 3)
    args.groups = args.only or groups.DEFAULT + (["profile"] if args.profile else [])
    return args


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    work = Workdir(args.workdir, keep=args.keep)
    log(f"work directory {work.path}; groups {', '.join(args.groups)}")
    results: dict = {
        "config": {k: v for k, v in vars(args).items()},
        "machine": machine_info(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "groups": {},
    }
    args.outdir = args.out
    t0 = time.monotonic()
    failed = False
    try:
        for name in args.groups:
            g0 = time.monotonic()
            try:
                results["groups"][name] = groups.GROUPS[name](work, args)
            except Exception:  # noqa: BLE001 - one failed group must not lose the others
                failed = True
                text = traceback.format_exc()
                log(f"group {name} FAILED:\n{text}")
                results["groups"][name] = {"error": text}
            results["groups"][name]["wall_seconds"] = time.monotonic() - g0
    finally:
        work.close()
    results["machine"]["loadavg_end"] = os.getloadavg()
    results["wall_seconds"] = time.monotonic() - t0
    results["summary"] = report.summarise(results["groups"])
    path = report.write_json(results, args.out)
    print(report.table(results))
    for name in ("profile", "batch-profile"):
        if name in results["groups"] and "text" in results["groups"][name]:
            print()
            print(results["groups"][name]["text"])
    print(f"\n(results: {os.path.relpath(path)}; {results['wall_seconds']:.0f} s)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

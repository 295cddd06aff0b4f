"""
C{make demo}: a local cluster (balancer + 3 servers over one storage
directory), a few generated image-sized files uploaded through the balancer,
the server receiving one of them SIGKILLed mid-upload, the client resuming on
another server, and a summary verified against the stored files.

Run as C{python -m imgresume.demo [--keep] [--dir DIR]}.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.task import react

from imgresume import integrity
from imgresume.testing import LocalCluster
from imgresume.cli import ProgressBar
from imgresume.client import Progress, Uploader
from imgresume.sizes import format_size

#: (name, width, height): 8-bit greyscale PGM scans, 4 MB to 256 MB.
IMAGES = [
    ("scan-a4-300dpi.pgm", 2480, 1754),
    ("scan-a3-600dpi.pgm", 7016, 4961),
    ("satellite-tile.pgm", 16384, 16384),
]
KILL_IN = "satellite-tile.pgm"


def say(text: str) -> None:
    print(f"\n== {text}", flush=True)


def make_image(path: str, width: int, height: int) -> None:
    """A valid binary PGM image: a gradient with noise, written in strips."""
    rng_block = os.urandom(width)
    with open(path, "wb") as f:
        f.write(b"P5\n%d %d\n255\n" % (width, height))
        for row in range(0, height, 256):
            rows = min(256, height - row)
            f.write(bytes((b + row) & 0xFF for b in rng_block) * rows)


def sha256_file(path: str, algorithm: str = "sha256") -> str:
    """The digest (SHA-256 unless told) of the file at C{path}, in hex."""
    h = integrity.new_digest(algorithm)
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            h.update(block)
    return h.hexdigest()


async def upload_all(reactor: Any, cluster: LocalCluster, files: list[str]) -> list:
    uploader = Uploader(cluster.lb_endpoint, reactor=reactor, journal=None,
                        client_id="demo-scanner", backoff_base=0.1)
    bar = ProgressBar(sys.stderr) if sys.stderr.isatty() else None
    results = []
    for path in files:
        name = os.path.basename(path)
        killed: list[str] = []
        last_server: list[str | None] = [None]

        def progress(p: Progress, name: str = name, killed: list = killed) -> None:
            if p.server_id and p.server_id != last_server[0] and p.phase == "uploading":
                if last_server[0] is not None:
                    print(f"\n   {name}: resumed on {p.server_id} at {format_size(p.done)}",
                          flush=True)
                last_server[0] = p.server_id
            if bar is not None:
                bar(p)
            if (name == KILL_IN and not killed and p.phase == "uploading"
                    and p.server_id and p.done > 0.4 * p.total):
                killed.append(p.server_id)
                print(f"\n   SIGKILL {p.server_id} (it is receiving {name}, "
                      f"{format_size(p.done)} of {format_size(p.total)} acknowledged)",
                      flush=True)
                cluster.kill(p.server_id)

        say(f"uploading {name} through the balancer")
        try:
            result = await uploader.upload(path, f"scans/{name}", progress=progress)
        finally:
            if bar is not None:
                bar.close()  # the live bar of a file that failed
        results.append((path, result, killed))
        print(f"   {name}: completed via {' -> '.join(result.servers)}", flush=True)
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", help="work directory [default: a new temporary one]")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    args = parser.parse_args(argv)
    work = args.dir or tempfile.mkdtemp(prefix="imgresume-demo-")
    os.makedirs(work, exist_ok=True)
    say(f"work directory {work}")
    files = []
    for name, w, h in IMAGES:
        path = os.path.join(work, name)
        make_image(path, w, h)
        files.append(path)
        print(f"   generated {name}: {w}x{h} greyscale, {format_size(os.path.getsize(path))}")

    cluster = LocalCluster(work, servers=3)
    say("starting 3 servers (twistd imgresume) over one storage directory "
        "and a balancer (twistd imgresume-lb)")
    code = 1
    try:
        cluster.start()
        for node in cluster.servers.values():
            print(f"   {node.name}: pid {node.proc.pid}, listening on unix:{node.address}")
        print(f"   balancer: pid {cluster.lb.proc.pid}, listening on {cluster.lb_endpoint}")

        def run(reactor: Any) -> Deferred:
            return Deferred.fromCoroutine(upload_all(reactor, cluster, files))

        results: list = []
        react(lambda r: run(r).addCallback(results.extend), [])
    except SystemExit as e:
        if e.code:
            raise
    finally:
        cluster.stop()
    try:
        code = summarise(cluster.storage, results)
    finally:
        if not args.keep and not args.dir:
            shutil.rmtree(work, ignore_errors=True)
        elif args.keep:
            print(f"\n(kept {work}; server logs in {work}/logs)")
    sys.exit(code)


def summarise(storage: str, results: list) -> int:
    say("summary (every stored file re-read from the storage directory and hashed)")
    ok = True
    print(f"   {'file':22} {'size':>10}  {'servers':24} {'resumed at':>12} "
          f"{'sent/size':>9}  verified")
    for path, r, killed in results:
        stored = os.path.join(storage, r.path)
        good = (sha256_file(stored) == sha256_file(path)
                and sha256_file(stored, r.digest) == r.sha256)
        ok = ok and good
        resumed = ",".join(format_size(o) for o in r.resumed_at) or "-"
        print(f"   {r.name.split('/')[-1]:22} {format_size(r.size):>10}  "
              f"{' -> '.join(r.servers):24} {resumed:>12} "
              f"{r.bytes_sent / r.size:9.3f}  {'OK' if good else 'MISMATCH'}")
    killed = [k for _, _, ks in results for k in ks]
    print(f"\n   servers killed mid-upload: {', '.join(killed) or 'none'}")
    print("   RESULT: " + ("all files complete and verified" if ok else "VERIFICATION FAILED"))
    return 0 if ok else 1


if __name__ == "__main__":
    main()

"""
The baselines every imgresume figure is divided by, measured in the same
run on the same disk and loopback:

 - C{tcp-copy} / C{tcp-copy-fsync}: a plain Python TCP copy (1 MiB reads,
   sendall, recv_into, write), without and with a final fsync;
 - C{dd-fsync}: C{dd if=SRC of=DST bs=1M conv=fsync};
 - C{rsync-append-verify}: the rsync daemon receiving the file from
   C{rsync --append-verify SRC rsync://127.0.0.1:PORT/bench/} (the peer the
   issue's target names), and the same with C{--fsync} (the like-for-like
   durability of imgresume, which fsyncs before every acknowledgement);
 - C{tcp-copy-many}: the plain copy of many image-sized files at once, each
   fsynced, for the concurrency group.

Each function returns one measurement: a dict with C{name}, C{bytes},
C{seconds}, C{cpu} (seconds per process role) and details.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from typing import Any

from bench._common import (
    ROOT,
    Workdir,
    child_env,
    last_json,
    log,
    now,
    proc_cpu,
    wait_rusage,
)


def tcp_copy(work: Workdir, files: Sequence[str], fsync: bool, name: str,
             via: Callable[[int], AbstractContextManager[int]] | None = None) -> dict[str, Any]:
    """
    Copy C{files} (all at once) through a receiver process over loopback.
    The time runs from the first sender's connect to the last file written
    (and fsynced).  C{via}: given the receiver's port, a context manager
    for the port the senders connect to instead (a relay in front of it).
    """
    outdir = work.fresh("dst")
    recv = subprocess.Popen(
        [sys.executable, "-m", "bench._tcpcopy", "recv", outdir, str(len(files)),
         *(["--fsync"] if fsync else [])],
        env=child_env(), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        port = json.loads(recv.stdout.readline())["port"]
        with (via or nullcontext)(port) as send_port:
            send = subprocess.Popen(
                [sys.executable, "-m", "bench._tcpcopy", "send", str(send_port), *files],
                env=child_env(), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                text=True,
            )
            s_out, s_err = send.communicate(timeout=3600)
            r_out, r_err = recv.communicate(timeout=600)
    finally:
        if recv.poll() is None:
            recv.kill()
            recv.wait()
    sent = last_json(send, s_out, s_err)
    got = last_json(recv, r_out, r_err)
    sizes = [os.path.getsize(f) for f in files]
    if got["bytes"] != sizes:
        raise RuntimeError(f"{name}: received {sum(got['bytes'])} of {sum(sizes)} bytes")
    per_file = [d - s for s, d in zip(sent["start"], got["done"])]
    return {
        "name": name,
        "bytes": sum(sizes),
        "files": len(files),
        "seconds": max(got["done"]) - min(sent["start"]),
        "per_file_seconds": per_file,
        "cpu": {"client": sent["cpu"], "server": got["cpu"]},
    }


def dd_fsync(work: Workdir, src: str) -> dict[str, Any]:
    """C{dd if=SRC of=DST bs=1M conv=fsync}: the disk's own limit for this copy."""
    dst = os.path.join(work.fresh("dst"), "dd.out")
    t0 = now()
    proc = subprocess.Popen(["dd", f"if={src}", f"of={dst}", "bs=1M", "conv=fsync",
                             "status=none"], stderr=subprocess.PIPE)
    rc, cpu = wait_rusage(proc)
    seconds = now() - t0
    if rc != 0:
        raise RuntimeError(f"dd failed: {proc.stderr.read().decode()[-500:]}")
    return {"name": "dd-fsync", "bytes": os.path.getsize(src), "seconds": seconds,
            "cpu": {"client": cpu}}


class RsyncDaemon:
    """
    C{rsync --daemon --no-detach} on a free loopback port with one module,
    C{bench}, writable, pointing at the work directory's C{dst/}.
    """

    def __init__(self, work: Workdir) -> None:
        from imgresume.testing import free_tcp_port

        self.work = work
        self.rsync = shutil.which("rsync")
        self.port = free_tcp_port()
        self.proc: subprocess.Popen | None = None

    @property
    def available(self) -> bool:
        return self.rsync is not None

    def start(self) -> RsyncDaemon:
        from imgresume.testing import wait_until_connectable

        conf = self.work.sub("rsyncd.conf")
        root = os.geteuid() == 0
        with open(conf, "w") as f:
            f.write(
                f"pid file = {self.work.sub('rsyncd.pid')}\n"
                f"log file = {self.work.sub('logs', 'rsyncd.log')}\n"
                "use chroot = no\n"
                + ("uid = root\ngid = root\n" if root else "")
                + f"[bench]\n    path = {self.work.sub('dst')}\n    read only = no\n"
            )
        with open(self.work.sub("logs", "rsyncd.stderr"), "ab") as err:
            self.proc = subprocess.Popen(
                [self.rsync, "--daemon", "--no-detach", f"--config={conf}",
                 f"--port={self.port}", "--address=127.0.0.1"],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err,
            )
        wait_until_connectable(("127.0.0.1", self.port), proc=self.proc)
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def _children(self) -> list[str]:
        assert self.proc is not None
        path = f"/proc/{self.proc.pid}/task/{self.proc.pid}/children"
        try:
            with open(path) as f:
                return f.read().split()
        except OSError:
            return []

    def upload(self, src: str, fsync: bool) -> dict[str, Any]:
        """One C{rsync --append-verify [--fsync] SRC rsync://.../bench/} into an empty dst."""
        assert self.proc is not None
        self.work.fresh("dst")
        daemon0 = proc_cpu(self.proc.pid, children=True)
        argv = [self.rsync, "--append-verify", *(["--fsync"] if fsync else []),
                src, f"rsync://127.0.0.1:{self.port}/bench/"]
        t0 = now()
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE)
        rc, client_cpu = wait_rusage(proc)
        seconds = now() - t0
        if rc != 0:
            raise RuntimeError(f"rsync failed ({rc}): {proc.stderr.read().decode()[-800:]}")
        deadline = now() + 10
        while self._children() and now() < deadline:  # let the daemon reap its child
            time.sleep(0.01)
        dst = self.work.sub("dst", os.path.basename(src))
        if os.path.getsize(dst) != os.path.getsize(src):
            raise RuntimeError("rsync: the copy has the wrong size")
        return {
            "name": "rsync-append-verify" + ("-fsync" if fsync else ""),
            "bytes": os.path.getsize(src),
            "seconds": seconds,
            "cpu": {"client": client_cpu,
                    "server": proc_cpu(self.proc.pid, children=True) - daemon0},
            "argv": " ".join(argv),
        }


    def upload_tree(self, src_dir: str, fsync: bool, timeout: float = 3600.0) -> dict[str, Any]:
        """
        One C{rsync -r --append-verify [--fsync] SRC_DIR rsync://.../bench/}
        into an empty dst: the directory's files, as a scanner's batch.
        Checked afterwards: every file there, with its size.
        """
        assert self.proc is not None
        self.work.fresh("dst")
        daemon0 = proc_cpu(self.proc.pid, children=True)
        argv = [self.rsync, "-r", "--append-verify", *(["--fsync"] if fsync else []),
                src_dir.rstrip("/"), f"rsync://127.0.0.1:{self.port}/bench/"]
        t0 = now()
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE)
        rc, client_cpu = wait_rusage(proc, timeout=timeout)
        seconds = now() - t0
        if rc != 0:
            raise RuntimeError(f"rsync failed ({rc}): {proc.stderr.read().decode()[-800:]}")
        deadline = now() + 10
        while self._children() and now() < deadline:  # let the daemon reap its child
            time.sleep(0.01)
        dst = self.work.sub("dst", os.path.basename(src_dir.rstrip("/")))
        missing = 0
        files = nbytes = 0
        for dirpath, _, names in os.walk(src_dir):
            for name in names:
                path = os.path.join(dirpath, name)
                size = os.path.getsize(path)
                files += 1
                nbytes += size
                copy = os.path.join(dst, os.path.relpath(path, src_dir))
                if not os.path.exists(copy) or os.path.getsize(copy) != size:
                    missing += 1
        return {
            "name": "rsync-append-verify" + ("-fsync" if fsync else ""),
            "bytes": nbytes,
            "files": files,
            "failures": missing,
            "seconds": seconds,
            "cpu": {"client": client_cpu,
                    "server": proc_cpu(self.proc.pid, children=True) - daemon0},
            "argv": " ".join(argv),
        }


def rsync_missing_note() -> str:
    note = ("rsync is not installed: the rsync baselines (and every ratio to them) "
            "are SKIPPED. Install it (Debian: apt-get install -y rsync) and run again.")
    log("!" * 20 + " " + note + " " + "!" * 20)
    return note

"""
Shared plumbing of the benchmarks: the work directory and its test data,
CPU accounting of processes, child processes, statistics.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from typing import Any

GiB = 1 << 30
MiB = 1 << 20
_TICK = os.sysconf("SC_CLK_TCK")
#: The repository root (the parent of bench/).
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def now() -> float:
    """CLOCK_MONOTONIC: system-wide on Linux, so comparable across processes."""
    return time.monotonic()


def log(text: str) -> None:
    """Progress of the run, on stderr (stdout keeps the table)."""
    print(f"[bench {time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


def child_env() -> dict[str, str]:
    """The environment for child processes: the repository importable."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [ROOT, env.get("PYTHONPATH")]))
    return env


class Workdir:
    """
    A temporary directory on the disk under test holding the source files,
    the baselines' destinations, the servers' storage and their logs.
    """

    def __init__(self, parent: str | None, keep: bool = False) -> None:
        self.path = tempfile.mkdtemp(prefix="imgresume-bench-", dir=parent)
        self.keep = keep
        for sub in ("src", "dst", "logs"):
            os.makedirs(self.sub(sub), exist_ok=True)

    def sub(self, *parts: str) -> str:
        return os.path.join(self.path, *parts)

    def fresh(self, name: str) -> str:
        """An empty directory C{name} (emptied if it exists)."""
        path = self.sub(name)
        shutil.rmtree(path, ignore_errors=True)
        os.makedirs(path)
        return path

    def close(self) -> None:
        if not self.keep:
            shutil.rmtree(self.path, ignore_errors=True)


def write_random(path: str, size: int) -> str:
    """C{size} bytes from os.urandom at C{path}, flushed to disk (and cached)."""
    block = 4 * MiB
    with open(path, "wb") as f:
        left = size
        while left:
            n = min(block, left)
            f.write(os.urandom(n))
            left -= n
        f.flush()
        os.fsync(f.fileno())
    return path


def image_sizes(count: int, low: int = 200_000, high: int = 20_000_000,
                seed: int = 5) -> list[int]:
    """C{count} image-like sizes, log-uniform between C{low} and C{high} bytes."""
    import math

    rng = random.Random(seed)
    return [int(math.exp(rng.uniform(math.log(low), math.log(high)))) for _ in range(count)]


def settle(*dirs: str) -> None:
    """
    Between measurements: empty the destinations, then write back every
    dirty page so one run's write-back does not land in the next one's time.
    """
    for d in dirs:
        if os.path.isdir(d):
            for entry in os.listdir(d):
                p = os.path.join(d, entry)
                if os.path.isdir(p) and not os.path.islink(p):
                    shutil.rmtree(p, ignore_errors=True)
                else:
                    os.unlink(p)
    os.sync()
    time.sleep(0.2)


def proc_cpu(pid: int, children: bool = False) -> float:
    """
    CPU seconds (user + system, all threads) of a running process, from
    /proc/<pid>/stat; with C{children}, plus those of its reaped children.
    """
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    # fields[0] is field 3 (state): utime is field 14, stime 15, cutime 16, cstime 17
    ticks = int(fields[11]) + int(fields[12])
    if children:
        ticks += int(fields[13]) + int(fields[14])
    return ticks / _TICK


def proc_rss(pid: int) -> int:
    """Resident set size in bytes of a running process."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def proc_hwm(pid: int) -> int:
    """Peak resident set size (VmHWM) in bytes of a running process."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def raise_nofile() -> None:
    """
    Raise this process's soft limit of open files to its hard limit; the
    processes it starts afterwards inherit it.  For servers, balancer and
    clients with many connections (each holds a socket, and a server also
    files, per upload).
    """
    import resource

    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    soft = 65536 if hard == resource.RLIM_INFINITY else hard
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def rusage_cpu(ru: Any) -> float:
    return ru.ru_utime + ru.ru_stime


def wait_rusage(proc: subprocess.Popen, timeout: float = 3600.0) -> tuple[int, float]:
    """
    Reap C{proc} with wait4 and return (exit code, CPU seconds of it and its
    reaped children).  C{proc.returncode} is set.
    """
    deadline = now() + timeout
    while True:
        pid, status, ru = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            proc.returncode = os.waitstatus_to_exitcode(status)
            return proc.returncode, rusage_cpu(ru)
        if now() > deadline:
            proc.kill()
            raise TimeoutError(f"{proc.args!r} still running after {timeout} s")
        time.sleep(0.005)


def run_python(module: str, args: Sequence[str], *, timeout: float = 3600.0) -> dict[str, Any]:
    """
    Run C{python -m module args} to the end and return its last stdout line,
    parsed as JSON.  Raises with the end of its stderr if it fails.
    """
    proc = spawn_python(module, args)
    out, err = proc.communicate(timeout=timeout)
    return last_json(proc, out, err)


def spawn_python(module: str, args: Sequence[str], stderr: str | None = None,
                 prefix: Sequence[str] = ()) -> subprocess.Popen:
    """
    Start C{python -m module args} with stdout piped (text); stderr piped
    too, or appended to the file C{stderr}.  C{prefix}: a command that runs
    the interpreter (e.g. a profiler).
    """
    argv = [*prefix, sys.executable, "-m", module, *args]
    common: dict[str, Any] = {"env": child_env(), "cwd": ROOT, "stdin": subprocess.DEVNULL,
                              "stdout": subprocess.PIPE, "text": True}
    if stderr is None:
        return subprocess.Popen(argv, stderr=subprocess.PIPE, **common)
    with open(stderr, "a") as err:  # the child keeps its own copy
        return subprocess.Popen(argv, stderr=err, **common)


def last_json(proc: subprocess.Popen, out: str, err: str) -> dict[str, Any]:
    """The last stdout line of a finished child as JSON; raise if it failed."""
    lines = [line for line in out.strip().splitlines() if line.startswith("{")]
    err = err or ""
    if proc.returncode != 0 or not lines:
        raise RuntimeError(
            f"{' '.join(map(str, proc.args))[:200]} failed ({proc.returncode}):\n{err[-3000:]}"
        )
    return json.loads(lines[-1])


def median(xs: Sequence[float]) -> float:
    s = sorted(xs)
    n = len(s)
    if not n:
        return float("nan")
    return s[n // 2] if n % 2 else (s[n // 2 - 1] + s[n // 2]) / 2


def percentile(xs: Sequence[float], p: float) -> float:
    """Nearest-rank percentile (p in 0..100)."""
    s = sorted(xs)
    if not s:
        return float("nan")
    k = max(0, min(len(s) - 1, int(-(-p * len(s) // 100)) - 1))
    return s[k]


def rate(nbytes: int, seconds: float) -> float:
    """Bytes per second."""
    return nbytes / seconds if seconds > 0 else float("nan")


def per_gib(cpu_seconds: float, nbytes: int) -> float:
    return cpu_seconds / (nbytes / GiB) if nbytes else float("nan")


def machine_info() -> dict[str, Any]:
    """What the figures were measured on."""
    import platform

    info: dict[str, Any] = {
        "python": sys.version.split()[0],
        "kernel": platform.release(),
        "cpus": os.cpu_count(),
        "loadavg_start": os.getloadavg(),
    }
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    info["cpu"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    rsync = shutil.which("rsync")
    if rsync:
        out = subprocess.run([rsync, "--version"], capture_output=True, text=True,
                             check=False).stdout
        info["rsync"] = out.splitlines()[0] if out else "?"
    return info

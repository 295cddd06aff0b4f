# -*- test-case-name: tests.bench.test_batch -*-
"""
Reading C{strace -f -ttt -T -y -o FILE} output: each system call with its
thread, start time (epoch seconds), duration, and what it touched (the
path strace's C{-y} prints for a descriptor, or the path argument), sorted
into the kinds of file an upload's storage uses (L{kind}).  Pure
functions, for L{bench.batch_profile}.
"""

from __future__ import annotations

import bisect
import os
import re
from collections import defaultdict
from typing import Any, Iterable, Sequence

_LINE = re.compile(r"^(\d+)\s+(\d+\.\d+)\s+(.*)$")
_RESUMED = re.compile(r"^<\.\.\. (\w+) resumed>(.*)$")
_CALL = re.compile(r"^(\w+)\((.*)$")
_RESULT = re.compile(r"\)\s+=\s+(-?\d+|\?|0x[0-9a-f]+)(.*?)\s*<(\d+\.\d+)>$")
_FD_PATH = re.compile(r"(?:\b\d+|AT_FDCWD)<([^>]*)>")
_QUOTED = re.compile(r'"((?:[^"\\]|\\.)*)"')
_RESULT_PATH = re.compile(r"^\s*<([^>]*)>")
_ID = re.compile(r"^[0-9a-f]{32}$")
#: The one-step store's names in incoming/ (storage/filesystem/_whole.py).
_PUT = re.compile(r"^[0-9a-f]{32}\.put$")
_DONE = re.compile(r"^[0-9a-f]{32}\.done$")

#: Calls that wait for work (their time is idle time, not cost).
WAITS = frozenset({"futex", "epoll_wait", "epoll_pwait", "select", "poll", "clock_nanosleep"})

#: System calls whose target is a path argument rather than a descriptor.
PATH_CALLS = frozenset({
    "open", "openat", "mkdir", "mkdirat", "unlink", "unlinkat", "rmdir", "rename",
    "renameat", "renameat2", "link", "linkat", "newfstatat", "stat", "lstat", "statx",
    "access", "faccessat", "faccessat2", "readlink", "readlinkat",
})


def parse(lines: Iterable[str]) -> list[dict[str, Any]]:
    """
    The completed system calls of an strace output, in the order they
    finished: C{pid}, C{t} (start), C{name}, C{text} (arguments and result
    as strace printed them), C{ret} (the result as text), C{dur} (seconds,
    from C{-T}).  A call split by another thread (C{<unfinished ...>} and
    C{<... NAME resumed>}) is put back together; signals, exits and calls
    that never finished are left out.
    """
    pending: dict[str, tuple[float, str, str]] = {}
    out = []
    for line in lines:
        m = _LINE.match(line.rstrip("\n"))
        if not m:
            continue
        pid, t, rest = m.group(1), float(m.group(2)), m.group(3)
        if rest.startswith(("---", "+++")):
            continue
        resumed = _RESUMED.match(rest)
        if resumed:
            if pid not in pending:
                continue
            t, name, head = pending.pop(pid)
            rest = f"{name}({head}{resumed.group(2)}"
        elif rest.endswith("<unfinished ...>"):
            call = _CALL.match(rest)
            if call:
                pending[pid] = (t, call.group(1), call.group(2)[:-len("<unfinished ...>")])
            continue
        call = _CALL.match(rest)
        if not call:
            continue
        result = _RESULT.search(rest)
        out.append({
            "pid": int(pid), "t": t, "name": call.group(1), "text": call.group(2),
            "ret": result.group(1) if result else None,
            "dur": float(result.group(3)) if result else None,
            "result_text": result.group(2) if result else "",
        })
    return out


def target(call: dict[str, Any]) -> str:
    """The path a call touched, as well as strace's output tells ("" if none)."""
    text, name = call["text"], call["name"]
    if name in ("open", "openat"):
        m = _RESULT_PATH.match(call.get("result_text", ""))
        if m:
            return m.group(1)
    if name in PATH_CALLS:
        fds = _FD_PATH.findall(text)
        quoted = _QUOTED.findall(text)
        if name in ("link", "linkat", "rename", "renameat", "renameat2") and len(quoted) > 1:
            # the destination: where the name appears
            q = quoted[1]
            base = fds[1] if name != "link" and len(fds) > 1 else (fds[0] if fds else "")
        elif quoted:
            q, base = quoted[0], fds[0] if fds else ""
        else:
            return fds[0] if fds else ""
        if q.startswith("/"):
            return q
        if not q:  # AT_EMPTY_PATH: the descriptor itself
            return base
        return os.path.join(base, q) if base else q
    fds = _FD_PATH.findall(text)
    return fds[0] if fds else ""


def kind(path: str) -> str:
    """
    What C{path} is to the storage: C{data}, C{journal}, C{meta.json},
    C{lease}, C{lock}, C{upload dir} (incoming/ID), C{put file}
    (incoming/KEY.put, a PUT's file, stored in one step), C{done link}
    (incoming/KEY.done, its third name once published), C{incoming/},
    C{complete/}, C{complete/ file}, C{log file}, C{socket}, C{pipe},
    C{epoll}, C{other}, or C{-} for none.
    """
    if not path:
        return "-"
    if path.startswith(("socket:", "TCP", "UDP", "UNIX")):
        return "socket"
    if path.startswith("pipe:"):
        return "pipe"
    if "eventpoll" in path:
        return "epoll"
    if path.endswith(".log"):
        return "log file"
    path = path.removesuffix("(deleted)").rstrip("/")
    parts = path.split("/")
    if "incoming" in parts:
        rest = parts[len(parts) - 1 - parts[::-1].index("incoming") + 1:]
        if not rest:
            return "incoming/"
        if len(rest) == 1 and _ID.match(rest[0]):
            return "upload dir"
        if len(rest) == 1 and _PUT.match(rest[0]):
            return "put file"
        if len(rest) == 1 and _DONE.match(rest[0]):
            return "done link"
        if len(rest) == 2:
            leaf = rest[1]
            for name in ("data", "journal", "meta.json", "lease", "lock", "takeover"):
                if leaf == name or leaf.startswith(f".{name}."):
                    return name
        return "other"
    if "complete" in parts:
        return "complete/" if parts[-1] == "complete" else "complete/ file"
    return "other"


def tally(calls: Sequence[dict[str, Any]], files: int,
          steps: Sequence[tuple[float, str]] = ()) -> dict[str, Any]:
    """
    Calls per file and seconds per file, by (call, kind of target); with
    C{steps}, sorted boundaries [(time, name of the step starting then)],
    also by step.  Rows are sorted by time, largest first.
    """
    rows: dict[tuple[str, str], list[float]] = defaultdict(lambda: [0, 0.0, 0])
    by_step: dict[str, list[float]] = defaultdict(lambda: [0, 0.0, 0])
    by_step_kind: dict[tuple[str, str, str], list[float]] = defaultdict(lambda: [0, 0.0, 0])
    times = [t for t, _ in steps]
    for c in calls:
        key = (c["name"], kind(target(c)))
        rows[key][0] += 1
        rows[key][1] += c["dur"] or 0.0
        rows[key][2] += 1 if (c["ret"] or "").startswith("-") else 0
        if c["name"] in WAITS:
            continue  # time spent waiting for work, not doing it
        if steps:
            i = bisect.bisect_right(times, c["t"]) - 1
            step = steps[i][1] if i >= 0 else "outside"
            by_step[step][0] += 1
            by_step[step][1] += c["dur"] or 0.0
            by_step_kind[(step, *key)][0] += 1
            by_step_kind[(step, *key)][1] += c["dur"] or 0.0
    n = max(files, 1)

    def table(d: dict[Any, list[float]]) -> list[dict[str, Any]]:
        return sorted(({"key": list(k) if isinstance(k, tuple) else k, "per_file": v[0] / n,
                        "ms_per_file": 1e3 * v[1] / n, "failed_per_file": v[2] / n}
                       for k, v in d.items()),
                      key=lambda r: (r["key"][0] in WAITS, -r["ms_per_file"], -r["per_file"]))

    working = [v for k, v in rows.items() if k[0] not in WAITS]
    return {"files": files, "calls": sum(v[0] for v in rows.values()) / n,
            "calls_working": sum(v[0] for v in working) / n,
            "ms_working": 1e3 * sum(v[1] for v in working) / n,
            "rows": table(rows), "steps": table(by_step), "step_rows": table(by_step_kind)}


#: The groups of docs/benchmarks.md's per-file table: (label, test on (call, kind)).
GROUPS: list[tuple[str, Any]] = [
    ("fdatasync of the data", lambda c, k: c == "fdatasync" and k == "data"),
    ("fdatasync of a PUT's .put", lambda c, k: c == "fdatasync" and k == "put file"),
    ("fdatasync of the journal", lambda c, k: c == "fdatasync" and k == "journal"),
    ("fsync of new empty files (lock, data, journal)",
     lambda c, k: c == "fsync" and k in ("lock", "data", "journal")),
    ("meta.json and lease: fsync of the temp file",
     lambda c, k: c == "fsync" and k in ("meta.json", "lease")),
    ("fsync of directories (upload dir, incoming/, complete/, root)",
     lambda c, k: c == "fsync"
     and k in ("upload dir", "incoming/", "complete/", "complete/ file", "other")),
    ("mkdir", lambda c, k: c in ("mkdir", "mkdirat")),
    ("open/openat", lambda c, k: c in ("open", "openat")),
    ("close", lambda c, k: c == "close"),
    ("writes of data and journal (pwrite)",
     lambda c, k: c in ("pwrite64", "write", "pwritev") and k in ("data", "journal")),
    ("writes of a PUT's .put (pwrite)",
     lambda c, k: c in ("pwrite64", "write", "pwritev") and k == "put file"),
    ("writes of meta.json and lease (pwrite)",
     lambda c, k: c in ("pwrite64", "write") and k in ("meta.json", "lease")),
    ("rename of meta.json and lease", lambda c, k: c in ("rename", "renameat", "renameat2")),
    ("link of a published .put to <key>.done",
     lambda c, k: c in ("link", "linkat") and k == "done link"),
    ("link into complete/", lambda c, k: c in ("link", "linkat")),
    ("unlink/rmdir (clean-up)", lambda c, k: c in ("unlink", "unlinkat", "rmdir")),
    ("read-back of the data (fadvise, pread)",
     lambda c, k: k == "data" and c in ("fadvise64", "pread64", "preadv2", "read", "readv")),
    ("read-back of a PUT's .put (fadvise, pread)",
     lambda c, k: k == "put file" and c in ("fadvise64", "pread64", "preadv2", "read", "readv")),
    ("reads of lease and meta.json (lease checks)",
     lambda c, k: k in ("lease", "meta.json", "takeover")
     and c in ("read", "pread64", "lseek", "ioctl", "fstat", "newfstatat")),
    ("stat of paths (realpath of complete/, lstat)",
     lambda c, k: c in ("newfstatat", "stat", "lstat", "statx", "fstat")),
    ("locks (fcntl)", lambda c, k: c == "fcntl"),
    ("socket: recv/send", lambda c, k: k == "socket"),
    ("epoll_ctl", lambda c, k: c == "epoll_ctl"),
    ("thread hand-offs: wake-up pipe", lambda c, k: k == "pipe"),
    ("sched_yield (threads spinning for work, e.g. BLAKE3's workers)",
     lambda c, k: c == "sched_yield"),
    ("waits (futex, epoll_wait): idle, time not a cost", lambda c, k: c in WAITS),
    ("log file writes", lambda c, k: k == "log file"),
]


def grouped(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """L{tally}'s rows summed into L{GROUPS} (the first group that takes a row; else "other")."""
    out = {label: [0.0, 0.0, 0.0] for label, _ in GROUPS}
    out["other"] = [0.0, 0.0, 0.0]
    for r in rows:
        call, k = r["key"]
        for label, test in GROUPS:
            if test(call, k):
                break
        else:
            label = "other"
        out[label][0] += r["per_file"]
        out[label][1] += r["ms_per_file"]
        out[label][2] += r.get("failed_per_file", 0.0)
    return [{"group": g, "per_file": v[0], "ms_per_file": v[1], "failed_per_file": v[2]}
            for g, v in out.items()]


#: The steps of the one-step store of a PUT (storage/filesystem/_whole.py,
#: in its order), each a test on (call, kind of target); calls of none of
#: them (sockets, the log, thread hand-offs) are not the store's.
PUT_STEPS: list[tuple[str, Any]] = [
    ("create, lock, stat, unlock and close the .put",
     lambda c, k: k == "put file" and c in ("open", "openat", "fcntl", "fstat", "newfstatat",
                                            "statx", "close")),
    ("write the .put (pwrite)",
     lambda c, k: k == "put file" and c in ("pwrite64", "write", "pwritev")),
    ("fdatasync of the .put", lambda c, k: k == "put file" and c == "fdatasync"),
    ("fsync of incoming/ (grouped across PUTs)", lambda c, k: k == "incoming/" and c == "fsync"),
    ("read-back of the .put (fadvise, pread)",
     lambda c, k: k == "put file" and c in ("fadvise64", "pread64", "preadv2", "read", "readv")),
    ("link into complete/", lambda c, k: k == "complete/ file" and c in ("link", "linkat")),
    ("prove the link: stat of the published name",
     lambda c, k: k == "complete/ file" and c in ("newfstatat", "stat", "lstat", "statx")),
    ("fsync of complete/ (grouped across PUTs)",
     lambda c, k: k in ("complete/", "complete/ file") and c == "fsync"),
    ("link of the .put to <key>.done", lambda c, k: k == "done link" and c in ("link", "linkat")),
    ("directories: open, stat, close (incoming/, complete/, root)",
     lambda c, k: k in ("incoming/", "complete/", "complete/ file", "other")
     and c in ("open", "openat", "close", "fstat", "newfstatat", "statx", "mkdir", "mkdirat")),
]


def put_steps(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """
    L{tally}'s rows (per file) summed into the one-step store's
    L{PUT_STEPS}, in its order, then C{"not the store"} for every other
    call that is not a wait (sockets, the log, thread hand-offs...).
    """
    out = {label: [0.0, 0.0] for label, _ in PUT_STEPS}
    out["not the store (sockets, log, thread hand-offs...)"] = [0.0, 0.0]
    for r in rows:
        call, k = r["key"]
        if call in WAITS:
            continue
        for label, test in PUT_STEPS:
            if test(call, k):
                break
        else:
            label = "not the store (sockets, log, thread hand-offs...)"
        out[label][0] += r["per_file"]
        out[label][1] += r["ms_per_file"]
    return [{"step": s, "per_file": v[0], "ms_per_file": v[1]} for s, v in out.items()]

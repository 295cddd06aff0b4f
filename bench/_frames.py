# -*- test-case-name: tests.bench.test_batch -*-
"""
Reading a connection's frames from the bytes it carries (docs/protocol.md,
section 1: a type byte and a 4-byte big-endian body length, then the body),
and splitting a traced connection into its files' protocol steps.  Pure
functions, for L{bench._batch_trace} and L{bench.batch_profile}.
"""

from __future__ import annotations

from typing import Any, Sequence

HEADER = 5
NAMES = {
    0x01: "HELLO", 0x02: "WELCOME", 0x03: "UPLOAD", 0x04: "RESUME", 0x05: "ACCEPTED",
    0x06: "DATA", 0x07: "ACK", 0x08: "COMPLETED", 0x09: "ERROR", 0x0A: "PING",
    0x0B: "PONG", 0x0C: "CHALLENGE", 0x0D: "AUTH", 0x0E: "STATUS",
    0x0F: "UPLOAD_STATUS", 0x10: "FINISH",
}

#: The steps of one file on a connection, in order: (name, from event, to event).
#: The events: "prev" (the previous file's COMPLETED, or WELCOME for the
#: connection's first file), "upload" (UPLOAD sent), "accepted", "data"
#: (first DATA sent), "acked" (last ACK received), "finish" (FINISH or the
#: empty DATA sent), "completed".
STEPS = [
    ("client: to the next UPLOAD", "prev", "upload"),
    ("UPLOAD -> ACCEPTED (server: create)", "upload", "accepted"),
    ("client: ACCEPTED -> first DATA", "accepted", "data"),
    ("DATA -> last ACK (server: write, flush)", "data", "acked"),
    ("client: last ACK -> FINISH", "acked", "finish"),
    ("FINISH -> COMPLETED (server: verify, publish)", "finish", "completed"),
]


class FrameScanner:
    """
    Follows one direction of a connection: L{feed} it the bytes in order;
    it returns the (type, body length) of each frame whose header they
    complete.  Bodies are skipped, never kept.
    """

    def __init__(self) -> None:
        self._header = bytearray()
        self._skip = 0

    def feed(self, data: bytes | memoryview) -> list[tuple[int, int]]:
        out = []
        i, n = 0, len(data)
        while i < n:
            if self._skip:
                step = min(self._skip, n - i)
                self._skip -= step
                i += step
                continue
            need = HEADER - len(self._header)
            self._header += bytes(data[i:i + need])
            i += min(need, n - i)
            if len(self._header) == HEADER:
                kind, length = self._header[0], int.from_bytes(self._header[1:], "big")
                out.append((kind, length))
                self._header.clear()
                self._skip = length
        return out


def split_files(events: Sequence[Sequence[Any]]) -> list[dict[str, Any]]:
    """
    One connection's frames, [time, "send" | "recv", type, body length]
    in order, split into its files: for each file the times of its events
    (see L{STEPS}), its DATA and ACK frames and its payload bytes.  A file
    is counted from its UPLOAD to its COMPLETED; an upload that ended
    otherwise (ERROR, a broken connection) is left out.
    """
    files = []
    prev = None
    cur: dict[str, Any] | None = None
    for t, direction, kind, length in events:
        name = NAMES.get(kind, str(kind))
        if direction == "recv" and name == "WELCOME":
            prev = t
        elif direction == "send" and name == "UPLOAD":
            cur = {"prev": prev, "upload": t, "data_frames": 0, "ack_frames": 0, "bytes": 0}
        elif cur is None:
            continue
        elif direction == "recv" and name == "ACCEPTED":
            cur["accepted"] = t
        elif direction == "send" and name == "DATA":
            if length > 12:
                cur.setdefault("data", t)
                cur["data_frames"] += 1
                cur["bytes"] += length - 12
            else:  # the empty DATA: the end of an upload that declared its digest
                cur["finish"] = t
        elif direction == "send" and name == "FINISH":
            cur["finish"] = t
        elif direction == "recv" and name == "ACK":
            cur["acked"] = t
            cur["ack_frames"] += 1
        elif direction == "recv" and name == "COMPLETED":
            cur["completed"] = t
            files.append(cur)
            prev, cur = t, None
        elif direction == "recv" and name == "ERROR":
            cur = None
    return files


def step_times(f: dict[str, Any]) -> dict[str, float]:
    """One file's seconds per step of L{STEPS} (steps it lacks are left out)."""
    out = {}
    for step, a, b in STEPS:
        if f.get(a) is not None and f.get(b) is not None:
            out[step] = f[b] - f[a]
    out["total (UPLOAD -> COMPLETED)"] = f["completed"] - f["upload"]
    return out

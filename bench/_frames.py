# -*- test-case-name: tests.bench.test_batch -*-
"""
Reading a connection's frames from the bytes it carries (docs/protocol.md,
section 1: a type byte and a 4-byte big-endian body length, then the body),
and splitting a traced connection into its files' protocol steps: a file
sent whole in one PUT (pipelined, answered in order) or through UPLOAD,
ACCEPTED, DATA..., FINISH.  Pure functions, for L{bench._batch_trace} and
L{bench.batch_profile}.
"""

from __future__ import annotations

from typing import Any, Sequence

HEADER = 5
NAMES = {
    0x01: "HELLO", 0x02: "WELCOME", 0x03: "UPLOAD", 0x04: "RESUME", 0x05: "ACCEPTED",
    0x06: "DATA", 0x07: "ACK", 0x08: "COMPLETED", 0x09: "ERROR", 0x0A: "PING",
    0x0B: "PONG", 0x0C: "CHALLENGE", 0x0D: "AUTH", 0x0E: "STATUS",
    0x0F: "UPLOAD_STATUS", 0x10: "FINISH", 0x11: "PUT",
}

#: The steps of a file that went through UPLOAD (over the server's C{put}
#: limit, or to a server without PUT), in order: (name, from event, to
#: event).  The events: "prev" (the previous file's COMPLETED, or WELCOME
#: for the connection's first file), "upload" (UPLOAD sent), "accepted",
#: "data" (first DATA sent), "acked" (last ACK received), "finish" (FINISH
#: or the empty DATA sent), "completed".
STEPS = [
    ("client: to the next UPLOAD", "prev", "upload"),
    ("UPLOAD -> ACCEPTED (server: create)", "upload", "accepted"),
    ("client: ACCEPTED -> first DATA", "accepted", "data"),
    ("DATA -> last ACK (server: write, flush)", "data", "acked"),
    ("client: last ACK -> FINISH", "acked", "finish"),
    ("FINISH -> COMPLETED (server: verify, publish)", "finish", "completed"),
]
#: The whole of an UPLOAD file's time (L{step_times}).
UPLOAD_TOTAL = "total (UPLOAD -> COMPLETED)"

#: The steps of a file sent whole in one PUT (protocol.md, PUT), PUTs
#: pipelined on a connection and answered in order.  The events: "prev"
#: (the previous file's send on the connection: its PUT, or the COMPLETED
#: of an UPLOAD before it, or WELCOME), "put" (PUT sent), "completed" (its
#: answer: the first COMPLETED after the answers of the PUTs sent before
#: it), "ahead" (the answer of the PUT sent just before it, when that came
#: after this one was sent, else this one's send: the time it was in flight
#: behind another, so that the steps overlap and do not add up).
PUT_STEPS = [
    ("client: to the next PUT (from the previous send)", "prev", "put"),
    ("PUT -> COMPLETED (server: store whole)", "put", "completed"),
    ("  of which in flight behind the previous PUT", "put", "ahead"),
]

#: A phase of a connection (L{phases}) in which the client waits for no
#: answer: between files, or before the first.
IDLE_PHASE = "after the last COMPLETED"


def put_phase(in_flight: int) -> str:
    """The phase (L{phases}) in which C{in_flight} PUTs await their answers."""
    return f"PUT: {in_flight} in flight"


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


def _walk(events: Sequence[Sequence[Any]]) -> tuple[list[dict[str, Any]],
                                                   list[tuple[float, str]]]:
    """L{split_files} and L{phases} in one pass over a connection's frames."""
    files: list[dict[str, Any]] = []
    phases: list[tuple[float, str]] = []
    last_done = last_sent = None  # the "prev" of an UPLOAD, of a PUT
    cur: dict[str, Any] | None = None  # the UPLOAD under way
    puts: list[dict[str, Any]] = []  # PUTs sent and not answered yet, oldest first
    for t, direction, kind, length in events:
        name = NAMES.get(kind, str(kind))
        if direction == "recv" and name == "WELCOME":
            last_done = last_sent = t
        elif direction == "send" and name == "PUT":
            puts.append({"kind": "put", "prev": last_sent, "put": t, "in_flight": len(puts) + 1,
                         "ahead": t if not puts else None, "body": length})
            last_sent = t
            phases.append((t, put_phase(len(puts))))
        elif direction == "recv" and puts and name in ("COMPLETED", "ERROR"):
            # The answer of the oldest PUT not answered yet (in order).
            done = puts.pop(0)
            if puts and puts[0]["ahead"] is None:
                puts[0]["ahead"] = t
            phases.append((t, put_phase(len(puts)) if puts else IDLE_PHASE))
            if name == "COMPLETED":
                done["completed"] = t
                files.append(done)
            last_done = t
        elif direction == "send" and name == "UPLOAD":
            cur = {"kind": "upload", "prev": last_done, "upload": t, "data_frames": 0,
                   "ack_frames": 0, "bytes": 0}
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
            for step, a, _ in STEPS:
                if cur.get(a) is not None:
                    phases.append((cur[a], step))
            phases.append((t, IDLE_PHASE))
            last_done = last_sent = t
            cur = None
        elif direction == "recv" and name == "ERROR":
            cur = None
    return files, phases


def split_files(events: Sequence[Sequence[Any]]) -> list[dict[str, Any]]:
    """
    One connection's frames, [time, "send" | "recv", type, body length]
    in order, split into its files, in the order they completed: for each
    file its C{kind} (C{"upload"} or C{"put"}) and the times of its events
    (see L{STEPS}, L{PUT_STEPS}); an UPLOAD's DATA and ACK frames and
    payload bytes; a PUT's C{body} length and C{in_flight}, the PUTs
    awaiting an answer once it was sent, itself included.  A file is
    counted from its UPLOAD or PUT to its COMPLETED; one that ended
    otherwise (ERROR, a broken connection) is left out.  Answers to PUTs
    come in order: a COMPLETED or ERROR while PUTs wait is the oldest's.
    """
    return _walk(events)[0]


def phases(events: Sequence[Sequence[Any]]) -> list[tuple[float, str]]:
    """
    One connection's phases, [(time, phase starting then)] in time order:
    an UPLOAD's L{STEPS} (of the uploads that completed), while PUTs are
    in flight how many (L{put_phase}), and L{IDLE_PHASE} after the answer
    of the last file in flight.  Of two phases starting at once the one
    known last holds (an UPLOAD's first step names the idle time before it).
    """
    return sorted({t: phase for t, phase in _walk(events)[1]}.items())


def completed_frames(events: Sequence[Sequence[Any]]) -> int:
    """The COMPLETED frames a connection received (one per file stored or skipped)."""
    return sum(1 for _, direction, kind, _ in events
               if direction == "recv" and NAMES.get(kind) == "COMPLETED")


def step_times(f: dict[str, Any]) -> dict[str, float]:
    """One file's seconds per step of L{STEPS} or L{PUT_STEPS} (steps it lacks are left out)."""
    out = {}
    for step, a, b in PUT_STEPS if f.get("kind") == "put" else STEPS:
        if f.get(a) is not None and f.get(b) is not None:
            out[step] = f[b] - f[a]
    if f.get("kind") != "put":
        out[UPLOAD_TOTAL] = f["completed"] - f["upload"]
    return out

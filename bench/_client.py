"""
The imgresume client as the benchmarks run it: one process, the public
L{Uploader} API with its defaults (window, chunk size from the server,
backoff), every file uploaded at once, journal off.

  python -m bench._client SPEC_JSON

SPEC_JSON (a JSON object, inline): C{endpoint}; C{files}, a list of
[path, remote name] or [path, remote name, client id] (default client id
C{bench-client}); optional C{window}, C{chunk_size}, C{digest} (as
C{imgresume upload --digest}); optional C{kill_at},
fractions of the (first) file at which this process asks the harness to
SIGKILL the server it is uploading to, by printing
C{{"event": "kill", "server": ID}} on stdout (and C{{"event": "resumed"}}
once a byte is acknowledged again after a break).

The last stdout line is the result: per upload its times (CLOCK_MONOTONIC,
comparable with the harness), bytes sent, attempts, a trace of every
connection (connect start, connected, ACCEPTED and its offset, first
acknowledgement after it, connection lost), and the process's CPU seconds
(getrusage, all threads) for the hashing and for the whole run.
"""

from __future__ import annotations

import json
import resource
import sys
import time
from typing import Any

from twisted.internet.defer import gatherResults
from twisted.internet.endpoints import clientFromString
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.task import react
from zope.interface import implementer


def _cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def _emit(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


@implementer(IStreamClientEndpoint)
class TracingEndpoint:
    """
    An endpoint wrapper recording, for each connection the uploader makes,
    when it started connecting, when it connected and when it was lost.
    """

    def __init__(self, inner: IStreamClientEndpoint, trace: list[dict[str, Any]]) -> None:
        self.inner = inner
        self.trace = trace

    def connect(self, factory: Any) -> Any:
        rec: dict[str, Any] = {"connect_start": time.monotonic()}
        self.trace.append(rec)

        def connected(proto: Any) -> Any:
            rec["connected"] = time.monotonic()
            original = proto.connectionLost

            def lost(reason: Any) -> Any:
                rec.setdefault("lost", time.monotonic())
                return original(reason)

            proto.connectionLost = lost
            return proto

        def failed(f: Any) -> Any:
            rec["connect_failed"] = time.monotonic()
            return f

        return self.inner.connect(factory).addCallbacks(connected, failed)


async def _one(reactor: Any, spec: dict[str, Any], path: str, name: str, client_id: str,
               first: bool, cpu_marks: dict[str, float]) -> dict[str, Any]:
    import os

    from imgresume.client import Uploader

    size = os.path.getsize(path)
    trace: list[dict[str, Any]] = []
    kill_at = sorted(spec.get("kill_at") or []) if first else []
    endpoint = TracingEndpoint(clientFromString(reactor, spec["endpoint"]), trace)
    tuning = {k: spec[k] for k in ("window", "chunk_size", "digest") if spec.get(k)}
    uploader = Uploader(endpoint, reactor=reactor, client_id=client_id, journal=None,
                        **tuning)  # otherwise the product's defaults
    kills: list[dict[str, Any]] = []
    acks: list[float] = []  # when each ACK arrived (first file only)
    ack_offsets: list[int] = []  # and the offset it acknowledged

    def progress(p: Any) -> None:
        if p.phase == "hashing" and first and p.done >= p.total and "hash_cpu" not in cpu_marks:
            cpu_marks["hash_cpu"] = _cpu()
        if p.phase != "uploading" or not trace:
            return
        t = time.monotonic()
        rec = trace[-1]
        if "accepted" not in rec:
            rec.update(accepted=t, accepted_offset=p.done, server=p.server_id)
        elif "first_ack" not in rec and p.done > rec["accepted_offset"]:
            rec.update(first_ack=t, first_ack_offset=p.done)
            if len(trace) > 1 and spec.get("kill_at"):
                _emit({"event": "resumed", "t": t})
        rec["last_ack"] = p.done
        if first:
            acks.append(t)
            ack_offsets.append(p.done)
            if p.done == size:
                out["all_acked"] = t
        if kill_at and p.done >= kill_at[0] * size and p.done < size and "kill" not in rec:
            kill_at.pop(0)
            rec["kill"] = t
            kills.append({"server": p.server_id, "offset": p.done, "t": t})
            _emit({"event": "kill", "server": p.server_id, "offset": p.done, "t": t})

    start = time.monotonic()
    out: dict[str, Any] = {"name": name, "size": size, "start": start, "trace": trace,
                           "kills": kills}
    if first:
        out["acks"] = acks
        out["ack_offsets"] = ack_offsets
    try:
        result = await uploader.upload(path, name, progress=progress)
    except Exception as e:  # noqa: BLE001 - every failure is a counted failure
        out.update(end=time.monotonic(), error=f"{type(e).__name__}: {e}")
        return out
    out.update(
        end=time.monotonic(), hashed=trace[0]["connect_start"] if trace else None,
        bytes_sent=result.bytes_sent, attempts=result.attempts, servers=result.servers,
        resumed_at=result.resumed_at, seconds=result.seconds, sha256=result.sha256,
        digest=result.digest, error=None,
    )
    return out


def _watch_retries() -> dict[str, int]:
    """
    Count why attempts ended (the uploader logs "attempt N for NAME via
    SERVER ended: ERROR" before it reconnects), by the error's first words.
    """
    from twisted.logger import formatEvent, globalLogBeginner

    reasons: dict[str, int] = {}

    def observe(event: dict[str, Any]) -> None:
        if "error" in event and str(event.get("log_format", "")).startswith("attempt "):
            reason = " ".join(str(event["error"]).split()[:6])
            reasons[reason] = reasons.get(reason, 0) + 1
        elif event.get("log_level") is not None and event["log_level"].name in (
                "warn", "error", "critical"):
            text = " ".join(formatEvent(event).split()[:8])
            reasons[f"log: {text}"] = reasons.get(f"log: {text}", 0) + 1

    globalLogBeginner.beginLoggingTo([observe], discardBuffer=True,
                                     redirectStandardIO=False)
    return reasons


async def _main(reactor: Any, spec: dict[str, Any]) -> None:
    from twisted.internet import defer

    retries = _watch_retries()
    cpu0 = _cpu()
    marks: dict[str, float] = {}
    t0 = time.monotonic()
    ds = [
        defer.Deferred.fromCoroutine(
            _one(reactor, spec, f[0], f[1], f[2] if len(f) > 2 else "bench-client", i == 0,
                 marks))
        for i, f in enumerate(spec["files"])
    ]
    uploads = await gatherResults(ds)
    t1 = time.monotonic()
    cpu1 = _cpu()
    _emit({
        "event": "result", "t0": t0, "t1": t1, "uploads": uploads,
        "cpu": cpu1 - cpu0,
        "hash_cpu": (marks["hash_cpu"] - cpu0) if "hash_cpu" in marks else None,
        "maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "retry_reasons": retries,
    })


def main(argv: list[str]) -> None:
    if len(argv) != 1:
        sys.exit(__doc__)
    spec = json.loads(argv[0])
    react(lambda reactor: _defer(_main(reactor, spec)))


def _defer(coro: Any) -> Any:
    from twisted.internet.defer import Deferred

    return Deferred.fromCoroutine(coro)


if __name__ == "__main__":
    main(sys.argv[1:])

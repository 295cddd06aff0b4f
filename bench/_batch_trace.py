"""
The batch-profile group's client: the public L{Uploader}'s C{upload_batch}
(what C{imgresume upload DIR} runs) with every frame it sends and receives
timestamped, so each file's time can be split by protocol step.

  python -m bench._batch_trace SPEC_JSON

SPEC_JSON: C{endpoint}; C{dir} (uploaded as C{imgresume upload DIR} would,
every file under its relative path); C{parallel}; C{journal}: a journal
file's path, or null for none (C{--no-journal}); C{repeat} (1): upload the
directory this many times, under C{round-0/}, C{round-1/}...

The last stdout line is the result: per connection, its frames as
[time, "send" | "recv", frame type, body length] (time: C{time.time()},
the clock strace's C{-ttt} prints), the outcomes (name, error), CPU
seconds (getrusage, all threads), the wall time of the batch and the
client's digest (C{digest}: BLAKE3 by default, each file hashed once).
"""

from __future__ import annotations

import json
import resource
import sys
import time
from typing import Any

from twisted.internet.endpoints import clientFromString
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.task import react
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from zope.interface import implementer

from bench._frames import FrameScanner


class _TracingWrapper(ProtocolWrapper):
    """Records the header of every frame written and received."""

    def __init__(self, factory: WrappingFactory, wrapped: Any) -> None:
        super().__init__(factory, wrapped)
        self.events: list[list[Any]] = factory.events_for_new_connection()  # type: ignore[attr-defined]
        self._out = FrameScanner()
        self._in = FrameScanner()

    def _record(self, scanner: FrameScanner, direction: str, data: bytes) -> None:
        t = time.time()
        for kind, length in scanner.feed(data):
            self.events.append([t, direction, kind, length])

    def write(self, data: bytes) -> None:
        self._record(self._out, "send", data)
        super().write(data)

    def writeSequence(self, data: Any) -> None:
        for piece in data:
            self._record(self._out, "send", piece)
        super().writeSequence(data)

    def dataReceived(self, data: bytes) -> None:
        self._record(self._in, "recv", data)
        super().dataReceived(data)


class _TracingFactory(WrappingFactory):
    protocol = _TracingWrapper

    def __init__(self, wrapped: Any, connections: list[list[list[Any]]]) -> None:
        super().__init__(wrapped)
        self.connections = connections

    def events_for_new_connection(self) -> list[list[Any]]:
        events: list[list[Any]] = []
        self.connections.append(events)
        return events


@implementer(IStreamClientEndpoint)
class FrameTracingEndpoint:
    """Wraps an endpoint; every connection's frames go to C{connections}."""

    def __init__(self, inner: IStreamClientEndpoint) -> None:
        self.inner = inner
        self.connections: list[list[list[Any]]] = []

    def connect(self, factory: Any) -> Any:
        wrapper = _TracingFactory(factory, self.connections)
        return self.inner.connect(wrapper).addCallback(lambda p: p.wrappedProtocol)


def _cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


async def _main(reactor: Any, spec: dict[str, Any]) -> None:
    from imgresume.client import Journal, Uploader, collect_files

    endpoint = FrameTracingEndpoint(clientFromString(reactor, spec["endpoint"]))
    journal = Journal(spec["journal"]) if spec.get("journal") else None
    uploader = Uploader(endpoint, reactor=reactor, client_id="bench-batch", journal=journal)
    items = []
    repeat = spec.get("repeat", 1)
    for i in range(repeat):  # the same files again under another remote directory
        prefix = f"round-{i}" if repeat > 1 else None
        items += collect_files([spec["dir"]], prefix=prefix).items
    cpu0 = _cpu()
    t0 = time.time()
    result = await uploader.upload_batch(items, parallel=spec["parallel"])
    t1 = time.time()
    outcomes = [{"name": o.name, "error": None if o.result is not None else str(o.error)}
                for o in result.outcomes]
    sys.stdout.write(json.dumps({
        "t0": t0, "t1": t1, "cpu": _cpu() - cpu0, "files": len(items),
        "outcomes": outcomes, "connections": endpoint.connections, "digest": uploader.digest,
    }) + "\n")
    sys.stdout.flush()


def main(argv: list[str]) -> None:
    if len(argv) != 1:
        sys.exit(__doc__)
    spec = json.loads(argv[0])

    def run(reactor: Any) -> Any:
        from twisted.internet.defer import Deferred

        return Deferred.fromCoroutine(_main(reactor, spec))

    react(run)


if __name__ == "__main__":
    main(sys.argv[1:])

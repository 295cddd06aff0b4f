"""
The client processes of the scale group: many uploads at once, each with the
public L{Uploader} (one Uploader and one client id per file, journal off,
the product's defaults otherwise) over its own TCP connection, whose kernel
send buffer is capped (L{SEND_BUFFER}).

  python -m bench._scale_client SPEC_JSON

To have every upload of every client process open at the same moment, DATA
waits at a gate: once a connection has its upload ACCEPTED, what the
uploader writes next is held (in this process) until the harness says go.
This process prints C{{"event": "accepted", "t": T}} at its first ACCEPTED,
C{{"event": "ready", ...}} once each of its uploads has been accepted (or
has failed), then waits for a line C{go} on stdin.  Connections made after
the gate opened (retries) are never held.

SPEC_JSON (a JSON object, inline): C{endpoint}; C{files}, a list of
[path, remote name, client id]; optional C{window}.

The last stdout line is the result: per upload its times (CLOCK_MONOTONIC,
comparable with the harness): start, accepted, end; connections made, bytes
sent, the stored path (relative to the storage root), the error if it
failed; why connections were retried; this process's CPU seconds and peak
RSS.
"""

from __future__ import annotations

import json
import os
import resource
import socket
import sys
import threading
import time
from typing import Any

from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.endpoints import clientFromString
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.task import react
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from zope.interface import implementer

from bench._client import _cpu, _emit, _watch_retries

#: Each connection's kernel send buffer.  Autotuned, each grows up to
#: net.ipv4.tcp_wmem's maximum (4 MiB here) while the servers push back:
#: for 1,000 clients, gigabytes of the one kernel's TCP memory, past
#: net.ipv4.tcp_mem's pressure mark, where it drops packets for servers and
#: balancer too (a loopback connection that lost packets can then trickle
#: for tens of seconds under BBR).  Real clients keep their send buffers on
#: their own hosts.
SEND_BUFFER = 256 * 1024


class HoldingProtocol(ProtocolWrapper):
    """
    The transport an upload attempt writes to: everything passes through,
    except that between L{hold} and L{release} writes are kept back.
    """

    def __init__(self, factory: WrappingFactory, wrapped: Any) -> None:
        super().__init__(factory, wrapped)
        self.accepted = False
        self._held: list[bytes] | None = None

    def hold(self) -> None:
        """Keep back what is written from now on."""
        if self._held is None:
            self._held = []

    def release(self) -> None:
        """Write what was kept back, and stop holding."""
        held, self._held = self._held, None
        if held:  # a closed transport ignores it
            self.transport.writeSequence(held)

    def write(self, data: bytes) -> None:
        if self._held is not None:
            self._held.append(data)
        else:
            self.transport.write(data)

    def writeSequence(self, data: Any) -> None:
        if self._held is not None:
            self._held.extend(data)
        else:
            self.transport.writeSequence(data)


class Gate:
    """
    Counts uploads that reached ACCEPTED (or ended) and holds their DATA
    until L{open}; then releases every held connection.
    """

    def __init__(self, total: int) -> None:
        self.total = total
        self.is_open = False
        self.opened_at: float | None = None
        self.accepted = 0
        self.ended = 0
        self._held: list[HoldingProtocol] = []

    def on_accepted(self, conn: HoldingProtocol, first: bool) -> None:
        """C{conn} got ACCEPTED; C{first}: the first time for its upload."""
        if not self.is_open:
            conn.hold()
            self._held.append(conn)
        if first:
            if self.accepted == 0:
                _emit({"event": "accepted", "t": time.monotonic()})
            self.accepted += 1
            self._maybe_ready()

    def on_ended(self, was_accepted: bool) -> None:
        """An upload finished or failed; count it if it never got ACCEPTED."""
        if not was_accepted:
            self.ended += 1
            self._maybe_ready()

    def _maybe_ready(self) -> None:
        if not self.is_open and self.accepted + self.ended == self.total:
            _emit({"event": "ready", "t": time.monotonic(), "accepted": self.accepted,
                   "ended": self.ended})

    def open(self) -> None:
        """Go: release every held connection."""
        if self.is_open:
            return
        self.is_open = True
        self.opened_at = time.monotonic()
        held, self._held = self._held, []
        for conn in held:
            conn.release()


@implementer(IStreamClientEndpoint)
class GatedEndpoint:
    """
    Wraps an endpoint so that each connection's writes go through a
    L{HoldingProtocol}; remembers the latest connection and counts them.
    """

    def __init__(self, inner: IStreamClientEndpoint) -> None:
        self.inner = inner
        self.current: HoldingProtocol | None = None
        self.connections = 0

    def connect(self, factory: Any) -> Deferred[Any]:
        wrapping = WrappingFactory(factory)
        wrapping.protocol = HoldingProtocol

        def connected(proto: HoldingProtocol) -> HoldingProtocol:
            proto.getHandle().setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER)
            self.current = proto
            self.connections += 1
            return proto

        return self.inner.connect(wrapping).addCallback(connected)


async def _one(reactor: Any, spec: dict[str, Any], gate: Gate, path: str, name: str,
               client_id: str) -> dict[str, Any]:
    from imgresume.client import Uploader

    endpoint = GatedEndpoint(clientFromString(reactor, spec["endpoint"]))
    tuning = {"window": spec["window"]} if spec.get("window") else {}
    uploader = Uploader(endpoint, reactor=reactor, client_id=client_id, journal=None,
                        **tuning)
    out: dict[str, Any] = {"name": name, "size": os.path.getsize(path),
                           "start": time.monotonic(), "accepted": None}

    def progress(p: Any) -> None:
        conn = endpoint.current
        if p.phase != "uploading" or conn is None or conn.accepted:
            return
        conn.accepted = True
        first = out["accepted"] is None
        if first:
            out["accepted"] = time.monotonic()
        gate.on_accepted(conn, first)

    try:
        result = await uploader.upload(path, name, progress=progress)
    except Exception as e:  # noqa: BLE001 - every failure is a counted failure
        out.update(end=time.monotonic(), error=f"{type(e).__name__}: {e}")
    else:
        out.update(end=time.monotonic(), error=None, path=result.path,
                   sha256=result.sha256, digest=result.digest, bytes_sent=result.bytes_sent,
                   servers=result.servers)
    out["connections"] = endpoint.connections
    gate.on_ended(out["accepted"] is not None)
    return out


def _wait_for_go(reactor: Any, gate: Gate) -> None:
    """Open the gate when the harness writes "go" (or closes stdin)."""

    def read() -> None:
        for line in sys.stdin:
            if line.strip() == "go":
                break
        reactor.callFromThread(gate.open)

    threading.Thread(target=read, daemon=True).start()


async def _main(reactor: Any, spec: dict[str, Any]) -> None:
    retries = _watch_retries()
    gate = Gate(len(spec["files"]))
    _wait_for_go(reactor, gate)
    cpu0 = _cpu()
    ds = [Deferred.fromCoroutine(_one(reactor, spec, gate, *f)) for f in spec["files"]]
    uploads = await gatherResults(ds)
    _emit({
        "event": "result", "go": gate.opened_at, "uploads": uploads,
        "cpu": _cpu() - cpu0,
        "maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "retry_reasons": retries,
    })


def main(argv: list[str]) -> None:
    if len(argv) != 1:
        sys.exit(__doc__)
    spec = json.loads(argv[0])
    react(lambda reactor: Deferred.fromCoroutine(_main(reactor, spec)))


if __name__ == "__main__":
    main(sys.argv[1:])

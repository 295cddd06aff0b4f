# -*- test-case-name: tests.bench.test_delayrelay -*-
"""
A delay-injecting TCP relay: an emulated link with a one-way delay and a
bandwidth cap between a client and a server on the same host (no kernel
netem here).  The latency benchmark runs it as its own process:

  python -m bench._delayrelay --to 127.0.0.1:PORT [--listen 0]
                              [--delay-ms 25] [--rate 100M] [--queue BYTES]

It prints C{{"port": N}} once listening; for every relayed connection, once
both sides have closed, one line C{{"event": "connection", "up": {...},
"down": {...}}} with what each direction measured (L{DelayLine.stats}; "up"
is client to target); on SIGTERM, a line for every connection still open,
then C{{"event": "exit", "cpu": seconds}}.

Each direction of a connection is a L{DelayLine}: the relay terminates TCP
on both sides, so the delay and the cap apply to the bytes, the way a long
link applies them to packets; TCP's own handshake and congestion control over
such a link are not emulated.
"""

from __future__ import annotations

import argparse
import json
import re
import resource
import sys
from collections import deque
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import (
    IHalfCloseableProtocol,
    IPushProducer,
    IReactorTime,
    IStreamClientEndpoint,
)
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.python.failure import Failure
from zope.interface import implementer

_RATE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([kMG]?)\s*\Z")
_DECIMAL = {"": 1.0, "k": 1e3, "M": 1e6, "G": 1e9}


def parse_rate(text: str) -> float:
    """Bytes per second in C{text}: a number, optional decimal suffix k, M, G (C{100M})."""
    m = _RATE.match(text)
    if not m or float(m.group(1)) <= 0:
        raise ValueError(f"not a rate: {text!r} (bytes/s, e.g. 100M)")
    return float(m.group(1)) * _DECIMAL[m.group(2)]


@implementer(IPushProducer)
class DelayLine:
    """
    One direction of an emulated link.  Bytes pushed in with L{receive} wait
    for the bottleneck (serialised at C{rate} bytes/s behind the bytes before
    them), then C{delay} seconds of propagation, and come out through
    C{sink}; batches are released by timestamp, so a late timer delays a
    release but never shifts the schedule.

    Buffering is bounded: the C{source} is paused while the line holds
    C{limit} bytes or more (propagating or queued); while the sink pauses the
    line (it is the sink transport's producer) nothing is released, so the
    line fills and the source stays paused.  At most C{limit} plus one read
    in the line, and one release (at most as much) in the sink's buffer.

    @ivar stats: what the line measured (seconds from C{clock}, bytes).
    """

    def __init__(self, clock: IReactorTime, delay: float, rate: float, limit: int,
                 sink: Callable[[list[bytes]], None], source: IPushProducer) -> None:
        self.clock = clock
        self.delay = delay
        self.rate = rate
        self.limit = limit
        self.sink = sink
        self.source = source
        #: (due, arrival, bytes), or bytes None for the end of the stream.
        self._queue: deque[tuple[float, float, bytes | None]] = deque()
        self._held = 0
        self._free_at = 0.0  # when the bottleneck has sent everything queued
        self._call: Any = None
        self._sink_paused = False
        self._source_paused = False
        self._then: Callable[[], None] | None = None
        self.finishing = False
        self.stopped = False
        self.stats: dict[str, Any] = {
            "bytes": 0, "first_in": None, "first_out": None, "last_out": None,
            "peak_held": 0, "limit": limit, "source_pauses": 0,
            "min_delay": None, "max_delay": None,
            "timer_fires": 0, "late_sum": 0.0, "late_max": 0.0,
        }

    @property
    def held(self) -> int:
        """Bytes in the line now (queued for the bottleneck or propagating)."""
        return self._held

    def receive(self, data: bytes) -> None:
        """Bytes from the source enter the line."""
        if self.stopped or self.finishing or not data:
            return
        now = self.clock.seconds()
        if self.stats["first_in"] is None:
            self.stats["first_in"] = now
        self._free_at = max(now, self._free_at) + len(data) / self.rate
        self._queue.append((self._free_at + self.delay, now, data))
        self._held += len(data)
        self.stats["peak_held"] = max(self.stats["peak_held"], self._held)
        self._throttle()
        self._schedule(now)

    def finish(self, then: Callable[[], None]) -> None:
        """
        The source ended: call C{then} once the bytes in the line have come
        out (the end travels the line like a last, empty packet).
        """
        if self.finishing:
            return
        self.finishing = True
        self._then = then
        if self.stopped:
            then()
            return
        now = self.clock.seconds()
        self._queue.append((max(now, self._free_at) + self.delay, now, None))
        self._schedule(now)

    def stop(self) -> None:
        """The sink is gone: drop what the line holds and whatever comes."""
        self.stopped = True
        if self._call is not None:
            self._call.cancel()
            self._call = None
        self._queue.clear()
        self._held = 0
        self._throttle()
        if self.finishing and self._then is not None:
            then, self._then = self._then, None
            then()

    # IPushProducer, for the sink transport --------------------------------

    def pauseProducing(self) -> None:
        self._sink_paused = True
        if self._call is not None:
            self._call.cancel()
            self._call = None

    def resumeProducing(self) -> None:
        self._sink_paused = False
        self._release(timer=False)

    def stopProducing(self) -> None:
        self.stop()

    # Internals ---------------------------------------------------------------

    def _throttle(self) -> None:
        if self.finishing:
            return  # the source has ended: nothing to pause or resume
        full = self._held >= self.limit and not self.stopped
        if full and not self._source_paused:
            self._source_paused = True
            self.stats["source_pauses"] += 1
            self.source.pauseProducing()
        elif not full and self._source_paused:
            self._source_paused = False
            self.source.resumeProducing()

    def _schedule(self, now: float) -> None:
        if self._call is None and self._queue and not self._sink_paused and not self.stopped:
            self._call = self.clock.callLater(max(0.0, self._queue[0][0] - now),
                                              self._release)

    def _release(self, timer: bool = True) -> None:
        self._call = None
        if self.stopped:
            return
        now = self.clock.seconds()
        st = self.stats
        if timer and self._queue and self._queue[0][0] <= now:
            late = now - self._queue[0][0]
            st["timer_fires"] += 1
            st["late_sum"] += late
            st["late_max"] = max(st["late_max"], late)
        out: list[bytes] = []
        ended = False
        while self._queue and self._queue[0][0] <= now:
            _, arrival, data = self._queue.popleft()
            if data is None:
                ended = True
                break
            out.append(data)
            self._held -= len(data)
            st["bytes"] += len(data)
            waited = now - arrival
            st["min_delay"] = waited if st["min_delay"] is None else min(st["min_delay"], waited)
            st["max_delay"] = waited if st["max_delay"] is None else max(st["max_delay"], waited)
        if out:
            if st["first_out"] is None:
                st["first_out"] = now
            st["last_out"] = now
            self._throttle()
            self.sink(out)  # may pause this line
        if ended and self._then is not None:
            then, self._then = self._then, None
            then()
        elif not self.stopped:
            self._schedule(now)


@implementer(IHalfCloseableProtocol)
class _End(Protocol):
    """
    One side of a relayed connection (the accepted client, or the connection
    to the target).  Reads go into C{outbound}, the line to the other side;
    an end of stream travels the line, then half-closes the other side.
    """

    def __init__(self, pair: _Pair) -> None:
        self.pair = pair
        self.outbound: DelayLine | None = None
        self.inbound: DelayLine | None = None
        self.other: _End | None = None
        self.read_closed = False
        self.write_closed = False
        self.gone = False

    def connectionMade(self) -> None:
        self.pair.end_made(self)

    def dataReceived(self, data: bytes) -> None:
        if self.outbound is not None:
            self.outbound.receive(data)

    def readConnectionLost(self) -> None:
        if self.read_closed:
            return
        self.read_closed = True
        if self.outbound is not None and self.other is not None:
            self.outbound.finish(self.other.close_write)
        if self.write_closed:
            self.transport.loseConnection()

    def writeConnectionLost(self) -> None:
        self.write_closed = True
        if self.read_closed:
            self.transport.loseConnection()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.gone = True
        if self.inbound is not None:
            self.inbound.stop()
        if self.outbound is not None and self.other is not None:
            self.outbound.finish(self.other.close)
        self.pair.end_lost(self)

    def close_write(self) -> None:
        """The other side's stream ended: end this side's too, once written."""
        if self.gone or self.write_closed:
            return
        if self.transport.producer is not None:
            self.transport.unregisterProducer()
        self.write_closed = True
        if self.read_closed:
            self.transport.loseConnection()
        else:
            self.transport.loseWriteConnection()

    def close(self) -> None:
        """The other side is gone: close this one once its buffer is written."""
        if not self.gone:
            if self.transport.producer is not None:
                self.transport.unregisterProducer()
            self.transport.loseConnection()


class _Pair:
    """A relayed connection: the accepted end and the end at the target."""

    def __init__(self, relay: DelayRelayFactory) -> None:
        self.relay = relay
        self.down = _End(self)
        self.up: _End | None = None
        self._connecting: Deferred[Any] | None = None

    def end_made(self, end: _End) -> None:
        """An end connected; the accepted one waits for the target's."""
        if end is self.down:
            self._accepted()

    def _accepted(self) -> None:
        self.down.transport.pauseProducing()
        self.relay.open.add(self)
        self._connecting = self.relay.target.connect(Factory.forProtocol(self._up_end))
        self._connecting.addCallbacks(self._connected, self._failed)

    def _up_end(self) -> _End:
        self.up = _End(self)
        return self.up

    def _connected(self, up: _End) -> None:
        self._connecting = None
        down = self.down
        if down.gone:
            up.transport.loseConnection()
            return
        r = self.relay
        down.outbound = up.inbound = DelayLine(
            r.clock, r.delay, r.rate, r.limit, up.transport.writeSequence, down.transport)
        up.outbound = down.inbound = DelayLine(
            r.clock, r.delay, r.rate, r.limit, down.transport.writeSequence, up.transport)
        up.transport.registerProducer(down.outbound, True)
        down.transport.registerProducer(up.outbound, True)
        down.other, up.other = up, down
        down.transport.resumeProducing()

    def _failed(self, failure: Failure) -> None:
        self._connecting = None
        self.down.transport.loseConnection()

    def end_lost(self, end: _End) -> None:
        if end is self.down and self._connecting is not None:
            self._connecting.cancel()
        if self.down.gone and (self.up is None or self.up.gone):
            self.relay.closed(self)

    def report(self) -> dict[str, Any]:
        """The figures of both directions, for the relay's output."""
        return {
            "event": "connection",
            "open": not (self.down.gone and (self.up is None or self.up.gone)),
            "up": self.down.outbound.stats if self.down.outbound else None,
            "down": self.up.outbound.stats if self.up and self.up.outbound else None,
        }


class DelayRelayFactory(Factory):
    """
    Accepts clients and relays each to C{target} through two L{DelayLine}s
    of C{delay} seconds and C{rate} bytes/s, each holding at most
    C{rate * delay + queue} bytes (what the line carries at full rate, plus
    a bottleneck queue).  C{report} gets every connection's figures.
    """

    def __init__(self, clock: IReactorTime, target: IStreamClientEndpoint, delay: float,
                 rate: float, queue: int, report: Callable[[dict[str, Any]], None]) -> None:
        self.clock = clock
        self.target = target
        self.delay = delay
        self.rate = rate
        self.limit = int(rate * delay) + queue
        self.report = report
        self.open: set[_Pair] = set()

    def buildProtocol(self, addr: Any) -> _End:
        return _Pair(self).down

    def closed(self, pair: _Pair) -> None:
        if pair in self.open:
            self.open.discard(pair)
            self.report(pair.report())

    def report_open(self) -> None:
        """Report the connections still open (at shutdown)."""
        for pair in list(self.open):
            self.report(pair.report())
        self.open.clear()


def _emit(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def _cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def parse_args(argv: list[str]) -> argparse.Namespace:
    from imgresume.sizes import parse_size

    p = argparse.ArgumentParser(prog="python -m bench._delayrelay", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--to", required=True, metavar="HOST:PORT", help="the target")
    p.add_argument("--listen", type=int, default=0,
                   help="port on 127.0.0.1 [0: a free one, printed]")
    p.add_argument("--delay-ms", type=float, default=25.0,
                   help="one-way delay in each direction (RTT = 2x) [25]")
    p.add_argument("--rate", type=parse_rate, default=parse_rate("100M"),
                   help="bandwidth cap of each direction, bytes/s, decimal "
                        "suffixes k M G [100M]")
    p.add_argument("--queue", type=parse_size,
                   help="bottleneck queue per direction, beyond what the line "
                        "carries at full rate [rate x delay]")
    return p.parse_args(argv)


async def _run(reactor: Any, args: argparse.Namespace) -> None:
    from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint

    host, _, port = args.to.rpartition(":")
    delay = args.delay_ms / 1e3
    queue = args.queue if args.queue is not None else int(args.rate * delay)
    cpu0 = _cpu()
    factory = DelayRelayFactory(reactor, TCP4ClientEndpoint(reactor, host, int(port)),
                                delay, args.rate, queue, _emit)

    def shutdown() -> None:
        factory.report_open()
        _emit({"event": "exit", "cpu": _cpu() - cpu0})

    reactor.addSystemEventTrigger("before", "shutdown", shutdown)
    listening = await TCP4ServerEndpoint(reactor, args.listen,
                                         interface="127.0.0.1").listen(factory)
    _emit({"port": listening.getHost().port, "limit": factory.limit})
    await Deferred()  # until SIGTERM or SIGINT


def main(argv: list[str]) -> None:
    from twisted.internet.defer import ensureDeferred
    from twisted.internet.task import react

    args = parse_args(argv)
    react(lambda reactor: ensureDeferred(_run(reactor, args)))


if __name__ == "__main__":
    main(sys.argv[1:])

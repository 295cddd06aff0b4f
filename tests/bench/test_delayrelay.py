# -*- test-case-name: tests.bench.test_delayrelay -*-
"""
Tests for L{bench._delayrelay}, the latency benchmark's emulated link: on a
L{Clock}, so delays are exact and nothing depends on the machine's speed.
"""

from __future__ import annotations

import random
from typing import Any

from twisted.internet.defer import succeed
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase

from bench._delayrelay import DelayLine, DelayRelayFactory, parse_rate


class _Source:
    """A source transport that records whether it is paused."""

    def __init__(self) -> None:
        self.paused = False
        self.pauses = 0

    def pauseProducing(self) -> None:
        self.paused = True
        self.pauses += 1

    def resumeProducing(self) -> None:
        self.paused = False

    def stopProducing(self) -> None:
        pass


class _Sink:
    """Collects what a line delivers, with the clock time of each release."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.releases: list[tuple[float, bytes]] = []

    def __call__(self, data: list[bytes]) -> None:
        self.releases.append((self.clock.seconds(), b"".join(data)))

    @property
    def data(self) -> bytes:
        return b"".join(d for _, d in self.releases)


def _line(delay: float = 0.025, rate: float = 1e6, limit: int = 50_000,
          ) -> tuple[DelayLine, Clock, _Sink, _Source]:
    clock = Clock()
    sink, source = _Sink(clock), _Source()
    return DelayLine(clock, delay, rate, limit, sink, source), clock, sink, source


def _drain(clock: Clock, step: float = 0.001, until: float = 10.0) -> None:
    while clock.getDelayedCalls() and clock.seconds() < until:
        clock.advance(step)


class ParseRateTests(SynchronousTestCase):
    """L{parse_rate} reads bytes per second with decimal suffixes."""

    def test_suffixes(self) -> None:
        """C{100M} is 10^8 bytes/s, C{1.5G} 1.5 * 10^9, a bare number bytes/s."""
        self.assertEqual(parse_rate("100M"), 1e8)
        self.assertEqual(parse_rate("1.5G"), 1.5e9)
        self.assertEqual(parse_rate("250k"), 250e3)
        self.assertEqual(parse_rate("4096"), 4096.0)

    def test_bad(self) -> None:
        """Anything else, and zero, are refused."""
        for text in ("", "fast", "100Mbit", "0", "-5M"):
            self.assertRaises(ValueError, parse_rate, text)


class DelayLineTests(SynchronousTestCase):
    """One direction of the emulated link."""

    def test_intact_and_in_order(self) -> None:
        """Chunks pushed at irregular times come out whole, in their order."""
        line, clock, sink, _ = _line(limit=10**9)
        rng = random.Random(5)
        sent = []
        for _ in range(200):
            chunk = rng.randbytes(rng.randint(1, 3000))
            sent.append(chunk)
            line.receive(chunk)
            clock.advance(rng.choice([0.0, 0.0001, 0.003]))
        _drain(clock)
        self.assertEqual(sink.data, b"".join(sent))
        self.assertEqual(line.stats["bytes"], len(b"".join(sent)))

    def test_delay_at_least_configured(self) -> None:
        """
        Nothing comes out before the delay plus the chunk's serialisation
        at the cap; then the chunk does, and the line records a delay of at
        least the configured one.
        """
        line, clock, sink, _ = _line(delay=0.025, rate=1e6)
        line.receive(b"x" * 1000)  # 1 ms at 1 MB/s
        clock.advance(0.0259)
        self.assertEqual(sink.releases, [])
        clock.advance(0.0002)
        self.assertEqual(sink.data, b"x" * 1000)
        self.assertGreaterEqual(line.stats["min_delay"], 0.025)

    def test_rate_cap(self) -> None:
        """
        A burst is serialised at the cap: by any time t, at most
        rate * (t - delay) bytes have come out.
        """
        line, clock, sink, _ = _line(delay=0.01, rate=1e6, limit=10**9)
        for _ in range(10):
            line.receive(b"y" * 100_000)  # 0.1 s each at the cap
        _drain(clock)
        self.assertEqual(len(sink.data), 1_000_000)
        out = 0
        for t, data in sink.releases:
            out += len(data)
            self.assertLessEqual(out, 1e6 * (t - 0.01) + 1)
        self.assertLessEqual(abs(sink.releases[-1][0] - 1.01), 0.002)  # not slower either

    def test_source_paused_when_full(self) -> None:
        """
        The source is paused once the line holds its limit and resumed when
        it has drained below; the line never holds more than the limit plus
        the read that crossed it.
        """
        line, clock, sink, source = _line(rate=1e6, limit=50_000)
        pushed = 0
        while not source.paused:
            line.receive(b"z" * 8000)
            pushed += 8000
            self.assertLessEqual(line.held, 50_000 + 8000)
        self.assertGreaterEqual(line.held, 50_000)
        _drain(clock)
        self.assertFalse(source.paused)
        self.assertEqual(len(sink.data), pushed)
        self.assertLessEqual(line.stats["peak_held"], 50_000 + 8000)

    def test_sink_pause_holds_releases(self) -> None:
        """
        While the sink pauses the line nothing is released, so the line
        fills and pauses the source: no unbounded buffering anywhere; on
        resume, everything due comes out at once.
        """
        line, clock, sink, source = _line(rate=1e6, limit=20_000)
        line.pauseProducing()
        while not source.paused:
            line.receive(b"w" * 4000)
        clock.advance(1.0)
        self.assertEqual(sink.releases, [])
        self.assertLessEqual(line.held, 24_000)
        line.resumeProducing()
        self.assertEqual(len(sink.releases), 1)
        self.assertEqual(line.held, 0)
        self.assertFalse(source.paused)

    def test_end_travels_the_line(self) -> None:
        """The end of the stream is signalled after the last bytes, one delay later."""
        line, clock, sink, _ = _line(delay=0.025, rate=1e6)
        ended: list[float] = []
        line.receive(b"a" * 1000)
        line.finish(lambda: ended.append(clock.seconds()))
        line.receive(b"late")  # after the end: ignored
        clock.advance(0.0259)
        self.assertEqual(ended, [])
        clock.advance(0.001)
        self.assertEqual(sink.data, b"a" * 1000)
        self.assertEqual(len(ended), 1)

    def test_stop_drops(self) -> None:
        """After L{DelayLine.stop} (the sink is gone) nothing more comes out."""
        line, clock, sink, source = _line(limit=1000)
        line.receive(b"b" * 2000)
        self.assertTrue(source.paused)
        line.stop()
        self.assertFalse(source.paused)
        line.receive(b"c" * 10)
        _drain(clock)
        self.assertEqual(sink.releases, [])
        self.assertEqual(line.held, 0)


class _HalfCloseTransport(StringTransport):
    """A L{StringTransport} that records a half-close."""

    write_closed = False

    def loseWriteConnection(self) -> None:
        self.write_closed = True


class _Target:
    """An endpoint that connects at once to a L{_HalfCloseTransport}."""

    def __init__(self) -> None:
        self.protocol: Any = None

    def connect(self, factory: Any) -> Any:
        self.protocol = factory.buildProtocol(None)
        self.protocol.makeConnection(_HalfCloseTransport())
        return succeed(self.protocol)


class DelayRelayFactoryTests(SynchronousTestCase):
    """The relay wires an accepted client to the target through two lines."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.target = _Target()
        self.reports: list[dict[str, Any]] = []
        self.factory = DelayRelayFactory(self.clock, self.target, 0.025, 1e6, 10_000,
                                         self.reports.append)
        self.client = self.factory.buildProtocol(None)
        self.client_transport = _HalfCloseTransport()
        self.client.makeConnection(self.client_transport)
        self.server = self.target.protocol

    def test_limit(self) -> None:
        """Each line holds what it carries at full rate plus the queue."""
        self.assertEqual(self.factory.limit, 25_000 + 10_000)

    def test_both_directions_delayed(self) -> None:
        """Bytes each way arrive after the one-way delay, not before."""
        self.client.dataReceived(b"hello")
        self.server.dataReceived(b"welcome")
        self.clock.advance(0.0249)
        self.assertEqual(self.server.transport.value(), b"")
        self.assertEqual(self.client_transport.value(), b"")
        self.clock.advance(0.001)
        self.assertEqual(self.server.transport.value(), b"hello")
        self.assertEqual(self.client_transport.value(), b"welcome")

    def test_half_close_then_report(self) -> None:
        """
        The client's end of stream reaches the server after its bytes; the
        server's answer and its own end come back; when both sides are gone
        the relay reports the connection once.
        """
        self.client.dataReceived(b"data")
        self.client.readConnectionLost()
        _drain(self.clock)
        self.assertEqual(self.server.transport.value(), b"data")
        self.assertTrue(self.server.transport.write_closed)
        self.server.dataReceived(b"done")
        self.server.readConnectionLost()
        _drain(self.clock)
        self.assertEqual(self.client_transport.value(), b"done")
        self.assertTrue(self.client_transport.disconnecting)
        self.assertTrue(self.server.transport.disconnecting)
        self.client.connectionLost(None)
        self.server.connectionLost(None)
        [report] = self.reports
        self.assertEqual((report["up"]["bytes"], report["down"]["bytes"]), (4, 4))
        self.assertFalse(report["open"])

# -*- test-case-name: tests.test_logs.PeerLogLimiterTests,tests.server.test_faults -*-
"""
Logging what peers do wrong at a bounded rate: L{PeerLogLimiter} lets the
first few such events of each peer in an interval be logged in full, counts
the rest, and logs one summary line per peer when the interval ends.  A
peer sending garbage as fast as it can costs a few log lines a minute, not
a line per frame.
"""

from __future__ import annotations

import collections

from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

#: Seconds per interval.
INTERVAL = 60.0
#: Events of one peer logged in full per interval.
BURST = 5
#: Events of all peers together logged in full per interval.
TOTAL_BURST = 100
#: Peers with a summary line of their own per interval; the others share one.
MAX_PEERS = 1000


class PeerLogLimiter:
    """
    How many of the events a peer causes (refused handshakes, malformed or
    unexpected frames, refused requests, connections closed before their
    handshake) are logged one by one.  Owned by a server's protocol factory
    (L{imgresume.server.UploadServerFactory}) and by its PROXY-protocol
    wrapper; their connections ask L{allow} before logging such an event.

    In each C{interval}, the first C{burst} events of a peer (and at most
    C{total_burst} of all peers) are logged in full; the others are counted
    by kind, and L{flush} (called every C{interval} once L{start}ed, and by
    L{stop}) logs one line per peer with the counts::

        peer 192.0.2.7: 1,532 more in the last 60 s, not logged one by one:
        1,500 MALFORMED_FRAME, 32 closed before the handshake

    (C{interval} seconds, C{peer}, C{count}, C{kinds} are its fields.)
    """

    def __init__(
        self,
        log: Logger,
        clock: IReactorTime,
        interval: float = INTERVAL,
        burst: int = BURST,
        total_burst: int = TOTAL_BURST,
        max_peers: int = MAX_PEERS,
    ) -> None:
        self._log = log
        self.interval = interval
        self.burst = burst
        self.total_burst = total_burst
        self.max_peers = max_peers
        self._logged: dict[str, int] = {}
        self._total = 0
        self._counted: dict[str, collections.Counter[str]] = {}
        self._loop = LoopingCall(self.flush)
        self._loop.clock = clock

    def allow(self, peer: str, kind: str) -> bool:
        """
        Whether to log an event of kind C{kind} (an error code, or a few
        words) caused by C{peer} (an address without the port) in full now.
        If not, it is counted for the peer's summary line.
        """
        logged = self._logged.get(peer)
        if logged is None:
            # A peer new in this interval; past max_peers, only summarised.
            logged = 0 if len(self._logged) < self.max_peers else self.burst
        if logged < self.burst and self._total < self.total_burst:
            self._logged[peer] = logged + 1
            self._total += 1
            return True
        if peer not in self._counted and len(self._counted) >= self.max_peers:
            peer = "(other peers)"
        self._counted.setdefault(peer, collections.Counter())[kind] += 1
        return False

    def flush(self) -> None:
        """Log the summary line of every peer with events not logged; start a new interval."""
        counted, self._counted = self._counted, {}
        self._logged.clear()
        self._total = 0
        for peer, kinds in counted.items():
            count = sum(kinds.values())
            self._log.warn(
                "peer {peer}: {count:,} more in the last {interval:g} s, not logged "
                "one by one: {kinds}",
                peer=peer, count=count, interval=self.interval,
                kinds=", ".join(f"{n:,} {kind}" for kind, n in kinds.most_common()),
            )

    def start(self) -> None:
        """Flush every C{interval} seconds."""
        if not self._loop.running:
            self._loop.start(self.interval, now=False)

    def stop(self) -> None:
        """Stop the timer, logging the summaries owed."""
        if self._loop.running:
            self._loop.stop()
        self.flush()

# -*- test-case-name: tests.client.test_session -*-
"""
The local file's SHA-256 for one upload (L{Digest}): known, or computed in
a thread beside the transfer.  Used by L{imgresume.client._session}.
"""

from __future__ import annotations

from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure

from imgresume.client._source import HashStopped, LocalFile, SourceChanged


class Digest:
    """
    The local file's SHA-256 for one upload: known (from the journal, or
    hashed before UPLOAD), or being computed in the background while the
    packets go out (an upload whose digest goes in FINISH).  L{wait} may be
    called by each attempt in turn.
    """

    log = Logger()

    def __init__(self, source: LocalFile) -> None:
        self._source = source
        self.value: bytes | None = None
        self._running: Deferred[bytes] | None = None
        self._stopping = False
        self._waiters: list[Deferred[bytes]] = []

    def start(self) -> None:
        """Start hashing in the background, unless known or under way."""
        if self.value is not None or self._running is not None:
            return
        self._running = self._source.sha256(stopped=lambda: self._stopping)
        self._running.addCallbacks(self._hashed, self._failed)

    def wait(self) -> Deferred[bytes]:
        """The digest, once known (starting the hash if need be)."""
        if self.value is not None:
            return succeed(self.value)
        d: Deferred[bytes] = Deferred()
        self._waiters.append(d)
        self.start()
        return d

    def stop(self) -> Deferred[None]:
        """Stop a running hash; fires once its thread let go of the file."""
        self._stopping = True
        if self._running is None:
            return succeed(None)
        done: Deferred[None] = Deferred()
        self._running.addBoth(lambda _: done.callback(None))
        return done

    def _hashed(self, value: bytes) -> None:
        self._running = None
        self.value = value
        waiters, self._waiters = self._waiters, []
        for d in waiters:
            d.callback(value)

    def _failed(self, failure: Failure) -> None:
        self._running = None
        waiters, self._waiters = self._waiters, []
        if not waiters and not failure.check(HashStopped, SourceChanged):
            self.log.failure("hashing the local file failed", failure)
        for d in waiters:
            d.errback(failure)

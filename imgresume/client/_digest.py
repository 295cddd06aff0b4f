# -*- test-case-name: tests.client.test_session -*-
"""
The local file's digest for one upload (L{Digest}): known, or computed in
a thread beside the transfer, in the algorithm the connection negotiated.
Used by L{imgresume.client._session}.
"""

from __future__ import annotations

from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure

from imgresume import integrity
from imgresume.client._source import HashStopped, LocalFile, SourceChanged


class Digest:
    """
    The local file's digest for one upload: known (from the journal, or
    hashed before UPLOAD), or being computed in the background while the
    packets go out (an upload whose digest goes in FINISH).  L{wait} may be
    called by each attempt in turn.
    """

    log = Logger()

    def __init__(self, source: LocalFile) -> None:
        self._source = source
        self.value: bytes | None = None
        #: The algorithm of C{value} and of the hash under way (a name of
        #: L{imgresume.integrity.DIGESTS}), also for a value from the journal,
        #: whose entries name it; None for a value from a journal entry
        #: written before they did, which is taken to be in the algorithm
        #: of the upload (and never declared for a new one).
        self.algorithm: str | None = integrity.LEGACY_DIGEST
        self._running: Deferred[bytes] | None = None
        self._stopping = False
        self._waiters: list[Deferred[bytes]] = []
        #: Counts the hashes started; a dropped one's result is ignored.
        self._generation = 0
        #: Hashes dropped by L{use}, until their threads let go of the file.
        self._dropped: list[Deferred[bytes]] = []

    def use(self, algorithm: str) -> None:
        """
        Have the digest in C{algorithm} (the connection's): a value or a
        hash under way in another one is dropped (that hash is stopped), so
        that the digest is computed again in C{algorithm}.
        """
        if self.algorithm in (None, algorithm):
            self.algorithm = algorithm
            return
        self.algorithm, self.value = algorithm, None
        if self._running is not None:
            # Its result, in the other algorithm, is ignored; it stops soon.
            dropped, self._running = self._running, None
            self._generation += 1
            self._dropped.append(dropped)
            dropped.addBoth(lambda _: self._dropped.remove(dropped))
            if self._waiters:
                self.start()

    def start(self) -> None:
        """Start hashing in the background, unless known or under way."""
        if self.value is not None or self._running is not None:
            return
        algorithm = self.algorithm or integrity.LEGACY_DIGEST
        self._generation += 1
        generation = self._generation
        running = self._source.sha256(
            stopped=lambda: self._stopping or self._generation != generation,
            algorithm=algorithm)
        self._running = running
        running.addCallbacks(self._hashed, self._failed,
                             callbackArgs=(generation,), errbackArgs=(generation,))

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
        hashes = [d for d in [self._running, *self._dropped] if d is not None]
        if not hashes:
            return succeed(None)
        done: Deferred[None] = Deferred()
        DeferredList(hashes, consumeErrors=True).addBoth(lambda _: done.callback(None))
        return done

    def _hashed(self, value: bytes, generation: int) -> None:
        if generation != self._generation:
            return  # dropped by use(): another algorithm
        self._running = None
        self.value = value
        waiters, self._waiters = self._waiters, []
        for d in waiters:
            d.callback(value)

    def _failed(self, failure: Failure, generation: int) -> None:
        if generation != self._generation:
            return None  # dropped by use(); stopped, or failed: no matter
        self._running = None
        waiters, self._waiters = self._waiters, []
        if not waiters and not failure.check(HashStopped, SourceChanged):
            self.log.failure("hashing the local file failed", failure)
        for d in waiters:
            d.errback(failure)
        return None

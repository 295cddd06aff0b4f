# -*- test-case-name: tests.client.test_journal -*-
"""
The uploader's asynchronous front of a L{Journal}: lookups and changes run
off the reactor thread, and changes are written in groups, one write at a
time, so that a batch of many small files costs a few journal writes a
second rather than two per file (and, with appended records, a few flushes
rather than one per record).
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.python.failure import Failure

from imgresume.client._journal import Journal, journal_entry
from imgresume.client._source import Runner


class JournalQueue:
    """
    Changes to a L{Journal}, grouped.  Used by L{imgresume.client.Uploader}
    (one per uploader, shared by its sessions).

    A change is queued at once and visible to L{lookup} at once; while one
    write runs, later changes gather and go out together in the next.  The
    Deferred a change returns fires once it is written, and flushed to disk
    if the group holds a record that needs it (an upload id: see
    L{imgresume.client._journal}), or fails with the write's error.
    """

    def __init__(self, journal: Journal, run: Runner) -> None:
        self.journal = journal
        self._run = run
        self._pending: dict[str, dict[str, Any] | None] = {}
        self._waiting: list[Deferred[None]] = []
        self._writing: dict[str, dict[str, Any] | None] | None = None
        self._flush_waiters: list[Deferred[None]] = []

    def lookup(self, key: str) -> Deferred[dict[str, Any] | None]:
        """The entry for C{key}, counting changes not yet written."""
        for changes in (self._pending, self._writing or {}):
            if key in changes:
                entry = changes[key]
                return succeed(dict(entry) if entry is not None else None)
        return self._run(self.journal.lookup, key)

    def remember(self, key: str, upload_id: str, sha256: str | None,
                 digest: str | None = None) -> Deferred[None]:
        """
        C{upload_id} holds the residual of C{key}'s file (whose digest, in
        the upload's algorithm C{digest}, is None while it is still being
        hashed, for an upload whose digest goes at the end).
        """
        return self._change(key, journal_entry(upload_id, sha256, digest=digest))

    def complete(self, key: str, upload_id: str, sha256: str,
                 digest: str | None = None) -> Deferred[None]:
        """
        C{upload_id}, C{key}'s file, is complete and verified on the server;
        C{sha256} is its digest in C{digest}.
        """
        return self._change(key, journal_entry(upload_id, sha256, complete=True, digest=digest))

    def forget(self, key: str) -> Deferred[None]:
        """Drop C{key}'s entry."""
        return self._change(key, None)

    def flushed(self) -> Deferred[None]:
        """
        Fires once every change queued so far is written (or its write
        failed): what an interrupted uploader waits for before it reports.
        """
        if self._writing is None and not self._pending:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._flush_waiters.append(d)
        return d

    def _change(self, key: str, entry: dict[str, Any] | None) -> Deferred[None]:
        self._pending[key] = entry
        done: Deferred[None] = Deferred()
        self._waiting.append(done)
        self._write_next()
        return done

    def _write_next(self) -> None:
        if self._writing is not None:
            return
        if not self._pending:
            flushed, self._flush_waiters = self._flush_waiters, []
            for d in flushed:
                d.callback(None)
            return
        changes, self._pending = self._pending, {}
        waiting, self._waiting = self._waiting, []
        self._writing = changes

        def written(result: Any) -> None:
            self._writing = None
            for d in waiting:
                if isinstance(result, Failure):
                    d.errback(result)
                else:
                    d.callback(None)
            self._write_next()

        self._run(self.journal.update, changes).addBoth(written)

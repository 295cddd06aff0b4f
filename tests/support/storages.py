"""
Storage wrappers for tests of the server adapter: L{SlowStorage} holds every
write and completion of its writers until the test lets it finish.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred


class SlowStorage:
    """Wraps a storage so each writer call waits until the test fires it."""

    def __init__(self, storage: Any) -> None:
        self.storage = storage
        self.pending: list[Deferred] = []
        self.batches: list[list[int]] = []
        self.released = 0

    def create(self, request):
        return self.storage.create(request).addCallback(SlowWriter, self)

    def resume(self, upload_id):
        return self.storage.resume(upload_id).addCallback(SlowWriter, self)

    def incomplete_for(self, client_id, verify=False):
        return self.storage.incomplete_for(client_id, verify)


class SlowWriter:
    """A writer of L{SlowStorage}: its writes and completion wait in C{owner.pending}."""

    def __init__(self, writer: Any, owner: SlowStorage) -> None:
        self.writer, self.owner = writer, owner
        self.info, self.tail = writer.info, writer.tail

    @property
    def offset(self) -> int:
        return self.writer.offset

    def _later(self, result: Deferred) -> Deferred:
        gate: Deferred = Deferred()
        self.owner.pending.append(gate)
        return gate.addCallback(lambda _: result)

    def write_batch(self, chunks):
        self.owner.batches.append([chunk.offset for chunk in chunks])
        return self._later(self.writer.write_batch(chunks))

    def complete(self, sha256=None):
        return self._later(self.writer.complete(sha256))

    def release(self):
        self.owner.released += 1
        return self.writer.release()

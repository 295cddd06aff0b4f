"""
The client's PUT refused for now: a server answering a PUT with a
retryable error of command scope (UPLOAD_BUSY while another server holds
the request's file, STORAGE_ERROR for a repeat that finds it written
moments ago) is sent the same PUT again after its retry hint, and the file
is stored once.  L{Uploader} against a real server on 127.0.0.1 in this
process (the server side: C{tests.server.test_put}).
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred, fail

from imgresume.errors import StorageError, UploadBusy
from imgresume.protocol import ServerLimits
from imgresume.storage.memory import MemoryStorage
from tests.support.servers import ServerTestCase, endpoint_of

PUT_LIMITS = ServerLimits(max_payload=1 << 20, chunk_size=64 * 1024, max_put=256 * 1024)


class RefusingStorage:
    """A MemoryStorage whose store_whole fails with C{refusals} first, in order."""

    def __init__(self, *refusals: Exception) -> None:
        self.storage = MemoryStorage()
        self.refusals = list(refusals)
        self.wholes: list[Any] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self.storage, name)

    def store_whole(self, request: Any) -> Deferred[Any]:
        self.wholes.append(request)
        if self.refusals:
            return fail(self.refusals.pop(0))
        return self.storage.store_whole(request)


class PutRetryTests(ServerTestCase):
    """A PUT refused for now is sent again."""

    async def test_busy_then_storage_error_retried(self) -> None:
        """
        UPLOAD_BUSY, then a retryable STORAGE_ERROR: the same PUT (the same
        upload id) goes a third time and is stored, once.
        """
        storage = RefusingStorage(UploadBusy("being stored", retry_after=0.05),
                                  StorageError("written moments ago; retry", retry_after=0.05))
        _, listening = self.start_server(storage, limits=PUT_LIMITS)
        path, content = self.local_file(10_000)
        result = await self.uploader(endpoint_of(listening)).upload(path)
        self.assertEqual(result.attempts, 3)
        self.assertEqual([w.upload_id for w in storage.wholes], [result.upload_id] * 3)
        self.assertEqual(list(storage.files), ["complete/scan.tif"])
        self.assertEqual(storage.read_completed(result.path), content)

    async def test_retry_hint_waited(self) -> None:
        """The PUT goes again no sooner than the server's retry hint."""
        storage = RefusingStorage(StorageError("written moments ago; retry", retry_after=0.5))
        _, listening = self.start_server(storage, limits=PUT_LIMITS)
        path, _ = self.local_file(10_000)
        result = await self.uploader(endpoint_of(listening)).upload(path)
        self.assertEqual(result.attempts, 2)
        self.assertGreaterEqual(result.seconds, 0.5)

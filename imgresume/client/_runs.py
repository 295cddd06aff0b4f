# -*- test-case-name: tests.client.test_session,tests.client.test_put -*-
"""
One file's upload as the session runs it: what the session needs from its
uploader (L{SessionUploader}), the file's turn on the session's connection
(L{Turn}), its bookkeeping across attempts (L{FileRun}), and the
progress an attempt reports.  Used by L{imgresume.client._session} and
L{imgresume.client._put}.
"""

from __future__ import annotations

from typing import Any, Callable, Protocol

import attrs
from twisted.internet.defer import Deferred, DeferredLock
from twisted.internet.interfaces import IProtocol

from imgresume.client._attempt import UploadAttempt
from imgresume.client._journal_queue import JournalQueue
from imgresume.client._results import Progress, UploadFailed, UploadResult
from imgresume.client._source import Runner
from imgresume.protocol import Upload


class SessionUploader(Protocol):
    """
    What an L{UploadSession} needs from the uploader that made it (an
    L{imgresume.client.Uploader}): its settings, its journal writer, its
    backoff and a way to connect.
    """

    reactor: Any
    client_id: str
    key: bytes | None
    endpoint_text: str
    max_attempts: int
    stall_timeout: float
    window: int
    chunk_size: int | None
    #: The largest file sent whole in one PUT, if the server offers it (0: never).
    put_max: int
    run: Runner
    journal_queue: JournalQueue | None
    if_exists: str
    #: The whole-file digest to ask servers for (L{imgresume.integrity}).
    digest: str
    #: Whether L{imgresume.client.Uploader.interrupt} was called, and the
    #: signal it named.
    interrupted: bool
    interrupted_by: int | None

    def backoff(self, failures: int, retry_after: float = 0.0) -> float:
        """Seconds to wait after C{failures} consecutive failures."""

    def track(self, upload: Deferred[UploadResult]) -> Deferred[UploadResult]:
        """Count C{upload} as under way (interrupt cancels it) until it fires."""

    async def connect(self, protocol: IProtocol) -> None:
        """Connect C{protocol} through the endpoint, or fail."""


class Turn:
    """
    One upload's turn on its session's connection: taken before it uses
    the connection, given as soon as the next upload may use it (for a
    PUT, once sent), taken again for a retry.  Made by the session for each
    file.
    """

    def __init__(self, lock: DeferredLock) -> None:
        self._lock = lock
        self._held = False

    async def take(self) -> None:
        if not self._held:
            await self._lock.acquire()
            self._held = True

    def give(self) -> None:
        if self._held:
            self._held = False
            self._lock.release()


@attrs.define
class FileRun:
    """
    Bookkeeping of one file's upload across attempts: made by the session
    for each file, updated by its attempts (UPLOAD/RESUME, or PUT).
    """

    upload_id: str | None = None
    from_journal: bool = False
    #: The offset the server last acknowledged in this run (None: no answer yet).
    acknowledged: int | None = None
    #: What was asked for: the UPLOAD of the open upload (its digest, or
    #: None for one sent at the end); None until chosen, and again for a
    #: fresh upload.
    request: Upload | None = None
    digest_stale: bool = False
    #: The digest came from the journal, which does not say its algorithm,
    #: and no server has accepted it yet.
    digest_unconfirmed: bool = False
    created_here: bool = False
    unknown_retries: int = 0
    attempts: int = 0
    failures: int = 0
    bytes_sent: int = 0
    resumed_at: list[int] = attrs.Factory(list)
    servers: list[str] = attrs.Factory(list)

    def record(self, attempt: UploadAttempt, resumed: bool) -> None:
        """Add up one attempt; C{resumed}: it continued an existing upload."""
        stats = attempt.stats
        self.bytes_sent += stats.bytes_sent
        if stats.server_id:
            self.servers.append(stats.server_id)
        if stats.accepted_offset is not None:
            self.acknowledged = stats.acked
            if resumed:
                self.resumed_at.append(stats.accepted_offset)

    def failed(self, message: str, cause: BaseException | None = None) -> UploadFailed:
        """L{UploadFailed} with what this run did: the upload, the bytes held and sent."""
        return UploadFailed(message, cause, upload_id=self.upload_id,
                            acknowledged=self.acknowledged, bytes_sent=self.bytes_sent)


def uploading_progress(
    progress: Callable[[Progress], None], name: str, size: int, attempt: UploadAttempt
) -> Callable[[int], None]:
    """The attempt's progress callback: what the server acked, as "uploading" reports."""
    return lambda acked: progress(
        Progress(name, "uploading", acked, size, attempt.stats.server_id))

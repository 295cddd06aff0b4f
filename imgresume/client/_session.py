# -*- test-case-name: tests.client.test_session,tests.client.test_interrupt -*-
"""
Uploads one after another over one connection: the per-file loop (hash,
journal, attempts, backoff and its retry reports, the verdict, an
interruption) and the connection it keeps open between files, so that a
batch of small files costs one handshake instead of one per file.
"""

from __future__ import annotations

import os
import signal
import time
from typing import Any, Callable, Mapping, Protocol

import attrs
from twisted.internet.defer import CancelledError, Deferred, DeferredLock, fail, succeed
from twisted.internet.error import DNSLookupError
from twisted.internet.interfaces import IProtocol
from twisted.internet.task import deferLater
from twisted.logger import Logger

from imgresume.client._attempt import ResidualMismatch, UploadAttempt
from imgresume.client._connection import UploadConnection
from imgresume.client._describe import describe, retry_note
from imgresume.client._digest import Digest
from imgresume.client._journal import journal_key
from imgresume.client._journal_queue import JournalQueue
from imgresume.client._results import (
    IfExistsNotOffered,
    Progress,
    UploadFailed,
    UploadInterrupted,
    UploadResult,
)
from imgresume.client._source import LocalFile, Runner, SourceChanged
from imgresume.errors import (
    DigestAlgorithmMismatch,
    DigestMismatch,
    ImgresumeError,
    UnknownUpload,
)
from imgresume.names import IF_EXISTS_KEY
from imgresume.protocol import SKIPPED_UPLOAD_ID, Upload

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


class UploadSession:
    """
    A sequence of uploads over one connection.  Made by
    L{imgresume.client.Uploader.session}; the caller calls L{upload} for
    each file and L{close} at the end (or uses C{async with}).

    After a file completes, the next one starts on the same connection
    without a new handshake; so does the next file after one the server
    refused outright (an invalid name, say).  A break, a stall or a
    retryable error closes the connection, and the next try reconnects
    through the endpoint (the balancer) with backoff, resuming from the
    offset the server proves, exactly as a single upload does.

    Uploads on one session run one at a time, in call order.  For several
    at once, use several sessions (L{imgresume.client.Uploader.upload_batch}
    does).
    """

    log = Logger()

    def __init__(self, uploader: SessionUploader) -> None:
        self._uploader = uploader
        self._connection: UploadConnection | None = None
        self._lock = DeferredLock()
        self._closed = False
        #: Connections this session opened, each with its handshake.
        self.connections = 0

    def upload(
        self,
        path: str,
        name: str | None = None,
        *,
        metadata: Mapping[str, str] | None = None,
        restart: bool = False,
        progress: Callable[[Progress], None] | None = None,
    ) -> Deferred[UploadResult]:
        """
        Upload the file at C{path} as C{name} (default: its base name),
        after the uploads already queued on this session.  The arguments
        are those of L{imgresume.client.Uploader.upload}.

        @return: Deferred firing with an L{UploadResult} once the server
            has verified the stored file's SHA-256, or failing with
            L{UploadFailed}.
        """
        if self._closed:
            return fail(RuntimeError("this upload session is closed"))

        def start() -> Deferred[UploadResult]:
            if self._uploader.interrupted:
                return fail(self._interruption(name or os.path.basename(path), _Run()))
            return self._uploader.track(Deferred.fromCoroutine(self._upload(
                path, name, dict(metadata or {}), restart, progress or (lambda p: None)
            )))

        return self._lock.run(start)

    def close(self) -> Deferred[None]:
        """
        Close the session once the uploads queued on it are over; the
        Deferred fires when its connection is closed.  Further L{upload}
        calls fail.
        """
        self._closed = True
        return self._lock.run(self._close_connection)

    async def __aenter__(self) -> "UploadSession":
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    # One file ------------------------------------------------------------

    async def _upload(
        self,
        path: str,
        name: str | None,
        metadata: dict[str, str],
        restart: bool,
        progress: Callable[[Progress], None],
    ) -> UploadResult:
        name = name or os.path.basename(path)
        started = time.monotonic()
        state = _Run()
        try:
            try:
                source = await LocalFile.open(path, self._uploader.run)
            except OSError as e:
                raise UploadFailed(f"cannot read {path}: {e.strerror or e}", e)
            digest = Digest(source)
            try:
                return await self._upload_source(
                    source, digest, name, metadata, restart, progress, started, state)
            finally:
                await digest.stop()
                source.close()
        except CancelledError:
            raise self._interruption(name, state) from None

    def _interruption(self, name: str, state: "_Run") -> UploadInterrupted:
        """The exception for an upload stopped by L{Uploader.interrupt}."""
        number = self._uploader.interrupted_by
        how = f" by {signal.Signals(number).name}" if number else ""
        if state.acknowledged is None:
            held = "the server acknowledged nothing in this run"
        else:
            held = f"the server acknowledged {state.acknowledged} bytes"
        return UploadInterrupted(
            f"{name}: interrupted{how}; {held}", signal=number, upload_id=state.upload_id,
            acknowledged=state.acknowledged, bytes_sent=state.bytes_sent)

    async def _upload_source(
        self,
        source: LocalFile,
        digest: Digest,
        name: str,
        metadata: dict[str, str],
        restart: bool,
        progress: Callable[[Progress], None],
        started: float,
        state: "_Run",
    ) -> UploadResult:
        up = self._uploader
        journal = up.journal_queue
        key = journal_key(source.fingerprint, up.endpoint_text, name)
        entry = None
        if journal is not None and not restart:
            entry = await journal.lookup(key)
        reactor = up.reactor

        async def hash_file() -> bytes:
            progress(Progress(name, "hashing", 0, source.size))
            return await source.sha256(
                lambda done: reactor.callFromThread(
                    progress, Progress(name, "hashing", done, source.size)
                ),
                stopped=lambda: up.interrupted,  # the file is closed once interrupted
                algorithm=digest.algorithm or up.digest,
            )

        state.from_journal = entry is not None
        if entry is not None:
            state.upload_id = entry["upload_id"]
            if entry["sha256"] is not None:
                # In the upload's algorithm, which the journal does not say:
                # good for a RESUME the server accepts (it refuses one with
                # another algorithm), never declared for a fresh upload.
                digest.value, digest.algorithm = bytes.fromhex(entry["sha256"]), None
                state.digest_unconfirmed = True
            # The upload was opened with this digest, or to take it at the end.
            state.request = Upload(name, source.size, digest.value, metadata)
            self.log.info(
                "{what} {name} from the journal: upload {upload_id}",
                what="confirming" if entry.get("complete") else "resuming",
                name=name, upload_id=state.upload_id,
            )

        async def request_for(connection: UploadConnection) -> Upload:
            """What to ask for: the open upload's terms, or a new upload's."""
            digest.use(connection.machine.digest)
            if state.request is not None:
                return state.request
            policy = up.if_exists
            if not connection.machine.offers_if_exists(policy):
                raise UploadFailed(
                    f"{name}: server {connection.server_id} does not offer "
                    f"if-exists={policy} (it predates it); nothing was sent: upgrade "
                    "the servers, or let a clash be renamed (if-exists=rename)",
                    IfExistsNotOffered(policy))
            asked = {k: v for k, v in metadata.items() if k != IF_EXISTS_KEY}
            if policy != "rename":
                asked[IF_EXISTS_KEY] = policy
            # To skip, the server compares the digest before any byte is sent.
            if (digest.value is None and policy != "skip"
                    and connection.machine.late_digest_offered):
                # Hash while sending: the digest goes in FINISH at the end.
                digest.start()
                state.request = Upload(name, source.size, None, asked)
            else:
                if digest.value is None:
                    digest.value = await hash_file()
                state.request = Upload(name, source.size, digest.value, asked)
            return state.request

        def on_upload_id(new_id: str) -> Deferred[None] | None:
            # Accepted with the digest asked for: in this upload's algorithm.
            state.digest_unconfirmed = False
            if new_id != state.upload_id:
                state.created_here = True
            state.upload_id = new_id
            if journal is None:
                return None
            assert state.request is not None
            declared = state.request.sha256
            return journal.remember(
                key, new_id, None if declared is None else declared.hex()
            ).addErrback(lambda f: self.log.failure("could not write the journal", f))

        while True:
            if state.upload_id is None:
                state.request = None  # a fresh upload: its terms are chosen anew
                if state.digest_stale or state.digest_unconfirmed:
                    state.digest_stale = state.digest_unconfirmed = False
                    digest.value, digest.algorithm = None, up.digest
            resuming = state.upload_id is not None
            state.attempts += 1
            attempt = UploadAttempt(
                source, None, upload_id=state.upload_id, window=up.window,
                chunk_size=up.chunk_size, on_upload_id=on_upload_id, digest=digest.wait,
            )
            attempt.on_progress = _uploading(progress, name, source.size, attempt)
            try:
                if state.attempts > 1:
                    await source.check_unchanged()  # before a resume
                connection = await self._ready_connection()
                attempt.request = await request_for(connection)
                completed = await connection.run(attempt)
            except Exception as error:  # sorted by _after_failure
                state.record(attempt, resuming and not isinstance(error, ResidualMismatch))
                if isinstance(error, CancelledError):
                    raise  # interrupted: _upload says so
                # Giving up raises here; a connection the attempt left ready
                # then carries the next file.
                try:
                    delay = self._after_failure(state, attempt, error, name)
                except UploadFailed as failed:
                    if journal is not None and isinstance(failed.cause, DigestMismatch):
                        # The server holds bytes of another version of the
                        # file (rewritten between runs, its mtime set back):
                        # a rerun starts afresh instead of failing again.
                        await self._journal_written(journal.forget(key))
                    raise
                # A retry goes through the endpoint (the balancer) again.
                self._drop_connection()
                if delay:
                    progress(Progress(
                        name, "retrying", state.acknowledged or 0, source.size,
                        attempt.stats.server_id, note=retry_note(
                            error, up.endpoint_text, max(state.failures, 1),
                            max(up.max_attempts - 1, 1), delay)))
                    await deferLater(reactor, delay)
            else:
                state.record(attempt, resuming)
                break

        # A RESUME answered COMPLETED at once may leave a late digest unknown.
        sha256 = await digest.wait()
        if completed.sha256 != sha256 or completed.size != source.size:
            if journal is not None:
                await self._journal_written(journal.forget(key))
            raise state.failed(
                f"{name}: server reports {completed.size} bytes with SHA-256 "
                f"{completed.sha256.hex()}; the local file has {source.size} bytes "
                f"with {sha256.hex()}"
            )
        # COMPLETED for an UPLOAD: the server holds this file already.
        skipped = completed.upload_id == SKIPPED_UPLOAD_ID
        if journal is not None:
            await self._journal_written(journal.forget(key) if skipped else journal.complete(
                key, completed.upload_id, sha256.hex()))
        progress(Progress(name, "done", completed.size, completed.size, state.servers[-1],
                          completed.path))
        return UploadResult(
            name=name, upload_id="" if skipped else completed.upload_id,
            size=completed.size, sha256=completed.sha256.hex(), path=completed.path,
            digest=digest.algorithm or up.digest,
            resumed_at=state.resumed_at, bytes_sent=state.bytes_sent,
            attempts=state.attempts, servers=state.servers,
            seconds=round(time.monotonic() - started, 3),
            already_complete=(not skipped and state.bytes_sent == 0
                              and attempt.stats.accepted_offset is None),
            skipped=skipped,
        )

    async def _journal_written(self, written: Deferred[None]) -> None:
        """Wait for a journal write; a failure is logged (the upload stands)."""
        try:
            await written
        except CancelledError:
            pass  # interrupted: the write goes on, and Uploader.interrupt waits for it
        except Exception:
            self.log.failure("could not write the journal")

    def _after_failure(
        self, state: "_Run", attempt: UploadAttempt, error: Exception, name: str
    ) -> float:
        """
        Decide what a failed attempt means: raise L{UploadFailed} to give up,
        or return how long to wait before the next attempt.
        """
        if isinstance(error, UploadFailed):
            raise error  # a verdict already (the server lacks what was asked for)
        up = self._uploader
        stats = attempt.stats
        progressed = stats.accepted_offset is not None and stats.acked > stats.accepted_offset
        state.failures = 0 if progressed else state.failures + 1
        self.log.info(
            "attempt {attempt} for {name} via {server} ended: {error}",
            attempt=state.attempts, name=name, server=stats.server_id or "?",
            error=describe(error, up.endpoint_text),
        )
        if isinstance(error, SourceChanged):
            raise state.failed(f"{name}: source changed during upload: {error}", error)
        if isinstance(error, OSError) and not isinstance(error, DNSLookupError):
            # The local file, not the network: retrying cannot help.
            raise state.failed(f"{name}: cannot read the local file: {error}", error)
        if isinstance(error, (ResidualMismatch, DigestAlgorithmMismatch)):
            state.upload_id = None  # the residual is not ours: start afresh
            if state.from_journal:
                # The journal's SHA-256 went with a residual that turned out
                # not to be this file's: the file changed; hash it again.
                state.digest_stale = True
            state.from_journal = False
            return 0.0
        if isinstance(error, UnknownUpload):
            state.unknown_retries += 1
            if state.created_here and state.unknown_retries <= 3:
                # Created moments ago: another host's view of the shared
                # filesystem may lag behind.  Ask again before starting over.
                return up.backoff(state.unknown_retries)
            state.upload_id = None
            return 0.0
        if isinstance(error, ImgresumeError) and not error.retryable:
            raise state.failed(f"{name}: {error}", error)
        if state.failures >= up.max_attempts:
            raise state.failed(
                f"{name}: gave up after {state.failures} attempts without progress "
                f"(last: {describe(error, up.endpoint_text)}); running the same upload "
                "again resumes it",
                error,
            )
        return up.backoff(max(state.failures, 1), getattr(error, "retry_after", 0.0))

    # The connection --------------------------------------------------------

    async def _ready_connection(self) -> UploadConnection:
        """The connection the last file left ready, or a new one, welcomed."""
        connection = self._connection
        if connection is not None and connection.idle:
            return connection
        self._connection = None
        up = self._uploader
        connection = UploadConnection(
            up.reactor, client_id=up.client_id, key=up.key, stall_timeout=up.stall_timeout,
            digest=up.digest,
        )
        await up.connect(connection)
        self.connections += 1
        welcome = await connection.welcomed
        self.log.debug("connection {number} of the session: welcomed by {server}",
                       number=self.connections, server=welcome.server_id)
        self._connection = connection
        return connection

    def _drop_connection(self) -> None:
        connection, self._connection = self._connection, None
        if connection is not None:
            connection.close()

    def _close_connection(self) -> Deferred[None]:
        connection, self._connection = self._connection, None
        return connection.close() if connection is not None else succeed(None)


@attrs.define
class _Run:
    """Bookkeeping of one file's upload across attempts."""

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


def _uploading(
    progress: Callable[[Progress], None], name: str, size: int, attempt: UploadAttempt
) -> Callable[[int], None]:
    """The attempt's progress callback: what the server acked, as "uploading" reports."""
    return lambda acked: progress(
        Progress(name, "uploading", acked, size, attempt.stats.server_id))


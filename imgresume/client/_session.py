# -*- test-case-name: tests.client.test_session,tests.client.test_interrupt -*-
"""
Uploads one after another over one connection: the per-file loop (hash,
journal, attempts, backoff and its retry reports, the verdict, an
interruption) and the connection it keeps open between files, so that a
batch of small files costs one handshake instead of one per file.  A small
file goes whole in a PUT (L{imgresume.client._put}), the others by UPLOAD
or RESUME and DATA (L{imgresume.client._attempt}).
"""

from __future__ import annotations

import os
import signal
import time
from typing import Callable, Mapping

from twisted.internet.defer import CancelledError, Deferred, DeferredLock, fail, succeed
from twisted.internet.error import DNSLookupError
from twisted.internet.task import deferLater
from twisted.logger import Logger

from imgresume.client._attempt import ResidualMismatch, UploadAttempt
from imgresume.client._connection import UploadConnection
from imgresume.client._describe import describe, retry_note
from imgresume.client._digest import Digest
from imgresume.client._journal import entry_digest, journal_key
from imgresume.client._results import (
    IfExistsNotOffered,
    Progress,
    UploadFailed,
    UploadInterrupted,
    UploadResult,
)
from imgresume.client._put import PUTS_IN_FLIGHT, PutSender, put_entry_algorithm, takes_put
from imgresume.client._runs import FileRun, SessionUploader, Turn, uploading_progress
from imgresume.client._source import LocalFile, SourceChanged
from imgresume.errors import (
    DigestAlgorithmMismatch,
    DigestMismatch,
    ImgresumeError,
    UnknownUpload,
)
from imgresume.names import IF_EXISTS_KEY
from imgresume.protocol import SKIPPED_UPLOAD_ID, Upload


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

    Uploads on one session run one at a time, in call order, except small
    files sent whole in one PUT (to a server that offers it): once a PUT is
    sent, the next upload may start, so that up to L{PUTS_IN_FLIGHT} PUTs
    are in flight at once and answered in order.  For several connections,
    use several sessions (L{imgresume.client.Uploader.upload_batch} does).
    """

    log = Logger()

    def __init__(self, uploader: SessionUploader) -> None:
        self._uploader = uploader
        self._connection: UploadConnection | None = None
        self._lock = DeferredLock()
        self._closed = False
        #: The uploads under way (those of PUTs in flight included).
        self._under_way: set[Deferred[None]] = set()
        #: Connections this session opened, each with its handshake.
        self.connections = 0
        self._puts = PutSender(uploader, self._ready_connection, self._journal_written,
                               self._drop_connection)

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
        turn = Turn(self._lock)

        async def run() -> UploadResult:
            await turn.take()
            try:
                if self._uploader.interrupted:
                    raise self._interruption(name or os.path.basename(path), FileRun())
                return await self._uploader.track(Deferred.fromCoroutine(self._upload(
                    path, name, dict(metadata or {}), restart, progress or (lambda p: None),
                    turn)))
            finally:
                turn.give()

        settled: Deferred[None] = Deferred()
        self._under_way.add(settled)

        def done(result: object) -> object:
            self._under_way.discard(settled)
            settled.callback(None)
            return result

        return Deferred.fromCoroutine(run()).addBoth(done)

    def pipelines(self, size: int | None) -> bool:
        """
        Whether an upload of a file of C{size} bytes (None: not known) would
        go now as a PUT behind the ones in flight on this session's
        connection: the connection is open and takes PUTs of its size (a
        batch then starts it at once, see L{imgresume.client._batch}).
        """
        connection = self._connection
        if size is None or connection is None or not connection.open:
            return False
        return size <= self._uploader.put_max and takes_put(connection, size)

    def close(self) -> Deferred[None]:
        """
        Close the session once the uploads queued on it are over; the
        Deferred fires when its connection is closed.  Further L{upload}
        calls fail.
        """
        self._closed = True
        waits = list(self._under_way)

        async def close() -> None:
            for settled in waits:
                await settled
            await self._lock.run(self._close_connection)

        return Deferred.fromCoroutine(close())

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
        turn: Turn,
    ) -> UploadResult:
        name = name or os.path.basename(path)
        started = time.monotonic()
        state = FileRun()
        try:
            try:
                source = await LocalFile.open(path, self._uploader.run)
            except OSError as e:
                raise UploadFailed(f"cannot read {path}: {e.strerror or e}", e)
            digest = Digest(source)
            try:
                return await self._upload_source(
                    source, digest, name, metadata, restart, progress, started, state, turn)
            finally:
                await digest.stop()
                source.close()
        except CancelledError:
            raise self._interruption(name, state) from None

    def _interruption(self, name: str, state: FileRun) -> UploadInterrupted:
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
        state: FileRun,
        turn: Turn,
    ) -> UploadResult:
        up = self._uploader
        journal = up.journal_queue
        key = journal_key(source.fingerprint, up.endpoint_text, name)
        entry = None
        if journal is not None and not restart:
            entry = await journal.lookup(key)
        reactor = up.reactor
        # A fresh small file goes whole in a PUT, if the server takes it.
        # A completed PUT in the journal is confirmed by the same PUT: its
        # upload id names the stored file (there is no RESUME of a PUT).
        confirming_put = put_entry_algorithm(entry, name) if entry is not None else None
        put_first = (entry is None or confirming_put is not None) and \
            source.size <= up.put_max

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
                # In the algorithm the entry names (dropped by Digest.use on
                # a connection with another); one that names none is good
                # for a RESUME the server accepts (it refuses one with
                # another algorithm), never declared for a fresh upload.
                digest.value = bytes.fromhex(entry["sha256"])
                digest.algorithm = entry_digest(entry)
                state.digest_unconfirmed = digest.algorithm is None
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
                key, new_id, None if declared is None else declared.hex(), digest.algorithm
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
            attempt.on_progress = uploading_progress(progress, name, source.size, attempt)
            try:
                if state.attempts > 1:
                    await source.check_unchanged()  # before a resume
                connection = await self._ready_connection(puts=put_first)
                if put_first and takes_put(connection, source.size):
                    break  # to the PUT below
                put_first = False
                if not connection.idle:
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
        if put_first:
            state.attempts -= 1  # counted again by the PUT
            return await self._puts.send(source, name, metadata, progress, started, state,
                                         turn, key, confirming=confirming_put)

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
                key, completed.upload_id, sha256.hex(), digest.algorithm or up.digest))
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
        self, state: FileRun, attempt: UploadAttempt, error: Exception, name: str
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

    async def _ready_connection(self, puts: bool = False) -> UploadConnection:
        """
        The connection the last file left ready, or a new one, welcomed.
        For a PUT (C{puts}), once fewer than L{PUTS_IN_FLIGHT} are in flight
        on it; else once none is.
        """
        connection = self._connection
        if connection is not None:
            await connection.puts_below(PUTS_IN_FLIGHT if puts else 1)
        if connection is not None and (connection.open if puts else connection.idle):
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


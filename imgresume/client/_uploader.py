# -*- test-case-name: tests.test_client -*-
"""
The resumable uploader: connect, upload, and on any break reconnect with
exponential backoff and jitter and resume from the offset the server proves,
until the server confirms the file complete with the right SHA-256.
"""

from __future__ import annotations

import functools
import getpass
import random
import re
import socket
import time
from typing import Any, Callable, Mapping

import attrs
from twisted.internet.defer import CancelledError, Deferred, DeferredLock
from twisted.internet.endpoints import clientFromString, connectProtocol
from twisted.internet.error import ConnectError, ConnectingCancelledError
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.task import deferLater
from twisted.logger import Logger

from imgresume.client._attempt import AttemptFailed, ResidualMismatch, UploadAttempt
from imgresume.client._journal import Journal, default_journal_path, journal_key
from imgresume.client._source import LocalFile, Runner
from imgresume.errors import ImgresumeError, UnknownUpload
from imgresume.protocol import Upload


class UploadFailed(Exception):
    """
    The upload could not be completed; C{cause} is the last error.  The
    residual (if any) stays on the server and the journal, so running the
    same upload again resumes it.
    """

    def __init__(self, message: str, cause: BaseException | None = None) -> None:
        super().__init__(message)
        self.cause = cause


@attrs.frozen
class UploadResult:
    """A completed, verified upload.  Returned by L{Uploader.upload}."""

    name: str
    upload_id: str
    size: int
    sha256: str
    path: str
    resumed_at: list[int]
    bytes_sent: int
    attempts: int
    servers: list[str]
    seconds: float

    def to_json(self) -> dict[str, Any]:
        """The fields as a JSON-ready dict (what C{imgresume upload --json} prints)."""
        return attrs.asdict(self)


@attrs.frozen
class Progress:
    """A progress report: C{phase} is "hashing", "uploading" or "done"."""

    name: str
    phase: str
    done: int
    total: int
    server_id: str | None = None


def default_client_id() -> str:
    """C{user@host}, limited to the characters client ids allow."""
    try:
        user = getpass.getuser()
    except Exception:
        user = "user"
    return re.sub(r"[^A-Za-z0-9._@:+-]", "-", f"{user}@{socket.gethostname()}")[:128]


class Uploader:
    """
    Uploads local files to an imgresume server or balancer, resuming across
    connection breaks, server crashes and client restarts.  The library entry
    point: applications create one and call L{upload}; the CLI does the same.

    @param endpoint: a Twisted client endpoint string (C{tcp:host:port},
        C{ssl:...}, C{unix:path}) or an endpoint object.
    @param max_attempts: consecutive failed connections (without progress in
        between) before giving up.
    @param stall_timeout: seconds without any answer from the server after
        which the connection is abandoned and a new one made.
    @param key: this client's secret (from C{imgresume keys add}); when
        given, the client authenticates in every handshake and refuses a
        server that cannot prove it knows the key.
    @param journal: where upload ids of unfinished uploads are kept: a
        L{Journal}, a journal file's path, C{"default"} (see
        L{default_journal_path}) or None, which disables the journal.
    @param run: runs blocking file work off the reactor thread (default:
        the reactor's thread pool).
    """

    log = Logger()

    def __init__(
        self,
        endpoint: str | IStreamClientEndpoint,
        *,
        reactor: Any = None,
        client_id: str | None = None,
        key: bytes | None = None,
        journal: Journal | None | str = "default",
        max_attempts: int = 10,
        backoff_base: float = 0.25,
        backoff_max: float = 20.0,
        connect_timeout: float = 10.0,
        stall_timeout: float = 60.0,
        window: int = 8,
        chunk_size: int | None = None,
        run: Runner | None = None,
        rng: random.Random | None = None,
    ) -> None:
        if reactor is None:
            from twisted.internet import reactor as _reactor

            reactor = _reactor
        self.reactor = reactor
        self.endpoint_text = endpoint if isinstance(endpoint, str) else repr(endpoint)
        self.endpoint = clientFromString(reactor, endpoint) if isinstance(endpoint, str) else endpoint
        self.client_id = client_id or default_client_id()
        self.key = key
        if journal == "default":
            journal = Journal(default_journal_path())
        elif isinstance(journal, str):
            journal = Journal(journal)
        self.journal: Journal | None = journal  # type: ignore[assignment]
        self.max_attempts = max_attempts
        self.backoff_base = backoff_base
        self.backoff_max = backoff_max
        self.connect_timeout = connect_timeout
        self.stall_timeout = stall_timeout
        self.window = window
        self.chunk_size = chunk_size
        if run is None:
            from twisted.internet.threads import deferToThreadPool

            run = functools.partial(deferToThreadPool, reactor, reactor.getThreadPool())
        self.run = run
        self.rng = rng or random.Random()
        # Journal calls read-modify-write one file in worker threads: run
        # them one at a time, in order, or a forget() can overtake the
        # remember() it should undo.
        self._journal_lock = DeferredLock()

    def _journal_call(self, f: Callable[..., Any], *args: Any) -> Deferred[Any]:
        return self._journal_lock.run(self.run, f, *args)

    def backoff(self, failures: int, retry_after: float = 0.0) -> float:
        """Seconds to wait after C{failures} consecutive failures: exponential, jittered."""
        ceiling = min(self.backoff_max, self.backoff_base * (2 ** (failures - 1)))
        return max(retry_after, self.rng.uniform(ceiling / 2, ceiling))

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
        Upload the file at C{path} as C{name} (default: its base name).

        @param restart: ignore the journal and start a fresh upload.
        @return: Deferred firing with an L{UploadResult} once the server
            has verified the stored file's SHA-256, or failing with
            L{UploadFailed}.
        """
        return Deferred.fromCoroutine(
            self._upload(path, name, dict(metadata or {}), restart, progress or (lambda p: None))
        )

    async def _upload(
        self,
        path: str,
        name: str | None,
        metadata: dict[str, str],
        restart: bool,
        progress: Callable[[Progress], None],
    ) -> UploadResult:
        import os.path

        name = name or os.path.basename(path)
        started = time.monotonic()
        try:
            source = await LocalFile.open(path, self.run)
        except OSError as e:
            raise UploadFailed(f"cannot read {path}: {e.strerror or e}", e)
        try:
            return await self._upload_source(source, name, metadata, restart, progress, started)
        finally:
            source.close()

    async def _upload_source(self, source, name, metadata, restart, progress, started):
        key = journal_key(source.fingerprint, self.endpoint_text, name)
        entry = None
        if self.journal is not None and not restart:
            entry = await self._journal_call(self.journal.lookup, key)
        reactor = self.reactor

        async def hash_file() -> bytes:
            progress(Progress(name, "hashing", 0, source.size))
            return await source.sha256(
                lambda done: reactor.callFromThread(
                    progress, Progress(name, "hashing", done, source.size)
                )
            )

        if entry is not None:
            sha256 = bytes.fromhex(entry["sha256"])
            upload_id: str | None = entry["upload_id"]
            self.log.info("resuming {name} from the journal: upload {upload_id}",
                          name=name, upload_id=upload_id)
        else:
            upload_id = None
            sha256 = await hash_file()
        request = Upload(name, source.size, sha256, metadata)
        state = _Run(upload_id=upload_id, from_journal=entry is not None)

        def on_upload_id(new_id: str) -> None:
            if new_id != state.upload_id:
                state.created_here = True
            state.upload_id = new_id
            if self.journal is not None:
                self._journal_call(self.journal.remember, key, new_id, sha256.hex()).addErrback(
                    lambda f: self.log.failure("could not write the journal", f)
                )

        while True:
            if state.rehash:
                # The journal's SHA-256 went with a residual that turned out
                # not to be this file's: the file changed, so hash it again.
                state.rehash = False
                sha256 = await hash_file()
                request = Upload(name, source.size, sha256, metadata)
            resuming = state.upload_id is not None
            state.attempts += 1
            attempt = UploadAttempt(
                source, request, self.reactor,
                client_id=self.client_id, key=self.key, upload_id=state.upload_id,
                window=self.window,
                chunk_size=self.chunk_size, stall_timeout=self.stall_timeout,
                on_progress=lambda offset: progress(
                    Progress(name, "uploading", offset, source.size, attempt.stats.server_id)
                ),
                on_upload_id=on_upload_id,
            )
            try:
                await self._connect(attempt)
                completed = await attempt.result
            except Exception as error:  # sorted by _after_failure
                state.record(attempt, resuming and not isinstance(error, ResidualMismatch))
                delay = self._after_failure(state, attempt, error, name)
                if delay:
                    await deferLater(self.reactor, delay)
            else:
                state.record(attempt, resuming)
                break

        if self.journal is not None:
            await self._journal_call(self.journal.forget, key)
        if completed.sha256 != sha256 or completed.size != source.size:
            raise UploadFailed(
                f"{name}: server reports {completed.size} bytes with SHA-256 "
                f"{completed.sha256.hex()}; the local file has {source.size} bytes "
                f"with {sha256.hex()}"
            )
        progress(Progress(name, "done", completed.size, completed.size, state.servers[-1]))
        return UploadResult(
            name=name, upload_id=completed.upload_id, size=completed.size,
            sha256=completed.sha256.hex(), path=completed.path,
            resumed_at=state.resumed_at, bytes_sent=state.bytes_sent,
            attempts=state.attempts, servers=state.servers,
            seconds=round(time.monotonic() - started, 3),
        )

    def _after_failure(
        self, state: "_Run", attempt: UploadAttempt, error: Exception, name: str
    ) -> float:
        """
        Decide what a failed attempt means: raise L{UploadFailed} to give up,
        or return how long to wait before the next attempt.
        """
        stats = attempt.stats
        progressed = stats.accepted_offset is not None and stats.acked > stats.accepted_offset
        state.failures = 0 if progressed else state.failures + 1
        self.log.info(
            "attempt {attempt} for {name} via {server} ended: {error}",
            attempt=state.attempts, name=name, server=stats.server_id or "?",
            error=describe(error),
        )
        if isinstance(error, OSError):
            # The local file, not the network: retrying cannot help.
            raise UploadFailed(f"{name}: cannot read the local file: {error}", error)
        if isinstance(error, ResidualMismatch):
            state.upload_id = None  # the residual is not ours: start afresh
            state.rehash, state.from_journal = state.from_journal, False
            return 0.0
        if isinstance(error, UnknownUpload):
            state.unknown_retries += 1
            if state.created_here and state.unknown_retries <= 3:
                # Created moments ago: another host's view of the shared
                # filesystem may lag behind.  Ask again before starting over.
                return self.backoff(state.unknown_retries)
            state.upload_id = None
            return 0.0
        if isinstance(error, ImgresumeError) and not error.retryable:
            raise UploadFailed(f"{name}: {error}", error)
        if state.failures >= self.max_attempts:
            raise UploadFailed(
                f"{name}: gave up after {state.failures} attempts without progress "
                f"(last: {describe(error)}); running the same upload again resumes it",
                error,
            )
        return self.backoff(max(state.failures, 1), getattr(error, "retry_after", 0.0))

    def status(self, upload_ids: list[str]) -> Deferred[list[Any]]:
        """
        Ask the server (through the balancer) about uploads, on one
        connection: a list with, per id, the server's
        L{imgresume.protocol.UploadStatusFrame} or an
        L{imgresume.errors.UnknownUpload}.  No retries.
        """
        from imgresume.client._status import StatusQuery

        async def ask() -> list[Any]:
            query = StatusQuery(upload_ids, self.client_id, self.key)
            await self._connect(query)
            return await query.result

        return Deferred.fromCoroutine(ask())

    async def _connect(self, attempt: Any) -> None:
        d = connectProtocol(self.endpoint, attempt)
        timer = self.reactor.callLater(self.connect_timeout, d.cancel)
        try:
            await d
        except (CancelledError, ConnectingCancelledError):
            raise AttemptFailed(f"connecting took longer than {self.connect_timeout:g} s")
        finally:
            if timer.active():
                timer.cancel()


@attrs.define
class _Run:
    """Bookkeeping of one file's upload across attempts."""

    upload_id: str | None
    from_journal: bool
    rehash: bool = False
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
        if resumed and stats.accepted_offset is not None:
            self.resumed_at.append(stats.accepted_offset)


def describe(error: BaseException) -> str:
    """A one-line human description of why an attempt failed."""
    if isinstance(error, ConnectError):
        return f"cannot connect: {error}"
    return str(error) or type(error).__name__

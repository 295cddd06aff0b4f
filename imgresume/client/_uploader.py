# -*- test-case-name: tests.client.test_uploader,tests.client.test_interrupt -*-
"""
The resumable uploader: connect, upload, and on any break reconnect with
exponential backoff and jitter and resume from the offset the server proves,
until the server confirms the file complete with the right SHA-256.  One
file at a time (L{Uploader.upload}), several over one connection
(L{Uploader.session}), or a batch over several connections
(L{Uploader.upload_batch}).
"""

from __future__ import annotations

import functools
import getpass
import random
import re
import socket
from typing import Any, Callable, Iterable, Mapping

from twisted.internet.defer import CancelledError, Deferred, DeferredList, succeed
from twisted.internet.endpoints import clientFromString, connectProtocol
from twisted.internet.error import ConnectingCancelledError
from twisted.internet.interfaces import IProtocol, IReactorCore, IStreamClientEndpoint

from imgresume import integrity
from imgresume.client._attempt import AttemptFailed
from imgresume.client._batch import BatchItem, BatchResult, FileOutcome, run_batch
from imgresume.client._journal import Journal, default_journal_path
from imgresume.client._journal_queue import JournalQueue
from imgresume.client._plan import PlannedUpload, plan_uploads
from imgresume.client._results import Progress, UploadResult
from imgresume.client._session import UploadSession
from imgresume.client._source import Runner
from imgresume.names import IF_EXISTS_POLICIES


#: The default of C{put_max}: the largest file sent whole in one PUT.
PUT_MAX = 4 * 1024 * 1024


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
    point: applications create one and call L{upload}, L{session} or
    L{upload_batch}; the CLI does the same.

    @param endpoint: a Twisted client endpoint string (C{tcp:host:port},
        C{ssl:...}, C{unix:path}) or an endpoint object.
    @param max_attempts: consecutive failed connections (without progress in
        between) before giving up.
    @param stall_timeout: seconds without any answer from the server after
        which the connection is abandoned and a new one made.
    @param key: this client's secret (from C{imgresume keys add}); when
        given, the client authenticates in every handshake and refuses a
        server that cannot prove it knows the key.
    @param journal: where upload ids of unfinished and completed uploads
        are kept: a L{Journal}, a journal file's path, C{"default"} (see
        L{default_journal_path}) or None, which disables the journal.
    @param run: runs blocking file work off the reactor thread (default:
        the reactor's thread pool).
    @param put_max: a file of at most this many bytes, not already begun
        (in the journal), goes whole in one PUT frame, stored by the
        server in one step, to a server that offers PUT for its size (0:
        never); up to two PUTs are kept in flight on a connection.
    @param if_exists: what the server does when a completed file already
        has the remote name: C{"rename"} (store beside it under another
        name; the default), C{"skip"} (store nothing if that file has the
        same size and SHA-256: the server compares, and the result says
        C{skipped}) or C{"fail"} (refuse the file).  C{skip} and C{fail}
        need a server that offers them; from one that does not, the file
        fails with nothing sent (see docs/protocol.md).
    @param digest: the whole-file digest to ask servers for: C{"blake3"}
        (the default) or C{"sha256"}; a server that predates BLAKE3 answers
        with SHA-256, and the result's C{digest} says which was used.

    While uploads are under way on a real reactor, its shutdown
    (C{reactor.stop()}, and so Ctrl-C in a program run by C{react})
    interrupts them first, as L{interrupt} does: their Deferreds fail with
    L{imgresume.client.UploadInterrupted} instead of never firing, and the
    reactor stops once the journal holds what they did.
    """

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
        window: int = 16,
        chunk_size: int | None = None,
        put_max: int = PUT_MAX,
        run: Runner | None = None,
        rng: random.Random | None = None,
        if_exists: str = "rename",
        digest: str = integrity.DEFAULT_DIGEST,
    ) -> None:
        if digest not in integrity.DIGESTS:
            raise ValueError(f"digest must be one of {', '.join(integrity.DIGESTS)}")
        self.digest = digest
        if if_exists not in IF_EXISTS_POLICIES:
            raise ValueError(f"if_exists must be one of {', '.join(IF_EXISTS_POLICIES)}")
        self.if_exists = if_exists
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
        self.put_max = put_max
        if run is None:
            from twisted.internet.threads import deferToThreadPool

            run = functools.partial(deferToThreadPool, reactor, reactor.getThreadPool())
        self.run = run
        self.rng = rng or random.Random()
        #: The journal's writer, shared by every session of this uploader
        #: (None without a journal).
        self.journal_queue = JournalQueue(self.journal, run) if self.journal is not None else None
        #: Whether L{interrupt} was called (no upload starts any more), and
        #: the signal it named, if any.
        self.interrupted = False
        self.interrupted_by: int | None = None
        self._running: set[Deferred[Any]] = set()
        self._idle_waiters: list[Deferred[None]] = []
        self._shutdown_trigger: Any = None

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
        Upload the file at C{path} as C{name} (default: its base name), on
        a connection of its own that is closed when the upload is over.

        @param metadata: stored with the upload.
        @param restart: ignore the journal and start a fresh upload.
        @param progress: called with a L{Progress} report, on the reactor
            thread, as the upload goes on.
        @return: Deferred firing with an L{UploadResult} once the server
            has verified the stored file's SHA-256, or failing with
            L{imgresume.client.UploadFailed}.
        """

        async def once() -> UploadResult:
            async with self.session() as session:
                return await session.upload(
                    path, name, metadata=metadata, restart=restart, progress=progress
                )

        return Deferred.fromCoroutine(once())

    def session(self) -> UploadSession:
        """
        A new L{UploadSession}: uploads one after another over one
        connection, which stays open between files.  Close it when done::

            async with uploader.session() as session:
                for path in paths:
                    await session.upload(path)
        """
        return UploadSession(self)

    def upload_batch(
        self,
        files: Iterable[str | BatchItem],
        *,
        parallel: int = 4,
        restart: bool = False,
        progress: Callable[[Progress], None] | None = None,
        on_outcome: Callable[[FileOutcome], None] | None = None,
        stop_on_failure: bool = False,
    ) -> Deferred[BatchResult]:
        """
        Upload many files: C{parallel} sessions take files from one queue,
        in order, each over its own connection (so at most C{parallel}
        handshakes when nothing breaks).  A file that fails does not stop
        the others unless C{stop_on_failure}; then no further file starts
        and the ones under way finish.

        @param files: local paths (remote name: the base name) or
            L{BatchItem}s.
        @param progress: as for L{upload}, for every file (reports carry
            the remote name).
        @param on_outcome: called with each file's L{FileOutcome} as it ends.
        @return: Deferred firing with a L{BatchResult}; it does not fail
            for failed files (see L{BatchResult.failed}), but fails with
            L{imgresume.client.UploadInterrupted} (whose C{batch} is the
            L{BatchResult} so far) if the uploader is interrupted.
        """
        return Deferred.fromCoroutine(run_batch(
            self, files, parallel=parallel, restart=restart, progress=progress,
            on_outcome=on_outcome, stop_on_failure=stop_on_failure,
        ))

    def plan(self, files: Iterable[str | BatchItem], *,
             restart: bool = False) -> Deferred[list[PlannedUpload]]:
        """
        What L{upload_batch} would do with C{files}, from the local files
        and the journal alone (no connection): a L{PlannedUpload} per
        file, in order, saying whether it would be sent, resumed, or
        confirmed as stored by an earlier run.  C{imgresume upload
        --dry-run} prints it.
        """
        items = [f if isinstance(f, BatchItem) else BatchItem(f) for f in files]
        return Deferred.fromCoroutine(plan_uploads(
            items, self.journal_queue, self.endpoint_text, self.run, restart=restart))

    def interrupt(self, signal: int | None = None) -> Deferred[None]:
        """
        Stop every upload of this uploader that is under way, and refuse
        the ones asked for later: each fails with
        L{imgresume.client.UploadInterrupted} (naming C{signal}, the signal
        that asked for it, if any), its connection closed, what the server
        acknowledged left there and in the journal for a resume.

        Called by C{imgresume upload} on SIGINT and SIGTERM, by
        L{imgresume.client.upload_files} on Ctrl-C, and by the reactor's
        shutdown.  Calling it again only waits.

        @return: a Deferred that fires once the uploads have stopped and the
            journal writes they queued are on disk.
        """
        self.interrupted = True
        if signal is not None and self.interrupted_by is None:
            self.interrupted_by = signal
        for upload in list(self._running):
            upload.cancel()
        waits = [self._idle()]
        if self.journal_queue is not None:
            waits.append(self.journal_queue.flushed())
        return DeferredList(waits, consumeErrors=True).addCallback(lambda _: None)

    def track(self, upload: Deferred[Any]) -> Deferred[Any]:
        """
        Count C{upload} (a session's upload under way) as running until it
        fires, so that L{interrupt} can cancel it.  Called by
        L{UploadSession.upload}.
        """
        self._running.add(upload)
        if self._shutdown_trigger is None and IReactorCore.providedBy(self.reactor):
            self._shutdown_trigger = self.reactor.addSystemEventTrigger(
                "before", "shutdown", self._shutting_down)

        def done(result: Any) -> Any:
            self._running.discard(upload)
            if not self._running:
                trigger, self._shutdown_trigger = self._shutdown_trigger, None
                if trigger is not None:
                    self.reactor.removeSystemEventTrigger(trigger)
                waiters, self._idle_waiters = self._idle_waiters, []
                for d in waiters:
                    d.callback(None)
            return result

        return upload.addBoth(done)

    def _idle(self) -> Deferred[None]:
        """Fires once no upload is under way."""
        if not self._running:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._idle_waiters.append(d)
        return d

    def _shutting_down(self) -> Deferred[None]:
        """The reactor is stopping: interrupt, and let it wait for the journal."""
        self._shutdown_trigger = None  # it fired: it is not removed later
        return self.interrupt()

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
            await self.connect(query)
            return await query.result

        return Deferred.fromCoroutine(ask())

    async def connect(self, protocol: IProtocol) -> None:
        """
        Connect C{protocol} through the endpoint, giving up (with
        L{AttemptFailed}) after C{connect_timeout} seconds.  Used by the
        sessions and by L{status}.
        """
        d = connectProtocol(self.endpoint, protocol)
        timer = self.reactor.callLater(self.connect_timeout, d.cancel)
        try:
            await d
        except (CancelledError, ConnectingCancelledError):
            raise AttemptFailed(f"connecting took longer than {self.connect_timeout:g} s")
        finally:
            if timer.active():
                timer.cancel()

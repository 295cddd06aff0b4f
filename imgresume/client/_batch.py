# -*- test-case-name: tests.client.test_session,tests.client.test_interrupt -*-
"""
A batch of files over a few connections: a shared queue, and as many
upload sessions as files may go at once, each taking the next file when
its last one is over.  Used by L{imgresume.client.Uploader.upload_batch}
and, through it, by C{imgresume upload}.
"""

from __future__ import annotations

import os
from collections import deque
from typing import TYPE_CHECKING, Callable, Iterable, Mapping, Protocol

import attrs
from twisted.logger import Logger

from imgresume.client._results import Progress, UploadFailed, UploadInterrupted, UploadResult

if TYPE_CHECKING:  # BatchItem is used without the sessions' code (collect_files)
    from imgresume.client._session import UploadSession

log = Logger()


class SessionMaker(Protocol):
    """
    What a batch needs from its uploader (an L{imgresume.client.Uploader}):
    new sessions, one per lane.
    """

    def session(self) -> UploadSession:
        """A new L{UploadSession}."""


@attrs.frozen
class BatchItem:
    """
    One file of a batch: its local C{path}, its remote C{name} (None: the
    base name) and the C{metadata} to store with it.  Made by the caller,
    or by L{imgresume.client.collect_files}, which adds the C{size} it saw
    (None: not known).  The size only schedules the batch (whether the
    file may follow the PUT in flight); what is sent is what the file
    holds when it is opened.
    """

    path: str
    name: str | None = None
    metadata: Mapping[str, str] = attrs.field(factory=dict, hash=False)
    size: int | None = attrs.field(default=None, eq=False)


def _with_sizes(items: list[BatchItem]) -> list[BatchItem]:
    """C{items}, each with its file's size (None: cannot be read now); blocking."""

    def sized(item: BatchItem) -> BatchItem:
        if item.size is not None:
            return item
        try:
            return attrs.evolve(item, size=os.stat(item.path).st_size)
        except OSError:
            return item  # its upload says why

    return [sized(item) for item in items]


@attrs.frozen
class FileOutcome:
    """How one file of a batch ended: C{result} if stored and verified, else C{error}."""

    item: BatchItem
    result: UploadResult | None = None
    error: UploadFailed | None = None

    @property
    def ok(self) -> bool:
        """Whether the file is stored and verified."""
        return self.result is not None

    @property
    def name(self) -> str:
        """The remote name asked for."""
        return self.item.name or os.path.basename(self.item.path)


@attrs.frozen
class BatchResult:
    """
    What L{imgresume.client.Uploader.upload_batch} did: an outcome for
    every file started, in the order given; the files not started (after a
    failure, with C{stop_on_failure}, or after an interruption); the
    connections opened.  An interrupted batch's result is the C{batch} of
    the L{UploadInterrupted} its Deferred fails with.
    """

    outcomes: list[FileOutcome]
    not_started: list[BatchItem]
    connections: int

    @property
    def failed(self) -> list[FileOutcome]:
        """The outcomes of the files that failed (not those interrupted)."""
        return [o for o in self.outcomes
                if not o.ok and not isinstance(o.error, UploadInterrupted)]

    @property
    def interrupted(self) -> list[FileOutcome]:
        """The outcomes of the files stopped by an interruption while under way."""
        return [o for o in self.outcomes if isinstance(o.error, UploadInterrupted)]


async def run_batch(
    uploader: SessionMaker,
    files: Iterable[str | BatchItem],
    *,
    parallel: int,
    restart: bool,
    progress: Callable[[Progress], None] | None,
    on_outcome: Callable[[FileOutcome], None] | None,
    stop_on_failure: bool,
) -> BatchResult:
    """
    Upload C{files} over C{parallel} sessions of C{uploader}; see
    C{upload_batch}.

    @raise UploadInterrupted: the uploader was interrupted; its C{batch}
        says what was done.
    """
    from twisted.internet.defer import Deferred, DeferredList

    from imgresume.client._put import PUTS_IN_FLIGHT

    if parallel < 1:
        raise ValueError(f"parallel must be at least 1, not {parallel}")
    items = [f if isinstance(f, BatchItem) else BatchItem(f) for f in files]
    if any(item.size is None for item in items):
        # The sizes that schedule the PUT pipeline, read once off the reactor.
        items = await uploader.run(_with_sizes, items)
    queue = deque(enumerate(items))
    outcomes: dict[int, FileOutcome] = {}
    stopping = False
    interrupted: UploadInterrupted | None = None
    sessions = [uploader.session() for _ in range(min(parallel, len(items)))]

    async def one(session: UploadSession, index: int, item: BatchItem) -> None:
        nonlocal stopping, interrupted
        try:
            result = await session.upload(
                item.path, item.name, metadata=item.metadata, restart=restart,
                progress=progress,
            )
        except UploadInterrupted as e:
            # Not an outcome of the file: no on_outcome, and the batch stops.
            outcomes[index] = FileOutcome(item, error=e)
            interrupted = interrupted or e
            return
        except UploadFailed as e:
            outcome = FileOutcome(item, error=e)
        except Exception as e:
            # A bug, not a verdict on the file: say so, and go on.
            log.failure("uploading {path} failed unexpectedly", path=item.path)
            outcome = FileOutcome(item, error=UploadFailed(
                f"{item.path}: unexpected error: {type(e).__name__}: {e}", e))
        else:
            outcome = FileOutcome(item, result=result)
        outcomes[index] = outcome
        stopping = stopping or (stop_on_failure and not outcome.ok)
        if on_outcome is not None:
            try:
                on_outcome(outcome)
            except Exception:
                log.failure("the on_outcome callback failed for {path}", path=item.path)

    async def lane(session: UploadSession) -> None:
        # One file at a time, except small files sent whole in PUTs: the
        # next starts as soon as its PUT may follow the one in flight.
        async with session:
            running: deque[Deferred[None]] = deque()
            while queue and not stopping and interrupted is None:
                if running and (len(running) >= PUTS_IN_FLIGHT
                                or not session.pipelines(queue[0][1].size)):
                    await running.popleft()
                    continue
                index, item = queue.popleft()
                running.append(Deferred.fromCoroutine(one(session, index, item)))
            while running:
                await running.popleft()

    lanes = await DeferredList(
        [Deferred.fromCoroutine(lane(s)) for s in sessions], consumeErrors=True
    )
    for ok, value in lanes:
        if not ok:
            value.raiseException()
    batch = BatchResult(
        outcomes=[outcomes[i] for i in sorted(outcomes)],
        not_started=[item for _, item in queue],
        connections=sum(s.connections for s in sessions),
    )
    if interrupted is not None:
        unfinished = len(batch.interrupted) + len(batch.not_started)
        raise UploadInterrupted(
            f"interrupted: {unfinished} of {len(items)} files unfinished",
            signal=interrupted.signal, batch=batch)
    return batch

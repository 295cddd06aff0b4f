# -*- test-case-name: tests.server.test_protocol,tests.server.test_memory -*-
"""
Batching and back-pressure: a connection's received data on its way from
the socket to storage, and when the connection stops reading.

Frames are let in as memory allows: L{FrameAdmission} follows the frames
arriving and lets each in only once the server's
L{imgresume.server._admission.MemoryBudget} has room for all of it.  Chunks
are written in batches: while one batch is being made durable (on the disk
thread), the chunks that arrive meanwhile are gathered into the next, which
is then written with one flush for all of them (group commit);
L{ChunkBatches} keeps the two and says when the next batch is full.
L{Backpressure} pauses and resumes the transport as those two allow.

Each connection's L{imgresume.server._flow.ConnectionFlow} holds one of
each; the connection calls them (through it, or for the chunk batches
directly); they never call it, except that a connection waiting for memory
is woken through the small callable it handed its L{FrameAdmission}.
"""

from __future__ import annotations

from typing import Any, Callable

import attrs
from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

from imgresume.protocol import FrameCursor, control_limit
from imgresume.server._admission import MemoryBudget
from imgresume.storage.interfaces import Chunk, IUploadWriter


#: Frames up to this size (header included) are let in without waiting for
#: room: every control frame (a balancer's health check gets its PONG however
#: busy the server is) and the last, short chunk of a file.
SMALL_FRAME = 64 * 1024


@attrs.frozen
class Written:
    """
    One chunk of a batch storage wrote: where it ends, its size, and how far
    bytes are durable once it is written (its end, or less for a storage
    that commits in larger units).
    """

    end: int
    size: int
    durable: int


class ChunkBatches:
    """
    The chunks of one connection's upload between the machine and storage:
    the batch being written, and the one being gathered.  Held by the
    connection's L{imgresume.server._flow.ConnectionFlow};
    L{imgresume.server._protocol.UploadServerProtocol} adds each
    chunk the machine hands out, asks whether the next batch is full, and
    starts the next write (L{write_next}) whenever one ends.
    """

    def __init__(self, budget: MemoryBudget) -> None:
        self._budget = budget
        #: The chunks gathered for the next batch.
        self._gathered: list[Chunk] = []
        self.gathered_bytes = 0
        #: The write of the batch in flight (None: none).
        self.writing: Deferred[Any] | None = None

    @property
    def idle(self) -> bool:
        """Nothing being written and nothing gathered."""
        return self.writing is None and not self._gathered

    def is_full(self, limit: int) -> bool:
        """Whether the next batch holds C{limit} bytes or more."""
        return self.gathered_bytes >= limit

    def add(self, chunk: Chunk) -> None:
        """Gather a chunk (its CRC-32 already checked) for the next batch."""
        self._gathered.append(chunk)
        self.gathered_bytes += len(chunk.data)
        self._budget.count(len(chunk.data))

    def drop_gathered(self) -> None:
        """Forget the chunks gathered for the next batch (never to be written)."""
        dropped, self._gathered, self.gathered_bytes = self.gathered_bytes, [], 0
        if dropped:
            self._budget.release(dropped)

    def write_next(self, writer: IUploadWriter) -> Deferred[list[Written]] | None:
        """
        Start writing the gathered chunks with C{writer}, unless a batch is
        being written or nothing is gathered (then None).

        @return: a Deferred firing, once storage is done, with the chunks
            written in order, or failing with the storage's error (the
            chunks gathered meanwhile are then dropped: the upload ends
            there).  The batch's bytes are counted out of the budget first.
        """
        if self.writing is not None or not self._gathered:
            return None
        batch, self._gathered, self.gathered_bytes = self._gathered, [], 0
        size = sum(len(chunk.data) for chunk in batch)

        def done(result: int | Failure) -> list[Written] | Failure:
            self.writing = None
            self._budget.release(size)
            if isinstance(result, Failure):
                self.drop_gathered()
                return result
            # The storage reports how far bytes are durable: the batch's
            # end, or less for one that commits in larger units.
            durable = result
            return [
                Written(chunk.end, len(chunk.data), min(durable, chunk.end))
                for chunk in batch
            ]

        d = writer.write_batch(batch)
        self.writing = d
        d.addBoth(done)
        return d


class FrameAdmission:
    """
    One connection's share of the server's L{MemoryBudget}: counts what the
    connection's receive buffer holds, and reserves room for each frame as
    soon as its header is in (a L{FrameCursor} follows frame boundaries in
    the bytes received), before the machine parses it.

    A frame whose header is in counts whole from the moment it is let in:
    at once if it is small, else when the server has room for the rest of
    it, or holds nothing else.  Until then the connection stops reading and
    waits for room, and the bytes of that frame it has (at most one read)
    are not counted, so that connections waiting cannot keep one another
    out.  A stalled connection reads ahead only while its buffer holds less
    than one largest payload.

    Held by a connection's L{imgresume.server._flow.ConnectionFlow}, which
    feeds it what the connection receives and asks it, with the machine's
    buffer size, whether to parse and whether to read on; C{wake} is called when the connection
    waited for room and some freed.
    """

    def __init__(self, budget: MemoryBudget, max_payload: int,
                 wake: Callable[[], None]) -> None:
        self._budget = budget
        self._max_payload = max_payload
        self._wake = wake
        #: Where frames begin in the received bytes.
        self._cursor = FrameCursor(control_limit(max_payload))
        #: The frame (by number) with room reserved for it.
        self._admitted = 0
        #: What this connection's buffer counts in the budget.
        self._held = 0

    def feed(self, data: bytes) -> None:
        """Follow received bytes (the same, in the same order, as the machine's)."""
        self._cursor.feed(data)

    def may_parse(self, buffered: int) -> bool:
        """
        Whether the machine, holding C{buffered} bytes, may parse on: not
        into a frame that is not let in, so that nothing is buffered for its
        body (the decoder may give a large frame a buffer of its own as soon
        as it parses the header).
        """
        cursor = self._cursor
        if not cursor.remaining or self._admitted == cursor.frames:
            return True
        if buffered > cursor.size - cursor.remaining:
            return True  # whole frames before it come first
        return self._let_in(buffered)

    def update(self, buffered: int, stalled: bool, may_wait: bool) -> tuple[bool, bool]:
        """
        Count what the machine's buffer holds (C{buffered} bytes), reserving
        room for the frame arriving once it fits, and wait for room (if
        C{may_wait}) while it does not.  C{stalled}: the connection takes no
        events now (storage busy, or its next batch full).

        @return: (whether to go on reading, whether this connection now
            holds less: the caller then wakes the connections waiting, once
            it has applied the first answer).
        """
        cursor = self._cursor
        ahead = not stalled or buffered < self._max_payload
        if cursor.remaining and ahead:
            self._let_in(buffered)
        admitted = self._admitted == cursor.frames
        if admitted:
            held = buffered + cursor.remaining
        elif cursor.remaining:
            held = max(0, buffered - (cursor.size - cursor.remaining))
        else:
            held = buffered
        freed = held < self._held
        self._budget.count(held - self._held)
        self._held = held
        if cursor.remaining:
            may_read, waits = admitted, ahead and not admitted
        else:
            may_read, waits = ahead, False
        if waits and may_wait:
            self._budget.wait(self, self._wake)
        else:
            self._budget.stop_waiting(self)
        return may_read, freed

    def stop_waiting(self) -> None:
        """The connection no longer waits for room (it is closing)."""
        self._budget.stop_waiting(self)

    def release(self) -> None:
        """The connection is gone: count out all it held."""
        held, self._held = self._held, 0
        self._budget.release(held)

    def _let_in(self, buffered: int) -> bool:
        """
        Whether the frame arriving is let in: it is if it is small, or once
        the server has room for the rest of it, or holds nothing else.
        """
        cursor, budget = self._cursor, self._budget
        if self._admitted != cursor.frames:
            others = budget.used - self._held
            if cursor.size <= SMALL_FRAME or others <= 0 or (
                others + buffered + cursor.remaining <= budget.limit
            ):
                self._admitted = cursor.frames
        return self._admitted == cursor.frames


class Backpressure:
    """
    Whether a connection reads: pauses its transport (a push producer)
    while the connection may not read on, and resumes it once it may.
    Held by a connection's L{imgresume.server._flow.ConnectionFlow}, which
    hands it the transport and what L{FrameAdmission} answered.
    """

    def __init__(self) -> None:
        self.paused = False

    def follow(self, transport: Any, may_read: bool, closing: bool) -> None:
        """Pause C{transport} if the connection may not read (unless closing); resume it if it may."""
        if not may_read and not self.paused and not closing:
            transport.pauseProducing()
            self.paused = True
        elif self.paused and may_read:
            transport.resumeProducing()
            self.paused = False

    def release(self, transport: Any) -> None:
        """The connection is closing: resume the transport if paused, so it can finish."""
        if self.paused:
            transport.resumeProducing()
            self.paused = False

# -*- test-case-name: tests.server.test_protocol,tests.server.test_memory -*-
"""
Flow control of one connection: when it takes the next event, when it
reads, and what it waits for.

L{ConnectionFlow} holds what decides that: the storage call the
connection's event loop waits for, its
L{imgresume.server._batching.FrameAdmission} (frames let in as the
server's memory allows), its L{imgresume.server._batching.ChunkBatches}
(the batch being written and the one being gathered) and its
L{imgresume.server._batching.Backpressure} (whether the transport reads).
It answers with values and acts only on the transport it is handed; it
never calls the connection, except that a connection waiting for memory
is woken through the small callable it handed in.
"""

from __future__ import annotations

from typing import Any, Callable

from twisted.internet.defer import Deferred, DeferredList, succeed

from imgresume.server._admission import MemoryBudget
from imgresume.server._batching import Backpressure, ChunkBatches, FrameAdmission


class ConnectionFlow:
    """
    One connection's flow control.  Owned by
    L{imgresume.server._protocol.UploadServerProtocol}, which asks it
    whether to take the next event (L{may_take}), tells it when the event
    loop waits for a storage call (L{wait}, L{waited}), feeds it what it
    receives, gathers chunks into and writes them from its C{batches}, and
    after each turn of its loop has it pause or resume the transport
    (L{follow}).
    """

    def __init__(self, memory: MemoryBudget, max_payload: int,
                 wake: Callable[[], None]) -> None:
        self._memory = memory
        self._frames = FrameAdmission(memory, max_payload, wake=wake)
        #: The batch being written and the one being gathered.
        self.batches = ChunkBatches(memory)
        self._backpressure = Backpressure()
        #: Fires once the answer of the storage call the loop waits for is
        #: carried out (None: the loop waits for none).
        self._busy: Deferred[None] | None = None

    @property
    def busy(self) -> bool:
        """Whether the event loop waits for a storage call."""
        return self._busy is not None

    def stalled(self, batch_limit: int) -> bool:
        """
        Whether to stop taking events: storage busy, or the next batch full
        (it holds C{batch_limit} bytes or more).
        """
        return self._busy is not None or self.batches.is_full(batch_limit)

    @property
    def idle(self) -> bool:
        """No storage call in flight, no chunk being written or gathered."""
        return self._busy is None and self.batches.idle

    @property
    def server_side_wait(self) -> bool:
        """
        Whether the connection waits for the server, not the client: storage
        is busy or writing, or the connection stopped reading.
        """
        return (self._busy is not None or self.batches.writing is not None
                or self._backpressure.paused)

    def may_take(self, buffered: int, batch_limit: int) -> bool:
        """Whether the machine, holding C{buffered} bytes, may hand out its next event."""
        return not self.stalled(batch_limit) and self._frames.may_parse(buffered)

    def feed(self, data: bytes) -> None:
        """Follow the bytes received (before the machine is given them)."""
        self._frames.feed(data)

    def stop_waiting(self) -> None:
        """The connection is closing: it no longer waits for memory."""
        self._frames.stop_waiting()

    def wait(self) -> Deferred[None]:
        """
        The event loop waits for a storage call: the caller fires the
        Deferred returned once it has carried out the call's answer (after
        L{waited}).
        """
        busy: Deferred[None] = Deferred()
        self._busy = busy
        return busy

    def waited(self) -> None:
        """The storage call's answer came: the loop may take events again."""
        self._busy = None

    def follow(self, transport: Any, buffered: int, batch_limit: int, closing: bool) -> None:
        """
        After a turn of the event loop: count what the machine's buffer
        holds (C{buffered} bytes), pause or resume C{transport} as the
        server's memory and this connection's storage allow (see
        L{stalled}), and wake the connections waiting for memory if this
        one holds less.
        """
        may_read, freed = self._frames.update(buffered, self.stalled(batch_limit),
                                             may_wait=not closing)
        self._backpressure.follow(transport, may_read, closing)
        if freed:
            self._memory.wake_waiting()

    def release_transport(self, transport: Any) -> None:
        """The connection is closing: let the transport read, so it can finish."""
        self._backpressure.release(transport)

    def stop(self) -> Deferred[Any]:
        """
        The transport is gone: stop waiting for memory, drop the chunks
        gathered and count out what the connection held.

        @return: a Deferred firing once the storage calls in flight are done.
        """
        in_flight = [d for d in (self._busy, self.batches.writing) if d is not None]
        self._frames.stop_waiting()
        self.batches.drop_gathered()
        self._frames.release()
        return DeferredList(in_flight) if in_flight else succeed(None)

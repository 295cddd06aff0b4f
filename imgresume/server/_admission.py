# -*- test-case-name: tests.server.test_memory,tests.server.test_protocol -*-
"""
Admission: the limits that hold for all of a server's connections together,
each kept by one object the factory owns and its connections call.

L{UploadQuota} is the uploads each client may have open at once.
L{MemoryBudget} is the server's memory for received data, and the list of
connections waiting for some; each connection counts into it through its
L{imgresume.server._batching.FrameAdmission} and
L{imgresume.server._batching.ChunkBatches}.  Neither calls a connection,
except that a connection waiting for memory is woken through the small
callable it handed in.
"""

from __future__ import annotations

from typing import Callable

from imgresume.errors import QuotaExceeded


class UploadQuota:
    """
    The uploads each client has open on this server, and how many it may
    (C{max_uploads_per_client}; 0: no limit).  Owned by
    L{imgresume.server._factory.UploadServerFactory}; each connection counts
    the upload it opens and closes, and asks before opening one.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._open: dict[str, int] = {}

    def open_uploads(self, client_id: str) -> int:
        """Uploads C{client_id} has open on this server."""
        return self._open.get(client_id, 0)

    @property
    def total(self) -> int:
        """Uploads open on this server, all clients together."""
        return sum(self._open.values())

    def count(self, client_id: str, delta: int) -> None:
        """An upload of C{client_id} opened (+1) or closed (-1)."""
        count = self._open.get(client_id, 0) + delta
        if count > 0:
            self._open[client_id] = count
        else:
            self._open.pop(client_id, None)

    def refusal(self, client_id: str) -> QuotaExceeded | None:
        """The error refusing C{client_id} another upload, or None if it may open one."""
        limit = self.limit
        if not limit or self.open_uploads(client_id) < limit:
            return None
        return QuotaExceeded(
            f"client {client_id} already has {limit} uploads open on this server; "
            "finish one first", retry_after=5.0,
        )


class MemoryBudget:
    """
    The server's memory for received data, all connections together: what
    they hold (frames being received, counted whole once let in; chunks
    gathered or being written), the C{limit}, and the connections that
    stopped reading until there is room, in the order they stopped.

    Owned by L{imgresume.server._factory.UploadServerFactory}; each
    connection's L{FrameAdmission} and
    L{imgresume.server._batching.ChunkBatches} count into it.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        #: Bytes held now.
        self.used = 0
        #: Who waits for room (a connection's L{FrameAdmission}), each with
        #: the callable that wakes it.
        self._waiting: dict[object, Callable[[], None]] = {}
        self._waking = False

    def count(self, size: int) -> None:
        """Count C{size} more bytes held (less, if negative)."""
        self.used += size

    def release(self, size: int) -> None:
        """
        Received data was written or dropped: count it out, and wake the
        connections waiting for room, if there is some again.
        """
        self.used -= size
        self.wake_waiting()

    def wait(self, waiter: object, wake: Callable[[], None]) -> None:
        """C{waiter} stopped reading until there is room: C{wake} it then."""
        self._waiting.setdefault(waiter, wake)

    def stop_waiting(self, waiter: object) -> None:
        """C{waiter} no longer waits for room."""
        self._waiting.pop(waiter, None)

    def wake_waiting(self) -> None:
        """
        Wake the connections waiting for room, oldest first, until one still
        finds none: nobody overtakes a frame that does not fit yet.
        """
        if self._waking:
            return  # the loop below is running further up the stack
        self._waking = True
        try:
            for waiter, wake in list(self._waiting.items()):
                if waiter in self._waiting:
                    wake()
                    if waiter in self._waiting:
                        break
        finally:
            self._waking = False

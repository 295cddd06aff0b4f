# -*- test-case-name: tests.server.test_memory,tests.server.test_protocol,tests.server.test_incomplete -*-
"""
Admission: the limits that hold for all of a server's connections together,
each kept by one object the factory owns and its connections call.

L{UploadQuota} is the uploads each client may have open at once.
L{IncompleteQuota} is the incomplete uploads each client may have on the
shared storage, counted there.  L{MemoryBudget} is the server's memory for
received data, and the list of connections waiting for some; each
connection counts into it through its
L{imgresume.server._batching.FrameAdmission} and
L{imgresume.server._batching.ChunkBatches}, and a PUT's payload through
L{store_whole}.  None calls a connection,
except that a connection waiting for memory is woken through the small
callable it handed in.
"""

from __future__ import annotations

from typing import Any, Callable

from twisted.internet.defer import Deferred

from imgresume.errors import QuotaExceeded
from imgresume.sizes import format_size
from imgresume.storage.interfaces import (
    IncompleteUploads,
    IUploadStorage,
    NewUpload,
    WholeUpload,
)

#: Defaults of C{--max-incomplete-uploads-per-client} and (with the default
#: C{--max-file-size}) C{--max-incomplete-bytes-per-client}.
MAX_INCOMPLETE_UPLOADS = 100
MAX_INCOMPLETE_BYTES = 2 << 40
#: The retry hint of a refusal for too many incomplete uploads.
INCOMPLETE_RETRY_AFTER = 30.0


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


class _Held:
    """An upload this server is creating for a client, counted until it exists."""

    def __init__(self, client_id: str, size: int) -> None:
        self.client_id = client_id
        self.size = size


class IncompleteQuota:
    """
    The incomplete uploads (created, neither completed nor removed) each
    client may have on the storage: at most C{max_uploads} of them,
    declaring at most C{max_bytes} together (0: no limit).  Owned by
    L{imgresume.server._factory.UploadServerFactory}; a connection asked for
    a new upload L{hold}s it, asks the storage what the client has
    (L{imgresume.storage.interfaces.IUploadStorage.incomplete_for}), asks
    L{refusal}, and L{release}s the hold once the upload is created or not.

    Counted from the shared storage, so every server of a pool enforces the
    same limit; a server adds the uploads it is creating for the client at
    the moment (held, perhaps counted by the storage already: the limit then
    refuses one upload early rather than admit one too many).  Across
    servers, two uploads of one client checked at the same moment on two
    servers may both pass: the limit can be passed by as many uploads as
    the client starts on other servers within the time of one check and
    create (milliseconds).
    """

    def __init__(self, max_uploads: int, max_bytes: int) -> None:
        self.max_uploads = max_uploads
        self.max_bytes = max_bytes
        self._held: dict[str, list[_Held]] = {}

    @property
    def enabled(self) -> bool:
        """Whether there is a limit at all."""
        return bool(self.max_uploads or self.max_bytes)

    def hold(self, client_id: str, size: int) -> _Held:
        """Count an upload of C{size} bytes this server is about to create."""
        held = _Held(client_id, size)
        self._held.setdefault(client_id, []).append(held)
        return held

    def release(self, held: _Held) -> None:
        """The held upload is created (now counted by the storage), or not."""
        holds = self._held.get(held.client_id, [])
        if held in holds:
            holds.remove(held)
        if not holds:
            self._held.pop(held.client_id, None)

    def create(self, storage: IUploadStorage, request: NewUpload,
               admitted: Callable[[], None] = lambda: None) -> Deferred[Any]:
        """
        Create the upload C{request} asks for in C{storage}, unless its
        client's incomplete uploads there (and those this server is
        creating for it) are at a limit: then fail with QUOTA_EXCEEDED.
        Before refusing, the storage is asked again with C{verify}, so that
        index entries a crash left behind never refuse an upload.  Called
        by a connection for each UPLOAD; C{admitted} is called just before
        the storage is asked to create it.
        """
        if not self.enabled:
            admitted()
            return storage.create(request)
        held = self.hold(request.client_id, request.size)

        def counted(found: IncompleteUploads, verified: bool) -> Any:
            error = self.refusal(held, found)
            if error is None:
                admitted()
                return storage.create(request)
            if verified:
                raise error
            return storage.incomplete_for(request.client_id, verify=True).addCallback(
                counted, True)

        def created(result: Any) -> Any:
            self.release(held)  # the storage counts it now, or it failed
            return result

        d = storage.incomplete_for(request.client_id).addCallback(counted, False)
        return d.addBoth(created)

    def refusal(self, held: _Held, found: IncompleteUploads) -> QuotaExceeded | None:
        """
        The error refusing the held upload, given what the storage C{found}
        of its client's incomplete uploads, or None if it may be created.
        """
        others = [h for h in self._held.get(held.client_id, ()) if h is not held]
        count = found.count + len(others)
        declared = found.declared_bytes + sum(h.size for h in others)
        client = held.client_id
        if self.max_uploads and count >= self.max_uploads:
            return QuotaExceeded(
                f"client {client} has {count} incomplete uploads, as many as it may "
                f"(the server's --max-incomplete-uploads-per-client {self.max_uploads}): "
                "resume or finish them, or wait until they expire",
                retry_after=INCOMPLETE_RETRY_AFTER,
            )
        if self.max_bytes and declared + held.size > self.max_bytes:
            return QuotaExceeded(
                f"client {client}'s incomplete uploads declare {format_size(declared)}; "
                f"{format_size(held.size)} more would pass the server's "
                f"--max-incomplete-bytes-per-client {format_size(self.max_bytes)}: "
                "resume or finish them, or wait until they expire",
                retry_after=INCOMPLETE_RETRY_AFTER,
            )
        return None


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


def store_whole(storage: IUploadStorage, request: WholeUpload, memory: MemoryBudget,
                quota: UploadQuota) -> Deferred[Any]:
    """
    Store the whole file of a PUT (L{IUploadStorage.store_whole}) in one
    step.  Its payload, out of the connection's buffer by now, counts in
    the server's C{memory}, and the PUT as one of its client's open uploads
    in C{quota}, until storage is done with it.  Called by a connection for
    each PUT; the Deferred fires with the storage's answer.
    """
    size, client_id = len(request.data), request.client_id
    memory.count(size)
    quota.count(client_id, +1)

    def done(result: Any) -> Any:
        memory.release(size)
        quota.count(client_id, -1)
        return result

    return storage.store_whole(request).addBoth(done)

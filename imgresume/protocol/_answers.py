# -*- test-case-name: tests.protocol.test_server_machine,tests.server.test_put -*-
"""
The answers a server connection owes, in the order the frames came.

DATA packets are written in batches and acknowledged in order: an error
the machine finds in one packet waits behind the acknowledgements of the
packets before it (L{ChunkAnswers}).  PUTs are stored concurrently (each
is a whole file, independent of the others) but answered in the order they
came, so that a client matches each COMPLETED or ERROR to its PUT without
reading its upload id (L{PutAnswers}; L{check_put} is what the machine
checks of a PUT itself).
"""

from __future__ import annotations

import collections

from imgresume import integrity
from imgresume.errors import ChecksumMismatch, ImgresumeError, UnexpectedFrame
from imgresume.protocol._frames import Ack, Completed, Error, Pong, Put, Upload
from imgresume.protocol._rules import ServerLimits, check_request


def check_put(put: Put, limits: ServerLimits, checksum: str) -> ImgresumeError | None:
    """
    Why a PUT is refused before storage sees it, or None: checked as an
    UPLOAD of its size (L{check_request}), then its payload as a DATA
    packet's, against the connection's C{checksum}.

    @raise UnexpectedFrame: the server does not offer PUT (a fault of
        connection scope).
    """
    limit = limits.put_limit
    if not limit:
        raise UnexpectedFrame("PUT is not offered by this server: use UPLOAD")
    problem = check_request(
        Upload(put.name, put.size, put.sha256, put.metadata), limit,
        f"a PUT carries at most {limit} bytes (this server's put); "
        f"send this file of {put.size} bytes with UPLOAD")
    if problem is None and integrity.checksum(checksum, put.payload) != put.crc32:
        problem = ChecksumMismatch(f"the PUT's payload does not match its "
                                   f"{integrity.title(checksum)}; send it again")
    return problem


class ChunkAnswers:
    """
    The answers owed to the DATA packets of the open upload, in order: the
    end of a chunk storage is writing (an int), or an ERROR frame that must
    wait for the acknowledgements before it; and what the last ACK
    reported durable.  Owned by
    L{imgresume.protocol._server.ServerConnection}.
    """

    def __init__(self) -> None:
        self._line: collections.deque[int | Error] = collections.deque()
        #: What the storage has made durable, as the last ACK (or ACCEPTED)
        #: reported it.
        self.durable = 0

    def __len__(self) -> int:
        return len(self._line)

    @property
    def writing(self) -> int:
        """Chunks handed out and not yet written."""
        return sum(1 for a in self._line if isinstance(a, int))

    def taken(self, end: int) -> None:
        """A chunk ending at C{end} was handed out to be written."""
        self._line.append(end)

    def refused(self, error: Error) -> list[Error]:
        """A packet the machine refused: the answers now due, in order."""
        self._line.append(error)
        return self._errors_due()

    def written(self, end: int, durable: int | None) -> list[Ack | Error]:
        """
        Storage is done with the oldest chunk, which ends at C{end}, and
        made bytes durable up to C{durable} (None: to C{end}): the answers
        now due, in order.

        @raise RuntimeError: that is not the oldest chunk, or C{durable} is
            below an earlier acknowledgement or past C{end}.
        """
        if not self._line or self._line[0] != end:
            raise RuntimeError(
                f"chunk_written({end}) but the oldest pending answer is "
                f"{self._line[0] if self._line else None!r}"
            )
        if durable is None:
            durable = end
        if not self.durable <= durable <= end:
            raise RuntimeError(
                f"durable offset {durable} outside [{self.durable}, {end}]")
        self._line.popleft()
        self.durable = durable
        return [Ack(durable), *self._errors_due()]

    def clear(self) -> None:
        """Forget the answers owed (the upload ended on this connection)."""
        self._line.clear()

    def _errors_due(self) -> list[Error]:
        due = []
        while self._line and isinstance(self._line[0], Error):
            due.append(self._line.popleft())
        return due


class PutAnswers:
    """
    The slots of the PUTs in flight on one connection, oldest first.  Owned
    by L{imgresume.protocol._server.ServerConnection}.
    """

    def __init__(self) -> None:
        # [upload id, answer or None while it is being stored]
        self._slots: collections.deque[list] = collections.deque()

    def __len__(self) -> int:
        return len(self._slots)

    @property
    def storing(self) -> int:
        """PUTs handed out whose answer storage has not given yet."""
        return sum(1 for _, answer in self._slots if answer is None)

    def add(self, upload_id: str) -> None:
        """A PUT was handed out to be stored."""
        self._slots.append([upload_id, None])

    def add_answered(self, answer: Error | Pong) -> None:
        """
        An answer the machine gave itself behind the PUTs being stored (the
        ERROR of a PUT it refused, the PONG of a PING): it waits its turn.
        """
        self._slots.append([None, answer])

    def answer(self, upload_id: str, answer: Completed | Error) -> None:
        """
        Storage answered the oldest unanswered PUT of C{upload_id} (a client
        may repeat an upload id: the slots of one id are answered in order).

        @raise RuntimeError: no PUT of that id is waiting for its answer.
        """
        for slot in self._slots:
            if slot[0] == upload_id and slot[1] is None:
                slot[1] = answer
                return
        raise RuntimeError(f"no PUT {upload_id!r} is being stored")

    def ready(self) -> list[Completed | Error | Pong]:
        """Take the answers at the head of the line, in order."""
        out = []
        while self._slots and self._slots[0][1] is not None:
            out.append(self._slots.popleft()[1])
        return out

    def clear(self) -> None:
        """Forget every slot (the connection is closing)."""
        self._slots.clear()

# -*- test-case-name: tests.http.test_body -*-
"""
One request body written into its upload as it arrives, never buffered
whole: the bytes of a PATCH (or of a creation-with-upload POST) go to the
upload's L{IUploadWriter} in batches, one write at a time, the bytes that
arrive meanwhile joining the next batch (group commit).  While more than
C{max_pending} bytes wait for the disk, reading from the connection is
paused, so memory per request is bounded.

A body with an C{Upload-Checksum} is the exception the tus checksum
extension forces: a chunk whose checksum does not match must not be
appended, so such a body is held (up to C{checksum_limit} bytes), checked,
and only then written.
"""

from __future__ import annotations

from typing import Any, Callable

from twisted.internet.defer import Deferred, succeed
from twisted.python.failure import Failure

from imgresume.http._errors import storage_error
from imgresume.http._headers import CHECKSUM_MISMATCH, Checksum, TusError
from imgresume.storage.interfaces import Chunk, IUploadWriter

#: Bytes held for the disk before the connection is paused.
MAX_PENDING = 8 << 20
#: Bytes joined into one chunk of a batch.
CHUNK_BYTES = 4 << 20
#: Largest body held whole for its C{Upload-Checksum}.
CHECKSUM_LIMIT = 64 << 20


class BodyUpload:
    """
    The body of one request, on its way into one upload.  Made by the
    request (L{imgresume.http._request.TusRequest}) when its headers are in;
    given its writer by L{opened} once the upload logic has it (bytes that
    arrive before are held, within the same bound), or L{refused} with the
    error to answer.  The request feeds it (L{feed}), then either the body
    ends (L{end}, whose Deferred fires once every byte is durable) or the
    connection is cut (L{cut}: what was received is still written, then the
    writer released).

    @param pause: stop reading from the connection.
    @param resume: read again.
    @param on_bytes: told of each batch made durable (its byte count).
    """

    def __init__(
        self,
        pause: Callable[[], None],
        resume: Callable[[], None],
        *,
        clock: Any,
        length: int | None,
        checksum: Checksum | None = None,
        max_pending: int = MAX_PENDING,
        checksum_limit: int = CHECKSUM_LIMIT,
        on_bytes: Callable[[int], None] = lambda n: None,
    ) -> None:
        self._pause, self._resume = pause, resume
        self._clock = clock
        self.length = length
        self._max_pending = max_pending
        self._checksum_limit = checksum_limit
        self._on_bytes = on_bytes
        self.writer: IUploadWriter | None = None
        self.error: TusError | None = None
        self.received = 0
        #: Where the next batch starts; what is durable.
        self.next = self.durable = 0
        #: Where the bytes handed to writes so far end.
        self._taken = 0
        self.last_heard = clock.seconds()
        self._pending: list[bytes] = []
        self._pending_bytes = 0
        self._writing = False
        self._paused = False
        self._ended = False
        self._cut = False
        self._checksum = checksum
        self._checker: Any = checksum.hasher() if checksum is not None else None
        self._digest: Any = None  # the running SHA-256 of the whole upload, or None
        self._waiters: list[Deferred[int]] = []
        self._released: Deferred[None] | None = None
        #: Called when the writer is released (the upload logic's memory of it).
        self.on_release: Callable[[], None] | None = None
        #: Called with the error when the body is refused before its end
        #: (the request may answer at once).
        self.on_refused: Callable[[TusError], None] | None = None

    # -- from the upload logic --------------------------------------------

    def opened(self, writer: IUploadWriter, digest: Any = None) -> None:
        """
        The upload is open at C{writer.offset}: write what came and what
        comes.  C{digest} is the running SHA-256 of the upload's bytes
        before it, fed with this body's bytes as they are written.
        """
        self.writer = writer
        self.next = self.durable = self._taken = writer.offset
        self._digest = digest
        if self.error is not None:  # refused or cut meanwhile
            self._release()
            return
        length = self.length if self.length is not None else self._pending_bytes
        if writer.offset + length > writer.info.size:
            self.refused(TusError(413, f"the body's {length} bytes from offset "
                                       f"{writer.offset} pass Upload-Length "
                                       f"{writer.info.size}"))
            return
        self._pump()
        self._settle()

    def refused(self, error: TusError) -> None:
        """
        The request is refused with C{error}: nothing of the body is
        written, what arrives is dropped (read, never held), and the writer
        (if any) is released.
        """
        self._fail(error)
        self._drop()
        self._settle()  # releases the writer once no write is running

    @property
    def digest(self) -> Any:
        """The running SHA-256 of the upload's bytes up to L{next}, or None."""
        return self._digest

    # -- from the request -------------------------------------------------

    def feed(self, data: bytes) -> None:
        """Bytes of the body, as they arrive."""
        self.last_heard = self._clock.seconds()
        self.received += len(data)
        if self.error is not None or self._cut:
            return
        if self.writer is not None:
            size = self.writer.info.size
            if self._taken + self._pending_bytes + len(data) > size:
                self.refused(TusError(413, f"the body passes Upload-Length {size}"))
                return
        if self._checker is not None:
            self._checker.update(data)
        self._pending.append(bytes(data))
        self._pending_bytes += len(data)
        if self._checksum is not None:
            if self._pending_bytes > self._checksum_limit:
                self.refused(TusError(413, "a body with Upload-Checksum is held whole "
                                           f"to check it: at most {self._checksum_limit} "
                                           "bytes; send smaller chunks"))
                return
        if self._pending_bytes > self._max_pending and self._checksum is None:
            self._set_paused(True)
        self._pump()

    def end(self) -> Deferred[int]:
        """
        The body is complete: a Deferred firing with the durable offset once
        every byte is durable (the writer is kept, for the caller to
        complete or release), or failing with the L{TusError} to answer.
        """
        self._ended = True
        self._set_paused(False)
        if self.error is None and self._checksum is not None:
            if self._checker.digest() != self._checksum.digest:
                self.refused(TusError(
                    CHECKSUM_MISMATCH, f"Upload-Checksum {self._checksum.algorithm} does "
                    "not match the body; nothing of it was stored"))
            else:
                self._checksum = None  # checked: write it
        d: Deferred[int] = Deferred()
        self._waiters.append(d)
        self._pump()
        self._settle()
        return d

    def cut(self) -> Deferred[None]:
        """
        The connection was lost mid-body: what arrived whole is still
        written (unless it waits for a checksum that can no longer be
        checked), then the writer is released.  The Deferred fires once it is.
        """
        if not self._ended:
            self._cut = True
            if self._checksum is not None or self.writer is None and self.error is None:
                self._drop()
            if self.writer is None and self.error is None:
                self.error = TusError(400, "the connection was lost mid-body")
            self._pump()
            self._settle()
        if self._released is None:
            self._released = Deferred()
            if self.writer is None:
                self._released.callback(None)
        return self._released

    def fence(self) -> None:
        """
        Another server asked for the upload while this body was silent (a
        zombie connection): write nothing more, release the writer.
        """
        self._fail(TusError(423, "the upload was taken over by a newer request",
                            (("Retry-After", "1"),)))
        self._drop()
        self._settle()

    @property
    def waiting_for_disk(self) -> bool:
        """Whether a write runs or reading is paused for one: not the client's silence."""
        return self._writing or self._paused

    @property
    def ended(self) -> bool:
        """Whether the whole body has arrived."""
        return self._ended

    # -- inside -----------------------------------------------------------

    def _fail(self, error: TusError) -> None:
        if self.error is None:
            self.error = error
            if self.on_refused is not None and not self._ended and not self._cut:
                self.on_refused(error)

    def _drop(self) -> None:
        self._pending = []
        self._pending_bytes = 0
        self._set_paused(False)

    def _set_paused(self, paused: bool) -> None:
        if paused != self._paused:
            self._paused = paused
            (self._pause if paused else self._resume)()

    def _pump(self) -> None:
        if (self._writing or self.writer is None or not self._pending
                or self._checksum is not None or self.error is not None):
            return
        chunks: list[Chunk] = []
        offset, piece, held = self.next, [], 0
        for data in self._pending:
            piece.append(data)
            held += len(data)
            if held >= CHUNK_BYTES:
                chunks.append(Chunk(offset, b"".join(piece)))
                offset, piece, held = chunks[-1].end, [], 0
        if piece:
            chunks.append(Chunk(offset, b"".join(piece)))
        self._pending, self._pending_bytes = [], 0
        self._writing = True
        end = self._taken = chunks[-1].end
        d = self.writer.write_batch(chunks)
        d.addCallbacks(self._written, self._write_failed, (chunks, end))

    def _written(self, durable: int, chunks: list[Chunk], end: int) -> None:
        self._writing = False
        if self._digest is not None:
            for chunk in chunks:
                self._digest.update(chunk.data)
        self._on_bytes(durable - self.durable)
        self.next, self.durable = end, durable
        self._pump()
        if self._pending_bytes <= self._max_pending // 2 and not self._cut:
            self._set_paused(False)
        self._settle()

    def _write_failed(self, failure: Failure, chunks: list[Chunk], end: int) -> None:
        self._writing = False
        self._digest = None
        self._fail(storage_error(failure, self.durable))
        self._drop()
        self._settle()

    def _settle(self) -> None:
        """Answer the waiters and release the writer once nothing is left to do."""
        if self._writing:
            return
        if self.error is None and (
                (self.writer is None and not self._cut)  # still opening
                or (self._pending and self._checksum is None)):  # bytes to write
            return
        if self._cut or self.error is not None:
            self._release()
        if not self._ended and self.error is None:
            return
        waiters, self._waiters = self._waiters, []
        for d in waiters:
            if self.error is not None:
                d.errback(Failure(self.error))
            else:
                d.callback(self.durable)

    def _release(self) -> None:
        writer, self.writer = self.writer, None
        if writer is None:
            return
        if self.on_release is not None:
            self.on_release()
        if self._released is None:
            self._released = Deferred()
        released = self._released
        d = writer.release()
        d.addErrback(lambda f: None)  # a failed release leaves nothing to do here
        d.addBoth(lambda _: released.called or released.callback(None))

    def release(self) -> Deferred[None]:
        """Release the writer kept after L{end} (the upload is not complete)."""
        self._release()
        return self._released if self._released is not None else succeed(None)

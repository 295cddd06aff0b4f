# -*- test-case-name: tests.storage.test_filesystem -*-
"""
Read-back verification that follows the writes: the digest of what is
stored, computed while the upload is still arriving (or, with
C{verify="received"}, of what was received, as it is written).

An upload is declared complete only after every stored byte has been read
back from the storage (this host's cached pages dropped first, so the bytes
come from the disk or, on a network filesystem, from its servers) and hashed
to the declared SHA-256.  Doing that at completion costs a whole second read
of the file after the last packet, which on a large file is as long as the
transfer.  Bytes below the durable offset never change, so they can be
verified as soon as they are flushed: L{ReadBack} hashes the durable prefix
in slices on the storage's disk threads, lagging the writes, and completion
only waits for the last slice.

With C{verify="received"} (C{twistd imgresume --verify received}) the
bytes are hashed from the buffers they were written from instead
(L{ReadBack.received}, on the disk thread of the write), and nothing is
read back but a resumed prefix, which this writer did not receive: no disk
read, at the cost of not seeing a storage that returns other bytes than it
was given (each range still matches the checksum the client computed before
it was written; see docs/server.md).
"""

from __future__ import annotations

import os
import threading
import time
from typing import Callable

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from imgresume import integrity

log = Logger()

#: Bytes read per C{pread}.
PIECE = 1 << 20
#: Bytes verified per disk-thread task; a long prefix (a resume of a large
#: file) is verified in several tasks so it never holds a thread for long.
SLICE = 32 << 20

#: One read buffer per disk thread, not per upload: a server with 1,000
#: uploads open would otherwise hold 1,000 of them.
_threads = threading.local()


def _piece_buffer() -> memoryview:
    buffer = getattr(_threads, "buffer", None)
    if buffer is None:
        buffer = _threads.buffer = memoryview(bytearray(PIECE))
    return buffer


class ReadBackFailed(Exception):
    """Reading the stored bytes back failed; C{error} is the C{OSError}."""

    def __init__(self, error: OSError) -> None:
        super().__init__(f"cannot read back stored bytes: {error.strerror or error}")
        self.error = error


class ReadBack:
    """
    The running SHA-256 of an upload's stored bytes, read back from its data
    file.  Owned by one writer (L{FilesystemUploadWriter}), which calls
    L{follow} from the reactor thread each time its durable offset grows and
    L{until} before completing; the reads run through C{run} (the storage's
    disk threads), one slice at a time, never two at once.

    It reads through its own duplicate of the data file's descriptor, so the
    writer's close and the read-back never race on one descriptor number.
    """

    def __init__(
        self,
        data_fd: int,
        run: Callable[..., Deferred],
        timings: Callable[[str, float], None] | None = None,
        digest: str = integrity.LEGACY_DIGEST,
    ) -> None:
        """
        @param digest: the upload's digest (a name of
            L{imgresume.integrity.DIGESTS}).
        """
        self._fd: int | None = os.dup(data_fd)
        self._algorithm = digest
        self._run = run
        self._timings = timings
        self._mutex = threading.Lock()
        self._hash = integrity.new_digest(digest)
        #: Bytes from offset 0 read back and hashed so far.
        self.verified = 0
        #: What the writer has made durable, as far as it told us.
        self._durable = 0
        self._running = False
        self._failure: ReadBackFailed | None = None
        self._waiters: list[tuple[int, Deferred[None]]] = []

    # -- reactor thread ----------------------------------------------------

    def follow(self, durable: int) -> None:
        """Bytes up to C{durable} are flushed: verify them in the background."""
        self._durable = max(self._durable, durable)
        if self._running or self._failure is not None or self._fd is None:
            return
        if self.verified >= self._durable:
            return
        self._running = True
        d = self._run(self._advance, self._durable)
        d.addCallbacks(self._advanced, self._failed)

    def until(self, durable: int) -> Deferred[None]:
        """
        A Deferred that fires once bytes up to C{durable} are verified (or
        fails with L{ReadBackFailed}).  The caller must not let the upload
        shrink meanwhile.
        """
        d: Deferred[None] = Deferred()
        self._waiters.append((durable, d))
        self.follow(durable)
        self._wake()
        return d

    def _advanced(self, _: None) -> None:
        self._running = False
        self._wake()
        self.follow(self._durable)

    def _failed(self, failure: Failure) -> None:
        self._running = False
        error = failure.value
        if not isinstance(error, OSError):
            log.failure("read-back of upload bytes failed", failure)
            error = OSError(str(error))
        else:
            log.error(
                "read-back of stored bytes failed at {offset}: {error}",
                offset=self.verified, error=error.strerror or str(error),
            )
        self._failure = ReadBackFailed(error)
        self._wake()

    def _wake(self) -> None:
        waiting = []
        for durable, d in self._waiters:
            if self._failure is not None:
                d.errback(self._failure)
            elif self._fd is None:
                d.errback(ReadBackFailed(OSError("the upload's files are closed")))
            elif self.verified >= durable:
                d.callback(None)
            else:
                waiting.append((durable, d))
        self._waiters = waiting

    # -- disk thread -------------------------------------------------------

    def _advance(self, durable: int) -> None:
        """Read back and hash up to one slice of what lies below C{durable}."""
        started = time.perf_counter()
        with self._mutex:
            fd = self._fd
            if fd is None:
                return
            start = self.verified
            end = min(durable, start + SLICE)
            if end <= start:
                return
            try:
                # What is verified is what is stored, not what this host
                # remembers writing: drop the (clean, flushed) cached pages.
                os.posix_fadvise(fd, start, end - start, os.POSIX_FADV_DONTNEED)
            except (AttributeError, OSError):
                pass
            buffer = _piece_buffer()
            offset = start
            while offset < end:
                n = os.preadv(fd, [buffer[: min(PIECE, end - offset)]], offset)
                if n == 0:
                    raise OSError(
                        0, f"the data file ends at {offset}, below the flushed offset {end}"
                    )
                self._hash.update(buffer[:n])
                offset += n
            self.verified = offset
        if self._timings is not None:
            self._timings("verify", time.perf_counter() - started)

    def received(self, offset: int, data: bytes | memoryview) -> None:
        """
        Bytes written at C{offset} (on the disk thread, in order): hash them
        as received if the read-back has caught up with C{offset}; else the
        read-back reads them later.  Called only with C{verify="received"}.
        """
        if not self._mutex.acquire(blocking=False):
            return  # a read-back slice is running: it (or the next) reads them
        try:
            if self._fd is not None and offset == self.verified:
                self._hash.update(data)
                self.verified += len(data)
        finally:
            self._mutex.release()

    def digest(self) -> bytes:
        """The digest of the bytes verified so far (all of them, after L{until})."""
        with self._mutex:
            return self._hash.copy().digest()

    def reset(self, durable: int) -> None:
        """
        The upload was cut back to C{durable} (stored bytes found corrupt):
        start over from byte 0.  Called on the disk thread.
        """
        with self._mutex:
            self._hash = integrity.new_digest(self._algorithm)
            self.verified = 0
            self._durable = min(self._durable, durable)

    def close(self) -> None:
        """Close the descriptor; waits for a read in progress.  Idempotent."""
        with self._mutex:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None

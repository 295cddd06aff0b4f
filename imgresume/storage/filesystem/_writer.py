# -*- test-case-name: tests.storage.test_filesystem -*-
"""
The writer of one upload in a L{FilesystemStorage
<imgresume.storage.filesystem.FilesystemStorage>}: its data written at
offsets, flushed, then named in the journal (group commit: one flush of each
for a whole batch); a fence against a newer writer; a writer that gives up
for good after a failed flush (poisoning); and, when the stored bytes do not
hash to the declared digest, the search for what storage lost.
"""

from __future__ import annotations

import os
import time
from typing import Any, Callable, Sequence

from twisted.internet import defer
from twisted.internet.defer import Deferred, DeferredLock
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from imgresume import integrity
from imgresume.errors import (
    DigestMismatch,
    ImgresumeError,
    Incomplete,
    InternalError,
    StorageError,
    UploadTakenOver,
)
from imgresume.storage.filesystem import _incomplete
from imgresume.storage.filesystem._durable import NOSPACE, fail, io_errors, pwrite_all
from imgresume.storage.filesystem._journal import RECORD_SIZE, first_bad_record, records
from imgresume.storage.filesystem._layout import (
    Paths,
    algorithms,
    current_generation,
    remove,
    takeover_requested,
    upload_info,
    write_meta,
)
from imgresume.storage.filesystem._locks import Lock
from imgresume.storage.filesystem._publish import finish_completion
from imgresume.storage.filesystem._readback import ReadBack, ReadBackFailed
from imgresume.storage.interfaces import (
    Chunk,
    CompletedUpload,
    IDeclaresSize,
    IUploadWriter,
    TailCheck,
    UploadInfo,
)
from imgresume.storage.rules import batch_end, check_declared_size, expected_digest

# The backend logs as one namespace, imgresume.storage.filesystem.
log = Logger(namespace=__package__)


@implementer(IUploadWriter, IDeclaresSize)
class FilesystemUploadWriter:
    """
    Write ownership of one upload in a L{FilesystemStorage
    <imgresume.storage.filesystem.FilesystemStorage>}: holds its lock and
    its open data and journal files.  Returned by C{FilesystemStorage.create}
    and C{FilesystemStorage.resume}; used by one server connection.  Calls
    are serialised: a C{release()} made while a write is running on the disk
    thread waits for it.

    C{_pwrite}, C{_fdatasync}, C{_fsync} and C{_ftruncate} are the low-level
    functions used on the data and journal files; tests replace them to
    inject failures.
    """

    def __init__(
        self,
        paths: Paths,
        meta: dict[str, Any],
        lock: Lock,
        data_fd: int,
        journal_fd: int,
        offset: int,
        count: int,
        tail: TailCheck,
        generation: int,
        *,
        root: str,
        run: Callable[..., Deferred],
        timings: Callable[[str, float], None] | None,
        on_close: Callable[[str], None],
        verify: str = "stored",
    ) -> None:
        """
        @param root: the storage root (completion links below it).
        @param run: the storage's C{run}: disk work goes through it.
        @param timings: the storage's latency callback, or C{None}.
        @param on_close: called with the upload id once this writer has let
            the upload go (the storage forgets it owns it).
        @param verify: where the whole-file digest comes from: C{"stored"},
            the bytes read back from the data file; C{"received"}, the
            bytes as they are written (see L{ReadBack}).
        """
        self._root = root
        self._run = run
        self._timings = timings
        self._on_close = on_close
        #: This writer's lease generation; a newer owner has a higher one.
        self.generation = generation
        self._paths = paths
        self._meta = meta
        self._lock = lock
        self._data_fd = data_fd
        self._journal_fd = journal_fd
        self._count = count
        self.info: UploadInfo = upload_info(meta)
        self.offset: int = offset
        self.tail: TailCheck = tail
        self._serial = DeferredLock()
        self._closed = False
        self._poisoned: str | None = None
        self._pwrite: Callable[[int, bytes, int], int] = os.pwrite
        self._fdatasync: Callable[[int], None] = os.fdatasync
        self._fsync: Callable[[int], None] = os.fsync
        self._ftruncate: Callable[[int, int], None] = os.ftruncate
        #: The journal records' checksum and the upload's digest.
        self._checksum, digest = algorithms(meta)
        self._readback = ReadBack(data_fd, run, timings, digest)
        self._hash_received = verify == "received"

    def __repr__(self) -> str:
        return (
            f"<FilesystemUploadWriter {self.info.upload_id} "
            f"{self.offset}/{self.info.size}>"
        )

    def _call(self, f: Callable[..., Any], *args: Any) -> Deferred:
        return self._serial.run(self._run, f, *args)

    # -- public API ---------------------------------------------------------

    def write(self, offset: int, data: bytes) -> Deferred[int]:
        """See L{IUploadWriter.write}."""
        return self.write_batch([Chunk(offset, data)])

    def write_batch(self, chunks: Sequence[Chunk]) -> Deferred[int]:
        """See L{IUploadWriter.write_batch}."""
        # Payloads may be any buffer (the decoder hands out memoryviews of
        # the frames it received): written as they are, never copied.
        d = self._call(self._write_sync, list(chunks))
        d.addCallback(self._flushed)
        return d

    def _flushed(self, durable: int) -> int:
        self._readback.follow(durable)
        return durable

    def complete(self, sha256: bytes | None = None) -> Deferred[CompletedUpload]:
        """
        See L{IUploadWriter.complete}.  The stored bytes were read back and
        hashed as they became durable; this waits for the last of them
        (under the writer's lock, so nothing is written meanwhile), then
        checks the digest and moves the file into place.
        """
        try:
            expected = expected_digest(self.info, sha256)
        except (ValueError, ImgresumeError):
            return defer.fail()

        def verified_then_complete() -> Deferred[CompletedUpload]:
            if self._poisoned is not None:  # its read-back stopped with it
                return defer.maybeDeferred(self._check_usable)
            d = self._readback.until(self.offset)
            d.addCallbacks(
                lambda _: self._run(self._complete_sync, expected),
                self._readback_failed,
            )
            return d

        return self._serial.run(verified_then_complete)

    def _readback_failed(self, failure: Failure) -> Failure:
        failure.trap(ReadBackFailed)
        raise StorageError(
            f"cannot read back upload {self.info.upload_id}: {failure.value}; "
            "resume the upload to try again"
        ) from failure.value

    def declare_size(self, size: int) -> Deferred[None]:
        """
        See L{IDeclaresSize.declare_size}: meta.json rewritten durably under
        the upload's lock (the fence checked first), then the client
        index's entry renamed to the new size.
        """
        return self._call(self._declare_size_sync, size)

    def _declare_size_sync(self, size: int) -> None:
        self._check_usable()
        check_declared_size(self.info, self.offset, size)
        self._check_lease()
        meta = {k: v for k, v in self._meta.items() if k != "size_deferred"}
        meta["size"] = size
        try:
            write_meta(self._paths, meta)
        except OSError as e:  # which record is durable is unknown: give up
            raise self._poison(e, "recording the declared size") from e
        old, self._meta = self._meta, meta
        self.info = upload_info(meta)
        try:
            _incomplete.resize(self._root, old, size)
        except StorageError as e:  # a hint: pruned once the upload ends
            log.warn("upload {upload_id}: client index not updated: {error}",
                     upload_id=self.info.upload_id, error=e.message)
        log.info("upload {upload_id}: size declared, {size} bytes",
                 upload_id=self.info.upload_id, size=size)

    def abort(self) -> Deferred[None]:
        """See L{IUploadWriter.abort}."""
        return self._call(self._abort_sync)

    def release(self) -> Deferred[None]:
        """See L{IUploadWriter.release}.  Idempotent; works when poisoned."""
        return self._call(self._close_sync)

    def takeover_requested(self) -> Deferred[bool]:
        """See L{IUploadWriter.takeover_requested}."""
        return self._run(self._takeover_requested_sync)

    def _takeover_requested_sync(self) -> bool:
        if self._closed:
            return False
        return takeover_requested(self._paths, self.generation)

    def _check_lease(self) -> None:
        """
        The fence: refuse to write if a newer writer holds the lease.  The
        lock makes this impossible while it holds; the check catches a lock
        lost behind our back (an NFS lease expired during a partition).  It
        fails closed: a lease that cannot be read refuses the write too, and
        gives the upload up (StorageError, retryable).
        """
        try:
            current = current_generation(self._paths)
        except (OSError, ValueError) as e:
            reason = (e.strerror or str(e)) if isinstance(e, OSError) else str(e)
            self._poisoned = f"reading the lease: {reason}"
            log.error(
                "upload {upload_id}: cannot read its lease ({error}); "
                "refusing to write and giving the upload up",
                upload_id=self.info.upload_id, error=reason,
            )
            self._close_sync()
            raise StorageError(
                f"cannot read the lease of upload {self.info.upload_id} ({reason}): "
                "not writing without knowing this connection still owns it; "
                "resume the upload"
            ) from e
        if current > self.generation:
            self._close_sync()
            log.warn(
                "upload {upload_id}: fenced out (generation {mine}, lease says {current})",
                upload_id=self.info.upload_id, mine=self.generation, current=current,
            )
            raise UploadTakenOver(
                f"upload {self.info.upload_id} was taken over by a newer connection "
                f"(generation {current}); this connection may not write it"
            )

    # -- disk work ----------------------------------------------------------

    def _check_usable(self) -> None:
        if self._poisoned is not None:
            raise StorageError(
                f"writer for upload {self.info.upload_id} is unusable after "
                f"an earlier failure ({self._poisoned}); resume the upload"
            )
        if self._closed:
            raise InternalError(f"writer for upload {self.info.upload_id} is closed")

    def _close_sync(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._readback.close()
        for fd in (self._data_fd, self._journal_fd):
            try:
                os.close(fd)
            except OSError as e:
                log.warn(
                    "upload {upload_id}: close failed: {error}",
                    upload_id=self.info.upload_id,
                    error=e.strerror,
                )
        # Lock last, so a network filesystem's flush-on-close happens while
        # we still own the upload.
        self._lock.release()
        self._on_close(self.info.upload_id)

    def _poison(self, e: OSError, what: str) -> ImgresumeError:
        """
        Make this writer unusable after a failed flush and give up the upload.

        The kernel may have dropped the dirty pages, so a retried fsync that
        succeeds proves nothing; the next owner re-proves the offset from
        what is really stored.
        """
        err = fail(e, f"{what} failed for upload {self.info.upload_id}")
        self._poisoned = f"{what}: {e.strerror or e}"
        log.error(
            "upload {upload_id} writer poisoned: {what} failed: {error}",
            upload_id=self.info.upload_id,
            what=what,
            error=e.strerror or str(e),
        )
        self._close_sync()
        return err

    def _write_sync(self, chunks: list[Chunk]) -> int:
        """
        Store contiguous chunks starting at L{offset} with one flush of the
        data and one of the journal for all of them (group commit): the
        write path's cost is its fsyncs, so a batch costs what one chunk did.
        Returns what is durable: the end of the last chunk.
        """
        self._check_usable()
        end = batch_end(self.info, self.offset, chunks)
        chunks = [chunk for chunk in chunks if chunk.data]
        if not chunks:
            return self.offset
        self._check_lease()
        started = time.perf_counter()
        # 1. the bytes, at their offsets (never O_APPEND), then flush them.
        self._store(self._data_fd, "data", [(chunk.data, chunk.offset) for chunk in chunks])
        if self._hash_received:
            for chunk in chunks:
                self._readback.received(chunk.offset, chunk.data)
        # 2. the journal records naming them, then flush those.
        new = records(chunks, self._checksum)
        self._store(self._journal_fd, "journal", [(b"".join(new), self._count * RECORD_SIZE)])
        # 3. only now is the write acknowledged.
        self._count += len(new)
        self.offset = end
        if self._timings is not None:
            self._timings("write", time.perf_counter() - started)
        return self.offset

    def _store(self, fd: int, what: str, pieces: list[tuple[bytes, int]]) -> None:
        """
        Write each C{(data, offset)} of C{pieces} to C{fd} (the C{what}
        file), then flush it.  Out of space, nothing is acknowledged and the
        writer stays usable; any other failure poisons it.
        """
        try:
            for data, offset in pieces:
                pwrite_all(self._pwrite, fd, data, offset)
        except OSError as e:
            if e.errno in NOSPACE:
                raise fail(e, f"cannot store upload {self.info.upload_id}") from e
            raise self._poison(e, f"writing {what}") from e
        try:
            self._timed_fdatasync(fd)
        except OSError as e:
            raise self._poison(e, f"flushing {what}") from e

    def _timed_fdatasync(self, fd: int) -> None:
        timings = self._timings
        if timings is None:
            self._fdatasync(fd)
            return
        started = time.perf_counter()
        self._fdatasync(fd)
        timings("fdatasync", time.perf_counter() - started)

    def _complete_sync(self, expected: bytes) -> CompletedUpload:
        self._check_usable()
        info = self.info
        if self.offset != info.size:
            raise Incomplete(
                f"upload {info.upload_id} has {self.offset} of {info.size} bytes",
                offset=self.offset,
            )
        digest = self._readback.digest()
        if digest != expected:
            self._mismatch(digest, expected)
        self._check_lease()
        try:
            if os.fstat(self._data_fd).st_size > info.size:
                os.ftruncate(self._data_fd, info.size)
                self._fsync(self._data_fd)
        except OSError as e:
            raise self._poison(e, "trimming data") from e
        self._meta["sha256"] = digest.hex()
        try:
            completed = finish_completion(self._root, self._paths, self._meta)
        except OSError as e:
            # Like a failed data flush: the next resume proves the
            # publication again from fresh opens; this writer is done.
            raise self._poison(e, "publishing the completed file") from e
        self._close_sync()
        log.info(
            "upload {upload_id} completed at {path}",
            upload_id=info.upload_id,
            path=completed.path,
            size=info.size,
        )
        return completed

    def _mismatch(self, digest: bytes, expected: bytes) -> None:
        """
        The stored bytes do not hash to the declared digest: find out whether
        storage lost bytes (resend from the first bad range) or the client's
        source changed (abort).  Always raises.
        """
        info = self.info
        with io_errors(f"cannot verify upload {info.upload_id}"):
            bad = first_bad_record(self._data_fd, self._journal_fd, self._count,
                                   self._checksum)
        if bad is not None:
            index, start = bad
            try:
                # The records first, durably, then the bytes they name: a
                # record must never outlive its bytes (a resume checks only
                # the last record's), the write path's order reversed.
                self._ftruncate(self._journal_fd, index * RECORD_SIZE)
                self._fsync(self._journal_fd)
                self._ftruncate(self._data_fd, start)
                self._fsync(self._data_fd)
            except OSError as e:
                raise self._poison(e, "truncating after corruption") from e
            self.offset = start
            self._count = index
            self._readback.reset(start)
            log.warn(
                "upload {upload_id}: stored bytes at {offset} no longer match "
                "their {checksum}; cut back to {offset}",
                checksum=integrity.title(self._checksum),
                upload_id=info.upload_id,
                offset=start,
            )
            raise Incomplete(
                f"stored bytes from {start} no longer match their checksum; "
                f"resend from {start}",
                offset=start,
            )
        self._abort_sync()
        raise DigestMismatch(
            f"stored bytes hash to {digest.hex()}, not the declared "
            f"{expected.hex()}; every range matched its "
            f"{integrity.title(self._checksum)} as "
            "received, so the source changed during the upload; upload removed"
        )

    def _abort_sync(self) -> None:
        self._check_usable()
        try:
            remove(self._paths)
            _incomplete.forget(self._root, self._meta)
        finally:
            self._close_sync()
        log.info("upload {upload_id} aborted", upload_id=self.info.upload_id)

# -*- test-case-name: tests.storage.test_memory -*-
"""
An in-memory L{IUploadStorage}: fast, synchronous, neither durable nor shared
across processes.

It follows the same rules as the filesystem backend (exclusive writer per
upload, journal of committed ranges, read-back digest check, no-clobber
completion names, completion records kept for resumes) so that the server
and the protocol can be tested against it without a disk.  Several
in-process "servers" share it by sharing the instance.  Every Deferred it
returns has already fired.
"""

from __future__ import annotations

import time
from typing import Callable, Sequence

import attrs
from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from zope.interface import implementer

from imgresume import integrity
from imgresume.errors import (
    DigestMismatch,
    Incomplete,
    InternalError,
    InvalidName,
    NameTaken,
    UnknownUpload,
    UploadAlreadyComplete,
    UploadBusy,
    UploadTakenOver,
)
from imgresume.names import (
    completion_candidates,
    if_exists_policy,
    is_upload_id,
    new_upload_id,
    validate_name,
)
from imgresume.storage.interfaces import (
    ATOMIC_COMPLETE,
    EXCLUSIVE_WRITER,
    Chunk,
    CompletedFileMoved,
    CompletedUpload,
    IDeclaresSize,
    IDeferredSizeStorage,
    IncompleteUploads,
    IUploadWriter,
    NewUpload,
    StoredFile,
    TailCheck,
    UploadInfo,
    UploadStatus,
    WholeUpload,
)
from imgresume.storage.rules import batch_end, check_declared_size, expected_digest

log = Logger()


def _empty_tail(digest: str) -> TailCheck:
    """The tail of an upload with nothing stored: the digest of no bytes."""
    return TailCheck(0, 0, integrity.EMPTY_DIGESTS[digest])


@attrs.define
class _Record:
    offset: int
    length: int
    crc: int


@attrs.define
class _Upload:
    info: UploadInfo
    data: bytearray = attrs.field(factory=bytearray)
    records: list[_Record] = attrs.field(factory=list)
    completed: CompletedUpload | None = None
    #: The object published at C{completed.path}: its identity.
    published: bytes | None = None
    generation: int = 1
    takeover_for: int | None = None


def _run(f: Callable, *args) -> Deferred:
    return defer.maybeDeferred(f, *args)


@implementer(IDeferredSizeStorage)
class MemoryStorage:
    """
    Uploads and completed files held in this process's memory.

    Created by tests and by single-process demos; called by the server
    protocol adapter exactly like L{FilesystemStorage
    <imgresume.storage.filesystem.FilesystemStorage>}.

    @ivar files: completed files, by path relative to the storage root
        (C{"complete/<name>"}, as in L{CompletedUpload.path}).
    """

    guarantees = frozenset({EXCLUSIVE_WRITER, ATOMIC_COMPLETE})

    def __init__(
        self,
        *,
        busy_retry_after: float = 1.0,
        now: Callable[[], float] = time.time,
    ) -> None:
        self._uploads: dict[str, _Upload] = {}
        self._owned: set[str] = set()
        self._busy_retry_after = busy_retry_after
        self._now = now
        self.files: dict[str, bytes] = {}
        #: Each one-step upload, published, by (client_id, upload_id).
        self._whole: dict[tuple[str, str], _Upload] = {}

    def read_completed(self, path: str) -> bytes:
        """Return the bytes of a completed file (C{CompletedUpload.path})."""
        return self.files[path]

    # -- IUploadStorage -----------------------------------------------------

    def create(self, request: NewUpload) -> Deferred[MemoryUploadWriter]:
        """See L{IUploadStorage.create}."""
        return _run(self._create, request)

    def resume(
        self, upload_id: str, client_id: str | None = None
    ) -> Deferred[MemoryUploadWriter]:
        """See L{IUploadStorage.resume}."""
        return _run(self._resume, upload_id, client_id)

    def incomplete_for(
        self, client_id: str, verify: bool = False
    ) -> Deferred[IncompleteUploads]:
        """See L{IUploadStorage.incomplete_for} (always exact here)."""
        sizes = [u.info.size for u in self._uploads.values()
                 if u.completed is None and u.info.client_id == client_id]
        return defer.succeed(IncompleteUploads(len(sizes), sum(sizes)))

    def status(self, upload_id: str, client_id: str | None = None) -> Deferred[UploadStatus]:
        """See L{IUploadStorage.status}."""
        return _run(self._status, upload_id, client_id)

    def find_completed(
        self, name: str, size: int, digest: str = integrity.LEGACY_DIGEST
    ) -> Deferred[StoredFile | None]:
        """See L{IUploadStorage.find_completed}."""
        return _run(self._find_completed, name, size, digest)

    def store_whole(self, request: WholeUpload) -> Deferred[CompletedUpload]:
        """See L{IUploadStorage.store_whole}."""
        return _run(self._store_whole, request)

    def _store_whole(self, request: WholeUpload) -> CompletedUpload:
        if not is_upload_id(request.upload_id) or len(request.sha256) != 32:
            raise ValueError("upload_id must be 32 hex digits and sha256 32 bytes")
        name = validate_name(request.name)
        data = bytes(request.data)
        algorithm = request.digest
        digest = integrity.digest_of(algorithm, data)
        path = "complete/" + name
        there = self.files.get(path)
        if (if_exists_policy(request.metadata) == "skip" and there is not None
                and digest == request.sha256
                and integrity.digest_of(algorithm, there) == digest):
            # Before any repeat: a repeat is skipped as well.
            return CompletedUpload("0" * 32, name, len(there), digest, path, algorithm)
        key = (request.client_id, request.upload_id)
        stored = self._whole.get(key)
        if stored is not None:
            done = stored.completed
            assert done is not None
            if (done.digest, done.sha256) != (algorithm, request.sha256):
                raise DigestMismatch(
                    f"upload {request.upload_id} already stored other bytes at "
                    f"{done.path}; send this file with a new upload id")
            self._check_published(done, stored.published)
            return done
        if digest != request.sha256:
            raise DigestMismatch(
                f"the bytes received hash to {digest.hex()}, not to the "
                f"{integrity.title(algorithm)} declared ({request.sha256.hex()}); "
                "nothing was stored")
        self._check_parents(name)
        upload = _Upload(UploadInfo(
            upload_id=request.upload_id,
            name=name,
            size=len(data),
            sha256=digest,
            metadata=dict(request.metadata),
            client_id=request.client_id,
            created=self._now(),
            digest=algorithm,
        ), data=bytearray(data))
        done = self._complete_file(upload, digest)
        self._whole[key] = upload
        return done

    def _find_completed(self, name: str, size: int, algorithm: str) -> StoredFile | None:
        path = "complete/" + validate_name(name)
        data = self.files.get(path)
        if data is None:
            if any(p.startswith(path + "/") for p in self.files):
                return StoredFile(path, None, None)  # a directory
            return None
        digest = integrity.digest_of(algorithm, data) if len(data) == size else None
        return StoredFile(path, len(data), digest)

    def _status(self, upload_id: str, client_id: str | None) -> UploadStatus:
        upload = self._uploads.get(upload_id) if is_upload_id(upload_id) else None
        if upload is None or (client_id is not None and upload.info.client_id != client_id):
            raise UnknownUpload(f"no upload with id {upload_id}")
        info = upload.info
        if upload.completed is not None:
            return UploadStatus(info.upload_id, info.name, info.size, "complete", info.size,
                                False, "", info.created, info.created, upload.completed.path,
                                info.digest)
        offset = upload.records[-1].offset + upload.records[-1].length if upload.records else 0
        return UploadStatus(info.upload_id, info.name, info.size, "partial", offset,
                            upload_id in self._owned, "", info.created, self._now(),
                            digest=info.digest, size_deferred=info.size_deferred)

    def _create(self, request: NewUpload) -> MemoryUploadWriter:
        name = validate_name(request.name)
        if request.size < 0 or (request.sha256 is not None and len(request.sha256) != 32):
            raise ValueError("size must be >= 0 and sha256 a 32-byte digest or None")
        if request.digest not in integrity.DIGESTS:
            raise ValueError(f"unknown digest {request.digest!r}")
        self._check_parents(name)
        upload_id = new_upload_id()
        info = UploadInfo(
            upload_id=upload_id,
            name=name,
            size=request.size,
            sha256=None if request.sha256 is None else bytes(request.sha256),
            metadata=dict(request.metadata),
            client_id=request.client_id,
            created=self._now(),
            digest=request.digest,
            size_deferred=request.size_deferred,
        )
        self._uploads[upload_id] = _Upload(info)
        self._owned.add(upload_id)
        log.info("upload {upload_id} created: {name!r}, {size} bytes",
                 upload_id=upload_id, name=name, size=request.size)
        return MemoryUploadWriter(self, self._uploads[upload_id], 0, _empty_tail(info.digest))

    def _check_parents(self, name: str) -> None:
        parts = name.split("/")
        for i in range(1, len(parts)):
            prefix = "/".join(parts[:i])
            if "complete/" + prefix in self.files:
                raise InvalidName(
                    f"cannot store below {'complete/' + prefix!r}: it is a "
                    "file, not a directory"
                )

    def _resume(self, upload_id: str, client_id: str | None = None) -> MemoryUploadWriter:
        if not is_upload_id(upload_id):
            raise UnknownUpload(f"malformed upload id {upload_id!r:.80}")
        upload = self._uploads.get(upload_id)
        if upload is None or (client_id is not None and upload.info.client_id != client_id):
            raise UnknownUpload(f"no upload with id {upload_id}")
        if upload.completed is not None:
            self._check_published(upload.completed, upload.published)
            raise UploadAlreadyComplete(upload.completed)
        if upload_id in self._owned:
            upload.takeover_for = upload.generation  # ask the owner to yield
            raise UploadBusy(
                f"upload {upload_id} is being written by another connection",
                retry_after=self._busy_retry_after,
            )
        # Same proof as on disk: drop trailing records whose bytes do not
        # match (they cannot here unless a test corrupted them).
        while upload.records:
            last = upload.records[-1]
            chunk = bytes(upload.data[last.offset : last.offset + last.length])
            if len(chunk) == last.length and integrity.checksum("crc32", chunk) == last.crc:
                tail = TailCheck(last.offset, last.length,
                                 integrity.digest_of(upload.info.digest, chunk))
                break
            upload.records.pop()
        else:
            tail = _empty_tail(upload.info.digest)
        offset = tail.start + tail.length
        truncated = len(upload.data) - offset
        del upload.data[offset:]
        self._owned.add(upload_id)
        upload.generation += 1
        log.info("upload {upload_id} resumed at proven offset {offset} "
                 "({truncated} bytes truncated)",
                 upload_id=upload_id, offset=offset, truncated=truncated)
        return MemoryUploadWriter(self, upload, offset, tail)

    def _check_published(self, done: CompletedUpload, published: bytes | None) -> None:
        """A completion's file must still be at its path (else CompletedFileMoved)."""
        if done.path not in self.files:
            raise CompletedFileMoved(done, "is missing")
        if self.files[done.path] is not published:
            raise CompletedFileMoved(done, "now holds another file")

    def _complete_file(self, upload: _Upload, digest: bytes) -> CompletedUpload:
        info = upload.info
        dirs = {
            "/".join(p.split("/")[:i])
            for p in self.files
            for i in range(1, p.count("/") + 1)
        }
        policy = if_exists_policy(info.metadata)
        for rel in completion_candidates(info.name, info.upload_id, policy):
            path = "complete/" + rel
            if path not in self.files and path not in dirs:
                break
        else:
            if policy == "fail":
                raise NameTaken(f"complete/{info.name} already exists (if-exists=fail); "
                                "the upload is kept")
            raise InvalidName(f"no free name for {info.name!r}")  # pragma: no cover
        self._check_parents(rel)
        self.files[path] = upload.published = bytes(upload.data)
        upload.completed = CompletedUpload(
            upload_id=info.upload_id,
            name=info.name,
            size=info.size,
            sha256=digest,
            path=path,
            digest=info.digest,
        )
        upload.data = bytearray()
        upload.records = []
        return upload.completed


@implementer(IUploadWriter, IDeclaresSize)
class MemoryUploadWriter:
    """
    Write ownership of one upload in a L{MemoryStorage}.  Returned by
    L{MemoryStorage.create} and L{MemoryStorage.resume}; used by one server
    connection.
    """

    def __init__(
        self, storage: MemoryStorage, upload: _Upload, offset: int, tail: TailCheck
    ) -> None:
        self._storage = storage
        self._upload = upload
        self.info: UploadInfo = upload.info
        self.offset: int = offset
        self.tail: TailCheck = tail
        self.generation = upload.generation
        self._closed = False

    def _check_open(self) -> None:
        if self._closed:
            raise InternalError(
                f"writer for upload {self.info.upload_id} is closed"
            )

    def _check_current(self) -> None:
        """Refuse (and close) a writer whose upload a newer one took over."""
        if self._upload.generation != self.generation:
            self._close()
            raise UploadTakenOver(
                f"upload {self.info.upload_id} was taken over by a newer connection")

    def _close(self) -> None:
        if not self._closed:
            self._closed = True
            self._storage._owned.discard(self.info.upload_id)

    def write(self, offset: int, data: bytes) -> Deferred[int]:
        """See L{IUploadWriter.write}."""
        return _run(self._write, offset, data)

    def write_batch(self, chunks: Sequence[Chunk]) -> Deferred[int]:
        """See L{IUploadWriter.write_batch}."""
        def write_all() -> int:
            batch_end(self.info, self.offset, chunks)  # all or nothing
            for chunk in chunks:
                self._write(chunk.offset, chunk.data)
            return self.offset

        return _run(write_all)

    def _write(self, offset: int, data: bytes) -> int:
        self._check_open()
        batch_end(self.info, self.offset, [Chunk(offset, data)])
        if not data:
            return self.offset
        self._check_current()
        self._upload.data[offset:] = data
        self._upload.records.append(
            _Record(offset, len(data), integrity.checksum("crc32", data)))
        self.offset += len(data)
        return self.offset

    def declare_size(self, size: int) -> Deferred[None]:
        """See L{IDeclaresSize.declare_size}."""
        return _run(self._declare_size, size)

    def _declare_size(self, size: int) -> None:
        self._check_open()
        check_declared_size(self.info, self.offset, size)
        self._check_current()
        self.info = self._upload.info = attrs.evolve(
            self.info, size=size, size_deferred=False)

    def complete(self, sha256: bytes | None = None) -> Deferred[CompletedUpload]:
        """See L{IUploadWriter.complete}."""
        return _run(self._complete, sha256)

    def _complete(self, sha256: bytes | None) -> CompletedUpload:
        self._check_open()
        info = self.info
        expected = expected_digest(info, sha256)
        if self.offset != info.size:
            raise Incomplete(
                f"upload {info.upload_id} has {self.offset} of {info.size} "
                "bytes",
                offset=self.offset,
            )
        data = self._upload.data
        digest = integrity.digest_of(info.digest, data)
        if len(data) != info.size or digest != expected:
            for i, rec in enumerate(self._upload.records):
                chunk = bytes(data[rec.offset : rec.offset + rec.length])
                if len(chunk) != rec.length or integrity.checksum("crc32", chunk) != rec.crc:
                    del self._upload.records[i:]
                    del data[rec.offset :]
                    self.offset = rec.offset
                    log.warn(
                        "upload {upload_id}: stored range at {offset} no "
                        "longer matches its CRC-32; truncated",
                        upload_id=info.upload_id,
                        offset=rec.offset,
                    )
                    raise Incomplete(
                        f"stored bytes at {rec.offset}..{rec.offset + rec.length}"
                        " no longer match their checksum; resend from "
                        f"{rec.offset}",
                        offset=rec.offset,
                    )
            self._remove()
            raise DigestMismatch(
                f"stored bytes hash to {digest.hex()}, not the declared "
                f"{expected.hex()}; every range matched its CRC-32, so the "
                "source changed during the upload; upload removed"
            )
        completed = self._storage._complete_file(self._upload, expected)
        self._close()
        log.info("upload {upload_id} completed at {path}",
                 upload_id=info.upload_id, path=completed.path)
        return completed

    def _remove(self) -> None:
        self._storage._uploads.pop(self.info.upload_id, None)
        self._close()

    def abort(self) -> Deferred[None]:
        """See L{IUploadWriter.abort}."""
        return _run(self._abort)

    def _abort(self) -> None:
        self._check_open()
        self._remove()
        log.info("upload {upload_id} aborted", upload_id=self.info.upload_id)

    def release(self) -> Deferred[None]:
        """See L{IUploadWriter.release}.  Idempotent."""
        return _run(self._close)

    def takeover_requested(self) -> Deferred[bool]:
        """See L{IUploadWriter.takeover_requested}."""
        return defer.succeed(
            not self._closed and self._upload.takeover_for == self.generation
        )

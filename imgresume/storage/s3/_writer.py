# -*- test-case-name: tests.storage.test_s3 -*-
"""
The writer of one upload in an S3 storage: bytes gathered in a spool of at
most one part, each full part stored with UploadPart (and its Content-MD5)
then recorded, the lease checked before each part (the fence) and its
heartbeat kept, and completion through CompleteMultipartUpload.
"""

from __future__ import annotations

import base64
import hashlib
import io
import tempfile
from typing import Any, Callable, Sequence

from twisted.internet import defer
from twisted.internet.defer import Deferred, DeferredLock
from twisted.logger import Logger
from zope.interface import implementer

from imgresume import integrity
from imgresume.errors import (
    DigestMismatch,
    Incomplete,
    InternalError,
    SizeExceeded,
    StorageError,
    UploadTakenOver,
)
from imgresume.storage.interfaces import (
    Chunk,
    CompletedUpload,
    IDeclaresSize,
    IUploadWriter,
    TailCheck,
    UploadInfo,
)
from imgresume.storage.rules import batch_end, check_declared_size, expected_digest
from imgresume.storage.s3 import _incomplete
from imgresume.storage.s3._bucket import Bucket, guard
from imgresume.storage.s3._leases import Leases
from imgresume.storage.s3._publish import (
    completed_upload,
    finish_completion,
    record_format,
    remove,
    upload_info,
)

# The backend logs as one namespace, imgresume.storage.s3.
log = Logger(namespace=__package__)


@implementer(IUploadWriter, IDeclaresSize)
class S3UploadWriter:
    """
    Write ownership of one upload in an L{S3Storage
    <imgresume.storage.s3.S3Storage>}.  Returned by C{S3Storage.create} and
    C{S3Storage.resume}; used by one connection.

    L{offset} is where the next write starts; the Deferreds of L{write} and
    L{write_batch} fire with L{durable}: the end of the last stored part.
    The bytes in between wait in a spool of at most one part.
    """

    def __init__(self, meta: dict[str, Any], parts: list[dict[str, Any]],
                 generation: int, tail: TailCheck, *, bucket: Bucket, leases: Leases,
                 run: Callable[..., Deferred], spool_dir: str | None) -> None:
        """
        @param bucket: where the upload's records and parts are.
        @param leases: the storage's leases (the fence, the heartbeat).
        @param run: the storage's C{run}: every S3 call goes through it.
        @param spool_dir: keep the unfinished part in a temporary file there
            instead of in memory.
        """
        self._bucket = bucket
        self._leases = leases
        self._run = run
        self._meta = meta
        self._parts = parts
        self.info: UploadInfo = upload_info(meta)
        self.part_size: int = meta["part_size"]
        #: What is durable: the end of the last stored part.
        self.durable: int = sum(p["size"] for p in parts)
        self.offset: int = self.durable
        self.tail = tail
        self.generation = generation
        self._closed = False
        self._poisoned = False
        self._heartbeat = leases.now()
        self._lock = DeferredLock()
        if spool_dir is None:
            self._spool: Any = io.BytesIO()
        else:
            self._spool = tempfile.TemporaryFile(dir=spool_dir)

    def _call(self, what: str, f: Callable[..., Any], *args: Any) -> Deferred:
        return self._lock.run(self._run, guard,
                              f"{what} upload {self.info.upload_id}", f, *args)

    # -- IUploadWriter -------------------------------------------------------

    def write(self, offset: int, data: bytes) -> Deferred[int]:
        """See L{IUploadWriter.write}."""
        return self._call("cannot write", self._write_sync, [Chunk(offset, data)])

    def write_batch(self, chunks: Sequence[Chunk]) -> Deferred[int]:
        """See L{IUploadWriter.write_batch}."""
        return self._call("cannot write", self._write_sync, list(chunks))

    def complete(self, sha256: bytes | None = None) -> Deferred[CompletedUpload]:
        """See L{IUploadWriter.complete}."""
        try:
            expected = expected_digest(self.info, sha256)
        except (ValueError, Incomplete):
            return defer.fail()
        return self._call("cannot complete", self._complete_sync, expected)

    def complete_as_stored(self) -> Deferred[CompletedUpload]:
        """
        Complete an upload created without a digest with the digest of
        what is stored: the assembled object is read back and each part
        checked against the digest recorded from the bytes received
        (L{finish_completion}).  Not part of L{IUploadWriter}: the tus
        door's completion of an upload whose bytes came through several
        servers and without a client digest (C{docs/http.md}).
        """
        if self.info.sha256 is not None:
            return self.complete()
        return self._call("cannot complete", self._complete_sync, None)

    def declare_size(self, size: int) -> Deferred[None]:
        """
        See L{IDeclaresSize.declare_size}: meta.json rewritten after the
        fence, the client index's entry renamed, and the spool stored as
        the last part if it ends there.  The part size stays the one chosen
        from the bound at creation.
        """
        try:  # a refusal is the caller's error, not the store's (guard)
            check_declared_size(self.info, self.offset, size)
        except (ValueError, SizeExceeded):
            return defer.fail()
        return self._call("cannot declare the size of", self._declare_size_sync, size)

    def _declare_size_sync(self, size: int) -> None:
        self._check_open()
        check_declared_size(self.info, self.offset, size)
        self._fence()
        meta = {k: v for k, v in self._meta.items() if k != "size_deferred"}
        meta["size"] = size
        meta["version"] = record_format(meta)
        self._bucket.put_json(self._key("meta.json"), meta)
        old, self._meta = self._meta, meta
        self.info = upload_info(meta)
        _incomplete.resize(self._bucket, old, size)
        if self.offset == size and self.offset > self.durable:
            self._store_part()  # the last, short part
        log.info("upload {upload_id}: size declared, {size} bytes",
                 upload_id=self.info.upload_id, size=size)

    def abort(self) -> Deferred[None]:
        """See L{IUploadWriter.abort}."""
        return self._call("cannot abort", self._abort_sync)

    def release(self) -> Deferred[None]:
        """See L{IUploadWriter.release}.  Idempotent."""
        return self._call("cannot release", self._close_sync)

    def takeover_requested(self) -> Deferred[bool]:
        """See L{IUploadWriter.takeover_requested}; also renews the lease."""
        return self._call("cannot poll", self._takeover_sync)

    # -- blocking implementations -------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise InternalError(f"writer for upload {self.info.upload_id} is closed")
        if self._poisoned:
            raise StorageError(f"upload {self.info.upload_id}: an earlier store failed; "
                               "resume to continue")

    def _key(self, rel: str) -> str:
        return self._bucket.upload_key(self.info.upload_id, rel)

    def _fence(self) -> None:
        """Fail with UploadTakenOver if a newer generation holds the lease."""
        if self._leases.newer_exists(self.info.upload_id, self.generation):
            self._close_sync(release=False)
            raise UploadTakenOver(
                f"upload {self.info.upload_id} was taken over by a newer connection")
        self._renew()

    def _renew(self) -> None:
        """Refresh the lease's heartbeat if a third of its lifetime has passed."""
        self._heartbeat = self._leases.renew(
            self.info.upload_id, self.generation, self._heartbeat)

    def _write_sync(self, chunks: list[Chunk]) -> int:
        self._check_open()
        info = self.info
        if batch_end(info, self.offset, chunks) == self.offset:
            return self.durable
        self._renew()
        for chunk in chunks:
            view = memoryview(chunk.data)
            while view:
                room = self.part_size - (self.offset - self.durable)
                piece = view[:room]
                self._spool.write(piece)
                self.offset += len(piece)
                view = view[len(piece):]
                if self.offset - self.durable == self.part_size:
                    self._store_part()
        if self.offset == info.size and self.offset > self.durable:
            self._store_part()  # the last, short part
        return self.durable

    def _store_part(self) -> None:
        """UploadPart the spool (with Content-MD5), then record it."""
        b = self._bucket
        self._fence()
        self._spool.seek(0)
        data = self._spool.read()
        number = len(self._parts) + 1
        md5 = hashlib.md5(data)
        try:
            answer = b.client.upload_part(
                Bucket=b.name, Key=self._key("object"),
                UploadId=self._meta["multipart_upload_id"], PartNumber=number,
                Body=data, ContentMD5=base64.b64encode(md5.digest()).decode())
            if answer["ETag"].strip('"') != md5.hexdigest():
                raise StorageError(f"part {number}: the store's ETag is not the MD5 sent")
            record = {"number": number, "start": self.durable, "size": len(data),
                      "md5": md5.hexdigest(), "sha256": integrity.digest_of(self.info.digest, data).hex()}
            b.put_json(self._key(f"parts/{number:05d}.json"), record)
        except BaseException:
            # Keep the spool: the same call may be retried on a resume, but
            # this writer is done (the client re-sends from the durable offset).
            self._poisoned = True
            raise
        self._parts.append(record)
        self.durable += len(data)
        self._spool.seek(0)
        self._spool.truncate()

    def _complete_sync(self, expected: bytes | None) -> CompletedUpload:
        self._check_open()
        b = self._bucket
        info = self.info
        if self.offset != info.size:
            raise Incomplete(f"upload {info.upload_id} has {self.offset} of "
                             f"{info.size} bytes", offset=self.offset)
        if info.size == 0 and not self._parts:
            self._store_part()  # S3 wants at least one part
        self._fence()
        if self._meta["sha256"] is None and expected is not None:
            # Given at the end: record it before the object is assembled, so
            # a completion interrupted after that is finished (and checked)
            # by the next resume.
            self._meta["sha256"] = expected.hex()
            self._meta["version"] = record_format(self._meta)
            b.put_json(self._key("meta.json"), self._meta)
        key = self._key("object")
        b.client.complete_multipart_upload(
            Bucket=b.name, Key=key, UploadId=self._meta["multipart_upload_id"],
            MultipartUpload={"Parts": [
                {"PartNumber": p["number"], "ETag": f'"{p["md5"]}"'} for p in self._parts]})
        # radosgw answers an empty ETag here: the object is read back instead,
        # which is also the proof that the stored bytes are the declared ones.
        try:
            completed = finish_completion(b, self._meta, self._leases.now)
        except DigestMismatch:
            self._close_sync(release=False)
            raise
        path = completed.path
        self._closed = True
        self._spool.close()
        log.info("upload {upload_id} completed at {path} in s3",
                 upload_id=info.upload_id, path=path)
        return completed_upload(self._meta, path)

    def _abort_sync(self) -> None:
        self._check_open()
        try:
            remove(self._bucket, self._meta)
        finally:
            self._close_sync(release=False)
        log.info("upload {upload_id} aborted", upload_id=self.info.upload_id)

    def _close_sync(self, release: bool = True) -> None:
        if self._closed:
            return
        self._closed = True
        self._spool.close()
        if release:
            self._leases.release(self.info.upload_id, self.generation)

    def _takeover_sync(self) -> bool:
        if self._closed:
            return False
        if self._leases.takeover_requested(self.info.upload_id, self.generation):
            return True
        self._renew()
        return False

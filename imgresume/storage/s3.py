# -*- test-case-name: tests.storage.test_s3 -*-
"""
The S3 L{IUploadStorage}: uploads kept in an S3-compatible object store
(AWS S3, Ceph radosgw, MinIO), shared by every server that points at the
same bucket and prefix.  See C{docs/s3.md} for the design and its limits.

Layout under C{s3://BUCKET/PREFIX/}::

    incoming/<id>/meta.json        what the upload is; its multipart UploadId
    incoming/<id>/object           target of the multipart upload (staging)
    incoming/<id>/parts/<n>.json   size, MD5 and SHA-256 of stored part n
    incoming/<id>/lease/<gen>      writer generations (created with If-None-Match)
    incoming/<id>/takeover/<gen>   a newer connection asks generation <gen> to yield
    incoming/<id>/done.json        completion record (the final path)
    names/<path>                   claim of a final name (If-None-Match: *)
    complete/<path>                finished objects

Nothing about an upload lives in a server's memory or disk except the bytes
of the current, unfinished part (bounded by the part size): any server can
resume any upload from the bucket alone.  Every boto3 call blocks, so all of
them run through the C{run} callable (a thread pool in the server).
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import tempfile
import time
from typing import Any, Callable, Sequence
from urllib.parse import urlsplit

from twisted.internet import defer
from twisted.internet.defer import Deferred, DeferredLock
from twisted.logger import Logger
from zope.interface import implementer

from imgresume.errors import (
    DigestMismatch,
    ImgresumeError,
    Incomplete,
    InternalError,
    InvalidName,
    OffsetMismatch,
    SizeExceeded,
    StorageError,
    UnknownUpload,
    UploadAlreadyComplete,
    UploadBusy,
    UploadTakenOver,
)
from imgresume.storage._ids import is_upload_id, new_upload_id
from imgresume.storage._names import completion_candidates, validate_name
from imgresume.storage.interfaces import (
    ATOMIC_COMPLETE,
    DURABLE_ACK,
    PROVEN_OFFSET,
    SHARED,
    CompletedUpload,
    IUploadStorage,
    IUploadWriter,
    NewUpload,
    TailCheck,
    UploadInfo,
    UploadStatus,
    expected_digest,
)

log = Logger()

MiB = 1 << 20
#: S3's smallest part (all but the last) and its greatest part count.
MIN_PART_SIZE = 5 * MiB
MAX_PARTS = 10_000
#: Version of meta.json.
FORMAT_VERSION = 1
#: S3's longest key, in UTF-8 bytes.
MAX_KEY_BYTES = 1024
#: Read size when hashing a stored object.
READ_CHUNK = 8 * MiB

_EMPTY_TAIL = TailCheck(0, 0, hashlib.sha256(b"").digest())
_MISSING = frozenset({"NoSuchKey", "NoSuchUpload", "404", "NotFound"})


def part_size_for(size: int, minimum: int = MIN_PART_SIZE) -> int:
    """
    The part size for a file of C{size} bytes: at least C{minimum}, and
    large enough (rounded up to a whole MiB) that the file fits in
    L{MAX_PARTS} parts.
    """
    needed = -(-size // MAX_PARTS)
    needed = -(-needed // MiB) * MiB
    return max(minimum, needed)


def parse_url(url: str) -> tuple[str, str]:
    """
    Split C{s3://BUCKET/PREFIX} into the bucket and the key prefix (empty,
    or ending with "/").

    @raise ValueError: not an s3:// URL with a bucket.
    """
    parts = urlsplit(url)
    if parts.scheme != "s3" or not parts.netloc:
        raise ValueError(f"not an s3://BUCKET/PREFIX URL: {url!r}")
    prefix = parts.path.strip("/")
    return parts.netloc, (prefix + "/" if prefix else "")


def _code(e: BaseException) -> str:
    response = getattr(e, "response", None) or {}
    return str(response.get("Error", {}).get("Code", ""))


def _missing(e: BaseException) -> bool:
    return _code(e) in _MISSING


def _precondition_failed(e: BaseException) -> bool:
    return _code(e) in ("PreconditionFailed", "412", "ConditionalRequestConflict")


def _default_run(f: Callable[..., Any], *args: Any) -> Deferred:
    from twisted.internet.threads import deferToThread

    return deferToThread(f, *args)


def _guard(what: str, f: Callable[..., Any], *args: Any) -> Any:
    """Call C{f}; map any non-imgresume failure to a L{StorageError}."""
    try:
        return f(*args)
    except ImgresumeError:
        raise
    except Exception as e:
        code = _code(e) or type(e).__name__
        log.failure("S3 storage: {what}", what=what)
        raise StorageError(f"{what}: {code}") from e


@implementer(IUploadStorage)
class S3Storage:
    """
    Uploads as S3 multipart uploads, their state in the bucket itself.

    Created by L{imgresume.server.makeServerService} for C{--storage
    s3://...}; called by the server protocol adapter.

    @ivar commit_granularity: the smallest part size this storage uses; a
        write is acknowledged only up to a part boundary (or the end).
    """

    guarantees = frozenset({DURABLE_ACK, SHARED, PROVEN_OFFSET, ATOMIC_COMPLETE})

    def __init__(
        self,
        url: str,
        run: Callable[..., Deferred] = _default_run,
        *,
        client: Any = None,
        part_size: int | None = None,
        spool_dir: str | None = None,
        owner: str = "",
        lease_ttl: float = 15.0,
        busy_retry_after: float = 1.0,
        now: Callable[[], float] = time.time,
        endpoint_url: str | None = None,
        region: str | None = None,
    ) -> None:
        """
        @param url: C{s3://BUCKET/PREFIX}.
        @param run: runs a blocking callable off the reactor thread and
            returns a Deferred of its result.
        @param client: a boto3 S3 client (default: one built from
            C{endpoint_url}, C{region} and the usual AWS_* environment).
        @param part_size: the smallest part size (default 5 MiB, S3's
            minimum); larger files get larger parts, see L{part_size_for}.
        @param spool_dir: keep the unfinished part in a temporary file
            there instead of in memory.
        @param lease_ttl: seconds after its last heartbeat that a writer's
            lease is considered abandoned (its server died).
        """
        self.bucket, self.prefix = parse_url(url)
        if client is None:
            import boto3

            client = boto3.client("s3", endpoint_url=endpoint_url, region_name=region)
        self.client = client
        self._run = run
        self.commit_granularity = part_size or MIN_PART_SIZE
        self._spool_dir = spool_dir
        self._owner = owner
        self._lease_ttl = lease_ttl
        self._busy_retry_after = busy_retry_after
        self._now = now

    # -- keys ----------------------------------------------------------------

    def _key(self, rel: str) -> str:
        return self.prefix + rel

    def _ukey(self, upload_id: str, rel: str) -> str:
        return f"{self.prefix}incoming/{upload_id}/{rel}"

    # -- small objects -------------------------------------------------------

    def _get_json(self, key: str) -> dict[str, Any] | None:
        try:
            body = self.client.get_object(Bucket=self.bucket, Key=key)["Body"].read()
        except Exception as e:
            if _missing(e):
                return None
            raise
        try:
            value = json.loads(body)
        except ValueError:
            raise StorageError(f"unreadable record {key!r}") from None
        return value if isinstance(value, dict) else None

    def _put_json(self, key: str, value: dict[str, Any], exclusive: bool = False) -> bool:
        """Store a JSON record; with C{exclusive}, only if the key is new."""
        kw: dict[str, Any] = {"IfNoneMatch": "*"} if exclusive else {}
        try:
            self.client.put_object(
                Bucket=self.bucket, Key=key, Body=json.dumps(value).encode(),
                ContentType="application/json", **kw)
        except Exception as e:
            if exclusive and _precondition_failed(e):
                return False
            raise
        return True

    def _exists(self, key: str) -> bool:
        try:
            self.client.head_object(Bucket=self.bucket, Key=key)
        except Exception as e:
            if _missing(e):
                return False
            raise
        return True

    def _list(self, prefix: str, start_after: str = "", limit: int = 0) -> list[str]:
        keys: list[str] = []
        kw: dict[str, Any] = {"Bucket": self.bucket, "Prefix": prefix}
        if start_after:
            kw["StartAfter"] = start_after
        if limit:
            kw["MaxKeys"] = limit
        while True:
            page = self.client.list_objects_v2(**kw)
            keys.extend(o["Key"] for o in page.get("Contents", ()))
            if limit and len(keys) >= limit:
                return keys[:limit]
            if not page.get("IsTruncated"):
                return keys
            kw["ContinuationToken"] = page["NextContinuationToken"]

    def _delete_prefix(self, prefix: str, keep: Sequence[str] = ()) -> None:
        keys = [k for k in self._list(prefix) if k not in keep]
        for i in range(0, len(keys), 1000):
            self.client.delete_objects(
                Bucket=self.bucket,
                Delete={"Objects": [{"Key": k} for k in keys[i : i + 1000]],
                        "Quiet": True})

    def read_completed(self, path: str) -> bytes:
        """Return the bytes of a completed object (blocking; for tests and tools)."""
        return self.client.get_object(Bucket=self.bucket, Key=self._key(path))["Body"].read()

    # -- IUploadStorage ------------------------------------------------------

    def create(self, request: NewUpload) -> Deferred[S3UploadWriter]:
        """See L{IUploadStorage.create}."""
        return self._run(_guard, "cannot create upload", self._create_sync, request)

    def resume(self, upload_id: str, client_id: str | None = None) -> Deferred[S3UploadWriter]:
        """See L{IUploadStorage.resume}."""
        return self._run(_guard, f"cannot resume upload {upload_id!r:.40}",
                         self._resume_sync, upload_id, client_id)

    def status(self, upload_id: str, client_id: str | None = None) -> Deferred[UploadStatus]:
        """See L{IUploadStorage.status}."""
        return self._run(_guard, f"cannot read upload {upload_id!r:.40}",
                         self._status_sync, upload_id, client_id)

    def expire(self, older_than: float) -> Deferred[list[str]]:
        """
        Abort every partial upload under the prefix whose multipart upload
        started more than C{older_than} seconds ago and remove its records
        (what the bucket lifecycle rule in C{docs/s3.md} does too).

        @return: Deferred firing with the ids of the removed uploads.
        """
        return self._run(_guard, "cannot expire uploads", self._expire_sync, older_than)

    # -- blocking implementations -------------------------------------------

    def _check_parents(self, name: str) -> None:
        parts = name.split("/")
        for i in range(1, len(parts)):
            parent = "complete/" + "/".join(parts[:i])
            if self._exists(self._key(parent)):
                raise InvalidName(
                    f"cannot store below {parent!r}: it is a file, not a directory")

    def _create_sync(self, request: NewUpload) -> S3UploadWriter:
        name = validate_name(request.name)
        if len(self._key("complete/" + name).encode()) > MAX_KEY_BYTES:
            raise InvalidName(
                f"name {name[:60]!r}... is too long for this S3 storage: its key "
                f"would pass S3's {MAX_KEY_BYTES} bytes")
        if request.size < 0 or (request.sha256 is not None and len(request.sha256) != 32):
            raise ValueError("size must be >= 0 and sha256 a 32-byte digest or None")
        self._check_parents(name)
        upload_id = new_upload_id()
        part_size = part_size_for(request.size, self.commit_granularity)
        mpu = self.client.create_multipart_upload(
            Bucket=self.bucket, Key=self._ukey(upload_id, "object"))["UploadId"]
        meta = {
            "version": FORMAT_VERSION,
            "upload_id": upload_id,
            "name": name,
            "size": request.size,
            "sha256": None if request.sha256 is None else request.sha256.hex(),
            "metadata": dict(request.metadata),
            "client_id": request.client_id,
            "created": self._now(),
            "multipart_upload_id": mpu,
            "part_size": part_size,
        }
        self._put_json(self._ukey(upload_id, "meta.json"), meta)
        generation = self._take_lease(upload_id, 0)
        log.info("upload {upload_id} created in s3: {name!r}, {size} bytes, "
                 "parts of {part_size}", upload_id=upload_id, name=name,
                 size=request.size, part_size=part_size)
        return S3UploadWriter(self, meta, [], generation, _EMPTY_TAIL)

    def _meta(self, upload_id: Any, client_id: str | None) -> dict[str, Any]:
        if not is_upload_id(upload_id):
            raise UnknownUpload(f"malformed upload id {upload_id!r:.80}")
        meta = self._get_json(self._ukey(upload_id, "meta.json"))
        if meta is None or (client_id is not None and meta.get("client_id") != client_id):
            raise UnknownUpload(f"no upload with id {upload_id}")
        if meta.get("version") != FORMAT_VERSION:
            raise StorageError(f"upload {upload_id}: unknown record version")
        return meta

    def _completed(self, meta: dict[str, Any]) -> CompletedUpload | None:
        """The completion record of an upload, if it has one."""
        upload_id = meta["upload_id"]
        done = self._get_json(self._ukey(upload_id, "done.json"))
        if done is not None:
            return _completed_upload(meta, done["path"])
        return None

    def _lease(self, upload_id: str) -> tuple[int, dict[str, Any] | None]:
        keys = self._list(self._ukey(upload_id, "lease/"))
        if not keys:
            return 0, None
        last = max(keys)
        return int(last.rsplit("/", 1)[1]), self._get_json(last)

    def _fresh(self, lease: dict[str, Any] | None) -> bool:
        return (lease is not None and lease.get("state") == "held"
                and self._now() - float(lease.get("heartbeat", 0)) < self._lease_ttl)

    def _take_lease(self, upload_id: str, current: int) -> int:
        generation = current + 1
        record = {"owner": self._owner, "state": "held", "heartbeat": self._now()}
        if not self._put_json(self._ukey(upload_id, f"lease/{generation:010d}"),
                              record, exclusive=True):
            raise self._busy(upload_id)
        return generation

    def _busy(self, upload_id: str) -> UploadBusy:
        return UploadBusy(f"upload {upload_id} is being written by another connection",
                          retry_after=self._busy_retry_after)

    def _list_parts(self, meta: dict[str, Any]) -> list[dict[str, Any]] | None:
        """Every part of the multipart upload, paged; None if it is gone."""
        parts: list[dict[str, Any]] = []
        kw = {"Bucket": self.bucket, "Key": self._ukey(meta["upload_id"], "object"),
              "UploadId": meta["multipart_upload_id"]}
        while True:
            try:
                page = self.client.list_parts(**kw)
            except Exception as e:
                # radosgw answers NoSuchKey where AWS answers NoSuchUpload.
                if _missing(e):
                    return None
                raise
            parts.extend(page.get("Parts", ()))
            if not page.get("IsTruncated"):
                return parts
            kw["PartNumberMarker"] = page["NextPartNumberMarker"]

    def _proven_parts(self, meta: dict[str, Any]) -> list[dict[str, Any]] | None:
        """
        The parts from 1 on, in order and without a gap, whose stored size and
        ETag (the MD5 the store computed, checked against Content-MD5 on
        receipt) match the record written after each part was stored.
        """
        listed = self._list_parts(meta)
        if listed is None:
            return None
        by_number = {p["PartNumber"]: p for p in listed}
        size, part_size = meta["size"], meta["part_size"]
        proven: list[dict[str, Any]] = []
        number = 1
        while number in by_number:
            part = by_number[number]
            start = (number - 1) * part_size
            expected = min(part_size, size - start)
            record = self._get_json(self._ukey(meta["upload_id"], f"parts/{number:05d}.json"))
            if (record is None or part["Size"] != expected or record["size"] != expected
                    or part["ETag"].strip('"') != record["md5"]):
                break
            proven.append(record)
            number += 1
        return proven

    def _resume_sync(self, upload_id: str, client_id: str | None) -> S3UploadWriter:
        meta = self._meta(upload_id, client_id)
        completed = self._completed(meta)
        if completed is not None:
            raise UploadAlreadyComplete(completed)
        current, lease = self._lease(upload_id)
        if self._fresh(lease):
            self._put_json(self._ukey(upload_id, f"takeover/{current:010d}"), {})
            raise self._busy(upload_id)
        generation = self._take_lease(upload_id, current)
        try:
            parts = self._proven_parts(meta)
            if parts is None and self._exists(self._ukey(upload_id, "object")):
                # A completion interrupted after CompleteMultipartUpload:
                # finish it (its records, this lease included, are removed).
                raise UploadAlreadyComplete(self._finish_completion(meta))
        except UploadAlreadyComplete:
            raise
        except BaseException:
            self._release_lease(upload_id, generation)
            raise
        if parts is None:
            self._release_lease(upload_id, generation)
            raise UnknownUpload(f"no upload with id {upload_id}")
        if parts:
            last = parts[-1]
            tail = TailCheck(last["start"], last["size"], bytes.fromhex(last["sha256"]))
        else:
            tail = _EMPTY_TAIL
        log.info("upload {upload_id} resumed from s3 at proven offset {offset}",
                 upload_id=upload_id, offset=tail.start + tail.length)
        return S3UploadWriter(self, meta, parts, generation, tail)

    def _release_lease(self, upload_id: str, generation: int) -> None:
        self._put_json(self._ukey(upload_id, f"lease/{generation:010d}"),
                       {"owner": self._owner, "state": "released",
                        "heartbeat": self._now()})

    def _status_sync(self, upload_id: str, client_id: str | None) -> UploadStatus:
        meta = self._meta(upload_id, client_id)
        info = _info(meta)
        completed = self._completed(meta)
        if completed is not None:
            return UploadStatus(upload_id, info.name, info.size, "complete", info.size,
                                False, "", info.created, info.created, completed.path)
        _, lease = self._lease(upload_id)
        parts = self._proven_parts(meta) or []
        offset = sum(p["size"] for p in parts)
        return UploadStatus(upload_id, info.name, info.size, "partial", offset,
                            self._fresh(lease), (lease or {}).get("owner", ""),
                            info.created, float((lease or {}).get("heartbeat", info.created)))

    def _claim_name(self, meta: dict[str, Any]) -> str:
        """
        Claim the first free final path for an upload: C{names/<path>} is
        created with If-None-Match, so two servers never pick the same path;
        a path where an object, or objects below it, already exist is skipped.
        """
        upload_id = meta["upload_id"]
        for rel in completion_candidates(meta["name"], upload_id):
            path = "complete/" + rel
            if len(self._key(path).encode()) > MAX_KEY_BYTES:
                continue
            claim = self._key("names/" + rel)
            if not self._put_json(claim, {"upload_id": upload_id}, exclusive=True):
                owner = self._get_json(claim) or {}
                if owner.get("upload_id") == upload_id:
                    return path  # ours, from an interrupted completion
                continue
            if self._exists(self._key(path)) or self._list(self._key(path + "/"), limit=1):
                continue  # put there by someone else, or a "directory"
            self._check_parents(rel)
            return path
        raise InvalidName(f"no free name for {meta['name']!r}")  # pragma: no cover

    def _finish_completion(self, meta: dict[str, Any]) -> CompletedUpload:
        """
        After CompleteMultipartUpload: hash the assembled object as stored,
        claim a final path, copy it there (atomic: the copy appears whole or
        not at all), record the completion and drop the upload's other records.

        @raise DigestMismatch: the stored bytes are not the declared ones
            (the upload is removed).
        """
        upload_id = meta["upload_id"]
        key = self._ukey(upload_id, "object")
        digest, length = self._hash_object(key)
        if digest.hex() != meta["sha256"] or length != meta["size"]:
            self._remove(meta)
            raise DigestMismatch(
                f"stored bytes hash to {digest.hex()}, not the declared "
                f"{meta['sha256']}; every part matched its MD5 as received, so "
                "the source changed during the upload; upload removed")
        path = self._claim_name(meta)
        self.client.copy({"Bucket": self.bucket, "Key": key}, self.bucket, self._key(path))
        self._put_json(self._ukey(upload_id, "done.json"),
                       {"path": path, "sha256": digest.hex(), "completed": self._now()})
        self._delete_prefix(self._key(f"incoming/{upload_id}/"),
                            keep=(self._ukey(upload_id, "meta.json"),
                                  self._ukey(upload_id, "done.json")))
        return _completed_upload(meta, path)

    def _hash_object(self, key: str) -> tuple[bytes, int]:
        body = self.client.get_object(Bucket=self.bucket, Key=key)["Body"]
        h = hashlib.sha256()
        n = 0
        for chunk in iter(lambda: body.read(READ_CHUNK), b""):
            h.update(chunk)
            n += len(chunk)
        return h.digest(), n

    def _remove(self, meta: dict[str, Any]) -> None:
        upload_id = meta["upload_id"]
        try:
            self.client.abort_multipart_upload(
                Bucket=self.bucket, Key=self._ukey(upload_id, "object"),
                UploadId=meta["multipart_upload_id"])
        except Exception as e:
            if not _missing(e):
                raise
        self._delete_prefix(self._key(f"incoming/{upload_id}/"))

    def _expire_sync(self, older_than: float) -> list[str]:
        cutoff = self._now() - older_than
        removed = []
        kw: dict[str, Any] = {"Bucket": self.bucket, "Prefix": self._key("incoming/")}
        while True:
            page = self.client.list_multipart_uploads(**kw)
            for up in page.get("Uploads", ()):
                if up["Initiated"].timestamp() >= cutoff:
                    continue
                upload_id = up["Key"][len(self._key("incoming/")):].split("/", 1)[0]
                if not is_upload_id(upload_id) or self._fresh(self._lease(upload_id)[1]):
                    continue  # not ours, or a writer holds it
                self.client.abort_multipart_upload(
                    Bucket=self.bucket, Key=up["Key"], UploadId=up["UploadId"])
                self._delete_prefix(self._key(f"incoming/{upload_id}/"))
                removed.append(upload_id)
                log.info("upload {upload_id} expired", upload_id=upload_id)
            if not page.get("IsTruncated"):
                return removed
            kw["KeyMarker"] = page["NextKeyMarker"]
            kw["UploadIdMarker"] = page["NextUploadIdMarker"]


def _info(meta: dict[str, Any]) -> UploadInfo:
    return UploadInfo(
        upload_id=meta["upload_id"], name=meta["name"], size=meta["size"],
        sha256=None if meta["sha256"] is None else bytes.fromhex(meta["sha256"]),
        metadata=dict(meta["metadata"]),
        client_id=meta["client_id"], created=meta["created"])


def _completed_upload(meta: dict[str, Any], path: str) -> CompletedUpload:
    return CompletedUpload(
        upload_id=meta["upload_id"], name=meta["name"], size=meta["size"],
        sha256=bytes.fromhex(meta["sha256"]), path=path)


@implementer(IUploadWriter)
class S3UploadWriter:
    """
    Write ownership of one upload in an L{S3Storage}.  Returned by
    L{S3Storage.create} and L{S3Storage.resume}; used by one connection.

    L{offset} is where the next write starts; the Deferreds of L{write} and
    L{write_batch} fire with the durable offset: the end of the last stored
    part.  The bytes in between wait in a spool of at most one part.
    """

    def __init__(self, storage: S3Storage, meta: dict[str, Any],
                 parts: list[dict[str, Any]], generation: int, tail: TailCheck) -> None:
        self._storage = storage
        self._meta = meta
        self._parts = parts
        self.info: UploadInfo = _info(meta)
        self.part_size: int = meta["part_size"]
        self.durable: int = sum(p["size"] for p in parts)
        self.offset: int = self.durable
        self.tail = tail
        self.generation = generation
        self._closed = False
        self._poisoned = False
        self._heartbeat = storage._now()
        self._lock = DeferredLock()
        if storage._spool_dir is None:
            self._spool: Any = io.BytesIO()
        else:
            self._spool = tempfile.TemporaryFile(dir=storage._spool_dir)

    def _call(self, what: str, f: Callable[..., Any], *args: Any) -> Deferred:
        return self._lock.run(self._storage._run, _guard,
                              f"{what} upload {self.info.upload_id}", f, *args)

    # -- IUploadWriter -------------------------------------------------------

    def write(self, offset: int, data: bytes) -> Deferred[int]:
        """See L{IUploadWriter.write}."""
        return self._call("cannot write", self._write_sync, [(offset, data)])

    def write_batch(self, chunks: Sequence[tuple]) -> Deferred[int]:
        """See L{IUploadWriter.write_batch}."""
        return self._call("cannot write", self._write_sync, [(c[0], c[1]) for c in chunks])

    def complete(self, sha256: bytes | None = None) -> Deferred[CompletedUpload]:
        """See L{IUploadWriter.complete}."""
        try:
            expected = expected_digest(self.info, sha256)
        except ValueError:
            return defer.fail()
        return self._call("cannot complete", self._complete_sync, expected)

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
        return self._storage._ukey(self.info.upload_id, rel)

    def _fence(self) -> None:
        """Fail with UploadTakenOver if a newer generation holds the lease."""
        s = self._storage
        newer = s._list(self._key("lease/"), start_after=self._key(
            f"lease/{self.generation:010d}"), limit=1)
        if newer:
            self._close_sync(release=False)
            raise UploadTakenOver(
                f"upload {self.info.upload_id} was taken over by a newer connection")
        self._renew()

    def _renew(self) -> None:
        """Refresh the lease's heartbeat if a third of its lifetime has passed."""
        s = self._storage
        if s._now() - self._heartbeat > s._lease_ttl / 3:
            self._heartbeat = s._now()
            s._put_json(self._key(f"lease/{self.generation:010d}"),
                        {"owner": s._owner, "state": "held", "heartbeat": self._heartbeat})

    def _write_sync(self, chunks: list[tuple[int, bytes]]) -> int:
        self._check_open()
        info = self.info
        pos = self.offset
        for chunk_offset, chunk in chunks:
            if chunk_offset != pos:
                raise OffsetMismatch(
                    f"write at {chunk_offset} but upload {info.upload_id} has "
                    f"{self.offset} bytes; continue from {self.offset}", offset=self.offset)
            pos += len(chunk)
        if pos > info.size:
            raise SizeExceeded(f"write up to {pos} passes the declared size {info.size}",
                               offset=self.offset)
        if pos == self.offset:
            return self.durable
        self._renew()
        for _, chunk in chunks:
            view = memoryview(chunk)
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
        s = self._storage
        self._fence()
        self._spool.seek(0)
        data = self._spool.read()
        number = len(self._parts) + 1
        md5 = hashlib.md5(data)
        try:
            answer = s.client.upload_part(
                Bucket=s.bucket, Key=self._key("object"),
                UploadId=self._meta["multipart_upload_id"], PartNumber=number,
                Body=data, ContentMD5=base64.b64encode(md5.digest()).decode())
            if answer["ETag"].strip('"') != md5.hexdigest():
                raise StorageError(f"part {number}: the store's ETag is not the MD5 sent")
            record = {"number": number, "start": self.durable, "size": len(data),
                      "md5": md5.hexdigest(), "sha256": hashlib.sha256(data).hexdigest()}
            s._put_json(self._key(f"parts/{number:05d}.json"), record)
        except BaseException:
            # Keep the spool: the same call may be retried on a resume, but
            # this writer is done (the client re-sends from the durable offset).
            self._poisoned = True
            raise
        self._parts.append(record)
        self.durable += len(data)
        self._spool.seek(0)
        self._spool.truncate()

    def _complete_sync(self, expected: bytes) -> CompletedUpload:
        self._check_open()
        s = self._storage
        info = self.info
        if self.offset != info.size:
            raise Incomplete(f"upload {info.upload_id} has {self.offset} of "
                             f"{info.size} bytes", offset=self.offset)
        if info.size == 0 and not self._parts:
            self._store_part()  # S3 wants at least one part
        self._fence()
        if self._meta["sha256"] is None:
            # Given at the end: record it before the object is assembled, so
            # a completion interrupted after that is finished (and checked)
            # by the next resume.
            self._meta["sha256"] = expected.hex()
            s._put_json(s._ukey(info.upload_id, "meta.json"), self._meta)
        key = self._key("object")
        s.client.complete_multipart_upload(
            Bucket=s.bucket, Key=key, UploadId=self._meta["multipart_upload_id"],
            MultipartUpload={"Parts": [
                {"PartNumber": p["number"], "ETag": f'"{p["md5"]}"'} for p in self._parts]})
        # radosgw answers an empty ETag here: the object is read back instead,
        # which is also the proof that the stored bytes are the declared ones.
        try:
            completed = s._finish_completion(self._meta)
        except DigestMismatch:
            self._close_sync(release=False)
            raise
        path = completed.path
        self._closed = True
        self._spool.close()
        log.info("upload {upload_id} completed at {path} in s3",
                 upload_id=info.upload_id, path=path)
        return _completed_upload(self._meta, path)

    def _abort_sync(self) -> None:
        self._check_open()
        try:
            self._storage._remove(self._meta)
        finally:
            self._close_sync(release=False)
        log.info("upload {upload_id} aborted", upload_id=self.info.upload_id)

    def _close_sync(self, release: bool = True) -> None:
        if self._closed:
            return
        self._closed = True
        self._spool.close()
        if release:
            self._storage._release_lease(self.info.upload_id, self.generation)

    def _takeover_sync(self) -> bool:
        if self._closed:
            return False
        s = self._storage
        if s._exists(self._key(f"takeover/{self.generation:010d}")):
            return True
        self._renew()
        return False

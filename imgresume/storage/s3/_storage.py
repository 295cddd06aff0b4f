# -*- test-case-name: tests.storage.test_s3.S3StorageTests -*-
"""
L{S3Storage}, the front end of the S3 backend: creates, resumes (from the
parts the store lists and their records), reports and expires uploads, and
hands each one it opens to an L{S3UploadWriter}.
"""

from __future__ import annotations

import time
from typing import Any, Callable

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from zope.interface import implementer

from imgresume import integrity
from imgresume.errors import (
    InvalidName,
    StorageError,
    UnknownUpload,
    UploadAlreadyComplete,
)
from imgresume.names import is_upload_id, new_upload_id, validate_name
from imgresume.storage.interfaces import (
    ATOMIC_COMPLETE,
    DURABLE_ACK,
    PROVEN_OFFSET,
    SHARED,
    IDeferredSizeStorage,
    IncompleteUploads,
    NewerRecordFormat,
    NewUpload,
    CompletedUpload,
    StoredFile,
    TailCheck,
    UploadStatus,
    WholeUpload,
)
from imgresume.storage.s3._bucket import (
    MAX_KEY_BYTES,
    MIN_PART_SIZE,
    Bucket,
    guard,
    make_client,
    missing,
    parse_url,
    part_size_for,
)
from imgresume.storage.s3 import _incomplete
from imgresume.storage.s3._leases import Leases
from imgresume.storage.s3._publish import (
    FORMAT_VERSION,
    digest_of,
    check_parents,
    find_completed,
    finish_completion,
    record_format,
    recorded_completion,
    upload_info,
)
from imgresume.storage.s3._whole import expire_staging, store_whole
from imgresume.storage.s3._writer import S3UploadWriter

# The backend logs as one namespace, imgresume.storage.s3.
log = Logger(namespace=__package__)

#: Seconds between two verifications of one client's index entries.
VERIFY_EVERY = 60.0



def _empty_tail(digest: str) -> TailCheck:
    """The tail of an upload with nothing stored: the digest of no bytes."""
    return TailCheck(0, 0, integrity.EMPTY_DIGESTS[digest])


def _default_run(f: Callable[..., Any], *args: Any) -> Deferred:
    from twisted.internet.threads import deferToThread

    return deferToThread(f, *args)


@implementer(IDeferredSizeStorage)
class S3Storage:
    """
    Uploads as S3 multipart uploads, their state in the bucket itself.

    Created by L{imgresume.server.make_server_service} for C{--storage
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
            client = make_client(endpoint_url, region)
        self.client = client
        self._objects = Bucket(client, self.bucket, self.prefix)
        self._leases = Leases(self._objects, owner, lease_ttl, busy_retry_after, now)
        self._run = run
        self.commit_granularity = part_size or MIN_PART_SIZE
        self._spool_dir = spool_dir
        self._now = now
        #: When each client's index entries were last verified.
        self._verified: dict[str, float] = {}

    def read_completed(self, path: str) -> bytes:
        """Return the bytes of a completed object (blocking; for tests and tools)."""
        return self._objects.read(self._objects.key(path))

    # -- IUploadStorage ------------------------------------------------------

    def create(self, request: NewUpload) -> Deferred[S3UploadWriter]:
        """See L{IUploadStorage.create}."""
        return self._run(guard, "cannot create upload", self._create_sync, request)

    def resume(self, upload_id: str, client_id: str | None = None) -> Deferred[S3UploadWriter]:
        """See L{IUploadStorage.resume}."""
        return self._run(guard, f"cannot resume upload {upload_id!r:.40}",
                         self._resume_sync, upload_id, client_id)

    def incomplete_for(
        self, client_id: str, verify: bool = False
    ) -> Deferred[IncompleteUploads]:
        """
        See L{IUploadStorage.incomplete_for}: one listing of the per-client
        index C{clients/} (L{imgresume.storage.s3._incomplete}); C{verify}
        checks each upload listed (a few requests each), at most once a
        minute per client and process.
        """
        return self._run(guard, "cannot count incomplete uploads",
                         self._incomplete_for_sync, client_id, verify)

    def _incomplete_for_sync(self, client_id: str, verify: bool) -> IncompleteUploads:
        now = self._now()
        if verify and now - self._verified.get(client_id, -VERIFY_EVERY) >= VERIFY_EVERY:
            if len(self._verified) > 10000:
                self._verified.clear()
            self._verified[client_id] = now
            _incomplete.prune(self._objects, client_id, self._is_incomplete, self._now)
        return _incomplete.count(self._objects, client_id)

    def _is_incomplete(self, upload_id: str) -> bool | None:
        """For the index: whether an upload is incomplete (None: it is gone)."""
        b = self._objects
        meta = b.get_json(b.upload_key(upload_id, "meta.json"))
        if meta is None:
            return None
        if b.exists(b.upload_key(upload_id, "done.json")):
            return False
        if self._list_parts(meta) is None and not b.exists(b.upload_key(upload_id, "object")):
            return None  # its multipart upload was aborted (a lifecycle rule)
        return True

    def status(self, upload_id: str, client_id: str | None = None) -> Deferred[UploadStatus]:
        """See L{IUploadStorage.status}."""
        return self._run(guard, f"cannot read upload {upload_id!r:.40}",
                         self._status_sync, upload_id, client_id)

    def store_whole(self, request: WholeUpload) -> Deferred[CompletedUpload]:
        """
        See L{IUploadStorage.store_whole}: one C{PutObject} to a staging
        key, then the steps of a completion (L{imgresume.storage.s3._whole}).
        """
        return self._run(guard, f"cannot store {request.name[:60]!r}",
                         store_whole, self._objects, request, self._now)

    def find_completed(
        self, name: str, size: int, digest: str = integrity.LEGACY_DIGEST
    ) -> Deferred[StoredFile | None]:
        """See L{IUploadStorage.find_completed}."""
        return self._run(guard, "cannot look up a completed file",
                         find_completed, self._objects, name, size, digest)

    def expire(self, older_than: float) -> Deferred[list[str]]:
        """
        Abort every partial upload under the prefix whose multipart upload
        started more than C{older_than} seconds ago and remove its records
        (what the bucket lifecycle rule in C{docs/s3.md} does too).

        @return: Deferred firing with the ids of the removed uploads.
        """
        return self._run(guard, "cannot expire uploads", self._expire_sync, older_than)

    # -- blocking implementations -------------------------------------------

    def _writer(self, meta: dict[str, Any], parts: list[dict[str, Any]],
                generation: int, tail: TailCheck) -> S3UploadWriter:
        return S3UploadWriter(meta, parts, generation, tail, bucket=self._objects,
                              leases=self._leases, run=self._run,
                              spool_dir=self._spool_dir)

    def _create_sync(self, request: NewUpload) -> S3UploadWriter:
        b = self._objects
        name = validate_name(request.name)
        if len(b.key("complete/" + name).encode()) > MAX_KEY_BYTES:
            raise InvalidName(
                f"name {name[:60]!r}... is too long for this S3 storage: its key "
                f"would pass S3's {MAX_KEY_BYTES} bytes")
        if request.size < 0 or (request.sha256 is not None and len(request.sha256) != 32):
            raise ValueError("size must be >= 0 and sha256 a 32-byte digest or None")
        if request.digest not in integrity.DIGESTS:
            raise ValueError(f"unknown digest {request.digest!r}")
        check_parents(b, name)
        upload_id = new_upload_id()
        part_size = part_size_for(request.size, self.commit_granularity)
        # Counted first, so that no upload exists uncounted.
        _incomplete.add(b, request.client_id, upload_id, request.size)
        mpu = self.client.create_multipart_upload(
            Bucket=self.bucket, Key=b.upload_key(upload_id, "object"))["UploadId"]
        meta = {
            "upload_id": upload_id,
            "name": name,
            "size": request.size,
            "sha256": None if request.sha256 is None else request.sha256.hex(),
            # The algorithm of "sha256" and of the parts' digests.
            "digest": request.digest,
            "metadata": dict(request.metadata),
            "client_id": request.client_id,
            "created": self._now(),
            "multipart_upload_id": mpu,
            # For a size deferred, chosen from its bound (every part but the
            # last is this size): a bound of 1 TiB makes parts of 105 MiB.
            "part_size": part_size,
        }
        if request.size_deferred:  # "size" is a bound until declared
            meta["size_deferred"] = True
        meta["version"] = record_format(meta)
        b.put_json(b.upload_key(upload_id, "meta.json"), meta)
        generation = self._leases.take(upload_id, 0)
        log.info("upload {upload_id} created in s3: {name!r}, {size} bytes, "
                 "parts of {part_size}", upload_id=upload_id, name=name,
                 size=request.size, part_size=part_size)
        return self._writer(meta, [], generation, _empty_tail(request.digest))

    def _meta(self, upload_id: Any, client_id: str | None) -> dict[str, Any]:
        if not is_upload_id(upload_id):
            raise UnknownUpload(f"malformed upload id {upload_id!r:.80}")
        meta = self._objects.get_json(self._objects.upload_key(upload_id, "meta.json"))
        if meta is None or (client_id is not None and meta.get("client_id") != client_id):
            raise UnknownUpload(f"no upload with id {upload_id}")
        version = meta.get("version")
        if isinstance(version, int) and version > FORMAT_VERSION:
            raise NewerRecordFormat(upload_id, version, FORMAT_VERSION)
        if version not in range(1, FORMAT_VERSION + 1):
            raise StorageError(f"upload {upload_id}: unknown record version")
        return meta

    def _list_parts(self, meta: dict[str, Any]) -> list[dict[str, Any]] | None:
        """Every part of the multipart upload, paged; None if it is gone."""
        parts: list[dict[str, Any]] = []
        kw = {"Bucket": self.bucket,
              "Key": self._objects.upload_key(meta["upload_id"], "object"),
              "UploadId": meta["multipart_upload_id"]}
        while True:
            try:
                page = self.client.list_parts(**kw)
            except Exception as e:
                # radosgw answers NoSuchKey where AWS answers NoSuchUpload.
                if missing(e):
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
            record = self._objects.get_json(
                self._objects.upload_key(meta["upload_id"], f"parts/{number:05d}.json"))
            if (record is None or part["Size"] != expected or record["size"] != expected
                    or part["ETag"].strip('"') != record["md5"]):
                break
            proven.append(record)
            number += 1
        return proven

    def _resume_sync(self, upload_id: str, client_id: str | None) -> S3UploadWriter:
        meta = self._meta(upload_id, client_id)
        completed = recorded_completion(self._objects, meta, check=True)
        if completed is not None:
            raise UploadAlreadyComplete(completed)
        leases = self._leases
        current, lease = leases.current(upload_id)
        if leases.fresh(lease):
            leases.request_takeover(upload_id, current)
            raise leases.busy(upload_id)
        generation = leases.take(upload_id, current)
        try:
            parts = self._proven_parts(meta)
            if parts is None and self._objects.exists(
                self._objects.upload_key(upload_id, "object")
            ):
                # A completion interrupted after CompleteMultipartUpload:
                # finish it (its records, this lease included, are removed).
                raise UploadAlreadyComplete(
                    finish_completion(self._objects, meta, self._now))
        except UploadAlreadyComplete:
            raise
        except BaseException:
            leases.release(upload_id, generation)
            raise
        if parts is None:
            leases.release(upload_id, generation)
            raise UnknownUpload(f"no upload with id {upload_id}")
        if parts:
            last = parts[-1]
            tail = TailCheck(last["start"], last["size"], bytes.fromhex(last["sha256"]))
        else:
            tail = _empty_tail(digest_of(meta))
        log.info("upload {upload_id} resumed from s3 at proven offset {offset}",
                 upload_id=upload_id, offset=tail.start + tail.length)
        return self._writer(meta, parts, generation, tail)

    def _status_sync(self, upload_id: str, client_id: str | None) -> UploadStatus:
        meta = self._meta(upload_id, client_id)
        info = upload_info(meta)
        completed = recorded_completion(self._objects, meta)
        if completed is not None:
            return UploadStatus(upload_id, info.name, info.size, "complete", info.size,
                                False, "", info.created, info.created, completed.path,
                                info.digest)
        _, lease = self._leases.current(upload_id)
        parts = self._proven_parts(meta) or []
        offset = sum(p["size"] for p in parts)
        return UploadStatus(upload_id, info.name, info.size, "partial", offset,
                            self._leases.fresh(lease), (lease or {}).get("owner", ""),
                            info.created, float((lease or {}).get("heartbeat", info.created)),
                            digest=info.digest, size_deferred=info.size_deferred)

    def _expire_sync(self, older_than: float) -> list[str]:
        b = self._objects
        cutoff = self._now() - older_than
        removed = [f"whole/{key}" for key in expire_staging(b, cutoff)]
        kw: dict[str, Any] = {"Bucket": self.bucket, "Prefix": b.key("incoming/")}
        while True:
            page = self.client.list_multipart_uploads(**kw)
            for up in page.get("Uploads", ()):
                if up["Initiated"].timestamp() >= cutoff:
                    continue
                upload_id = up["Key"][len(b.key("incoming/")):].split("/", 1)[0]
                if not is_upload_id(upload_id) or self._leases.fresh(
                    self._leases.current(upload_id)[1]
                ):
                    continue  # not ours, or a writer holds it
                try:
                    meta = b.get_json(b.upload_key(upload_id, "meta.json"))
                except StorageError:
                    meta = None  # unreadable: its index entry is pruned later
                self.client.abort_multipart_upload(
                    Bucket=self.bucket, Key=up["Key"], UploadId=up["UploadId"])
                b.delete_prefix(b.key(f"incoming/{upload_id}/"))
                if meta is not None:
                    _incomplete.forget(b, meta)
                removed.append(upload_id)
                log.info("upload {upload_id} expired", upload_id=upload_id)
            if not page.get("IsTruncated"):
                return removed
            kw["KeyMarker"] = page["NextKeyMarker"]
            kw["UploadIdMarker"] = page["NextUploadIdMarker"]

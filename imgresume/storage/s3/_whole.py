# -*- test-case-name: tests.storage.test_s3.S3StorageTests -*-
"""
The one-step store of a whole small file in an S3 storage
(L{IUploadStorage.store_whole
<imgresume.storage.interfaces.IUploadStorage.store_whole>}), built on the
same steps as a completion (L{imgresume.storage.s3._publish}): correct,
not fast.

Under C{PREFIX/whole/<key>/}, C{key} the first 32 hex digits of
SHA-256(client id, NUL, upload id): C{object}, the staging object (one
C{PutObject} with C{Content-MD5}), and C{done.json}, the record of the
publication, which answers a repeated request.  The staging object is
hashed as stored, a final name is claimed (C{names/<path>}, If-None-Match,
the claim naming this record), the object is copied there (atomic),
C{done.json} written and the staging object deleted.  No multipart
upload, no lease, no C{meta.json}, no C{clients/} entry.
"""

from __future__ import annotations

import base64
import hashlib
from typing import Any, Callable

from twisted.logger import Logger

from imgresume import integrity
from imgresume.errors import DigestMismatch, InvalidName
from imgresume.names import if_exists_policy, is_upload_id, validate_name
from imgresume.storage.interfaces import CompletedFileMoved, CompletedUpload, WholeUpload
from imgresume.storage.s3._bucket import MAX_KEY_BYTES, Bucket, missing
from imgresume.storage.s3._publish import claim_name, find_completed, object_identity

log = Logger(namespace=__package__)


def whole_key(client_id: str, upload_id: str) -> str:
    """The record key of a one-step request (see the module docstring)."""
    raw = f"{client_id}\0{upload_id}".encode("utf-8", "surrogatepass")
    return hashlib.sha256(raw).hexdigest()[:32]


def _recorded(bucket: Bucket, done: dict[str, Any], request: WholeUpload,
              name: str) -> CompletedUpload:
    """The answer a publication record gives to a repeat of its request."""
    recorded = done.get("digest", integrity.LEGACY_DIGEST)
    if recorded == request.digest:
        same = done.get("sha256") == request.sha256.hex()
    else:  # the repeat came over a connection with another digest
        same = bucket.hash_object(bucket.key(done["path"]), request.digest)[0] == request.sha256
    if not same:
        raise DigestMismatch(
            f"upload {request.upload_id} already stored other bytes; send this "
            "file with a new upload id")
    result = CompletedUpload(request.upload_id, name, done["size"], request.sha256,
                             done["path"], request.digest)
    now = object_identity(bucket, result.path)
    if now is None:
        raise CompletedFileMoved(result, "is missing")
    if any(done.get(k) is not None and now[k] != done[k] for k in ("etag", "size")):
        raise CompletedFileMoved(result, "now holds another object")
    return result


def store_whole(bucket: Bucket, request: WholeUpload,
                now: Callable[[], float]) -> CompletedUpload:
    """See L{IUploadStorage.store_whole}; blocking (boto3)."""
    if not is_upload_id(request.upload_id) or len(request.sha256) != 32:
        raise ValueError("upload_id must be 32 hex digits and sha256 32 bytes")
    name = validate_name(request.name)
    if len(bucket.key("complete/" + name).encode()) > MAX_KEY_BYTES:
        raise InvalidName(
            f"name {name[:60]!r}... is too long for this S3 storage: its key "
            f"would pass S3's {MAX_KEY_BYTES} bytes")
    data = bytes(request.data)
    size = len(data)
    policy = if_exists_policy(request.metadata)
    if policy == "skip":  # before the record: a repeat is skipped as well
        digest = integrity.digest_of(request.digest, data)
        if digest != request.sha256:
            raise _mismatch(digest, request)
        there = find_completed(bucket, name, size, request.digest)
        if there is not None and there.sha256 == digest:
            return CompletedUpload("0" * 32, name, size, digest, there.path, request.digest)
    key = whole_key(request.client_id, request.upload_id)
    record = bucket.key(f"whole/{key}/done.json")
    done = bucket.get_json(record)
    if done is not None:
        return _recorded(bucket, done, request, name)
    staging = bucket.key(f"whole/{key}/object")
    bucket.client.put_object(
        Bucket=bucket.name, Key=staging, Body=data,
        ContentMD5=base64.b64encode(hashlib.md5(data).digest()).decode())
    try:
        digest, length = bucket.hash_object(staging, request.digest)
        if digest != request.sha256 or length != size:
            raise _mismatch(integrity.digest_of(request.digest, data), request)
        meta = {"upload_id": request.upload_id, "name": name,
                "metadata": dict(request.metadata)}
        path = claim_name(bucket, meta, whole=key)
        done = bucket.get_json(record)  # another server, same request, first
        if done is not None:
            return _recorded(bucket, done, request, name)
        bucket.client.copy({"Bucket": bucket.name, "Key": staging}, bucket.name,
                           bucket.key(path))
        identity = object_identity(bucket, path) or {}
        bucket.put_json(record, {"path": path, "sha256": digest.hex(),
                                 "digest": request.digest, "size": size,
                                 "completed": now(), **identity})
    finally:
        try:
            bucket.client.delete_object(Bucket=bucket.name, Key=staging)
        except Exception as e:  # pragma: no cover - left for expiry
            if not missing(e):
                log.warn("cannot delete {key}: {error}", key=staging, error=str(e))
    log.info("upload {upload_id} stored whole at {path} in s3",
             upload_id=request.upload_id, path=path, size=size)
    return CompletedUpload(request.upload_id, name, size, digest, path, request.digest)


def _mismatch(digest: bytes, request: WholeUpload) -> DigestMismatch:
    return DigestMismatch(
        f"the bytes received hash to {digest.hex()}, not to the "
        f"{integrity.title(request.digest)} declared ({request.sha256.hex()}); "
        "nothing was stored")


def expire_staging(bucket: Bucket, cutoff: float) -> list[str]:
    """
    Delete staging objects of one-step stores cut short (a server died
    between its C{PutObject} and its clean-up) last modified before
    C{cutoff}; the C{done.json} records stay, as completion records do.

    @return: the record keys whose staging object was deleted.
    """
    removed = []
    kw: dict[str, Any] = {"Bucket": bucket.name, "Prefix": bucket.key("whole/")}
    while True:
        page = bucket.client.list_objects_v2(**kw)
        for o in page.get("Contents", ()):
            if o["Key"].endswith("/object") and o["LastModified"].timestamp() < cutoff:
                bucket.client.delete_object(Bucket=bucket.name, Key=o["Key"])
                removed.append(o["Key"][len(bucket.key("whole/")):].split("/", 1)[0])
        if not page.get("IsTruncated"):
            return removed
        kw["ContinuationToken"] = page["NextContinuationToken"]

# -*- test-case-name: tests.storage.test_s3.S3PartTests -*-
"""
The end of an upload in an S3 storage: completion (the assembled object
hashed as stored, a final name claimed, the object copied there) and
removal.  Both are idempotent, so a completion interrupted at any step is
finished by the next resume.

Also the values an upload's C{meta.json} describes (L{upload_info},
L{completed_upload}), which the storage and its writers hand out.
"""

from __future__ import annotations

from typing import Any, Callable

from imgresume.errors import DigestMismatch, InvalidName
from imgresume.names import completion_candidates
from imgresume.storage.interfaces import CompletedUpload, UploadInfo
from imgresume.storage.s3 import _incomplete
from imgresume.storage.s3._bucket import MAX_KEY_BYTES, Bucket, missing


def upload_info(meta: dict[str, Any]) -> UploadInfo:
    """The L{UploadInfo} an upload's meta.json describes."""
    return UploadInfo(
        upload_id=meta["upload_id"], name=meta["name"], size=meta["size"],
        sha256=None if meta["sha256"] is None else bytes.fromhex(meta["sha256"]),
        metadata=dict(meta["metadata"]),
        client_id=meta["client_id"], created=meta["created"])


def completed_upload(meta: dict[str, Any], path: str) -> CompletedUpload:
    """The L{CompletedUpload} of an upload completed at C{path}."""
    return CompletedUpload(
        upload_id=meta["upload_id"], name=meta["name"], size=meta["size"],
        sha256=bytes.fromhex(meta["sha256"]), path=path)


def recorded_completion(bucket: Bucket, meta: dict[str, Any]) -> CompletedUpload | None:
    """The completion record of an upload, if it has one."""
    upload_id = meta["upload_id"]
    done = bucket.get_json(bucket.upload_key(upload_id, "done.json"))
    if done is not None:
        return completed_upload(meta, done["path"])
    return None


def check_parents(bucket: Bucket, name: str) -> None:
    """
    @raise InvalidName: a directory of C{name} is a completed object (a
        file), so C{name} cannot be stored below it.
    """
    parts = name.split("/")
    for i in range(1, len(parts)):
        parent = "complete/" + "/".join(parts[:i])
        if bucket.exists(bucket.key(parent)):
            raise InvalidName(
                f"cannot store below {parent!r}: it is a file, not a directory")


def _claim_name(bucket: Bucket, meta: dict[str, Any]) -> str:
    """
    Claim the first free final path for an upload: C{names/<path>} is
    created with If-None-Match, so two servers never pick the same path;
    a path where an object, or objects below it, already exist is skipped.
    """
    upload_id = meta["upload_id"]
    for rel in completion_candidates(meta["name"], upload_id):
        path = "complete/" + rel
        if len(bucket.key(path).encode()) > MAX_KEY_BYTES:
            continue
        claim = bucket.key("names/" + rel)
        if not bucket.put_json(claim, {"upload_id": upload_id}, exclusive=True):
            owner = bucket.get_json(claim) or {}
            if owner.get("upload_id") == upload_id:
                return path  # ours, from an interrupted completion
            continue
        if bucket.exists(bucket.key(path)) or bucket.keys(bucket.key(path + "/"), limit=1):
            continue  # put there by someone else, or a "directory"
        check_parents(bucket, rel)
        return path
    raise InvalidName(f"no free name for {meta['name']!r}")  # pragma: no cover


def finish_completion(
    bucket: Bucket, meta: dict[str, Any], now: Callable[[], float]
) -> CompletedUpload:
    """
    After CompleteMultipartUpload: hash the assembled object as stored,
    claim a final path, copy it there (atomic: the copy appears whole or
    not at all), record the completion and drop the upload's other records.

    @raise DigestMismatch: the stored bytes are not the declared ones
        (the upload is removed).
    """
    upload_id = meta["upload_id"]
    key = bucket.upload_key(upload_id, "object")
    digest, length = bucket.hash_object(key)
    if digest.hex() != meta["sha256"] or length != meta["size"]:
        remove(bucket, meta)
        raise DigestMismatch(
            f"stored bytes hash to {digest.hex()}, not the declared "
            f"{meta['sha256']}; every part matched its MD5 as received, so "
            "the source changed during the upload; upload removed")
    path = _claim_name(bucket, meta)
    bucket.client.copy({"Bucket": bucket.name, "Key": key}, bucket.name, bucket.key(path))
    bucket.put_json(bucket.upload_key(upload_id, "done.json"),
                    {"path": path, "sha256": digest.hex(), "completed": now()})
    _incomplete.forget(bucket, meta)
    bucket.delete_prefix(bucket.key(f"incoming/{upload_id}/"),
                         keep=(bucket.upload_key(upload_id, "meta.json"),
                               bucket.upload_key(upload_id, "done.json")))
    return completed_upload(meta, path)


def remove(bucket: Bucket, meta: dict[str, Any]) -> None:
    """Abort an upload's multipart upload and delete its records."""
    upload_id = meta["upload_id"]
    try:
        bucket.client.abort_multipart_upload(
            Bucket=bucket.name, Key=bucket.upload_key(upload_id, "object"),
            UploadId=meta["multipart_upload_id"])
    except Exception as e:
        if not missing(e):
            raise
    bucket.delete_prefix(bucket.key(f"incoming/{upload_id}/"))
    _incomplete.forget(bucket, meta)

# -*- test-case-name: tests.storage.test_s3.S3PartTests -*-
"""
The end of an upload in an S3 storage: completion (the assembled object
hashed as stored, a final name claimed, the object copied there) and
removal; and the look-up of the object that already has a name
(L{find_completed}), for an UPLOAD's C{if-exists} policy.  Both are idempotent, so a completion interrupted at any step is
finished by the next resume.

Also the values an upload's C{meta.json} describes (L{upload_info},
L{completed_upload}), which the storage and its writers hand out, and its
format (L{record_format}).
"""

from __future__ import annotations

from typing import Any, Callable

from imgresume import integrity
from imgresume.errors import DigestMismatch, InvalidName, NameTaken
from imgresume.names import completion_candidates, if_exists_policy, validate_name
from imgresume.storage.interfaces import CompletedFileMoved, CompletedUpload, StoredFile, UploadInfo
from imgresume.storage.s3 import _incomplete
from imgresume.storage.s3._bucket import MAX_KEY_BYTES, READ_CHUNK, Bucket, missing

#: The newest format of meta.json (its C{version}) this version reads and
#: writes.  A record carries the lowest format that describes it
#: (L{record_format}): 1, the original; 2 when its C{sha256} is null, the
#: digest coming at completion; 3 when its C{digest} is not SHA-256 (a
#: record without it holds SHA-256).  Unknown fields are ignored.
FORMAT_VERSION = 4


def digest_of(meta: dict[str, Any]) -> str:
    """The algorithm of an upload's digests (SHA-256 for a record naming none)."""
    return meta.get("digest", integrity.LEGACY_DIGEST)


def record_format(meta: dict[str, Any]) -> int:
    """
    The lowest format that describes C{meta}: 4 while its size is not
    declared (C{size_deferred}: C{size} is a bound, which a reader of
    format 3 would take for the size), else 3 if its digest is not
    SHA-256, else 2 if its digest is still to come, else 1.
    """
    if meta.get("size_deferred"):
        return 4
    if digest_of(meta) != integrity.LEGACY_DIGEST:
        return 3
    return 2 if meta["sha256"] is None else 1


def upload_info(meta: dict[str, Any]) -> UploadInfo:
    """The L{UploadInfo} an upload's meta.json describes."""
    return UploadInfo(
        upload_id=meta["upload_id"], name=meta["name"], size=meta["size"],
        sha256=None if meta["sha256"] is None else bytes.fromhex(meta["sha256"]),
        metadata=dict(meta["metadata"]),
        client_id=meta["client_id"], created=meta["created"], digest=digest_of(meta),
        size_deferred=meta.get("size_deferred", False) is True)


def completed_upload(meta: dict[str, Any], path: str) -> CompletedUpload:
    """The L{CompletedUpload} of an upload completed at C{path}."""
    return CompletedUpload(
        upload_id=meta["upload_id"], name=meta["name"], size=meta["size"],
        sha256=bytes.fromhex(meta["sha256"]), path=path, digest=digest_of(meta))


def recorded_completion(
    bucket: Bucket, meta: dict[str, Any], check: bool = False
) -> CompletedUpload | None:
    """
    The completion record of an upload, if it has one.

    @param check: also check that the object published then is still at
        its path: the same ETag and size (for a record written before these
        were kept, the same size).
    @raise CompletedFileMoved: C{check}, and the object is gone or another
        one is at its path (a consumer moved it away).
    """
    upload_id = meta["upload_id"]
    done = bucket.get_json(bucket.upload_key(upload_id, "done.json"))
    if done is None:
        return None
    result = completed_upload(meta, done["path"])
    if check:
        now = object_identity(bucket, result.path)
        if now is None:
            raise CompletedFileMoved(result, "is missing")
        recorded = {"etag": done.get("etag"), "size": done.get("size", result.size)}
        if any(v is not None and now[k] != v for k, v in recorded.items()):
            raise CompletedFileMoved(result, "now holds another object")
    return result


def object_identity(bucket: Bucket, path: str) -> dict[str, Any] | None:
    """The ETag and size of the object at C{path}; None if there is none."""
    try:
        head = bucket.client.head_object(Bucket=bucket.name, Key=bucket.key(path))
    except Exception as e:
        if missing(e):
            return None
        raise
    return {"etag": head["ETag"].strip('"'), "size": head["ContentLength"]}


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


def claim_name(bucket: Bucket, meta: dict[str, Any], whole: str | None = None) -> str:
    """
    Claim the first free final path for an upload: C{names/<path>} is
    created with If-None-Match, so two servers never pick the same path;
    a path where an object, or objects below it, already exist is skipped.

    @param whole: for a one-step store (L{imgresume.storage.s3._whole}),
        its record key, recorded in the claim: a client-chosen upload id
        alone must not match another client's (or a normal upload's) claim.
    """
    upload_id = meta["upload_id"]
    policy = if_exists_policy(meta.get("metadata") or {})
    mine = {"upload_id": upload_id} if whole is None else {
        "upload_id": upload_id, "whole": whole}
    for rel in completion_candidates(meta["name"], upload_id, policy):
        path = "complete/" + rel
        if len(bucket.key(path).encode()) > MAX_KEY_BYTES:
            continue
        claim = bucket.key("names/" + rel)
        if not bucket.put_json(claim, mine, exclusive=True):
            owner = bucket.get_json(claim) or {}
            if (owner.get("upload_id"), owner.get("whole")) == (upload_id, whole):
                return path  # ours, from an interrupted completion
            continue
        if bucket.exists(bucket.key(path)) or bucket.keys(bucket.key(path + "/"), limit=1):
            # Put there by someone else, or a "directory": let the claim go,
            # so that a later completion of this upload never takes it as
            # its own and copies over what is there.
            bucket.client.delete_object(Bucket=bucket.name, Key=claim)
            continue
        check_parents(bucket, rel)
        return path
    if policy == "fail":
        raise NameTaken(f"complete/{meta['name']} already exists (if-exists=fail); "
                        "the upload is kept")
    raise InvalidName(f"no free name for {meta['name']!r}")  # pragma: no cover


def find_completed(
    bucket: Bucket, name: str, size: int, algorithm: str = integrity.LEGACY_DIGEST
) -> StoredFile | None:
    """
    What lies at C{complete/<name>}: see L{IUploadStorage.find_completed
    <imgresume.storage.interfaces.IUploadStorage.find_completed>}.  Keys
    below it make it a "directory"; a name claimed by an earlier upload
    whose object is gone (moved away) is not free either, since no later
    upload may claim it: it is reported as taken by something that is not
    a file.
    """
    rel = validate_name(name)
    path = "complete/" + rel
    key = bucket.key(path)
    if len(key.encode()) > MAX_KEY_BYTES:
        return None  # nothing can be stored there (create() says why)
    try:
        head = bucket.client.head_object(Bucket=bucket.name, Key=key)
    except Exception as e:
        if not missing(e):
            raise
        if bucket.keys(key + "/", limit=1) or bucket.exists(bucket.key("names/" + rel)):
            return StoredFile(path, None, None)
        return None
    stored = int(head["ContentLength"])
    if stored != size:
        return StoredFile(path, stored, None)
    digest, length = bucket.hash_object(key, algorithm)
    return StoredFile(path, length, digest if length == size else None)


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
    if meta["sha256"] is None:
        # Completed with the digest of what is stored (complete_as_stored):
        # each part of the object is checked against the digest recorded
        # when it was stored, and the whole digest recorded before the
        # object is published, so an interrupted completion finishes alike.
        found = hash_against_parts(bucket, meta, key)
        if found is None:
            remove(bucket, meta)
            raise DigestMismatch(
                "a part of the stored object does not hash to the digest recorded "
                "when it was stored; upload removed")
        meta["sha256"] = found.hex()
        meta["version"] = record_format(meta)
        bucket.put_json(bucket.upload_key(upload_id, "meta.json"), meta)
        digest = found
    else:
        digest, length = bucket.hash_object(key, digest_of(meta))
        if digest.hex() != meta["sha256"] or length != meta["size"]:
            remove(bucket, meta)
            raise DigestMismatch(
                f"stored bytes hash to {digest.hex()}, not the declared "
                f"{meta['sha256']}; every part matched its MD5 as received, so "
                "the source changed during the upload; upload removed")
    path = claim_name(bucket, meta)
    bucket.client.copy({"Bucket": bucket.name, "Key": key}, bucket.name, bucket.key(path))
    identity = object_identity(bucket, path) or {}
    bucket.put_json(bucket.upload_key(upload_id, "done.json"),
                    {"path": path, "sha256": digest.hex(), "completed": now(), **identity})
    _incomplete.forget(bucket, meta)
    bucket.delete_prefix(bucket.key(f"incoming/{upload_id}/"),
                         keep=(bucket.upload_key(upload_id, "meta.json"),
                               bucket.upload_key(upload_id, "done.json")))
    return completed_upload(meta, path)


def hash_against_parts(bucket: Bucket, meta: dict[str, Any], key: str) -> bytes | None:
    """
    The digest of the assembled object at C{key}, read back, each part of
    it checked against the digest its record holds (computed from the bytes
    received, before they were stored); None if one differs, or the object
    is not the declared size.
    """
    algorithm, size, part_size = digest_of(meta), meta["size"], meta["part_size"]
    count = max(1, -(-size // part_size))
    body = bucket.client.get_object(Bucket=bucket.name, Key=key)["Body"]
    whole = integrity.new_digest(algorithm)
    for number in range(1, count + 1):
        record = bucket.get_json(bucket.upload_key(meta["upload_id"], f"parts/{number:05d}.json"))
        if record is None or record["start"] != (number - 1) * part_size:
            return None
        part, left = integrity.new_digest(algorithm), record["size"]
        while left:
            data = body.read(min(left, READ_CHUNK))
            if not data:
                return None
            part.update(data)
            whole.update(data)
            left -= len(data)
        if part.digest().hex() != record["sha256"]:
            return None
    if body.read(1):
        return None
    return whole.digest()


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

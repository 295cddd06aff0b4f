# -*- test-case-name: tests.storage.test_s3 -*-
"""
What the S3 storage knows of S3 itself: its limits, C{s3://} URLs, the boto3
client (imported only when one is built: boto3 is an optional extra), the
mapping of boto errors, and L{Bucket}, the objects under one key prefix.

Every call here blocks; the storage runs them off the reactor thread.
"""

from __future__ import annotations

import json
from typing import Any, Callable, Sequence
from urllib.parse import urlsplit

from twisted.logger import Logger

from imgresume import integrity
from imgresume.errors import ImgresumeError, StorageError

# The backend logs as one namespace, imgresume.storage.s3.
log = Logger(namespace=__package__)

MiB = 1 << 20
#: S3's smallest part (all but the last) and its greatest part count.
MIN_PART_SIZE = 5 * MiB
MAX_PARTS = 10_000
#: S3's longest key, in UTF-8 bytes.
MAX_KEY_BYTES = 1024
#: Read size when hashing a stored object.
READ_CHUNK = 8 * MiB

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


def make_client(endpoint_url: str | None, region: str | None) -> Any:
    """A boto3 S3 client, from the arguments and the usual AWS_* environment."""
    import boto3

    return boto3.client("s3", endpoint_url=endpoint_url, region_name=region)


def _code(e: BaseException) -> str:
    response = getattr(e, "response", None) or {}
    return str(response.get("Error", {}).get("Code", ""))


def missing(e: BaseException) -> bool:
    """Whether a boto error says the object, or the multipart upload, is not there."""
    return _code(e) in _MISSING


def precondition_failed(e: BaseException) -> bool:
    """Whether a boto error says a conditional write found the key taken."""
    return _code(e) in ("PreconditionFailed", "412", "ConditionalRequestConflict")


def guard(what: str, f: Callable[..., Any], *args: Any) -> Any:
    """Call C{f}; map any non-imgresume failure to a L{StorageError}."""
    try:
        return f(*args)
    except ImgresumeError:
        raise
    except Exception as e:
        code = _code(e) or type(e).__name__
        log.failure("S3 storage: {what}", what=what)
        raise StorageError(f"{what}: {code}") from e


class Bucket:
    """
    The objects under one key prefix of one bucket, through a boto3 client:
    keys, small JSON records, listings.  Used by the S3 storage, its leases,
    its completion and its writers, all on the storage's disk threads.
    """

    def __init__(self, client: Any, name: str, prefix: str) -> None:
        self.client = client
        self.name = name
        self.prefix = prefix

    def key(self, rel: str) -> str:
        """The key of C{rel} under the prefix."""
        return self.prefix + rel

    def upload_key(self, upload_id: str, rel: str) -> str:
        """The key of C{rel} among the records of one upload."""
        return f"{self.prefix}incoming/{upload_id}/{rel}"

    def get_json(self, key: str) -> dict[str, Any] | None:
        """A JSON record; C{None} if it is missing (or not an object)."""
        try:
            body = self.client.get_object(Bucket=self.name, Key=key)["Body"].read()
        except Exception as e:
            if missing(e):
                return None
            raise
        try:
            value = json.loads(body)
        except ValueError:
            raise StorageError(f"unreadable record {key!r}") from None
        return value if isinstance(value, dict) else None

    def put_json(self, key: str, value: dict[str, Any], exclusive: bool = False) -> bool:
        """Store a JSON record; with C{exclusive}, only if the key is new."""
        kw: dict[str, Any] = {"IfNoneMatch": "*"} if exclusive else {}
        try:
            self.client.put_object(
                Bucket=self.name, Key=key, Body=json.dumps(value).encode(),
                ContentType="application/json", **kw)
        except Exception as e:
            if exclusive and precondition_failed(e):
                return False
            raise
        return True

    def exists(self, key: str) -> bool:
        """Whether an object has this key."""
        try:
            self.client.head_object(Bucket=self.name, Key=key)
        except Exception as e:
            if missing(e):
                return False
            raise
        return True

    def keys(self, prefix: str, start_after: str = "", limit: int = 0) -> list[str]:
        """The keys starting with C{prefix} (after C{start_after}; at most C{limit})."""
        keys: list[str] = []
        kw: dict[str, Any] = {"Bucket": self.name, "Prefix": prefix}
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

    def delete_prefix(self, prefix: str, keep: Sequence[str] = ()) -> None:
        """Delete every object whose key starts with C{prefix}, but those in C{keep}."""
        keys = [k for k in self.keys(prefix) if k not in keep]
        for i in range(0, len(keys), 1000):
            self.client.delete_objects(
                Bucket=self.name,
                Delete={"Objects": [{"Key": k} for k in keys[i : i + 1000]],
                        "Quiet": True})

    def read(self, key: str) -> bytes:
        """The bytes of an object."""
        return self.client.get_object(Bucket=self.name, Key=key)["Body"].read()

    def hash_object(
        self, key: str, digest: str = integrity.LEGACY_DIGEST
    ) -> tuple[bytes, int]:
        """The C{digest} (a name of L{imgresume.integrity.DIGESTS}) and length of an object, read back."""
        body = self.client.get_object(Bucket=self.name, Key=key)["Body"]
        h = integrity.new_digest(digest)
        n = 0
        for chunk in iter(lambda: body.read(READ_CHUNK), b""):
            h.update(chunk)
            n += len(chunk)
        return h.digest(), n

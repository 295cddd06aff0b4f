# -*- test-case-name: tests.storage.test_incomplete -*-
"""
The per-client index of incomplete uploads in the bucket, so that counting
a client's incomplete uploads is one listing::

    PREFIX/clients/c-<client id>/<upload id>.<declared size>

an empty object per upload of that client that is neither complete nor
removed: put before the multipart upload is created, deleted when the
upload completes, is aborted or expires.  Like the filesystem's index
(L{imgresume.storage.filesystem._incomplete}) it is a hint for a limit:
entries left behind (a crash, a bucket lifecycle rule that aborted the
multipart upload) are dropped by L{prune}.
"""

from __future__ import annotations

import re
import time
from typing import Any, Callable, Iterator

from imgresume.storage.interfaces import IncompleteUploads
from imgresume.storage.s3._bucket import Bucket, missing

#: An entry younger than this is never pruned: its upload may be being created.
GRACE = 600.0

_CLIENT_ID = re.compile(r"[A-Za-z0-9._@:+-]{0,128}")
_ENTRY = re.compile(r"([0-9a-f]{32})\.([0-9]{1,20})")


def _client_prefix(bucket: Bucket, client_id: str) -> str:
    if _CLIENT_ID.fullmatch(client_id):
        name = "c-" + client_id
    else:  # not a client id the protocol allows: a name that cannot clash with one
        name = "x-" + client_id.encode("utf-8", "surrogatepass").hex()[:200]
    return bucket.key(f"clients/{name}/")


def add(bucket: Bucket, client_id: str, upload_id: str, size: int) -> None:
    """Count a new upload of C{client_id} (before its multipart upload is created)."""
    bucket.client.put_object(
        Bucket=bucket.name, Key=_client_prefix(bucket, client_id) + f"{upload_id}.{size}",
        Body=b"")


def resize(bucket: Bucket, meta: dict[str, Any], size: int) -> None:
    """The upload C{meta} (its record before the change) now declares C{size} bytes."""
    add(bucket, meta["client_id"], meta["upload_id"], size)
    forget(bucket, meta)


def forget(bucket: Bucket, meta: dict[str, Any]) -> None:
    """The upload C{meta} is complete or removed: uncount it (best effort)."""
    try:
        bucket.client.delete_object(
            Bucket=bucket.name,
            Key=_client_prefix(bucket, meta["client_id"]) + f"{meta['upload_id']}.{meta['size']}")
    except Exception:
        pass


def _entries(bucket: Bucket, client_id: str) -> Iterator[tuple[str, str, int, Any]]:
    """The client's entries: (key, upload id, declared size, last modified)."""
    prefix = _client_prefix(bucket, client_id)
    kw: dict[str, Any] = {"Bucket": bucket.name, "Prefix": prefix}
    while True:
        page = bucket.client.list_objects_v2(**kw)
        for obj in page.get("Contents", ()):
            match = _ENTRY.fullmatch(obj["Key"][len(prefix):])
            if match is not None:
                yield obj["Key"], match.group(1), int(match.group(2)), obj.get("LastModified")
        if not page.get("IsTruncated"):
            return
        kw["ContinuationToken"] = page["NextContinuationToken"]


def count(bucket: Bucket, client_id: str) -> IncompleteUploads:
    """C{client_id}'s incomplete uploads, as the index has them (one listing)."""
    sizes = [size for _, _, size, _ in _entries(bucket, client_id)]
    return IncompleteUploads(len(sizes), sum(sizes))


def prune(
    bucket: Bucket,
    client_id: str,
    incomplete: Callable[[str], bool | None],
    now: Callable[[], float] = time.time,
) -> None:
    """
    Drop the entries whose upload C{incomplete(upload_id)} says is complete
    (False) or gone (None, for an entry older than L{GRACE}).  A few
    requests per entry: run it when a limit is about to refuse.
    """
    for key, upload_id, _, modified in list(_entries(bucket, client_id)):
        state = incomplete(upload_id)
        if state:
            continue
        if state is None and (modified is None or now() - modified.timestamp() < GRACE):
            continue
        try:
            bucket.client.delete_object(Bucket=bucket.name, Key=key)
        except Exception as e:
            if not missing(e):
                raise

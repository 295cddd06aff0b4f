# -*- test-case-name: tests.storage.test_filesystem.FilesystemLayoutTests -*-
"""
The on-disk layout of one upload, C{incoming/<upload_id>/}, and its small
records: C{meta.json} (what the upload is and its state), C{lease} (the
generation and owner of the current writer) and C{takeover} (a newer
connection's request to take over).  Used by the storage, its writers and
garbage collection, so all of them read and remove uploads by one set of
rules.
"""

from __future__ import annotations

import hashlib

import json
import os
import time
from typing import Any

from imgresume import integrity
from imgresume.errors import StorageError
from imgresume.storage.filesystem._durable import (
    atomic_write,
    fsync_dir,
    io_errors,
    read_small,
)
from imgresume.storage.interfaces import (
    CompletedUpload,
    NewerRecordFormat,
    UploadInfo,
)

#: The newest meta.json format this version reads and writes.  A record
#: carries the lowest format that describes it (L{record_format}): 1, the
#: original; 2 when its C{sha256} is null, the digest coming at completion
#: (FINISH), which a reader of format 1 cannot read.  Fields a reader does
#: not know (such as C{file}, the published file's identity) are ignored; a
#: change an older reader would misread takes a new format: 3 when the
#: record's C{digest} is not SHA-256 or its journal C{checksum} not CRC-32
#: (a record without them holds SHA-256 and CRC-32); 4 while its size is not
#: declared yet (C{size_deferred}: C{size} is only a bound, which a reader
#: of format 3 would take for the size).
FORMAT_VERSION = 4


class Paths:
    """The files of one upload, under the storage root C{root}."""

    def __init__(self, root: str, upload_id: str) -> None:
        self.rel = f"incoming/{upload_id}"
        self.dir = os.path.join(root, "incoming", upload_id)
        self.meta = os.path.join(self.dir, "meta.json")
        self.data = os.path.join(self.dir, "data")
        self.journal = os.path.join(self.dir, "journal")
        self.lock = os.path.join(self.dir, "lock")
        self.lease = os.path.join(self.dir, "lease")
        self.takeover = os.path.join(self.dir, "takeover")


def safe_relpath(rel: str) -> bool:
    """
    Whether C{rel} is a plain relative path: no empty, ".", ".." or hidden
    components, no NUL.  For paths read back from meta.json, whose total
    length may exceed what L{validate_name} accepts (alternate names).
    """
    return (
        isinstance(rel, str)
        and "\0" not in rel
        and all(p and not p.startswith(".") for p in rel.split("/"))
    )


def mtime(path: str) -> float:
    """The modification time of C{path}, or 0 if it cannot be had."""
    try:
        return os.stat(path).st_mtime
    except OSError:
        return 0.0


def dump(record: dict[str, Any]) -> bytes:
    """A record (meta.json, lease, takeover) as stored."""
    return (json.dumps(record, sort_keys=True, indent=1) + "\n").encode("utf-8")


def read_json(path: str) -> dict[str, Any] | None:
    """A small JSON record, or None if it is missing or unreadable."""
    try:
        value = json.loads(read_small(path))
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


# -- meta.json -----------------------------------------------------------------


def upload_info(meta: dict[str, Any]) -> UploadInfo:
    """The L{UploadInfo} an upload's meta.json describes."""
    return UploadInfo(
        upload_id=meta["upload_id"],
        name=meta["name"],
        size=meta["size"],
        sha256=None if meta["sha256"] is None else bytes.fromhex(meta["sha256"]),
        metadata=dict(meta["metadata"]),
        client_id=meta["client_id"],
        created=meta["created"],
        digest=algorithms(meta)[1],
        size_deferred=meta.get("size_deferred", False),
    )


def completed(meta: dict[str, Any]) -> CompletedUpload:
    """The L{CompletedUpload} the meta.json of a completed upload describes."""
    return CompletedUpload(
        upload_id=meta["upload_id"],
        name=meta["name"],
        size=meta["size"],
        sha256=bytes.fromhex(meta["sha256"]),
        path=meta["path"],
        digest=algorithms(meta)[1],
    )


def algorithms(meta: dict[str, Any]) -> tuple[str, str]:
    """
    The journal's record checksum and the digest of an upload's meta.json:
    CRC-32 and SHA-256 for a record that names none (written before
    format 3).
    """
    return (meta.get("checksum", integrity.LEGACY_CHECKSUM),
            meta.get("digest", integrity.LEGACY_DIGEST))


def record_format(meta: dict[str, Any]) -> int:
    """
    The lowest format that describes C{meta}: 4 while its size is not
    declared, else 3 if it holds other algorithms than CRC-32 and SHA-256,
    else 2 if its digest is still to come, else 1.
    """
    if meta.get("size_deferred"):
        return 4
    if algorithms(meta) != (integrity.LEGACY_CHECKSUM, integrity.LEGACY_DIGEST):
        return 3
    return 2 if meta["sha256"] is None else 1


def write_meta(paths: Paths, meta: dict[str, Any]) -> None:
    """Replace an upload's meta.json (atomically), stamped with its format."""
    meta["format"] = record_format(meta)
    atomic_write(paths.dir, "meta.json", dump(meta))


def file_identity(st: os.stat_result) -> dict[str, int]:
    """
    What identifies a published file, for C{meta["file"]}: its inode, size
    and modification time.  Not its device: a network filesystem's device
    number differs from one mount (host) to the next.
    """
    return {"inode": st.st_ino, "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _valid_identity(value: Any) -> bool:
    return isinstance(value, dict) and all(
        isinstance(value.get(k), int) for k in ("inode", "size", "mtime_ns")
    )


def read_meta(paths: Paths, upload_id: str) -> dict[str, Any] | None:
    """
    An upload's meta.json, checked; C{None} if there is none (the upload is
    unknown, or only half created or removed).  Reads every format up to
    L{FORMAT_VERSION}.

    @raise NewerRecordFormat: a newer imgresume wrote it.
    @raise StorageError: the record is unreadable or invalid.
    """
    with io_errors(f"cannot read {paths.rel}/meta.json"):
        try:
            raw = read_small(paths.meta)
        except FileNotFoundError:
            return None
    try:
        meta = json.loads(raw)
        found = meta["format"]
        if isinstance(found, int) and found > FORMAT_VERSION:
            raise NewerRecordFormat(upload_id, found, FORMAT_VERSION)
        ok = (
            isinstance(found, int)
            and found >= 1
            and meta["upload_id"] == upload_id
            and meta["state"] in ("partial", "completing", "complete")
            and isinstance(meta["size"], int)
            and meta["size"] >= 0
            and isinstance(meta.get("size_deferred", False), bool)
            and not (meta.get("size_deferred") and meta["state"] != "partial")
        )
        if meta["state"] != "partial":
            path = meta["path"]
            ok = ok and path.startswith("complete/") and safe_relpath(
                path.removeprefix("complete/")
            ) and meta["sha256"] is not None
        if meta["state"] == "complete" and "file" in meta:
            ok = ok and _valid_identity(meta["file"])
        upload_info(meta)
    except (ValueError, KeyError, TypeError, AttributeError):
        ok = False
    if not ok:
        raise StorageError(f"{paths.rel}/meta.json is not a valid record")
    return meta


def remove(paths: Paths) -> None:
    """
    Remove an upload's files and directory (under its lock): meta.json goes
    first, so an upload half removed is unknown, never resumable; the lock
    file last.
    """
    with io_errors(f"cannot remove {paths.rel}"):
        for p in (paths.meta, paths.data, paths.journal, paths.lease,
                  paths.takeover, paths.lock):
            try:
                os.unlink(p)
            except FileNotFoundError:
                pass
        # Temp files left by a crash during an atomic rewrite.
        for entry in os.listdir(paths.dir):
            if entry.startswith(".") and entry.endswith(".tmp"):
                try:
                    os.unlink(os.path.join(paths.dir, entry))
                except FileNotFoundError:
                    pass
        os.rmdir(paths.dir)
        fsync_dir(os.path.dirname(paths.dir))


# -- leases and takeover requests ------------------------------------------------


def lease_generation(paths: Paths) -> int:
    """
    The generation in an upload's lease, 0 if there is none yet or it
    cannot be read: for choosing a new generation and naming the one to
    take over, never for the fence (L{current_generation}).
    """
    lease = read_json(paths.lease)
    gen = lease.get("generation") if lease else 0
    return gen if isinstance(gen, int) and gen >= 0 else 0


def current_generation(paths: Paths) -> int:
    """
    The generation in an upload's lease, for the fence, which must fail
    closed: a lease that is missing or cannot be read is an error, never
    "generation 0" (which would fence nothing).

    @raise OSError: the lease cannot be read (after L{read_small}'s retries
        on ESTALE).
    @raise ValueError: it is missing or not a valid lease.
    """
    try:
        raw = read_small(paths.lease)
    except FileNotFoundError:
        raise ValueError("the lease file is missing") from None
    try:
        lease = json.loads(raw)
    except ValueError:
        lease = None
    gen = lease.get("generation") if isinstance(lease, dict) else None
    if not isinstance(gen, int) or isinstance(gen, bool) or gen < 1:
        raise ValueError("the lease file is not a valid lease")
    return gen


def next_generation(paths: Paths) -> int:
    """
    A generation higher than any before it, even if this host reads an old
    lease (another host's view of a shared filesystem can lag by a second):
    microseconds since the epoch, or one more than the lease says if that is
    higher (clocks behind).
    """
    return max(lease_generation(paths) + 1, time.time_ns() // 1000)


def write_lease(paths: Paths, generation: int, owner: str, now: float) -> None:
    """Record the new writer's generation (under the lock)."""
    atomic_write(paths.dir, "lease", dump(
        {"generation": generation, "owner": owner, "since": now}
    ))


def write_takeover(paths: Paths, generation: int, by: str, now: float) -> None:
    """Ask the writer of C{generation} to give the upload up."""
    atomic_write(paths.dir, "takeover", dump(
        {"generation": generation, "requested": now, "by": by}
    ))


def takeover_requested(paths: Paths, generation: int) -> bool:
    """Whether a newer connection asked the writer of C{generation} to yield."""
    request = read_json(paths.takeover)
    return bool(request) and request.get("generation") == generation


def sha256_of_data(paths: Paths, size: int) -> bytes:
    """
    The SHA-256 of the first C{size} bytes of an upload's data file (fewer
    if fewer are stored), read in pieces; blocking (a disk thread's work).
    """
    h = hashlib.sha256()
    with io_errors(f"cannot read {paths.rel}/data"), open(paths.data, "rb") as f:
        left = size
        while left:
            piece = f.read(min(1 << 20, left))
            if not piece:
                break
            h.update(piece)
            left -= len(piece)
    return h.digest()

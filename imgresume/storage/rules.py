# -*- test-case-name: tests.storage.test_memory,tests.storage.test_filesystem -*-
"""
The checks every storage backend makes the same way, first thing in its
writer's methods, so that a refusal reads the same whatever the backend:
a batch's place and end (L{batch_end}), the digest a completion must find
(L{expected_digest}) and a size declared later (L{check_declared_size}).
Called by the writers of L{imgresume.storage.filesystem},
L{imgresume.storage.s3} and L{imgresume.storage.memory}.
"""

from __future__ import annotations

from typing import Sequence

from imgresume.errors import Incomplete, OffsetMismatch, SizeExceeded
from imgresume.storage.interfaces import Chunk, UploadInfo


def check_declared_size(info: UploadInfo, offset: int, size: int) -> None:
    """
    Check a C{declare_size(size)} for the upload C{info} whose writer is
    at C{offset} (backends call it first thing): ValueError or
    L{SizeExceeded} as L{IDeclaresSize.declare_size} says.
    """
    if not info.size_deferred:
        raise ValueError(f"upload {info.upload_id} already has its size ({info.size})")
    if not 0 <= size <= info.size:
        raise ValueError(f"a size of upload {info.upload_id} is between 0 and "
                         f"{info.size}, not {size}")
    if size < offset:
        raise SizeExceeded(f"upload {info.upload_id} already holds {offset} bytes, "
                           f"more than the size {size} declared", offset=offset)


def batch_end(info: UploadInfo, offset: int, chunks: Sequence[Chunk]) -> int:
    """
    Where a batch of C{chunks} for a writer at C{offset} ends, once checked:
    each chunk starts where the one before ended, the first at C{offset},
    and the last ends within the declared size.  Backends call it first
    thing in C{write_batch()}, before storing anything.

    @raise imgresume.errors.OffsetMismatch: a chunk is out of place.
    @raise imgresume.errors.SizeExceeded: the batch passes the size.
    """
    end = offset
    for chunk in chunks:
        if chunk.offset != end:
            raise OffsetMismatch(
                f"write at {chunk.offset} but upload {info.upload_id} has "
                f"{end} bytes; continue from {offset}",
                offset=offset,
            )
        end = chunk.end
    if end > info.size:
        raise SizeExceeded(
            f"write up to {end} passes the declared size {info.size}", offset=offset)
    return end


def expected_digest(info: UploadInfo, sha256: bytes | None) -> bytes:
    """
    The SHA-256 a completion must find: the one declared at creation, or
    the one given to C{complete()} for an upload created without one.
    Backends call it first thing in C{complete()}.

    @raise ValueError: neither or both were given, or not 32 bytes.
    @raise imgresume.errors.Incomplete: the size is not declared yet.
    """
    if info.size_deferred:
        raise Incomplete(f"upload {info.upload_id} has no declared size yet: "
                         "declare it before completing the upload")
    if (info.sha256 is None) == (sha256 is None):
        raise ValueError(
            "complete() takes a SHA-256 exactly when the upload was created without one"
        )
    digest = info.sha256 if sha256 is None else sha256
    if len(digest) != 32:
        raise ValueError("a SHA-256 is 32 bytes")
    return bytes(digest)

# -*- test-case-name: tests.storage.test_filesystem.ProvenOffsetTests -*-
"""
The journal of an upload and the proof of its offset.

The journal holds one 20-byte record per committed range of the data file:
offset (u64), length (u32), checksum of the payload (u32: the upload's
record checksum, CRC-32C or CRC-32 as its meta.json says), then the CRC-32
of those 16 bytes (u32), all big-endian.  A writer appends records only after
the bytes they name are flushed (L{records}); a resume proves its offset from
them (L{prove}), never from a file size.  See C{docs/storage.md}.
"""

from __future__ import annotations

import os
import struct
from typing import Sequence

from imgresume import integrity
from imgresume.storage.filesystem._durable import drop_cache, pread_full
from imgresume.storage.interfaces import Chunk, TailCheck

RECORD = struct.Struct(">QII")
RECORD_CRC = struct.Struct(">I")
RECORD_SIZE = RECORD.size + RECORD_CRC.size
assert RECORD_SIZE == 20

#: Longest range one journal record covers; longer writes use several.
MAX_RECORD_LENGTH = 1 << 30
#: Read size for range checks.
READ_CHUNK = 1 << 20



def empty_tail(digest: str = integrity.LEGACY_DIGEST) -> TailCheck:
    """The tail of an upload with nothing stored yet: the digest of no bytes."""
    return TailCheck(0, 0, integrity.EMPTY_DIGESTS[digest])


def pack_record(offset: int, length: int, crc: int) -> bytes:
    """One journal record for C{length} bytes at C{offset} with checksum C{crc}."""
    body = RECORD.pack(offset, length, crc)
    return body + RECORD_CRC.pack(integrity.checksum("crc32", body))


def parse_record(raw: bytes) -> tuple[int, int, int] | None:
    """Decode one journal record, or C{None} if it is short or torn."""
    if len(raw) != RECORD_SIZE:
        return None
    body = raw[: RECORD.size]
    if integrity.checksum("crc32", body) != RECORD_CRC.unpack_from(raw, RECORD.size)[0]:
        return None
    return RECORD.unpack(body)


def records(chunks: Sequence[Chunk], checksum: str = integrity.LEGACY_CHECKSUM) -> list[bytes]:
    """
    The records naming the stored, non-empty C{chunks}: one per chunk,
    whose checksum (the protocol already checked it against the payload)
    is used when it is the upload's record C{checksum}; a chunk longer than
    L{MAX_RECORD_LENGTH}, or without that checksum, is covered by records
    computed here.
    """
    out = []
    for chunk in chunks:
        if (chunk.crc32 is not None and chunk.checksum == checksum
                and len(chunk.data) <= MAX_RECORD_LENGTH):
            out.append(pack_record(chunk.offset, len(chunk.data), chunk.crc32))
            continue
        offset = chunk.offset
        view = memoryview(chunk.data)
        while view:
            piece = view[:MAX_RECORD_LENGTH]
            out.append(pack_record(offset, len(piece), integrity.checksum(checksum, piece)))
            offset += len(piece)
            view = view[len(piece):]
    return out


def check_range(
    fd: int, offset: int, length: int, crc: int,
    checksum: str = integrity.LEGACY_CHECKSUM, digest: str = integrity.LEGACY_DIGEST,
) -> bytes | None:
    """
    Read C{length} stored bytes at C{offset}; return their C{digest} if
    they match C{crc} (a C{checksum}), C{None} if they do not or the file
    is too short.
    """
    h = integrity.new_digest(digest)
    crc_of = integrity.CHECKSUMS[checksum]
    running = 0
    got = 0
    while got < length:
        b = os.pread(fd, min(READ_CHUNK, length - got), offset + got)
        if not b:
            return None
        running = crc_of(b, running)
        h.update(b)
        got += len(b)
    if length == 0 or running != crc:
        return None
    return h.digest()


def prove(
    data_fd: int, journal_fd: int, size: int,
    checksum: str = integrity.LEGACY_CHECKSUM, digest: str = integrity.LEGACY_DIGEST,
) -> tuple[int, int, TailCheck, int]:
    """
    Establish the offset of an upload from its journal and data file.

    Records are accepted in order while each is intact (its own CRC), starts
    where the previous ended and stays within C{size}.  The last accepted
    record's range is then read back from the data file and checked against
    its C{checksum}; if it does not match, it is dropped and the one before is
    checked, and so on.  Earlier ranges were flushed before the next
    record was written, so they need no check.

    @return: (proven offset, number of records that prove it, tail, bytes
        of data stored past the proven offset, which are not trusted).
    """
    count = 0
    end = 0
    batch = RECORD_SIZE * 4096
    done = False
    # Another host may have extended the journal since this host cached it:
    # read what is stored, not the pages this host remembers.
    drop_cache(journal_fd)
    while not done:
        raw = pread_full(journal_fd, batch, count * RECORD_SIZE)
        done = len(raw) < batch
        for i in range(0, len(raw) - RECORD_SIZE + 1, RECORD_SIZE):
            rec = parse_record(raw[i : i + RECORD_SIZE])
            if rec is None:
                done = True
                break
            offset, length, _ = rec
            if offset != end or length == 0 or end + length > size:
                done = True
                break
            count += 1
            end += length
    tail = empty_tail(digest)
    while count:
        raw = pread_full(journal_fd, RECORD_SIZE, (count - 1) * RECORD_SIZE)
        rec = parse_record(raw)
        assert rec is not None
        offset, length, crc = rec
        # Only the range read needs its cached pages dropped: dropping a
        # whole large file's took most of a resume's time.
        drop_cache(data_fd, offset, length)
        found = check_range(data_fd, offset, length, crc, checksum, digest)
        if found is not None:
            tail = TailCheck(offset, length, found)
            break
        count -= 1
    proven = tail.start + tail.length
    stored = os.fstat(data_fd).st_size
    # Nothing past the proven offset is cut off.  It is never trusted: the
    # next writes overwrite it at their offsets, and completion trims the
    # file to its size.  Cutting it here would be wrong on a host whose view
    # is a moment old: it would delete bytes another host stored and
    # acknowledged since (the client would have to send them again).
    return proven, count, tail, max(0, stored - proven)


def first_bad_record(
    data_fd: int, journal_fd: int, count: int, checksum: str = integrity.LEGACY_CHECKSUM
) -> tuple[int, int] | None:
    """
    Check every one of the first C{count} records against the stored bytes
    (after dropping their cached pages), for an upload whose whole content
    did not hash to its digest.

    @return: C{(index, offset)} of the first record that is torn, out of
        place or whose range no longer matches its CRC-32; C{None} if every
        range matches.
    """
    drop_cache(data_fd)
    end = 0
    for i in range(count):
        rec = parse_record(pread_full(journal_fd, RECORD_SIZE, i * RECORD_SIZE))
        if rec is None or rec[0] != end:
            return i, end
        offset, length, crc = rec
        if check_range(data_fd, offset, length, crc, checksum) is None:
            return i, offset
        end += length
    return None

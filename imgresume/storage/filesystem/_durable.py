# -*- test-case-name: tests.storage.test_filesystem -*-
"""
Durable-write primitives of the filesystem storage, and the mapping of
C{OSError} to the storage's errors.

Everything here blocks and runs on a disk thread: positional writes that
loop on short writes, full reads, a directory fsync that tolerates
filesystems which cannot sync directories, an atomic and durable file
replacement, and dropping a file's cached pages so what is read next is what
is stored.
"""

from __future__ import annotations

import errno
import os
import time
from contextlib import contextmanager
from typing import Callable, Iterator

from imgresume.errors import ImgresumeError, StorageError, StorageFull

#: The errnos that mean "no room": the client is told the storage is full.
NOSPACE = frozenset({errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)})
CLOEXEC = getattr(os, "O_CLOEXEC", 0)
DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | CLOEXEC

# An indirection so tests can simulate a crash or a race at this step.
_replace = os.replace


def fail(e: OSError, what: str) -> ImgresumeError:
    """Map an OSError to StorageFull/StorageError without its (absolute) path."""
    text = e.strerror or errno.errorcode.get(e.errno or 0, repr(e))
    if e.errno in NOSPACE:
        return StorageFull(f"{what}: {text}")
    return StorageError(f"{what}: {text}")


@contextmanager
def io_errors(what: str) -> Iterator[None]:
    """Raise any C{OSError} of the block as L{fail} maps it, saying C{what} failed."""
    try:
        yield
    except OSError as e:
        raise fail(e, what) from e


def pwrite_all(pwrite: Callable[[int, bytes, int], int], fd: int,
               data: bytes, offset: int) -> None:
    """Write all of C{data} at C{offset}, looping on short writes."""
    view = memoryview(data)
    while view:
        n = pwrite(fd, view, offset)
        if n <= 0:
            raise OSError(errno.EIO, "pwrite wrote nothing")
        view = view[n:]
        offset += n


def pread_full(fd: int, length: int, offset: int) -> bytes:
    """Read up to C{length} bytes at C{offset}; short only at end of file."""
    parts = []
    while length > 0:
        b = os.pread(fd, length, offset)
        if not b:
            break
        parts.append(b)
        length -= len(b)
        offset += len(b)
    return b"".join(parts)


def fsync_dir(path: str) -> None:
    """fsync a directory so the entries created/renamed in it are durable."""
    fd = os.open(path, DIR_FLAGS)
    try:
        try:
            os.fsync(fd)
        except OSError as e:
            # Some filesystems cannot fsync a directory at all.
            if e.errno != errno.EINVAL:
                raise
    finally:
        os.close(fd)


def atomic_write(dirpath: str, name: str, data: bytes) -> None:
    """
    Replace C{dirpath/name} with C{data} atomically and durably: temp file in
    the same directory, fsync, rename over, fsync the directory.
    """
    tmp = os.path.join(dirpath, f".{name}.{os.urandom(6).hex()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | CLOEXEC, 0o644)
    try:
        try:
            pwrite_all(os.pwrite, fd, data, 0)
            os.fsync(fd)
        finally:
            os.close(fd)
        _replace(tmp, os.path.join(dirpath, name))
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    fsync_dir(dirpath)


def drop_cache(fd: int, offset: int = 0, length: int = 0) -> None:
    """
    Best effort: drop this host's cached (clean, already flushed) pages of a
    file (of C{length} bytes at C{offset}; 0: to the end), so the next reads
    go to the disk or, on a network filesystem, to the server.  What is then
    verified is what is stored, not what this host remembers writing.
    """
    try:
        os.posix_fadvise(fd, offset, length, os.POSIX_FADV_DONTNEED)
    except (AttributeError, OSError):
        pass


def read_small(path: str) -> bytes:
    """
    Read a small file whole.  A network filesystem may answer ESTALE while
    another host replaces the file (seen on GlusterFS): try again briefly.
    """
    for attempt in range(5):
        try:
            with open(path, "rb") as f:
                return f.read()
        except OSError as e:
            if e.errno != errno.ESTALE or attempt == 4:
                raise
            time.sleep(0.02 * (attempt + 1))
    raise AssertionError("unreachable")

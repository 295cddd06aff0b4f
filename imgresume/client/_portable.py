# -*- test-case-name: tests.client.test_portable -*-
"""
The client's file access, the same on Linux, macOS and Windows: the flags
it opens files with, flushing a file's data, flushing a directory, and
positional reads that several threads may make at once on one descriptor.
Where the system has the POSIX call (C{os.pread}, C{os.fdatasync},
C{O_DIRECTORY}) it is used; elsewhere its portable equivalent.  The
server side uses the POSIX calls directly: it runs on POSIX hosts only.
"""

from __future__ import annotations

import os
import threading

#: Flags for every descriptor the client opens: not inherited by child
#: processes (Python's default since PEP 446; O_CLOEXEC says it on POSIX)
#: and, on Windows, binary (O_BINARY: no newline translation).
OPEN_FLAGS = getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0)


def flush_data(fd: int) -> None:
    """Flush the file's data to disk: C{fdatasync} where there is one (Linux), else C{fsync}."""
    flush = getattr(os, "fdatasync", None) or os.fsync
    flush(fd)


def fsync_directory(directory: str) -> None:
    """
    Make a rename in C{directory} durable where the system can; Windows
    cannot open a directory as a file (nothing is done there: NTFS makes
    the rename durable with its own journal).
    """
    try:
        fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | OPEN_FLAGS)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems cannot flush a directory
    finally:
        os.close(fd)


class PositionalReader:
    """
    Reads at a given offset of one open file, from any thread: with
    C{os.pread} where the system has it (the descriptor's position is not
    used), else by a seek and a read under a lock (Windows: the position
    is shared by every thread).  Made by the client's L{LocalFile}.
    """

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._pread = getattr(os, "pread", None)
        self._lock = threading.Lock()

    def read(self, length: int, offset: int) -> bytes:
        """Up to C{length} bytes at C{offset} (fewer at the end of the file)."""
        if self._pread is not None:
            return self._pread(self._fd, length, offset)
        with self._lock:
            os.lseek(self._fd, offset, os.SEEK_SET)
            return os.read(self._fd, length)

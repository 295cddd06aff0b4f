# -*- test-case-name: tests.client.test_uploader -*-
"""
The local file being uploaded: its identity, its SHA-256 and positional
reads, all done off the reactor thread through a runner.
"""

from __future__ import annotations

import hashlib
import os
import zlib
from typing import Any, Callable

import attrs
from twisted.internet.defer import Deferred

Runner = Callable[..., Deferred[Any]]
READ_SIZE = 1024 * 1024


@attrs.frozen
class Fingerprint:
    """What identifies one version of a local file without reading it."""

    path: str
    size: int
    mtime_ns: int
    inode: int
    device: int


class HashStopped(Exception):
    """A background hash was stopped before its end (the upload ended)."""


class LocalFile:
    """
    An open local file.  Created by the uploader with L{LocalFile.open};
    read by the upload attempt, one chunk at a time.
    """

    def __init__(self, fd: int, fingerprint: Fingerprint, run: Runner) -> None:
        self._fd = fd
        self.fingerprint = fingerprint
        self.size = fingerprint.size
        self._run = run

    @classmethod
    def open(cls, path: str, run: Runner) -> Deferred["LocalFile"]:
        """Open C{path} for reading (in a thread)."""

        def _open() -> LocalFile:
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
            st = os.fstat(fd)
            fp = Fingerprint(
                os.path.realpath(path), st.st_size, st.st_mtime_ns, st.st_ino, st.st_dev
            )
            return cls(fd, fp, run)

        return run(_open)

    def sha256(
        self,
        progress: Callable[[int], None] | None = None,
        stopped: Callable[[], bool] = lambda: False,
    ) -> Deferred[bytes]:
        """
        Hash the whole file in a thread; C{progress(bytes_done)} may be
        called from it.  If C{stopped()} becomes true, the hash stops (the
        Deferred fails with L{HashStopped}) before the next block is read.
        """

        def _hash() -> bytes:
            h = hashlib.sha256()
            offset = 0
            while offset < self.size:
                if stopped():
                    raise HashStopped(self.fingerprint.path)
                block = os.pread(self._fd, READ_SIZE * 4, offset)
                if not block:
                    raise OSError(f"{self.fingerprint.path} shrank while hashing")
                h.update(block)
                offset += len(block)
                if progress is not None:
                    progress(offset)
            return h.digest()

        return self._run(_hash)

    def read_with_crc(self, offset: int, length: int) -> Deferred[tuple[bytes, int]]:
        """
        Read exactly C{length} bytes at C{offset} and compute their CRC-32,
        both in a thread (off the reactor).
        """

        def read() -> tuple[bytes, int]:
            data = self._read_exactly(offset, length)
            return data, zlib.crc32(data)

        return self._run(read)

    def sha256_of(self, offset: int, length: int) -> Deferred[bytes]:
        """SHA-256 of the bytes at [offset, offset+length), in a thread."""
        return self._run(lambda: hashlib.sha256(self._read_exactly(offset, length)).digest())

    def _read_exactly(self, offset: int, length: int) -> bytes:
        parts = []
        while length:
            block = os.pread(self._fd, length, offset)
            if not block:
                raise OSError(f"{self.fingerprint.path} is shorter than expected")
            parts.append(block)
            offset += len(block)
            length -= len(block)
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def close(self) -> None:
        """Close the file descriptor."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

# -*- test-case-name: tests.client.test_uploader,tests.client.test_source -*-
"""
The local file being uploaded: its identity, its SHA-256, positional reads
(portable: L{imgresume.client._portable}) and the check that it has not changed since it was opened, all done off the
reactor thread through a runner.
"""

from __future__ import annotations

import os
from typing import Any, Callable, TypeVar

import attrs
from twisted.internet.defer import Deferred

from imgresume import integrity
from imgresume.client._portable import OPEN_FLAGS, PositionalReader

Runner = Callable[..., Deferred[Any]]
T = TypeVar("T")
READ_SIZE = 1024 * 1024


@attrs.frozen
class Fingerprint:
    """What identifies one version of a local file without reading it."""

    path: str
    size: int
    mtime_ns: int
    inode: int
    device: int

    @classmethod
    def of(cls, path: str, st: os.stat_result) -> "Fingerprint":
        """The fingerprint of the file at C{path}, whose status is C{st}."""
        return cls(os.path.realpath(path), st.st_size, st.st_mtime_ns, st.st_ino, st.st_dev)


class SourceChanged(Exception):
    """
    The local file changed while it was being uploaded: its size, its
    modification or status-change time, or the file at its path is not the
    one opened.  What was sent is not the file as it is: the upload fails
    (it is not retried); run it again once the file no longer changes.
    """


class HashStopped(Exception):
    """A background hash was stopped before its end (the upload ended)."""


class LocalFile:
    """
    An open local file.  Created by the uploader with L{LocalFile.open};
    read by the upload attempt, one chunk at a time.
    """

    def __init__(self, fd: int, fingerprint: Fingerprint, run: Runner, ctime_ns: int = 0) -> None:
        self._fd = fd
        self._reader = PositionalReader(fd)
        self.fingerprint = fingerprint
        self.size = fingerprint.size
        self._run = run
        #: The status-change time when opened: no ordinary program can set
        #: it back, so it betrays a rewrite whose mtime was restored.
        self._ctime_ns = ctime_ns

    @classmethod
    def open(cls, path: str, run: Runner) -> Deferred["LocalFile"]:
        """Open C{path} for reading (in a thread)."""

        def _open() -> LocalFile:
            fd = os.open(path, os.O_RDONLY | OPEN_FLAGS)
            st = os.fstat(fd)
            return cls(fd, Fingerprint.of(path, st), run, st.st_ctime_ns)

        return run(_open)

    def sha256(
        self,
        progress: Callable[[int], None] | None = None,
        stopped: Callable[[], bool] = lambda: False,
        algorithm: str = integrity.LEGACY_DIGEST,
    ) -> Deferred[bytes]:
        """
        Hash the whole file in a thread with C{algorithm} (a name of
        L{imgresume.integrity.DIGESTS}; the method keeps its historical
        name); C{progress(bytes_done)} may be called from it.  If
        C{stopped()} becomes true, the hash stops (the Deferred fails with
        L{HashStopped}) before the next block is read.
        """

        def _hash() -> bytes:
            h = integrity.new_digest(algorithm)
            offset = 0
            while offset < self.size:
                if stopped():
                    raise HashStopped(self.fingerprint.path)
                block = self._reader.read(READ_SIZE * 4, offset)
                if not block:
                    raise SourceChanged(f"it shrank below {self.size} bytes while being read")
                h.update(block)
                offset += len(block)
                if progress is not None:
                    progress(offset)
            return h.digest()

        return self._run(_hash)

    def read_with_crc(
        self, offset: int, length: int, checksum: str = integrity.LEGACY_CHECKSUM
    ) -> Deferred[tuple[bytes, int]]:
        """
        Read exactly C{length} bytes at C{offset} and compute their
        C{checksum} (a name of L{imgresume.integrity.CHECKSUMS}), both in a
        thread (off the reactor).
        """

        def read() -> tuple[bytes, int]:
            data = self._read_exactly(offset, length)
            return data, integrity.checksum(checksum, data)

        return self._run(read)

    def sha256_of(
        self, offset: int, length: int, algorithm: str = integrity.LEGACY_DIGEST
    ) -> Deferred[bytes]:
        """The C{algorithm} digest of the bytes at [offset, offset+length), in a thread."""
        return self._run(
            lambda: integrity.digest_of(algorithm, self._read_exactly(offset, length)))

    def read_whole(
        self, then: Callable[[bytes, bytes], T] = lambda data, digest: (data, digest),
        algorithm: str = integrity.LEGACY_DIGEST,
    ) -> Deferred[T]:
        """
        Read the whole file, compute its C{algorithm} digest (what names its
        PUT), check that it is unchanged (L{check_unchanged}), and hand both
        to C{then}: all in one task of a thread (a small file sent in one
        PUT costs one trip off the reactor).  The Deferred fires with what
        C{then} returns (by default, the bytes and their digest), or fails
        with L{SourceChanged}.
        """

        def read() -> T:
            data = self._read_exactly(0, self.size)
            digest = integrity.digest_of(algorithm, data)
            self._check_unchanged()
            return then(data, digest)

        return self._run(read)

    def _read_exactly(self, offset: int, length: int) -> bytes:
        parts = []
        while length:
            block = self._reader.read(length, offset)
            if not block:
                raise SourceChanged(f"it shrank below {self.size} bytes while being read")
            parts.append(block)
            offset += len(block)
            length -= len(block)
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def check_unchanged(self) -> Deferred[None]:
        """
        Check, in a thread, that the file is still the one opened, as it
        was: the same size, modification and status-change times through
        the open descriptor, and the same file (inode and device) at its
        path.  Fails with L{SourceChanged} saying what differs.  Called by
        the upload before the end of every attempt (before FINISH or the
        empty DATA packet, after the last read) and before each resume.
        """
        return self._run(self._check_unchanged)

    def _check_unchanged(self) -> None:
        fp = self.fingerprint
        try:
            there = os.stat(fp.path)
        except FileNotFoundError:
            raise SourceChanged(f"{fp.path} was removed or renamed") from None
        if (there.st_ino, there.st_dev) != (fp.inode, fp.device):
            raise SourceChanged(f"{fp.path} is now another file (replaced)")
        now = os.fstat(self._fd)
        if now.st_size != fp.size:
            grew = "grew" if now.st_size > fp.size else "shrank"
            raise SourceChanged(f"it {grew} from {fp.size} to {now.st_size} bytes")
        if now.st_mtime_ns != fp.mtime_ns:
            raise SourceChanged("it was modified (its modification time changed)")
        if now.st_ctime_ns != self._ctime_ns:
            raise SourceChanged(
                "its status-change time changed: it was rewritten with its modification "
                "time set back, or its mode, owner or links changed")

    def close(self) -> None:
        """Close the file descriptor."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

# -*- test-case-name: tests.storage.test_filesystem.LockingTests -*-
"""
Write ownership of an upload: an exclusive, non-blocking lock on its
C{lock} file, taken by the storage on create and resume, by garbage
collection before it removes anything, and probed by the self-test.

An OFD (open file description) lock where the platform has it: it belongs
to one open file, so it excludes other opens in this process as well as
other processes, and lock-aware network filesystems (NFS, CephFS, GlusterFS)
carry it to other hosts.  Otherwise a POSIX C{lockf} lock, guarded by a
per-process table.
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct
import threading

from imgresume.errors import StorageError, UnknownUpload, UploadBusy
from imgresume.storage.filesystem._durable import CLOEXEC

#: Whether the platform has OFD locks.
HAVE_OFD = hasattr(fcntl, "F_OFD_SETLK")
# struct flock: short l_type, short l_whence, off_t l_start, off_t l_len,
# pid_t l_pid, padded to the alignment of off_t ("0q").
_FLOCK = struct.Struct("hhqqi0q")

# Only used without OFD locks: POSIX record locks belong to the process, so
# two opens of one lock file in this process would not exclude each other,
# and closing either would drop the lock.  This table (dev, ino) makes the
# process open a lock file at most once.
_process_locks: set[tuple[int, int]] = set()
_process_locks_mutex = threading.Lock()


def try_lock(fd: int) -> bool:
    """
    Take an exclusive, non-blocking lock on the whole file open on C{fd}:
    an OFD lock where the platform has it, otherwise a POSIX C{lockf} lock.

    @return: C{False} if another holder has the file locked.
    """
    try:
        if HAVE_OFD:
            fcntl.fcntl(
                fd,
                fcntl.F_OFD_SETLK,
                _FLOCK.pack(fcntl.F_WRLCK, os.SEEK_SET, 0, 0, 0),
            )
        else:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno in (errno.EAGAIN, errno.EACCES):
            return False
        raise
    return True


def unlock(fd: int) -> None:
    """
    Release the lock taken by L{try_lock} on C{fd}, explicitly.  Closing
    the fd also releases it, but over FUSE (GlusterFS) that release may
    reach the servers only after close() has returned, so another host can
    still find the upload busy; an explicit unlock is a synchronous request.
    """
    if HAVE_OFD:
        fcntl.fcntl(
            fd, fcntl.F_OFD_SETLK, _FLOCK.pack(fcntl.F_UNLCK, os.SEEK_SET, 0, 0, 0)
        )
    else:
        fcntl.lockf(fd, fcntl.LOCK_UN)


class Lock:
    """
    A held lock on one upload's C{lock} file; closing the fd releases it.
    Made by L{acquire} and L{lock_new}; held by a writer for as long as it
    owns the upload, or by garbage collection while it removes one.
    """

    def __init__(self, fd: int, key: tuple[int, int] | None) -> None:
        self.fd = fd
        self._key = key

    def release(self) -> None:
        """Let go of the lock and close its file.  Idempotent."""
        fd, self.fd = self.fd, -1
        if fd >= 0:
            try:
                unlock(fd)
            except OSError:
                pass  # closing releases it anyway
            try:
                os.close(fd)
            except OSError:
                pass
            if self._key is not None:
                with _process_locks_mutex:
                    _process_locks.discard(self._key)


def acquire(lock_path: str, upload_id: str, retry_after: float) -> Lock:
    """
    Open and lock an existing C{lock} file.

    @raise UnknownUpload: the file is gone (aborted), or was replaced.
    @raise UploadBusy: someone holds the lock.
    """
    key = None
    if not HAVE_OFD:
        try:
            st = os.stat(lock_path)
        except FileNotFoundError:
            raise UnknownUpload(f"no upload with id {upload_id}") from None
        key = (st.st_dev, st.st_ino)
        with _process_locks_mutex:
            if key in _process_locks:
                raise busy_error(upload_id, retry_after)
            _process_locks.add(key)
    lock = Lock(-1, key)
    try:
        try:
            lock.fd = os.open(lock_path, os.O_RDWR | CLOEXEC)
        except FileNotFoundError:
            raise UnknownUpload(f"no upload with id {upload_id}") from None
        if not try_lock(lock.fd):
            raise busy_error(upload_id, retry_after)
        # The file we locked must still be the upload's lock file: an abort
        # unlinks it before giving up its own lock.
        held = os.fstat(lock.fd)
        try:
            current = os.stat(lock_path)
        except FileNotFoundError:
            current = None
        if current is None or (current.st_dev, current.st_ino) != (
            held.st_dev,
            held.st_ino,
        ):
            raise UnknownUpload(f"no upload with id {upload_id}")
    except BaseException:
        lock.release()
        raise
    return lock


def lock_new(fd: int) -> Lock:
    """Lock a lock file this process has just created (nobody else knows it)."""
    lock = lock_open(fd)
    if lock is None:  # pragma: no cover - a fresh random id
        raise StorageError("cannot lock a new upload")
    return lock


def lock_open(fd: int) -> Lock | None:
    """
    Lock the file this process has open on C{fd}, without blocking: the
    L{Lock} (which now owns C{fd}), or C{None} if another holder has it
    (C{fd} is then closed).  For files that are their own lock, such as
    the C{.put} files of the one-step store.
    """
    key = None
    if not HAVE_OFD:
        st = os.fstat(fd)
        key = (st.st_dev, st.st_ino)
        with _process_locks_mutex:
            if key in _process_locks:
                os.close(fd)
                return None
            _process_locks.add(key)
    lock = Lock(fd, key)
    try:
        locked = try_lock(fd)
    except BaseException:
        lock.release()
        raise
    if not locked:
        lock.release()
        return None
    return lock


def busy_error(upload_id: str, retry_after: float) -> UploadBusy:
    """The error for an upload another connection is writing."""
    return UploadBusy(
        f"upload {upload_id} is being written by another connection",
        retry_after=retry_after,
    )


def lock_is_held(lock_path: str) -> bool:
    """Whether some writer holds an upload's lock (probed without keeping it)."""
    try:
        fd = os.open(lock_path, os.O_RDWR | CLOEXEC)
    except FileNotFoundError:
        return False
    try:
        if not HAVE_OFD:
            return False  # a probe would disturb this process's own POSIX locks
        if not try_lock(fd):
            return True
        unlock(fd)
        return False
    finally:
        os.close(fd)

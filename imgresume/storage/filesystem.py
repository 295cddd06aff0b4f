# -*- test-case-name: tests.storage.test_filesystem.FilesystemStorageTests -*-
"""
The filesystem L{IUploadStorage}: partial and completed uploads in one
directory tree that every server process, on every host, mounts (local disk,
NFS, CephFS, GlusterFS).

Layout under the root::

    incoming/<upload_id>/meta.json   what the upload is and its state
    incoming/<upload_id>/data        the bytes, written with pwrite only
    incoming/<upload_id>/journal     one 20-byte record per committed write
    incoming/<upload_id>/lock        OFD lock = write ownership
    incoming/<upload_id>/lease       generation and owner of the current writer
    incoming/<upload_id>/takeover    a newer connection's request to take over
    complete/<name>                  finished files (hard links of data)

The offset an upload resumes from is never a file size: it is proven from the
journal (checksummed records) and from the CRC-32 of the last recorded range
read back from the data file.  See C{docs/storage.md} for the whole design.

All disk work runs through the C{run} callable given to L{FilesystemStorage}
(a thread pool in the server), so the reactor never blocks on disk.  Every
C{_..._sync} function below runs there; nothing else touches the disk.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import stat
import struct
import threading
import time
import zlib
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Sequence

from twisted.internet import defer
from twisted.internet.defer import Deferred, DeferredLock
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.filepath import FilePath
from zope.interface import implementer

from imgresume.errors import (
    DigestMismatch,
    ImgresumeError,
    Incomplete,
    InternalError,
    InvalidName,
    OffsetMismatch,
    SizeExceeded,
    StorageError,
    StorageFull,
    UnknownUpload,
    UploadAlreadyComplete,
    UploadBusy,
    UploadTakenOver,
)
from imgresume.storage._ids import is_upload_id, new_upload_id
from imgresume.storage._readback import ReadBack, ReadBackFailed
from imgresume.storage._names import completion_candidates, validate_name
from imgresume.storage.interfaces import (
    ATOMIC_COMPLETE,
    DURABLE_ACK,
    EXCLUSIVE_WRITER,
    PROVEN_OFFSET,
    SHARED,
    CompletedUpload,
    IUploadStorage,
    IUploadWriter,
    NewUpload,
    TailCheck,
    UploadInfo,
    UploadStatus,
    expected_digest,
)

log = Logger()

#: Version of meta.json; bump on any incompatible change.
FORMAT_VERSION = 1

#: A journal record: offset (u64), length (u32), CRC-32 of the payload (u32),
#: then the CRC-32 of those 16 bytes (u32), all big-endian.
RECORD = struct.Struct(">QII")
RECORD_CRC = struct.Struct(">I")
RECORD_SIZE = RECORD.size + RECORD_CRC.size
assert RECORD_SIZE == 20

#: Longest range one journal record covers; longer writes use several.
MAX_RECORD_LENGTH = 1 << 30
#: Read size for read-back hashing and range checks.
READ_CHUNK = 1 << 20

_NOSPACE = frozenset({errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)})
_EMPTY_TAIL = TailCheck(0, 0, hashlib.sha256(b"").digest())
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | _CLOEXEC

# Indirections so tests can simulate a crash or a race at these steps.
_replace = os.replace
_link = os.link

# ---------------------------------------------------------------------------
# Locking

_HAVE_OFD = hasattr(fcntl, "F_OFD_SETLK")
# struct flock: short l_type, short l_whence, off_t l_start, off_t l_len,
# pid_t l_pid, padded to the alignment of off_t ("0q").
_FLOCK = struct.Struct("hhqqi0q")

# Only used without OFD locks: POSIX record locks belong to the process, so
# two opens of one lock file in this process would not exclude each other,
# and closing either would drop the lock.  This table (dev, ino) makes the
# process open a lock file at most once.
_process_locks: set[tuple[int, int]] = set()
_process_locks_mutex = threading.Lock()


def _try_lock(fd: int) -> bool:
    """
    Take an exclusive, non-blocking lock on the whole file open on C{fd}.

    An OFD (open file description) lock where the platform has it: it belongs
    to this open file, so it excludes other opens in this process as well as
    other processes, and lock-aware network filesystems (NFS, CephFS,
    GlusterFS) carry it to other hosts.  Otherwise a POSIX C{lockf} lock.

    @return: C{False} if another holder has the file locked.
    """
    try:
        if _HAVE_OFD:
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


def _unlock(fd: int) -> None:
    """
    Release the lock taken by L{_try_lock} on C{fd}, explicitly.  Closing
    the fd also releases it, but over FUSE (GlusterFS) that release may
    reach the servers only after close() has returned, so another host can
    still find the upload busy; an explicit unlock is a synchronous request.
    """
    if _HAVE_OFD:
        fcntl.fcntl(
            fd, fcntl.F_OFD_SETLK, _FLOCK.pack(fcntl.F_UNLCK, os.SEEK_SET, 0, 0, 0)
        )
    else:
        fcntl.lockf(fd, fcntl.LOCK_UN)


class _Lock:
    """A held lock on one upload's C{lock} file; closing the fd releases it."""

    def __init__(self, fd: int, key: tuple[int, int] | None) -> None:
        self.fd = fd
        self._key = key

    def release(self) -> None:
        fd, self.fd = self.fd, -1
        if fd >= 0:
            try:
                _unlock(fd)
            except OSError:
                pass  # closing releases it anyway
            try:
                os.close(fd)
            except OSError:
                pass
            if self._key is not None:
                with _process_locks_mutex:
                    _process_locks.discard(self._key)


def _acquire(lock_path: str, upload_id: str, retry_after: float) -> _Lock:
    """
    Open and lock an existing C{lock} file.

    @raise UnknownUpload: the file is gone (aborted), or was replaced.
    @raise UploadBusy: someone holds the lock.
    """
    key = None
    if not _HAVE_OFD:
        try:
            st = os.stat(lock_path)
        except FileNotFoundError:
            raise UnknownUpload(f"no upload with id {upload_id}") from None
        key = (st.st_dev, st.st_ino)
        with _process_locks_mutex:
            if key in _process_locks:
                raise _busy(upload_id, retry_after)
            _process_locks.add(key)
    lock = _Lock(-1, key)
    try:
        try:
            lock.fd = os.open(lock_path, os.O_RDWR | _CLOEXEC)
        except FileNotFoundError:
            raise UnknownUpload(f"no upload with id {upload_id}") from None
        if not _try_lock(lock.fd):
            raise _busy(upload_id, retry_after)
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


def _lock_new(fd: int) -> _Lock:
    """Lock a lock file this process has just created (nobody else knows it)."""
    key = None
    if not _HAVE_OFD:
        st = os.fstat(fd)
        key = (st.st_dev, st.st_ino)
        with _process_locks_mutex:
            _process_locks.add(key)
    lock = _Lock(fd, key)
    try:
        if not _try_lock(fd):  # pragma: no cover - a fresh random id
            raise StorageError("cannot lock a new upload")
    except BaseException:
        lock.release()
        raise
    return lock


def _busy(upload_id: str, retry_after: float) -> UploadBusy:
    return UploadBusy(
        f"upload {upload_id} is being written by another connection",
        retry_after=retry_after,
    )


# ---------------------------------------------------------------------------
# Low-level helpers (all run on the disk thread)


def _fail(e: OSError, what: str) -> ImgresumeError:
    """Map an OSError to StorageFull/StorageError without its (absolute) path."""
    text = e.strerror or errno.errorcode.get(e.errno or 0, repr(e))
    if e.errno in _NOSPACE:
        return StorageFull(f"{what}: {text}")
    return StorageError(f"{what}: {text}")


@contextmanager
def _io(what: str) -> Iterator[None]:
    try:
        yield
    except OSError as e:
        raise _fail(e, what) from e


def _pwrite_all(pwrite: Callable[[int, bytes, int], int], fd: int,
                data: bytes, offset: int) -> None:
    """Write all of C{data} at C{offset}, looping on short writes."""
    view = memoryview(data)
    while view:
        n = pwrite(fd, view, offset)
        if n <= 0:
            raise OSError(errno.EIO, "pwrite wrote nothing")
        view = view[n:]
        offset += n


def _pread_full(fd: int, length: int, offset: int) -> bytes:
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


def _fsync_dir(path: str) -> None:
    """fsync a directory so the entries created/renamed in it are durable."""
    fd = os.open(path, _DIR_FLAGS)
    try:
        try:
            os.fsync(fd)
        except OSError as e:
            # Some filesystems cannot fsync a directory at all.
            if e.errno != errno.EINVAL:
                raise
    finally:
        os.close(fd)


def _atomic_write(dirpath: str, name: str, data: bytes) -> None:
    """
    Replace C{dirpath/name} with C{data} atomically and durably: temp file in
    the same directory, fsync, rename over, fsync the directory.
    """
    tmp = os.path.join(dirpath, f".{name}.{os.urandom(6).hex()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _CLOEXEC, 0o644)
    try:
        try:
            _pwrite_all(os.pwrite, fd, data, 0)
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
    _fsync_dir(dirpath)


def _pack_record(offset: int, length: int, crc: int) -> bytes:
    body = RECORD.pack(offset, length, crc)
    return body + RECORD_CRC.pack(zlib.crc32(body))


def _parse_record(raw: bytes) -> tuple[int, int, int] | None:
    """Decode one journal record, or C{None} if it is short or torn."""
    if len(raw) != RECORD_SIZE:
        return None
    body = raw[: RECORD.size]
    if zlib.crc32(body) != RECORD_CRC.unpack_from(raw, RECORD.size)[0]:
        return None
    return RECORD.unpack(body)


def _check_range(fd: int, offset: int, length: int, crc: int) -> bytes | None:
    """
    Read C{length} stored bytes at C{offset}; return their SHA-256 if they
    match C{crc}, C{None} if they do not or the file is too short.
    """
    h = hashlib.sha256()
    running = 0
    got = 0
    while got < length:
        b = os.pread(fd, min(READ_CHUNK, length - got), offset + got)
        if not b:
            return None
        running = zlib.crc32(b, running)
        h.update(b)
        got += len(b)
    if length == 0 or running != crc:
        return None
    return h.digest()


def _lstat_at(name: str, dir_fd: int) -> os.stat_result | None:
    try:
        return os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return None


def _same_file(a: os.stat_result, b: os.stat_result) -> bool:
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def _drop_cache(fd: int, offset: int = 0, length: int = 0) -> None:
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


def _safe_relpath(rel: str) -> bool:
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


def _default_run(f: Callable[..., Any], *args: Any, **kwargs: Any) -> Deferred:
    from twisted.internet.threads import deferToThread

    return deferToThread(f, *args, **kwargs)


class _Paths:
    """The files of one upload."""

    def __init__(self, root: str, upload_id: str) -> None:
        self.rel = f"incoming/{upload_id}"
        self.dir = os.path.join(root, "incoming", upload_id)
        self.meta = os.path.join(self.dir, "meta.json")
        self.data = os.path.join(self.dir, "data")
        self.journal = os.path.join(self.dir, "journal")
        self.lock = os.path.join(self.dir, "lock")
        self.lease = os.path.join(self.dir, "lease")
        self.takeover = os.path.join(self.dir, "takeover")


def _read_small(path: str) -> bytes:
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


def _mtime(path: str) -> float:
    try:
        return os.stat(path).st_mtime
    except OSError:
        return 0.0


def _lock_is_held(lock_path: str) -> bool:
    """Whether some writer holds an upload's lock (probed without keeping it)."""
    try:
        fd = os.open(lock_path, os.O_RDWR | _CLOEXEC)
    except FileNotFoundError:
        return False
    try:
        if not _HAVE_OFD:
            return False  # a probe would disturb this process's own POSIX locks
        if not _try_lock(fd):
            return True
        _unlock(fd)
        return False
    finally:
        os.close(fd)


def _read_json(path: str) -> dict[str, Any] | None:
    """A small JSON record, or None if it is missing or unreadable."""
    try:
        value = json.loads(_read_small(path))
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def _generation(paths: _Paths) -> int:
    """The generation in an upload's lease (0 if there is none yet)."""
    lease = _read_json(paths.lease)
    gen = lease.get("generation") if lease else 0
    return gen if isinstance(gen, int) and gen >= 0 else 0


def _next_generation(paths: _Paths) -> int:
    """
    A generation higher than any before it, even if this host reads an old
    lease (another host's view of a shared filesystem can lag by a second):
    microseconds since the epoch, or one more than the lease says if that is
    higher (clocks behind).
    """
    return max(_generation(paths) + 1, time.time_ns() // 1000)


def _info(meta: dict[str, Any]) -> UploadInfo:
    return UploadInfo(
        upload_id=meta["upload_id"],
        name=meta["name"],
        size=meta["size"],
        sha256=None if meta["sha256"] is None else bytes.fromhex(meta["sha256"]),
        metadata=dict(meta["metadata"]),
        client_id=meta["client_id"],
        created=meta["created"],
    )


def _completed(meta: dict[str, Any]) -> CompletedUpload:
    return CompletedUpload(
        upload_id=meta["upload_id"],
        name=meta["name"],
        size=meta["size"],
        sha256=bytes.fromhex(meta["sha256"]),
        path=meta["path"],
    )


# ---------------------------------------------------------------------------


@implementer(IUploadStorage)
class FilesystemStorage:
    """
    Uploads in a directory tree shared by every server process and host.

    Created once per server process by the server's service setup, with
    C{run} running blocking work on the server's disk thread pool; called by
    the server protocol adapter.  Several instances (in one process or on
    several hosts) may use the same root at once.

    @param root: the storage root; C{incoming/} and C{complete/} are made
        below it on first use.
    @param run: C{run(f, *args)} runs C{f} away from the reactor and returns
        a Deferred of its result.  Default: C{deferToThread}.
    @param busy_retry_after: the C{retry_after} hint of L{UploadBusy}.
    @param owner: this server's id, recorded in the lease of every upload
        it writes (for operators and C{imgresume status}).
    @param timings: called on the disk thread with C{("fdatasync",
        seconds)} after each flush of a data or journal file and
        C{("write", seconds)} after each durable write (the server's
        latency histograms); must be thread-safe and quick.
    """

    guarantees = frozenset(
        {DURABLE_ACK, SHARED, EXCLUSIVE_WRITER, PROVEN_OFFSET, ATOMIC_COMPLETE}
    )

    def __init__(
        self,
        root: str | FilePath,
        run: Callable[..., Deferred] | None = None,
        *,
        busy_retry_after: float = 1.0,
        owner: str = "",
        timings: Callable[[str, float], None] | None = None,
    ) -> None:
        if isinstance(root, FilePath):
            root = root.path
        if isinstance(root, bytes):
            root = os.fsdecode(root)
        self._root = os.path.abspath(root)
        self._run = run if run is not None else _default_run
        self._busy_retry_after = busy_retry_after
        self._owner = owner
        self._timings = timings
        self._owned: set[str] = set()
        self._owned_mutex = threading.Lock()
        self._now: Callable[[], float] = time.time

    def __repr__(self) -> str:
        return f"<FilesystemStorage {self._root!r}>"

    # -- in-process registry ------------------------------------------------

    def _claim(self, upload_id: str) -> bool:
        with self._owned_mutex:
            if upload_id in self._owned:
                return False
            self._owned.add(upload_id)
            return True

    def _unclaim(self, upload_id: str) -> None:
        with self._owned_mutex:
            self._owned.discard(upload_id)

    def _unclaimOnFailure(self, f: Failure, upload_id: str) -> Failure:
        self._unclaim(upload_id)
        return f

    # -- IUploadStorage -----------------------------------------------------

    def create(self, request: NewUpload) -> Deferred[FilesystemUploadWriter]:
        """See L{IUploadStorage.create}."""
        try:
            name = validate_name(request.name)
            if request.size < 0 or (
                request.sha256 is not None and len(request.sha256) != 32
            ):
                raise ValueError("size must be >= 0 and sha256 a 32-byte digest or None")
        except Exception:
            return defer.fail()
        upload_id = new_upload_id()
        self._claim(upload_id)
        d = self._run(self._create_sync, request, name, upload_id)
        d.addErrback(self._unclaimOnFailure, upload_id)
        return d

    def resume(
        self, upload_id: str, client_id: str | None = None
    ) -> Deferred[FilesystemUploadWriter]:
        """See L{IUploadStorage.resume}."""
        if not is_upload_id(upload_id):
            return defer.fail(
                UnknownUpload(f"malformed upload id {upload_id!r:.80}")
            )
        if not self._claim(upload_id):
            # Another connection of this process owns it: ask it to yield.
            d = self._run(self._busy_in_process, upload_id, client_id)
            return d
        d = self._run(self._resume_sync, upload_id, client_id)
        d.addErrback(self._unclaimOnFailure, upload_id)
        return d

    # -- disk work ----------------------------------------------------------

    def _rel(self, path: str) -> str:
        return os.path.relpath(path, self._root).replace(os.sep, "/")

    def _ensure_dir(self, path: str) -> None:
        try:
            os.mkdir(path, 0o755)
        except FileExistsError:
            return
        _fsync_dir(os.path.dirname(path))

    def _create_sync(
        self, request: NewUpload, name: str, upload_id: str
    ) -> FilesystemUploadWriter:
        with _io("cannot prepare the storage root"):
            os.makedirs(self._root, exist_ok=True)
            incoming = os.path.join(self._root, "incoming")
            self._ensure_dir(incoming)
            self._ensure_dir(os.path.join(self._root, "complete"))
        self._check_complete_parents(name)
        paths = _Paths(self._root, upload_id)
        meta: dict[str, Any] = {
            "format": FORMAT_VERSION,
            "upload_id": upload_id,
            "name": name,
            "size": request.size,
            "sha256": None if request.sha256 is None else bytes(request.sha256).hex(),
            "metadata": dict(request.metadata),
            "client_id": request.client_id,
            "created": self._now(),
            "state": "partial",
        }
        excl = os.O_RDWR | os.O_CREAT | os.O_EXCL | _CLOEXEC
        lock = data_fd = journal_fd = None
        with _io(f"cannot create upload {paths.rel}"):
            os.mkdir(paths.dir, 0o755)
            try:
                lock = _lock_new(os.open(paths.lock, excl, 0o644))
                self._write_lease(paths, 1)
                data_fd = os.open(paths.data, excl, 0o644)
                journal_fd = os.open(paths.journal, excl, 0o644)
                for fd in (lock.fd, data_fd, journal_fd):
                    os.fsync(fd)
                # meta.json last: an upload directory without it is not an
                # upload (resume answers UnknownUpload), so a crash half-way
                # through create leaves nothing a client could resume.
                _atomic_write(paths.dir, "meta.json", _dump(meta))
                _fsync_dir(incoming)
            except BaseException:
                for fd in (data_fd, journal_fd):
                    if fd is not None:
                        os.close(fd)
                for p in (paths.meta, paths.data, paths.journal, paths.lock):
                    try:
                        os.unlink(p)
                    except OSError:
                        pass
                try:
                    os.rmdir(paths.dir)
                except OSError:
                    pass
                if lock is not None:
                    lock.release()
                raise
        log.info(
            "upload {upload_id} created: {name!r}, {size} bytes",
            upload_id=upload_id,
            name=name,
            size=request.size,
        )
        return FilesystemUploadWriter(
            self, paths, meta, lock, data_fd, journal_fd, 0, 0, _EMPTY_TAIL, 1
        )

    def _write_lease(self, paths: _Paths, generation: int) -> None:
        """Record the new writer's generation (under the lock)."""
        _atomic_write(paths.dir, "lease", _dump(
            {"generation": generation, "owner": self._owner, "since": self._now()}
        ))

    def _request_takeover(self, paths: _Paths) -> None:
        """
        Ask the current writer of an upload to give it up.  The owner
        yields only if its connection has been silent for a while (a zombie
        whose client has moved on); a live writer keeps the upload.
        """
        generation = _generation(paths)
        if generation:
            try:
                _atomic_write(paths.dir, "takeover", _dump(
                    {"generation": generation, "requested": self._now(), "by": self._owner}
                ))
            except OSError as e:
                log.warn("could not request takeover of {rel}: {error}",
                         rel=paths.rel, error=e.strerror)

    def _read_meta(self, paths: _Paths, upload_id: str) -> dict[str, Any] | None:
        with _io(f"cannot read {paths.rel}/meta.json"):
            try:
                raw = _read_small(paths.meta)
            except FileNotFoundError:
                return None
        try:
            meta = json.loads(raw)
            ok = (
                meta["format"] == FORMAT_VERSION
                and meta["upload_id"] == upload_id
                and meta["state"] in ("partial", "completing", "complete")
                and isinstance(meta["size"], int)
                and meta["size"] >= 0
            )
            if meta["state"] != "partial":
                path = meta["path"]
                ok = ok and path.startswith("complete/") and _safe_relpath(
                    path.removeprefix("complete/")
                ) and meta["sha256"] is not None
            _info(meta)
        except (ValueError, KeyError, TypeError, AttributeError):
            ok = False
        if not ok:
            raise StorageError(f"{paths.rel}/meta.json is not a valid record")
        return meta

    def _check_recorded_complete(self, meta: dict[str, Any]) -> CompletedUpload:
        completed = _completed(meta)
        path = os.path.join(self._root, *completed.path.split("/"))
        try:
            os.lstat(path)
        except FileNotFoundError:
            log.error(
                "upload {upload_id} is recorded complete but {path} is missing",
                upload_id=completed.upload_id,
                path=completed.path,
            )
            raise StorageError(
                f"upload {completed.upload_id} is recorded complete but "
                f"{completed.path} is missing"
            ) from None
        except OSError as e:
            raise _fail(e, f"cannot check {completed.path}") from e
        return completed

    def status(
        self, upload_id: str, client_id: str | None = None
    ) -> Deferred[UploadStatus]:
        """See L{IUploadStorage.status}."""
        if not is_upload_id(upload_id):
            return defer.fail(UnknownUpload(f"malformed upload id {upload_id!r:.80}"))
        return self._run(self.status_sync, upload_id, client_id)

    def status_sync(self, upload_id: str, client_id: str | None = None) -> UploadStatus:
        """L{status}, blocking (for C{imgresume ls}, which runs without a reactor)."""
        paths = _Paths(self._root, upload_id)
        meta = self._read_own_meta(paths, upload_id, client_id)
        lease = _read_json(paths.lease) or {}
        owner = lease.get("owner") if isinstance(lease.get("owner"), str) else ""
        if meta["state"] != "partial":
            return UploadStatus(
                upload_id, meta["name"], meta["size"], "complete", meta["size"], False,
                owner, meta["created"], _mtime(paths.meta), meta.get("path", ""),
            )
        busy = upload_id in self._owned or _lock_is_held(paths.lock)
        with _io(f"cannot read {paths.rel}"):
            try:
                data_fd = os.open(paths.data, os.O_RDONLY | _CLOEXEC)
            except FileNotFoundError:
                raise UnknownUpload(f"no upload with id {upload_id}") from None
            try:
                journal_fd = os.open(paths.journal, os.O_RDONLY | _CLOEXEC)
                try:
                    offset = _prove(data_fd, journal_fd, meta["size"])[0]
                finally:
                    os.close(journal_fd)
            finally:
                os.close(data_fd)
        return UploadStatus(
            upload_id, meta["name"], meta["size"], "partial", offset, busy, owner,
            meta["created"], max(_mtime(paths.data), _mtime(paths.journal)),
        )

    def _busy_in_process(self, upload_id: str, client_id: str | None) -> None:
        paths = _Paths(self._root, upload_id)
        self._read_own_meta(paths, upload_id, client_id)
        self._request_takeover(paths)
        raise _busy(upload_id, self._busy_retry_after)

    def _read_own_meta(
        self, paths: _Paths, upload_id: str, client_id: str | None
    ) -> dict[str, Any]:
        """
        The upload's meta, if it exists and belongs to C{client_id} (any
        client when None).  Another client's upload is reported exactly like
        a missing one, so its existence does not leak.
        """
        meta = self._read_meta(paths, upload_id)
        if meta is None or (client_id is not None and meta["client_id"] != client_id):
            raise UnknownUpload(f"no upload with id {upload_id}")
        return meta

    def _resume_sync(
        self, upload_id: str, client_id: str | None = None
    ) -> FilesystemUploadWriter:
        paths = _Paths(self._root, upload_id)
        meta = self._read_own_meta(paths, upload_id, client_id)
        if meta["state"] == "complete":
            raise UploadAlreadyComplete(self._check_recorded_complete(meta))
        try:
            with _io(f"cannot lock {paths.rel}"):
                lock = _acquire(paths.lock, upload_id, self._busy_retry_after)
        except UploadBusy:
            self._request_takeover(paths)
            raise
        data_fd = journal_fd = None
        try:
            # Authoritative read, under the lock.
            meta = self._read_meta(paths, upload_id)
            if meta is None:
                raise UnknownUpload(f"no upload with id {upload_id}")
            if meta["state"] == "complete":
                raise UploadAlreadyComplete(self._check_recorded_complete(meta))
            if meta["state"] == "completing":
                completed = self._finish_completion(paths, meta)
                log.info(
                    "upload {upload_id} completion finished on resume at {path}",
                    upload_id=upload_id,
                    path=completed.path,
                )
                raise UploadAlreadyComplete(completed)
            with _io(f"cannot open {paths.rel}"):
                try:
                    data_fd = os.open(paths.data, os.O_RDWR | _CLOEXEC)
                    journal_fd = os.open(paths.journal, os.O_RDWR | _CLOEXEC)
                except FileNotFoundError:
                    raise StorageError(
                        f"{paths.rel} is missing its data or journal file"
                    ) from None
            with _io(f"cannot prove the offset of {paths.rel}"):
                offset, count, tail, unproven = _prove(
                    data_fd, journal_fd, meta["size"]
                )
            generation = _next_generation(paths)
            with _io(f"cannot take the lease of {paths.rel}"):
                self._write_lease(paths, generation)
        except BaseException:
            for fd in (data_fd, journal_fd):
                if fd is not None:
                    os.close(fd)
            lock.release()
            raise
        log.info(
            "upload {upload_id} resumed at proven offset {offset} "
            "({unproven} stored bytes past it not trusted), generation {generation}",
            upload_id=upload_id,
            offset=offset,
            unproven=unproven,
            records=count,
            generation=generation,
        )
        return FilesystemUploadWriter(
            self, paths, meta, lock, data_fd, journal_fd, offset, count, tail,
            generation,
        )

    def _open_complete_dir(self, parts: list[str], create: bool) -> int:
        """
        Open C{complete/<parts...>} as a directory fd, walking one component
        at a time with C{O_NOFOLLOW} so no symlink is ever followed, and
        making missing directories if C{create}.

        @raise StorageError: a component is a symlink, or the result resolves
            outside the root.
        @raise InvalidName: a component is a file, not a directory.
        @raise FileNotFoundError: a component is missing and not C{create}.
        """
        fd = os.open(self._root, _DIR_FLAGS)
        walked: list[str] = []
        try:
            for part in ["complete", *parts]:
                walked.append(part)
                flags = _DIR_FLAGS | os.O_NOFOLLOW
                try:
                    try:
                        nfd = os.open(part, flags, dir_fd=fd)
                    except FileNotFoundError:
                        if not create:
                            raise
                        try:
                            os.mkdir(part, 0o755, dir_fd=fd)
                        except FileExistsError:
                            pass
                        else:
                            os.fsync(fd)
                        nfd = os.open(part, flags, dir_fd=fd)
                except OSError as e:
                    if e.errno not in (errno.ELOOP, errno.ENOTDIR):
                        raise
                    rel = "/".join(walked)
                    st = _lstat_at(part, fd)
                    if st is not None and stat.S_ISLNK(st.st_mode):
                        log.error(
                            "refusing to follow symlink at {path}", path=rel
                        )
                        raise StorageError(
                            f"refusing to follow the symlink at {rel}"
                        ) from None
                    raise InvalidName(
                        f"cannot store below {rel!r}: it is a file, not a "
                        "directory"
                    ) from None
                os.close(fd)
                fd = nfd
            real = os.path.realpath(os.path.join(self._root, "complete", *parts))
            base = os.path.realpath(self._root)
            if not real.startswith(base + os.sep):
                raise StorageError(
                    f"complete/{'/'.join(parts)} resolves outside the storage root"
                )
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _check_complete_parents(self, name: str) -> None:
        """Refuse early a name whose directories cannot exist in complete/."""
        with _io("cannot check the completed files"):
            try:
                fd = self._open_complete_dir(name.split("/")[:-1], create=False)
            except FileNotFoundError:
                return
            os.close(fd)

    def _finish_completion(
        self, paths: _Paths, meta: dict[str, Any]
    ) -> CompletedUpload:
        """
        Link the verified data file to its final path, no-clobber, and record
        the upload complete.  Idempotent: resumes a completion interrupted at
        any step.  The caller holds the upload's lock; C{meta} is updated in
        place.
        """
        upload_id = meta["upload_id"]
        name = validate_name(meta["name"])
        with _io(f"cannot complete {paths.rel}"):
            try:
                data_st = os.stat(paths.data)
            except FileNotFoundError:
                raise StorageError(f"{paths.rel} is missing its data file") from None
            first: list[str] = []
            if meta["state"] == "completing" and meta.get("path"):
                first.append(meta["path"].removeprefix("complete/"))
            tried: set[str] = set()
            for rel in [*first, *completion_candidates(name, upload_id)]:
                if rel in tried:
                    continue
                tried.add(rel)
                if not _safe_relpath(rel):  # pragma: no cover - defensive
                    continue
                *parents, leaf = rel.split("/")
                parent_fd = self._open_complete_dir(parents, create=True)
                try:
                    existing = _lstat_at(leaf, parent_fd)
                    if existing is not None and not _same_file(existing, data_st):
                        continue  # taken by another file: never replace it
                    path = f"complete/{rel}"
                    if meta["state"] != "completing" or meta.get("path") != path:
                        meta["state"] = "completing"
                        meta["path"] = path
                        _atomic_write(paths.dir, "meta.json", _dump(meta))
                    if existing is None:
                        try:
                            _link(paths.data, leaf, dst_dir_fd=parent_fd)
                        except FileExistsError:
                            existing = _lstat_at(leaf, parent_fd)
                            if existing is None or not _same_file(
                                existing, data_st
                            ):
                                continue  # lost a race for this name
                    os.fsync(parent_fd)
                    break
                finally:
                    os.close(parent_fd)
            else:  # pragma: no cover - needs 101 colliding names
                raise StorageError(f"no free name in complete/ for {name!r}")
            meta["state"] = "complete"
            _atomic_write(paths.dir, "meta.json", _dump(meta))
        for p in (paths.data, paths.journal):
            try:
                os.unlink(p)
            except FileNotFoundError:
                pass
            except OSError as e:
                log.warn(
                    "upload {upload_id}: cannot remove {file}: {error}",
                    upload_id=upload_id,
                    file=self._rel(p),
                    error=e.strerror,
                )
        try:
            _fsync_dir(paths.dir)
        except OSError:
            pass
        return _completed(meta)

    def _remove(self, paths: _Paths) -> None:
        """Remove an upload's files and directory; meta.json goes first."""
        with _io(f"cannot remove {paths.rel}"):
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
            _fsync_dir(os.path.dirname(paths.dir))


def _dump(meta: dict[str, Any]) -> bytes:
    return (json.dumps(meta, sort_keys=True, indent=1) + "\n").encode("utf-8")


def _prove(
    data_fd: int, journal_fd: int, size: int
) -> tuple[int, int, TailCheck, int]:
    """
    Establish the offset of an upload from its journal and data file.

    Records are accepted in order while each is intact (its own CRC), starts
    where the previous ended and stays within C{size}.  The last accepted
    record's range is then read back from the data file and checked against
    its CRC-32; if it does not match, it is dropped and the one before is
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
    _drop_cache(journal_fd)
    while not done:
        raw = _pread_full(journal_fd, batch, count * RECORD_SIZE)
        done = len(raw) < batch
        for i in range(0, len(raw) - RECORD_SIZE + 1, RECORD_SIZE):
            rec = _parse_record(raw[i : i + RECORD_SIZE])
            if rec is None:
                done = True
                break
            offset, length, _ = rec
            if offset != end or length == 0 or end + length > size:
                done = True
                break
            count += 1
            end += length
    tail = _EMPTY_TAIL
    while count:
        raw = _pread_full(journal_fd, RECORD_SIZE, (count - 1) * RECORD_SIZE)
        rec = _parse_record(raw)
        assert rec is not None
        offset, length, crc = rec
        # Only the range read needs its cached pages dropped: dropping a
        # whole large file's took most of a resume's time.
        _drop_cache(data_fd, offset, length)
        digest = _check_range(data_fd, offset, length, crc)
        if digest is not None:
            tail = TailCheck(offset, length, digest)
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


@implementer(IUploadWriter)
class FilesystemUploadWriter:
    """
    Write ownership of one upload in a L{FilesystemStorage}: holds its lock
    and its open data and journal files.  Returned by
    L{FilesystemStorage.create} and L{FilesystemStorage.resume}; used by one
    server connection.  Calls are serialised: a C{release()} made while a
    write is running on the disk thread waits for it.

    C{_pwrite}, C{_fdatasync} and C{_fsync} are the low-level functions used
    on the data and journal files; tests replace them to inject failures.
    """

    def __init__(
        self,
        storage: FilesystemStorage,
        paths: _Paths,
        meta: dict[str, Any],
        lock: _Lock,
        data_fd: int,
        journal_fd: int,
        offset: int,
        count: int,
        tail: TailCheck,
        generation: int,
    ) -> None:
        self._storage = storage
        #: This writer's lease generation; a newer owner has a higher one.
        self.generation = generation
        self._paths = paths
        self._meta = meta
        self._lock = lock
        self._data_fd = data_fd
        self._journal_fd = journal_fd
        self._count = count
        self.info: UploadInfo = _info(meta)
        self.offset: int = offset
        self.tail: TailCheck = tail
        self._serial = DeferredLock()
        self._closed = False
        self._poisoned: str | None = None
        self._pwrite: Callable[[int, bytes, int], int] = os.pwrite
        self._fdatasync: Callable[[int], None] = os.fdatasync
        self._fsync: Callable[[int], None] = os.fsync
        self._readback = ReadBack(data_fd, storage._run, storage._timings)

    def __repr__(self) -> str:
        return (
            f"<FilesystemUploadWriter {self.info.upload_id} "
            f"{self.offset}/{self.info.size}>"
        )

    def _call(self, f: Callable[..., Any], *args: Any) -> Deferred:
        return self._serial.run(self._storage._run, f, *args)

    # -- public API ---------------------------------------------------------

    def write(self, offset: int, data: bytes) -> Deferred[int]:
        """See L{IUploadWriter.write}."""
        return self.write_batch([(offset, data)])

    def write_batch(self, chunks: Sequence[tuple[int, bytes]]) -> Deferred[int]:
        """See L{IUploadWriter.write_batch}."""
        # Payloads may be any buffer (the decoder hands out memoryviews of
        # the frames it received): written as they are, never copied.
        d = self._call(self._write_sync, [
            (c[0], c[1], c[2] if len(c) > 2 else None) for c in chunks
        ])
        d.addCallback(self._flushed)
        return d

    def _flushed(self, durable: int) -> int:
        self._readback.follow(durable)
        return durable

    def complete(self, sha256: bytes | None = None) -> Deferred[CompletedUpload]:
        """
        See L{IUploadWriter.complete}.  The stored bytes were read back and
        hashed as they became durable; this waits for the last of them
        (under the writer's lock, so nothing is written meanwhile), then
        checks the digest and moves the file into place.
        """
        try:
            expected = expected_digest(self.info, sha256)
        except ValueError:
            return defer.fail()

        def verified_then_complete() -> Deferred[CompletedUpload]:
            d = self._readback.until(self.offset)
            d.addCallbacks(
                lambda _: self._storage._run(self._complete_sync, expected),
                self._readback_failed,
            )
            return d

        return self._serial.run(verified_then_complete)

    def _readback_failed(self, failure: Failure) -> Failure:
        failure.trap(ReadBackFailed)
        raise StorageError(
            f"cannot read back upload {self.info.upload_id}: {failure.value}; "
            "resume the upload to try again"
        ) from failure.value

    def abort(self) -> Deferred[None]:
        """See L{IUploadWriter.abort}."""
        return self._call(self._abort_sync)

    def release(self) -> Deferred[None]:
        """See L{IUploadWriter.release}.  Idempotent; works when poisoned."""
        return self._call(self._close_sync)

    def takeover_requested(self) -> Deferred[bool]:
        """See L{IUploadWriter.takeover_requested}."""
        return self._storage._run(self._takeover_requested_sync)

    def _takeover_requested_sync(self) -> bool:
        if self._closed:
            return False
        request = _read_json(self._paths.takeover)
        return bool(request) and request.get("generation") == self.generation

    def _check_lease(self) -> None:
        """
        The fence: refuse to write if a newer writer holds the lease.  The
        lock makes this impossible while it holds; the check catches a lock
        lost behind our back (an NFS lease expired during a partition).
        """
        current = _generation(self._paths)
        if current > self.generation:
            self._close_sync()
            log.warn(
                "upload {upload_id}: fenced out (generation {mine}, lease says {current})",
                upload_id=self.info.upload_id, mine=self.generation, current=current,
            )
            raise UploadTakenOver(
                f"upload {self.info.upload_id} was taken over by a newer connection "
                f"(generation {current}); this connection may not write it"
            )

    # -- disk work ----------------------------------------------------------

    def _check_usable(self) -> None:
        if self._poisoned is not None:
            raise StorageError(
                f"writer for upload {self.info.upload_id} is unusable after "
                f"an earlier failure ({self._poisoned}); resume the upload"
            )
        if self._closed:
            raise InternalError(f"writer for upload {self.info.upload_id} is closed")

    def _close_sync(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._readback.close()
        for fd in (self._data_fd, self._journal_fd):
            try:
                os.close(fd)
            except OSError as e:
                log.warn(
                    "upload {upload_id}: close failed: {error}",
                    upload_id=self.info.upload_id,
                    error=e.strerror,
                )
        # Lock last, so a network filesystem's flush-on-close happens while
        # we still own the upload.
        self._lock.release()
        self._storage._unclaim(self.info.upload_id)

    def _poison(self, e: OSError, what: str) -> ImgresumeError:
        """
        Make this writer unusable after a failed flush and give up the upload.

        The kernel may have dropped the dirty pages, so a retried fsync that
        succeeds proves nothing; the next owner re-proves the offset from
        what is really stored.
        """
        err = _fail(e, f"{what} failed for upload {self.info.upload_id}")
        self._poisoned = f"{what}: {e.strerror or e}"
        log.error(
            "upload {upload_id} writer poisoned: {what} failed: {error}",
            upload_id=self.info.upload_id,
            what=what,
            error=e.strerror or str(e),
        )
        self._close_sync()
        return err

    def _write_sync(self, chunks: list[tuple[int, bytes, int | None]]) -> int:
        """
        Store contiguous chunks starting at L{offset} with one flush of the
        data and one of the journal for all of them (group commit): the
        write path's cost is its fsyncs, so a batch costs what one chunk did.
        """
        self._check_usable()
        info = self.info
        pos = self.offset
        for chunk_offset, chunk, _ in chunks:
            if chunk_offset != pos:
                raise OffsetMismatch(
                    f"write at {chunk_offset} but upload {info.upload_id} has "
                    f"{pos} bytes; continue from {self.offset}",
                    offset=self.offset,
                )
            pos += len(chunk)
        if pos > info.size:
            raise SizeExceeded(
                f"write up to {pos} passes the declared size {info.size}",
                offset=self.offset,
            )
        chunks = [c for c in chunks if c[1]]
        if not chunks:
            return self.offset
        offset = self.offset
        self._check_lease()
        started = time.perf_counter()
        # 1. the bytes, at their offsets (never O_APPEND), then flush them.
        try:
            for chunk_offset, chunk, _ in chunks:
                _pwrite_all(self._pwrite, self._data_fd, chunk, chunk_offset)
        except OSError as e:
            if e.errno in _NOSPACE:
                raise _fail(e, f"cannot store upload {info.upload_id}") from e
            raise self._poison(e, "writing data") from e
        try:
            self._timed_fdatasync(self._data_fd)
        except OSError as e:
            raise self._poison(e, "flushing data") from e
        # 2. the journal records naming them, then flush those.
        records = []
        pos = offset
        for _, chunk, crc in chunks:
            if crc is not None and len(chunk) <= MAX_RECORD_LENGTH:
                # The protocol already checked this CRC against the payload.
                records.append(_pack_record(pos, len(chunk), crc))
                pos += len(chunk)
                continue
            view = memoryview(chunk)
            while view:
                piece = view[:MAX_RECORD_LENGTH]
                records.append(_pack_record(pos, len(piece), zlib.crc32(piece)))
                pos += len(piece)
                view = view[len(piece):]
        try:
            _pwrite_all(
                self._pwrite,
                self._journal_fd,
                b"".join(records),
                self._count * RECORD_SIZE,
            )
        except OSError as e:
            if e.errno in _NOSPACE:
                raise _fail(e, f"cannot store upload {info.upload_id}") from e
            raise self._poison(e, "writing journal") from e
        try:
            self._timed_fdatasync(self._journal_fd)
        except OSError as e:
            raise self._poison(e, "flushing journal") from e
        # 3. only now is the write acknowledged.
        self._count += len(records)
        self.offset = pos
        if self._storage._timings is not None:
            self._storage._timings("write", time.perf_counter() - started)
        return self.offset

    def _timed_fdatasync(self, fd: int) -> None:
        timings = self._storage._timings
        if timings is None:
            self._fdatasync(fd)
            return
        started = time.perf_counter()
        self._fdatasync(fd)
        timings("fdatasync", time.perf_counter() - started)

    def _complete_sync(self, expected: bytes) -> CompletedUpload:
        self._check_usable()
        info = self.info
        if self.offset != info.size:
            raise Incomplete(
                f"upload {info.upload_id} has {self.offset} of {info.size} bytes",
                offset=self.offset,
            )
        digest = self._readback.digest()
        if digest != expected:
            self._mismatch(digest, expected)
        self._check_lease()
        try:
            if os.fstat(self._data_fd).st_size > info.size:
                os.ftruncate(self._data_fd, info.size)
                self._fsync(self._data_fd)
        except OSError as e:
            raise self._poison(e, "trimming data") from e
        self._meta["sha256"] = digest.hex()
        completed = self._storage._finish_completion(self._paths, self._meta)
        self._close_sync()
        log.info(
            "upload {upload_id} completed at {path}",
            upload_id=info.upload_id,
            path=completed.path,
            size=info.size,
        )
        return completed

    def _mismatch(self, digest: bytes, expected: bytes) -> None:
        """
        The stored bytes do not hash to the declared digest: find out whether
        storage lost bytes (resend from the first bad range) or the client's
        source changed (abort).  Always raises.
        """
        info = self.info
        bad = None
        end = 0
        _drop_cache(self._data_fd)
        with _io(f"cannot verify upload {info.upload_id}"):
            for i in range(self._count):
                rec = _parse_record(
                    _pread_full(self._journal_fd, RECORD_SIZE, i * RECORD_SIZE)
                )
                if rec is None or rec[0] != end:
                    bad = (i, end)
                    break
                offset, length, crc = rec
                if _check_range(self._data_fd, offset, length, crc) is None:
                    bad = (i, offset)
                    break
                end += length
        if bad is not None:
            index, start = bad
            try:
                os.ftruncate(self._data_fd, start)
                os.ftruncate(self._journal_fd, index * RECORD_SIZE)
                self._fsync(self._data_fd)
                self._fsync(self._journal_fd)
            except OSError as e:
                raise self._poison(e, "truncating after corruption") from e
            self.offset = start
            self._count = index
            self._readback.reset(start)
            log.warn(
                "upload {upload_id}: stored bytes at {offset} no longer match "
                "their CRC-32; cut back to {offset}",
                upload_id=info.upload_id,
                offset=start,
            )
            raise Incomplete(
                f"stored bytes from {start} no longer match their checksum; "
                f"resend from {start}",
                offset=start,
            )
        self._abort_sync()
        raise DigestMismatch(
            f"stored bytes hash to {digest.hex()}, not the declared "
            f"{expected.hex()}; every range matched its CRC-32 as "
            "received, so the source changed during the upload; upload removed"
        )

    def _abort_sync(self) -> None:
        self._check_usable()
        try:
            self._storage._remove(self._paths)
        finally:
            self._close_sync()
        log.info("upload {upload_id} aborted", upload_id=self.info.upload_id)

# -*- test-case-name: tests.storage.test_filesystem.FilesystemStorageTests -*-
"""
L{FilesystemStorage}, the front end of the filesystem backend: creates,
resumes and reports uploads, and hands each one it opens to a
L{FilesystemUploadWriter}.
"""

from __future__ import annotations


import os
import threading
import time
from typing import Any, Callable

from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.filepath import FilePath
from zope.interface import implementer

from imgresume import integrity
from imgresume.errors import (
    StorageError,
    UnknownUpload,
    UploadAlreadyComplete,
    UploadBusy,
)
from imgresume.names import is_upload_id, new_upload_id, validate_name
from imgresume.storage.filesystem import _incomplete
from imgresume.storage.filesystem._durable import (
    CLOEXEC,
    fsync_dir,
    io_errors,
)
from imgresume.storage.filesystem._journal import empty_tail, prove
from imgresume.storage.filesystem._layout import (
    Paths,
    algorithms,
    lease_generation,
    mtime,
    next_generation,
    read_json,
    read_meta,
    sha256_of_data,
    write_lease,
    write_meta,
    write_takeover,
)
from imgresume.storage.filesystem._locks import (
    Lock,
    acquire,
    busy_error,
    lock_is_held,
    lock_new,
)
from imgresume.storage.filesystem._publish import (
    check_complete_parents,
    check_recorded_complete,
    find_completed,
    finish_completion,
)
from imgresume.storage.filesystem._whole import WholeStore
from imgresume.storage.filesystem._writer import FilesystemUploadWriter
from imgresume.storage.interfaces import (
    ATOMIC_COMPLETE,
    DURABLE_ACK,
    EXCLUSIVE_WRITER,
    PROVEN_OFFSET,
    SHARED,
    IDeferredSizeStorage,
    IncompleteUploads,
    NewUpload,
    CompletedUpload,
    StoredFile,
    TailCheck,
    UploadStatus,
    WholeUpload,
)

#: Seconds between two verifications of one client's index entries.
VERIFY_EVERY = 60.0

# The backend logs as one namespace, imgresume.storage.filesystem.
log = Logger(namespace=__package__)


def _default_run(f: Callable[..., Any], *args: Any, **kwargs: Any) -> Deferred:
    from twisted.internet.threads import deferToThread

    return deferToThread(f, *args, **kwargs)


#: The values of C{FilesystemStorage(verify=...)} and of C{--verify}.
VERIFY_MODES = ("stored", "received")


@implementer(IDeferredSizeStorage)
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
    @param verify: where a completion's digest comes from (one of
        L{VERIFY_MODES}): C{"stored"} (the default), every byte read back
        from the data file, this host's cache dropped; C{"received"}, the
        bytes hashed as they are written, only a resumed prefix read back
        (C{twistd imgresume --verify}, docs/server.md).
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
        verify: str = "stored",
    ) -> None:
        if verify not in VERIFY_MODES:
            raise ValueError(f"verify must be one of {', '.join(VERIFY_MODES)}")
        self._verify = verify
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
        #: When each client's index entries were last verified.
        self._verified: dict[str, float] = {}
        #: The one-step store of whole small files (L{store_whole}).
        self.whole = WholeStore(self._root, busy_retry_after, timings, verify)

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

    def _unclaim_on_failure(self, f: Failure, upload_id: str) -> Failure:
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
            if request.digest not in integrity.DIGESTS:
                raise ValueError(f"unknown digest {request.digest!r}")
        except Exception:
            return defer.fail()
        upload_id = new_upload_id()
        self._claim(upload_id)
        d = self._run(self._create_sync, request, name, upload_id)
        d.addErrback(self._unclaim_on_failure, upload_id)
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
        d.addErrback(self._unclaim_on_failure, upload_id)
        return d

    def incomplete_for(
        self, client_id: str, verify: bool = False
    ) -> Deferred[IncompleteUploads]:
        """
        See L{IUploadStorage.incomplete_for}: read from the per-client index
        C{clients/} (L{imgresume.storage.filesystem._incomplete}); C{verify}
        reads the meta.json of each upload listed, at most once a minute
        per client and process.
        """
        return self._run(self._incomplete_for_sync, client_id, verify)

    def _incomplete_for_sync(self, client_id: str, verify: bool) -> IncompleteUploads:
        now = self._now()
        with self._owned_mutex:
            due = verify and now - self._verified.get(client_id, -VERIFY_EVERY) >= VERIFY_EVERY
            if due:
                self._verified[client_id] = now
                if len(self._verified) > 10000:
                    self._verified = {client_id: now}
        if due:
            _incomplete.prune(self._root, client_id, self._is_incomplete, self._now)
        return _incomplete.count(self._root, client_id)

    def _is_incomplete(self, upload_id: str) -> bool | None:
        """For the index: whether an upload is incomplete (None: there is no such upload)."""
        try:
            meta = read_meta(Paths(self._root, upload_id), upload_id)
        except StorageError:
            return True  # unreadable: counted, as an operator must look at it
        return None if meta is None else meta["state"] != "complete"

    def status(
        self, upload_id: str, client_id: str | None = None
    ) -> Deferred[UploadStatus]:
        """See L{IUploadStorage.status}."""
        if not is_upload_id(upload_id):
            return defer.fail(UnknownUpload(f"malformed upload id {upload_id!r:.80}"))
        return self._run(self.status_sync, upload_id, client_id)

    def store_whole(self, request: WholeUpload) -> Deferred[CompletedUpload]:
        """
        See L{IUploadStorage.store_whole}: one file C{incoming/<key>.put},
        one flush of it and two grouped directory flushes
        (L{imgresume.storage.filesystem._whole}).
        """
        return self._run(self.whole.store, request)

    def find_completed(
        self, name: str, size: int, digest: str = integrity.LEGACY_DIGEST
    ) -> Deferred[StoredFile | None]:
        """See L{IUploadStorage.find_completed}."""
        return self._run(find_completed, self._root, name, size, digest)

    def stored_sha256(self, writer: FilesystemUploadWriter) -> Deferred[bytes]:
        """
        The SHA-256 of the bytes stored so far for the upload C{writer}
        owns, read on the disk threads (not part of L{IUploadStorage}: the
        HTTP front door's digest of a tus upload whose bytes came through
        several servers and no client digest, docs/http.md).
        """
        return self._run(sha256_of_data, Paths(self._root, writer.info.upload_id),
                         writer.info.size)

    def status_sync(self, upload_id: str, client_id: str | None = None) -> UploadStatus:
        """L{status}, blocking (for C{imgresume ls}, which runs without a reactor)."""
        paths = Paths(self._root, upload_id)
        meta = self._read_own_meta(paths, upload_id, client_id)
        lease = read_json(paths.lease) or {}
        owner = lease.get("owner") if isinstance(lease.get("owner"), str) else ""
        if meta["state"] != "partial":
            return UploadStatus(
                upload_id, meta["name"], meta["size"], "complete", meta["size"], False,
                owner, meta["created"], mtime(paths.meta), meta.get("path", ""),
                algorithms(meta)[1],
            )
        busy = upload_id in self._owned or lock_is_held(paths.lock)
        with io_errors(f"cannot read {paths.rel}"):
            try:
                data_fd = os.open(paths.data, os.O_RDONLY | CLOEXEC)
            except FileNotFoundError:
                raise UnknownUpload(f"no upload with id {upload_id}") from None
            try:
                journal_fd = os.open(paths.journal, os.O_RDONLY | CLOEXEC)
                try:
                    offset = prove(data_fd, journal_fd, meta["size"], *algorithms(meta))[0]
                finally:
                    os.close(journal_fd)
            finally:
                os.close(data_fd)
        return UploadStatus(
            upload_id, meta["name"], meta["size"], "partial", offset, busy, owner,
            meta["created"], max(mtime(paths.data), mtime(paths.journal)),
            digest=algorithms(meta)[1], size_deferred=meta.get("size_deferred", False),
        )

    # -- disk work ----------------------------------------------------------

    def _writer(
        self, paths: Paths, meta: dict[str, Any], lock: Lock, data_fd: int,
        journal_fd: int, offset: int, count: int, tail: TailCheck, generation: int,
    ) -> FilesystemUploadWriter:
        return FilesystemUploadWriter(
            paths, meta, lock, data_fd, journal_fd, offset, count, tail, generation,
            root=self._root, run=self._run, timings=self._timings,
            on_close=self._unclaim, verify=self._verify,
        )

    def _ensure_dir(self, path: str) -> None:
        try:
            os.mkdir(path, 0o755)
        except FileExistsError:
            return
        fsync_dir(os.path.dirname(path))

    def _create_sync(
        self, request: NewUpload, name: str, upload_id: str
    ) -> FilesystemUploadWriter:
        with io_errors("cannot prepare the storage root"):
            os.makedirs(self._root, exist_ok=True)
            incoming = os.path.join(self._root, "incoming")
            self._ensure_dir(incoming)
            self._ensure_dir(os.path.join(self._root, "complete"))
        check_complete_parents(self._root, name)
        paths = Paths(self._root, upload_id)
        meta: dict[str, Any] = {
            "upload_id": upload_id,
            "name": name,
            "size": request.size,
            "sha256": None if request.sha256 is None else bytes(request.sha256).hex(),
            # The algorithm of "sha256" (the key keeps its historical name)
            # and the journal records' checksum: fixed for the upload's life.
            "digest": request.digest,
            "checksum": request.checksum if request.checksum in integrity.CHECKSUMS
            else integrity.LEGACY_CHECKSUM,
            "metadata": dict(request.metadata),
            "client_id": request.client_id,
            "created": self._now(),
            "state": "partial",
        }
        if request.size_deferred:  # "size" is a bound until declared
            meta["size_deferred"] = True
        excl = os.O_RDWR | os.O_CREAT | os.O_EXCL | CLOEXEC
        lock = data_fd = journal_fd = None
        # Counted first, so that no upload exists uncounted.
        _incomplete.add(self._root, request.client_id, upload_id, request.size)
        with io_errors(f"cannot create upload {paths.rel}"):
            os.mkdir(paths.dir, 0o755)
            try:
                lock = lock_new(os.open(paths.lock, excl, 0o644))
                write_lease(paths, 1, self._owner, self._now())
                data_fd = os.open(paths.data, excl, 0o644)
                journal_fd = os.open(paths.journal, excl, 0o644)
                for fd in (lock.fd, data_fd, journal_fd):
                    os.fsync(fd)
                # meta.json last: an upload directory without it is not an
                # upload (resume answers UnknownUpload), so a crash half-way
                # through create leaves nothing a client could resume.
                write_meta(paths, meta)
                fsync_dir(incoming)
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
                _incomplete.forget(self._root, meta)
                raise
        log.info(
            "upload {upload_id} created: {name!r}, {size} bytes",
            upload_id=upload_id,
            name=name,
            size=request.size,
        )
        return self._writer(paths, meta, lock, data_fd, journal_fd, 0, 0,
                            empty_tail(request.digest), 1)

    def _request_takeover(self, paths: Paths) -> None:
        """
        Ask the current writer of an upload to give it up.  The owner
        yields only if its connection has been silent for a while (a zombie
        whose client has moved on); a live writer keeps the upload.
        """
        current = lease_generation(paths)
        if current:
            try:
                write_takeover(paths, current, self._owner, self._now())
            except OSError as e:
                log.warn("could not request takeover of {rel}: {error}",
                         rel=paths.rel, error=e.strerror)

    def _busy_in_process(self, upload_id: str, client_id: str | None) -> None:
        paths = Paths(self._root, upload_id)
        self._read_own_meta(paths, upload_id, client_id)
        self._request_takeover(paths)
        raise busy_error(upload_id, self._busy_retry_after)

    def _read_own_meta(
        self, paths: Paths, upload_id: str, client_id: str | None
    ) -> dict[str, Any]:
        """
        The upload's meta, if it exists and belongs to C{client_id} (any
        client when None).  Another client's upload is reported exactly like
        a missing one, so its existence does not leak.
        """
        meta = read_meta(paths, upload_id)
        if meta is None or (client_id is not None and meta["client_id"] != client_id):
            raise UnknownUpload(f"no upload with id {upload_id}")
        return meta

    def _resume_sync(
        self, upload_id: str, client_id: str | None = None
    ) -> FilesystemUploadWriter:
        paths = Paths(self._root, upload_id)
        meta = self._read_own_meta(paths, upload_id, client_id)
        if meta["state"] == "complete":
            raise UploadAlreadyComplete(check_recorded_complete(self._root, paths, meta))
        try:
            with io_errors(f"cannot lock {paths.rel}"):
                lock = acquire(paths.lock, upload_id, self._busy_retry_after)
        except UploadBusy:
            self._request_takeover(paths)
            raise
        data_fd = journal_fd = None
        try:
            # Authoritative read, under the lock.
            meta = read_meta(paths, upload_id)
            if meta is None:
                raise UnknownUpload(f"no upload with id {upload_id}")
            if meta["state"] == "complete":
                raise UploadAlreadyComplete(check_recorded_complete(self._root, paths, meta))
            if meta["state"] == "completing":
                # Proven again from fresh opens: a writer whose flush failed
                # here was poisoned, and its retry would prove nothing.
                with io_errors(f"cannot complete {paths.rel}"):
                    completed = finish_completion(self._root, paths, meta)
                log.info(
                    "upload {upload_id} completion finished on resume at {path}",
                    upload_id=upload_id,
                    path=completed.path,
                )
                raise UploadAlreadyComplete(completed)
            with io_errors(f"cannot open {paths.rel}"):
                try:
                    data_fd = os.open(paths.data, os.O_RDWR | CLOEXEC)
                    journal_fd = os.open(paths.journal, os.O_RDWR | CLOEXEC)
                except FileNotFoundError:
                    raise StorageError(
                        f"{paths.rel} is missing its data or journal file"
                    ) from None
            with io_errors(f"cannot prove the offset of {paths.rel}"):
                offset, count, tail, unproven = prove(
                    data_fd, journal_fd, meta["size"], *algorithms(meta)
                )
            new_generation = next_generation(paths)
            with io_errors(f"cannot take the lease of {paths.rel}"):
                write_lease(paths, new_generation, self._owner, self._now())
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
            generation=new_generation,
        )
        return self._writer(
            paths, meta, lock, data_fd, journal_fd, offset, count, tail, new_generation
        )

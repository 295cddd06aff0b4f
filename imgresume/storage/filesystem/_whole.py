# -*- test-case-name: tests.storage.test_whole -*-
"""
The one-step store of a whole small file (L{IUploadStorage.store_whole
<imgresume.storage.interfaces.IUploadStorage.store_whole>}): written,
flushed, read back and verified, and published into C{complete/} in one
disk task, with one file under C{incoming/} and three flushes.

On disk, one file per request: C{incoming/<key>.put}, C{key} the first 32
hex digits of SHA-256(client id, NUL, upload id), so two clients never
collide and none can probe another's ids.  It is created with C{O_EXCL},
holds the bytes, and is its own lock (an OFD lock while a server works on
it).  Publication is a no-clobber C{link} of it into C{complete/}; the
C{.put} name is kept as a second link of the published file, so a request
repeated after its answer was lost finds it (link count 2), finds the
published name among the candidates by inode and answers the same.  A
C{.put} with one link that nobody has locked is a request cut short before
publication: a repeat does it again, garbage collection removes it.

The order, and the flushes (C{docs/storage.md}, "Storing a small file in
one step"): create, lock, write, C{fdatasync} of the file, C{fsync} of
C{incoming/} (so the C{.put} name outlives a crash that the published name
outlives), read back with the cache dropped and hashed, C{link} into
C{complete/...}, then C{fsync} of that directory.  The two directory flushes
are grouped across uploads finishing together (L{DirectorySync}).
"""

from __future__ import annotations

import hashlib
import os
import time
from typing import Callable

from twisted.logger import Logger

from imgresume import integrity
from imgresume.errors import (
    DigestMismatch,
    InvalidName,
    NameTaken,
    StorageError,
)
from imgresume.names import (
    completion_candidates,
    if_exists_policy,
    is_upload_id,
    validate_name,
)
from imgresume.storage.filesystem._dirsync import DirectorySync
from imgresume.storage.filesystem._durable import (
    CLOEXEC,
    DIR_FLAGS,
    drop_cache,
    fsync_dir,
    io_errors,
    pread_full,
    pwrite_all,
)
from imgresume.storage.filesystem._locks import Lock, busy_error, lock_open
from imgresume.storage.filesystem._publish import FRESH, find_completed, open_complete_dir
from imgresume.storage.interfaces import CompletedFileMoved, CompletedUpload, WholeUpload

# The backend logs as one namespace, imgresume.storage.filesystem.
log = Logger(namespace=__package__)

#: The suffix of the one-step store's files in C{incoming/}.
PUT_SUFFIX = ".put"
#: The suffix of the third name a published C{.put} gets (L{mark_published}).
DONE_SUFFIX = ".done"

# Indirections so tests can simulate a crash or a race at these steps.
_link = os.link
_fdatasync = os.fdatasync

_CREATE = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | CLOEXEC
OPEN_PUT = os.O_RDWR | os.O_NOFOLLOW | CLOEXEC


def put_key(client_id: str, upload_id: str) -> str:
    """The name of a request's file in C{incoming/}, without its suffix."""
    raw = f"{client_id}\0{upload_id}".encode("utf-8", "surrogatepass")
    return hashlib.sha256(raw).hexdigest()[:32]


def is_put_name(entry: str) -> bool:
    """Whether C{entry} (in C{incoming/}) is a file of the one-step store."""
    key, dot, suffix = entry.partition(".")
    return dot == "." and "." + suffix in (PUT_SUFFIX, DONE_SUFFIX) and is_upload_id(key)


def mark_published(incoming_fd: int, leaf: str) -> None:
    """
    Give a published C{.put} a third name, C{<key>.done}, so that it keeps
    more than one link after a consumer of the storage moves the published
    file away: a repeat then learns that its file was published and moved
    (L{CompletedFileMoved}) instead of taking the C{.put} for one cut short
    and publishing the file again.  Not flushed: a crash that loses it
    leaves the published name, which tells the same while it is there.
    """
    done = leaf.removesuffix(PUT_SUFFIX) + DONE_SUFFIX
    try:
        _link(leaf, done, src_dir_fd=incoming_fd, dst_dir_fd=incoming_fd,
              follow_symlinks=False)
    except FileExistsError:
        pass


def identity(st: os.stat_result) -> tuple[int, int]:
    """A file's identity: its device and inode."""
    return st.st_dev, st.st_ino


def _stored_digest(fd: int, size: int, algorithm: str) -> bytes | None:
    """
    The C{algorithm} digest of the C{size} bytes stored in C{fd}, read back with this
    host's cached pages dropped first (so what is hashed is what the disk,
    or a network filesystem's servers, hold); C{None} if fewer are stored.
    """
    drop_cache(fd)
    data = pread_full(fd, size, 0) if size else b""
    if len(data) != size:
        return None
    return integrity.digest_of(algorithm, data)


class WholeStore:
    """
    The one-step store of one L{FilesystemStorage
    <imgresume.storage.filesystem.FilesystemStorage>}, which calls
    L{store} on its disk threads.  Thread-safe: several requests (even the
    same one twice) may run at once, here and on other servers.

    @param root: the storage root.
    @param retry_after: the C{retry_after} hint of L{UploadBusy
        <imgresume.errors.UploadBusy>}.
    @param timings: the storage's latency callback, or C{None}.
    @param verify: where the digest checked before publication comes from:
        C{"stored"}, the bytes read back with the cache dropped;
        C{"received"}, the bytes of the request, hashed in memory (the
        storage's C{verify}).
    """

    def __init__(
        self,
        root: str,
        retry_after: float,
        timings: Callable[[str, float], None] | None = None,
        verify: str = "stored",
    ) -> None:
        self._root = root
        self._read_back = verify == "stored"
        self._incoming = os.path.join(root, "incoming")
        self._retry_after = retry_after
        self._timings = timings
        #: The grouped directory flushes (a test may replace its C{fsync}).
        self.dirsync = DirectorySync()
        #: The clock that says whether a C{.put} was written moments ago.
        self.now: Callable[[], float] = time.time

    def store(self, request: WholeUpload) -> CompletedUpload:
        """See L{IUploadStorage.store_whole}; blocking."""
        if not is_upload_id(request.upload_id) or len(request.sha256) != 32:
            raise ValueError("upload_id must be 32 hex digits and sha256 32 bytes")
        name = validate_name(request.name)
        leaf = put_key(request.client_id, request.upload_id) + PUT_SUFFIX
        with io_errors(f"cannot store {name!r}"):
            if if_exists_policy(request.metadata) == "skip":
                # Before any repeat: a repeat is skipped as well.
                skipped = self._skip(name, request)
                if skipped is not None:
                    return skipped
            incoming_fd = self._open_incoming()
            try:
                for _ in range(5):
                    outcome = self._attempt(incoming_fd, leaf, name, request)
                    if outcome is not None:
                        return outcome
                raise StorageError(  # pragma: no cover - five races in a row
                    f"upload {request.upload_id}: its file keeps changing; retry")
            finally:
                os.close(incoming_fd)

    # -- steps -----------------------------------------------------------------

    def _open_incoming(self) -> int:
        try:
            return os.open(self._incoming, DIR_FLAGS)
        except FileNotFoundError:
            pass
        # First use of this root: make it (rarely taken, so no failing
        # mkdir is paid per file).
        os.makedirs(self._root, exist_ok=True)
        for sub in ("incoming", "complete"):
            try:
                os.mkdir(os.path.join(self._root, sub), 0o755)
            except FileExistsError:
                continue
            fsync_dir(self._root)
        return os.open(self._incoming, DIR_FLAGS)

    def _attempt(
        self, incoming_fd: int, leaf: str, name: str, request: WholeUpload
    ) -> CompletedUpload | None:
        """
        One go at the request's C{.put} file: C{None} if it vanished or was
        replaced under us (another server removed it): try again.
        """
        try:
            fd = os.open(leaf, _CREATE, 0o644, dir_fd=incoming_fd)
            fresh = True
        except FileExistsError:
            try:
                fd = os.open(leaf, OPEN_PUT, dir_fd=incoming_fd)
            except FileNotFoundError:
                return None
            fresh = False
        lock = lock_open(fd)
        if lock is None:
            # Another connection, here or on another server, has it now.
            raise busy_error(request.upload_id, self._retry_after)
        published = False
        try:
            st = os.fstat(fd)
            if not fresh:
                try:
                    now = os.stat(leaf, dir_fd=incoming_fd, follow_symlinks=False)
                except FileNotFoundError:
                    now = None
                published = True  # not ours to remove, unless found unpublished
                if now is None or identity(now) != identity(st):
                    return None
                done = self._repeat(incoming_fd, leaf, lock, st, name, request)
                if done is not None:
                    return done
                # Cut short before publication: never rewritten in place (a
                # stale view could hide a publication), removed and made anew.
                log.info("upload {upload_id}: stored again, its first try was cut "
                         "short before publication", upload_id=request.upload_id)
                published = False
                return None
            done = self._store(incoming_fd, leaf, lock, st, name, request)
            published = done.upload_id == request.upload_id
            return done
        finally:
            # Removed unless published: by this call, or by one that failed
            # after its link (the .put then has a second name).
            try:
                if not published and os.fstat(lock.fd).st_nlink == 1:
                    os.unlink(leaf, dir_fd=incoming_fd)
            except OSError:
                pass  # left for a repeat or garbage collection
            finally:
                lock.release()

    def _store(
        self, incoming_fd: int, leaf: str, lock: Lock, st: os.stat_result,
        name: str, request: WholeUpload,
    ) -> CompletedUpload:
        """Write, flush, verify and publish; the caller removes C{leaf} if this fails."""
        fd = lock.fd
        data = memoryview(request.data).cast("B")
        size = data.nbytes
        policy = if_exists_policy(request.metadata)
        pwrite_all(os.pwrite, fd, data, 0)
        started = time.perf_counter()
        _fdatasync(fd)
        if self._timings is not None:
            self._timings("fdatasync", time.perf_counter() - started)
        # The .put name must be as durable as the published one will be, so
        # that a repeat after a crash finds it instead of publishing twice.
        self.dirsync.sync(identity(os.fstat(incoming_fd)), incoming_fd)
        if self._read_back:
            digest = _stored_digest(fd, size, request.digest)
        else:  # --verify received: the bytes written, hashed in memory
            digest = integrity.digest_of(request.digest, data)
        if digest != request.sha256:
            if digest is None or integrity.digest_of(request.digest, data) == request.sha256:
                raise StorageError(
                    f"upload {request.upload_id}: the stored bytes differ from the "
                    "bytes written; nothing was stored, send it again")
            raise self._received_mismatch(digest, request)
        return self._publish(incoming_fd, leaf, st, name, request, policy, size)

    def _skip(self, name: str, request: WholeUpload) -> CompletedUpload | None:
        """C{if-exists} C{skip}: the answer when the name has these bytes."""
        digest = integrity.digest_of(request.digest, request.data)
        if digest != request.sha256:
            raise self._received_mismatch(digest, request)
        size = len(request.data)
        there = find_completed(self._root, name, size, request.digest)
        if there is not None and there.sha256 == digest:
            return CompletedUpload("0" * 32, name, size, digest, there.path, request.digest)
        return None

    def _received_mismatch(self, digest: bytes, request: WholeUpload) -> DigestMismatch:
        return DigestMismatch(
            f"the bytes received hash to {digest.hex()}, not to the "
            f"{integrity.title(request.digest)} declared ({request.sha256.hex()}); "
            "nothing was stored")

    def _publish(
        self, incoming_fd: int, leaf: str, st: os.stat_result, name: str,
        request: WholeUpload, policy: str, size: int,
    ) -> CompletedUpload:
        """
        Link the verified file under the first free candidate name, prove it
        is there, and flush the directory that received it.
        """
        parent, _, _ = name.rpartition("/")
        parent_fd = open_complete_dir(
            self._root, parent.split("/") if parent else [], create=True, resolve=False
        )
        try:
            for rel in completion_candidates(name, request.upload_id, policy):
                target = rel.rpartition("/")[2]
                try:
                    _link(leaf, target, src_dir_fd=incoming_fd, dst_dir_fd=parent_fd,
                          follow_symlinks=False)
                except FileExistsError:
                    continue  # taken: never replace it
                path = f"complete/{rel}"
                self._prove(parent_fd, target, st, size, path)
                mark_published(incoming_fd, leaf)
                log.info("upload {upload_id} stored whole at {path}",
                         upload_id=request.upload_id, path=path, size=size)
                return CompletedUpload(request.upload_id, name, size, request.sha256, path,
                                       request.digest)
        finally:
            os.close(parent_fd)
        if policy == "fail":
            raise NameTaken(f"complete/{name} already exists (if-exists=fail); "
                            "nothing was stored")
        raise StorageError(f"no free name in complete/ for {name!r}")  # pragma: no cover

    def _prove(
        self, parent_fd: int, target: str, st: os.stat_result, size: int, path: str
    ) -> None:
        """
        Prove the publication as the normal completion does: the name, looked
        up anew without following a symlink, is the verified file at its
        size; then the directory holding it is flushed (grouped).  The file
        itself was flushed before it was verified.

        @raise StorageError: the name holds something else.
        @raise OSError: the flush failed.
        """
        there = os.stat(target, dir_fd=parent_fd, follow_symlinks=False)
        if identity(there) != identity(st) or there.st_size != size:
            raise StorageError(f"{path} is not the verified file of {size} bytes")
        self.dirsync.sync(identity(os.fstat(parent_fd)), parent_fd)

    def _repeat(
        self, incoming_fd: int, leaf: str, lock: Lock, st: os.stat_result, name: str,
        request: WholeUpload,
    ) -> CompletedUpload | None:
        """
        The request's C{.put} was there already.  Published before (its
        answer was lost): check the stored bytes against this request's
        digest, find the published name by inode, make sure both names are
        durable and answer the same.  C{None}: it never was (a request cut
        short), store it again.

        The published name is looked for even when the C{.put} shows one
        link, and what does not add up on a C{.put} written moments ago
        (L{FRESH}) that shows one link is answered "retry", not "mismatch"
        or "redo" (nor, for a published one found nowhere, "moved"): a mount's
        cached attributes may be older than another host's writes and link
        (GlusterFS shows the size and link count of a moment before for
        about a second, and reads stop at that size).
        """
        # What is left of the window in which a view may be stale.
        left = FRESH - (self.now() - max(st.st_mtime, st.st_ctime))
        recent = left > 0
        published = st.st_nlink > 1
        done = CompletedUpload(request.upload_id, name, st.st_size, request.sha256,
                               f"complete/{name}", request.digest)
        if published:
            # A view that shows the link is no older than the bytes.
            self._check_stored(lock.fd, st, request, 0.0)
        parent, _, _ = name.rpartition("/")
        try:
            parent_fd = open_complete_dir(
                self._root, parent.split("/") if parent else [], create=False,
                resolve=False)
        except (FileNotFoundError, InvalidName):
            parent_fd = -1
        try:
            policy = if_exists_policy(request.metadata)
            for rel in completion_candidates(name, request.upload_id, policy):
                if parent_fd < 0:
                    break
                target = rel.rpartition("/")[2]
                try:
                    there = os.stat(target, dir_fd=parent_fd, follow_symlinks=False)
                except FileNotFoundError:
                    continue
                if identity(there) == identity(st):
                    if not published:
                        self._check_stored(lock.fd, st, request, left)
                    # Its first try may have died before these flushes.
                    self.dirsync.sync(identity(os.fstat(incoming_fd)), incoming_fd)
                    self.dirsync.sync(identity(os.fstat(parent_fd)), parent_fd)
                    mark_published(incoming_fd, leaf)
                    return CompletedUpload(request.upload_id, name, len(request.data),
                                           request.sha256, f"complete/{rel}", request.digest)
        finally:
            if parent_fd >= 0:
                os.close(parent_fd)
        if recent:
            raise self._not_seen_yet(request, left)
        if published:
            raise CompletedFileMoved(done, "no longer holds it, nor does any alternate name")
        return None

    def _check_stored(
        self, fd: int, st: os.stat_result, request: WholeUpload, left: float
    ) -> None:
        """
        A repeat's digest against the bytes stored for its upload id;
        C{left}: seconds left of the window in which the view may be stale
        (none if not positive).
        """
        if _stored_digest(fd, st.st_size, request.digest) == request.sha256:
            return
        if left > 0:
            raise self._not_seen_yet(request, left)
        raise DigestMismatch(
            f"upload {request.upload_id} already stored other bytes; send this "
            "file with a new upload id")

    def _not_seen_yet(self, request: WholeUpload, left: float) -> StorageError:
        """
        Retry: the C{.put} may be a stale view of another server's store, or
        a request cut short.  The hint is the end of the window (C{left}
        seconds), when a repeat is answered for certain, and never less than
        the busy hint: a client retrying as told does not spend its attempts
        on answers that cannot change.
        """
        wait = max(self._retry_after, round(left + FRESH_MARGIN, 1))
        return StorageError(
            f"upload {request.upload_id} was written moments ago, and this server "
            "cannot tell yet whether it was stored (a view of another server's "
            f"write, not up to date) or cut short; retry in {wait:.0f} s",
            retry_after=wait)


#: Added to the rest of the L{FRESH} window in the retry hint, so that the
#: repeat comes after it even with the clocks of two hosts a little apart.
FRESH_MARGIN = 0.5

# -*- test-case-name: tests.storage.test_filesystem.NoClobberTests -*-
"""
Completion: a verified upload's data file appears under C{complete/} as a
hard link, at the first free name of L{completion_candidates}, never
replacing another file and never following a symlink out of the root.

Called by the writer when an upload completes, and by a resume that finds a
completion interrupted half-way (state C{completing}), which it finishes.
Before an upload is recorded complete, its publication is proven from a
fresh open of the final name, and the identity of the file found there is
recorded; a later resume answers "complete" only while that file is still
there (L{check_recorded_complete}).
Also the look-up of the file that already has a name (L{find_completed}),
for an UPLOAD's C{if-exists} policy.
"""

from __future__ import annotations

import errno
import os
import stat
import time
from typing import Any

from twisted.logger import Logger

from imgresume import integrity
from imgresume.errors import InvalidName, NameTaken, StorageError
from imgresume.names import completion_candidates, if_exists_policy, validate_name
from imgresume.storage.filesystem import _incomplete
from imgresume.storage.filesystem._durable import (
    CLOEXEC,
    DIR_FLAGS,
    fail,
    fsync_dir,
    io_errors,
)
from imgresume.storage.filesystem._layout import (
    Paths,
    completed,
    file_identity,
    mtime,
    safe_relpath,
    write_meta,
)
from imgresume.storage.interfaces import CompletedFileMoved, CompletedUpload, StoredFile

# The backend logs as one namespace, imgresume.storage.filesystem.
log = Logger(namespace=__package__)

# An indirection so tests can simulate a crash or a race at this step.
_link = os.link

#: Seconds after its completion was recorded during which a file whose
#: attributes differ from the recorded ones, but not its inode, is taken for
#: a stale view of this host (and the resume told to retry), not for another
#: file.  Well above a shared filesystem's attribute cache and clock skew.
FRESH = 10.0


def _lstat_at(name: str, dir_fd: int) -> os.stat_result | None:
    try:
        return os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return None


def _same_file(a: os.stat_result, b: os.stat_result) -> bool:
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def open_complete_dir(
    root: str, parts: list[str], create: bool, *, resolve: bool = True
) -> int:
    """
    Open C{complete/<parts...>} under C{root} as a directory fd, walking one
    component at a time with C{O_NOFOLLOW} so no symlink is ever followed,
    and making missing directories if C{create}.  With C{resolve}, the
    result is also checked with C{realpath} to lie below the root (a walk
    of C{stat}s of every component of the absolute path); the one-step
    store skips that: its walk from the root through validated names (no
    C{..}, no empty components) with C{O_NOFOLLOW} at every step cannot
    leave the root, which the C{realpath} check only confirms.

    @raise StorageError: a component is a symlink, or the result resolves
        outside the root.
    @raise InvalidName: a component is a file, not a directory.
    @raise FileNotFoundError: a component is missing and not C{create}.
    """
    fd = os.open(root, DIR_FLAGS)
    walked: list[str] = []
    try:
        for part in ["complete", *parts]:
            walked.append(part)
            flags = DIR_FLAGS | os.O_NOFOLLOW
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
            # The new descriptor first: a close that fails must not leak it.
            fd, old = nfd, fd
            os.close(old)
        if not resolve:
            return fd
        real = os.path.realpath(os.path.join(root, "complete", *parts))
        base = os.path.realpath(root)
        if not real.startswith(base + os.sep):
            raise StorageError(
                f"complete/{'/'.join(parts)} resolves outside the storage root"
            )
    except BaseException:
        os.close(fd)
        raise
    return fd


def check_complete_parents(root: str, name: str) -> None:
    """Refuse early a name whose directories cannot exist in complete/."""
    with io_errors("cannot check the completed files"):
        try:
            fd = open_complete_dir(root, name.split("/")[:-1], create=False)
        except FileNotFoundError:
            return
        os.close(fd)


def finish_completion(root: str, paths: Paths, meta: dict[str, Any]) -> CompletedUpload:
    """
    Link the verified data file to its final path, no-clobber, prove the
    publication (L{_prove_published}) and record the upload complete with
    the identity of the published file.  Idempotent: resumes a completion
    interrupted at any step.  The caller holds the upload's lock; C{meta}
    is updated in place.

    @raise OSError: a step failed; the upload stays C{completing} (or
        C{partial}, before the first step), for the next resume to finish.
        A writer that gets this is poisoned: a flush that failed once is
        not retried on the same descriptors.
    @raise StorageError: the data file is missing, or a symlink is in the
        way (L{open_complete_dir}).
    @raise InvalidName: a file is where a directory must be.
    """
    upload_id = meta["upload_id"]
    name = validate_name(meta["name"])
    try:
        data_st = os.stat(paths.data)
    except FileNotFoundError:
        raise StorageError(f"{paths.rel} is missing its data file") from None
    first: list[str] = []
    if meta["state"] == "completing" and meta.get("path"):
        first.append(meta["path"].removeprefix("complete/"))
    tried: set[str] = set()
    policy = if_exists_policy(meta.get("metadata") or {})
    for rel in [*first, *completion_candidates(name, upload_id, policy)]:
        if rel in tried:
            continue
        tried.add(rel)
        if not safe_relpath(rel):  # pragma: no cover - defensive
            continue
        *parents, leaf = rel.split("/")
        parent_fd = open_complete_dir(root, parents, create=True)
        try:
            existing = _lstat_at(leaf, parent_fd)
            if existing is not None and not _same_file(existing, data_st):
                continue  # taken by another file: never replace it
            path = f"complete/{rel}"
            if meta["state"] != "completing" or meta.get("path") != path:
                meta["state"] = "completing"
                meta["path"] = path
                write_meta(paths, meta)
            if existing is None:
                try:
                    _link(paths.data, leaf, dst_dir_fd=parent_fd)
                except FileExistsError:
                    existing = _lstat_at(leaf, parent_fd)
                    if existing is None or not _same_file(existing, data_st):
                        continue  # lost a race for this name
            identity = _prove_published(parent_fd, leaf, data_st, meta["size"], path)
            break
        finally:
            os.close(parent_fd)
    else:
        if policy == "fail":
            raise NameTaken(f"complete/{name} already exists (if-exists=fail); "
                            "the upload is kept")
        raise StorageError(f"no free name in complete/ for {name!r}")  # pragma: no cover
    meta["state"] = "complete"
    meta["file"] = identity
    write_meta(paths, meta)
    _incomplete.forget(root, meta)
    for p in (paths.data, paths.journal):
        try:
            os.unlink(p)
        except FileNotFoundError:
            pass
        except OSError as e:
            log.warn(
                "upload {upload_id}: cannot remove {file}: {error}",
                upload_id=upload_id,
                file=f"{paths.rel}/{os.path.basename(p)}",
                error=e.strerror,
            )
    try:
        fsync_dir(paths.dir)
    except OSError:
        pass
    return completed(meta)


def find_completed(
    root: str, name: str, size: int, algorithm: str = integrity.LEGACY_DIGEST
) -> StoredFile | None:
    """
    What lies at C{complete/<name>}: see
    L{IUploadStorage.find_completed
    <imgresume.storage.interfaces.IUploadStorage.find_completed>}.  Walks
    with C{O_NOFOLLOW} like a completion; a symlink there counts as taken
    by something that is not a regular file.
    """
    name = validate_name(name)
    *parents, leaf = name.split("/")
    path = f"complete/{name}"
    with io_errors(f"cannot look up {path}"):
        try:
            parent_fd = open_complete_dir(root, parents, create=False)
        except FileNotFoundError:
            return None
        try:
            st = _lstat_at(leaf, parent_fd)
            if st is None:
                return None
            if not stat.S_ISREG(st.st_mode):
                return StoredFile(path, None, None)
            if st.st_size != size:
                return StoredFile(path, st.st_size, None)
            fd = os.open(leaf, os.O_RDONLY | os.O_NOFOLLOW | CLOEXEC, dir_fd=parent_fd)
        finally:
            os.close(parent_fd)
        try:
            digest = integrity.new_digest(algorithm)
            while chunk := os.read(fd, 1 << 20):
                digest.update(chunk)
            st = os.fstat(fd)
        finally:
            os.close(fd)
    return StoredFile(path, st.st_size, digest.digest() if st.st_size == size else None)


def _prove_published(
    parent_fd: int, leaf: str, data_st: os.stat_result, size: int, path: str
) -> dict[str, int]:
    """
    Prove that C{leaf} in the (freshly opened) directory C{parent_fd} is the
    upload's verified file, durably: open the name anew (never following a
    symlink), check it is the data file's inode at the declared size, and
    flush the file and then its directory through these new descriptors.
    A completion whose flush failed is proven again this way by the next
    resume, never by retrying on the descriptors that saw the failure.

    @return: the identity of the published file (L{file_identity}).
    @raise OSError: a flush failed.
    @raise StorageError: the name holds something else.
    """
    fd = os.open(leaf, os.O_RDONLY | os.O_NOFOLLOW | CLOEXEC, dir_fd=parent_fd)
    try:
        st = os.fstat(fd)
        if not _same_file(st, data_st) or st.st_size != size:
            raise StorageError(
                f"{path} is not the verified file of {size} bytes; not recorded complete"
            )
        os.fsync(fd)
    finally:
        os.close(fd)
    os.fsync(parent_fd)
    return file_identity(st)


def check_recorded_complete(root: str, paths: Paths, meta: dict[str, Any]) -> CompletedUpload:
    """
    The completion an upload's meta.json records, once its file is checked
    to be still the one published: the same inode, size and modification
    time (C{meta["file"]}; for a record written before these were kept,
    the same size), and on the filesystem of the upload's record as this
    host sees it.

    @raise CompletedFileMoved: the file is missing, or the path now holds
        another file (a consumer moved the file away, and perhaps a later
        upload took the name).
    """
    done = completed(meta)
    path = os.path.join(root, *done.path.split("/"))
    try:
        st = os.lstat(path)
        here = os.stat(paths.dir)
    except FileNotFoundError:
        log.error(
            "upload {upload_id} is recorded complete but {path} is missing",
            upload_id=done.upload_id,
            path=done.path,
        )
        raise CompletedFileMoved(done, "is missing") from None
    except OSError as e:
        raise fail(e, f"cannot check {done.path}") from e
    recorded = meta.get("file") or {"size": done.size}
    now = file_identity(st)
    if (
        stat.S_ISREG(st.st_mode)
        and st.st_dev == here.st_dev
        and all(now[k] == v for k, v in recorded.items() if k in now)
    ):
        return done
    if now["inode"] == recorded.get("inode") and time.time() - mtime(paths.meta) < FRESH:
        # Published moments ago, perhaps by another host: this host's view
        # of the file's attributes may still be the one before (about 1 s
        # on GlusterFS).  Not "moved", not "complete" either: ask again.
        raise StorageError(
            f"upload {done.upload_id} was completed at {done.path} moments ago, "
            "and this server does not see the published file yet; retry"
        )
    log.error(
        "upload {upload_id} is recorded complete but {path} now holds another file",
        upload_id=done.upload_id,
        path=done.path,
    )
    raise CompletedFileMoved(done, "now holds another file")

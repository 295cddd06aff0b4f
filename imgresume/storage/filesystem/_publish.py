# -*- test-case-name: tests.storage.test_filesystem.NoClobberTests -*-
"""
Completion: a verified upload's data file appears under C{complete/} as a
hard link, at the first free name of L{completion_candidates}, never
replacing another file and never following a symlink out of the root.

Called by the writer when an upload completes, and by a resume that finds a
completion interrupted half-way (state C{completing}), which it finishes.
"""

from __future__ import annotations

import errno
import os
import stat
from typing import Any

from twisted.logger import Logger

from imgresume.errors import InvalidName, StorageError
from imgresume.names import completion_candidates, validate_name
from imgresume.storage.filesystem import _incomplete
from imgresume.storage.filesystem._durable import (
    DIR_FLAGS,
    atomic_write,
    fail,
    fsync_dir,
    io_errors,
)
from imgresume.storage.filesystem._layout import Paths, completed, dump, safe_relpath
from imgresume.storage.interfaces import CompletedUpload

# The backend logs as one namespace, imgresume.storage.filesystem.
log = Logger(namespace=__package__)

# An indirection so tests can simulate a crash or a race at this step.
_link = os.link


def _lstat_at(name: str, dir_fd: int) -> os.stat_result | None:
    try:
        return os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return None


def _same_file(a: os.stat_result, b: os.stat_result) -> bool:
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def open_complete_dir(root: str, parts: list[str], create: bool) -> int:
    """
    Open C{complete/<parts...>} under C{root} as a directory fd, walking one
    component at a time with C{O_NOFOLLOW} so no symlink is ever followed,
    and making missing directories if C{create}.

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
            os.close(fd)
            fd = nfd
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
    Link the verified data file to its final path, no-clobber, and record
    the upload complete.  Idempotent: resumes a completion interrupted at
    any step.  The caller holds the upload's lock; C{meta} is updated in
    place.
    """
    upload_id = meta["upload_id"]
    name = validate_name(meta["name"])
    with io_errors(f"cannot complete {paths.rel}"):
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
                    atomic_write(paths.dir, "meta.json", dump(meta))
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
        atomic_write(paths.dir, "meta.json", dump(meta))
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


def check_recorded_complete(root: str, meta: dict[str, Any]) -> CompletedUpload:
    """
    The completion an upload's meta.json records, once its file is checked
    to be in place.

    @raise StorageError: the completed file is missing.
    """
    done = completed(meta)
    path = os.path.join(root, *done.path.split("/"))
    try:
        os.lstat(path)
    except FileNotFoundError:
        log.error(
            "upload {upload_id} is recorded complete but {path} is missing",
            upload_id=done.upload_id,
            path=done.path,
        )
        raise StorageError(
            f"upload {done.upload_id} is recorded complete but "
            f"{done.path} is missing"
        ) from None
    except OSError as e:
        raise fail(e, f"cannot check {done.path}") from e
    return done

# -*- test-case-name: tests.storage.test_incomplete -*-
"""
The per-client index of incomplete uploads, so that counting a client's
incomplete uploads (L{IUploadStorage.incomplete_for
<imgresume.storage.interfaces.IUploadStorage.incomplete_for>}) reads one
small directory instead of every upload under C{incoming/}::

    clients/c-<client id>/<upload id>.<declared size>

one empty file per upload of that client that is neither complete nor
removed.  An entry is made before the upload's directory (so no upload goes
uncounted) and removed when the upload completes, is aborted or is
collected; the names alone give the count and the declared bytes.

The index is a hint kept without fsync, for a limit, never for data: an
entry lost in a crash undercounts until the upload ends, an entry left
behind (a crash between an upload's end and the entry's removal, an upload
removed by hand or by an older version) overcounts until L{prune} drops it.
"""

from __future__ import annotations

import os
import re
import stat
import time
from typing import Any, Callable

from imgresume.errors import StorageError
from imgresume.storage.filesystem._durable import CLOEXEC, DIR_FLAGS, io_errors
from imgresume.storage.interfaces import IncompleteUploads

INDEX = "clients"
#: An entry younger than this is never pruned: its upload may be being created.
GRACE = 600.0

_CLIENT_ID = re.compile(r"[A-Za-z0-9._@:+-]{0,128}")
_ENTRY = re.compile(r"([0-9a-f]{32})\.([0-9]{1,20})")
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)


def client_dir_name(client_id: str) -> str:
    """The directory of C{client_id}'s entries under C{clients/}."""
    if _CLIENT_ID.fullmatch(client_id):
        return "c-" + client_id
    # Not a client id the protocol allows: a name that cannot clash with one.
    return "x-" + client_id.encode("utf-8", "surrogatepass").hex()[:200]


def _open_dir(parent_fd: int | None, path: str, create: bool) -> int | None:
    """
    Open the directory C{path} (relative to C{parent_fd}) without following
    a symlink, making it if C{create}; None if it does not exist.
    """
    if create:
        try:
            os.mkdir(path, 0o755, dir_fd=parent_fd)
        except FileExistsError:
            pass
    try:
        return os.open(path, DIR_FLAGS | _NOFOLLOW, dir_fd=parent_fd)
    except FileNotFoundError:
        if create:
            raise
        return None
    except OSError as e:
        # ELOOP (a symlink) or ENOTDIR: not the index's own directory.
        raise StorageError(f"{INDEX}/ holds something that is not a directory "
                           f"({e.strerror}); move it away") from e


def _client_fd(root: str, client_id: str, create: bool) -> int | None:
    """The client's index directory, opened; None if it does not exist (and not C{create})."""
    try:
        root_fd = os.open(root, DIR_FLAGS)
    except FileNotFoundError:
        if create:
            raise
        return None  # no upload was ever created here
    try:
        index_fd = _open_dir(root_fd, INDEX, create)
    finally:
        os.close(root_fd)
    if index_fd is None:
        return None
    try:
        return _open_dir(index_fd, client_dir_name(client_id), create)
    finally:
        os.close(index_fd)


def add(root: str, client_id: str, upload_id: str, size: int) -> None:
    """Count a new upload of C{client_id} (before its directory is made)."""
    with io_errors("cannot record the upload in the client index"):
        fd = _client_fd(root, client_id, create=True)
        assert fd is not None
        try:
            os.close(os.open(f"{upload_id}.{size}",
                             os.O_WRONLY | os.O_CREAT | _NOFOLLOW | CLOEXEC, 0o644,
                             dir_fd=fd))
        finally:
            os.close(fd)


def resize(root: str, meta: dict[str, Any], size: int) -> None:
    """
    The upload C{meta} (its meta.json before the change) now declares
    C{size} bytes: rename its entry (made again if it was lost).
    """
    with io_errors("cannot record the upload's size in the client index"):
        fd = _client_fd(root, meta["client_id"], create=True)
        assert fd is not None
        new = f"{meta['upload_id']}.{size}"
        try:
            try:
                os.rename(f"{meta['upload_id']}.{meta['size']}", new,
                          src_dir_fd=fd, dst_dir_fd=fd)
            except FileNotFoundError:
                os.close(os.open(new, os.O_WRONLY | os.O_CREAT | _NOFOLLOW | CLOEXEC,
                                 0o644, dir_fd=fd))
        finally:
            os.close(fd)


def forget(root: str, meta: dict[str, Any]) -> None:
    """
    The upload C{meta} (its meta.json) is complete or removed: uncount it.
    Best effort: an entry that cannot be removed is pruned later.
    """
    try:
        fd = _client_fd(root, meta["client_id"], create=False)
        if fd is None:
            return
        try:
            os.unlink(f"{meta['upload_id']}.{meta['size']}", dir_fd=fd)
        finally:
            os.close(fd)
    except (OSError, StorageError, KeyError, TypeError):
        pass


def _entries(fd: int) -> list[tuple[str, str, int]]:
    """The entries of a client's directory: (file name, upload id, declared size)."""
    found = []
    for name in os.listdir(fd):
        match = _ENTRY.fullmatch(name)
        if match is not None:
            found.append((name, match.group(1), int(match.group(2))))
    return found


def count(root: str, client_id: str) -> IncompleteUploads:
    """C{client_id}'s incomplete uploads, as the index has them."""
    with io_errors("cannot read the client index"):
        fd = _client_fd(root, client_id, create=False)
        if fd is None:
            return IncompleteUploads(0, 0)
        try:
            entries = _entries(fd)
        finally:
            os.close(fd)
    return IncompleteUploads(len(entries), sum(size for _, _, size in entries))


def prune(
    root: str,
    client_id: str,
    incomplete: Callable[[str], bool | None],
    now: Callable[[], float] = time.time,
) -> None:
    """
    Drop the entries of C{client_id} whose upload is no longer incomplete:
    C{incomplete(upload_id)} says False (complete), or None (no such upload;
    only for an entry older than L{GRACE}, whose upload cannot be still
    being created).  Reads one record per entry: run it when a limit is
    about to refuse, not on every count.
    """
    with io_errors("cannot read the client index"):
        fd = _client_fd(root, client_id, create=False)
        if fd is None:
            return
        try:
            for name, upload_id, _ in _entries(fd):
                state = incomplete(upload_id)
                if state:
                    continue
                if state is None:
                    try:
                        st = os.stat(name, dir_fd=fd, follow_symlinks=False)
                    except FileNotFoundError:
                        continue
                    if not stat.S_ISREG(st.st_mode) or now() - st.st_mtime < GRACE:
                        continue
                try:
                    os.unlink(name, dir_fd=fd)
                except FileNotFoundError:
                    pass
        finally:
            os.close(fd)

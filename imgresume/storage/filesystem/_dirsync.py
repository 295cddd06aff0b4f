# -*- test-case-name: tests.storage.test_whole.DirectorySyncTests -*-
"""
Grouped directory flushes: L{DirectorySync} lets the uploads that change
one directory at about the same moment share one C{fsync} of it.

Used by the one-step store (L{imgresume.storage.filesystem._whole}) for
C{incoming/} and the directories of C{complete/} that receive names.
"""

from __future__ import annotations

import errno
import os
import threading
from typing import Callable


class _State:
    """The flushes of one directory: numbered in the order they start."""

    __slots__ = ("started", "done", "running", "failed", "error", "users")

    def __init__(self) -> None:
        #: Number of the last flush started; C{done}: of the last finished.
        self.started = 0
        self.done = 0
        self.running = False
        #: Number of the last flush that failed, and its error.
        self.failed = 0
        self.error: OSError | None = None
        #: Callers in L{DirectorySync.sync} for this directory.
        self.users = 0


class DirectorySync:
    """
    Group commit for directory flushes.  A caller that has changed a
    directory (created, linked or removed a name in it) calls L{sync} with
    an open descriptor of it and returns only after an C{fsync} of that
    directory that I{started after} the call; callers that arrive while a
    flush runs wait for it and then share the next one, so N uploads that
    finish together cost two flushes of a shared directory, not N.

    Thread-safe; one per L{FilesystemStorage
    <imgresume.storage.filesystem.FilesystemStorage>}, called on its disk
    threads.  Directories are told apart by C{(st_dev, st_ino)}.

    @ivar fsync: the flush (a test may count or fail it); C{None}:
        C{os.fsync}.
    """

    def __init__(self, fsync: Callable[[int], None] | None = None) -> None:
        """@param fsync: the flush; default C{os.fsync}, looked up at each call."""
        self._cond = threading.Condition()
        self._dirs: dict[tuple[int, int], _State] = {}
        self.fsync = fsync

    def sync(self, key: tuple[int, int], fd: int) -> None:
        """
        Return once an C{fsync} of the directory C{key} (open on C{fd})
        that started after this call has succeeded.

        @raise OSError: that flush, or one started after this call before
            it, failed (never retried by this caller: a flush that failed
            once proves nothing when retried).
        """
        with self._cond:
            state = self._dirs.get(key)
            if state is None:
                state = self._dirs[key] = _State()
            state.users += 1
            try:
                # A flush already running may have started before our change.
                need = state.started + 1
                while state.done < need and state.running:
                    self._cond.wait()
                if state.done >= need:
                    if state.failed >= need:
                        raise state.error  # type: ignore[misc]
                    return
                state.running = True
                state.started += 1
                number = state.started
            finally:
                state.users -= 1
                if state.users == 0 and not state.running:
                    del self._dirs[key]
        error: OSError | None = None
        try:
            (self.fsync or os.fsync)(fd)
        except OSError as e:
            if e.errno != errno.EINVAL:  # a filesystem that cannot sync directories
                error = e
        with self._cond:
            state.running = False
            state.done = number
            if error is not None:
                state.failed, state.error = number, error
            if state.users == 0:
                del self._dirs[key]  # nobody waits: forget the directory
            self._cond.notify_all()
        if error is not None:
            raise error

# -*- test-case-name: tests.storage.test_maintenance -*-
"""
Garbage collection of abandoned uploads in a L{FilesystemStorage
<imgresume.storage.filesystem.FilesystemStorage>} root.

Plain blocking functions: the server runs L{collect_garbage} on its disk
thread pool (never on the reactor thread), C{imgresume gc} calls it
directly.  Several servers may collect the same root at once; they exclude
each other (and every writer) with the uploads' own locks.

What is removed, each only once it is older than its threshold:

  - partial uploads (state C{partial}) nobody has touched for
    C{older_than} seconds, and only while nobody holds their lock;
  - upload directories without C{meta.json} (a crash during C{create}, or
    during an earlier removal);
  - stray C{.*.tmp} files of atomic rewrites a crash left behind;
  - records of completed uploads (C{incoming/<id>} in state C{complete}),
    after the longer C{completed_records_older_than}, so that a client that
    lost its COMPLETED answer can still learn it until then;
  - C{.selftest-*} scratch directories a killed self-test left (after an
    hour at least);
  - C{incoming/<key>.put} files of the one-step store: unpublished ones
    (one link) after C{older_than}, published ones (kept to answer a
    repeated request) after C{completed_records_older_than}; never while
    locked (L{imgresume.storage.filesystem._put_gc.collect_put}).

What is never removed: anything under C{complete/}; an upload whose lock is
held (its writer is alive, on this host or another); an upload in state
C{completing} (it is reported, and the next resume finishes it).

"Touched" is the newest modification time of the upload's C{meta.json},
C{data}, C{journal}, C{lease} and C{takeover}.  On a network filesystem a
host's view may be stale, which only makes files look I{older} than they
are; the lock, taken without blocking before anything is removed, is what
rules out a live writer.  Ages are judged again under the lock.

Removal keeps the invariants of C{docs/storage.md}: it runs under the
upload's lock and deletes C{meta.json} first (an upload half removed is
"unknown", never resumable), then the other files, the lock file last, then
the directory.
"""

from __future__ import annotations

import os
import shutil
import stat
import time
from typing import Any, Callable, Iterator

import attrs
from twisted.logger import Logger

from imgresume.errors import ImgresumeError, UnknownUpload, UploadBusy
from imgresume.names import is_upload_id
from imgresume.storage.filesystem import _incomplete
from imgresume.storage.filesystem._layout import Paths, read_meta, remove
from imgresume.storage.filesystem._locks import Lock, acquire
from imgresume.storage.filesystem._put_gc import EXPIRED_PUT, EXPIRED_PUT_RECORD, collect_put
from imgresume.storage.filesystem._whole import is_put_name

log = Logger()

#: Default age after which the record of a completed upload is removed.
DEFAULT_RECORDS_OLDER_THAN = 30 * 86400.0
#: Scratch directories of the self-test are removed only after this long,
#: whatever C{older_than} is, so a slow self-test is never cut short.
SCRATCH_MIN_AGE = 3600.0
#: Prefix of the self-test's scratch directories in the root.
SCRATCH_PREFIX = ".selftest-"

# Actions of entries in GcReport.removed:
EXPIRED_PARTIAL = "expired-partial"
INCOMPLETE_CREATE = "incomplete-create"
EXPIRED_RECORD = "expired-record"
STRAY_TEMP = "stray-temp"
STALE_SCRATCH = "stale-scratch"
# ... in GcReport.skipped_busy:
BUSY = "busy"
# ... in GcReport.kept:
FRESH_PARTIAL = "fresh-partial"
FRESH_INCOMPLETE = "fresh-incomplete"
RECENT_RECORD = "recent-record"
COMPLETING = "completing"
INVALID = "invalid"
ERROR = "error"

#: Files whose modification time says when an upload was last touched.
_TOUCH_FILES = ("meta.json", "data", "journal", "lease", "takeover")

_DESCRIPTIONS = {
    EXPIRED_PARTIAL: "abandoned partial upload",
    INCOMPLETE_CREATE: "upload directory without meta.json",
    EXPIRED_RECORD: "record of a completed upload",
    STRAY_TEMP: "stray temporary file",
    STALE_SCRATCH: "self-test scratch directory",
    EXPIRED_PUT: "unpublished one-step file",
    EXPIRED_PUT_RECORD: "one-step file kept to answer a repeat",
}


@attrs.frozen
class GcEntry:
    """
    One thing garbage collection looked at.

    @ivar upload_id: the upload's id (the directory name under
        C{incoming/}); for a scratch directory, its name.
    @ivar name: the upload's remote name; for a stray file or directory,
        its path relative to the root; C{""} if unknown.
    @ivar size: bytes the entry holds on disk that removing it frees (files
        with no other link; a completed file's bytes are never counted).
    @ivar age: seconds since it was last touched.
    @ivar action: what was done or why not; one of the constants above.
    @ivar detail: a human explanation, for C{invalid} and C{error}.
    """

    upload_id: str
    name: str
    size: int
    age: float
    action: str
    detail: str = ""

    def to_json(self) -> dict[str, Any]:
        return attrs.asdict(self)


@attrs.define
class GcReport:
    """
    What one run of L{collect_garbage} did (or, in a dry run, would do).

    @ivar removed: entries removed (would be removed, in a dry run).
    @ivar skipped_busy: entries old enough but locked by a live writer.
    @ivar kept: everything else examined, with the reason.
    @ivar bytes_freed: the sum of the removed entries' sizes.
    """

    root: str
    older_than: float
    completed_records_older_than: float
    dry_run: bool
    now: float
    removed: list[GcEntry] = attrs.Factory(list)
    skipped_busy: list[GcEntry] = attrs.Factory(list)
    kept: list[GcEntry] = attrs.Factory(list)
    bytes_freed: int = 0

    def to_json(self) -> dict[str, Any]:
        return {
            "root": self.root,
            "older_than": self.older_than,
            "completed_records_older_than": self.completed_records_older_than,
            "dry_run": self.dry_run,
            "now": self.now,
            "removed": [e.to_json() for e in self.removed],
            "skipped_busy": [e.to_json() for e in self.skipped_busy],
            "kept": [e.to_json() for e in self.kept],
            "bytes_freed": self.bytes_freed,
        }


def collect_garbage(
    root: str | os.PathLike[str],
    older_than: float,
    *,
    completed_records_older_than: float = DEFAULT_RECORDS_OLDER_THAN,
    dry_run: bool = False,
    now: float | None = None,
    stop: Callable[[], bool] | None = None,
) -> GcReport:
    """
    Remove abandoned uploads and debris under the storage C{root}.  Blocking:
    run it on a thread, never on the reactor thread.

    @param older_than: seconds a partial upload, an upload directory
        without C{meta.json} or a temporary file must have been untouched.
    @param completed_records_older_than: the same for records of completed
        uploads (the completed files themselves are never touched).
    @param dry_run: remove nothing; the report says what would be removed.
        Locks are still tried (and let go at once), so busy uploads are
        reported as such.
    @param now: the current time (seconds since the epoch); default
        C{time.time()}.
    @param stop: called between uploads; when it returns true the run ends
        early (a server shutting down does not wait for a whole pass).
    """
    if older_than < 0 or completed_records_older_than < 0:
        raise ValueError("ages must not be negative")
    report = GcReport(
        root=os.path.abspath(os.fspath(root)),
        older_than=float(older_than),
        completed_records_older_than=float(completed_records_older_than),
        dry_run=dry_run,
        now=time.time() if now is None else now,
    )
    _Collector(report, stop or (lambda: False)).run()
    return report


class _Collector:
    """One run of L{collect_garbage}."""

    def __init__(self, report: GcReport, stop: Callable[[], bool]) -> None:
        self.report = report
        self.stop = stop
        self.root = report.root

    def run(self) -> None:
        incoming = os.path.join(self.root, "incoming")
        try:
            entries = sorted(os.listdir(incoming))
        except FileNotFoundError:
            entries = []
        for entry in entries:
            if self.stop():
                return
            if is_put_name(entry):
                self.put_file(incoming, entry)
                continue
            # Only directories named like upload ids are ours.
            if not is_upload_id(entry):
                continue
            st = _lstat(os.path.join(incoming, entry))
            if st is None or not stat.S_ISDIR(st.st_mode):
                continue
            try:
                self.upload(entry)
            except Exception as e:
                self.error(entry, "", e)
        self.scratch_dirs()

    # -- reporting ----------------------------------------------------------

    def removed(self, entry: GcEntry) -> None:
        r = self.report
        r.removed.append(entry)
        r.bytes_freed += entry.size
        log.info(
            "gc: {verb} {what} {upload_id} ({name!r}, {size} bytes, "
            "untouched for {age:.0f} s)",
            verb="would remove" if r.dry_run else "removed",
            what=_DESCRIPTIONS[entry.action],
            upload_id=entry.upload_id,
            name=entry.name,
            size=entry.size,
            age=entry.age,
            action=entry.action,
            dry_run=r.dry_run,
        )

    def error(self, upload_id: str, name: str, e: BaseException) -> None:
        cause = e.__cause__ if isinstance(e, ImgresumeError) else e
        if isinstance(cause, FileNotFoundError):
            return  # removed meanwhile (an abort, or another server's gc)
        text = str(e) if isinstance(e, ImgresumeError) else (
            getattr(e, "strerror", None) or repr(e)
        )
        self.report.kept.append(GcEntry(upload_id, name, 0, 0.0, ERROR, text))
        log.error(
            "gc: cannot collect {upload_id}: {error}", upload_id=upload_id, error=text
        )

    # -- uploads ------------------------------------------------------------

    def upload(self, upload_id: str) -> None:
        paths = Paths(self.root, upload_id)
        now = self.report.now
        try:
            meta = read_meta(paths, upload_id)
        except ImgresumeError as e:
            # A record this version cannot read: an operator's business.
            self.report.kept.append(
                GcEntry(upload_id, "", _held_bytes(paths.dir), 0.0, INVALID, str(e))
            )
            log.warn("gc: leaving {upload_id} alone: {error}",
                     upload_id=upload_id, error=str(e))
            return
        action, age = self.judge(paths, meta)
        if action in (EXPIRED_PARTIAL, INCOMPLETE_CREATE, EXPIRED_RECORD):
            self.remove(paths, upload_id, meta)
            return
        self.report.kept.append(GcEntry(
            upload_id, _name(meta), _held_bytes(paths.dir), age, action
        ))
        if action != COMPLETING:
            self.temp_files(paths, upload_id, now)

    def judge(self, paths: Paths, meta: dict[str, Any] | None) -> tuple[str, float]:
        """What to do with an upload given its record; and its age."""
        r = self.report
        age = r.now - _touched(paths, meta is None)
        if meta is None:
            return (INCOMPLETE_CREATE if age >= r.older_than else FRESH_INCOMPLETE), age
        state = meta["state"]
        if state == "partial":
            return (EXPIRED_PARTIAL if age >= r.older_than else FRESH_PARTIAL), age
        if state == "complete":
            expired = age >= r.completed_records_older_than
            return (EXPIRED_RECORD if expired else RECENT_RECORD), age
        return COMPLETING, age

    def lock(self, paths: Paths, upload_id: str) -> Lock | None | bool:
        """
        Take an upload's lock without blocking.

        @return: the lock; C{None} if the upload has no lock file (nobody
            can own it); C{False} if it is held, or was replaced meanwhile.
        """
        if _lstat(paths.lock) is None:
            return None
        try:
            return acquire(paths.lock, upload_id, 0.0)
        except (UploadBusy, UnknownUpload):
            return False

    def remove(self, paths: Paths, upload_id: str, meta: dict[str, Any] | None) -> None:
        lock = self.lock(paths, upload_id)
        if lock is False:
            age = self.report.now - _touched(paths, meta is None)
            self.report.skipped_busy.append(GcEntry(
                upload_id, _name(meta), _held_bytes(paths.dir), age, BUSY
            ))
            return
        try:
            # Judge again under the lock: the authoritative record, and the
            # times a writer who just let go left.
            meta = read_meta(paths, upload_id)
            if meta is None and _lstat(paths.dir) is None:
                return  # removed meanwhile
            action, age = self.judge(paths, meta)
            size = _held_bytes(paths.dir)
            if action not in (EXPIRED_PARTIAL, INCOMPLETE_CREATE, EXPIRED_RECORD):
                self.report.kept.append(
                    GcEntry(upload_id, _name(meta), size, age, action)
                )
                return
            if not self.report.dry_run:
                # meta.json first, the lock file last, then the directory.
                remove(paths)
                if meta is not None:
                    _incomplete.forget(self.root, meta)
            self.removed(GcEntry(upload_id, _name(meta), size, age, action))
        except Exception as e:
            self.error(upload_id, _name(meta), e)
        finally:
            if lock:
                lock.release()

    def temp_files(self, paths: Paths, upload_id: str, now: float) -> None:
        """Remove old C{.*.tmp} files of an upload that stays, under its lock."""
        stale = []
        for entry, st in _entries(paths.dir):
            if (entry.startswith(".") and entry.endswith(".tmp")
                    and stat.S_ISREG(st.st_mode)
                    and now - st.st_mtime >= self.report.older_than):
                stale.append(entry)
        if not stale:
            return
        lock = self.lock(paths, upload_id)
        if lock is False:
            return  # its writer may be renaming one right now; next time
        try:
            for entry in stale:
                path = os.path.join(paths.dir, entry)
                st = _lstat(path)
                if st is None:
                    continue
                if not self.report.dry_run:
                    try:
                        os.unlink(path)
                    except FileNotFoundError:
                        continue
                self.removed(GcEntry(
                    upload_id, f"{paths.rel}/{entry}",
                    st.st_size if st.st_nlink <= 1 else 0,
                    now - st.st_mtime, STRAY_TEMP,
                ))
        except OSError as e:
            self.error(upload_id, "", e)
        finally:
            if lock:
                lock.release()

    def put_file(self, incoming: str, entry: str) -> None:
        """A file C{incoming/<key>.put} of the one-step store (L{collect_put})."""
        r = self.report
        try:
            judged = collect_put(incoming, entry, r.now, r.older_than,
                                 r.completed_records_older_than, r.dry_run)
        except OSError as e:
            self.error(entry, f"incoming/{entry}", e)
            return
        if judged is None:
            return
        action, age, size = judged
        gc_entry = GcEntry(entry.partition(".")[0], f"incoming/{entry}", size, age, action)
        if action in (EXPIRED_PUT, EXPIRED_PUT_RECORD):
            self.removed(gc_entry)
        elif action == BUSY:
            r.skipped_busy.append(gc_entry)
        else:
            r.kept.append(gc_entry)

    # -- scratch directories of the self-test ------------------------------

    def scratch_dirs(self) -> None:
        min_age = max(self.report.older_than, SCRATCH_MIN_AGE)
        for entry, st in _entries(self.root):
            if not (entry.startswith(SCRATCH_PREFIX) and stat.S_ISDIR(st.st_mode)):
                continue
            path = os.path.join(self.root, entry)
            newest = max([st.st_mtime, *(s.st_mtime for _, s in _entries(path))])
            age = self.report.now - newest
            if age < min_age:
                continue
            size = _held_bytes(path)
            if not self.report.dry_run:
                try:
                    shutil.rmtree(path)
                except OSError as e:
                    self.error(entry, entry, e)
                    continue
            self.removed(GcEntry(entry, entry, size, age, STALE_SCRATCH))


# ---------------------------------------------------------------------------
# Helpers


def _name(meta: dict[str, Any] | None) -> str:
    return meta["name"] if meta else ""


def _lstat(path: str) -> os.stat_result | None:
    try:
        return os.lstat(path)
    except FileNotFoundError:
        return None


def _entries(directory: str) -> Iterator[tuple[str, os.stat_result]]:
    """The entries of C{directory} with their lstat; nothing if it is gone."""
    try:
        names = os.listdir(directory)
    except (FileNotFoundError, NotADirectoryError):
        return
    for name in names:
        st = _lstat(os.path.join(directory, name))
        if st is not None:
            yield name, st


def _touched(paths: Paths, incomplete: bool) -> float:
    """
    When an upload was last touched: the newest mtime of its record, data,
    journal, lease and takeover request.  For a directory without
    C{meta.json}, the newest of the directory and everything in it.
    """
    times = []
    if incomplete:
        st = _lstat(paths.dir)
        if st is not None:
            times.append(st.st_mtime)
        times.extend(st.st_mtime for _, st in _entries(paths.dir))
    else:
        for name in _TOUCH_FILES:
            st = _lstat(os.path.join(paths.dir, name))
            if st is not None:
                times.append(st.st_mtime)
    return max(times, default=0.0)


def _held_bytes(directory: str) -> int:
    """
    Bytes removing C{directory}'s regular files would free: files with no
    other link (the data file of a completion that was interrupted is also
    the completed file, so it frees nothing).
    """
    total = 0
    for _, st in _entries(directory):
        if stat.S_ISREG(st.st_mode) and st.st_nlink <= 1:
            total += st.st_size
    return total

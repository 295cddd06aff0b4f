# -*- test-case-name: tests.client.test_journal -*-
"""
The client's local journal: which upload id holds the residual of which
local file, and which files an earlier run already completed, so that
running the same command again after the client died resumes instead of
starting over (as tus clients keep a fingerprint store), and confirms the
finished files instead of sending them again.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
import threading
import time
from typing import Any, Mapping

from imgresume.client._source import Fingerprint


def default_journal_path() -> str:
    """C{$XDG_STATE_HOME/imgresume/journal.json}, or under C{~/.local/state}."""
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(
        os.path.expanduser("~"), ".local", "state"
    )
    return os.path.join(base, "imgresume", "journal.json")


def journal_key(fingerprint: Fingerprint, endpoint: str, name: str) -> str:
    """One entry per local file version, destination and remote name."""
    raw = json.dumps(
        [endpoint, name, fingerprint.path, fingerprint.size, fingerprint.mtime_ns,
         fingerprint.inode, fingerprint.device]
    ).encode()
    return hashlib.sha256(raw).hexdigest()


def journal_entry(upload_id: str, sha256: str | None, complete: bool = False) -> dict[str, Any]:
    """
    An entry as the journal stores it: the upload id, the file's SHA-256
    (hex; None while an upload whose digest goes at the end is unfinished),
    the time of writing and, once the server confirmed the upload verified
    and in place, C{"complete": True}.
    """
    entry: dict[str, Any] = {"upload_id": upload_id, "sha256": sha256, "updated": time.time()}
    if complete:
        entry["complete"] = True
    return entry


def _well_formed(entry: Any) -> bool:
    """Whether a journal entry is usable (a damaged one is dropped, not trusted)."""
    return (
        isinstance(entry, dict)
        and isinstance(entry.get("upload_id"), str)
        and re.fullmatch(r"[0-9a-f]{32}", entry["upload_id"]) is not None
        and (
            isinstance(entry.get("sha256"), str)
            and re.fullmatch(r"[0-9a-f]{64}", entry["sha256"]) is not None
            or entry.get("sha256") is None and not entry.get("complete", False)
        )
        and isinstance(entry.get("updated"), (int, float))
        and isinstance(entry.get("complete", False), bool)
    )


class Journal:
    """
    A small JSON file of uploads: unfinished ones (to resume them) and
    completed ones (so that a rerun does not send them again).  Called by
    the uploader from worker threads (every method does file I/O); the
    methods are thread-safe within one process.

    Entries older than C{max_age} seconds are dropped when the journal is
    written, and so are the oldest completed entries beyond
    C{max_completed}.  The parsed file is kept in memory while no other
    process replaces it, so that looking up many files reads it once.
    """

    def __init__(self, path: str, max_age: float = 30 * 86400,
                 max_completed: int = 10_000) -> None:
        self.path = path
        self.max_age = max_age
        self.max_completed = max_completed
        self._lock = threading.Lock()
        self._cache: tuple[tuple[int, int, int], dict[str, Any]] | None = None

    @staticmethod
    def _signature(st: os.stat_result) -> tuple[int, int, int]:
        return (st.st_ino, st.st_size, st.st_mtime_ns)

    def _load(self) -> dict[str, Any]:
        try:
            with open(self.path, "rb") as f:
                signature = self._signature(os.fstat(f.fileno()))
                if self._cache is not None and self._cache[0] == signature:
                    return self._cache[1]
                data = json.loads(f.read().decode("utf-8"))
        except FileNotFoundError:
            return {}
        except (OSError, ValueError):
            return {}  # an unreadable journal only costs a resume
        if not isinstance(data, dict):
            return {}
        data = {k: v for k, v in data.items() if _well_formed(v)}
        self._cache = (signature, data)
        return data

    def _store(self, data: dict[str, Any]) -> None:
        now = time.time()
        data = {k: v for k, v in data.items() if now - v.get("updated", 0) < self.max_age}
        completed = sorted((v["updated"], k) for k, v in data.items() if v.get("complete"))
        for _, key in completed[: max(0, len(completed) - self.max_completed)]:
            del data[key]
        directory = os.path.dirname(self.path) or "."
        os.makedirs(directory, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".journal-", dir=directory)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(data, f, indent=1, sort_keys=True)
                f.flush()
                os.fsync(f.fileno())
                signature = self._signature(os.fstat(f.fileno()))
            os.replace(tmp, self.path)
        except BaseException:
            os.unlink(tmp)
            raise
        self._cache = (signature, data)

    def upload_ids(self) -> list[str]:
        """The upload ids of every unfinished upload in the journal."""
        with self._lock:
            entries = self._load().values()
            return sorted({e["upload_id"] for e in entries if not e.get("complete")})

    def lookup(self, key: str) -> dict[str, Any] | None:
        """
        The entry for C{key}, or None: C{upload_id}, C{sha256} (hex),
        C{updated}, and C{complete} (True) if the upload was completed.
        """
        with self._lock:
            entry = self._load().get(key)
            return dict(entry) if entry is not None else None

    def remember(self, key: str, upload_id: str, sha256: str, complete: bool = False) -> None:
        """Record that C{upload_id} holds the residual (or, if C{complete}, the file) for C{key}."""
        self.update({key: journal_entry(upload_id, sha256, complete)})

    def forget(self, key: str) -> None:
        """Drop the entry (its upload cannot be resumed, or is not this file's)."""
        self.update({key: None})

    def update(self, changes: Mapping[str, dict[str, Any] | None]) -> None:
        """
        Apply several changes in one write: each key gets its new entry
        (from L{journal_entry}), or loses it for None.  Nothing is written
        when nothing changes.
        """
        with self._lock:
            data = dict(self._load())
            changed = False
            for key, entry in changes.items():
                if entry is None:
                    changed |= data.pop(key, None) is not None
                else:
                    data[key] = entry
                    changed = True
            if changed:
                self._store(data)

# -*- test-case-name: tests.test_client_journal -*-
"""
The client's local journal: which upload id holds the residual of which
local file, so that running the same command again after the client died
resumes instead of starting over (as tus clients keep a fingerprint store).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
import time
from typing import Any

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


def _well_formed(entry: Any) -> bool:
    """Whether a journal entry is usable (a damaged one is dropped, not trusted)."""
    return (
        isinstance(entry, dict)
        and isinstance(entry.get("upload_id"), str)
        and re.fullmatch(r"[0-9a-f]{32}", entry["upload_id"]) is not None
        and isinstance(entry.get("sha256"), str)
        and re.fullmatch(r"[0-9a-f]{64}", entry["sha256"]) is not None
        and isinstance(entry.get("updated"), (int, float))
    )


class Journal:
    """
    A small JSON file of unfinished uploads.  Called by the uploader from a
    worker thread (every method does file I/O).  Entries older than
    C{max_age} seconds are dropped when it is written.
    """

    def __init__(self, path: str, max_age: float = 30 * 86400) -> None:
        self.path = path
        self.max_age = max_age

    def _load(self) -> dict[str, Any]:
        try:
            with open(self.path, encoding="utf-8") as f:
                data = json.load(f)
        except FileNotFoundError:
            return {}
        except (OSError, ValueError):
            return {}  # an unreadable journal only costs a resume
        if not isinstance(data, dict):
            return {}
        return {k: v for k, v in data.items() if _well_formed(v)}

    def _store(self, data: dict[str, Any]) -> None:
        now = time.time()
        data = {k: v for k, v in data.items() if now - v.get("updated", 0) < self.max_age}
        directory = os.path.dirname(self.path) or "."
        os.makedirs(directory, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".journal-", dir=directory)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(data, f, indent=1, sort_keys=True)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            os.unlink(tmp)
            raise

    def upload_ids(self) -> list[str]:
        """The upload ids of every unfinished upload in the journal."""
        return sorted({entry["upload_id"] for entry in self._load().values()})

    def lookup(self, key: str) -> dict[str, Any] | None:
        """The entry for C{key}: C{upload_id} and C{sha256} (hex), or None."""
        return self._load().get(key)

    def remember(self, key: str, upload_id: str, sha256: str) -> None:
        """Record that C{upload_id} holds the residual for C{key}."""
        data = self._load()
        data[key] = {"upload_id": upload_id, "sha256": sha256, "updated": time.time()}
        self._store(data)

    def forget(self, key: str) -> None:
        """Drop the entry (the upload completed or cannot be resumed)."""
        data = self._load()
        if data.pop(key, None) is not None:
            self._store(data)

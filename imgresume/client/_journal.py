# -*- test-case-name: tests.client.test_journal,tests.client.test_journal_log -*-
"""
The client's local journal: which upload id holds the residual of which
local file, and which files an earlier run already completed, so that
running the same command again after the client died resumes instead of
starting over (as tus clients keep a fingerprint store), and confirms the
finished files instead of sending them again.

The file is a log of JSON lines: a header naming the format and its
version, then one record per change (C{{"key": K, "entry": {...}}}, or
C{"entry": null} for a forgotten key), appended.  An entry names the
algorithm of its digest (C{"digest"}); one from before entries did is read
with its algorithm unknown (L{entry_digest}).  Reading replays the
records; a record cut short by a crash (the last line, without its
newline) or otherwise damaged is skipped.  When dead records (replaced,
forgotten or expired) outnumber the live ones, the file is rewritten with
the live entries only (a temporary file, flushed, renamed into place), so
its size, and what each change costs, stays proportional to what it holds.
A journal in the format before this one (one JSON object, rewritten whole
at each change) is read, and rewritten in this format at the first change.

Durability: a record that names an unfinished upload's id (or forgets an
entry) is flushed (C{fdatasync}) before L{Journal.update} returns: the
upload is not ended before that (see L{imgresume.client.UploadSession}),
so a file the server completed can always be found again, even after a
power loss.  A record that only marks an upload complete is written but
not flushed: losing it costs one RESUME that the server answers with
COMPLETED, never a byte sent twice.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
import threading
import time
from typing import Any, Iterable, Mapping

from imgresume.client._portable import OPEN_FLAGS, flush_data, fsync_directory
from imgresume.client._source import Fingerprint

#: The first line of a journal file in this format (version 2; version 1
#: was one JSON object, without a header).
HEADER = b'{"imgresume-journal": 2}\n'

#: Dead records tolerated before the file is rewritten, however few live
#: entries it has.
COMPACT_MIN_DEAD = 64


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


def journal_entry(upload_id: str, sha256: str | None, complete: bool = False,
                  digest: str | None = None) -> dict[str, Any]:
    """
    An entry as the journal stores it: the upload id, the file's digest
    (hex, under the historical key C{"sha256"}; None while an upload whose
    digest goes at the end is unfinished), C{"digest"}, the upload's digest
    algorithm (a name of L{imgresume.integrity.DIGESTS}; left out when the
    caller does not know it), the time of writing and, once the server
    confirmed the upload verified and in place, C{"complete": True}.
    """
    entry: dict[str, Any] = {"upload_id": upload_id, "sha256": sha256, "updated": time.time()}
    if digest is not None:
        entry["digest"] = digest
    if complete:
        entry["complete"] = True
    return entry


def entry_digest(entry: Mapping[str, Any]) -> str | None:
    """
    The algorithm of an entry's digest, or None when its record does not
    name one: records written before they did hold SHA-256 (before the
    digest was negotiated) or BLAKE3 (after), so such a digest is never
    taken to be in any algorithm in particular.
    """
    return entry.get("digest")


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
        and isinstance(entry.get("digest", ""), str)
    )


def _record(key: str, entry: dict[str, Any] | None) -> bytes:
    """One change as a line of the file."""
    return json.dumps({"entry": entry, "key": key}, separators=(",", ":"),
                      sort_keys=True).encode() + b"\n"


def _parse_lines(lines: list[bytes]) -> list[Any]:
    """
    The JSON values of C{lines}, None for a damaged one; one parse for the
    lot while none is damaged.
    """
    lines = [line for line in lines if line.strip()]
    try:
        values = json.loads(b"[" + b",".join(lines) + b"]")
    except ValueError:
        values = []
        for line in lines:
            try:
                values.append(json.loads(line))
            except ValueError:
                values.append(None)
    return values if isinstance(values, list) and len(values) == len(lines) else [None] * len(lines)


class Journal:
    """
    A small log file of uploads: unfinished ones (to resume them) and
    completed ones (so that a rerun does not send them again).  Called by
    the uploader from worker threads (every method does file I/O); the
    methods are thread-safe within one process.

    Entries older than C{max_age} seconds are dropped when the file is read
    and when it is rewritten, and so are the oldest completed entries
    beyond C{max_completed}.  The entries are kept in memory; each call
    checks (one C{stat}) whether another process appended to or replaced
    the file, and reads only what it added.
    """

    def __init__(self, path: str, max_age: float = 30 * 86400,
                 max_completed: int = 10_000) -> None:
        self.path = path
        self.max_age = max_age
        self.max_completed = max_completed
        self._lock = threading.Lock()
        #: The live entries, once read.
        self._entries: dict[str, dict[str, Any]] | None = None
        #: The file read: (device, inode), and how many of its bytes.
        self._identity: tuple[int, int] | None = None
        self._size_seen = 0
        #: Where its last whole line ends, and whether bytes follow it.
        self._offset = 0
        self._torn = False
        #: Records in the file (live or dead); whether it must be rewritten
        #: before anything is appended (absent, old format, damaged header).
        self._records = 0
        self._rewrite = True

    # Reading

    def _load(self) -> dict[str, dict[str, Any]]:
        """The live entries, with what the file gained since it was last read."""
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            self._reset()
            return self._entries  # type: ignore[return-value]
        except OSError:
            self._reset()  # an unreadable journal only costs a resume
            return self._entries  # type: ignore[return-value]
        identity = (st.st_dev, st.st_ino)
        if self._entries is not None and identity == self._identity:
            if st.st_size == self._size_seen:
                return self._entries
            if st.st_size > self._offset and not self._rewrite:
                self._read_from(self._offset, st.st_size)
                return self._entries
        self._read_whole(identity)
        return self._entries  # type: ignore[return-value]

    def _reset(self) -> None:
        self._entries, self._identity = {}, None
        self._size_seen = self._offset = self._records = 0
        self._torn, self._rewrite = False, True

    def _read_whole(self, identity: tuple[int, int]) -> None:
        self._reset()
        try:
            with open(self.path, "rb") as f:
                data = f.read()
        except OSError:
            return
        self._identity, self._size_seen = identity, len(data)
        if data.startswith(HEADER):
            self._rewrite = False
            self._offset = len(HEADER)
            self._apply_data(data[len(HEADER):])
        else:
            self._entries = self._old_format(data)
        self._prune()

    def _read_from(self, offset: int, size: int) -> None:
        """Apply what was appended after C{offset} (another process's records)."""
        try:
            with open(self.path, "rb") as f:
                f.seek(offset)
                data = f.read(size - offset)
        except OSError:
            return
        self._size_seen = offset + len(data)
        self._apply_data(data)

    def _apply_data(self, data: bytes) -> None:
        """Replay the whole lines of C{data}, read at C{_offset}."""
        entries = self._entries
        assert entries is not None
        end = data.rfind(b"\n") + 1
        self._torn = end < len(data)
        if not end:
            return
        self._offset += end
        for value in _parse_lines(data[:end].split(b"\n")):
            self._records += 1
            if not isinstance(value, dict) or not isinstance(value.get("key"), str):
                continue
            entry = value.get("entry")
            if entry is None:
                entries.pop(value["key"], None)
            elif _well_formed(entry):
                entries.pop(value["key"], None)  # keep the order of change
                entries[value["key"]] = entry

    @staticmethod
    def _old_format(data: bytes) -> dict[str, dict[str, Any]]:
        """The entries of a journal written before the log format (one JSON object)."""
        try:
            old = json.loads(data.decode("utf-8"))
        except ValueError:
            return {}  # damaged: rewritten at the next change
        if not isinstance(old, dict):
            return {}
        return dict(sorted(
            ((k, v) for k, v in old.items() if isinstance(k, str) and _well_formed(v)),
            key=lambda kv: kv[1]["updated"]))

    def _prune(self) -> None:
        """Drop expired entries, and the oldest completed ones beyond the cap."""
        entries = self._entries
        assert entries is not None
        now = time.time()
        for key in [k for k, v in entries.items() if now - v["updated"] >= self.max_age]:
            del entries[key]
        completed = sorted((v["updated"], k) for k, v in entries.items() if v.get("complete"))
        for _, key in completed[: max(0, len(completed) - self.max_completed)]:
            del entries[key]

    # Writing

    def _append(self, lines: list[bytes], flush: bool) -> None:
        """Append C{lines} in one write; flush them if C{flush}."""
        payload = b"".join(lines)
        if self._torn:
            payload = b"\n" + payload  # the torn line stays a damaged line of its own
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | OPEN_FLAGS)
        try:
            written = 0
            while written < len(payload):
                written += os.write(fd, payload[written:])
            if flush:
                flush_data(fd)
        except BaseException:
            self._size_seen = -1  # read again before the next change
            raise
        finally:
            os.close(fd)
        self._size_seen += len(payload)
        self._offset = self._size_seen
        self._torn = False
        self._records += len(lines)

    def _compact(self, entries: Mapping[str, dict[str, Any]]) -> None:
        """Replace the file with one holding C{entries} only."""
        directory = os.path.dirname(self.path) or "."
        os.makedirs(directory, exist_ok=True)
        payload = HEADER + b"".join(_record(k, v) for k, v in entries.items())
        fd, tmp = tempfile.mkstemp(prefix=".journal-", dir=directory)
        try:
            written = 0
            while written < len(payload):
                written += os.write(fd, payload[written:])
            os.fsync(fd)
            st = os.fstat(fd)
            os.close(fd)
            fd = -1
            os.replace(tmp, self.path)
        except BaseException:
            if fd >= 0:
                os.close(fd)
            os.unlink(tmp)
            raise
        fsync_directory(directory)
        self._identity = (st.st_dev, st.st_ino)
        self._size_seen = self._offset = len(payload)
        self._records, self._torn, self._rewrite = len(entries), False, False

    # The API

    def upload_ids(self) -> list[str]:
        """The upload ids of every unfinished upload in the journal."""
        with self._lock:
            entries = self._load().values()
            return sorted({e["upload_id"] for e in entries if not e.get("complete")})

    def entries(self) -> dict[str, dict[str, Any]]:
        """Every entry, by key (a copy; what L{lookup} would give for each)."""
        with self._lock:
            return {k: dict(v) for k, v in self._load().items()}

    def lookup(self, key: str) -> dict[str, Any] | None:
        """
        The entry for C{key}, or None: C{upload_id}, C{sha256} (hex: the
        digest, in the algorithm L{entry_digest} names), C{digest} (absent
        from older records), C{updated}, and C{complete} (True) if the upload
        was completed.
        """
        with self._lock:
            entry = self._load().get(key)
            return dict(entry) if entry is not None else None

    def remember(self, key: str, upload_id: str, sha256: str, complete: bool = False,
                 digest: str | None = None) -> None:
        """
        Record that C{upload_id} holds the residual (or, if C{complete}, the
        file) for C{key}, and that its digest C{sha256} is in C{digest}.
        """
        self.update({key: journal_entry(upload_id, sha256, complete, digest)})

    def forget(self, key: str) -> None:
        """Drop the entry (its upload cannot be resumed, or is not this file's)."""
        self.update({key: None})

    def update(self, changes: Mapping[str, dict[str, Any] | None]) -> None:
        """
        Apply several changes in one write: each key gets its new entry
        (from L{journal_entry}), or loses it for None.  Nothing is written
        when nothing changes.  Flushed to disk before returning unless every
        change marks an upload complete (see the module's docstring).
        """
        with self._lock:
            entries = self._load()
            effective = {k: v for k, v in changes.items() if v is not None or k in entries}
            if not effective:
                return
            live = len(entries) + sum(
                (v is not None) - (k in entries) for k, v in effective.items())
            dead = self._records + len(effective) - live
            if self._rewrite or dead > max(live, COMPACT_MIN_DEAD):
                after = dict(entries)
                _apply(after, effective.items())
                self._entries = after
                self._prune()
                try:
                    self._compact(self._entries)
                except BaseException:
                    self._entries = entries
                    raise
                return
            self._append([_record(k, v) for k, v in effective.items()],
                         flush=any(v is None or not v.get("complete")
                                   for v in effective.values()))
            _apply(entries, effective.items())


def _apply(entries: dict[str, dict[str, Any]],
           changes: Iterable[tuple[str, dict[str, Any] | None]]) -> None:
    for key, entry in changes:
        entries.pop(key, None)
        if entry is not None:
            entries[key] = entry

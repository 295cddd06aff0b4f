# -*- test-case-name: tests.client.test_journal -*-
"""
Tests for L{imgresume.client._journal}: the client's journal of
unfinished and completed uploads (remember, look up, forget, several
changes in one write, failed writes, damaged files, pruning, the
parsed file kept while unchanged), the keys that tie an entry to one
version of one local file, one destination and one remote name, and
L{JournalQueue}, which groups the uploader's changes into few writes.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import attrs
from twisted.internet.defer import maybeDeferred
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from imgresume.client import Journal, Uploader, default_journal_path
from imgresume.client._journal import HEADER, entry_digest, journal_entry, journal_key
from imgresume.client._journal_queue import JournalQueue
from imgresume.client._source import Fingerprint
from tests.support.runners import QueuedRunner

UPLOAD_ID = "0123456789abcdef0123456789abcdef"
OTHER_ID = "fedcba9876543210fedcba9876543210"
SHA = "ab" * 32


class JournalTests(SynchronousTestCase):
    """L{Journal} on a real file in the test's temporary directory."""

    def setUp(self) -> None:
        self.directory = os.path.abspath(self.mktemp())
        self.path = os.path.join(self.directory, "state", "journal.json")
        self.journal = Journal(self.path)

    def read(self) -> Any:
        """
        The journal file's entries: its records replayed (or, for a file in
        the format before the log, the JSON object it holds).
        """
        with open(self.path, "rb") as f:
            data = f.read()
        if not data.startswith(HEADER):
            return json.loads(data)
        entries: dict[str, Any] = {}
        for line in data[len(HEADER):].splitlines():
            record = json.loads(line)
            entries.pop(record["key"], None)
            if record["entry"] is not None:
                entries[record["key"]] = record["entry"]
        return entries

    def write(self, data: Any) -> None:
        """Write the journal file: C{data} as JSON, or a string as is."""
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        with open(self.path, "w", encoding="utf-8") as f:
            f.write(data if isinstance(data, str) else json.dumps(data))

    def test_lookup_without_file(self) -> None:
        """A journal whose file does not exist yet is empty."""
        self.assertIsNone(self.journal.lookup("k"))
        self.assertFalse(os.path.exists(self.path))

    def test_remember_lookup_forget(self) -> None:
        """An entry remembered is found, by any Journal on the file, until forgotten."""
        before = time.time()
        self.journal.remember("k", UPLOAD_ID, SHA)
        entry = Journal(self.path).lookup("k")
        assert entry is not None
        self.assertEqual(entry["upload_id"], UPLOAD_ID)
        self.assertEqual(entry["sha256"], SHA)
        self.assertGreaterEqual(entry["updated"], before)
        self.assertIsNone(self.journal.lookup("other"))
        self.journal.forget("k")
        self.assertIsNone(self.journal.lookup("k"))
        self.assertEqual(self.read(), {})

    def test_remember_replaces(self) -> None:
        """Remembering a key again replaces its entry; other keys stay."""
        self.journal.remember("k", UPLOAD_ID, SHA)
        self.journal.remember("j", UPLOAD_ID, SHA)
        self.journal.remember("k", OTHER_ID, SHA)
        self.assertEqual(self.journal.lookup("k")["upload_id"], OTHER_ID)
        self.assertEqual(self.journal.lookup("j")["upload_id"], UPLOAD_ID)

    def test_forget_unknown_key(self) -> None:
        """Forgetting a key that is not there writes nothing."""
        self.journal.forget("k")
        self.assertFalse(os.path.exists(self.path))

    def test_no_temporary_files_left(self) -> None:
        """Each write replaces the file atomically: only journal.json remains."""
        for i in range(5):
            self.journal.remember(f"k{i}", UPLOAD_ID, SHA)
        self.journal.forget("k0")
        self.assertEqual(os.listdir(os.path.dirname(self.path)), ["journal.json"])
        self.assertEqual(sorted(self.read()), ["k1", "k2", "k3", "k4"])

    def test_failed_write_keeps_old_file(self) -> None:
        """
        If a change cannot be written (an append fails, or the rewritten
        file cannot be put in place), the journal keeps what it held, in
        the file and in memory, no temporary file is left and the error
        propagates.
        """
        self.journal.remember("k", UPLOAD_ID, SHA)

        def no_space(*args: Any) -> None:
            raise OSError(28, "No space left on device")

        patched = self.patch(os, "write", no_space)
        self.assertRaises(OSError, self.journal.remember, "j", OTHER_ID, SHA)
        patched.restore()
        self.assertIsNone(self.journal.lookup("j"))
        self.assertEqual(os.listdir(os.path.dirname(self.path)), ["journal.json"])
        self.assertEqual(list(self.read()), ["k"])

        # A journal in the format before the log is rewritten at its first change.
        self.write({"k": journal_entry(UPLOAD_ID, SHA)})
        journal = Journal(self.path)
        patched = self.patch(os, "replace", no_space)
        self.assertRaises(OSError, journal.remember, "j", OTHER_ID, SHA)
        patched.restore()
        self.assertIsNone(journal.lookup("j"))
        self.assertEqual(os.listdir(os.path.dirname(self.path)), ["journal.json"])
        self.assertEqual(list(self.read()), ["k"])
        journal.remember("j", OTHER_ID, SHA)
        self.assertEqual(sorted(self.read()), ["j", "k"])

    def test_corrupt_file(self) -> None:
        """A journal that is not JSON reads as empty and is overwritten by the next write."""
        self.write('{"k": {"upload_id": "0123')
        self.assertIsNone(self.journal.lookup("k"))
        self.journal.remember("j", UPLOAD_ID, SHA)
        self.assertEqual(list(self.read()), ["j"])

    def test_not_utf8(self) -> None:
        """A journal of binary garbage reads as empty."""
        os.makedirs(os.path.dirname(self.path))
        with open(self.path, "wb") as f:
            f.write(b"\xff\xfe\x00garbage")
        self.assertIsNone(self.journal.lookup("k"))

    def test_not_an_object(self) -> None:
        """A journal that is JSON but not an object reads as empty."""
        self.write("[1, 2, 3]")
        self.assertIsNone(self.journal.lookup("k"))

    def test_damaged_entries_dropped(self) -> None:
        """
        Entries of the wrong shape (not an object, missing or malformed
        fields) are ignored and dropped on the next write; good ones stay.
        """
        good = {"upload_id": UPLOAD_ID, "sha256": SHA, "updated": time.time()}
        self.write({
            "good": good,
            "string": "garbage",
            "missing": {"upload_id": UPLOAD_ID},
            "bad-hex": dict(good, sha256="zz" * 32),
            "bad-id": dict(good, upload_id="../../etc"),
            "bad-time": dict(good, updated="yesterday"),
        })
        self.assertEqual(self.journal.lookup("good"), good)
        for key in ("string", "missing", "bad-hex", "bad-id", "bad-time"):
            self.assertIsNone(self.journal.lookup(key), key)
        self.journal.remember("new", OTHER_ID, SHA)
        self.assertEqual(sorted(self.read()), ["good", "new"])

    def test_old_entries_pruned(self) -> None:
        """Entries older than max_age are dropped when the journal is written."""
        now = time.time()
        self.write({
            "old": {"upload_id": UPLOAD_ID, "sha256": SHA, "updated": now - 3600},
            "recent": {"upload_id": UPLOAD_ID, "sha256": SHA, "updated": now - 60},
        })
        journal = Journal(self.path, max_age=600)
        journal.remember("new", OTHER_ID, SHA)
        self.assertEqual(sorted(self.read()), ["new", "recent"])

    def test_complete_entries(self) -> None:
        """
        An entry remembered complete is found with C{complete: True}; the
        unfinished uploads (what C{imgresume status} asks about) leave it out.
        """
        self.journal.remember("done", UPLOAD_ID, SHA, complete=True)
        self.journal.remember("partial", OTHER_ID, SHA)
        self.assertIs(self.journal.lookup("done")["complete"], True)
        self.assertNotIn("complete", self.journal.lookup("partial"))
        self.assertEqual(Journal(self.path).upload_ids(), [OTHER_ID])

    def test_update_is_one_write(self) -> None:
        """update() applies several changes, additions and removals, in one write."""
        self.journal.remember("gone", UPLOAD_ID, SHA)
        writes: list[int] = []
        real_write = os.write
        self.patch(os, "write", lambda fd, data: writes.append(fd) or real_write(fd, data))
        self.journal.update({"a": journal_entry(UPLOAD_ID, SHA),
                             "b": journal_entry(OTHER_ID, SHA, complete=True), "gone": None})
        self.assertEqual(len(writes), 1)
        self.assertEqual(sorted(self.read()), ["a", "b"])
        self.assertIs(self.read()["b"]["complete"], True)

    def test_completed_entries_capped(self) -> None:
        """
        Beyond max_completed completed entries, the oldest ones are dropped
        when the journal is written; unfinished entries are never dropped
        for it.
        """
        now = time.time()
        self.write({
            **{f"done-{i}": dict(journal_entry(UPLOAD_ID, SHA, complete=True),
                                 updated=now - 100 + i) for i in range(4)},
            "partial": dict(journal_entry(OTHER_ID, SHA), updated=now - 1000),
        })
        journal = Journal(self.path, max_completed=3)
        journal.remember("done-new", OTHER_ID, SHA, complete=True)
        self.assertEqual(sorted(self.read()), ["done-2", "done-3", "done-new", "partial"])

    def test_digest_unknown_until_complete(self) -> None:
        """
        An unfinished upload whose digest goes at the end has none in the
        journal (null); a complete entry without one is damaged: ignored.
        """
        self.write({
            "late": journal_entry(UPLOAD_ID, None),
            "done": journal_entry(OTHER_ID, None, complete=True),
        })
        self.assertIsNone(self.journal.lookup("late")["sha256"])
        self.assertIsNone(self.journal.lookup("done"))

    def test_digest_algorithm_recorded(self) -> None:
        """
        An entry names the algorithm of its digest (C{"digest"}), in its
        record; an entry without a digest yet names the upload's all the same.
        """
        self.journal.remember("k", UPLOAD_ID, SHA, digest="blake3")
        self.journal.update({"late": journal_entry(OTHER_ID, None, digest="sha256")})
        self.assertEqual(Journal(self.path).lookup("k")["digest"], "blake3")
        self.assertEqual(self.read()["k"]["digest"], "blake3")
        late = self.read()["late"]
        self.assertEqual((late["digest"], late["sha256"]), ("sha256", None))

    def test_record_without_digest_algorithm(self) -> None:
        """
        A record from before records named their digest's algorithm is
        read as it is: its algorithm is unknown (SHA-256 before negotiation,
        BLAKE3 after), never guessed; a record naming no string is damaged.
        """
        old = {"upload_id": UPLOAD_ID, "sha256": SHA, "updated": time.time()}
        self.write({"old": old, "bad": dict(old, digest=5)})
        entry = self.journal.lookup("old")
        self.assertEqual(entry, old)
        self.assertIsNone(entry_digest(entry))
        self.assertEqual(entry_digest(journal_entry(UPLOAD_ID, SHA, digest="sha256")),
                         "sha256")
        self.assertIsNone(self.journal.lookup("bad"))

    def test_bad_complete_flag_dropped(self) -> None:
        """An entry whose C{complete} is not a boolean is damaged: ignored."""
        self.write({"k": dict(journal_entry(UPLOAD_ID, SHA), complete="yes")})
        self.assertIsNone(self.journal.lookup("k"))

    def test_parsed_once_while_unchanged(self) -> None:
        """
        Lookups parse the file once while it does not change, also after
        this journal's own writes; a write by another Journal is seen.
        """
        self.journal.remember("k", UPLOAD_ID, SHA)
        parsed: list[int] = []
        real_loads = json.loads
        self.patch(json, "loads", lambda text: parsed.append(1) or real_loads(text))
        for _ in range(5):
            self.assertEqual(self.journal.lookup("k")["upload_id"], UPLOAD_ID)
        self.assertEqual(parsed, [])
        Journal(self.path).remember("k", OTHER_ID, SHA)
        self.assertEqual(self.journal.lookup("k")["upload_id"], OTHER_ID)
        self.assertEqual(len(parsed), 2)  # the other Journal's read, and this one's

    def test_default_max_age(self) -> None:
        """By default entries are kept for 30 days."""
        self.assertEqual(self.journal.max_age, 30 * 86400)

    def test_file_in_current_directory(self) -> None:
        """A bare file name (no directory part) works."""
        os.makedirs(self.directory)
        cwd = os.getcwd()
        os.chdir(self.directory)
        self.addCleanup(os.chdir, cwd)
        journal = Journal("journal.json")
        journal.remember("k", UPLOAD_ID, SHA)
        self.assertEqual(journal.lookup("k")["upload_id"], UPLOAD_ID)
        self.assertEqual(os.listdir(self.directory), ["journal.json"])


class JournalKeyTests(SynchronousTestCase):
    """L{journal_key}: one key per file version, destination and remote name."""

    FINGERPRINT = Fingerprint("/data/scan.tif", 1000, 1_700_000_000_000_000_000, 42, 7)

    def key(self, endpoint: str = "tcp:lb:7000", name: str = "scan.tif", **changes: Any) -> str:
        """The key for L{FINGERPRINT} with C{changes}, C{endpoint} and C{name}."""
        return journal_key(attrs.evolve(self.FINGERPRINT, **changes), endpoint, name)

    def test_stable(self) -> None:
        """The same inputs give the same key, a SHA-256 in hex."""
        self.assertEqual(self.key(), self.key())
        self.assertRegex(self.key(), r"\A[0-9a-f]{64}\Z")

    def test_differs(self) -> None:
        """Changing the mtime, size, path, inode, device, name or endpoint changes the key."""
        variants = [
            self.key(mtime_ns=self.FINGERPRINT.mtime_ns + 1),
            self.key(size=1001),
            self.key(path="/data/other.tif"),
            self.key(inode=43),
            self.key(device=8),
            self.key(name="scans/scan.tif"),
            self.key(endpoint="tcp:lb:7001"),
        ]
        self.assertEqual(len(set(variants + [self.key()])), len(variants) + 1)

    def test_no_ambiguity(self) -> None:
        """Fields cannot run into each other (name and endpoint are kept apart)."""
        self.assertNotEqual(self.key(endpoint="a:b", name="c"), self.key(endpoint="a", name="b:c"))


class DefaultPathTests(SynchronousTestCase):
    """Where the journal lives, and how L{Uploader} takes its C{journal} argument."""

    def test_xdg_state_home(self) -> None:
        """$XDG_STATE_HOME/imgresume/journal.json when the variable is set."""
        self.patch(os, "environ", {"XDG_STATE_HOME": "/var/state", "HOME": "/home/u"})
        self.assertEqual(default_journal_path(), "/var/state/imgresume/journal.json")

    def test_home(self) -> None:
        """~/.local/state/imgresume/journal.json otherwise (also when the variable is empty)."""
        for env in ({"HOME": "/home/u"}, {"HOME": "/home/u", "XDG_STATE_HOME": ""}):
            self.patch(os, "environ", env)
            self.assertEqual(
                default_journal_path(), "/home/u/.local/state/imgresume/journal.json"
            )

    def uploader(self, journal: Any) -> Uploader:
        """An Uploader on a fake clock with the given C{journal} argument."""
        return Uploader(
            TCP4ClientEndpoint(Clock(), "127.0.0.1", 1), reactor=Clock(),
            journal=journal, run=maybeDeferred,
        )

    def test_uploader_journal_argument(self) -> None:
        """
        Uploader takes a L{Journal}, a path, "default" (the default path)
        or None.
        """
        journal = Journal("/tmp/j.json")
        self.assertIs(self.uploader(journal).journal, journal)
        self.assertIsNone(self.uploader(None).journal)
        from_path = self.uploader("/tmp/other.json").journal
        assert isinstance(from_path, Journal)
        self.assertEqual(from_path.path, "/tmp/other.json")
        self.patch(os, "environ", {"XDG_STATE_HOME": "/var/state", "HOME": "/home/u"})
        default = self.uploader("default").journal
        assert isinstance(default, Journal)
        self.assertEqual(default.path, "/var/state/imgresume/journal.json")


class JournalQueueTests(SynchronousTestCase):
    """L{JournalQueue} with a runner whose "threads" the test finishes by hand."""

    def setUp(self) -> None:
        path = os.path.join(os.path.abspath(self.mktemp()), "journal.json")
        self.journal = Journal(path)
        self.runner = QueuedRunner()
        self.queue = JournalQueue(self.journal, self.runner)

    def test_changes_grouped(self) -> None:
        """
        While one write runs, later changes wait and go out together in the
        next; each change's Deferred fires once its write is done.
        """
        first = self.queue.remember("a", UPLOAD_ID, SHA)
        second = self.queue.remember("b", UPLOAD_ID, SHA)
        third = self.queue.complete("a", UPLOAD_ID, SHA)
        self.assertEqual(len(self.runner), 1)
        self.runner.step()
        self.successResultOf(first)
        self.assertNoResult(second)
        self.assertEqual(len(self.runner), 1)
        self.assertEqual(sorted(self.runner.calls[0][1][0]), ["a", "b"])
        self.runner.step()
        self.successResultOf(second)
        self.successResultOf(third)
        self.assertIs(self.journal.lookup("a")["complete"], True)
        self.assertEqual(self.runner.calls, [])

    def test_digest_algorithm_passed_on(self) -> None:
        """remember() and complete() record the algorithm of the digest they are given."""
        self.queue.remember("a", UPLOAD_ID, None, digest="blake3")
        self.queue.complete("b", UPLOAD_ID, SHA, digest="sha256")
        self.runner.step()
        self.runner.step()
        self.assertEqual((self.journal.lookup("a")["digest"], self.journal.lookup("b")["digest"]),
                         ("blake3", "sha256"))

    def test_lookup_sees_changes_not_written(self) -> None:
        """
        A lookup answers from changes still queued or being written, without
        reading the file; other keys are read from the file.
        """
        self.queue.remember("a", UPLOAD_ID, SHA)
        self.queue.forget("b")
        self.assertEqual(self.successResultOf(self.queue.lookup("a"))["upload_id"], UPLOAD_ID)
        self.assertIsNone(self.successResultOf(self.queue.lookup("b")))
        d = self.queue.lookup("c")
        self.assertEqual(len(self.runner), 2)  # the write, and the lookup
        self.runner.step()
        self.runner.step()
        self.assertIsNone(self.successResultOf(d))

    def test_failed_write(self) -> None:
        """
        A write that fails fails the Deferreds of its changes; the changes
        queued behind it are written next all the same.
        """
        def broken(*args: Any) -> None:
            raise OSError(28, "No space left on device")

        self.patch(self.journal, "update", broken)
        failed = self.queue.remember("a", UPLOAD_ID, SHA)
        later = self.queue.remember("b", UPLOAD_ID, SHA)
        self.runner.step()
        self.failureResultOf(failed, OSError)
        self.assertNoResult(later)
        self.assertEqual(len(self.runner), 1)

    def test_flushed(self) -> None:
        """
        flushed() fires at once with nothing queued, else once every change
        queued so far is written, the ones queued behind a write included.
        """
        self.successResultOf(self.queue.flushed())
        self.queue.remember("a", UPLOAD_ID, SHA)
        self.queue.remember("b", UPLOAD_ID, SHA)
        flushed = self.queue.flushed()
        self.runner.step()
        self.assertNoResult(flushed)
        self.runner.step()
        self.successResultOf(flushed)
        self.assertEqual(self.journal.lookup("b")["upload_id"], UPLOAD_ID)

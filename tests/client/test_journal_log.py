# -*- test-case-name: tests.client.test_journal_log -*-
"""
Tests for the file format of L{imgresume.client._journal}: a log of JSON
lines after a version header, replayed when read; a record torn by a crash
skipped; the file rewritten when dead records outnumber live ones; a
journal of the format before the log read and converted; which records are
flushed; and, over 10,000 files, a cost per file (writes, bytes, flushes)
that does not grow with the batch.
"""

from __future__ import annotations

import json
import os
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from imgresume.client import Journal
from imgresume.client._journal import COMPACT_MIN_DEAD, HEADER, journal_entry
from imgresume.client._journal_queue import JournalQueue
from tests.support.runners import sync_run

UPLOAD_ID = "0123456789abcdef0123456789abcdef"
OTHER_ID = "fedcba9876543210fedcba9876543210"
SHA = "ab" * 32


def key(i: int) -> str:
    """A journal key, as L{journal_key} makes them (64 hex digits)."""
    return f"{i:064x}"


class SyscallCounter:
    """
    Counts what the journal asks of the system: C{os.write} calls and
    their bytes, C{fsync}/C{fdatasync} calls, C{os.replace} calls.  Flushes
    are counted, not done (10,000 of them would only time the disk).
    """

    def __init__(self, test: SynchronousTestCase) -> None:
        self.writes = self.written = self.flushes = self.replaces = 0
        real_write, real_replace = os.write, os.replace

        def write(fd: int, data: bytes) -> int:
            self.writes += 1
            self.written += len(data)
            return real_write(fd, data)

        def flush(fd: int) -> None:
            self.flushes += 1

        def replace(src: str, dst: str) -> None:
            self.replaces += 1
            real_replace(src, dst)

        test.patch(os, "write", write)
        test.patch(os, "fsync", flush)
        test.patch(os, "fdatasync", flush)
        test.patch(os, "replace", replace)

    def snapshot(self) -> tuple[int, int, int, int]:
        """The counts so far: writes, bytes, flushes, replaces."""
        return self.writes, self.written, self.flushes, self.replaces


class JournalLogTests(SynchronousTestCase):
    """L{Journal}'s log file, on a real file in the test's directory."""

    def setUp(self) -> None:
        self.directory = os.path.abspath(self.mktemp())
        os.makedirs(self.directory)
        self.path = os.path.join(self.directory, "journal.json")
        self.journal = Journal(self.path)

    def lines(self) -> list[bytes]:
        """The file's lines, the header first."""
        with open(self.path, "rb") as f:
            return f.read().splitlines(keepends=True)

    def append(self, data: bytes) -> None:
        """Append raw bytes to the file (another writer, or a crash)."""
        with open(self.path, "ab") as f:
            f.write(data)

    def test_header_and_records(self) -> None:
        """
        The file starts with the version header; each change appends one
        JSON record, the last word on its key; a forget is a null entry.
        """
        self.journal.remember("a", UPLOAD_ID, SHA)
        self.journal.remember("b", OTHER_ID, SHA)
        self.journal.remember("a", OTHER_ID, SHA, complete=True)
        self.journal.forget("b")
        lines = self.lines()
        self.assertEqual(lines[0], HEADER)
        self.assertEqual(json.loads(HEADER), {"imgresume-journal": 2})
        records = [json.loads(line) for line in lines[1:]]
        self.assertEqual([(r["key"], r["entry"] and r["entry"]["upload_id"]) for r in records],
                         [("a", UPLOAD_ID), ("b", OTHER_ID), ("a", OTHER_ID), ("b", None)])
        self.assertTrue(all(line.endswith(b"\n") for line in lines))

    def test_replay(self) -> None:
        """A new Journal on the file replays its records: the same entries."""
        self.journal.remember("a", UPLOAD_ID, SHA)
        self.journal.remember("b", OTHER_ID, None)  # type: ignore[arg-type]
        self.journal.remember("c", UPLOAD_ID, SHA)
        self.journal.remember("a", OTHER_ID, SHA, complete=True)
        self.journal.forget("c")
        again = Journal(self.path)
        self.assertEqual(again.lookup("a")["upload_id"], OTHER_ID)
        self.assertIs(again.lookup("a")["complete"], True)
        self.assertIsNone(again.lookup("b")["sha256"])
        self.assertIsNone(again.lookup("c"))
        self.assertEqual(again.upload_ids(), [OTHER_ID])

    def test_sees_appends_of_another_journal(self) -> None:
        """
        Records another Journal appends are seen at the next call, read
        from where this one stopped (the file is not read whole again).
        """
        self.journal.remember("a", UPLOAD_ID, SHA)
        other = Journal(self.path)
        other.remember("b", OTHER_ID, SHA)
        reads: list[int] = []
        import builtins
        real_open = builtins.open

        def counting_open(path: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
            f = real_open(path, mode, *args, **kwargs)
            if path == self.path:
                reads.append(1)
                real_seek = f.seek
                f.seek = lambda offset, *a: reads.append(offset) or real_seek(offset, *a)
            return f

        self.patch(builtins, "open", counting_open)
        self.assertEqual(self.journal.lookup("b")["upload_id"], OTHER_ID)
        self.assertEqual(reads[0], 1)
        self.assertEqual(reads[1], len(HEADER) + len(self.lines()[1]))  # after "a"'s record

    def test_torn_last_record(self) -> None:
        """
        A last record cut short by a crash is skipped: the journal opens
        with the records before it, and the next record goes on a line of
        its own (the torn one stays a damaged line, skipped).
        """
        self.journal.remember("a", UPLOAD_ID, SHA)
        self.journal.remember("b", OTHER_ID, SHA)
        whole = b"".join(self.lines())
        last = self.lines()[-1]
        with open(self.path, "wb") as f:
            f.write(whole[: len(whole) - len(last) // 2])
        journal = Journal(self.path)
        self.assertEqual(journal.lookup("a")["upload_id"], UPLOAD_ID)
        self.assertIsNone(journal.lookup("b"))
        journal.remember("c", OTHER_ID, SHA)
        again = Journal(self.path)
        self.assertEqual(again.lookup("c")["upload_id"], OTHER_ID)
        self.assertEqual(again.lookup("a")["upload_id"], UPLOAD_ID)
        self.assertIsNone(again.lookup("b"))
        self.assertEqual(json.loads(self.lines()[-1])["key"], "c")

    def test_damaged_records_skipped(self) -> None:
        """
        Lines that are not JSON, not records, or whose entries are damaged
        are skipped; the records around them count.
        """
        self.journal.remember("a", UPLOAD_ID, SHA)
        self.append(b"not json\n")
        self.append(b"[1, 2]\n")
        self.append(b'{"key": "x", "entry": {"upload_id": "../etc"}}\n')
        self.append(b'{"key": "b", "entry": ' + json.dumps(
            journal_entry(OTHER_ID, SHA)).encode() + b"}\n")
        journal = Journal(self.path)
        self.assertEqual(journal.lookup("a")["upload_id"], UPLOAD_ID)
        self.assertEqual(journal.lookup("b")["upload_id"], OTHER_ID)
        self.assertIsNone(journal.lookup("x"))

    def test_unknown_version(self) -> None:
        """
        A file whose header names a version this client does not know is
        not trusted (read as empty), and replaced at the next change.
        """
        with open(self.path, "wb") as f:
            f.write(b'{"imgresume-journal": 3}\n{"key": "a", "entry": null}\n')
        self.assertEqual(self.journal.upload_ids(), [])
        self.journal.remember("a", UPLOAD_ID, SHA)
        self.assertEqual(self.lines()[0], HEADER)

    def test_old_format_read(self) -> None:
        """
        A journal of the format before the log (one JSON object of entries,
        as version 1 wrote it) is read, and rewritten as a log at the first
        change, its entries kept.
        """
        partial = journal_entry(UPLOAD_ID, None)
        done = journal_entry(OTHER_ID, SHA, complete=True)
        with open(self.path, "w", encoding="utf-8") as f:
            json.dump({"partial": partial, "done": done}, f, indent=1, sort_keys=True)
        self.assertEqual(self.journal.lookup("partial"), partial)
        self.assertEqual(self.journal.lookup("done"), done)
        self.assertEqual(self.journal.upload_ids(), [UPLOAD_ID])
        self.assertFalse(self.lines()[0].startswith(HEADER))  # reading changes nothing
        self.journal.remember("new", UPLOAD_ID, SHA)
        self.assertEqual(self.lines()[0], HEADER)
        again = Journal(self.path)
        self.assertEqual(again.lookup("partial"), partial)
        self.assertEqual(again.lookup("done"), done)
        self.assertEqual(again.lookup("new")["upload_id"], UPLOAD_ID)

    def test_compaction(self) -> None:
        """
        Once dead records (replaced or forgotten entries) outnumber the live
        ones, the file is rewritten with the live entries only: one record
        each, the header first, the entries unchanged.
        """
        self.journal.remember("keep", OTHER_ID, SHA)
        counter = SyscallCounter(self)
        for i in range(COMPACT_MIN_DEAD + 1):  # the first one is live
            self.journal.remember("churn", UPLOAD_ID, SHA)
        self.assertEqual(counter.replaces, 0)
        self.assertEqual(len(self.lines()), 3 + COMPACT_MIN_DEAD)
        self.journal.remember("churn", OTHER_ID, SHA)  # one dead record too many
        self.assertEqual(counter.replaces, 1)
        lines = self.lines()
        self.assertEqual(lines[0], HEADER)
        self.assertEqual(sorted(json.loads(line)["key"] for line in lines[1:]),
                         ["churn", "keep"])
        self.assertEqual(Journal(self.path).lookup("churn")["upload_id"], OTHER_ID)
        self.assertEqual(os.listdir(self.directory), ["journal.json"])

    def test_compaction_at_open(self) -> None:
        """
        A file left with more dead records than live ones (expired entries
        among them) is rewritten at the first change of the next run.
        """
        with open(self.path, "wb") as f:
            f.write(HEADER)
            for i in range(COMPACT_MIN_DEAD + 1):
                entry = dict(journal_entry(UPLOAD_ID, SHA), updated=1.0)
                f.write(json.dumps({"key": key(i), "entry": entry}).encode() + b"\n")
            f.write(json.dumps({"key": "fresh", "entry": journal_entry(OTHER_ID, SHA)}).encode()
                    + b"\n")
        later = Journal(self.path, max_age=600)
        self.assertIsNone(later.lookup(key(0)))  # expired: dropped as it is read
        later.remember("new", UPLOAD_ID, SHA)
        self.assertEqual(sorted(json.loads(line)["key"] for line in self.lines()[1:]),
                         ["fresh", "new"])

    def test_flushes(self) -> None:
        """
        A record of an upload id, or of a dropped entry, is flushed before
        update() returns; one that only marks an upload complete is written
        and not flushed; a group with both is flushed once.
        """
        self.journal.remember("first", UPLOAD_ID, SHA)  # creates the file
        counter = SyscallCounter(self)
        self.journal.update({"a": journal_entry(UPLOAD_ID, None)})
        self.assertEqual(counter.snapshot()[::2], (1, 1))
        self.journal.update({"a": journal_entry(UPLOAD_ID, SHA, complete=True)})
        self.assertEqual(counter.snapshot()[::2], (2, 1))
        self.journal.forget("a")
        self.assertEqual(counter.snapshot()[::2], (3, 2))
        self.journal.update({"b": journal_entry(UPLOAD_ID, None),
                             "c": journal_entry(OTHER_ID, SHA, complete=True)})
        self.assertEqual(counter.snapshot()[::2], (4, 3))

    def test_many_files(self) -> None:
        """
        10,000 files, each remembered then completed through the uploader's
        queue: every file costs the same two writes, the same bytes and one
        flush, at the start of the batch as at its end; nothing is
        rewritten; the file holds two records a file.
        """
        queue = JournalQueue(self.journal, sync_run)
        counter = SyscallCounter(self)
        marks: dict[int, tuple[int, int, int, int]] = {}
        files = 10_000
        for i in range(files):
            if i in (100, 200, files - 100):
                marks[i] = counter.snapshot()
            self.successResultOf(queue.remember(key(i), f"{i:032x}", None))
            self.successResultOf(queue.complete(key(i), f"{i:032x}", SHA))
        end = counter.snapshot()

        def per_file(start: tuple[int, ...], stop: tuple[int, ...]) -> list[float]:
            return [(b - a) / 100 for a, b in zip(start, stop)]

        early = per_file(marks[100], marks[200])
        late = per_file(marks[files - 100], end)
        writes, written, flushes, replaces = late
        self.assertEqual((early[0], early[2], early[3]), (writes, flushes, replaces))
        self.assertEqual((writes, flushes, replaces), (2, 1, 0))
        self.assertLess(written, 500)
        self.assertLess(abs(written - early[1]), 2)  # times written in floats vary a little
        self.assertEqual(len(self.lines()), 1 + 2 * files)
        again = Journal(self.path)
        self.assertIs(again.lookup(key(files - 1))["complete"], True)
        self.assertEqual(again.upload_ids(), [])

# -*- test-case-name: tests.bench.test_batch -*-
"""
Tests for the pure parts of the batch benchmarks (issue 16): reading frames
off a connection and splitting it into files' protocol steps
(L{bench._frames}), reading strace output (L{bench._strace}), the batch
group's figures and targets (L{bench.batch}), and the profile's timeline,
text and buckets (L{bench.batch_profile}).  Nothing here runs a process or a clock.
"""

from __future__ import annotations

import hashlib
import os
import struct
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from bench import _frames, _strace, batch
from bench.batch_profile import coarse_bucket, storage_op, text, timeline, timeline_of


def _frame(kind: int, body: bytes) -> bytes:
    return struct.pack(">BI", kind, len(body)) + body


class FrameScannerTests(SynchronousTestCase):
    """L{_frames.FrameScanner} finds frame headers in a byte stream."""

    def test_whole_frames(self) -> None:
        """Frames fed whole, several at once, are all found with their lengths."""
        s = _frames.FrameScanner()
        data = _frame(0x03, b"u" * 40) + _frame(0x06, b"d" * 1000) + _frame(0x10, b"h" * 32)
        self.assertEqual(s.feed(data), [(0x03, 40), (0x06, 1000), (0x10, 32)])

    def test_split_anywhere(self) -> None:
        """
        The same stream fed a byte at a time, or cut inside a header or a
        body, gives the same frames, each when its header is complete.
        """
        data = _frame(0x06, b"x" * 300) + _frame(0x07, b"\0" * 8) + _frame(0x08, b"")
        s = _frames.FrameScanner()
        found = [f for i in range(len(data)) for f in s.feed(data[i:i + 1])]
        self.assertEqual(found, [(0x06, 300), (0x07, 8), (0x08, 0)])
        s = _frames.FrameScanner()
        self.assertEqual(s.feed(data[:3]), [])
        self.assertEqual(s.feed(data[3:100]), [(0x06, 300)])
        self.assertEqual(s.feed(memoryview(data)[100:]), [(0x07, 8), (0x08, 0)])


def _events() -> list[list[Any]]:
    """A connection carrying two files, the second with two DATA packets."""
    return [
        [0.0, "send", 0x01, 20], [0.001, "recv", 0x02, 30],
        [0.002, "send", 0x03, 60], [0.012, "recv", 0x05, 120],
        [0.013, "send", 0x06, 12 + 1000], [0.017, "recv", 0x07, 8],
        [0.0172, "send", 0x10, 32], [0.027, "recv", 0x08, 90],
        [0.028, "send", 0x03, 60], [0.038, "recv", 0x05, 120],
        [0.039, "send", 0x06, 12 + 700], [0.0395, "send", 0x06, 12 + 300],
        [0.043, "recv", 0x07, 8], [0.044, "recv", 0x07, 8],
        [0.0445, "send", 0x10, 32], [0.050, "recv", 0x08, 90],
        # a third upload refused: not a file
        [0.051, "send", 0x03, 60], [0.052, "recv", 0x09, 40],
    ]


class SplitFilesTests(SynchronousTestCase):
    """L{_frames.split_files} and L{_frames.step_times}."""

    def test_files_and_frames(self) -> None:
        """Each completed upload is one file, with its DATA and ACK frames and bytes."""
        files = _frames.split_files(_events())
        self.assertEqual(len(files), 2)
        self.assertEqual([(f["data_frames"], f["ack_frames"], f["bytes"]) for f in files],
                         [(1, 1, 1000), (2, 2, 1000)])

    def test_steps(self) -> None:
        """
        The steps run from WELCOME (first file) or the previous COMPLETED
        to UPLOAD, then UPLOAD to ACCEPTED, to the first DATA, to the last
        ACK, to FINISH, to COMPLETED.
        """
        first, second = (_frames.step_times(f) for f in _frames.split_files(_events()))
        expected = [0.001, 0.010, 0.001, 0.004, 0.0002, 0.0098]
        for (step, _, _), e in zip(_frames.STEPS, expected):
            self.assertAlmostEqual(first[step], e, places=6)
        self.assertAlmostEqual(first["total (UPLOAD -> COMPLETED)"], 0.025, places=6)
        self.assertAlmostEqual(second["client: to the next UPLOAD"], 0.001, places=6)
        self.assertAlmostEqual(second["DATA -> last ACK (server: write, flush)"], 0.005,
                               places=6)

    def test_empty_data_ends(self) -> None:
        """An upload that declared its digest ends with the empty DATA, not FINISH."""
        events = [[0.0, "recv", 0x02, 30], [0.1, "send", 0x03, 60], [0.2, "recv", 0x05, 99],
                  [0.3, "send", 0x06, 112], [0.4, "recv", 0x07, 8],
                  [0.5, "send", 0x06, 12], [0.6, "recv", 0x08, 90]]
        [f] = _frames.split_files(events)
        self.assertEqual((f["data_frames"], f["bytes"], f["finish"]), (1, 100, 0.5))


def _put_events() -> list[list[Any]]:
    """
    A connection carrying small files in PUTs, two in flight, answered in
    order (one refused), then a file over the PUT limit through UPLOAD.
    """
    return [
        [0.0, "send", 0x01, 20], [0.001, "recv", 0x02, 30],
        [0.002, "send", 0x11, 70 + 1000],  # A
        [0.003, "send", 0x11, 70 + 1000],  # B, behind A
        [0.010, "recv", 0x08, 90],  # A's
        [0.011, "send", 0x11, 70 + 1000],  # C, behind B
        [0.015, "recv", 0x08, 90],  # B's
        [0.016, "recv", 0x09, 40],  # C refused: not a file
        [0.020, "send", 0x11, 70 + 1000],  # D, alone
        [0.021, "send", 0x0A, 8],  # a PING behind it, answered in its turn
        [0.030, "recv", 0x08, 90],  # D's
        [0.031, "recv", 0x0B, 8],
        [0.032, "send", 0x03, 60], [0.040, "recv", 0x05, 120],  # E, over the limit
        [0.041, "send", 0x06, 12 + 5000], [0.045, "recv", 0x07, 8],
        [0.046, "send", 0x10, 32], [0.050, "recv", 0x08, 90],
    ]


class PutFilesTests(SynchronousTestCase):
    """
    L{_frames.split_files}, L{_frames.step_times} and L{_frames.phases} on
    PUTs (protocol.md, PUT: pipelined, answered in order).
    """

    def test_files(self) -> None:
        """
        Each PUT answered by COMPLETED is one file, matched in order (the
        answer of the oldest PUT waiting), with the PUTs in flight once it
        was sent; a refused PUT is not a file; an UPLOAD after them is.
        """
        files = _frames.split_files(_put_events())
        self.assertEqual([(f["kind"], f.get("put", f.get("upload")), f["completed"])
                          for f in files],
                         [("put", 0.002, 0.010), ("put", 0.003, 0.015), ("put", 0.020, 0.030),
                          ("upload", 0.032, 0.050)])
        self.assertEqual([f["in_flight"] for f in files[:3]], [1, 2, 1])
        self.assertEqual(_frames.completed_frames(_put_events()), len(files))

    def test_put_steps(self) -> None:
        """
        A PUT's steps: from the previous send (WELCOME, the previous PUT,
        even a refused one) to its PUT, PUT to its COMPLETED, and the part
        of that spent in flight behind the previous PUT (until its answer);
        the UPLOAD's steps run from the last COMPLETED.
        """
        a, b, d, e = (_frames.step_times(f) for f in _frames.split_files(_put_events()))
        to_next, stored, behind = (s for s, _, _ in _frames.PUT_STEPS)
        for times, expected in [(a, (0.001, 0.008, 0.0)), (b, (0.001, 0.012, 0.007)),
                                (d, (0.009, 0.010, 0.0))]:
            self.assertEqual(sorted(times), sorted([to_next, stored, behind]))
            for step, e_ in zip((to_next, stored, behind), expected):
                self.assertAlmostEqual(times[step], e_, places=6)
        self.assertAlmostEqual(e["client: to the next UPLOAD"], 0.002, places=6)
        self.assertAlmostEqual(e[_frames.UPLOAD_TOTAL], 0.018, places=6)

    def test_phases(self) -> None:
        """
        How many PUTs were in flight from each send and answer on; then an
        UPLOAD's steps.
        """
        got = [(round(t, 6), p) for t, p in _frames.phases(_put_events()) if t < 0.031]
        self.assertEqual(got, [
            (0.002, _frames.put_phase(1)), (0.003, _frames.put_phase(2)),
            (0.01, _frames.put_phase(1)), (0.011, _frames.put_phase(2)),
            (0.015, _frames.put_phase(1)), (0.016, _frames.IDLE_PHASE),
            (0.02, _frames.put_phase(1)), (0.03, "client: to the next UPLOAD")])


def _trace_result(events: list[list[Any]]) -> dict[str, Any]:
    return {"connections": [events], "t0": 0.0, "t1": 0.05, "cpu": 0.04, "server_cpu": 0.08,
            "digest": "blake3"}


class TimelineTests(SynchronousTestCase):
    """L{timeline} and L{text}: files counted from the frames, PUT and UPLOAD tables."""

    def test_counts(self) -> None:
        """
        files/s and CPU per file count the files the frames show completed,
        as many as COMPLETED frames; frames per file by kind.
        """
        tl = timeline(_trace_result(_put_events()))
        self.assertEqual((tl["files"], tl["puts"], tl["uploads"], tl["completed_frames"]),
                         (4, 3, 1, 4))
        self.assertAlmostEqual(tl["files_per_s"], 80.0)
        self.assertAlmostEqual(tl["client_cpu_ms"], 10.0)
        self.assertAlmostEqual(tl["server_cpu_ms"], 20.0)
        self.assertAlmostEqual(tl["puts_in_flight"], 4 / 3)
        self.assertEqual((tl["data_frames"], tl["ack_frames"]), (1.0, 1.0))
        self.assertAlmostEqual(tl["ms_median"]["PUT -> COMPLETED (server: store whole)"], 10.0)

    def _text(self, events: list[list[Any]]) -> str:
        return text({"files": 4, "size": 256 * 1024,
                     "timeline": {"parallel 1": timeline_of([_trace_result(events)])},
                     "hashing": {"digest": "blake3", "checksum": "crc32c", "digest_ms": 0.1,
                                 "checksum_ms": 0.01},
                     "strace": {"note": "skipped"}, "pyspy": {"note": "skipped"}})

    def test_text_puts_only(self) -> None:
        """
        A batch of PUTs only: the PUT table, no UPLOAD table, no C{nan}, the
        digest the client used named.
        """
        events = [e for e in _put_events() if e[0] < 0.0315]
        out = self._text(events)
        self.assertIn("PUT: ms per file", out)
        self.assertNotIn("UPLOAD: ms per file", out)
        self.assertNotIn("nan", out)
        self.assertNotIn("WARNING", out)
        self.assertIn("BLAKE3 (once per file) 0.10 ms, CRC-32C (per PUT) 0.01 ms", out)
        self.assertNotIn("SHA-256", out)

    def test_text_mixed(self) -> None:
        """A batch with a file over the PUT limit: both tables."""
        out = self._text(_put_events())
        self.assertIn("PUT: ms per file", out)
        self.assertIn("UPLOAD: ms per file", out)
        self.assertNotIn("nan", out)


STRACE = """\
100 1700000000.000100 mkdir("/s/incoming", 0755) = -1 EEXIST (File exists) <0.000015>
100 1700000000.000200 mkdir("/s/incoming/0123456789abcdef0123456789abcdef", 0755) = 0 <0.000101>
101 1700000000.000300 openat(AT_FDCWD</w>, "/s/incoming/0123456789abcdef0123456789abcdef/.meta.json.668cb6f5a2ed.tmp", O_WRONLY|O_CREAT|O_EXCL|O_CLOEXEC, 0644) = 15</s/incoming/0123456789abcdef0123456789abcdef/.meta.json.668cb6f5a2ed.tmp> <0.000120>
101 1700000000.000400 fsync(15</s/incoming/0123456789abcdef0123456789abcdef/.meta.json.668cb6f5a2ed.tmp>) = 0 <0.000400>
101 1700000000.000500 fdatasync(13</s/incoming/0123456789abcdef0123456789abcdef/data> <unfinished ...>
102 1700000000.000510 recvfrom(11<socket:[35275]>, "\\3\\0\\0\\0006", 65536, 0, NULL, NULL) = 59 <0.000014>
101 1700000000.001200 <... fdatasync resumed>) = 0 <0.000700>
101 1700000000.001300 linkat(AT_FDCWD</w>, "/s/incoming/0123456789abcdef0123456789abcdef/data", 17</s/complete>, "a.bin", AT_SYMLINK_FOLLOW) = 0 <0.000023>
101 1700000000.001400 fsync(17</s/complete>) = 0 <0.000300>
101 1700000000.001500 newfstatat(16</s/incoming/0123456789abcdef0123456789abcdef/lease>, "", {st_mode=S_IFREG|0644, st_size=71, ...}, AT_EMPTY_PATH) = 0 <0.000010>
102 1700000000.001600 futex(0x7f, FUTEX_WAIT_BITSET_PRIVATE, 0, NULL, FUTEX_BITSET_MATCH_ANY) = 0 <0.090000>
102 1700000000.001700 --- SIGCHLD {si_signo=SIGCHLD} ---
103 1700000000.001800 +++ exited with 0 +++
"""


class StraceTests(SynchronousTestCase):
    """L{_strace.parse}, L{_strace.target}, L{_strace.kind}, L{_strace.tally}."""

    def setUp(self) -> None:
        self.calls = _strace.parse(STRACE.splitlines(keepends=True))

    def test_parse(self) -> None:
        """
        Every finished call, once, with its start time and duration; a call
        split by another thread is joined (start of the first half, duration
        of the second); signals and exits are left out.
        """
        self.assertEqual([c["name"] for c in self.calls], [
            "mkdir", "mkdir", "openat", "fsync", "recvfrom", "fdatasync", "linkat", "fsync",
            "newfstatat", "futex"])
        fdatasync = self.calls[5]
        self.assertEqual((fdatasync["pid"], fdatasync["t"], fdatasync["dur"], fdatasync["ret"]),
                         (101, 1700000000.0005, 0.0007, "0"))
        self.assertEqual(self.calls[0]["ret"], "-1")

    def test_targets(self) -> None:
        """What each call touched, and what that is to the storage."""
        kinds = [_strace.kind(_strace.target(c)) for c in self.calls]
        self.assertEqual(kinds, ["incoming/", "upload dir", "meta.json", "meta.json", "socket",
                                 "data", "complete/ file", "complete/", "lease", "-"])

    def test_kind(self) -> None:
        """Paths of an upload's files, its directory and the shared ones."""
        up = "/r/incoming/0123456789abcdef0123456789abcdef"
        for path, expected in [
            (up + "/journal", "journal"), (up + "/lock", "lock"),
            (up + "/.lease.336e702c7d55.tmp", "lease"), (up + "/data(deleted)", "data"),
            (up, "upload dir"), ("/r/incoming", "incoming/"), ("/r/complete", "complete/"),
            ("/r/complete/2026/a.tif", "complete/ file"), ("/r/logs/n-1.log", "log file"),
            ("pipe:[35196]", "pipe"), ("anon_inode:[eventpoll]", "epoll"), ("/r", "other"),
            ("", "-"),
        ]:
            self.assertEqual(_strace.kind(path), expected, path)

    def test_tally(self) -> None:
        """
        Per file: calls and milliseconds by (call, kind), failed calls
        counted; waits counted but left out of the working total and of the
        steps; each call in the step it started in.
        """
        t = _strace.tally(self.calls, 2, steps=[(1700000000.0, "create"),
                                                (1700000000.001, "complete")])
        rows = {tuple(r["key"]): r for r in t["rows"]}
        self.assertEqual(rows[("mkdir", "incoming/")]["failed_per_file"], 0.5)
        self.assertAlmostEqual(rows[("fdatasync", "data")]["ms_per_file"], 0.35)
        self.assertEqual(t["calls"], 5.0)
        self.assertEqual(t["calls_working"], 4.5)
        self.assertAlmostEqual(t["ms_working"], 1e3 * (0.001683 / 2), places=6)
        self.assertEqual(t["rows"][-1]["key"], ["futex", "-"])  # waits last
        steps = {r["key"]: r["per_file"] for r in t["steps"]}
        self.assertEqual(steps, {"create": 3.0, "complete": 1.5})

    def test_grouped(self) -> None:
        """Rows are summed into the documented groups, every row in one."""
        t = _strace.tally(self.calls, 1)
        groups = {g["group"]: g for g in _strace.grouped(t["rows"])}
        self.assertEqual(groups["mkdir"]["per_file"], 2)
        self.assertEqual(groups["mkdir"]["failed_per_file"], 1)
        self.assertEqual(groups["fdatasync of the data"]["per_file"], 1)
        self.assertEqual(groups["meta.json and lease: fsync of the temp file"]["per_file"], 1)
        self.assertEqual(groups["link into complete/"]["per_file"], 1)
        self.assertEqual(
            groups["fsync of directories (upload dir, incoming/, complete/, root)"]["per_file"],
            1)
        self.assertEqual(sum(g["per_file"] for g in groups.values()), t["calls"])


_K = "673c648c97bb46f5dc420c417f456bc4"
#: The one-step store of one PUT (storage/filesystem/_whole.py), as strace prints it.
STRACE_PUT = f"""\
200 1700000000.000100 openat(AT_FDCWD</w>, "/s/incoming", O_RDONLY|O_CLOEXEC|O_DIRECTORY) = 12</s/incoming> <0.000028>
200 1700000000.000200 openat(12</s/incoming>, "{_K}.put", O_RDWR|O_CREAT|O_EXCL|O_NOFOLLOW|O_CLOEXEC, 0644) = 13</s/incoming/{_K}.put> <0.000072>
200 1700000000.000300 fcntl(13</s/incoming/{_K}.put>, F_OFD_SETLK, {{l_type=F_WRLCK, l_whence=SEEK_SET, l_start=0, l_len=0}}) = 0 <0.000020>
200 1700000000.000400 newfstatat(13</s/incoming/{_K}.put>, "", {{st_mode=S_IFREG|0644, st_size=0, ...}}, AT_EMPTY_PATH) = 0 <0.000014>
200 1700000000.000500 pwrite64(13</s/incoming/{_K}.put>, "\\371\\212\\360"..., 262144, 0) = 262144 <0.000107>
200 1700000000.000600 fdatasync(13</s/incoming/{_K}.put>) = 0 <0.000822>
200 1700000000.001500 newfstatat(12</s/incoming>, "", {{st_mode=S_IFDIR|0755, st_size=4096, ...}}, AT_EMPTY_PATH) = 0 <0.000015>
200 1700000000.001600 fsync(12</s/incoming>) = 0 <0.000238>
200 1700000000.001900 fadvise64(13</s/incoming/{_K}.put>, 0, 0, POSIX_FADV_DONTNEED) = 0 <0.000039>
200 1700000000.002000 pread64(13</s/incoming/{_K}.put>, "\\371\\212\\360"..., 262144, 0) = 262144 <0.000668>
200 1700000000.003500 openat(14</s>, "complete", O_RDONLY|O_NOFOLLOW|O_CLOEXEC|O_DIRECTORY) = 15</s/complete> <0.000016>
200 1700000000.003600 linkat(12</s/incoming>, "{_K}.put", 15</s/complete>, "scan-00000.bin", 0) = 0 <0.000044>
200 1700000000.003800 newfstatat(15</s/complete>, "scan-00000.bin",  <unfinished ...>
201 1700000000.003850 recvfrom(11<socket:[35275]>, "\\21\\0\\4\\0F", 65536, 0, NULL, NULL) = 65536 <0.000014>
200 1700000000.003900 <... newfstatat resumed>{{st_mode=S_IFREG|0644, st_size=262144, ...}}, AT_SYMLINK_NOFOLLOW) = 0 <0.000012>
200 1700000000.004000 newfstatat(15</s/complete>, "", {{st_mode=S_IFDIR|0755, st_size=4096, ...}}, AT_EMPTY_PATH) = 0 <0.000016>
200 1700000000.004100 fsync(15</s/complete>) = 0 <0.000400>
202 1700000000.004200 sched_yield() = 0 <0.000005>
200 1700000000.004600 linkat(12</s/incoming>, "{_K}.put", 12</s/incoming>, "{_K}.done", 0) = 0 <0.000029>
200 1700000000.004700 close(15</s/complete>) = 0 <0.000010>
200 1700000000.004800 fcntl(13</s/incoming/{_K}.put>, F_OFD_SETLK, {{l_type=F_UNLCK, l_whence=SEEK_SET, l_start=0, l_len=0}}) = 0 <0.000019>
200 1700000000.004900 close(13</s/incoming/{_K}.put>) = 0 <0.000018>
200 1700000000.005000 close(12</s/incoming>) = 0 <0.000016>
201 1700000000.005100 futex(0x7f, FUTEX_WAIT_BITSET_PRIVATE, 0, NULL, FUTEX_BITSET_MATCH_ANY) = 0 <0.090000>
"""


class StracePutTests(SynchronousTestCase):
    """
    L{_strace.kind}, L{_strace.grouped} and L{_strace.put_steps} on the
    one-step store of a PUT: its C{.put} and C{.done}, the grouped fsyncs of
    incoming/ and complete/, the read-back, the links.
    """

    def setUp(self) -> None:
        self.calls = _strace.parse(STRACE_PUT.splitlines(keepends=True))

    def test_kinds(self) -> None:
        """A PUT's file and its third name are told from other names in incoming/."""
        kinds = [(c["name"], _strace.kind(_strace.target(c))) for c in self.calls]
        self.assertEqual(kinds, [
            ("openat", "incoming/"), ("openat", "put file"), ("fcntl", "put file"),
            ("newfstatat", "put file"), ("pwrite64", "put file"), ("fdatasync", "put file"),
            ("newfstatat", "incoming/"), ("fsync", "incoming/"), ("fadvise64", "put file"),
            ("pread64", "put file"), ("openat", "complete/"), ("linkat", "complete/ file"),
            ("recvfrom", "socket"), ("newfstatat", "complete/ file"),
            ("newfstatat", "complete/"), ("fsync", "complete/"), ("sched_yield", "-"),
            ("linkat", "done link"),
            ("close", "complete/"), ("fcntl", "put file"), ("close", "put file"),
            ("close", "incoming/"), ("futex", "-")])
        self.assertEqual(_strace.kind("/r/incoming/not-a-key.put"), "other")
        self.assertEqual(_strace.kind(f"/r/incoming/{_K}.done"), "done link")

    def test_put_steps(self) -> None:
        """
        Calls per file by step of the one-step store, in its order; what is
        not the store (a socket read) apart, waits left out.
        """
        t = _strace.tally(self.calls, 1)
        steps = [(r["step"], r["per_file"]) for r in _strace.put_steps(t["rows"])]
        self.assertEqual(steps, [
            ("create, lock, stat, unlock and close the .put", 5),
            ("write the .put (pwrite)", 1), ("fdatasync of the .put", 1),
            ("fsync of incoming/ (grouped across PUTs)", 1),
            ("read-back of the .put (fadvise, pread)", 2), ("link into complete/", 1),
            ("prove the link: stat of the published name", 1),
            ("fsync of complete/ (grouped across PUTs)", 1),
            ("link of the .put to <key>.done", 1),
            ("directories: open, stat, close (incoming/, complete/, root)", 6),
            ("not the store (sockets, log, thread hand-offs...)", 2)])
        ms = {r["step"]: r["ms_per_file"] for r in _strace.put_steps(t["rows"])}
        self.assertAlmostEqual(ms["fdatasync of the .put"], 0.822)
        self.assertAlmostEqual(ms["read-back of the .put (fadvise, pread)"], 0.707)

    def test_grouped(self) -> None:
        """
        The per-file groups take the PUT's calls: its fdatasync, write,
        read-back, the link into complete/ and the one to C{<key>.done}
        apart, both directory fsyncs, a spinning thread's C{sched_yield};
        every call in one group.
        """
        t = _strace.tally(self.calls, 1)
        groups = {g["group"]: g["per_file"] for g in _strace.grouped(t["rows"])}
        self.assertEqual(groups["fdatasync of a PUT's .put"], 1)
        self.assertEqual(groups["writes of a PUT's .put (pwrite)"], 1)
        self.assertEqual(groups["read-back of a PUT's .put (fadvise, pread)"], 2)
        self.assertEqual(groups["link into complete/"], 1)
        self.assertEqual(groups["link of a published .put to <key>.done"], 1)
        self.assertEqual(
            groups["fsync of directories (upload dir, incoming/, complete/, root)"], 2)
        self.assertEqual(
            groups["sched_yield (threads spinning for work, e.g. BLAKE3's workers)"], 1)
        self.assertEqual(groups["other"], 0)
        self.assertEqual(sum(groups.values()), t["calls"])


def _run(seconds: float, files: int = 100, **extra: Any) -> dict[str, Any]:
    return {"files": files, "bytes": files * 1000, "seconds": seconds,
            "cpu": {"client": 0.5, "server": 0.2}, **extra}


def _imgresume(seconds: float, **extra: Any) -> dict[str, Any]:
    m = _run(seconds, startup={"seconds": 0.5, "cpu": 0.3}, failures=0, verified=100,
             missing=0, mismatched=0, extra=0, incoming_dirs=100, incoming_partial=0,
             connections=4, hwm={"node-1": 60e6, "node-2": 161e6, "lb": 50e6},
             peak_rss={"node-1": 59e6}, exit=0)
    m["cpu"]["lb"] = 0.1
    m.update(extra)
    return m


class BatchFiguresTests(SynchronousTestCase):
    """L{batch.figures}, L{batch.summarise}: best/median rates, ratios, targets."""

    def test_figures(self) -> None:
        """
        Files/s of the best and the median round; CPU per file of the
        median round, the client's start-up taken out of its share.
        """
        f = batch.figures([_imgresume(2.0), _imgresume(1.0), _imgresume(4.0)])
        self.assertEqual((f["files_per_s"], f["files_per_s_median"]), (100.0, 50.0))
        self.assertAlmostEqual(f["cpu_ms_per_file"]["client"], 2.0)  # (0.5 - 0.3) / 100
        self.assertAlmostEqual(f["cpu_ms_per_file"]["server"], 2.0)
        self.assertAlmostEqual(f["files_per_s_after_startup"], 200.0)
        self.assertEqual((f["verified"], f["checked"]), (300, 300))
        self.assertEqual(batch.ratio(f, None), None)

    def _summary(self, img: float, rsync: float, rsync_fsync: float,
                 key: str = "256k") -> tuple[dict[str, Any], list[dict[str, Any]]]:
        group = {
            "parallel": 4, "batches": {key: {"files": 100, "size": 1000, "label": "100 x 1"}},
            "samples": {key: {batch.IMGRESUME: [_imgresume(img)],
                              batch.RSYNC: [_run(rsync)], batch.RSYNC_FSYNC: [_run(rsync_fsync)]}},
        }
        return batch.summarise(group)

    def test_ratios_and_targets_256k(self) -> None:
        """
        The 256 KiB batch: imgresume against rsync --fsync (>= 1.0x) and
        rsync (>= 0.5x), each met or not by the ratio of files/s.
        """
        fig, targets = self._summary(img=1.0, rsync=0.4, rsync_fsync=1.25)
        img = fig["batches"]["256k"]["methods"][batch.IMGRESUME]
        self.assertAlmostEqual(img["x_rsync_fsync"], 1.25)
        self.assertAlmostEqual(img["x_rsync"], 0.4)
        self.assertEqual([t["met"] for t in targets], [True, False])
        self.assertAlmostEqual(targets[1]["value"], 0.4)

    def test_targets_64k(self) -> None:
        """
        The 10,000-file batch: every file verified and nothing failed; the
        largest server's peak RSS against 150 MB (the balancer's is not a
        server's).
        """
        fig, targets = self._summary(img=10.0, rsync=1.0, rsync_fsync=2.0, key="64k")
        self.assertEqual([t["met"] for t in targets], [True, False])
        self.assertEqual(targets[1]["shown"], "161 MB")
        lines = batch.table_lines(fig)
        self.assertIn("0.20x", "\n".join(lines))

    def test_missing_rsync(self) -> None:
        """Without rsync the ratio targets say not measured (None), not NOT MET."""
        self.assertEqual(batch.batch_targets("2m", "x", batch.figures([_imgresume(1.0)]),
                                             None, None)[0]["met"], None)


class BucketTests(SynchronousTestCase):
    """L{coarse_bucket} and L{storage_op} on py-spy stacks (outermost frame first)."""

    def test_innermost_rule_wins(self) -> None:
        """A logging call inside storage code is logging; an fsync inside it is fsync."""
        base = ["work (twisted/_threads/_threadworker.py:76)",
                "FilesystemStorage._create_sync (imgresume/storage/filesystem.py:660)"]
        logged = base + ["Logger.info (twisted/logger/_logger.py:200)",
                         "formatTime (twisted/logger/_format.py:50)"]
        flushed = base + ["_atomic_write (imgresume/storage/filesystem.py:327)",
                          "fsync (libc.so.6)"]
        self.assertEqual(coarse_bucket(logged), "logging")
        self.assertEqual(coarse_bucket(flushed), "fsync/fdatasync")
        self.assertEqual(coarse_bucket(base + ["realpath (posixpath.py:400)",
                                               "__lstat64 (libc.so.6)"]),
                         "other file system calls (open, mkdir, rename, link, unlink, close, "
                         "stat)")
        self.assertEqual(storage_op(flushed), "FilesystemStorage._create_sync")
        self.assertEqual(storage_op(["run (threading.py:1)"]), "-")


class VerifyTests(SynchronousTestCase):
    """L{batch.verify}: what a round left in the storage, counted honestly."""

    def test_incoming_counted_by_kind(self) -> None:
        """
        Upload directories, published C{.put} files (two links, kept until
        GC) and partial uploads (a directory with C{data}, a C{.put} with one
        link) are told apart; the complete file is verified.
        """
        root = self.mktemp()
        complete, incoming = os.path.join(root, "complete"), os.path.join(root, "incoming")
        os.makedirs(complete)
        os.makedirs(os.path.join(incoming, "a" * 32))
        os.makedirs(os.path.join(incoming, "b" * 32))
        with open(os.path.join(incoming, "b" * 32, "data"), "wb") as f:
            f.write(b"half")
        with open(os.path.join(incoming, "c" * 32 + ".put"), "wb") as f:
            f.write(b"scan")
        os.link(os.path.join(incoming, "c" * 32 + ".put"), os.path.join(complete, "s.tif"))
        os.link(os.path.join(incoming, "c" * 32 + ".put"),
                os.path.join(incoming, "c" * 32 + ".done"))
        with open(os.path.join(incoming, "d" * 32 + ".put"), "wb") as f:
            f.write(b"cut")
        found = batch.verify(root, {"s.tif": hashlib.sha256(b"scan").hexdigest()})
        self.assertEqual(found["verified"], 1)
        self.assertEqual((found["incoming_dirs"], found["incoming_puts"],
                          found["incoming_partial"]), (2, 1, 2))

# -*- test-case-name: tests.cli.test_upload -*-
"""
Progress for logs, fed with L{Progress} reports: periodic plain lines
(L{PlainProgress}), and the counts of a batch (L{BatchTally}) that they and
the live terminal display (L{imgresume.cli._live}, drawn with C{rich})
share.  Nothing here imports C{rich}.
"""

from __future__ import annotations

from typing import Callable, Mapping, TextIO

from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall

from imgresume.client import FileOutcome, Progress
from imgresume.sizes import format_size


def format_eta(seconds: float | None) -> str:
    """C{ETA 42s}, C{ETA 3m05s}, C{ETA 2h10m}, or C{ETA ?} when unknown."""
    if seconds is None:
        return "ETA ?"
    s = round(seconds)
    if s < 100:
        return f"ETA {s}s"
    if s < 6000:
        return f"ETA {s // 60}m{s % 60:02d}s"
    return f"ETA {s // 3600}h{s % 3600 // 60:02d}m"


def resumed_note(p: Progress, server_before: str | None) -> str:
    """
    C{a.tif: resuming at 104.0 MiB on node-2 (another server)}: the first
    report of an upload after it waited to retry.
    """
    where = f" on {p.server_id}" if p.server_id else ""
    moved = " (another server)" if server_before and p.server_id != server_before else ""
    return f"{p.name}: resuming at {format_size(p.done)}{where}{moved}"


class BatchTally:
    """
    The counts of a batch: files stored, failed and in progress, bytes
    done of all, bytes sent in this run, the rate and the ETA.  Fed with
    the batch's L{Progress} reports and file outcomes by L{imgresume.cli._live.BatchProgress}
    or L{PlainProgress}.

    @param sizes: the size of every file of the batch, by remote name.
    @param clock: the time, in seconds.
    """

    def __init__(self, sizes: Mapping[str, int], clock: Callable[[], float]) -> None:
        self.sizes = dict(sizes)
        self.files = len(self.sizes)
        self.total_bytes = sum(self.sizes.values())
        self.clock = clock
        self.started = clock()
        #: The latest report of each file under way, in the order they began.
        self.active: dict[str, Progress] = {}
        self.stored = 0
        self.failed = 0
        self.already_complete = 0
        #: Bytes acknowledged in this run (an offset resumed from is not counted).
        self.sent = 0
        self._stored_bytes = 0
        self._failed_bytes = 0
        self._offsets: dict[str, int] = {}

    def report(self, p: Progress) -> None:
        """Count a progress report."""
        if p.phase == "uploading":
            last = self._offsets.get(p.name)
            if last is not None and p.done > last:
                self.sent += p.done - last
            self._offsets[p.name] = p.done
        self.active[p.name] = p

    def finished(self, outcome: FileOutcome) -> None:
        """Count a file that is over, stored or failed."""
        self.active.pop(outcome.name, None)
        self._offsets.pop(outcome.name, None)
        size = self.sizes.get(outcome.name, 0)
        if outcome.result is not None:
            self.stored += 1
            self._stored_bytes += size
            self.already_complete += outcome.result.already_complete
        else:
            self.failed += 1
            self._failed_bytes += size

    @property
    def bytes_done(self) -> int:
        """Bytes stored: of the files stored, and acknowledged of those under way."""
        return self._stored_bytes + sum(
            p.done for p in self.active.values() if p.phase in ("uploading", "retrying", "done")
        )

    def rate(self) -> float:
        """Bytes sent per second since the batch began."""
        elapsed = self.clock() - self.started
        return self.sent / elapsed if elapsed > 0 else 0.0

    def eta(self) -> float | None:
        """Seconds until the bytes left are sent at the current rate, or None."""
        rate = self.rate()
        left = self.total_bytes - self._failed_bytes - self.bytes_done
        return max(0.0, left) / rate if rate > 0 else None

    def fraction(self) -> float:
        """Bytes done of all (1.0 for a batch of empty files)."""
        return self.bytes_done / self.total_bytes if self.total_bytes else 1.0

    def files_text(self) -> str:
        """C{12/30 files}, with the failures when there are some."""
        text = f"{self.stored + self.failed}/{self.files} files"
        return text + (f", {self.failed} failed" if self.failed else "")

    def describe(self) -> str:
        """The whole state on one line, for logs."""
        return (
            f"{self.files_text()}, {len(self.active)} in progress; "
            f"{format_size(self.bytes_done)}/{format_size(self.total_bytes)}, "
            f"{format_size(self.rate())}/s, {format_eta(self.eta())}"
        )


class PlainProgress:
    """
    Progress for a log (C{imgresume upload} when stderr is not a
    terminal): every C{interval} seconds, one line with the batch's files,
    bytes, rate and ETA, and at once a line for every retry a file waits
    for (why, which retry, when); if C{verbose} (C{-v}), a line too for
    where and from which offset each file resumes after a retry.  Call it
    with every L{Progress} report, L{finished} with every outcome; L{start}
    and L{close} the periodic lines.
    """

    #: The reporter writes each file's end (this display does not).
    shows_outcomes = False

    def __init__(self, stream: TextIO, tally: BatchTally, clock: IReactorTime,
                 interval: float = 10.0, verbose: bool = False) -> None:
        self.stream = stream
        self.tally = tally
        self.interval = interval
        self.verbose = verbose
        #: The phase and server of each file's last report (for -v).
        self._last: dict[str, tuple[str, str | None]] = {}
        self._loop = LoopingCall(self.report)
        self._loop.clock = clock

    def __call__(self, p: Progress) -> None:
        self.tally.report(p)
        if p.phase == "retrying":
            self.stream.write(f"imgresume: {p.name}: {p.note}\n")
            self.stream.flush()
        if self.verbose:
            phase, server = self._last.get(p.name, ("", None))
            if p.phase == "uploading" and phase == "retrying":
                self.stream.write(f"imgresume: {resumed_note(p, server)}\n")
                self.stream.flush()
            self._last[p.name] = (p.phase, p.server_id or server)

    def finished(self, outcome: FileOutcome) -> None:
        """Count a file that is over."""
        self.tally.finished(outcome)
        self._last.pop(outcome.name, None)

    def start(self) -> None:
        """Begin the periodic lines (the first after one interval)."""
        self._loop.start(self.interval, now=False)

    def close(self) -> None:
        """Stop the periodic lines."""
        if self._loop.running:
            self._loop.stop()

    def report(self) -> None:
        """Write one line now."""
        self.stream.write(f"imgresume: {self.tally.describe()}\n")
        self.stream.flush()

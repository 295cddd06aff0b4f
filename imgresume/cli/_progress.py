# -*- test-case-name: tests.cli.test_upload -*-
"""
Progress for humans, fed with L{Progress} reports: a one-line bar for one
file (L{ProgressBar}), a live display of a batch for terminals
(L{BatchProgress}) and periodic plain lines for logs (L{PlainProgress}),
both over the same counts (L{BatchTally}).
"""

from __future__ import annotations

import shutil
import time
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


def bar_line(head: str, fraction: float, tail: str, width: int) -> str:
    """C{head[####....]tail}, the bar filling what C{width - 1} columns leave."""
    bar_width = max(10, width - len(head) - len(tail) - 3)
    filled = int(bar_width * min(1.0, max(0.0, fraction)))
    line = f"{head}[{'#' * filled}{'.' * (bar_width - filled)}]{tail}"
    return line[: width - 1].ljust(width - 1)


def _stored_line(bar: str, path: str | None, label: str = "done") -> str:
    """A finished file's bar line with where it is stored (not cut to the width)."""
    if path is None:
        return bar
    return f"{bar.rstrip()}, {'already ' if label != 'done' else ''}stored as {path}"


def _file_line(p: Progress, rate: float, width: int, label: str | None = None) -> str:
    """
    One file's bar: name, phase, percentage, sizes, rate, ETA, server; or,
    while it waits to retry, why and when.
    """
    if p.phase == "retrying":
        return f"{p.name[:30]}: {p.note}"[: width - 1].ljust(width - 1)
    fraction = p.done / p.total if p.total else 1.0
    if label is None:
        label = {"hashing": "hashing", "uploading": "", "done": "done"}[p.phase]
    tail = f" {fraction:4.0%} {format_size(p.done)}/{format_size(p.total)}"
    if p.phase != "done":
        tail += f" {format_size(rate)}/s "
        tail += format_eta((p.total - p.done) / rate if rate > 0 else None)
    if p.server_id:
        tail += f" via {p.server_id}"
    head = f"{p.name[:30]} {label}".rstrip() + " "
    return bar_line(head, fraction, tail, width)


class _Rate:
    """The rate of one file's current phase, since the phase began."""

    def __init__(self, p: Progress, now: float) -> None:
        self.phase = p.phase
        self.start = (now, p.done)

    def of(self, p: Progress, now: float) -> float:
        t0, d0 = self.start
        return (p.done - d0) / (now - t0) if now > t0 else 0.0


class ProgressBar:
    """
    Draws C{name [#####.....] 42% 120.0 MiB/286.1 MiB 95.2 MiB/s ETA 2s via
    server} on one line of C{stream}, at most C{hz} times a second: a
    callback for L{imgresume.client.Uploader.upload} uploading one file at
    a time (C{imgresume.demo} uses it).
    """

    def __init__(
        self, stream: TextIO, hz: float = 10.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.stream = stream
        self.interval = 1.0 / hz
        self.clock = clock
        self._last_draw = float("-inf")
        self._rate: _Rate | None = None
        self._name: str | None = None

    def __call__(self, p: Progress) -> None:
        now = self.clock()
        if self._rate is None or (self._name, self._rate.phase) != (p.name, p.phase):
            self._name, self._rate = p.name, _Rate(p, now)
        if p.phase not in ("done", "retrying") and now - self._last_draw < self.interval:
            return
        self._last_draw = now
        if p.phase == "done":
            self.stream.write("\r" + _stored_line(self.render(p, now), p.path) + "\n")
        else:
            self.stream.write("\r" + self.render(p, now))
        self.stream.flush()

    def render(self, p: Progress, now: float) -> str:
        """The line for report C{p} at time C{now}."""
        assert self._rate is not None
        width = shutil.get_terminal_size((100, 20)).columns
        return _file_line(p, self._rate.of(p, now), width)


class BatchTally:
    """
    The counts of a batch: files stored, failed and in progress, bytes
    done of all, bytes sent in this run, the rate and the ETA.  Fed with
    the batch's L{Progress} reports and file outcomes by L{BatchProgress}
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


class BatchProgress:
    """
    The live display of a batch on a terminal (C{imgresume upload} when
    stderr is one): a line per file under way and, for several files, a
    total line (files, bytes, rate, ETA), redrawn in place at most C{hz}
    times a second.  Each finished file leaves a line above them.  Call it
    with every L{Progress} report, L{finished} with every outcome, and
    L{close} at the end.
    """

    def __init__(self, stream: TextIO, tally: BatchTally, hz: float = 10.0) -> None:
        self.stream = stream
        self.tally = tally
        self.interval = 1.0 / hz
        self._last_draw = float("-inf")
        self._rates: dict[str, _Rate] = {}
        self._drawn = 0

    def __call__(self, p: Progress) -> None:
        now = self.tally.clock()
        self.tally.report(p)
        rate = self._rates.get(p.name)
        if rate is None or rate.phase != p.phase:
            self._rates[p.name] = _Rate(p, now)
        if now - self._last_draw >= self.interval or p.phase == "retrying":
            self._draw(now)

    def finished(self, outcome: FileOutcome) -> None:
        """A file is over: leave its line, and redraw the others."""
        self.tally.finished(outcome)
        self._rates.pop(outcome.name, None)
        width = shutil.get_terminal_size((100, 20)).columns
        result = outcome.result
        if result is not None:
            server = result.servers[-1] if result.servers else None
            if result.skipped:
                line = (f"{outcome.name} skipped: already stored as {result.path} "
                        f"({format_size(result.size)}"
                        + (f", via {server})" if server else ")"))
            else:
                label = "already complete" if result.already_complete else "done"
                line = _stored_line(_file_line(
                    Progress(outcome.name, "done", result.size, result.size, server),
                    0.0, width, label), result.path, label)
        else:
            reason = str(outcome.error)
            if reason.startswith(outcome.name + ": "):
                reason = reason[len(outcome.name) + 2:]
            line = f"{outcome.name} FAILED: {reason}"
        self.stream.write(self._erase() + line.rstrip() + "\n")
        self._drawn = 0
        self._draw(self.tally.clock())

    def close(self) -> None:
        """Erase the live lines (the finished files' lines stay)."""
        self.stream.write(self._erase())
        self.stream.flush()
        self._drawn = 0

    def lines(self, now: float) -> list[str]:
        """
        The live lines at time C{now}: the files under way (as many as the
        terminal has room for), then the total.
        """
        size = shutil.get_terminal_size((100, 20))
        width = size.columns
        tally = self.tally
        active = list(tally.active.values())
        room = max(1, size.lines - 2)
        shown = active if len(active) <= room else active[: room - 1]
        lines = [
            _file_line(p, self._rates[p.name].of(p, now) if p.name in self._rates else 0.0,
                       width)
            for p in shown
        ]
        if len(shown) < len(active):
            lines.append(f"... and {len(active) - len(shown)} more under way"[: width - 1])
        if tally.files > 1:
            tail = (f" {tally.fraction():4.0%} {format_size(tally.bytes_done)}/"
                    f"{format_size(tally.total_bytes)} {format_size(tally.rate())}/s "
                    f"{format_eta(tally.eta())}")
            lines.append(bar_line(tally.files_text() + " ", tally.fraction(), tail, width))
        return lines

    def _draw(self, now: float) -> None:
        self._last_draw = now
        lines = self.lines(now)
        self.stream.write(self._erase() + "".join(line.rstrip() + "\n" for line in lines))
        self.stream.flush()
        self._drawn = len(lines)

    def _erase(self) -> str:
        """Back to the first live line, and clear to the end of the screen."""
        return f"\x1b[{self._drawn}A\r\x1b[J" if self._drawn else ""


class PlainProgress:
    """
    Progress for a log (C{imgresume upload} when stderr is not a
    terminal): every C{interval} seconds, one line with the batch's files,
    bytes, rate and ETA, and at once a line for every retry a file waits
    for (why, which retry, when).  Call it with every L{Progress} report,
    L{finished} with every outcome; L{start} and L{close} the periodic
    lines.
    """

    def __init__(self, stream: TextIO, tally: BatchTally, clock: IReactorTime,
                 interval: float = 10.0) -> None:
        self.stream = stream
        self.tally = tally
        self.interval = interval
        self._loop = LoopingCall(self.report)
        self._loop.clock = clock

    def __call__(self, p: Progress) -> None:
        self.tally.report(p)
        if p.phase == "retrying":
            self.stream.write(f"imgresume: {p.name}: {p.note}\n")
            self.stream.flush()

    def finished(self, outcome: FileOutcome) -> None:
        """Count a file that is over."""
        self.tally.finished(outcome)

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

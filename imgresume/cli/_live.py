# -*- test-case-name: tests.cli.test_upload -*-
"""
The live display of a batch on a terminal, drawn with C{rich}: a bar per
file under way, a total line, and a status line saying what the client
waits for (a retry and why, a resume on another server) (L{BatchProgress});
the same for one file at a time (L{ProgressBar}, for C{imgresume.demo}).  Only this module
imports C{rich}, and only C{imgresume upload} on a terminal imports this
module: a run whose stderr is not a terminal, or with C{--json} or C{-q},
never loads C{rich} (tests/cli/test_startup.py).
"""

from __future__ import annotations

import io
import time
from typing import Any, Callable, Iterable, TextIO

from rich.console import Console
from rich.progress import BarColumn, ProgressColumn, TaskProgressColumn, TextColumn
from rich.progress import Progress as RichProgress
from rich.text import Text

from imgresume.cli._progress import BatchTally, format_eta, resumed_note
from imgresume.client import FileOutcome, Progress
from imgresume.sizes import format_size

#: How long the status line keeps a resume it reported (seconds).
RESUMED_SHOWN_FOR = 5.0


class _Sizes(ProgressColumn):
    """C{1.0 KiB/4.0 KiB}, in the units of the rest of imgresume."""

    def render(self, task: Any) -> Text:
        return Text(f"{format_size(task.fields['done'])}/{format_size(task.fields['size'])}")


class _Rate(ProgressColumn):
    """The rate since the file's phase began, or the batch's; none while waiting."""

    def render(self, task: Any) -> Text:
        if task.fields["phase"] in ("retrying", "done"):
            return Text("")
        return Text(f"{format_size(int(task.fields['rate']))}/s")


class _Eta(ProgressColumn):
    """C{ETA 42s}; nothing for a file done or waiting."""

    def render(self, task: Any) -> Text:
        if task.fields["phase"] in ("retrying", "done"):
            return Text("")
        return Text(format_eta(task.fields["eta"]))


class _Bars(RichProgress):
    """rich's Progress, drawing the files shown, the total and the status line."""

    display: "BatchProgress | None" = None

    def get_renderables(self) -> Iterable[Any]:
        if self.display is not None:
            yield from self.display.renderables()


def _label(p: Progress) -> str:
    """A file's name and what it is doing, cut to 30 characters of name."""
    name = p.name[:30]
    if p.phase == "hashing":
        return f"{name} {'connecting' if p.total and p.done >= p.total else 'hashing'}"
    if p.phase == "retrying":
        return f"{name} waiting"
    return name


class BatchProgress:
    """
    The live display of a batch on a terminal (C{imgresume upload} when
    stderr is one), drawn with C{rich}: a bar per file under way (name,
    percentage, sizes, rate, ETA, server) and, for several files, a total
    line (files, bytes, rate, ETA) and, below, a status line for what the
    client waits for: C{a.tif: connection refused by 10.0.0.5:7000, retry
    3/10 in 2.0 s}, C{a.tif: resuming at 104.0 MiB on node-2}.  Redrawn in
    place at most C{hz} times a second; each finished file leaves a line
    above.  Call it with every L{Progress} report, L{finished} with every
    outcome, and L{close} at the end.

    @param console: where to draw (default: a C{rich} console on C{stream}).
    @param redirect_stdout: while drawn, print what goes to C{sys.stdout}
        above the live lines (for a program that prints as it goes).
    @param verbose: (C{-v}) also leave a line above the live ones for every
        retry and every resume, not only the passing status line.
    """

    #: It shows each file's end itself (the reporter need not).
    shows_outcomes = True

    def __init__(self, stream: TextIO, tally: BatchTally, hz: float = 10.0,
                 console: Console | None = None, redirect_stdout: bool = False,
                 verbose: bool = False) -> None:
        self.tally = tally
        self.verbose = verbose
        self.interval = 1.0 / hz
        self.console = console if console is not None else Console(
            file=stream, highlight=False)
        self._last_draw = float("-inf")
        self._phases: dict[str, str] = {}
        self._servers: dict[str, str | None] = {}
        self._tasks: dict[str, Any] = {}
        #: The status line, and when it was set.
        self.status: str = ""
        self._status_at = 0.0
        self.bars = _Bars(
            TextColumn("{task.fields[label]}"), BarColumn(bar_width=None),
            TaskProgressColumn(), _Sizes(), _Rate(), _Eta(),
            TextColumn("{task.fields[server]}"),
            console=self.console, auto_refresh=False, transient=True, expand=True,
            get_time=tally.clock, redirect_stdout=redirect_stdout, redirect_stderr=False,
        )
        self.bars.display = self
        self._total = self.bars.add_task("total", total=tally.total_bytes or 1, label="",
                                         server="", rate=0.0, eta=None, phase="total",
                                         done=0, size=tally.total_bytes)
        #: When each file's phase began, and its bytes then: for its rate.
        self._starts: dict[str, tuple[float, int]] = {}
        self.bars.start()

    def __call__(self, p: Progress) -> None:
        now = self.tally.clock()
        self.tally.report(p)
        before = self._phases.get(p.name)
        server_before = self._servers.get(p.name)
        if before != p.phase:
            self._starts[p.name] = (now, p.done)
        t0, d0 = self._starts[p.name]
        rate = (p.done - d0) / (now - t0) if now > t0 else 0.0
        fields = dict(label=_label(p), server=f"via {p.server_id}" if p.server_id else "",
                      phase=p.phase, rate=rate, done=p.done, size=p.total,
                      eta=(p.total - p.done) / rate if rate > 0 else None)
        # rich's bar and percentage: an empty file is whole (100%).
        total, completed = (p.total, p.done) if p.total else (1, 1)
        task = self._tasks.get(p.name)
        if task is None:
            task = self._tasks[p.name] = self.bars.add_task(
                p.name, total=total, completed=completed, **fields)
        elif before != p.phase:
            self.bars.reset(task, total=total, completed=completed, **fields)
        else:
            self.bars.update(task, total=total, completed=completed, **fields)
        if p.phase == "retrying":
            self._set_status(f"{p.name}: {p.note}", now)
        elif p.phase == "uploading" and before == "retrying":
            self._set_status(resumed_note(p, server_before), now)
        self._phases[p.name] = p.phase
        if p.server_id:
            self._servers[p.name] = p.server_id
        if now - self._last_draw >= self.interval or p.phase == "retrying" or (
                before == "retrying"):
            self._draw(now)

    def finished(self, outcome: FileOutcome) -> None:
        """A file is over: leave its line above the live ones, and redraw."""
        self.tally.finished(outcome)
        task = self._tasks.pop(outcome.name, None)
        if task is not None:
            self.bars.remove_task(task)
        self._phases.pop(outcome.name, None)
        self._servers.pop(outcome.name, None)
        self._starts.pop(outcome.name, None)
        self.console.print(Text(finished_line(outcome)), soft_wrap=True)
        self._draw(self.tally.clock())

    def close(self) -> None:
        """Erase the live lines (the finished files' lines stay)."""
        self.bars.stop()

    def _set_status(self, text: str, now: float) -> None:
        self.status, self._status_at = text, now
        if self.verbose:  # and a line that stays, above the live ones
            self.console.print(Text(f"imgresume: {text}"), soft_wrap=True)

    def _draw(self, now: float) -> None:
        self._last_draw = now
        tally = self.tally
        done = tally.bytes_done
        self.bars.update(self._total, completed=done if tally.total_bytes else 1,
                         label=tally.files_text(), rate=tally.rate(), eta=tally.eta(),
                         phase="total", done=done)
        if self.status.count(": resuming at ") and now - self._status_at > RESUMED_SHOWN_FOR:
            self.status = ""
        self.bars.refresh()

    def renderables(self) -> list[Any]:
        """
        What the live part shows: the files under way (as many as the
        terminal has room for) and the total in one table, how many more
        files are under way if not all fit, then the status line.
        """
        bars = self.bars
        files = [t for t in bars.tasks if t.id != self._total]
        room = max(1, self.console.size.height - 3)
        shown = files if len(files) <= room else files[: room - 1]
        total = [t for t in bars.tasks if t.id == self._total and self.tally.files > 1]
        out: list[Any] = []
        if shown or total:
            out.append(bars.make_tasks_table([*shown, *total]))  # one table: aligned
        if len(shown) < len(files):
            out.append(Text(f"... and {len(files) - len(shown)} more under way"))
        if self.status:
            out.append(Text(self.status, overflow="ellipsis", no_wrap=True))
        return out

    def lines(self) -> list[str]:
        """The live part as plain text lines (for tests and logs)."""
        plain = Console(file=io.StringIO(), width=self.console.size.width,
                        height=self.console.size.height, color_system=None,
                        force_terminal=False, highlight=False)
        with plain.capture() as captured:
            for renderable in self.renderables():
                plain.print(renderable)
        return [line.rstrip() for line in captured.get().splitlines()]


class ProgressBar:
    """
    A callback for L{imgresume.client.Uploader.upload} uploading one file
    at a time (C{imgresume.demo} uses it): each file's bar, rate, ETA and
    server, and the status line of L{BatchProgress}, while it is under way;
    then one line saying where it is stored.  Lines printed to
    C{sys.stdout} meanwhile appear above the bar.
    """

    def __init__(self, stream: TextIO, hz: float = 10.0,
                 clock: Callable[[], float] = time.monotonic,
                 console: Console | None = None) -> None:
        self.stream = stream
        self.hz = hz
        self.clock = clock
        self.console = console
        self._display: BatchProgress | None = None
        self._name: str | None = None

    def __call__(self, p: Progress) -> None:
        if self._display is None or p.name != self._name:
            self.close()
            self._name = p.name
            self._display = BatchProgress(
                self.stream, BatchTally({p.name: p.total}, self.clock), self.hz,
                self.console, redirect_stdout=True)
        if p.phase != "done":
            self._display(p)
            return
        display = self._display
        display.close()
        self._display = None
        via = f", via {p.server_id}" if p.server_id else ""
        stored = f", stored as {p.path}" if p.path else ""
        display.console.print(Text(f"{p.name} done: {format_size(p.total)}{via}{stored}"),
                              soft_wrap=True)

    def close(self) -> None:
        """Erase the bar of a file left unfinished."""
        if self._display is not None:
            self._display.close()
            self._display = None


def finished_line(outcome: FileOutcome) -> str:
    """The line a finished file leaves: stored where, skipped, or FAILED and why."""
    result = outcome.result
    if result is None:
        reason = str(outcome.error)
        if reason.startswith(outcome.name + ": "):
            reason = reason[len(outcome.name) + 2:]
        return f"{outcome.name} FAILED: {reason}"
    server = result.servers[-1] if result.servers else None
    via = f", via {server}" if server else ""
    if result.skipped:
        return (f"{outcome.name} skipped: already stored as {result.path} "
                f"({format_size(result.size)}{via})")
    label = "already complete" if result.already_complete else "done"
    stored = f", {'already ' if result.already_complete else ''}stored as {result.path}"
    return f"{outcome.name} {label}: {format_size(result.size)}{via}{stored}"

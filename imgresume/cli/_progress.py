# -*- test-case-name: tests.test_cli -*-
"""A one-line progress bar for terminals, fed with L{Progress} reports."""

from __future__ import annotations

import shutil
import time
from typing import Callable, TextIO

from imgresume.client import Progress
from imgresume.sizes import format_size


class ProgressBar:
    """
    Draws C{name [#####.....] 42% 120.0 MiB/286.1 MiB 95.2 MiB/s ETA 2s via
    server} on one line of C{stream}, at most C{hz} times a second.  Used by
    C{imgresume upload} when stderr is a terminal.
    """

    def __init__(
        self, stream: TextIO, hz: float = 10.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.stream = stream
        self.interval = 1.0 / hz
        self.clock = clock
        self._last_draw = float("-inf")
        self._rate_start: tuple[float, int] | None = None
        self._phase: tuple[str, str] | None = None

    def __call__(self, p: Progress) -> None:
        now = self.clock()
        if self._phase != (p.name, p.phase):
            self._phase = (p.name, p.phase)
            self._rate_start = (now, p.done)
        if p.phase != "done" and now - self._last_draw < self.interval:
            return
        self._last_draw = now
        self.stream.write("\r" + self.render(p, now) + ("\n" if p.phase == "done" else ""))
        self.stream.flush()

    def render(self, p: Progress, now: float) -> str:
        """The line for report C{p} at time C{now}."""
        width = shutil.get_terminal_size((100, 20)).columns
        fraction = p.done / p.total if p.total else 1.0
        assert self._rate_start is not None
        t0, d0 = self._rate_start
        rate = (p.done - d0) / (now - t0) if now > t0 else 0.0
        eta = (p.total - p.done) / rate if rate > 0 else None
        label = {"hashing": "hashing", "uploading": "", "done": "done"}[p.phase]
        tail = f" {fraction:4.0%} {format_size(p.done)}/{format_size(p.total)}"
        if p.phase != "done":
            tail += f" {format_size(rate)}/s"
            tail += f" ETA {eta:.0f}s" if eta is not None else " ETA ?"
        if p.server_id:
            tail += f" via {p.server_id}"
        head = f"{p.name[:30]} {label}".rstrip() + " "
        bar_width = max(10, width - len(head) - len(tail) - 3)
        filled = int(bar_width * fraction)
        line = f"{head}[{'#' * filled}{'.' * (bar_width - filled)}]{tail}"
        return line[: width - 1].ljust(width - 1)

# -*- test-case-name: tests.balancer.test_splice -*-
"""
The splice relay's pipes: L{Pipe}, one kernel pipe, and L{PipePool}, which
lends a pipe to a direction only while bytes are in it.

A pipe's capacity is what one C{splice(2)} call can move, and what a slow
peer can make the balancer hold per direction. Large pipes (1 MiB) cut the
calls per byte of a fast stream by 16 against the kernel's default (64
KiB); their number is capped, so the memory they can hold is capped too.
The kernel charges pipe capacity to the user: past
C{/proc/sys/fs/pipe-user-pages-soft} (16,384 pages, 64 MiB, by default) an
unprivileged process gets no more large pipes, and new pipes of two pages;
they still work, at more calls per byte. The large pipes take a quarter of
that allowance.
"""

from __future__ import annotations

import fcntl
import os

#: The kernel's default pipe size, and the least a pipe holds.
SMALL_PIPE = 64 * 1024
#: The size of the first L{LARGE_PIPES} pipes (F_SETPIPE_SZ): one splice
#: moves up to this much, so a fast stream costs fewer calls per byte.
LARGE_PIPE = 1024 * 1024
#: At most this many large pipes exist at once (in use or idle); the others
#: keep the kernel's default size. Together these bound what the pipes hold:
#: LARGE_PIPES x LARGE_PIPE, plus SMALL_PIPE per other waiting direction.
LARGE_PIPES = 16
#: Idle pipes the pool keeps open for reuse (2 descriptors each).
POOL_KEEP = 16


class Pipe:
    """One kernel pipe (non-blocking, close-on-exec): C{r} and C{w} ends."""

    __slots__ = ("r", "w", "size")

    def __init__(self, size: int = SMALL_PIPE) -> None:
        self.r, self.w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.size = fcntl.fcntl(self.w, fcntl.F_GETPIPE_SZ)
        if size > self.size:
            try:
                self.size = fcntl.fcntl(self.w, fcntl.F_SETPIPE_SZ, size)
            except OSError:
                # Above /proc/sys/fs/pipe-max-size, or the user is over
                # /proc/sys/fs/pipe-user-pages-soft: keep what the kernel gave.
                pass

    def close(self) -> None:
        """Close both ends."""
        os.close(self.r)
        os.close(self.w)


class PipePool:
    """
    The balancer's pipes: L{take} one for a direction that is about to read,
    L{give} it back once empty. The first C{large} pipes made at once are
    C{large_size}, the others the kernel's default; up to C{keep} idle pipes
    stay open for reuse. One per L{imgresume.balancer._splice.Splicer}.
    """

    def __init__(
        self,
        keep: int | None = None,
        large: int | None = None,
        large_size: int | None = None,
    ) -> None:
        self.keep = POOL_KEEP if keep is None else keep
        self.large = LARGE_PIPES if large is None else large
        self.large_size = LARGE_PIPE if large_size is None else large_size
        #: Pipes taken and not given back.
        self.in_use = 0
        self._idle: list[Pipe] = []
        self._large_open = 0
        self._closed = False

    def take(self) -> Pipe:
        """An empty pipe; raises L{OSError} if none can be made (EMFILE...)."""
        if self._idle:
            pipe = self._idle.pop()
        elif self._large_open < self.large:
            pipe = Pipe(self.large_size)
            if pipe.size > SMALL_PIPE:
                self._large_open += 1
        else:
            pipe = Pipe()
        self.in_use += 1
        return pipe

    def give(self, pipe: Pipe, empty: bool = True) -> None:
        """Return C{pipe}; one that may still hold bytes is closed."""
        self.in_use -= 1
        if empty and not self._closed and len(self._idle) < self.keep:
            self._idle.append(pipe)
        else:
            self._close(pipe)

    def _close(self, pipe: Pipe) -> None:
        if pipe.size > SMALL_PIPE:
            self._large_open -= 1
        pipe.close()

    @property
    def idle(self) -> int:
        """Idle pipes kept open."""
        return len(self._idle)

    def clear(self) -> None:
        """Close the idle pipes."""
        idle, self._idle = self._idle, []
        for pipe in idle:
            self._close(pipe)

    def close(self) -> None:
        """Close the idle pipes, and every pipe given back from now on."""
        self._closed = True
        self.clear()

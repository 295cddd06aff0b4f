"""
Runners for storage and journal work (what the code calls as
C{run(f, *args) -> Deferred} instead of a thread pool): L{sync_run} does the
work at once, on this thread; L{QueuedRunner} holds each call until the test
runs it, so a test decides when a "disk thread" finishes.
"""

from __future__ import annotations

from typing import Any, Callable

from twisted.internet.defer import Deferred, maybeDeferred


def sync_run(f: Callable[..., Any], *args: Any, **kwargs: Any) -> Deferred[Any]:
    """Do the "blocking" work at once, on this thread; its Deferred has fired."""
    return maybeDeferred(f, *args, **kwargs)


class QueuedRunner:
    """
    Pass it where code takes a C{run(f, *args) -> Deferred} (storage
    backends, the client's journal queue).  Calls wait in L{calls}, oldest
    first, as C{(f, args)}; L{step} runs the oldest, L{run_all} runs them and
    what they queue until none is left.
    """

    def __init__(self) -> None:
        self._held: list[tuple[Deferred[Any], Callable[..., Any], tuple[Any, ...]]] = []

    def __call__(self, f: Callable[..., Any], *args: Any) -> Deferred[Any]:
        d: Deferred[Any] = Deferred()
        self._held.append((d, f, args))
        return d

    @property
    def calls(self) -> list[tuple[Callable[..., Any], tuple[Any, ...]]]:
        """The calls held, oldest first."""
        return [(f, args) for _, f, args in self._held]

    def __len__(self) -> int:
        return len(self._held)

    def step(self) -> None:
        """Run the oldest held call; its Deferred fires (or fails) with the outcome."""
        d, f, args = self._held.pop(0)
        try:
            result = f(*args)
        except Exception:
            d.errback()
        else:
            d.callback(result)

    def run_all(self) -> None:
        """Run held calls, and those they add, until none is left."""
        while self._held:
            self.step()

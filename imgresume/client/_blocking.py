# -*- test-case-name: tests.client.test_blocking -*-
"""
A blocking wrapper for applications that do not run a reactor: the reactor
runs in a background thread (started on first use) and each call waits for
its uploads there.
"""

from __future__ import annotations

import queue
import signal
import threading
from typing import Any, Sequence

from twisted.python.failure import Failure
from twisted.python.threadable import isInIOThread

_lock = threading.Lock()
_thread: threading.Thread | None = None


def _reactor_in_thread() -> Any:
    global _thread
    from twisted.internet import reactor

    with _lock:
        if _thread is None and not reactor.running:
            _thread = threading.Thread(
                target=reactor.run, kwargs={"installSignalHandlers": False},
                name="imgresume-reactor", daemon=True,
            )
            _thread.start()
    if threading.current_thread() is _thread or (reactor.running and isInIOThread()):
        # Waiting here for work the reactor must do would deadlock.
        raise RuntimeError("upload_files() would block the reactor; use Uploader")
    return reactor


def upload_files(
    endpoint: str, paths: Sequence[str], names: Sequence[str] | None = None, **options: Any
) -> list:
    """
    Upload C{paths} one after another, over one connection while nothing
    breaks, and return their L{imgresume.client.UploadResult}s; raises
    L{imgresume.client.UploadFailed} on the first file that cannot be
    completed.  C{options} are passed to L{imgresume.client.Uploader}.
    Must not be called from the reactor thread.

    Ctrl-C (C{KeyboardInterrupt}) while it waits interrupts the uploads in
    the reactor thread (L{imgresume.client.Uploader.interrupt}) and, once
    the journal holds what they did, raises
    L{imgresume.client.UploadInterrupted} (its C{signal} is C{SIGINT}); if
    every file was complete by then, the C{KeyboardInterrupt} goes on.
    """
    from twisted.internet.defer import Deferred

    from imgresume.client._uploader import Uploader

    reactor = _reactor_in_thread()
    uploader = []
    outcome: queue.Queue[Any] = queue.Queue()

    async def run_all() -> list:
        uploader.append(Uploader(endpoint, reactor=reactor, **options))
        results = []
        async with uploader[0].session() as session:
            for i, path in enumerate(paths):
                results.append(await session.upload(path, names[i] if names else None))
        return results

    reactor.callFromThread(lambda: Deferred.fromCoroutine(run_all()).addBoth(outcome.put))
    try:
        result = outcome.get()
    except KeyboardInterrupt:
        # Calls from this thread run in order: the uploader exists by now
        # (unless it could not be made, and run_all has failed already).
        reactor.callFromThread(
            lambda: uploader and uploader[0].interrupt(signal.SIGINT))
        result = outcome.get()
        if not isinstance(result, Failure):
            raise
    if isinstance(result, Failure):
        result.raiseException()
    return result

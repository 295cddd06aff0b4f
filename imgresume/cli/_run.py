# -*- test-case-name: tests.cli.test_interrupt,tests.cli.test_startup -*-
"""
Running a command on the reactor until it is done, or until SIGINT or
SIGTERM stops it: L{run_on_reactor} and the L{Interruptions} it catches.

The first SIGINT or SIGTERM stops the reactor as Twisted's own handlers
would (C{reactor.stop()} from the reactor thread), so the command's
C{"before", "shutdown"} triggers run while the reactor still serves them:
C{imgresume upload} interrupts its uploads there, waits for the journal and
reports what is unfinished.  The signal is remembered for the exit code:
128 plus its number (130 for SIGINT, 143 for SIGTERM), the shell's
convention.  A second one ends the process at once, by that signal.
"""

from __future__ import annotations

import os
import signal
import sys
from typing import Any, Callable

from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.error import ReactorNotRunning
from twisted.python.failure import Failure

from imgresume._options import EXIT_FAILED

#: The signals that interrupt a command.
SIGNALS = (signal.SIGINT, signal.SIGTERM)

#: Client endpoint types that never use TLS.
PLAIN_ENDPOINT_TYPES = frozenset({"tcp", "unix"})


def without_tls(endpoint: str) -> bool:
    """
    Before the reactor is imported, for a command whose only connections
    go to C{endpoint}: if that is a plain C{tcp:} or C{unix:} endpoint,
    hide pyOpenSSL, and say whether it was hidden.

    Twisted's reactor imports pyOpenSSL, cryptography and service_identity
    as it starts, to offer TLS (C{twisted.internet.posixbase} and C{tcp}):
    about a tenth of a second of a command's start-up.  With pyOpenSSL
    hidden, Twisted takes its own path for a system where it is not
    installed.  Nothing is hidden once the reactor or pyOpenSSL is imported
    (a test process, a program that embeds the command), or for any other
    endpoint type (C{ssl:}, C{tls:}, plugins').
    """
    kind = endpoint.split(":", 1)[0].lower()
    if (kind not in PLAIN_ENDPOINT_TYPES or "twisted.internet.reactor" in sys.modules
            or "OpenSSL" in sys.modules):
        return False
    sys.modules["OpenSSL"] = None  # type: ignore[assignment]  # import fails: "not installed"
    return True


class Interruptions:
    """
    SIGINT and SIGTERM for a command on the reactor: L{install} them once
    the reactor runs (Twisted installs its own handlers as it starts, and
    these replace them).  Made by L{run_on_reactor}; the commands read
    L{signal} to report an interruption.
    """

    def __init__(self, reactor: Any) -> None:
        self.reactor = reactor
        #: The first signal received, or None.
        self.signal: int | None = None

    def install(self) -> None:
        """Catch SIGINT and SIGTERM from now on."""
        for number in SIGNALS:
            signal.signal(number, self._received)

    def exit_code(self) -> int | None:
        """128 plus the signal's number, or None without one."""
        return None if self.signal is None else 128 + self.signal

    def _received(self, number: int, frame: Any) -> None:
        if self.signal is not None:
            # The second one: stop waiting, and die of it.
            signal.signal(number, signal.SIG_DFL)
            os.kill(os.getpid(), number)
            return
        self.signal = number
        self.reactor.callFromThread(self._stop)

    def _stop(self) -> None:
        try:
            self.reactor.stop()
        except ReactorNotRunning:
            pass


def run_on_reactor(
    command: Callable[[Any, Interruptions], Deferred[int]], reactor: Any = None
) -> int:
    """
    Run C{command(reactor, interruptions)} on the (global) reactor until
    its Deferred fires with an exit code, then stop the reactor; or until a
    signal stops it.  Like C{twisted.internet.task.react}, but a signal
    that ends the run is the exit code (128 plus its number) unless the
    command had finished before it came.

    @return: the exit code.
    """
    if reactor is None:
        from twisted.internet import reactor as global_reactor

        reactor = global_reactor
    interruptions = Interruptions(reactor)
    codes: list[int] = []
    signal_before_end: list[int | None] = []
    stopping = False

    def on_shutdown() -> None:
        nonlocal stopping
        stopping = True

    def finished(result: Any) -> None:
        signal_before_end.append(interruptions.signal)
        if isinstance(result, Failure):
            if result.check(SystemExit):
                codes.append(result.value.code)
            else:
                print("imgresume: unexpected error:", file=sys.stderr)
                result.printTraceback(file=sys.stderr)
                codes.append(EXIT_FAILED)
        else:
            codes.append(result)
        if not stopping:
            try:
                reactor.stop()
            except ReactorNotRunning:
                pass

    def start() -> None:
        interruptions.install()
        maybeDeferred(command, reactor, interruptions).addBoth(finished)

    reactor.addSystemEventTrigger("before", "shutdown", on_shutdown)
    reactor.callWhenRunning(start)
    reactor.run()
    if codes and signal_before_end[0] is None and interruptions.signal is not None:
        return codes[0]  # done before the signal came: what it did stands
    if interruptions.signal is not None:
        if not codes:  # the command could not say more
            print(f"imgresume: interrupted by {signal.Signals(interruptions.signal).name}",
                  file=sys.stderr)
        return 128 + interruptions.signal
    return codes[0] if codes else EXIT_FAILED

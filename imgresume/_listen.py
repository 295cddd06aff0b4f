# -*- test-case-name: tests.server.test_startup -*-
"""
Listening the way twistd users expect: a listener that cannot listen (the
port is taken, or not this user's to take) says so in one line on the
terminal and ends twistd with a non-zero status, instead of a traceback
that only the log file shows.  Used for the upload listener and the
C{--metrics} endpoint of servers and balancers.
"""

from __future__ import annotations

import os
import sys
from typing import Any

from twisted.application.internet import StreamServerEndpointService
from twisted.internet.endpoints import serverFromString
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IProtocolFactory
from twisted.logger import Logger

log = Logger()


class CannotListen(SystemExit, Exception):
    """
    A listener could not listen; the message says where and why
    (C{cannot listen on tcp:9001: address already in use}).

    An L{Exception}, so that a daemonizing twistd reports it to the
    terminal it started from ("An error has occurred: ..."); a
    L{SystemExit} with status 1, so that a C{twistd -n} run ends without a
    traceback (L{cannot_listen} has told the terminal and the log).
    """

    def __init__(self, message: str) -> None:
        super().__init__(1)
        self.message = message

    def __str__(self) -> str:
        return self.message


# Reported by its bare name: twistd passes only the first 100 bytes of a
# daemon's start error to the terminal.
CannotListen.__module__ = "builtins"


def _reason(error: CannotListenError) -> str:
    socket_error = error.socketError
    code = getattr(socket_error, "errno", None)
    if code:
        return os.strerror(code).lower()
    return str(socket_error)


def cannot_listen(description: str, error: CannotListenError) -> CannotListen:
    """
    The L{CannotListen} for C{error}, logged, and written to the terminal
    when twistd has sent standard error to its log.
    """
    message = f"cannot listen on {description}: {_reason(error)}"
    log.error("{message}", message=message, endpoint=description)
    terminal = sys.__stderr__
    if terminal is not None and sys.stderr is not terminal:
        try:
            terminal.write(f"imgresume: {message}\n")
            terminal.flush()
        except (OSError, ValueError):
            pass
    return CannotListen(message)


class ListenerService(StreamServerEndpointService):
    """
    A C{StreamServerEndpointService} on the server endpoint string
    C{description} that fails to start with L{CannotListen} (see
    L{cannot_listen}) when it cannot listen.  Built by
    L{imgresume.server.make_server_service}, by the balancer's
    C{makeService} and by L{imgresume.metrics.metrics_service}.
    """

    def __init__(self, reactor: Any, description: str, factory: IProtocolFactory) -> None:
        super().__init__(serverFromString(reactor, description), factory)
        self._raiseSynchronously = True
        self.description = description

    def privilegedStartService(self) -> None:
        try:
            super().privilegedStartService()
        except CannotListenError as e:
            raise cannot_listen(self.description, e) from None

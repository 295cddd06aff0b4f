# -*- test-case-name: tests.balancer.test_proxy -*-
"""
The backend side of a proxied pair, and what the balancer tells about
backends and clients it cannot serve.

L{BackendFactory} builds the one L{BackendProtocol} of a connect attempt;
the protocol hands everything it hears to its L{Frontend} (the client
connection, L{imgresume.balancer._proxy.FrontendProtocol}).  The ERROR
frames the balancer itself sends (L{error_frame}), and the short reason a
connect failed (L{describe_failure}, for logs, ERROR messages and health
check results), live here too.
"""

from __future__ import annotations

import os
from typing import Any, Protocol as TypingProtocol

from twisted.internet.error import (
    ConnectError,
    ConnectionRefusedError,
    DNSLookupError,
    NoRouteError,
)
from twisted.internet.interfaces import IAddress
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.python.failure import Failure

from ..errors import ErrorCode
from ..protocol import Error, encode

#: The ERROR code a client gets when no backend accepted its connection.
NO_BACKEND = int(ErrorCode.NO_BACKEND)
#: The retry hint of a NO_BACKEND ERROR frame.
NO_BACKEND_RETRY_AFTER_MS = 1000
#: Longest ERROR message the balancer sends, in UTF-8 bytes.
MAX_ERROR_MESSAGE = 1024


def error_frame(code: int, message: str, retry_after_ms: int = 0, offset: int = 0) -> bytes:
    """
    Encode one imgresume ERROR frame. Messages longer than
    C{MAX_ERROR_MESSAGE} bytes are cut (on a character boundary) and end in
    C{"..."}.
    """
    encoded = message.encode("utf-8")
    if len(encoded) > MAX_ERROR_MESSAGE:
        message = encoded[: MAX_ERROR_MESSAGE - 3].decode("utf-8", "ignore") + "..."
    return encode(Error(code, message, offset, retry_after_ms))


def describe_failure(failure: Failure) -> str:
    """
    A short reason for a failed connect, for logs and the ERROR message.
    """
    if failure.check(ConnectionRefusedError):
        return "refused"
    if failure.check(DNSLookupError):
        return "DNS lookup failed"
    if failure.check(NoRouteError):
        return "no route"
    errno = getattr(failure.value, "osError", None)
    if failure.check(ConnectError) and isinstance(errno, int):
        return os.strerror(errno)
    return failure.getErrorMessage() or failure.type.__name__


def close_after_flush(transport: Any) -> None:
    """
    Close the survivor of a proxied pair once its write buffer is flushed.

    Its producer (the other, now closed, transport) is unregistered first: a
    transport that drains its buffer while its streaming producer is paused
    resumes the producer instead of finishing its own close.
    """
    transport.unregisterProducer()
    transport.loseConnection()


class Frontend(TypingProtocol):
    """
    What a L{BackendProtocol} reports to: the client side of the pair.
    """

    def backend_data_received(self, data: bytes) -> None:
        """Bytes from the backend, to be forwarded to the client."""

    def backend_connection_lost(self, reason: Failure) -> None:
        """The backend connection ended."""


class BackendProtocol(Protocol):
    """
    The balancer's connection to one backend. Thin on purpose: everything it
    hears goes to its L{Frontend}.
    """

    def __init__(self, frontend: Frontend) -> None:
        self._frontend = frontend

    def dataReceived(self, data: bytes) -> None:
        self._frontend.backend_data_received(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._frontend.backend_connection_lost(reason)


class BackendFactory(Factory):
    """
    Builds the one L{BackendProtocol} of a connect attempt. Quiet: one is
    made per client connection.
    """

    noisy = False

    def __init__(self, frontend: Frontend) -> None:
        self._frontend = frontend

    def buildProtocol(self, addr: IAddress) -> BackendProtocol:
        return BackendProtocol(self._frontend)

# -*- test-case-name: tests.server.test_faults -*-
"""
What a connection reports of what its peer gets wrong: requests refused
(by the protocol machine itself, by a limit, by storage for the peer's
reasons) and errors that end the connection.  L{PeerFaults} logs them
through the server's L{PeerLogLimiter <imgresume.logs.PeerLogLimiter>}, so
that a peer sending garbage as fast as it can costs a few lines a minute,
counts them in the metrics, and tells the hooks about refused UPLOADs as
about any other refused upload.
"""

from __future__ import annotations

from typing import Any, Callable

from twisted.logger import Logger

from imgresume.errors import ErrorCode
from imgresume.logs import PeerLogLimiter, escape
from imgresume.metrics import ServerMetrics
from imgresume.protocol import Hello, Refusal, UploadRequested
from imgresume.server._handshake import is_health_check
from imgresume.server._upload_events import UploadEventContext

#: Errors a client earns by what it sends (or fails to send), not the
#: server's or the storage's trouble: logged at a bounded rate per peer.
PEER_FAULTS = frozenset({
    ErrorCode.MALFORMED_FRAME, ErrorCode.UNSUPPORTED_VERSION, ErrorCode.UNEXPECTED_FRAME,
    ErrorCode.FRAME_TOO_LARGE, ErrorCode.HANDSHAKE_REJECTED, ErrorCode.TIMEOUT,
    ErrorCode.INVALID_NAME, ErrorCode.FILE_TOO_LARGE, ErrorCode.INVALID_METADATA,
    ErrorCode.UNKNOWN_UPLOAD, ErrorCode.QUOTA_EXCEEDED, ErrorCode.OFFSET_MISMATCH,
    ErrorCode.CHECKSUM_MISMATCH, ErrorCode.SIZE_EXCEEDED, ErrorCode.INCOMPLETE,
})

#: The kind of a connection closed before its handshake, in summary lines.
CLOSED_EARLY = "closed before the handshake"


def describe_peer(transport: Any) -> str:
    """A connection's peer for logs, escaped: C{192.0.2.7:5000}, C{[2001:db8::1]:5000}."""
    if transport is None:
        return "?"
    address = transport.getPeer()
    host = getattr(address, "host", None)
    if host is None:
        return escape(getattr(address, "name", None) or "local")
    return escape(f"[{host}]:{address.port}" if ":" in host else f"{host}:{address.port}")


def peer_host(transport: Any) -> str:
    """A connection's peer without the port, escaped: what L{PeerFaults} counts by."""
    address = transport.getPeer() if transport is not None else None
    return escape(getattr(address, "host", None) or "local")


class PeerFaults:
    """
    One connection's reports of its peer's faults.  Owned by
    L{imgresume.server._protocol.UploadServerProtocol}, which calls L{warn}
    for each error it logs, L{fatal} before logging the error that ends the
    connection, L{refused} for each request the machine refused by itself,
    and L{quiet_close} to know whether to log the connection's close.

    @param peer_host: gives the peer's address without the port, what the
        limiter counts by (asked each time: a PROXY-protocol wrapper learns
        the real address only after the connection is made).
    """

    def __init__(self, log: Logger, limiter: PeerLogLimiter, metrics: ServerMetrics,
                 events: UploadEventContext, peer_host: Callable[[], str]) -> None:
        self._log = log
        self._limiter = limiter
        self._metrics = metrics
        self._events = events
        self._peer_host = peer_host
        #: Whether the fault that ends the connection was logged in full
        #: (False: only counted; None: there is none yet).
        self._fatal_shown: bool | None = None

    def warn(self, code: ErrorCode, format: str, /, **fields: Any) -> None:
        """Log a warning about error C{code}: at a bounded rate if it is the peer's fault."""
        if code not in PEER_FAULTS or self._limiter.allow(self._peer_host(), code.name):
            self._log.warn(format, **fields)

    def fatal(self, code: ErrorCode) -> bool:
        """
        Whether to log the error C{code} that ends the connection (and the
        lines leading to it) in full.  For a peer's fault this is decided
        once, at a bounded rate per peer; the connection's later lines about
        it follow that decision, its close included.
        """
        if code not in PEER_FAULTS:
            return True
        if self._fatal_shown is None:
            self._fatal_shown = self._limiter.allow(self._peer_host(), code.name)
        return self._fatal_shown

    def quiet_close(self, hello: Hello | None, client_id: str | None) -> bool:
        """
        Whether the connection's close goes unlogged: a balancer's health
        check, a connection whose fault was only counted, or (beyond the
        bounded rate) one closed before its handshake (port scans, TCP
        health checks).
        """
        if is_health_check(hello) or self._fatal_shown is False:
            return True
        if client_id is None and self._fatal_shown is None:
            return not self._limiter.allow(self._peer_host(), CLOSED_EARLY)
        return False

    def refused(self, refusal: Refusal, client_id: str | None,
                upload_id: str | None) -> None:
        """
        The machine refused a request by itself (and answered it): count
        it, log it, and for an UPLOAD tell the hooks (C{upload.failed}).
        """
        error, code = refusal.error, refusal.error.code
        if refusal.upload is None:  # a DATA packet or end of upload: the transfer goes on
            self._metrics.transfer_errors.inc(code=code.name)
            self.warn(code, "upload {upload_id}: {code}: {error}", upload_id=upload_id,
                      code=code.name, error=escape(error.message))
            return
        up = refusal.upload
        self.warn(code, "upload refused: {name} ({size} bytes) by {client}: {code}: {error}",
                  name=escape(up.name), size=up.size, client=escape(client_id),
                  code=code.name, error=escape(error.message))
        self._events.requested(client_id, UploadRequested(up))
        self._events.failed(error)

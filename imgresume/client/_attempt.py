# -*- test-case-name: tests.test_client -*-
"""
One connection's worth of an upload: the Twisted adapter that drives a
sans-IO L{ClientConnection} over a transport, reads the local file off the
reactor thread and keeps a window of DATA packets in flight.

The uploader (L{imgresume.client._uploader}) makes one L{UploadAttempt} per
connection and decides, from how it ended, whether to reconnect.
"""

from __future__ import annotations

from typing import Any, Callable

import attrs
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from imgresume.client._source import LocalFile
from imgresume.errors import ImgresumeError, Scope
from imgresume.protocol import (
    Accepted,
    ChunkAcked,
    ClientConnection,
    ClientState,
    Completed,
    ErrorReceived,
    Ponged,
    Upload,
    UploadAccepted,
    UploadCompleted,
    Welcomed,
)


class AttemptFailed(Exception):
    """Base of the ways an attempt ends without an answer from the server."""

    retryable = True


class ConnectionBroken(AttemptFailed):
    """The connection closed before the upload completed."""


class Stalled(AttemptFailed):
    """No frame arrived for longer than the stall timeout; the client gave up."""


class ResidualMismatch(AttemptFailed):
    """
    The residual on the server is not a prefix of this local file (different
    size, SHA-256 or last committed range): start a fresh upload.
    """


@attrs.define
class AttemptStats:
    """What one attempt did, for the uploader's result."""

    server_id: str | None = None
    upload_id: str | None = None
    accepted_offset: int | None = None
    acked: int = 0
    bytes_sent: int = 0
    rewinds: int = 0


class UploadAttempt(Protocol):
    """
    Upload (or resume) one file over one connection.

    C{result} fires with the server's L{Completed} or fails with an
    L{ImgresumeError} from the server or an L{AttemptFailed}.
    """

    log = Logger()

    def __init__(
        self,
        source: LocalFile,
        request: Upload,
        clock: IReactorTime,
        *,
        client_id: str,
        key: bytes | None = None,
        upload_id: str | None = None,
        window: int = 8,
        chunk_size: int | None = None,
        stall_timeout: float = 30.0,
        on_progress: Callable[[int], None] = lambda offset: None,
        on_upload_id: Callable[[str], None] = lambda upload_id: None,
    ) -> None:
        self.source = source
        self.request = request
        self.clock = clock
        self.upload_id = upload_id
        self.window = max(1, window)
        self.chunk_size = chunk_size
        self.stall_timeout = stall_timeout
        self.on_progress = on_progress
        self.on_upload_id = on_upload_id
        self.machine = ClientConnection(client_id, key=key)
        self.stats = AttemptStats()
        self.result: Deferred[Completed] = Deferred()
        self._reading = False
        self._timer: IDelayedCall | None = None

    # Connection --------------------------------------------------------

    def connectionMade(self) -> None:
        self.machine.hello()
        self._flush()
        self._arm_stall_timer()

    def dataReceived(self, data: bytes) -> None:
        self._arm_stall_timer()
        self.machine.receive_data(data)
        try:
            while not self.result.called:
                event = self.machine.next_event()
                if event is None:
                    break
                self._on_event(event)
        except ImgresumeError as e:
            self._end(Failure(e))
        self._flush()

    def connectionLost(self, reason: Failure) -> None:
        self._cancel_stall_timer()
        self._end(Failure(ConnectionBroken(f"connection lost: {reason.getErrorMessage()}")))

    # Events --------------------------------------------------------------

    def _on_event(self, event: object) -> None:
        m = self.machine
        if isinstance(event, Welcomed):
            self.stats.server_id = event.welcome.server_id
            advertised = event.welcome.options.get("window", "")
            if advertised.isdigit() and int(advertised) > 0:
                self.window = min(self.window, int(advertised))
            if self.upload_id is not None:
                m.resume(self.upload_id)
            else:
                m.upload(self.request)
        elif isinstance(event, UploadAccepted):
            self._accepted(event.accepted)
        elif isinstance(event, ChunkAcked):
            self.stats.acked = event.offset
            self.on_progress(event.offset)
            self._fill()
        elif isinstance(event, ErrorReceived):
            self._error(event.error)
        elif isinstance(event, UploadCompleted):
            self._end(event.completed)
        elif isinstance(event, Ponged):
            pass

    def _accepted(self, accepted: Accepted) -> None:
        req = self.request
        self.stats.upload_id = accepted.upload_id
        self.stats.accepted_offset = accepted.offset
        self.stats.acked = accepted.offset
        if accepted.size != req.size or accepted.sha256 != req.sha256:
            self._end(Failure(ResidualMismatch(
                f"upload {accepted.upload_id} on the server is for a different file "
                f"({accepted.size} bytes) than {req.name} ({req.size} bytes)"
            )))
            return
        self.upload_id = accepted.upload_id
        self.on_upload_id(accepted.upload_id)
        self.on_progress(accepted.offset)
        if accepted.tail_length == 0:
            self._fill()
            return
        # Verified resume: the last committed range must be our bytes.
        self._reading = True
        d = self.source.sha256_of(accepted.tail_start, accepted.tail_length)

        def compare(digest: bytes) -> None:
            self._reading = False
            if digest != accepted.tail_sha256:
                self._end(Failure(ResidualMismatch(
                    f"bytes {accepted.tail_start}-{accepted.tail_start + accepted.tail_length}"
                    f" stored for upload {accepted.upload_id} differ from the local file"
                )))
            else:
                self._fill()
                self._flush()

        d.addCallbacks(compare, self._read_failed)

    def _error(self, error: ImgresumeError) -> None:
        if error.scope is Scope.TRANSFER:
            self.stats.rewinds += 1
            self.log.info(
                "server asked to continue from {offset}: {error}",
                offset=error.offset, error=str(error),
            )
            self._fill()
        else:
            self._end(Failure(error))

    # Sending ---------------------------------------------------------------

    def _fill(self) -> None:
        m = self.machine
        if self._reading or self.result.called:
            return
        if m.can_send(self.window):
            offset = m.sent
            assert m.welcome is not None
            chunk = min(self.chunk_size or m.welcome.chunk_size, m.welcome.max_payload)
            length = min(chunk, m.size - offset)
            self._reading = True
            d = self.source.read_with_crc(offset, length)
            d.addCallbacks(self._chunk_read, self._read_failed, callbackArgs=(offset,))
        elif (
            m.state is ClientState.SENDING and m.sent == m.size and not m.finishing
            and m.outstanding == 0
        ):
            m.finish()

    def _chunk_read(self, read: tuple[bytes, int], offset: int) -> None:
        payload, crc = read
        self._reading = False
        if self.result.called or not self.machine.can_send(self.window):
            return
        if offset != self.machine.sent:
            self._fill()  # a rewind happened while reading
            return
        self.machine.send_data(offset, payload, crc)
        self.stats.bytes_sent += len(payload)
        self._flush()
        self._fill()
        self._flush()

    def _read_failed(self, failure: Failure) -> None:
        self._reading = False
        self._end(failure)

    # Plumbing --------------------------------------------------------------

    def _flush(self) -> None:
        out = self.machine.data_to_send()
        if out and self.transport is not None:
            self.transport.writeSequence(out)

    def _end(self, outcome: Any) -> None:
        if self.result.called:
            return
        self._cancel_stall_timer()
        if self.transport is not None:
            self.transport.loseConnection()
        if isinstance(outcome, Failure):
            self.result.errback(outcome)
        else:
            self.result.callback(outcome)

    def _arm_stall_timer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.reset(self.stall_timeout)
        else:
            self._timer = self.clock.callLater(self.stall_timeout, self._stalled)

    def _cancel_stall_timer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def _stalled(self) -> None:
        self._timer = None
        failure = Failure(Stalled(
            f"no answer from the server for {self.stall_timeout:g} s; reconnecting"
        ))
        if self.transport is not None:
            self.transport.abortConnection()
        self._end(failure)

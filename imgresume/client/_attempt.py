# -*- test-case-name: tests.client.test_uploader,tests.client.test_source -*-
"""
One try at uploading one file, over a connection that has done its
handshake: UPLOAD or RESUME, the residual check, a window of DATA packets
read off the reactor thread, and the end (COMPLETED, or why not).

The session (L{imgresume.client._session}) makes one L{UploadAttempt} per
try and runs it on an L{imgresume.client._connection.UploadConnection};
from how it ended, the session decides whether to try again and whether
the connection may carry the next file.
"""

from __future__ import annotations

from typing import Any, Callable, Protocol

import attrs
from twisted.internet.defer import Deferred
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
    Upload,
    UploadAccepted,
    UploadCompleted,
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


class AttemptConnection(Protocol):
    """
    What an L{UploadAttempt} needs from the connection it runs on (an
    L{imgresume.client._connection.UploadConnection}): the handshake's
    results, the state machine to drive, a way to send what the machine
    queued, and to be told when the attempt is over.
    """

    #: The server's id, from its WELCOME.
    server_id: str | None
    #: The most DATA packets in flight the server asked for, if it did.
    window_advice: int | None
    #: The connection's sans-IO protocol machine, past the handshake.
    machine: ClientConnection

    def flush(self) -> None:
        """Write what the state machine has queued."""

    def attempt_ended(self, attempt: UploadAttempt) -> None:
        """C{attempt} is over: keep the connection for the next, or close it."""


@attrs.define
class AttemptStats:
    """What one attempt did, for the uploader's result."""

    server_id: str | None = None
    upload_id: str | None = None
    #: The offset ACCEPTED said to send from (None: not accepted).
    accepted_offset: int | None = None
    #: What the server has acknowledged as durable.
    acked: int = 0
    #: Payload bytes sent, those sent again after a rewind included.
    bytes_sent: int = 0
    rewinds: int = 0


class UploadAttempt:
    """
    Upload (or resume) one file over one connection, once.

    C{result} fires with the server's L{Completed} or fails with an
    L{ImgresumeError} from the server, an L{AttemptFailed}, or an
    L{OSError} reading the local file.  Once it has fired, C{reusable}
    says whether the connection is back in the ready state with nothing in
    flight, so that the next file may use it: after COMPLETED, or after a
    command error that answered the UPLOAD or RESUME itself.  Otherwise the
    connection is closed.

    C{on_progress} is called with what the server has acknowledged (from
    ACCEPTED's offset, then each ACK's).

    C{on_upload_id} is called with the upload id once the server accepted
    the upload; if it returns a Deferred (the journal write that records the
    id), the upload is not ended before it fires, so that the server never
    completes an upload the journal cannot name after a crash.

    For an upload whose SHA-256 goes at the end (C{request.sha256} is
    None), C{digest()} gives a Deferred of the whole file's
    SHA-256, which is being computed while the packets go out; the upload
    ends with FINISH once every packet is acknowledged and the digest known.

    Before the end (FINISH, or the empty DATA packet), once every byte and
    the digest were read, the attempt checks that the local file has not
    changed since it was opened (L{LocalFile.check_unchanged}): a file
    appended to or rewritten meanwhile fails the attempt with
    L{imgresume.client.SourceChanged} instead of being stored as read.

    Cancelling C{result} (an interrupted upload) ends the attempt and
    closes the connection.
    """

    log = Logger()

    def __init__(
        self,
        source: LocalFile,
        request: Upload,
        *,
        upload_id: str | None = None,
        window: int = 16,
        chunk_size: int | None = None,
        on_progress: Callable[[int], None] = lambda acked: None,
        on_upload_id: Callable[[str], Deferred[Any] | None] = lambda upload_id: None,
        digest: Callable[[], Deferred[bytes]] | None = None,
    ) -> None:
        self.source = source
        self.request = request
        self.upload_id = upload_id
        self.window = max(1, window)
        self.chunk_size = chunk_size
        self.on_progress = on_progress
        self.on_upload_id = on_upload_id
        self._digest = digest
        #: The whole file's SHA-256 for FINISH, once C{digest()} gave it.
        self._sha256_for_finish: bytes | None = None
        self.stats = AttemptStats()
        self.result: Deferred[Completed] = Deferred(self._cancelled)
        self.reusable = False
        self._source_checked = False
        self._connection: AttemptConnection | None = None
        self._reading = False
        self._recording = False

    # Called by the connection -------------------------------------------------

    def start(self, connection: AttemptConnection) -> None:
        """Send UPLOAD or RESUME on C{connection} (handshake done, ready)."""
        self._connection = connection
        self.stats.server_id = connection.server_id
        if connection.window_advice is not None:
            self.window = min(self.window, connection.window_advice)
        if self.upload_id is not None:
            connection.machine.resume(self.upload_id)
        else:
            connection.machine.upload(self.request)

    def event(self, event: object) -> None:
        """An event of the connection's state machine about this upload."""
        if isinstance(event, UploadAccepted):
            self._accepted(event.accepted)
        elif isinstance(event, ChunkAcked):
            self.stats.acked = event.acked
            self.on_progress(event.acked)
            self._fill()
        elif isinstance(event, ErrorReceived):
            self._error(event.error)
        elif isinstance(event, UploadCompleted):
            self._end(event.completed, reusable=True)

    def fail(self, failure: Failure) -> None:
        """The connection broke (or stalled, or the server broke the protocol)."""
        self._end(failure, reusable=False)

    # Events --------------------------------------------------------------

    def _accepted(self, accepted: Accepted) -> None:
        req = self.request
        self.stats.upload_id = accepted.upload_id
        self.stats.accepted_offset = accepted.offset
        self.stats.acked = accepted.offset
        if accepted.size != req.size or accepted.sha256 != req.sha256:
            self._end(Failure(ResidualMismatch(
                f"upload {accepted.upload_id} on the server is for a different file "
                f"({accepted.size} bytes) than {req.name} ({req.size} bytes)"
            )), reusable=False)
            return
        self.upload_id = accepted.upload_id
        recorded = self.on_upload_id(accepted.upload_id)
        if recorded is not None and not recorded.called:
            self._recording = True
            recorded.addBoth(self._recorded)
        self.on_progress(accepted.offset)
        if accepted.tail_length == 0:
            self._fill()
            return
        # Verified resume: the last committed range must be our bytes.
        self._reading = True
        assert self._connection is not None
        d = self.source.sha256_of(accepted.tail_start, accepted.tail_length,
                                  self._connection.machine.digest)

        def compare(digest: bytes) -> None:
            self._reading = False
            if self.result.called:
                return
            if digest != accepted.tail_sha256:
                self._end(Failure(ResidualMismatch(
                    f"bytes {accepted.tail_start}-{accepted.tail_start + accepted.tail_length}"
                    f" stored for upload {accepted.upload_id} differ from the local file"
                )), reusable=False)
            else:
                self._fill()

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
            # A command error that answered UPLOAD or RESUME leaves nothing
            # in flight: the connection is ready for another command.  After
            # ACCEPTED, DATA may be in flight, which the server would answer
            # with UNEXPECTED_FRAME: that connection is closed.
            reusable = (
                error.scope is Scope.COMMAND and self.stats.accepted_offset is None
                and self._machine_ready()
            )
            self._end(Failure(error), reusable=reusable)

    # Sending ---------------------------------------------------------------

    def _fill(self) -> None:
        if self._reading or self.result.called:
            return
        assert self._connection is not None
        m = self._connection.machine
        if m.can_send(self.window):
            offset = m.offset
            assert m.welcome is not None
            chunk = min(self.chunk_size or m.welcome.chunk_size, m.welcome.max_payload)
            length = min(chunk, m.size - offset)
            self._reading = True
            d = self.source.read_with_crc(offset, length, m.checksum)
            d.addCallbacks(self._chunk_read, self._read_failed, callbackArgs=(offset,))
        elif (
            m.state is ClientState.SENDING and m.offset == m.size and not m.finishing
            and m.outstanding == 0 and not self._recording
        ):
            if m.sha256_in_finish and self._sha256_for_finish is None:
                if self._digest is None:
                    self._end(Failure(RuntimeError(
                        "the server holds this upload without its SHA-256, and this "
                        "attempt has no digest to end it with")), reusable=False)
                    return
                # Every byte is acknowledged; the hash is still running.
                self._reading = True
                self._digest().addCallbacks(self._digest_known, self._read_failed)
            elif not self._source_checked:
                # Everything is read: the file must still be the one read.
                self._reading = True
                self.source.check_unchanged().addCallbacks(self._unchanged, self._read_failed)
            else:
                m.finish(self._sha256_for_finish if m.sha256_in_finish else None)
        self._connection.flush()

    def _digest_known(self, digest: bytes) -> None:
        self._reading = False
        self._sha256_for_finish = digest
        self._fill()

    def _unchanged(self, result: None) -> None:
        self._reading = False
        self._source_checked = True
        self._fill()

    def _recorded(self, result: Any) -> None:
        """The upload id is recorded (or could not be: the caller logged why)."""
        self._recording = False
        self._fill()

    def _chunk_read(self, read: tuple[bytes, int], offset: int) -> None:
        payload, crc = read
        self._reading = False
        if self.result.called:
            return  # the attempt ended while reading; the connection went on
        assert self._connection is not None
        m = self._connection.machine
        if not m.can_send(self.window):
            return
        if offset != m.offset:
            self._fill()  # a rewind happened while reading
            return
        m.send_data(offset, payload, crc)
        self.stats.bytes_sent += len(payload)
        self._fill()

    def _read_failed(self, failure: Failure) -> None:
        self._reading = False
        self._end(failure, reusable=False)

    # Plumbing --------------------------------------------------------------

    def _cancelled(self, result: Deferred[Completed]) -> None:
        """C{result} was cancelled: the attempt is over, its connection closed."""
        self.reusable = False
        if self._connection is not None:
            self._connection.attempt_ended(self)

    def _machine_ready(self) -> bool:
        return self._connection is not None and self._connection.machine.state is ClientState.READY

    def _end(self, outcome: Any, reusable: bool) -> None:
        if self.result.called:
            return
        self.reusable = reusable
        if self._connection is not None:
            self._connection.attempt_ended(self)
        if isinstance(outcome, Failure):
            self.result.errback(outcome)
        else:
            self.result.callback(outcome)

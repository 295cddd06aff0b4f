# -*- test-case-name: tests.cli.test_status -*-
"""
Asking a server about uploads (STATUS), one connection for several ids.
Used by L{imgresume.client.Uploader.status} and C{imgresume status}.
"""

from __future__ import annotations

from typing import Any, Sequence

from twisted.internet.defer import Deferred
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure

from imgresume.client._attempt import ConnectionBroken
from imgresume.errors import ImgresumeError, UnknownUpload
from imgresume.protocol import (
    STATUS_FIELDS,
    ClientConnection,
    ErrorReceived,
    StatusReceived,
    UploadStatusFrame,
    Welcomed,
)


class StatusQuery(Protocol):
    """
    Handshake, then one STATUS per upload id, in order.  C{result} fires
    with a list holding, per id, an L{UploadStatusFrame} or the
    L{UnknownUpload} error the server answered.
    """

    def __init__(self, upload_ids: Sequence[str], client_id: str,
                 key: bytes | None = None) -> None:
        self.pending = list(upload_ids)
        self.answers: list[UploadStatusFrame | ImgresumeError] = []
        # The upload's digest algorithm too, from a server that knows to send it.
        self.machine = ClientConnection(client_id, {STATUS_FIELDS: "digest"}, key=key)
        self.result: Deferred[list[Any]] = Deferred()
        self.server_id: str | None = None

    def connectionMade(self) -> None:
        self.machine.hello()
        self._flush()

    def dataReceived(self, data: bytes) -> None:
        self.machine.receive_data(data)
        try:
            while not self.result.called and (event := self.machine.next_event()):
                self._on_event(event)
        except ImgresumeError as e:
            self._end(Failure(e))
        self._flush()

    def _on_event(self, event: object) -> None:
        if isinstance(event, Welcomed):
            self.server_id = event.welcome.server_id
            self._next()
        elif isinstance(event, StatusReceived):
            self.answers.append(event.status)
            self._next()
        elif isinstance(event, ErrorReceived):
            if isinstance(event.error, UnknownUpload):
                self.answers.append(event.error)
                self._next()
            else:
                self._end(Failure(event.error))

    def _next(self) -> None:
        if self.pending:
            self.machine.status(self.pending.pop(0))
        else:
            self._end(self.answers)

    def _flush(self) -> None:
        out = self.machine.data_to_send()
        if out and self.transport is not None:
            self.transport.writeSequence(out)

    def _end(self, outcome: Any) -> None:
        if self.result.called:
            return
        self.transport.loseConnection()
        if isinstance(outcome, Failure):
            self.result.errback(outcome)
        else:
            self.result.callback(outcome)

    def connectionLost(self, reason: Failure) -> None:
        self._end(Failure(ConnectionBroken(
            f"connection lost before the answer: {reason.getErrorMessage()}")))

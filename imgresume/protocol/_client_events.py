# -*- test-case-name: tests.protocol.test_client_machine -*-
"""
The client machine's side of its conversation with its caller: the states
of a connection (L{ClientState}) and the events the machine hands out
(L{ClientEvent}) as the server's frames arrive.  Made by
L{imgresume.protocol._client.ClientConnection}.
"""

from __future__ import annotations

import enum

import attrs

from imgresume.errors import ImgresumeError
from imgresume.protocol._frames import Accepted, Completed, UploadStatusFrame, Welcome


class ClientState(enum.Enum):
    """States of a client connection; see docs/protocol.md."""

    START = "start"
    AWAIT_WELCOME = "await-welcome"
    READY = "ready"
    AWAIT_ACCEPTED = "await-accepted"
    AWAIT_STATUS = "await-status"
    SENDING = "sending"
    CLOSED = "closed"


@attrs.frozen
class Welcomed:
    """The server accepted the handshake."""

    welcome: Welcome


@attrs.frozen
class UploadAccepted:
    """The server opened the upload; send from C{accepted.offset}."""

    accepted: Accepted


@attrs.frozen
class ChunkAcked:
    """The server acknowledged that everything before C{acked} is durably stored."""

    acked: int


@attrs.frozen
class UploadCompleted:
    """The server verified the upload and put it at its final path."""

    completed: Completed


@attrs.frozen
class ErrorReceived:
    """The server reported an error; C{error.scope} says what it ended."""

    error: ImgresumeError


@attrs.frozen
class Challenged:
    """The server asked for authentication; the client answered with AUTH."""

    server_id: str


@attrs.frozen
class StatusReceived:
    """The answer to L{ClientConnection.status}."""

    status: UploadStatusFrame


@attrs.frozen
class Ponged:
    """Answer to a PING."""

    nonce: int


@attrs.frozen
class PutAnswered:
    """
    The answer to the oldest PUT in flight (C{upload_id}, the client's):
    C{completed} if the file is stored (or skipped), else C{error}, which
    ended that PUT only (unless its scope is the connection's).
    """

    upload_id: str
    completed: Completed | None = None
    error: ImgresumeError | None = None


ClientEvent = (PutAnswered | StatusReceived | Challenged | Welcomed | UploadAccepted
               | ChunkAcked | UploadCompleted | ErrorReceived | Ponged)

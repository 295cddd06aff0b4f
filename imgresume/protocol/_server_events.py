# -*- test-case-name: tests.protocol.test_server_machine -*-
"""
The server machine's side of its conversation with its caller: the states
of a connection (L{ServerState}), the frames a client may send in each
(L{LEGAL_FRAMES}), and the events the machine hands out (L{ServerEvent}),
each answered through a method of
L{imgresume.protocol._server.ServerConnection}.
"""

from __future__ import annotations

import enum

import attrs

from imgresume.errors import ImgresumeError
from imgresume.protocol._frames import (
    Auth,
    Data,
    Finish,
    Hello,
    Ping,
    Put,
    Resume,
    Status,
    Upload,
)


class ServerState(enum.Enum):
    """States of a server connection; see the table in docs/protocol.md."""

    AWAIT_HELLO = "await-hello"
    CHECKING_HELLO = "checking-hello"
    AWAIT_AUTH = "await-auth"
    CHECKING_AUTH = "checking-auth"
    READY = "ready"
    OPENING = "opening"
    QUERYING = "querying"
    RECEIVING = "receiving"
    FINISHING = "finishing"
    COMPLETING = "completing"
    STORING = "storing"
    CLOSED = "closed"


# Events handed to the caller ------------------------------------------------


@attrs.frozen
class HelloReceived:
    """A well-formed HELLO with a shared version: accept or reject it."""

    hello: Hello


@attrs.frozen
class AuthReceived:
    """The client's AUTH proof: check it, then accept_hello() or fail()."""

    mac: bytes


@attrs.frozen
class StatusRequested:
    """Look the upload up (read only), then call L{imgresume.protocol._server.ServerConnection.status_found}."""

    upload_id: str


@attrs.frozen
class UploadRequested:
    """
    Create an upload, then call
    L{imgresume.protocol._server.ServerConnection.upload_opened}.  Unless
    C{if_exists} is C{"rename"}, first look for a completed file of the
    name: for C{"fail"} refuse with L{imgresume.errors.NameTaken} if there
    is one; for C{"skip"}, if it has the upload's size and SHA-256, call
    L{imgresume.protocol._server.ServerConnection.upload_skipped} instead.
    """

    upload: Upload
    #: The UPLOAD's policy for a name already taken: rename, skip or fail.
    if_exists: str = "rename"


@attrs.frozen
class ResumeRequested:
    """Open an upload by id, then call L{imgresume.protocol._server.ServerConnection.upload_opened}."""

    upload_id: str


@attrs.frozen
class ChunkReceived:
    """
    Store C{payload} at C{offset} (it ends at C{offset + len(payload)}), then
    call L{imgresume.protocol._server.ServerConnection.chunk_written} with
    that end.
    """

    offset: int
    payload: bytes
    #: The payload's checksum, already checked: storage may record it as
    #: is.  (Named for CRC-32; C{checksum} names its algorithm.)
    crc32: int = attrs.field(default=None, eq=False)
    checksum: str = attrs.field(default="crc32", eq=False)


@attrs.frozen
class FinishRequested:
    """All bytes are in; verify and complete, then L{imgresume.protocol._server.ServerConnection.upload_completed}."""

    size: int
    #: The whole file's SHA-256 from FINISH, for an upload opened without
    #: one; None when UPLOAD declared it.
    sha256: bytes | None = None


@attrs.frozen
class PutRequested:
    """
    Store a whole small file in one step (a PUT, already checked for its
    size, name bytes, metadata and checksum), then call
    L{imgresume.protocol._server.ServerConnection.put_stored} or
    L{imgresume.protocol._server.ServerConnection.put_failed} with its
    upload id.  Several may be handed out before the first is answered
    (L{ServerLimits.puts_at_once
    <imgresume.protocol._rules.ServerLimits.puts_at_once>}); the machine
    answers them in order.
    """

    put: Put
    #: The PUT's policy for a name already taken: rename, skip or fail.
    if_exists: str = "rename"


@attrs.frozen
class ConnectionFailed:
    """A fatal error was queued for the client; flush and close."""

    error: ImgresumeError


@attrs.frozen
class Refusal:
    """
    A request the machine refused by itself, already answered with an ERROR
    frame: an UPLOAD (C{upload}, the frame) over the size limit, with an
    over-long name or bad metadata; or a DATA packet or end of upload
    (C{upload} None) at the wrong offset, past the declared size, with a bad
    CRC-32, or too early.  Not an event: the caller takes them with
    L{imgresume.protocol._server.ServerConnection.refusals}, for its logs,
    counts and hooks; nothing answers them.
    """

    error: ImgresumeError
    upload: Upload | None = None


ServerEvent = (
    HelloReceived | AuthReceived | StatusRequested | UploadRequested | ResumeRequested | ChunkReceived
    | FinishRequested | PutRequested | ConnectionFailed
)

#: Frames a client may send in each state that reads frames.
LEGAL_FRAMES: dict[ServerState, tuple[type, ...]] = {
    ServerState.AWAIT_HELLO: (Hello,),
    ServerState.AWAIT_AUTH: (Auth,),
    ServerState.READY: (Upload, Resume, Status, Put, Ping),
    ServerState.RECEIVING: (Data, Finish, Ping),
    # More PUTs are taken while earlier ones are stored; another command
    # waits until they are all answered.
    ServerState.STORING: (Upload, Resume, Status, Put, Ping),
}

# -*- test-case-name: tests.server.test_protocol,tests.server.test_incomplete -*-
"""
The server's decisions on a client's commands, as values: whether a
command is refused before storage is asked (a health-check session, a
client over its quota of open uploads), what an UPLOAD's C{if-exists}
policy makes of the file found at its name, the storage request of an
UPLOAD or a PUT, the UPLOAD_STATUS frame that answers a STATUS, and the error a
client is sent for an unexpected storage exception.

L{CommandPolicy} is one connection's, owned by
L{imgresume.server._protocol.UploadServerProtocol}, which asks it and
carries out each answer (L{Close}, L{Refuse}; L{NameTakenAnswer},
L{Skip}, L{Create}) on its L{imgresume.protocol.ServerConnection}, logs
and events; nothing here touches the connection.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Union

import attrs

from imgresume.errors import (
    HandshakeRejected,
    InternalError,
    InvalidName,
    NameTaken,
    QuotaExceeded,
)
from imgresume.names import validate_name
from imgresume.protocol import STATUS_FIELDS, Put, Upload, UploadStatusFrame
from imgresume.server._admission import UploadQuota
from imgresume.storage.interfaces import NewUpload, StoredFile, WholeUpload


@attrs.frozen
class Close:
    """End the connection with C{error}: a health-check session sent a command."""

    error: HandshakeRejected


@attrs.frozen
class Refuse:
    """
    Refuse the command with C{error} (command scope: the connection stays
    ready): the client has as many uploads open as it may (C{limit}).
    """

    error: QuotaExceeded
    limit: int


Refusal = Union[Close, Refuse]


@attrs.frozen
class NameTakenAnswer:
    """C{if-exists} is C{fail} and a file has the name: refuse with C{error}."""

    error: NameTaken
    path: str


@attrs.frozen
class Skip:
    """C{if-exists} is C{skip} and the file at the name is the same: answer with it."""

    found: StoredFile


@attrs.frozen
class Create:
    """Nothing stops the upload: create it."""


IfExistsAnswer = Union[NameTakenAnswer, Skip, Create]


class CommandPolicy:
    """
    One connection's decisions on the commands its client sends.

    @param quota: the server's L{UploadQuota} of open uploads per client.
    @param health_only: whether the connection was welcomed as a
        balancer's health check (asked at each command: the handshake
        decides it after this object is made).
    """

    def __init__(self, quota: UploadQuota, health_only: Callable[[], bool]) -> None:
        self._quota = quota
        self._health_only = health_only

    def refusal(self, client_id: str | None, opens_upload: bool) -> Refusal | None:
        """
        Why a command (C{opens_upload}: an UPLOAD or a RESUME, not a
        STATUS) is refused before storage is asked, or None.
        """
        if self._health_only():
            return Close(HandshakeRejected(
                "this connection was welcomed as a health check and may only PING"))
        if not opens_upload:
            return None
        error = self._quota.refusal(client_id or "")
        if error is None:
            return None
        return Refuse(error, self._quota.limit)

    @staticmethod
    def new_upload(upload: Upload, client_id: str | None, digest: str,
                   checksum: str) -> NewUpload | InvalidName:
        """
        The storage request of an UPLOAD on a connection whose negotiated
        algorithms are C{digest} and C{checksum}, or the error refusing it
        at once for a name storage would refuse (so that what a peer can
        make the server log stays bounded).
        """
        try:
            validate_name(upload.name)
        except InvalidName as e:
            return e
        return NewUpload(upload.name, upload.size, upload.sha256, upload.metadata,
                         client_id or "", digest=digest, checksum=checksum)

    @staticmethod
    def whole_upload(put: Put, client_id: str, digest: str) -> WholeUpload | InvalidName:
        """
        The storage request of a PUT on a connection whose digest is
        C{digest}, or the error refusing its name at once.
        """
        try:
            validate_name(put.name)
        except InvalidName as e:
            return e
        return WholeUpload(put.upload_id, put.name, put.payload, put.sha256,
                           put.metadata, client_id, digest)

    @staticmethod
    def if_exists(found: StoredFile | None, sha256: bytes | None,
                  policy: str) -> IfExistsAnswer:
        """
        What the file C{found} at an UPLOAD's name makes of its C{if-exists}
        C{policy} (C{skip} or C{fail}): refuse it (fail), answer with the
        file there (skip, same size and SHA-256), or create the upload.
        """
        if found is not None and policy == "fail":
            return NameTakenAnswer(NameTaken(f"{found.path} already exists (if-exists=fail)"),
                                   found.path)
        if found is not None and policy == "skip" and found.sha256 == sha256:
            return Skip(found)
        return Create()


def status_frame(st: Any, hello_options: Mapping[str, str]) -> UploadStatusFrame:
    """
    The UPLOAD_STATUS frame for C{st}, the storage's L{UploadStatus}, to a
    client whose HELLO had C{hello_options}: with the optional fields it
    asked for (C{status-fields}), and without any to a client that did not
    ask (it reads the frame's older layout only).
    """
    asked = hello_options.get(STATUS_FIELDS)
    known = {"digest": st.digest}
    return UploadStatusFrame(
        st.upload_id, st.name, st.size, st.state == "complete", st.offset, st.busy,
        st.owner, int(st.created * 1000), int(st.updated * 1000), st.path,
        None if asked is None else {k: known[k] for k in asked.split(",") if k in known},
    )


def unexpected(error: BaseException) -> InternalError:
    """The error a client is sent for an exception storage should not raise."""
    return InternalError(
        f"unexpected {type(error).__name__} on the server; nothing stored is lost")

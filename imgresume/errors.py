# -*- test-case-name: tests.test_errors -*-
"""
Every error imgresume can report, as a wire code and as a Python exception.

An error is a value on the wire (an ERROR frame carrying a code from
L{ErrorCode}, an offset, a retry hint and a human message) and an exception in
Python (a subclass of L{ImgresumeError}).  The same exception classes are
raised by storage backends, turned into ERROR frames by the server and turned
back into exceptions by the client, so callers at every layer catch one type.

Each code belongs to a L{Scope} that tells the peer what happens next; see
``docs/protocol.md`` for the table.
"""

from __future__ import annotations

import enum
from typing import ClassVar


class Scope(enum.Enum):
    """
    What an error ends.

    - C{CONNECTION}: the server closes the connection after sending it.
    - C{COMMAND}: the command (or the upload on this connection) is over; the
      connection is back in the ready state and may send another command.
    - C{TRANSFER}: the upload goes on; the client continues from the offset
      carried in the error.
    """

    CONNECTION = "connection"
    COMMAND = "command"
    TRANSFER = "transfer"


class ErrorCode(enum.IntEnum):
    """Wire error codes (u16).  The high byte groups them by layer."""

    MALFORMED_FRAME = 0x0001
    UNSUPPORTED_VERSION = 0x0002
    UNEXPECTED_FRAME = 0x0003
    FRAME_TOO_LARGE = 0x0004
    HANDSHAKE_REJECTED = 0x0005
    TIMEOUT = 0x0006
    SHUTTING_DOWN = 0x0007
    NO_BACKEND = 0x0008
    INTERNAL_ERROR = 0x0009

    INVALID_NAME = 0x0100
    FILE_TOO_LARGE = 0x0101
    INVALID_METADATA = 0x0102
    UNKNOWN_UPLOAD = 0x0103
    UPLOAD_BUSY = 0x0104
    UPLOAD_TAKEN_OVER = 0x0105
    QUOTA_EXCEEDED = 0x0106
    NAME_TAKEN = 0x0107

    OFFSET_MISMATCH = 0x0200
    CHECKSUM_MISMATCH = 0x0201
    SIZE_EXCEEDED = 0x0202
    INCOMPLETE = 0x0203
    DIGEST_MISMATCH = 0x0204
    DIGEST_ALGORITHM_MISMATCH = 0x0205

    STORAGE_FULL = 0x0300
    STORAGE_ERROR = 0x0301


class ImgresumeError(Exception):
    """
    Base of every imgresume exception.

    @ivar message: a human-readable explanation, safe to show to the peer.
    @ivar offset: for errors about a position in an upload, the offset the
        client must continue from; otherwise 0.
    @ivar retry_after: seconds after which retrying may succeed, or 0.
    """

    code: ClassVar[ErrorCode] = ErrorCode.INTERNAL_ERROR
    scope: ClassVar[Scope] = Scope.CONNECTION
    retryable: ClassVar[bool] = False

    def __init__(self, message: str, offset: int = 0, retry_after: float = 0.0):
        super().__init__(message)
        self.message = message
        self.offset = offset
        self.retry_after = retry_after

    def __str__(self) -> str:
        return f"{self.code.name}: {self.message}"

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({self.message!r}, offset={self.offset}, "
            f"retry_after={self.retry_after})"
        )


def _error(name: str, code: ErrorCode, scope: Scope, retryable: bool, doc: str):
    cls = type(
        name,
        (ImgresumeError,),
        {"code": code, "scope": scope, "retryable": retryable, "__doc__": doc},
    )
    cls.__module__ = __name__
    return cls


MalformedFrame = _error(
    "MalformedFrame", ErrorCode.MALFORMED_FRAME, Scope.CONNECTION, False,
    "A frame could not be decoded: bad type, bad length or bad field.",
)
UnsupportedVersion = _error(
    "UnsupportedVersion", ErrorCode.UNSUPPORTED_VERSION, Scope.CONNECTION, False,
    "The peers share no protocol version.",
)
UnexpectedFrame = _error(
    "UnexpectedFrame", ErrorCode.UNEXPECTED_FRAME, Scope.CONNECTION, False,
    "A well-formed frame arrived in a state where it is not legal.",
)
FrameTooLarge = _error(
    "FrameTooLarge", ErrorCode.FRAME_TOO_LARGE, Scope.CONNECTION, False,
    "A frame header announced more bytes than the receiver accepts.",
)
HandshakeRejected = _error(
    "HandshakeRejected", ErrorCode.HANDSHAKE_REJECTED, Scope.CONNECTION, False,
    "The server refused the client's identity or options.",
)
Timeout = _error(
    "Timeout", ErrorCode.TIMEOUT, Scope.CONNECTION, True,
    "The peer was silent for longer than the configured limit.",
)
ShuttingDown = _error(
    "ShuttingDown", ErrorCode.SHUTTING_DOWN, Scope.CONNECTION, True,
    "The server is stopping; reconnect (the balancer picks another server).",
)
NoBackend = _error(
    "NoBackend", ErrorCode.NO_BACKEND, Scope.CONNECTION, True,
    "The balancer could not reach any server.",
)
InternalError = _error(
    "InternalError", ErrorCode.INTERNAL_ERROR, Scope.CONNECTION, True,
    "A bug in the server; the message says where.  Nothing stored is lost.",
)
InvalidName = _error(
    "InvalidName", ErrorCode.INVALID_NAME, Scope.COMMAND, False,
    "The remote name is empty, too long, or tries to leave the storage root.",
)
FileTooLarge = _error(
    "FileTooLarge", ErrorCode.FILE_TOO_LARGE, Scope.COMMAND, False,
    "The declared size is above the server's limit.",
)
InvalidMetadata = _error(
    "InvalidMetadata", ErrorCode.INVALID_METADATA, Scope.COMMAND, False,
    "Client metadata has too many entries, too long keys/values, or bad keys.",
)
UnknownUpload = _error(
    "UnknownUpload", ErrorCode.UNKNOWN_UPLOAD, Scope.COMMAND, False,
    "No upload with this id exists (never created, aborted or expired).",
)
UploadBusy = _error(
    "UploadBusy", ErrorCode.UPLOAD_BUSY, Scope.COMMAND, True,
    "Another connection is writing this upload; retry after C{retry_after}.",
)
UploadTakenOver = _error(
    "UploadTakenOver", ErrorCode.UPLOAD_TAKEN_OVER, Scope.CONNECTION, True,
    "A newer connection took this upload over; this one may no longer write it.",
)
QuotaExceeded = _error(
    "QuotaExceeded", ErrorCode.QUOTA_EXCEEDED, Scope.COMMAND, True,
    "The client has as many uploads open as it may; retry after C{retry_after}.",
)
NameTaken = _error(
    "NameTaken", ErrorCode.NAME_TAKEN, Scope.COMMAND, False,
    "A completed file has the name, and the upload asked not to be renamed (if-exists=fail).",
)
OffsetMismatch = _error(
    "OffsetMismatch", ErrorCode.OFFSET_MISMATCH, Scope.TRANSFER, True,
    "A data packet's offset is not the stored size; continue from C{offset}.",
)
ChecksumMismatch = _error(
    "ChecksumMismatch", ErrorCode.CHECKSUM_MISMATCH, Scope.TRANSFER, True,
    "A data packet's payload does not match its checksum (CRC-32C or CRC-32); "
    "resend from C{offset}.",
)
SizeExceeded = _error(
    "SizeExceeded", ErrorCode.SIZE_EXCEEDED, Scope.TRANSFER, False,
    "A data packet reaches past the declared size.",
)
Incomplete = _error(
    "Incomplete", ErrorCode.INCOMPLETE, Scope.TRANSFER, True,
    "The end of upload was signalled before all bytes were stored.",
)
DigestMismatch = _error(
    "DigestMismatch", ErrorCode.DIGEST_MISMATCH, Scope.COMMAND, False,
    "The stored bytes do not hash to the declared digest.",
)
DigestAlgorithmMismatch = _error(
    "DigestAlgorithmMismatch", ErrorCode.DIGEST_ALGORITHM_MISMATCH, Scope.COMMAND, False,
    "The upload was created with another digest than this connection negotiated "
    "(docs/protocol.md, section 2b): start a fresh upload, or resume it from a "
    "connection that asks for the upload's digest.",
)
StorageFull = _error(
    "StorageFull", ErrorCode.STORAGE_FULL, Scope.COMMAND, True,
    "The storage has no space left; the partial upload stays resumable.",
)
StorageError = _error(
    "StorageError", ErrorCode.STORAGE_ERROR, Scope.COMMAND, True,
    "The storage failed to read or write; the partial upload stays resumable.",
)


class UploadAlreadyComplete(ImgresumeError):
    """
    Raised by a storage backend when a resumed upload is already complete.

    Not an error on the wire: the server answers with a COMPLETED frame built
    from C{completed}, so a client that lost the completion answer learns it
    on its next resume.
    """

    code = ErrorCode.INTERNAL_ERROR
    scope = Scope.COMMAND

    def __init__(self, completed):
        super().__init__(f"upload {completed.upload_id} is already complete")
        self.completed = completed


_BY_CODE: dict[ErrorCode, type[ImgresumeError]] = {
    cls.code: cls
    for cls in ImgresumeError.__subclasses__()
    if cls is not UploadAlreadyComplete
}


def error_for_code(
    code: int, message: str, offset: int = 0, retry_after: float = 0.0
) -> ImgresumeError:
    """
    Build the exception for a wire error code, as a client does on receiving
    an ERROR frame.  Unknown codes (from a newer server) become
    L{UnknownErrorCode}, which is fatal to the connection.
    """
    try:
        cls = _BY_CODE[ErrorCode(code)]
    except (ValueError, KeyError):
        return UnknownErrorCode(code, message, offset, retry_after)
    return cls(message, offset, retry_after)


class UnknownErrorCode(ImgresumeError):
    """An ERROR frame carried a code this version does not know."""

    scope = Scope.CONNECTION

    def __init__(self, raw_code: int, message: str, offset: int = 0,
                 retry_after: float = 0.0):
        super().__init__(message, offset, retry_after)
        self.raw_code = raw_code

    def __str__(self) -> str:
        return f"error 0x{self.raw_code:04x}: {self.message}"

# -*- test-case-name: tests.http.test_resource.DeferLengthTests -*-
"""
creation-defer-length on a PATCH: the C{Upload-Length} of an upload
created with C{Upload-Defer-Length: 1}, checked, then declared to storage
(L{IDeclaresSize}) before any byte of the PATCH's body is written.  Called
by the upload logic (L{imgresume.http._uploads}) once the PATCH holds the
upload's writer.
"""

from __future__ import annotations

from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure

from imgresume.http._errors import storage_error
from imgresume.http._headers import TusError
from imgresume.storage.interfaces import IDeclaresSize, IUploadWriter

log = Logger()


def length_refused(writer: IUploadWriter, offset: int, length: int,
                   body_length: int | None) -> TusError | None:
    """
    Why a PATCH at C{offset} with C{Upload-Length: length} and a body of
    C{body_length} bytes (None: unknown) is refused, or None: a length
    already known and another one (400); to declare one, below the offset
    (400), passed by the body (413), or a writer that cannot (400).
    """
    info = writer.info
    if not info.size_deferred:
        if length != info.size:
            return TusError(400, f"Upload-Length is already {info.size}: it cannot change")
    elif length < offset:
        return TusError(400, f"Upload-Length {length} is below the {offset} bytes the "
                             "upload already has")
    elif body_length is not None and offset + body_length > length:
        return TusError(413, f"the body's {body_length} bytes from offset {offset} pass "
                             f"Upload-Length {length}")
    elif not IDeclaresSize.providedBy(writer):
        return TusError(400, "this storage cannot declare a deferred length")
    return None


def declare_length(writer: IUploadWriter, offset: int, length: int,
                   body_length: int | None) -> Deferred[None]:
    """
    A PATCH's C{Upload-Length} for the upload C{writer} holds at C{offset}:
    declared if the upload's length is deferred, accepted if it is the one
    known.  Fails with the L{TusError} to answer, the writer then released.
    """
    refused = length_refused(writer, offset, length, body_length)
    if refused is not None:
        writer.release().addErrback(lambda f: None)
        raise refused
    if not writer.info.size_deferred:
        return succeed(None)

    def declared(_: None) -> None:
        log.info("tus upload {upload_id}: length declared, {size} bytes",
                 upload_id=writer.info.upload_id, size=length)

    def not_declared(f: Failure) -> None:
        writer.release().addErrback(lambda f: None)
        raise storage_error(f)

    return writer.declare_size(length).addCallbacks(declared, not_declared)

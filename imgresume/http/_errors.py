# -*- test-case-name: tests.http.test_resource -*-
"""
The HTTP status of each imgresume error, so that what storage raises
reaches a tus client as the status its retry logic understands (423 and
5xx are retried, 409 re-read with HEAD) and a plain-text reason.
"""

from __future__ import annotations

import math

from twisted.logger import Logger
from twisted.python.failure import Failure

from imgresume.errors import ErrorCode, ImgresumeError
from imgresume.http._headers import CHECKSUM_MISMATCH, TusError

log = Logger()

#: Wire error code -> HTTP status.
STATUS = {
    ErrorCode.INVALID_NAME: 400,
    ErrorCode.INVALID_METADATA: 400,
    ErrorCode.FILE_TOO_LARGE: 413,
    ErrorCode.UNKNOWN_UPLOAD: 404,
    ErrorCode.UPLOAD_BUSY: 423,
    ErrorCode.UPLOAD_TAKEN_OVER: 423,
    ErrorCode.QUOTA_EXCEEDED: 429,
    ErrorCode.NAME_TAKEN: 409,
    ErrorCode.OFFSET_MISMATCH: 409,
    ErrorCode.CHECKSUM_MISMATCH: CHECKSUM_MISMATCH,
    ErrorCode.SIZE_EXCEEDED: 413,
    ErrorCode.INCOMPLETE: 409,
    ErrorCode.DIGEST_MISMATCH: CHECKSUM_MISMATCH,
    ErrorCode.STORAGE_FULL: 507,
    ErrorCode.STORAGE_ERROR: 503,
}


def tus_error(error: ImgresumeError, durable: int | None = None) -> TusError:
    """
    The answer for an imgresume error: its status, its message, a
    C{Retry-After} when it says when to retry, and C{Upload-Offset} (the
    offset to continue from) when C{durable} is known.
    """
    status = STATUS.get(error.code, 500)
    headers: list[tuple[str, str]] = []
    if error.retry_after > 0 or status == 423:
        headers.append(("Retry-After", str(max(1, math.ceil(error.retry_after)))))
    if durable is not None:
        headers.append(("Upload-Offset", str(durable)))
    return TusError(status, error.message, tuple(headers))


def storage_error(failure: Failure, durable: int | None = None) -> TusError:
    """
    The L{TusError} for a failed storage call: an L{ImgresumeError} by its
    code, a L{TusError} as it is, anything else a 500 (logged by the caller).
    """
    error = failure.value
    if isinstance(error, TusError):
        return error
    if isinstance(error, ImgresumeError):
        return tus_error(error, durable)
    log.failure("tus request failed unexpectedly", failure)
    return TusError(500, f"internal error: {type(error).__name__}")

"""
Tests for L{imgresume.errors}: one exception class per wire code, the
mapping back from codes, and the scope of every code.
"""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from imgresume import errors
from imgresume.errors import (
    ErrorCode,
    ImgresumeError,
    InternalError,
    Scope,
    UnknownErrorCode,
    UploadAlreadyComplete,
    error_for_code,
)
from imgresume.protocol._frames import Completed, Error, decode_body, encode
from imgresume.protocol._server import error_frame

#: Subclasses of ImgresumeError that are not the exception of a wire code.
NOT_WIRE = (UploadAlreadyComplete, UnknownErrorCode)

#: The documented scope of every code (errors.py module and class docs).
SCOPES = {
    ErrorCode.QUOTA_EXCEEDED: Scope.COMMAND,
    ErrorCode.NAME_TAKEN: Scope.COMMAND,
    ErrorCode.UPLOAD_TAKEN_OVER: Scope.CONNECTION,
    ErrorCode.MALFORMED_FRAME: Scope.CONNECTION,
    ErrorCode.UNSUPPORTED_VERSION: Scope.CONNECTION,
    ErrorCode.UNEXPECTED_FRAME: Scope.CONNECTION,
    ErrorCode.FRAME_TOO_LARGE: Scope.CONNECTION,
    ErrorCode.HANDSHAKE_REJECTED: Scope.CONNECTION,
    ErrorCode.TIMEOUT: Scope.CONNECTION,
    ErrorCode.SHUTTING_DOWN: Scope.CONNECTION,
    ErrorCode.NO_BACKEND: Scope.CONNECTION,
    ErrorCode.INTERNAL_ERROR: Scope.CONNECTION,
    ErrorCode.INVALID_NAME: Scope.COMMAND,
    ErrorCode.FILE_TOO_LARGE: Scope.COMMAND,
    ErrorCode.INVALID_METADATA: Scope.COMMAND,
    ErrorCode.UNKNOWN_UPLOAD: Scope.COMMAND,
    ErrorCode.UPLOAD_BUSY: Scope.COMMAND,
    ErrorCode.OFFSET_MISMATCH: Scope.TRANSFER,
    ErrorCode.CHECKSUM_MISMATCH: Scope.TRANSFER,
    ErrorCode.SIZE_EXCEEDED: Scope.TRANSFER,
    ErrorCode.INCOMPLETE: Scope.TRANSFER,
    ErrorCode.DIGEST_MISMATCH: Scope.COMMAND,
    ErrorCode.DIGEST_ALGORITHM_MISMATCH: Scope.COMMAND,
    ErrorCode.STORAGE_FULL: Scope.COMMAND,
    ErrorCode.STORAGE_ERROR: Scope.COMMAND,
}

#: Codes whose class says a retry may succeed.
RETRYABLE = {
    ErrorCode.QUOTA_EXCEEDED,
    ErrorCode.UPLOAD_TAKEN_OVER,
    ErrorCode.TIMEOUT, ErrorCode.SHUTTING_DOWN, ErrorCode.NO_BACKEND,
    ErrorCode.INTERNAL_ERROR, ErrorCode.UPLOAD_BUSY, ErrorCode.OFFSET_MISMATCH,
    ErrorCode.CHECKSUM_MISMATCH, ErrorCode.INCOMPLETE, ErrorCode.STORAGE_FULL,
    ErrorCode.STORAGE_ERROR,
}


def wire_classes() -> list[type[ImgresumeError]]:
    """Every exception class that stands for a wire code."""
    return [c for c in ImgresumeError.__subclasses__() if c not in NOT_WIRE]


class CodeTests(SynchronousTestCase):
    """One class per code."""

    def test_one_class_per_code(self) -> None:
        """Every ErrorCode has exactly one exception class with that code."""
        by_code: dict[ErrorCode, list[str]] = {code: [] for code in ErrorCode}
        for cls in wire_classes():
            by_code[cls.code].append(cls.__name__)
        self.assertEqual({code: len(names) for code, names in by_code.items()},
                         {code: 1 for code in ErrorCode})

    def test_classes_are_public(self) -> None:
        """Each class is importable from imgresume.errors under its own name."""
        for cls in wire_classes():
            self.assertIs(getattr(errors, cls.__name__), cls)
            self.assertEqual(cls.__module__, "imgresume.errors")
            self.assertTrue(cls.__doc__)

    def test_codes_are_u16(self) -> None:
        """Codes fit the u16 of an ERROR frame and are grouped by high byte."""
        for code in ErrorCode:
            self.assertTrue(0 < code <= 0xFFFF, code)
        self.assertEqual(len({int(c) for c in ErrorCode}), len(ErrorCode))


class ErrorForCodeTests(SynchronousTestCase):
    """error_for_code() builds the class of a wire code."""

    def test_round_trip(self) -> None:
        """error_for_code(cls.code, ...) is an instance of cls with the given fields."""
        for cls in wire_classes():
            error = error_for_code(int(cls.code), "why", 12, 1.5)
            self.assertIs(type(error), cls)
            self.assertEqual(
                (error.message, error.offset, error.retry_after), ("why", 12, 1.5)
            )

    def test_wire_round_trip(self) -> None:
        """An exception survives error_frame, encode, decode and error_for_code."""
        for cls in wire_classes():
            original = cls("over the wire \u2603", offset=99, retry_after=0.25)
            raw = encode(error_frame(original))
            frame = decode_body(raw[0], memoryview(raw)[5:])
            self.assertIsInstance(frame, Error)
            back = error_for_code(frame.code, frame.message, frame.offset,
                                  frame.retry_after_ms / 1000)
            self.assertIs(type(back), cls)
            self.assertEqual(
                (back.message, back.offset, back.retry_after),
                (original.message, 99, 0.25),
            )

    def test_unknown_code(self) -> None:
        """An unknown code becomes UnknownErrorCode keeping the raw code; fatal."""
        for raw in (0, 0x00FF, 0x02FF, 0xFFFF):
            error = error_for_code(raw, "new", 3, 2.0)
            self.assertIsInstance(error, UnknownErrorCode)
            self.assertEqual(
                (error.raw_code, error.message, error.offset, error.retry_after),
                (raw, "new", 3, 2.0),
            )
            self.assertIs(error.scope, Scope.CONNECTION)
            self.assertEqual(str(error), f"error 0x{raw:04x}: new")

    def test_internal_error_code(self) -> None:
        """INTERNAL_ERROR maps to InternalError, not UploadAlreadyComplete."""
        self.assertIs(type(error_for_code(ErrorCode.INTERNAL_ERROR, "m")), InternalError)


class ScopeTests(SynchronousTestCase):
    """Scopes and retry hints as documented."""

    def test_scopes(self) -> None:
        """Each code's class has the documented scope."""
        self.assertEqual(set(SCOPES), set(ErrorCode))
        for cls in wire_classes():
            self.assertIs(cls.scope, SCOPES[cls.code], cls.__name__)

    def test_retryable(self) -> None:
        """Exactly the transient errors are marked retryable."""
        for cls in wire_classes():
            self.assertEqual(cls.retryable, cls.code in RETRYABLE, cls.__name__)

    def test_base_defaults(self) -> None:
        """ImgresumeError defaults to a non-retryable INTERNAL_ERROR ending the connection."""
        error = ImgresumeError("m")
        self.assertEqual((error.code, error.scope, error.retryable),
                         (ErrorCode.INTERNAL_ERROR, Scope.CONNECTION, False))
        self.assertEqual((error.offset, error.retry_after), (0, 0.0))

    def test_str_and_repr(self) -> None:
        """str() names the code; repr() shows the class and every field."""
        error = errors.OffsetMismatch("continue from 5", offset=5, retry_after=1.0)
        self.assertEqual(str(error), "OFFSET_MISMATCH: continue from 5")
        self.assertEqual(
            repr(error), "OffsetMismatch('continue from 5', offset=5, retry_after=1.0)"
        )

    def test_upload_already_complete(self) -> None:
        """UploadAlreadyComplete carries the Completed answer and ends the command."""
        completed = Completed("00" * 16, 10, b"\0" * 32, "/a")
        error = UploadAlreadyComplete(completed)
        self.assertIs(error.completed, completed)
        self.assertIs(error.scope, Scope.COMMAND)
        self.assertIn("00" * 16, error.message)

# -*- test-case-name: tests.protocol.test_frames -*-
"""
The field encodings of frame bodies (docs/protocol.md, section 1):
big-endian integers, fixed-size byte strings, C{str} (u16 byte length +
UTF-8) and C{kv} (u16 count + that many C{str} key/value pairs), written by
L{Writer} and read by L{Reader}.  Used by L{imgresume.protocol._frames}.
"""

from __future__ import annotations

import struct
from typing import Mapping

from imgresume.errors import MalformedFrame

SHA256_SIZE = 32
#: The wire's SHA-256, in UPLOAD and ACCEPTED, of a file whose digest comes in
#: FINISH (C{late-digest}); only the codec knows it: above, that digest is None.
LATE_DIGEST = b"\0" * SHA256_SIZE


class Writer:
    """Builds a frame body from fields, in order."""

    def __init__(self) -> None:
        self.parts: list[bytes] = []

    def u8(self, v: int) -> "Writer":
        self.parts.append(struct.pack(">B", v))
        return self

    def u16(self, v: int) -> "Writer":
        self.parts.append(struct.pack(">H", v))
        return self

    def u32(self, v: int) -> "Writer":
        self.parts.append(struct.pack(">I", v))
        return self

    def u64(self, v: int) -> "Writer":
        self.parts.append(struct.pack(">Q", v))
        return self

    def fixed(self, v: bytes, size: int) -> "Writer":
        if len(v) != size:
            raise ValueError(f"expected {size} bytes, got {len(v)}")
        self.parts.append(v)
        return self

    def digest(self, v: bytes | None) -> "Writer":
        """A whole file's SHA-256: L{LATE_DIGEST} for one that comes at the end (None)."""
        return self.fixed(LATE_DIGEST if v is None else v, SHA256_SIZE)

    def str(self, v: str, errors: str = "strict") -> "Writer":
        raw = v.encode("utf-8", errors)
        if len(raw) > 0xFFFF:
            raise ValueError("string longer than 65535 bytes")
        self.parts.append(struct.pack(">H", len(raw)))
        self.parts.append(raw)
        return self

    def kv(self, v: Mapping[str, str], errors: str = "strict") -> "Writer":
        if len(v) > 0xFFFF:
            raise ValueError("too many key/value pairs")
        self.u16(len(v))
        for key, value in v.items():
            self.str(key, errors).str(value, errors)
        return self

    def body(self) -> bytes:
        return b"".join(self.parts)


class Reader:
    """Takes a frame body's fields, in order; a short or bad body is L{MalformedFrame}."""

    def __init__(self, body: memoryview, what: str) -> None:
        self.body = body
        self.pos = 0
        self.what = what

    def _take(self, n: int) -> memoryview:
        end = self.pos + n
        if end > len(self.body):
            raise MalformedFrame(f"{self.what} frame is truncated")
        piece = self.body[self.pos : end]
        self.pos = end
        return piece

    def u8(self) -> int:
        return self._take(1)[0]

    def u16(self) -> int:
        return struct.unpack(">H", self._take(2))[0]

    def u32(self) -> int:
        return struct.unpack(">I", self._take(4))[0]

    def u64(self) -> int:
        return struct.unpack(">Q", self._take(8))[0]

    def fixed(self, n: int) -> bytes:
        return bytes(self._take(n))

    def digest(self) -> bytes | None:
        """A whole file's SHA-256: None for L{LATE_DIGEST} (it comes at the end)."""
        raw = self.fixed(SHA256_SIZE)
        return None if raw == LATE_DIGEST else raw

    def str(self, errors: str = "strict") -> str:
        """
        A C{str} field.  Bytes that are not UTF-8 are a malformed frame,
        unless C{errors} is C{"surrogateescape"} (the user's text in UPLOAD).
        """
        raw = self._take(self.u16())
        try:
            return str(raw, "utf-8", errors)
        except UnicodeDecodeError:
            raise MalformedFrame(f"{self.what} frame has a string that is not UTF-8")

    def kv(self, errors: str = "strict") -> dict[str, str]:
        count = self.u16()
        out: dict[str, str] = {}
        for _ in range(count):
            key = self.str(errors)
            if key in out:
                raise MalformedFrame(f"{self.what} frame repeats the key {key!r}")
            out[key] = self.str(errors)
        return out

    def rest(self) -> bytes:
        piece = bytes(self.body[self.pos :])
        self.pos = len(self.body)
        return piece

    def at_end(self) -> bool:
        """Whether the body is read whole (an optional last field is absent)."""
        return self.pos == len(self.body)

    def done(self) -> None:
        if self.pos != len(self.body):
            raise MalformedFrame(
                f"{self.what} frame has {len(self.body) - self.pos} trailing bytes"
            )


#: How UPLOAD's name and metadata are decoded and encoded (see L{imgresume.protocol._frames.Upload}).
USER_TEXT = "surrogateescape"


def not_utf8(text: str) -> bool:
    """Whether C{text} came from bytes that are not UTF-8 (see L{imgresume.protocol._frames.Upload})."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def flag(value: int) -> bool:
    if value > 1:
        raise MalformedFrame(f"a flag byte must be 0 or 1, not {value}")
    return bool(value)

# -*- test-case-name: tests.test_frames -*-
"""
Incremental frame decoder: bytes in, whole frames out.

The size limit is checked on the 5-byte header, before any of the body is
buffered, so a peer cannot make the receiver allocate what it announces.
"""

from __future__ import annotations

from typing import Callable

from imgresume.errors import FrameTooLarge
from imgresume.protocol._frames import (
    CONTROL_MAX_BODY,
    DATA_PREFIX,
    HEADER,
    HEADER_SIZE,
    Frame,
    FrameType,
    decode_body,
)


def control_limit(max_payload: int) -> Callable[[int], int]:
    """A limit function: DATA bodies up to C{max_payload}, others 64 KiB."""
    data_limit = DATA_PREFIX.size + max_payload

    def limit(kind: int) -> int:
        return data_limit if kind == FrameType.DATA else CONTROL_MAX_BODY

    return limit


class FrameDecoder:
    """
    Buffers received bytes and yields frames one at a time.

    Used by both sans-IO connections.  C{limit(kind)} gives the largest body
    accepted for a frame type; it may be replaced as limits are negotiated.
    """

    def __init__(self, limit: Callable[[int], int] = control_limit(0)) -> None:
        self.limit = limit
        self._buffer = bytearray()

    @property
    def buffered(self) -> int:
        """Bytes received and not yet returned as frames."""
        return len(self._buffer)

    def feed(self, data: bytes) -> None:
        """Add received bytes."""
        self._buffer += data

    def next_frame(self) -> Frame | None:
        """
        Return the next whole frame, or None if more bytes are needed.

        @raise FrameTooLarge: a header announces a body over the limit.
        @raise imgresume.errors.MalformedFrame: a body does not parse.
        """
        buf = self._buffer
        if len(buf) < HEADER_SIZE:
            return None
        kind, length = HEADER.unpack_from(buf)
        limit = self.limit(kind)
        if length > limit:
            raise FrameTooLarge(
                f"frame type 0x{kind:02x} announces {length} bytes; the limit is {limit}"
            )
        end = HEADER_SIZE + length
        if len(buf) < end:
            return None
        with memoryview(buf) as view:
            frame = decode_body(kind, view[HEADER_SIZE:end])
        del buf[:end]
        return frame

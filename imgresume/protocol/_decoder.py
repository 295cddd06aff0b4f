# -*- test-case-name: tests.protocol.test_frames,tests.server.test_memory -*-
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
    Data,
    Frame,
    FrameType,
    decode_body,
    decode_put,
)


def control_limit(max_payload: int, max_put: int = 0) -> Callable[[int], int]:
    """
    A limit function: DATA bodies up to C{max_payload}, PUT bodies up to
    64 KiB more than C{max_put} (its fields, then the file), others 64 KiB.
    """
    data_limit = DATA_PREFIX.size + max_payload
    put_limit = CONTROL_MAX_BODY + max_put

    def limit(kind: int) -> int:
        if kind == FrameType.DATA:
            return data_limit
        return put_limit if kind == FrameType.PUT else CONTROL_MAX_BODY

    return limit


class FrameCursor:
    """
    Follows frame boundaries in a stream of received bytes without keeping
    the bytes: how many frames have begun, and how much of the latest one
    is still to come.  A server reads it to reserve memory for a frame as
    soon as its header is in, before the body arrives.

    C{limit(kind)} caps the body size it believes, like L{FrameDecoder}'s:
    a frame announcing more is refused by the decoder anyway.
    """

    def __init__(self, limit: Callable[[int], int]) -> None:
        self.limit = limit
        #: Frames whose header has arrived.
        self.frames = 0
        #: Size of the latest of them, header included (as capped), and its
        #: bytes still to come (0: between frames).
        self.size = 0
        self.remaining = 0
        self._header = b""

    def feed(self, data: bytes) -> None:
        """Follow received bytes (the same, in the same order, as the decoder's)."""
        pos, end = 0, len(data)
        while pos < end:
            if self.remaining:
                step = min(self.remaining, end - pos)
                self.remaining -= step
                pos += step
                continue
            take = HEADER_SIZE - len(self._header)
            self._header += data[pos : pos + take]
            pos += take
            if len(self._header) == HEADER_SIZE:
                kind, length = HEADER.unpack(self._header)
                self._header = b""
                self.frames += 1
                self.remaining = min(length, self.limit(kind))
                self.size = HEADER_SIZE + self.remaining


class FrameDecoder:
    """
    Buffers received bytes and yields frames one at a time.

    Used by both sans-IO connections.  C{limit(kind)} gives the largest body
    accepted for a frame type; it may be replaced as limits are negotiated.

    A large DATA frame is received into a buffer of its own, allocated once
    its header is in, and its payload is handed out as a C{memoryview} of
    that buffer: each payload byte is copied once on its way from the socket
    to the storage, not three times (into the stream buffer, out of it, and
    into a C{bytes}).
    """

    #: Bodies at least this long get a buffer of their own.
    OWN_BUFFER = 64 * 1024

    def __init__(self, limit: Callable[[int], int] = control_limit(0)) -> None:
        self.limit = limit
        self._buffer = bytearray()
        #: The body being received into its own buffer, how much of it is
        #: in, and its frame type.
        self._body: bytearray | None = None
        self._filled = 0
        self._kind = 0

    @property
    def buffered(self) -> int:
        """Bytes received and not yet returned as frames."""
        return len(self._buffer) + self._filled

    def feed(self, data: bytes) -> None:
        """Add received bytes."""
        body = self._body
        if body is None or self._filled == len(body):
            self._buffer += data
            return
        take = min(len(body) - self._filled, len(data))
        body[self._filled : self._filled + take] = memoryview(data)[:take]
        self._filled += take
        if take < len(data):
            self._buffer += memoryview(data)[take:]

    def next_frame(self) -> Frame | None:
        """
        Return the next whole frame, or None if more bytes are needed.

        @raise FrameTooLarge: a header announces a body over the limit.
        @raise imgresume.errors.MalformedFrame: a body does not parse.
        """
        body = self._body
        if body is not None:
            if self._filled < len(body):
                return None
            self._body, self._filled = None, 0
            if self._kind == FrameType.DATA and len(body) >= DATA_PREFIX.size:
                offset, crc = DATA_PREFIX.unpack_from(body)
                return Data(offset, crc, memoryview(body)[DATA_PREFIX.size :])
            if self._kind == FrameType.PUT:
                return decode_put(memoryview(body), copy=False)
            with memoryview(body) as view:
                return decode_body(self._kind, view)
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
        if len(buf) < end and length >= self.OWN_BUFFER:
            # Receive the rest of this body straight into its own buffer.
            body = bytearray(length)
            have = len(buf) - HEADER_SIZE
            body[:have] = memoryview(buf)[HEADER_SIZE:]
            del buf[:]
            self._body, self._filled, self._kind = body, have, kind
            return None
        if len(buf) < end:
            return None
        with memoryview(buf) as view:
            frame = decode_body(kind, view[HEADER_SIZE:end])
        del buf[:end]
        return frame

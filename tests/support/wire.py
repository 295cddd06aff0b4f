"""
Frames on the wire, for tests that drive a protocol over a
C{StringTransport} or feed it bytes: what it wrote, decoded.
"""

from __future__ import annotations

import zlib
from typing import Any

from twisted.internet.testing import StringTransport

from imgresume.protocol import Data, FrameDecoder, encode
from imgresume.protocol._decoder import control_limit


def new_decoder(max_payload: int = 1 << 20) -> FrameDecoder:
    """A decoder that accepts DATA payloads up to C{max_payload}."""
    return FrameDecoder(control_limit(max_payload))


def drain(decoder: FrameDecoder) -> list[Any]:
    """Every whole frame C{decoder} holds, in order."""
    out = []
    while (frame := decoder.next_frame()) is not None:
        out.append(frame)
    return out


def decode_frames(data: bytes) -> list[Any]:
    """Every whole frame in C{data}."""
    decoder = new_decoder()
    decoder.feed(data)
    return drain(decoder)


def frames_written(transport: StringTransport,
                   decoder: FrameDecoder | None = None) -> list[Any]:
    """
    The frames written to C{transport} since the last call (it is cleared).
    Pass the same C{decoder} every time to carry a frame written in parts
    over to the next call.
    """
    if decoder is None:
        decoder = new_decoder()
    decoder.feed(transport.value())
    transport.clear()
    return drain(decoder)


def data_frame(offset: int, payload: bytes) -> bytes:
    """The encoded DATA frame of C{payload} at C{offset}, with its CRC."""
    return encode(Data(offset, zlib.crc32(payload), payload))

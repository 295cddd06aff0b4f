"""
Tests for L{imgresume.protocol._frames} and L{imgresume.protocol._decoder}:
the byte layout of every frame, the incremental decoder, its size limits and
its handling of malformed input.
"""

from __future__ import annotations

import hashlib
import struct
import random
import zlib

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from imgresume.errors import FrameTooLarge, ImgresumeError, MalformedFrame
from imgresume.protocol._decoder import FrameDecoder, control_limit
from imgresume.protocol._frames import (
    CONTROL_MAX_BODY,
    HEADER,
    LATE_DIGEST,
    MAGIC,
    PROTOCOL_VERSION,
    Accepted,
    Ack,
    Auth,
    Challenge,
    Completed,
    Data,
    Error,
    Finish,
    FrameType,
    Hello,
    Ping,
    Pong,
    Put,
    Resume,
    Status,
    Upload,
    UploadStatusFrame,
    Welcome,
    data_header,
    decode_body,
    decode_put,
    encode,
    put_header,
)
from tests.support.wire import drain
from tests.support.wire import new_decoder as decoder

FAST = settings(
    max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
FUZZ = settings(
    max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)

UPLOAD_ID = "00112233445566778899aabbccddeeff"
DIGEST = bytes(range(32))

#: One instance of every frame type, with non-ASCII strings and options
#: where the type has them.
SAMPLES = [
    Hello("client-1", 1, 3, {"agent": "test", "lang": "\u00e9\u00e8"}),
    Welcome(1, "server-\u2603", 4 << 20, 1 << 40, 1 << 20, {"region": "eu"}),
    Upload("photos/IMG_0001.jpg", 123456789, DIGEST, {"camera": "X100", "k": ""}),
    Resume(UPLOAD_ID),
    Accepted(UPLOAD_ID, "photos/\u00e9.jpg", 1000, DIGEST, 500, 400, 100, b"\x07" * 32),
    Data(12, zlib.crc32(b"payload"), b"payload"),
    Data(99, 0, b""),
    Ack(2**64 - 1),
    Completed(UPLOAD_ID, 1000, DIGEST, "/srv/images/\u00e9.jpg"),
    Error(0x0201, "CRC mismatch \u2639", 4096, 1500),
    Ping(0),
    Pong(2**64 - 1),
    Challenge("node-\u00e9", b"\x05" * 32),
    Auth(b"\x09" * 32),
    Status(UPLOAD_ID),
    UploadStatusFrame(UPLOAD_ID, "scans/\u00e9.tif", 10**9, False, 5 << 20, True,
                      "node-2", 1764115200000, 1764115260000, ""),
    UploadStatusFrame(UPLOAD_ID, "a.tif", 3, True, 3, False, "", 1, 2, "complete/a.tif",
                      {"digest": "blake3"}),
    Finish(DIGEST),
    Put(UPLOAD_ID, "scans/\u00e9.tif", DIGEST, {"dpi": "600"}, zlib.crc32(b"II*\0"),
        b"II*\0"),
]


def decode_one(raw: bytes, max_payload: int = 1 << 20):
    """Feed C{raw} to a fresh decoder and return its one frame."""
    dec = decoder(max_payload)
    dec.feed(raw)
    return dec.next_frame()


# Strategies for every frame type ------------------------------------------

u16 = st.integers(0, 2**16 - 1)
u32 = st.integers(0, 2**32 - 1)
u64 = st.integers(0, 2**64 - 1)
text = st.text(max_size=40)
kv = st.dictionaries(text, text, max_size=5)
digest = st.binary(min_size=32, max_size=32)
#: A whole file's digest as UPLOAD and ACCEPTED carry it: None for one that
#: comes at the end (on the wire, LATE_DIGEST).
file_digest = st.none() | digest.filter(lambda d: d != LATE_DIGEST)
upload_id = st.binary(min_size=16, max_size=16).map(bytes.hex)

frames = st.one_of(
    st.builds(Hello, text, u16, u16, kv),
    st.builds(Welcome, u16, text, u32, u64, u32, kv),
    st.builds(Upload, text, u64, file_digest, kv),
    st.builds(Resume, upload_id),
    st.builds(Accepted, upload_id, text, u64, file_digest, u64, u64, u32, digest),
    st.binary(max_size=300).flatmap(
        lambda p: st.builds(Data, u64, st.just(zlib.crc32(p)), st.just(p))
    ),
    st.builds(Ack, u64),
    st.builds(Finish, digest),
    st.builds(Completed, upload_id, u64, digest, text),
    st.builds(Error, u16, text, u64, u32),
    st.builds(Ping, u64),
    st.builds(Pong, u64),
    st.binary(max_size=300).flatmap(
        lambda p: st.builds(Put, upload_id, text, digest, kv, st.just(zlib.crc32(p)),
                            st.just(p))
    ),
)


class RoundTripTests(SynchronousTestCase):
    """encode() and FrameDecoder are inverses."""

    def test_every_type_sampled(self) -> None:
        """SAMPLES covers every FrameType, so the round trips below cover all."""
        kinds = {FrameType(encode(frame)[0]) for frame in SAMPLES}
        self.assertEqual(kinds, set(FrameType))

    def test_round_trip_samples(self) -> None:
        """Each sample frame decodes to a frame equal to itself."""
        for frame in SAMPLES:
            self.assertEqual(decode_one(encode(frame)), frame, frame)

    @FAST
    @given(frames)
    def test_round_trip_generated(self, frame) -> None:
        """Any frame of any type survives encode, feed and next_frame unchanged."""
        dec = decoder(1024)
        dec.feed(encode(frame))
        self.assertEqual(dec.next_frame(), frame)
        self.assertEqual(dec.buffered, 0)
        self.assertIsNone(dec.next_frame())

    def test_header_announces_body_length(self) -> None:
        """The u8 type and u32 length of every frame match its body."""
        for frame in SAMPLES:
            raw = encode(frame)
            kind, length = HEADER.unpack_from(raw)
            self.assertEqual(len(raw), HEADER.size + length, frame)
            self.assertEqual(decode_body(kind, memoryview(raw)[HEADER.size:]), frame)

    def test_data_header_then_payload(self) -> None:
        """data_header() + payload is exactly encode(Data(...))."""
        payload = b"0123456789"
        crc = zlib.crc32(payload)
        self.assertEqual(
            data_header(7, crc, len(payload)) + payload, encode(Data(7, crc, payload))
        )

    def test_hello_defaults(self) -> None:
        """A Hello built with a client id alone offers PROTOCOL_VERSION only."""
        hello = Hello("c")
        self.assertEqual((hello.version_min, hello.version_max), (1, 1))
        self.assertEqual(PROTOCOL_VERSION, 1)
        self.assertEqual(decode_one(encode(hello)), hello)

    def test_digest_sent_at_the_end(self) -> None:
        """
        UPLOAD and ACCEPTED carry a digest that comes at the end (None) as
        LATE_DIGEST, 32 zero bytes, and decode it back to None; the frames
        refuse LATE_DIGEST itself.
        """
        upload = Upload("n", 10, None, {"k": "v"})
        self.assertEqual(encode(upload), encode(Upload("n", 10, DIGEST, {"k": "v"})).replace(
            DIGEST, LATE_DIGEST))
        self.assertEqual(decode_one(encode(upload)), upload)
        accepted = Accepted(UPLOAD_ID, "n", 10, None, 4)
        self.assertIn(LATE_DIGEST + (4).to_bytes(8, "big"), encode(accepted))
        self.assertEqual(decode_one(encode(accepted)), accepted)
        self.assertRaises(ValueError, Upload, "n", 10, LATE_DIGEST)
        self.assertRaises(ValueError, Accepted, UPLOAD_ID, "n", 10, LATE_DIGEST, 0)

    def test_accepted_tail_defaults(self) -> None:
        """
        An Accepted without a tail sends zeros for start and length, and the
        SHA-256 of no bytes as the digest (what servers send, docs/protocol.md).
        """
        accepted = Accepted(UPLOAD_ID, "n", 10, DIGEST, 0)
        raw = encode(accepted)
        self.assertTrue(raw.endswith(b"\0" * (8 + 4) + hashlib.sha256(b"").digest()))
        self.assertEqual(decode_one(raw), accepted)


class EncodeRefusalTests(SynchronousTestCase):
    """encode() refuses values that do not fit the layout."""

    def test_not_a_frame(self) -> None:
        """encode() raises TypeError for an object that is not a frame."""
        self.assertRaises(TypeError, encode, object())

    def test_bad_digest_length(self) -> None:
        """A SHA-256 field of the wrong length is a ValueError, not a short frame."""
        self.assertRaises(ValueError, encode, Upload("n", 1, b"\0" * 31))

    def test_bad_upload_id(self) -> None:
        """An upload id that is not 32 hex digits is a ValueError."""
        self.assertRaises(ValueError, encode, Resume("abcd"))
        self.assertRaises(ValueError, encode, Resume("zz" * 16))

    def test_string_too_long(self) -> None:
        """A string over 65535 UTF-8 bytes is a ValueError."""
        self.assertRaises(ValueError, encode, Error(1, "\u00e9" * 32768))


class LayoutTests(SynchronousTestCase):
    """The bytes on the wire, pinned against hand-written hex."""

    def assertHex(self, frame, expected: str) -> None:
        """encode(frame) is C{expected} and decodes back to C{frame}."""
        raw = bytes.fromhex(expected.replace(" ", ""))
        self.assertEqual(encode(frame).hex(" "), raw.hex(" "))
        self.assertEqual(decode_one(raw), frame)

    def test_hello(self) -> None:
        """HELLO: magic, u16 min, u16 max, str client id, kv options."""
        self.assertHex(
            Hello("c1", 1, 2, {"k": "v"}),
            "01 00000014"
            " 494d4752"  # b"IMGR"
            " 0001 0002"  # versions 1..2
            " 0002 6331"  # "c1"
            " 0001 0001 6b 0001 76",  # {"k": "v"}
        )

    def test_welcome(self) -> None:
        """WELCOME: u16 version, str id, u32 max payload, u64 max size, u32 chunk, kv."""
        self.assertHex(
            Welcome(1, "s", 0x10000, 0x0100000000, 0x8000),
            "02 00000017 0001 0001 73 00010000 0000000100000000 00008000 0000",
        )

    def test_data(self) -> None:
        """DATA: u64 offset, u32 CRC-32, then the payload to the end of the body."""
        self.assertHex(
            Data(0x0102030405060708, zlib.crc32(b"abc"), b"abc"),
            "06 0000000f 0102030405060708 352441c2 616263",
        )

    def test_data_empty(self) -> None:
        """The end-of-upload DATA is a 12-byte body: offset and CRC-32 of nothing."""
        self.assertHex(Data(5, 0, b""), "06 0000000c 0000000000000005 00000000")

    def test_finish(self) -> None:
        """FINISH: the whole file's SHA-256, 32 raw bytes."""
        self.assertHex(Finish(bytes(range(32))), "10 00000020 " + bytes(range(32)).hex())

    def test_ack(self) -> None:
        """ACK: a u64 offset."""
        self.assertHex(Ack(0x1122334455667788), "07 00000008 1122334455667788")

    def test_error(self) -> None:
        """ERROR: u16 code, u64 offset, u32 retry-after ms, str message."""
        self.assertHex(
            Error(0x0201, "bad", offset=5, retry_after_ms=1500),
            "09 00000013 0201 0000000000000005 000005dc 0003 626164",
        )

    def test_resume(self) -> None:
        """RESUME: the upload id as 16 raw bytes."""
        self.assertHex(Resume(UPLOAD_ID), "04 00000010 " + UPLOAD_ID)

    def test_ping_pong(self) -> None:
        """PING and PONG: a u64 nonce."""
        self.assertHex(Ping(258), "0a 00000008 0000000000000102")
        self.assertHex(Pong(258), "0b 00000008 0000000000000102")

    def test_upload_status(self) -> None:
        """
        UPLOAD_STATUS: id, str name, u64 size, u8 complete, u64 offset, u8
        busy, str owner, u64 created and updated ms, str path; then, only
        when the client asked for them, the optional fields as a kv.
        """
        common = (UPLOAD_ID + " 0001 61 0000000000000003 01 0000000000000003 00"
                  " 0001 6e 0000000000000001 0000000000000002 0001 70")
        self.assertHex(UploadStatusFrame(UPLOAD_ID, "a", 3, True, 3, False, "n", 1, 2, "p"),
                       "0f 0000003b " + common)
        self.assertHex(UploadStatusFrame(UPLOAD_ID, "a", 3, True, 3, False, "n", 1, 2, "p",
                                         {"digest": "sha256"}),
                       "0f 0000004d " + common + " 0001 0006 646967657374 0006 736861323536")
        self.assertHex(UploadStatusFrame(UPLOAD_ID, "a", 3, True, 3, False, "n", 1, 2, "p", {}),
                       "0f 0000003d " + common + " 0000")


class IncrementalTests(SynchronousTestCase):
    """The decoder accepts bytes in any split."""

    def test_empty_decoder(self) -> None:
        """A fresh decoder has nothing buffered and no frame."""
        dec = decoder()
        self.assertEqual(dec.buffered, 0)
        self.assertIsNone(dec.next_frame())

    def test_one_byte_at_a_time(self) -> None:
        """Fed a byte at a time, every frame appears exactly when its last byte does."""
        dec = decoder()
        got = []
        for frame in SAMPLES:
            raw = encode(frame)
            for i in range(len(raw)):
                self.assertIsNone(dec.next_frame())
                dec.feed(raw[i : i + 1])
            got.append(dec.next_frame())
            self.assertEqual(dec.buffered, 0)
        self.assertEqual(got, SAMPLES)

    def test_several_frames_in_one_feed(self) -> None:
        """Frames fed together come out one per call, in order."""
        dec = decoder()
        dec.feed(b"".join(encode(f) for f in SAMPLES))
        self.assertEqual(drain(dec), SAMPLES)
        self.assertEqual(dec.buffered, 0)

    def test_buffered_counts_partial_frame(self) -> None:
        """buffered reports bytes of a frame not yet complete."""
        dec = decoder()
        raw = encode(Ping(1))
        dec.feed(raw + raw[:3])
        self.assertEqual(dec.next_frame(), Ping(1))
        self.assertEqual(dec.buffered, 3)
        self.assertIsNone(dec.next_frame())

    @FAST
    @given(
        st.lists(frames, min_size=1, max_size=6),
        st.lists(st.integers(0, 10_000), max_size=20),
    )
    def test_random_splits(self, sent, cuts) -> None:
        """Frames cut at arbitrary points decode to the frames sent."""
        raw = b"".join(encode(f) for f in sent)
        points = sorted({c % (len(raw) + 1) for c in cuts} | {0, len(raw)})
        dec = decoder(1024)
        got = []
        for start, end in zip(points, points[1:]):
            dec.feed(raw[start:end])
            got.extend(drain(dec))
        self.assertEqual(got, sent)
        self.assertEqual(dec.buffered, 0)


class LargeFrameTests(SynchronousTestCase):
    """
    DATA frames of 64 KiB and more go into a buffer of their own, and their
    payload comes out as a view of it (one copy from socket to storage).
    """

    BIG = bytes(random.Random(5).getrandbits(8) for _ in range(200_000))

    def frames(self) -> list:
        return [Data(7, zlib.crc32(self.BIG), self.BIG), Ping(3),
                Data(200_007, zlib.crc32(self.BIG[:70_000]), self.BIG[:70_000])]

    def test_payload_is_a_view_of_its_own_buffer(self) -> None:
        """A large payload fed in socket-sized reads is a memoryview of its bytes."""
        dec = decoder(1 << 20)
        raw = encode(self.frames()[0])
        for start in range(0, len(raw), 65536):
            self.assertIsNone(dec.next_frame())
            dec.feed(raw[start : start + 65536])
            self.assertEqual(dec.buffered, min(start + 65536, len(raw)) - 5
                             if start else min(65536, len(raw)))
        frame = dec.next_frame()
        self.assertIsInstance(frame.payload, memoryview)
        self.assertEqual((frame.offset, bytes(frame.payload)), (7, self.BIG))
        self.assertEqual(dec.buffered, 0)

    @FAST
    @given(st.lists(st.integers(0, 10**6), max_size=12))
    def test_random_splits(self, cuts) -> None:
        """Large and small frames cut anywhere decode to the frames sent."""
        sent = self.frames()
        raw = b"".join(encode(f) for f in sent)
        points = sorted({c % (len(raw) + 1) for c in cuts} | {0, len(raw)})
        dec = decoder(1 << 20)
        got = []
        for start, end in zip(points, points[1:]):
            dec.feed(raw[start:end])
            got.extend(drain(dec))
        self.assertEqual(got, sent)
        self.assertEqual(dec.buffered, 0)


class PutFrameTests(SynchronousTestCase):
    """The PUT frame: a whole small file, its fields and its size limit."""

    def test_layout(self) -> None:
        """PUT is 0x11: id, name, sha256, metadata, crc32, then the payload."""
        put = Put(UPLOAD_ID, "a", DIGEST, {"k": "v"}, 0x01020304, b"xyz")
        body = (bytes.fromhex(UPLOAD_ID) + _str(b"a") + DIGEST
                + bytes.fromhex("0001") + _str(b"k") + _str(b"v") + bytes.fromhex("01020304")
                + b"xyz")
        self.assertEqual(encode(put), _frame(0x11, body))
        self.assertEqual(put.size, 3)

    def test_header_then_payload(self) -> None:
        """put_header() + payload is exactly encode(Put(...)); the payload is not read."""
        put = Put(UPLOAD_ID, "n", DIGEST, {}, zlib.crc32(b"0123"), b"0123")
        self.assertEqual(put_header(attrs_evolve(put, payload=b""), 4) + b"0123", encode(put))

    def test_late_digest_not_special(self) -> None:
        """32 zero bytes in a PUT are a digest like any other (the server compares it)."""
        put = Put(UPLOAD_ID, "n", LATE_DIGEST, {}, 0, b"")
        self.assertEqual(decode_one(encode(put)).sha256, LATE_DIGEST)

    def test_user_text_not_utf8(self) -> None:
        """Bytes that are not UTF-8 in the name or metadata decode (refused by the server)."""
        put = Put(UPLOAD_ID, "a\udcff", DIGEST, {"k": "\udcfe"}, 0, b"")
        self.assertEqual(decode_one(encode(put)), put)

    def test_limit(self) -> None:
        """A PUT body may be 64 KiB over the put limit; a header over it raises."""
        limit = control_limit(100, 1000)
        self.assertEqual(limit(FrameType.PUT), CONTROL_MAX_BODY + 1000)
        self.assertEqual(control_limit(100)(FrameType.PUT), CONTROL_MAX_BODY)
        dec = FrameDecoder(limit)
        dec.feed(HEADER.pack(FrameType.PUT, CONTROL_MAX_BODY + 1001))
        self.assertRaises(FrameTooLarge, dec.next_frame)

    def test_large_payload_is_a_view(self) -> None:
        """A large PUT's payload is a memoryview of its own buffer, fed in parts."""
        data = bytes(random.Random(3).getrandbits(8) for _ in range(100_000))
        put = Put(UPLOAD_ID, "big", DIGEST, {}, zlib.crc32(data), data)
        dec = FrameDecoder(control_limit(1 << 20, 1 << 20))
        raw = encode(put)
        got = []
        for start in range(0, len(raw), 65536):
            dec.feed(raw[start:start + 65536])
            got.extend(drain(dec))
        self.assertEqual(got, [put])
        self.assertIsInstance(got[0].payload, memoryview)

    def test_truncated(self) -> None:
        """A PUT body shorter than its fields is malformed."""
        self.assertRaises(MalformedFrame, decode_put, memoryview(bytes(20)))


def attrs_evolve(frame, **changes):
    """C{frame} with C{changes}."""
    import attrs

    return attrs.evolve(frame, **changes)


class LimitTests(SynchronousTestCase):
    """Size limits are enforced from the 5-byte header."""

    def test_data_too_large_from_header(self) -> None:
        """A DATA header over the payload limit raises before any body arrives."""
        dec = decoder(100)
        dec.feed(HEADER.pack(FrameType.DATA, 12 + 101))
        self.assertRaises(FrameTooLarge, dec.next_frame)

    def test_data_at_limit_waits(self) -> None:
        """A DATA header exactly at the payload limit waits for its body."""
        dec = decoder(100)
        dec.feed(HEADER.pack(FrameType.DATA, 12 + 100))
        self.assertIsNone(dec.next_frame())

    def test_data_limit_is_max_payload(self) -> None:
        """control_limit(n) lets a DATA of n payload bytes through and not n + 1."""
        payload = b"x" * 100
        self.assertEqual(
            decode_one(encode(Data(0, zlib.crc32(payload), payload)), 100),
            Data(0, zlib.crc32(payload), payload),
        )
        payload += b"x"
        dec = decoder(100)
        dec.feed(encode(Data(0, zlib.crc32(payload), payload)))
        self.assertRaises(FrameTooLarge, dec.next_frame)

    def test_default_limit_allows_only_empty_data(self) -> None:
        """Before limits are negotiated a decoder accepts DATA without payload only."""
        dec = FrameDecoder()
        dec.feed(encode(Data(0, 0, b"")))
        self.assertEqual(dec.next_frame(), Data(0, 0, b""))
        dec.feed(encode(Data(0, zlib.crc32(b"x"), b"x")))
        self.assertRaises(FrameTooLarge, dec.next_frame)

    def test_control_frame_header_too_large(self) -> None:
        """A control frame announcing 65537 bytes raises from the header alone."""
        for kind in FrameType:
            if kind is FrameType.DATA:
                continue
            dec = decoder(1 << 20)
            dec.feed(HEADER.pack(kind, CONTROL_MAX_BODY + 1))
            self.assertRaises(FrameTooLarge, dec.next_frame)

    def test_control_limit_ignores_max_payload(self) -> None:
        """Control frames stay limited to 64 KiB however large max_payload is."""
        self.assertEqual(control_limit(1 << 30)(FrameType.HELLO), CONTROL_MAX_BODY)
        self.assertEqual(control_limit(1 << 30)(FrameType.DATA), 12 + (1 << 30))
        self.assertEqual(CONTROL_MAX_BODY, 65536)

    def test_control_frame_at_limit(self) -> None:
        """A control frame of exactly 65536 body bytes decodes; one more does not."""
        fixed = 2 + 8 + 4 + 2  # ERROR body without its message
        frame = Error(1, "m" * (CONTROL_MAX_BODY - fixed))
        self.assertEqual(len(encode(frame)), HEADER.size + CONTROL_MAX_BODY)
        self.assertEqual(decode_one(encode(frame)), frame)
        dec = decoder()
        dec.feed(encode(Error(1, "m" * (CONTROL_MAX_BODY - fixed + 1))))
        self.assertRaises(FrameTooLarge, dec.next_frame)

    def test_unknown_type_uses_control_limit(self) -> None:
        """An unknown type announcing a huge body is refused as too large."""
        dec = decoder()
        dec.feed(HEADER.pack(0xEE, 2**32 - 1))
        self.assertRaises(FrameTooLarge, dec.next_frame)

    def test_limit_replaceable(self) -> None:
        """Replacing decoder.limit applies to the next header."""
        dec = FrameDecoder()
        payload = b"y" * 50
        dec.feed(encode(Data(0, zlib.crc32(payload), payload)))
        dec.limit = control_limit(50)
        self.assertEqual(dec.next_frame(), Data(0, zlib.crc32(payload), payload))


def _frame(kind: int, body: bytes) -> bytes:
    return HEADER.pack(kind, len(body)) + body


def _str(s: bytes) -> bytes:
    return struct.pack(">H", len(s)) + s


class MalformedTests(SynchronousTestCase):
    """Bodies that do not parse raise MalformedFrame."""

    def assertMalformed(self, raw: bytes) -> MalformedFrame:
        """Decoding C{raw} raises MalformedFrame; return it."""
        dec = decoder()
        dec.feed(raw)
        return self.assertRaises(MalformedFrame, dec.next_frame)

    def test_unknown_type(self) -> None:
        """Types 0x00 and 0x12..0xff are unknown."""
        for kind in (0x00, 0x12, 0x7F, 0xFF):
            error = self.assertMalformed(_frame(kind, b""))
            self.assertIn(f"0x{kind:02x}", error.message)

    def test_truncated_body(self) -> None:
        """A body shorter than its fields is truncated, for every fixed field kind."""
        for frame in SAMPLES:
            raw = encode(frame)
            kind, length = HEADER.unpack_from(raw)
            body = raw[HEADER.size:]
            if kind == FrameType.DATA:
                cut = 11  # shorter than offset + CRC-32
            elif kind == FrameType.PUT:
                cut = length - len(frame.payload) - 1  # into the CRC-32
            else:
                cut = length - 1
            self.assertMalformed(_frame(kind, body[:cut]))

    def test_empty_body(self) -> None:
        """An empty body is malformed for every type."""
        for kind in FrameType:
            self.assertMalformed(_frame(kind, b""))

    def test_trailing_bytes(self) -> None:
        """A body longer than its fields is malformed (except DATA and PUT: their payload is the rest)."""
        for frame in SAMPLES:
            if isinstance(frame, (Data, Put)):
                continue
            raw = encode(frame)
            kind = raw[0]
            error = self.assertMalformed(_frame(kind, raw[HEADER.size:] + b"\0"))
            self.assertIn("trailing", error.message)

    def test_bad_utf8(self) -> None:
        """A str field that is not UTF-8 is malformed."""
        body = MAGIC + b"\0\x01\0\x01" + _str(b"\xff\xfe") + b"\0\0"
        self.assertMalformed(_frame(FrameType.HELLO, body))
        # Also in a value inside kv, and a lone surrogate in UTF-8 form.
        body = MAGIC + b"\0\x01\0\x01" + _str(b"c") + b"\0\x01" + _str(b"k") + _str(b"\xed\xa0\x80")
        self.assertMalformed(_frame(FrameType.HELLO, body))

    def test_upload_text_not_utf8(self) -> None:
        """
        UPLOAD's name and metadata are the user's text: bytes that are not
        UTF-8 decode (as lone surrogates) and encode back to the same bytes,
        for the server to refuse with a command error.
        """
        body = (_str(b"a\xff.tif") + struct.pack(">Q", 1) + DIGEST
                + b"\0\x01" + _str(b"k\xc3") + _str(b"\xed\xa0\x80"))
        raw = _frame(FrameType.UPLOAD, body)
        upload = decode_one(raw)
        self.assertEqual(upload.name, "a\udcff.tif")
        self.assertEqual(upload.metadata, {"k\udcc3": "\udced\udca0\udc80"})
        self.assertEqual(encode(upload), raw)

    def test_bad_magic(self) -> None:
        """A HELLO that does not open with b'IMGR' is malformed."""
        raw = bytearray(encode(Hello("c")))
        raw[HEADER.size] = ord("X")
        error = self.assertMalformed(bytes(raw))
        self.assertIn("magic", error.message)

    def test_repeated_key(self) -> None:
        """A kv map naming a key twice is malformed."""
        body = (
            _str(b"name") + struct.pack(">Q", 1) + DIGEST
            + b"\0\x02" + _str(b"k") + _str(b"1") + _str(b"k") + _str(b"2")
        )
        error = self.assertMalformed(_frame(FrameType.UPLOAD, body))
        self.assertIn("'k'", error.message)

    def test_kv_count_past_body(self) -> None:
        """A kv count larger than the entries present is truncation, not a hang."""
        body = MAGIC + b"\0\x01\0\x01" + _str(b"c") + b"\xff\xff"
        self.assertMalformed(_frame(FrameType.HELLO, body))

    def test_malformed_is_connection_scope(self) -> None:
        """MalformedFrame and FrameTooLarge are ImgresumeErrors, fatal to the connection."""
        self.assertTrue(issubclass(MalformedFrame, ImgresumeError))
        self.assertTrue(issubclass(FrameTooLarge, ImgresumeError))

    def test_decode_body_unknown_type(self) -> None:
        """decode_body() itself refuses an unknown type."""
        self.assertRaises(MalformedFrame, decode_body, 0x42, memoryview(b""))


def _honest(kind: int, body: bytes) -> bytes:
    return _frame(kind, body)


def _mutate(raw: bytes, edits: list[tuple[int, int]]) -> bytes:
    out = bytearray(raw)
    for pos, value in edits:
        out[pos % len(out)] = value
    return bytes(out)


fuzz_inputs = st.one_of(
    st.binary(max_size=200),
    st.lists(
        st.builds(_honest, st.integers(0, 15), st.binary(max_size=120)), max_size=4
    ).map(b"".join),
    st.builds(
        _mutate,
        frames.map(encode),
        st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), min_size=1, max_size=4),
    ),
)


class FuzzTests(SynchronousTestCase):
    """Arbitrary bytes never break the decoder in an unexpected way."""

    @FUZZ
    @given(fuzz_inputs, st.integers(1, 50))
    def test_arbitrary_bytes(self, raw: bytes, step: int) -> None:
        """Any bytes, fed in steps, yield frames or an ImgresumeError, nothing else."""
        dec = decoder(256)
        try:
            for i in range(0, len(raw), step):
                dec.feed(raw[i : i + step])
                while (frame := dec.next_frame()) is not None:
                    self.assertIsInstance(
                        frame,
                        (Hello, Welcome, Upload, Resume, Accepted, Data, Ack,
                         Completed, Error, Ping, Pong, Challenge, Auth, Status,
                         UploadStatusFrame, Finish, Put),
                    )
        except ImgresumeError as error:
            self.assertIsInstance(error, (MalformedFrame, FrameTooLarge))

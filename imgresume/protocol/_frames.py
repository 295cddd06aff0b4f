# -*- test-case-name: tests.protocol.test_frames -*-
"""
Frame value objects and their byte layout.

Every frame is C{u8 type} + C{u32 body length} (big-endian) + body.  Bodies
are built from the fields of L{imgresume.protocol._codec}: big-endian
integers, fixed-size byte strings, C{str} and C{kv}.
C{docs/protocol.md} is the normative description; this module is its code.
"""

from __future__ import annotations

import enum
import struct
from typing import Mapping, Union

import attrs

from imgresume import integrity
from imgresume.errors import MalformedFrame
from imgresume.protocol._codec import (
    LATE_DIGEST,
    SHA256_SIZE,
    USER_TEXT,
    Reader,
    Writer,
    flag,
)

MAGIC = b"IMGR"
PROTOCOL_VERSION = 1
HEADER = struct.Struct(">BI")
HEADER_SIZE = HEADER.size
#: Largest body of any frame but DATA, in either direction.
CONTROL_MAX_BODY = 65536
#: Bytes of a DATA body before the payload: u64 offset + u32 crc32.
DATA_PREFIX = struct.Struct(">QI")
UPLOAD_ID_SIZE = 16
NONCE_SIZE = 32
#: ACCEPTED's C{tail_sha256} when C{tail_length} is 0: the SHA-256 of no bytes.
EMPTY_TAIL_SHA256 = integrity.EMPTY_DIGESTS["sha256"]
#: The upload id of a COMPLETED that answers an UPLOAD with C{if-exists} =
#: C{skip}: no upload was made, a file with the same size and SHA-256 is
#: already stored (16 zero bytes on the wire).
SKIPPED_UPLOAD_ID = "0" * 32
#: The client id of imgresume-lb's health checks.
HEALTH_CHECK_CLIENT_ID = "imgresume-lb-health"
#: Client ids servers treat as health checks: welcomed without a key (for
#: PING only) and not logged.  "haproxy-check" is the id in
#: docs/examples/haproxy.cfg.
HEALTH_CHECK_CLIENT_IDS = frozenset({HEALTH_CHECK_CLIENT_ID, "haproxy-check"})
#: HELLO option: the optional UPLOAD_STATUS fields the client reads,
#: comma-separated (defined: C{digest}); see L{UploadStatusFrame.fields}.
STATUS_FIELDS = "status-fields"


class FrameType(enum.IntEnum):
    """The u8 that opens every frame."""

    HELLO = 0x01
    WELCOME = 0x02
    UPLOAD = 0x03
    RESUME = 0x04
    ACCEPTED = 0x05
    DATA = 0x06
    ACK = 0x07
    COMPLETED = 0x08
    ERROR = 0x09
    PING = 0x0A
    PONG = 0x0B
    CHALLENGE = 0x0C
    AUTH = 0x0D
    STATUS = 0x0E
    UPLOAD_STATUS = 0x0F
    FINISH = 0x10
    PUT = 0x11


def _kv(value: Mapping[str, str]) -> dict[str, str]:
    return dict(value)


@attrs.frozen
class Hello:
    """Client -> server, first frame: who is connecting and what it speaks."""

    client_id: str
    version_min: int = PROTOCOL_VERSION
    version_max: int = PROTOCOL_VERSION
    options: Mapping[str, str] = attrs.field(factory=dict, converter=_kv)


@attrs.frozen
class Welcome:
    """Server -> client, answer to HELLO: chosen version, identity, limits."""

    version: int
    server_id: str
    max_payload: int
    max_file_size: int
    chunk_size: int
    options: Mapping[str, str] = attrs.field(factory=dict, converter=_kv)


def _not_late_digest(instance: object, attribute: object, value: bytes | None) -> None:
    if value == LATE_DIGEST:
        raise ValueError("a SHA-256 that comes at the end, in FINISH, is None")


@attrs.frozen
class Upload:
    """
    Client -> server: start a new upload (C{sha256} None: it comes in FINISH).

    The name and the metadata are the user's text: bytes in them that are
    not UTF-8 are decoded as lone surrogates (C{surrogateescape}) and
    encoded back the same way, so the server can refuse them with
    INVALID_NAME or INVALID_METADATA instead of dropping the connection.
    """

    name: str
    size: int
    sha256: bytes | None = attrs.field(validator=_not_late_digest)
    metadata: Mapping[str, str] = attrs.field(factory=dict, converter=_kv)


@attrs.frozen
class Resume:
    """Client -> server: continue an existing upload by id (32 hex digits)."""

    upload_id: str


@attrs.frozen
class Accepted:
    """
    Server -> client, answer to UPLOAD or RESUME: the upload id, what the
    server holds for it, the offset to send from, and the SHA-256 of the
    last committed range so the client can check the residual is its file.
    C{sha256} is the file's digest as UPLOAD declared it (None: in FINISH).
    """

    upload_id: str
    name: str
    size: int
    sha256: bytes | None = attrs.field(validator=_not_late_digest)
    offset: int
    tail_start: int = 0
    tail_length: int = 0
    tail_sha256: bytes = EMPTY_TAIL_SHA256


@attrs.frozen
class Data:
    """
    Client -> server: payload bytes at an offset, with their CRC-32 (the
    zlib/ISO-HDLC polynomial).  An empty payload at offset == size ends the
    upload.
    """

    offset: int
    crc32: int
    payload: bytes


@attrs.frozen
class Finish:
    """
    Client -> server: the end of an upload opened without its SHA-256
    (UPLOAD's C{sha256} None), carrying the whole file's digest.  Takes the
    place of the empty DATA packet.
    """

    sha256: bytes


@attrs.frozen
class Put:
    """
    Client -> server: a whole small file in one frame, to a server whose
    WELCOME announced C{put} (docs/protocol.md, PUT).  C{upload_id} (32 hex
    digits) is chosen by the client: with its client id it names this one
    file, so that a PUT repeated after a broken connection stores nothing
    twice.  The payload's length is the file's size.  The name and the
    metadata are the user's text, as in L{Upload}.
    """

    upload_id: str
    name: str
    sha256: bytes
    metadata: Mapping[str, str] = attrs.field(factory=dict, converter=_kv)
    crc32: int = 0
    payload: bytes = b""

    @property
    def size(self) -> int:
        """The file's size: its payload's length."""
        return len(self.payload)


@attrs.frozen
class Ack:
    """Server -> client: everything before C{offset} (the server's C{durable}) is durable."""

    offset: int


@attrs.frozen
class Completed:
    """Server -> client: the upload is verified and at its final path."""

    upload_id: str
    size: int
    sha256: bytes
    path: str


@attrs.frozen
class Error:
    """Server (or balancer) -> client: an error code, an offset, a retry hint, a message."""

    code: int
    message: str
    offset: int = 0
    retry_after_ms: int = 0


@attrs.frozen
class Ping:
    """Client -> server: liveness probe; the server answers PONG(nonce)."""

    nonce: int


@attrs.frozen
class Pong:
    """Server -> client: answer to PING with the same nonce."""

    nonce: int


@attrs.frozen
class Challenge:
    """
    Server -> client, answer to a HELLO that asked for authentication: the
    server's identity and a fresh nonce the client must prove its key over.
    """

    server_id: str
    nonce: bytes
    method: str = "hmac-sha256"


@attrs.frozen
class Auth:
    """Client -> server: the HMAC proving the client knows its key."""

    mac: bytes


@attrs.frozen
class Status:
    """Client -> server: what is the state of this upload?  (Read only.)"""

    upload_id: str


@attrs.frozen
class UploadStatusFrame:
    """Server -> client, answer to STATUS."""

    upload_id: str
    name: str
    size: int
    complete: bool
    offset: int
    busy: bool
    owner: str
    created_ms: int
    updated_ms: int
    path: str
    #: A final C{kv}, sent only to a client whose HELLO asked for it with
    #: L{STATUS_FIELDS}: of the fields it named, those the server knows
    #: (C{digest}: the upload's digest algorithm).  None: absent, the
    #: layout of every server before it.
    fields: Mapping[str, str] | None = None


Frame = Union[
    Hello, Welcome, Upload, Resume, Accepted, Data, Ack, Completed, Error, Ping, Pong,
    Challenge, Auth, Status, UploadStatusFrame, Finish, Put,
]


def upload_id_to_bytes(upload_id: str) -> bytes:
    """Wire form (16 bytes) of an upload id written as 32 hex digits."""
    raw = bytes.fromhex(upload_id)
    if len(raw) != UPLOAD_ID_SIZE:
        raise ValueError(f"upload id must be {UPLOAD_ID_SIZE} bytes")
    return raw


def _frame(kind: FrameType, body: bytes) -> bytes:
    return HEADER.pack(kind, len(body)) + body


def data_header(offset: int, crc32: int, length: int) -> bytes:
    """
    The bytes of a DATA frame before its payload, so a sender can write
    header and payload without joining them (no copy of the payload).
    """
    return HEADER.pack(FrameType.DATA, DATA_PREFIX.size + length) + DATA_PREFIX.pack(
        offset, crc32
    )


def put_header(put: Put, length: int) -> bytes:
    """
    The bytes of a PUT frame before its payload of C{length} bytes (the
    C{payload} of C{put} is not read), so that a sender can write header
    and payload without joining them.
    """
    w = Writer().fixed(upload_id_to_bytes(put.upload_id), UPLOAD_ID_SIZE)
    w.str(put.name, USER_TEXT).fixed(put.sha256, SHA256_SIZE).kv(put.metadata, USER_TEXT)
    fields = w.u32(put.crc32).body()
    return HEADER.pack(FrameType.PUT, len(fields) + length) + fields


def decode_put(body: memoryview, copy: bool = True) -> Put:
    """
    Parse a PUT body.  With C{copy} false the payload is a C{memoryview}
    of C{body} (a buffer of its own, see L{imgresume.protocol._decoder}).
    """
    r = Reader(body, "PUT")
    upload_id, name, sha256 = r.fixed(UPLOAD_ID_SIZE).hex(), r.str(USER_TEXT), r.fixed(SHA256_SIZE)
    metadata, crc = r.kv(USER_TEXT), r.u32()
    payload = r.rest() if copy else body[r.pos :]
    return Put(upload_id, name, sha256, metadata, crc, payload)


def encode(frame: Frame) -> bytes:
    """Serialise one frame, header included."""
    w = Writer()
    if isinstance(frame, Data):
        return data_header(frame.offset, frame.crc32, len(frame.payload)) + frame.payload
    if isinstance(frame, Put):
        return put_header(frame, len(frame.payload)) + bytes(frame.payload)
    if isinstance(frame, Hello):
        w.fixed(MAGIC, 4).u16(frame.version_min).u16(frame.version_max)
        w.str(frame.client_id).kv(frame.options)
        return _frame(FrameType.HELLO, w.body())
    if isinstance(frame, Welcome):
        w.u16(frame.version).str(frame.server_id).u32(frame.max_payload)
        w.u64(frame.max_file_size).u32(frame.chunk_size).kv(frame.options)
        return _frame(FrameType.WELCOME, w.body())
    if isinstance(frame, Upload):
        w.str(frame.name, USER_TEXT).u64(frame.size).digest(frame.sha256)
        w.kv(frame.metadata, USER_TEXT)
        return _frame(FrameType.UPLOAD, w.body())
    if isinstance(frame, Resume):
        w.fixed(upload_id_to_bytes(frame.upload_id), UPLOAD_ID_SIZE)
        return _frame(FrameType.RESUME, w.body())
    if isinstance(frame, Accepted):
        w.fixed(upload_id_to_bytes(frame.upload_id), UPLOAD_ID_SIZE).str(frame.name)
        w.u64(frame.size).digest(frame.sha256).u64(frame.offset)
        w.u64(frame.tail_start).u32(frame.tail_length)
        w.fixed(frame.tail_sha256, SHA256_SIZE)
        return _frame(FrameType.ACCEPTED, w.body())
    if isinstance(frame, Ack):
        return _frame(FrameType.ACK, w.u64(frame.offset).body())
    if isinstance(frame, Finish):
        return _frame(FrameType.FINISH, w.fixed(frame.sha256, SHA256_SIZE).body())
    if isinstance(frame, Completed):
        w.fixed(upload_id_to_bytes(frame.upload_id), UPLOAD_ID_SIZE)
        w.u64(frame.size).fixed(frame.sha256, SHA256_SIZE).str(frame.path)
        return _frame(FrameType.COMPLETED, w.body())
    if isinstance(frame, Error):
        w.u16(frame.code).u64(frame.offset).u32(frame.retry_after_ms)
        w.str(frame.message)
        return _frame(FrameType.ERROR, w.body())
    if isinstance(frame, Ping):
        return _frame(FrameType.PING, w.u64(frame.nonce).body())
    if isinstance(frame, Pong):
        return _frame(FrameType.PONG, w.u64(frame.nonce).body())
    if isinstance(frame, Challenge):
        w.str(frame.server_id).fixed(frame.nonce, NONCE_SIZE).str(frame.method)
        return _frame(FrameType.CHALLENGE, w.body())
    if isinstance(frame, Auth):
        return _frame(FrameType.AUTH, w.fixed(frame.mac, SHA256_SIZE).body())
    if isinstance(frame, Status):
        w.fixed(upload_id_to_bytes(frame.upload_id), UPLOAD_ID_SIZE)
        return _frame(FrameType.STATUS, w.body())
    if isinstance(frame, UploadStatusFrame):
        w.fixed(upload_id_to_bytes(frame.upload_id), UPLOAD_ID_SIZE).str(frame.name)
        w.u64(frame.size).u8(int(frame.complete)).u64(frame.offset).u8(int(frame.busy))
        w.str(frame.owner).u64(frame.created_ms).u64(frame.updated_ms).str(frame.path)
        if frame.fields is not None:
            w.kv(frame.fields)
        return _frame(FrameType.UPLOAD_STATUS, w.body())
    raise TypeError(f"not a frame: {frame!r}")


def decode_body(kind: int, body: memoryview) -> Frame:
    """
    Parse the body of a frame whose header said C{kind}.

    @raise MalformedFrame: unknown type, truncated or trailing bytes, bad
        UTF-8 (but in UPLOAD's name and metadata, see L{Upload}), bad
        magic, repeated keys in a kv map.
    """
    try:
        ftype = FrameType(kind)
    except ValueError:
        raise MalformedFrame(f"unknown frame type 0x{kind:02x}")
    r = Reader(body, ftype.name)
    frame: Frame
    if ftype is FrameType.PUT:
        return decode_put(body)
    if ftype is FrameType.DATA:
        offset, crc = DATA_PREFIX.unpack(r._take(DATA_PREFIX.size))
        return Data(offset, crc, r.rest())
    if ftype is FrameType.HELLO:
        if r.fixed(4) != MAGIC:
            raise MalformedFrame("HELLO frame does not start with the magic b'IMGR'")
        vmin, vmax = r.u16(), r.u16()
        frame = Hello(version_min=vmin, version_max=vmax, client_id=r.str(), options=r.kv())
    elif ftype is FrameType.WELCOME:
        frame = Welcome(r.u16(), r.str(), r.u32(), r.u64(), r.u32(), r.kv())
    elif ftype is FrameType.UPLOAD:
        frame = Upload(r.str(USER_TEXT), r.u64(), r.digest(), r.kv(USER_TEXT))
    elif ftype is FrameType.RESUME:
        frame = Resume(r.fixed(UPLOAD_ID_SIZE).hex())
    elif ftype is FrameType.ACCEPTED:
        frame = Accepted(
            r.fixed(UPLOAD_ID_SIZE).hex(), r.str(), r.u64(), r.digest(),
            r.u64(), r.u64(), r.u32(), r.fixed(SHA256_SIZE),
        )
    elif ftype is FrameType.ACK:
        frame = Ack(r.u64())
    elif ftype is FrameType.FINISH:
        frame = Finish(r.fixed(SHA256_SIZE))
    elif ftype is FrameType.COMPLETED:
        frame = Completed(r.fixed(UPLOAD_ID_SIZE).hex(), r.u64(), r.fixed(SHA256_SIZE), r.str())
    elif ftype is FrameType.ERROR:
        code, offset, retry = r.u16(), r.u64(), r.u32()
        frame = Error(code, r.str(), offset, retry)
    elif ftype is FrameType.PING:
        frame = Ping(r.u64())
    elif ftype is FrameType.PONG:
        frame = Pong(r.u64())
    elif ftype is FrameType.CHALLENGE:
        frame = Challenge(r.str(), r.fixed(NONCE_SIZE), r.str())
    elif ftype is FrameType.AUTH:
        frame = Auth(r.fixed(SHA256_SIZE))
    elif ftype is FrameType.STATUS:
        frame = Status(r.fixed(UPLOAD_ID_SIZE).hex())
    else:
        upload_id, name, size = r.fixed(UPLOAD_ID_SIZE).hex(), r.str(), r.u64()
        complete, offset, busy = flag(r.u8()), r.u64(), flag(r.u8())
        frame = UploadStatusFrame(upload_id, name, size, complete, offset, busy,
                                  r.str(), r.u64(), r.u64(), r.str())
        if not r.at_end():  # the optional fields (STATUS_FIELDS), or junk
            tail = len(r.body) - r.pos
            try:
                frame = attrs.evolve(frame, fields=r.kv())
            except MalformedFrame:
                raise MalformedFrame(f"UPLOAD_STATUS frame has {tail} trailing bytes")
    r.done()
    return frame

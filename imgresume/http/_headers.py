# -*- test-case-name: tests.http.test_headers -*-
"""
The tus 1.0.0 request headers, parsed without I/O: a header's value (or
None when absent) goes in, a value or a L{TusError} carrying its HTTP
status and a plain-text reason comes out.  Called by the resource
(L{imgresume.http._resource}) before it touches storage.
"""

from __future__ import annotations

import base64
import binascii
import email.utils
import hashlib
import re
import zlib
from typing import Callable, Iterable, Mapping

import attrs

from imgresume.errors import InvalidName
from imgresume.keys import CLIENT_ID_RE, KEY_BYTES
from imgresume.names import IF_EXISTS_KEY, IF_EXISTS_POLICIES, is_upload_id, validate_name

TUS_VERSION = "1.0.0"
#: The extensions this server implements (C{Tus-Extension}); it offers
#: L{DEFER_LENGTH} only over a storage that can declare sizes later.
EXTENSIONS = ("creation", "creation-with-upload", "creation-defer-length", "termination",
              "expiration", "checksum")
DEFER_LENGTH = "creation-defer-length"
#: The content type of every body that carries upload bytes.
OFFSET_OCTET_STREAM = "application/offset+octet-stream"

#: The native protocol's metadata rules (protocol/_rules.py), kept here too.
METADATA_KEY_RE = re.compile(r"[A-Za-z0-9._-]{1,128}\Z")
MAX_METADATA_ENTRIES = 64
MAX_METADATA_VALUE = 4096
#: The metadata key whose value names the stored file.
FILENAME_KEY = "filename"

_DIGITS = re.compile(r"[0-9]{1,20}\Z")

#: Statuses tus defines beyond RFC 9110's.
CHECKSUM_MISMATCH = 460


@attrs.frozen
class TusError(Exception):
    """
    A request refused: the HTTP status, the plain-text reason sent as the
    body, and any headers the answer needs (C{Retry-After}, C{Tus-Version},
    C{Upload-Offset}).  Raised by the parsers here and by the upload logic;
    the resource turns it into the response.
    """

    status: int
    reason: str
    headers: tuple[tuple[str, str], ...] = ()

    def __str__(self) -> str:
        return f"{self.status} {self.reason}"


def check_resumable(value: str | None) -> None:
    """
    C{Tus-Resumable}, which every request but OPTIONS carries: 412 when
    absent or another version (with the versions this server speaks).
    """
    if value != TUS_VERSION:
        got = "is missing" if value is None else f"is {value[:40]!r}"
        raise TusError(412, f"Tus-Resumable {got}; this server speaks tus {TUS_VERSION}",
                       (("Tus-Version", TUS_VERSION),))


def _non_negative(name: str, value: str | None) -> int:
    if value is None:
        raise TusError(400, f"{name} is required")
    value = value.strip()
    if not _DIGITS.match(value):
        raise TusError(400, f"{name} must be a non-negative integer, not {value[:40]!r}")
    return int(value)


def parse_offset(value: str | None) -> int:
    """C{Upload-Offset}: 400 when absent or not a non-negative integer."""
    return _non_negative("Upload-Offset", value)


def parse_length(value: str | None, max_size: int) -> int:
    """
    C{Upload-Length} of a creation: 400 when absent or malformed, 413 when
    larger than C{max_size} (C{Tus-Max-Size}).
    """
    length = _non_negative("Upload-Length", value)
    if length > max_size:
        raise TusError(413, f"Upload-Length {length} is over this server's "
                            f"Tus-Max-Size {max_size}")
    return length


def parse_creation_length(length: str | None, defer: str | None,
                          max_size: int) -> int | None:
    """
    The length of a creation: C{Upload-Length} as L{parse_length}, or None
    for C{Upload-Defer-Length: 1} (creation-defer-length: the length comes
    on a later PATCH).  400 for both or neither, or another defer value.
    """
    if defer is None:
        if length is None:
            raise TusError(400, "Upload-Length (or Upload-Defer-Length: 1) is required")
        return parse_length(length, max_size)
    if defer.strip() != "1":
        raise TusError(400, f"Upload-Defer-Length must be 1, not {defer[:40]!r}")
    if length is not None:
        raise TusError(400, "send Upload-Length or Upload-Defer-Length, not both")
    return None


def check_content_type(value: str | None) -> None:
    """A body of upload bytes: 415 unless C{application/offset+octet-stream}."""
    if value is None or value.split(";")[0].strip().lower() != OFFSET_OCTET_STREAM:
        got = "none" if value is None else repr(value[:60])
        raise TusError(415, f"Content-Type must be {OFFSET_OCTET_STREAM}, not {got}")


def parse_metadata(value: str | None) -> dict[str, str]:
    """
    C{Upload-Metadata}: comma-separated C{key base64value} pairs (a value
    may be empty), keys unique, under the native protocol's rules (keys of
    C{A-Z a-z 0-9 . _ -}, values UTF-8 of at most 4096 bytes, at most 64
    entries, C{if-exists} one of its policies).  400 otherwise.
    """
    result: dict[str, str] = {}
    if value is None or not value.strip():
        return result
    for pair in value.split(","):
        parts = pair.strip().split(" ")
        if len(parts) > 2 or not parts[0]:
            raise TusError(400, "Upload-Metadata: each pair is a key, a space and a "
                                "base64 value")
        key = parts[0]
        if not METADATA_KEY_RE.match(key):
            raise TusError(400, f"Upload-Metadata: key {key[:40]!r} is not 1-128 "
                                "characters of A-Z a-z 0-9 . _ -")
        if key in result:
            raise TusError(400, f"Upload-Metadata: key {key!r} appears twice")
        encoded = parts[1] if len(parts) == 2 else ""
        try:
            raw = base64.b64decode(encoded, validate=True)
            text = raw.decode("utf-8")
        except (binascii.Error, ValueError):
            raise TusError(400, f"Upload-Metadata: the value of {key!r} is not "
                                "base64 of UTF-8 text")
        if len(raw) > MAX_METADATA_VALUE:
            raise TusError(400, f"Upload-Metadata: the value of {key!r} is over "
                                f"{MAX_METADATA_VALUE} bytes")
        result[key] = text
    if len(result) > MAX_METADATA_ENTRIES:
        raise TusError(400, f"Upload-Metadata: at most {MAX_METADATA_ENTRIES} entries")
    policy = result.get(IF_EXISTS_KEY, IF_EXISTS_POLICIES[0])
    if policy not in IF_EXISTS_POLICIES:
        raise TusError(400, f"Upload-Metadata: {IF_EXISTS_KEY} must be one of "
                            f"{', '.join(IF_EXISTS_POLICIES)}")
    return result


def format_metadata(metadata: Mapping[str, str]) -> str:
    """C{Upload-Metadata} for a HEAD answer: the pairs, values in base64."""
    return ",".join(
        f"{key} {base64.b64encode(value.encode('utf-8')).decode('ascii')}".rstrip()
        for key, value in metadata.items()
    )


def stored_name(metadata: Mapping[str, str], upload_hint: str) -> str:
    """
    The name an upload is stored under: its C{filename} metadata checked by
    the native name rules (L{imgresume.names.validate_name}; 400 with the
    rule's reason), or C{tus-<upload_hint>} when it names none.
    """
    name = metadata.get(FILENAME_KEY)
    if name is None:
        return f"tus-{upload_hint}"
    try:
        return validate_name(name)
    except InvalidName as e:
        raise TusError(400, f"Upload-Metadata: filename refused: {e.message}")


# -- checksums ---------------------------------------------------------------


class _CRC32:
    """A CRC-32 (zlib's) with the C{hashlib} methods the checksums use."""

    def __init__(self) -> None:
        self._value = 0

    def update(self, data: bytes) -> None:
        self._value = zlib.crc32(data, self._value)

    def digest(self) -> bytes:
        return self._value.to_bytes(4, "big")


#: C{Upload-Checksum} algorithms (the tus checksum extension's names).
CHECKSUM_ALGORITHMS: dict[str, Callable[[], object]] = {
    "crc32": _CRC32,
    "md5": hashlib.md5,
    "sha1": hashlib.sha1,
    "sha256": hashlib.sha256,
}


@attrs.frozen
class Checksum:
    """A PATCH's C{Upload-Checksum}: the algorithm and the digest expected."""

    algorithm: str
    digest: bytes

    def hasher(self):  # noqa: ANN201 (a hashlib object or _CRC32)
        """A new hash object of this algorithm."""
        return CHECKSUM_ALGORITHMS[self.algorithm]()


def parse_checksum(value: str | None) -> Checksum | None:
    """
    C{Upload-Checksum}: C{<algorithm> <base64 digest>}.  400 for an
    algorithm not in L{CHECKSUM_ALGORITHMS} or a malformed value.
    """
    if value is None:
        return None
    parts = value.strip().split(" ")
    if len(parts) != 2:
        raise TusError(400, "Upload-Checksum is an algorithm, a space and a base64 digest")
    algorithm = parts[0].lower()
    if algorithm not in CHECKSUM_ALGORITHMS:
        raise TusError(400, f"Upload-Checksum: algorithm {parts[0][:20]!r} is not "
                            f"supported ({','.join(CHECKSUM_ALGORITHMS)})")
    try:
        digest = base64.b64decode(parts[1], validate=True)
    except (binascii.Error, ValueError):
        raise TusError(400, "Upload-Checksum: the digest is not base64")
    if len(digest) != len(Checksum(algorithm, b"").hasher().digest()):
        raise TusError(400, f"Upload-Checksum: a {algorithm} digest has another length")
    return Checksum(algorithm, digest)


_DICT_MEMBER = re.compile(r"\s*([a-z*][a-z0-9_.*-]*)\s*=\s*:([A-Za-z0-9+/=]*):\s*(;[^,]*)?\Z")


def parse_repr_digest(values: Iterable[str] | None) -> bytes | None:
    """
    RFC 9530 C{Repr-Digest} (a structured-field dictionary of byte
    sequences, possibly over several header lines): the C{sha-256} member,
    or None when there is none (other algorithms are ignored, as the RFC
    lets a recipient do).  400 when malformed or not 32 bytes.
    """
    if values is None:
        return None
    found = None
    for line in values:
        for member in line.split(","):
            if not member.strip():
                continue
            m = _DICT_MEMBER.match(member)
            if m is None:
                raise TusError(400, "Repr-Digest is a dictionary of algorithm=:base64:")
            if m.group(1) != "sha-256":
                continue
            try:
                digest = base64.b64decode(m.group(2), validate=True)
            except (binascii.Error, ValueError):
                raise TusError(400, "Repr-Digest: the sha-256 value is not base64")
            if len(digest) != 32:
                raise TusError(400, "Repr-Digest: a sha-256 digest is 32 bytes")
            found = digest
    return found


def format_repr_digest(sha256: bytes) -> str:
    """C{Repr-Digest} for a stored file's SHA-256."""
    return f"sha-256=:{base64.b64encode(sha256).decode('ascii')}:"


# -- CORS --------------------------------------------------------------------

#: What a browser page may send and read (the tus headers and ours).
_CORS_REQUEST_HEADERS = (
    "Authorization, Content-Type, Tus-Resumable, Upload-Length, Upload-Metadata, "
    "Upload-Offset, Upload-Checksum, Upload-Defer-Length, Upload-Concat, Repr-Digest, "
    "X-Requested-With, X-HTTP-Method-Override")
_CORS_RESPONSE_HEADERS = (
    "Location, Tus-Resumable, Tus-Version, Tus-Extension, Tus-Max-Size, "
    "Tus-Checksum-Algorithm, Upload-Offset, Upload-Length, Upload-Metadata, "
    "Upload-Expires, Repr-Digest, Retry-After")


def cors_headers(origin: str | None, allowed: Iterable[str],
                 preflight: bool) -> list[tuple[str, str]]:
    """
    The CORS headers of an answer to a request from a browser page at
    C{origin}: none unless the origin is one of C{allowed} (or C{allowed}
    holds C{*}); for a preflight (C{OPTIONS} with
    C{Access-Control-Request-Method}) also the methods and headers allowed.
    """
    allowed = tuple(allowed)
    if origin is None or not (origin in allowed or "*" in allowed):
        return []
    headers = [("Access-Control-Allow-Origin", origin), ("Vary", "Origin"),
               ("Access-Control-Expose-Headers", _CORS_RESPONSE_HEADERS)]
    if preflight:
        headers += [("Access-Control-Allow-Methods", "POST, HEAD, PATCH, DELETE, OPTIONS"),
                    ("Access-Control-Allow-Headers", _CORS_REQUEST_HEADERS),
                    ("Access-Control-Max-Age", "86400")]
    return headers


# -- identity, paths, dates --------------------------------------------------


def parse_bearer(value: str | None) -> tuple[str, bytes]:
    """
    C{Authorization: Bearer CLIENT_ID:HEXKEY} (the client id and the key
    C{imgresume keys add} printed): the client id and the key.  401 when
    absent or malformed; whether the key is the right one is the caller's.
    """
    if value is None:
        raise TusError(401, "authentication required: Authorization: Bearer "
                            "CLIENT_ID:KEY (the key from `imgresume keys add`)",
                       (("WWW-Authenticate", 'Bearer realm="imgresume"'),))
    scheme, _, token = value.strip().partition(" ")
    client_id, _, hexkey = token.strip().rpartition(":")
    try:
        key = bytes.fromhex(hexkey)
    except ValueError:
        key = b""
    if scheme.lower() != "bearer" or not CLIENT_ID_RE.match(client_id) \
            or len(key) != KEY_BYTES:
        raise TusError(401, "Authorization must be Bearer CLIENT_ID:KEY with the "
                            f"{KEY_BYTES * 2} hex digits of the client's key",
                       (("WWW-Authenticate", 'Bearer realm="imgresume", '
                                             'error="invalid_token"'),))
    return client_id, key


def parse_upload_path(segments: list[bytes]) -> str:
    """
    The upload id of C{/files/<id>} from the path segments after C{files}:
    404 for anything but one upload id.
    """
    if len(segments) != 1 or not is_upload_id(segments[0].decode("latin-1")):
        raise TusError(404, "no such upload")
    return segments[0].decode("ascii")


def http_date(seconds: float) -> str:
    """An RFC 9110 date (C{Upload-Expires}, C{Retry-After} is seconds)."""
    return email.utils.formatdate(seconds, usegmt=True)

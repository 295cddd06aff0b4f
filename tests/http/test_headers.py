# -*- test-case-name: tests.http.test_headers -*-
"""
The tus headers parsed without I/O (L{imgresume.http._headers}): every
malformed value refused with its status and a reason.
"""

from __future__ import annotations

import base64
import hashlib
import zlib

from twisted.trial.unittest import SynchronousTestCase

from imgresume.http._headers import (
    CHECKSUM_MISMATCH,
    Checksum,
    TusError,
    check_content_type,
    check_resumable,
    format_metadata,
    format_repr_digest,
    http_date,
    parse_bearer,
    parse_checksum,
    parse_creation_length,
    parse_length,
    parse_metadata,
    parse_offset,
    parse_repr_digest,
    parse_upload_path,
    stored_name,
)


def b64(data: bytes | str) -> str:
    if isinstance(data, str):
        data = data.encode()
    return base64.b64encode(data).decode()


class StatusMixin:
    def assertStatus(self, status: int, f, *args) -> TusError:
        with self.assertRaises(TusError) as caught:
            f(*args)
        self.assertEqual(caught.exception.status, status)
        self.assertTrue(caught.exception.reason)
        return caught.exception


class VersionAndNumbersTests(StatusMixin, SynchronousTestCase):
    """C{Tus-Resumable}, C{Upload-Offset}, C{Upload-Length}, C{Content-Type}."""

    def test_resumable(self) -> None:
        """1.0.0 passes; missing or another version is 412 with Tus-Version."""
        check_resumable("1.0.0")
        for value in (None, "0.2.2", "1.0", ""):
            error = self.assertStatus(412, check_resumable, value)
            self.assertIn(("Tus-Version", "1.0.0"), error.headers)

    def test_offset(self) -> None:
        """A non-negative integer; anything else is 400."""
        self.assertEqual(parse_offset("0"), 0)
        self.assertEqual(parse_offset(" 1048576 "), 1048576)
        for value in (None, "", "-1", "1.5", "0x10", "1e3", "12a", "9" * 21):
            self.assertStatus(400, parse_offset, value)

    def test_length(self) -> None:
        """Up to the max size; over it 413, malformed 400."""
        self.assertEqual(parse_length("100", 100), 100)
        self.assertStatus(413, parse_length, "101", 100)
        self.assertStatus(400, parse_length, None, 100)
        self.assertStatus(400, parse_length, "ten", 100)

    def test_defer_length(self) -> None:
        """
        A creation has Upload-Length or Upload-Defer-Length: 1 (None: the
        length comes later); both, neither, or another defer value: 400.
        """
        self.assertEqual(parse_creation_length("7", None, 100), 7)
        self.assertIsNone(parse_creation_length(None, "1", 100))
        self.assertStatus(413, parse_creation_length, "101", None, 100)
        self.assertStatus(400, parse_creation_length, None, None, 100)
        self.assertStatus(400, parse_creation_length, "7", "1", 100)
        for value in ("0", "2", "true", ""):
            self.assertStatus(400, parse_creation_length, None, value, 100)

    def test_content_type(self) -> None:
        """Only application/offset+octet-stream (parameters aside) carries bytes: else 415."""
        check_content_type("application/offset+octet-stream")
        check_content_type("Application/Offset+Octet-Stream; charset=x")
        for value in (None, "application/octet-stream", "text/plain"):
            self.assertStatus(415, check_content_type, value)


class MetadataTests(StatusMixin, SynchronousTestCase):
    """C{Upload-Metadata} and the stored name."""

    def test_pairs(self) -> None:
        """Pairs of key and base64 value; a value may be empty; round trip."""
        value = f"filename {b64('scans/a.tif')},type {b64('image/tiff')},empty"
        metadata = parse_metadata(value)
        self.assertEqual(metadata, {"filename": "scans/a.tif", "type": "image/tiff",
                                    "empty": ""})
        self.assertEqual(parse_metadata(format_metadata(metadata)), metadata)
        self.assertEqual(parse_metadata(None), {})
        self.assertEqual(parse_metadata(" "), {})

    def test_bad(self) -> None:
        """Duplicate keys, bad base64, non-UTF-8, bad keys, too long: 400."""
        for value in (
            f"a {b64('x')},a {b64('y')}",
            "a !!!",
            f"a {base64.b64encode(bytes([0xff, 0xfe])).decode()}",
            f"bad/key {b64('x')}",
            f"a {b64('x')} extra",
            f"k {b64('x' * 4097)}",
            ",".join(f"k{i} {b64('v')}" for i in range(65)),
            f"if-exists {b64('overwrite')}",
        ):
            self.assertStatus(400, parse_metadata, value)

    def test_stored_name(self) -> None:
        """filename through the native name rules; none: tus-<hint>."""
        self.assertEqual(stored_name({"filename": "a/b.tif"}, "x"), "a/b.tif")
        self.assertEqual(stored_name({}, "0123"), "tus-0123")
        for bad in ("../etc/passwd", "/abs", "a\x00b", "a/./b", ".hidden", ""):
            error = self.assertStatus(400, stored_name, {"filename": bad}, "x")
            self.assertIn("filename refused", error.reason)


class ChecksumTests(StatusMixin, SynchronousTestCase):
    """C{Upload-Checksum} and RFC 9530 C{Repr-Digest}."""

    def test_algorithms(self) -> None:
        """crc32, md5, sha1 and sha256, each checked against its hash of the bytes."""
        data = b"some bytes"
        digests = {
            "crc32": zlib.crc32(data).to_bytes(4, "big"),
            "md5": hashlib.md5(data).digest(),
            "sha1": hashlib.sha1(data).digest(),
            "sha256": hashlib.sha256(data).digest(),
        }
        for name, digest in digests.items():
            checksum = parse_checksum(f"{name.upper()} {b64(digest)}")
            self.assertEqual(checksum, Checksum(name, digest))
            hasher = checksum.hasher()
            hasher.update(data)
            self.assertEqual(hasher.digest(), digest)
        self.assertIsNone(parse_checksum(None))

    def test_bad_checksum(self) -> None:
        """An unknown algorithm, bad base64, wrong length or form: 400."""
        for value in ("sha512 " + b64(b"x" * 64), "sha1 ***", "sha1 " + b64(b"short"),
                      "sha1", "sha1 a b"):
            self.assertStatus(400, parse_checksum, value)

    def test_repr_digest(self) -> None:
        """The sha-256 member of the dictionary; others ignored; none -> None."""
        digest = hashlib.sha256(b"x").digest()
        self.assertEqual(parse_repr_digest([format_repr_digest(digest)]), digest)
        self.assertEqual(parse_repr_digest(
            [f"sha-512=:{b64(b'y' * 64)}:, sha-256=:{b64(digest)}:"]), digest)
        self.assertEqual(parse_repr_digest(["sha-512=:" + b64(b"y" * 64) + ":",
                                            f"sha-256=:{b64(digest)}:"]), digest)
        self.assertIsNone(parse_repr_digest([f"sha-512=:{b64(b'y' * 64)}:"]))
        self.assertIsNone(parse_repr_digest(None))

    def test_bad_repr_digest(self) -> None:
        """Not a dictionary of byte sequences, or a sha-256 not of 32 bytes: 400."""
        for value in ("sha-256=abc", f"sha-256=:{b64(b'short')}:", "sha-256=:!!:",
                      "nonsense"):
            self.assertStatus(400, parse_repr_digest, [value])

    def test_mismatch_status(self) -> None:
        """The tus checksum extension's mismatch status."""
        self.assertEqual(CHECKSUM_MISMATCH, 460)


class IdentityAndPathTests(StatusMixin, SynchronousTestCase):
    """C{Authorization: Bearer}, C{/files/<id>}, dates."""

    def test_bearer(self) -> None:
        """CLIENT_ID:64 hex digits, the scheme in any case."""
        key = bytes(range(32))
        self.assertEqual(parse_bearer(f"Bearer scanner-7:{key.hex()}"), ("scanner-7", key))
        self.assertEqual(parse_bearer(f"bearer a:b@c:{key.hex()}"), ("a:b@c", key))

    def test_bad_bearer(self) -> None:
        """Missing, another scheme, a bad client id or key: 401 with WWW-Authenticate."""
        key = bytes(32).hex()
        for value in (None, f"Basic x:{key}", f"Bearer {key}", f"Bearer a:{key[:-2]}",
                      f"Bearer a b:{key}", "Bearer"):
            error = self.assertStatus(401, parse_bearer, value)
            self.assertTrue(any(name == "WWW-Authenticate" for name, _ in error.headers))

    def test_path(self) -> None:
        """One upload id after /files/; anything else 404."""
        upload_id = "0123456789abcdef0123456789abcdef"
        self.assertEqual(parse_upload_path([upload_id.encode()]), upload_id)
        for segments in ([], [b"x"], [upload_id.upper().encode()],
                         [upload_id.encode(), b"more"], [b"..\xff"]):
            self.assertStatus(404, parse_upload_path, segments)

    def test_date(self) -> None:
        """An RFC 9110 date in GMT."""
        self.assertEqual(http_date(0), "Thu, 01 Jan 1970 00:00:00 GMT")

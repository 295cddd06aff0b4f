# -*- test-case-name: tests.http.test_resource -*-
"""
tus 1.0.0 at C{/files/} (L{imgresume.http}), request by request on an
in-memory connection over L{MemoryStorage}: every status a request can
get, bodies streamed into storage as they arrive, cuts, busy uploads and
takeovers, verification before publication, the upload events.
"""

from __future__ import annotations

import base64
import hashlib
from typing import Any

import attrs

from twisted.internet.defer import succeed
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from imgresume.http import TusChannel, TusUploads
from imgresume.keys import add_client
from imgresume.storage.interfaces import IUploadStorage
from imgresume.storage.memory import MemoryStorage
from tests.support.http import TusServer, metadata, repr_digest

OCTETS = {"Content-Type": "application/offset+octet-stream"}


def patch_headers(offset: int, **extra: str) -> dict[str, str]:
    return {**OCTETS, "Upload-Offset": str(offset), **extra}


class _Keys:
    """A key store of fixed keys (the server's KeyStore answers lookup alike)."""

    def __init__(self, keys: dict[str, bytes]) -> None:
        self.keys = keys

    def lookup(self, client_id: str) -> bytes | None:
        return self.keys.get(client_id)


class ResourceTestCase(SynchronousTestCase):
    def setUp(self) -> None:
        self.server = TusServer()
        self.storage = self.server.storage
        self.wire = self.server.wire()

    def upload_id(self, location: str) -> str:
        return location.rsplit("/", 1)[-1]


class CoreTests(ResourceTestCase):
    """OPTIONS, creation, HEAD, PATCH: the path of a whole upload."""

    def test_options(self) -> None:
        """OPTIONS needs no Tus-Resumable and lists version, extensions, limits."""
        answer = self.wire.request("OPTIONS", "/files/", tus=False)
        self.assertEqual(answer.status, 204)
        self.assertEqual(answer["Tus-Version"], "1.0.0")
        self.assertEqual(answer["Tus-Extension"],
                         "creation,creation-with-upload,creation-defer-length,termination,"
                         "expiration,checksum")
        self.assertEqual(answer["Tus-Max-Size"], str(1 << 30))
        self.assertEqual(answer["Tus-Checksum-Algorithm"], "crc32,md5,sha1,sha256")

    def test_upload(self) -> None:
        """
        POST creates (201, Location, Upload-Expires), HEAD answers the offset,
        PATCHes append (204 with Upload-Offset), and the last one completes:
        the file is stored under its filename, verified, its digest answered.
        """
        data = bytes(range(256)) * 40
        answer = self.wire.request("POST", "/files/", {
            "Upload-Length": str(len(data)),
            "Upload-Metadata": metadata(filename="scans/a.tif", source="scanner-7")})
        self.assertEqual(answer.status, 201)
        self.assertEqual(answer["Tus-Resumable"], "1.0.0")
        location = answer["Location"]
        self.assertRegex(location, r"^/files/[0-9a-f]{32}$")
        self.assertIn("GMT", answer["Upload-Expires"])
        head = self.wire.request("HEAD", location)
        self.assertEqual((head.status, head["Upload-Offset"], head["Upload-Length"]),
                         (200, "0", str(len(data))))
        self.assertEqual(head["Cache-Control"], "no-store")
        self.assertEqual(head["Upload-Metadata"], metadata(filename="scans/a.tif"))
        first = self.wire.request("PATCH", location, patch_headers(0), data[:4000])
        self.assertEqual((first.status, first["Upload-Offset"]), (204, "4000"))
        self.assertIn("GMT", first["Upload-Expires"])
        self.assertEqual(self.wire.request("HEAD", location)["Upload-Offset"], "4000")
        last = self.wire.request("PATCH", location, patch_headers(4000), data[4000:])
        self.assertEqual((last.status, last["Upload-Offset"]), (204, str(len(data))))
        self.assertEqual(last["Repr-Digest"], repr_digest(data))
        self.assertEqual(self.storage.read_completed("complete/scans/a.tif"), data)
        head = self.wire.request("HEAD", location)
        self.assertEqual((head.status, head["Upload-Offset"]), (200, str(len(data))))
        kinds = [e["event"] for e in self.server.events]
        self.assertEqual(kinds, ["upload.created", "upload.completed"])
        completed = self.server.events[-1]
        self.assertEqual(completed["sha256"], hashlib.sha256(data).digest())
        self.assertEqual(completed["path"], "complete/scans/a.tif")
        self.assertEqual(completed["metadata"]["source"], "scanner-7")
        self.assertEqual(completed["client_id"], "anonymous")

    def test_keep_alive(self) -> None:
        """Several requests on one connection, each answered in turn."""
        location = self.server.create(3, **{"Upload-Metadata": metadata(filename="k")})
        self.wire.transport.clear()
        self.wire.send(self.wire.head("HEAD", location, {"Tus-Resumable": "1.0.0"}, None)
                       + self.wire.head("PATCH", location, {"Tus-Resumable": "1.0.0",
                                                            **patch_headers(0)}, 3) + b"abc")
        statuses = [a.status for a in self.wire.answers()]
        self.assertEqual(statuses, [200, 204])
        self.assertEqual(self.storage.read_completed("complete/k"), b"abc")

    def test_no_filename(self) -> None:
        """Without a filename the file is stored as tus-<16 hex digits>."""
        location = self.server.create(2)
        self.wire.request("PATCH", location, patch_headers(0), b"hi")
        [path] = self.storage.files
        self.assertRegex(path, r"^complete/tus-[0-9a-f]{16}$")

    def test_empty_file(self) -> None:
        """Upload-Length 0: created and complete at once."""
        self.server.create(0, **{"Upload-Metadata": metadata(filename="empty")})
        self.assertEqual(self.storage.read_completed("complete/empty"), b"")

    def test_creation_with_upload(self) -> None:
        """A POST with a body: 201 with the offset its bytes reached."""
        answer = self.wire.request("POST", "/files/", {
            **OCTETS, "Upload-Length": "10", "Upload-Metadata": metadata(filename="c")},
            b"12345")
        self.assertEqual((answer.status, answer["Upload-Offset"]), (201, "5"))
        rest = self.wire.request("PATCH", answer["Location"], patch_headers(5), b"67890")
        self.assertEqual(rest.status, 204)
        self.assertEqual(self.storage.read_completed("complete/c"), b"1234567890")

    def test_creation_with_whole_upload(self) -> None:
        """A POST carrying the whole file completes it (its digest answered)."""
        answer = self.wire.request("POST", "/files", {
            **OCTETS, "Upload-Length": "3", "Upload-Metadata": metadata(filename="w")},
            b"abc")
        self.assertEqual((answer.status, answer["Upload-Offset"]), (201, "3"))
        self.assertEqual(answer["Repr-Digest"], repr_digest(b"abc"))
        self.assertTrue(answer["Location"].startswith("/files/"))

    def test_completed_patch_repeated(self) -> None:
        """
        A last PATCH sent again (its answer lost): 204 at the final offset;
        at any other offset 409 naming it.
        """
        location = self.server.create(3, **{"Upload-Metadata": metadata(filename="r")})
        self.wire.request("PATCH", location, patch_headers(0), b"abc")
        again = self.wire.request("PATCH", location, patch_headers(3))
        self.assertEqual((again.status, again["Upload-Offset"]), (204, "3"))
        self.assertEqual(again["Repr-Digest"], repr_digest(b"abc"))
        wrong = self.wire.request("PATCH", location, patch_headers(1), b"bc")
        self.assertEqual((wrong.status, wrong["Upload-Offset"]), (409, "3"))


class RefusalTests(ResourceTestCase):
    """Every bad request gets its status and a plain-text reason."""

    def assertRefused(self, answer: Any, status: int, *words: str) -> None:
        self.assertEqual(answer.status, status, answer.body)
        self.assertEqual(answer["Content-Type"], "text/plain; charset=utf-8")
        for word in words:
            self.assertIn(word.encode(), answer.body)

    def test_version(self) -> None:
        """No or another Tus-Resumable: 412 with Tus-Version, on every method."""
        location = self.server.create(5)
        for method, path, headers in (("POST", "/files/", {"Upload-Length": "1"}),
                                      ("HEAD", location, {}), ("DELETE", location, {}),
                                      ("PATCH", location, patch_headers(0))):
            answer = self.wire.request(method, path, headers, tus=False)
            self.assertEqual(answer.status, 412, method)
            self.assertEqual(answer["Tus-Version"], "1.0.0")
            answer = self.wire.request(method, path, {**headers, "Tus-Resumable": "0.2.2"},
                                       tus=False)
            self.assertEqual(answer.status, 412, method)

    def test_unknown_upload(self) -> None:
        """HEAD, PATCH and DELETE of an upload that does not exist: 404."""
        path = "/files/" + "ab" * 16
        for method, headers in (("HEAD", {}), ("PATCH", patch_headers(0)), ("DELETE", {})):
            self.assertEqual(self.wire.request(method, path, headers).status, 404, method)
        self.assertRefused(self.wire.request("PATCH", "/files/nonsense", patch_headers(0),
                                             b"x"), 404, "no such upload")

    def test_offset_mismatch(self) -> None:
        """A PATCH at another offset than the upload's: 409 naming the right one."""
        location = self.server.create(10)
        self.wire.request("PATCH", location, patch_headers(0), b"abc")
        answer = self.wire.request("PATCH", location, patch_headers(1), b"bcd")
        self.assertRefused(answer, 409, "continue from 3")
        self.assertEqual(answer["Upload-Offset"], "3")
        self.assertEqual(self.wire.request("HEAD", location)["Upload-Offset"], "3")

    def test_bad_offset(self) -> None:
        """A PATCH without Upload-Offset or with a malformed one: 400."""
        location = self.server.create(10)
        self.assertRefused(self.wire.request("PATCH", location, OCTETS, b"a"), 400,
                           "Upload-Offset")
        self.assertRefused(self.wire.request("PATCH", location, patch_headers(-1), b"a"),
                           400)

    def test_content_type(self) -> None:
        """A PATCH that is not application/offset+octet-stream: 415, nothing stored."""
        location = self.server.create(10)
        answer = self.wire.request("PATCH", location, {"Upload-Offset": "0",
                                                        "Content-Type": "text/plain"}, b"x")
        self.assertRefused(answer, 415, "application/offset+octet-stream")
        self.assertEqual(self.wire.request("HEAD", location)["Upload-Offset"], "0")

    def test_too_large(self) -> None:
        """Upload-Length over Tus-Max-Size, and a body past Upload-Length: 413."""
        server = TusServer(max_size=100)
        wire = server.wire()
        self.assertRefused(wire.request("POST", "/files/", {"Upload-Length": "101"}), 413,
                           "Tus-Max-Size")
        location = server.create(4)
        self.assertRefused(wire.request("PATCH", location, patch_headers(0), b"12345"), 413,
                           "Upload-Length")
        self.assertEqual(wire.request("HEAD", location)["Upload-Offset"], "0")

    def test_bad_creation(self) -> None:
        """
        No length, both a length and a deferred one, a deferred length other
        than 1, bad metadata, a refused filename: 400.
        """
        for headers, word in (
            ({}, "Upload-Length"),
            ({"Upload-Defer-Length": "1", "Upload-Length": "1"}, "Upload-Defer-Length"),
            ({"Upload-Defer-Length": "2"}, "Upload-Defer-Length"),
            ({"Upload-Length": "1", "Upload-Metadata": "filename !!"}, "base64"),
            ({"Upload-Length": "1", "Upload-Metadata": metadata(filename="../x")},
             "filename refused"),
            ({"Upload-Length": "1", "Upload-Metadata": metadata(filename="a\x1bb")},
             "filename refused"),
        ):
            self.assertRefused(self.wire.request("POST", "/files/", headers), 400, word)
        self.assertEqual(self.storage._uploads, {})

    def test_post_to_upload(self) -> None:
        """A POST to an upload's URL: 405; GET anywhere under /files/: 405."""
        location = self.server.create(3)
        self.assertEqual(self.wire.request("POST", location, {"Upload-Length": "1"}).status,
                         405)
        self.assertEqual(self.wire.request("GET", location).status, 405)

    def test_body_elsewhere_dropped(self) -> None:
        """A body sent to a path outside /files/ is read and dropped: 404."""
        answer = self.wire.request("PATCH", "/other", patch_headers(0), b"x" * 1000)
        self.assertEqual(answer.status, 404)

    def test_checksum(self) -> None:
        """
        Upload-Checksum: a matching body is stored; a mismatching one gets
        460 and nothing of it is stored; an unknown algorithm 400.
        """
        location = self.server.create(6)
        good = base64.b64encode(hashlib.sha1(b"abc").digest()).decode()
        answer = self.wire.request("PATCH", location,
                                   patch_headers(0, **{"Upload-Checksum": f"sha1 {good}"}),
                                   b"abc")
        self.assertEqual((answer.status, answer["Upload-Offset"]), (204, "3"))
        answer = self.wire.request("PATCH", location,
                                   patch_headers(3, **{"Upload-Checksum": f"sha1 {good}"}),
                                   b"xyz")
        self.assertRefused(answer, 460, "does not match")
        self.assertEqual(self.wire.request("HEAD", location)["Upload-Offset"], "3")
        answer = self.wire.request(
            "PATCH", location, patch_headers(3, **{"Upload-Checksum": "sha512 AAAA"}), b"x")
        self.assertRefused(answer, 400, "sha512")

    def test_checksum_limit(self) -> None:
        """A body with Upload-Checksum is held whole, up to its limit: past it 413."""
        server = TusServer(checksum_limit=4)
        location = server.create(10)
        digest = base64.b64encode(hashlib.md5(b"123456").digest()).decode()
        answer = server.wire().request(
            "PATCH", location, patch_headers(0, **{"Upload-Checksum": f"md5 {digest}"}),
            b"123456")
        self.assertRefused(answer, 413, "Upload-Checksum")

    def test_repr_digest_at_creation(self) -> None:
        """
        A Repr-Digest given at creation is checked at completion: a file that
        does not match it gets 460 and the upload is removed.
        """
        location = self.server.create(3, **{"Repr-Digest": repr_digest(b"abc"),
                                            "Upload-Metadata": metadata(filename="d")})
        answer = self.wire.request("PATCH", location, patch_headers(0), b"abd")
        self.assertRefused(answer, 460)
        self.assertEqual(self.storage.files, {})
        self.assertEqual(self.wire.request("HEAD", location).status, 404)
        self.assertEqual(self.server.events[-1]["event"], "upload.failed")
        self.assertEqual(self.server.events[-1]["error"].code.name, "DIGEST_MISMATCH")

    def test_repr_digest_creation_with_upload(self) -> None:
        """A POST carrying a whole file that does not match its Repr-Digest: 460."""
        answer = self.wire.request("POST", "/files/", {
            **OCTETS, "Upload-Length": "3", "Repr-Digest": repr_digest(b"abc"),
            "Upload-Metadata": metadata(filename="g")}, b"abd")
        self.assertRefused(answer, 460)
        self.assertEqual(self.storage.files, {})

    def test_repr_digest_on_last_patch(self) -> None:
        """A Repr-Digest on the last PATCH: checked; a match completes, else 460."""
        location = self.server.create(3, **{"Upload-Metadata": metadata(filename="e")})
        answer = self.wire.request("PATCH", location,
                                   patch_headers(0, **{"Repr-Digest": repr_digest(b"abc")}),
                                   b"abc")
        self.assertEqual(answer.status, 204)
        location = self.server.create(3, **{"Upload-Metadata": metadata(filename="f")})
        answer = self.wire.request("PATCH", location,
                                   patch_headers(0, **{"Repr-Digest": repr_digest(b"xyz")}),
                                   b"abc")
        self.assertRefused(answer, 460)
        self.assertNotIn("complete/f", self.storage.files)

    def test_conflicting_digests(self) -> None:
        """A last PATCH's Repr-Digest that differs from the creation's: 460."""
        location = self.server.create(3, **{"Repr-Digest": repr_digest(b"abc")})
        answer = self.wire.request("PATCH", location,
                                   patch_headers(0, **{"Repr-Digest": repr_digest(b"xyz")}),
                                   b"abc")
        self.assertRefused(answer, 460, "Repr-Digest")

    def test_bad_repr_digest(self) -> None:
        """A malformed Repr-Digest: 400."""
        answer = self.wire.request("POST", "/files/", {"Upload-Length": "1",
                                                        "Repr-Digest": "sha-256=:abc"})
        self.assertRefused(answer, 400, "Repr-Digest")

    def test_expired(self) -> None:
        """HEAD of a partial upload older than --expire-after: 410."""
        location = self.server.create(3)
        self.server.uploads.expire_after = 10.0
        status = self.storage.status

        self.storage.status = lambda upload_id, client_id=None: status(
            upload_id, client_id).addCallback(attrs.evolve, updated=-100.0)
        self.assertEqual(self.wire.request("HEAD", location).status, 410)

    def test_quota(self) -> None:
        """Past the incomplete uploads a client may have: 429 with Retry-After."""
        server = TusServer(max_incomplete_uploads=2)
        server.create(5)
        server.create(5)
        answer = server.wire().request("POST", "/files/", {"Upload-Length": "5"})
        self.assertRefused(answer, 429, "incomplete")
        self.assertEqual(answer["Retry-After"], "60")


@implementer(IUploadStorage)
class _FixedSizes:
    """A storage that fixes sizes at creation (no L{IDeferredSizeStorage})."""

    def __init__(self, storage: Any) -> None:
        self._storage = storage

    def __getattr__(self, name: str) -> Any:
        return getattr(self._storage, name)


class DeferLengthTests(ResourceTestCase):
    """creation-defer-length: Upload-Defer-Length, then Upload-Length on a PATCH."""

    def defer(self, body: bytes = b"", **headers: str) -> str:
        answer = self.wire.request("POST", "/files/", {
            "Upload-Defer-Length": "1", **(OCTETS if body else {}), **headers}, body)
        self.assertEqual(answer.status, 201, answer.body)
        return answer["Location"]

    def test_deferred_upload(self) -> None:
        """
        A POST with Upload-Defer-Length: 1 creates; HEAD answers
        Upload-Defer-Length: 1 and no Upload-Length until a PATCH declares
        it; PATCHes append without completing; the PATCH whose bytes reach
        the declared length completes (verified, its digest answered).
        """
        data = bytes(range(256)) * 40
        location = self.defer(**{"Upload-Metadata": metadata(filename="d.tif")})
        head = self.wire.request("HEAD", location)
        self.assertEqual((head.status, head["Upload-Offset"], head["Upload-Defer-Length"]),
                         (200, "0", "1"))
        self.assertNotIn("upload-length", head.headers)
        first = self.wire.request("PATCH", location, patch_headers(0), data[:4000])
        self.assertEqual((first.status, first["Upload-Offset"]), (204, "4000"))
        head = self.wire.request("HEAD", location)
        self.assertEqual((head["Upload-Offset"], head["Upload-Defer-Length"]), ("4000", "1"))
        self.assertEqual(self.storage.files, {})
        last = self.wire.request("PATCH", location, patch_headers(
            4000, **{"Upload-Length": str(len(data))}), data[4000:])
        self.assertEqual((last.status, last["Upload-Offset"]), (204, str(len(data))))
        self.assertEqual(last["Repr-Digest"], repr_digest(data))
        self.assertEqual(self.storage.read_completed("complete/d.tif"), data)
        head = self.wire.request("HEAD", location)
        self.assertEqual((head["Upload-Offset"], head["Upload-Length"]),
                         (str(len(data)), str(len(data))))
        self.assertNotIn("upload-defer-length", head.headers)
        created, completed = self.server.events
        self.assertEqual((created["event"], created["size"]), ("upload.created", None))
        self.assertEqual((completed["event"], completed["size"]),
                         ("upload.completed", len(data)))

    def test_declared_by_empty_patch(self) -> None:
        """A PATCH without bytes declaring the length reached completes the upload."""
        location = self.defer(b"abc", **{"Upload-Metadata": metadata(filename="e")})
        self.assertEqual(self.wire.request("HEAD", location)["Upload-Offset"], "3")
        answer = self.wire.request("PATCH", location,
                                   patch_headers(3, **{"Upload-Length": "3"}))
        self.assertEqual((answer.status, answer["Upload-Offset"]), (204, "3"))
        self.assertEqual(self.storage.read_completed("complete/e"), b"abc")

    def test_declared_once(self) -> None:
        """
        A length declared before the end holds: HEAD answers it, later
        PATCHes may repeat it, a different one is 400, bytes past it 413.
        """
        location = self.defer()
        answer = self.wire.request("PATCH", location,
                                   patch_headers(0, **{"Upload-Length": "6"}), b"ab")
        self.assertEqual((answer.status, answer["Upload-Offset"]), (204, "2"))
        head = self.wire.request("HEAD", location)
        self.assertEqual(head["Upload-Length"], "6")
        self.assertNotIn("upload-defer-length", head.headers)
        changed = self.wire.request("PATCH", location,
                                    patch_headers(2, **{"Upload-Length": "7"}), b"cd")
        self.assertEqual(changed.status, 400)
        self.assertIn(b"already 6", changed.body)
        past = self.wire.request("PATCH", location, patch_headers(2), b"cdefg")
        self.assertEqual(past.status, 413)
        same = self.wire.request("PATCH", location,
                                 patch_headers(2, **{"Upload-Length": "6"}), b"cdef")
        self.assertEqual((same.status, same["Upload-Offset"]), (204, "6"))
        self.assertEqual(len(self.storage.files), 1)

    def test_declared_below_offset(self) -> None:
        """A length below the bytes already stored: 400, and it stays deferred."""
        location = self.defer(b"abcd")
        answer = self.wire.request("PATCH", location,
                                   patch_headers(4, **{"Upload-Length": "3"}))
        self.assertEqual(answer.status, 400)
        self.assertIn(b"below the 4 bytes", answer.body)
        self.assertEqual(self.wire.request("HEAD", location)["Upload-Defer-Length"], "1")
        bad = self.wire.request("PATCH", location,
                                patch_headers(4, **{"Upload-Length": "ten"}))
        self.assertEqual(bad.status, 400)
        past = self.wire.request("PATCH", location,
                                 patch_headers(4, **{"Upload-Length": "5"}), b"ef")
        self.assertEqual(past.status, 413)
        self.assertEqual(self.wire.request("HEAD", location)["Upload-Defer-Length"], "1")

    def test_bound_by_max_size(self) -> None:
        """
        Until declared, the bytes are bound by Tus-Max-Size; a length over it
        is 413.
        """
        server = TusServer(max_size=10)
        wire = server.wire()
        answer = wire.request("POST", "/files/", {"Upload-Defer-Length": "1"})
        location = answer["Location"]
        self.assertEqual(wire.request("PATCH", location, patch_headers(0),
                                      b"x" * 11).status, 413)
        self.assertEqual(wire.request("PATCH", location,
                                      patch_headers(0, **{"Upload-Length": "11"})).status, 413)
        self.assertEqual(wire.request("HEAD", location)["Upload-Offset"], "0")

    def test_quota_counts_the_bound(self) -> None:
        """
        An upload whose length is deferred counts Tus-Max-Size in the
        client's incomplete bytes until its length is declared.
        """
        server = TusServer(max_size=100, max_incomplete_bytes=150)
        wire = server.wire()
        first = wire.request("POST", "/files/", {"Upload-Defer-Length": "1"})
        self.assertEqual(first.status, 201)
        self.assertEqual(wire.request("POST", "/files/",
                                      {"Upload-Defer-Length": "1"}).status, 429)
        wire.request("PATCH", first["Location"], patch_headers(0, **{"Upload-Length": "10"}),
                     b"abc")
        self.assertEqual(wire.request("POST", "/files/",
                                      {"Upload-Defer-Length": "1"}).status, 201)

    def test_storage_without_deferred_sizes(self) -> None:
        """
        Over a storage that fixes sizes at creation, creation-defer-length is
        not offered and Upload-Defer-Length is refused (400, nothing created).
        """
        server = TusServer(storage=_FixedSizes(MemoryStorage()))
        wire = server.wire()
        options = wire.request("OPTIONS", "/files/", tus=False)
        self.assertNotIn("creation-defer-length", options["Tus-Extension"])
        answer = wire.request("POST", "/files/", {"Upload-Defer-Length": "1"})
        self.assertEqual(answer.status, 400)
        self.assertIn(b"Upload-Length", answer.body)
        self.assertEqual(server.storage._storage._uploads, {})


class TerminationTests(ResourceTestCase):
    """DELETE."""

    def test_terminate(self) -> None:
        """A partial upload is removed (204); then it is unknown (404)."""
        location = self.server.create(5)
        self.wire.request("PATCH", location, patch_headers(0), b"ab")
        self.assertEqual(self.wire.request("DELETE", location).status, 204)
        self.assertEqual(self.wire.request("HEAD", location).status, 404)
        self.assertEqual(self.wire.request("PATCH", location, patch_headers(2), b"c").status,
                         404)
        self.assertEqual(self.server.events[-1]["event"], "upload.failed")

    def test_terminate_completed(self) -> None:
        """A completed upload's file is never removed through it: 403."""
        location = self.server.create(1, **{"Upload-Metadata": metadata(filename="z")})
        self.wire.request("PATCH", location, patch_headers(0), b"z")
        self.assertEqual(self.wire.request("DELETE", location).status, 403)
        self.assertEqual(self.storage.read_completed("complete/z"), b"z")


class IdentityTests(SynchronousTestCase):
    """Bearer keys: who may do what."""

    def setUp(self) -> None:
        self.key_a, self.key_b = bytes([1]) * 32, bytes([2]) * 32
        self.server = TusServer(keys=_Keys({"alice": self.key_a, "bob": self.key_b}))
        self.wire = self.server.wire()

    def auth(self, who: str, key: bytes) -> dict[str, str]:
        return {"Authorization": f"Bearer {who}:{key.hex()}"}

    def test_required(self) -> None:
        """Without a key, or with a wrong one: 401 with WWW-Authenticate."""
        for headers in ({}, self.auth("alice", self.key_b), self.auth("carol", self.key_a),
                        {"Authorization": "Basic YWxpY2U6eA=="}):
            answer = self.wire.request("POST", "/files/", {"Upload-Length": "1", **headers})
            self.assertEqual(answer.status, 401, headers)
            self.assertIn("Bearer", answer["WWW-Authenticate"])
        self.assertEqual(self.wire.request("OPTIONS", "/files/", tus=False).status, 204)

    def test_own_uploads_only(self) -> None:
        """An upload is its creator's: to anyone else it does not exist (404)."""
        answer = self.wire.request("POST", "/files/", {"Upload-Length": "2",
                                                        **self.auth("alice", self.key_a)})
        location = answer["Location"]
        bob = self.auth("bob", self.key_b)
        self.assertEqual(self.wire.request("HEAD", location, bob).status, 404)
        self.assertEqual(self.wire.request("PATCH", location, {**patch_headers(0), **bob},
                                           b"hi").status, 404)
        self.assertEqual(self.wire.request("DELETE", location, bob).status, 404)
        alice = self.auth("alice", self.key_a)
        self.assertEqual(self.wire.request("PATCH", location, {**patch_headers(0), **alice},
                                           b"hi").status, 204)
        self.assertEqual(self.server.events[-1]["client_id"], "alice")

    def test_key_file(self) -> None:
        """Keys come from the server's key file (KeyStore): what `keys add` printed."""
        from imgresume.keys import KeyStore

        path = self.mktemp()
        key = add_client(path, "scanner-7")
        store = KeyStore(path, lambda f, *a: succeed(f(*a)), self.server.clock)
        uploads = TusUploads(MemoryStorage(), clock=self.server.clock, server_id="t",
                             max_size=10, keys=store)
        self.assertEqual(uploads.authenticate(f"Bearer scanner-7:{key.hex()}"), "scanner-7")


class CorsTests(SynchronousTestCase):
    """Browser pages at the allowed origins (--http-cors-origins)."""

    def setUp(self) -> None:
        self.server = TusServer(cors_origins=("https://app.example",))
        self.wire = self.server.wire()

    def test_preflight(self) -> None:
        """A preflight from an allowed origin: the methods and headers a page may use."""
        answer = self.wire.request("OPTIONS", "/files/", {
            "Origin": "https://app.example", "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "tus-resumable,upload-length"}, tus=False)
        self.assertEqual(answer.status, 204)
        self.assertEqual(answer["Access-Control-Allow-Origin"], "https://app.example")
        self.assertIn("PATCH", answer["Access-Control-Allow-Methods"])
        for name in ("Tus-Resumable", "Upload-Length", "Upload-Offset", "Authorization"):
            self.assertIn(name, answer["Access-Control-Allow-Headers"])
        self.assertEqual(answer["Vary"], "Origin")

    def test_exposed(self) -> None:
        """Answers to an allowed origin let the page read the tus headers."""
        answer = self.wire.request("POST", "/files/", {"Upload-Length": "1",
                                                        "Origin": "https://app.example"})
        self.assertEqual(answer["Access-Control-Allow-Origin"], "https://app.example")
        for name in ("Location", "Upload-Offset", "Upload-Expires"):
            self.assertIn(name, answer["Access-Control-Expose-Headers"])
        self.assertIsNone(answer.get("Access-Control-Allow-Methods"))

    def test_other_origin(self) -> None:
        """Another origin, or no Origin, gets no CORS headers (the browser blocks)."""
        for headers in ({"Origin": "https://evil.example"}, {}):
            answer = self.wire.request("POST", "/files/", {"Upload-Length": "1", **headers})
            self.assertIsNone(answer.get("Access-Control-Allow-Origin"))

    def test_any(self) -> None:
        """* allows every origin (echoed back)."""
        wire = TusServer(cors_origins=("*",)).wire()
        answer = wire.request("OPTIONS", "/files/", {"Origin": "http://localhost:3000",
                                                      "Access-Control-Request-Method": "PATCH"},
                              tus=False)
        self.assertEqual(answer["Access-Control-Allow-Origin"], "http://localhost:3000")


class ChannelTests(SynchronousTestCase):
    """The site's HTTP/1.1 connection (L{imgresume.http.TusChannel})."""

    def test_request_line_before_the_body(self) -> None:
        """
        A request knows its method and path once its headers are in,
        before its body (told by the channel, not read from Twisted's
        private state), and its body then streams into the upload.
        """
        server = TusServer()
        location = server.create(6)
        wire = server.wire()
        self.assertIsInstance(wire.proto, TusChannel)
        wire.send(wire.head("PATCH", location, {"Upload-Offset": "0", "Tus-Resumable": "1.0.0",
                                                "Content-Type":
                                                "application/offset+octet-stream"}, 6)
                  + b"abc")
        [request] = wire.proto.requests
        self.assertEqual(request.request_line, (b"PATCH", location.encode()))
        self.assertEqual(request.body.received, 3)
        wire.send(b"def")
        [answer] = wire.answers()
        self.assertEqual((answer.status, answer["Upload-Offset"]), (204, "6"))

    def test_pipelined(self) -> None:
        """Each request of a connection is told its own request line: two PATCHes in one send."""
        server = TusServer()
        location = server.create(6, **{"Upload-Metadata": metadata(filename="p")})
        wire = server.wire()
        octets = {"Content-Type": "application/offset+octet-stream", "Tus-Resumable": "1.0.0"}
        wire.send(wire.head("PATCH", location, {**octets, "Upload-Offset": "0"}, 3) + b"abc"
                  + wire.head("PATCH", location, {**octets, "Upload-Offset": "3"}, 3) + b"def")
        self.assertEqual([(a.status, a["Upload-Offset"]) for a in wire.answers()],
                         [(204, "3"), (204, "6")])
        self.assertEqual(server.storage.read_completed("complete/p"), b"abcdef")

# -*- test-case-name: tests.storage.test_memory,tests.storage.test_filesystem,tests.storage.test_s3 -*-
"""
Tests every L{IUploadStorage} backend must pass.

Mix L{StorageConformanceMixin} into a C{twisted.trial.unittest.TestCase} and
implement the hooks.  The backend's Deferreds must fire synchronously in
these tests (use a synchronous C{run} for disk backends), so results are
taken with C{successResultOf} / C{failureResultOf}.
"""

from __future__ import annotations

import hashlib
import unicodedata
from typing import Any

from twisted.python.failure import Failure
from twisted.trial.unittest import SkipTest
from zope.interface.verify import verifyObject

from imgresume.errors import (
    DigestMismatch,
    ImgresumeError,
    Incomplete,
    InvalidName,
    NameTaken,
    OffsetMismatch,
    SizeExceeded,
    UnknownUpload,
    UploadAlreadyComplete,
    UploadBusy,
)
from imgresume.names import is_upload_id, new_upload_id
from imgresume.storage.interfaces import (
    ATOMIC_COMPLETE,
    EXCLUSIVE_WRITER,
    Chunk,
    CompletedFileMoved,
    CompletedUpload,
    IDeclaresSize,
    IDeferredSizeStorage,
    IUploadStorage,
    IUploadWriter,
    NewUpload,
    StoredFile,
    TailCheck,
    WholeUpload,
)

EMPTY_TAIL = TailCheck(0, 0, hashlib.sha256(b"").digest())
PAYLOAD = bytes(range(256)) * 40 + b"tail"  # 10244 bytes


def request(data: bytes = PAYLOAD, name: str = "a.tiff", **kw: Any) -> NewUpload:
    """A L{NewUpload} for C{data} (its SHA-256 declared unless C{sha256} is given)."""
    kw.setdefault("sha256", hashlib.sha256(data).digest())
    return NewUpload(name=name, size=len(data), **kw)


class StorageConformanceMixin:
    """
    Behaviour shared by every storage backend.  Subclasses implement
    L{makeStorage}, L{readCompleted}, L{makeSibling}, L{storeDamaged} and
    L{moveCompleted}.
    """

    # -- hooks --------------------------------------------------------------

    def makeStorage(self) -> Any:
        """Return a new, empty backend whose Deferreds fire synchronously."""
        raise NotImplementedError

    def makeSibling(self, storage: Any) -> Any:
        """
        Return the backend as another server sharing C{storage} sees it (a
        second instance on the same place, or the same instance for a
        backend that is shared by sharing the object).
        """
        raise NotImplementedError

    def readCompleted(self, storage: Any, path: str) -> bytes:
        """Return the bytes of the completed file at C{path}."""
        raise NotImplementedError

    def storeDamaged(self, writer: Any, offset: int) -> None:
        """
        Make the next write covering C{offset} store that byte flipped, as a
        failing disk would: the write is acknowledged, but what is stored
        (and read back) differs from what was written.
        """
        raise NotImplementedError

    def settleWhole(self, storage: Any) -> None:
        """
        Let the moments pass after which a backend no longer takes what it
        sees of a one-step upload for a stale view (nothing to do for most).
        """

    def moveCompleted(self, storage: Any, path: str) -> None:
        """
        Take the completed file at C{path} away, as a consumer of
        C{complete/} may: move it somewhere else in the same storage (so
        that it still exists and nothing of it can be reused), leaving the
        name free.
        """
        raise NotImplementedError

    # -- helpers ------------------------------------------------------------

    def setUp(self) -> None:
        super().setUp()
        self.storage = self.makeStorage()

    def commitUnit(self) -> int:
        """Bytes the backend commits at a time (1 for byte-granular ones)."""
        return getattr(self.storage, "commit_granularity", 1)

    def sample(self) -> bytes:
        """L{PAYLOAD}, or for a backend that commits in large units, data spanning several."""
        unit = self.commitUnit()
        if unit <= 1:
            return PAYLOAD
        size = 3 * unit + 4321
        return (PAYLOAD * (size // len(PAYLOAD) + 1))[:size]

    def piece(self, n: int) -> int:
        """C{n} bytes rounded up to whole commit units: what a write makes durable."""
        unit = self.commitUnit()
        return -(-n // unit) * unit

    def create(self, data: bytes = PAYLOAD, name: str = "a.tiff", **kw: Any):
        return self.successResultOf(self.storage.create(request(data, name, **kw)))

    def writeAll(self, writer, data: bytes, start: int = 0, chunk: int = 4096):
        for pos in range(start, len(data), chunk):
            got = self.successResultOf(writer.write(pos, data[pos : pos + chunk]))
            self.assertEqual(got, min(pos + chunk, len(data)))
        self.assertEqual(writer.offset, len(data))

    def upload(self, data: bytes = PAYLOAD, name: str = "a.tiff") -> CompletedUpload:
        writer = self.create(data, name)
        self.writeAll(writer, data)
        return self.successResultOf(writer.complete())

    # -- tests --------------------------------------------------------------

    def test_writeBatch(self) -> None:
        """A batch of contiguous chunks is stored as if written one by one."""
        data, p = self.sample(), self.piece(1000)
        writer = self.create(data)
        chunks = [Chunk(o, data[o : o + p]) for o in range(0, 2 * p, p)]
        self.assertEqual(self.successResultOf(writer.write_batch(chunks)), 2 * p)
        self.failureResultOf(
            writer.write_batch([Chunk(2 * p, b"x"), Chunk(2 * p + 2, b"y")]), OffsetMismatch)
        self.assertEqual(writer.offset, 2 * p)
        self.writeAll(writer, data, start=2 * p)
        done = self.successResultOf(writer.complete())
        self.assertEqual(self.readCompleted(self.storage, done.path), data)

    def test_writeBatchPastSize(self) -> None:
        """
        A batch whose last chunk passes the declared size is refused whole:
        none of its chunks is stored, and the writer goes on from where it
        was.
        """
        data = PAYLOAD[:1000]
        writer = self.create(data)
        batch = [Chunk(0, data[:600]), Chunk(600, data[600:] + b"past the end")]
        self.failureResultOf(writer.write_batch(batch), SizeExceeded)
        self.assertEqual(writer.offset, 0)
        self.writeAll(writer, data)
        done = self.successResultOf(writer.complete())
        self.assertEqual(self.readCompleted(self.storage, done.path), data)

    def test_lateDigest(self) -> None:
        """
        An upload created without its SHA-256 is completed with it: the
        stored bytes are checked against the digest given to complete().
        """
        data = self.sample()
        writer = self.create(data, sha256=None)
        self.assertIsNone(writer.info.sha256)
        self.writeAll(writer, data)
        digest = hashlib.sha256(data).digest()
        done = self.successResultOf(writer.complete(digest))
        self.assertEqual(done.sha256, digest)
        self.assertEqual(self.readCompleted(self.storage, done.path), data)
        again = self.failureResultOf(
            self.makeSibling(self.storage).resume(done.upload_id), UploadAlreadyComplete)
        self.assertEqual(again.value.completed.sha256, digest)

    def test_lateDigestResumed(self) -> None:
        """A resumed upload still has no digest; completing it takes one."""
        data, p = self.sample(), self.piece(4096)
        writer = self.create(data, sha256=None)
        self.writeAll(writer, data[:p])
        self.successResultOf(writer.release())
        other = self.successResultOf(
            self.makeSibling(self.storage).resume(writer.info.upload_id))
        self.assertIsNone(other.info.sha256)
        self.writeAll(other, data, start=other.offset)
        done = self.successResultOf(other.complete(hashlib.sha256(data).digest()))
        self.assertEqual(self.readCompleted(self.storage, done.path), data)

    def test_lateDigestMismatch(self) -> None:
        """A digest at the end that the stored bytes do not match removes the upload."""
        data = self.sample()
        writer = self.create(data, sha256=None)
        self.writeAll(writer, data)
        self.failureResultOf(writer.complete(b"\x00" * 31 + b"\x01"), DigestMismatch)
        self.failureResultOf(
            self.storage.resume(writer.info.upload_id), UnknownUpload)

    def test_digestGivenExactlyOnce(self) -> None:
        """
        complete() takes a digest exactly when create() had none: a missing
        or a second digest is a programming error (ValueError).
        """
        late = self.create(b"ab", sha256=None)
        self.successResultOf(late.write(0, b"ab"))
        self.failureResultOf(late.complete(), ValueError)
        declared = self.create(b"cd", name="b.tiff")
        self.successResultOf(declared.write(0, b"cd"))
        self.failureResultOf(
            declared.complete(hashlib.sha256(b"cd").digest()), ValueError)
        self.successResultOf(late.complete(hashlib.sha256(b"ab").digest()))
        self.successResultOf(declared.complete())

    def test_status(self) -> None:
        """status() reports offset and ownership without taking the upload."""
        data, p = self.sample(), self.piece(4096)
        writer = self.create(data, client_id="alice")
        self.writeAll(writer, data[:p])
        upload_id = writer.info.upload_id
        st = self.successResultOf(self.storage.status(upload_id, "alice"))
        self.assertEqual((st.state, st.offset, st.size, st.busy, st.name),
                         ("partial", p, len(data), True, "a.tiff"))
        self.assertFalse(self.successResultOf(writer.takeover_requested()))
        self.failureResultOf(self.storage.status(upload_id, "mallory"), UnknownUpload)
        self.failureResultOf(self.storage.status("0" * 32), UnknownUpload)
        self.successResultOf(writer.release())
        self.assertFalse(self.successResultOf(self.storage.status(upload_id)).busy)
        mine = self.successResultOf(self.storage.resume(upload_id, "alice"))
        self.writeAll(mine, data, start=p)
        done = self.successResultOf(mine.complete())
        st = self.successResultOf(self.storage.status(upload_id))
        self.assertEqual((st.state, st.offset, st.path), ("complete", len(data), done.path))

    def test_uploadsBelongToTheirClient(self) -> None:
        """Another client cannot resume, or learn of, an upload, partial or complete."""
        data, p = self.sample(), self.piece(4096)
        writer = self.create(data, client_id="alice")
        self.writeAll(writer, data[:p])
        self.successResultOf(writer.release())
        upload_id = writer.info.upload_id
        self.failureResultOf(self.storage.resume(upload_id, "mallory"), UnknownUpload)
        mine = self.successResultOf(self.storage.resume(upload_id, "alice"))
        self.assertEqual(mine.offset, p)
        self.writeAll(mine, data, start=p)
        self.successResultOf(mine.complete())
        self.failureResultOf(self.storage.resume(upload_id, "mallory"), UnknownUpload)
        self.failureResultOf(self.storage.resume(upload_id, "alice"), UploadAlreadyComplete)

    def assertIncomplete(self, storage: Any, client_id: str, count: int, size: int) -> None:
        """C{client_id} has C{count} incomplete uploads declaring C{size} bytes, verified or not."""
        for verify in (False, True):
            found = self.successResultOf(storage.incomplete_for(client_id, verify=verify))
            self.assertEqual((found.count, found.declared_bytes), (count, size))

    def test_incompleteUploadsCounted(self) -> None:
        """
        incomplete_for counts a client's uploads created and neither
        completed nor aborted, with their declared sizes, whether a writer
        holds them or not, as every server sharing the storage sees them.
        """
        data = self.sample()
        self.assertIncomplete(self.storage, "alice", 0, 0)
        first = self.create(data, client_id="alice")
        second = self.create(b"x" * 7, client_id="alice")
        third = self.create(b"y" * 3, client_id="alice")
        self.create(b"z" * 5, client_id="bob")
        self.assertIncomplete(self.storage, "alice", 3, len(data) + 10)
        self.successResultOf(second.release())
        self.assertIncomplete(self.makeSibling(self.storage), "alice", 3, len(data) + 10)
        self.writeAll(first, data)
        self.successResultOf(first.complete())
        self.successResultOf(third.abort())
        self.assertIncomplete(self.storage, "alice", 1, 7)
        self.assertIncomplete(self.storage, "bob", 1, 5)
        self.assertIncomplete(self.storage, "carol", 0, 0)

    # -- sizes declared later (IDeferredSizeStorage) -------------------------

    def createDeferred(self, bound: int, **kw: Any):
        """A writer of an upload created with its size deferred, at most C{bound} bytes."""
        if not IDeferredSizeStorage.providedBy(self.storage):
            raise SkipTest("this storage does not defer sizes")
        kw.setdefault("sha256", None)
        writer = self.successResultOf(self.storage.create(NewUpload(
            name=kw.pop("name", "d.tiff"), size=bound, size_deferred=True, **kw)))
        self.assertTrue(IDeclaresSize.providedBy(writer))
        self.assertTrue(writer.info.size_deferred)
        return writer

    def test_declareSize(self) -> None:
        """
        An upload created with its size deferred takes bytes up to its bound,
        is not completed before its size is declared, then is exactly one
        created with that size: writes past it are refused, completion
        verifies and publishes it; status tells whether the size is declared.
        """
        data, p = self.sample(), self.piece(4096)
        writer = self.createDeferred(2 * len(data) + p, client_id="alice")
        upload_id = writer.info.upload_id
        self.writeAll(writer, data[:p])
        st = self.successResultOf(self.storage.status(upload_id))
        self.assertEqual((st.size_deferred, st.size, st.offset),
                         (True, 2 * len(data) + p, p))
        self.failureResultOf(writer.complete(hashlib.sha256(data[:p]).digest()), Incomplete)
        self.assertIsNone(self.successResultOf(writer.declare_size(len(data))))
        self.assertEqual((writer.info.size, writer.info.size_deferred), (len(data), False))
        st = self.successResultOf(self.makeSibling(self.storage).status(upload_id))
        self.assertEqual((st.size_deferred, st.size), (False, len(data)))
        self.writeAll(writer, data, start=p)
        self.failureResultOf(writer.write(len(data), b"x"), SizeExceeded)
        done = self.successResultOf(writer.complete(hashlib.sha256(data).digest()))
        self.assertEqual(done.size, len(data))
        self.assertEqual(self.readCompleted(self.storage, done.path), data)

    def test_declareSizeResumed(self) -> None:
        """
        A deferred size survives a resume on another server, and a size
        declared there is what every server sees from then on.
        """
        data, p = self.sample(), self.piece(4096)
        writer = self.createDeferred(2 * len(data))
        self.writeAll(writer, data[:p])
        self.successResultOf(writer.release())
        other = self.successResultOf(
            self.makeSibling(self.storage).resume(writer.info.upload_id))
        self.assertEqual((other.offset, other.info.size_deferred, other.info.size),
                         (p, True, 2 * len(data)))
        self.successResultOf(other.declare_size(len(data)))
        self.successResultOf(other.release())
        again = self.successResultOf(self.storage.resume(writer.info.upload_id))
        self.assertEqual((again.info.size_deferred, again.info.size), (False, len(data)))
        self.writeAll(again, data, start=p)
        done = self.successResultOf(again.complete(hashlib.sha256(data).digest()))
        self.assertEqual(self.readCompleted(self.storage, done.path), data)

    def test_declareSizeRefused(self) -> None:
        """
        A size is declared once, within the bound, and never below the
        bytes already written (then the size stays undeclared); an upload
        created with its size cannot declare one.
        """
        data, p = self.sample(), self.piece(4096)
        writer = self.createDeferred(2 * len(data))
        self.writeAll(writer, data[:p])
        refused = self.failureResultOf(writer.declare_size(p - 1), SizeExceeded)
        self.assertEqual(refused.value.offset, p)
        self.failureResultOf(writer.declare_size(2 * len(data) + 1), ValueError)
        self.failureResultOf(writer.declare_size(-1), ValueError)
        self.assertTrue(writer.info.size_deferred)
        self.successResultOf(writer.declare_size(len(data)))
        self.failureResultOf(writer.declare_size(len(data)), ValueError)
        declared = self.create(b"ab", name="b.tiff")
        if IDeclaresSize.providedBy(declared):
            self.failureResultOf(declared.declare_size(2), ValueError)

    def test_declareSizeAtOffset(self) -> None:
        """A size declared where the bytes written end completes the upload as it is."""
        data = self.sample()
        writer = self.createDeferred(2 * len(data))
        chunk = 4096
        for pos in range(0, len(data), chunk):
            self.successResultOf(writer.write(pos, data[pos:pos + chunk]))
        self.successResultOf(writer.declare_size(len(data)))
        done = self.successResultOf(writer.complete(hashlib.sha256(data).digest()))
        self.assertEqual(self.readCompleted(self.storage, done.path), data)

    def test_declareSizeCounted(self) -> None:
        """
        An upload whose size is deferred counts its bound in the client's
        declared bytes until its size is declared, then that size.
        """
        writer = self.createDeferred(5000, client_id="alice")
        self.create(b"y" * 3, client_id="alice")
        self.assertIncomplete(self.storage, "alice", 2, 5003)
        self.successResultOf(writer.declare_size(700))
        self.assertIncomplete(self.makeSibling(self.storage), "alice", 2, 703)

    def test_busyResumeRequestsTakeover(self) -> None:
        """A refused resume asks the owner to yield; the owner can see it."""
        writer = self.create()
        self.assertFalse(self.successResultOf(writer.takeover_requested()))
        other = self.makeSibling(self.storage)
        self.failureResultOf(other.resume(writer.info.upload_id), UploadBusy)
        self.assertTrue(self.successResultOf(writer.takeover_requested()))

    def test_takeoverRequestIsForOneGeneration(self) -> None:
        """After the owner yields, the new owner is not asked to yield in turn."""
        data, p = self.sample(), self.piece(4096)
        writer = self.create(data)
        self.writeAll(writer, data[:p])
        other = self.makeSibling(self.storage)
        self.failureResultOf(other.resume(writer.info.upload_id), UploadBusy)
        self.successResultOf(writer.release())
        self.assertFalse(self.successResultOf(writer.takeover_requested()))
        newer = self.successResultOf(other.resume(writer.info.upload_id))
        self.assertEqual(newer.offset, p)
        self.assertFalse(self.successResultOf(newer.takeover_requested()))
        self.assertGreater(newer.generation, writer.generation)

    def test_providesInterfaces(self) -> None:
        """The storage and its writers provide the storage interfaces."""
        self.assertTrue(verifyObject(IUploadStorage, self.storage))
        self.assertTrue(verifyObject(IUploadWriter, self.create()))

    def test_guarantees(self) -> None:
        """Every backend keeps one writer per upload and completes atomically."""
        self.assertIsInstance(self.storage.guarantees, frozenset)
        self.assertLessEqual(
            {EXCLUSIVE_WRITER, ATOMIC_COMPLETE}, self.storage.guarantees
        )

    def test_createStartsEmpty(self) -> None:
        """A new upload starts at offset 0 with an empty tail and its info."""
        writer = self.create(metadata={"camera": "x"}, client_id="c1")
        self.assertEqual(writer.offset, 0)
        self.assertEqual(writer.tail, EMPTY_TAIL)
        info = writer.info
        self.assertTrue(is_upload_id(info.upload_id))
        self.assertEqual(info.name, "a.tiff")
        self.assertEqual(info.size, len(PAYLOAD))
        self.assertEqual(info.sha256, hashlib.sha256(PAYLOAD).digest())
        self.assertEqual(dict(info.metadata), {"camera": "x"})
        self.assertEqual(info.client_id, "c1")

    def test_uploadIdsDistinct(self) -> None:
        """Every upload gets its own well-formed id."""
        ids = {self.create().info.upload_id for _ in range(5)}
        self.assertEqual(len(ids), 5)

    def test_roundTrip(self) -> None:
        """Bytes written in pieces come out whole at the returned path."""
        writer = self.create()
        upload_id = writer.info.upload_id
        self.writeAll(writer, PAYLOAD, chunk=1000)
        completed = self.successResultOf(writer.complete())
        self.assertEqual(
            completed,
            CompletedUpload(
                upload_id=upload_id,
                name="a.tiff",
                size=len(PAYLOAD),
                sha256=hashlib.sha256(PAYLOAD).digest(),
                path="complete/a.tiff",
            ),
        )
        self.assertEqual(self.readCompleted(self.storage, completed.path), PAYLOAD)

    def test_emptyFile(self) -> None:
        """A zero-byte upload completes at once."""
        completed = self.upload(b"", "empty.raw")
        self.assertEqual(completed.size, 0)
        self.assertEqual(self.readCompleted(self.storage, completed.path), b"")

    def test_subdirectories(self) -> None:
        """Names may contain directories; they are created as needed."""
        completed = self.upload(b"abc", "scans/2026/a.tiff")
        self.assertEqual(completed.path, "complete/scans/2026/a.tiff")
        self.assertEqual(self.readCompleted(self.storage, completed.path), b"abc")

    def test_unicodeNameNormalised(self) -> None:
        """Unicode names are kept, in NFC."""
        writer = self.create(b"x", "Bilder/e\u0301te\u0301.tiff")
        self.assertEqual(
            writer.info.name, unicodedata.normalize("NFC", "Bilder/été.tiff")
        )
        self.successResultOf(writer.write(0, b"x"))
        completed = self.successResultOf(writer.complete())
        self.assertEqual(completed.path, "complete/Bilder/\u00e9t\u00e9.tiff")

    def test_invalidNamesRejected(self) -> None:
        """Names that are not safe relative paths are refused at create."""
        for name in ["", "/etc/passwd", "../x", "a/../b", "a//b", ".hidden",
                     "a\\b", "a\x00b", "CON.tiff", "a/", "x "]:
            f = self.failureResultOf(self.storage.create(request(b"x", name)))
            self.assertIsInstance(f.value, InvalidName, name)

    def test_offsetMismatch(self) -> None:
        """
        A write at any offset but the current one fails with the offset to
        continue from, and the writer stays usable.
        """
        writer = self.create()
        self.successResultOf(writer.write(0, PAYLOAD[:100]))
        for bad in (0, 50, 101, 5000):
            f = self.failureResultOf(writer.write(bad, PAYLOAD[bad : bad + 10]))
            f.trap(OffsetMismatch)
            self.assertEqual(f.value.offset, 100)
        self.assertEqual(writer.offset, 100)
        self.writeAll(writer, PAYLOAD, start=100)
        self.successResultOf(writer.complete())

    def test_sizeExceeded(self) -> None:
        """A write past the declared size fails and stores nothing."""
        writer = self.create(b"abcd")
        f = self.failureResultOf(writer.write(0, b"abcde"))
        f.trap(SizeExceeded)
        self.assertEqual(writer.offset, 0)
        self.assertEqual(self.successResultOf(writer.write(0, b"abcd")), 4)

    def test_emptyWrite(self) -> None:
        """An empty write at the offset changes nothing."""
        writer = self.create()
        self.assertEqual(self.successResultOf(writer.write(0, b"")), 0)

    def test_resumeSameOffsetAndTail(self) -> None:
        """
        After release, a resume proves the same offset and reports the last
        written range with the SHA-256 of its stored bytes.
        """
        data = self.sample()
        first, end = self.piece(3000), self.piece(3000) + self.piece(2000)
        writer = self.create(data, metadata={"k": "v"}, client_id="c")
        self.successResultOf(writer.write(0, data[:first]))
        self.successResultOf(writer.write(first, data[first:end]))
        self.successResultOf(writer.release())
        again = self.successResultOf(self.storage.resume(writer.info.upload_id))
        self.assertEqual(again.offset, end)
        tail = again.tail
        self.assertGreater(tail.length, 0)
        self.assertEqual(tail.start + tail.length, end)
        self.assertEqual(tail.sha256, hashlib.sha256(data[tail.start : end]).digest())
        if self.commitUnit() == 1:  # a byte-granular backend: the last write
            self.assertEqual((tail.start, tail.length), (first, end - first))
        self.assertEqual(again.info, writer.info)
        self.writeAll(again, data, start=end)
        completed = self.successResultOf(again.complete())
        self.assertEqual(self.readCompleted(self.storage, completed.path), data)

    def test_resumeNothingWritten(self) -> None:
        """Resuming an upload with no bytes gives offset 0, empty tail."""
        writer = self.create()
        self.successResultOf(writer.release())
        again = self.successResultOf(self.storage.resume(writer.info.upload_id))
        self.assertEqual((again.offset, again.tail), (0, EMPTY_TAIL))

    def test_busyWhileOwned(self) -> None:
        """A second resume while a writer owns the upload is refused."""
        writer = self.create()
        f = self.failureResultOf(self.storage.resume(writer.info.upload_id))
        f.trap(UploadBusy)
        self.assertGreater(f.value.retry_after, 0)
        self.assertIn(writer.info.upload_id, f.value.message)

    def test_busyFromAnotherServer(self) -> None:
        """Another server sharing the storage cannot take an owned upload."""
        writer = self.create()
        sibling = self.makeSibling(self.storage)
        self.failureResultOf(sibling.resume(writer.info.upload_id), UploadBusy)
        self.successResultOf(writer.release())
        again = self.successResultOf(sibling.resume(writer.info.upload_id))
        self.assertEqual(again.offset, 0)

    def test_resumeAfterRelease(self) -> None:
        """Release gives up ownership; the upload can be resumed again."""
        writer = self.create()
        self.successResultOf(writer.release())
        self.successResultOf(writer.release())  # idempotent
        again = self.successResultOf(self.storage.resume(writer.info.upload_id))
        self.failureResultOf(self.storage.resume(writer.info.upload_id), UploadBusy)
        self.successResultOf(again.release())
        self.successResultOf(self.storage.resume(writer.info.upload_id))

    def test_unknownUpload(self) -> None:
        """Resuming an id that was never created fails with UnknownUpload."""
        self.failureResultOf(self.storage.resume("0" * 32), UnknownUpload)

    def test_malformedId(self) -> None:
        """Ids that are not 32 lowercase hex digits are unknown."""
        for bad in ["", "A" * 32, "0" * 31, "0" * 33, "../" + "0" * 29,
                    "0" * 32 + "\n", "g" * 32, None, 5]:
            self.failureResultOf(self.storage.resume(bad), UnknownUpload)

    def test_completedResumed(self) -> None:
        """
        Resuming a completed upload, from any server, reports its completion
        with the same path.
        """
        completed = self.upload()
        for storage in (self.storage, self.makeSibling(self.storage)):
            f = self.failureResultOf(storage.resume(completed.upload_id))
            f.trap(UploadAlreadyComplete)
            self.assertEqual(f.value.completed, completed)

    def test_completedFileMovedAway(self) -> None:
        """
        Resuming a completed upload whose file a consumer has moved away is
        answered, from any server, with L{CompletedFileMoved} (a
        StorageError naming the path and carrying the recorded completion),
        never with a completion at a path where the file no longer is.
        """
        completed = self.upload()
        self.moveCompleted(self.storage, completed.path)
        for storage in (self.storage, self.makeSibling(self.storage)):
            f = self.failureResultOf(storage.resume(completed.upload_id), CompletedFileMoved)
            self.assertEqual(f.value.completed, completed)
            self.assertIn(completed.path, f.value.message)
            self.assertIn("moved", f.value.message)
            self.assertTrue(f.value.retryable)

    def test_completedNameTakenByLaterUpload(self) -> None:
        """
        A consumer moves a completed file away and a later upload of the
        same name and size (other bytes) completes: resuming the first
        upload is not answered with a completion at a path that holds the
        later upload's bytes, and the later upload's own record stands.
        """
        first = self.upload(PAYLOAD, "scan-0001.tiff")
        self.moveCompleted(self.storage, first.path)
        other = bytes(255 - b for b in PAYLOAD)
        later = self.upload(other, "scan-0001.tiff")
        self.assertEqual(self.readCompleted(self.storage, later.path), other)
        for storage in (self.storage, self.makeSibling(self.storage)):
            f = self.failureResultOf(storage.resume(first.upload_id), CompletedFileMoved)
            self.assertEqual(f.value.completed, first)
            f = self.failureResultOf(storage.resume(later.upload_id), UploadAlreadyComplete)
            self.assertEqual(f.value.completed, later)

    def test_digestMismatch(self) -> None:
        """
        Bytes that were stored as received but hash to another digest than
        declared make complete() fail, and the upload is removed.
        """
        req = request(PAYLOAD)
        req = NewUpload(name=req.name, size=req.size, sha256=b"\0" * 32)
        writer = self.successResultOf(self.storage.create(req))
        self.writeAll(writer, PAYLOAD)
        f = self.failureResultOf(writer.complete())
        f.trap(DigestMismatch)
        self.failureResultOf(
            self.storage.resume(writer.info.upload_id), UnknownUpload
        )

    def test_incomplete(self) -> None:
        """complete() before every byte is stored says where to continue."""
        writer = self.create()
        self.successResultOf(writer.write(0, PAYLOAD[:10]))
        f = self.failureResultOf(writer.complete())
        f.trap(Incomplete)
        self.assertEqual(f.value.offset, 10)
        self.writeAll(writer, PAYLOAD, start=10)
        self.successResultOf(writer.complete())

    def test_corruptionFoundAtComplete(self) -> None:
        """
        If the stored bytes differ from what was written and acknowledged,
        complete() cuts the upload back to the start of the damaged range
        and asks for it again; resending it completes the upload.
        """
        writer = self.create()
        self.storeDamaged(writer, 5000)
        self.writeAll(writer, PAYLOAD, chunk=4096)
        f = self.failureResultOf(writer.complete())
        f.trap(Incomplete)
        self.assertEqual(f.value.offset, 4096)
        self.assertEqual(writer.offset, 4096)
        self.writeAll(writer, PAYLOAD, start=4096)
        completed = self.successResultOf(writer.complete())
        self.assertEqual(self.readCompleted(self.storage, completed.path), PAYLOAD)

    def test_abortThenResume(self) -> None:
        """An aborted upload is gone."""
        writer = self.create()
        self.successResultOf(writer.write(0, b"abc"))
        self.successResultOf(writer.abort())
        self.failureResultOf(
            self.storage.resume(writer.info.upload_id), UnknownUpload
        )

    def test_writerClosedAfterComplete(self) -> None:
        """A writer is finished once complete() succeeds."""
        writer = self.create(b"ab")
        self.successResultOf(writer.write(0, b"ab"))
        self.successResultOf(writer.complete())
        self.failureResultOf(writer.write(2, b""), ImgresumeError)
        self.successResultOf(writer.release())

    def test_nameCollisions(self) -> None:
        """
        Uploads of the same name get distinct paths, the first one the name
        itself, the next C{<stem>.<8 hex of id><suffix>}; no completed file
        is ever replaced.
        """
        first = self.upload(b"one", "dir/a.tiff")
        w2 = self.create(b"two", "dir/a.tiff")
        self.successResultOf(w2.write(0, b"two"))
        second = self.successResultOf(w2.complete())
        third = self.upload(b"three", "dir/a.tiff")
        self.assertEqual(first.path, "complete/dir/a.tiff")
        self.assertEqual(
            second.path, f"complete/dir/a.{w2.info.upload_id[:8]}.tiff"
        )
        self.assertEqual(len({first.path, second.path, third.path}), 3)
        self.assertEqual(self.readCompleted(self.storage, first.path), b"one")
        self.assertEqual(self.readCompleted(self.storage, second.path), b"two")
        self.assertEqual(self.readCompleted(self.storage, third.path), b"three")

    def test_longNameCollision(self) -> None:
        """
        Alternates of a name of the greatest length still fit (the last
        component is shortened) and complete.
        """
        name = "/".join(["d" * 255] * 3 + ["e" * 5, "a" * 245 + ".tiff"])
        self.assertEqual(len(name.encode()), 1024)
        first = self.upload(b"1", name)
        second = self.upload(b"2", name)
        self.assertEqual(first.path, "complete/" + name)
        self.assertNotEqual(second.path, first.path)
        self.assertEqual(self.readCompleted(self.storage, second.path), b"2")
        self.assertEqual(self.readCompleted(self.storage, first.path), b"1")
        f = self.failureResultOf(self.makeSibling(self.storage).resume(
            second.upload_id))
        self.assertEqual(f.value.completed, second)

    def test_nameOfExistingDirectory(self) -> None:
        """A name that is already a directory of completed files is moved aside."""
        self.upload(b"in", "scans/a.tiff")
        completed = self.upload(b"top", "scans")
        self.assertNotEqual(completed.path, "complete/scans")
        self.assertEqual(self.readCompleted(self.storage, completed.path), b"top")
        self.assertEqual(
            self.readCompleted(self.storage, "complete/scans/a.tiff"), b"in"
        )

    def test_parentIsCompletedFile(self) -> None:
        """A name below an existing completed file is refused."""
        self.upload(b"x", "a.tiff")
        self.failureResultOf(
            self.storage.create(request(b"y", "a.tiff/b.tiff")), InvalidName
        )

    def test_interleavedUploads(self) -> None:
        """Uploads written alternately do not disturb each other."""
        a, b = PAYLOAD, PAYLOAD[::-1]
        wa, wb = self.create(a, "a.raw"), self.create(b, "b.raw")
        for pos in range(0, len(a), 3000):
            self.successResultOf(wa.write(pos, a[pos : pos + 3000]))
            self.successResultOf(wb.write(pos, b[pos : pos + 3000]))
        ca = self.successResultOf(wa.complete())
        cb = self.successResultOf(wb.complete())
        self.assertEqual(self.readCompleted(self.storage, ca.path), a)
        self.assertEqual(self.readCompleted(self.storage, cb.path), b)

    # -- a name already taken: find_completed and if-exists=fail -------------

    def test_findCompletedNothing(self) -> None:
        """Nothing at the name: None (also below a directory that is missing)."""
        self.assertIsNone(self.successResultOf(self.storage.find_completed("a.tiff", 3)))
        self.assertIsNone(self.successResultOf(self.storage.find_completed("d/e/a.tiff", 3)))

    def test_findCompletedSameSize(self) -> None:
        """A file of the size asked about: its size and the SHA-256 of its stored bytes."""
        done = self.upload(PAYLOAD, "scans/a.tiff")
        found = self.successResultOf(self.makeSibling(self.storage).find_completed(
            "scans/a.tiff", len(PAYLOAD)))
        self.assertEqual(found, StoredFile(done.path, len(PAYLOAD),
                                           hashlib.sha256(PAYLOAD).digest()))

    def test_findCompletedOtherSize(self) -> None:
        """A file of another size: its size, and no SHA-256 (it is not read)."""
        done = self.upload(b"three", "a.tiff")
        found = self.successResultOf(self.storage.find_completed("a.tiff", 4))
        self.assertEqual(found, StoredFile(done.path, 5, None))

    def test_findCompletedNameOnly(self) -> None:
        """
        Only the name itself is looked at, NFC-normalised: not the alternate
        names a renamed upload took.
        """
        self.upload(b"one", "b.tiff")
        second = self.upload(b"two", "b.tiff")
        self.assertNotEqual(second.path, "complete/b.tiff")
        found = self.successResultOf(self.storage.find_completed("b.tiff", 3))
        self.assertEqual(found.path, "complete/b.tiff")
        self.assertEqual(found.sha256, hashlib.sha256(b"one").digest())
        nfc = unicodedata.normalize("NFC", "caf\u00e9.tiff")
        self.upload(b"cafe", nfc)
        found = self.successResultOf(self.storage.find_completed(
            unicodedata.normalize("NFD", nfc), 4))
        self.assertEqual(found.path, "complete/" + nfc)

    def test_findCompletedDirectory(self) -> None:
        """A directory of completed files at the name: taken, but not a file."""
        self.upload(b"in", "scans/a.tiff")
        found = self.successResultOf(self.storage.find_completed("scans", 2))
        self.assertEqual(found, StoredFile("complete/scans", None, None))

    def test_findCompletedInvalidName(self) -> None:
        """A name that could not be stored is refused, as by create()."""
        self.failureResultOf(self.storage.find_completed("../a.tiff", 1), InvalidName)

    def test_ifExistsFailNeverRenames(self) -> None:
        """
        An upload that asked for if-exists=fail, whose name was taken while
        it was under way, is refused at completion (NameTaken), not stored
        under another name; the file there is untouched and the upload is
        kept: completing it again (after a resume) is refused again.
        """
        data = self.sample()
        writer = self.create(data, "a.tiff", metadata={"if-exists": "fail"})
        self.writeAll(writer, data)
        other = self.upload(b"other", "a.tiff")
        self.assertEqual(other.path, "complete/a.tiff")
        self.failureResultOf(writer.complete(), NameTaken)
        self.successResultOf(writer.release())
        self.assertEqual(self.readCompleted(self.storage, other.path), b"other")
        # Resumed, it is whole (or, where completion had begun, refused at once).
        outcome: list[Any] = []
        self.makeSibling(self.storage).resume(writer.info.upload_id).addBoth(outcome.append)
        [again] = outcome
        if isinstance(again, Failure):
            again.trap(NameTaken)
        else:
            self.assertEqual(again.offset, len(data))
            self.failureResultOf(again.complete(), NameTaken)
            self.successResultOf(again.release())
        self.assertEqual(self.readCompleted(self.storage, other.path), b"other")

    def test_ifExistsFailFreeName(self) -> None:
        """An upload that asked for if-exists=fail completes at its name when it is free."""
        writer = self.create(b"mine", "a.tiff", metadata={"if-exists": "fail"})
        self.successResultOf(writer.write(0, b"mine"))
        done = self.successResultOf(writer.complete())
        self.assertEqual(done.path, "complete/a.tiff")

    # -- a whole small file in one step: store_whole -------------------------

    def whole(self, data: bytes = PAYLOAD, name: str = "a.tiff", *,
              upload_id: str | None = None, sha256: bytes | None = None,
              **kw: Any) -> WholeUpload:
        """A L{WholeUpload} of C{data} (its own SHA-256 unless C{sha256} is given)."""
        return WholeUpload(
            upload_id=upload_id or new_upload_id(), name=name, data=data,
            sha256=hashlib.sha256(data).digest() if sha256 is None else sha256, **kw)

    def storeWhole(self, data: bytes = PAYLOAD, name: str = "a.tiff",
                   storage: Any = None, **kw: Any) -> CompletedUpload:
        request = self.whole(data, name, **kw)
        return self.successResultOf((storage or self.storage).store_whole(request))

    def test_storeWhole(self) -> None:
        """A whole file is stored, verified and published under its name."""
        request = self.whole(PAYLOAD, "scans/a.tiff", client_id="c1")
        done = self.successResultOf(self.storage.store_whole(request))
        self.assertEqual(done, CompletedUpload(
            request.upload_id, "scans/a.tiff", len(PAYLOAD),
            hashlib.sha256(PAYLOAD).digest(), "complete/scans/a.tiff"))
        self.assertEqual(self.readCompleted(self.storage, done.path), PAYLOAD)
        found = self.successResultOf(self.makeSibling(self.storage).find_completed(
            "scans/a.tiff", len(PAYLOAD)))
        self.assertEqual(found.sha256, hashlib.sha256(PAYLOAD).digest())

    def test_storeWholeEmpty(self) -> None:
        """An empty file is stored whole."""
        done = self.storeWhole(b"", "empty.tiff")
        self.assertEqual((done.size, done.path), (0, "complete/empty.tiff"))
        self.assertEqual(self.readCompleted(self.storage, done.path), b"")

    def test_storeWholeDigestMismatch(self) -> None:
        """Bytes that do not hash to the declared SHA-256: DigestMismatch, nothing published."""
        request = self.whole(PAYLOAD, sha256=hashlib.sha256(b"other").digest())
        self.failureResultOf(self.storage.store_whole(request), DigestMismatch)
        self.assertIsNone(self.successResultOf(
            self.storage.find_completed("a.tiff", len(PAYLOAD))))
        # The id is not spent: the right bytes are stored with it after.
        done = self.storeWhole(PAYLOAD, upload_id=request.upload_id)
        self.assertEqual(done.path, "complete/a.tiff")

    def test_storeWholeRenames(self) -> None:
        """if-exists=rename (the default): a second file of the name goes beside it."""
        first = self.storeWhole(b"one")
        request = self.whole(b"two", metadata={"if-exists": "rename"})
        second = self.successResultOf(self.storage.store_whole(request))
        self.assertEqual(first.path, "complete/a.tiff")
        self.assertEqual(second.path, f"complete/a.{request.upload_id[:8]}.tiff")
        self.assertEqual(self.readCompleted(self.storage, first.path), b"one")
        self.assertEqual(self.readCompleted(self.storage, second.path), b"two")

    def test_storeWholeSkipSame(self) -> None:
        """
        if-exists=skip and the same bytes at the name: nothing new is
        stored; the answer names that file, with upload id 32 zeros.
        """
        first = self.upload(PAYLOAD, "a.tiff")
        done = self.storeWhole(PAYLOAD, metadata={"if-exists": "skip"})
        self.assertEqual(done, CompletedUpload(
            "0" * 32, "a.tiff", len(PAYLOAD), hashlib.sha256(PAYLOAD).digest(), first.path))
        self.assertIsNone(self.successResultOf(self.storage.find_completed(
            f"a.{done.upload_id[:8]}.tiff", len(PAYLOAD))))

    def test_storeWholeSkipRepeat(self) -> None:
        """
        A repeat of an if-exists=skip request that stored its file (its
        answer lost) is compared with the name first: skipped, nothing new.
        """
        request = self.whole(PAYLOAD, metadata={"if-exists": "skip"})
        first = self.successResultOf(self.storage.store_whole(request))
        self.assertEqual((first.upload_id, first.path), (request.upload_id, "complete/a.tiff"))
        again = self.successResultOf(self.storage.store_whole(request))
        self.assertEqual(again, CompletedUpload(
            "0" * 32, "a.tiff", len(PAYLOAD), hashlib.sha256(PAYLOAD).digest(),
            "complete/a.tiff"))
        self.assertIsNone(self.successResultOf(self.storage.find_completed(
            f"a.{request.upload_id[:8]}.tiff", len(PAYLOAD))))

    def test_storeWholeRepeatAfterMoved(self) -> None:
        """
        A repeat of a request whose published file a consumer has taken
        away since: L{CompletedFileMoved}, and nothing is published again.
        """
        request = self.whole(PAYLOAD)
        first = self.successResultOf(self.storage.store_whole(request))
        self.moveCompleted(self.storage, first.path)
        self.settleWhole(self.storage)
        self.failureResultOf(self.storage.store_whole(request), CompletedFileMoved)
        there = self.successResultOf(self.storage.find_completed("a.tiff", len(PAYLOAD)))
        self.assertTrue(there is None or there.sha256 is None, there)

    def test_storeWholeSkipDifferent(self) -> None:
        """if-exists=skip and other bytes at the name: renamed, as rename does."""
        self.storeWhole(b"one")
        request = self.whole(b"two", metadata={"if-exists": "skip"})
        done = self.successResultOf(self.storage.store_whole(request))
        self.assertEqual(done.path, f"complete/a.{request.upload_id[:8]}.tiff")
        self.assertEqual(done.upload_id, request.upload_id)
        self.assertEqual(self.readCompleted(self.storage, done.path), b"two")
        self.assertEqual(self.readCompleted(self.storage, "complete/a.tiff"), b"one")

    def test_storeWholeFail(self) -> None:
        """if-exists=fail and the name taken: NameTaken, the file there untouched."""
        self.storeWhole(b"one")
        request = self.whole(b"two", metadata={"if-exists": "fail"})
        self.failureResultOf(self.storage.store_whole(request), NameTaken)
        self.assertEqual(self.readCompleted(self.storage, "complete/a.tiff"), b"one")
        self.assertIsNone(self.successResultOf(self.storage.find_completed(
            f"a.{request.upload_id[:8]}.tiff", 3)))
        free = self.storeWhole(b"two", "b.tiff", metadata={"if-exists": "fail"})
        self.assertEqual(free.path, "complete/b.tiff")

    def test_storeWholeRepeated(self) -> None:
        """
        The same request again (its answer lost), here or through another
        server: the same answer, and one file stored.
        """
        request = self.whole(PAYLOAD, "d/a.tiff", client_id="c1")
        first = self.successResultOf(self.storage.store_whole(request))
        again = self.successResultOf(self.storage.store_whole(request))
        other = self.successResultOf(
            self.makeSibling(self.storage).store_whole(request))
        self.assertEqual(again, first)
        self.assertEqual(other, first)
        self.assertIsNone(self.successResultOf(self.storage.find_completed(
            f"d/a.{request.upload_id[:8]}.tiff", len(PAYLOAD))))

    def test_storeWholeRepeatedOtherBytes(self) -> None:
        """An upload id already used for other bytes: DigestMismatch, nothing changed."""
        request = self.whole(b"one", client_id="c1")
        first = self.successResultOf(self.storage.store_whole(request))
        f = self.failureResultOf(self.storage.store_whole(
            self.whole(b"two", upload_id=request.upload_id, client_id="c1")),
            DigestMismatch)
        self.assertIn(request.upload_id, f.value.message)
        self.assertEqual(self.readCompleted(self.storage, first.path), b"one")
        self.assertIsNone(self.successResultOf(self.storage.find_completed(
            f"a.{request.upload_id[:8]}.tiff", 3)))

    def test_storeWholeIdsPerClient(self) -> None:
        """Two clients using one upload id store two files."""
        upload_id = new_upload_id()
        one = self.storeWhole(b"one", upload_id=upload_id, client_id="c1")
        two = self.storeWhole(b"two", upload_id=upload_id, client_id="c2")
        self.assertNotEqual(one.path, two.path)
        self.assertEqual(self.readCompleted(self.storage, two.path), b"two")

    def test_storeWholeBelowFile(self) -> None:
        """A name below an existing completed file is refused, nothing stored."""
        self.storeWhole(b"x", "a.tiff")
        self.failureResultOf(
            self.storage.store_whole(self.whole(b"y", "a.tiff/b.tiff")), InvalidName)
        self.assertEqual(self.readCompleted(self.storage, "complete/a.tiff"), b"x")

    def test_storeWholeInvalidName(self) -> None:
        """A name that could not be stored is refused, as by create()."""
        self.failureResultOf(
            self.storage.store_whole(self.whole(b"y", "../a.tiff")), InvalidName)

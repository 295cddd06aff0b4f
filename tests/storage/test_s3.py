# -*- test-case-name: tests.storage.test_s3 -*-
"""
L{imgresume.storage.s3.S3Storage} against a real S3 service: the radosgw of
the one-node CI Ceph cluster (C{bash .ci/ceph.sh up} writes
C{/run/imgresume-ci/ceph-s3.env}).  Each test class gets its own bucket,
each test its own key prefix; what a test stores is deleted when it ends,
and the bucket when its class is done (or when a Trial run exits).

Without radosgw every test skips with a loud reason; with
C{IMGRESUME_REQUIRE_CEPH=1} they fail instead.
"""

from __future__ import annotations

import atexit
import hashlib
import json
import os
import sys
from typing import Any

from blake3 import blake3
from twisted.internet import reactor
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.trial.unittest import SkipTest, TestCase

from imgresume.errors import (
    DigestMismatch,
    StorageError,
    UnknownUpload,
    UploadAlreadyComplete,
    UploadTakenOver,
)
from imgresume.storage.interfaces import (
    ATOMIC_COMPLETE,
    DURABLE_ACK,
    EXCLUSIVE_WRITER,
    PROVEN_OFFSET,
    SHARED,
    Chunk,
    CompletedFileMoved,
    NewerRecordFormat,
    NewUpload,
)
from tests.support.cluster import KillServingServer
from tests.support.runners import sync_run
from tests.support.servers import RoundRobinEndpoint, ServerTestCase
from tests.support.storage_conformance import StorageConformanceMixin

ENV_FILE = os.environ.get("IMGRESUME_S3_ENV", "/run/imgresume-ci/ceph-s3.env")
MiB = 1 << 20


def _load_env() -> dict[str, str]:
    env: dict[str, str] = {}
    with open(ENV_FILE) as f:
        for line in f:
            line = line.strip()
            if line and not line.startswith("#") and "=" in line:
                k, v = line.split("=", 1)
                env[k] = v
    return env


def s3_client_or_skip() -> Any:
    """
    A boto3 client for the CI radosgw, or SkipTest with a loud reason
    (a failure under C{IMGRESUME_REQUIRE_CEPH=1}).
    """
    try:
        import boto3
        from botocore.config import Config

        env = _load_env()
        client = boto3.client(
            "s3",
            endpoint_url=env["IMGRESUME_S3_ENDPOINT"],
            aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
            region_name=env.get("AWS_DEFAULT_REGION", "us-east-1"),
            config=Config(retries={"max_attempts": 2}, connect_timeout=3),
        )
        client.list_buckets()
        return client
    except Exception as e:
        reason = (f"S3 TESTS NOT RUN: no radosgw ({type(e).__name__}: {e}); "
                  f"start it with `bash .ci/ceph.sh up` ({ENV_FILE})")
        if os.environ.get("IMGRESUME_REQUIRE_CEPH") == "1":
            raise AssertionError(reason) from e
        print(f"\n*** {reason}", file=sys.stderr)
        raise SkipTest(reason) from None


def aws_environ(case: TestCase) -> dict[str, str]:
    """
    Put the CI S3 user's credentials in C{os.environ} (where boto3, and
    servers started as subprocesses, find them) until C{case} ends.

    @return: the whole env file.
    """
    env = _load_env()
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION"):
        old = os.environ.get(key)
        os.environ[key] = env[key]
        case.addCleanup(
            lambda k=key, v=old: os.environ.pop(k, None) if v is None
            else os.environ.__setitem__(k, v))
    return env


#: The buckets this process made and has not deleted yet, with their clients.
_BUCKETS: dict[str, Any] = {}


def delete_bucket(client: Any, bucket: str) -> None:
    """
    Delete C{bucket} with whatever is left in it (objects, unfinished
    multipart uploads), so that a cluster run again and again does not fill
    up (radosgw frees the space after its GC delay, see C{.ci/ceph.sh}).  A
    failure is reported on stderr, never raised: this is housekeeping.
    """
    try:
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
            keys = [{"Key": o["Key"]} for o in page.get("Contents", ())]
            if keys:
                client.delete_objects(Bucket=bucket, Delete={"Objects": keys})
        for page in client.get_paginator("list_multipart_uploads").paginate(Bucket=bucket):
            for up in page.get("Uploads", ()):
                client.abort_multipart_upload(
                    Bucket=bucket, Key=up["Key"], UploadId=up["UploadId"])
        client.delete_bucket(Bucket=bucket)
    except Exception as e:
        print(f"\n*** could not delete the test bucket {bucket}: {type(e).__name__}: {e}",
              file=sys.stderr)
    finally:
        _BUCKETS.pop(bucket, None)


@atexit.register
def _delete_buckets() -> None:
    """Delete the buckets no C{tearDownClass} deleted (Trial calls none)."""
    for bucket, client in list(_BUCKETS.items()):
        delete_bucket(client, bucket)


class BucketMixin:
    """
    One bucket per test class, one key prefix per test.  Each test deletes
    what it left under its prefix; the bucket goes in C{tearDownClass}
    (pytest and unittest), or when the process exits (Trial).
    """

    bucket: str | None = None

    def setUp(self) -> None:
        cls = type(self)
        self.client = s3_client_or_skip()
        if cls.bucket is None:
            cls.bucket = f"imgresume-{cls.__name__.lower()}-{os.urandom(4).hex()}"
            self.client.create_bucket(Bucket=cls.bucket)
            _BUCKETS[cls.bucket] = self.client
        prefix = f"{self.id().rsplit('.', 1)[-1]}-{os.urandom(3).hex()}"
        self.url = f"s3://{cls.bucket}/{prefix}"
        self.addCleanup(self.emptyPrefix, prefix + "/")
        super().setUp()

    @classmethod
    def tearDownClass(cls) -> None:
        if cls.bucket is not None:
            if cls.bucket in _BUCKETS:
                delete_bucket(_BUCKETS[cls.bucket], cls.bucket)
            cls.bucket = None
        super().tearDownClass()

    def emptyPrefix(self, prefix: str) -> None:
        """Delete what a test left under its prefix (objects, multipart uploads)."""
        bucket = type(self).bucket
        pages = self.client.get_paginator("list_objects_v2").paginate(
            Bucket=bucket, Prefix=prefix)
        for page in pages:
            keys = [{"Key": o["Key"]} for o in page.get("Contents", ())]
            if keys:
                self.client.delete_objects(Bucket=bucket, Delete={"Objects": keys})
        uploads = self.client.list_multipart_uploads(Bucket=bucket, Prefix=prefix)
        for up in uploads.get("Uploads", ()):
            self.client.abort_multipart_upload(
                Bucket=bucket, Key=up["Key"], UploadId=up["UploadId"])

    def s3Storage(self, **kw: Any):
        from imgresume.storage.s3 import S3Storage

        kw.setdefault("run", sync_run)
        kw.setdefault("busy_retry_after", 0.05)
        return S3Storage(self.url, client=self.client, **kw)


class S3StorageTests(BucketMixin, StorageConformanceMixin, TestCase):
    """The storage conformance suite on radosgw."""

    def makeStorage(self):
        return self.s3Storage(owner="node-a")

    def makeSibling(self, storage):
        return self.s3Storage(owner="node-b")

    def readCompleted(self, storage, path):
        return storage.read_completed(path)

    def storeDamaged(self, writer, offset):
        raise NotImplementedError("a test cannot make radosgw store wrong bytes")

    def moveCompleted(self, storage, path):
        key = storage.bucket, storage.prefix + path
        self.client.copy_object(Bucket=key[0], Key=f"{storage.prefix}consumed/{path}",
                                CopySource={"Bucket": key[0], "Key": key[1]})
        self.client.delete_object(Bucket=key[0], Key=key[1])

    def writeAll(self, writer, data, start=0, chunk=4096):
        """
        Like the mixin's, but a write is acknowledged up to the last whole
        part (or the end of the upload), not the end of its data.
        """
        for pos in range(start, len(data), chunk):
            end = min(pos + chunk, len(data))
            got = self.successResultOf(writer.write(pos, data[pos:end]))
            self.assertEqual(got, end if end == len(data)
                             else end - end % writer.part_size)
        self.assertEqual(writer.offset, len(data))

    def test_guarantees(self) -> None:
        """
        S3 declares durable acknowledgements, sharing, proven offsets and
        atomic completion, but not EXCLUSIVE_WRITER: its lease is fenced
        by a check before each part, not atomically (docs/s3.md).
        """
        self.assertEqual(self.storage.guarantees,
                         frozenset({DURABLE_ACK, SHARED, PROVEN_OFFSET, ATOMIC_COMPLETE}))
        self.assertNotIn(EXCLUSIVE_WRITER, self.storage.guarantees)
        self.assertEqual(self.storage.commit_granularity, 5 * MiB)


def _no_corruption(self):
    raise SkipTest("a stored part cannot be changed in place in S3; its MD5 is "
                   "checked on receipt and its bytes once more at completion")


_no_corruption.__doc__ = "test_corruptionFoundAtComplete: not applicable to S3."
S3StorageTests.test_corruptionFoundAtComplete = _no_corruption


def _long_names(self):
    raise SkipTest("S3 keys are at most 1024 bytes: a name of 1024 bytes plus "
                   "'complete/' and the prefix cannot be stored (S3LimitTests)")


_long_names.__doc__ = "test_longNameCollision: not applicable to S3 (key length)."
S3StorageTests.test_longNameCollision = _long_names


def payload(size: int, seed: int = 1) -> bytes:
    """C{size} pseudo-random bytes."""
    import random

    return random.Random(seed).randbytes(size)


def request(data: bytes, name: str = "big.tiff", **kw: Any) -> NewUpload:
    """A L{NewUpload} for C{data}."""
    return NewUpload(name=name, size=len(data), sha256=hashlib.sha256(data).digest(), **kw)


class S3PartTests(BucketMixin, TestCase):
    """Resume, status and takeover at part granularity (5 MiB parts)."""

    def test_resumeFromListPartsOnAnotherServer(self) -> None:
        """
        Two full parts and some spooled bytes are written on one server; a
        second S3Storage (another server, nothing shared but the bucket)
        resumes at the end of the second part with its tail digest, and
        finishes the upload.  The first server spools to a directory.
        """
        data = payload(12 * MiB + 123)
        spool = os.path.abspath(self.mktemp())
        os.makedirs(spool)
        a = self.s3Storage(owner="node-a", spool_dir=spool)
        writer = self.successResultOf(a.create(request(data, client_id="alice")))
        self.assertEqual(writer.part_size, 5 * MiB)
        got = self.successResultOf(writer.write_batch(
            [Chunk(0, data[: 4 * MiB]), Chunk(4 * MiB, data[4 * MiB : 11 * MiB])]))
        self.assertEqual((got, writer.offset), (10 * MiB, 11 * MiB))
        upload_id = writer.info.upload_id
        st = self.successResultOf(a.status(upload_id, "alice"))
        self.assertEqual((st.state, st.offset, st.busy, st.owner),
                         ("partial", 10 * MiB, True, "node-a"))
        self.successResultOf(writer.release())

        b = self.s3Storage(owner="node-b")
        self.failureResultOf(b.resume(upload_id, "mallory"), UnknownUpload)
        self.failureResultOf(b.status(upload_id, "mallory"), UnknownUpload)
        again = self.successResultOf(b.resume(upload_id, "alice"))
        self.assertEqual(again.offset, 10 * MiB)
        self.assertEqual(
            (again.tail.start, again.tail.length, again.tail.sha256),
            (5 * MiB, 5 * MiB, hashlib.sha256(data[5 * MiB : 10 * MiB]).digest()))
        self.assertGreater(again.generation, writer.generation)
        self.assertEqual(self.successResultOf(again.write(10 * MiB, data[10 * MiB :])),
                         len(data))
        done = self.successResultOf(again.complete())
        self.assertEqual(a.read_completed(done.path), data)
        self.failureResultOf(b.resume(upload_id, "mallory"), UnknownUpload)
        f = self.failureResultOf(a.resume(upload_id, "alice"), UploadAlreadyComplete)
        self.assertEqual(f.value.completed, done)

    def test_staleWriterTakenOver(self) -> None:
        """
        A writer whose lease went stale (its server stalled past the lease
        time) is taken over, and its next part upload fails UploadTakenOver.
        """
        clock = [1000.0]
        a = self.s3Storage(owner="node-a", now=lambda: clock[0], lease_ttl=30)
        data = payload(6 * MiB)
        writer = self.successResultOf(a.create(request(data)))
        clock[0] += 31
        b = self.s3Storage(owner="node-b", now=lambda: clock[0])
        newer = self.successResultOf(b.resume(writer.info.upload_id))
        self.failureResultOf(writer.write(0, data[: 5 * MiB]), UploadTakenOver)
        self.assertEqual(self.successResultOf(newer.write(0, data)), len(data))
        self.successResultOf(newer.complete())

    def test_interruptedCompletionFinishedOnResume(self) -> None:
        """
        A server that dies after CompleteMultipartUpload but before the
        completion record (here: the copy to the final key fails) leaves an
        upload that the next resume, on any server, finishes and reports
        complete.
        """
        data = payload(5 * MiB + 10)
        a = self.s3Storage(owner="node-a")
        writer = self.successResultOf(a.create(request(data, "c/x.tif")))
        self.successResultOf(writer.write(0, data))
        real = self.client.copy

        def crash(*args, **kw):
            raise ConnectionError("server died")

        self.client.copy = crash
        try:
            self.failureResultOf(writer.complete(), StorageError)
        finally:
            self.client.copy = real
        self.assertEqual(len(self.flushLoggedErrors(ConnectionError)), 1)
        self.successResultOf(writer.release())
        b = self.s3Storage(owner="node-b")
        f = self.failureResultOf(b.resume(writer.info.upload_id), UploadAlreadyComplete)
        self.assertEqual(f.value.completed.path, "complete/c/x.tif")
        self.assertEqual(b.read_completed("complete/c/x.tif"), data)
        f = self.failureResultOf(a.resume(writer.info.upload_id), UploadAlreadyComplete)
        self.assertEqual(f.value.completed.path, "complete/c/x.tif")

    def test_failedPartPoisonsWriter(self) -> None:
        """
        A failed UploadPart fails the write with StorageError and every later
        call of that writer; after release a resume re-proves the offset
        from ListParts (the part before it survives).
        """
        data = payload(11 * MiB)
        s = self.s3Storage()
        writer = self.successResultOf(s.create(request(data)))
        self.assertEqual(self.successResultOf(writer.write(0, data[: 5 * MiB])), 5 * MiB)
        real = self.client.upload_part

        def broken(**kw):
            raise ConnectionError("network down")

        self.client.upload_part = broken
        try:
            self.failureResultOf(writer.write(5 * MiB, data[5 * MiB : 10 * MiB]),
                                 StorageError)
        finally:
            self.client.upload_part = real
        self.assertEqual(len(self.flushLoggedErrors(ConnectionError)), 1)
        self.failureResultOf(writer.write(10 * MiB, data[10 * MiB :]), StorageError)
        self.successResultOf(writer.release())
        again = self.successResultOf(s.resume(writer.info.upload_id))
        self.assertEqual(again.offset, 5 * MiB)
        self.successResultOf(again.write(5 * MiB, data[5 * MiB :]))
        done = self.successResultOf(again.complete())
        self.assertEqual(s.read_completed(done.path), data)

    def test_completeAsStored(self) -> None:
        """
        An upload created without a digest, its parts written through two
        servers: complete_as_stored() publishes it with the digest of the
        object read back, each part checked against its record.
        """
        data = payload(10 * MiB + 77)
        a = self.s3Storage(owner="node-a")
        writer = self.successResultOf(a.create(NewUpload("s/x.tif", len(data), None)))
        self.successResultOf(writer.write(0, data[: 5 * MiB]))
        self.successResultOf(writer.release())
        b = self.s3Storage(owner="node-b")
        again = self.successResultOf(b.resume(writer.info.upload_id))
        self.successResultOf(again.write(5 * MiB, data[5 * MiB :]))
        done = self.successResultOf(again.complete_as_stored())
        self.assertEqual(done.sha256, hashlib.sha256(data).digest())
        self.assertEqual(b.read_completed(done.path), data)
        f = self.failureResultOf(a.resume(done.upload_id), UploadAlreadyComplete)
        self.assertEqual(f.value.completed.sha256, hashlib.sha256(data).digest())

    def test_completeAsStoredPartDiffers(self) -> None:
        """
        A part whose stored bytes do not hash to its record's digest: the
        completion fails with DigestMismatch and the upload is removed.
        """
        data = payload(5 * MiB + 10)
        s = self.s3Storage()
        writer = self.successResultOf(s.create(NewUpload("bad.tif", len(data), None)))
        self.successResultOf(writer.write(0, data))
        key = s._objects.upload_key(writer.info.upload_id, "parts/00002.json")
        record = json.loads(self.client.get_object(Bucket=self.bucket, Key=key)["Body"].read())
        record["sha256"] = hashlib.sha256(b"other").hexdigest()
        self.client.put_object(Bucket=self.bucket, Key=key, Body=json.dumps(record).encode())
        self.failureResultOf(writer.complete_as_stored(), DigestMismatch)
        self.failureResultOf(s.resume(writer.info.upload_id), UnknownUpload)

    def test_completeAsStoredInterrupted(self) -> None:
        """
        complete_as_stored() interrupted once the parts are assembled, before
        the digest is recorded: the next resume checks the parts and
        finishes the completion with the digest of what is stored.
        """
        data = payload(5 * MiB + 10)
        a = self.s3Storage(owner="node-a")
        writer = self.successResultOf(a.create(NewUpload("i.tif", len(data), None)))
        self.successResultOf(writer.write(0, data))
        real = self.client.get_object

        def crash(*args, **kw):
            raise ConnectionError("server died")

        self.client.get_object = crash
        try:
            self.failureResultOf(writer.complete_as_stored(), StorageError)
        finally:
            self.client.get_object = real
        self.assertEqual(len(self.flushLoggedErrors(ConnectionError)), 1)
        self.successResultOf(writer.release())
        b = self.s3Storage(owner="node-b")
        f = self.failureResultOf(b.resume(writer.info.upload_id), UploadAlreadyComplete)
        self.assertEqual(f.value.completed.sha256, hashlib.sha256(data).digest())
        self.assertEqual(b.read_completed(f.value.completed.path), data)

    def test_expireAbortsAbandonedUploads(self) -> None:
        """
        expire() aborts multipart uploads older than the limit and removes
        their records, but never one a writer holds.
        """
        s = self.s3Storage()
        writer = self.successResultOf(s.create(request(b"abc")))
        self.assertEqual(self.successResultOf(s.expire(3600)), [])
        self.assertEqual(self.successResultOf(s.expire(-60)), [])  # held
        self.successResultOf(writer.release())
        self.assertEqual(self.successResultOf(s.expire(-60)), [writer.info.upload_id])
        self.failureResultOf(s.resume(writer.info.upload_id), UnknownUpload)


class PartSizeTests(TestCase):
    """The part size chosen from the declared size (no S3 needed)."""

    def test_partSizes(self) -> None:
        """Parts are at least 5 MiB, whole MiB, and at most 10,000 per upload."""
        from imgresume.storage.s3 import MAX_PARTS, part_size_for

        self.assertEqual(part_size_for(0), 5 * MiB)
        self.assertEqual(part_size_for(50_000 * MiB), 5 * MiB)
        self.assertEqual(part_size_for(50_000 * MiB + 1), 6 * MiB)
        big = 5 * (1 << 40)  # 5 TiB, S3's largest object
        self.assertLessEqual(-(-big // part_size_for(big)), MAX_PARTS)
        self.assertEqual(part_size_for(100, minimum=8 * MiB), 8 * MiB)


class LeaseTimeOptionTests(TestCase):
    """C{--s3-lease-time}: parsed into the storage's C{lease_ttl} (no S3 needed)."""

    def options(self, *extra: str) -> dict[str, Any]:
        from imgresume.server.tap import Options

        config = Options()
        config.parseOptions(["--listen", "unix:/tmp/imgr-unused.sock",
                             "--storage", "s3://bucket/prefix", *extra])
        return config["s3-options"]

    def test_leaseTime(self) -> None:
        """15 s by default; a duration sets it; zero or less is a usage error."""
        from twisted.python.usage import UsageError

        self.assertEqual(self.options()["lease_ttl"], 15.0)
        self.assertEqual(self.options("--s3-lease-time", "3s")["lease_ttl"], 3.0)
        self.assertEqual(self.options("--s3-lease-time", "1m")["lease_ttl"], 60.0)
        for bad in ("0", "-1s"):
            with self.assertRaises(UsageError) as e:
                self.options("--s3-lease-time", bad)
            self.assertIn("--s3-lease-time", str(e.exception))


class S3LimitTests(BucketMixin, TestCase):
    """S3's own limits, refused up front."""

    def test_keyTooLong(self) -> None:
        """A name whose key would pass S3's 1024 bytes is refused at create."""
        from imgresume.errors import InvalidName

        name = "/".join(["d" * 255] * 3 + ["e" * 5, "a" * 245 + ".tiff"])
        f = self.failureResultOf(self.s3Storage().create(request(b"1", name)), InvalidName)
        self.assertIn("1024", f.value.message)
        self.assertIsNone(self.successResultOf(self.s3Storage().find_completed(name, 1)))

    def test_claimedNameIsTaken(self) -> None:
        """
        A name whose object was moved away stays claimed by its upload (no
        later upload is stored there): find_completed reports it taken by
        something that is not a file, so if-exists=fail refuses it at
        UPLOAD as completion would.
        """
        from imgresume.storage.interfaces import StoredFile

        storage = self.s3Storage()
        writer = self.successResultOf(storage.create(request(b"1", "a.tiff")))
        self.successResultOf(writer.write(0, b"1"))
        done = self.successResultOf(writer.complete())
        self.client.delete_object(Bucket=self.bucket, Key=storage._objects.key(done.path))
        self.assertEqual(self.successResultOf(storage.find_completed("a.tiff", 1)),
                         StoredFile("complete/a.tiff", None, None))
        again = self.successResultOf(storage.create(request(b"2", "a.tiff")))
        self.successResultOf(again.write(0, b"2"))
        self.assertNotEqual(self.successResultOf(again.complete()).path, "complete/a.tiff")

class S3RecordTests(BucketMixin, TestCase):
    """
    The records of an upload in the bucket: meta.json's format (its
    C{version}) and the published object's identity in done.json.
    """

    def meta(self, storage, upload_id: str) -> dict:
        return storage._objects.get_json(storage._objects.upload_key(upload_id, "meta.json"))

    def putRecord(self, storage, upload_id: str, rel: str, record: dict) -> None:
        storage._objects.put_json(storage._objects.upload_key(upload_id, rel), record)

    def test_lateDigestIsFormat2(self) -> None:
        """
        An upload whose digest comes at the end is format 2; one with its
        digest, or a late-digest one once its digest is known, is format 1.
        """
        s = self.s3Storage()
        declared = self.successResultOf(s.create(request(b"abc")))
        self.assertEqual(self.meta(s, declared.info.upload_id)["version"], 1)
        late = self.successResultOf(s.create(NewUpload(name="l.tif", size=3, sha256=None)))
        upload_id = late.info.upload_id
        self.assertEqual(self.meta(s, upload_id)["version"], 2)
        self.successResultOf(late.write(0, b"abc"))
        self.successResultOf(late.complete(hashlib.sha256(b"abc").digest()))
        self.assertEqual(self.meta(s, upload_id)["version"], 1)

    def test_deferredSizeIsFormat4(self) -> None:
        """
        An upload whose size is not declared yet is version 4 (its size is
        only a bound); once declared, its record is the version it would
        have had, and the client index names the declared size.
        """
        s = self.s3Storage()
        writer = self.successResultOf(s.create(NewUpload(
            "d.tiff", 9000, None, client_id="alice", size_deferred=True)))
        upload_id = writer.info.upload_id
        meta = self.meta(s, upload_id)
        self.assertEqual((meta["version"], meta["size"], meta["size_deferred"]),
                         (4, 9000, True))
        self.successResultOf(writer.declare_size(5))
        meta = self.meta(s, upload_id)
        self.assertEqual((meta["version"], meta["size"]), (2, 5))
        self.assertNotIn("size_deferred", meta)
        found = self.successResultOf(s.incomplete_for("alice"))
        self.assertEqual((found.count, found.declared_bytes), (1, 5))

    def test_newerFormatRefused(self) -> None:
        """A record of a newer format is refused clearly, and retryably."""
        s = self.s3Storage()
        writer = self.successResultOf(s.create(request(b"abc")))
        self.successResultOf(writer.release())
        upload_id = writer.info.upload_id
        meta = self.meta(s, upload_id)
        self.putRecord(s, upload_id, "meta.json", dict(meta, version=5))
        for d in (s.resume(upload_id), s.status(upload_id)):
            f = self.failureResultOf(d, NewerRecordFormat)
            self.assertTrue(f.value.retryable)
            self.assertIn(f"upload {upload_id} was written by a newer imgresume (format 5); "
                          "this server understands format 4 and older", f.value.message)
        self.putRecord(s, upload_id, "meta.json", meta)
        self.successResultOf(self.successResultOf(s.resume(upload_id)).release())

    def test_format1LateDigestRead(self) -> None:
        """
        A late-digest record as the previous release wrote it (version 1,
        sha256 null) is resumed and completed.
        """
        s = self.s3Storage()
        late = self.successResultOf(s.create(NewUpload(name="l.tif", size=3, sha256=None)))
        self.successResultOf(late.release())
        upload_id = late.info.upload_id
        self.putRecord(s, upload_id, "meta.json", dict(self.meta(s, upload_id), version=1))
        writer = self.successResultOf(s.resume(upload_id))
        self.successResultOf(writer.write(0, b"abc"))
        done = self.successResultOf(writer.complete(hashlib.sha256(b"abc").digest()))
        self.assertEqual(s.read_completed(done.path), b"abc")

    def test_identityRecorded(self) -> None:
        """
        done.json names the published object's ETag and size; a record
        without them (an earlier release) is checked by size alone.
        """
        s = self.s3Storage()
        writer = self.successResultOf(s.create(request(b"abc")))
        self.successResultOf(writer.write(0, b"abc"))
        done = self.successResultOf(writer.complete())
        record = s._objects.get_json(s._objects.upload_key(done.upload_id, "done.json"))
        head = self.client.head_object(Bucket=s.bucket, Key=s._objects.key(done.path))
        self.assertEqual((record["etag"], record["size"]),
                         (head["ETag"].strip('"'), 3))
        self.putRecord(s, done.upload_id, "done.json",
                       {k: record[k] for k in ("path", "sha256", "completed")})
        f = self.failureResultOf(s.resume(done.upload_id), UploadAlreadyComplete)
        self.assertEqual(f.value.completed, done)
        self.client.put_object(Bucket=s.bucket, Key=s._objects.key(done.path), Body=b"abcd")
        self.failureResultOf(s.resume(done.upload_id), CompletedFileMoved)


class S3ServerTests(BucketMixin, ServerTestCase):
    """A real upload through the server adapter over S3Storage and TCP."""

    timeout = 120

    async def test_cutMidUploadResumedOnSecondServer(self) -> None:
        """
        ~20 MiB through an in-process server on S3Storage; the connection is
        cut at ~12 MiB and that server stops listening; the client resumes on
        a second server (own S3Storage instance) at a part boundary, and the
        completed object's SHA-256 is the file's.
        """
        from twisted.internet.threads import deferToThread

        def threaded(f, *args):
            return deferToThread(f, *args)

        listening_a: list[Any] = []
        factory_a, port_a = self.start_server(
            self.s3Storage(owner="node-a", run=threaded), "node-a",
            cut_after=12 * MiB, on_cut=lambda: listening_a[0].stopListening())
        listening_a.append(port_a)
        _, port_b = self.start_server(self.s3Storage(owner="node-b", run=threaded), "node-b")
        endpoint = RoundRobinEndpoint([
            TCP4ClientEndpoint(reactor, "127.0.0.1", port_a.getHost().port),
            TCP4ClientEndpoint(reactor, "127.0.0.1", port_b.getHost().port),
        ])
        path, content = self.local_file(20 * MiB + 777)
        result = await self.uploader(endpoint, stall_timeout=30.0).upload(path, "scans/s3.tif")
        self.assertTrue(factory_a.cut_done)
        self.assertEqual((result.servers[0], result.servers[-1]), ("node-a", "node-b"))
        self.assertEqual(len(result.resumed_at), 1)
        self.assertIn(result.resumed_at[0], (5 * MiB, 10 * MiB))
        # BLAKE3, the default digest: the parts and the object hashed with it.
        self.assertEqual((result.digest, result.sha256),
                         ("blake3", blake3(content).hexdigest()))
        stored = await deferToThread(self.s3Storage().read_completed, result.path)
        self.assertEqual(hashlib.sha256(stored).hexdigest(), hashlib.sha256(content).hexdigest())


class S3TapTests(BucketMixin, ServerTestCase):
    """C{twistd imgresume --storage s3://...}: options to a running server."""

    timeout = 60

    async def test_optionsToUpload(self) -> None:
        """
        The twistd plugin's options and makeService build a server on
        S3Storage (endpoint from --s3-endpoint, credentials from the AWS_*
        environment, expiry of abandoned uploads as the "gc" service), and a
        client uploads through it.
        """
        from imgresume.server.tap import Options, makeService
        from imgresume.storage.s3 import S3Storage

        env = aws_environ(self)
        config = Options()
        config.parseOptions([
            "--listen", "tcp:0:interface=127.0.0.1", "--storage", self.url,
            "--s3-endpoint", env["IMGRESUME_S3_ENDPOINT"], "--server-id", "tap-node",
        ])
        top = makeService(config)
        self.assertIsInstance(top.factory.storage, S3Storage)
        self.assertEqual(top.getServiceNamed("gc").call[0].__name__, "expire")
        top.startService()
        self.addCleanup(top.stopService)
        port = top.listener._waitingForPort.result.getHost().port
        path, content = self.local_file(7 * MiB + 3)
        result = await self.uploader(f"tcp:127.0.0.1:{port}").upload(path, "tap.tif")
        self.assertEqual(result.servers, ["tap-node"])
        stored = self.s3Storage().read_completed(result.path)
        self.assertEqual(hashlib.sha256(stored).digest(), hashlib.sha256(content).digest())


class S3FailoverTests(BucketMixin, TestCase):
    """Real C{twistd} servers on S3 behind the real balancer, one SIGKILLed."""

    timeout = 180

    async def test_sigkillServingServerMidUpload(self) -> None:
        """
        The server receiving a 30 MiB upload is SIGKILLed after a third of
        it; its lease expires (C{--s3-lease-time 3s} here, 15 s by
        default), the client resumes through the balancer on the other
        server at a part boundary, and the completed object hashes to the
        file's SHA-256.
        """
        from imgresume.testing import LocalCluster
        from imgresume.client import Uploader

        env = aws_environ(self)
        work = os.path.abspath(self.mktemp())
        os.makedirs(work)
        cluster = LocalCluster(work, servers=2, storage=self.url, server_args=[
            "--s3-endpoint", env["IMGRESUME_S3_ENDPOINT"], "--s3-lease-time", "3s"]).start()
        self.addCleanup(cluster.stop)
        size = 30 * MiB + 4321
        content = payload(size, seed=7)
        path = os.path.join(work, "scan.tif")
        with open(path, "wb") as f:
            f.write(content)
        kill = KillServingServer(cluster, after=size // 3)
        uploader = Uploader(cluster.lb_endpoint, reactor=reactor, journal=None,
                            client_id="test", chunk_size=256 * 1024, window=8,
                            backoff_base=0.25, backoff_max=4.0, max_attempts=30)
        result = await uploader.upload(path, "scans/killed.tif", progress=kill)
        kill.check(self, result)
        self.assertGreaterEqual(result.resumed_at[0], 5 * MiB)
        self.assertEqual(result.resumed_at[0] % (5 * MiB), 0)
        self.assertLessEqual(result.bytes_sent, size + 5 * MiB + 8 * 256 * 1024)
        stored = self.s3Storage().read_completed(result.path)
        self.assertEqual(hashlib.sha256(stored).digest(), hashlib.sha256(content).digest())

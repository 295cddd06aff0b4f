# -*- test-case-name: tests.storage.test_incomplete -*-
"""
The per-client indexes of incomplete uploads behind
L{IUploadStorage.incomplete_for
<imgresume.storage.interfaces.IUploadStorage.incomplete_for>}: the
filesystem's C{clients/} directory (kept through create, completion, abort
and garbage collection; entries left behind dropped by a verified count;
odd client ids and planted symlinks) and the S3 one, against a small fake
of the S3 calls it makes.  The behaviour every backend shares is in the
conformance mixin (C{test_incompleteUploadsCounted}).
"""

from __future__ import annotations

import datetime
import hashlib
import os
import shutil
import tempfile
import time
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from imgresume.errors import StorageError
from imgresume.storage.filesystem import FilesystemStorage
from imgresume.storage.filesystem import _incomplete as fs_index
from imgresume.storage.filesystem.gc import collect_garbage
from imgresume.storage.interfaces import IncompleteUploads, NewUpload
from imgresume.storage.s3 import _incomplete as s3_index
from imgresume.storage.s3._bucket import Bucket
from tests.support.runners import sync_run


def request(size: int = 3, client_id: str = "alice", name: str = "a.tif") -> NewUpload:
    return NewUpload(name, size, hashlib.sha256(b"x" * size).digest(), {}, client_id)


class FilesystemIndexTests(SynchronousTestCase):
    """C{clients/c-<client>/<upload id>.<size>} under a filesystem storage root."""

    def setUp(self) -> None:
        self.root = tempfile.mkdtemp(prefix="imgresume-test-")
        self.addCleanup(shutil.rmtree, self.root, True)
        self.storage = FilesystemStorage(self.root, sync_run)

    def count(self, client_id: str = "alice", verify: bool = False) -> IncompleteUploads:
        return self.successResultOf(self.storage.incomplete_for(client_id, verify))

    def entries(self, client_id: str = "alice") -> list[str]:
        path = os.path.join(self.root, "clients", f"c-{client_id}")
        return sorted(os.listdir(path)) if os.path.isdir(path) else []

    def test_entry_per_upload(self) -> None:
        """Each upload has one empty entry named by its id and declared size, until it ends."""
        writer = self.successResultOf(self.storage.create(request(3)))
        self.assertEqual(self.entries(), [f"{writer.info.upload_id}.3"])
        self.successResultOf(writer.write(0, b"xxx"))
        self.successResultOf(writer.complete())
        self.assertEqual(self.entries(), [])
        self.assertEqual(self.count(), IncompleteUploads(0, 0))

    def test_garbage_collection_forgets(self) -> None:
        """An abandoned upload removed by garbage collection is no longer counted."""
        writer = self.successResultOf(self.storage.create(request(3)))
        self.successResultOf(writer.release())
        self.assertEqual(self.count(), IncompleteUploads(1, 3))
        report = collect_garbage(self.root, 0, now=time.time() + 10)
        self.assertEqual(len(report.removed), 1)
        self.assertEqual(self.count(), IncompleteUploads(0, 0))

    def age(self, client_id: str, seconds: float) -> None:
        directory = os.path.join(self.root, "clients", f"c-{client_id}")
        when = time.time() - seconds
        for name in os.listdir(directory):
            os.utime(os.path.join(directory, name), (when, when))

    def test_stale_entries_dropped_when_verified(self) -> None:
        """
        An entry whose upload was removed by hand is counted until a
        verified count drops it; one whose upload is complete (a crash
        before its entry went) is dropped at once; a young entry without an
        upload (one being created) is kept.
        """
        gone = self.successResultOf(self.storage.create(request(3)))
        self.successResultOf(gone.release())
        shutil.rmtree(os.path.join(self.root, "incoming", gone.info.upload_id))
        done = self.successResultOf(self.storage.create(request(4, name="b.tif")))
        self.successResultOf(done.write(0, b"xxxx"))
        self.successResultOf(done.complete())
        os.close(os.open(os.path.join(self.root, "clients", "c-alice",
                                      f"{done.info.upload_id}.4"), os.O_CREAT | os.O_WRONLY))
        self.assertEqual(self.count(), IncompleteUploads(2, 7))
        self.assertEqual(self.count(verify=True), IncompleteUploads(1, 3))  # young: kept
        self.age("alice", fs_index.GRACE + 1)
        self.assertEqual(self.count(verify=True), IncompleteUploads(1, 3))  # once a minute
        self.storage._verified.clear()
        self.assertEqual(self.count(verify=True), IncompleteUploads(0, 0))

    def test_counted_before_it_exists(self) -> None:
        """The entry is made before the upload directory: no upload goes uncounted."""
        seen: list[list[str]] = []
        original = os.mkdir

        def mkdir(path: Any, *args: Any, **kwargs: Any) -> None:
            if os.path.dirname(str(path)).endswith("incoming"):
                seen.append(self.entries())
            original(path, *args, **kwargs)

        self.patch(os, "mkdir", mkdir)
        self.successResultOf(self.storage.create(request(3)))
        self.assertEqual(len(seen), 1)
        self.assertEqual(len(seen[0]), 1)

    def test_failed_create_not_counted(self) -> None:
        """A create that fails leaves no entry behind."""
        self.patch(os, "fsync", lambda fd: (_ for _ in ()).throw(OSError(5, "EIO")))
        self.failureResultOf(self.storage.create(request(3)), StorageError)
        self.assertEqual(self.count(), IncompleteUploads(0, 0))

    def test_odd_client_ids(self) -> None:
        """Client ids "." and ".." get directories of their own, inside clients/."""
        for client_id in (".", "..", ""):
            self.successResultOf(self.storage.create(request(2, client_id)))
        self.assertEqual(sorted(os.listdir(os.path.join(self.root, "clients"))),
                         ["c-", "c-.", "c-.."])
        self.assertEqual(self.count(".."), IncompleteUploads(1, 2))
        self.assertEqual(fs_index.client_dir_name("a/b"), "x-" + b"a/b".hex())

    def test_symlink_refused(self) -> None:
        """A symlink planted as clients/ is not followed: counting fails loudly."""
        outside = tempfile.mkdtemp(prefix="imgresume-test-")
        self.addCleanup(shutil.rmtree, outside, True)
        os.symlink(outside, os.path.join(self.root, "clients"))
        self.failureResultOf(self.storage.incomplete_for("alice"), StorageError)
        self.failureResultOf(self.storage.create(request(3)), StorageError)
        self.assertEqual(os.listdir(outside), [])


class FakeS3:
    """The S3 calls of the index, on a dict of keys to modification times."""

    def __init__(self) -> None:
        self.objects: dict[str, datetime.datetime] = {}

    def put_object(self, Bucket: str, Key: str, Body: bytes) -> None:
        self.objects[Key] = datetime.datetime.now(datetime.timezone.utc)

    def delete_object(self, Bucket: str, Key: str) -> None:
        self.objects.pop(Key, None)

    def list_objects_v2(self, Bucket: str, Prefix: str, **kw: Any) -> dict[str, Any]:
        keys = sorted(k for k in self.objects if k.startswith(Prefix))
        start = int(kw.get("ContinuationToken", 0))
        page = keys[start:start + 2]  # small pages, to follow continuation
        more = start + 2 < len(keys)
        return {"Contents": [{"Key": k, "LastModified": self.objects[k]} for k in page],
                "IsTruncated": more, **({"NextContinuationToken": str(start + 2)}
                                        if more else {})}


class S3IndexTests(SynchronousTestCase):
    """C{PREFIX/clients/c-<client>/<upload id>.<size>} objects."""

    def setUp(self) -> None:
        self.s3 = FakeS3()
        self.bucket = Bucket(self.s3, "b", "pre/")

    def test_count_and_forget(self) -> None:
        """Entries are counted over pages, per client; forgetting one uncounts it."""
        for i in range(5):
            s3_index.add(self.bucket, "alice", f"{i:032x}", 10 + i)
        s3_index.add(self.bucket, "bob", "f" * 32, 1)
        self.assertIn(f"pre/clients/c-alice/{0:032x}.10", self.s3.objects)
        self.assertEqual(s3_index.count(self.bucket, "alice"), IncompleteUploads(5, 60))
        s3_index.forget(self.bucket, {"client_id": "alice", "upload_id": f"{0:032x}",
                                      "size": 10})
        self.assertEqual(s3_index.count(self.bucket, "alice"), IncompleteUploads(4, 50))
        self.assertEqual(s3_index.count(self.bucket, "bob"), IncompleteUploads(1, 1))

    def test_prune(self) -> None:
        """Entries of complete uploads go; of gone ones, only past the grace period."""
        for i in range(3):
            s3_index.add(self.bucket, "alice", f"{i:032x}", 1)
        states = {f"{0:032x}": True, f"{1:032x}": False, f"{2:032x}": None}
        s3_index.prune(self.bucket, "alice", states.get)
        self.assertEqual(s3_index.count(self.bucket, "alice"), IncompleteUploads(2, 2))
        later = time.time() + s3_index.GRACE + 1
        s3_index.prune(self.bucket, "alice", states.get, now=lambda: later)
        self.assertEqual(s3_index.count(self.bucket, "alice"), IncompleteUploads(1, 1))

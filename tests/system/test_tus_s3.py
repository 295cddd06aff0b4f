# -*- test-case-name: tests.system.test_tus_s3 -*-
"""
tus on S3 (the CI radosgw): three C{twistd imgresume --storage s3://...
--http} servers behind C{twistd imgresume-lb --check-mode connect}.  tuspy
uploads in PATCHes of one S3 part, with C{Repr-Digest} (an S3 storage
cannot hash what it holds, so an upload that went through several servers
is verified against the client's digest); the server holding the upload's
lease is SIGKILLed mid-PATCH; once its lease expires another server takes
the upload, tuspy's retries finish it, and the stored object is
byte-identical.

Without radosgw the test skips with a loud reason, or fails under
C{IMGRESUME_REQUIRE_CEPH=1} (as in CI).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import threading
import time

from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from tests.storage.test_s3 import BucketMixin, aws_environ
from tests.support.cluster import write_random
from tests.support.tus import TusCluster, patch_offsets, tuspy

MiB = 1 << 20


def held_lease(client, bucket: str, prefix: str) -> str | None:
    """The owner of the newest lease of the one upload under C{prefix}, if held."""
    found = client.list_objects_v2(Bucket=bucket, Prefix=prefix + "/incoming/")
    leases = sorted(o["Key"] for o in found.get("Contents", ()) if "/lease/" in o["Key"])
    if not leases:
        return None
    record = json.loads(client.get_object(Bucket=bucket, Key=leases[-1])["Body"].read())
    return record.get("owner") if record.get("state") == "held" else None


class TusOnS3Tests(BucketMixin, TestCase):
    """tuspy through three servers on one S3 bucket, the serving one SIGKILLed."""

    timeout = 240

    async def test_sigkill_serving_server(self) -> None:
        """
        The lease holder is SIGKILLed mid-PATCH past a third: tuspy's
        retries (423 until the lease expires, then HEAD and PATCH from the
        proven offset on another server) finish; the object is
        byte-identical, checked against Repr-Digest before publication.
        """
        client, _ = tuspy()
        env = aws_environ(self)
        work = os.path.abspath(self.mktemp())
        os.makedirs(work)
        # Leases of 3 s (15 s by default): the takeover comes sooner.
        cluster = TusCluster(work, servers=3, storages=[self.url], server_args=(
            "--s3-endpoint", env["IMGRESUME_S3_ENDPOINT"], "--s3-lease-time", "3s",
        )).start_for(self)
        size = 30 * MiB + 4321
        patch = 5 * MiB
        path = os.path.join(work, "s3.tif")
        digest = write_random(path, size)
        with open(path, "rb") as f:
            sha = hashlib.sha256(f.read()).digest()
        offsets = patch_offsets(self)
        bucket, prefix = self.url[len("s3://"):].split("/", 1)

        def upload() -> str:
            tus = client.TusClient(cluster.url, headers={
                "Repr-Digest": f"sha-256=:{base64.b64encode(sha).decode()}:"})
            up = tus.uploader(path, chunk_size=patch, retries=40, retry_delay=1,
                              metadata={"filename": "s3.tif"})
            up.upload()
            return up.url

        killed: list[str] = []

        def killer() -> None:
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                if offsets and offsets[-1] >= size // 3:
                    owner = held_lease(self.client, bucket, prefix)
                    if owner is not None:
                        cluster.kill(owner)
                        killed.append(owner)
                        return
                time.sleep(0.01)

        thread = threading.Thread(target=killer)
        thread.start()
        try:
            await deferToThread(upload)
        finally:
            await deferToThread(thread.join)
        self.assertEqual(len(killed), 1, cluster.logs())
        stored = self.s3Storage().read_completed("complete/s3.tif")
        self.assertEqual(hashlib.sha256(stored).hexdigest(), digest)
        for a, b in zip(offsets, offsets[1:]):
            self.assertGreaterEqual(b, a, offsets)

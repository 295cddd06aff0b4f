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

Also, in process (two tus sites over two S3 storages on one bucket): an
upload whose PATCHes go to both servers without C{Repr-Digest} is
completed with the digest of what is stored, checked part by part.
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

from tests.storage.test_s3 import BucketMixin, aws_environ, payload
from tests.support.http import TusServer, metadata, repr_digest
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


OCTETS = {"Content-Type": "application/offset+octet-stream"}


class TusS3DigestTests(BucketMixin, TestCase):
    """
    Two tus sites in this process, each over its own S3Storage of one
    bucket (two servers), the client giving no Repr-Digest.
    """

    def servers(self) -> tuple[TusServer, TusServer]:
        return (TusServer(storage=self.s3Storage(owner="node-a"), stored_sha256=None),
                TusServer(storage=self.s3Storage(owner="node-b"), stored_sha256=None))

    def test_patches_on_two_servers(self) -> None:
        """
        The first PATCH on one server, the last on the other: 204 with the
        Repr-Digest of the object as stored (each part checked against the
        digest recorded when it was stored), and the object is the bytes.
        """
        first, second = self.servers()
        data = payload(5 * MiB + 1000)
        location = first.create(len(data), **{"Upload-Metadata": metadata(filename="two.tif")})
        answer = first.wire().request("PATCH", location, {**OCTETS, "Upload-Offset": "0"},
                                      data[: 5 * MiB])
        self.assertEqual((answer.status, answer["Upload-Offset"]), (204, str(5 * MiB)))
        answer = second.wire().request(
            "PATCH", location, {**OCTETS, "Upload-Offset": str(5 * MiB)}, data[5 * MiB :])
        self.assertEqual(answer.status, 204, answer.body)
        self.assertEqual(answer["Repr-Digest"], repr_digest(data))
        self.assertEqual(second.storage.read_completed("complete/two.tif"), data)
        self.assertEqual([e["event"] for e in second.events],
                         ["upload.resumed", "upload.completed"])
        self.assertEqual(first.wire().request("HEAD", location)["Upload-Offset"],
                         str(len(data)))

    def test_part_differs(self) -> None:
        """
        A part whose stored bytes do not match the digest recorded for it:
        460, the upload is removed (404), an upload.failed event.
        """
        first, second = self.servers()
        data = payload(5 * MiB + 1000)
        location = first.create(len(data))
        first.wire().request("PATCH", location, {**OCTETS, "Upload-Offset": "0"},
                             data[: 5 * MiB])
        storage = first.storage
        key = storage._objects.upload_key(location.rsplit("/", 1)[-1], "parts/00001.json")
        record = json.loads(self.client.get_object(Bucket=self.bucket, Key=key)["Body"].read())
        record["sha256"] = hashlib.sha256(b"other").hexdigest()
        self.client.put_object(Bucket=self.bucket, Key=key, Body=json.dumps(record).encode())
        answer = second.wire().request(
            "PATCH", location, {**OCTETS, "Upload-Offset": str(5 * MiB)}, data[5 * MiB :])
        self.assertEqual(answer.status, 460, answer.body)
        self.assertEqual(second.wire().request("HEAD", location).status, 404)
        self.assertEqual(second.events[-1]["event"], "upload.failed")

# -*- test-case-name: tests.system.test_tus_sharedfs -*-
"""
tus on a real shared filesystem: C{twistd imgresume --http} servers, each
on its own mount of the GlusterFS volume (three), as if each ran on its
own host, behind C{twistd imgresume-lb --check-mode
connect}.  tuspy uploads; the server holding the upload is SIGKILLed
mid-upload; tuspy's own retries (HEAD on a server whose mount may see the
upload late, then PATCH from the proven offset) finish on another server,
and the stored file, read through every mount, is byte-identical.

Without the mounts the tests skip with a loud reason, or fail under
C{IMGRESUME_REQUIRE_SHAREDFS=1} (as in CI).

On GlusterFS a PATCH that lands on another server than the last one
usually gets 409 first: that server's mount still shows the upload's
older size for about a second, so it proves a lower offset (safe: the
client continues from a proven offset; tuspy asks HEAD again).
"""

from __future__ import annotations

import os

from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from tests.support.cluster import write_random
from tests.support.sharedfs import (
    converged_sha256,
    require_gluster_mounts,
)
from tests.support.tus import TusCluster, patch_offsets, tuspy, upload_killing_serving

MiB = 1 << 20


class TusOnGlusterTests(TestCase):
    """tuspy through three servers, each on its own GlusterFS mount."""

    timeout = 240

    async def test_sigkill_serving_server(self) -> None:
        """
        The server holding the upload is SIGKILLed at a third: tuspy
        finishes on another server over another mount, and every mount
        reads the stored file byte-identical; no PATCH starts before the
        one cut.
        """
        client, _ = tuspy()
        dirs = require_gluster_mounts(self, 3)
        work = os.path.abspath(self.mktemp())
        os.makedirs(work)
        cluster = TusCluster(work, servers=3, storages=dirs).start_for(self)
        size = 24 * MiB + 777
        patch = 2 * MiB
        path = os.path.join(work, "shared.tif")
        digest = write_random(path, size)
        offsets = patch_offsets(self)

        def upload() -> str:
            up = client.TusClient(cluster.url).uploader(
                path, chunk_size=patch, retries=20, retry_delay=1,
                metadata={"filename": "shared.tif"})
            up.upload()
            return up.url

        _, killed = await upload_killing_serving(cluster, size // 3, upload)
        self.assertEqual(len(killed), 1, cluster.logs())
        for d in dirs:
            seen, _ = await deferToThread(
                converged_sha256, os.path.join(d, "complete", "shared.tif"), digest)
            self.assertEqual(seen, digest, d)
        for a, b in zip(offsets, offsets[1:]):
            self.assertGreaterEqual(b, a, offsets)
        self.assertLessEqual(len(set(offsets)), size // patch + 2, offsets)


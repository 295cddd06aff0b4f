"""
`imgresume status` (asking the servers) and `imgresume ls` (reading a
storage directory), on a real server process and real uploads.
"""

import json
import os
import subprocess
import sys

from twisted.internet import reactor
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from imgresume.client import Journal, UploadFailed, Uploader
from imgresume.errors import UnknownUpload
from tests.support.processes import REPO_ROOT, TwistdServer



def cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "imgresume", *args],
                          env={**os.environ, "PYTHONPATH": REPO_ROOT, **(env or {})},
                          capture_output=True, text=True, timeout=60)


class StatusCommandTests(TestCase):
    async def test_status_and_ls(self) -> None:
        """A partial and a complete upload, seen by `status` and by `ls`."""
        server = await TwistdServer(self).start()
        work = os.path.abspath(self.mktemp())
        os.makedirs(work)
        journal_path = os.path.join(work, "journal.json")
        done_path = os.path.join(work, "done.tif")
        with open(done_path, "wb") as f:
            f.write(os.urandom(50_000))
        # Uploads by UPLOAD and DATA (put_max=0): a file stored whole by a
        # PUT leaves no upload record for status to find.
        up = Uploader(server.endpoint, reactor=reactor, journal=Journal(journal_path),
                      client_id="scanner-1", put_max=0)
        done = await up.upload(done_path)
        # A partial upload: the client gives up when the file turns unreadable.
        part_path = os.path.join(work, "part.tif")
        with open(part_path, "wb") as f:
            f.write(os.urandom(400_000))
        part = Uploader(server.endpoint, reactor=reactor, journal=Journal(journal_path),
                        client_id="scanner-1", chunk_size=64 * 1024, window=1, max_attempts=1,
                        put_max=0)
        cut = []

        def progress(p) -> None:
            if p.phase == "uploading" and p.done >= 128 * 1024 and not cut:
                cut.append(p.done)
                os.truncate(part_path, 0)  # the next read fails: the upload stops here

        try:
            await part.upload(part_path, progress=progress)
        except UploadFailed:
            pass
        [partial_id] = Journal(journal_path).upload_ids()
        answers = await up.status([done.upload_id, partial_id, "0" * 32])
        self.assertEqual((answers[0].complete, answers[0].path), (True, done.path))
        self.assertEqual((answers[1].complete, answers[1].busy), (False, False))
        self.assertGreaterEqual(answers[1].offset, 128 * 1024)
        self.assertIsInstance(answers[2], UnknownUpload)
        # Another client learns nothing about these uploads.
        other = Uploader(server.endpoint, reactor=reactor, journal=None, client_id="other")
        self.assertTrue(all(isinstance(a, UnknownUpload)
                            for a in await other.status([done.upload_id, partial_id])))
        # The commands, as an operator runs them.
        out = await deferToThread(cli, "status", "--to", server.endpoint, "--json",
                                  "--client-id", "scanner-1", "--journal", journal_path)
        self.assertEqual(out.returncode, 0, out.stderr)
        [row] = [json.loads(line) for line in out.stdout.splitlines()]
        self.assertEqual((row["upload_id"], row["state"]), (partial_id, "partial"))
        listing = await deferToThread(cli, "ls", "--storage", server.storage, "--json")
        rows = {r["upload_id"]: r for r in map(json.loads, listing.stdout.splitlines())}
        self.assertEqual(rows[done.upload_id]["state"], "complete")
        self.assertEqual(rows[partial_id]["offset"], answers[1].offset)
        # Each upload's digest algorithm: BLAKE3, the default.
        self.assertEqual({r["digest"] for r in rows.values()}, {"blake3"})
        human = await deferToThread(cli, "ls", "--storage", server.storage)
        self.assertIn("partial", human.stdout)
        self.assertIn("complete", human.stdout)
        self.assertIn("  blake3  ", human.stdout)

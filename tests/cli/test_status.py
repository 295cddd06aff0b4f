"""
`imgresume status` (asking the servers) and `imgresume ls` (reading a
storage directory), on a real server process and real uploads.
"""

import io
import json
import os
import subprocess
import sys
from unittest import mock

from twisted.internet import reactor
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from imgresume import integrity
from imgresume.cli._status import StatusOptions, run_status
from imgresume.client import Journal, UploadFailed, Uploader
from imgresume.errors import UnknownUpload
from imgresume.protocol import UploadStatusFrame
from imgresume.server import _protocol as server_adapter
from imgresume.storage.interfaces import NewUpload
from imgresume.storage.memory import MemoryStorage
from tests.support.processes import REPO_ROOT, TwistdServer
from tests.support.servers import ServerTestCase, endpoint_of



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


def _old_status_frame(st, hello_options) -> UploadStatusFrame:
    """What a server from before C{status-fields} sends: no optional fields, whatever asked."""
    return UploadStatusFrame(
        st.upload_id, st.name, st.size, st.state == "complete", st.offset, st.busy,
        st.owner, int(st.created * 1000), int(st.updated * 1000), st.path)


class StatusDigestTests(ServerTestCase):
    """
    `imgresume status` shows an upload's digest algorithm when the server
    sends it (UPLOAD_STATUS's optional fields, asked for in HELLO), and
    works as before with a server that predates them.
    """

    async def status(self, digest: str) -> tuple[list, list[dict], str]:
        """A partial upload in C{digest}: the answers, `status --json` rows and its text."""
        storage = MemoryStorage()
        content = b"II*\0" * 1000
        writer = self.successResultOf(storage.create(NewUpload(
            "a.tif", len(content), integrity.digest_of(digest, content), {}, "test-client",
            digest=digest)))
        self.successResultOf(writer.write(0, content[:1000]))
        self.successResultOf(writer.release())
        upload_id = writer.info.upload_id
        _, listening = self.start_server(storage)
        endpoint = endpoint_of(listening)
        answers = await self.uploader(endpoint).status([upload_id])
        outputs = []
        for as_json in (["--json"], []):
            config = StatusOptions()
            config.parseOptions(["--to", endpoint, "--client-id", "test-client",
                                 *as_json, upload_id])
            out = io.StringIO()
            self.assertEqual(await run_status(reactor, config, out), 0)
            outputs.append(out.getvalue())
        return answers, [json.loads(line) for line in outputs[0].splitlines()], outputs[1]

    async def test_new_server(self) -> None:
        """The server sends the algorithm it was asked for; status prints it."""
        for digest in ("blake3", "sha256"):
            [answer], [row], text = await self.status(digest)
            self.assertEqual(answer.fields, {"digest": digest})
            self.assertEqual((row["state"], row["offset"], row["digest"]),
                             ("partial", 1000, digest))
            self.assertIn(f"  {digest}  a.tif", text)

    async def test_old_server(self) -> None:
        """A server that sends no optional fields: the frame it knows, no algorithm shown."""
        with mock.patch.object(server_adapter, "status_frame", _old_status_frame):
            [answer], [row], text = await self.status("blake3")
        self.assertIsNone(answer.fields)
        self.assertEqual((row["state"], row["offset"]), ("partial", 1000))
        self.assertNotIn("digest", row)
        self.assertIn(" idle  a.tif", text)

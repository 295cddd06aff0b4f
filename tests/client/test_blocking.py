# -*- test-case-name: tests.client.test_blocking -*-
"""
Tests for L{imgresume.client.upload_files}, the blocking wrapper.

The test runner already runs the global reactor in this process, so the
wrapper's real job (start the reactor in a background thread, wait there)
is exercised in a child Python process, against a real C{twistd imgresume}
server in another child process.  In this process we only check that a call
from the reactor thread is refused instead of deadlocking.

L{TwistdServer} and L{run_python} are in L{tests.support.processes}.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
import textwrap

from blake3 import blake3
from twisted.internet import reactor
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase

from imgresume.client import Journal, upload_files
from tests.support.processes import (
    PythonChild,
    TwistdServer,
    child_env,
    incoming_bytes,
    run_python,
    wait_until,
)

CLIENT_SCRIPT = textwrap.dedent("""\
    import json, sys, threading, time
    from imgresume.client import UploadFailed, upload_files

    mode, endpoint, *paths = sys.argv[1:]
    fast = dict(backoff_base=0.01, backoff_max=0.05, connect_timeout=2, chunk_size=65536)
    if mode == "ok":
        # default journal (under $XDG_STATE_HOME), a remote name, then a
        # second call that reuses the reactor thread the first one started
        first = upload_files(endpoint, paths[:1], names=["scans/first.tif"], **fast)
        rest = upload_files(endpoint, paths[1:], journal=None, **fast)
        print(json.dumps({
            "results": [r.to_json() for r in first + rest],
            "threads": sorted(t.name for t in threading.enumerate()),
            "main": threading.current_thread().name,
        }))
    elif mode == "interrupt":
        # slow enough to be interrupted by the test's SIGINT (Ctrl-C)
        from imgresume.client import UploadInterrupted
        try:
            upload_files(endpoint, paths, **dict(fast, chunk_size=16384, window=1))
        except UploadInterrupted as e:
            print(json.dumps({"type": type(e).__name__, "error": str(e), "signal": e.signal,
                              "acknowledged": e.acknowledged, "upload_id": e.upload_id}))
    elif mode == "again":
        print(json.dumps([r.to_json() for r in upload_files(endpoint, paths, **fast)]))
    elif mode == "fail":
        started = time.monotonic()
        try:
            upload_files(endpoint, paths, journal=None, max_attempts=2, **fast)
        except UploadFailed as e:
            print(json.dumps({"error": str(e), "cause": type(e.cause).__name__,
                              "seconds": time.monotonic() - started}))
""")


class UploadFilesTests(TestCase):
    """L{upload_files} from a plain (non-reactor) thread, in a child process."""

    timeout = 60

    def setUp(self) -> None:
        self.work = os.path.abspath(self.mktemp())
        os.makedirs(self.work)
        self.script = os.path.join(self.work, "client.py")
        with open(self.script, "w") as f:
            f.write(CLIENT_SCRIPT)
        self.state = os.path.join(self.work, "state")

    def make_file(self, name: str, size: int, seed: int) -> tuple[str, bytes]:
        """A file of C{size} reproducible bytes in the test's directory."""
        path = os.path.join(self.work, name)
        content = random.Random(seed).randbytes(size)
        with open(path, "wb") as f:
            f.write(content)
        return path, content

    async def test_upload_files(self) -> None:
        """
        Files are uploaded and verified; results come back as
        L{UploadResult}s; the reactor runs in a daemon thread of its own,
        reused by a second call, whose two files share one connection; the
        journal marks the first call's upload complete; the process exits
        normally afterwards.
        """
        server = await TwistdServer(self).start()
        path1, content1 = self.make_file("a.tif", 1024 * 1024 + 7, 1)
        path2, content2 = self.make_file("b.tif", 300 * 1024, 2)
        path3, content3 = self.make_file("c.tif", 1000, 3)
        out, err, code = await run_python(
            [self.script, "ok", server.endpoint, path1, path2, path3],
            child_env(XDG_STATE_HOME=self.state),
        )
        self.assertEqual(code, 0, err)
        report = json.loads(out)
        first, second, third = report["results"]
        self.assertEqual(first["name"], "scans/first.tif")
        self.assertEqual(first["path"], "complete/scans/first.tif")
        self.assertEqual(first["size"], len(content1))
        # BLAKE3 by default: no "sha256" key, the digest with its algorithm.
        self.assertNotIn("sha256", first)
        self.assertEqual(first["digest"], {"algorithm": "blake3",
                                           "hex": blake3(content1).hexdigest()})
        self.assertEqual(first["resumed_at"], [])
        self.assertEqual(first["bytes_sent"], len(content1))
        self.assertEqual(first["servers"], ["twistd-node"])
        self.assertEqual(second["name"], "b.tif")
        self.assertEqual(second["digest"]["hex"], blake3(content2).hexdigest())
        self.assertEqual(server.stored(first["path"]), content1)
        self.assertEqual(server.stored(second["path"]), content2)
        self.assertEqual(server.stored(third["path"]), content3)
        self.assertEqual(server.log().count("handshake from"), 2)  # one per call
        self.assertEqual(report["main"], "MainThread")
        self.assertEqual(report["threads"].count("imgresume-reactor"), 1)
        journal = Journal(os.path.join(self.state, "imgresume", "journal.json"))
        [entry] = journal.entries().values()  # the second call kept no journal
        self.assertEqual((entry["upload_id"], entry["complete"]), (first["upload_id"], True))

    async def test_upload_failed(self) -> None:
        """
        Nothing listens at the endpoint: L{UploadFailed} is raised in the
        calling thread once the attempts are used up.
        """
        socket_dir = tempfile.mkdtemp(prefix="imgr-")  # short: UNIX paths are limited
        self.addCleanup(shutil.rmtree, socket_dir, True)
        socket_path = os.path.join(socket_dir, "nobody.sock")
        path, _ = self.make_file("a.tif", 1000, 3)
        out, err, code = await run_python(
            [self.script, "fail", f"unix:{socket_path}", path], child_env()
        )
        self.assertEqual(code, 0, err)
        report = json.loads(out)
        self.assertIn("gave up after 2 attempts", report["error"])
        self.assertEqual(report["cause"], "ConnectError")
        self.assertLess(report["seconds"], 5)


    async def test_interrupted(self) -> None:
        """
        Ctrl-C (SIGINT) while L{upload_files} waits: the upload is stopped
        in the reactor thread and L{UploadInterrupted} raised in the caller
        (naming SIGINT, the upload and the bytes the server acknowledged),
        the journal keeps the upload, and the same call again resumes it and
        completes.  (Before, a bare KeyboardInterrupt left the upload
        running in the daemon thread until the process died.)
        """
        server = await TwistdServer(self).start()
        path, content = self.make_file("big.tif", 8 * 1024 * 1024, 4)
        env = child_env(XDG_STATE_HOME=self.state)
        child = PythonChild([self.script, "interrupt", server.endpoint, path], env)
        await wait_until(lambda: incoming_bytes(server.storage) >= 1024 * 1024
                         or child.proto.ended.called, what="1 MiB stored")
        child.signal("INT")
        self.assertEqual(await child.ended(), 0, child.err)
        report = json.loads(child.out)
        self.assertEqual((report["type"], report["signal"]), ("UploadInterrupted", 2))
        self.assertIn("big.tif: interrupted by SIGINT", report["error"])
        self.assertGreater(report["acknowledged"], 0)
        journal = Journal(os.path.join(self.state, "imgresume", "journal.json"))
        [entry] = journal.entries().values()
        self.assertEqual(entry["upload_id"], report["upload_id"])
        out, err, code = await run_python([self.script, "again", server.endpoint, path], env,
                                          timeout=60)
        self.assertEqual(code, 0, err)
        [result] = json.loads(out)
        self.assertEqual(result["upload_id"], report["upload_id"])
        self.assertGreaterEqual(result["resumed_at"][0], report["acknowledged"])
        self.assertEqual(server.stored(result["path"]), content)


class ReactorThreadTests(TestCase):
    """L{upload_files} must not be called from the reactor thread."""

    async def test_refused_in_reactor_thread(self) -> None:
        """
        Called from the thread running the reactor (as here, under the test
        runner), it raises RuntimeError at once instead of deadlocking.
        """
        await deferLater(reactor, 0, lambda: None)  # surely inside the running reactor
        self.assertTrue(reactor.running)
        error = self.assertRaises(
            RuntimeError, upload_files, "tcp:127.0.0.1:1", ["/nonexistent"], journal=None
        )
        self.assertIn("would block the reactor", str(error))

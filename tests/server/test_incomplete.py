# -*- test-case-name: tests.server.test_incomplete -*-
"""
The per-client limits on incomplete uploads
(L{imgresume.server._admission.IncompleteQuota}): counted from the shared
storage, so that every server of a pool enforces one limit; refused with
QUOTA_EXCEEDED saying which limit; configurable.  In memory, over one
filesystem storage shared by two servers, and with two real C{twistd
imgresume} processes over one storage directory.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import zlib
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from imgresume.errors import ErrorCode
from imgresume.protocol import (
    Accepted,
    Completed,
    Data,
    Error,
    Hello,
    ServerLimits,
    Upload,
    encode,
)
from imgresume.server import UploadServerFactory
from imgresume.server._admission import IncompleteQuota
from imgresume.storage.filesystem import FilesystemStorage
from imgresume.storage.interfaces import IncompleteUploads
from imgresume.storage.memory import MemoryStorage
from imgresume.testing import wait_until_connectable
from tests.support.options import server_options
from tests.support.processes import child_env
from tests.support.runners import sync_run
from tests.support.wire import frames_written, new_decoder

CONTENT = b"scan" * 1000
SHA = hashlib.sha256(CONTENT).digest()
LIMITS = ServerLimits(max_payload=65536, chunk_size=4096, max_file_size=1 << 20)


class Server:
    """One server (factory) with a fake clock, and its connections' answers."""

    def __init__(self, storage: Any, **kw: Any) -> None:
        self.factory = UploadServerFactory(storage, "node", Clock(), limits=LIMITS, **kw)

    def connect(self, client_id: str = "scanner-7") -> tuple[Any, StringTransport]:
        proto = self.factory.buildProtocol(None)
        transport = StringTransport()
        proto.makeConnection(transport)
        proto.dataReceived(encode(Hello(client_id)))
        transport.clear()
        return proto, transport

    def upload(self, name: str, size: int = len(CONTENT), client_id: str = "scanner-7",
               walk_away: bool = True) -> Any:
        """Ask for an upload; its answer.  C{walk_away}: then drop the connection."""
        proto, transport = self.connect(client_id)
        proto.dataReceived(encode(Upload(name, size, SHA)))
        [answer] = frames_written(transport, new_decoder())
        if walk_away:
            proto.connectionLost(Failure(Exception("client went away")))
        return answer


class QuotaTests(SynchronousTestCase):
    """L{IncompleteQuota} on its own."""

    def test_count_limit(self) -> None:
        """At the count limit, the next upload is refused, saying which limit."""
        quota = IncompleteQuota(max_uploads=3, max_bytes=0)
        held = quota.hold("c", 10)
        self.assertIsNone(quota.refusal(held, IncompleteUploads(2, 100)))
        error = quota.refusal(held, IncompleteUploads(3, 100))
        self.assertEqual(error.code, ErrorCode.QUOTA_EXCEEDED)
        self.assertIn("has 3 incomplete uploads", error.message)
        self.assertIn("--max-incomplete-uploads-per-client 3", error.message)
        self.assertGreater(error.retry_after, 0)

    def test_bytes_limit(self) -> None:
        """Past the declared-bytes limit, refused, saying which limit and by how much."""
        quota = IncompleteQuota(max_uploads=0, max_bytes=1 << 30)
        held = quota.hold("c", 512 << 20)
        self.assertIsNone(quota.refusal(held, IncompleteUploads(5, 512 << 20)))
        error = quota.refusal(held, IncompleteUploads(5, (512 << 20) + 1))
        self.assertIn("--max-incomplete-bytes-per-client 1.0 GiB", error.message)
        self.assertIn("declare 512.0 MiB", error.message)

    def test_uploads_being_created_count(self) -> None:
        """Uploads this server is creating for the client count too, until released."""
        quota = IncompleteQuota(max_uploads=2, max_bytes=0)
        first, second = quota.hold("c", 1), quota.hold("c", 1)
        other_client = quota.hold("d", 1)
        self.assertIsNotNone(quota.refusal(second, IncompleteUploads(1, 1)))
        quota.release(first)
        self.assertIsNone(quota.refusal(second, IncompleteUploads(1, 1)))
        self.assertIsNone(quota.refusal(other_client, IncompleteUploads(1, 1)))

    def test_disabled(self) -> None:
        """0 and 0: no limit."""
        self.assertFalse(IncompleteQuota(0, 0).enabled)


class AdapterTests(SynchronousTestCase):
    """The server's answers to a client at its limits (memory storage)."""

    def test_abandoned_uploads_are_capped(self) -> None:
        """
        A client that opens uploads and walks away gets QUOTA_EXCEEDED once
        it has the most incomplete uploads it may; other clients do not; an
        upload finished frees a place.  The refusal is counted and told to
        the hooks like any refused upload.
        """
        storage = MemoryStorage()
        server = Server(storage, max_incomplete_uploads_per_client=3)
        for i in range(3):
            self.assertIsInstance(server.upload(f"{i}.tif"), Accepted)
        refused = server.upload("3.tif")
        self.assertEqual(refused.code, ErrorCode.QUOTA_EXCEEDED)
        self.assertIn("--max-incomplete-uploads-per-client 3", refused.message)
        self.assertIsInstance(server.upload("x.tif", client_id="other"), Accepted)
        failed = server.factory.metrics.uploads_failed.value(code="QUOTA_EXCEEDED")
        self.assertEqual(failed, 1)
        # Finish one: room for one more.
        proto, transport = server.connect()
        [upload_id] = [u.info.upload_id for u in storage._uploads.values()
                       if u.info.name == "0.tif"]
        from imgresume.protocol import Resume

        proto.dataReceived(encode(Resume(upload_id)))
        proto.dataReceived(encode(Data(0, zlib.crc32(CONTENT), CONTENT)))
        proto.dataReceived(encode(Data(len(CONTENT), 0, b"")))
        self.assertIsInstance(frames_written(transport, new_decoder())[-1], Completed)
        self.assertIsInstance(server.upload("4.tif"), Accepted)
        self.assertEqual(server.upload("5.tif").code, ErrorCode.QUOTA_EXCEEDED)

    def test_declared_bytes_capped(self) -> None:
        """The sizes incomplete uploads declare are capped too (default: 2 x max file size)."""
        server = Server(MemoryStorage())
        self.assertEqual(server.factory.incomplete.max_bytes, 2 * LIMITS.max_file_size)
        self.assertIsInstance(server.upload("a.tif", size=LIMITS.max_file_size), Accepted)
        self.assertIsInstance(server.upload("b.tif", size=LIMITS.max_file_size), Accepted)
        refused = server.upload("c.tif", size=1)
        self.assertEqual(refused.code, ErrorCode.QUOTA_EXCEEDED)
        self.assertIn("--max-incomplete-bytes-per-client 2.0 MiB", refused.message)

    def test_no_limit(self) -> None:
        """0 for both options: any number of incomplete uploads."""
        server = Server(MemoryStorage(), max_incomplete_uploads_per_client=0,
                        max_incomplete_bytes_per_client=0)
        for i in range(120):
            self.assertIsInstance(server.upload(f"{i}.tif", size=LIMITS.max_file_size),
                                  Accepted)

    def test_concurrent_requests_on_one_server(self) -> None:
        """
        Two UPLOADs of one client whose counts are asked at the same time
        are not both let past the limit.
        """
        storage = MemoryStorage()
        answers: list[Deferred] = []

        class SlowCounts:
            def __getattr__(self, name: str) -> Any:
                return getattr(storage, name)

            def incomplete_for(self, client_id: str, verify: bool = False) -> Deferred:
                d: Deferred = Deferred()
                answers.append((d, client_id, verify))
                return d

        server = Server(SlowCounts(), max_incomplete_uploads_per_client=1)
        (a, ta), (b, tb) = server.connect(), server.connect()
        a.dataReceived(encode(Upload("a.tif", len(CONTENT), SHA)))
        b.dataReceived(encode(Upload("b.tif", len(CONTENT), SHA)))
        while answers:
            d, client_id, verify = answers.pop(0)
            d.callback(self.successResultOf(storage.incomplete_for(client_id, verify)))
        results = [frames_written(t, new_decoder()) for t in (ta, tb)]
        kinds = sorted(type(r[0]).__name__ for r in results)
        self.assertEqual(kinds, ["Accepted", "Error"])
        self.assertEqual(len(storage._uploads), 1)


class SharedStorageTests(SynchronousTestCase):
    """Two servers over one storage directory enforce one limit."""

    def test_one_limit_for_the_pool(self) -> None:
        """Uploads abandoned on one server count on the other."""
        root = tempfile.mkdtemp(prefix="imgresume-test-")
        self.addCleanup(shutil.rmtree, root, True)
        a = Server(FilesystemStorage(root, sync_run, owner="a"),
                   max_incomplete_uploads_per_client=3)
        b = Server(FilesystemStorage(root, sync_run, owner="b"),
                   max_incomplete_uploads_per_client=3)
        self.assertIsInstance(a.upload("1.tif"), Accepted)
        self.assertIsInstance(b.upload("2.tif"), Accepted)
        self.assertIsInstance(a.upload("3.tif"), Accepted)
        self.assertEqual(b.upload("4.tif").code, ErrorCode.QUOTA_EXCEEDED)
        self.assertEqual(a.upload("4.tif").code, ErrorCode.QUOTA_EXCEEDED)

    def test_stale_entries_do_not_refuse(self) -> None:
        """
        An index entry left behind (its upload removed by hand, long ago)
        is dropped before a refusal: the upload is accepted.
        """
        root = tempfile.mkdtemp(prefix="imgresume-test-")
        self.addCleanup(shutil.rmtree, root, True)
        server = Server(FilesystemStorage(root, sync_run), max_incomplete_uploads_per_client=1)
        self.assertIsInstance(server.upload("1.tif"), Accepted)
        shutil.rmtree(os.path.join(root, "incoming"))
        entries = os.path.join(root, "clients", "c-scanner-7")
        for name in os.listdir(entries):
            os.utime(os.path.join(entries, name), (0, 0))
        self.assertIsInstance(server.upload("2.tif"), Accepted)


class TwistdTests(SynchronousTestCase):
    """Real C{twistd imgresume} processes over one storage directory, and the options."""

    def test_options(self) -> None:
        """The options parse, default, and refuse a bytes limit under --max-file-size."""
        options = server_options(self)
        self.assertEqual(options["max-incomplete-uploads-per-client"], 100)
        self.assertEqual(options["max-incomplete-bytes-per-client"], 2 << 40)
        options = server_options(self, "--max-file-size", "10G",
                                 "--max-incomplete-uploads-per-client", "0",
                                 "--max-incomplete-bytes-per-client", "1T")
        self.assertEqual((options["max-incomplete-uploads-per-client"],
                          options["max-incomplete-bytes-per-client"]), (0, 1 << 40))
        from twisted.python.usage import UsageError

        with self.assertRaises(UsageError):
            server_options(self, "--max-file-size", "10G",
                           "--max-incomplete-bytes-per-client", "1G")

    def test_two_servers_one_limit(self) -> None:
        """
        Two real servers over one storage directory, at most 2 incomplete
        uploads per client: a client that starts uploads on both and walks
        away is refused its third, on either, with QUOTA_EXCEEDED.
        """
        work = tempfile.mkdtemp(prefix="imgr-")
        self.addCleanup(shutil.rmtree, work, True)
        storage = os.path.join(work, "storage")
        os.mkdir(storage)
        socks = []
        for name in ("node-1", "node-2"):
            sock = os.path.join(work, f"{name}.sock")
            argv = [*twistd(), "-n", "--pidfile=", f"--logfile={name}.log", "imgresume",
                    "--listen", f"unix:{sock}", "--storage", storage, "--server-id", name,
                    "--max-incomplete-uploads-per-client", "2"]
            proc = subprocess.Popen(argv, env=child_env(), cwd=work)
            self.addCleanup(stop, proc)
            wait_until_connectable(sock, timeout=60, proc=proc)
            socks.append(sock)

        def upload(sock: str, name: str) -> Any:
            with socket.socket(socket.AF_UNIX) as s:
                s.settimeout(30)
                s.connect(sock)
                s.sendall(encode(Hello("walker")) + encode(Upload(name, 10, SHA)))
                decoder, frames = new_decoder(), []
                while len(frames) < 2:
                    decoder.feed(s.recv(65536))
                    while (frame := decoder.next_frame()) is not None:
                        frames.append(frame)
                return frames[1]

        self.assertIsInstance(upload(socks[0], "1.tif"), Accepted)
        self.assertIsInstance(upload(socks[1], "2.tif"), Accepted)
        for sock in socks:
            refused = upload(sock, "3.tif")
            self.assertIsInstance(refused, Error)
            self.assertEqual(refused.code, ErrorCode.QUOTA_EXCEEDED)
            self.assertIn("has 2 incomplete uploads", refused.message)


def twistd() -> list[str]:
    """The C{twistd} script the README runs (this interpreter's)."""
    import sys

    script = os.path.join(os.path.dirname(sys.executable), "twistd")
    if os.access(script, os.X_OK):
        return [script]
    return [sys.executable, "-c", "from twisted.scripts.twistd import run; run()"]


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

# -*- test-case-name: tests.server.test_startup -*-
"""
Errors that say what is wrong, on real C{twistd imgresume} (and
C{imgresume-lb}) processes started as the README does, with C{--logfile}:
a port already in use, a storage directory missing or not writable, an S3
storage without boto3 are each one line on stderr and a non-zero exit; a
full disk is logged with the upload it hit.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import zlib
from typing import Any

from twisted.internet.defer import fail
from twisted.internet.task import Clock
from twisted.internet.testing import EventLoggingObserver, StringTransport
from twisted.logger import LogLevel, formatEvent, globalLogPublisher
from twisted.trial.unittest import SkipTest, SynchronousTestCase

from imgresume.errors import ErrorCode, StorageFull
from imgresume.protocol import Data, Error, Hello, Upload, encode
from imgresume.server import UploadServerFactory
from imgresume.storage.memory import MemoryStorage
from imgresume.testing import free_tcp_port, wait_until_connectable
from tests.support.processes import child_env
from tests.support.wire import frames_written, new_decoder

#: Run twistd with boto3 impossible to import (as if the s3 extra were not installed).
WITHOUT_BOTO3 = """
import sys

class NoBoto3:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("boto3", "botocore"):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)

sys.meta_path.insert(0, NoBoto3())
from twisted.scripts.twistd import run
sys.argv[0] = "twistd"
run()
"""


def twistd() -> list[str]:
    """The C{twistd} script the README runs (this interpreter's)."""
    script = os.path.join(os.path.dirname(sys.executable), "twistd")
    if os.access(script, os.X_OK):
        return [script]
    return [sys.executable, "-c", "from twisted.scripts.twistd import run; run()"]


class ProcessCase(SynchronousTestCase):
    """Runs twistd in a fresh directory, as the README does (C{-n}, C{--logfile})."""

    def setUp(self) -> None:
        self.work = tempfile.mkdtemp(prefix="imgr-")
        os.chmod(self.work, 0o755)
        self.addCleanup(shutil.rmtree, self.work, True)
        self.storage = os.path.join(self.work, "storage")
        os.mkdir(self.storage)

    def run_twistd(self, *args: str, command: list[str] | None = None,
                   **kw: Any) -> subprocess.CompletedProcess:
        argv = [*(command or twistd()), "-n", "--pidfile=", "--logfile=node.log", *args]
        return subprocess.run(argv, env=child_env(), cwd=self.work, capture_output=True,
                              text=True, timeout=120, **kw)

    def log(self) -> str:
        path = os.path.join(self.work, "node.log")
        if not os.path.exists(path):
            return ""
        with open(path) as f:
            return f.read()

    def assertOneLine(self, proc: subprocess.CompletedProcess, expected: str) -> None:
        """Exit status non-zero; stderr is the message, with no traceback and no help text."""
        self.assertNotEqual(proc.returncode, 0)
        self.assertIn(expected, proc.stderr)
        self.assertEqual(len(proc.stderr.strip().splitlines()), 1, proc.stderr)
        self.assertNotIn("Traceback", proc.stderr + self.log())
        self.assertEqual(proc.stdout, "")


class PortInUseTests(ProcessCase):
    """A listen port already in use: one line on stderr, a non-zero exit."""

    def busy_port(self) -> int:
        holder = socket.socket()
        self.addCleanup(holder.close)
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        return holder.getsockname()[1]

    def test_server(self) -> None:
        """C{twistd imgresume --listen tcp:PORT} on a port in use."""
        port = self.busy_port()
        listen = f"tcp:{port}:interface=127.0.0.1"
        proc = self.run_twistd("imgresume", "--listen", listen, "--storage", self.storage,
                               "--skip-storage-check")
        message = f"cannot listen on {listen}: address already in use"
        self.assertOneLine(proc, f"imgresume: {message}")
        self.assertIn(message, self.log())

    def test_metrics(self) -> None:
        """The C{--metrics} endpoint of a server, on a port in use."""
        port = self.busy_port()
        metrics = f"tcp:{port}:interface=127.0.0.1"
        proc = self.run_twistd(
            "imgresume", "--listen", f"unix:{os.path.join(self.work, 's.sock')}",
            "--storage", self.storage, "--skip-storage-check", "--metrics", metrics)
        self.assertOneLine(proc, f"cannot listen on {metrics}: address already in use")

    def test_balancer(self) -> None:
        """C{twistd imgresume-lb --listen tcp:PORT} on a port in use."""
        port = self.busy_port()
        listen = f"tcp:{port}:interface=127.0.0.1"
        proc = self.run_twistd("imgresume-lb", "--listen", listen,
                               "--backend", f"tcp:127.0.0.1:{free_tcp_port()}")
        self.assertOneLine(proc, f"imgresume: cannot listen on {listen}: address already in use")


class StorageDirectoryTests(ProcessCase):
    """A storage directory the server cannot use: what is wrong, and how to fix it."""

    def test_missing(self) -> None:
        """A missing directory "does not exist" (not "not a directory"), even with skip."""
        missing = os.path.join(self.work, "missing")
        for extra in ((), ("--skip-storage-check",)):
            proc = self.run_twistd("imgresume", "--listen", "tcp:0:interface=127.0.0.1",
                                   "--storage", missing, *extra)
            self.assertOneLine(proc, f"{missing} does not exist; create it (mkdir -p {missing}")
            self.assertNotIn("not a directory", proc.stderr)

    def test_not_a_directory(self) -> None:
        """A file is "not a directory"."""
        path = os.path.join(self.work, "file")
        open(path, "w").close()
        proc = self.run_twistd("imgresume", "--listen", "tcp:0:interface=127.0.0.1",
                               "--storage", path)
        self.assertOneLine(proc, f"{path} is not a directory")

    def test_not_writable(self) -> None:
        """
        A directory the server's user cannot write in (another user's): the
        permission denied for that uid on that path, and how to fix it; no
        advice to skip the self-test (which would not help).
        """
        command = None
        uid = os.geteuid()
        if uid == 0:
            # Root writes anywhere: run twistd as root without the
            # capabilities that override file permissions.
            setpriv = shutil.which("setpriv")
            if setpriv is None:
                raise SkipTest("running as root without setpriv(1)")
            command = [setpriv, "--bounding-set", "-dac_override,-dac_read_search",
                       *twistd()]
            os.chown(self.storage, 12345, 12345)
        else:
            os.chmod(self.storage, 0o555)
            self.addCleanup(os.chmod, self.storage, 0o755)
        proc = self.run_twistd("imgresume", "--listen", "tcp:0:interface=127.0.0.1",
                               "--storage", self.storage, command=command)
        self.assertOneLine(proc, f"imgresume: --storage: permission denied for uid {uid} ")
        self.assertIn(f" on {self.storage} (owned by uid {os.stat(self.storage).st_uid}",
                      proc.stderr)
        self.assertRegex(proc.stderr, r"mode 0[57]55\); (make it writable for|give its owner)")
        self.assertNotIn("skip-storage-check", proc.stderr)

    def test_s3_without_boto3(self) -> None:
        """C{--storage s3://...} without boto3: the extra to install, no traceback."""
        proc = self.run_twistd(
            "imgresume", "--listen", "tcp:0:interface=127.0.0.1",
            "--storage", "s3://bucket/prefix", command=[sys.executable, "-c", WITHOUT_BOTO3])
        self.assertOneLine(
            proc, "imgresume: --storage s3://bucket/prefix: the S3 backend needs "
                  "`pip install 'imgresume[s3]'`")
        self.assertNotIn("ModuleNotFoundError", proc.stderr)


class DiskFullLogTests(SynchronousTestCase):
    """A full disk is logged with the upload it hit and what became of it."""

    def setUp(self) -> None:
        self.storage = MemoryStorage()
        self.factory = UploadServerFactory(self.storage, "node", Clock())
        self.log = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        self.proto = self.factory.buildProtocol(None)
        self.transport = StringTransport()
        self.proto.makeConnection(self.transport)
        self.proto.dataReceived(encode(Hello("scanner-7")))

    def warning(self) -> dict[str, Any]:
        [event] = [e for e in self.log if e["log_level"] == LogLevel.warn]
        return event

    def test_full_at_create(self) -> None:
        """No room to create the upload: its name, size and client, not "upload None"."""
        self.storage.create = lambda request: fail(StorageFull("no space left on device"))
        self.proto.dataReceived(encode(Upload("scan.tif", 200 << 20, b"\1" * 32)))
        event = self.warning()
        self.assertEqual(formatEvent(event),
                         "new upload scan.tif (200.0 MiB) by scanner-7: error STORAGE_FULL: "
                         "no space left on device")
        self.assertEqual((event["name"], event["client"], event["upload_id"]),
                         ("scan.tif", "scanner-7", None))

    def test_full_while_writing(self) -> None:
        """No room for a write: the upload's id, name, client and how far it is durable."""
        data = b"x" * 4096
        self.proto.dataReceived(encode(Upload("scan.tif", 3 * 4096, hashlib.sha256(
            data * 3).digest())))
        self.proto.dataReceived(encode(Data(0, zlib.crc32(data), data)))
        upload_id = self.proto.writer.info.upload_id
        self.proto.writer.write_batch = lambda chunks: fail(
            StorageFull("no space left on device"))
        self.proto.dataReceived(encode(Data(4096, zlib.crc32(data), data)))
        event = self.warning()
        self.assertEqual(formatEvent(event),
                         f"upload {upload_id} (scan.tif by scanner-7, 4.0 KiB of 12.0 KiB "
                         "durable): error STORAGE_FULL: no space left on device")
        self.assertEqual((event["upload_id"], event["offset"]), (upload_id, 4096))


class RealDiskFullTests(ProcessCase):
    """A real server whose storage fills up (a small tmpfs; root only)."""

    def setUp(self) -> None:
        super().setUp()
        if os.geteuid() != 0:
            raise SkipTest("mounting a small tmpfs needs root")
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs",
                                  self.storage], capture_output=True)
        if mounted.returncode != 0:
            raise SkipTest(f"cannot mount a tmpfs: {mounted.stderr!r}")
        self.addCleanup(subprocess.run, ["umount", "-l", self.storage])

    def test_log_names_the_upload(self) -> None:
        """
        The server logs which upload ran out of space, at what offset, and
        the error, instead of C{upload None error}.
        """
        sock = os.path.join(self.work, "s.sock")
        argv = [*twistd(), "-n", "--pidfile=", "--logfile=node.log", "imgresume",
                "--listen", f"unix:{sock}", "--storage", self.storage]
        proc = subprocess.Popen(argv, env=child_env(), cwd=self.work)
        self.addCleanup(lambda: proc.poll() is None and (proc.send_signal(signal.SIGTERM),
                                                         proc.wait()))
        wait_until_connectable(sock, timeout=60, proc=proc)
        chunk = os.urandom(256 * 1024)
        size = 16 * len(chunk)
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(30)
            s.connect(sock)
            s.sendall(encode(Hello("scanner-7")) + encode(Upload("big.tif", size, b"\1" * 32)))
            decoder = new_decoder(1 << 20)
            frames: list[Any] = []
            offset = 0
            while not any(isinstance(f, Error) for f in frames):
                if offset < size:
                    s.sendall(encode(Data(offset, zlib.crc32(chunk), chunk)))
                    offset += len(chunk)
                decoder.feed(s.recv(65536))
                while (frame := decoder.next_frame()) is not None:
                    frames.append(frame)
        [error] = [f for f in frames if isinstance(f, Error)]
        self.assertEqual(error.code, ErrorCode.STORAGE_FULL)
        upload_id = frames[1].upload_id
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
        [line] = [line for line in self.log().splitlines() if "STORAGE_FULL" in line]
        self.assertIn(f"upload {upload_id} (big.tif by scanner-7, ", line)
        self.assertIn("durable): error STORAGE_FULL: ", line)
        self.assertNotIn("upload None", self.log())

# -*- test-case-name: tests.client.test_portable -*-
"""
Tests for L{imgresume.client._portable} and for the client without POSIX
(L{tests.support.portable}, which approximates Windows and macOS on
Linux): positional reads without C{os.pread} from several threads, flushes
without C{fdatasync} or C{O_DIRECTORY}, the fixture itself, and a real
upload over TCP loopback by C{imgresume upload} in a child process that
cannot import C{fcntl} and lacks C{os.pread}, C{os.posix_fadvise},
C{os.fdatasync}, C{os.O_CLOEXEC} and the POSIX-only signals.
"""

from __future__ import annotations

import hashlib
import os
import random
import socket
import sys
import threading

from twisted.trial.unittest import SkipTest, SynchronousTestCase, TestCase

from imgresume import keys
from imgresume.client import _portable
from imgresume.client._portable import PositionalReader, flush_data, fsync_directory
from tests.support import portable
from tests.support.processes import TwistdServer, child_env, run_python


def posix_test(test: TestCase) -> None:
    """Skip C{test}, which needs this process's POSIX, under C{IMGRESUME_TEST_HIDE_POSIX=1}."""
    if portable.active:
        raise SkipTest("needs POSIX in the test process (the run hides it from the client)")


class PositionalReaderTests(SynchronousTestCase):
    """Reads at an offset, with and without C{os.pread}."""

    def setUp(self) -> None:
        self.path = self.mktemp()
        self.content = random.Random(1).randbytes(1 << 20)
        with open(self.path, "wb") as f:
            f.write(self.content)
        self.fd = os.open(self.path, os.O_RDONLY | _portable.OPEN_FLAGS)
        self.addCleanup(os.close, self.fd)

    def test_without_pread_threads(self) -> None:
        """
        Without C{os.pread} (Windows), eight threads reading at their own
        offsets of one descriptor each get their own bytes: the seek and
        the read go together under the reader's lock.
        """
        reader = PositionalReader(self.fd)
        reader._pread = None
        errors: list[str] = []

        def work(seed: int) -> None:
            rng = random.Random(seed)
            for _ in range(300):
                offset, length = rng.randrange(len(self.content)), rng.randrange(1, 9000)
                if reader.read(length, offset) != self.content[offset:offset + length]:
                    errors.append(f"{offset}+{length}")

        threads = [threading.Thread(target=work, args=(seed,)) for seed in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        self.assertEqual(errors, [])
        self.assertEqual(reader.read(10, len(self.content) - 4), self.content[-4:])

    def test_pread_used(self) -> None:
        """Where there is C{os.pread}, it is what reads (the position is never moved)."""
        posix_test(self)
        reader = PositionalReader(self.fd)
        self.assertEqual(reader.read(5, 100), self.content[100:105])
        self.assertEqual(os.lseek(self.fd, 0, os.SEEK_CUR), 0)


class FlushTests(SynchronousTestCase):
    """Flushing on systems without C{fdatasync} or C{O_DIRECTORY}."""

    def test_flush_data_fsync(self) -> None:
        """Without C{os.fdatasync} (macOS, Windows), C{os.fsync} flushes the data."""
        posix_test(self)
        calls: list[str] = []
        self.patch(os, "fsync", lambda fd: calls.append("fsync"))
        self.patch(os, "fdatasync", lambda fd: calls.append("fdatasync"))
        flush_data(0)
        self.patch(_portable, "os", portable.PORTABLE_OS)
        flush_data(0)
        self.assertEqual(calls, ["fdatasync", "fsync"])

    def test_directory_without_o_directory(self) -> None:
        """Without C{O_DIRECTORY}, a directory is still opened and flushed; no error."""
        self.patch(_portable, "os", portable.PORTABLE_OS)
        fsync_directory(os.path.abspath(self.mktemp()))  # missing: nothing done
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        fsync_directory(directory)


class FixtureTests(SynchronousTestCase):
    """L{tests.support.portable.hide_posix} hides what it says, from whom it says."""

    def test_hidden(self) -> None:
        """
        A client-side module cannot import C{fcntl} or C{from os import
        pread}, and its C{os} lacks C{pread}; another module is untouched.
        """
        posix_test(self)
        undo = portable.hide_posix()
        self.addCleanup(undo)
        client = {"__name__": "imgresume.client._example"}
        with self.assertRaises(ImportError):
            exec("import fcntl", client)
        with self.assertRaises(ImportError):
            exec("from os import pread", client)
        exec("import os, signal", client)
        self.assertFalse(hasattr(client["os"], "pread"))
        self.assertFalse(hasattr(client["os"], "posix_fadvise"))
        self.assertFalse(hasattr(client["signal"], "SIGHUP"))
        self.assertEqual(client["signal"].SIGTERM, 15)
        server = {"__name__": "imgresume.storage.filesystem._example"}
        exec("import fcntl, os", server)
        self.assertTrue(hasattr(server["os"], "pread"))
        operator = {"__name__": "imgresume.cli._keys"}
        exec("import fcntl", operator)

    def test_keys_module(self) -> None:
        """C{imgresume.keys} (whose C{read_key} the client uses) imports no C{fcntl}."""
        posix_test(self)
        with open(keys.__file__, encoding="utf-8") as f:
            source = f.read()
        module = {"__name__": "imgresume.keys", "__file__": keys.__file__}
        undo = portable.hide_posix()
        self.addCleanup(undo)
        exec(compile(source, keys.__file__, "exec"), module)
        path = self.mktemp()
        with open(path, "w") as f:
            f.write("ab" * 32 + "\n")
        self.assertEqual(module["read_key"](path), b"\xab" * 32)


class _TcpTwistdServer(TwistdServer):
    """A real server on TCP loopback (Windows has no UNIX sockets to connect to)."""

    def __init__(self, test: TestCase, *options: str) -> None:
        super().__init__(test, *options)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.endpoint = f"tcp:{self.port}:interface=127.0.0.1"

    def _accepts(self) -> bool:
        with socket.socket() as s:
            try:
                s.connect(("127.0.0.1", self.port))
            except OSError:
                return False
        return True


class LoopbackUploadTests(TestCase):
    """C{imgresume upload} without POSIX, in a child process, to a real server."""

    timeout = 120

    def setUp(self) -> None:
        posix_test(self)  # the test makes the key file; the child hides POSIX itself

    async def test_upload(self) -> None:
        """
        A small file (one PUT) and a 9 MiB one (UPLOAD, read in chunks and
        hashed), with a key file and the journal, uploaded over TCP by a
        client that cannot import C{fcntl} and lacks C{os.pread},
        C{os.fdatasync}, C{os.O_CLOEXEC}, C{O_DIRECTORY} and POSIX-only
        signals: both stored byte for byte, exit 0.
        """
        work = os.path.abspath(self.mktemp())
        os.makedirs(work)
        keyfile = os.path.join(work, "keys.json")
        key = keys.add_client(keyfile, "scanner-7")
        with open(os.path.join(work, "scanner-7.key"), "w") as f:
            f.write(key.hex() + "\n")
        server = await _TcpTwistdServer(self, "--keys", keyfile).start()
        files = {}
        for name, size in (("small.tif", 3000), ("big.tif", 9 * 1024 * 1024 + 17)):
            files[name] = random.Random(size).randbytes(size)
            with open(os.path.join(work, name), "wb") as f:
                f.write(files[name])
        out, err, code = await run_python(
            ["-m", "tests.support.portable", "imgresume", "upload",
             "--to", f"tcp:127.0.0.1:{server.port}", "--client-id", "scanner-7",
             "--key-file", os.path.join(work, "scanner-7.key"), "--chunk-size", "256K",
             os.path.join(work, "small.tif"), os.path.join(work, "big.tif")],
            child_env(XDG_STATE_HOME=os.path.join(work, "state"),
                      XDG_CONFIG_HOME=os.path.join(work, "config")), timeout=90)
        self.assertEqual(code, 0, f"{out}\n{err}\n{server.log()}")
        self.assertTrue(os.path.exists(os.path.join(work, "state", "imgresume")))
        for name, content in files.items():
            with open(os.path.join(server.storage, "complete", name), "rb") as f:
                stored = f.read()
            self.assertEqual(hashlib.sha256(stored).hexdigest(),
                             hashlib.sha256(content).hexdigest(), name)

    def test_fixture_in_child(self) -> None:
        """The child's fixture really hides C{fcntl} from the client (a sanity check)."""
        import subprocess

        code = ("import imgresume.client._source as s; import os\n"
                "assert not hasattr(s.os, 'pread'), 'pread visible'\n"
                "exec('import fcntl', {'__name__': 'imgresume.client.x'})\n")
        done = subprocess.run([sys.executable, "-m", "tests.support.portable", "-c", code],
                              env=child_env(), capture_output=True, text=True, timeout=60)
        self.assertNotEqual(done.returncode, 0)
        self.assertIn("No module named 'fcntl' (hidden by tests.support.portable",
                      done.stderr)

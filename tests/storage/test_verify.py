# -*- test-case-name: tests.storage.test_verify -*-
"""
Tests for where a filesystem storage's completion digest comes from
(C{FilesystemStorage(verify=...)}, C{twistd imgresume --verify}): read back
from the stored bytes (C{stored}, the default) or hashed from the bytes as
they are written (C{received}), and the upload's digest algorithm either way.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from typing import Any

from twisted.python.usage import UsageError
from twisted.trial.unittest import SynchronousTestCase

from imgresume import integrity
from imgresume.errors import DigestMismatch, Incomplete
from imgresume.server.tap import Options
from imgresume.storage.filesystem import VERIFY_MODES, FilesystemStorage
from imgresume.storage.interfaces import Chunk, NewUpload
from tests.support.runners import sync_run

PAYLOAD = os.urandom(300_000)


class VerifyTests(SynchronousTestCase):
    """Both modes over one storage directory, driven synchronously."""

    def setUp(self) -> None:
        self.root = tempfile.mkdtemp(prefix="imgresume-test-")
        self.addCleanup(shutil.rmtree, self.root, True)
        self.timings: list[str] = []

    def storage(self, verify: str) -> FilesystemStorage:
        return FilesystemStorage(self.root, sync_run, verify=verify,
                                 timings=lambda what, seconds: self.timings.append(what))

    def create(self, storage: FilesystemStorage, digest: str = "blake3",
               declared: bytes = PAYLOAD) -> Any:
        return self.successResultOf(storage.create(NewUpload(
            "a.tif", len(PAYLOAD), integrity.digest_of(digest, declared), {}, "c",
            digest=digest, checksum="crc32c")))

    def write(self, writer: Any, start: int, end: int) -> None:
        chunks = [Chunk(offset, PAYLOAD[offset:offset + 65536],
                        integrity.checksum("crc32c", PAYLOAD[offset:offset + 65536]), "crc32c")
                  for offset in range(start, end, 65536)]
        chunks[-1] = Chunk(chunks[-1].offset, PAYLOAD[chunks[-1].offset:end])
        self.successResultOf(writer.write_batch(chunks))

    def test_modes(self) -> None:
        """stored (the default) and received; anything else is refused."""
        self.assertEqual(VERIFY_MODES, ("stored", "received"))
        self.assertRaises(ValueError, FilesystemStorage, self.root, verify="never")

    def test_stored_reads_back(self) -> None:
        """By default every byte is read back before completion."""
        writer = self.create(self.storage("stored"))
        self.write(writer, 0, len(PAYLOAD))
        done = self.successResultOf(writer.complete())
        self.assertEqual(done.sha256, integrity.digest_of("blake3", PAYLOAD))
        self.assertIn("verify", self.timings)

    def test_received_reads_nothing(self) -> None:
        """With received, the bytes are hashed as written: no read-back at all."""
        for digest in integrity.DIGESTS:
            writer = self.create(self.storage("received"), digest)
            self.write(writer, 0, len(PAYLOAD))
            done = self.successResultOf(writer.complete())
            self.assertEqual((done.sha256, done.digest),
                             (integrity.digest_of(digest, PAYLOAD), digest))
        self.assertNotIn("verify", self.timings)

    def test_received_still_refuses_other_bytes(self) -> None:
        """A file that changed under the client is refused as before (DIGEST_MISMATCH)."""
        other = bytes(len(PAYLOAD))
        writer = self.create(self.storage("received"), declared=other)
        self.write(writer, 0, len(PAYLOAD))
        self.failureResultOf(writer.complete(), DigestMismatch)

    def test_received_resume_reads_the_prefix_back(self) -> None:
        """A resumed upload's prefix, received elsewhere, is read back; the rest is not."""
        first = self.create(self.storage("received"))
        self.write(first, 0, 100_000)
        self.successResultOf(first.release())
        self.assertNotIn("verify", self.timings)
        second = self.successResultOf(self.storage("received").resume(first.info.upload_id))
        self.assertEqual(second.offset, 100_000)
        self.write(second, 100_000, len(PAYLOAD))
        done = self.successResultOf(second.complete())
        self.assertEqual(done.sha256, integrity.digest_of("blake3", PAYLOAD))
        self.assertEqual(self.timings.count("verify"), 1)  # the prefix, once

    def test_received_does_not_see_the_disk(self) -> None:
        """
        The trade-off: bytes changed on the storage after they were written
        (a faulty disk) are not seen by received, which hashed what it was
        given; stored reads them back and cuts the upload back to them.
        """
        for verify in VERIFY_MODES:
            writer = self.create(self.storage(verify))
            self.write(writer, 0, len(PAYLOAD))
            upload = os.path.join(self.root, "incoming", writer.info.upload_id, "data")
            if verify == "stored":
                # Synchronous here, the read-back ran at each write: as if
                # it had not yet, it reads the file again from byte 0.
                writer._readback.reset(0)
            with open(upload, "r+b") as f:
                f.write(b"\0" * 10)
            d = writer.complete()
            if verify == "received":
                self.assertEqual(self.successResultOf(d).sha256,
                                 integrity.digest_of("blake3", PAYLOAD))
            else:
                self.failureResultOf(d, Incomplete)  # resend from the bad range


class OptionTests(SynchronousTestCase):
    """C{twistd imgresume --verify}."""

    def parse(self, *args: str) -> Options:
        root = tempfile.mkdtemp(prefix="imgresume-test-")
        self.addCleanup(shutil.rmtree, root, True)
        options = Options()
        options.parseOptions(["--storage", root, *args])
        return options

    def test_default(self) -> None:
        """stored unless told otherwise."""
        self.assertEqual(self.parse()["verify"], "stored")
        self.assertEqual(self.parse("--verify", "received")["verify"], "received")

    def test_refused(self) -> None:
        """Another value, or received with S3 storage, is a usage error."""
        self.assertRaises(UsageError, self.parse, "--verify", "sometimes")
        options = Options()
        self.assertRaises(UsageError, options.parseOptions,
                          ["--storage", "s3://bucket/prefix", "--verify", "received"])

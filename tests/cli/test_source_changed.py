# -*- test-case-name: tests.cli.test_source_changed -*-
"""
A source that changes during the upload is never stored and reported
verified (issue 12, item 2), on real processes: the real C{python -m
imgresume upload} against a real C{twistd imgresume}, while the test
appends to the local file, rewrites bytes not yet sent, or rewrites bytes
already sent and sets the modification time back.  Each time the file
fails with "source changed during upload" and exit code 3, and nothing is
published under C{complete/}.
"""

from __future__ import annotations

import json
import os
import random
from typing import Callable

from twisted.trial.unittest import TestCase

from tests.support.processes import (
    PythonChild,
    TwistdServer,
    child_env,
    incoming_bytes,
    wait_until,
)

MiB = 1024 * 1024
#: Small packets, one in flight: a transfer slow enough to change the file under.
SLOW = ("--chunk-size", "16K", "--window", "1")

#: The file uploaded: seconds of sending left after the 4 MiB the last
#: test waits for, even on a fast machine.
SIZE = 8 * MiB


class SourceChangedTests(TestCase):
    """C{imgresume upload} of a file that changes while it is sent."""

    timeout = 120

    async def upload_while(self, change: Callable[[str], None],
                           after: int) -> tuple[int | None, dict, str]:
        """
        Upload a file of L{SIZE} with --json; once the server holds C{after}
        bytes of it, call C{change(path)}.  The exit code, the JSON object,
        stderr.
        """
        self.server = server = await TwistdServer(self).start()
        work = os.path.abspath(self.mktemp())
        os.makedirs(work)
        path = os.path.join(work, "scan.tif")
        with open(path, "wb") as f:
            f.write(random.Random(5).randbytes(SIZE))
        child = PythonChild(
            ["-m", "imgresume", "upload", "--to", server.endpoint, "--json", "--no-journal",
             *SLOW, path], child_env())
        await wait_until(lambda: incoming_bytes(server.storage) >= after
                         or child.proto.ended.called, what=f"{after} bytes stored")
        self.assertFalse(child.proto.ended.called, child.err)
        change(path)
        code = await child.ended()
        [row] = [json.loads(line) for line in child.out.splitlines()]
        return code, row, child.err

    def assertChanged(self, code: int | None, row: dict, err: str, detail: str) -> None:
        """Exit code 3, the file failed as a changed source saying C{detail}; nothing published."""
        self.assertEqual(code, 3, err)
        self.assertEqual((row["status"], row["cause"]), ("failed", "SourceChanged"))
        self.assertIn("scan.tif: source changed during upload: ", row["error"])
        self.assertIn(detail, row["error"])
        self.assertIn("source changed during upload", err)
        complete = os.path.join(self.server.storage, "complete")
        self.assertEqual(os.listdir(complete) if os.path.isdir(complete) else [], [])

    async def test_appended(self) -> None:
        """
        A file appended to mid-upload (the case of the issue: it was stored
        cut to its first size and reported verified, exit 0).
        """
        def append(path: str) -> None:
            with open(path, "ab") as f:
                f.write(os.urandom(MiB))

        code, row, err = await self.upload_while(append, after=MiB)
        self.assertChanged(code, row, err, f"it grew from {SIZE} to {SIZE + MiB} bytes")

    async def test_rewritten_ahead(self) -> None:
        """
        Bytes not yet sent rewritten in place (the size stays): caught
        before the digest is sent, not left to the server's digest check.
        """
        def rewrite(path: str) -> None:
            with open(path, "r+b") as f:
                f.seek(6 * MiB)
                f.write(os.urandom(MiB))

        code, row, err = await self.upload_while(rewrite, after=MiB)
        self.assertChanged(code, row, err, "it was modified")

    async def test_rewritten_behind_mtime_restored(self) -> None:
        """
        Bytes already sent rewritten in place and the modification time set
        back (as C{touch -d} or a careless copy tool would): the
        status-change time betrays it.  Before, the stored file was the old
        bytes, reported verified.
        """
        def rewrite(path: str) -> None:
            st = os.stat(path)
            with open(path, "r+b") as f:
                f.write(os.urandom(MiB))
            os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))

        code, row, err = await self.upload_while(rewrite, after=4 * MiB)
        self.assertChanged(code, row, err, "status-change time changed")

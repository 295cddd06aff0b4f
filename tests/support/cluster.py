"""
Helpers for tests on clusters of real processes (L{imgresume.testing}):
files of random bytes with their digests, and a progress callback that
SIGKILLs the server an upload is going through.
"""

from __future__ import annotations

import hashlib
import os
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from imgresume.client import Progress


def write_random(path: str, size: int) -> str:
    """Write C{size} random bytes to C{path}; return their SHA-256 in hex."""
    data = os.urandom(size)
    with open(path, "wb") as f:
        f.write(data)
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str) -> str:
    """The SHA-256 of the file at C{path}, in hex, read 1 MiB at a time."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


class KillServingServer:
    """
    A progress callback for L{imgresume.client.Uploader.upload}: once the
    upload has sent more than C{after} bytes, SIGKILL the server it is going
    through (C{cluster.kill(server_id)}), once.  L{killed} names it.
    """

    def __init__(self, cluster: Any, after: int) -> None:
        self.cluster = cluster
        self.after = after
        self.killed: list[str] = []

    def __call__(self, p: Progress) -> None:
        if (not self.killed and p.phase == "uploading" and p.server_id
                and p.done > self.after):
            self.killed.append(p.server_id)
            self.cluster.kill(p.server_id)

    def check(self, test: Any, result: Any) -> None:
        """
        C{test} asserts that one server was killed, that the upload
        (C{result}) started on it, and that it never went back to it.
        """
        test.assertEqual(len(self.killed), 1)
        test.assertEqual(result.servers[0], self.killed[0])
        test.assertNotIn(self.killed[0], result.servers[1:])

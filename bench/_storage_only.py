"""
The server's storage path alone, without network, reactor or threads: a
C{FilesystemStorage} with a synchronous runner stores SRC in 1 MiB writes
(each: pwrite, fdatasync, journal record pwrite, fdatasync), then completes
it (read-back of the stored file and its digest, rename into place).  The
upload's digest is DIGEST (default: the client's default, BLAKE3) and its
journal records carry the default checksum (CRC-32C), as for an upload from
a client of this version.  What the server could reach per stream if the
protocol and the reactor cost nothing.

  python -m bench._storage_only SRC STORAGE_DIR [CHUNK_BYTES [DIGEST]]

Prints one JSON line: seconds for the writes and for the completion, the
median per write, and the time spent in the writer's pwrite and fdatasync
calls (timed by wrapping the writer's C{_pwrite} / C{_fdatasync} hooks).
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time
from typing import Any

from twisted.internet import defer


def _cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def _now(d: defer.Deferred) -> Any:
    """The result of a Deferred that has already fired (the runner is synchronous)."""
    box: list[Any] = []
    d.addBoth(box.append)
    if not box:
        raise RuntimeError("the storage call did not complete synchronously")
    if isinstance(box[0], Exception) or hasattr(box[0], "raiseException"):
        box[0].raiseException()
    return box[0]


def main(argv: list[str]) -> None:
    from imgresume import integrity
    from imgresume.storage.filesystem import FilesystemStorage
    from imgresume.storage.interfaces import NewUpload

    src, root = argv[0], argv[1]
    chunk = int(argv[2]) if len(argv) > 2 else 1 << 20
    digest = argv[3] if len(argv) > 3 else integrity.DEFAULT_DIGEST
    size = os.path.getsize(src)
    fd = os.open(src, os.O_RDONLY)
    h = integrity.new_digest(digest)
    for off in range(0, size, 4 << 20):
        h.update(os.pread(fd, 4 << 20, off))
    storage = FilesystemStorage(root, run=lambda f, *a, **k: defer.maybeDeferred(f, *a, **k),
                                owner="bench")
    spent = {"pwrite": 0.0, "fdatasync": 0.0}

    def timed(name: str, f: Any) -> Any:
        def call(*args: Any) -> Any:
            t = time.perf_counter()
            try:
                return f(*args)
            finally:
                spent[name] += time.perf_counter() - t

        return call

    cpu0 = _cpu()
    t0 = time.monotonic()
    writer = _now(storage.create(NewUpload("storage-only.bin", size, h.digest(), {}, "bench",
                                           digest=digest,
                                           checksum=integrity.DEFAULT_CHECKSUM)))
    writer._pwrite = timed("pwrite", writer._pwrite)
    writer._fdatasync = timed("fdatasync", writer._fdatasync)
    per_write = []
    for off in range(0, size, chunk):
        data = os.pread(fd, chunk, off)
        t = time.perf_counter()
        _now(writer.write(off, data))
        per_write.append(time.perf_counter() - t)
    t1 = time.monotonic()
    _now(writer.complete())
    t2 = time.monotonic()
    os.close(fd)
    per_write.sort()
    print(json.dumps({
        "bytes": size, "chunk": chunk, "writes": len(per_write),
        "write_seconds": t1 - t0, "complete_seconds": t2 - t1, "seconds": t2 - t0,
        "write_ms_median": 1e3 * per_write[len(per_write) // 2],
        "pwrite_seconds": spent["pwrite"], "fdatasync_seconds": spent["fdatasync"],
        "cpu": _cpu() - cpu0,
    }), flush=True)


if __name__ == "__main__":
    if len(sys.argv) not in (3, 4, 5):
        sys.exit(__doc__)
    main(sys.argv[1:])

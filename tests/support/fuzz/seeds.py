"""
Write the seed corpus: the bytes a real client sends in a handful of
sessions (fresh upload, resume, ping, errors), captured from the sans-IO
client.  Run once with C{python -m tests.support.fuzz.seeds}; the files are kept in git.
"""

from __future__ import annotations

import hashlib
import os
import zlib

from imgresume.protocol import Data, Hello, Ping, Resume, Upload, encode

CORPUS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "corpus")


def sessions() -> dict[str, bytes]:
    payload = bytes(range(256)) * 12
    sha = hashlib.sha256(payload).digest()

    def data(offset: int, chunk: bytes) -> bytes:
        return encode(Data(offset, zlib.crc32(chunk), chunk))

    hello = encode(Hello("fuzz-client"))
    fresh = hello + encode(Upload("scans/a.tif", len(payload), sha, {"dpi": "600"}))
    for off in range(0, len(payload), 1024):
        fresh += data(off, payload[off : off + 1024])
    fresh += data(len(payload), b"")
    return {
        "fresh-upload": fresh,
        "two-uploads": fresh + encode(Upload("b.tif", 0, hashlib.sha256(b"").digest()))
        + data(0, b""),
        "resume-unknown": hello + encode(Resume("00" * 16)) + encode(Ping(7)),
        "bad-offset": hello + encode(Upload("c.tif", 10, sha)) + data(5, b"xxxxx"),
        "bad-crc": hello + encode(Upload("d.tif", 3, sha))
        + encode(Data(0, 1234, b"abc")),
        "path-trick": hello + encode(Upload("../../etc/passwd", 3, sha)),
        "early-finish": hello + encode(Upload("e.tif", 3, sha)) + data(0, b""),
    }


def main() -> None:
    for target in ("server", "decoder"):
        os.makedirs(os.path.join(CORPUS, target), exist_ok=True)
        for name, raw in sessions().items():
            with open(os.path.join(CORPUS, target, f"seed-{name}"), "wb") as f:
                f.write(raw)


if __name__ == "__main__":
    main()

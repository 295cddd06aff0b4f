"""
The worked examples in docs/protocol.md are real: every hex block decodes to
the frame its caption names and re-encodes to the same bytes.
"""

import hashlib
import os
import re
import zlib

from twisted.trial.unittest import SynchronousTestCase

from imgresume.protocol import FrameDecoder, encode
from imgresume.protocol._decoder import control_limit
from tests.support.processes import REPO_ROOT

DOC = os.path.join(REPO_ROOT, "docs", "protocol.md")
CAPTION = re.compile(r"^(C->S|S->C) ([A-Z]+)")


def examples() -> list[tuple[str, bytes]]:
    """(frame name, bytes) for every captioned hex block in section 7."""
    text = open(DOC, encoding="utf-8").read()
    section = text[text.index("## 7. Worked examples"):]
    out: list[tuple[str, bytearray]] = []
    for block in re.findall(r"```\n(.*?)```", section, re.S):
        for line in block.splitlines():
            m = CAPTION.match(line)
            if m:
                out.append((m.group(2), bytearray()))
            elif line.strip():
                out[-1][1].extend(bytes.fromhex(line))
    return [(name, bytes(raw)) for name, raw in out]


class WorkedExampleTests(SynchronousTestCase):
    def test_every_block_round_trips(self) -> None:
        """Each hex block is exactly one frame of the captioned type."""
        found = examples()
        self.assertEqual(len(found), 17)
        for name, raw in found:
            decoder = FrameDecoder(control_limit(4 << 20))
            decoder.feed(raw)
            frame = decoder.next_frame()
            self.assertEqual(type(frame).__name__.upper(), name)
            self.assertEqual(decoder.buffered, 0, name)
            self.assertEqual(encode(frame), raw, name)

    def test_example_values(self) -> None:
        """The example's file, digests and CRCs are the ones the text states."""
        content = bytes.fromhex("49492a00000000000000")
        frames = {}
        for name, raw in examples():
            decoder = FrameDecoder(control_limit(4 << 20))
            decoder.feed(raw)
            frames.setdefault(name, []).append(decoder.next_frame())
        sha = hashlib.sha256(content).digest()
        self.assertEqual(frames["UPLOAD"][0].sha256, sha)
        self.assertEqual(frames["UPLOAD"][0].metadata, {"dpi": "600"})
        first, second, final = frames["DATA"][:3]
        self.assertEqual(first.payload + second.payload, content)
        self.assertEqual(first.crc32, zlib.crc32(first.payload))
        self.assertEqual(second.crc32, zlib.crc32(second.payload))
        self.assertEqual((final.offset, final.payload), (10, b""))
        resumed = frames["ACCEPTED"][1]
        self.assertEqual(resumed.offset, 6)
        self.assertEqual(resumed.tail_sha256, hashlib.sha256(content[:6]).digest())
        self.assertEqual(frames["COMPLETED"][0].path, "complete/scans/a.tif")
        self.assertEqual(frames["ERROR"][0].offset, 6)
        late = frames["UPLOAD"][1]
        self.assertEqual((late.size, late.sha256), (10, None))  # 32 zero bytes
        self.assertEqual(frames["FINISH"][0].sha256, sha)

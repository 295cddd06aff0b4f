"""
Fuzz targets: bytes from a hostile client fed to the frame decoder and to a
whole server connection (sans-IO machine, Twisted adapter and memory
storage).  Used by the atheris runner (C{python -m tests.support.fuzz.run}) and by the
hypothesis tests in C{tests/protocol/test_fuzz.py}.

A target raises only when it finds a bug: an exception other than the
protocol's own errors, an unhandled error logged by the server, or a broken
invariant (output that is not whole frames, an ERROR frame that is not the
last thing on a closed connection, a stored file that is not what was sent).
"""

from __future__ import annotations

import hashlib

from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import globalLogPublisher
from twisted.python.failure import Failure

from imgresume.errors import ImgresumeError
from imgresume.protocol import (
    Completed,
    Error,
    FrameDecoder,
    ServerLimits,
)
from imgresume.protocol._decoder import control_limit
from imgresume.server import UploadServerFactory
from imgresume.storage.memory import MemoryStorage

LIMITS = ServerLimits(max_payload=4096, chunk_size=1024, max_file_size=1 << 20)


def decode_all(data: bytes) -> None:
    """The decoder only ever returns frames or raises ImgresumeError."""
    decoder = FrameDecoder(control_limit(4096))
    decoder.feed(data)
    try:
        while decoder.next_frame() is not None:
            pass
    except ImgresumeError:
        pass


class _Failures:
    def __init__(self) -> None:
        self.failures: list[Failure] = []

    def __call__(self, event: dict) -> None:
        if "log_failure" in event:
            self.failures.append(event["log_failure"])


def server_session(data: bytes) -> None:
    """
    Feed C{data} to a server connection, cut into pieces whose sizes come
    from the data itself, and check what comes out.
    """
    storage = MemoryStorage()
    clock = Clock()
    factory = UploadServerFactory(storage, "fuzz", clock, limits=LIMITS,
                                  takeover_check_interval=0)
    proto = factory.buildProtocol(None)
    transport = StringTransport()
    observer = _Failures()
    globalLogPublisher.addObserver(observer)
    try:
        proto.makeConnection(transport)
        pos, step = 0, 1
        while pos < len(data):
            size = 1 + (data[pos] % 64) * step
            step = step % 7 + 1
            proto.dataReceived(data[pos : pos + size])
            pos += size
        clock.advance(1)
        proto.connectionLost(Failure(ConnectionError("fuzz input ended")))
        clock.advance(10)
    finally:
        globalLogPublisher.removeObserver(observer)
    if observer.failures:
        raise AssertionError(f"unhandled error in the server: {observer.failures[0]!r}")
    out = FrameDecoder(control_limit(1 << 20))
    out.feed(transport.value())
    frames = []
    while (frame := out.next_frame()) is not None:
        frames.append(frame)
    if out.buffered:
        raise AssertionError("the server wrote a partial frame")
    for i, frame in enumerate(frames):
        if isinstance(frame, Error) and frame.code < 0x0100 and i != len(frames) - 1:
            raise AssertionError(f"frames after a connection-ending error: {frames[i:]}")
        if isinstance(frame, Completed):
            stored = storage.read_completed(frame.path)
            if hashlib.sha256(stored).digest() != frame.sha256 or len(stored) != frame.size:
                raise AssertionError("COMPLETED for bytes that do not match")
    if factory.connections:
        raise AssertionError("a closed connection is still registered")

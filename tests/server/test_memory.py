"""
A server's memory for received data: L{FrameCursor} follows frame boundaries
without keeping bytes, and the server-wide limit lets a frame in only once
there is room for all of it, wakes waiting connections in order, lets a
stalled connection read ahead only one largest payload, and takes back what
a lost connection held; C{--max-data-memory} sets the limit.
"""

from __future__ import annotations

import hashlib
import os
from typing import Any

from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python import usage
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from imgresume.errors import ErrorCode
from imgresume.protocol import (
    Ack,
    FrameType,
    Hello,
    Ping,
    Pong,
    ServerLimits,
    Upload,
    encode,
)
from imgresume.protocol._decoder import FrameCursor, control_limit
from imgresume.server import UploadServerFactory
from imgresume.server._factory import DATA_MEMORY
from imgresume.server.tap import Options, makeService
from imgresume.storage.memory import MemoryStorage
from tests.support.storages import SlowStorage
from tests.support.wire import data_frame as data
from tests.support.wire import frames_written

PAYLOAD = bytes(range(256)) * 512  # 128 KiB: frames bigger than SMALL_FRAME
P = len(PAYLOAD)
FRAME = len(data(0, PAYLOAD))


class FrameCursorTests(SynchronousTestCase):
    """L{FrameCursor}: frame boundaries without the bytes."""

    def test_follows_frames_however_split(self) -> None:
        """
        Fed a stream in pieces of any size, the cursor counts the frames
        begun and how much of the latest one is still to come.
        """
        stream = encode(Hello("c")) + data(0, PAYLOAD) + encode(Hello("d"))
        first = len(encode(Hello("c")))
        for size in (1, 3, 5, 7, 65536, len(stream)):
            cursor = FrameCursor(control_limit(P))
            for i in range(0, len(stream), size):
                cursor.feed(stream[i : i + size])
            self.assertEqual((cursor.frames, cursor.remaining), (3, 0), size)
        cursor = FrameCursor(control_limit(P))
        cursor.feed(stream[: first + 100])
        self.assertEqual((cursor.frames, cursor.remaining), (2, FRAME - 100))

    def test_believes_no_more_than_the_limit(self) -> None:
        """A header announcing more than the limit counts as the limit."""
        cursor = FrameCursor(control_limit(P))
        cursor.feed(bytes([FrameType.DATA]) + (2**31).to_bytes(4, "big"))
        self.assertEqual(cursor.remaining, control_limit(P)(FrameType.DATA))


class Server:
    """One factory with a storage whose writes wait, and its connections."""

    def __init__(self, limit: int, batch_limit: int | None = None) -> None:
        self.storage = SlowStorage(MemoryStorage())
        self.factory = UploadServerFactory(
            self.storage, "test-server", Clock(),
            limits=ServerLimits(max_payload=P, chunk_size=P),
        )
        self.factory.chunk_memory_limit = limit
        if batch_limit is not None:
            self.factory.batch_limit = batch_limit

    def connect(self, size: int = 4 * P) -> tuple[Any, StringTransport]:
        """A connection with an upload of C{size} bytes open."""
        proto = self.factory.buildProtocol(None)
        transport = StringTransport()
        proto.makeConnection(transport)
        proto.dataReceived(encode(Hello("tester")))
        content = PAYLOAD * (size // P)
        proto.dataReceived(encode(Upload(f"{id(proto)}.tif", size,
                                         hashlib.sha256(content).digest())))
        transport.clear()
        return proto, transport

    def write_next(self) -> None:
        """Let the oldest storage write finish."""
        self.storage.pending.pop(0).callback(None)


def acks(transport: StringTransport) -> list[Any]:
    """The frames the server wrote to C{transport} since the last call."""
    return frames_written(transport)


class AdmissionTests(SynchronousTestCase):
    """The server-wide limit on received data, over several connections."""

    def assertCounted(self, server: Server, frames: int) -> None:
        """The server counts C{frames} whole frames (their headers may be gone)."""
        self.assertTrue(frames * P <= server.factory.chunk_bytes <= frames * FRAME,
                        server.factory.chunk_bytes)

    def test_frame_waits_for_room_for_all_of_it(self) -> None:
        """
        A frame counts whole once let in; one that does not fit stops its
        connection (its bytes received not counted, so that waiting
        connections cannot keep one another out) until writes make room.
        """
        server = Server(limit=2 * FRAME)
        (a, ta), (b, tb), (c, tc) = (server.connect() for _ in range(3))
        frame = data(0, PAYLOAD)
        for proto in (a, b, c):
            proto.dataReceived(frame[:10])
        self.assertEqual([t.producerState for t in (ta, tb, tc)],
                         ["producing", "producing", "paused"])
        self.assertCounted(server, 2)
        a.dataReceived(frame[10:])
        self.assertEqual(tc.producerState, "paused")  # a's chunk is not written yet
        server.write_next()
        self.assertEqual(acks(ta), [Ack(P)])
        self.assertEqual(tc.producerState, "producing")
        self.assertCounted(server, 2)
        for proto in (b, c):
            proto.dataReceived(frame[10:])
        while server.storage.pending:
            server.write_next()
        self.assertEqual((acks(tb), acks(tc)), ([Ack(P)], [Ack(P)]))
        self.assertEqual(server.factory.chunk_bytes, 0)

    def test_waiting_connections_go_on_in_order(self) -> None:
        """
        Room that frees goes to the connection that waited longest; the
        bytes the others waiting have received do not keep it out.
        """
        server = Server(limit=FRAME)
        (a, _), (b, tb), (c, tc) = (server.connect() for _ in range(3))
        frame = data(0, PAYLOAD)
        a.dataReceived(frame)
        b.dataReceived(frame[:10])
        c.dataReceived(frame[:10])
        server.write_next()
        self.assertEqual((tb.producerState, tc.producerState), ("producing", "paused"))

    def test_waiting_connection_is_not_idle(self) -> None:
        """
        A connection the server stopped reading for want of memory is not
        timed out as idle (its client cannot send); once let in again, its
        idle time runs.
        """
        server = Server(limit=FRAME)
        (a, _), (c, tc) = server.connect(), server.connect()
        frame = data(0, PAYLOAD)
        a.dataReceived(frame)  # its write waits, holding the memory
        c.dataReceived(frame[:10])
        self.assertEqual(tc.producerState, "paused")
        idle = server.factory.idle_timeout
        server.factory.clock.advance(3 * idle)
        self.assertEqual((frames_written(tc), tc.disconnecting), ([], False))
        server.write_next()
        self.assertEqual(tc.producerState, "producing")
        server.factory.clock.advance(2 * idle)
        [error] = frames_written(tc)
        self.assertEqual(error.code, ErrorCode.TIMEOUT)

    def test_stalled_connection_reads_ahead_one_payload(self) -> None:
        """
        With its next batch full, a connection reads ahead (counted) until
        its buffer holds one largest payload, then stops reading: the next
        frame waits in the socket.
        """
        server = Server(limit=DATA_MEMORY, batch_limit=P)
        proto, transport = server.connect()
        proto.dataReceived(data(0, PAYLOAD) + data(P, PAYLOAD))  # writing; gathered
        third, fourth = data(2 * P, PAYLOAD), data(3 * P, PAYLOAD)
        proto.dataReceived(third[:10])
        self.assertEqual(transport.producerState, "producing")
        self.assertEqual(server.factory.chunk_bytes, 2 * P + FRAME)
        proto.dataReceived(third[10:] + fourth[:10])
        self.assertEqual(transport.producerState, "paused")
        self.assertEqual(server.factory.chunk_bytes, 2 * P + FRAME)
        server.write_next()
        self.assertEqual(transport.producerState, "producing")
        proto.dataReceived(fourth[10:])
        while server.storage.pending:
            server.write_next()
        self.assertEqual(acks(transport), [Ack(P), Ack(2 * P), Ack(3 * P), Ack(4 * P)])
        self.assertEqual(server.factory.chunk_bytes, 0)

    def test_frame_not_let_in_is_not_parsed(self) -> None:
        """
        The header of a frame that waits for room is not even parsed (so no
        buffer is made for its body): a frame announcing more than the
        largest payload is refused only once it is let in.
        """
        server = Server(limit=FRAME)
        (a, _), (b, tb) = server.connect(), server.connect()
        a.dataReceived(data(0, PAYLOAD)[:10])
        b.dataReceived(bytes([FrameType.DATA]) + (2**31).to_bytes(4, "big") + b"x" * 10)
        self.assertEqual((tb.producerState, acks(tb)), ("paused", []))
        a.connectionLost(Failure(ConnectionError("gone")))
        [error] = acks(tb)
        self.assertEqual(error.code, ErrorCode.FRAME_TOO_LARGE)

    def test_small_frames_need_no_room(self) -> None:
        """
        Control frames (and short chunks) are let in however full the server
        is: a balancer's health check gets its PONG.
        """
        server = Server(limit=FRAME)
        (a, _), (b, tb) = server.connect(), server.connect()
        a.dataReceived(data(0, PAYLOAD)[:10])
        b.dataReceived(data(0, PAYLOAD)[:10])
        check, transport = server.factory.buildProtocol(None), StringTransport()
        check.makeConnection(transport)
        check.dataReceived(encode(Hello("imgresume-lb-health")) + encode(Ping(12345678)))
        self.assertEqual(acks(transport)[-1], Pong(12345678))
        self.assertEqual(tb.producerState, "paused")

    def test_frame_larger_than_the_limit_gets_in_alone(self) -> None:
        """A frame bigger than the limit is let in when nothing else is held."""
        server = Server(limit=100)
        proto, transport = server.connect()
        proto.dataReceived(data(0, PAYLOAD)[:10])
        self.assertEqual(transport.producerState, "producing")
        proto.dataReceived(data(0, PAYLOAD)[10:])
        server.write_next()
        self.assertEqual(acks(transport), [Ack(P)])

    def test_lost_connection_gives_its_memory_back(self) -> None:
        """
        A connection that goes away, waiting or holding a frame, leaves the
        queue and its bytes are counted out: the next one goes on.
        """
        server = Server(limit=FRAME)
        (a, _), (b, _), (c, tc) = (server.connect() for _ in range(3))
        frame = data(0, PAYLOAD)
        for proto in (a, b, c):
            proto.dataReceived(frame[:10])
        b.connectionLost(Failure(ConnectionError("gone")))
        a.connectionLost(Failure(ConnectionError("gone")))
        self.assertEqual(tc.producerState, "producing")
        self.assertCounted(server, 1)


class OptionTests(SynchronousTestCase):
    """C{twistd imgresume --max-data-memory}."""

    def service(self, *args: str) -> Any:
        """The service C{twistd imgresume} builds with C{args}."""
        storage = self.mktemp()
        os.makedirs(storage)
        options = Options()
        options.parseOptions(["--storage", storage, "--skip-storage-check", *args])
        return makeService(options)

    def test_max_data_memory(self) -> None:
        """--max-data-memory sets the server's limit; without it, the default."""
        self.assertEqual(self.service("--max-data-memory", "16M").factory.chunk_memory_limit,
                         16 << 20)
        self.assertEqual(self.service().factory.chunk_memory_limit, DATA_MEMORY)

    def test_max_data_memory_must_be_positive(self) -> None:
        """0 or a non-size is a usage error."""
        for value in ("0", "lots"):
            self.assertRaises(usage.UsageError, self.service, "--max-data-memory", value)

"""
docs/protocol.md, section 3a (timeouts and takeover), against a real
C{twistd imgresume} process with short durations, spoken to over its UNIX
socket frame by frame: the timing is the real reactor's, the sockets real.

As in L{tests.protocol.test_spec}, every test quotes the sentences it
checks (lines that begin with C{>}), and L{QuotesTests} checks they are in
the document.
"""

from __future__ import annotations

import hashlib
import socket
import time
from typing import Any

from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SynchronousTestCase, TestCase

from imgresume.errors import ErrorCode
from imgresume.protocol import (
    Accepted,
    Error,
    FrameDecoder,
    Hello,
    Ping,
    Pong,
    Resume,
    Upload,
    Welcome,
    encode,
)
from imgresume.protocol._decoder import control_limit
from tests.protocol.test_spec import DOC, normalised, quotes
from tests.support.processes import SharedTwistdServer
from tests.support.wire import data_frame

CONTENT = bytes(range(256)) * 64  # 16 KiB
SHA = hashlib.sha256(CONTENT).digest()


class Peer:
    """A blocking client socket that sends frames and reads them back, timed."""

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.connect(path)
        self.opened = time.monotonic()
        self.decoder = FrameDecoder(control_limit(1 << 20))

    def send(self, *raw: bytes) -> None:
        for piece in raw:
            self.sock.sendall(piece)

    def next(self, timeout: float) -> Any:
        """The next frame, None when the server closed, or socket.timeout."""
        deadline = time.monotonic() + timeout
        while True:
            frame = self.decoder.next_frame()
            if frame is not None:
                return frame
            self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            data = self.sock.recv(65536)
            if not data:
                return None
            self.decoder.feed(data)

    def ask(self, raw: bytes, timeout: float = 5.0) -> Any:
        self.send(raw)
        return self.next(timeout)

    def hello(self, client_id: str = "spec") -> Welcome:
        welcome = self.ask(encode(Hello(client_id)))
        assert isinstance(welcome, Welcome), welcome
        return welcome

    def closed_after(self, timeout: float) -> bool:
        """Whether the server closes the connection (EOF) within C{timeout}."""
        try:
            return self.next(timeout) is None
        except socket.timeout:
            return False

    def close(self) -> None:
        self.sock.close()


class QuotesTests(SynchronousTestCase):
    """The sentences the tests of this module quote are in docs/protocol.md."""

    def test_every_quote_is_in_the_document(self) -> None:
        """Each quote of a test here is, word for word, in docs/protocol.md."""
        doc = normalised(open(DOC, encoding="utf-8").read())
        found = [q for name, method in vars(TimeoutTests).items()
                 if name.startswith("test_") for q in quotes(method.__doc__)]
        self.assertGreater(len(found), 3)
        for quote in found:
            self.assertIn(quote, doc)


class TimeoutTests(TestCase):
    """
    Section 3a on a real server with durations of a second or two: one
    server for the class (each test has its own connections and upload
    names).
    """

    timeout = 60
    shared = SharedTwistdServer(
        "--handshake-timeout", "1s", "--idle-timeout", "2s", "--takeover-idle", "1s")

    @classmethod
    def tearDownClass(cls) -> None:
        cls.shared.stop()
        super().tearDownClass()

    async def server(self) -> SharedTwistdServer:
        return self.shared.start()

    async def test_handshake_timeout(self) -> None:
        """
        A connection that opens and trickles bytes of a HELLO is sent
        TIMEOUT and closed about a second (the handshake timeout) after it
        opened: bytes do not extend it.

        > * **Handshake**, `--handshake-timeout` (default 30 s): a connection that has
        > not completed its handshake (WELCOME sent) this long after it was opened
        > is sent `TIMEOUT` and closed.
        """
        server = await self.server()

        def run() -> tuple[Any, float, bool]:
            peer = Peer(server.socket)
            hello = encode(Hello("spec"))
            for i in range(3):
                peer.send(hello[i : i + 1])
                time.sleep(0.3)
            error = peer.next(5)
            took = time.monotonic() - peer.opened
            closed = peer.closed_after(2)
            peer.close()
            return error, took, closed

        error, took, closed = await deferToThread(run)
        self.assertIsInstance(error, Error)
        self.assertEqual(error.code, ErrorCode.TIMEOUT)
        self.assertTrue(0.9 <= took < 1.8, took)
        self.assertTrue(closed)

    async def test_idle_timeout(self) -> None:
        """
        After WELCOME, a connection that sends PING every half second stays
        open past the idle timeout; one that goes silent is sent TIMEOUT
        and closed about two seconds (the idle timeout) later.

        > * **Idle**, `--idle-timeout` (default 5 minutes): after WELCOME, a connection
        > from which no byte arrives for this long is sent `TIMEOUT` and closed, its
        > upload released for a resume.
        >
        > A client that has nothing to send for a while
        > keeps the connection with PING.
        """
        server = await self.server()

        def run() -> tuple[list[Any], Any, float, Any]:
            peer = Peer(server.socket)
            peer.hello()
            accepted = peer.ask(encode(Upload("idle.tif", len(CONTENT), SHA)))
            pongs = []
            for n in range(8):  # 4 s of PINGs, twice the idle timeout
                time.sleep(0.5)
                pongs.append(peer.ask(encode(Ping(n))))
            silent_from = time.monotonic()
            error = peer.next(5)
            took = time.monotonic() - silent_from
            peer.close()
            # Released: another connection resumes it at once.
            other = Peer(server.socket)
            other.hello()
            resumed = other.ask(encode(Resume(accepted.upload_id)))
            other.close()
            return pongs, error, took, resumed

        pongs, error, took, resumed = await deferToThread(run)
        self.assertEqual(pongs, [Pong(n) for n in range(8)])
        self.assertEqual(error.code, ErrorCode.TIMEOUT)
        self.assertTrue(1.8 <= took < 3.5, took)
        self.assertIsInstance(resumed, Accepted)

    async def test_takeover(self) -> None:
        """
        A connection silent for the takeover time gives its upload up to a
        RESUME from another connection: that RESUME gets UPLOAD_BUSY with a
        retry hint, the silent one UPLOAD_TAKEN_OVER and EOF within about a
        second, and the RESUME sent again gets ACCEPTED at the stored offset.

        > * **Takeover**, `--takeover-idle` (default 10 s): when a connection holding
        > an upload has received nothing for this long, and another connection
        > RESUMEs that upload, the silent connection gives the upload up: it is
        > sent `UPLOAD_TAKEN_OVER` and closed, within about a second (servers check
        > once a second). The RESUME itself is answered `UPLOAD_BUSY` with
        > `retry_after_ms`; the RESUME sent again after that succeeds.
        """
        server = await self.server()

        def run() -> tuple[Any, Any, float, bool, Any]:
            old = Peer(server.socket)
            old.hello()
            accepted = old.ask(encode(Upload("zombie.tif", len(CONTENT), SHA)))
            old.ask(data_frame(0, CONTENT[:4096]))
            time.sleep(1.2)  # silent past --takeover-idle
            new = Peer(server.socket)
            new.hello()
            busy = new.ask(encode(Resume(accepted.upload_id)))
            asked = time.monotonic()
            taken = old.next(5)
            took = time.monotonic() - asked
            closed = old.closed_after(2)
            time.sleep(busy.retry_after_ms / 1000)
            again = new.ask(encode(Resume(accepted.upload_id)))
            old.close()
            new.close()
            return busy, taken, took, closed, again

        busy, taken, took, closed, again = await deferToThread(run)
        self.assertEqual(busy.code, ErrorCode.UPLOAD_BUSY)
        self.assertGreater(busy.retry_after_ms, 0)
        self.assertEqual(taken.code, ErrorCode.UPLOAD_TAKEN_OVER)
        self.assertLess(took, 2.0)
        self.assertTrue(closed)
        self.assertIsInstance(again, Accepted)
        self.assertEqual(again.offset, 4096)

    async def test_sending_connection_keeps_its_upload(self) -> None:
        """
        A connection that keeps sending (PINGs here) is not taken over:
        RESUMEs from elsewhere stay UPLOAD_BUSY for three seconds.

        > A connection
        > that is sending keeps its upload: its RESUME from elsewhere stays
        > `UPLOAD_BUSY`.
        """
        server = await self.server()

        def run() -> list[Any]:
            owner = Peer(server.socket)
            owner.hello()
            accepted = owner.ask(encode(Upload("busy.tif", len(CONTENT), SHA)))
            other = Peer(server.socket)
            other.hello()
            answers = []
            for n in range(6):
                answers.append(other.ask(encode(Resume(accepted.upload_id))))
                for _ in range(2):
                    time.sleep(0.25)
                    assert owner.ask(encode(Ping(n))) == Pong(n)
            owner.close()
            other.close()
            return answers

        answers = await deferToThread(run)
        self.assertEqual({a.code for a in answers}, {ErrorCode.UPLOAD_BUSY})

"""
Tests for L{imgresume.protocol._client.ClientConnection}, the sans-IO client
state machine, against server frames built with encode(), and a loopback of
a client and a L{imgresume.protocol._server.ServerConnection}.
"""

from __future__ import annotations

import hashlib
import os
import zlib

from twisted.trial.unittest import SynchronousTestCase

from imgresume.errors import (
    ChecksumMismatch,
    DigestMismatch,
    ErrorCode,
    MalformedFrame,
    OffsetMismatch,
    UnexpectedFrame,
    UnknownErrorCode,
    UnknownUpload,
)
from imgresume.protocol._client import (
    ChunkAcked,
    ClientConnection,
    ClientState,
    ErrorReceived,
    Ponged,
    UploadAccepted,
    UploadCompleted,
    Welcomed,
)
from imgresume.protocol._frames import (
    SKIPPED_UPLOAD_ID,
    Accepted,
    Ack,
    Completed,
    Data,
    Error,
    Finish,
    FrameType,
    Hello,
    Ping,
    Pong,
    Resume,
    Upload,
    Welcome,
    encode,
)
from imgresume.protocol._server import (
    ChunkReceived,
    ConnectionFailed,
    FinishRequested,
    HelloReceived,
    ServerConnection,
    ServerLimits,
    ServerState,
    UploadRequested,
)
from tests.support.wire import drain, new_decoder

UPLOAD_ID = "fedcba9876543210fedcba9876543210"
DIGEST = b"\x5a" * 32
WELCOME = Welcome(1, "srv-1", max_payload=64, max_file_size=1 << 30, chunk_size=32)


def sent_frames(client: ClientConnection) -> list:
    """Drain and decode what the client queued for the server."""
    dec = new_decoder()
    dec.feed(b"".join(client.data_to_send()))
    out = drain(dec)
    assert dec.buffered == 0
    return out


def fed(client: ClientConnection, frame) -> object:
    """Feed one server frame and return the next event."""
    client.receive_data(encode(frame))
    return client.next_event()


def ready() -> ClientConnection:
    """A client in READY after the handshake, output drained."""
    client = ClientConnection("client-1")
    client.hello()
    assert isinstance(fed(client, WELCOME), Welcomed)
    client.data_to_send()
    return client


def sending(size: int = 100, offset: int = 0) -> ClientConnection:
    """A client in SENDING for an upload of C{size} bytes from C{offset}."""
    client = ready()
    client.upload(Upload("a.jpg", size, DIGEST))
    event = fed(client, Accepted(UPLOAD_ID, "a.jpg", size, DIGEST, offset))
    assert isinstance(event, UploadAccepted), event
    client.data_to_send()
    return client


def error(code: int, offset: int = 0, message: str = "m") -> Error:
    """An ERROR frame."""
    return Error(int(code), message, offset)


class HandshakeTests(SynchronousTestCase):
    """HELLO out, WELCOME in."""

    def test_hello(self) -> None:
        """hello() sends HELLO with the client id, version 1 and the options."""
        client = ClientConnection("client-1", {"agent": "t"})
        self.assertEqual(client.state, ClientState.START)
        client.hello()
        self.assertEqual(sent_frames(client), [Hello("client-1", 1, 1, {"agent": "t"})])
        self.assertEqual(client.state, ClientState.AWAIT_WELCOME)

    def test_welcome(self) -> None:
        """WELCOME yields Welcomed, stores it and moves to READY."""
        client = ClientConnection("client-1")
        client.hello()
        self.assertEqual(fed(client, WELCOME), Welcomed(WELCOME))
        self.assertEqual(client.state, ClientState.READY)
        self.assertEqual(client.welcome, WELCOME)

    def test_hello_twice(self) -> None:
        """hello() outside START raises RuntimeError."""
        client = ClientConnection("c")
        client.hello()
        self.assertRaises(RuntimeError, client.hello)

    def test_welcome_bad_version(self) -> None:
        """A WELCOME choosing another version is MalformedFrame and closes."""
        client = ClientConnection("c")
        client.hello()
        client.receive_data(encode(Welcome(2, "s", 64, 1, 1)))
        self.assertRaises(MalformedFrame, client.next_event)
        self.assertEqual(client.state, ClientState.CLOSED)

    def test_welcome_zero_payload(self) -> None:
        """A WELCOME announcing max_payload 0 is MalformedFrame."""
        client = ClientConnection("c")
        client.hello()
        client.receive_data(encode(Welcome(1, "s", 0, 1, 1)))
        self.assertRaises(MalformedFrame, client.next_event)

    def test_welcome_twice(self) -> None:
        """A second WELCOME is UnexpectedFrame."""
        client = ready()
        client.receive_data(encode(WELCOME))
        self.assertRaises(UnexpectedFrame, client.next_event)
        self.assertEqual(client.state, ClientState.CLOSED)

    def test_handshake_error(self) -> None:
        """A CONNECTION-scope ERROR during the handshake is an event and closes."""
        client = ClientConnection("c")
        client.hello()
        event = fed(client, error(ErrorCode.HANDSHAKE_REJECTED))
        self.assertEqual(event.error.code, ErrorCode.HANDSHAKE_REJECTED)
        self.assertEqual(client.state, ClientState.CLOSED)

    def test_pong(self) -> None:
        """ping() sends PING; PONG yields Ponged with the nonce."""
        client = ready()
        client.ping(42)
        self.assertEqual(sent_frames(client), [Ping(42)])
        self.assertEqual(fed(client, Pong(42)), Ponged(42))
        self.assertEqual(client.state, ClientState.READY)

    def test_nothing_buffered(self) -> None:
        """next_event is None until a whole frame has arrived."""
        client = ClientConnection("c")
        client.hello()
        client.receive_data(encode(WELCOME)[:-1])
        self.assertIsNone(client.next_event())
        client.receive_data(encode(WELCOME)[-1:])
        self.assertIsInstance(client.next_event(), Welcomed)


class UploadTests(SynchronousTestCase):
    """UPLOAD / RESUME and ACCEPTED."""

    def test_upload_accepted(self) -> None:
        """ACCEPTED opens the upload: SENDING, size and offsets from the frame."""
        client = ready()
        upload = Upload("a.jpg", 100, DIGEST, {"k": "v"})
        client.upload(upload)
        self.assertEqual(sent_frames(client), [upload])
        self.assertEqual(client.state, ClientState.AWAIT_ACCEPTED)
        accepted = Accepted(UPLOAD_ID, "a.jpg", 100, DIGEST, 0)
        self.assertEqual(fed(client, accepted), UploadAccepted(accepted))
        self.assertEqual(client.state, ClientState.SENDING)
        self.assertEqual(
            (client.upload_id, client.size, client.offset, client.acked, client.outstanding),
            (UPLOAD_ID, 100, 0, 0, 0),
        )

    def test_resume_accepted(self) -> None:
        """RESUME is sent; ACCEPTED at offset 30 sets sent and acked to 30."""
        client = ready()
        client.resume(UPLOAD_ID)
        self.assertEqual(sent_frames(client), [Resume(UPLOAD_ID)])
        fed(client, Accepted(UPLOAD_ID, "a.jpg", 100, DIGEST, 30))
        self.assertEqual((client.offset, client.acked), (30, 30))

    def test_accepted_offset_past_size(self) -> None:
        """ACCEPTED with an offset past the size is MalformedFrame."""
        client = ready()
        client.resume(UPLOAD_ID)
        client.receive_data(encode(Accepted(UPLOAD_ID, "a", 10, DIGEST, 11)))
        self.assertRaises(MalformedFrame, client.next_event)
        self.assertEqual(client.state, ClientState.CLOSED)

    def test_upload_needs_ready(self) -> None:
        """upload() and resume() outside READY raise RuntimeError."""
        client = ClientConnection("c")
        self.assertRaises(RuntimeError, client.upload, Upload("a", 1, DIGEST))
        client = sending()
        self.assertRaises(RuntimeError, client.resume, UPLOAD_ID)

    def test_accepted_unasked(self) -> None:
        """ACCEPTED in READY is UnexpectedFrame."""
        client = ready()
        client.receive_data(encode(Accepted(UPLOAD_ID, "a", 10, DIGEST, 0)))
        self.assertRaises(UnexpectedFrame, client.next_event)


class IfExistsTests(SynchronousTestCase):
    """The if-exists policies a server offers, and the answer to a skipped UPLOAD."""

    def test_offered(self) -> None:
        """
        rename is always offered; skip and fail only when WELCOME lists them
        (an older server's WELCOME does not).
        """
        client = ClientConnection("client-1")
        client.hello()
        fed(client, Welcome(1, "srv-1", 64, 1 << 30, 32, {"late-digest": "1"}))
        self.assertEqual([client.offers_if_exists(p) for p in ("rename", "skip", "fail")],
                         [True, False, False])
        client = ClientConnection("client-1")
        client.hello()
        fed(client, Welcome(1, "srv-1", 64, 1 << 30, 32, {"if-exists": "rename,skip,fail"}))
        self.assertEqual([client.offers_if_exists(p) for p in ("rename", "skip", "fail")],
                         [True, True, True])
        self.assertFalse(client.offers_if_exists("ski"))

    def test_skipped(self) -> None:
        """COMPLETED with no upload id answers the UPLOAD: the client is READY again."""
        client = ready()
        client.upload(Upload("a.jpg", 100, DIGEST, {"if-exists": "skip"}))
        completed = Completed(SKIPPED_UPLOAD_ID, 100, DIGEST, "complete/a.jpg")
        self.assertEqual(fed(client, completed), UploadCompleted(completed))
        self.assertEqual(client.state, ClientState.READY)


class WindowTests(SynchronousTestCase):
    """The bookkeeping of DATA packets in flight."""

    def test_window_one(self) -> None:
        """With window 1, one packet may be in flight."""
        client = sending()
        self.assertTrue(client.can_send(1))
        client.send_data(0, b"x" * 10)
        self.assertEqual((client.offset, client.outstanding), (10, 1))
        self.assertFalse(client.can_send(1))
        self.assertEqual(fed(client, Ack(10)), ChunkAcked(10))
        self.assertEqual((client.acked, client.outstanding), (10, 0))
        self.assertTrue(client.can_send(1))

    def test_window_four(self) -> None:
        """With window 4, four packets may be in flight; each ACK frees one slot."""
        client = sending()
        for i in range(4):
            self.assertTrue(client.can_send(4))
            client.send_data(i * 10, b"x" * 10)
            self.assertEqual(client.outstanding, i + 1)
        self.assertFalse(client.can_send(4))
        self.assertTrue(client.can_send(5))
        fed(client, Ack(10))
        self.assertTrue(client.can_send(4))
        self.assertEqual((client.acked, client.offset, client.outstanding), (10, 40, 3))

    def test_data_frames_sent(self) -> None:
        """send_data queues a DATA frame with the payload's CRC-32."""
        client = sending()
        client.send_data(0, b"hello")
        self.assertEqual(sent_frames(client), [Data(0, zlib.crc32(b"hello"), b"hello")])

    def test_cumulative_acks(self) -> None:
        """Each ACK answers one packet and moves acked to its offset."""
        client = sending()
        for i in range(3):
            client.send_data(i * 10, b"x" * 10)
        self.assertEqual(fed(client, Ack(10)), ChunkAcked(10))
        self.assertEqual(fed(client, Ack(20)), ChunkAcked(20))
        self.assertEqual((client.acked, client.outstanding), (20, 1))
        self.assertEqual(fed(client, Ack(30)), ChunkAcked(30))
        self.assertEqual((client.acked, client.offset, client.outstanding), (30, 30, 0))

    def test_no_more_bytes(self) -> None:
        """can_send is False once every byte is sent."""
        client = sending(size=10)
        client.send_data(0, b"x" * 10)
        self.assertFalse(client.can_send(100))

    def test_can_send_outside_sending(self) -> None:
        """can_send is False when no upload is open."""
        self.assertFalse(ready().can_send(10))
        self.assertFalse(ClientConnection("c").can_send(10))

    def test_ack_outside_range(self) -> None:
        """An ACK that goes back or passes what was sent is MalformedFrame and closes."""
        for ack in (0, 9, 31):
            client = sending()
            client.send_data(0, b"x" * 10)
            fed(client, Ack(10))
            client.send_data(10, b"x" * 20)
            client.receive_data(encode(Ack(ack)))
            self.assertRaises(MalformedFrame, client.next_event)
            self.assertEqual(client.state, ClientState.CLOSED, ack)

    def test_ack_may_stand_still(self) -> None:
        """
        A server whose storage commits in larger units (object store parts)
        acknowledges packets without moving the offset; the client sends on.
        """
        client = sending()
        client.send_data(0, b"x" * 10)
        client.send_data(10, b"x" * 10)
        self.assertEqual(fed(client, Ack(0)), ChunkAcked(0))
        self.assertEqual(fed(client, Ack(20)), ChunkAcked(20))
        self.assertEqual((client.acked, client.offset, client.outstanding), (20, 20, 0))

    def test_ack_without_packet(self) -> None:
        """An ACK with nothing in flight is UnexpectedFrame."""
        client = sending()
        client.receive_data(encode(Ack(1)))
        self.assertRaises(UnexpectedFrame, client.next_event)
        self.assertEqual(client.state, ClientState.CLOSED)

    def test_closed_ignores_bytes(self) -> None:
        """After CLOSED, received bytes are ignored and no event comes."""
        client = sending()
        client.receive_data(encode(Ack(1)))
        self.assertRaises(UnexpectedFrame, client.next_event)
        client.receive_data(encode(Pong(1)))
        self.assertIsNone(client.next_event())


class SendDataTests(SynchronousTestCase):
    """send_data() refuses packets the server would refuse."""

    def assertRefused(self, client: ClientConnection, offset: int, payload: bytes) -> None:
        """send_data raises ValueError and changes nothing."""
        before = (client.offset, client.outstanding)
        self.assertRaises(ValueError, client.send_data, offset, payload)
        self.assertEqual((client.offset, client.outstanding), before)
        self.assertEqual(client.data_to_send(), [])

    def test_wrong_offset(self) -> None:
        """A packet not starting at sent is refused."""
        client = sending(offset=10)
        self.assertRefused(client, 0, b"x")
        self.assertRefused(client, 11, b"x")

    def test_empty_payload(self) -> None:
        """An empty payload is refused (finish() ends the upload)."""
        self.assertRefused(sending(), 0, b"")

    def test_over_max_payload(self) -> None:
        """A payload over the server's max_payload is refused; exactly at it is fine."""
        client = sending(size=1000)
        self.assertRefused(client, 0, b"x" * (WELCOME.max_payload + 1))
        client.send_data(0, b"x" * WELCOME.max_payload)

    def test_past_size(self) -> None:
        """A payload reaching past the declared size is refused."""
        client = sending(size=10, offset=5)
        self.assertRefused(client, 5, b"x" * 6)
        client.send_data(5, b"x" * 5)

    def test_not_sending(self) -> None:
        """send_data outside SENDING raises RuntimeError."""
        self.assertRaises(RuntimeError, ready().send_data, 0, b"x")


class RewindTests(SynchronousTestCase):
    """After a TRANSFER error the client waits for all answers, then rewinds."""

    def test_rewind_after_three_in_flight(self) -> None:
        """can_send stays False until all 3 packets are answered; then sent is the last offset."""
        client = sending()
        for i in range(3):
            client.send_data(i * 10, b"x" * 10)
        event = fed(client, error(ErrorCode.CHECKSUM_MISMATCH, 0))
        self.assertIsInstance(event, ErrorReceived)
        self.assertIsInstance(event.error, ChecksumMismatch)
        self.assertEqual(event.error.offset, 0)
        self.assertEqual((client.outstanding, client.offset, client.acked), (2, 30, 0))
        self.assertFalse(client.can_send(10))
        self.assertRaises(RuntimeError, client.send_data, 30, b"x")
        self.assertIsInstance(fed(client, error(ErrorCode.OFFSET_MISMATCH, 0)).error, OffsetMismatch)
        self.assertEqual(client.outstanding, 1)
        self.assertFalse(client.can_send(10))
        fed(client, error(ErrorCode.OFFSET_MISMATCH, 0))
        self.assertEqual((client.outstanding, client.offset, client.acked), (0, 0, 0))
        self.assertTrue(client.can_send(1))
        self.assertEqual(client.state, ClientState.SENDING)
        client.send_data(0, b"y" * 10)

    def test_rewind_after_partial_ack(self) -> None:
        """An ACK then errors rewind to the error offset."""
        client = sending()
        for i in range(3):
            client.send_data(i * 10, b"x" * 10)
        fed(client, Ack(10))
        fed(client, error(ErrorCode.CHECKSUM_MISMATCH, 10))
        self.assertFalse(client.can_send(10))
        fed(client, error(ErrorCode.OFFSET_MISMATCH, 10))
        self.assertEqual((client.offset, client.acked, client.outstanding), (10, 10, 0))
        self.assertTrue(client.can_send(1))

    def test_transfer_error_nothing_in_flight(self) -> None:
        """A TRANSFER error with no packet in flight is UnexpectedFrame."""
        client = sending()
        client.receive_data(encode(error(ErrorCode.OFFSET_MISMATCH, 0)))
        self.assertRaises(UnexpectedFrame, client.next_event)
        self.assertEqual(client.state, ClientState.CLOSED)

    def test_transfer_error_past_size(self) -> None:
        """A TRANSFER error whose offset is past the size is MalformedFrame."""
        client = sending(size=10)
        client.send_data(0, b"x")
        client.receive_data(encode(error(ErrorCode.OFFSET_MISMATCH, 11)))
        self.assertRaises(MalformedFrame, client.next_event)


class FinishTests(SynchronousTestCase):
    """finish() and COMPLETED."""

    def test_finish_before_all_sent(self) -> None:
        """finish() before every byte is sent raises RuntimeError."""
        client = sending(size=10)
        client.send_data(0, b"x" * 5)
        self.assertRaises(RuntimeError, client.finish)

    def test_finish_while_rewinding(self) -> None:
        """finish() while a rewind is pending raises RuntimeError."""
        client = sending(size=20)
        client.send_data(0, b"x" * 10)
        client.send_data(10, b"x" * 10)
        fed(client, error(ErrorCode.CHECKSUM_MISMATCH, 0))
        self.assertEqual(client.offset, client.size)
        self.assertRaises(RuntimeError, client.finish)

    def test_finish_and_complete(self) -> None:
        """finish() sends the empty DATA at size; COMPLETED then ends the upload."""
        client = sending(size=10)
        client.send_data(0, b"x" * 10)
        fed(client, Ack(10))
        client.data_to_send()
        client.finish()
        self.assertEqual(sent_frames(client), [Data(10, 0, b"")])
        self.assertTrue(client.finishing)
        self.assertEqual(client.outstanding, 1)
        self.assertFalse(client.can_send(10))
        self.assertRaises(RuntimeError, client.send_data, 10, b"x")
        completed = Completed(UPLOAD_ID, 10, DIGEST, "/srv/a.jpg")
        self.assertEqual(fed(client, completed), UploadCompleted(completed))
        self.assertEqual(client.state, ClientState.READY)
        self.assertEqual(
            (client.upload_id, client.size, client.offset, client.acked, client.outstanding,
             client.finishing),
            (None, 0, 0, 0, 0, False),
        )

    def test_late_digest(self) -> None:
        """
        An upload opened without its SHA-256 (when the server offers it) ends
        with FINISH carrying the digest; COMPLETED then ends it.
        """
        client = ClientConnection("client-1")
        client.hello()
        self.assertFalse(client.late_digest_offered)
        fed(client, Welcome(1, "srv-1", 64, 1 << 30, 32, {"late-digest": "1"}))
        self.assertTrue(client.late_digest_offered)
        client.upload(Upload("a.jpg", 10, None))
        fed(client, Accepted(UPLOAD_ID, "a.jpg", 10, None, 0))
        self.assertTrue(client.sha256_in_finish)
        client.data_to_send()
        client.send_data(0, b"x" * 10)
        self.assertRaises(ValueError, client.finish)
        client.finish(DIGEST)
        self.assertEqual(sent_frames(client)[-1], Finish(DIGEST))
        fed(client, Ack(10))
        completed = Completed(UPLOAD_ID, 10, DIGEST, "/srv/a.jpg")
        self.assertEqual(fed(client, completed), UploadCompleted(completed))

    def test_declared_digest_cannot_finish_with_one(self) -> None:
        """An upload that declared its SHA-256 ends with the empty DATA only."""
        client = sending(size=0)
        self.assertFalse(client.sha256_in_finish)
        self.assertRaises(ValueError, client.finish, DIGEST)

    def test_empty_file(self) -> None:
        """A zero-byte upload can finish at once."""
        client = sending(size=0)
        self.assertFalse(client.can_send(1))
        client.finish()
        self.assertEqual(sent_frames(client), [Data(0, 0, b"")])

    def test_finish_pipelined(self) -> None:
        """finish() may follow data still in flight; COMPLETED is legal only once it alone is."""
        client = sending(size=10)
        client.send_data(0, b"x" * 10)
        client.finish()
        self.assertEqual(client.outstanding, 2)
        fed(client, Ack(10))
        fed(client, Completed(UPLOAD_ID, 10, DIGEST, "/a"))
        self.assertEqual(client.state, ClientState.READY)

    def test_completed_with_two_outstanding(self) -> None:
        """COMPLETED while a data packet is still unanswered is UnexpectedFrame."""
        client = sending(size=10)
        client.send_data(0, b"x" * 10)
        client.finish()
        client.receive_data(encode(Completed(UPLOAD_ID, 10, DIGEST, "/a")))
        self.assertRaises(UnexpectedFrame, client.next_event)
        self.assertEqual(client.state, ClientState.CLOSED)

    def test_completed_not_finishing(self) -> None:
        """COMPLETED while sending and not finishing is UnexpectedFrame."""
        client = sending(size=10)
        client.send_data(0, b"x" * 10)
        client.receive_data(encode(Completed(UPLOAD_ID, 10, DIGEST, "/a")))
        self.assertRaises(UnexpectedFrame, client.next_event)

    def test_completed_in_ready(self) -> None:
        """COMPLETED with no upload asked for is UnexpectedFrame."""
        client = ready()
        client.receive_data(encode(Completed(UPLOAD_ID, 10, DIGEST, "/a")))
        self.assertRaises(UnexpectedFrame, client.next_event)

    def test_completed_on_resume(self) -> None:
        """COMPLETED answering a RESUME (already complete) ends the command in READY."""
        client = ready()
        client.resume(UPLOAD_ID)
        completed = Completed(UPLOAD_ID, 10, DIGEST, "/a")
        self.assertEqual(fed(client, completed), UploadCompleted(completed))
        self.assertEqual(client.state, ClientState.READY)

    def test_finish_rejected_then_retried(self) -> None:
        """A TRANSFER error for the finishing packet rewinds to its offset."""
        client = sending(size=10)
        client.send_data(0, b"x" * 10)
        client.finish()
        fed(client, error(ErrorCode.CHECKSUM_MISMATCH, 0))
        fed(client, error(ErrorCode.OFFSET_MISMATCH, 0))
        self.assertFalse(client.finishing)
        self.assertEqual((client.offset, client.outstanding), (0, 0))
        self.assertTrue(client.can_send(1))


class ErrorScopeTests(SynchronousTestCase):
    """What an ERROR frame does to the client, by scope."""

    def test_command_scope_while_sending(self) -> None:
        """A COMMAND error while sending ends the upload; the client is READY."""
        client = sending(size=0)
        client.finish()
        event = fed(client, error(ErrorCode.DIGEST_MISMATCH))
        self.assertIsInstance(event.error, DigestMismatch)
        self.assertEqual(client.state, ClientState.READY)
        self.assertEqual((client.upload_id, client.outstanding), (None, 0))
        client.upload(Upload("b", 1, DIGEST))

    def test_command_scope_while_opening(self) -> None:
        """A COMMAND error answering RESUME returns to READY."""
        client = ready()
        client.resume(UPLOAD_ID)
        event = fed(client, error(ErrorCode.UNKNOWN_UPLOAD))
        self.assertIsInstance(event.error, UnknownUpload)
        self.assertEqual(client.state, ClientState.READY)

    def test_retry_after_in_seconds(self) -> None:
        """retry_after_ms on the wire becomes retry_after seconds."""
        client = ready()
        client.resume(UPLOAD_ID)
        event = fed(client, Error(ErrorCode.UPLOAD_BUSY, "busy", 0, 2500))
        self.assertEqual(event.error.retry_after, 2.5)

    def test_command_scope_in_ready(self) -> None:
        """A COMMAND error with no command pending is UnexpectedFrame."""
        client = ready()
        client.receive_data(encode(error(ErrorCode.UPLOAD_BUSY)))
        self.assertRaises(UnexpectedFrame, client.next_event)
        self.assertEqual(client.state, ClientState.CLOSED)

    def test_connection_scope(self) -> None:
        """A CONNECTION error in any state is an event and closes."""
        for client in (ready(), sending()):
            event = fed(client, error(ErrorCode.SHUTTING_DOWN))
            self.assertEqual(event.error.code, ErrorCode.SHUTTING_DOWN)
            self.assertTrue(event.error.retryable)
            self.assertEqual(client.state, ClientState.CLOSED)
            self.assertIsNone(client.next_event())

    def test_unknown_code(self) -> None:
        """An unknown error code becomes UnknownErrorCode and closes."""
        client = sending()
        event = fed(client, Error(0x7777, "from the future"))
        self.assertIsInstance(event.error, UnknownErrorCode)
        self.assertEqual(event.error.raw_code, 0x7777)
        self.assertEqual(client.state, ClientState.CLOSED)

    def test_unexpected_frame_types(self) -> None:
        """Frames a server never sends (HELLO, UPLOAD, DATA, PING, ...) are UnexpectedFrame."""
        for frame in (
            Hello("c"), Upload("a", 1, DIGEST), Resume(UPLOAD_ID), Data(0, 0, b""), Ping(1),
        ):
            client = sending()
            client.receive_data(encode(frame))
            self.assertRaises(UnexpectedFrame, client.next_event)


class LoopbackTests(SynchronousTestCase):
    """A ClientConnection and a ServerConnection pumped together."""

    CHUNK = 64 * 1024
    WINDOW = 4

    def test_upload_with_corrupted_packet(self) -> None:
        """1 MiB + 7 bytes in 64 KiB packets, window 4, one corrupted packet recovered."""
        content = os.urandom((1 << 20) + 7)
        sha = hashlib.sha256(content).digest()
        size = len(content)

        server = ServerConnection(
            "srv-1", ServerLimits(max_payload=self.CHUNK, chunk_size=self.CHUNK,
                                  max_file_size=1 << 30)
        )
        client = ClientConnection("client-1")
        stored: dict[str, bytearray] = {}
        client_events: list = []
        server_events: list = []
        corrupt_at = 2 * self.CHUNK
        corrupted = []
        pending_header: list = []

        def to_server(chunks: list[bytes]) -> None:
            for chunk in chunks:
                if (len(chunk) == 17 and chunk[0] == FrameType.DATA
                        and int.from_bytes(chunk[5:13], "big") == corrupt_at
                        and not corrupted):
                    pending_header.append(chunk)
                elif pending_header:
                    pending_header.clear()
                    flipped = bytearray(chunk)
                    flipped[100] ^= 0xFF
                    corrupted.append(bytes(flipped))
                    chunk = bytes(flipped)
                server.receive_data(chunk)

        def serve() -> None:
            while (event := server.next_event()) is not None:
                server_events.append(event)
                if isinstance(event, HelloReceived):
                    server.accept_hello()
                elif isinstance(event, UploadRequested):
                    stored[UPLOAD_ID] = bytearray()
                    up = event.upload
                    server.upload_opened(UPLOAD_ID, up.name, up.size, up.sha256, 0)
                elif isinstance(event, ChunkReceived):
                    buf = stored[UPLOAD_ID]
                    self.assertEqual(len(buf), event.offset)
                    buf += event.payload
                    server.chunk_written(len(buf))
                elif isinstance(event, FinishRequested):
                    self.assertEqual(hashlib.sha256(stored[UPLOAD_ID]).digest(), sha)
                    server.upload_completed(UPLOAD_ID, event.size, sha, "/srv/big.img")
                else:
                    self.fail(f"unexpected server event {event!r}")

        def drive() -> None:
            while client.can_send(self.WINDOW):
                offset = client.offset
                client.send_data(offset, content[offset : offset + self.CHUNK])
            if (client.state is ClientState.SENDING and client.offset == client.size
                    and not client.finishing and client.outstanding == 0):
                client.finish()

        client.hello()
        for _ in range(1000):
            drive()
            out = client.data_to_send()
            to_server(out)
            serve()
            back = server.data_to_send()
            for chunk in back:
                client.receive_data(chunk)
            while (event := client.next_event()) is not None:
                client_events.append(event)
                if isinstance(event, Welcomed):
                    client.upload(Upload("big.img", size, sha))
            if not out and not back:
                break
        else:
            self.fail("loopback did not settle")

        self.assertEqual(len(corrupted), 1)
        self.assertEqual(bytes(stored[UPLOAD_ID]), content)
        self.assertIsInstance(client_events[-1], UploadCompleted)
        self.assertEqual(
            client_events[-1].completed, Completed(UPLOAD_ID, size, sha, "/srv/big.img")
        )
        errors = [e.error for e in client_events if isinstance(e, ErrorReceived)]
        self.assertIsInstance(errors[0], ChecksumMismatch)
        self.assertEqual(errors[0].offset, corrupt_at)
        self.assertTrue(all(isinstance(e, OffsetMismatch) for e in errors[1:]))
        # Packets 0 and 1 are ACKed; 2 (corrupted) and 3 behind it get ERRORs.
        self.assertEqual(len(errors), 2)
        acks = [e.acked for e in client_events if isinstance(e, ChunkAcked)]
        self.assertEqual(acks, sorted(set(acks)))
        self.assertEqual(acks[-1], size)
        self.assertEqual(len(acks), 17)
        self.assertEqual(client.state, ClientState.READY)
        self.assertEqual(server.state, ServerState.READY)
        self.assertFalse(any(isinstance(e, ConnectionFailed) for e in server_events))

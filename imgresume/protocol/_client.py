# -*- test-case-name: tests.protocol.test_client_machine -*-
"""
The client side of the protocol as a sans-IO state machine.

L{ClientConnection} turns the caller's intentions (L{hello}, L{upload},
L{resume}, L{send_data}, L{finish}) into frames and the server's frames into
events.  It keeps the bookkeeping of a window of DATA packets in flight: the
server answers every DATA frame with exactly one ACK or ERROR, in order, so
after a transfer error the client waits for the answers to the packets still
in flight and then continues from the offset the server last reported.

Names along the data path: a DATA packet starts at its C{offset} and ends
at C{offset + len(payload)}; C{ClientConnection.offset} is where the next
one starts; C{ClientConnection.acked} is what the server has acknowledged
as durable (the offset field of its last ACK, handed out as
L{ChunkAcked.acked}).

No reactor, no sockets: the Twisted adapter is
L{imgresume.client._attempt.UploadAttempt}.
"""

from __future__ import annotations

import collections
import os


from imgresume import integrity
from imgresume.errors import (
    HandshakeRejected,
    ImgresumeError,
    MalformedFrame,
    Scope,
    UnexpectedFrame,
    error_for_code,
)
from imgresume.protocol import _auth as auth
from imgresume.protocol._decoder import FrameDecoder
from imgresume.protocol._frames import (
    PROTOCOL_VERSION,
    SKIPPED_UPLOAD_ID,
    Accepted,
    Ack,
    Auth,
    Challenge,
    Completed,
    Data,
    Error,
    Finish,
    Frame,
    Hello,
    Ping,
    Pong,
    Put,
    Resume,
    Status,
    Upload,
    UploadStatusFrame,
    Welcome,
    data_header,
    encode,
    put_header,
)
from imgresume.protocol._client_events import (
    Challenged,
    ChunkAcked,
    ClientEvent,
    ClientState,
    ErrorReceived,
    Ponged,
    PutAnswered,
    StatusReceived,
    UploadAccepted,
    UploadCompleted,
    Welcomed,
)


class ClientConnection:
    """
    One connection to a server, client side, as a state machine.

    Created by the client adapter per connection attempt.
    """

    def __init__(
        self, client_id: str, options: dict[str, str] | None = None,
        key: bytes | None = None, nonce: bytes | None = None,
    ) -> None:
        """
        @param key: the client's secret; when given, the client asks for
            challenge-response authentication and requires the server to
            prove it knows the key too.
        @param nonce: the client's 32-byte nonce (default: random).
        """
        self.client_id = client_id
        self.options = dict(options or {})
        self.key = key
        self._nonce = nonce if nonce is not None else os.urandom(32)
        if key is not None:
            self.options.update({"auth": auth.METHOD, "nonce": self._nonce.hex()})
        self._server_nonce: bytes | None = None
        self.state = ClientState.START
        self.welcome: Welcome | None = None
        self.upload_id: str | None = None
        self.size = 0
        #: What the server has acknowledged: every byte before it is durable.
        self.acked = 0
        #: Where the next DATA packet starts (the end of those sent, or where
        #: the server said to continue from after an error).
        self.offset = 0
        #: DATA frames sent and not yet answered.
        self.outstanding = 0
        self.finishing = False
        #: Whether the open upload's SHA-256 goes in FINISH, at the end.
        self.sha256_in_finish = False
        self._rewinding = False
        #: Where to continue after a rewind: the last ERROR's offset.
        self._rewind_offset = 0
        #: The upload ids of the PUTs sent and not yet answered, oldest first.
        self.puts: collections.deque[str] = collections.deque()
        self._decoder = FrameDecoder()
        self._out: list[bytes] = []
        #: The per-packet checksum and the whole-file digest the WELCOME
        #: chose from what C{options} offered (L{imgresume.integrity}).
        self.checksum = integrity.LEGACY_CHECKSUM
        self.digest = integrity.LEGACY_DIGEST

    # Intentions ------------------------------------------------------------

    def hello(self) -> None:
        """Open the handshake."""
        self._expect(ClientState.START)
        self._send(Hello(self.client_id, PROTOCOL_VERSION, PROTOCOL_VERSION, self.options))
        self.state = ClientState.AWAIT_WELCOME

    def upload(self, upload: Upload) -> None:
        """Ask for a new upload."""
        self._expect_idle()
        self._send(upload)
        self.state = ClientState.AWAIT_ACCEPTED

    def resume(self, upload_id: str) -> None:
        """Ask to continue an upload."""
        self._expect_idle()
        self._send(Resume(upload_id))
        self.state = ClientState.AWAIT_ACCEPTED

    def status(self, upload_id: str) -> None:
        """Ask for an upload's state (read only)."""
        self._expect_idle()
        self._send(Status(upload_id))
        self.state = ClientState.AWAIT_STATUS

    @property
    def put_limit(self) -> int:
        """
        The largest file the server takes whole in one PUT: its WELCOME's
        C{put} option (0: the server does not offer PUT).
        """
        offered = self.welcome.options.get("put", "") if self.welcome else ""
        if not (offered.isdigit() and offered.isascii()):
            return 0
        assert self.welcome is not None
        return min(int(offered), self.welcome.max_payload, self.welcome.max_file_size)

    def put(self, put: Put) -> None:
        """
        Send a whole file in one PUT frame.  Legal in the ready state, also
        while earlier PUTs wait for their answers (pipelining): each is
        answered, in order, by a L{PutAnswered}.  C{put.payload} is written
        as is, without a copy into the frame.
        """
        self._expect(ClientState.READY)
        if not 0 < self.put_limit >= len(put.payload):
            raise ValueError(f"a PUT of {len(put.payload)} bytes to a server whose put "
                             f"is {self.put_limit}")
        self._out.append(put_header(put, len(put.payload)))
        if put.payload:
            self._out.append(put.payload)
        self.puts.append(put.upload_id)

    def ping(self, nonce: int) -> None:
        """Probe the server (after the handshake); it answers with L{Ponged}."""
        self._expect(ClientState.READY, ClientState.AWAIT_ACCEPTED, ClientState.SENDING)
        self._send(Ping(nonce))

    def can_send(self, window: int = 1) -> bool:
        """
        Whether another DATA packet may go out now: an upload is open, fewer
        than C{window} packets are in flight, no rewind is pending, and bytes
        remain.
        """
        return (
            self.state is ClientState.SENDING
            and not self._rewinding
            and not self.finishing
            and self.outstanding < window
            and self.offset < self.size
        )

    def send_data(self, offset: int, payload: bytes, crc32: int | None = None) -> None:
        """
        Send a DATA packet of C{payload} at C{offset} (must equal L{offset}).
        C{crc32} may be given if the caller computed it already (off the
        reactor thread, say); it must be the connection's L{checksum} of the
        payload.
        """
        self._expect(ClientState.SENDING)
        if self._rewinding or self.finishing:
            raise RuntimeError("no DATA may be sent while rewinding or finishing")
        if offset != self.offset:
            raise ValueError(f"next packet must start at {self.offset}, not {offset}")
        if not payload:
            raise ValueError("empty payloads end the upload: use finish()")
        assert self.welcome is not None
        if len(payload) > self.welcome.max_payload:
            raise ValueError(f"payload over the server's limit of {self.welcome.max_payload}")
        if offset + len(payload) > self.size:
            raise ValueError("payload reaches past the declared size")
        if crc32 is None:
            crc32 = integrity.checksum(self.checksum, payload)
        self._out.append(data_header(offset, crc32, len(payload)))
        self._out.append(payload)
        self.offset += len(payload)
        self.outstanding += 1

    @property
    def late_digest_offered(self) -> bool:
        """
        Whether the server takes the SHA-256 at the end: an UPLOAD may then
        declare none (C{sha256} None) and the client hash while it sends.
        """
        return self.welcome is not None and self.welcome.options.get("late-digest") == "1"

    def offers_if_exists(self, policy: str) -> bool:
        """
        Whether the server applies this C{if-exists} policy (its WELCOME
        lists it): an UPLOAD may then ask for it in its metadata.  Every
        server renames (C{"rename"}), whether it lists it or not.
        """
        if policy == "rename":
            return True
        offered = self.welcome.options.get("if-exists", "") if self.welcome else ""
        return policy in offered.split(",")

    def finish(self, sha256: bytes | None = None) -> None:
        """
        End the upload: an empty DATA packet, or for an upload opened
        without its SHA-256, FINISH carrying the whole file's C{sha256}.
        """
        self._expect(ClientState.SENDING)
        if self.offset != self.size or self._rewinding:
            raise RuntimeError("finish() before every byte was sent")
        if self.sha256_in_finish != (sha256 is not None):
            raise ValueError(
                "an upload opened without its SHA-256 ends with finish(sha256); "
                "one that declared it, with finish()"
            )
        if sha256 is not None:
            self._send(Finish(sha256))
        else:
            self._send(Data(self.size, 0, b""))  # every checksum of no bytes is 0
        self.outstanding += 1
        self.finishing = True

    # Input -------------------------------------------------------------------

    def receive_data(self, data: bytes) -> None:
        """Add bytes received from the server."""
        if self.state is not ClientState.CLOSED:
            self._decoder.feed(data)

    def next_event(self) -> ClientEvent | None:
        """
        The next event, or None when more bytes are needed.

        @raise ImgresumeError: the server broke the protocol; the connection
            is unusable (state CLOSED) and should be dropped.
        """
        if self.state is ClientState.CLOSED:
            return None
        try:
            frame = self._decoder.next_frame()
            if frame is None:
                return None
            return self._on_frame(frame)
        except ImgresumeError:
            self.state = ClientState.CLOSED
            raise

    def _on_frame(self, frame: Frame) -> ClientEvent:
        state = self.state
        if isinstance(frame, Error):
            return self._on_error(frame)
        if isinstance(frame, Pong):
            return Ponged(frame.nonce)
        if isinstance(frame, Completed) and self.puts and state is ClientState.READY:
            upload_id = self.puts.popleft()
            if frame.upload_id not in (upload_id, SKIPPED_UPLOAD_ID):
                raise MalformedFrame(
                    f"COMPLETED for upload {frame.upload_id} answers the PUT of {upload_id}")
            return PutAnswered(upload_id, completed=frame)
        if isinstance(frame, Challenge) and state is ClientState.AWAIT_WELCOME:
            if self.key is None:
                raise HandshakeRejected(
                    "the server requires authentication; give this client its key"
                )
            if frame.method != auth.METHOD or self._server_nonce is not None:
                raise UnexpectedFrame(f"CHALLENGE with method {frame.method!r}")
            self._server_nonce = frame.nonce
            self._send(Auth(auth.client_proof(
                self.key, frame.nonce, self._nonce, self.client_id, frame.server_id)))
            return Challenged(frame.server_id)
        if isinstance(frame, Welcome) and state is ClientState.AWAIT_WELCOME:
            if frame.version != PROTOCOL_VERSION or frame.max_payload < 1:
                raise MalformedFrame(
                    f"server chose version {frame.version}, max payload {frame.max_payload}"
                )
            if self.key is not None:
                self._check_server_proof(frame)
            try:
                self.checksum, self.digest = integrity.agreed(self.options, frame.options)
            except ValueError as e:
                raise MalformedFrame(str(e)) from None
            self.welcome = frame
            self.state = ClientState.READY
            return Welcomed(frame)
        if isinstance(frame, UploadStatusFrame) and state is ClientState.AWAIT_STATUS:
            self.state = ClientState.READY
            return StatusReceived(frame)
        if isinstance(frame, Accepted) and state is ClientState.AWAIT_ACCEPTED:
            if frame.offset > frame.size:
                raise MalformedFrame("ACCEPTED offset is past the upload size")
            self.upload_id, self.size = frame.upload_id, frame.size
            self.sha256_in_finish = frame.sha256 is None
            self.acked = self.offset = frame.offset
            self.outstanding, self.finishing, self._rewinding = 0, False, False
            self.state = ClientState.SENDING
            return UploadAccepted(frame)
        if isinstance(frame, Completed) and (
            state is ClientState.AWAIT_ACCEPTED
            or (state is ClientState.SENDING and self.finishing and self.outstanding == 1)
        ):
            self._end_upload()
            return UploadCompleted(frame)
        if isinstance(frame, Ack) and state is ClientState.SENDING and self.outstanding:
            # ACKs never go back and never pass what was sent; they may stand
            # still when the server's storage commits in larger units.
            if not (self.acked <= frame.offset <= self.offset):
                raise MalformedFrame(
                    f"ACK for {frame.offset} outside [{self.acked}, {self.offset}]"
                )
            self.acked = frame.offset
            self._answered()
            return ChunkAcked(frame.offset)
        raise UnexpectedFrame(
            f"server sent {type(frame).__name__.upper()} in state {state.value}"
        )

    def _on_error(self, frame: Error) -> ClientEvent:
        error = error_for_code(
            frame.code, frame.message, frame.offset, frame.retry_after_ms / 1000.0
        )
        if error.scope is Scope.CONNECTION:
            self.state = ClientState.CLOSED
        elif self.puts and self.state is ClientState.READY:
            # Whatever its scope, an error answering a PUT ends that PUT only.
            return PutAnswered(self.puts.popleft(), error=error)
        elif error.scope is Scope.TRANSFER and self.state is ClientState.SENDING:
            if not self.outstanding:
                raise UnexpectedFrame(f"transfer error with no packet in flight: {error}")
            if frame.offset > self.size:
                raise MalformedFrame("ERROR offset is past the upload size")
            self._rewinding = True
            self._rewind_offset = frame.offset
            # A server that found stored bytes failing verification cuts
            # them back (INCOMPLETE): its offset is then below an earlier ACK.
            self.acked = min(self.acked, frame.offset)
            self._answered()
        elif self.state in (ClientState.AWAIT_ACCEPTED, ClientState.SENDING,
                            ClientState.AWAIT_STATUS):
            self._end_upload()
        else:
            raise UnexpectedFrame(f"server sent {error} in state {self.state.value}")
        return ErrorReceived(error)

    def _check_server_proof(self, welcome: Welcome) -> None:
        if self._server_nonce is None:
            raise HandshakeRejected(
                "the server did not ask this client to authenticate, so it cannot "
                "prove it knows the key; refusing to upload to it"
            )
        try:
            proof = bytes.fromhex(welcome.options.get("auth-proof", ""))
        except ValueError:
            proof = b""
        expected = auth.server_proof(
            self.key, self._server_nonce, self._nonce, self.client_id, welcome.server_id)
        if not auth.same(proof, expected):
            raise HandshakeRejected("the server failed to prove it knows this client's key")

    # Output ------------------------------------------------------------------

    def data_to_send(self) -> list[bytes]:
        """Bytes to write to the server, in order; clears the queue."""
        out, self._out = self._out, []
        return out

    # Internals ---------------------------------------------------------------

    def _answered(self) -> None:
        self.outstanding -= 1
        if self.outstanding == 0 and self._rewinding:
            # Every packet in flight is answered: continue where the server
            # said, in the last ERROR.
            self.offset = self._rewind_offset
            self._rewinding = self.finishing = False

    def _end_upload(self) -> None:
        self.upload_id, self.size = None, 0
        self.acked = self.offset = self.outstanding = 0
        self.finishing = self._rewinding = False
        self.state = ClientState.READY

    def _send(self, frame: Frame) -> None:
        self._out.append(encode(frame))

    def _expect_idle(self) -> None:
        self._expect(ClientState.READY)
        if self.puts:
            raise RuntimeError("not possible while PUTs wait for their answers")

    def _expect(self, *states: ClientState) -> None:
        if self.state not in states:
            raise RuntimeError(
                f"not possible in state {self.state.value}; needs "
                + " or ".join(s.value for s in states)
            )

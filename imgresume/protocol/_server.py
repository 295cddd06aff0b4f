# -*- test-case-name: tests.protocol.test_server_machine -*-
"""
The server side of the protocol as a sans-IO state machine.

L{ServerConnection} is fed the bytes a client sent and hands out one event at
a time: the things that need a decision or storage work (a HELLO to validate,
an UPLOAD to create, a RESUME, a chunk to write, the end of an upload).  The
caller answers each event through a method (L{accept_hello},
L{upload_opened}, L{chunk_written}, ...) and sends what L{data_to_send}
returns.  Everything the machine can check alone (frame legality, offsets,
CRC-32, declared sizes, metadata limits) it answers itself with ERROR frames,
and lists those refusals for the caller's logs and counts (L{refusals}).

Names along the data path: a chunk starts at its C{offset} and ends at its
C{end}; L{ServerConnection.offset} is where the next DATA packet must
start; L{ServerConnection.durable} is what the storage has made durable, as
the last ACK reported it.

No reactor, no sockets: the Twisted adapter is
L{imgresume.server._protocol.UploadServerProtocol}.
"""

from __future__ import annotations

from imgresume import integrity
from imgresume.errors import (
    ChecksumMismatch,
    ImgresumeError,
    Incomplete,
    OffsetMismatch,
    Scope,
    SizeExceeded,
    UnexpectedFrame,
)
from imgresume.names import if_exists_policy
from imgresume.protocol._decoder import FrameDecoder, control_limit
from imgresume.protocol._frames import (
    SKIPPED_UPLOAD_ID,
    Accepted,
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
    encode,
)
from imgresume.protocol._answers import ChunkAnswers, PutAnswers, check_put
from imgresume.protocol._rules import (
    ServerLimits,
    check_hello,
    check_request,
    error_frame,
    welcome_frame,
)
from imgresume.protocol._server_events import (
    LEGAL_FRAMES,
    AuthReceived,
    ChunkReceived,
    ConnectionFailed,
    FinishRequested,
    HelloReceived,
    PutRequested,
    Refusal,
    ResumeRequested,
    ServerEvent,
    ServerState,
    StatusRequested,
    UploadRequested,
)


class ServerConnection:
    """
    One client connection, server side, as a state machine.

    Created by the server adapter per connection; fed with L{receive_data};
    drained with L{next_event} and L{data_to_send}.
    """

    def __init__(self, server_id: str, limits: ServerLimits = ServerLimits()) -> None:
        self.server_id = server_id
        self.limits = limits
        self.state = ServerState.AWAIT_HELLO
        self._decoder = FrameDecoder()
        self._out: list[bytes] = []
        #: The client's identity, once its HELLO is accepted.
        self.client_id: str | None = None
        self._hello: Hello | None = None
        self.upload_id: str | None = None
        self.size = 0
        #: Where the next DATA packet must start: the end of the chunks
        #: taken so far.
        self.offset = 0
        #: Answers owed to DATA frames, in order.
        self._answers = ChunkAnswers()
        #: Whether the open upload's SHA-256 comes at the end, in FINISH.
        self._sha256_in_finish = False
        self._digest: bytes | None = None
        #: Requests refused by the machine itself, not yet taken by the caller.
        self._refused: list[Refusal] = []
        #: The PUTs being stored at once, answered in order.
        self._puts = PutAnswers()
        #: A command that came behind PUTs still being stored: taken once
        #: every one of them is answered.
        self._parked: Frame | None = None
        #: The per-packet checksum and the whole-file digest of this
        #: connection, negotiated in HELLO/WELCOME (L{imgresume.integrity}).
        self.checksum = integrity.LEGACY_CHECKSUM
        self.digest = integrity.LEGACY_DIGEST
        self._welcome_options: dict[str, str] = {}

    # Input ----------------------------------------------------------------

    @property
    def buffered(self) -> int:
        """Received bytes not yet turned into events."""
        return self._decoder.buffered

    def receive_data(self, data: bytes) -> None:
        """Add bytes received from the client."""
        if self.state is not ServerState.CLOSED:
            self._decoder.feed(data)

    @property
    def chunks_pending(self) -> int:
        """Chunks handed out as L{ChunkReceived} and not yet L{chunk_written}."""
        return self._answers.writing

    def next_event(self) -> ServerEvent | None:
        """
        The next event needing the caller, or None when more bytes are
        needed or an earlier event is still unanswered.  While an upload is
        open, chunks keep coming (each a L{ChunkReceived}) while earlier ones
        are being written, so storage can write them in batches.
        """
        if self.state is ServerState.FINISHING and not self._answers:
            self.state = ServerState.COMPLETING
            return FinishRequested(self.size, self._digest)
        while self.state in LEGAL_FRAMES:
            if self._parked is not None and self.state is not ServerState.READY:
                return None  # a command behind PUTs waits for their answers
            if (self.state is ServerState.STORING
                    and self._puts.storing >= self.limits.puts_at_once):
                return None  # the next frame waits in the buffer
            try:
                frame = self._parked if self._parked is not None else \
                    self._decoder.next_frame()
                self._parked = None
                if frame is None:
                    return None
                event = self._on_frame(frame)
            except ImgresumeError as error:
                if error.scope is not Scope.CONNECTION:
                    raise
                return self._fail_connection(error)
            if event is not None:
                return event
        return None

    def _on_frame(self, frame: Frame) -> ServerEvent | None:
        if not isinstance(frame, LEGAL_FRAMES[self.state]):
            raise UnexpectedFrame(
                f"{type(frame).__name__.upper()} is not legal in state {self.state.value}"
            )
        if isinstance(frame, Ping):
            if self._puts:  # answered in order, after the PUTs before it
                self._puts.add_answered(Pong(frame.nonce))
            else:
                self._send(Pong(frame.nonce))
            return None
        if self.state is ServerState.STORING and not isinstance(frame, Put):
            # A command behind PUTs: it waits until all of them are answered.
            self._parked = frame
            return None
        if isinstance(frame, Hello):
            return self._on_hello(frame)
        if isinstance(frame, Auth):
            self.state = ServerState.CHECKING_AUTH
            return AuthReceived(frame.mac)
        if isinstance(frame, Upload):
            return self._on_upload(frame)
        if isinstance(frame, Put):
            return self._on_put(frame)
        if isinstance(frame, Resume):
            self.state = ServerState.OPENING
            return ResumeRequested(frame.upload_id)
        if isinstance(frame, Status):
            self.state = ServerState.QUERYING
            return StatusRequested(frame.upload_id)
        if isinstance(frame, Finish):
            if not self._sha256_in_finish:
                raise UnexpectedFrame(
                    "FINISH ends only an upload opened without its SHA-256; "
                    "end this one with an empty DATA packet"
                )
            return self._on_end(frame.sha256)
        assert isinstance(frame, Data)
        return self._on_data(frame)

    def _on_hello(self, hello: Hello) -> ServerEvent:
        check_hello(hello)
        self.state = ServerState.CHECKING_HELLO
        self._hello = hello
        self.checksum, self.digest, self._welcome_options = integrity.negotiate(hello.options)
        return HelloReceived(hello)

    def _on_upload(self, upload: Upload) -> ServerEvent | None:
        limit = self.limits.max_file_size
        problem = check_request(upload, limit, f"declared size {upload.size} is over "
                                f"this server's limit of {limit} bytes")
        if problem is not None:
            return self._refuse_request(problem, upload)
        self.state = ServerState.OPENING
        return UploadRequested(upload, if_exists_policy(upload.metadata))

    def _on_put(self, put: Put) -> ServerEvent | None:
        """
        A whole file in one frame (L{check_put}), stored by the caller while
        more PUTs come; answered in order (L{PutAnswers}).
        """
        problem = check_put(put, self.limits, self.checksum)
        if problem is not None:
            upload = Upload(put.name, put.size, put.sha256, put.metadata)
            if not self._puts:
                return self._refuse_request(problem, upload)
            # Its ERROR is owed after the answers of the PUTs before it.
            self._puts.add_answered(error_frame(problem))
            self._refused.append(Refusal(problem, upload))
            return None
        self.state = ServerState.STORING
        self.upload_id = put.upload_id
        self._puts.add(put.upload_id)
        return PutRequested(put, if_exists_policy(put.metadata))

    def _refuse_request(self, problem: ImgresumeError, upload: Upload) -> None:
        """Answer an UPLOAD or PUT with C{problem}; the connection stays ready."""
        self._send(error_frame(problem))
        self._refused.append(Refusal(problem, upload))

    def _on_data(self, data: Data) -> ServerEvent | None:
        end = data.offset + len(data.payload)
        if data.offset != self.offset:
            problem: ImgresumeError = OffsetMismatch(
                f"packet at offset {data.offset} but {self.offset} bytes are stored; "
                f"continue from {self.offset}",
                offset=self.offset,
            )
        elif end > self.size:
            problem = SizeExceeded(
                f"packet ends at {end}, past the declared size {self.size}",
                offset=self.offset,
            )
        elif integrity.checksum(self.checksum, data.payload) != data.crc32:
            problem = ChecksumMismatch(
                f"payload at offset {data.offset} does not match its "
                f"{integrity.title(self.checksum)}; resend it",
                offset=self.offset,
            )
        elif not data.payload:
            if self._sha256_in_finish:
                raise UnexpectedFrame(
                    "this upload was opened without its SHA-256: end it with "
                    "FINISH carrying the digest, not an empty DATA packet"
                )
            return self._on_end(None)
        else:
            self._answers.taken(end)
            self.offset = end
            return ChunkReceived(data.offset, data.payload, data.crc32, self.checksum)
        self._refuse_packet(problem)
        return None

    def _on_end(self, sha256: bytes | None) -> ServerEvent | None:
        """The client says every byte is sent (empty DATA, or FINISH)."""
        if self.offset < self.size:
            problem = Incomplete(
                f"end of upload signalled at {self.offset} of {self.size} bytes",
                offset=self.offset,
            )
            self._refuse_packet(problem)
            return None
        self._digest = sha256
        if self._answers:
            # Complete once the chunks before it are durable.
            self.state = ServerState.FINISHING
            return None
        self.state = ServerState.COMPLETING
        return FinishRequested(self.size, sha256)

    def _refuse_packet(self, problem: ImgresumeError) -> None:
        self._refused.append(Refusal(problem))
        for answer in self._answers.refused(error_frame(problem)):
            self._send(answer)

    # Answers from the caller ------------------------------------------------

    @property
    def hello(self) -> Hello | None:
        """The client's HELLO, once received."""
        return self._hello

    def challenge(self, nonce: bytes) -> None:
        """Authentication is required: send CHALLENGE and wait for AUTH."""
        self._expect(ServerState.CHECKING_HELLO)
        self._send(Challenge(self.server_id, nonce))
        self.state = ServerState.AWAIT_AUTH

    def accept_hello(self, options: dict[str, str] | None = None) -> None:
        """The client is welcome: send WELCOME with this server's limits."""
        self._expect(ServerState.CHECKING_HELLO, ServerState.CHECKING_AUTH)
        assert self._hello is not None
        self.client_id = self._hello.client_id
        self._send(welcome_frame(self.server_id, self.limits, self._welcome_options,
                                 options or {}))
        self._decoder.limit = control_limit(self.limits.max_payload, self.limits.put_limit)
        self.state = ServerState.READY

    @property
    def durable(self) -> int:
        """What the storage has made durable, as the last ACK (or ACCEPTED) reported it."""
        return self._answers.durable

    def upload_opened(
        self,
        upload_id: str,
        name: str,
        size: int,
        sha256: bytes | None,
        offset: int,
        tail: tuple[int, int, bytes] | None = None,
    ) -> None:
        """
        Storage created or resumed the upload: send ACCEPTED.  A C{sha256}
        of None means the client sends it at the end, in FINISH.
        """
        self._expect(ServerState.OPENING)
        start, length, digest = (
            tail if tail is not None else (0, 0, integrity.EMPTY_DIGESTS[self.digest]))
        self._send(Accepted(upload_id, name, size, sha256, offset, start, length, digest))
        self.upload_id, self.size, self.offset = upload_id, size, offset
        self._answers.durable = offset
        self._sha256_in_finish = sha256 is None
        self._digest = None
        self.state = ServerState.RECEIVING

    def upload_skipped(self, size: int, sha256: bytes, path: str) -> None:
        """
        The UPLOAD asked for C{if-exists} C{skip} and a completed file of
        its name has its size and SHA-256: send COMPLETED for that file
        (upload id L{SKIPPED_UPLOAD_ID}: no upload was made).
        """
        self._expect(ServerState.OPENING)
        self._send(Completed(SKIPPED_UPLOAD_ID, size, sha256, path))
        self._end_upload()

    def status_found(self, status: UploadStatusFrame) -> None:
        """Answer a STATUS request."""
        self._expect(ServerState.QUERYING)
        self._send(status)
        self.state = ServerState.READY

    def chunk_written(self, end: int, durable: int | None = None) -> None:
        """
        Storage is done with the oldest pending chunk, which ends at
        C{end}: acknowledge, then send any answers queued behind it.

        @param durable: what the ACK reports, if less than C{end}: a
            storage that commits in larger units (an object store's parts)
            holds the chunk but has made bytes durable only up to here.
            Never less than an earlier acknowledgement.
        """
        self._expect(ServerState.RECEIVING, ServerState.FINISHING)
        for answer in self._answers.written(end, durable):
            self._send(answer)

    def upload_completed(self, upload_id: str, size: int, sha256: bytes, path: str) -> None:
        """
        The upload is verified and in place (or was already; or the PUT's
        file is stored, or skipped): send COMPLETED.
        """
        self._expect(ServerState.COMPLETING, ServerState.OPENING)
        self._send(Completed(upload_id, size, sha256, path))
        self._end_upload()

    def put_stored(self, upload_id: str, size: int, sha256: bytes, path: str,
                   answered_as: str | None = None) -> None:
        """
        The PUT of C{upload_id} is stored (or skipped: C{answered_as} is
        then L{SKIPPED_UPLOAD_ID}): its COMPLETED goes once the PUTs before
        it are answered.
        """
        self._expect(ServerState.STORING)
        self._put_answered(upload_id, Completed(answered_as or upload_id, size, sha256, path))

    def put_failed(self, upload_id: str, error: ImgresumeError) -> ServerEvent | None:
        """
        Storing the PUT of C{upload_id} failed: its ERROR goes in its turn,
        or, for an error of connection scope, the connection closes now (a
        L{ConnectionFailed} is returned).
        """
        self._expect(ServerState.STORING)
        if error.scope is Scope.CONNECTION:
            return self._fail_connection(error)
        self._put_answered(upload_id, error_frame(error))
        return None

    def _put_answered(self, upload_id: str, answer: Completed | Error) -> None:
        self._puts.answer(upload_id, answer)
        for due in self._puts.ready():
            self._send(due)
        if not self._puts:
            self.upload_id = None
            self.state = ServerState.READY

    def fail(self, error: ImgresumeError) -> ServerEvent | None:
        """
        Answer the pending event with an error.  Its scope decides the next
        state: the connection closes (a L{ConnectionFailed} is returned), the
        upload ends on this connection, or (for a chunk or the end of the
        upload) the transfer goes on from C{error.offset}.
        """
        self._expect(ServerState.CHECKING_HELLO, ServerState.CHECKING_AUTH, ServerState.OPENING,
                     ServerState.QUERYING, ServerState.RECEIVING, ServerState.FINISHING,
                     ServerState.COMPLETING)
        receiving = self.state in (ServerState.RECEIVING, ServerState.FINISHING)
        if receiving and not self._answers.writing:
            raise RuntimeError("fail() in state receiving needs a chunk being written")
        if error.scope is Scope.CONNECTION or self.state in (
            ServerState.CHECKING_HELLO, ServerState.CHECKING_AUTH,
        ):
            return self._fail_connection(error)
        self._send(error_frame(error))
        if error.scope is Scope.TRANSFER and self.state is ServerState.COMPLETING:
            if not 0 <= error.offset <= self.size:
                raise RuntimeError(f"transfer error offset {error.offset} outside the upload")
            self.offset = error.offset
            self._answers.durable = min(self._answers.durable, error.offset)
            self.state = ServerState.RECEIVING
        else:
            self._end_upload()
        return None

    def close(self, error: ImgresumeError) -> ServerEvent:
        """End the connection with C{error} from any state (timeouts, shutdown)."""
        return self._fail_connection(error)

    # Output -------------------------------------------------------------

    def refusals(self) -> list[Refusal]:
        """
        The requests this machine refused by itself since the last call
        (each already answered with its ERROR frame), oldest first; clears
        the list.  Take them after each L{next_event}, before handling the
        event it returns: they came before it.
        """
        refused, self._refused = self._refused, []
        return refused

    def data_to_send(self) -> list[bytes]:
        """Bytes to write to the client, in order; clears the queue."""
        out, self._out = self._out, []
        return out

    # Internals -----------------------------------------------------------

    def _send(self, frame: Frame) -> None:
        self._out.append(encode(frame))

    def _end_upload(self) -> None:
        # Answers still owed to DATA frames are dropped: after an error that
        # ends the upload the client stops sending and reconnects.
        self._answers.clear()
        self.upload_id, self.size, self.offset = None, 0, 0
        self._sha256_in_finish = False
        self.state = ServerState.READY

    def _expect(self, *states: ServerState) -> None:
        if self.state not in states:
            raise RuntimeError(
                f"answer given in state {self.state.value}; expected "
                + " or ".join(s.value for s in states)
            )

    def _fail_connection(self, error: ImgresumeError) -> ServerEvent:
        if self.state is not ServerState.CLOSED:
            self._send(error_frame(error))
        self.state = ServerState.CLOSED
        self._puts.clear()
        self._parked = None
        return ConnectionFailed(error)

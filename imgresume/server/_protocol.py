# -*- test-case-name: tests.server.test_protocol,tests.server.test_memory,tests.test_tls -*-
"""
The Twisted adapter between a TCP (or TLS, or UNIX) connection and the
sans-IO L{ServerConnection}: it feeds received bytes to the machine, runs
the storage work each event asks for, writes the machine's answers, and
enforces the handshake and idle timeouts.  The policies are objects it owns
and calls, which answer with values: the handshake (C{_handshake}), the
decisions on commands (C{_commands}), the limits all connections share
(C{_admission}), when the connection reads, parses and waits for storage
(C{_flow}, over C{_batching}), the takeover of a silent connection's upload
(C{_takeover}), the upload's events (C{_upload_events}) and what is
reported of each storage answer (C{_outcomes}) or of a peer's faults
(C{_faults}).
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.protocols.policies import TimeoutMixin
from twisted.python.failure import Failure

from imgresume import integrity
from imgresume.errors import (
    DigestAlgorithmMismatch,
    ErrorCode,
    HandshakeRejected,
    ImgresumeError,
    InvalidName,
    Scope,
    ShuttingDown,
    Timeout,
    UploadAlreadyComplete,
)
from imgresume.logs import escape
from imgresume.protocol import (
    AuthReceived,
    ChunkReceived,
    ConnectionFailed,
    FinishRequested,
    HelloReceived,
    PutRequested,
    ResumeRequested,
    ServerConnection,
    ServerState,
    StatusRequested,
    UploadRequested,
)
from imgresume.server._commands import (
    Close,
    CommandPolicy,
    NameTakenAnswer,
    Skip,
    status_frame,
    unexpected,
)
from imgresume.server._batching import Written
from imgresume.server._faults import PeerFaults, describe_peer, peer_host
from imgresume.server._flow import ConnectionFlow
from imgresume.server._handshake import Accept, Challenge, Decision, is_health_check
from imgresume.server._interfaces import ServerSide
from imgresume.server._outcomes import UploadOutcomes
from imgresume.server._puts import ConnectionPuts
from imgresume.server._takeover import Takeover
from imgresume.server._upload_events import UploadEventContext
from imgresume.storage.interfaces import Chunk, IUploadWriter, NewUpload, StoredFile
from imgresume.tls import peer_certificate_identity


def _silent(*args: Any, **kwargs: Any) -> None:
    """A log method that logs nothing."""


#: The events that are commands a connection may refuse before storage is asked.
COMMANDS = (StatusRequested, UploadRequested, ResumeRequested, PutRequested)

#: Seconds a closing connection may take to flush before it is aborted.
CLOSE_GRACE = 5.0


class UploadServerProtocol(Protocol, TimeoutMixin):
    """
    One client connection on a server.  Built by
    L{imgresume.server._factory.UploadServerFactory}.

    What a connection may hold in memory is bounded: one batch of chunks
    being written, one being gathered (up to the factory's C{batch_limit}
    bytes), and in the machine's buffer the frame being received (or, while
    the next batch is full, up to one largest payload) plus one read.  All
    connections together hold at most the factory's C{chunk_memory_limit}.
    """

    log = Logger()

    def __init__(self, factory: ServerSide) -> None:
        self.factory = factory
        self.machine = ServerConnection(factory.server_id, factory.limits)
        self.callLater = factory.clock.callLater  # for TimeoutMixin
        self._handshake = factory.new_handshake()
        self._commands = CommandPolicy(factory.quota, lambda: self._handshake.health_only)
        self._flow = ConnectionFlow(factory.memory, factory.limits.max_payload, self.wake)
        self._events = UploadEventContext(factory.upload_event, factory.clock,
                                          factory.server_id)
        self._faults = PeerFaults(self.log, factory.peer_log, factory.metrics, self._events,
                                  lambda: peer_host(self.transport))
        self._outcomes = UploadOutcomes(self.machine, self._events, factory.metrics, self.log)
        self._puts = ConnectionPuts(self, factory, self._commands, self._faults, self.log,
                                    self._put_answered)
        self._writer: IUploadWriter | None = None
        self._pumping = False
        #: The transport is gone (see also L{_closing}).
        self._lost = False
        self._bytes_received = 0
        self._takeover = Takeover(factory.clock, factory.takeover_idle, self.log)
        #: Fires once the connection is gone and its upload released.
        self.closed: Deferred[None] = Deferred()

    @property
    def writer(self) -> Any:
        """The L{IUploadWriter} of the upload open on this connection, or None."""
        return self._writer

    @writer.setter
    def writer(self, value: Any) -> None:
        # The quota counts open uploads per client.
        if (self._writer is None) != (value is None):
            self.factory.quota.count(self.machine.client_id or "", +1 if value else -1)
        self._writer = value

    @property
    def _closing(self) -> bool:
        """The connection is closing: the machine closed it, or the transport is gone."""
        return self._lost or self.machine.state is ServerState.CLOSED

    # Connection lifecycle -------------------------------------------------

    @property
    def peer(self) -> str:
        """
        The client's address for logs, asked of the transport each time: a
        PROXY-protocol wrapper learns the real address only after
        C{connectionMade}.
        """
        return describe_peer(self.transport)

    def connectionMade(self) -> None:
        self.factory.connections.add(self)
        self.factory.metrics.connections.inc()
        if hasattr(self.transport, "setTcpKeepAlive"):
            self.transport.setTcpKeepAlive(True)  # notice dead peers at the TCP level too
        self.setTimeout(self.factory.handshake_timeout)

    def dataReceived(self, data: bytes) -> None:
        self._bytes_received += len(data)
        self.factory.metrics.received_bytes.inc(len(data))
        self._takeover.heard()
        if self.machine.client_id is not None and not self._closing:
            # Idle is time without a byte from the client (docs/protocol.md 3a).
            self.setTimeout(self.factory.idle_timeout)
        self._flow.feed(data)
        self.machine.receive_data(data)
        self._pump()

    def connectionLost(self, reason: Failure) -> None:
        self.factory.connections.discard(self)
        self.setTimeout(None)
        self._lost = True
        # Balancer health checks connect every few seconds: not logged; nor
        # (beyond a bounded rate) connections of peers at fault.
        quiet = self._faults.quiet_close(self.machine.hello, self.machine.client_id)
        emit = _silent if quiet else self.log.info
        emit("connection from {peer} closed after {bytes} bytes: {reason}",
             peer=self.peer, bytes=self._bytes_received, reason=reason.getErrorMessage())
        # Let the storage calls in flight finish, then give up ownership.
        d = DeferredList([self._flow.stop(), self._puts.stop()])
        d.addBoth(lambda _: self._release_writer())
        d.addBoth(lambda _: self.closed.callback(None))

    def wake(self) -> None:
        """The server has memory for received data again: go on reading and parsing."""
        if self._closing:
            self._flow.stop_waiting()
        else:
            self._pump()

    def check_takeover(self, now: float) -> None:
        """
        Called periodically by the factory: give the upload up if its client
        went silent and another connection asked for it (see L{Takeover}).
        """
        if self.writer is None or self._closing or not self._flow.idle:
            return
        asked = self._takeover.ask(self.writer, self.machine.upload_id, now)
        if asked is not None:
            self._run(asked, self._yield_if_requested)

    def _yield_if_requested(self, requested: bool) -> None:
        if requested:
            self.factory.metrics.takeover_yields.inc()
            error = self._takeover.yielded(self.machine.upload_id, self.peer)
            self._release_writer()  # now, not when a half-open socket finally closes
            self._close_with(error)

    def shutdown(self) -> None:
        """Called by the factory when the server stops: tell the client."""
        self._close_with(ShuttingDown("server is shutting down; reconnect to resume"))

    # The event loop -------------------------------------------------------

    def _pump(self) -> None:
        if self._pumping:
            return  # a storage call fired synchronously inside the loop below
        self._pumping = True
        try:
            while not self._closing and self._flow.may_take(self.machine.buffered,
                                                            self.factory.batch_limit):
                event = self.machine.next_event()
                for refusal in self.machine.refusals():  # they came before the event
                    self._faults.refused(refusal, self.machine.client_id,
                                         self.machine.upload_id)
                if event is None:
                    break
                self._dispatch(event)
        finally:
            self._pumping = False
        self._flush()
        if not self._lost:  # else connectionLost counted out what it held
            self._flow.follow(self.transport, self.machine.buffered, self.factory.batch_limit,
                              self._closing)

    def _dispatch(self, event: object) -> None:
        storage = self.factory.storage
        client_id = self.machine.client_id
        if isinstance(event, HelloReceived):
            self._decided(self._handshake.hello(
                event.hello, lambda: peer_certificate_identity(self.transport)))
        elif isinstance(event, AuthReceived):
            self._decided(self._handshake.auth(event.mac))
        elif isinstance(event, COMMANDS) and self._refused(event):
            pass
        elif isinstance(event, StatusRequested):
            self._run(storage.status(event.upload_id, client_id),
                      lambda st: self.machine.status_found(status_frame(
                          st, self.machine.hello.options if self.machine.hello else {})))
        elif isinstance(event, UploadRequested):
            self._upload_requested(event)
        elif isinstance(event, PutRequested):
            self._puts.start(event)
        elif isinstance(event, ResumeRequested):
            self._events.requested(client_id, event)
            self._run(storage.resume(event.upload_id, client_id), self._opened, resumed=True)
        elif isinstance(event, ChunkReceived):
            self._flow.batches.add(Chunk(event.offset, event.payload, event.crc32, event.checksum))
            self._write_next()
        elif isinstance(event, FinishRequested):
            self._run(self.writer.complete(event.sha256), self._completed)
        elif isinstance(event, ConnectionFailed):
            self._after_fatal(event.error)

    def _upload_requested(self, event: UploadRequested) -> None:
        """A new upload: refused at once for a name storage would refuse, else created."""
        self._events.requested(self.machine.client_id, event, self.machine.digest)
        request = self._commands.new_upload(event.upload, self.machine.client_id,
                                            self.machine.digest, self.machine.checksum)
        if isinstance(request, InvalidName):
            self._storage_failed(Failure(request))
        elif event.if_exists == "rename":
            self._create(request)
        else:
            self._run(self.factory.storage.find_completed(request.name, request.size,
                                                          request.digest),
                      self._found, request=request, policy=event.if_exists)

    def _put_answered(self, fatal: ImgresumeError | None) -> None:
        """A PUT is answered (its answer queued in the machine): send, go on."""
        if fatal is not None:
            self._after_fatal(fatal)
        elif not self._pumping:
            self._pump()

    def _create(self, request: NewUpload) -> None:
        """Create the upload, within its client's limits on incomplete uploads."""
        admitted = self._outcomes.admitted
        self._run(self.factory.incomplete.create(self.factory.storage, request,
                                                 lambda: admitted(request)),
                  self._opened, resumed=False)

    def _run(self, d: Deferred[Any], on_success: Any, **kw: Any) -> None:
        """Run one storage call; the loop stops until it fires."""
        busy = self._flow.wait()

        def done(result: Any) -> None:
            self._flow.waited()
            if isinstance(result, Failure):
                self._storage_failed(result)
            elif not self._closing:
                on_success(result, **kw)
            elif IUploadWriter.providedBy(result):
                result.release()  # the client left while storage opened it
            busy.callback(None)
            self._pump()

        d.addBoth(done)

    def _write_next(self) -> None:
        """Start writing the gathered chunks, unless a batch is being written."""
        if self._closing:
            return
        writing = self._flow.batches.write_next(self.writer)
        if writing is not None:
            writing.addBoth(self._batch_done)

    def _batch_done(self, result: list[Written] | Failure) -> None:
        if isinstance(result, Failure):
            if not self._closing:
                self._storage_failed(result)
        elif not self._closing:
            for chunk in result:
                self._outcomes.written(chunk)
        self._write_next()
        self._pump()

    # The handshake ------------------------------------------------------

    def _decided(self, decision: Decision) -> None:
        """Carry out the handshake's decision on a HELLO or an AUTH."""
        if isinstance(decision, Challenge):
            self.machine.challenge(decision.nonce)
        elif isinstance(decision, Accept):
            self.machine.accept_hello(decision.options)
            self.setTimeout(self.factory.idle_timeout)
            emit = _silent if is_health_check(self.machine.hello) else self.log.info
            emit("handshake from {peer}: client {client}{how}",
                 peer=self.peer, client=escape(self.machine.client_id), how=decision.how)
        else:
            hello = self.machine.hello
            if self._faults.fatal(ErrorCode.HANDSHAKE_REJECTED):
                self.log.warn("handshake from {peer} refused: client {client}: {reason}",
                              peer=self.peer, reason=escape(decision.reason),
                              client=escape(hello.client_id) if hello else None)
            self._fail(HandshakeRejected(decision.message))

    def _refused(self, event: Any) -> bool:
        """
        Refuse a command from a health-check session, or an UPLOAD or RESUME
        from a client that already has its share of uploads open.
        """
        client_id = self.machine.client_id
        refusal = self._commands.refusal(
            client_id, opens_upload=not isinstance(event, StatusRequested))
        if refusal is None:
            return False
        if isinstance(event, PutRequested):
            fatal = self._puts.refuse(event, refusal.error)
            if fatal is not None:
                self._after_fatal(fatal)
            elif not isinstance(refusal, Close):
                self._faults.warn(refusal.error.code, "client {client} is over its quota "
                                  "of {limit} open uploads", client=escape(client_id or ""),
                                  limit=refusal.limit)
            return True
        if isinstance(refusal, Close):
            self._fail(refusal.error)
            return True
        self._faults.warn(refusal.error.code, "client {client} is over its quota of "
                          "{limit} open uploads", client=escape(client_id or ""),
                          limit=refusal.limit)
        self._events.requested(client_id, event, self.machine.digest)
        self._events.failed(refusal.error)
        self.machine.fail(refusal.error)
        return True

    # Answers from storage -------------------------------------------------

    def _found(self, found: StoredFile | None, request: NewUpload, policy: str) -> None:
        """What lies at the name of an UPLOAD whose if-exists policy is skip or fail."""
        answer = self._commands.if_exists(found, request.sha256, policy)
        if isinstance(answer, NameTakenAnswer):
            self._outcomes.name_taken(answer)
        elif isinstance(answer, Skip):
            self._outcomes.skipped(answer.found)
        else:
            self._create(request)

    def _opened(self, writer: IUploadWriter, resumed: bool) -> None:
        self.writer = writer
        info = writer.info
        if self._other_digest(info.upload_id, info.digest):
            return
        self._outcomes.opened(writer, resumed)

    def _completed(self, completed: Any) -> None:
        # Without a writer: a resume answered from an earlier completion.
        repeat, self.writer = self.writer is None, None
        self._outcomes.completed(completed, repeat)

    def _storage_failed(self, failure: Failure) -> None:
        error = failure.value
        if isinstance(error, UploadAlreadyComplete):
            if not self._other_digest(error.completed.upload_id, error.completed.digest):
                self._completed(error.completed)
            return
        if not isinstance(error, ImgresumeError):
            self.log.failure("storage call failed unexpectedly", failure)
            error = unexpected(error)
        # Which upload, as far as this connection knows it, and what happened.
        upload, fields = self._events.describe()
        self._faults.warn(error.code, "{upload}: error {code}: {error}", upload=upload,
                          code=error.code.name, error=escape(error.message), **fields)
        if error.scope is not Scope.TRANSFER and self.writer is not None:
            self._release_writer()
        if self._closing:
            return
        event = self.machine.fail(error)
        if self.machine.upload_id is None:
            self._events.failed(error)  # the upload ended on this connection
        if isinstance(event, ConnectionFailed):
            self._after_fatal(error)

    def _other_digest(self, upload_id: str, digest: str) -> bool:
        """
        Refuse a resumed upload whose digest is not this connection's
        (docs/protocol.md, section 2b); say whether it was refused.
        """
        if digest == self.machine.digest:
            return False
        self._storage_failed(Failure(DigestAlgorithmMismatch(
            integrity.mismatch_message(upload_id, digest, self.machine.digest))))
        return True

    def _release_writer(self) -> Deferred[None]:
        writer, self.writer = self.writer, None
        if writer is None:
            return succeed(None)
        return writer.release().addErrback(
            lambda f: self.log.failure("releasing upload failed", f))

    # Output, backpressure, timeouts ------------------------------------

    def _flush(self) -> None:
        out = self.machine.data_to_send()
        if out and self.transport is not None:
            self.transport.writeSequence(out)

    def timeoutConnection(self) -> None:
        """
        The connection's one timer ran out: the handshake or idle timeout
        while it is open, the grace to flush and close once it is closing.
        """
        if self._closing:
            self.transport.abortConnection()  # not closed within CLOSE_GRACE
            return
        if self._flow.server_side_wait or self._puts.in_flight:
            # Storage is slow (or this server stopped reading), not the
            # client: wait for it.
            self.setTimeout(self.factory.idle_timeout)
            return
        self._close_with(Timeout(f"no frame for too long in state {self.machine.state.value}"))

    def _fail(self, error: ImgresumeError) -> None:
        """Answer the event in progress with C{error}; close if it ends the connection."""
        event = self.machine.fail(error)
        if isinstance(event, ConnectionFailed):
            self._after_fatal(event.error)

    def _close_with(self, error: ImgresumeError) -> None:
        if self._closing:
            return
        self.machine.close(error)
        self._after_fatal(error)

    def _after_fatal(self, error: ImgresumeError) -> None:
        """The machine closed the connection with C{error}: flush it and close."""
        self.factory.metrics.connection_errors.inc(code=error.code.name)
        if self._faults.fatal(error.code):
            self.log.warn("closing connection from {peer}: {code}: {message}",
                          peer=self.peer, code=error.code.name, message=escape(error.message))
        self._events.failed(error)
        self._flush()
        self._flow.release_transport(self.transport)
        self.transport.loseConnection()
        self.setTimeout(CLOSE_GRACE)  # then abort; connectionLost cancels it

# -*- test-case-name: tests.server.test_protocol,tests.server.test_memory,tests.test_tls -*-
"""
The Twisted adapter between a TCP (or TLS, or UNIX) connection and the
sans-IO L{ServerConnection}: it feeds received bytes to the machine, runs the
storage work each event asks for, writes the machine's answers, pauses the
transport while storage is busy and enforces the handshake and idle
timeouts.
"""

from __future__ import annotations

import os
from typing import Any

from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from imgresume.errors import (
    HandshakeRejected,
    ImgresumeError,
    InternalError,
    QuotaExceeded,
    Scope,
    ShuttingDown,
    Timeout,
    UploadAlreadyComplete,
    UploadTakenOver,
)
from imgresume.metrics import Registry, ServerMetrics
from imgresume.protocol import (
    HEALTH_CHECK_CLIENT_IDS,
    LATE_DIGEST,
    AuthReceived,
    ChunkReceived,
    ConnectionFailed,
    FinishRequested,
    HelloReceived,
    ResumeRequested,
    ServerConnection,
    ServerLimits,
    StatusRequested,
    UploadRequested,
    UploadStatusFrame,
)
from imgresume.protocol import _auth as auth
from imgresume.protocol._decoder import FrameCursor, control_limit
from imgresume.server._hooks import upload_event
from imgresume.storage.interfaces import IUploadStorage, IUploadWriter, NewUpload
from imgresume.tls import peer_certificate_identity



def _silent(*args: Any, **kwargs: Any) -> None:
    """A log method that logs nothing."""

#: Seconds a closing connection may take to flush before it is aborted.
CLOSE_GRACE = 5.0
#: Default memory for received data, all connections together (see
#: L{UploadServerFactory.chunk_memory_limit}).
DATA_MEMORY = 32 * 1024 * 1024
#: Frames up to this size (header included) are let in without waiting for
#: room: every control frame (a balancer's health check gets its PONG however
#: busy the server is) and the last, short chunk of a file.
SMALL_FRAME = 64 * 1024


class UploadServerProtocol(Protocol):
    """
    One client connection on a server.  Built by L{UploadServerFactory}.

    Chunks are written in batches: while one batch is being made durable
    (on the disk thread), the chunks that arrive meanwhile are gathered into
    the next, which is then written with one flush for all of them (group
    commit).  Every other storage operation runs alone.  What a connection
    may hold in memory is bounded: one batch being written, one being
    gathered (up to L{UploadServerFactory.batch_limit} bytes), and in the
    machine's buffer the frame being received (or, while the next batch is
    full, up to one largest payload) plus one read; beyond that the server
    stops reading.  All connections together hold at most
    L{UploadServerFactory.chunk_memory_limit} of received data: a frame is
    let in only once the server has room for all of it (see L{_admit}).
    """

    log = Logger()

    def __init__(self, factory: "UploadServerFactory") -> None:
        self.factory = factory
        self.machine = ServerConnection(factory.server_id, factory.limits)
        self._writer: Any = None  # IUploadWriter while an upload is open
        self._health_only = False
        self._busy: Deferred[Any] | None = None
        #: The batch of chunks being written, as a Deferred; and the next one.
        self._writing: Deferred[None] | None = None
        self._batch: list[tuple[int, bytes, int]] = []
        self._batch_bytes = 0
        self._pumping = False
        self._paused = False
        #: Where frames begin in the received bytes; the frame (by number)
        #: with room reserved for it; what this connection's buffer counts
        #: in the factory's chunk_bytes.
        self._cursor = FrameCursor(control_limit(factory.limits.max_payload))
        self._admitted = 0
        self._held = 0
        self._closing = False
        self._timer: IDelayedCall | None = None
        self._abort_call: IDelayedCall | None = None
        self._bytes_received = 0
        self._server_nonce: bytes | None = None
        self._last_heard = factory.clock.seconds()
        #: What an UPLOAD or RESUME asked for and storage answered, for the
        #: events of the upload in progress on this connection (None: none).
        self._upload: dict[str, Any] | None = None
        #: Fires once the connection is gone and its upload released.
        self.closed: Deferred[None] = Deferred()

    @property
    def writer(self) -> Any:
        """The L{IUploadWriter} of the upload open on this connection, or None."""
        return self._writer

    @writer.setter
    def writer(self, value: Any) -> None:
        # The factory counts open uploads per client for the quota.
        if (self._writer is None) != (value is None):
            self.factory.count_upload(self.machine.client_id or "", +1 if value else -1)
        self._writer = value

    # Connection lifecycle -------------------------------------------------

    @property
    def peer(self) -> str:
        """
        The client's address for logs, asked of the transport each time: a
        PROXY-protocol wrapper learns the real address only after
        C{connectionMade}.
        """
        if self.transport is None:
            return "?"
        address = self.transport.getPeer()
        host = getattr(address, "host", None)
        if host is None:
            return str(getattr(address, "name", None) or "local")
        return f"[{host}]:{address.port}" if ":" in host else f"{host}:{address.port}"

    def connectionMade(self) -> None:
        self.factory.connections.add(self)
        self.factory.metrics.connections.inc()
        if hasattr(self.transport, "setTcpKeepAlive"):
            self.transport.setTcpKeepAlive(True)  # notice dead peers at the TCP level too
        self._reset_timer(self.factory.handshake_timeout)

    def dataReceived(self, data: bytes) -> None:
        self._bytes_received += len(data)
        self.factory.metrics.received_bytes.inc(len(data))
        self._last_heard = self.factory.clock.seconds()
        self._cursor.feed(data)
        self.machine.receive_data(data)
        self._pump()

    def connectionLost(self, reason: Failure) -> None:
        self.factory.connections.discard(self)
        self._cancel_timer()
        if self._abort_call is not None and self._abort_call.active():
            self._abort_call.cancel()
        self._closing = True
        # Balancer health checks connect every few seconds: not logged.
        emit = _silent if self._is_health_check() else self.log.info
        emit(
            "connection from {peer} closed after {bytes} bytes: {reason}",
            peer=self.peer, bytes=self._bytes_received,
            reason=reason.getErrorMessage(),
        )
        # Let the storage calls in flight finish, then give up ownership.
        in_flight = [d for d in (self._busy, self._writing) if d is not None]
        self.factory.stop_waiting(self)
        self._drop_gathered()
        held, self._held = self._held, 0
        self.factory.chunks_released(held)
        d: Deferred[Any] = DeferredList(in_flight) if in_flight else succeed(None)
        d.addBoth(lambda _: self._release_writer())
        d.addBoth(lambda _: self.closed.callback(None))

    def wake(self) -> None:
        """The server has memory for received data again: go on reading and parsing."""
        if self._closing:
            self.factory.stop_waiting(self)
        else:
            self._pump()

    def check_takeover(self, now: float) -> None:
        """
        Called periodically by the factory.  If this connection holds an
        upload but its client has been silent for C{takeover_idle} seconds
        and another connection asked for the upload, give it up: the client
        has most likely reconnected elsewhere and this connection is a
        zombie (half-open TCP) whose late packets must never be written.
        """
        if (
            self.writer is None or self._busy is not None or self._closing
            or self._writing is not None or self._batch
            or now - self._last_heard < self.factory.takeover_idle
        ):
            return
        asked = self.writer.takeover_requested()

        def unknown(failure: Failure) -> bool:
            # Cannot tell (storage hiccup): keep the upload, ask again later.
            self.log.warn("upload {upload_id}: cannot check for a takeover request: "
                          "{error}", upload_id=self.machine.upload_id,
                          error=failure.getErrorMessage())
            return False

        self._run(asked.addErrback(unknown), self._yield_if_requested)

    def _yield_if_requested(self, requested: bool) -> None:
        if not requested:
            return
        self.factory.metrics.takeover_yields.inc()
        upload_id = self.machine.upload_id
        self.log.warn(
            "upload {upload_id}: yielding to a newer connection; {peer} has been "
            "silent for {idle:.1f} s",
            upload_id=upload_id, peer=self.peer,
            idle=self.factory.clock.seconds() - self._last_heard,
        )
        self._release_writer()  # now, not when a half-open socket finally closes
        self._close_with(UploadTakenOver(
            f"upload {upload_id} was taken over by a newer connection after this one "
            "went silent; reconnect and resume"
        ))

    def shutdown(self) -> None:
        """Called by the factory when the server stops: tell the client."""
        self._close_with(ShuttingDown("server is shutting down; reconnect to resume"))

    # The event loop -------------------------------------------------------

    def _pump(self) -> None:
        if self._pumping:
            return  # a storage call fired synchronously inside the loop below
        self._pumping = True
        try:
            while not self._stalled() and not self._closing and self._may_parse():
                event = self.machine.next_event()
                if event is None:
                    break
                self._dispatch(event)
        finally:
            self._pumping = False
        self._flush()
        self._apply_backpressure()

    def _dispatch(self, event: object) -> None:
        storage: IUploadStorage = self.factory.storage
        if isinstance(event, HelloReceived):
            self._on_hello(event)
        elif isinstance(event, AuthReceived):
            self._on_auth(event)
        elif isinstance(event, StatusRequested) and self._health_only:
            self._refused(event)
        elif isinstance(event, StatusRequested):
            self._run(storage.status(event.upload_id, self.machine.client_id),
                      self._status_found)
        elif isinstance(event, (UploadRequested, ResumeRequested)) and self._refused(event):
            pass
        elif isinstance(event, UploadRequested):
            up = event.upload
            self.log.info(
                "upload requested: {name} ({size} bytes) by {client}",
                name=up.name, size=up.size, client=self.machine.client_id,
            )
            request = NewUpload(
                up.name, up.size, None if up.sha256 == LATE_DIGEST else up.sha256,
                up.metadata, self.machine.client_id or "",
            )
            self._begin_upload(event)
            self._run(storage.create(request), self._opened, resumed=False)
        elif isinstance(event, ResumeRequested):
            self._begin_upload(event)
            self._run(
                storage.resume(event.upload_id, self.machine.client_id),
                self._opened, resumed=True,
            )
        elif isinstance(event, ChunkReceived):
            self._batch.append((event.offset, event.payload, event.crc32))
            self._batch_bytes += len(event.payload)
            self.factory.chunk_bytes += len(event.payload)
            self._write_batch()
        elif isinstance(event, FinishRequested):
            self._run(self.writer.complete(event.sha256), self._completed)
        elif isinstance(event, ConnectionFailed):
            self._after_fatal(event.error)

    def _on_hello(self, event: HelloReceived) -> None:
        if self.factory.cert_identity:
            # --cert-identity: a verified TLS client certificate names the
            # client (its subject CN, see imgresume.tls) and is its credential.
            identity = peer_certificate_identity(self.transport)
            client_id = event.hello.client_id
            if identity is not None and client_id != identity:
                self._reject(
                    f"client id {client_id} does not match the certificate's identity "
                    f"{identity[:128]}",
                    reason=f"certificate identity is {identity[:128]}",
                )
                return
            if identity is None and self.factory.keys is None:
                self._reject(
                    "this server identifies clients by their TLS client certificate "
                    "(subject CN): connect with one",
                    reason="no verified client certificate with a CN",
                )
                return
            if identity is not None and (
                self.factory.keys is None or "auth" not in event.hello.options
            ):
                self._welcome(how=" (client certificate)")
                return
            # Otherwise a key is checked as well (a client with a key expects
            # the server to prove it knows it).
        if self.factory.keys is None:
            self._welcome()
            return
        options = event.hello.options
        if event.hello.client_id in HEALTH_CHECK_CLIENT_IDS and "auth" not in options:
            # A balancer's health check: welcome it for PING only, so that
            # checking a server that requires keys needs no key.
            self._health_only = True
            self._welcome(how=" (health check only)")
            return
        if options.get("auth") != auth.METHOD or not auth.NONCE_RE.match(
            options.get("nonce", "")
        ):
            self._reject(
                "this server requires authentication (hmac-sha256): give the client "
                "its key",
                reason="client did not offer authentication",
            )
            return
        self._server_nonce = os.urandom(32)
        self.machine.challenge(self._server_nonce)

    def _on_auth(self, event: AuthReceived) -> None:
        hello = self.machine.hello
        assert hello is not None and self._server_nonce is not None
        key = self.factory.keys.lookup(hello.client_id)
        client_nonce = bytes.fromhex(hello.options["nonce"])
        if key is None or not auth.same(event.mac, auth.client_proof(
            key, self._server_nonce, client_nonce, hello.client_id, self.factory.server_id,
        )):
            self._reject(
                "authentication failed: unknown or revoked client id, or wrong key",
                reason="unknown or revoked client" if key is None else "wrong proof",
            )
            return
        self._welcome({"auth-proof": auth.server_proof(
            key, self._server_nonce, client_nonce, hello.client_id, self.factory.server_id,
        ).hex()})

    def _reject(self, message: str, reason: str) -> None:
        hello = self.machine.hello
        self.log.warn(
            "handshake from {peer} refused: client {client}: {reason}",
            peer=self.peer, client=hello.client_id if hello else None, reason=reason,
        )
        event = self.machine.fail(HandshakeRejected(message))
        if isinstance(event, ConnectionFailed):
            self._after_fatal(event.error)

    def _is_health_check(self) -> bool:
        hello = self.machine.hello
        return hello is not None and hello.client_id in HEALTH_CHECK_CLIENT_IDS

    def _welcome(self, options: dict[str, str] | None = None, how: str = "") -> None:
        if options:  # the key's proof: this client authenticated
            how = " (authenticated)"
        # The deepest window of DATA packets this server wants in flight.
        options = {**(options or {}), "window": str(self.factory.max_window)}
        self.machine.accept_hello(options)
        self._reset_timer(self.factory.idle_timeout)
        emit = _silent if self._is_health_check() else self.log.info
        emit(
            "handshake from {peer}: client {client}{how}",
            peer=self.peer, client=self.machine.client_id, how=how,
        )

    def _run(self, d: Deferred[Any], on_success: Any, **kw: Any) -> None:
        """Run one storage call; the loop stops until it fires."""
        busy: Deferred[Any] = Deferred()
        self._busy = busy

        def done(result: Any) -> None:
            self._busy = None
            if isinstance(result, Failure):
                self._storage_failed(result)
            elif not self._closing:
                on_success(result, **kw)
            elif IUploadWriter.providedBy(result):
                result.release()  # the client left while storage opened it
            busy.callback(None)
            self._pump()

        d.addBoth(done)

    def _stalled(self) -> bool:
        """
        Whether to stop taking events: storage busy, or the next batch full.
        (Frames already received are taken even when the server's memory is
        used up: they are counted in it already.)
        """
        return self._busy is not None or self._batch_bytes >= self.factory.batch_limit

    def _admit(self) -> tuple[bool, bool]:
        """
        Count what this connection's buffer holds in the server's memory for
        received data, reserving room for the frame arriving once it fits;
        return (may go on reading, waits for the server's memory).

        A frame whose header is in counts whole from the moment it is let
        in: at once if it is small, else when the server has room for the
        rest of it, or holds nothing else.  Until then the connection stops
        reading and waits for room, and the bytes of that frame it has (at
        most one read) are not counted, so that connections waiting cannot
        keep one another out.  A stalled connection reads ahead only while
        its buffer holds less than one largest payload.
        """
        factory, cursor = self.factory, self._cursor
        if self not in factory.connections:
            return False, False  # lost: connectionLost counted its bytes out
        buffered = self.machine.buffered
        ahead = not self._stalled() or buffered < factory.limits.max_payload
        if cursor.remaining and ahead:
            self._let_in()
        admitted = self._admitted == cursor.frames
        if admitted:
            held = buffered + cursor.remaining
        elif cursor.remaining:
            held = max(0, buffered - (cursor.size - cursor.remaining))
        else:
            held = buffered
        factory.chunk_bytes += held - self._held
        self._held = held
        if cursor.remaining:
            return admitted, ahead and not admitted
        return ahead, False

    def _let_in(self) -> bool:
        """
        Whether the frame arriving is let in: it is if it is small, or once
        the server has room for the rest of it, or holds nothing else.
        """
        factory, cursor = self.factory, self._cursor
        if self._admitted != cursor.frames:
            others = factory.chunk_bytes - self._held
            if cursor.size <= SMALL_FRAME or others <= 0 or (
                others + self.machine.buffered + cursor.remaining
                <= factory.chunk_memory_limit
            ):
                self._admitted = cursor.frames
        return self._admitted == cursor.frames

    def _may_parse(self) -> bool:
        """
        Whether the machine may parse on: not into a frame that is not let
        in, so that nothing is buffered for its body (the decoder may give a
        large frame a buffer of its own as soon as it parses the header).
        """
        cursor = self._cursor
        if not cursor.remaining or self._admitted == cursor.frames:
            return True
        if self.machine.buffered > cursor.size - cursor.remaining:
            return True  # whole frames before it come first
        return self._let_in()

    def _drop_gathered(self) -> None:
        """Forget the chunks gathered for the next batch (never to be written)."""
        dropped, self._batch, self._batch_bytes = self._batch_bytes, [], 0
        if dropped:
            self.factory.chunks_released(dropped)

    def _write_batch(self) -> None:
        """Start writing the gathered chunks, unless a batch is being written."""
        if self._writing is not None or not self._batch or self._closing:
            return
        batch, self._batch, self._batch_bytes = self._batch, [], 0
        writing: Deferred[None] = Deferred()
        self._writing = writing

        def done(result: Any) -> None:
            self._writing = None
            self.factory.chunks_released(sum(len(c[1]) for c in batch))
            if isinstance(result, Failure):
                self._drop_gathered()  # the upload ends here
                if not self._closing:
                    self._storage_failed(result)
            elif not self._closing:
                # The storage reports how far bytes are durable: the batch's
                # end, or less for one that commits in larger units.
                for offset, payload, _ in batch:
                    end = offset + len(payload)
                    self._chunk_written(end, size=len(payload), durable=min(result, end))
            writing.callback(None)
            self._write_batch()
            self._pump()

        self.writer.write_batch(batch).addBoth(done)

    def _refused(self, event: object) -> bool:
        """
        Refuse an UPLOAD or RESUME from a health-check session, or from a
        client that already has its share of uploads open.
        """
        if self._health_only:
            failed = self.machine.fail(HandshakeRejected(
                "this connection was welcomed as a health check and may only PING"))
            if isinstance(failed, ConnectionFailed):
                self._after_fatal(failed.error)
            return True
        limit = self.factory.max_uploads_per_client
        client = self.machine.client_id or ""
        if not limit or self.factory.open_uploads(client) < limit:
            return False
        self.log.warn("client {client} is over its quota of {limit} open uploads",
                      client=client, limit=limit)
        error = QuotaExceeded(
            f"client {client} already has {limit} uploads open on this server; "
            "finish one first", retry_after=5.0,
        )
        self._begin_upload(event)
        self._upload_failed(error)
        self.machine.fail(error)
        return True

    def _status_found(self, st: Any) -> None:
        self.machine.status_found(UploadStatusFrame(
            st.upload_id, st.name, st.size, st.state == "complete", st.offset, st.busy,
            st.owner, int(st.created * 1000), int(st.updated * 1000), st.path,
        ))

    def _opened(self, writer: IUploadWriter, resumed: bool) -> None:
        self.writer = writer
        info, tail = writer.info, writer.tail
        self.machine.upload_opened(
            info.upload_id, info.name, info.size,
            LATE_DIGEST if info.sha256 is None else info.sha256, writer.offset,
            (tail.start, tail.length, tail.sha256),
        )
        self.log.info(
            "{how} upload {upload_id} ({name}) at offset {offset} of {size}",
            how="resumed" if resumed else "created", upload_id=info.upload_id,
            name=info.name, offset=writer.offset, size=info.size,
        )
        self._upload = {
            "upload_id": info.upload_id, "name": info.name, "size": info.size,
            "sha256": info.sha256, "metadata": info.metadata, "offset": writer.offset,
        }
        self._notify("upload.resumed" if resumed else "upload.created")

    def _chunk_written(self, offset: int, size: int, durable: int) -> None:
        self.factory.metrics.stored_bytes.inc(size)
        if self._upload is not None:
            self._upload["offset"] = durable  # what an event reports
        self.machine.chunk_written(offset, durable)

    def _completed(self, completed: Any) -> None:
        # Without a writer: a resume answered from an earlier completion.
        self._notify(
            "upload.completed", upload_id=completed.upload_id, name=completed.name,
            size=completed.size, sha256=completed.sha256, offset=completed.size,
            path=completed.path, repeat=self.writer is None,
        )
        self._upload = None
        self.writer = None
        self.machine.upload_completed(
            completed.upload_id, completed.size, completed.sha256, completed.path
        )
        self.log.info(
            "completed upload {upload_id}: {path} ({size} bytes, sha256 {sha256})",
            upload_id=completed.upload_id, path=completed.path,
            size=completed.size, sha256=completed.sha256.hex(),
        )

    def _storage_failed(self, failure: Failure) -> None:
        error = failure.value
        if isinstance(error, UploadAlreadyComplete):
            self._completed(error.completed)
            return
        if not isinstance(error, ImgresumeError):
            self.log.failure("storage call failed unexpectedly", failure)
            error = InternalError(
                f"unexpected {type(error).__name__} on the server; nothing stored is lost"
            )
        self.log.warn(
            "upload {upload_id} error {code}: {message}",
            upload_id=self.machine.upload_id, code=error.code.name, message=error.message,
        )
        if error.scope is not Scope.TRANSFER and self.writer is not None:
            self._release_writer()
        if self._closing:
            return
        event = self.machine.fail(error)
        if self.machine.upload_id is None:
            self._upload_failed(error)  # the upload ended on this connection
        if isinstance(event, ConnectionFailed):
            self._after_fatal(error)

    # Output, backpressure, timeouts ------------------------------------

    def _flush(self) -> None:
        out = self.machine.data_to_send()
        if out and self.transport is not None:
            self.transport.writeSequence(out)

    def _apply_backpressure(self) -> None:
        held = self._held
        may_read, waits = self._admit()
        want_pause = not may_read
        if waits and not self._closing:
            self.factory.wait_for_memory(self)
        else:
            self.factory.stop_waiting(self)
        if want_pause and not self._paused and not self._closing:
            self.transport.pauseProducing()
            self._paused = True
        elif self._paused and not want_pause:
            self.transport.resumeProducing()
            self._paused = False
        if not self._closing and self.machine.client_id is not None:
            self._reset_timer(self.factory.idle_timeout)
        if self._held < held:
            self.factory.wake_waiting()

    def _reset_timer(self, seconds: float) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.reset(seconds)
        else:
            self._timer = self.factory.clock.callLater(seconds, self._timed_out)

    def _cancel_timer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def _timed_out(self) -> None:
        self._timer = None
        if self._busy is not None or self._writing is not None:
            # Storage is slow, not the client: wait for it.
            self._reset_timer(self.factory.idle_timeout)
            return
        self._close_with(Timeout(f"no frame for too long in state {self.machine.state.value}"))

    def _close_with(self, error: ImgresumeError) -> None:
        if self._closing:
            return
        self.machine.close(error)
        self._after_fatal(error)

    def _after_fatal(self, error: ImgresumeError) -> None:
        self.log.warn(
            "closing connection from {peer}: {code}: {message}",
            peer=self.peer, code=error.code.name, message=error.message,
        )
        self._upload_failed(error)
        self._flush()
        self._closing = True
        self._cancel_timer()
        if self._paused:
            self.transport.resumeProducing()
            self._paused = False
        self.transport.loseConnection()
        self._abort_call = self.factory.clock.callLater(CLOSE_GRACE, self._abort_if_open)

    def _abort_if_open(self) -> None:
        self._abort_call = None
        if self in self.factory.connections:
            self.transport.abortConnection()

    # Upload events (metrics and hooks) ------------------------------------

    def _begin_upload(self, event: UploadRequested | ResumeRequested) -> None:
        """Remember what an UPLOAD or RESUME asks for, for its events."""
        if isinstance(event, UploadRequested):
            up = event.upload
            self._upload = {"upload_id": None, "name": up.name, "size": up.size,
                            "sha256": up.sha256, "metadata": up.metadata, "offset": 0}
        else:
            self._upload = {"upload_id": event.upload_id}

    def _upload_failed(self, error: ImgresumeError) -> None:
        """The upload asked for or open on this connection ended with C{error}."""
        if self._upload is not None:
            self._notify("upload.failed", error=error)
            self._upload = None

    def _notify(self, kind: str, **fields: Any) -> None:
        """Hand one event about this connection's upload to the factory."""
        context: dict[str, Any] = dict.fromkeys(
            ("upload_id", "name", "size", "sha256", "metadata", "offset"))
        context.update(self._upload or {})
        context.update(fields)
        self.factory.upload_event(upload_event(
            kind, time=self.factory.clock.seconds(), server_id=self.factory.server_id,
            client_id=self.machine.client_id, **context,
        ))

    def _release_writer(self) -> Deferred[None]:
        writer, self.writer = self.writer, None
        if writer is None:
            return succeed(None)
        return writer.release().addErrback(
            lambda f: self.log.failure("releasing upload failed", f)
        )


class UploadServerFactory(Factory):
    """
    Builds L{UploadServerProtocol}s for one server.  Created by
    L{imgresume.server.makeServerService} (and by tests with a memory storage
    and a fake clock).
    """

    def __init__(
        self,
        storage: IUploadStorage,
        server_id: str,
        clock: IReactorTime,
        limits: ServerLimits = ServerLimits(),
        handshake_timeout: float = 30.0,
        idle_timeout: float = 300.0,
        takeover_idle: float = 10.0,
        takeover_check_interval: float = 1.0,
        keys: Any = None,
        cert_identity: bool = False,
        max_uploads_per_client: int = 64,
        metrics: ServerMetrics | None = None,
        events: Any = None,
    ) -> None:
        """
        @param keys: a L{imgresume.keys.KeyStore}: when given, every client
            must authenticate with its key in the handshake.
        @param cert_identity: a client with a verified TLS certificate (an
            C{mtls:} listener) must use the certificate's identity as its
            client id, and needs no key: the certificate is its credential.
        @param takeover_idle: a connection silent for this long gives up its
            upload when another connection asks for it.
        @param takeover_check_interval: how often connections are checked.
        @param metrics: where this server's counters go (default: a registry
            of its own, nobody scrapes).
        @param events: an L{imgresume.server._hooks.IUploadEvents} told about
            every upload created, resumed, completed or failed (the hooks).
        """
        self.storage = storage
        self.keys = keys
        self.max_uploads_per_client = max_uploads_per_client
        self._open_uploads: dict[str, int] = {}
        self.cert_identity = cert_identity
        self.server_id = server_id
        self.clock = clock
        self.limits = limits
        self.handshake_timeout = handshake_timeout
        self.idle_timeout = idle_timeout
        self.connections: set[UploadServerProtocol] = set()
        #: Bytes of chunks a connection gathers for its next batch before it
        #: stops reading (the batch being written is one more such amount).
        self.batch_limit = max(2 * limits.max_payload, 8 * 1024 * 1024)
        #: Advertised in WELCOME (option "window"): the most DATA packets a
        #: client should have in flight; more only wait in buffers.
        self.max_window = 32
        #: Bytes of received data all connections may hold (frames being
        #: received, counted whole once let in; chunks gathered or being
        #: written) before they stop reading; and what they hold now.
        self.chunk_memory_limit = max(4 * self.batch_limit, DATA_MEMORY)
        self.chunk_bytes = 0
        #: Connections that stopped reading until there is memory again, in
        #: the order they stopped.
        self._waiting: dict[UploadServerProtocol, None] = {}
        self._waking = False
        self.takeover_idle = takeover_idle
        self._takeover_loop = LoopingCall(self.check_takeovers)
        self._takeover_loop.clock = clock
        self._takeover_check_interval = takeover_check_interval
        self.metrics = metrics if metrics is not None else ServerMetrics(Registry())
        self.metrics.connections_active.set_function(lambda: len(self.connections))
        self.metrics.uploads_active.set_function(
            lambda: sum(self._open_uploads.values()))
        self.events = events

    def startFactory(self) -> None:
        if self._takeover_check_interval > 0:
            self._takeover_loop.start(self._takeover_check_interval, now=False)

    def stopFactory(self) -> None:
        if self._takeover_loop.running:
            self._takeover_loop.stop()

    def open_uploads(self, client_id: str) -> int:
        """Uploads C{client_id} has open on this server."""
        return self._open_uploads.get(client_id, 0)

    def count_upload(self, client_id: str, delta: int) -> None:
        """Called by protocols as uploads open (+1) and close (-1)."""
        count = self._open_uploads.get(client_id, 0) + delta
        if count > 0:
            self._open_uploads[client_id] = count
        else:
            self._open_uploads.pop(client_id, None)

    def upload_event(self, event: dict[str, Any]) -> None:
        """
        An upload event from a connection (see
        L{imgresume.server._hooks.upload_event}): counted, then given to the
        hooks.  Never raises: a hook's trouble is never the upload's.
        """
        self.metrics.upload_event(event)
        if self.events is not None:
            try:
                self.events.emit(event)
            except Exception:
                UploadServerProtocol.log.failure(
                    "upload event {event} not delivered", event=event["event"])

    def chunks_released(self, size: int) -> None:
        """
        Received data was written or dropped: count it out, and let
        connections waiting for memory go on if there is room again.
        """
        self.chunk_bytes -= size
        self.wake_waiting()

    def wait_for_memory(self, proto: UploadServerProtocol) -> None:
        """C{proto} stopped reading until the server has memory for it."""
        self._waiting.setdefault(proto, None)

    def stop_waiting(self, proto: UploadServerProtocol) -> None:
        """C{proto} no longer waits for memory."""
        self._waiting.pop(proto, None)

    def wake_waiting(self) -> None:
        """
        Wake connections waiting for memory, oldest first, until one still
        finds no room: nobody overtakes a frame that does not fit yet.
        """
        if self._waking:
            return  # the loop below is running further up the stack
        self._waking = True
        try:
            for proto in list(self._waiting):
                if proto in self._waiting:
                    proto.wake()
                    if proto in self._waiting:
                        break
        finally:
            self._waking = False

    def check_takeovers(self) -> None:
        """Let every silent connection holding an upload yield it if asked."""
        now = self.clock.seconds()
        for proto in list(self.connections):
            proto.check_takeover(now)

    def buildProtocol(self, addr: Any) -> UploadServerProtocol:
        return UploadServerProtocol(self)

    def shutdown(self) -> None:
        """Tell every connected client the server is stopping, and close."""
        for proto in list(self.connections):
            proto.shutdown()

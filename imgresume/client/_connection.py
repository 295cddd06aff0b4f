# -*- test-case-name: tests.client.test_session -*-
"""
One client connection that carries uploads one after another: the Twisted
adapter that drives a sans-IO L{ClientConnection} over a transport, does
the handshake, hands the events of each upload to its L{UploadAttempt},
and gives up on a server that stays silent while an answer is due.
"""

from __future__ import annotations

import collections

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from imgresume import integrity
from imgresume.client._attempt import ConnectionBroken, Stalled, UploadAttempt
from imgresume.errors import ImgresumeError
from imgresume.protocol import (
    ClientConnection,
    ClientState,
    Completed,
    ErrorReceived,
    Put,
    PutAnswered,
    Welcome,
    Welcomed,
)


class UploadConnection(Protocol):
    """
    A connection to a server or balancer, client side.  Made by
    L{imgresume.client.UploadSession} for the first upload and again after
    a break; each upload on it is an L{UploadAttempt} given to L{run}.

    C{welcomed} fires with the server's L{Welcome} once the handshake is
    done, or fails with why it could not be (an L{ImgresumeError} such as
    C{HandshakeRejected}, L{Stalled}, L{ConnectionBroken}).  The stall
    timer runs only while the client waits for an answer (the handshake, or
    an upload in progress), not while the connection idles between uploads.
    """

    log = Logger()

    def __init__(
        self,
        clock: IReactorTime,
        *,
        client_id: str,
        key: bytes | None = None,
        stall_timeout: float = 30.0,
        digest: str = integrity.LEGACY_DIGEST,
    ) -> None:
        """
        @param digest: the whole-file digest to ask for (the server may
            answer with SHA-256 instead, an older one always does); every
            checksum this build knows is offered.
        """
        self.clock = clock
        self.stall_timeout = stall_timeout
        self.machine = ClientConnection(client_id, integrity.hello_options(digest), key=key)
        #: The server's C{server_id}, once welcomed.
        self.server_id: str | None = None
        #: The most DATA packets in flight the server asked for, if it did.
        self.window_advice: int | None = None
        #: Cancelling it (an interrupted upload) closes the connection.
        self.welcomed: Deferred[Welcome] = Deferred(lambda d: self._lose())
        self._attempt: UploadAttempt | None = None
        #: The answers awaited for the PUTs in flight, oldest first.
        self._puts: collections.deque[Deferred[Completed]] = collections.deque()
        #: Who waits for fewer PUTs in flight: (how many at most, Deferred).
        self._put_waiters: list[tuple[int, Deferred[None]]] = []
        self._timer: IDelayedCall | None = None
        self._closing = False
        self._lost = False
        self._close_waiters: list[Deferred[None]] = []

    @property
    def idle(self) -> bool:
        """Whether another upload may start here: welcomed, open, nothing running."""
        return (
            self.machine.state is ClientState.READY and self._attempt is None
            and not self._puts and not self._closing and not self._lost
        )

    @property
    def open(self) -> bool:
        """Whether a PUT may go here: welcomed, open, no other upload running."""
        return (self.machine.state is ClientState.READY and self._attempt is None
                and not self._closing and not self._lost)

    def put(self, frame: Put) -> Deferred[Completed]:
        """
        Send a whole file in one PUT (see L{ClientConnection.put}), after the
        PUTs already in flight; the Deferred fires with its COMPLETED, or
        fails with the server's error or with why the connection ended.
        """
        if not self.open:
            raise RuntimeError("the connection is not ready for a PUT")
        answer: Deferred[Completed] = Deferred()
        self._puts.append(answer)
        self.machine.put(frame)
        self._arm_stall_timer()
        self.flush()
        return answer

    def puts_below(self, count: int) -> Deferred[None]:
        """Fires once fewer than C{count} PUTs are in flight (or the connection ended)."""
        if len(self._puts) < count or self._closing or self._lost:
            return succeed(None)
        waiter: Deferred[None] = Deferred()
        self._put_waiters.append((count, waiter))
        return waiter

    def run(self, attempt: UploadAttempt) -> Deferred[Completed]:
        """Start C{attempt} on this (idle) connection; returns its C{result}."""
        if not self.idle:
            raise RuntimeError("the connection is not ready for another upload")
        self._attempt = attempt
        self._arm_stall_timer()
        attempt.start(self)
        self.flush()
        return attempt.result

    def attempt_ended(self, attempt: UploadAttempt) -> None:
        """
        Called by C{attempt} as it ends: keep the connection for the next
        upload if the attempt left it reusable, else close it.
        """
        if attempt is not self._attempt:
            return
        self._attempt = None
        if attempt.reusable and self.machine.state is ClientState.READY:
            self._cancel_stall_timer()
        else:
            self._lose()

    def close(self) -> Deferred[None]:
        """Close the connection; the Deferred fires once it is closed."""
        if self._lost or self.transport is None:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._close_waiters.append(d)
        self._lose()
        return d

    def flush(self) -> None:
        """Write what the state machine has queued."""
        out = self.machine.data_to_send()
        if out and self.transport is not None and not self._lost:
            self.transport.writeSequence(out)

    # Connection --------------------------------------------------------

    def connectionMade(self) -> None:
        self.machine.hello()
        self.flush()
        self._arm_stall_timer()

    def dataReceived(self, data: bytes) -> None:
        if self._timer is not None:
            self._arm_stall_timer()
        self.machine.receive_data(data)
        try:
            while not self._closing and (event := self.machine.next_event()) is not None:
                self._on_event(event)
        except ImgresumeError as e:
            self._broken(Failure(e))
        self.flush()

    def connectionLost(self, reason: Failure) -> None:
        self._lost = True
        self._cancel_stall_timer()
        self._broken(Failure(ConnectionBroken(f"connection lost: {reason.getErrorMessage()}")))
        waiters, self._close_waiters = self._close_waiters, []
        for d in waiters:
            d.callback(None)

    # Events --------------------------------------------------------------

    def _on_event(self, event: object) -> None:
        if isinstance(event, PutAnswered):
            answer = self._puts.popleft()
            if not self._puts and self._attempt is None:
                self._cancel_stall_timer()
            self._wake_put_waiters()
            if event.completed is not None:
                answer.callback(event.completed)
            else:
                answer.errback(event.error)
        elif isinstance(event, Welcomed):
            welcome = event.welcome
            self.server_id = welcome.server_id
            advertised = welcome.options.get("window", "")
            if advertised.isdigit() and int(advertised) > 0:
                self.window_advice = int(advertised)
            self._cancel_stall_timer()  # idle until an upload starts
            self.welcomed.callback(welcome)
        elif self._attempt is not None:
            self._attempt.event(event)
        elif isinstance(event, ErrorReceived):
            # Nothing running: the server closes the connection (a timeout
            # while idle, a shutdown) or refuses the handshake.
            self.log.info("connection to {server} closed by the server: {error}",
                          server=self.server_id or "?", error=str(event.error))
            self._broken(Failure(event.error))

    def _broken(self, failure: Failure) -> None:
        """The connection cannot go on: end whatever waited on it, and close."""
        self._lose()
        if not self.welcomed.called:
            self.welcomed.errback(failure)
        elif self._attempt is not None:
            self._attempt.fail(failure)
        self._fail_puts(failure)

    def _fail_puts(self, failure: Failure) -> None:
        """The connection ended: every PUT in flight fails with C{failure}."""
        puts, self._puts = self._puts, collections.deque()
        self._wake_put_waiters()
        for answer in puts:
            answer.errback(failure)

    def _wake_put_waiters(self) -> None:
        ended = self._closing or self._lost
        waiting, self._put_waiters = self._put_waiters, []
        for count, waiter in waiting:
            if ended or len(self._puts) < count:
                waiter.callback(None)
            else:
                self._put_waiters.append((count, waiter))

    def _lose(self) -> None:
        if self._closing:
            return
        self._closing = True
        self._cancel_stall_timer()
        if self.transport is not None and not self._lost:
            self.transport.loseConnection()

    # Stall timer ---------------------------------------------------------

    def _arm_stall_timer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.reset(self.stall_timeout)
        else:
            self._timer = self.clock.callLater(self.stall_timeout, self._stalled)

    def _cancel_stall_timer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def _stalled(self) -> None:
        self._timer = None
        failure = Failure(Stalled(
            f"no answer from the server for {self.stall_timeout:g} s; reconnecting"
        ))
        self._closing = True
        if self.transport is not None:
            self.transport.abortConnection()
        if not self.welcomed.called:
            self.welcomed.errback(failure)
        elif self._attempt is not None:
            self._attempt.fail(failure)
        self._fail_puts(failure)


# -*- test-case-name: tests.server.test_put -*-
"""
The PUTs one connection is storing at once.

A PUT is a whole small file, independent of every other: a connection
stores several at the same time (up to L{ServerLimits.puts_at_once
<imgresume.protocol.ServerLimits.puts_at_once>}), so that one file's
flushes do not hold up the next, and its machine answers them in the order
they came.  Each PUT has its own upload events, log line and metric.
"""

from __future__ import annotations

from typing import Any, Callable

from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure

from imgresume.errors import ImgresumeError, InvalidName
from imgresume.logs import escape
from imgresume.protocol import SKIPPED_UPLOAD_ID, ConnectionFailed, PutRequested, ServerState
from imgresume.server._admission import store_whole
from imgresume.server._commands import CommandPolicy, unexpected
from imgresume.server._faults import PeerFaults
from imgresume.server._interfaces import ServerSide
from imgresume.server._upload_events import UploadEventContext


class ConnectionPuts:
    """
    Stores the PUTs of one connection and gives each answer to its machine.
    Owned by L{imgresume.server._protocol.UploadServerProtocol}, which hands
    it each L{PutRequested} (L{start}) and is called back with C{answered}
    after each answer, to send it and take the next events (with the error
    if the answer closed the connection).
    """

    def __init__(self, connection: Any, factory: ServerSide, commands: CommandPolicy,
                 faults: PeerFaults, log: Logger,
                 answered: Callable[[ImgresumeError | None], None]) -> None:
        self._connection = connection
        self._factory = factory
        self._commands = commands
        self._faults = faults
        self._log = log
        self._answered = answered
        self._in_flight: set[Deferred[Any]] = set()
        self._stopped = False

    @property
    def in_flight(self) -> int:
        """PUTs being stored."""
        return len(self._in_flight)

    def _new_events(self, client_id: str, event: PutRequested) -> UploadEventContext:
        factory = self._factory
        events = UploadEventContext(factory.upload_event, factory.clock, factory.server_id)
        events.requested(client_id, event, self._connection.machine.digest)
        return events

    def start(self, event: PutRequested) -> None:
        """Store the file of a PUT the machine handed out."""
        machine, factory = self._connection.machine, self._factory
        client_id = machine.client_id or ""
        events = self._new_events(client_id, event)
        upload_id = event.put.upload_id
        request = self._commands.whole_upload(event.put, client_id, machine.digest)
        if isinstance(request, InvalidName):
            self._answered(self._failed(Failure(request), upload_id, events))
            return
        stored = store_whole(factory.storage, request, factory.memory, factory.quota)
        self._in_flight.add(stored)

        def done(result: Any) -> None:
            # Told (event, metric, log line) even when the client has gone:
            # the file is stored, or not, all the same.
            self._in_flight.discard(stored)
            if isinstance(result, Failure):
                fatal = self._failed(result, upload_id, events)
            else:
                self._stored(result, upload_id, events, client_id)
                fatal = None
            if not self._stopped:
                self._answered(fatal)

        stored.addBoth(done)

    def refuse(self, event: PutRequested, error: ImgresumeError) -> ImgresumeError | None:
        """
        Answer a PUT refused before storage is asked (quota, health-check
        session) with C{error}; return it if it closed the connection.
        """
        machine = self._connection.machine
        events = self._new_events(machine.client_id or "", event)
        events.failed(error)
        closed = machine.put_failed(event.put.upload_id, error)
        return error if isinstance(closed, ConnectionFailed) else None

    @property
    def _answering(self) -> bool:
        """Whether answers still go to the client (the connection is not closing)."""
        return not self._stopped and self._connection.machine.state is not ServerState.CLOSED

    def stop(self) -> Deferred[Any]:
        """
        The connection is gone: no answer is given any more (what storage
        answers is still logged and told as events).

        @return: a Deferred firing once the PUTs being stored are done.
        """
        self._stopped = True
        in_flight = list(self._in_flight)
        return DeferredList(in_flight) if in_flight else succeed(None)

    def _stored(self, completed: Any, upload_id: str, events: UploadEventContext,
                client: str) -> None:
        """A PUT's file is stored (or skipped: the same file is there): one log line."""
        skipped = completed.upload_id == SKIPPED_UPLOAD_ID
        if not skipped:
            self._factory.metrics.stored_bytes.inc(completed.size)
            events.completed(completed, repeat=False)
        if self._answering:
            self._connection.machine.put_stored(upload_id, completed.size, completed.sha256,
                                                completed.path, completed.upload_id)
        self._log.info("{how} {path} ({size} bytes, {digest} {sha256}) in one step: upload "
                       "{upload_id} by {client}", how="skipped" if skipped else "stored",
                       path=escape(completed.path), size=completed.size,
                       sha256=completed.sha256.hex(), digest=completed.digest,
                       upload_id=completed.upload_id, client=escape(client))

    def _failed(self, failure: Failure, upload_id: str,
                events: UploadEventContext) -> ImgresumeError | None:
        """
        Storing a PUT failed: answer it with the error (logged as the
        connection's storage errors are); return the error if it closed the
        connection.
        """
        error = failure.value
        if not isinstance(error, ImgresumeError):
            self._log.failure("storage call failed unexpectedly", failure)
            error = unexpected(error)
        upload, fields = events.describe()
        self._faults.warn(error.code, "{upload}: error {code}: {error}", upload=upload,
                          code=error.code.name, error=escape(error.message), **fields)
        events.failed(error)
        if not self._answering:
            return None
        closed = self._connection.machine.put_failed(upload_id, error)
        return error if isinstance(closed, ConnectionFailed) else None

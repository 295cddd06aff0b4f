# -*- test-case-name: tests.server.test_protocol,tests.server.test_put,tests.server.test_hooks -*-
"""
What a connection reports of each answer storage gives on its upload: the
frame its L{imgresume.protocol.ServerConnection} sends the client, the
upload's event (L{imgresume.server._upload_events.UploadEventContext}),
the metric and the one log line, kept together so that they never tell
different stories.  (What a peer gets wrong is reported by
L{imgresume.server._faults.PeerFaults}.)
"""

from __future__ import annotations

from typing import Any

from twisted.logger import Logger

from imgresume.logs import escape
from imgresume.metrics import ServerMetrics
from imgresume.protocol import ServerConnection
from imgresume.server._batching import Written
from imgresume.server._commands import NameTakenAnswer
from imgresume.server._upload_events import UploadEventContext
from imgresume.storage.interfaces import IUploadWriter, NewUpload, StoredFile


class UploadOutcomes:
    """
    One connection's reports of storage's answers.  Owned by
    L{imgresume.server._protocol.UploadServerProtocol}, which keeps the
    upload's writer and calls one method per answer; C{log} is the
    connection's own logger, so the lines keep its namespace.  It acts on
    the machine, the events, the metrics and the log, never on the
    connection.
    """

    def __init__(self, machine: ServerConnection, events: UploadEventContext,
                 metrics: ServerMetrics, log: Logger) -> None:
        self._machine = machine
        self._events = events
        self._metrics = metrics
        self._log = log

    def admitted(self, request: NewUpload) -> None:
        """An UPLOAD is within its client's limits: storage is asked to create it."""
        self._log.info("upload requested: {name} ({size} bytes) by {client}",
                       name=escape(request.name), size=request.size,
                       client=escape(request.client_id))

    def opened(self, writer: IUploadWriter, resumed: bool) -> None:
        """An UPLOAD created, or a RESUME opened, the upload C{writer} writes."""
        info, tail = writer.info, writer.tail
        self._machine.upload_opened(info.upload_id, info.name, info.size, info.sha256,
                                    writer.offset, (tail.start, tail.length, tail.sha256))
        self._log.info("{how} upload {upload_id} ({name}) at offset {offset} of {size}",
                       how="resumed" if resumed else "created", upload_id=info.upload_id,
                       name=escape(info.name), offset=writer.offset, size=info.size)
        self._events.opened(writer, resumed)

    def written(self, chunk: Written) -> None:
        """A chunk of a batch is written."""
        self._metrics.stored_bytes.inc(chunk.size)
        self._events.progressed(chunk.durable)
        self._machine.chunk_written(chunk.end, chunk.durable)

    def completed(self, completed: Any, repeat: bool) -> None:
        """
        The upload is complete: by a FINISH, or (C{repeat}) answered from
        the record of an earlier completion.
        """
        self._events.completed(completed, repeat=repeat)
        self._machine.upload_completed(completed.upload_id, completed.size,
                                       completed.sha256, completed.path)
        self._log.info("completed upload {upload_id}: {path} ({size} bytes, {digest} {sha256})",
                       upload_id=completed.upload_id, path=escape(completed.path),
                       size=completed.size, sha256=completed.sha256.hex(),
                       digest=completed.digest)

    def name_taken(self, answer: NameTakenAnswer) -> None:
        """An UPLOAD with C{if-exists} C{fail} found a file at its name: refused."""
        self._log.info("upload refused: {path} already exists", path=escape(answer.path))
        self._events.failed(answer.error)
        self._machine.fail(answer.error)

    def skipped(self, found: StoredFile) -> None:
        """An UPLOAD with C{if-exists} C{skip} found the same file at its name."""
        self._log.info("upload skipped: {path} is the same file", path=escape(found.path))
        self._events.skipped()
        self._machine.upload_skipped(found.size, found.sha256, found.path)

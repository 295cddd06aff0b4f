# -*- test-case-name: tests.server.test_hooks,tests.test_metrics -*-
"""
Upload events: what the hooks and the metrics are told about each upload.

L{upload_event} builds one event as the JSON-ready dict of C{docs/hooks.md}.
L{UploadEventContext} is a connection's memory of the upload asked for or
open on it (what its UPLOAD or RESUME asked for, what storage answered, how
far bytes are durable), from which it builds the upload's C{upload.*}
events and hands each to a sink: the factory's, which counts it in the
metrics and gives it to the L{IUploadEvents} of the hooks
(L{imgresume.server._hooks.HookDispatcher}).
"""

from __future__ import annotations

import uuid
from typing import Any, Callable, Mapping

import attrs
from zope.interface import Interface

from imgresume.errors import ImgresumeError
from imgresume.logs import escape
from imgresume.protocol import PutRequested, ResumeRequested, UploadRequested
from imgresume.sizes import format_size
from imgresume.storage.interfaces import IUploadWriter

#: The events, in the order one upload can produce them.
EVENTS = ("upload.created", "upload.resumed", "upload.completed", "upload.failed")


class IUploadEvents(Interface):
    """Something told about upload events: hooks, or anything a test wants."""

    def emit(event: dict[str, Any]) -> None:
        """
        Take one event built by L{upload_event}.  Called on the reactor
        thread by the protocol adapter; must return at once and not raise.
        """


def upload_event(
    kind: str,
    *,
    time: float,
    server_id: str,
    client_id: str | None,
    upload_id: str | None,
    name: str | None,
    size: int | None,
    sha256: bytes | None,
    metadata: Mapping[str, str] | None,
    offset: int | None,
    path: str | None = None,
    error: Any = None,
    repeat: bool = False,
    digest: str = "sha256",
) -> dict[str, Any]:
    """
    One event as the JSON-ready dict hooks receive (the schema is in
    C{docs/hooks.md}).  C{sha256} is the upload's digest in the algorithm
    C{digest} (the event's C{"digest"}; its C{"sha256"} only when that is
    SHA-256).  C{error} is the L{imgresume.errors.ImgresumeError} of an
    C{upload.failed}; C{repeat} marks an C{upload.completed} answered from
    the record of an earlier completion.
    """
    if kind not in EVENTS:
        raise ValueError(f"unknown event {kind!r}")
    event: dict[str, Any] = {
        "event": kind,
        "id": uuid.uuid4().hex,
        "time": time,
        "server_id": server_id,
        "client_id": client_id,
        "upload_id": upload_id,
        "name": name,
        "size": size,
        "sha256": sha256.hex() if sha256 is not None and digest == "sha256" else None,
        "digest": ({"algorithm": digest, "hex": sha256.hex()} if sha256 is not None
                   else None),
        "metadata": dict(metadata) if metadata is not None else None,
        "offset": offset,
    }
    if kind == "upload.completed":
        event["path"] = path
        event["repeat"] = repeat
    if kind == "upload.failed":
        event["error"] = {
            "code": error.code.name,
            "message": error.message,
            "retryable": bool(error.retryable),
        }
    return event


@attrs.define
class _Upload:
    """The fields of an upload's events that the connection knows so far."""

    client_id: str | None
    upload_id: str | None = None
    name: str | None = None
    size: int | None = None
    sha256: bytes | None = None
    metadata: Mapping[str, str] | None = None
    #: The events' C{offset} field (docs/hooks.md): what is durable.
    offset: int | None = None
    #: The algorithm of C{sha256}.
    digest: str = "sha256"


class UploadEventContext:
    """
    The upload asked for or open on one connection, as its events tell it.
    Owned by L{imgresume.server._protocol.UploadServerProtocol}, which
    calls it as the upload goes: L{requested}, L{opened}, L{progressed},
    then L{completed} or L{failed} (or, for an UPLOAD answered with a file
    already stored, L{skipped}).  Each event is built here and handed to
    C{emit} (the factory's sink); nothing is called back on the connection.
    """

    def __init__(
        self, emit: Callable[[dict[str, Any]], None], clock: Any, server_id: str
    ) -> None:
        self._emit = emit
        self._clock = clock
        self._server_id = server_id
        #: The upload asked for or open (None: none).
        self._upload: _Upload | None = None

    def requested(self, client_id: str | None,
                  request: UploadRequested | ResumeRequested | PutRequested,
                  digest: str = "sha256") -> None:
        """
        Client C{client_id} asked for a new upload, to resume one, or sent a
        PUT, on a connection whose digest is C{digest}.
        """
        if isinstance(request, PutRequested):
            put = request.put
            self._upload = _Upload(client_id, put.upload_id, put.name, put.size, put.sha256,
                                   put.metadata, 0, digest)
        elif isinstance(request, UploadRequested):
            up = request.upload
            self._upload = _Upload(client_id, None, up.name, up.size, up.sha256,
                                   up.metadata, 0, digest)
        else:
            self._upload = _Upload(client_id, request.upload_id)

    def opened(self, writer: IUploadWriter, resumed: bool) -> None:
        """Storage created or resumed the upload: C{upload.created} or C{upload.resumed}."""
        info = writer.info
        client_id = self._upload.client_id if self._upload is not None else None
        self._upload = _Upload(client_id, info.upload_id, info.name, info.size,
                               info.sha256, info.metadata, writer.offset, info.digest)
        self._tell("upload.resumed" if resumed else "upload.created")

    def progressed(self, durable: int) -> None:
        """Bytes are durable up to C{durable} (the offset an event reports)."""
        if self._upload is not None:
            self._upload.offset = durable

    def completed(self, completed: Any, repeat: bool) -> None:
        """
        The upload is complete (C{repeat}: answered from the record of an
        earlier completion): C{upload.completed}.  The upload ends here.
        """
        self._tell(
            "upload.completed", upload_id=completed.upload_id, name=completed.name,
            size=completed.size, sha256=completed.sha256, offset=completed.size,
            path=completed.path, repeat=repeat, digest=completed.digest,
        )
        self._upload = None

    def skipped(self) -> None:
        """
        The UPLOAD asked for was answered with the file already stored
        under its name (if-exists=skip): no upload was made, no event.
        """
        self._upload = None

    def failed(self, error: ImgresumeError) -> None:
        """
        The upload asked for or open ended with C{error}: C{upload.failed}
        (nothing if no upload was asked for).
        """
        if self._upload is not None:
            self._tell("upload.failed", error=error)
            self._upload = None

    def describe(self) -> tuple[str, dict[str, Any]]:
        """
        The upload asked for or open, for a log line: a text such as
        C{upload 5f0c... (scan.tiff by scanner-7, 48.0 MiB of 200.0 MiB
        durable)} or C{new upload scan.tiff (200.0 MiB) by scanner-7}, and
        its fields (C{upload_id}, C{name}, C{client}, C{size}, C{offset}),
        what peers sent escaped.
        """
        up = self._upload
        if up is None:
            return "no upload", {}
        name, client = escape(up.name), escape(up.client_id)
        fields = {"upload_id": up.upload_id, "name": name, "client": client,
                  "size": up.size, "offset": up.offset}
        if up.upload_id is None:
            size = format_size(up.size) if up.size is not None else "?"
            return f"new upload {name} ({size}) by {client}", fields
        if up.name is None:
            return f"resume of upload {up.upload_id} by {client}", fields
        progress = (f"{format_size(up.offset)} of {format_size(up.size)} durable"
                    if up.offset is not None and up.size is not None else "")
        return f"upload {up.upload_id} ({name} by {client}, {progress})", fields

    def _tell(self, kind: str, **fields: Any) -> None:
        known = attrs.asdict(self._upload, recurse=False) if self._upload else {}
        context: dict[str, Any] = {"client_id": None, **dict.fromkeys(
            ("upload_id", "name", "size", "sha256", "metadata", "offset")), "digest": "sha256"}
        context.update(known)
        context.update(fields)
        self._emit(upload_event(
            kind, time=self._clock.seconds(), server_id=self._server_id, **context))

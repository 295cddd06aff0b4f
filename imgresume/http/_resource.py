# -*- test-case-name: tests.http.test_resource -*-
"""
tus 1.0.0 over C{twisted.web}: the C{/files/} resource, and the request
that streams upload bytes into storage instead of letting C{twisted.web}
buffer the whole body.

A request's headers are complete before its body arrives: then
(L{TusRequest.gotLength}) a PATCH or a POST to C{/files/} is checked and
its upload opened, and its body goes, as it arrives, into a
L{BodyUpload}.  When the body is over, C{twisted.web} renders the request
and the resource answers once the bytes are durable (and, for the last
ones, verified and published).
"""

from __future__ import annotations

import io
from typing import Any, Callable

import attrs
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.internet.interfaces import ITCPTransport
from twisted.web.http import RESPONSES, HTTPChannel
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

from imgresume.http._body import BodyUpload
from imgresume.http._errors import storage_error
from imgresume.http._headers import (
    TUS_VERSION,
    TusError,
    check_content_type,
    check_resumable,
    cors_headers,
    parse_checksum,
    parse_creation_length,
    parse_length,
    parse_metadata,
    parse_offset,
    parse_repr_digest,
    parse_upload_path,
)
from imgresume.http._uploads import Headers, TusUploads
from imgresume.logs import escape

log = Logger()

#: A body refused with more than this still to come is answered at once.
EARLY_ANSWER = 1 << 20

#: The statuses' reason phrases that RFC 9110 does not give.
_PHRASES = {460: b"Checksum Mismatch", 423: b"Locked", 507: b"Insufficient Storage"}


@attrs.define
class _Call:
    """What a request's headers said, once checked."""

    method: str
    identity: str = ""
    upload_id: str | None = None
    offset: int = 0
    digest: bytes | None = None
    #: The opening of the upload: fires once the body has its writer.
    opening: Deferred[Any] | None = None
    completed: Any = None  # the CompletedUpload a PATCH found


def _header(request: Request, name: str) -> str | None:
    value = request.requestHeaders.getRawHeaders(name.encode("ascii"))
    return value[-1].decode("latin-1") if value else None


def _path_segments(path: bytes) -> list[bytes] | None:
    """The segments after C{/files/}, or None for a path outside it."""
    parts = path.split(b"?", 1)[0].split(b"/")
    if len(parts) < 2 or parts[0] != b"" or parts[1] != b"files":
        return None
    return [p for p in parts[2:] if p]


def _rest(request: Request) -> list[bytes]:
    """The path segments after C{/files/} of a rendered request."""
    return [p for p in request.postpath if p]


class TusRequest(Request):
    """
    A request whose upload bytes are written as they arrive.  Built by
    L{TusSite} for each request; for a PATCH or POST to C{/files/} its body
    goes to a L{BodyUpload} made by the L{FilesResource}, never to memory
    or a temporary file.  A body elsewhere is read and dropped.
    """

    body: BodyUpload | None = None
    call: _Call | None = None
    #: Refused mid-body and answered at once (L{FilesResource._refused_early}).
    answered_early = False

    #: The method and path of its request line, told by L{TusChannel} as
    #: soon as it is in (C{Request} learns them once the whole body is).
    request_line: tuple[bytes, bytes] = (b"", b"")

    def gotLength(self, length: int | None) -> None:
        method, path = self.request_line
        method = method.upper()
        self.content = io.BytesIO()  # stays empty: bodies never land here
        files = self.channel.site.files
        if method in (b"PATCH", b"POST") and _path_segments(path) is not None:
            self.body, self.call = files.start_body(self, method.decode(), path, length)

    def handleContentChunk(self, data: bytes) -> None:
        metrics = self.channel.site.files.uploads.metrics
        if metrics is not None:
            metrics.received_bytes.inc(len(data))
        if self.body is not None:
            self.body.feed(data)

    def connectionLost(self, reason: Failure) -> None:
        if self.body is not None:
            self.body.cut()
        super().connectionLost(reason)


class TusChannel(HTTPChannel):
    """
    The HTTP/1.1 connection of a L{TusSite}: tells each request its method
    and path (L{TusRequest.request_line}) as soon as its request line is
    in, so that its body can be streamed into its upload.  Plain HTTP/1.1,
    never switched to HTTP/2: the streamed bodies rely on it.
    """

    def lineReceived(self, line: bytes) -> None:
        count = len(self.requests)
        super().lineReceived(line)
        if len(self.requests) > count:  # that was a new request's first line
            parts = line.split(b" ")
            if len(parts) == 3:
                self.requests[-1].request_line = (parts[0], parts[1])


class _Root(Resource):
    """
    C{/}: C{/files/}, and the upload page's files when it is served
    (L{imgresume.http._page}); anything else is a plain 404.
    """

    def __init__(self, page: dict[bytes, Resource] | None = None) -> None:
        super().__init__()
        self.page = page or {}

    def getChild(self, path: bytes, request: Request) -> Resource:
        if not request.postpath:  # a file of the page, not a folder
            found = self.page.get(path)
            if found is not None:
                return found
        return _NotFound()


class _NotFound(Resource):
    isLeaf = True

    def render(self, request: Request) -> bytes:
        request.setResponseCode(404)
        request.setHeader("Content-Type", "text/plain; charset=utf-8")
        return b"not found: tus uploads are under /files/\n"


class TusSite(Site):
    """
    The HTTP site of a server's tus endpoint: L{TusRequest}s, C{/files/}
    served by a L{FilesResource}, C{page} (path segment -> resource) at
    C{/} when given, no access log (each request is logged
    once, as a structured event, by the resource).
    """

    requestFactory = TusRequest
    protocol = TusChannel

    noisy = False

    def __init__(self, files: FilesResource, timeout: float = 300.0,
                 reactor: Any = None, page: dict[bytes, Resource] | None = None) -> None:
        root = _Root(page)
        root.putChild(b"files", files)
        super().__init__(root, timeout=timeout, reactor=reactor,
                         parsePOSTFormSubmission=False)
        self.files = files
        self.displayTracebacks = False

    def log(self, request: Request) -> None:
        pass


class FilesResource(Resource):
    """
    C{/files/}: tus 1.0.0 (core, creation, creation-with-upload,
    creation-defer-length, termination, expiration, checksum) over a
    L{TusUploads}.  Called by
    C{twisted.web} for each request, and by L{TusRequest} when a body is
    about to arrive.
    """

    isLeaf = True

    def __init__(self, uploads: TusUploads, *, max_pending: int | None = None,
                 checksum_limit: int | None = None, cors_origins: tuple[str, ...] = ()
                 ) -> None:
        super().__init__()
        self.uploads = uploads
        self.cors_origins = cors_origins
        self._limits: dict[str, int] = {}
        if max_pending is not None:
            self._limits["max_pending"] = max_pending
        if checksum_limit is not None:
            self._limits["checksum_limit"] = checksum_limit

    # -- bodies ------------------------------------------------------------

    def start_body(self, request: TusRequest, method: str, path: bytes,
                   length: int | None) -> tuple[BodyUpload, _Call]:
        """
        A PATCH or POST whose headers are in: check them and open its
        upload, and return the L{BodyUpload} its bytes go to.
        """
        call = _Call(method)
        transport = request.channel.transport
        metrics = self.uploads.metrics

        def stored(n: int) -> None:
            if metrics is not None:
                metrics.stored_bytes.inc(n)

        try:
            checksum = parse_checksum(_header(request, "Upload-Checksum"))
        except TusError as e:
            checksum, error = None, e
        else:
            error = None
        body = BodyUpload(transport.pauseProducing, transport.resumeProducing,
                          clock=self.uploads.clock, length=length, checksum=checksum,
                          on_bytes=stored, **self._limits)
        body.on_refused = lambda e: self._refused_early(request, body, e)
        if error is not None:
            body.refused(error)
            return body, call
        try:
            self._check_common(request, call)
            segments = _path_segments(path) or []
            if method == "PATCH" or length != 0:
                check_content_type(_header(request, "Content-Type"))
            call.digest = parse_repr_digest(
                [v.decode("latin-1") for v in
                 request.requestHeaders.getRawHeaders(b"Repr-Digest", [])] or None)
            if method == "PATCH":
                call.upload_id = parse_upload_path(segments)
                call.offset = parse_offset(_header(request, "Upload-Offset"))
                declared = _header(request, "Upload-Length")
                if declared is not None:  # creation-defer-length: the length now
                    declared = parse_length(declared, self.uploads.max_size)
                call.opening = self.uploads.open(call.identity, call.upload_id,
                                                 call.offset, body, declared)
                call.opening.addCallback(self._completed_already, call, body)
            else:
                if segments:
                    raise TusError(405, "create uploads with a POST to /files/")
                size = parse_creation_length(_header(request, "Upload-Length"),
                                             _header(request, "Upload-Defer-Length"),
                                             self.uploads.max_size)
                metadata = parse_metadata(_header(request, "Upload-Metadata"))
                call.opening = self.uploads.create(call.identity, size, metadata,
                                                   call.digest, self._context(request))
                call.opening.addCallback(self._created, call, body)
        except TusError as e:
            body.refused(e)
            return body, call
        call.opening.addErrback(lambda f: body.refused(storage_error(f)))
        return body, call

    def _context(self, request: Request) -> dict[str, Any] | None:
        """What the pre-create hook is told of a creation request."""
        if self.uploads.pre_create is None:
            return None
        own = self.uploads.keys is not None  # Authorization holds our key then
        headers = {name.decode("latin-1").lower(): ", ".join(
            v.decode("latin-1") for v in values)
            for name, values in request.requestHeaders.getAllRawHeaders()
            if not (own and name.lower() == b"authorization")}
        peer = request.getClientAddress()
        return {"remote": getattr(peer, "host", None), "headers": headers}

    def _completed_already(self, completed: Any, call: _Call, body: BodyUpload) -> None:
        if completed is not None:
            call.completed = completed
            body.refused(TusError(0, "already complete"))

    def _created(self, writer: Any, call: _Call, body: BodyUpload) -> None:
        call.upload_id = writer.info.upload_id
        call.digest = None  # given at creation: storage holds it
        self.uploads.attach(writer, body)

    def _check_common(self, request: Request, call: _Call) -> None:
        check_resumable(_header(request, "Tus-Resumable"))
        call.identity = self.uploads.authenticate(_header(request, "Authorization"))

    # -- rendering ---------------------------------------------------------

    def render_OPTIONS(self, request: Request) -> bytes:
        return self._answer(request, 204, self.uploads.options(), tus=False)

    def render_HEAD(self, request: Request) -> Any:
        return self._deferred(request, lambda call: self.uploads.head(
            call.identity, parse_upload_path(_rest(request))), 200)

    def render_GET(self, request: Request) -> Any:
        return self._answer(request, 405, [("Allow", "OPTIONS, HEAD, POST, PATCH, DELETE")],
                            reason="GET is not part of tus: HEAD gives an upload's offset")

    def render_DELETE(self, request: Request) -> Any:
        def terminate(call: _Call) -> Deferred[Headers]:
            d = self.uploads.terminate(call.identity, parse_upload_path(_rest(request)))
            return d.addCallback(lambda _: [])

        return self._deferred(request, terminate, 204)

    def render_PATCH(self, request: TusRequest) -> Any:
        return self._body_done(request, 204)

    def render_POST(self, request: TusRequest) -> Any:
        return self._body_done(request, 201)

    def _body_done(self, request: TusRequest, status: int) -> Any:
        body, call = request.body, request.call
        if body is None or call is None:  # not under /files/
            return self._answer(request, 404, [], reason="no such resource")

        def durable(_: int) -> Deferred[Headers]:
            return self.uploads.finish(call.upload_id, body, call.digest)

        def failed(f: Failure) -> Headers:
            error = storage_error(f)
            if call.completed is not None:
                return self.uploads.completed_headers(call.completed, call.offset)
            if status == 201 and call.upload_id is not None and body.error is not None \
                    and error.status != 413:
                # Created, but its first bytes failed: the client goes on
                # with HEAD and PATCH from what is durable.
                return [("Upload-Offset", str(body.durable))]
            raise error

        def answer(headers: Headers) -> None:
            if status == 201:
                location = request.path.rstrip(b"/").decode("latin-1") + "/" + call.upload_id
                headers = [("Location", location),
                           ("Upload-Expires", self.uploads.expires())] + [
                    h for h in headers if h[0] != "Upload-Expires"]
            self._answer(request, status, headers)

        d = body.end()
        d.addCallback(durable)
        d.addErrback(failed)
        d.addCallbacks(answer, lambda f: self._answer_error(request, f))
        return NOT_DONE_YET

    def _deferred(self, request: Request, work: Callable[[_Call], Any], status: int) -> Any:
        call = _Call(request.method.decode("latin-1"))
        try:
            self._check_common(request, call)
            d = work(call)
        except TusError as e:
            return self._answer(request, e.status, list(e.headers), reason=e.reason)
        d.addCallbacks(lambda headers: self._answer(request, status, headers),
                       lambda f: self._answer_error(request, f))
        return NOT_DONE_YET

    def _answer_error(self, request: Request, failure: Failure) -> None:
        error = storage_error(failure)
        self._answer(request, error.status, list(error.headers), reason=error.reason)

    def _refused_early(self, request: TusRequest, body: BodyUpload, error: TusError) -> None:
        """
        A body refused with more than L{EARLY_ANSWER} bytes still to come:
        answer at once and half-close, so that the client reads the answer
        (and a client that stops sending on a close, as Node's does, stops)
        instead of sending the rest for nothing.  Only on plain TCP (a
        half-close under TLS would cut its own close); elsewhere the answer
        waits for the body's end, read and dropped.
        """
        transport = request.channel.transport
        left = None if body.length is None else body.length - body.received
        if (request.answered_early or error.status < 400 or body.ended
                or (left is not None and left <= EARLY_ANSWER)
                or not ITCPTransport.providedBy(transport)):
            return
        text = (error.reason + "\n").encode("utf-8")
        headers = [("Tus-Resumable", TUS_VERSION), *error.headers,
                   *cors_headers(_header(request, "Origin"), self.cors_origins, False),
                   ("Content-Type", "text/plain; charset=utf-8"),
                   ("Content-Length", str(len(text))), ("Connection", "close")]
        phrase = _PHRASES.get(error.status) or RESPONSES.get(error.status, b"Error")
        head = f"HTTP/1.1 {error.status} {phrase.decode('latin-1')}\r\n" + "".join(
            f"{name}: {value}\r\n" for name, value in headers) + "\r\n"
        transport.write(head.encode("latin-1") + text)
        transport.loseWriteConnection()
        request.answered_early = True
        self._log(request, *request.request_line, error.status,
                  error.reason + " (answered before the body's end)")

    def _log(self, request: Request, method: bytes, path: bytes, status: int,
             reason: str) -> None:
        peer = request.getClientAddress()
        log.info("tus {method} {path} from {peer}: {status} {reason}",
                 method=escape(method.decode("latin-1")),
                 path=escape(path.split(b"?", 1)[0].decode("latin-1")),
                 peer=f"{getattr(peer, 'host', peer)}:{getattr(peer, 'port', '')}",
                 status=status, reason=escape(reason))

    def _answer(self, request: Request, status: int, headers: Headers,
                reason: str = "", tus: bool = True) -> bytes:
        """Write the answer (finishing the request unless rendering returns it)."""
        if getattr(request, "answered_early", False):
            request.channel.transport.loseConnection()  # the rest of the body is in
            return NOT_DONE_YET  # type: ignore[return-value]
        request.setResponseCode(status, _PHRASES.get(status))
        if tus:
            request.setHeader("Tus-Resumable", TUS_VERSION)
        preflight = request.method == b"OPTIONS" and request.requestHeaders.hasHeader(
            b"Access-Control-Request-Method")
        for name, value in headers + cors_headers(_header(request, "Origin"),
                                                  self.cors_origins, preflight):
            request.setHeader(name, value)
        body = b""
        if reason:
            body = (reason + "\n").encode("utf-8")
            request.setHeader("Content-Type", "text/plain; charset=utf-8")
        request.setHeader("Content-Length", str(len(body)))
        self._log(request, request.method, request.path, status, reason)
        if request.startedWriting or getattr(request, "_disconnected", False):
            return NOT_DONE_YET  # type: ignore[return-value]
        request.write(body)
        request.finish()
        return NOT_DONE_YET  # type: ignore[return-value]

# -*- test-case-name: tests.http.test_resource -*-
"""
The tus uploads of one server over its L{IUploadStorage}: who is asking
(bearer keys), creating, resuming for a PATCH, finishing (verify, then
publish), status for HEAD, termination, and the watch that lets a silent
PATCH give its upload up to a newer request.  Every storage call goes
through here; the resource (L{imgresume.http._resource}) only parses and
answers.
"""

from __future__ import annotations

import hashlib
import hmac
from collections import OrderedDict
from typing import Any, Callable, Mapping, Protocol, runtime_checkable

import attrs
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from imgresume.errors import (
    DigestMismatch,
    ImgresumeError,
    UnknownUpload,
    UploadAlreadyComplete,
)
from imgresume.http._body import BodyUpload
from imgresume.http._defer import declare_length
from imgresume.http._precreate import PreCreateHook
from imgresume.http._errors import storage_error
from imgresume.http._headers import (
    CHECKSUM_ALGORITHMS,
    CHECKSUM_MISMATCH,
    DEFER_LENGTH,
    EXTENSIONS,
    TUS_VERSION,
    TusError,
    format_metadata,
    format_repr_digest,
    http_date,
    parse_bearer,
    stored_name,
)
from imgresume.logs import escape
from imgresume.names import new_upload_id
from imgresume.storage.interfaces import (
    CompletedFileMoved,
    CompletedUpload,
    IDeferredSizeStorage,
    IUploadStorage,
    IUploadWriter,
    NewUpload,
)

log = Logger()

#: The identity of every request when the server has no key file.
ANONYMOUS = "anonymous"
#: Uploads whose running SHA-256 this process remembers between PATCHes.
RECENT = 4096

Headers = list[tuple[str, str]]


@runtime_checkable
class CompletesAsStored(Protocol):
    """
    A writer that can complete an upload created without a digest with
    the digest of what it stores, verified by itself (the S3 storage's:
    each part against the digest recorded when it was stored).  Used for
    an upload whose bytes came through several servers without a client
    digest, when the storage has no C{stored_sha256}.
    """

    def complete_as_stored(self) -> Deferred[CompletedUpload]:
        """Verify what is stored, then publish it with its digest."""


@attrs.define
class _Recent:
    """What this process last did to an upload: where it left it, its hash so far."""

    offset: int
    digest: Any  # hashlib sha256 of bytes [0, offset), or None


class TusUploads:
    """
    The storage side of a server's tus endpoint.  Built by the wiring
    (L{imgresume.http.tus_site}); called by the resource for each request.

    @param keys: the server's L{imgresume.keys.KeyStore}, or None: every
        request is then L{ANONYMOUS}.
    @param emit: told of each upload event as C{emit(kind, **fields)} with
        the fields of C{docs/hooks.md} (the server's hooks and metrics).
    @param stored_sha256: for an upload whose bytes came through several
        servers and that has no client digest: a function of its writer
        giving the SHA-256 of what is stored (a Deferred), or None: then a
        writer that L{CompletesAsStored} (S3's) completes such an upload
        itself, and any other gets 500.
    """

    def __init__(
        self,
        storage: IUploadStorage,
        *,
        clock: Any,
        server_id: str,
        max_size: int,
        keys: Any = None,
        expire_after: float = 7 * 86400.0,
        takeover_idle: float = 10.0,
        emit: Callable[..., None] | None = None,
        metrics: Any = None,
        stored_sha256: Callable[[IUploadWriter], Deferred[bytes]] | None = None,
        max_incomplete_uploads: int = 0,
        max_incomplete_bytes: int = 0,
        pre_create: PreCreateHook | None = None,
    ) -> None:
        self.storage = storage
        self.clock = clock
        self.server_id = server_id
        self.max_size = max_size
        self.keys = keys
        self.expire_after = expire_after
        self.takeover_idle = takeover_idle
        self._emit = emit
        self.metrics = metrics
        self._stored_sha256 = stored_sha256
        self.max_incomplete_uploads = max_incomplete_uploads
        self.max_incomplete_bytes = max_incomplete_bytes
        self.pre_create = pre_create
        self._recent: OrderedDict[str, _Recent] = OrderedDict()
        #: Bodies being written now, by upload id.
        self.bodies: dict[str, BodyUpload] = {}
        self._watch = LoopingCall(self.check_takeovers)
        self._watch.clock = clock

    # -- life --------------------------------------------------------------

    def start(self) -> None:
        """Start watching for takeover requests on silent bodies."""
        self._watch.start(max(0.5, self.takeover_idle / 4), now=False)

    def stop(self) -> None:
        """Stop the watch."""
        if self._watch.running:
            self._watch.stop()

    # -- who ---------------------------------------------------------------

    def authenticate(self, authorization: str | None) -> str:
        """
        The identity of a request from its C{Authorization} header: the
        client id of a valid bearer key; L{ANONYMOUS} without a key file.
        """
        if self.keys is None:
            return ANONYMOUS
        client_id, key = parse_bearer(authorization)
        known = self.keys.lookup(client_id)
        if known is None or not hmac.compare_digest(known, key):
            raise TusError(401, "unknown client or wrong key",
                           (("WWW-Authenticate", 'Bearer realm="imgresume", '
                                                 'error="invalid_token"'),))
        return client_id

    @property
    def defers_length(self) -> bool:
        """Whether creation-defer-length is offered: the storage declares sizes later."""
        return IDeferredSizeStorage.providedBy(self.storage)

    def options(self) -> Headers:
        """What an OPTIONS request answers."""
        extensions = [e for e in EXTENSIONS if e != DEFER_LENGTH or self.defers_length]
        return [
            ("Tus-Version", TUS_VERSION),
            ("Tus-Extension", ",".join(extensions)),
            ("Tus-Max-Size", str(self.max_size)),
            ("Tus-Checksum-Algorithm", ",".join(CHECKSUM_ALGORITHMS)),
        ]

    def expires(self, updated: float | None = None) -> str:
        """C{Upload-Expires}: when garbage collection may remove the upload."""
        return http_date((self.clock.seconds() if updated is None else updated)
                         + self.expire_after)

    # -- creation ----------------------------------------------------------

    def create(self, identity: str, length: int | None, metadata: Mapping[str, str],
               sha256: bytes | None, context: Mapping[str, Any] | None = None
               ) -> Deferred[IUploadWriter]:
        """
        Create an upload of C{length} bytes for C{identity} (None: its
        length comes later, and it counts as C{max_size} until then): the
        writer, or a L{TusError} (400 name refused or no deferred length
        here, 429 quota, 403 refused by the pre-create hook, 507 full...).
        C{context} is what the pre-create hook is told of the request
        besides (its C{headers}, C{remote}).
        """
        name = stored_name(metadata, new_upload_id()[:16])
        if length is None and not self.defers_length:
            raise TusError(400, "Upload-Defer-Length is not supported over this storage "
                                "(it fixes an upload's size at creation): send Upload-Length")
        request = NewUpload(name, self.max_size if length is None else length, sha256,
                            dict(metadata), identity, size_deferred=length is None)
        d = self._check_quota(identity, request.size)
        if self.pre_create is not None:
            asked = {"client_id": identity, "name": name, "size": length,
                     "sha256": sha256.hex() if sha256 is not None else None,
                     "metadata": dict(metadata), **(context or {})}
            d.addCallback(lambda _: self.pre_create.ask(asked))
        d.addCallback(lambda _: self.storage.create(request))

        def created(writer: IUploadWriter) -> IUploadWriter:
            info = writer.info
            self._remember(info.upload_id, _Recent(0, hashlib.sha256()))
            self._event("upload.created", info, 0)
            log.info("tus upload {upload_id} created for {client}: {name} ({size} bytes)",
                     upload_id=info.upload_id, client=escape(identity),
                     name=escape(info.name), size=length if length is not None
                     else "length deferred, at most " + str(info.size))
            return writer

        d.addCallbacks(created, lambda f: _raise(storage_error(f)))
        return d

    def _check_quota(self, identity: str, length: int) -> Deferred[None]:
        uploads, total = self.max_incomplete_uploads, self.max_incomplete_bytes
        if not uploads and not total:
            return succeed(None)

        def over(found: Any) -> bool:
            return bool((uploads and found.count + 1 > uploads)
                        or (total and found.declared_bytes + length > total))

        def first(found: Any) -> Deferred[None] | None:
            if not over(found):
                return None
            return self.storage.incomplete_for(identity, verify=True).addCallback(second)

        def second(found: Any) -> None:
            if over(found):
                raise TusError(429, f"client {identity} has {found.count} incomplete "
                                    f"uploads declaring {found.declared_bytes} bytes, the "
                                    "most it may: finish or terminate some first",
                               (("Retry-After", "60"),))

        return self.storage.incomplete_for(identity).addCallback(first)

    def attach(self, writer: IUploadWriter, body: BodyUpload) -> None:
        """A creation-with-upload: its body goes into the new upload."""
        upload_id = writer.info.upload_id
        recent = self._recent.pop(upload_id, None)
        self._watch_body(upload_id, body)
        body.opened(writer, recent.digest if recent is not None else None)

    # -- PATCH -------------------------------------------------------------

    def open(self, identity: str, upload_id: str, offset: int,
             body: BodyUpload, length: int | None = None
             ) -> Deferred[CompletedUpload | None]:
        """
        Take the upload for a body starting at C{offset}: hand the writer to
        C{body} (None), or answer the L{CompletedUpload} when it is already
        complete, or fail with a L{TusError} (404, 409 with the offset to
        continue from, 423 while another request writes it).  C{length}
        is the PATCH's C{Upload-Length}: it declares a deferred length
        (400 if it differs from one already known, or is below the offset).
        """
        d = self.storage.resume(upload_id, identity)

        def resumed(writer: IUploadWriter) -> Deferred[None] | None:
            if writer.offset != offset:
                at = writer.offset
                writer.release().addErrback(lambda f: None)
                raise TusError(409, f"Upload-Offset is {offset} but the upload has "
                                    f"{at} bytes: continue from {at}",
                               (("Upload-Offset", str(at)),))
            if length is None:
                return opened(writer)
            return declare_length(writer, offset, length, body.length).addCallback(
                lambda _: opened(writer))

        def opened(writer: IUploadWriter) -> None:
            recent = self._recent.pop(upload_id, None)
            if recent is None or recent.offset != offset:
                self._event("upload.resumed", writer.info, offset)
                log.info("tus upload {upload_id} resumed at {offset}",
                         upload_id=upload_id, offset=offset)
                recent = _Recent(offset, hashlib.sha256() if offset == 0 else None)
            self._watch_body(upload_id, body)
            body.opened(writer, recent.digest)

        def failed(f: Failure) -> CompletedUpload:
            if f.check(UploadAlreadyComplete):
                return f.value.completed
            if f.check(CompletedFileMoved):
                raise TusError(410, f.value.message)
            if f.check(UnknownUpload):
                raise TusError(404, "no such upload")
            raise storage_error(f)

        d.addCallbacks(resumed, failed)
        return d

    def finish(self, upload_id: str, body: BodyUpload,
               digest: bytes | None) -> Deferred[Headers]:
        """
        A body's bytes are durable: complete the upload if they were its
        last (verified against the client's digest, else the SHA-256 of
        what this server received, else of what is stored, read back by
        C{stored_sha256} or by the writer itself), else release it.  The headers to answer, or a L{TusError}.
        """
        self.bodies.pop(upload_id, None)
        writer = body.writer
        assert writer is not None
        info = writer.info
        if writer.offset < info.size or info.size_deferred:
            return body.release().addCallback(lambda _: [
                ("Upload-Offset", str(body.durable)), ("Upload-Expires", self.expires())])
        if info.sha256 is not None and digest is not None and digest != info.sha256:
            body.release()
            raise TusError(CHECKSUM_MISMATCH, "Repr-Digest differs from the one given "
                                              "at creation")
        done: Deferred[CompletedUpload]
        if info.sha256 is not None:
            done = writer.complete()
        elif digest is not None:
            done = writer.complete(digest)
        elif body.digest is not None:
            done = writer.complete(body.digest.digest())
        elif self._stored_sha256 is not None:
            done = self._stored_sha256(writer).addCallback(writer.complete)
        elif isinstance(writer, CompletesAsStored):
            done = writer.complete_as_stored()
        else:
            body.release()
            raise TusError(500, "this upload came through several servers and the "
                                "storage cannot hash it: send Repr-Digest")

        def completed(done: CompletedUpload) -> Headers:
            self._recent.pop(upload_id, None)
            self._event("upload.completed", info, info.size, sha256=done.sha256,
                        name=done.name, path=done.path, repeat=False)
            log.info("tus upload {upload_id} completed at {path}",
                     upload_id=upload_id, path=escape(done.path))
            return [("Upload-Offset", str(info.size)),
                    ("Repr-Digest", format_repr_digest(done.sha256))]

        def failed(f: Failure) -> Deferred[Headers]:
            error = storage_error(f)
            if isinstance(f.value, ImgresumeError):
                if f.check(DigestMismatch):
                    self._event("upload.failed", info, info.size, error=f.value)
                log.warn("tus upload {upload_id} not completed: {error}",
                         upload_id=upload_id, error=f.value.message)
            self._recent.pop(upload_id, None)
            return body.release().addCallback(lambda _: _raise(error))

        done.addCallbacks(completed, failed)
        return done

    def completed_headers(self, completed: CompletedUpload, offset: int) -> Headers:
        """
        A PATCH to an upload already complete: 204 if it asks for no more
        (its answer was lost), else 409 with the final offset.
        """
        if offset != completed.size:
            raise TusError(409, "the upload is already complete",
                           (("Upload-Offset", str(completed.size)),))
        return [("Upload-Offset", str(completed.size)),
                ("Repr-Digest", format_repr_digest(completed.sha256))]

    # -- HEAD, DELETE ------------------------------------------------------

    def head(self, identity: str, upload_id: str) -> Deferred[Headers]:
        """The proven offset and what else HEAD answers (404, 410 when expired)."""
        d = self.storage.status(upload_id, identity)

        def answer(status: Any) -> Headers:
            length = (("Upload-Defer-Length", "1") if status.size_deferred
                      else ("Upload-Length", str(status.size)))
            headers = [length,
                       ("Upload-Metadata", format_metadata({"filename": status.name})),
                       ("Cache-Control", "no-store")]
            if status.state == "complete":
                return [("Upload-Offset", str(status.size))] + headers
            if status.updated + self.expire_after < self.clock.seconds():
                raise TusError(410, "the upload expired and is being removed")
            return [("Upload-Offset", str(status.offset)),
                    ("Upload-Expires", self.expires(status.updated))] + headers

        d.addCallbacks(answer, lambda f: _raise(
            TusError(404, "no such upload") if f.check(UnknownUpload) else storage_error(f)))
        return d

    def terminate(self, identity: str, upload_id: str) -> Deferred[None]:
        """Remove a partial upload (DELETE): 404, 423 while written, 403 when complete."""
        d = self.storage.resume(upload_id, identity)

        def aborting(writer: IUploadWriter) -> Deferred[None]:
            self._recent.pop(upload_id, None)
            info = writer.info
            log.info("tus upload {upload_id} terminated", upload_id=upload_id)
            return writer.abort().addCallback(lambda _: self._event(
                "upload.failed", info, writer.offset,
                error=UnknownUpload("terminated by the client (tus DELETE)")))

        def failed(f: Failure) -> None:
            if f.check(UploadAlreadyComplete):
                raise TusError(403, "the upload is complete: its file is never removed "
                                    "through the upload")
            if f.check(UnknownUpload):
                raise TusError(404, "no such upload")
            raise storage_error(f)

        d.addCallbacks(aborting, failed)
        return d

    # -- takeover ----------------------------------------------------------

    def check_takeovers(self) -> None:
        """Let every body silent for C{takeover_idle} yield if another request asked."""
        now = self.clock.seconds()
        for upload_id, body in list(self.bodies.items()):
            writer = body.writer
            if (writer is None or body.waiting_for_disk
                    or now - body.last_heard < self.takeover_idle):
                continue

            def asked(yes: bool, upload_id: str = upload_id, body: BodyUpload = body) -> None:
                if yes and self.bodies.get(upload_id) is body:
                    del self.bodies[upload_id]
                    log.warn("tus upload {upload_id}: yielding to a newer request; its "
                             "PATCH has been silent for {idle:.1f} s", upload_id=upload_id,
                             idle=self.clock.seconds() - body.last_heard)
                    if self.metrics is not None:
                        self.metrics.takeover_yields.inc()
                    body.fence()

            writer.takeover_requested().addCallbacks(asked, lambda f: None)

    # -- inside ------------------------------------------------------------

    def _watch_body(self, upload_id: str, body: BodyUpload) -> None:
        """A body writes the upload now; when it lets it go, remember where."""
        self.bodies[upload_id] = body

        def released() -> None:
            if self.bodies.get(upload_id) is body:
                del self.bodies[upload_id]
            self._remember(upload_id, _Recent(
                body.durable, body.digest if body.next == body.durable else None))

        body.on_release = released

    def _remember(self, upload_id: str, recent: _Recent) -> None:
        self._recent[upload_id] = recent
        self._recent.move_to_end(upload_id)
        while len(self._recent) > RECENT:
            self._recent.popitem(last=False)

    def _event(self, kind: str, info: Any, offset: int, **fields: Any) -> None:
        if self._emit is None:
            return
        context = dict(client_id=info.client_id, upload_id=info.upload_id, name=info.name,
                       size=None if info.size_deferred else info.size, sha256=info.sha256,
                       metadata=info.metadata, offset=offset)
        context.update(fields)
        try:
            self._emit(kind, **context)
        except Exception:
            log.failure("tus upload event {event} not delivered", event=kind)


def _raise(error: Exception) -> Any:
    raise error

# -*- test-case-name: tests.http.test_wiring -*-
"""
Wiring the HTTP front door (L{imgresume.http}, tus 1.0.0) into a server:
the same storage object, keys, hooks and metrics as the native listener,
its own listening endpoint (C{--http}).  Called by
L{imgresume.server._service.make_server_service}.
"""

from __future__ import annotations

from typing import Any

from twisted.application.service import Service

from imgresume._listen import ListenerService
from imgresume.http import PreCreateHook, TusUploads, tus_site
from imgresume.server._upload_events import upload_event
from imgresume.storage.interfaces import IUploadStorage

class _WatchService(Service):
    """Runs the tus uploads' takeover watch while the server runs."""

    def __init__(self, uploads: TusUploads) -> None:
        self.uploads = uploads

    def startService(self) -> None:
        super().startService()
        self.uploads.start()

    def stopService(self) -> None:
        super().stopService()
        self.uploads.stop()


def http_service(
    listen: str,
    storage: IUploadStorage,
    factory: Any,
    *,
    reactor: Any,
    server_id: str,
    keys: Any,
    max_size: int,
    idle_timeout: float,
    takeover_idle: float,
    expire_after: float,
    max_incomplete_uploads: int,
    max_incomplete_bytes: int,
    cors_origins: tuple[str, ...] = (),
    pre_create: dict[str, Any] | None = None,
    upload_page: bool = False,
) -> Service:
    """
    The tus endpoint on C{listen}: a service holding its listener and its
    takeover watch, over C{storage}, telling C{factory} (the native
    listener's) of its upload events, so hooks and metrics see both alike;
    with C{upload_page}, the browser upload page at C{/}.
    """
    from twisted.application.service import MultiService

    def emit(kind: str, **fields: Any) -> None:
        factory.upload_event(upload_event(
            kind, time=reactor.seconds(), server_id=server_id, **fields))

    stored = getattr(storage, "stored_sha256", None)
    uploads = TusUploads(
        storage, clock=reactor, server_id=server_id, max_size=max_size, keys=keys,
        expire_after=expire_after, takeover_idle=takeover_idle, emit=emit,
        metrics=factory.metrics, stored_sha256=stored,
        max_incomplete_uploads=max_incomplete_uploads,
        max_incomplete_bytes=max_incomplete_bytes,
        pre_create=PreCreateHook(reactor, **pre_create) if pre_create else None,
    )
    top = MultiService()
    _WatchService(uploads).setServiceParent(top)
    listener = ListenerService(reactor, listen, tus_site(
        uploads, timeout=idle_timeout, reactor=reactor, cors_origins=cors_origins,
        upload_page=upload_page))
    listener.setServiceParent(top)
    top.uploads = uploads  # type: ignore[attr-defined]
    top.listener = listener  # type: ignore[attr-defined]
    return top

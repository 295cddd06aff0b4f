# -*- test-case-name: tests.system.test_failover,tests.storage.test_maintenance -*-
"""
Assembling a running server: a thread pool for disk work, the filesystem
storage on it, the protocol factory and a listening endpoint, as one
L{twisted.application.service.IService}.  Used by the twistd plugin
(L{imgresume.server.tap}), by C{tac/*.tac} and by the demo.
"""

from __future__ import annotations

import functools
import os
import socket
from typing import Any, Sequence

from twisted.application.service import MultiService, Service
from twisted.internet.defer import Deferred, DeferredList, maybeDeferred, succeed
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool

from imgresume._listen import ListenerService
from imgresume.metrics import Registry, ServerMetrics, metrics_service
from imgresume.protocol import ServerLimits
from imgresume.server._admission import MAX_INCOMPLETE_UPLOADS
from imgresume.server._factory import UploadServerFactory
from imgresume.server._gc import GarbageCollectorService
from imgresume.server._hooks import HookConfig, HookDispatcher
from imgresume.server._proxytrust import (
    DEFAULT_MAX_CONNECTIONS_PER_ADDRESS,
    ProxyTrustFactory,
    TrustedProxies,
)
from imgresume.storage.filesystem import FilesystemStorage
from imgresume.storage.filesystem.gc import DEFAULT_RECORDS_OLDER_THAN
from imgresume.storage.interfaces import IUploadStorage

log = Logger()


def default_server_id() -> str:
    """A server id unique enough for logs: host name and process id."""
    return f"{socket.gethostname()}:{os.getpid()}"


class ThreadPoolService(Service):
    """Starts a thread pool with the service and stops it after the others."""

    def __init__(self, pool: ThreadPool) -> None:
        self.pool = pool

    def startService(self) -> None:
        super().startService()
        self.pool.start()

    def stopService(self) -> None:
        super().stopService()
        self.pool.stop()


class OrderedMultiService(MultiService):
    """
    A MultiService that stops its children one at a time, last added first,
    each after the previous one has finished stopping.  (MultiService stops
    them all at once: the thread pool would stop while connections are
    still releasing their uploads through it.)
    """

    def stopService(self) -> Deferred[None]:
        Service.stopService(self)
        children = list(self)[::-1]

        async def stop_all() -> None:
            for child in children:
                try:
                    await maybeDeferred(child.stopService)
                except Exception:
                    log.failure("stopping {service} failed", service=child)

        return Deferred.fromCoroutine(stop_all())


class _KeyWatchService(Service):
    """Watches the key file while the server runs."""

    def __init__(self, store: Any) -> None:
        self.store = store

    def startService(self) -> None:
        super().startService()
        self.store.start()

    def stopService(self) -> None:
        super().stopService()
        self.store.stop()


class _DrainService(Service):
    """On stop, tells connected clients the server is going and waits (bounded)."""

    def __init__(self, factory: UploadServerFactory, reactor: Any, grace: float) -> None:
        self.factory, self.reactor, self.grace = factory, reactor, grace

    def stopService(self) -> Deferred[Any]:
        super().stopService()
        self.factory.shutdown()
        waits = [p.closed for p in self.factory.connections]
        if not waits:
            return succeed(None)
        d = DeferredList(waits)
        timer = self.reactor.callLater(self.grace, d.cancel)
        d.addBoth(lambda _: timer.active() and timer.cancel())
        return d


def _s3_expiry(storage: Any, interval: float, older_than: float) -> Service:
    """Every C{interval}, abort S3 uploads started more than C{older_than} ago."""
    from twisted.application.internet import TimerService

    def expire() -> Deferred[Any]:
        return storage.expire(older_than).addErrback(
            lambda f: log.failure("S3 expiry of abandoned uploads failed", f))

    service = TimerService(interval, expire)
    service.setName("gc")
    return service


def _http_service(listen: str, storage: Any, factory: UploadServerFactory, reactor: Any,
                  server_id: str, keys: Any, limits: ServerLimits, idle_timeout: float,
                  takeover_idle: float, expire_after: float, max_incomplete: int,
                  max_incomplete_bytes: int, top: MultiService,
                  cors_origins: Sequence[str], pre_create: dict[str, Any] | None,
                  upload_page: bool = False) -> Service:
    """The tus endpoint (C{--http}), stopped before the native listener."""
    from imgresume.server._http import http_service

    service = http_service(
        listen, storage, factory, reactor=reactor, server_id=server_id, keys=keys,
        max_size=limits.max_file_size, idle_timeout=idle_timeout,
        takeover_idle=takeover_idle, expire_after=expire_after,
        max_incomplete_uploads=max_incomplete,
        max_incomplete_bytes=max_incomplete_bytes, cors_origins=tuple(cors_origins),
        pre_create=pre_create, upload_page=upload_page)
    service.setServiceParent(top)
    return service


def make_server_service(
    listen: str,
    storage: IUploadStorage | str,
    *,
    reactor: Any = None,
    server_id: str | None = None,
    limits: ServerLimits = ServerLimits(),
    handshake_timeout: float = 30.0,
    idle_timeout: float = 300.0,
    takeover_idle: float = 10.0,
    threads: int = 8,
    max_uploads_per_client: int = 64,
    max_incomplete_uploads_per_client: int = MAX_INCOMPLETE_UPLOADS,
    max_incomplete_bytes_per_client: int | None = None,
    keys: str | None = None,
    cert_identity: bool = False,
    gc_interval: float = 900.0,
    expire_after: float = 7 * 86400.0,
    expire_records_after: float = DEFAULT_RECORDS_OLDER_THAN,
    proxy_protocol_from: Sequence[str] = (),
    max_connections_per_address: int = DEFAULT_MAX_CONNECTIONS_PER_ADDRESS,
    metrics_listen: str | None = None,
    hooks: HookConfig | None = None,
    s3_options: dict[str, Any] | None = None,
    http_listen: str | None = None,
    http_cors_origins: Sequence[str] = (),
    http_pre_create: dict[str, Any] | None = None,
    verify: str = "stored",
    http_upload_page: bool = False,
) -> MultiService:
    """
    Build a server listening on the endpoint string C{listen}.

    @param storage: a storage provider, or a directory path for the shared
        filesystem storage, or C{s3://BUCKET/PREFIX} for the S3 storage
        (either run on a thread pool owned by the service).
    @param verify: C{"stored"} or C{"received"}: where a filesystem
        storage's completion digest comes from (L{FilesystemStorage}).
    @param s3_options: keyword arguments for L{S3Storage
        <imgresume.storage.s3.S3Storage>} (C{endpoint_url}, C{region},
        C{part_size}, C{spool_dir}, C{lease_ttl}) when C{storage} is an s3:// URL.
    @param max_incomplete_uploads_per_client: incomplete uploads one
        client may have on the storage, counted there (0: no limit).
    @param max_incomplete_bytes_per_client: the sizes they may declare
        together (0: no limit; default twice C{limits.max_file_size}).
    @param keys: a key file; when given, clients must authenticate (the
        file is watched and reloaded on change).
    @param cert_identity: a client with a verified TLS client certificate
        (C{listen} is C{mtls:...}) is identified by it and needs no key; see
        L{UploadServerFactory}.
    @param gc_interval: seconds between garbage collections of a filesystem
        storage (L{GarbageCollectorService}, named C{"gc"}); 0 disables.
    @param expire_after: age after which an untouched partial upload is
        removed.
    @param expire_records_after: age after which the record of a completed
        upload is removed (the completed file never is).
    @param proxy_protocol_from: networks (CIDR), addresses and C{"unix"},
        comma-separated, whose connections must start with a PROXY header
        (v1 or v2) naming the real client; see L{ProxyTrustFactory}.
    @param max_connections_per_address: connections allowed at once per
        real client address; 0 for no limit.
    @param metrics_listen: a server endpoint string where the Prometheus
        metrics are served over HTTP at C{/metrics}; None: not served (they
        are still kept, as C{top.metrics}).
    @param hooks: commands or URLs told about upload events (a
        L{HookDispatcher} named C{"hooks"}, as C{top.hooks}).
    @param http_listen: a server endpoint string where tus 1.0.0 is
        served at C{/files/} over the same storage (L{imgresume.http}; as
        C{top.http}); None: not served.
    @param http_cors_origins: the browser origins (C{https://host:port},
        or C{*}) whose pages may call the tus endpoint (CORS).
    @param http_pre_create: the tus pre-create hook: C{{"command": argv}}
        or C{{"url": URL}}, with C{"timeout"} (seconds); None: none.
    @param http_upload_page: also serve the browser upload page at C{/}
        of C{http_listen}.

    The storage self-test is not run here (it blocks); see
    L{imgresume.server._storagecheck.verify_storage}.
    """
    if reactor is None:
        from twisted.internet import reactor as _reactor

        reactor = _reactor
    top = OrderedMultiService()
    server_id = server_id or default_server_id()
    metrics = ServerMetrics(Registry())
    if metrics_listen is not None:
        # Added first, so stopped last: scrapable while the server drains.
        metrics_service(reactor, metrics_listen, metrics.registry).setServiceParent(top)
    if isinstance(storage, str):
        pool = ThreadPool(minthreads=1, maxthreads=threads, name="imgresume-storage")
        ThreadPoolService(pool).setServiceParent(top)
        if storage.startswith("s3://"):
            from imgresume.storage.s3 import S3Storage

            storage = S3Storage(
                storage, functools.partial(deferToThreadPool, reactor, pool),
                owner=server_id, **(s3_options or {}))
            if gc_interval > 0:
                _s3_expiry(storage, gc_interval, expire_after).setServiceParent(top)
        else:
            storage = FilesystemStorage(
                storage, run=functools.partial(deferToThreadPool, reactor, pool),
                owner=server_id, timings=metrics.storage_timing, verify=verify,
            )
    gc = None
    if gc_interval > 0 and isinstance(storage, FilesystemStorage):
        gc = GarbageCollectorService(
            storage._root, storage._run, reactor, gc_interval, expire_after,
            expire_records_after, metrics=metrics,
        )
        gc.setServiceParent(top)
    key_store = None
    if keys is not None:
        from imgresume.keys import KeyStore

        run = storage._run if isinstance(storage, FilesystemStorage) else (
            functools.partial(deferToThreadPool, reactor, reactor.getThreadPool()))
        key_store = KeyStore(keys, run, reactor)
        _KeyWatchService(key_store).setServiceParent(top)
    dispatcher = None
    if hooks is not None and hooks.enabled:
        # Stopped after the drain, so the events of closing uploads go out.
        dispatcher = HookDispatcher.from_config(hooks, reactor, metrics=metrics)
        dispatcher.setServiceParent(top)
    factory = UploadServerFactory(
        storage,
        server_id,
        reactor,
        limits=limits,
        handshake_timeout=handshake_timeout,
        idle_timeout=idle_timeout,
        takeover_idle=takeover_idle,
        keys=key_store,
        cert_identity=cert_identity,
        max_uploads_per_client=max_uploads_per_client,
        max_incomplete_uploads_per_client=max_incomplete_uploads_per_client,
        max_incomplete_bytes_per_client=max_incomplete_bytes_per_client,
        metrics=metrics,
        events=dispatcher,
    )
    # PROXY headers from trusted balancers, connections per client address.
    trusted = TrustedProxies.parse(proxy_protocol_from)
    wrapped = factory
    if trusted or max_connections_per_address:
        wrapped = ProxyTrustFactory(
            factory, reactor, trusted, max_connections_per_address,
            header_timeout=handshake_timeout,
        )
    listener = ListenerService(reactor, listen, wrapped)
    _DrainService(factory, reactor, grace=10.0).setServiceParent(top)
    listener.setServiceParent(top)
    top.http = None  # type: ignore[attr-defined]
    if http_listen is not None:
        top.http = _http_service(  # type: ignore[attr-defined]
            http_listen, storage, factory, reactor, server_id, key_store, limits,
            idle_timeout, takeover_idle, expire_after, max_incomplete_uploads_per_client,
            2 * limits.max_file_size if max_incomplete_bytes_per_client is None
            else max_incomplete_bytes_per_client, top, http_cors_origins, http_pre_create,
            http_upload_page)
    top.factory = factory  # type: ignore[attr-defined]
    top.listener = listener  # type: ignore[attr-defined]
    top.gc = gc  # type: ignore[attr-defined]
    top.metrics = metrics  # type: ignore[attr-defined]
    top.hooks = dispatcher  # type: ignore[attr-defined]
    return top

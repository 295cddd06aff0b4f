# -*- test-case-name: tests.test_server_process -*-
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
from typing import Any

from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import MultiService, Service
from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.internet.endpoints import serverFromString
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool

from imgresume.protocol import ServerLimits
from imgresume.server._protocol import UploadServerFactory
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


def makeServerService(
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
) -> MultiService:
    """
    Build a server listening on the endpoint string C{listen}.

    @param storage: a storage provider, or a directory path for the shared
        filesystem storage (run on a thread pool owned by the service).
    """
    if reactor is None:
        from twisted.internet import reactor as _reactor

        reactor = _reactor
    top = MultiService()
    server_id = server_id or default_server_id()
    if isinstance(storage, str):
        from imgresume.storage.filesystem import FilesystemStorage

        pool = ThreadPool(minthreads=1, maxthreads=threads, name="imgresume-storage")
        ThreadPoolService(pool).setServiceParent(top)
        storage = FilesystemStorage(
            storage, run=functools.partial(deferToThreadPool, reactor, pool),
            owner=server_id,
        )
    factory = UploadServerFactory(
        storage,
        server_id,
        reactor,
        limits=limits,
        handshake_timeout=handshake_timeout,
        idle_timeout=idle_timeout,
        takeover_idle=takeover_idle,
    )
    listener = StreamServerEndpointService(serverFromString(reactor, listen), factory)
    listener._raiseSynchronously = True
    _DrainService(factory, reactor, grace=10.0).setServiceParent(top)
    listener.setServiceParent(top)
    top.factory = factory  # type: ignore[attr-defined]
    top.listener = listener  # type: ignore[attr-defined]
    return top

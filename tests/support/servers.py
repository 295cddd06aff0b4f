"""
Upload servers in this process on 127.0.0.1, for client tests on real
sockets: L{ServerTestCase} starts them (L{CuttingServerFactory}: a real
server that can cut one connection, as a crash would) and makes uploaders
with fast retries; L{RoundRobinEndpoint} is the smallest load balancer.
"""

from __future__ import annotations

import os
import random
from typing import Any, Callable

from zope.interface import implementer

from twisted.internet import reactor
from twisted.internet.defer import Deferred, DeferredList, maybeDeferred
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.trial.unittest import TestCase

from imgresume.client import Uploader
from imgresume.server import UploadServerFactory, UploadServerProtocol
from imgresume.storage.filesystem import FilesystemStorage

CHUNK = 64 * 1024
WINDOW = 4


def write_file(path: str, size: int, seed: int = 0) -> bytes:
    """Write C{size} reproducible pseudo-random bytes to C{path}; return them."""
    content = random.Random(seed).randbytes(size)
    with open(path, "wb") as f:
        f.write(content)
    return content


class CuttingServerProtocol(UploadServerProtocol):
    """
    A real server connection that, once per factory, aborts itself after
    receiving C{factory.cut_after} bytes (after handling them), as a crashed
    server or a broken network path would.
    """

    received = 0

    def dataReceived(self, data: bytes) -> None:
        super().dataReceived(data)
        self.received += len(data)
        factory = self.factory
        if (
            factory.cut_after is not None
            and not factory.cut_done
            and self.received >= factory.cut_after
        ):
            factory.cut_done = True
            if factory.on_cut is not None:
                factory.on_cut()
            self.transport.abortConnection()


class CuttingServerFactory(UploadServerFactory):
    """
    L{UploadServerFactory} on the real reactor that remembers every
    connection (so tests can wait for all of them to close) and can cut one.
    """

    noisy = False

    def __init__(
        self,
        storage: Any,
        server_id: str,
        *,
        cut_after: int | None = None,
        on_cut: Callable[[], None] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(storage, server_id, reactor, **kwargs)
        self.cut_after = cut_after
        self.cut_done = False
        self.on_cut = on_cut
        self.protocols: list[UploadServerProtocol] = []

    def buildProtocol(self, addr: Any) -> UploadServerProtocol:
        proto = CuttingServerProtocol(self)
        self.protocols.append(proto)
        return proto

    def all_closed(self) -> Deferred[Any]:
        """Fires once every connection this factory made has closed."""
        return DeferredList([p.closed for p in self.protocols])


@implementer(IStreamClientEndpoint)
class RoundRobinEndpoint:
    """
    The smallest load balancer: each connection goes to the next endpoint
    of a fixed list, in turn.
    """

    def __init__(self, endpoints: list[IStreamClientEndpoint]) -> None:
        self.endpoints = endpoints
        self.used: list[int] = []

    def connect(self, factory: Any) -> Deferred[Any]:
        index = len(self.used) % len(self.endpoints)
        self.used.append(index)
        return self.endpoints[index].connect(factory)

    def __repr__(self) -> str:
        return f"RoundRobinEndpoint({len(self.endpoints)} endpoints)"


class ServerTestCase(TestCase):
    """Helpers to run servers on 127.0.0.1 and clients against them."""

    timeout = 20

    def setUp(self) -> None:
        self.work = os.path.abspath(self.mktemp())
        os.makedirs(self.work)

    def start_server(
        self, storage: Any, server_id: str = "node-a", port: int = 0, **kwargs: Any
    ) -> tuple[CuttingServerFactory, Any]:
        """
        Listen on 127.0.0.1 with a L{CuttingServerFactory}; on cleanup stop
        listening and wait until every server-side connection has closed.
        """
        factory = CuttingServerFactory(storage, server_id, **kwargs)
        listening = reactor.listenTCP(port, factory, interface="127.0.0.1")

        async def stop() -> None:
            await maybeDeferred(listening.stopListening)
            await factory.all_closed()

        self.addCleanup(lambda: Deferred.fromCoroutine(stop()))
        return factory, listening

    def fs_storage(self, root: str | None = None) -> FilesystemStorage:
        """A filesystem storage on C{root} (default: one in the test's temp dir)."""
        if root is None:
            root = os.path.join(self.work, "storage")
        os.makedirs(root, exist_ok=True)
        return FilesystemStorage(root, busy_retry_after=0.05)

    def uploader(self, endpoint: Any, **kwargs: Any) -> Uploader:
        """An L{Uploader} with fast retries, small chunks and no journal by default."""
        kwargs.setdefault("journal", None)
        kwargs.setdefault("backoff_base", 0.01)
        kwargs.setdefault("backoff_max", 0.1)
        kwargs.setdefault("connect_timeout", 2.0)
        kwargs.setdefault("stall_timeout", 5.0)
        kwargs.setdefault("chunk_size", CHUNK)
        kwargs.setdefault("window", WINDOW)
        return Uploader(endpoint, reactor=reactor, client_id="test-client", **kwargs)

    def local_file(self, size: int, name: str = "scan.tif", seed: int = 0) -> tuple[str, bytes]:
        """A local file of C{size} bytes in the test's directory, and its bytes."""
        path = os.path.join(self.work, name)
        return path, write_file(path, size, seed)


def endpoint_of(listening: Any) -> str:
    """The client endpoint string of a listening port."""
    return f"tcp:127.0.0.1:{listening.getHost().port}"

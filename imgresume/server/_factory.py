# -*- test-case-name: tests.server.test_protocol,tests.server.test_memory,tests.server.test_hooks -*-
"""
The server's protocol factory: its settings, its connections, and what they
share (the quota of open uploads, the memory budget for received data, the
sink of upload events); the periodic takeover check and the shutdown.
"""

from __future__ import annotations

from typing import Any

import attrs
from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import Factory
from twisted.internet.task import LoopingCall

from imgresume.logs import PeerLogLimiter
from imgresume.metrics import Registry, ServerMetrics
from imgresume.protocol import ServerLimits
from imgresume.server._admission import (
    MAX_INCOMPLETE_UPLOADS,
    IncompleteQuota,
    MemoryBudget,
    UploadQuota,
)
from imgresume.server._handshake import Handshake
from imgresume.server._protocol import UploadServerProtocol
from imgresume.storage.interfaces import IUploadStorage

#: Default memory for received data, all connections together (see
#: L{UploadServerFactory.chunk_memory_limit}).
DATA_MEMORY = 32 * 1024 * 1024


class UploadServerFactory(Factory):
    """
    Builds L{UploadServerProtocol}s for one server, and holds what they
    share.  Created by L{imgresume.server.make_server_service} (and by tests
    with a memory storage and a fake clock).
    """

    def __init__(
        self,
        storage: IUploadStorage,
        server_id: str,
        clock: IReactorTime,
        limits: ServerLimits = ServerLimits(),
        handshake_timeout: float = 30.0,
        idle_timeout: float = 300.0,
        takeover_idle: float = 10.0,
        takeover_check_interval: float = 1.0,
        keys: Any = None,
        cert_identity: bool = False,
        max_uploads_per_client: int = 64,
        metrics: ServerMetrics | None = None,
        events: Any = None,
        max_incomplete_uploads_per_client: int = MAX_INCOMPLETE_UPLOADS,
        max_incomplete_bytes_per_client: int | None = None,
    ) -> None:
        """
        @param keys: a L{imgresume.keys.KeyStore}: when given, every client
            must authenticate with its key in the handshake.
        @param cert_identity: a client with a verified TLS certificate (an
            C{mtls:} listener) must use the certificate's identity as its
            client id, and needs no key: the certificate is its credential.
        @param takeover_idle: a connection silent for this long gives up its
            upload when another connection asks for it.
        @param takeover_check_interval: how often connections are checked.
        @param max_uploads_per_client: uploads one client may have open on
            this server at once (0: no limit).
        @param max_incomplete_uploads_per_client: incomplete uploads one
            client may have on the storage, all servers together (0: no
            limit); see L{IncompleteQuota}.
        @param max_incomplete_bytes_per_client: the sizes they may declare
            together (0: no limit; default: twice C{limits.max_file_size}).
        @param metrics: where this server's counters go (default: a registry
            of its own, nobody scrapes).
        @param events: an L{imgresume.server._upload_events.IUploadEvents}
            told about every upload created, resumed, completed or failed
            (the hooks).
        """
        self.storage = storage
        self.keys = keys
        self.cert_identity = cert_identity
        self.server_id = server_id
        self.clock = clock
        if limits.max_put and getattr(storage, "store_whole", None) is None:
            # A storage without the one-step store (IUploadStorage.store_whole)
            # takes every file through UPLOAD: PUT is not offered.
            limits = attrs.evolve(limits, max_put=0)
        self.limits = limits
        self.handshake_timeout = handshake_timeout
        self.idle_timeout = idle_timeout
        self.connections: set[UploadServerProtocol] = set()
        #: Bytes of chunks a connection gathers for its next batch before it
        #: stops reading (the batch being written is one more such amount).
        self.batch_limit = max(2 * limits.max_payload, 8 * 1024 * 1024)
        #: Advertised in WELCOME (option "window"): the most DATA packets a
        #: client should have in flight; more only wait in buffers.
        self.max_window = 32
        #: The uploads each client has open, and how many it may.
        self.quota = UploadQuota(max_uploads_per_client)
        #: The incomplete uploads each client may have on the storage.
        self.incomplete = IncompleteQuota(
            max_incomplete_uploads_per_client,
            2 * limits.max_file_size if max_incomplete_bytes_per_client is None
            else max_incomplete_bytes_per_client)
        #: How often what peers do wrong is logged (one summary a minute
        #: per peer past the first few lines).
        self.peer_log = PeerLogLimiter(UploadServerProtocol.log, clock)
        #: The received data all connections may hold (frames being
        #: received, counted whole once let in; chunks gathered or being
        #: written) before they stop reading, and the ones waiting for room.
        self.memory = MemoryBudget(max(4 * self.batch_limit, DATA_MEMORY))
        self.takeover_idle = takeover_idle
        self._takeover_loop = LoopingCall(self.check_takeovers)
        self._takeover_loop.clock = clock
        self._takeover_check_interval = takeover_check_interval
        self.metrics = metrics if metrics is not None else ServerMetrics(Registry())
        self.metrics.connections_active.set_function(lambda: len(self.connections))
        self.metrics.uploads_active.set_function(lambda: self.quota.total)
        self.events = events

    @property
    def chunk_memory_limit(self) -> int:
        """Bytes of received data all connections may hold (C{--max-data-memory})."""
        return self.memory.limit

    @chunk_memory_limit.setter
    def chunk_memory_limit(self, value: int) -> None:
        self.memory.limit = value

    @property
    def chunk_bytes(self) -> int:
        """Bytes of received data all connections hold now."""
        return self.memory.used

    def startFactory(self) -> None:
        if self._takeover_check_interval > 0:
            self._takeover_loop.start(self._takeover_check_interval, now=False)
        self.peer_log.start()

    def stopFactory(self) -> None:
        if self._takeover_loop.running:
            self._takeover_loop.stop()
        self.peer_log.stop()

    def buildProtocol(self, addr: Any) -> UploadServerProtocol:
        return UploadServerProtocol(self)

    def new_handshake(self) -> Handshake:
        """A new connection's handshake, with this server's policy."""
        return Handshake(self.server_id, self.keys, self.cert_identity, self.max_window)

    def open_uploads(self, client_id: str) -> int:
        """Uploads C{client_id} has open on this server."""
        return self.quota.open_uploads(client_id)

    def upload_event(self, event: dict[str, Any]) -> None:
        """
        An upload event from a connection (see
        L{imgresume.server._upload_events.upload_event}): counted, then
        given to the hooks.  Never raises: a hook's trouble is never the
        upload's.
        """
        self.metrics.upload_event(event)
        if self.events is not None:
            try:
                self.events.emit(event)
            except Exception:
                UploadServerProtocol.log.failure(
                    "upload event {event} not delivered", event=event["event"])

    def check_takeovers(self) -> None:
        """Let every silent connection holding an upload yield it if asked."""
        now = self.clock.seconds()
        for proto in list(self.connections):
            proto.check_takeover(now)

    def shutdown(self) -> None:
        """Tell every connected client the server is stopping, and close."""
        for proto in list(self.connections):
            proto.shutdown()

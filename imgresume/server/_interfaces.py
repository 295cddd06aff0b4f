# -*- test-case-name: tests.server.test_protocol -*-
"""
What a connection needs of the server it belongs to, as a typing protocol:
L{imgresume.server._protocol.UploadServerProtocol} is written against
L{ServerSide}, and L{imgresume.server._factory.UploadServerFactory}
provides it (so that neither module needs to import the other's name for
its types).
"""

from __future__ import annotations

from typing import Any, Protocol

from twisted.internet.interfaces import IReactorTime

from imgresume.logs import PeerLogLimiter
from imgresume.metrics import ServerMetrics
from imgresume.protocol import ServerLimits
from imgresume.server._admission import IncompleteQuota, MemoryBudget, UploadQuota
from imgresume.server._handshake import Handshake
from imgresume.storage.interfaces import IUploadStorage


class ServerSide(Protocol):
    """
    What a connection uses of the server it belongs to: its settings and
    the objects all its connections share.
    L{imgresume.server._factory.UploadServerFactory} provides it.
    """

    storage: IUploadStorage
    server_id: str
    clock: IReactorTime
    limits: ServerLimits
    handshake_timeout: float
    idle_timeout: float
    takeover_idle: float
    #: Bytes of chunks a connection gathers before it stops taking more.
    batch_limit: int
    metrics: ServerMetrics
    connections: set[Any]
    quota: UploadQuota
    incomplete: IncompleteQuota
    memory: MemoryBudget
    peer_log: PeerLogLimiter

    def new_handshake(self) -> Handshake:
        """A new connection's handshake, with the server's policy."""

    def upload_event(self, event: dict[str, Any]) -> None:
        """Count an upload event and hand it to the hooks."""

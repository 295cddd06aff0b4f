# -*- test-case-name: tests.server.test_protocol -*-
"""
Takeover: when a connection gives its upload up to a newer one.

A client that loses its connection reconnects, often through the balancer
to another server, and resumes; the storage then tells the old owner that
another connection asked for the upload.  If the old connection's client
has been silent for a while, it is most likely a zombie (half-open TCP)
whose late packets must never be written: it yields the upload and closes.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from imgresume.errors import UploadTakenOver
from imgresume.storage.interfaces import IUploadWriter


class Takeover:
    """
    One connection's watch for a takeover.  Owned by
    L{imgresume.server._protocol.UploadServerProtocol}: it says when the
    client was last heard from (L{heard}); on the factory's periodic check
    it lets L{ask} put the question to storage, and on a yes takes from
    L{yielded} the error that closes the connection.

    @param idle: seconds the client must have been silent before the
        connection yields (C{takeover_idle}).
    @param log: the connection's logger (its warnings are the connection's).
    """

    def __init__(self, clock: Any, idle: float, log: Logger) -> None:
        self._clock = clock
        self._idle = idle
        self._log = log
        self._last_heard = clock.seconds()

    def heard(self) -> None:
        """The client sent something."""
        self._last_heard = self._clock.seconds()

    def ask(self, writer: IUploadWriter, upload_id: str | None,
            now: float) -> Deferred[bool] | None:
        """
        If the client has been silent long enough, ask storage whether
        another connection asked for the upload C{writer} holds: a Deferred
        of the answer (False when storage cannot tell); else None.
        """
        if now - self._last_heard < self._idle:
            return None

        def unknown(failure: Failure) -> bool:
            # Cannot tell (storage hiccup): keep the upload, ask again later.
            self._log.warn("upload {upload_id}: cannot check for a takeover request: "
                           "{error}", upload_id=upload_id, error=failure.getErrorMessage())
            return False

        return writer.takeover_requested().addErrback(unknown)

    def yielded(self, upload_id: str | None, peer: str) -> UploadTakenOver:
        """The connection yields its upload: the error to close it with."""
        self._log.warn(
            "upload {upload_id}: yielding to a newer connection; {peer} has been "
            "silent for {idle:.1f} s",
            upload_id=upload_id, peer=peer, idle=self._clock.seconds() - self._last_heard,
        )
        return UploadTakenOver(
            f"upload {upload_id} was taken over by a newer connection after this one "
            "went silent; reconnect and resume"
        )

# -*- test-case-name: tests.client.test_put -*-
"""
A small file sent whole in one PUT (protocol.md, PUT): read and hashed on a
thread, sent under an upload id derived from its name and digest, and sent
again under the same id after a break, so that the server stores it once
whatever happens to the connection, or to the client.
"""

from __future__ import annotations

import hashlib
import time
from typing import Any, Awaitable, Callable, Mapping

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.task import deferLater
from twisted.logger import Logger

from imgresume import integrity
from imgresume.client._connection import UploadConnection
from imgresume.client._describe import describe, retry_note
from imgresume.client._results import IfExistsNotOffered, Progress, UploadFailed, UploadResult
from imgresume.client._runs import FileRun, Turn
from imgresume.client._source import LocalFile, SourceChanged
from imgresume.errors import ImgresumeError
from imgresume.names import IF_EXISTS_KEY
from imgresume.protocol import SKIPPED_UPLOAD_ID, Completed, Put

#: PUTs a session keeps in flight on its connection, so that it never idles
#: for a round trip between small files.
PUTS_IN_FLIGHT = 2


def put_upload_id(name: str, digest: bytes, algorithm: str = "sha256") -> str:
    """
    The upload id of a PUT of the bytes whose C{algorithm} digest is
    C{digest} under C{name}: the first 32 hex digits of SHA-256 of
    C{imgresume PUT} NUL name NUL digest (SHA-256) or C{imgresume PUT} NUL
    name NUL algorithm NUL digest (another algorithm, e.g. BLAKE3).

    Derived, not random: sending the same file to the same name again (after
    a lost answer, a killed client, with or without the journal) names the
    same upload, and the server, which keys a PUT by its client and this id,
    answers with the file it stored instead of storing a copy.  A changed
    file, or another name, is another upload.  The client derives it with
    its own digest (C{--digest}), whatever a connection negotiates, so that
    the one hash of the file it makes serves the id and, usually, the PUT.
    """
    raw = b"imgresume PUT\0" + name.encode("utf-8", "surrogatepass") + b"\0"
    if algorithm != "sha256":
        raw += algorithm.encode("ascii") + b"\0"
    return hashlib.sha256(raw + digest).hexdigest()[:32]


def put_entry_algorithm(entry: Mapping[str, Any], name: str) -> str | None:
    """
    The digest algorithm of a journal entry that records a completed PUT of
    C{name} (the one its upload id was derived with), or None if it is not
    such an entry.
    """
    digest = entry.get("sha256")
    if not entry.get("complete") or not isinstance(digest, str) or len(digest) != 64:
        return None
    value = bytes.fromhex(digest)
    for algorithm in integrity.DIGESTS:
        if entry.get("upload_id") == put_upload_id(name, value, algorithm):
            return algorithm
    return None


def takes_put(connection: UploadConnection, size: int) -> bool:
    """Whether the server of C{connection} takes a file of C{size} bytes in a PUT."""
    limit = connection.machine.put_limit
    return 0 < limit and size <= limit


def _frame(upload_id: str, name: str, metadata: dict[str, str], data: bytes,
           digest: str, checksum: str, digest_value: bytes | None = None) -> Put:
    """
    A PUT of C{data} in the digest and checksum a connection negotiated (in
    a thread); C{digest_value}: the C{digest} of C{data}, if known already.
    """
    if digest_value is None:
        digest_value = integrity.digest_of(digest, data)
    return Put(upload_id, name, digest_value, metadata, integrity.checksum(checksum, data),
               data)


class PutNotTaken(Exception):
    """
    A PUT of this file was sent before (it may be stored) and the server a
    retry reached does not take PUT (an older one, in a pool being
    upgraded): an UPLOAD there could store the file twice, so the PUT is
    tried again on another connection, through the balancer.
    """


class PutSender:
    """
    Sends one file at a time in a PUT for an upload session (made by
    L{imgresume.client._session.UploadSession}, which lends it its uploader,
    its connection, the way to drop that connection, and its journal
    writes).
    """

    log = Logger(namespace="imgresume.client._session")

    def __init__(
        self,
        uploader: Any,
        ready_connection: Callable[..., Awaitable[UploadConnection]],
        journal_written: Callable[[Deferred[None]], Awaitable[None]],
        drop_connection: Callable[[], None],
    ) -> None:
        self._uploader = uploader
        self._ready_connection = ready_connection
        self._drop_connection = drop_connection
        self._journal_written = journal_written

    async def send(
        self,
        source: LocalFile,
        name: str,
        metadata: dict[str, str],
        progress: Callable[[Progress], None],
        started: float,
        state: FileRun,
        turn: Turn,
        key: str,
        confirming: str | None = None,
    ) -> UploadResult:
        """
        Send a small file whole in one PUT, read and hashed in a thread; a
        break before its answer sends the same PUT (the same upload id,
        L{put_upload_id}: the server stores it once) on the next connection.
        Once the PUT is sent, the session's next upload may go (C{turn} is
        given).  C{confirming}: the journal has this file's PUT complete,
        its upload id derived with this digest algorithm, so an answer for
        the same upload id is reported C{already_complete}.
        """
        up = self._uploader
        asked = {k: v for k, v in metadata.items() if k != IF_EXISTS_KEY}
        if up.if_exists != "rename":
            asked[IF_EXISTS_KEY] = up.if_exists
        # The frame in each connection's negotiated algorithms (§2b), made
        # once per pair of them (a retry may reach another server), the
        # likely pair with the read, before the turn is taken, so that the
        # PUT goes out at once, while the one before it is still in flight.
        likely = (up.digest, integrity.DEFAULT_CHECKSUM)
        id_algorithm = confirming or up.digest

        def prepared(data: bytes, digest: bytes) -> tuple[bytes, bytes, Put]:
            upload_id = put_upload_id(name, digest, id_algorithm)
            return data, digest, _frame(upload_id, name, asked, data, *likely,
                                        digest if id_algorithm == likely[0] else None)

        data, digest, first = await source.read_whole(prepared, id_algorithm)
        upload_id = first.upload_id
        state.upload_id = upload_id
        frames = {likely: first}
        while True:
            state.attempts += 1
            server = None
            try:
                await turn.take()
                connection = await self._ready_connection(puts=True)
                server = connection.server_id
                if not connection.machine.offers_if_exists(up.if_exists):
                    raise UploadFailed(
                        f"{name}: server {server} does not offer if-exists={up.if_exists} "
                        "(it predates it); nothing was sent: upgrade the servers, or let a "
                        "clash be renamed (if-exists=rename)", IfExistsNotOffered(up.if_exists))
                if not takes_put(connection, source.size):
                    self._drop_connection()  # the next try goes through the balancer
                    raise PutNotTaken(
                        f"server {server} does not take PUT, and the PUT sent before may "
                        "be stored: not sent there; trying another server")
                algorithms = (connection.machine.digest, connection.machine.checksum)
                if algorithms not in frames:
                    frames[algorithms] = await up.run(
                        _frame, upload_id, name, asked, data, *algorithms)
                frame = frames[algorithms]
                progress(Progress(name, "uploading", 0, source.size, server))
                answer = connection.put(frame)
                state.bytes_sent += source.size
                turn.give()  # the next file may go on this connection now
                completed: Completed = await answer
            except CancelledError:
                raise
            except Exception as error:
                if server is not None:
                    state.servers.append(server)
                delay = self._failed(state, error, name)
                turn.give()
                progress(Progress(name, "retrying", 0, source.size, server, note=retry_note(
                    error, up.endpoint_text, max(state.failures, 1),
                    max(up.max_attempts - 1, 1), delay)))
                await deferLater(up.reactor, delay)
            else:
                state.servers.append(server or "?")
                break
        algorithm = algorithms[0]
        if completed.sha256 != frame.sha256 or completed.size != source.size:
            raise state.failed(
                f"{name}: server reports {completed.size} bytes with "
                f"{integrity.title(algorithm)} {completed.sha256.hex()}; the local file "
                f"has {source.size} bytes with {frame.sha256.hex()}")
        skipped = completed.upload_id == SKIPPED_UPLOAD_ID
        state.acknowledged = completed.size
        journal = up.journal_queue
        if journal is not None:
            await self._journal_written(journal.forget(key) if skipped else journal.complete(
                key, completed.upload_id, digest.hex(), id_algorithm))
        progress(Progress(name, "done", completed.size, completed.size, state.servers[-1],
                          completed.path))
        return UploadResult(
            name=name, upload_id="" if skipped else completed.upload_id,
            size=completed.size, sha256=completed.sha256.hex(), path=completed.path,
            resumed_at=[], bytes_sent=state.bytes_sent, attempts=state.attempts,
            servers=state.servers, seconds=round(time.monotonic() - started, 3),
            already_complete=confirming is not None and completed.upload_id == frame.upload_id,
            skipped=skipped, digest=algorithm,
        )

    def _failed(self, state: FileRun, error: Exception, name: str) -> float:
        """
        A PUT was not answered COMPLETED: raise L{UploadFailed} to give up,
        or return how long to wait before it is sent again.
        """
        up = self._uploader
        if isinstance(error, UploadFailed):
            raise error
        state.failures += 1
        self.log.info("PUT {attempt} of {name} ended: {error}", attempt=state.attempts,
                      name=name, error=describe(error, up.endpoint_text))
        if isinstance(error, SourceChanged):
            raise state.failed(f"{name}: source changed during upload: {error}", error)
        if isinstance(error, ImgresumeError) and not error.retryable:
            raise state.failed(f"{name}: {error}", error)
        if state.failures >= up.max_attempts:
            raise state.failed(
                f"{name}: gave up after {state.failures} attempts (last: "
                f"{describe(error, up.endpoint_text)})", error)
        return up.backoff(state.failures, getattr(error, "retry_after", 0.0))

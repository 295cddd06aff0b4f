# -*- test-case-name: tests.client.test_uploader,tests.client.test_interrupt -*-
"""
What the client reports: the result of a completed upload, progress
reports, and the exception for an upload that cannot be completed.
"""

from __future__ import annotations

from typing import Any

import attrs


class UploadFailed(Exception):
    """
    The upload could not be completed; C{cause} is the last error.  The
    residual (if any) stays on the server and the journal, so running the
    same upload again resumes it.  Raised (as a Deferred's failure) by
    L{Uploader.upload} and L{UploadSession.upload}.

    @ivar upload_id: the server's id of the upload, if it accepted one.
    @ivar acknowledged: the offset the server last acknowledged in this
        run (bytes it holds, durable, for a resume), or None if it never
        answered about this file.
    @ivar bytes_sent: payload bytes sent in this run, across attempts.
    """

    def __init__(
        self,
        message: str,
        cause: BaseException | None = None,
        *,
        upload_id: str | None = None,
        acknowledged: int | None = None,
        bytes_sent: int = 0,
    ) -> None:
        super().__init__(message)
        self.cause = cause
        self.upload_id = upload_id
        self.acknowledged = acknowledged
        self.bytes_sent = bytes_sent


class UploadInterrupted(UploadFailed):
    """
    The upload was stopped before the server confirmed it, not for anything
    wrong with the file or the servers: the program is shutting down (SIGINT,
    SIGTERM, C{reactor.stop()}) or L{Uploader.interrupt} was called.  What
    the server acknowledged stays there and in the journal: the same upload
    run again resumes it.

    Raised by L{Uploader.upload}, L{UploadSession.upload} and
    L{imgresume.client.upload_files} for the file under way (and at once
    for a file asked for afterwards); L{Uploader.upload_batch} fails with
    one whose C{batch} is the L{BatchResult} so far.

    @ivar signal: the number of the signal that stopped the upload, when
        known (C{signal.SIGINT}, C{signal.SIGTERM}), else None.
    @ivar batch: for a batch, its L{BatchResult}: the outcomes of the files
        that ended (an interrupted file's C{error} is an
        L{UploadInterrupted}), and the files not started.
    """

    def __init__(
        self,
        message: str,
        *,
        signal: int | None = None,
        upload_id: str | None = None,
        acknowledged: int | None = None,
        bytes_sent: int = 0,
        batch: Any = None,
    ) -> None:
        super().__init__(message, None, upload_id=upload_id, acknowledged=acknowledged,
                         bytes_sent=bytes_sent)
        self.signal = signal
        self.batch = batch


class IfExistsNotOffered(Exception):
    """
    The C{cause} of an L{UploadFailed}: the uploader was asked for an
    C{if_exists} policy (C{skip} or C{fail}) that the server does not
    offer (an older server); nothing was sent.
    """

    def __init__(self, policy: str) -> None:
        super().__init__(f"the server does not offer if-exists={policy}")
        self.policy = policy


@attrs.frozen
class UploadResult:
    """
    A completed, verified upload.  Returned by L{Uploader.upload} and
    L{UploadSession.upload}.

    @ivar attempts: tries, each on a connection (a new one, or one the
        previous file of a session left ready), including tries that failed
        to connect.
    @ivar already_complete: the server reported the upload complete before
        this call sent any byte: an earlier run had finished it (the
        journal knew its upload id), and this call only confirmed it.
    @ivar skipped: nothing was sent because the server already holds a
        file of this name with the same size and SHA-256 (the uploader's
        C{if_exists} was C{"skip"}); C{path} is where it lies and
        C{upload_id} is empty (no upload was made).
    """

    name: str
    upload_id: str
    size: int
    sha256: str
    path: str
    resumed_at: list[int]
    bytes_sent: int
    attempts: int
    servers: list[str]
    seconds: float
    already_complete: bool = False
    skipped: bool = False
    #: The algorithm of the file's digest, whose hex C{sha256} holds (the
    #: field keeps its historical name): C{"blake3"} or C{"sha256"}, as the
    #: upload was created with (docs/protocol.md, section 2b).
    digest: str = "sha256"

    def to_json(self) -> dict[str, Any]:
        """
        The fields as a JSON-ready dict (what C{imgresume upload --json}
        prints): the digest as C{"digest": {"algorithm": ..., "hex": ...}},
        and as C{"sha256"} too when it is a SHA-256.
        """
        row = attrs.asdict(self)
        row["digest"] = {"algorithm": self.digest, "hex": self.sha256}
        if self.digest != "sha256":
            del row["sha256"]
        return row


@attrs.frozen
class Progress:
    """
    A progress report: C{phase} is "hashing", "uploading", "retrying" or
    "done".  For "retrying", C{note} says why and when, as in
    C{"connection refused by 127.0.0.1:7000, retry 3/9 in 2.1 s"}, and
    C{done} is the offset the server last acknowledged; a "done" report
    carries the C{path} where the file is stored.
    """

    name: str
    phase: str
    done: int
    total: int
    server_id: str | None = None
    path: str | None = None
    note: str | None = None

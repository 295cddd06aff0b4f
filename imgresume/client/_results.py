# -*- test-case-name: tests.client.test_uploader -*-
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
    same upload again resumes it.
    """

    def __init__(self, message: str, cause: BaseException | None = None) -> None:
        super().__init__(message)
        self.cause = cause


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

    def to_json(self) -> dict[str, Any]:
        """The fields as a JSON-ready dict (what C{imgresume upload --json} prints)."""
        return attrs.asdict(self)


@attrs.frozen
class Progress:
    """
    A progress report: C{phase} is "hashing", "uploading" or "done"; a
    "done" report carries the C{path} where the file is stored.
    """

    name: str
    phase: str
    done: int
    total: int
    server_id: str | None = None
    path: str | None = None

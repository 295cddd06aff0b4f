"""
The imgresume client library.

Deferred-returning::

    from imgresume.client import Uploader
    d = Uploader("tcp:lb.example:7000").upload("scan-0001.tiff")

Many files over few connections (a scanner's batch)::

    d = Uploader("tcp:lb.example:7000").upload_batch(paths, parallel=4)

Blocking (from ordinary, non-Twisted code)::

    from imgresume.client import upload_files
    [result] = upload_files("tcp:lb.example:7000", ["scan-0001.tiff"])

See C{docs/client.md}.
"""

from imgresume.client._attempt import ConnectionBroken, ResidualMismatch, Stalled
from imgresume.client._batch import BatchItem, BatchResult, FileOutcome
from imgresume.client._blocking import upload_files
from imgresume.client._collect import (
    CollectedFiles,
    RefusedFile,
    SkippedFile,
    collect_files,
)
from imgresume.client._journal import Journal, default_journal_path
from imgresume.client._plan import PlannedUpload
from imgresume.client._results import (
    IfExistsNotOffered,
    Progress,
    UploadFailed,
    UploadInterrupted,
    UploadResult,
)
from imgresume.client._session import UploadSession
from imgresume.client._source import SourceChanged
from imgresume.client._uploader import Uploader, default_client_id

__all__ = [
    "Uploader", "UploadSession", "UploadResult", "UploadFailed", "UploadInterrupted",
    "Progress", "BatchItem", "FileOutcome", "BatchResult", "PlannedUpload",
    "collect_files", "CollectedFiles", "RefusedFile", "SkippedFile", "Journal",
    "default_journal_path", "default_client_id", "upload_files", "SourceChanged",
    "ConnectionBroken", "Stalled", "ResidualMismatch", "IfExistsNotOffered",
]

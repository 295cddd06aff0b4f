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

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
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

#: Where each name lives: imported when first used, so that a program that
#: needs a little of the client (C{collect_files}) does not import it all.
_MODULES = {
    "ConnectionBroken": "_attempt", "ResidualMismatch": "_attempt", "Stalled": "_attempt",
    "BatchItem": "_batch", "BatchResult": "_batch", "FileOutcome": "_batch",
    "upload_files": "_blocking",
    "CollectedFiles": "_collect", "RefusedFile": "_collect", "SkippedFile": "_collect",
    "collect_files": "_collect",
    "Journal": "_journal", "default_journal_path": "_journal",
    "PlannedUpload": "_plan",
    "IfExistsNotOffered": "_results", "Progress": "_results", "UploadFailed": "_results",
    "UploadInterrupted": "_results", "UploadResult": "_results",
    "UploadSession": "_session",
    "SourceChanged": "_source",
    "Uploader": "_uploader", "default_client_id": "_uploader",
}

__all__ = [
    "Uploader", "UploadSession", "UploadResult", "UploadFailed", "UploadInterrupted",
    "Progress", "BatchItem", "FileOutcome", "BatchResult", "PlannedUpload",
    "collect_files", "CollectedFiles", "RefusedFile", "SkippedFile", "Journal",
    "default_journal_path", "default_client_id", "upload_files", "SourceChanged",
    "ConnectionBroken", "Stalled", "ResidualMismatch", "IfExistsNotOffered",
]


def __getattr__(name: str) -> Any:
    """A public name, from its module (imported now if it was not)."""
    module = _MODULES.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))

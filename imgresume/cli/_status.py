# -*- test-case-name: tests.cli.test_status -*-
"""C{imgresume status} (ask the servers) and C{imgresume ls} (read a storage directory)."""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

from twisted.internet import defer
from twisted.python import usage

from imgresume._options import EXIT_FAILED, EXIT_OK, EXIT_USAGE, BaseOptions
from imgresume.sizes import format_size


def format_age(seconds: float) -> str:
    """C{seconds} for a human: C{45 s}, C{12 min}, C{3.5 h}, C{8.0 d}."""
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    if seconds < 2 * 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} d"


class StatusOptions(BaseOptions):
    synopsis = "--to ENDPOINT [UPLOAD_ID...] [options]"
    longdesc = """Ask the servers where uploads stand: offset, whether a server is
writing them right now (and which), age, digest algorithm.  Without UPLOAD_IDs, asks about
every unfinished upload in this client's journal.  Read only: an upload being
written is not disturbed.

Examples:
  imgresume status --to tcp:lb.example:7000
  imgresume status --to tcp:lb.example:7000 3f2a9c0d4e5b6a7f8091a2b3c4d5e6f7 --json
"""
    optParameters = [
        ["to", "t", None, "A server or balancer as HOST:PORT or a Twisted client endpoint "
         "(required)."],
        ["client-id", None, None, "Identity sent in the handshake [default: user@host]."],
        ["key-file", None, None, "File with this client's key [default: $IMGRESUME_KEY_FILE]."],
        ["journal", None, None, "Journal to read upload ids from [default: the upload journal]."],
    ]
    optFlags = [["json", None, "Print one JSON object per upload."]]

    def parseArgs(self, *upload_ids: str) -> None:
        self["ids"] = list(upload_ids)

    def postOptions(self) -> None:
        if not self["to"]:
            raise usage.UsageError("--to ENDPOINT is required")
        from imgresume._endpoints import client_endpoint
        from imgresume.names import is_upload_id

        try:
            self["to"] = client_endpoint(self["to"])
        except ValueError as e:
            raise usage.UsageError(f"--to {e}")

        for upload_id in self["ids"]:
            if not is_upload_id(upload_id):
                raise usage.UsageError(f"{upload_id}: not an upload id (32 hex digits)")
        self["key-file"] = self["key-file"] or os.environ.get("IMGRESUME_KEY_FILE")


def status_main(config: StatusOptions) -> int:
    """C{imgresume status}, on the reactor: the exit code."""
    from imgresume.cli._run import run_on_reactor, without_tls

    without_tls(config["to"])
    return run_on_reactor(lambda reactor, interruptions: run_status(reactor, config))


def run_status(reactor: Any, config: StatusOptions, out: Any = None) -> Any:
    """Run C{imgresume status}; a Deferred firing with the exit code."""
    from imgresume.client import Journal, Uploader, default_journal_path
    from imgresume.keys import KeyFileError, read_key

    out = out or sys.stdout
    ids = config["ids"]
    if not ids:
        ids = Journal(config["journal"] or default_journal_path()).upload_ids()
        if not ids:
            print("no unfinished uploads in the journal", file=out)
            return defer.succeed(EXIT_OK)
    try:
        key = read_key(config["key-file"]) if config["key-file"] else None
        uploader = Uploader(config["to"], reactor=reactor, client_id=config["client-id"],
                            key=key, journal=None)
    except (OSError, KeyFileError, ValueError) as e:
        print(f"imgresume: status: {e}", file=sys.stderr)
        return defer.succeed(EXIT_USAGE)

    async def go() -> int:
        try:
            answers = await uploader.status(ids)
        except Exception as e:
            print(f"imgresume: status: {e}", file=sys.stderr)
            return EXIT_FAILED
        now = time.time()
        for upload_id, answer in zip(ids, answers):
            if not hasattr(answer, "offset"):
                row = {"upload_id": upload_id, "state": "unknown"}
            else:
                row = {
                    "upload_id": answer.upload_id, "name": answer.name, "size": answer.size,
                    "state": "complete" if answer.complete else "partial",
                    "offset": answer.offset, "busy": answer.busy, "owner": answer.owner,
                    "age": round(now - answer.updated_ms / 1000, 3), "path": answer.path,
                }
                # The upload's digest algorithm, from a server that says it.
                if answer.fields and "digest" in answer.fields:
                    row["digest"] = answer.fields["digest"]
            print_row(row, config["json"], out)
        return EXIT_OK

    return defer.Deferred.fromCoroutine(go())


def print_row(row: dict[str, Any], as_json: bool, out: Any) -> None:
    """One upload, as JSON or as a line for humans."""
    if as_json:
        print(json.dumps(row, sort_keys=True), file=out, flush=True)
        return
    if row["state"] == "unknown":
        print(f"{row['upload_id']}  unknown (never created, removed, or not this client's)",
              file=out)
        return
    share = row["offset"] / row["size"] if row["size"] else 1.0
    where = (f"at {row['path']}" if row["state"] == "complete"
             else ("being written" + (f" by {row['owner']}" if row["owner"] else "")
                   if row["busy"] else "idle"))
    # The upload's digest algorithm, where it is known (imgresume ls, and
    # imgresume status from a server that sends it).
    digest = f"{row['digest']}  " if "digest" in row else ""
    print(f"{row['upload_id']}  {row['state']:<8} {share:6.1%}  "
          f"{format_size(row['offset'])}/{format_size(row['size'])}  "
          f"{format_age(row['age'])} ago  {where}  {digest}{row['name']}", file=out, flush=True)


class LsOptions(BaseOptions):
    synopsis = "--storage DIR [--json]"
    longdesc = """List the uploads in a storage directory, partial and completed, with
sizes, offsets and ages (read only; run it on any host that mounts the
storage).

Example:
  imgresume ls --storage /srv/imgresume
"""
    optParameters = [["storage", "s", None, "The storage directory (required)."]]
    optFlags = [["json", None, "Print one JSON object per upload."]]

    def postOptions(self) -> None:
        if not self["storage"] or not os.path.isdir(self["storage"]):
            raise usage.UsageError("--storage DIR is required and must be a directory")


def run_ls(config: LsOptions, out: Any = None) -> int:
    """Run C{imgresume ls}; returns the exit code."""
    from imgresume.errors import ImgresumeError
    from imgresume.storage.filesystem import FilesystemStorage

    out = out or sys.stdout
    storage = FilesystemStorage(config["storage"])
    incoming = os.path.join(config["storage"], "incoming")
    try:
        names = sorted(os.listdir(incoming))
    except FileNotFoundError:
        names = []
    now = time.time()
    for upload_id in names:
        try:
            st = storage.status_sync(upload_id)
        except ImgresumeError:
            continue  # being created or removed right now, or not an upload
        row = {"upload_id": st.upload_id, "name": st.name, "size": st.size,
               "state": st.state, "offset": st.offset, "busy": st.busy, "owner": st.owner,
               "age": round(now - st.updated, 3), "path": st.path, "digest": st.digest}
        print_row(row, config["json"], out)
    return EXIT_OK

# -*- test-case-name: tests.test_cli -*-
"""C{imgresume upload}: resumable upload of local files."""

from __future__ import annotations

import json
import os
import sys
from typing import Any

from twisted.internet import defer
from twisted.python import usage

from imgresume._options import EXIT_FAILED, EXIT_OK, EXIT_USAGE, BaseOptions
from imgresume.sizes import parse_duration, parse_size


class UploadOptions(BaseOptions):
    synopsis = "--to ENDPOINT FILE... [options]"
    longdesc = """Upload files, resuming across broken connections and server failures.

Each FILE is uploaded in turn.  The command exits 0 only after the server has
confirmed that every stored file is complete and its SHA-256 matches the local
file.  If the connection breaks, it reconnects through the same ENDPOINT with
exponential backoff and resumes from the offset the server proves.  If this
command itself is killed, running it again for the same file resumes too
(upload ids are kept in a small local journal).

Examples:
  imgresume upload --to tcp:lb.example:7000 scan-0001.tiff scan-0002.tiff
  imgresume upload --to tcp:127.0.0.1:7000 --name scans/2026/a.tiff a.tiff --json
"""
    optParameters = [
        ["to", "t", None, "Twisted client endpoint of a server or balancer, "
         "e.g. tcp:lb.example:7000 (required)."],
        ["name", "n", None, "Remote name (only with one FILE) [default: the file's base name]."],
        ["client-id", None, None, "Identity sent in the handshake [default: user@host]."],
        ["key-file", None, None, "File with this client's key (from `imgresume keys add`), "
         "when the servers require authentication [default: $IMGRESUME_KEY_FILE]."],
        ["journal", None, None, "Journal of unfinished uploads "
         "[default: $XDG_STATE_HOME/imgresume/journal.json]."],
        ["max-attempts", None, "10", "Consecutive attempts without progress before giving up."],
        ["stall-timeout", None, "60s", "Reconnect when the server says nothing for this long."],
        ["connect-timeout", None, "10s", "Give up on one connection attempt after this long."],
        ["backoff-max", None, "20s", "Longest wait between reconnection attempts."],
        ["chunk-size", None, None, "Payload per data packet [default: what the server recommends]."],
        ["window", None, "8", "Data packets in flight before waiting for acknowledgements."],
    ]
    optFlags = [
        ["json", None, "Print one JSON object per completed file on stdout."],
        ["restart", None, "Ignore the journal: start fresh uploads."],
        ["no-journal", None, "Keep no journal (a rerun after a crash starts over)."],
        ["quiet", "q", "No progress bar."],
    ]

    def parseArgs(self, *files: str) -> None:
        self["files"] = list(files)

    def postOptions(self) -> None:
        if not self["to"]:
            raise usage.UsageError("--to ENDPOINT is required (e.g. --to tcp:127.0.0.1:7000)")
        if not self["files"]:
            raise usage.UsageError("name at least one FILE to upload")
        if self["name"] and len(self["files"]) > 1:
            raise usage.UsageError("--name works with a single FILE only")
        for path in self["files"]:
            if not os.path.isfile(path):
                raise usage.UsageError(f"{path}: not a regular file")
        try:
            self["max-attempts"] = int(self["max-attempts"])
            self["window"] = int(self["window"])
            for key in ("stall-timeout", "connect-timeout", "backoff-max"):
                self[key] = parse_duration(self[key])
            self["key-file"] = self["key-file"] or os.environ.get("IMGRESUME_KEY_FILE")
            if self["chunk-size"]:
                self["chunk-size"] = parse_size(self["chunk-size"])
        except ValueError as e:
            raise usage.UsageError(str(e))


def run_upload(reactor: Any, config: UploadOptions) -> Any:
    """Upload every file of C{config}; the Deferred fires with the exit code."""
    from twisted.internet.defer import Deferred

    from imgresume.cli._progress import ProgressBar
    from imgresume.client import Journal, Uploader, UploadFailed
    from imgresume.keys import KeyFileError, read_key

    key = None
    if config["key-file"]:
        try:
            key = read_key(config["key-file"])
        except (OSError, KeyFileError) as e:
            print(f"imgresume: --key-file: {e}", file=sys.stderr)
            return defer.succeed(EXIT_FAILED)
    journal: Any = "default"
    if config["no-journal"]:
        journal = None
    elif config["journal"]:
        journal = Journal(config["journal"])
    try:
        uploader = Uploader(
            config["to"], reactor=reactor, client_id=config["client-id"], key=key,
            journal=journal,
            max_attempts=config["max-attempts"], stall_timeout=config["stall-timeout"],
            connect_timeout=config["connect-timeout"], backoff_max=config["backoff-max"],
            chunk_size=config["chunk-size"] or None, window=config["window"],
        )
    except Exception as e:  # endpoint string parsers raise whatever they like
        print(f"imgresume: --to {config['to']}: not a usable endpoint: "
              f"{type(e).__name__}: {e}\n(examples: tcp:lb.example:7000, "
              "tls:lb.example:7000:trustRoots=/etc/ssl/certs, unix:/run/imgresume.sock)",
              file=sys.stderr)
        return defer.succeed(EXIT_USAGE)
    show = not config["quiet"] and sys.stderr.isatty()
    progress = ProgressBar(sys.stderr) if show else None

    async def main() -> int:
        failed = 0
        for path in config["files"]:
            try:
                result = await uploader.upload(
                    path, config["name"], restart=config["restart"], progress=progress
                )
            except UploadFailed as e:
                failed += 1
                print(f"imgresume: upload failed: {e}", file=sys.stderr)
                continue
            if config["json"]:
                print(json.dumps(result.to_json(), sort_keys=True), flush=True)
            elif not show and not config["quiet"]:
                print(
                    f"{result.name}: {result.size} bytes stored at {result.path}, "
                    f"sha256 {result.sha256} verified", flush=True,
                )
        return EXIT_FAILED if failed else EXIT_OK

    return Deferred.fromCoroutine(main())

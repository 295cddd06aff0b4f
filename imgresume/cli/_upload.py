# -*- test-case-name: tests.cli.test_upload -*-
"""C{imgresume upload}: resumable upload of local files and directories."""

from __future__ import annotations

import json
import os
import sys
import time
from typing import TYPE_CHECKING, Any, TextIO

from twisted.internet import defer
from twisted.python import usage

from imgresume._options import EXIT_FAILED, EXIT_OK, EXIT_USAGE, BaseOptions
from imgresume.sizes import format_size, parse_duration, parse_size

if TYPE_CHECKING:
    from imgresume.cli._progress import BatchProgress, PlainProgress
    from imgresume.client import BatchResult, FileOutcome, RefusedFile, Uploader

#: The most connections --parallel may open: the servers' default
#: --max-uploads-per-client.
MAX_PARALLEL = 64


class UploadOptions(BaseOptions):
    synopsis = "--to ENDPOINT PATH... [options]"
    longdesc = """Upload files and directories, resuming across broken connections and
server failures.

A PATH that is a directory stands for every regular file below it; each is
stored under its path relative to the directory (scans/2026/a.tif is stored
as 2026/a.tif when the PATH is scans, or as batch-7/2026/a.tif with
--prefix batch-7).  A file whose remote name the servers would refuse is
reported and left out; the rest go on.  --parallel files are uploaded at
once, each connection carrying one file after another without a new
handshake.

The command exits 0 only after the server has confirmed that every stored
file is complete and its SHA-256 matches the local file.  If the connection
breaks, it reconnects through the same ENDPOINT with exponential backoff and
resumes from the offset the server proves.  If this command itself is
killed, running it again resumes the unfinished files and confirms the
finished ones with the server without sending them again (the upload ids
are kept in a small local journal); --restart sends everything again.

Every stored file is reported with the path it was stored at.  When a
completed file already has the remote name, --if-exists says what the
server does: rename (store the new one beside it, e.g. as
a.e0af5ecb.tiff; the default), skip (store nothing if the file there has
the same size and SHA-256, which the server checks; each file is then
hashed before it is sent) or fail (refuse the file).

Examples:
  imgresume upload --to tcp:lb.example:7000 scan-0001.tiff scan-0002.tiff
  imgresume upload --to tcp:lb.example:7000 --parallel 8 --prefix batch-7 scans/
  imgresume upload --to tcp:127.0.0.1:7000 --name scans/2026/a.tiff a.tiff --json
"""
    optParameters = [
        ["to", "t", None, "Twisted client endpoint of a server or balancer, "
         "e.g. tcp:lb.example:7000 (required)."],
        ["name", "n", None, "Remote name (only with one FILE) [default: the file's base name]."],
        ["prefix", None, None, "Remote directory for every file, e.g. scans/2026 "
         "[default: none]."],
        ["parallel", "P", "4", f"Files uploaded at once, one connection each (1-{MAX_PARALLEL})."],
        ["client-id", None, None, "Identity sent in the handshake [default: user@host]."],
        ["key-file", None, None, "File with this client's key (from `imgresume keys add`), "
         "when the servers require authentication [default: $IMGRESUME_KEY_FILE]."],
        ["journal", None, None, "Journal of unfinished and finished uploads "
         "[default: $XDG_STATE_HOME/imgresume/journal.json]."],
        ["max-attempts", None, "10", "Consecutive attempts without progress before giving up."],
        ["stall-timeout", None, "60s", "Reconnect when the server says nothing for this long."],
        ["connect-timeout", None, "10s", "Give up on one connection attempt after this long."],
        ["backoff-max", None, "20s", "Longest wait between reconnection attempts."],
        ["chunk-size", None, None, "Payload per data packet [default: what the server recommends]."],
        ["window", None, "16", "Data packets in flight before waiting for acknowledgements."],
        ["if-exists", None, "rename", "When a completed file already has the remote name: "
         "rename (store beside it), skip (if it is the same file), or fail."],
    ]
    optFlags = [
        ["json", None, "Print one JSON object per file on stdout."],
        ["restart", None, "Ignore the journal: start fresh uploads, also of files "
         "already uploaded."],
        ["no-journal", None, "Keep no journal (a rerun after a crash starts over)."],
        ["fail-fast", None, "Stop at the first file that fails: a refused name before "
         "anything is sent, a failed upload once the files under way are over."],
        ["quiet", "q", "No progress and no per-file lines (failures are still reported)."],
    ]

    def parseArgs(self, *paths: str) -> None:
        self["files"] = list(paths)

    def postOptions(self) -> None:
        from imgresume.errors import InvalidName
        from imgresume.names import validate_name

        if not self["to"]:
            raise usage.UsageError("--to ENDPOINT is required (e.g. --to tcp:127.0.0.1:7000)")
        if not self["files"]:
            raise usage.UsageError("name at least one FILE or directory to upload")
        for path in self["files"]:
            if not os.path.isfile(path) and not os.path.isdir(path):
                raise usage.UsageError(f"{path}: not a regular file or a directory")
        if self["name"] and (len(self["files"]) > 1 or os.path.isdir(self["files"][0])):
            raise usage.UsageError("--name works with a single FILE only")
        if self["name"] and self["prefix"]:
            raise usage.UsageError("--name and --prefix do not go together")
        if self["prefix"]:
            try:
                validate_name(self["prefix"].rstrip("/"))
            except InvalidName as e:
                raise usage.UsageError(f"--prefix: {e}")
        try:
            self["parallel"] = int(self["parallel"])
            self["max-attempts"] = int(self["max-attempts"])
            self["window"] = int(self["window"])
            for key in ("stall-timeout", "connect-timeout", "backoff-max"):
                self[key] = parse_duration(self[key])
            self["key-file"] = self["key-file"] or os.environ.get("IMGRESUME_KEY_FILE")
            if self["chunk-size"]:
                self["chunk-size"] = parse_size(self["chunk-size"])
        except ValueError as e:
            raise usage.UsageError(str(e))
        if not 1 <= self["parallel"] <= MAX_PARALLEL:
            raise usage.UsageError(f"--parallel must be from 1 to {MAX_PARALLEL}")
        if self["if-exists"] not in ("rename", "skip", "fail"):
            raise usage.UsageError("--if-exists must be rename, skip or fail")


def run_upload(reactor: Any, config: UploadOptions) -> Any:
    """Upload every file of C{config}; the Deferred fires with the exit code."""
    from imgresume.client import Journal, Uploader
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
            if_exists=config["if-exists"],
        )
    except Exception as e:  # endpoint string parsers raise whatever they like
        print(f"imgresume: --to {config['to']}: not a usable endpoint: "
              f"{type(e).__name__}: {e}\n(examples: tcp:lb.example:7000, "
              "tls:lb.example:7000:trustRoots=/etc/ssl/certs, unix:/run/imgresume.sock)",
              file=sys.stderr)
        return defer.succeed(EXIT_USAGE)
    return defer.Deferred.fromCoroutine(
        BatchCommand(reactor, config, uploader, sys.stdout, sys.stderr).run()
    )


class BatchCommand:
    """
    One run of C{imgresume upload} once its options are parsed and its
    uploader made: collect the files, upload them, report each, sum up.
    Made by L{run_upload}.
    """

    def __init__(self, reactor: Any, config: UploadOptions, uploader: "Uploader",
                 out: TextIO, err: TextIO) -> None:
        self.reactor = reactor
        self.config = config
        self.uploader = uploader
        self.out = out
        self.err = err
        self._display: BatchProgress | PlainProgress | None = None

    async def run(self) -> int:
        """Upload; return the exit code."""
        from imgresume.cli._progress import BatchProgress, BatchTally, PlainProgress
        from imgresume.client import collect_files

        config = self.config
        started = time.monotonic()
        collected = collect_files(config["files"], prefix=config["prefix"],
                                  name=config["name"])
        for refused in collected.refused:
            self._refused(refused)
        if collected.refused and config["fail-fast"]:
            print(f"imgresume: --fail-fast: {len(collected.refused)} file(s) refused; "
                  "nothing uploaded", file=self.err)
            return EXIT_FAILED
        items = collected.items
        if not items:
            if not collected.refused:
                print("imgresume: no files to upload", file=self.err)
            return EXIT_FAILED if collected.refused else EXIT_OK
        if not config["quiet"]:
            tally = BatchTally(
                {i.name or os.path.basename(i.path): _size(i.path) for i in items},
                self.reactor.seconds,
            )
            if self.err.isatty():
                self._display = BatchProgress(self.err, tally)
            else:
                self._display = PlainProgress(self.err, tally, self.reactor)
                self._display.start()
        try:
            batch = await self.uploader.upload_batch(
                items, parallel=config["parallel"], restart=config["restart"],
                progress=self._display, stop_on_failure=config["fail-fast"],
                on_outcome=self._outcome,
            )
        finally:
            if self._display is not None:
                self._display.close()
        self._summary(batch, collected.refused, time.monotonic() - started)
        return EXIT_FAILED if batch.failed or batch.not_started or collected.refused else EXIT_OK

    def _refused(self, refused: "RefusedFile") -> None:
        if self.config["json"]:
            print(json.dumps({"local": refused.path, "name": refused.name,
                              "error": refused.reason, "refused": True}, sort_keys=True),
                  file=self.out, flush=True)
        print(f"imgresume: refused: {refused.path}: {refused.reason}", file=self.err,
              flush=True)

    def _outcome(self, outcome: "FileOutcome") -> None:
        """Report one file as it ends."""
        from imgresume.cli._progress import BatchProgress

        live = isinstance(self._display, BatchProgress)  # it shows each file's end
        if self._display is not None:
            self._display.finished(outcome)
        result, local = outcome.result, outcome.item.path
        if self.config["json"]:
            if result is not None:
                row = {**result.to_json(), "local": local}
            else:
                assert outcome.error is not None
                cause = outcome.error.cause
                row = {"name": outcome.name, "local": local, "error": str(outcome.error),
                       "cause": type(cause).__name__ if cause is not None else None}
            print(json.dumps(row, sort_keys=True), file=self.out, flush=True)
        if result is None:
            if not live:
                print(f"imgresume: upload failed: {outcome.error}", file=self.err, flush=True)
        elif not live and not self.config["quiet"] and not self.config["json"]:
            if result.skipped:
                print(f"{result.name}: skipped: already stored as {result.path} "
                      f"({result.size} bytes, sha256 {result.sha256} verified by the server)",
                      file=self.out, flush=True)
            elif result.already_complete:
                print(f"{result.name}: already stored at {result.path} by an earlier run "
                      f"({result.size} bytes, sha256 {result.sha256} verified)",
                      file=self.out, flush=True)
            else:
                print(f"{result.name}: {result.size} bytes stored at {result.path}, "
                      f"sha256 {result.sha256} verified", file=self.out, flush=True)

    def _summary(self, batch: "BatchResult", refused: "list[RefusedFile]",
                 seconds: float) -> None:
        """What happened, on stderr: always the failures, else for several files."""
        failed = batch.failed
        files = len(batch.outcomes) + len(batch.not_started) + len(refused)
        trouble = failed or refused or batch.not_started
        if not trouble and (files == 1 or self.config["quiet"]):
            return
        stored = [o.result for o in batch.outcomes if o.result is not None]
        already = sum(r.already_complete for r in stored)
        skipped = sum(r.skipped for r in stored)
        line = f"imgresume: {len(stored)} of {files} files stored and verified"
        notes = [f"{already} already complete from an earlier run"] if already else []
        notes += [f"{skipped} skipped: already stored"] if skipped else []
        if notes:
            line += f" ({'; '.join(notes)})"
        sent = sum(r.bytes_sent for r in stored)
        line += (f"; {format_size(sent)} sent in {seconds:.1f} s over "
                 f"{batch.connections} connection{'s' if batch.connections != 1 else ''}")
        print(line, file=self.err)
        if failed or refused:
            print(f"imgresume: {len(failed) + len(refused)} failed:", file=self.err)
            for r in refused:
                print(f"  {r.path}: refused: {r.reason}", file=self.err)
            for o in failed:
                print(f"  {o.item.path}: {o.error}", file=self.err)
        if batch.not_started:
            print(f"imgresume: {len(batch.not_started)} not started (--fail-fast)",
                  file=self.err)
        if (failed or batch.not_started) and not self.config["no-journal"]:
            print("imgresume: run the same command again to retry: unfinished uploads "
                  "resume, finished ones are confirmed without being sent again",
                  file=self.err)
        self.err.flush()


def _size(path: str) -> int:
    try:
        return os.path.getsize(path)
    except OSError:
        return 0  # the upload reports why

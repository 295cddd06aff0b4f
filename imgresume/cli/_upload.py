# -*- test-case-name: tests.cli.test_upload,tests.cli.test_errors -*-
"""C{imgresume upload}: resumable upload of local files and directories."""

from __future__ import annotations

import os
import sys
import time
from typing import TYPE_CHECKING, Any, TextIO

from twisted.python import usage

from imgresume._options import EXIT_FAILED, EXIT_OK, EXIT_USAGE, BaseOptions
from imgresume.sizes import parse_duration, parse_size

if TYPE_CHECKING:
    from twisted.internet import defer

    from imgresume.cli._live import BatchProgress
    from imgresume.cli._progress import PlainProgress
    from imgresume.cli._report import Reporter
    from imgresume.cli._run import Interruptions
    from imgresume.client import CollectedFiles, FileOutcome, Uploader

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
--prefix batch-7).  Hidden files (a component starting with ".") are
skipped; --include and --exclude PATTERN (rsync-style globs: * ? [..] **,
repeatable) choose among the files found, and the first rule that matches
a file decides; a FILE named on the command line is always taken.  A file
whose remote name the servers would refuse, or a PATH that does not
exist, is reported and left out; the rest go on.  --parallel files are
uploaded at once, each connection carrying one file after another without
a new handshake.  --dry-run (-n) lists what would be sent, resumed or is
already stored (from the journal; no connection is made).

The command exits 0 only after the server has confirmed that every stored
file is complete and its SHA-256 matches the local file.  If the connection
breaks, it reconnects through the same ENDPOINT with exponential backoff and
resumes from the offset the server proves (each retry is reported as it is
planned).  If this command is interrupted (Ctrl-C, SIGTERM) it reports the
unfinished files; if it is killed, running it again resumes the unfinished
files and confirms the finished ones with the server without sending them
again (the upload ids are kept in a small local journal); --restart sends
everything again.  A file that changes while it is uploaded fails with
"source changed during upload".

Exit codes:
  0    every file stored and verified
  1    a file failed, was refused (no such file, a name the servers refuse)
       or was not started after --fail-fast
  2    usage error
  3    a file's source changed during the upload (that file is not stored)
  130  interrupted by SIGINT (Ctrl-C), 143 by SIGTERM: run it again to resume

Every stored file is reported with the path it was stored at.  When a
completed file already has the remote name, --if-exists says what the
server does: rename (store the new one beside it, e.g. as
a.e0af5ecb.tiff; the default), skip (store nothing if the file there has
the same size and digest, which the server checks; each file is then
hashed before it is sent) or fail (refuse the file).  Every file is
verified by the server with its whole-file digest: BLAKE3, or SHA-256 with
--digest sha256 (or when the server predates BLAKE3).

--to, --key-file, --client-id, --parallel, --max-put, --if-exists and a few
more can be set in IMGRESUME_* variables or in the config file instead
(`imgresume config --help`); a flag wins over both.

Examples:
  imgresume upload --to lb.example:7000 scan-0001.tiff scan-0002.tiff
  imgresume upload --to tcp:lb.example:7000 --parallel 8 --prefix batch-7 scans/
  imgresume upload --to tcp:lb.example:7000 --include '*.tif' --exclude '*' -n scans/
  imgresume upload --to tcp:127.0.0.1:7000 --name scans/2026/a.tiff a.tiff --json
"""
    optParameters = [
        ["to", "t", None, "Where to upload: a server or balancer as HOST:PORT ([IPV6]:PORT) "
         "or a Twisted client endpoint, e.g. tcp:lb.example:7000 (required)."],
        ["name", None, None, "Remote name (only with one FILE) [default: the file's base name]."],
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
        ["max-put", None, "4M", "Send a file of at most this size whole in one PUT frame, "
         "to a server that offers it (0: never)."],
        ["if-exists", None, "rename", "When a completed file already has the remote name: "
         "rename (store beside it), skip (if it is the same file), or fail."],
        ["digest", None, "blake3", "Whole-file digest the server verifies: blake3 (fast), "
         "or sha256 (for records that demand it). A server that predates blake3 "
         "uses sha256."],
    ]
    compData = usage.Completions(optActions={
        "if-exists": usage.CompleteList(["rename", "skip", "fail"]),
        "key-file": usage.CompleteFiles(), "journal": usage.CompleteFiles(),
    })
    optFlags = [
        ["json", None, "Print one JSON object per file on stdout."],
        ["dry-run", "n", "List what would be sent, resumed or is already stored (per the "
         "journal) and what is skipped; send nothing, connect nowhere."],
        ["restart", None, "Ignore the journal: start fresh uploads, also of files "
         "already uploaded."],
        ["no-journal", None, "Keep no journal (a rerun after a crash starts over)."],
        ["fail-fast", None, "Stop at the first file that fails: a refused name before "
         "anything is sent, a failed upload once the files under way are over."],
        ["quiet", "q", "No progress and no per-file lines (failures are still reported)."],
        ["verbose", "v", "Also a lasting line on stderr for every retry and every resume "
         "(where, from which offset), on a terminal too."],
    ]

    def __init__(self) -> None:
        super().__init__()
        self["filters"] = []
        #: The options given on the command line (L{_config.resolve} fills
        #: the others in from the environment and the config file).
        self.given: set[str] = set()
        #: Where each setting came from, once parsed (L{_config.Setting}).
        self.sources: dict[str, Any] = {}

    def __setitem__(self, key: str, value: Any) -> None:
        if "sources" in self.__dict__ and not self.sources:  # parsing the command line
            self.given.add(key)
        super().__setitem__(key, value)

    def opt_include(self, pattern: str) -> None:
        if not pattern.strip("/"):
            raise usage.UsageError("--include needs a pattern")
        self["filters"].append(("include", pattern))

    opt_include.__doc__ = (
        "Take the files of a directory PATH that match PATTERN (an rsync-style glob:"
        " * ? [..] **; no wildcard matches the dot of a hidden name); repeatable, the"
        " first matching rule decides.")

    def opt_exclude(self, pattern: str) -> None:
        if not pattern.strip("/"):
            raise usage.UsageError("--exclude needs a pattern")
        self["filters"].append(("exclude", pattern))

    opt_exclude.__doc__ = (
        "Skip the files of a directory PATH that match PATTERN (a file name, a"
        " directory name, or a path with /); repeatable, the first matching rule decides.")

    def parseArgs(self, *paths: str) -> None:
        self["files"] = list(paths)

    def postOptions(self) -> None:
        from imgresume._endpoints import client_endpoint
        from imgresume.errors import InvalidName
        from imgresume.names import validate_name

        from imgresume.cli._config import ConfigError, resolve

        try:
            self.sources = resolve({k: self[k] for k in self.given}, self.defaults)
        except ConfigError as e:
            raise usage.UsageError(str(e))
        for key, setting in self.sources.items():
            self[key] = setting.value
        if not self["to"]:
            raise usage.UsageError("--to ENDPOINT is required (e.g. --to 127.0.0.1:7000), "
                                   "or IMGRESUME_TO, or `to` in the config file")
        try:
            self["to"] = client_endpoint(self["to"])
        except ValueError as e:
            raise usage.UsageError(f"--to {e}{self._from('to')}")
        if not self["files"]:
            raise usage.UsageError("name at least one FILE or directory to upload")
        if self["quiet"] and self["verbose"]:
            raise usage.UsageError("--quiet and --verbose contradict each other")
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
            if self["chunk-size"]:
                self["chunk-size"] = parse_size(self["chunk-size"])
            self["max-put"] = parse_size(self["max-put"])
        except ValueError as e:
            raise usage.UsageError(f"{e}{self._from(*self.sources)}")
        if not 1 <= self["parallel"] <= MAX_PARALLEL:
            raise usage.UsageError(f"--parallel must be from 1 to {MAX_PARALLEL}"
                                   f"{self._from('parallel')}")
        if self["if-exists"] not in ("rename", "skip", "fail"):
            raise usage.UsageError("--if-exists must be rename, skip or fail"
                                   f"{self._from('if-exists')}")
        if self["digest"] not in ("blake3", "sha256"):
            raise usage.UsageError("--digest must be blake3 or sha256")

    def _from(self, *keys: str) -> str:
        """Where the settings C{keys} came from, when not the command line or the default."""
        where = [f"{k} from {self.sources[k].source}" for k in keys
                 if k in self.sources and self.sources[k].source not in ("default", f"--{k}")]
        return f" ({'; '.join(where)})" if where else ""


def main(config: UploadOptions) -> int:
    """
    C{imgresume upload}: the exit code.  The files are collected (and the
    refused ones reported) before the reactor and the client's network code
    are imported, so a run with nothing to send ends at once.
    """
    report = _reporter(config, sys.stdout, sys.stderr)
    collected = collect(config, report, sys.stderr)
    if isinstance(collected, int):
        return collected
    from imgresume.cli._run import run_on_reactor, without_tls

    without_tls(config["to"])
    return run_on_reactor(
        lambda reactor, interruptions: run_upload(reactor, config, interruptions, collected))


def _reporter(config: UploadOptions, out: TextIO, err: TextIO) -> "Reporter":
    from imgresume.cli._report import Reporter

    return Reporter(out, err, json=config["json"], quiet=config["quiet"],
                    journal=not config["no-journal"])


def collect(config: UploadOptions, report: "Reporter", err: TextIO) -> "CollectedFiles | int":
    """
    The files C{config} names, the refused ones reported; or the exit code
    when there is nothing to upload (none found, or some refused with
    --fail-fast).  Needs no reactor.
    """
    from imgresume.client import collect_files

    collected = collect_files(config["files"], prefix=config["prefix"],
                              name=config["name"], filters=config["filters"])
    for refused in collected.refused:
        report.refused(refused)
    if config["dry-run"]:
        return collected
    if collected.refused and config["fail-fast"]:
        print(f"imgresume: --fail-fast: {len(collected.refused)} file(s) refused; "
              "nothing uploaded", file=err)
        return EXIT_FAILED
    if not collected.items:
        if not collected.refused:
            print("imgresume: no files to upload", file=err)
        return EXIT_FAILED if collected.refused else EXIT_OK
    return collected


def run_upload(reactor: Any, config: UploadOptions,
               interruptions: "Interruptions | None" = None,
               collected: "CollectedFiles | None" = None) -> Any:
    """
    Upload every file of C{config}; the Deferred fires with the exit code.
    C{interruptions} (from L{imgresume.cli._run}) names the signal that
    stops the run, if one does.  C{collected}: the files, if L{collect}
    found (and reported) them already.
    """
    from twisted.internet import defer

    from imgresume.client import Journal, Uploader

    key = None
    if config["key-file"]:
        from imgresume.keys import KeyFileError, read_key

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
            put_max=config["max-put"], if_exists=config["if-exists"],
            digest=config["digest"],
        )
    except Exception as e:  # endpoint string parsers raise whatever they like
        print(f"imgresume: --to {config['to']}: not a usable endpoint: "
              f"{type(e).__name__}: {e}\n(examples: lb.example:7000, tcp:lb.example:7000, "
              "tls:lb.example:7000:trustRoots=/etc/ssl/certs, unix:/run/imgresume.sock)",
              file=sys.stderr)
        return defer.succeed(EXIT_USAGE)
    return defer.Deferred.fromCoroutine(BatchCommand(
        reactor, config, uploader, sys.stdout, sys.stderr, interruptions, collected).run())


class BatchCommand:
    """
    One run of C{imgresume upload} once its options are parsed and its
    uploader made: collect the files, upload them, report each, sum up.
    Made by L{run_upload}.

    If the reactor stops meanwhile (SIGINT or SIGTERM, see
    L{imgresume.cli._run}), the uploads are interrupted and the shutdown
    waits (up to C{REPORT_WITHIN} seconds) until the unfinished files are
    reported and the journal written.
    """

    #: Seconds an interrupted run may take to stop its uploads and report.
    REPORT_WITHIN = 30.0

    def __init__(self, reactor: Any, config: UploadOptions, uploader: "Uploader",
                 out: TextIO, err: TextIO, interruptions: "Interruptions | None" = None,
                 collected: "CollectedFiles | None" = None) -> None:
        from twisted.internet import defer

        self.reactor = reactor
        self.config = config
        self.uploader = uploader
        self.interruptions = interruptions
        self.collected = collected
        self.report = _reporter(config, out, err)
        self.err = err
        self._display: BatchProgress | PlainProgress | None = None
        self._reported: defer.Deferred[None] = defer.Deferred()
        self._shutting_down_now = False

    async def run(self) -> int:
        """Upload; return the exit code."""
        from twisted.internet.interfaces import IReactorCore

        config = self.config
        collected = self.collected
        if collected is None:
            found = collect(config, self.report, self.err)
            if isinstance(found, int):
                return found
            collected = found
        if config["dry-run"]:
            planned = await self.uploader.plan(collected.items, restart=config["restart"])
            return self.report.plan(collected, planned)
        trigger = None
        if IReactorCore.providedBy(self.reactor):
            trigger = self.reactor.addSystemEventTrigger(
                "before", "shutdown", self._shutting_down)
        try:
            return await self._upload(collected)
        finally:
            if trigger is not None and not self._shutting_down_now:
                self.reactor.removeSystemEventTrigger(trigger)
            self._reported.callback(None)

    async def _upload(self, collected: "CollectedFiles") -> int:
        from imgresume.cli._progress import BatchTally, PlainProgress
        from imgresume.cli._report import exit_code
        from imgresume.client import UploadInterrupted

        config = self.config
        started = time.monotonic()
        items = collected.items
        if not config["quiet"]:
            tally = BatchTally(
                {i.name or os.path.basename(i.path): _size(i.path) for i in items},
                self.reactor.seconds,
            )
            if self.err.isatty() and not config["json"]:
                from imgresume.cli._live import BatchProgress  # rich, on a terminal only

                self._display = BatchProgress(self.err, tally, verbose=config["verbose"])
            else:
                self._display = PlainProgress(self.err, tally, self.reactor,
                                              verbose=config["verbose"])
                self._display.start()
        interrupted = None
        try:
            batch = await self.uploader.upload_batch(
                items, parallel=config["parallel"], restart=config["restart"],
                progress=self._display, stop_on_failure=config["fail-fast"],
                on_outcome=self._outcome,
            )
        except UploadInterrupted as e:
            batch, interrupted = e.batch, e
        finally:
            if self._display is not None:
                self._display.close()
        self.report.summary(batch, collected.refused, len(collected.skipped),
                            time.monotonic() - started, interrupted)
        return exit_code(batch, collected.refused, interrupted)

    def _shutting_down(self) -> "defer.Deferred[None]":
        """The reactor is stopping: interrupt the uploads; wait for their report."""
        from twisted.internet import defer

        self._shutting_down_now = True
        signal = self.interruptions.signal if self.interruptions is not None else None
        self.uploader.interrupt(signal)
        done: defer.Deferred[None] = defer.Deferred()
        self._reported.addBoth(lambda _: done.callback(None) if not done.called else None)
        done.addTimeout(self.REPORT_WITHIN, self.reactor)
        return done.addErrback(lambda _: None)

    def _outcome(self, outcome: "FileOutcome") -> None:
        """Report one file as it ends."""
        live = self._display is not None and self._display.shows_outcomes
        if self._display is not None:
            self._display.finished(outcome)
        self.report.outcome(outcome, live)


def _size(path: str) -> int:
    try:
        return os.path.getsize(path)
    except OSError:
        return 0  # the upload reports why

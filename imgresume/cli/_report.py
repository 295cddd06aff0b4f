# -*- test-case-name: tests.cli.test_upload,tests.cli.test_interrupt -*-
"""
What C{imgresume upload} tells its user: a line (or a JSON object) per
file as it ends, refused or interrupted, the plan of a dry run, the
summary, and the exit code that goes with them (L{exit_code}).
"""

from __future__ import annotations

import json
import os
from typing import TYPE_CHECKING, Any, TextIO

from imgresume._options import EXIT_FAILED, EXIT_OK
from imgresume.sizes import format_size

if TYPE_CHECKING:
    from imgresume.client import (
        BatchResult,
        CollectedFiles,
        FileOutcome,
        PlannedUpload,
        RefusedFile,
        UploadInterrupted,
    )

#: A file's source changed while it was uploaded (or the server found the
#: bytes it holds differ from the digest the client sent at the end).
EXIT_SOURCE_CHANGED = 3


def source_changed(outcome: "FileOutcome") -> bool:
    """Whether C{outcome} failed because the local file changed during the upload."""
    from imgresume.client import SourceChanged
    from imgresume.errors import DigestMismatch

    return outcome.error is not None and isinstance(
        outcome.error.cause, (SourceChanged, DigestMismatch))


def exit_code(batch: "BatchResult", refused: list, interrupted: "UploadInterrupted | None") -> int:
    """
    The exit code of a run: 128 plus the signal for an interrupted one, 3 if
    a file's source changed, 1 for any other file not stored, else 0.
    """
    if interrupted is not None:
        return 128 + interrupted.signal if interrupted.signal else EXIT_FAILED
    if any(source_changed(o) for o in batch.failed):
        return EXIT_SOURCE_CHANGED
    return EXIT_FAILED if batch.failed or batch.not_started or refused else EXIT_OK


class Reporter:
    """
    Writes what one run of C{imgresume upload} says: per-file lines on
    C{out} (JSON objects with C{json}), errors and the summary on C{err}.
    Used by L{imgresume.cli._upload.BatchCommand}.
    """

    def __init__(self, out: TextIO, err: TextIO, *, json: bool, quiet: bool,
                 journal: bool) -> None:
        self.out = out
        self.err = err
        self.json = json
        self.quiet = quiet
        self.journal = journal

    def _row(self, row: dict[str, Any]) -> None:
        print(json.dumps(row, sort_keys=True), file=self.out, flush=True)

    def refused(self, refused: "RefusedFile") -> None:
        """A file left out before anything is sent."""
        if self.json:
            self._row({"local": refused.path, "name": refused.name, "error": refused.reason,
                       "refused": True, "status": "refused"})
        print(f"imgresume: refused: {refused.path}: {refused.reason}", file=self.err,
              flush=True)

    def outcome(self, outcome: "FileOutcome", live: bool) -> None:
        """
        A file that ended, stored or failed; C{live}: the terminal display
        showed its end already.
        """
        result, local = outcome.result, outcome.item.path
        if self.json:
            if result is not None:
                row = {**result.to_json(), "local": local,
                       "status": "skipped" if result.skipped else "stored"}
            else:
                assert outcome.error is not None
                cause = outcome.error.cause
                row = {"name": outcome.name, "local": local, "error": str(outcome.error),
                       "cause": type(cause).__name__ if cause is not None else None,
                       "status": "failed", "upload_id": outcome.error.upload_id,
                       "bytes_acknowledged": outcome.error.acknowledged}
            self._row(row)
        if result is None:
            if not live:
                print(f"imgresume: upload failed: {outcome.error}", file=self.err, flush=True)
        elif not live and not self.quiet and not self.json:
            if result.skipped:
                print(f"{result.name}: skipped: already stored as {result.path} "
                      f"({result.size} bytes, {result.digest} {result.sha256} verified by the server)",
                      file=self.out, flush=True)
            elif result.already_complete:
                print(f"{result.name}: already stored at {result.path} by an earlier run "
                      f"({result.size} bytes, {result.digest} {result.sha256} verified)",
                      file=self.out, flush=True)
            else:
                print(f"{result.name}: {result.size} bytes stored at {result.path}, "
                      f"{result.digest} {result.sha256} verified", file=self.out, flush=True)

    def summary(self, batch: "BatchResult", refused: "list[RefusedFile]", skipped: int,
                seconds: float, interrupted: "UploadInterrupted | None") -> None:
        """What happened, on stderr: always the trouble, else for several files."""
        failed = batch.failed
        files = len(batch.outcomes) + len(batch.not_started) + len(refused)
        trouble = failed or refused or batch.not_started or interrupted
        if not trouble and (files == 1 or self.quiet):
            return
        stored = [o.result for o in batch.outcomes if o.result is not None]
        unfinished = [o.error for o in batch.outcomes if o.error is not None]
        already = sum(r.already_complete for r in stored)
        already_stored = sum(r.skipped for r in stored)
        line = f"imgresume: {len(stored)} of {files} files stored and verified"
        notes = [f"{already} already complete from an earlier run"] if already else []
        notes += [f"{already_stored} skipped: already stored"] if already_stored else []
        if notes:
            line += f" ({'; '.join(notes)})"
        sent = sum(r.bytes_sent for r in stored) + sum(e.bytes_sent for e in unfinished)
        line += (f"; {format_size(sent)} sent in {seconds:.1f} s over "
                 f"{batch.connections} connection{'s' if batch.connections != 1 else ''}")
        held = sum(e.acknowledged or 0 for e in unfinished)
        if held:
            line += f"; {format_size(held)} of the unfinished files acknowledged by the servers"
        if skipped:
            line += f"; {skipped} skipped (hidden or excluded; --dry-run lists them)"
        print(line, file=self.err)
        if failed or refused:
            print(f"imgresume: {len(failed) + len(refused)} failed:", file=self.err)
            for r in refused:
                print(f"  {r.path}: refused: {r.reason}", file=self.err)
            for o in failed:
                print(f"  {o.item.path}: {o.error}", file=self.err)
        if interrupted is not None:
            self.interrupted(batch, files)
        else:
            if batch.not_started:
                print(f"imgresume: {len(batch.not_started)} not started (--fail-fast)",
                      file=self.err)
            if (failed or batch.not_started) and self.journal:
                print("imgresume: run the same command again to retry: unfinished uploads "
                      "resume, finished ones are confirmed without being sent again",
                      file=self.err)
        self.err.flush()

    def interrupted(self, batch: "BatchResult", files: int) -> None:
        """The files an interruption left unfinished: a line or JSON object each, and a total."""
        unfinished = [(o.item, o.error) for o in batch.interrupted]
        unfinished += [(item, None) for item in batch.not_started]
        for item, error in unfinished:
            name = item.name or os.path.basename(item.path)
            acknowledged = error.acknowledged if error is not None else None
            if self.json:
                self._row({"local": item.path, "name": name, "status": "interrupted",
                           "bytes_acknowledged": acknowledged, "size": _size(item.path),
                           "upload_id": error.upload_id if error is not None else None})
            elif acknowledged is None:
                print(f"  {item.path}: not started, or no answer from a server yet",
                      file=self.err)
            else:
                print(f"  {item.path}: {acknowledged} of {_size(item.path)} bytes "
                      "acknowledged by the server", file=self.err)
        again = ("run the same command again to resume" if self.journal else
                 "run the same command again to upload them (without a journal they "
                 "start over)")
        print(f"imgresume: interrupted: {len(unfinished)} of {files} files unfinished; {again}",
              file=self.err, flush=True)

    def plan(self, collected: "CollectedFiles", planned: "list[PlannedUpload]") -> int:
        """A dry run's listing; returns its exit code."""
        for s in collected.skipped:
            if self.json:
                self._row({"local": s.path, "action": "skip", "reason": s.reason,
                           "dry_run": True})
            else:
                print(f"skip    {s.path} ({s.reason})", file=self.out)
        counts: dict[str, int] = {}
        to_send = 0
        for p in planned:
            counts[p.action] = counts.get(p.action, 0) + 1
            if p.action == "send":
                to_send += p.size or 0
            if self.json:
                self._row({"local": p.item.path, "name": p.name, "action": p.action,
                           "size": p.size, "upload_id": p.upload_id, "reason": p.reason,
                           "dry_run": True})
                continue
            size = format_size(p.size) if p.size is not None else "?"
            if p.action == "send":
                how = ""
            elif p.action == "resume":
                how = (f", resumes upload {p.upload_id} (the journal's; the server proves "
                       "the offset)")
            elif p.action == "stored":
                how = (f", stored by an earlier run as upload {p.upload_id} (the journal's; "
                       "a run confirms it with the server and sends nothing)")
            else:
                how = f": {p.reason}"
            print(f"{p.action:<7} {p.name} ({size}) from {p.item.path}{how}", file=self.out)
        self.out.flush()
        print(f"imgresume: dry run: {counts.get('send', 0)} to send "
              f"({format_size(to_send)}), {counts.get('resume', 0)} to resume, "
              f"{counts.get('stored', 0)} already stored, {len(collected.skipped)} skipped, "
              f"{len(collected.refused) + counts.get('unreadable', 0)} refused or unreadable; "
              "nothing was sent, no server was asked", file=self.err, flush=True)
        return EXIT_FAILED if collected.refused or counts.get("unreadable") else EXIT_OK


def _size(path: str) -> int:
    try:
        return os.path.getsize(path)
    except OSError:
        return 0  # the upload reports why

# -*- test-case-name: tests.storage.test_maintenance,tests.storage.test_selftest -*-
"""C{imgresume gc} and C{imgresume check-storage}: operations on a storage directory."""

from __future__ import annotations

import json
import os
import sys
from typing import Any

from twisted.python import usage

from imgresume._options import EXIT_FAILED, EXIT_OK, BaseOptions
from imgresume.cli._status import format_age
from imgresume.sizes import parse_duration


def _storage_dir(options: usage.Options) -> None:
    if not options["storage"]:
        raise usage.UsageError("--storage DIR is required")
    if not os.path.isdir(options["storage"]):
        raise usage.UsageError(f"--storage {options['storage']}: not a directory")


class GcOptions(BaseOptions):
    synopsis = "--storage DIR --older-than DURATION [--dry-run] [--json]"
    longdesc = """Remove abandoned uploads from a storage directory.

Removes partial uploads nobody has touched (written, resumed) for
--older-than, upload directories a crash left without meta.json, and stray
temporary files of the same age, and records of completed uploads older than
--records-older-than (until then a client that lost the server's COMPLETED
answer can still learn it).  Never removes an upload whose writer holds it
(on any server: the upload's lock is taken without waiting, and a held one is
skipped), an upload being completed, or anything under complete/.  Safe to
run while servers use the storage; the servers also do this every
--gc-interval.

Prints one line per upload removed (or, with --dry-run, that would be),
with its size and how long it was untouched, then the totals.  Exits 0 (1 if
the storage directory cannot be read).

Examples:
  imgresume gc --storage /srv/imgresume --older-than 7d --dry-run
  imgresume gc --storage /srv/imgresume --older-than 36h
  imgresume gc --storage /srv/imgresume --older-than 7d --json | jq .bytes_freed
"""
    optParameters = [
        ["storage", "s", None, "The storage directory (required)."],
        ["older-than", None, None, "Remove partial uploads untouched this long "
         "(e.g. 12h, 7d; required)."],
        ["records-older-than", None, "30d", "Remove records of completed uploads "
         "this old (the completed files are never removed)."],
    ]
    optFlags = [
        ["dry-run", "n", "Remove nothing; print what would be removed."],
        ["json", None, "Print the report as one JSON object."],
    ]

    def postOptions(self) -> None:
        _storage_dir(self)
        if not self["older-than"]:
            raise usage.UsageError("--older-than DURATION is required (e.g. --older-than 7d)")
        try:
            for key in ("older-than", "records-older-than"):
                self[key] = parse_duration(self[key])
        except ValueError as e:
            raise usage.UsageError(str(e))


class CheckStorageOptions(BaseOptions):
    synopsis = "--storage DIR [--json]"
    longdesc = """Test what the filesystem under a storage directory really provides.

In a scratch directory DIR/.selftest-RANDOM (always removed), checks that:
exclusive create (O_EXCL, mkdir) refuses an existing name, also for another
process; rename replaces a file atomically; hard links work and refuse an
existing name; the storage's locks are seen by a second open of the file and
by another process, and released; fsync and fdatasync succeed on a file and
a directory; positional writes read back; and reports free space.  Run it on
every host, against the mount that host's servers use.  Servers run the same
test when they start.

A failed check (FAIL) means uploads are not safe on this filesystem; a WARN
means a weaker guarantee.  Exits 0 when no check failed, 1 otherwise.

Examples:
  imgresume check-storage --storage /mnt/shared/imgresume
  imgresume check-storage --storage /mnt/shared/imgresume --json
"""
    optParameters = [
        ["storage", "s", None, "The storage directory (required)."],
    ]
    optFlags = [
        ["json", None, "Print the checks as one JSON object."],
    ]

    def postOptions(self) -> None:
        _storage_dir(self)


def run_gc(config: GcOptions, out: Any = None) -> int:
    """Run C{imgresume gc}; returns the exit code."""
    from imgresume.sizes import format_size
    from imgresume.storage.filesystem.gc import (
        BUSY,
        FRESH_INCOMPLETE,
        FRESH_PARTIAL,
        RECENT_RECORD,
        collect_garbage,
    )

    out = out or sys.stdout
    dry = config["dry-run"]
    try:
        report = collect_garbage(
            config["storage"], config["older-than"],
            completed_records_older_than=config["records-older-than"], dry_run=dry,
        )
    except OSError as e:
        print(f"imgresume: gc: {config['storage']}: {e.strerror or e}", file=sys.stderr)
        return EXIT_FAILED
    if config["json"]:
        print(json.dumps(report.to_json(), sort_keys=True), file=out, flush=True)
        return EXIT_OK
    routine = {FRESH_PARTIAL, FRESH_INCOMPLETE, RECENT_RECORD}
    rows = [("would remove" if dry else "removed", e) for e in report.removed]
    rows += [("skipped", e) for e in report.skipped_busy]
    rows += [("kept", e) for e in report.kept if e.action not in routine]
    for verb, e in rows:
        why = e.action if e.action != BUSY else "busy: a writer holds it"
        if e.detail:
            why += f": {e.detail}"
        print(f"{verb:<12}  {e.upload_id}  {format_size(e.size):>10}  "
              f"{format_age(e.age):>8}  {e.name or '-'}  ({why})", file=out)
    print(
        f"{len(report.removed)} {'to remove' if dry else 'removed'}, "
        f"{format_size(report.bytes_freed)} {'would be freed' if dry else 'freed'}; "
        f"{len(report.skipped_busy)} busy, {len(report.kept)} kept"
        + (" (dry run: nothing was removed)" if dry else ""),
        file=out, flush=True,
    )
    return EXIT_OK


def run_check_storage(config: CheckStorageOptions, out: Any = None) -> int:
    """Run C{imgresume check-storage}; returns the exit code."""
    from imgresume.storage.filesystem.selftest import check_storage, fatal, warnings

    out = out or sys.stdout
    checks = check_storage(config["storage"])
    failed, warned = fatal(checks), warnings(checks)
    code = EXIT_FAILED if failed else EXIT_OK
    if config["json"]:
        print(json.dumps({
            "storage": os.path.abspath(config["storage"]),
            "ok": not failed,
            "checks": [c.to_json() for c in checks],
        }, sort_keys=True), file=out, flush=True)
        return code
    width = max(len(c.name) for c in checks)
    for c in checks:
        result = {True: "ok", None: "WARN", False: "FAIL"}[c.ok]
        print(f"{c.name:<{width}}  {result:<4}  {c.detail}", file=out)
    if failed:
        summary = (f"{len(failed)} check(s) failed: this filesystem cannot keep "
                   "uploads safe (see docs/storage.md, \"Storage self-test\")")
    else:
        summary = "storage usable" + (f", {len(warned)} warning(s)" if warned else "")
    print(summary, file=out, flush=True)
    return code

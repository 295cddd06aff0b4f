# -*- test-case-name: tests.cli.test_upload,tests.cli.test_interrupt -*-
"""
The C{imgresume} command: C{imgresume upload ...} and friends.  Installed
as a console script by C{setup.py}; also runnable as C{python -m imgresume}.
Each command lives in its own module; this one dispatches, and runs the
commands that need the reactor through L{imgresume.cli._run} (SIGINT and
SIGTERM end them with 130 and 143).
"""

from __future__ import annotations

import sys
from typing import Any, Sequence

from twisted.python import usage

from imgresume._options import EXIT_USAGE, BaseOptions
from imgresume.cli._keys import KeysOptions, run_keys
from imgresume.cli._progress import ProgressBar
from imgresume.cli._status import LsOptions, StatusOptions, run_ls, run_status
from imgresume.cli._storage import (
    CheckStorageOptions,
    GcOptions,
    run_check_storage,
    run_gc,
)
from imgresume.cli._upload import UploadOptions, run_upload

#: ProgressBar is shared with imgresume.demo.
__all__ = ["Options", "ProgressBar", "main"]


class Options(BaseOptions):
    synopsis = "imgresume"
    longdesc = """imgresume: resumable upload of large image files to a pool of servers
sharing one storage.  Servers run with `twistd imgresume`, the balancer with
`twistd imgresume-lb`.  Run `imgresume COMMAND --help` for each command."""
    subCommands = [
        ["upload", None, UploadOptions, "Upload files (resumable)."],
        ["status", None, StatusOptions, "Ask the servers where uploads stand."],
        ["ls", None, LsOptions, "List the uploads in a storage directory."],
        ["keys", None, KeysOptions, "Manage client keys (add, revoke, list)."],
        ["gc", None, GcOptions, "Remove abandoned uploads from a storage directory."],
        ["check-storage", None, CheckStorageOptions,
         "Test what the filesystem under a storage directory provides."],
    ]

    def postOptions(self) -> None:
        if self.subCommand is None:
            raise usage.UsageError("name a command, e.g. `imgresume upload --help`")


def main(argv: Sequence[str] | None = None) -> None:
    """Console-script entry point."""
    config = Options()
    try:
        config.parseOptions(list(sys.argv[1:] if argv is None else argv))
    except usage.UsageError as e:
        sub = getattr(config, "subOptions", None)
        while getattr(sub, "subOptions", None) is not None:
            sub = sub.subOptions
        print(f"imgresume: {e}\n\n{(sub or config).getUsage()}", file=sys.stderr)
        sys.exit(EXIT_USAGE)
    if config.subCommand == "gc":
        sys.exit(run_gc(config.subOptions))
    if config.subCommand == "check-storage":
        sys.exit(run_check_storage(config.subOptions))
    if config.subCommand == "keys":
        sys.exit(run_keys(config.subOptions))
    if config.subCommand == "ls":
        sys.exit(run_ls(config.subOptions))
    from imgresume.cli._run import Interruptions, run_on_reactor

    def go(reactor: Any, interruptions: Interruptions) -> Any:
        if config.subCommand == "status":
            return run_status(reactor, config.subOptions)
        return run_upload(reactor, config.subOptions, interruptions)

    sys.exit(run_on_reactor(go))

# -*- test-case-name: tests.cli.test_upload,tests.cli.test_interrupt,tests.cli.test_startup -*-
"""
The C{imgresume} command: C{imgresume upload ...} and friends.  Installed
as a console script by C{setup.py}; also runnable as C{python -m imgresume}.

Each command lives in its own module, which this one names and imports
only when that command runs (as a Twisted C{ServiceMaker} names its tap
module): C{imgresume --help} imports no command, C{imgresume upload}
imports no storage, server or key-file code.  Each command module has an
options class and a function that runs the command from its parsed options
and returns the exit code (L{Command} names both); the commands that need
the reactor run it through L{imgresume.cli._run} (SIGINT and SIGTERM end
them with 130 and 143).
"""

from __future__ import annotations

import sys
from importlib import import_module
from typing import Any, Callable, Sequence

from twisted.python import usage

from imgresume._options import EXIT_USAGE, BaseOptions

#: ProgressBar is shared with imgresume.demo.
__all__ = ["Options", "ProgressBar", "UploadOptions", "main"]


class Command:
    """
    One subcommand of C{imgresume}: its name, the module that holds it, the
    names of its options class and of its C{main(config) -> exit code}
    there.  Nothing is imported until the command is chosen.  Listed by
    L{Options}; run by L{main}.
    """

    def __init__(self, name: str, module: str, options: str, run: str,
                 description: str) -> None:
        self.name = name
        self.module = module
        self.options = options
        self.run = run
        self.description = description

    def _attribute(self, name: str) -> Any:
        return getattr(import_module(self.module), name)

    def make_options(self) -> usage.Options:
        """A new options parser for the command (its module imported now)."""
        return self._attribute(self.options)()

    def runner(self) -> Callable[[Any], int]:
        """The command's C{main(config)}."""
        return self._attribute(self.run)

    def usage_entry(self) -> list[Any]:
        """The command as L{usage.Options.subCommands} lists it."""
        return [self.name, None, self.make_options, self.description]


COMMANDS = [
    Command("upload", "imgresume.cli._upload", "UploadOptions", "main",
            "Upload files (resumable)."),
    Command("status", "imgresume.cli._status", "StatusOptions", "status_main",
            "Ask the servers where uploads stand."),
    Command("ls", "imgresume.cli._status", "LsOptions", "run_ls",
            "List the uploads in a storage directory."),
    Command("keys", "imgresume.cli._keys", "KeysOptions", "run_keys",
            "Manage client keys (add, revoke, list)."),
    Command("gc", "imgresume.cli._storage", "GcOptions", "run_gc",
            "Remove abandoned uploads from a storage directory."),
    Command("check-storage", "imgresume.cli._storage", "CheckStorageOptions",
            "run_check_storage", "Test what the filesystem under a storage directory provides."),
    Command("config", "imgresume.cli._show_config", "ConfigOptions", "run_config",
            "Show the upload settings in effect and where each comes from."),
    Command("completion", "imgresume.cli._completion", "CompletionOptions", "run_completion",
            "Print a bash or zsh completion script."),
    Command("man", "imgresume.cli._manpage", "ManOptions", "run_man",
            "Print the manual page imgresume(1), in roff."),
]


class Options(BaseOptions):
    synopsis = "imgresume"
    longdesc = """imgresume: resumable upload of large image files to a pool of servers
sharing one storage.  Servers run with `twistd imgresume`, the balancer with
`twistd imgresume-lb`.  Run `imgresume COMMAND --help` for each command."""
    subCommands = [command.usage_entry() for command in COMMANDS]

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
    [command] = [c for c in COMMANDS if c.name == config.subCommand]
    sys.exit(command.runner()(config.subOptions))


def __getattr__(name: str) -> Any:
    """The names shared from the command modules, imported when first asked for."""
    if name == "ProgressBar":
        from imgresume.cli._live import ProgressBar

        return ProgressBar
    if name == "UploadOptions":
        from imgresume.cli._upload import UploadOptions

        return UploadOptions
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

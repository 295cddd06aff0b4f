"""Command-line option helpers shared by the C{imgresume} command and the twistd plugins."""

from __future__ import annotations

import getopt
import sys

from twisted.python import usage

import imgresume

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


class BaseOptions(usage.Options):
    """
    Options that keep their long description's layout (examples stay
    readable) and, for commands without subcommands, accept options after
    the positional arguments (C{upload FILE --json}), as GNU tools do.
    """

    def parseOptions(self, options: list[str] | None = None) -> None:
        if options is None:
            options = sys.argv[1:]
        if not getattr(self, "subCommands", None):
            options = self._options_first(list(options))
        super().parseOptions(options)

    def _options_first(self, argv: list[str]) -> list[str]:
        """Reorder C{argv} so that every option comes before the arguments."""
        try:
            opts, args = getopt.gnu_getopt(argv, self.shortOpt, self.longOpt)
        except getopt.error as e:
            raise usage.UsageError(str(e))
        takes_value = {f"--{name[:-1]}" for name in self.longOpt if name.endswith("=")}
        takes_value |= {f"-{c}" for i, c in enumerate(self.shortOpt)
                        if i + 1 < len(self.shortOpt) and self.shortOpt[i + 1] == ":"}
        ordered: list[str] = []
        for opt, value in opts:
            ordered += [opt, value] if opt in takes_value else [opt]
        return ordered + ["--", *args] if args else ordered

    def getUsage(self, width: int | None = None) -> str:
        longdesc, self.longdesc = getattr(self, "longdesc", ""), ""
        try:
            text = super().getUsage(width)
        finally:
            self.longdesc = longdesc
        return text.rstrip() + "\n\n" + longdesc.strip() + "\n"

    def opt_version(self) -> None:
        """Print the imgresume version and exit."""
        print(f"imgresume {imgresume.__version__}")
        sys.exit(0)

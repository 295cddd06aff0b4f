"""Command-line option helpers shared by the C{imgresume} command and the twistd plugins."""

from __future__ import annotations

import sys

from twisted.python import usage

import imgresume


class BaseOptions(usage.Options):
    """Options that keep their long description's layout (examples stay readable)."""

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

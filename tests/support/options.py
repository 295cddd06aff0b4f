"""
The options of C{twistd imgresume}, parsed for tests of what they accept.
"""

from __future__ import annotations

import os

from twisted.trial.unittest import SynchronousTestCase

from imgresume.server.tap import Options


def server_options(test: SynchronousTestCase, *args: str) -> Options:
    """C{twistd imgresume --storage DIR ARGS}, parsed; DIR is new, in C{test}'s temp dir."""
    storage = test.mktemp()
    os.makedirs(storage)
    options = Options()
    options.parseOptions(["--storage", storage, *args])
    return options

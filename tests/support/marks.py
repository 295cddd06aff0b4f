"""
Test markers usable under both pytest and Trial.

Slow soak/chaos tests run only when ``IMGRESUME_SLOW=1`` is set (pytest's
``--run-slow`` sets it; CI runs them); ``make test`` stays fast without.
"""

import os
import unittest
from typing import Callable, TypeVar

_F = TypeVar("_F", bound=Callable[..., object])

REASON = "slow chaos/soak test: run with `make test PYTEST_ARGS=--run-slow` or IMGRESUME_SLOW=1"


def slow(test: _F) -> _F:
    """
    Skip C{test} unless C{IMGRESUME_SLOW=1}.  The C{skip} attribute makes
    Trial's C{TestCase} (which both runners run) skip it before C{setUp},
    so a class whose C{setUp} starts a cluster does not start one for
    nothing; C{unittest.skip} marks it for any other runner.
    """
    if os.environ.get("IMGRESUME_SLOW") == "1":
        return test
    test.skip = REASON  # type: ignore[attr-defined]
    return unittest.skip(REASON)(test)

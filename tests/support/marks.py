"""
Test markers usable under both pytest and Trial.

Slow soak/chaos tests run only when ``IMGRESUME_SLOW=1`` is set (pytest's
``--run-slow`` sets it; CI runs them); ``make test`` stays fast without.
"""

import os
import unittest

slow = unittest.skipUnless(
    os.environ.get("IMGRESUME_SLOW") == "1",
    "slow chaos/soak test: run with `make test PYTEST_ARGS=--run-slow` or IMGRESUME_SLOW=1",
)

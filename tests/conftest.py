"""
pytest glue.  Trial runs each test in ``_trial_temp``; under pytest, run the
session in a temporary directory too, so ``TestCase.mktemp()`` never writes
into the source tree.
"""

import os

import pytest


@pytest.fixture(autouse=True, scope="session")
def _run_in_temporary_directory(tmp_path_factory):
    before = os.getcwd()
    os.chdir(tmp_path_factory.mktemp("trial"))
    yield
    os.chdir(before)


def pytest_addoption(parser):
    parser.addoption(
        "--run-slow", action="store_true",
        help="also run the slow soak/chaos tests (same as IMGRESUME_SLOW=1)",
    )


def pytest_configure(config):
    if os.environ.get("IMGRESUME_TEST_HIDE_POSIX") == "1":
        # The client as on Windows/macOS (tests/support/portable.py).
        from tests.support.portable import hide_posix

        hide_posix()
    if config.getoption("--run-slow"):
        os.environ["IMGRESUME_SLOW"] = "1"

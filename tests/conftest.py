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

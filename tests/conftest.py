"""
pytest glue.  Trial runs each test in ``_trial_temp``; under pytest, run the
session in a temporary directory too, so ``TestCase.mktemp()`` never writes
into the source tree.

A test that leaves the global reactor unusable fails itself, not every test
after it (L{pytest_runtest_call}).
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


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item):
    """
    After each Trial test, leave the global reactor as a fresh test needs it
    and fail the test that did not.

    pytest runs a Trial C{TestCase} through its own C{run()}, so Trial's
    janitor reports and removes the DelayedCalls and selectables the test
    left.  Two things get past it and then fail every later test with a
    C{DirtyReactorAggregateError} (each later test's own calls, never run):

      - the real C{reactor.stop()} called outside Trial's wait (by a
        DelayedCall the janitor runs, or by a C{SynchronousTestCase}): every
        later C{reactor.run()} raises C{ReactorNotRestartable};
      - a C{SynchronousTestCase} leaving calls or selectables: Trial runs no
        janitor after those, so the next C{TestCase} is blamed.

    Here such a test fails with what it left, and the reactor is made
    runnable again.
    """
    outcome = yield
    problems = _restore_reactor(getattr(item, "instance", None))
    if problems:
        pytest.fail("the test left the reactor dirty (cleaned up now, for the tests "
                    "after it):\n" + "\n".join(problems), pytrace=False)
    return outcome


def _restore_reactor(test):
    """What C{test} (a Trial test, else nothing is done) left in the reactor, removed."""
    import sys

    trial = sys.modules.get("twisted.trial.unittest")
    if trial is None or not isinstance(test, trial.SynchronousTestCase):
        return []
    if "twisted.internet.reactor" not in sys.modules:
        return []
    from twisted.internet import reactor
    from twisted.trial.util import _Janitor

    problems = []
    if getattr(reactor, "_startedBefore", False) and not reactor.running:
        problems.append("it called reactor.stop(): no later reactor.run() could start")
        # The state a reactor is in after Trial's wait (run, then crash()),
        # with the shutdown triggers that firing "shutdown" used up.
        reactor._startedBefore = False
        reactor._justStopped = False
        reactor._stopped = False
        shutdown = reactor._eventTriggers.get("shutdown")
        during = [call[0] for call in shutdown.during] if shutdown is not None else []
        for trigger in (reactor.crash, reactor.disconnectAll):
            if trigger not in during:
                reactor.addSystemEventTrigger("during", "shutdown", trigger)
    if not isinstance(test, trial.TestCase):
        found = []

        class Errors:
            def addError(self, test, failure):
                found.append(failure.getErrorMessage())

        janitor = _Janitor(test, Errors())
        janitor.postCaseCleanup()
        janitor.postClassCleanup()
        problems.extend(found)
    return problems

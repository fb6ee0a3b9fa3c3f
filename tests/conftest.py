"""One rule for every test file: a hang fails the run, and says where, instead of stalling it.

A test still running after PARSCALE_TEST_TIMEOUT seconds (default 600; 0 turns the watchdog off) makes Python's
faulthandler print every thread's stack to the terminal and end pytest with exit code 1. The watchdog is a C
thread, so it fires even when the hang holds the GIL. CI then fails in minutes with the stuck line named, where a
hang would otherwise run into CI's own limit and print nothing."""
import faulthandler
import os

import pytest

TIMEOUT = float(os.environ.get("PARSCALE_TEST_TIMEOUT", "600"))
terminal = None  # a copy of stderr made before pytest captures it: the dump must reach the terminal


def pytest_configure(config):
    global terminal
    terminal = os.fdopen(os.dup(2), "w")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item):
    if TIMEOUT > 0:
        faulthandler.dump_traceback_later(TIMEOUT, exit=True, file=terminal)
    yield
    faulthandler.cancel_dump_traceback_later()

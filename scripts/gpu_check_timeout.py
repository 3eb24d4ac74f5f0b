"""pytest plugin used by scripts/gpu_check.py (``-p gpu_check_timeout``): a per-test time limit.

Each phase of a test (setup, call, teardown) gets ``$DFQKERN_TEST_TIMEOUT`` seconds (0 or unset: no
limit); past it SIGALRM raises :class:`PhaseTimeout` in the test, which fails and the run goes on
with the next one. No dependency on pytest-timeout. A hang inside one C call (a stuck kernel, a
blocking synchronize) cannot be interrupted this way: gpu_check.py's hard limit per pytest process
covers that.
"""
from __future__ import annotations

import os
import signal

import pytest

ENV = "DFQKERN_TEST_TIMEOUT"


class PhaseTimeout(Exception):
    pass


def _limit() -> int:
    try:
        return max(0, int(float(os.environ.get(ENV, "0"))))
    except ValueError:
        return 0


def _on_alarm(signum, frame):
    raise PhaseTimeout(f"exceeded the per-test limit of {_limit()} s (${ENV}, set by scripts/gpu_check.sh)")


def pytest_configure(config):
    if _limit() and hasattr(signal, "SIGALRM"):
        signal.signal(signal.SIGALRM, _on_alarm)


def _limited():
    limit = _limit() if hasattr(signal, "SIGALRM") else 0
    if limit:
        signal.alarm(limit)
    try:
        yield
    finally:
        if limit:
            signal.alarm(0)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_setup(item):
    yield from _limited()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    yield from _limited()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_teardown(item, nextitem):
    yield from _limited()

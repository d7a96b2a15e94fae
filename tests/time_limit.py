"""A pytest plugin that keeps the speed markers honest: with ``LMGEN_UNMARKED_LIMIT`` set
(seconds; CI sets it), a test that carries none of the markers in :data:`MARKED` and whose
call phase runs longer than the limit fails the session, each offender named with its time.

``make quick`` deselects the markers of :data:`MARKED` (``gpu`` tests skip without CUDA), so
an unmarked test that turns slow would silently slow the inner loop down; this makes CI say so.
The conftest registers it (``pytest_plugins``); it is a module of its own so that its test
can run it on a generated test file (``pytest -p time_limit``).
"""

from __future__ import annotations

import os

import pytest

ENV = "LMGEN_UNMARKED_LIMIT"
# A test with any of these may be slow; `make quick` leaves these out.
MARKED = ("slow", "interpreter", "statistical", "subprocess", "aot", "gpu")


class UnmarkedTimeLimit:
    """Records the unmarked tests whose call took longer than ``limit`` seconds."""

    def __init__(self, limit: float):
        self.limit = limit
        self.over: list[tuple[str, float]] = []

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        # A report's keywords hold its markers' names; under pytest-xdist the reports reach
        # the controlling process, which alone keeps this plugin (see pytest_configure).
        marked = any(name in report.keywords for name in MARKED)
        if report.when == "call" and not marked and report.duration > self.limit:
            self.over.append((report.nodeid, report.duration))

    def pytest_sessionfinish(self, session: pytest.Session, exitstatus) -> None:
        # Only a passing run turns into a failure: no tests collected (5) stays 5.
        if self.over and session.exitstatus == pytest.ExitCode.OK:
            session.exitstatus = pytest.ExitCode.TESTS_FAILED

    def pytest_terminal_summary(self, terminalreporter) -> None:
        if not self.over:
            return
        terminalreporter.section(f"unmarked tests over {self.limit:g} s", sep="=", red=True)
        for nodeid, seconds in sorted(self.over, key=lambda o: -o[1]):
            terminalreporter.line(f"{seconds:6.2f} s  {nodeid}")
        terminalreporter.line(f"Mark them in tests/conftest.py (MARKS) with one of "
                              f"{', '.join(MARKED)}, or make them faster.")


def pytest_configure(config: pytest.Config) -> None:
    limit = os.environ.get(ENV)
    if limit and not hasattr(config, "workerinput"):  # not in a pytest-xdist worker
        # One instance per session: a pytester run inside a test gets its own.
        config.pluginmanager.register(UnmarkedTimeLimit(float(limit)), "unmarked-time-limit")

"""No silent skips in CI: with ``CI=true`` a run that skipped any test fails, naming the skips.

Locally a skip is fine (a missing helm, promtool or network namespaces) and ``-ra`` lists it in
the summary; CI installs every tool (scripts/test-tools.sh), so a skip there means a check did not
run while the run would otherwise look green. Loaded for every run by ``-p`` in pyproject.toml.
"""

from __future__ import annotations

import os

import pytest


def ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def _skipped(session: pytest.Session) -> list[pytest.TestReport]:
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    return list(reporter.stats.get("skipped", [])) if reporter is not None else []


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if ci() and _skipped(session) and exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    skipped = terminalreporter.stats.get("skipped", [])
    if not (ci() and skipped):
        return
    terminalreporter.section("CI=true: skipped tests fail the run", red=True)
    for report in skipped:
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longrepr
        terminalreporter.line(f"SKIPPED {report.nodeid}: {reason}")

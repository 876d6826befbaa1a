"""A pytest plugin: where everything the suite needs is present, a skipped test is a failure.

CI is that place (root, so tests/setup_system.sh installs the system packages, and ../shared present), and so is
any run with CI set in the environment. There only tests marked `gpu` may skip: a skip elsewhere means a missing
package, a broken import or absent data, which would otherwise pass silently. Elsewhere skips are allowed.
BESTSHOT_ALLOW_SKIPS=1 turns the check off for a run on purpose.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
_skipped: list[tuple[str, str]] = []  # (test id, reason)


def strict() -> bool:
    if os.environ.get("BESTSHOT_ALLOW_SKIPS") == "1":
        return False
    return bool(os.environ.get("CI")) or (os.geteuid() == 0 and SHARED.is_dir())


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.skipped and not hasattr(report, "wasxfail") and "gpu" not in report.keywords:
        _skipped.append((report.nodeid, _reason(report)))


def pytest_collectreport(report: pytest.CollectReport) -> None:
    if report.skipped:  # a whole module skipped at import (importorskip, allow_module_level)
        _skipped.append((report.nodeid, _reason(report)))


def _reason(report: pytest.TestReport | pytest.CollectReport) -> str:
    return report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if _skipped and strict() and exitstatus in (pytest.ExitCode.OK, pytest.ExitCode.NO_TESTS_COLLECTED):
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter) -> None:
    if _skipped and strict():
        terminalreporter.section("skips are failures here", red=True)
        terminalreporter.write_line("only tests marked gpu may skip under CI (root with ../shared, or CI set); "
                                    "BESTSHOT_ALLOW_SKIPS=1 allows them:")
        for nodeid, reason in _skipped:
            terminalreporter.write_line(f"  {nodeid}: {reason}")

"""The fault suite (``make faults``): one shared :class:`FaultReport`, printed at the end."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.faults.report import FaultReport

REPORT = FaultReport()
REPORT_PATH = Path(__file__).resolve().parents[2] / "build" / "faults-report.json"


@pytest.fixture(scope="session")
def faults() -> FaultReport:
    """The session's fault table; each fault test adds its row."""
    return REPORT


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not REPORT.rows:
        return
    terminalreporter.section("fault matrix")
    terminalreporter.write_line(REPORT.render())
    REPORT.write_json(REPORT_PATH)

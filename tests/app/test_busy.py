"""tools/busy.py (`make test-busy`) reads each run's counts and failing tests from pytest's
JUnit XML report."""

from __future__ import annotations

from pathlib import Path

from tools.busy import Outcome, read_report

REPORT = """<?xml version="1.0" encoding="utf-8"?>
<testsuites><testsuite name="pytest" tests="5" failures="1" errors="1" skipped="1">
<testcase classname="tests.app.test_a" name="test_passes" time="0.1"/>
<testcase classname="tests.app.test_a" name="test_also_passes" time="0.1"/>
<testcase classname="tests.app.test_b" name="test_fails[x]"><failure message="no"/></testcase>
<testcase classname="tests.e2e.test_c" name="test_errs"><error message="setup"/></testcase>
<testcase classname="tests.e2e.test_c" name="test_skips"><skipped message="why"/></testcase>
</testsuite></testsuites>
"""


def test_a_runs_counts_and_failing_tests_come_from_its_report(tmp_path: Path) -> None:
    report = tmp_path / "run-1.xml"
    report.write_text(REPORT)
    outcome = read_report(Outcome(1, 12.0, 1), report)
    assert (outcome.passed, outcome.failed, outcome.errors, outcome.skipped) == (2, 1, 1, 1)
    assert outcome.failing == [
        "tests.app.test_b::test_fails[x]",
        "tests.e2e.test_c::test_errs",
    ]
    assert not outcome.ok
    assert outcome.line().startswith("run 1: FAILED in 12 s: 2 passed, 1 failed, 1 errors")


def test_a_run_without_a_report_keeps_its_exit_status(tmp_path: Path) -> None:
    outcome = read_report(Outcome(2, 3.0, 2), tmp_path / "missing.xml")
    assert (outcome.passed, outcome.failing, outcome.ok) == (0, [], False)

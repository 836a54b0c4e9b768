"""The whole suite, run after run, while a plain CPU loop keeps one core busy (``make test-busy``).

A test that waits a fixed time instead of for a condition, or asserts how long something took,
passes on a quiet machine and fails on a busy one. Here another process spins on one core for
the whole time (``python -c 'while True: pass'``), and the suite runs ``--runs`` times in a row
(three by default). Every run is reported, not only the first failure: its counts, its wall
time and the tests that failed, read from pytest's JUnit XML report.

``python -m tools test-busy [--runs N] [-- pytest arguments]``; it fails if any run failed.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BUSY_LOOP = "while True: pass"


@dataclass
class Outcome:
    """One run of the suite, as its JUnit report and exit status tell it."""

    number: int
    seconds: float
    exit_status: int
    passed: int = 0
    failed: int = 0
    errors: int = 0
    skipped: int = 0
    failing: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.exit_status == 0

    def line(self) -> str:
        return (
            f"run {self.number}: {'passed' if self.ok else 'FAILED'} in {self.seconds:.0f} s:"
            f" {self.passed} passed, {self.failed} failed, {self.errors} errors,"
            f" {self.skipped} skipped (pytest exit status {self.exit_status})"
        )


def read_report(outcome: Outcome, report: Path) -> Outcome:
    """Fill ``outcome``'s counts and failing tests from a JUnit XML report, if pytest wrote one."""
    if not report.exists():
        return outcome
    # The report is the one pytest just wrote here, not input from outside.
    for case in ET.parse(report).getroot().iter("testcase"):  # noqa: S314
        name = f"{case.get('classname')}::{case.get('name')}"
        if case.find("failure") is not None:
            outcome.failed += 1
            outcome.failing.append(name)
        elif case.find("error") is not None:
            outcome.errors += 1
            outcome.failing.append(name)
        elif case.find("skipped") is not None:
            outcome.skipped += 1
        else:
            outcome.passed += 1
    return outcome


def run_suite(number: int, pytest_args: list[str], reports: Path) -> Outcome:
    report = reports / f"run-{number}.xml"
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "pytest", f"--junitxml={report}", *pytest_args],
        cwd=ROOT,
        check=False,
    )
    outcome = Outcome(number, time.monotonic() - started, done.returncode)
    return read_report(outcome, report)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools test-busy", description=__doc__)
    parser.add_argument("--runs", type=int, default=3, help="runs of the suite (default 3)")
    parser.add_argument("pytest_args", nargs="*", help="for pytest, after a '--'")
    args = parser.parse_args(argv)

    outcomes: list[Outcome] = []
    busy = subprocess.Popen([sys.executable, "-c", BUSY_LOOP])
    print(f"[test-busy] a CPU loop spins on one core (pid {busy.pid})", flush=True)
    try:
        with tempfile.TemporaryDirectory(prefix="test-busy-") as reports:
            for number in range(1, args.runs + 1):
                outcome = run_suite(number, args.pytest_args, Path(reports))
                outcomes.append(outcome)
                print(f"[test-busy] {outcome.line()}", flush=True)
    finally:
        busy.kill()
        busy.wait()
    print(f"[test-busy] {args.runs} runs beside a busy core:")
    for outcome in outcomes:
        print(f"  {outcome.line()}")
        for name in outcome.failing:
            print(f"    failed: {name}")
    return 0 if outcomes and all(outcome.ok for outcome in outcomes) else 1


if __name__ == "__main__":
    raise SystemExit(main())

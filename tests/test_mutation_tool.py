"""The pytest plugin of `make mutation` (tests/tools/mutation_report.py), as mutmut runs it: in a mutant's process,
a test that sleeps far past its unmutated duration fails instead of waiting for its own deadline; outside one, it
is left alone."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from tests.conftest import REPO

SLEEPER = """
import time

def test_quick():
    pass

def test_sleeps_past_its_limit():
    deadline = time.monotonic() + {sleep}
    while time.monotonic() < deadline:  # a polling loop whose exit a mutant broke: it sleeps, it does not spin
        try:
            time.sleep(0.05)
        except Exception:
            pass  # code that swallows what interrupts it
"""


PYTEST = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "-p", "tests.tools.mutation_report"]


def _run(tmp_path: Path, sleep: float, mutant: str | None) -> tuple[subprocess.CompletedProcess[str], float]:
    (tmp_path / "test_sleeper.py").write_text(SLEEPER.format(sleep=sleep))
    durations = {"test_sleeper.py::test_quick": 0.01, "test_sleeper.py::test_sleeps_past_its_limit": 0.1}
    (tmp_path / "mutmut-stats.json").write_text(json.dumps({"duration_by_test": durations}))
    env = {k: v for k, v in os.environ.items() if k != "MUTANT_UNDER_TEST"}
    env["PYTHONPATH"] = str(REPO)
    if mutant is not None:
        env["MUTANT_UNDER_TEST"] = mutant
    started = time.monotonic()
    run = subprocess.run(
        [*PYTEST, "-c", os.devnull, "--rootdir", str(tmp_path), "test_sleeper.py"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    return run, time.monotonic() - started


def test_a_mutant_that_makes_a_test_hang_fails_it_at_its_limit(tmp_path: Path) -> None:
    run, took = _run(tmp_path, 60, "dmrepl.live.x_follow__mutmut_7")
    assert run.returncode == 1, run.stdout + run.stderr
    assert "MutantHung" in run.stdout and "test_sleeps_past_its_limit still running after 6 s" in run.stdout
    assert took < 30  # the limit is 10 x 0.1 s + 5 s, not the test's 60 s


def test_outside_a_mutants_run_no_limit_applies(tmp_path: Path) -> None:
    run, took = _run(tmp_path, 7, None)
    assert run.returncode == 0, run.stdout + run.stderr
    assert took >= 7

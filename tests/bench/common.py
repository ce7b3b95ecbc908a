"""What every benchmark needs: whole-process timing with peak RSS, quiet set-up commands, and exports generated in
a child process (a forked child's peak RSS counts its parent's pages, so the benchmark process must stay small)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def run(cmd: list[str], env: dict[str, str]) -> tuple[float, int]:
    """Wall time and peak RSS (MB) of one whole process (with worker processes: the largest of them)."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    elapsed = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{' '.join(cmd)} failed: {proc.stderr.read().decode() if proc.stderr else ''}")
    return elapsed, usage.ru_maxrss // 1024


def compile_bytecode() -> None:
    """Compile dmrepl's bytecode, as installing a wheel does: a checkout run with PYTHONDONTWRITEBYTECODE set (as on
    some CI machines) would otherwise compile every module at each start (measured: 60 ms a process), a cost no
    installed dmrepl pays. The .pyc files land in dmrepl/__pycache__, ignored by git."""
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(REPO / "dmrepl")], check=True, capture_output=True)


def dmrepl(env: dict[str, str], *args: str) -> None:
    """A set-up command (not timed): quiet unless it fails."""
    done = subprocess.run(
        [sys.executable, "-m", "dmrepl", *args], env=env, capture_output=True, text=True, stdin=subprocess.DEVNULL
    )
    if done.returncode != 0:
        raise SystemExit(f"dmrepl {' '.join(args)}: exit {done.returncode}\n{done.stdout}{done.stderr}")


def generate_export(path: Path, users: int) -> int:
    """Write a synthetic export of `users` user points; return its number of operations."""
    out = subprocess.run(
        [sys.executable, str(REPO / "tests" / "generate.py"), str(path), str(users)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    # "<path>: N lines, M operations, 0 bad lines"
    return int(out.rsplit(":", 1)[1].split(",")[1].split()[0])

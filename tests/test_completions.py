"""The shipped completion scripts are what dmrepl generates now, and they complete today's commands."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

COMPLETIONS = Path(__file__).resolve().parent.parent / "completions"
FILES = {"bash": "dmrepl.bash", "zsh": "_dmrepl", "fish": "dmrepl.fish"}


def _dmrepl(env: dict[str, str]) -> str:
    code = "from dmrepl.cli.app import app; app(prog_name='dmrepl')"
    return subprocess.run(
        [sys.executable, "-c", code], env={**os.environ, **env}, capture_output=True, text=True, check=False
    ).stdout


@pytest.mark.parametrize("shell", sorted(FILES))
def test_completion_scripts_are_current(shell: str) -> None:
    generated = _dmrepl({"_DMREPL_COMPLETE": f"source_{shell}"})
    assert generated.strip(), shell
    assert (COMPLETIONS / FILES[shell]).read_text() == generated, (
        f"completions/{FILES[shell]} is stale: regenerate with `make completions`"
    )


@pytest.mark.parametrize(
    ("words", "expected"),
    [
        ("dmrepl sy", "sync"),
        ("dmrepl sync re", "resume"),
        ("dmrepl datamart set", "set-version"),
        ("dmrepl create --ty", "--type"),
        ("dmrepl create --type goo", "google-pubsub"),
        ("dmrepl create --type file --secret-store k", "keyring"),
        ("dmrepl list --status ER", "ERROR"),
        ("dmrepl sync start --format user", "user-points"),
        ("dmrepl create --event", "--event-hub"),
    ],
)
def test_bash_completion_completes_current_commands(words: str, expected: str) -> None:
    out = _dmrepl({"_DMREPL_COMPLETE": "complete_bash", "COMP_WORDS": words, "COMP_CWORD": str(len(words.split()) - 1)})
    assert expected in out.split()

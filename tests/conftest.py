"""Every test gets its own dmrepl home and keyring; output is uncoloured and 100 columns wide."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import keyring
import pytest
from typer.testing import CliRunner

from dmrepl.cli.app import app
from tests.keyring_backend import FileKeyring

REPO = Path(__file__).resolve().parent.parent
DATA_DIR = Path(__file__).resolve().parent / "data"

pytest_plugins = ["tests.peers.fixtures_pubsub", "tests.peers.fixtures_eventhubs"]


@pytest.fixture(autouse=True)
def isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    home = tmp_path / "home"
    monkeypatch.setenv("DMREPL_HOME", str(home))
    monkeypatch.setenv("NO_COLOR", "1")
    monkeypatch.setenv("COLUMNS", "100")
    monkeypatch.setenv("DMREPL_TEST_KEYRING", str(tmp_path / "keyring.json"))
    monkeypatch.setenv("PYTHON_KEYRING_BACKEND", "tests.keyring_backend.FileKeyring")
    monkeypatch.setenv("PYTHONPATH", str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    monkeypatch.delenv("DMREPL_SECRET_STORE", raising=False)
    monkeypatch.delenv("DMREPL_DEBUG", raising=False)
    monkeypatch.delenv("PUBSUB_EMULATOR_HOST", raising=False)
    previous = keyring.get_keyring()
    keyring.set_keyring(FileKeyring())
    yield home
    keyring.set_keyring(previous)


class Cli:
    """Runs dmrepl in-process (fast) with stdout and stderr kept apart."""

    def __init__(self) -> None:
        self.runner = CliRunner()

    def __call__(self, *args: Any, input: str | None = None, expect: int | None = 0) -> Any:
        result = self.runner.invoke(app, [str(a) for a in args], input=input)
        if expect is not None and result.exit_code != expect:
            raise AssertionError(
                f"dmrepl {' '.join(map(str, args))}: exit {result.exit_code}, expected {expect}\n"
                f"stdout: {result.stdout}\nstderr: {result.stderr}\nexception: {result.exception!r}"
            )
        return result


@pytest.fixture
def cli() -> Cli:
    return Cli()


def spawn_dmrepl(*args: Any) -> subprocess.Popen[str]:
    """dmrepl as its own process that keeps running while the test acts on it (signals, faults, kills)."""
    return subprocess.Popen(
        [sys.executable, "-m", "dmrepl", *map(str, args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
    )


@pytest.fixture
def run_dmrepl() -> Callable[..., subprocess.CompletedProcess[str]]:
    """dmrepl as a real process, for signals, concurrency and exit codes as a shell sees them."""

    def run(*args: Any, timeout: float = 120, **kw: Any) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "dmrepl", *map(str, args)],
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
            **kw,
        )

    return run


@pytest.fixture
def closed_port() -> Iterator[int]:
    """A loopback port nobody listens on (bound without listen, so nobody else can take it meanwhile)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        yield s.getsockname()[1]


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A loopback port that completes TCP handshakes and then never says a word (a hung or filtered server)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(64)
        yield s.getsockname()[1]


@pytest.fixture
def datamart(cli: Cli) -> str:
    cli("datamart", "add", "dm1", "--system-version", "v202205")
    return "dm1"


@pytest.fixture
def file_replication(cli: Cli, datamart: str, tmp_path: Path) -> tuple[str, Path]:
    out = tmp_path / "out.ndjson"
    cli("create", "--type", "file", "--name", "local", "--path", out)
    cli("activate", "local")
    return "local", out

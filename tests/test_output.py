"""What a terminal shows is readable at 80 columns and safe; what a pipe gets is whole TSV rows.

Terminal tests run dmrepl under a real pseudo-terminal whose size is set with TIOCSWINSZ (COLUMNS is removed, so
the width comes from the terminal as it would for a person); pipe tests read a subprocess's stdout.
"""

from __future__ import annotations

import fcntl
import json
import os
import pty
import re
import shutil
import struct
import subprocess
import sys
import termios
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import DATA_DIR

SGR = re.compile(rb"\x1b\[[0-9;]*m")  # bold headers: styling, not content
RED = b"\x1b[31m"
LIST_COLUMNS = ["ID", "NAME", "TYPE", "DATAMART", "STATUS", "TARGET", "LAST CHECK"]
SYNC_COLUMNS = ["EXECUTION", "DATAMART", "STATUS", "STARTED", "DURATION", "READ", "OPS", "REJECTS", "DELIVERED"]


def on_terminal(*args: Any, columns: int) -> bytes:
    """Everything dmrepl writes (stdout and stderr) to a terminal `columns` wide, as bytes with plain newlines."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, columns, 0, 0))
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")} | {"TERM": "xterm"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "dmrepl", *map(str, args)],
        stdin=subprocess.DEVNULL,
        stdout=slave,
        stderr=slave,
        env=env,
        close_fds=True,
    )
    os.close(slave)
    seen = b""
    try:
        while chunk := os.read(master, 65536):
            seen += chunk
    except OSError:  # EIO: the process closed the terminal
        pass
    finally:
        os.close(master)
    proc.wait(timeout=60)
    return seen.replace(b"\r\n", b"\n")


def in_pipe(*args: Any) -> bytes:
    proc = subprocess.run(
        [sys.executable, "-m", "dmrepl", *map(str, args)],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        timeout=60,
        check=False,
    )
    return proc.stdout + proc.stderr


def tsv(out: bytes) -> list[list[str]]:
    return [line.split("\t") for line in out.decode().splitlines()]


def visible_lines(out: bytes) -> list[str]:
    return SGR.sub(b"", out).decode().splitlines()


@pytest.fixture
def long_path(tmp_path: Path) -> Path:
    directory = tmp_path / "var" / "lib" / "dmrepl" / "a-rather-long-directory-name" / "and-another-level"
    directory.mkdir(parents=True)
    return directory / "operations-of-the-main-datamart.ndjson"


@pytest.fixture
def replication(cli, datamart, long_path: Path) -> str:
    """An ACTIVE replication whose name and id must stay whole and whose target is longer than 80 columns."""
    created = json.loads(
        cli("--json", "create", "--type", "file", "--name", "primary-replication", "--path", long_path).stdout
    )
    cli("activate", created["id"])
    return created["id"]


@pytest.fixture
def execution(cli, replication: str) -> str:
    return json.loads(cli("--json", "sync", "start", DATA_DIR / "userpoints-v202205.ndjson").stdout)["id"]


def test_sync_list_keeps_the_execution_id_at_80_columns_and_in_a_pipe(execution: str) -> None:
    shown = visible_lines(on_terminal("sync", "list", columns=80))
    assert shown[0].split()[0] == "EXECUTION", shown
    assert shown[1].split()[0] == execution, shown  # whole, on one line: what `sync resume` needs
    assert all(len(line) <= 80 for line in shown), shown

    header, row = tsv(in_pipe("sync", "list"))
    assert header == SYNC_COLUMNS
    record = dict(zip(header, row, strict=True))
    assert record["EXECUTION"] == execution and record["STATUS"] == "SUCCEEDED"
    assert record["DELIVERED"] == "primary-replication:64" and record["OPS"] == "64"


def test_list_at_80_columns_keeps_ids_and_shortens_the_path_in_the_middle(replication: str, long_path: Path) -> None:
    shown = visible_lines(on_terminal("list", columns=80))
    assert len(shown) == 2, shown  # a header and one row: nothing folded over several lines
    assert all(len(line) <= 80 for line in shown), shown
    header, row = shown[0].split(), shown[1].split()
    assert header[:2] == ["ID", "NAME"] and "STATUS" in header and "TARGET" in header
    assert "CHECK" not in header  # the first to go
    assert row[:2] == [replication, "primary-replication"] and "ACTIVE" in row
    (target,) = [cell for cell in row if "…" in cell]
    head, tail = target.split("…")
    assert str(long_path).startswith(head) and str(long_path).endswith(tail)
    assert len(head) >= 5 and tail.endswith(".ndjson"), target


def test_list_at_120_columns_shows_every_column_on_one_line(replication: str) -> None:
    shown = visible_lines(on_terminal("list", columns=120))
    assert len(shown) == 2, shown
    assert all(len(line) <= 120 for line in shown), shown
    assert re.split(r"\s{2,}", shown[0].strip()) == LIST_COLUMNS
    assert shown[1].split()[:2] == [replication, "primary-replication"]
    assert re.search(r"ok \d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$", shown[1]), shown  # a timestamp is whole or absent


def test_wide_shows_the_whole_path_on_a_terminal(replication: str, long_path: Path) -> None:
    out = on_terminal("--wide", "list", columns=80)
    assert str(long_path).encode() in out
    assert all(name.encode() in out for name in LIST_COLUMNS)


def test_pipes_get_tsv_with_every_column_whole(replication: str, long_path: Path) -> None:
    header, row = tsv(in_pipe("list"))
    assert header == LIST_COLUMNS
    record = dict(zip(header, row, strict=True))
    assert record["ID"] == replication and record["NAME"] == "primary-replication"
    assert record["TARGET"] == str(long_path) and record["LAST CHECK"].startswith("ok ")

    pairs = dict(tsv(in_pipe("show", replication))[:6])  # key<TAB>value lines, values whole
    assert pairs["id"] == replication and pairs["target"] == str(long_path)


def test_control_characters_never_reach_the_terminal_raw(cli, tmp_path: Path) -> None:
    name = "evil\x1b[31mred\nfake line\x9b2J"
    cli("datamart", "add", "dm1", "--name", name)
    cli("create", "--type", "file", "--name", "local", "--path", tmp_path / "out.ndjson")
    cli("activate", "local")
    export = tmp_path / "export\x1b[31m.ndjson"
    shutil.copyfile(DATA_DIR / "userpoints-v202205.ndjson", export)
    escaped_name = rb"evil\x1b[31mred\nfake line\x9b2J"

    outputs = {
        "datamart list (terminal)": on_terminal("datamart", "list", columns=80),
        "datamart show (terminal)": on_terminal("datamart", "show", "dm1", columns=80),
        "datamart list (pipe)": in_pipe("datamart", "list"),
        "sync start (terminal)": on_terminal("sync", "start", export, "--no-progress", columns=80),
        "sync list (pipe)": in_pipe("sync", "list"),
        "error (terminal)": on_terminal("sync", "start", tmp_path / "missing\x1b[31m.ndjson", columns=80),
    }
    for what, out in outputs.items():
        assert RED not in out and b"\x9b" not in out and "\x9b".encode() not in out, (what, out)
    for what in ("datamart list (terminal)", "datamart show (terminal)", "datamart list (pipe)"):
        assert escaped_name in outputs[what], (what, outputs[what])
    assert rb"export\x1b[31m.ndjson" in outputs["sync start (terminal)"]
    assert rb"missing\x1b[31m.ndjson" in outputs["error (terminal)"]

    shown = json.loads(cli("--json", "datamart", "show", "dm1").stdout)  # JSON stays exact
    assert shown["name"] == name


@pytest.mark.parametrize(
    ("width", "expected"),
    [
        (200, ["ID", "NAME", "TYPE", "DATAMART", "STATUS", "TARGET", "LAST CHECK"]),  # TARGET shortened
        (120, ["ID", "NAME", "TYPE", "DATAMART", "STATUS", "TARGET"]),
        (100, ["ID", "NAME", "TYPE", "STATUS", "TARGET"]),
        (80, ["ID", "NAME", "STATUS", "TARGET"]),
        (10, ["ID", "NAME", "STATUS", "TARGET"]),  # essentials stay, even too wide
    ],
)
def test_columns_give_way_by_priority(width: int, expected: list[str]) -> None:
    from dmrepl.cli.render import Col, fit, shorten

    columns = [
        Col("ID", "id"),
        Col("NAME", "id"),
        Col("TYPE", "id", 1),
        Col("DATAMART", "id", 2),
        Col("STATUS", "id"),
        Col("TARGET", "text"),
        Col("LAST CHECK", "id", 3),
    ]
    natural = [12, 19, 16, 8, 19, 90, 27]
    widths = fit(columns, natural, width)
    assert [columns[i].name for i in widths] == expected
    assert all(widths[i] == natural[i] for i in widths if columns[i].kind == "id")
    assert sum(widths.values()) + 2 * (len(widths) - 1) <= max(width, 76)
    short = shorten("/var/lib/dmrepl/a/b/c/ops.ndjson", 21)
    assert len(short) == 21 and short.startswith("/var/lib") and short.endswith("/ops.ndjson") and "…" in short

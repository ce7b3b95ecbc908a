"""Mutation testing of the modules that guard data and money: run mutmut once per scope, then report the scores.

    python tests/tools/mutation_report.py run    [--scope NAME]... [--tree DIR | --ref REF [--overlay PATH]...]
                                                 [--keep | --retest]
    python tests/tools/mutation_report.py report [--scope NAME]... [--diffs] [--fail-under PCT]

`make mutation` runs both (README, "Development"). The scopes live in pyproject.toml ([tool.dmrepl.mutation.scopes]):
each names the modules to mutate and the tests that guard them. mutmut 3 takes one test selection per run, so each
scope gets its own run, in its own copy of the tree (`.mutation/<scope>/`): a mutant of `dmrepl/secrets.py` is then
only ever run against the secrets scope's tests, and mutmut narrows those, per mutant, to the tests that called the
mutated function. Copies also mean that mutating never writes into `dmrepl/`, and that a tree other engineers are
editing can be measured as a commit (`--ref HEAD`) instead, with the work tree's version of some files laid over it
(`--overlay tests/test_live_engine.py`: new tests measured against the committed product code).

Mutants are named by mutmut (`dmrepl.registry.x_load__mutmut_3`: module, function, rank of the mutation inside the
function), never by line: lines are only looked up for display. An equivalent mutant (one no test can kill because
the program behaves the same) is listed in tests/mutation-equivalent.txt as `ID FINGERPRINT REASON`; the fingerprint
hashes the mutation itself, so an entry whose function was since edited (and whose rank may now name another
mutation) stops matching and is reported as stale instead of silently excusing a different mutant.

The module is also a pytest plugin that mutmut loads (`-p tests.tools.mutation_report`): it runs each mutant's
tests quickest first (`pytest_collection_modifyitems`) and fails a test that a mutant makes hang
(`pytest_runtest_protocol`).
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import difflib
import hashlib
import importlib.metadata
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import threading
import time
import tomllib
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import tomli_w

REPO = Path(__file__).resolve().parents[2]
DEFAULT_WORKDIR = REPO / ".mutation"
DEFAULT_EQUIVALENT = REPO / "tests" / "mutation-equivalent.txt"
# What a scope's copy of the tree needs: the package, its tests, and the project file (pytest's settings).
TREE_PATHS = ("dmrepl", "tests", "pyproject.toml")
COPY_IGNORE = shutil.ignore_patterns("__pycache__", "*.pyc", ".build", ".pytest_cache")

# mutmut's exit codes (mutmut.stats.status_by_exit_code in 3.x), kept here so that reading results needs no import
# of mutmut's internals. A mutant is detected when a test failed, timed out or crashed with it. Except 255: mutmut
# calls it a timeout, but it is what a worker exits with when pytest itself failed (a test id it could not find, a
# usage error), which says nothing of the mutant: it is an error here, shown with the survivors and retested.
STATUS_BY_EXIT_CODE: dict[int | None, str] = {
    None: "not checked",
    0: "survived",
    1: "killed",
    2: "interrupted",
    3: "killed",
    5: "no tests",
    33: "no tests",
    34: "skipped",
    35: "suspicious",
    36: "timeout",
    37: "caught by type check",
    -24: "timeout",
    24: "timeout",
    152: "timeout",
    255: "error",
    -11: "segfault",
    -9: "segfault",
}
DETECTED = {"killed", "timeout", "segfault", "caught by type check"}
UNDETECTED = {"survived", "no tests", "suspicious"}
RETEST = UNDETECTED | {"not checked", "interrupted", "error"}


# --------------------------------------------------------------------------------------------------------------
# Settings


@dataclass(frozen=True)
class Scope:
    """Modules mutated together and the pytest arguments (files, node ids, `-k`) of the tests that guard them."""

    name: str
    modules: tuple[str, ...]
    tests: tuple[str, ...]


def load_pyproject(path: Path) -> dict[str, Any]:
    with path.open("rb") as f:
        return tomllib.load(f)


def load_scopes(pyproject: dict[str, Any]) -> dict[str, Scope]:
    table = pyproject.get("tool", {}).get("dmrepl", {}).get("mutation", {}).get("scopes", {})
    if not table:
        raise SystemExit("pyproject.toml has no [tool.dmrepl.mutation.scopes.*] table")
    return {
        name: Scope(name=name, modules=tuple(spec["modules"]), tests=tuple(spec["tests"]))
        for name, spec in table.items()
    }


def select_scopes(scopes: dict[str, Scope], names: list[str] | None) -> list[Scope]:
    if not names:
        return list(scopes.values())
    unknown = [n for n in names if n not in scopes]
    if unknown:
        raise SystemExit(f"unknown scope(s) {', '.join(unknown)}; scopes: {', '.join(scopes)}")
    return [scopes[n] for n in names]


# --------------------------------------------------------------------------------------------------------------
# Running


def _git(*args: str, cwd: Path = REPO) -> str | None:
    """Read-only git queries (rev-parse, status, archive): the harness never changes a repository's state."""
    try:
        result = subprocess.run(["git", *args], cwd=cwd, capture_output=True, check=False)
    except OSError:
        return None
    return result.stdout.decode() if result.returncode == 0 else None


def describe_tree(tree: Path) -> str:
    """What was measured, for the report: a commit, and whether the work tree differed from it."""
    head = _git("rev-parse", "--short", "HEAD", cwd=tree)
    if head is None:
        return f"{tree} (not a git work tree)"
    dirty = _git("status", "--porcelain", "--", *TREE_PATHS, cwd=tree)
    return f"{head.strip()} (work tree{', with uncommitted changes' if dirty else ''})"


def export_ref(ref: str, into: Path) -> str:
    """`git archive REF` of the tree's paths into `into`: measures a commit while the work tree is mid-edit."""
    sha = _git("rev-parse", "--verify", f"{ref}^{{commit}}")
    if sha is None:
        raise SystemExit(f"{ref}: not a commit of {REPO}")
    archive = subprocess.run(["git", "archive", sha.strip(), *TREE_PATHS], cwd=REPO, capture_output=True, check=True)
    shutil.rmtree(into, ignore_errors=True)
    into.mkdir(parents=True)
    with tarfile.open(fileobj=io.BytesIO(archive.stdout)) as tar:
        tar.extractall(into, filter="data")
    return f"{sha.strip()[:7]} ({ref}, exported with git archive)"


def overlay(paths: Iterable[str], tree: Path) -> None:
    """The work tree's version of a few files over an exported commit: tests written since, measured against the
    committed product code while others are mid-edit in `dmrepl/`."""
    for path in paths:
        source = REPO / path
        if not source.is_file():
            raise SystemExit(f"--overlay {path}: not a file of {REPO}")
        (tree / path).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, tree / path)


def present_tests(tree: Path, tests: Iterable[str]) -> list[str]:
    """The scope's pytest arguments minus test files the measured tree does not have (an older commit, say, without
    tests/test_mutation_kills.py): pytest would refuse the whole run for one missing file."""
    kept: list[str] = []
    for arg in tests:
        path = arg.partition("::")[0]
        if path.endswith(".py") and not (tree / path).exists():
            print(f"not in the measured tree, left out: {arg}", file=sys.stderr)
            continue
        kept.append(arg)
    return kept


def scope_pyproject(
    tree_pyproject: dict[str, Any], harness: dict[str, Any], scope: Scope, tree: Path
) -> dict[str, Any]:
    """The measured tree's project file (its pytest settings) with the harness's mutmut settings for this scope."""
    data = json.loads(json.dumps(tree_pyproject))  # a deep copy of plain TOML data
    mutmut = dict(harness.get("tool", {}).get("mutmut", {}))
    mutmut["only_mutate"] = list(scope.modules)
    mutmut["pytest_add_cli_args_test_selection"] = present_tests(tree, scope.tests)
    data.setdefault("tool", {})["mutmut"] = mutmut
    return data


def copy_tree(tree: Path, dest: Path) -> None:
    """Copies keep modification times, so that a kept scope (`--keep`) regenerates only the files that changed."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in ("dmrepl", "tests"):
        shutil.copytree(tree / name, dest / name, ignore=COPY_IGNORE, dirs_exist_ok=True, copy_function=shutil.copy2)
    # the pytest plugin that mutmut loads is the harness's own, whatever the measured tree holds (an older commit
    # may have none)
    (dest / "tests" / "tools").mkdir(parents=True, exist_ok=True)
    shutil.copy2(Path(__file__), dest / "tests" / "tools" / Path(__file__).name)


def mutmut_executable() -> str:
    """The `mutmut` script of this interpreter's environment (mutmut warns against `python -m mutmut run`)."""
    candidate = Path(sys.executable).parent / "mutmut"
    if candidate.exists():
        return str(candidate)
    found = shutil.which("mutmut")
    if found is None:
        raise SystemExit("mutmut is not installed in this environment: run `make mutation`, which installs it")
    return found


def read_results(workdir: Path, scope: Scope) -> dict[str, dict[str, int | None]]:
    """Exit code by mutant id, per module, from mutmut's `.meta` files; a module not (yet) run is left out."""
    results: dict[str, dict[str, int | None]] = {}
    for module in scope.modules:
        meta = workdir / "mutants" / f"{module}.meta"
        if meta.exists():
            results[module] = json.loads(meta.read_text("utf-8"))["exit_code_by_key"]
    return results


def run_scope(scope: Scope, tree: Path, label: str, args: argparse.Namespace, harness: dict[str, Any]) -> int:
    workdir: Path = args.workdir / scope.name
    missing = [m for m in scope.modules if not (tree / m).exists()]
    if missing:
        print(f"{scope.name}: not in the measured tree, skipped: {', '.join(missing)}", file=sys.stderr)
    if len(missing) == len(scope.modules):
        return 1
    retest: list[str] = []
    if args.retest:
        retest = [
            mutant
            for codes in read_results(workdir, scope).values()
            for mutant, code in codes.items()
            if STATUS_BY_EXIT_CODE.get(code, "suspicious") in RETEST
        ]
        if not retest:
            print(f"{scope.name}: nothing to retest")
            return 0
    elif not args.keep:
        shutil.rmtree(workdir, ignore_errors=True)
    copy_tree(tree, workdir)
    if not (retest and (workdir / "pyproject.toml").exists()):
        # a retest keeps the settings of the run that found the survivors: mutmut discards every result when its
        # test settings change, and a retest is only meant to try the survivors against new tests
        (workdir / "pyproject.toml").write_text(
            tomli_w.dumps(scope_pyproject(load_pyproject(tree / "pyproject.toml"), harness, scope, tree)), "utf-8"
        )
    command = [mutmut_executable(), "run", "--max-children", str(args.workers), *retest]
    log = workdir / "mutmut.log"
    mode = "retest" if retest else "keep" if args.keep else "fresh"
    print(f"{scope.name}: mutmut run ({mode}) of {', '.join(scope.modules)} against {' '.join(scope.tests)}")
    print(f"{scope.name}: log in {log}", flush=True)
    started, load_before = time.monotonic(), os.getloadavg()[0]
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    with log.open("w", encoding="utf-8") as out:
        code = subprocess.run(command, cwd=workdir, stdout=out, stderr=subprocess.STDOUT, env=env, check=False)
    seconds = round(time.monotonic() - started, 1)
    record = {
        "scope": scope.name,
        "measured": label,
        "mode": mode,
        "seconds": seconds,
        "finished": datetime.now(UTC).isoformat(timespec="seconds"),
        "mutmut": importlib.metadata.version("mutmut"),
        "workers": args.workers,
        "exit_code": code.returncode,
        # the machine may be shared: its load says how much of the time was this run's
        "load_average": [round(load_before, 1), round(os.getloadavg()[0], 1)],
    }
    if retest:  # the run that found the survivors stays the record; retests are listed under it
        try:
            first = json.loads((workdir / "run.json").read_text("utf-8"))
        except (OSError, ValueError):
            first = {}
        record = first | {"retests": [*first.get("retests", []), record | {"mutants": len(retest)}]}
    (workdir / "run.json").write_text(json.dumps(record, indent=2) + "\n", "utf-8")
    print(f"{scope.name}: {'done' if code.returncode == 0 else f'FAILED (exit {code.returncode})'} in {seconds:.0f} s")
    if code.returncode != 0:
        print("".join(log.read_text("utf-8", errors="replace").splitlines(keepends=True)[-30:]), file=sys.stderr)
    return code.returncode


def command_run(args: argparse.Namespace) -> int:
    harness = load_pyproject(REPO / "pyproject.toml")
    scopes = select_scopes(load_scopes(harness), args.scope)
    if args.overlay and not args.ref:
        raise SystemExit("--overlay goes with --ref: the work tree already has its own files")
    args.workdir.mkdir(parents=True, exist_ok=True)
    if args.ref:
        tree = args.workdir / "_source"
        label = export_ref(args.ref, tree)
        if args.overlay:
            overlay(args.overlay, tree)
            label += f" + the work tree's {', '.join(args.overlay)}"
    else:
        tree = args.tree.resolve()
        label = describe_tree(tree)
    label = args.label or label
    print(f"measuring {label}")
    failures = [scope.name for scope in scopes if run_scope(scope, tree, label, args, harness) != 0]
    if failures:
        print(f"mutmut failed for: {', '.join(failures)} (see their mutmut.log)", file=sys.stderr)
        return 1
    return 0


# --------------------------------------------------------------------------------------------------------------
# Reading mutants back


@dataclass
class Mutant:
    """One mutant as the report shows it: where (module:line, for display only), what changed, and its verdict."""

    id: str
    module: str
    status: str
    line: int | None = None
    removed: list[str] = field(default_factory=list)
    added: list[str] = field(default_factory=list)

    @property
    def function(self) -> str:
        return self.id.partition("__mutmut_")[0]

    @property
    def mutation(self) -> str:
        old = " / ".join(s.strip() for s in self.removed) or "(nothing)"
        new = " / ".join(s.strip() for s in self.added) or "(removed)"
        return f"{old}  ->  {new}"

    @property
    def fingerprint(self) -> str:
        """The mutation itself (function and changed text), not its rank or line: edits elsewhere leave it alone."""
        return hashlib.sha256(f"{self.function}\n{self.mutation}".encode()).hexdigest()[:8]


def _spans(workdir: Path, module: str) -> dict[str, list[int]]:
    path = workdir / "mutants" / f"{module}.spans"
    try:
        return json.loads(path.read_text("utf-8"))["spans"]
    except (OSError, ValueError, KeyError):
        return {}


def _function_name(generated_name: str) -> tuple[str | None, str]:
    """(class, function) of a generated name: `x_load__mutmut_3` or `xǁRegistryǁload__mutmut_3`."""
    name = generated_name.partition("__mutmut_")[0]
    if name.startswith("x_"):
        return None, name[2:]
    _, cls, func = name.split("ǁ")
    return cls, func


def _from_def(lines: list[str], generated_name: str, function_name: str) -> list[str]:
    """A generated function's lines from its `def` on (a span starts with blank lines), under its real name, so
    that the unmutated copy and a mutant differ only by the mutation."""
    marker = f"def {generated_name}("
    start = next((i for i, line in enumerate(lines) if marker in line), 0)
    return [line.replace(marker, f"def {function_name}(") for line in lines[start:]]


def _function_def_line(source: str, generated_name: str) -> int | None:
    """The `def` line of the function a mutant was made from, in the measured source (top level, or in a class)."""
    cls, func = _function_name(generated_name)
    tree = ast.parse(source)
    body: Iterable[ast.stmt] = tree.body
    if cls is not None:
        owner = next((n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == cls), None)
        if owner is None:
            return None
        body = owner.body
    for node in body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.name == func:
            return node.lineno
    return None


def describe_mutants(workdir: Path, module: str, codes: dict[str, int | None]) -> list[Mutant]:
    """Each mutant's diff against the unmutated copy mutmut keeps beside it, placed on the measured source's line."""
    mutated_path = workdir / "mutants" / module
    mutated = mutated_path.read_text("utf-8").splitlines() if mutated_path.exists() else []
    source_path = workdir / module
    source = source_path.read_text("utf-8") if source_path.exists() else ""
    source_lines = source.splitlines()
    spans = _spans(workdir, module)
    mutants: list[Mutant] = []
    for mutant_id, code in codes.items():
        mutant = Mutant(id=mutant_id, module=module, status=STATUS_BY_EXIT_CODE.get(code, "suspicious"))
        generated = mutant_id.rpartition(".")[2]
        original = generated.partition("__mutmut_")[0] + "__mutmut_orig"
        function_name = _function_name(generated)[1]
        if generated in spans and original in spans:
            (o1, o2), (m1, m2) = spans[original], spans[generated]
            orig_body = _from_def(mutated[o1 - 1 : o2], original, function_name)
            mut_body = _from_def(mutated[m1 - 1 : m2], generated, function_name)
            matcher = difflib.SequenceMatcher(a=orig_body, b=mut_body, autojunk=False)
            first: int | None = None
            for tag, i1, i2, j1, j2 in matcher.get_opcodes():
                if tag == "equal":
                    continue
                mutant.removed += orig_body[i1:i2]
                mutant.added += mut_body[j1:j2]
                first = i1 if first is None else first
            def_line = _function_def_line(source, generated) if source else None
            if def_line is not None and first is not None and first < len(orig_body):
                mutant.line = def_line + first
                wanted = orig_body[first].strip()
                got = source_lines[mutant.line - 1].strip() if mutant.line <= len(source_lines) else ""
                if got != wanted:  # the copy is formatted differently from the source: find the text instead
                    hits = [i for i in range(def_line - 1, len(source_lines)) if source_lines[i].strip() == wanted]
                    mutant.line = hits[0] + 1 if hits else None
        mutants.append(mutant)
    return mutants


# --------------------------------------------------------------------------------------------------------------
# Equivalent mutants


@dataclass(frozen=True)
class Equivalent:
    id: str
    fingerprint: str
    reason: str
    line: int


def load_equivalents(path: Path) -> dict[str, Equivalent]:
    """`ID FINGERPRINT REASON` per line; `#` starts a comment line. A malformed line is an error, not a skip."""
    entries: dict[str, Equivalent] = {}
    if not path.exists():
        return entries
    for number, raw in enumerate(path.read_text("utf-8").splitlines(), start=1):
        text = raw.strip()
        if not text or text.startswith("#"):
            continue
        parts = text.split(maxsplit=2)
        if len(parts) < 3 or "__mutmut_" not in parts[0] or len(parts[1]) != 8:
            raise SystemExit(f"{path}:{number}: expected `MUTANT_ID FINGERPRINT REASON`, got {raw!r}")
        entries[parts[0]] = Equivalent(id=parts[0], fingerprint=parts[1], reason=parts[2], line=number)
    return entries


# --------------------------------------------------------------------------------------------------------------
# Report


@dataclass
class ModuleScore:
    scope: str
    module: str
    mutants: list[Mutant]
    equivalent: list[tuple[Mutant, Equivalent]]
    stale: list[tuple[Mutant, Equivalent]]

    @property
    def counted(self) -> list[Mutant]:
        excluded = {m.id for m, _ in self.equivalent}
        return [m for m in self.mutants if m.id not in excluded and m.status != "skipped"]

    @property
    def killed(self) -> int:
        return sum(m.status in DETECTED for m in self.counted)

    @property
    def survivors(self) -> list[Mutant]:
        return [m for m in self.counted if m.status not in DETECTED]

    @property
    def score(self) -> float:
        return 100.0 * self.killed / len(self.counted) if self.counted else 100.0


def score_module(scope: str, module: str, mutants: list[Mutant], equivalents: dict[str, Equivalent]) -> ModuleScore:
    result = ModuleScore(scope=scope, module=module, mutants=mutants, equivalent=[], stale=[])
    for mutant in mutants:
        entry = equivalents.get(mutant.id)
        if entry is None:
            continue
        if entry.fingerprint != mutant.fingerprint or mutant.status in DETECTED:
            result.stale.append((mutant, entry))  # another mutation now, or a test kills it: not equivalent
        else:
            result.equivalent.append((mutant, entry))
    return result


def _where(m: Mutant) -> str:
    return f"{m.module}:{m.line if m.line is not None else '?'}"


def print_report(scores: list[ModuleScore], runs: dict[str, dict[str, Any]], unused: list[Equivalent]) -> None:
    out = sys.stdout
    print("Mutation score per module (killed / total, equivalent mutants excluded)\n", file=out)
    header = f"{'scope':<17}{'module':<30}{'killed':>7} /{'total':>6}{'score':>9}{'equiv':>7}{'left':>6}"
    print(header, file=out)
    print("-" * len(header), file=out)
    for s in scores:
        left = len(s.survivors)
        print(
            f"{s.scope:<17}{s.module:<30}{s.killed:>7} /{len(s.counted):>6}{s.score:>8.1f}%"
            f"{len(s.equivalent):>7}{left:>6}",
            file=out,
        )
    print(file=out)
    for name, run in runs.items():
        print(
            f"{name}: measured {run.get('measured')}; {run.get('mode')} run of {run.get('seconds')} s with "
            f"{run.get('workers')} worker(s), mutmut {run.get('mutmut')}, finished {run.get('finished')}, "
            f"load average {run.get('load_average')}"
            + ("" if run.get("exit_code") == 0 else f"; mutmut FAILED (exit {run.get('exit_code')})"),
            file=out,
        )
        for again in run.get("retests", []):
            print(
                f"{name}: then retested {again.get('mutants')} survivors of it ({again.get('measured')}) in "
                f"{again.get('seconds')} s, finished {again.get('finished')}, load average {again.get('load_average')}"
                + ("" if again.get("exit_code") == 0 else f"; mutmut FAILED (exit {again.get('exit_code')})"),
                file=out,
            )
    survivors = [m for s in scores for m in s.survivors]
    if survivors:
        print(
            f"\nSurvivors ({len(survivors)}): kill each with a test, or list it in tests/mutation-equivalent.txt",
            file=out,
        )
        print("as `ID FINGERPRINT REASON` if no test can kill it (the program behaves the same).", file=out)
        for m in survivors:
            print(f"\n  {_where(m)}  [{m.status}]\n    {m.id} {m.fingerprint}\n    {m.mutation}", file=out)
    equivalent = [(m, e) for s in scores for m, e in s.equivalent]
    if equivalent:
        print(f"\nEquivalent, excluded from the score ({len(equivalent)}):", file=out)
        for m, e in equivalent:
            print(f"  {_where(m)}  {m.id}: {e.reason}\n    {m.mutation}", file=out)
    stale = [(m, e) for s in scores for m, e in s.stale]
    if stale:
        print(
            f"\nStale entries of tests/mutation-equivalent.txt, counted as ordinary mutants ({len(stale)}):", file=out
        )
        for m, e in stale:
            why = "a test now kills it" if m.status in DETECTED else f"the mutation is now {m.fingerprint}"
            print(f"  line {e.line}: {e.id} {e.fingerprint}: {why}\n    {m.mutation}", file=out)
    if unused:
        print(f"\nEntries of tests/mutation-equivalent.txt naming no mutant of these runs ({len(unused)}):", file=out)
        for e in unused:
            print(f"  line {e.line}: {e.id}", file=out)


def command_report(args: argparse.Namespace) -> int:
    scopes = select_scopes(load_scopes(load_pyproject(REPO / "pyproject.toml")), args.scope)
    equivalents = load_equivalents(args.equivalent)
    scores: list[ModuleScore] = []
    runs: dict[str, dict[str, Any]] = {}
    seen: set[str] = set()
    for scope in scopes:
        workdir = args.workdir / scope.name
        results = read_results(workdir, scope)
        if not results:
            if args.scope:
                print(f"{scope.name}: no results in {workdir} (run it first)", file=sys.stderr)
            continue
        with contextlib.suppress(OSError, ValueError):
            runs[scope.name] = json.loads((workdir / "run.json").read_text("utf-8"))
        for module, codes in results.items():
            mutants = describe_mutants(workdir, module, codes)
            seen.update(m.id for m in mutants)
            scores.append(score_module(scope.name, module, mutants, equivalents))
    if not scores:
        print(f"no mutation results under {args.workdir}: run `make mutation` first", file=sys.stderr)
        return 1
    measured_modules = {s.module.removesuffix(".py").replace("/", ".") for s in scores}
    unused = [e for e in equivalents.values() if e.id not in seen and e.id.partition(".x")[0] in measured_modules]
    print_report(scores, runs, unused)
    if args.diffs:
        print_diffs(scores)
    below = [s for s in scores if s.score < args.fail_under]
    if below:
        print(f"\nbelow {args.fail_under:g} %: {', '.join(s.module for s in below)}", file=sys.stderr)
        return 2
    return 0


def print_diffs(scores: list[ModuleScore]) -> None:
    """Where to look next: mutmut's own diff of each survivor (`mutmut show ID`, run in the scope's directory)."""
    for s in scores:
        for m in s.survivors:
            print(f"\n# cd .mutation/{s.scope} && mutmut show '{m.id}'")


# --------------------------------------------------------------------------------------------------------------
# pytest plugin: mutmut loads this module with `-p tests.tools.mutation_report` (pyproject.toml, [tool.mutmut])


#: A test past this multiple of its unmutated duration, plus the margin, is failed: the mutant made it hang.
HANG_FACTOR = 10.0
HANG_MARGIN_S = 5.0
#: Exit code of a mutant's process still running this long after its test was failed ("timeout" to mutmut).
HANG_EXIT_AFTER_S = 30.0
_durations: dict[str, float] = {}


class MutantHung(BaseException):
    """Raised in a test that ran far past its unmutated duration; a BaseException, as KeyboardInterrupt is, so that
    the `except Exception` of the code under test lets it through (pytest records it as the test's failure)."""


def pytest_collection_modifyitems(items: list[Any]) -> None:
    """Run the quickest tests first. mutmut stops a mutant's run at its first failing test (`-x`) and hands the tests
    over in no particular order, so a mutant that a 10 ms test kills could wait behind a 9 s one; survivors run every
    test either way. The durations are mutmut's, of the unmutated run (mutmut runs pytest in `mutants/`); before they
    exist (that very run) the order is left alone."""
    try:
        durations: dict[str, float] = json.loads(Path("mutmut-stats.json").read_text("utf-8"))["duration_by_test"]
    except (OSError, ValueError, KeyError):
        return
    _durations.update(durations)
    items.sort(key=lambda item: durations.get(item.nodeid, 0.0))


def hang_limit(nodeid: str) -> float | None:
    """Seconds a test may run with a mutant in place; None outside a mutant's run or for a test never timed.

    mutmut's own limit counts CPU time, and a mutant that breaks a polling loop's exit (a deadline never reached, an
    event never set) makes its test sleep, not spin: it would run until the test's own deadline, minutes later. Such a
    mutant is detected all the same (the program no longer finishes), so the test fails once it has run
    `HANG_FACTOR` times its unmutated duration plus `HANG_MARGIN_S`."""
    if "__mutmut_" not in os.environ.get("MUTANT_UNDER_TEST", ""):
        return None
    duration = _durations.get(nodeid)
    return None if duration is None else HANG_FACTOR * duration + HANG_MARGIN_S


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item: Any, nextitem: Any) -> Any:
    """Arm `hang_limit` for the test: SIGALRM raises `MutantHung` in it, then again every second (code that swallowed
    it hears it again); a process that still has not ended `HANG_EXIT_AFTER_S` later exits as a timeout."""
    limit = hang_limit(item.nodeid)
    if limit is None or threading.current_thread() is not threading.main_thread():
        return (yield)

    def expire(signum: int, frame: Any) -> None:
        unmutated = _durations[item.nodeid]
        raise MutantHung(f"{item.nodeid} still running after {limit:.0f} s (unmutated: {unmutated:.1f} s)")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, limit, 1.0)
    backstop = threading.Timer(limit + HANG_EXIT_AFTER_S, os._exit, args=(36,))
    backstop.daemon = True
    backstop.start()
    try:
        return (yield)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        backstop.cancel()


# --------------------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("run", "report"):
        p = sub.add_parser(name)
        p.add_argument("--scope", action="append", help="a scope of [tool.dmrepl.mutation.scopes] (default: all)")
        p.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR, help="where the scopes' copies live")
    run = sub.choices["run"]
    source = run.add_mutually_exclusive_group()
    source.add_argument("--tree", type=Path, default=REPO, help="the tree to measure (default: this work tree)")
    source.add_argument("--ref", help="measure this commit instead (git archive), e.g. HEAD while the tree is mid-edit")
    run.add_argument(
        "--overlay",
        action="append",
        default=[],
        metavar="PATH",
        help="with --ref: this work-tree file replaces the commit's (repeatable), e.g. new tests",
    )
    run.add_argument("--label", help="how the report names what was measured (default: the commit)")
    run.add_argument("--workers", type=int, default=1, help="mutmut's --max-children (default 1)")
    again = run.add_mutually_exclusive_group()
    again.add_argument("--keep", action="store_true", help="reuse the scope's previous results for unchanged functions")
    again.add_argument(
        "--retest",
        action="store_true",
        help="rerun the previous run's survivors and the mutants it did not get to (after new tests)",
    )
    report = sub.choices["report"]
    report.add_argument("--equivalent", type=Path, default=DEFAULT_EQUIVALENT, help="the equivalent mutants' list")
    report.add_argument("--diffs", action="store_true", help="also print the command showing each survivor's diff")
    report.add_argument("--fail-under", type=float, default=0.0, help="exit 2 if a module scores below this %%")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return command_run(args) if args.command == "run" else command_report(args)


if __name__ == "__main__":
    raise SystemExit(main())

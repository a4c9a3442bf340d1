"""Docs are kept true by tests: the CLI reference, the command table, the exit codes."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import typer

from lanectl.cli.main import app
from lanectl.errors import ExitCode

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"


def command_paths(group: typer.Typer, prefix: tuple[str, ...] = ()) -> list[str]:
    out = [" ".join((*prefix, c.name or c.callback.__name__)) for c in group.registered_commands]
    for sub in group.registered_groups:
        out += command_paths(sub.typer_instance, (*prefix, sub.name))
    return out


def test_cli_reference_is_current(tmp_path: Path) -> None:
    out = tmp_path / "cli.md"
    subprocess.run([sys.executable, "-m", "typer", "lanectl.cli.main", "utils", "docs", "--name", "lanectl",
                    "--title", "lanectl CLI reference", "--output", str(out)], check=True, cwd=ROOT,
                   capture_output=True, env={"PATH": "/usr/bin:/bin", "COLUMNS": "120"})
    assert out.read_text() == (DOCS / "cli.md").read_text(), "docs/cli.md is stale: run scripts/gen-docs"


def test_every_command_is_in_the_operator_guide() -> None:
    guide = (DOCS / "operations.md").read_text()
    missing = [c for c in command_paths(app) if f"`lanectl {c}" not in guide]
    assert not missing, f"add these commands to docs/operations.md: {missing}"


def test_every_command_has_help() -> None:
    for c in app.registered_commands:
        assert (c.callback.__doc__ or "").strip(), c.name


def test_exit_code_table_matches_the_code() -> None:
    rows = re.findall(r"^\| (\d+) \| ([A-Z_]+) \|", (DOCS / "exit-codes.md").read_text(), re.M)
    assert {(int(n), name) for n, name in rows} == {(int(c), c.name) for c in ExitCode}


def test_exit_codes_by_command_list_every_command() -> None:
    """docs/exit-codes.md has one row per command, and every code in it is one of ExitCode's."""
    text = (DOCS / "exit-codes.md").read_text()
    block = text.split("<!-- exit-codes-by-command -->")[1].split("<!-- /exit-codes-by-command -->")[0]
    rows = dict(re.findall(r"^\| `([a-z ]+)` \| (.+) \|$", block, re.M))
    assert sorted(rows) == sorted(command_paths(app)), "docs/exit-codes.md: one row per command"
    for cmd, codes in rows.items():
        numbers = {int(n) for n in re.findall(r"(?<![\w-])(\d)(?![\w.])", re.sub(r"`[^`]*`", "", codes))}
        assert numbers and numbers <= {int(c) for c in ExitCode}, (cmd, codes)


def test_envelope_keys_documented() -> None:
    text = (DOCS / "exit-codes.md").read_text()
    for key in ("lanectl_json", "command", "status", "exit_code", "data", "errors", "hint", "field", "severity"):
        assert f"{key}" in text


def test_gate_map_names_real_tests() -> None:
    """docs/gates.md maps every acceptance gate to tests; each named test must exist."""
    import ast

    text = (DOCS / "gates.md").read_text()
    refs = re.findall(r"`(tests/[\w/]+\.py)::(\w+)`", text)
    assert len(refs) >= 30
    for gate in ("B1", "B2", "B3", "B4", "B5", "B6"):
        assert f"## {gate} " in text
    missing = []
    for path, name in refs:
        tree = ast.parse((ROOT / path).read_text())
        names = {n.name for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
        names |= {t.id for n in ast.walk(tree) if isinstance(n, ast.Assign) for t in n.targets
                  if isinstance(t, ast.Name)}
        if name not in names:
            missing.append(f"{path}::{name}")
    assert not missing, f"docs/gates.md names tests that do not exist: {missing}"


def _codes(cell: str) -> set[int]:
    """The exit codes a table cell lists: numbers and ranges (0-3), not inside `code spans` or words."""
    cell = re.sub(r"`[^`]*`", "", cell)
    out: set[int] = set()
    for a, b in re.findall(r"(?<![\w.-])(\d)(?:-(\d))?(?![\w.])", cell):
        out |= set(range(int(a), int(b or a) + 1))
    return out


def test_the_operator_guide_lists_the_same_exit_codes_as_exit_codes_md() -> None:
    """docs/exit-codes.md is the source; each command row of docs/operations.md's tables must list the same codes
    (1 and 2 aside, which every command may exit; probe's 0-3 are the monitoring-plugins codes and compared whole).
    Found by an attack (issue 15 follow-up F11): eight commands disagreed."""
    text = (DOCS / "exit-codes.md").read_text()
    block = text.split("<!-- exit-codes-by-command -->")[1].split("<!-- /exit-codes-by-command -->")[0]
    source = {cmd: _codes(codes) for cmd, codes in re.findall(r"^\| `([a-z ]+)` \| (.+) \|$", block, re.M)}
    known = sorted(source, key=len, reverse=True)
    checked, wrong = set(), []
    for line in (DOCS / "operations.md").read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split(" | ")]
        if len(cells) != 3 or not cells[0].startswith("`lanectl "):
            continue
        for usage in re.findall(r"`lanectl ([^`]+)`", cells[0]):
            cmd = next(c for c in known if usage == c or usage.startswith(c + " "))
            ignore = set() if cmd == "probe" else {1, 2}
            got, want = _codes(cells[2]) - ignore, source[cmd] - ignore
            if got != want:
                wrong.append(f"{cmd}: operations.md {sorted(got)}, exit-codes.md {sorted(want)}")
            checked.add(cmd)
    assert not wrong, "docs/operations.md disagrees with docs/exit-codes.md (the source):\n" + "\n".join(wrong)
    assert len(checked) >= 30, sorted(checked)


def test_the_operator_guide_says_which_commands_take_json() -> None:
    """operations.md said every command takes --json; top and logs do not (a screen; journalctl's own output)."""
    import typer.main

    def walk(c, prefix=()):  # type: ignore[no-untyped-def]
        if hasattr(c, "commands"):
            for n, sub in c.commands.items():
                yield from walk(sub, (*prefix, n))
        elif "--json" not in {o for p in c.params for o in getattr(p, "opts", [])}:
            yield " ".join(prefix)

    without = sorted(walk(typer.main.get_command(app)))
    guide = (DOCS / "operations.md").read_text()
    m = re.search(r"Every command but ([^.]+?) takes `--json`", guide)
    assert m, "docs/operations.md: say which commands do not take --json"
    assert sorted(re.findall(r"`([a-z ]+)` \(", m.group(1))) == without, (m.group(1), without)


def test_the_module_map_matches_the_tree() -> None:
    """docs/modules.md names every module of the package once, and nothing that is not there."""
    text = (DOCS / "modules.md").read_text()
    listed = re.findall(r"^\| `(lanectl/[\w/]+\.py)` \|", text, flags=re.M)
    tree = sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "lanectl").rglob("*.py"))
    dupes = sorted({m for m in listed if listed.count(m) > 1})
    assert not dupes, f"docs/modules.md lists these twice: {dupes}"
    assert sorted(set(tree) - set(listed)) == [], "add these modules to docs/modules.md"
    assert sorted(set(listed) - set(tree)) == [], "docs/modules.md lists modules that are gone"

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

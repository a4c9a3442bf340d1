"""The CLI is thin (issue 11 item 5), checked on the source (ast) so that a change that thickens it fails here.

1. No CLI module reaches into the library's privates: ``lanectl/cli/`` imports no ``_name`` from a lanectl module
   outside ``lanectl/cli/`` (nor a ``_module``), and reads no ``_name`` attribute of one (``lifecycle._active(...)``,
   ``getattr(operate, "_active")``). What a command needs is a public, documented function of the library.
2. A command parses, calls one library function and renders: the body of a command (the functions typer runs;
   the ``human`` renderers nested in them are not counted) has no ``for`` or ``while`` loop. Orchestration
   (a lane after another, a wait until something is true) lives in the library, where it takes a progress
   callback (``lanectl.output.waiting``) instead of printing.
3. No CLI module runs or waits for anything itself: no ``subprocess``, no ``time.sleep``, no ``systemctl`` (the
   library's ``systemd.run``), no ``os.system``. (``lanectl logs`` replaces itself with journalctl by ``os.execv``:
   that is not run-and-wait.)
4. No CLI module writes an event (``record`` of ``lanectl.ledger.lanes`` or ``append`` of
   ``lanectl.ledger.events``): the library function that does a thing records it, so every caller records it alike.

Each checker takes the directory that holds the ``lanectl`` package; the tests at the end plant each violation in
a small package and show that the rule fails.
"""
from __future__ import annotations

import ast
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import write_package

ROOT = Path(__file__).resolve().parent.parent
RUNNERS = {("subprocess", None), ("time", "sleep"), ("systemd", "run"), ("os", "system")}
"""(module, function) pairs the CLI never calls (None: any function of the module, or importing it)."""
EVENT_WRITERS = {("lanectl.ledger.lanes", "record"), ("lanectl.ledger.events", "append")}


def cli_files(root: Path) -> Iterator[tuple[str, ast.Module]]:
    for path in sorted((root / "lanectl" / "cli").rglob("*.py")):
        yield path.relative_to(root).as_posix(), ast.parse(path.read_text(), str(path))


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _library(module: str) -> bool:
    return (module == "lanectl" or module.startswith("lanectl.")) and not (
        module == "lanectl.cli" or module.startswith("lanectl.cli."))


def bindings(tree: ast.Module) -> dict[str, str]:
    """Local name -> the dotted lanectl object it is bound to by an import (anywhere in the module, imports inside
    functions included): ``from lanectl.ledger import lanes as lane_ops`` binds lane_ops to
    ``lanectl.ledger.lanes``; ``import lanectl.lifecycle`` binds lanectl to ``lanectl``."""
    out: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.asname:
                    out[a.asname] = a.name
                else:
                    out[a.name.split(".")[0]] = a.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for a in node.names:
                out[a.asname or a.name] = f"{node.module}.{a.name}"
    return out


def _chain(node: ast.expr) -> list[str] | None:
    """``a.b.c`` -> ["a", "b", "c"]; None when the chain does not start at a name."""
    parts: list[str] = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return None
    return [node.id, *reversed(parts)]


def _resolve(chain: list[str], bound: dict[str, str]) -> str | None:
    """The dotted name an attribute chain stands for, when it starts at an imported name."""
    if chain[0] not in bound:
        return None
    return ".".join([bound[chain[0]], *chain[1:]])


def private_reaches(root: Path) -> list[str]:
    """Every place ``lanectl/cli/`` imports or reads a private name of the library, as ``file:line: what``."""
    out = []
    for rel, tree in cli_files(root):
        bound = {k: v for k, v in bindings(tree).items() if _library(v)}
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0 and _library(node.module):
                if any(_private(p) for p in node.module.split(".")):
                    out.append(f"{rel}:{node.lineno}: from {node.module} import")
                out += [f"{rel}:{node.lineno}: from {node.module} import {a.name}" for a in node.names
                        if _private(a.name)]
            elif isinstance(node, ast.Import):
                out += [f"{rel}:{node.lineno}: import {a.name}" for a in node.names
                        if _library(a.name) and any(_private(p) for p in a.name.split("."))]
            elif isinstance(node, ast.Attribute) and _private(node.attr):
                chain = _chain(node)
                target = _resolve(chain, bound) if chain else None
                if target is not None:
                    out.append(f"{rel}:{node.lineno}: {'.'.join(chain or [])} ({target})")
            elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in (
                    "getattr", "setattr", "hasattr") and len(node.args) >= 2 and isinstance(node.args[1], ast.Constant)
                    and isinstance(node.args[1].value, str) and _private(node.args[1].value)):
                chain = _chain(node.args[0])
                if chain and _resolve(chain, bound) is not None:
                    out.append(f"{rel}:{node.lineno}: {node.func.id}({'.'.join(chain)}, {node.args[1].value!r})")
    return out


def commands(tree: ast.Module) -> list[ast.FunctionDef]:
    """The functions typer runs: decorated with ``@command(...)`` or ``@X.command(...)``, or registered by
    ``X.command(...)(fn)``."""
    defs = {n.name: n for n in tree.body if isinstance(n, ast.FunctionDef)}
    chosen: dict[str, ast.FunctionDef] = {}

    def is_command(dec: ast.expr) -> bool:
        f = dec.func if isinstance(dec, ast.Call) else dec
        return (isinstance(f, ast.Name) and f.id == "command") or (isinstance(f, ast.Attribute) and f.attr == "command")

    for fn in defs.values():
        if any(is_command(d) for d in fn.decorator_list):
            chosen[fn.name] = fn
    for node in ast.walk(tree):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Call) and is_command(node.func)
                and node.args and isinstance(node.args[0], ast.Name) and node.args[0].id in defs):
            chosen[node.args[0].id] = defs[node.args[0].id]
    return list(chosen.values())


def _own_nodes(fn: ast.FunctionDef) -> Iterator[ast.AST]:
    """The nodes of a function's body, not descending into functions or lambdas defined in it (renderers)."""
    todo: list[ast.AST] = list(fn.body)
    while todo:
        node = todo.pop()
        yield node
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            continue
        todo.extend(ast.iter_child_nodes(node))


def command_loops(root: Path) -> list[str]:
    """Every ``for``/``while`` loop in the body of a CLI command, as ``file:line: command: loop``."""
    out = []
    for rel, tree in cli_files(root):
        for fn in commands(tree):
            out += [f"{rel}:{n.lineno}: {fn.name}: {type(n).__name__.lower()} loop" for n in _own_nodes(fn)
                    if isinstance(n, (ast.For, ast.AsyncFor, ast.While))]
    return out


def _called(tree: ast.Module, wanted: set[tuple[str, str | None]], bound: dict[str, str]) -> Iterator[tuple[int, str]]:
    """(line, dotted name) of each call or import of a (module, function) in ``wanted``; module names match their
    last part (``systemd`` is ``lanectl.systemd``, ``time`` the standard library's)."""

    def match(target: str) -> bool:
        parts = target.split(".")
        for mod, func in wanted:
            if func is None and (target == mod or target.startswith(mod + ".")):
                return True
            if func is not None and len(parts) >= 2 and parts[-1] == func and parts[-2] == mod.split(".")[-1] \
                    and ".".join(parts[:-1]).endswith(mod):
                return True
        return False

    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            chain = _chain(node.func)
            target = _resolve(chain, bound) if chain else None
            if target is not None and match(target):
                yield node.lineno, target
        elif isinstance(node, ast.Import):
            for a in node.names:
                if any(func is None and (a.name == mod or a.name.startswith(mod + ".")) for mod, func in wanted):
                    yield node.lineno, f"import {a.name}"
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for a in node.names:
                if match(f"{node.module}.{a.name}") or any(func is None and node.module == mod for mod, func in wanted):
                    yield node.lineno, f"from {node.module} import {a.name}"


def runs_and_waits(root: Path) -> list[str]:
    """Every ``subprocess``, ``time.sleep``, ``systemd.run`` or ``os.system`` in ``lanectl/cli/``."""
    return [f"{rel}:{line}: {what}" for rel, tree in cli_files(root)
            for line, what in _called(tree, RUNNERS, bindings(tree))]


def event_writes(root: Path) -> list[str]:
    """Every event the CLI writes itself (``lanes.record``, ``events.append``), as ``file:line: what``."""
    return [f"{rel}:{line}: {what}" for rel, tree in cli_files(root)
            for line, what in _called(tree, EVENT_WRITERS, bindings(tree))]


# ----------------------------------------------------------------------------------------------- the real tree
def test_the_cli_reaches_into_no_private_function_of_the_library() -> None:
    assert private_reaches(ROOT) == []


def test_no_command_body_loops() -> None:
    assert command_loops(ROOT) == []


def test_the_cli_runs_and_waits_for_nothing_itself() -> None:
    assert runs_and_waits(ROOT) == []


def test_the_cli_writes_no_event_itself() -> None:
    assert event_writes(ROOT) == []


def test_every_command_module_is_seen() -> None:
    """The checkers see the commands (a rule that checks nothing cannot fail)."""
    names = {fn.name for _, tree in cli_files(ROOT) for fn in commands(tree)}
    assert {"apply", "restart", "submit", "render", "drain", "undrain", "promote", "snapshot", "show",
            "probe"} <= names, names


# ------------------------------------------------------------------------------------- each rule can fail
def _package(tmp_path: Path, files: dict[str, str]) -> Path:
    return write_package(tmp_path, files, ("lanectl", "lanectl/cli"))


@pytest.mark.parametrize("code, found", [
    ("from lanectl import lifecycle\ndef f():\n    return lifecycle._active([])\n", "lifecycle._active"),
    ("from lanectl.lifecycle import _active\n", "import _active"),
    ("import lanectl.lifecycle\ndef f():\n    return lanectl.lifecycle._active([])\n", "lanectl.lifecycle._active"),
    ("from lanectl import lifecycle as op\nx = getattr(op, '_active')\n", "getattr(op, '_active')"),
    ("from lanectl._secret import thing\n", "from lanectl._secret import"),
    ("def f():\n    from lanectl.ledger import lanes\n    return lanes._row\n", "lanes._row"),
])
def test_a_private_reach_fails(tmp_path: Path, code: str, found: str) -> None:
    root = _package(tmp_path, {"lanectl/cli/control.py": code})
    hits = private_reaches(root)
    assert len(hits) == 1 and found in hits[0], hits


def test_privates_of_the_cli_itself_and_of_other_packages_are_not_reaches(tmp_path: Path) -> None:
    root = _package(tmp_path, {"lanectl/cli/control.py": "from lanectl.cli.fleet import _lanes\nimport typer\n"
                                                     "x = typer._internal\nfrom lanectl import __version__\n"
                                                     "def f(res):\n    return res._x\n"})
    assert private_reaches(root) == []


COMMAND = "from lanectl.output import command\n@command('apply')\ndef apply(json_out: bool = False) -> None:\n"


@pytest.mark.parametrize("body", [
    "    for n in [1, 2]:\n        print(n)\n",
    "    while True:\n        break\n",
    "    if json_out:\n        for n in []:\n            pass\n",
])
def test_a_loop_in_a_command_fails(tmp_path: Path, body: str) -> None:
    root = _package(tmp_path, {"lanectl/cli/control.py": COMMAND + body})
    assert len(command_loops(root)) == 1 and "apply" in command_loops(root)[0]


def test_a_loop_in_a_registered_command_fails_and_one_in_its_renderer_does_not(tmp_path: Path) -> None:
    code = ("def register(app):\n    app.command('drain')(drain)\n"
            "def drain(lane: str) -> None:\n    def human():\n        for x in []:\n            pass\n"
            "    items = [x for x in range(3)]\n    while items:\n        items.pop()\n")
    found = command_loops(_package(tmp_path, {"lanectl/cli/control.py": code}))
    assert len(found) == 1 and "drain: while loop" in found[0], found


@pytest.mark.parametrize("code", [
    "import subprocess\n",
    "from subprocess import run\n",
    "import time\ndef f():\n    time.sleep(1)\n",
    "from time import sleep\n",
    "from lanectl import systemd\ndef f():\n    systemd.run('restart', 'x')\n",
    "import os\ndef f():\n    os.system('systemctl restart x')\n",
])
def test_running_or_waiting_in_the_cli_fails(tmp_path: Path, code: str) -> None:
    assert len(runs_and_waits(_package(tmp_path, {"lanectl/cli/control.py": code}))) == 1


@pytest.mark.parametrize("code", [
    "from lanectl.ledger import lanes as lane_ops\ndef f(led):\n    lane_ops.record(led, 'apply', now=0)\n",
    "from lanectl.ledger.events import append\n",
    "from lanectl.ledger import events\ndef f(led):\n    events.append(led, 'x')\n",
])
def test_an_event_written_by_the_cli_fails(tmp_path: Path, code: str) -> None:
    assert len(event_writes(_package(tmp_path, {"lanectl/cli/control.py": code}))) == 1


def test_the_cli_before_this_change_fails_every_rule(tmp_path: Path) -> None:
    """The apply command as it was (ea1c48c..1f36df2): a loop over the changed lanes, lifecycle._active, systemctl
    in graceful_restart, the apply event recorded by the command."""
    shutil.copytree(ROOT / "lanectl", tmp_path / "lanectl")
    before = (
        "from lanectl import lifecycle, systemd\nfrom lanectl.ledger import lanes as lane_ops\n"
        "from lanectl.output import command\n"
        "@command('apply')\ndef apply(json_out: bool = False) -> None:\n"
        "    active = lifecycle._active(['a'])\n"
        "    for name in active:\n"
        "        lane_ops.record(None, 'apply', now=0)\n"
        "        systemd.run('restart', name)\n")
    (tmp_path / "lanectl" / "cli" / "old.py").write_text(before)
    assert [h.split(": ", 1)[0] for h in private_reaches(tmp_path)] == ["lanectl/cli/old.py:6"]
    assert [h.split(": ", 1)[0] for h in command_loops(tmp_path)] == ["lanectl/cli/old.py:7"]
    assert [h.split(": ", 1)[0] for h in event_writes(tmp_path)] == ["lanectl/cli/old.py:8"]
    assert [h.split(": ", 1)[0] for h in runs_and_waits(tmp_path)] == ["lanectl/cli/old.py:9"]

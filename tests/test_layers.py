"""The layering rules of lanectl, checked on the source (ast), so that a change that breaks one fails here.

1. Only ``lanectl/ledger/`` speaks SQL: no ``.execute(``, ``.executemany(``, ``.executescript(`` or
   ``sqlite3.connect`` call anywhere else, and no ``import sqlite3`` either (readers catch
   ``lanectl.ledger.Error``); docs/ledger.md names the API the rest of lanectl uses instead.
2. One writer per table where the ownership is settled: only ``lanectl/ledger/lanes.py`` writes the ``lanes``
   table (drain, undrain, reroute, weight, observed state and health, dispatch credit; the schema's migrations
   aside).
3. The lane runtime (``lanectl/runtime.py``) never imports the ledger or the supervisor, directly or through any
   lanectl module it imports (the whole import graph is followed, imports inside functions included).
4. The dispatch policy (``lanectl/dispatch.py``) imports nothing but the standard library and the vocabulary
   (``lanectl.states``: constants, no behaviour): it stays a pure function of its inputs.
5. The library never imports the CLI: no module under ``lanectl/`` outside ``lanectl/cli/`` and
   ``lanectl/entry.py`` (the console script that chooses between the fast paths and typer) imports
   ``lanectl.cli``.
6. No import cycle among lanectl modules, counting the imports inside functions too (a deferred import is how a
   cycle hides: it still ties the two modules together). The cycles that predate the rule are listed in
   ``CYCLES_ALLOWED`` and the list only shrinks.
7. One definition of each fact: mission classes, mission states and lane states are spelled out in
   ``lanectl/states.py`` only; a literal tuple, list or set of them anywhere else in lanectl (or in the tests)
   fails, and the ledger schema's CHECK constraints must name the same values.

The checker functions take the directory that holds the ``lanectl`` package, so the tests at the end run them on
small packages written to a temporary directory and show that each rule fails when it is broken.
"""
from __future__ import annotations

import ast
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import write_package

ROOT = Path(__file__).resolve().parent.parent
SQL_METHODS = frozenset({"execute", "executemany", "executescript"})
SQL_ALLOWED: set[str] = set()  # modules still allowed SQL outside lanectl/ledger/ (none: keep it so)
CLI_ALLOWED = {"lanectl/entry.py"}
PURE_ALLOWED = {"lanectl.states"}  # what the dispatch policy may import besides the standard library
CYCLES_ALLOWED: list[set[str]] = [
    # deferred imports older than rule 6; break one and drop it here (the list only shrinks)
    {"lanectl.ledger.lanes", "lanectl.ledger.missions"},
    {"lanectl.install", "lanectl.lifecycle", "lanectl.probe", "lanectl.status"},
]
TABLE_WRITERS = {
    # table -> the modules that may write it (the schema's migrations may always)
    "lanes": {"lanectl/ledger/lanes.py"},
    "hosts": {"lanectl/ledger/hosts.py"},
}
_WRITE = r"(?:INSERT\s+(?:OR\s+\w+\s+)?INTO|REPLACE\s+INTO|UPDATE(?:\s+OR\s+\w+)?|DELETE\s+FROM)\s+"


def modules(root: Path) -> Iterator[tuple[str, Path]]:
    """(dotted name, file) of every module of the ``lanectl`` package under ``root``."""
    for path in sorted((root / "lanectl").rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        yield ".".join(parts), path


def _rel(root: Path, path: Path) -> str:
    return path.relative_to(root).as_posix()


def sql_calls(root: Path, allowed: set[str] = SQL_ALLOWED) -> list[str]:
    """Every SQL call or sqlite3 import outside lanectl/ledger/ (and the allow-list), as ``file:line: what``."""
    out = []
    for _name, path in modules(root):
        rel = _rel(root, path)
        if rel.startswith("lanectl/ledger/") or rel in allowed:
            continue
        tree = ast.parse(path.read_text(), str(path))
        sqlite_names = {"sqlite3"}  # names bound to the sqlite3 module (import sqlite3 as db)
        connect_names: set[str] = set()  # names bound to sqlite3.connect (from sqlite3 import connect)
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for a in node.names:
                    if a.name.split(".")[0] == "sqlite3":
                        sqlite_names.add((a.asname or a.name).split(".")[0])
                        out.append(f"{rel}:{node.lineno}: import {a.name}")
            elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "sqlite3":
                out.append(f"{rel}:{node.lineno}: from {node.module} import")
                for a in node.names:
                    if a.name == "connect":
                        connect_names.add(a.asname or a.name)
                    elif a.name == "dbapi2":
                        sqlite_names.add(a.asname or a.name)
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call):
                continue
            f = node.func
            if isinstance(f, ast.Attribute) and f.attr in SQL_METHODS:
                out.append(f"{rel}:{node.lineno}: .{f.attr}(")
            elif isinstance(f, ast.Attribute) and f.attr == "connect" and _base_name(f.value) in sqlite_names:
                out.append(f"{rel}:{node.lineno}: sqlite3.connect(")
            elif isinstance(f, ast.Name) and f.id in connect_names:
                out.append(f"{rel}:{node.lineno}: sqlite3.connect( (as {f.id})")
    return sorted(out, key=lambda x: (x.split(":")[0], int(x.split(":")[1])))


def table_writes(root: Path, table: str, writers: set[str]) -> list[str]:
    """SQL text that writes ``table`` in a module that is not one of its ``writers`` (string literals, f-string
    parts and implicitly joined literals alike), as ``file:line: statement``."""
    import re

    pattern = re.compile(_WRITE + re.escape(table) + r"\b", re.I)
    out = []
    for _name, path in modules(root):
        rel = _rel(root, path)
        if rel in writers or rel == "lanectl/ledger/schema.py":
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and pattern.search(node.value):
                out.append(f"{rel}:{node.lineno}: {pattern.search(node.value).group(0)}")
    return out


def _base_name(node: ast.expr) -> str | None:
    while isinstance(node, ast.Attribute):  # sqlite3.dbapi2.connect
        node = node.value
    return node.id if isinstance(node, ast.Name) else None


def imports(path: Path, name: str, is_package: bool) -> list[tuple[str, int]]:
    """Every module ``path`` imports (absolute dotted names, relative ones resolved), with the line; a
    ``from X import y`` names both X and X.y (y may be a submodule: the caller keeps what exists)."""
    tree = ast.parse(path.read_text(), str(path))
    package = name if is_package else name.rpartition(".")[0]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package
                for _ in range(node.level - 1):
                    base = base.rpartition(".")[0]
                mod = f"{base}.{node.module}" if node.module else base
            else:
                mod = node.module or ""
            out.append((mod, node.lineno))
            out += [(f"{mod}.{a.name}", node.lineno) for a in node.names if a.name != "*"]
    return out


def import_graph(root: Path, *, own_packages: bool = True) -> dict[str, set[str]]:
    """lanectl module -> the lanectl modules it imports. Importing ``a.b.c`` runs ``a/__init__`` and
    ``a/b/__init__`` first, so every package on the way is an edge too. With ``own_packages=False`` (the cycle
    check) the packages a module lives in are no edge when it imports a sibling through them (``from a.b.c import
    x`` inside ``a.b.d``): Python has ``a.b`` in sys.modules before its ``__init__`` runs, and a package whose
    ``__init__`` names its parts is a facade, not a circle; ``from a.b import x`` (a name of ``a/b/__init__``)
    stays an edge."""
    files = {name: path for name, path in modules(root)}
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        edges: set[str] = set()
        for mod, _line in imports(path, name, path.name == "__init__.py"):
            parts = mod.split(".")
            for i in range(1, len(parts) + 1):
                prefix = ".".join(parts[:i])
                passing = i < len(parts) and f"{prefix}.{parts[i]}" in files  # a package on the way to a module
                if not own_packages and passing and name.startswith(prefix + "."):
                    continue
                if prefix in files and prefix != name:
                    edges.add(prefix)
        graph[name] = edges
    return graph


def import_path(graph: dict[str, set[str]], start: str, forbidden: tuple[str, ...]) -> list[str] | None:
    """The first import chain from ``start`` to a module in (or under) ``forbidden``, or None (breadth first,
    so the chain shown is a shortest one)."""
    seen = {start: [start]}
    todo = [start]
    while todo:
        nxt = []
        for mod in todo:
            for dep in sorted(graph.get(mod, ())):
                if dep in seen:
                    continue
                seen[dep] = seen[mod] + [dep]
                if any(dep == f or dep.startswith(f + ".") for f in forbidden):
                    return seen[dep]
                nxt.append(dep)
        todo = nxt
    return None


def non_stdlib_imports(root: Path, module: str, allowed: set[str] = frozenset()) -> list[str]:  # type: ignore[assignment]
    """Imports of ``module`` that are not the standard library (``__future__`` counts as part of it) nor one of
    ``allowed`` (a module, or a name imported from it)."""
    path = dict(modules(root))[module]
    out = []
    for mod, line in imports(path, module, path.name == "__init__.py"):
        top = mod.split(".")[0]  # from collections.abc import Iterable: the package decides
        if any(mod == a or mod.startswith(a + ".") for a in allowed):
            continue
        if top not in sys.stdlib_module_names and top != "__future__":
            out.append(f"{_rel(root, path)}:{line}: {mod}")
    return sorted(set(out))


def cli_imports(root: Path, allowed: set[str] = CLI_ALLOWED) -> list[str]:
    """Imports of lanectl.cli from the library (outside lanectl/cli/ and the allowed modules)."""
    out = []
    for name, path in modules(root):
        rel = _rel(root, path)
        if rel.startswith("lanectl/cli/") or rel in allowed:
            continue
        for mod, line in imports(path, name, path.name == "__init__.py"):
            if mod == "lanectl.cli" or mod.startswith("lanectl.cli."):
                out.append(f"{rel}:{line}: {mod}")
    return sorted(set(out))


def import_cycles(root: Path) -> list[list[str]]:
    """The strongly connected components of more than one module in the import graph (Tarjan), each sorted."""
    graph = import_graph(root, own_packages=False)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(out)


def new_cycles(root: Path, allowed: list[set[str]]) -> list[str]:
    """Cycles that are not (or not only) an allowed one: a cycle that grew counts as new."""
    return [" <-> ".join(c) for c in import_cycles(root) if set(c) not in allowed]


def _string_tuple(node: ast.AST) -> frozenset[str] | None:
    """The values of a tuple, list or set display made of string constants only (a starred tuple spelled out:
    ``("queued", *ACTIVE)`` is not one), or None."""
    if not isinstance(node, (ast.Tuple, ast.List, ast.Set)) or len(node.elts) < 2:
        return None
    if not all(isinstance(e, ast.Constant) and isinstance(e.value, str) for e in node.elts):
        return None
    return frozenset(e.value for e in node.elts)  # type: ignore[attr-defined]


def vocabulary() -> dict[str, frozenset[str]]:
    """The facts of lanectl.states that must not be written out a second time (by name)."""
    from lanectl import states

    return {name: frozenset(getattr(states, name)) for name in
            ("CLASSES", "MISSION_STATES", "ACTIVE", "UNFINISHED", "FINISHED", "ENDS", "LANE_STATES",
             "HOST_STATES")}


def second_definitions(root: Path, facts: dict[str, frozenset[str]], files: list[Path] | None = None,
                       owner: str = "lanectl/states.py") -> list[str]:
    """Literal tuples/lists/sets (string constants) with the very values of one of ``facts``, outside ``owner``,
    as ``file:line: NAME``; the files are lanectl's modules unless ``files`` names others."""
    by_value = {v: k for k, v in facts.items()}
    out = []
    paths = files if files is not None else [p for _n, p in modules(root)]
    for path in paths:
        rel = _rel(root, path)
        if rel == owner:
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            values = _string_tuple(node)
            if values is not None and values in by_value:
                out.append(f"{rel}:{node.lineno}: {by_value[values]}")  # type: ignore[attr-defined]
    return sorted(out)


def schema_values(column: str) -> set[frozenset[str]]:
    """The value lists of every ``CHECK (column IN (...))`` of the ledger's schema (all migrations)."""
    import re

    from lanectl.ledger import schema

    text = "\n".join(str(v) for v in vars(schema).values() if isinstance(v, (str, list, tuple)))
    return {frozenset(re.findall(r"'([^']*)'", m)) for m in
            re.findall(rf"\b{column}\s+IN\s*\(([^)]*)\)", text)}


# ------------------------------------------------------------------------------------------------ the rules


def test_only_the_ledger_speaks_sql() -> None:
    assert sql_calls(ROOT) == [], "SQL outside lanectl/ledger/: add a named operation there (docs/ledger.md)"


def test_the_allow_list_holds_only_what_still_needs_it() -> None:
    """A module that no longer runs SQL leaves the allow-list (so the list only ever shrinks)."""
    for rel in SQL_ALLOWED:
        assert sql_calls(ROOT, allowed=SQL_ALLOWED - {rel}), f"{rel} runs no SQL any more: drop it from SQL_ALLOWED"


@pytest.mark.parametrize("table", sorted(TABLE_WRITERS))
def test_one_writer_per_table(table: str) -> None:
    assert table_writes(ROOT, table, TABLE_WRITERS[table]) == [], f"write {table} through its owner"
    for rel in TABLE_WRITERS[table] - {"lanectl/ledger/lanes.py"}:  # an allowed module still needs to be
        assert table_writes(ROOT, table, TABLE_WRITERS[table] - {rel}), f"{rel} no longer writes {table}"


def test_the_runtime_imports_neither_ledger_nor_supervisor() -> None:
    chain = import_path(import_graph(ROOT), "lanectl.runtime", ("lanectl.ledger", "lanectl.supervisor"))
    assert chain is None, "the lane runtime reaches " + " -> ".join(chain or [])


def test_dispatch_imports_only_the_standard_library() -> None:
    assert non_stdlib_imports(ROOT, "lanectl.dispatch", PURE_ALLOWED) == []
    for mod in PURE_ALLOWED:  # the vocabulary itself stays pure
        assert non_stdlib_imports(ROOT, mod) == []


def test_no_import_cycle() -> None:
    assert new_cycles(ROOT, CYCLES_ALLOWED) == [], "an import cycle: give the shared part a module of its own"


def test_the_allowed_cycles_still_exist() -> None:
    """A cycle that is gone leaves CYCLES_ALLOWED (so the list only ever shrinks)."""
    found = [set(c) for c in import_cycles(ROOT)]
    for cycle in CYCLES_ALLOWED:
        assert cycle in found, f"{sorted(cycle)} is no cycle any more: drop it from CYCLES_ALLOWED"


def test_the_entry_point_and_the_cli_are_no_cycle() -> None:
    """The circle issue 11 named (entry -> cli.missionview -> entry.parse_options; cli.evidence borrowing
    absolute_time from cli.missions) is gone, and nothing in lanectl.cli reaches lanectl.entry."""
    graph = import_graph(ROOT)
    for mod in graph:
        if mod.startswith("lanectl.cli"):
            assert import_path(graph, mod, ("lanectl.entry",)) is None, mod


def test_each_fact_is_defined_once() -> None:
    # bench/ is left out: a benchmark runs against the commit before a change too, which may predate states.py
    tests = [p for p in sorted((ROOT / "tests").rglob("*.py")) if p.name != "test_layers.py"]
    assert second_definitions(ROOT, vocabulary()) == [], "import it from lanectl.states"
    assert second_definitions(ROOT, vocabulary(), files=tests) == [], "import it from lanectl.states"


def test_the_schema_checks_the_same_values() -> None:
    """The ledger's CHECK constraints (frozen migrations) name exactly the classes and states of lanectl.states."""
    from lanectl import states

    assert schema_values("class") == {frozenset(states.CLASSES)}
    states_checked = schema_values("state")
    assert frozenset(states.MISSION_STATES) in states_checked and frozenset(states.LANE_STATES) in states_checked
    attempts = {s for s in states_checked if "lost" in s}  # attempts.state: an attempt's outcome, SQL-only
    assert frozenset(states.HOST_STATES) in states_checked
    assert states_checked - attempts <= {frozenset(states.MISSION_STATES), frozenset(states.LANE_STATES),
                                         frozenset(states.UNFINISHED), frozenset(states.ACTIVE),
                                         frozenset(states.HOST_STATES)}, states_checked


def test_the_library_never_imports_the_cli() -> None:
    assert cli_imports(ROOT) == []


# ------------------------------------------------------------------------------------------------ the checker fails


def _package(tmp_path: Path, files: dict[str, str]) -> Path:
    return write_package(tmp_path, files, ("lanectl", "lanectl/ledger"))


@pytest.mark.parametrize("code, found", [
    ("def f(led):\n    return led.conn.execute('SELECT 1').fetchall()\n", [":2: .execute("]),
    ("def f(c, rows):\n    c.executemany('INSERT INTO t VALUES (?)', rows)\n", [":2: .executemany("]),
    ("def f(c):\n    c.executescript('DELETE FROM t')\n", [":2: .executescript("]),
    ("import sqlite3\nc = sqlite3.connect('file:x?mode=ro', uri=True)\n",
     [":1: import sqlite3", ":2: sqlite3.connect("]),
    ("def f():\n    import sqlite3 as db\n    return db.connect('x')\n",
     [":2: import sqlite3", ":3: sqlite3.connect("]),
    ("from sqlite3 import connect as open_db\nc = open_db('x')\n",
     [":1: from sqlite3 import", ":2: sqlite3.connect( (as open_db)"]),
    ("def f(exc):\n    import sqlite3\n    return isinstance(exc, sqlite3.Error)\n", [":2: import sqlite3"]),
])
def test_sql_outside_the_ledger_fails(tmp_path: Path, code: str, found: list[str]) -> None:
    root = _package(tmp_path, {"lanectl/evidence.py": code, "lanectl/ledger/reads.py": code,
                               "lanectl/supervisor.py": code})
    assert sql_calls(root, allowed={"lanectl/supervisor.py"}) == [f"lanectl/evidence.py{f}" for f in found]
    assert len(sql_calls(root)) == 2 * len(found)  # the supervisor's is only allowed by a list that names it


def test_the_real_tree_fails_when_an_execute_is_added(tmp_path: Path) -> None:
    """A copy of the real package with one line added to the probe: the rule that passes on the tree fails."""
    import shutil

    shutil.copytree(ROOT / "lanectl", tmp_path / "lanectl")
    assert sql_calls(tmp_path) == []
    probe = tmp_path / "lanectl" / "probe.py"
    probe.write_text(probe.read_text() + "\n\ndef sneaky(conn):\n    return conn.execute('SELECT 1')\n")
    found = sql_calls(tmp_path)
    assert len(found) == 1 and found[0].startswith("lanectl/probe.py:") and ".execute(" in found[0]


def test_a_second_writer_of_the_lanes_table_fails(tmp_path: Path) -> None:
    root = _package(tmp_path, {
        "lanectl/ledger/lanes.py": 'def w(c):\n    c.execute("UPDATE lanes SET state = ? WHERE name = ?", ("a", "b"))\n',
        "lanectl/ledger/missions.py": 'def r(c):\n    return c.execute("SELECT state FROM lanes").fetchall()\n',
        "lanectl/ledger/schema.py": 'M = "INSERT INTO lanes (name) SELECT DISTINCT lane FROM sessions"\n',
    })
    assert table_writes(root, "lanes", {"lanectl/ledger/lanes.py"}) == []  # reads, the owner, migrations
    (root / "lanectl/ledger/missions.py").write_text(
        'def w(c, n):\n    c.execute("INSERT INTO lanes (name, swrr, updated_at) VALUES (?, ?, ?) "\n'
        '              "ON CONFLICT (name) DO UPDATE SET swrr = excluded.swrr", (n, 0, 0))\n'
        'def d(c, t):\n    c.execute(f"delete from lanes where name = {t!r}")\n')
    assert table_writes(root, "lanes", {"lanectl/ledger/lanes.py"}) == [
        "lanectl/ledger/missions.py:2: INSERT INTO lanes", "lanectl/ledger/missions.py:5: delete from lanes"]
    assert table_writes(root, "lanes_rollup", {"lanectl/ledger/lanes.py"}) == []  # another table's name


def test_a_runtime_reaching_the_ledger_through_another_module_fails(tmp_path: Path) -> None:
    root = _package(tmp_path, {
        "lanectl/runtime.py": "from lanectl import helper\n",
        "lanectl/helper.py": "def f():\n    from .util import g\n    return g()\n",  # inside a function, relative
        "lanectl/util.py": "from lanectl.ledger.events import EventKind\n",
        "lanectl/ledger/events.py": "",
    })
    chain = import_path(import_graph(root), "lanectl.runtime", ("lanectl.ledger", "lanectl.supervisor"))
    assert chain == ["lanectl.runtime", "lanectl.helper", "lanectl.util", "lanectl.ledger"]
    (root / "lanectl" / "util.py").write_text("import lanectl.supervisor\n")
    (root / "lanectl" / "supervisor.py").write_text("")
    chain = import_path(import_graph(root), "lanectl.runtime", ("lanectl.ledger", "lanectl.supervisor"))
    assert chain == ["lanectl.runtime", "lanectl.helper", "lanectl.util", "lanectl.supervisor"]
    (root / "lanectl" / "util.py").write_text("import json\n")
    assert import_path(import_graph(root), "lanectl.runtime", ("lanectl.ledger", "lanectl.supervisor")) is None


def test_an_impure_dispatch_fails(tmp_path: Path) -> None:
    root = _package(tmp_path, {"lanectl/dispatch.py": "from __future__ import annotations\nimport math\n"
                                                      "from collections.abc import Mapping\n"
                                                      "from typing import Final\n"})
    assert non_stdlib_imports(root, "lanectl.dispatch") == []
    (root / "lanectl" / "dispatch.py").write_text("import math\nfrom lanectl.config import LaneSet\nimport psutil\n")
    assert non_stdlib_imports(root, "lanectl.dispatch") == ["lanectl/dispatch.py:2: lanectl.config",
                                                             "lanectl/dispatch.py:2: lanectl.config.LaneSet",
                                                             "lanectl/dispatch.py:3: psutil"]


def test_a_vocabulary_import_keeps_dispatch_pure_and_nothing_else_does(tmp_path: Path) -> None:
    root = _package(tmp_path, {"lanectl/states.py": "from typing import Final\n",
                               "lanectl/dispatch.py": "from lanectl.states import CLASSES, RANK\nimport lanectl.states\n"})
    assert non_stdlib_imports(root, "lanectl.dispatch", PURE_ALLOWED) == []
    (root / "lanectl" / "dispatch.py").write_text("from lanectl.states import CLASSES\nfrom lanectl.statesx import A\n")
    assert non_stdlib_imports(root, "lanectl.dispatch", PURE_ALLOWED) == ["lanectl/dispatch.py:2: lanectl.statesx",
                                                                          "lanectl/dispatch.py:2: lanectl.statesx.A"]


def test_a_package_facade_is_no_cycle_but_a_name_borrowed_from_it_is(tmp_path: Path) -> None:
    """A package's ``__init__`` that names its parts, and parts that import their siblings by full path, are no
    cycle (lanectl.supervisor, lanectl.ledger); a part that takes a name from the package's ``__init__`` while
    the ``__init__`` imports that part is one."""
    root = _package(tmp_path, {
        "lanectl/sup/__init__.py": "from lanectl.sup.loop import Loop\nfrom lanectl.sup.parts import Part\n",
        "lanectl/sup/loop.py": "from lanectl.sup.parts import Part\nclass Loop: pass\n",
        "lanectl/sup/parts.py": "class Part: pass\n",
    })
    assert import_cycles(root) == []
    (root / "lanectl" / "sup" / "parts.py").write_text("from lanectl.sup import Loop\nclass Part: pass\n")
    assert import_cycles(root) == [["lanectl.sup", "lanectl.sup.loop", "lanectl.sup.parts"]]


def test_an_import_cycle_fails(tmp_path: Path) -> None:
    """The shape issue 11 found: the console script imports a CLI module that imports back a helper of the
    console script, inside a function; moving the helper to a module of its own breaks it."""
    root = _package(tmp_path, {
        "lanectl/cli/__init__.py": "",
        "lanectl/entry.py": "def main():\n    from lanectl.cli.view import fast\n",
        "lanectl/cli/view.py": "from lanectl.entry import parse_options\n",
        "lanectl/a.py": "import lanectl.b\n", "lanectl/b.py": "def f():\n    from lanectl import a\n",
    })
    assert import_cycles(root) == [["lanectl.a", "lanectl.b"], ["lanectl.cli.view", "lanectl.entry"]]
    assert new_cycles(root, [{"lanectl.a", "lanectl.b"}]) == ["lanectl.cli.view <-> lanectl.entry"]
    (root / "lanectl" / "b.py").write_text("def f():\n    from lanectl import entry\n")  # a allowed cycle grows
    (root / "lanectl" / "entry.py").write_text("import lanectl.a\n")
    assert new_cycles(root, [{"lanectl.a", "lanectl.b"}]) == ["lanectl.a <-> lanectl.b <-> lanectl.entry"]
    (root / "lanectl" / "fastargs.py").write_text("def parse_options(argv):\n    return argv\n")
    (root / "lanectl" / "cli" / "view.py").write_text("from lanectl.fastargs import parse_options\n")
    (root / "lanectl" / "b.py").write_text("")
    assert import_cycles(root) == []


def test_a_second_definition_of_a_fact_fails(tmp_path: Path) -> None:
    root = _package(tmp_path, {
        "lanectl/states.py": 'CLASSES = ("interactive", "deadline", "background")\n',
        "lanectl/config.py": 'from lanectl.states import CLASSES\nX = ("queued", *ACTIVE)\nY = ("a", "b")\n',
        "lanectl/protocol.py": 'def f(c):\n    return c in ["background", "interactive", "deadline"]\n',
        "lanectl/ledger/schema.py": 'S = "CHECK (class IN (\'interactive\', \'deadline\', \'background\'))"\n',
    })
    facts = {"CLASSES": frozenset({"interactive", "deadline", "background"})}
    assert second_definitions(root, facts) == ["lanectl/protocol.py:2: CLASSES"]  # any order, any display
    (root / "lanectl" / "protocol.py").write_text("from lanectl.states import CLASSES\n")
    assert second_definitions(root, facts) == []


def test_the_library_importing_the_cli_fails(tmp_path: Path) -> None:
    root = _package(tmp_path, {"lanectl/cli/__init__.py": "", "lanectl/cli/main.py": "from lanectl import top\n",
                               "lanectl/entry.py": "from lanectl.cli.main import app\n",
                               "lanectl/top.py": "def f():\n    from lanectl.cli.options import JSON\n"})
    assert cli_imports(root) == ["lanectl/top.py:2: lanectl.cli.options", "lanectl/top.py:2: lanectl.cli.options.JSON"]

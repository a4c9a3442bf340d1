"""The contract suite gets every ledger through its backend fixture (tests/ledger/conftest.py): no test module under
tests/ledger/ opens a ledger or a database connection itself, so adding a backend to ``conftest.BACKENDS`` runs
every test on it. The conftest is the one place that calls ``Ledger.open``/``sqlite3.connect``."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
OPENS = re.compile(r"\b(?:Ledger(?:\.open(?:_readonly)?)?|sqlite3\.connect|psycopg\.connect|Connection\.connect)\s*\(")
"""A call that makes a ledger or a connection without the backend fixture (also inside a child process's code)."""


def direct_opens(text: str) -> list[str]:
    """Each line of ``text`` that opens a ledger or a connection itself, as ``line: text``."""
    return [f"{n}: {line.strip()}" for n, line in enumerate(text.splitlines(), 1) if OPENS.search(line)]


def test_no_ledger_test_opens_a_ledger_without_the_backend_fixture() -> None:
    found = {p.name: hits for p in sorted(HERE.glob("*.py"))
             if p.name not in ("conftest.py", Path(__file__).name) and (hits := direct_opens(p.read_text()))}
    assert found == {}, f"open ledgers through the backend fixture (conftest.py), not directly: {found}"


@pytest.mark.parametrize("line", [
    'led = Ledger.open(tmp_path / "ledger.db")',
    "ro = Ledger.open_readonly(path, check=True)",
    "conn = sqlite3.connect(path, isolation_level=None)",
    "with Ledger (conn, path) as led:",
    "code = 'led = Ledger.open(sys.argv[1])'",
])
def test_the_check_finds_each_way_around_the_fixture(line: str) -> None:
    assert direct_opens(f"x = 1\n{line}\n") == [f"2: {line}"]


@pytest.mark.parametrize("line", [
    "led = backend.open()", "def _dump(led: Ledger) -> tuple:", "``Ledger.open`` used to read the header",
    "from lanectl.ledger import Ledger, events", "conn = backend.connect(isolation_level=None)",
])
def test_the_check_lets_the_fixtures_ways_pass(line: str) -> None:
    assert direct_opens(line) == []


def test_every_ledger_test_runs_on_a_backend(request: pytest.FixtureRequest) -> None:
    """Each test collected from tests/ledger/ (but this module's checks of the source) requests the backend
    fixture, directly or through ``led``/``env``/``world``/``day``: nothing there runs outside the contract."""
    session = request.session
    outside = [item.nodeid for item in session.items
               if Path(str(item.fspath)).parent == HERE and Path(str(item.fspath)).name != Path(__file__).name
               and "backend_name" not in getattr(item, "fixturenames", ())]
    assert outside == []

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
VENV = Path(os.environ.get("LANECTL_PREFIX", "/opt/lanectl")) / "venv"
"""The venv scripts/setup builds (LANECTL_PREFIX, default /opt/lanectl): what the tests' units run."""
RUNTIME_PY = str(VENV / "bin" / "python")
LANECTL_BIN = str(VENV / "bin" / "lanectl")


@pytest.fixture
def fleet_dir(tmp_path: Path) -> Path:
    """A copy of the example fleet (lanectl.toml + lanes.d) that a test may change."""
    d = tmp_path / "etc"
    d.mkdir()
    shutil.copy(ROOT / "lanectl.toml", d / "lanectl.toml")
    shutil.copytree(ROOT / "lanes.d", d / "lanes.d")
    return d


def write_lane(d: Path, name: str, body: str) -> Path:
    p = d / "lanes.d" / f"{name}.toml"
    p.write_text(body)
    return p


def write_package(root: Path, files: dict[str, str], packages: tuple[str, ...]) -> Path:
    """A small source tree under ``root`` for the source checkers' own tests (tests/test_layers.py,
    tests/test_thin_cli.py): an empty ``__init__.py`` in each of ``packages``, then ``files`` (path -> text)."""
    for rel, text in {**{f"{p}/__init__.py": "" for p in packages}, **files}.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


@pytest.fixture(scope="session")
def pg_server():
    """The session's real PostgreSQL server (tests/pgserver.py; started on first use, stopped and removed at the
    end): one for the whole session, shared by the ledger contract suite and the CLI's tests."""
    from tests.pgserver import PgServer

    server = PgServer().start()
    try:
        yield server
    finally:
        server.stop()

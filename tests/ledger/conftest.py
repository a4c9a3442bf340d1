"""The ledger contract suite's one way to a ledger: the ``backend`` fixture (a ``Backend`` for one storage engine).

Every test under tests/ledger/ gets its ledgers from a ``Backend`` (``backend.open()``, ``backend.fresh()``,
``backend.location()``, ``backend.open_readonly()``, ``backend.connect()``), never by opening a path itself
(tests/ledger/test_contract_fixture.py fails when one does). ``backend`` and the module-scoped
``module_backend`` are parametrised over ``BACKENDS``: a second storage engine is one more entry there and
one more ``Backend`` class in ``BACKEND_CLASSES``. A test that is about one engine's files (WAL, fcntl locks,
PRAGMAs, a crash of a writer process) says so with ``@pytest.mark.backends("sqlite")``: it then runs on that
engine only, and the report says which tests run where; nothing is skipped or xfailed to hide a failure.
"""
from __future__ import annotations

import abc

import itertools
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from lanectl.config import ClassPolicy, Lane, LaneSet, Quota, Settings
from lanectl.ledger import Ledger

T0 = 1_700_000_000.0

BACKENDS: tuple[str, ...] = ("sqlite", "postgresql")
"""The engines the contract suite runs on (another backend: add its name here and its class below). PostgreSQL
runs on the session's own server (``pg_server``, tests/pgserver.py); every test not marked ``backends(...)``
runs on both."""


def make_fleet(tmp: Path, **class_overrides: ClassPolicy) -> LaneSet:
    lanes = {
        "alpha": Lane(port=9001, workspace="/var/lib/lanes/alpha", capacity=2),
        "beta": Lane(port=9002, workspace="/var/lib/lanes/beta", capacity=2, fallback="alpha"),
        "gamma": Lane(port=9003, workspace="/var/lib/lanes/gamma", capacity=1, tags=["gpu"],
                      classes=["background", "deadline"], quotas={"background": Quota(rate_per_minute=2)}),
    }
    classes = {
        "interactive": ClassPolicy(max_wait_sec=30, queue_limit=50),
        "deadline": ClassPolicy(max_wait_sec=120, queue_limit=50),
        "background": ClassPolicy(max_wait_sec=600, queue_limit=50, max_attempts=2),
    }
    classes.update(class_overrides)
    return LaneSet(lanes, Settings(classes=classes), tmp, tmp / "lanes.d")


def open_ledger(location: str | Path, **kw: Any) -> Ledger:
    """Open (create, migrate) the ledger at a location a ``Backend`` handed out: the one call through which the
    suite opens a ledger, also in the child processes some tests start (they get the location as an argument)."""
    return Ledger.open(location, **kw)


def sqlite_connect(location: str | Path, **kw: Any) -> sqlite3.Connection:
    """A raw sqlite3 connection to a ledger file a ``SqliteBackend`` handed out (``SqliteBackend.connect``, and the
    child processes of tests about SQLite's files)."""
    return sqlite3.connect(location, **kw)


class Backend(abc.ABC):
    """What every backend gives a contract test: named ledgers, opened read-write or read-only, closed at the end
    of the test unless the test closes them itself. A backend says where a ledger is (``location``), whether it
    holds anything (``exists``), how to drop one (``discard``) and what it leaves behind (``close``)."""

    name = ""
    integrity_error: type[Exception] | tuple[type[Exception], ...] = sqlite3.IntegrityError
    """What the engine raises when a CHECK, a constraint or an append-only trigger refuses a write."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._opened: list[Ledger] = []
        self._names = itertools.count(1)

    @abc.abstractmethod
    def location(self, name: str = "ledger") -> str:
        """What ``--ledger`` / ``LANECTL_LEDGER`` / ``Ledger.open`` take for the ledger called ``name``."""

    @abc.abstractmethod
    def exists(self, name: str = "ledger") -> bool:
        """Whether the ledger ``name`` was made (and, on a server, holds anything)."""

    @abc.abstractmethod
    def discard(self, led: Ledger) -> None:
        """Close a ledger from ``fresh()`` and drop what it stored."""

    def open(self, name: str = "ledger", **kw: Any) -> Ledger:
        """A read-write connection to the ledger ``name``, created and migrated on first use."""
        led = open_ledger(self.location(name), **kw)
        self._opened.append(led)
        return led

    def fresh(self, **kw: Any) -> Ledger:
        """A new, empty ledger of its own (one per hypothesis example)."""
        return self.open(f"fresh-{next(self._names)}", **kw)

    def open_readonly(self, name: str = "ledger", **kw: Any) -> Ledger:
        led = Ledger.open_readonly(self.location(name), **kw)
        self._opened.append(led)
        return led

    def close(self) -> None:
        for led in self._opened:
            try:
                led.close()  # closing twice is harmless
            except Exception:
                pass
        self._opened.clear()


class SqliteBackend(Backend):
    """Ledgers as SQLite files under one directory (``<root>/state/<name>.db``)."""

    name = "sqlite"

    def location(self, name: str = "ledger") -> str:
        return str(self.root / "state" / f"{name}.db")

    def path(self, name: str = "ledger") -> Path:
        """The file of the ledger called ``name`` (tests about SQLite files only)."""
        return Path(self.location(name))

    def exists(self, name: str = "ledger") -> bool:
        """Whether anything of the ledger ``name`` was made: its file, or the directory its first open creates."""
        return self.path(name).exists() or self.path(name).parent.exists()

    def discard(self, led: Ledger) -> None:
        """Close a ledger from ``fresh()`` and drop what it stored."""
        led.close()
        path = Path(led.path)
        for p in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
            p.unlink(missing_ok=True)

    def connect(self, name: str = "ledger", **kw: Any) -> sqlite3.Connection:
        """A raw DB-API connection below the ledger's API (to build an old schema, to corrupt, to read a PRAGMA):
        only tests marked ``backends("sqlite")`` use it."""
        self.path(name).parent.mkdir(parents=True, exist_ok=True)
        return sqlite_connect(self.location(name), **kw)


class PostgresBackend(Backend):
    """Ledgers as databases of the session's real PostgreSQL server (tests/pgserver.py), each cloned from a
    template that holds the ledger's schema. ``name`` maps to one database per test."""

    name = "postgresql"
    integrity_error = (sqlite3.IntegrityError, sqlite3.DataError)
    """A CHECK, a constraint, a type or an append-only trigger refusing a write (the ledger's connection raises
    psycopg's errors as the sqlite3 class of the same DB-API kind)."""

    def __init__(self, root: Path, server: Any) -> None:
        import psycopg

        super().__init__(root)
        self.server = server
        self._psycopg = psycopg
        self._dbs: dict[str, str] = {}

    def _db(self, name: str, *, create: bool = True) -> str:
        if name not in self._dbs and create:
            self._dbs[name] = self.server.create_db("led")
        return self._dbs.get(name, f"missing_{name}")

    def location(self, name: str = "ledger") -> str:
        return self.server.url(self._db(name))

    def exists(self, name: str = "ledger") -> bool:
        """Whether the ledger ``name`` holds anything: its database has a mission or an event."""
        if name not in self._dbs:
            return False
        with self._psycopg.connect(self.location(name)) as c:
            return bool(c.execute("SELECT (SELECT count(*) FROM missions) + (SELECT count(*) FROM events)")
                        .fetchone()[0])

    def connect(self, name: str = "ledger", **kw: Any) -> Any:
        """A plain psycopg connection to the ledger ``name``'s database (autocommit unless ``autocommit=False``):
        another process's view below the ledger's API (row locks, LISTEN, pg_terminate_backend); the caller
        closes it."""
        return self._psycopg.connect(self.location(name), **{"autocommit": True, **kw})

    def discard(self, led: Ledger) -> None:
        led.close()
        for name, db in list(self._dbs.items()):
            if self.server.url(db) == str(led.path):
                self.server.drop_db(db)
                del self._dbs[name]

    def close(self) -> None:
        super().close()
        for db in self._dbs.values():
            self.server.drop_db(db)
        self._dbs.clear()


BACKEND_CLASSES: dict[str, type] = {"sqlite": SqliteBackend, "postgresql": PostgresBackend}


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "backend_name" in metafunc.fixturenames:
        marker = metafunc.definition.get_closest_marker("backends")
        names = [b for b in BACKENDS if marker is None or b in marker.args]
        metafunc.parametrize("backend_name", names, scope="module")


def _make(name: str, root: Path, request: pytest.FixtureRequest) -> Any:
    if name == "postgresql":
        return PostgresBackend(root, request.getfixturevalue("pg_server"))
    return BACKEND_CLASSES[name](root)


@pytest.fixture
def backend(backend_name: str, tmp_path: Path, request: pytest.FixtureRequest):
    """The backend every ledger of this test comes from (one per test, its ledgers closed at the end)."""
    b = _make(backend_name, tmp_path, request)
    yield b
    b.close()


@pytest.fixture(scope="module")
def module_backend(backend_name: str, tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest):
    """Like ``backend``, shared by the tests of one module (for data that is costly to build)."""
    b = _make(backend_name, tmp_path_factory.mktemp(f"ledger-{backend_name}"), request)
    yield b
    b.close()


@pytest.fixture
def fleet(tmp_path: Path) -> LaneSet:
    return make_fleet(tmp_path)


@pytest.fixture
def led(backend: SqliteBackend) -> Ledger:
    return backend.open()

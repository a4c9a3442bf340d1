"""Issue 10, finding 8 and the WAL bound of finding 4: a commit the product acknowledges is on disk, the
``[ledger] synchronous`` setting reaches every connection that writes, and the WAL file shrinks back to
``WAL_SIZE_LIMIT``. Mission ids: test_mission_ids.py.

Power loss cannot be simulated honestly here; what is checked is the PRAGMA each real connection runs (SQLite's
own statement trace, switched on for every connection as ``sqlite3.connect`` returns it; the connections are the
real ones), and the kill -9 test in test_crash_safety.py (acknowledged submits survive, at both settings).
"""
from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from typer.testing import CliRunner

from lanectl import config
from lanectl.cli.main import app
from lanectl.errors import ExitCode
from lanectl.ledger import WAL_SIZE_LIMIT, Checkpointer, Ledger
from lanectl.ledger import missions as ms
from tests.ledger.conftest import T0, make_fleet

runner = CliRunner()
pytestmark = pytest.mark.backends("sqlite")  # SQLite's synchronous PRAGMA and its WAL file
@contextmanager
def traced_sql() -> Iterator[list[tuple[int, str]]]:
    """Every statement run on every sqlite3 connection opened meanwhile (in any thread), as (connection, sql)."""
    sink: list[tuple[int, str]] = []
    real = sqlite3.connect

    def connect(*args, **kwargs):  # type: ignore[no-untyped-def]
        conn = real(*args, **kwargs)
        conn.set_trace_callback(lambda sql, c=id(conn): sink.append((c, sql)))
        return conn

    sqlite3.connect = connect  # type: ignore[assignment]
    try:
        yield sink
    finally:
        sqlite3.connect = real  # type: ignore[assignment]


def writers_sync(trace: list[tuple[int, str]], marker: str) -> set[str]:
    """The synchronous setting of each connection that ran a statement containing ``marker``."""
    out = set()
    for conn in {c for c, sql in trace if marker in sql}:
        syncs = [sql.split("=")[1].strip() for c, sql in trace if c == conn and sql.startswith("PRAGMA synchronous =")]
        out.add(syncs[-1] if syncs else "SQLite's compiled default")
    return out


def write_config(d: Path, ledger_table: str | None) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    (d / "lanes.d").mkdir(exist_ok=True)
    (d / "lanes.d" / "alpha.toml").write_text('port = 9001\nworkspace = "/var/lib/lanes/alpha"\ncapacity = 2\n')
    # the box's state (secret, keys) in the test's own directory, never the host's /var/lib/lanectl
    (d / "lanectl.toml").write_text(f'state_dir = "{d.parent / "state"}"\n' + (ledger_table or ""))
    return d


@pytest.mark.parametrize("table, expected", [
    (None, "FULL"),
    ('[ledger]\nsynchronous = "FULL"\n', "FULL"),
    ('[ledger]\nsynchronous = "NORMAL"\n', "NORMAL"),
])
def test_cli_submit_commits_at_the_configured_synchronous(backend, tmp_path: Path, table: str | None,
                                                          expected: str) -> None:
    cfg = write_config(tmp_path / "etc", table)
    ledger = backend.location()
    runner.invoke(app, ["ledger", "init", "--config", str(cfg), "--ledger", str(ledger)], prog_name="lanectl")
    with traced_sql() as trace:
        res = runner.invoke(app, ["submit", "--class", "interactive", "--payload", '{"argv": ["true"]}', "--config", str(cfg),
                                  "--ledger", str(ledger), "--json"], prog_name="lanectl")
    assert res.exit_code == 0, res.output
    assert writers_sync(trace, "INSERT INTO missions") == {expected}


@pytest.mark.parametrize("table, expected", [(None, "FULL"), ('[ledger]\nsynchronous = "NORMAL"\n', "NORMAL")])
def test_supervisor_and_checkpointer_use_the_configured_synchronous(backend, tmp_path: Path, table: str | None,
                                                                    expected: str) -> None:
    from lanectl.supervisor import Supervisor

    fleet = config.load(write_config(tmp_path / "etc", table))
    ledger = backend.path()
    with traced_sql() as trace:
        # its callback socket in the test's directory; its TCP port may be taken: it retries that and runs on
        sup = Supervisor(fleet, ledger, use_systemd=False, callback_socket=tmp_path / "cb.sock", lane_uids={})
        sup.open()
        try:
            assert sup.ledger is not None
            assert sup.ledger.conn.execute("PRAGMA synchronous").fetchone()[0] == {"FULL": 2, "NORMAL": 1}[expected]
            done = threading.Event()
            while not done.wait(0.05):  # bounded by the test timeout; the checkpointer runs every second
                if any("wal_checkpoint" in sql for _, sql in trace):
                    done.set()
        finally:
            sup.close()
    assert writers_sync(trace, "wal_checkpoint") == {expected}
    assert writers_sync(trace, "PRAGMA wal_autocheckpoint = 0") == {expected}


def test_synchronous_setting_is_validated_and_the_short_ledger_form_still_works(backend, tmp_path: Path) -> None:
    cfg = write_config(tmp_path / "bad", '[ledger]\nsynchronous = "OFF"\n')
    res = runner.invoke(app, ["validate", str(cfg), "--json"], prog_name="lanectl")
    assert res.exit_code == ExitCode.CONFIG
    assert "lanectl.toml" in res.stdout and "ledger.synchronous" in res.stdout
    cfg = write_config(tmp_path / "short", f'ledger = "{backend.location("x")}"\n')
    assert config.ledger_path(cfg) == backend.path("x")
    cfg = write_config(tmp_path / "table", f'[ledger]\npath = "{backend.location("y")}"\nsynchronous = "NORMAL"\n')
    assert config.ledger_path(cfg) == backend.path("y")
    with config.open_ledger(cfg, create=True) as led:
        assert led.conn.execute("PRAGMA synchronous").fetchone()[0] == 1
    with pytest.raises(Exception, match="synchronous"):
        backend.open("z", synchronous="FULL; DROP TABLE missions")  # type: ignore[arg-type]


def _submit(led: Ledger, fleet, i: int) -> int:
    return ms.submit(led, fleet, cls="background", payload={"argv": ["x", str(i)]}, now=T0 + i).mission.id


def test_the_wal_shrinks_back_to_its_limit(backend, tmp_path: Path) -> None:
    """A reader holding an old snapshot lets the WAL grow past the limit; once a checkpoint gets through, the next
    commit truncates the file to at most WAL_SIZE_LIMIT (docs/ledger.md states the bound)."""
    path = backend.path()
    wal = Path(str(path) + "-wal")
    fleet = make_fleet(tmp_path)
    blob = "x" * 200_000
    with backend.open(autocheckpoint=False) as led:
        reader = backend.connect(isolation_level=None)
        reader.execute("BEGIN")
        reader.execute("SELECT count(*) FROM missions").fetchone()  # pins a snapshot: no checkpoint completes
        i = 0
        while wal.stat().st_size <= WAL_SIZE_LIMIT * 1.25:
            with led.transaction():
                ms.submit(led, fleet, cls="background", payload={"argv": ["x"], "blob": blob}, now=T0 + i)
                i += 1
            with led.transaction() as conn:
                conn.execute("UPDATE missions SET state = 'cancelled', updated_at = ? WHERE state = 'queued'",
                             (T0,))
        reader.execute("COMMIT")
        reader.close()
        cp = backend.connect(isolation_level=None)
        Checkpointer(path).checkpoint(cp)  # the supervisor's PASSIVE checkpoint: all frames now in the file
        cp.close()
        _submit(led, fleet, 10_000)  # the next commit restarts the WAL and truncates it to the limit
        assert 0 < wal.stat().st_size <= WAL_SIZE_LIMIT

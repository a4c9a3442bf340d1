"""The PostgreSQL ledger's schema (issue 12, item 2) on a real server: the same tables and columns as SQLite's,
versions recorded step by step, a newer schema refused untouched, and every migration after the baseline
carrying its PostgreSQL text. Runs on the postgresql backend only (it is about that engine's schema)."""
from __future__ import annotations

from pathlib import Path

import pytest

from conftest import open_ledger
from lanectl.errors import ExitCode, LanectlError
from lanectl.ledger import schema

pytestmark = pytest.mark.backends("postgresql")


def _columns_pg(led) -> dict[str, set[str]]:  # type: ignore[no-untyped-def]
    out: dict[str, set[str]] = {}
    for table, col in led.conn.execute("SELECT table_name, column_name FROM information_schema.columns "
                                       "WHERE table_schema = 'public'"):
        out.setdefault(table, set()).add(col)
    return out


def test_the_tables_and_columns_are_sqlites(backend, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    led = backend.open()
    sqlite = open_ledger(tmp_path / "same.db")  # the other engine's schema, for comparison
    try:
        want = {}
        for (table,) in sqlite.conn.execute("SELECT name FROM sqlite_master WHERE type = 'table' "
                                            "AND name NOT LIKE 'sqlite_%'"):
            want[table] = {r[1] for r in sqlite.conn.execute(f"PRAGMA table_info({table})")}
        assert _columns_pg(led) == want
        idx = {r[0] for r in led.conn.execute("SELECT indexname FROM pg_indexes WHERE schemaname = 'public' "
                                              "AND indexdef LIKE '%WHERE%'")}
        assert {"missions_queue", "missions_edf", "missions_group_edf", "missions_active"} <= idx
        assert "WHERE (state = 'queued'::text)" in led.conn.execute(
            "SELECT indexdef FROM pg_indexes WHERE indexname = 'missions_queue'").fetchone()[0]
        types = dict(led.conn.execute("SELECT column_name, data_type FROM information_schema.columns "
                                      "WHERE table_name = 'missions'").fetchall())
        assert types["payload"] == types["tags"] == types["result"] == "jsonb"
    finally:
        sqlite.close()


def test_versions_are_recorded_like_sqlites(backend) -> None:  # type: ignore[no-untyped-def]
    led = backend.open()
    assert led.version() == schema.LATEST
    names = [r[0] for r in led.conn.execute("SELECT name FROM schema_migrations ORDER BY version")]
    assert names == [m.name for m in schema.MIGRATIONS]
    assert schema.pg_pending(led.conn) == []
    backend.open().close()  # a second open migrates nothing
    assert led.conn.execute("SELECT count(*) FROM schema_migrations").fetchone()[0] == schema.LATEST


def test_a_newer_schema_is_refused_and_untouched(backend) -> None:  # type: ignore[no-untyped-def]
    led = backend.open()
    with led.transaction() as conn:  # what a newer lanectl would have recorded
        conn.execute("INSERT INTO schema_migrations (version, name, applied_at) VALUES (?, 'from_the_future', 0)",
                     (schema.LATEST + 1,))
    for kw in ({}, {"migrate": False}):
        with pytest.raises(LanectlError) as err:
            backend.open(**kw)
        assert err.value.code == "ledger_too_new" and err.value.exit_code == ExitCode.CONFIG
    assert led.conn.execute("SELECT max(version) FROM schema_migrations").fetchone()[0] == schema.LATEST + 1


def test_every_step_after_the_baseline_has_its_postgresql_text(backend) -> None:  # type: ignore[no-untyped-def]
    later = [m.name for m in schema.MIGRATIONS[schema.PG_BASELINE_VERSION:] if not m.pg]
    assert later == [], f"give these migrations their PostgreSQL text (Migration.pg): {later}"
    assert schema.PG_BASELINE_VERSION == schema.LATEST or later == []


def test_history_is_append_only_and_checks_hold(backend) -> None:  # type: ignore[no-untyped-def]
    led = backend.open()
    with led.transaction() as conn:
        conn.execute("INSERT INTO events (at, kind) VALUES (1, 'submitted')")
    for sql in ("UPDATE events SET kind = 'x'", "DELETE FROM events"):
        with pytest.raises(backend.integrity_error, match="append-only"):
            with led.transaction() as conn:
                conn.execute(sql)
    with pytest.raises(backend.integrity_error):
        with led.transaction() as conn:
            conn.execute("INSERT INTO sessions (id, lane, created_at, updated_at) VALUES ('nocolon', 'a', 0, 0)")


def test_a_missing_database_or_server_is_a_clear_error(backend, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Issue 12, item 7 (first part): the URL names no database, or no server listens there."""
    with pytest.raises(LanectlError) as err:
        open_ledger(backend.server.url("no_such_ledger"))
    assert err.value.code == "ledger_missing" and err.value.exit_code == ExitCode.UNAVAILABLE
    assert "createdb" in (err.value.hint or "")
    nowhere = f"postgresql:///lanectl?host={tmp_path}&user=postgres"  # a socket directory with no server
    with pytest.raises(LanectlError) as err:
        open_ledger(nowhere, busy_timeout_s=1)
    assert err.value.code == "ledger_unavailable" and err.value.exit_code == ExitCode.UNAVAILABLE
    assert str(tmp_path) in err.value.message


def test_the_cli_reads_a_postgresql_ledger_named_by_url(backend, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    import json

    from typer.testing import CliRunner

    from lanectl.cli.main import app

    (tmp_path / "etc" / "lanes.d").mkdir(parents=True)
    (tmp_path / "etc" / "lanectl.toml").write_text(f'state_dir = "{tmp_path / "state"}"\n')
    url = backend.location()
    backend.open().close()
    res = CliRunner().invoke(app, ["missions", "--ledger", url, "--config", str(tmp_path / "etc"), "--json"],
                             prog_name="lanectl")
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["data"]["missions"] == []
    res = CliRunner().invoke(app, ["missions", "--ledger", "postgresql://u:s3cret@h/db", "--config",
                                   str(tmp_path / "etc"), "--json"], prog_name="lanectl")
    assert res.exit_code == ExitCode.USAGE and "s3cret" not in res.output
    assert json.loads(res.stdout)["errors"][0]["code"] == "ledger_url_password"


def test_a_database_without_the_ledger_is_created_only_when_asked(backend) -> None:  # type: ignore[no-untyped-def]
    """Like a missing file: every command but install and 'ledger init' (create=False) refuses an empty database
    instead of making a new, empty ledger in it."""
    empty = backend.server.create_db("empty", empty=True)
    url = backend.server.url(empty)
    try:
        with pytest.raises(LanectlError) as err:
            open_ledger(url, create=False)
        assert err.value.code == "ledger_missing" and err.value.exit_code == ExitCode.UNAVAILABLE
        led = open_ledger(url)  # create=True (install, ledger init): the schema is made
        assert led.version() == schema.LATEST
        led.close()
        open_ledger(url, create=False).close()
    finally:
        backend.server.drop_db(empty)

"""The ledger store: modes, pragmas, migrations, refusal of foreign and newer files, append-only events. Tests about
the SQLite file itself are marked ``backends("sqlite")``."""
from __future__ import annotations

import os
import stat

import pytest

from lanectl.errors import ExitCode, LanectlError
from lanectl.ledger import schema


@pytest.mark.backends("sqlite")
def test_open_creates_private_wal_ledger(backend):
    path = backend.path()
    with backend.open() as led:
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o640
        assert stat.S_IMODE(os.stat(path.parent).st_mode) == 0o750
        assert led.conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert led.conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL: a commit is on disk (docs/ledger.md)
        assert led.conn.execute("PRAGMA foreign_keys").fetchone()[0] == 1
        assert led.conn.execute("PRAGMA busy_timeout").fetchone()[0] == 5000
        assert led.version() == schema.LATEST
        assert schema.pending(led.conn) == []
        names = [r[0] for r in led.conn.execute("SELECT name FROM schema_migrations ORDER BY version")]
        assert names == [m.name for m in schema.MIGRATIONS]


def test_reopen_is_a_no_op(backend):
    backend.open().close()
    with backend.open() as led:
        assert led.conn.execute("SELECT count(*) FROM schema_migrations").fetchone()[0] == schema.LATEST


def test_tables_are_strict_with_checks(led, backend):
    with pytest.raises(backend.integrity_error):
        with led.transaction() as conn:
            conn.execute("INSERT INTO missions (class, rank, state, payload, request_hash, max_attempts, created_at,"
                         " updated_at) VALUES ('interactive', 0, 'bogus', '{}', ?, 1, 0, 0)", ("0" * 64,))
    with pytest.raises(backend.integrity_error):
        with led.transaction() as conn:
            conn.execute("INSERT INTO lanes (name, state, updated_at) VALUES ('x', 'active', 'not a number')")


def test_events_are_append_only(led, backend):
    with led.transaction() as conn:
        conn.execute("INSERT INTO events (at, kind) VALUES (1, 'submitted')")
    for sql in ("UPDATE events SET kind = 'x'", "DELETE FROM events"):
        with pytest.raises(backend.integrity_error, match="append-only"):
            with led.transaction() as conn:
                conn.execute(sql)
    assert led.conn.execute("SELECT kind FROM events").fetchall() == [("submitted",)]


@pytest.mark.backends("sqlite")
def test_newer_schema_is_refused_and_untouched(backend):
    path = backend.path()
    backend.open().close()
    conn = backend.connect()
    conn.execute(f"PRAGMA user_version = {schema.LATEST + 1}")
    conn.commit()
    conn.close()
    before = path.read_bytes()
    with pytest.raises(LanectlError) as err:
        backend.open()
    assert err.value.code == "ledger_too_new"
    assert err.value.exit_code == ExitCode.CONFIG
    assert "upgrade lanectl" in str(err.value)
    assert path.read_bytes() == before


@pytest.mark.backends("sqlite")
@pytest.mark.parametrize("content", [b"hello, this is not a database at all\n" * 10, b"\x00" * 4096])
def test_not_sqlite_is_refused_and_untouched(backend, content):
    path = backend.path()
    path.parent.mkdir(parents=True)
    path.write_bytes(content)
    with pytest.raises(LanectlError) as err:
        backend.open()
    assert err.value.code == "ledger_not_sqlite"
    assert err.value.exit_code == ExitCode.CONFIG
    assert str(path) in err.value.message
    assert path.read_bytes() == content
    assert not path.with_name(path.name + "-wal").exists()


@pytest.mark.backends("sqlite")
def test_directory_as_ledger_is_refused(backend):
    backend.path().mkdir(parents=True)
    with pytest.raises(LanectlError) as err:
        backend.open()
    assert err.value.exit_code == ExitCode.CONFIG


def test_transaction_rolls_back_and_nests(led):
    with pytest.raises(RuntimeError):
        with led.transaction() as conn:
            conn.execute("INSERT INTO lanes (name, updated_at) VALUES ('a', 0)")
            raise RuntimeError
    with led.transaction() as conn:
        conn.execute("INSERT INTO lanes (name, updated_at) VALUES ('b', 0)")
        with pytest.raises(RuntimeError):
            with led.transaction():
                conn.execute("INSERT INTO lanes (name, updated_at) VALUES ('c', 0)")
                raise RuntimeError
    assert [r[0] for r in led.conn.execute("SELECT name FROM lanes")] == ["b"]


@pytest.mark.backends("sqlite")
def test_queue_queries_use_the_partial_indexes(led):
    from lanectl.ledger import tick

    def plan(sql: str, args: tuple) -> str:
        return str(led.conn.execute("EXPLAIN QUERY PLAN " + sql, args).fetchall())

    # finding the groups is one seek each, and reading a group's head walks its part of the index in order
    for sql, args in zip(tick._GROUP_NEXT, ((0, "", "[]"), (0, ""), (0,))):
        seek = plan(sql, args)
        assert "missions_queue" in seek and "TEMP B-TREE" not in seek, seek
    head = plan("SELECT id FROM missions INDEXED BY missions_queue WHERE state = 'queued' AND rank = 0 AND target = ? AND tags = ? "
                "ORDER BY id LIMIT 5", ("alpha", "[]"))
    assert "missions_queue" in head and "TEMP B-TREE" not in head, head
    edf = plan("SELECT id FROM missions INDEXED BY missions_group_edf WHERE state = 'queued' AND rank = 1 AND deadline IS NOT NULL "
               "AND target = ? AND tags = ? ORDER BY deadline LIMIT 5", ("alpha", "[]"))
    assert "missions_group_edf" in edf and "TEMP B-TREE" not in edf, edf


@pytest.mark.backends("sqlite")
@pytest.mark.parametrize("poll", [True, False], ids=["lanectl-wait", "sqlite-handler"])
def test_a_writer_waits_for_the_lock_then_gets_it_or_fails_with_ledger_busy(backend, poll):
    import threading
    import time

    from lanectl.errors import LanectlError

    holder = backend.open("l")
    waiter = backend.open("l", busy_timeout_s=0.3, busy_poll=poll)
    holder.conn.execute("BEGIN IMMEDIATE")
    t = time.monotonic()
    with pytest.raises(LanectlError) as exc:
        with waiter.transaction():
            pass
    assert exc.value.code == "ledger_busy" and 0.25 <= time.monotonic() - t < 3
    threading.Timer(0.1, lambda: holder.conn.execute("COMMIT")).start()
    with waiter.transaction() as conn:  # the lock is released while it waits: it gets in
        conn.execute("INSERT INTO lanes (name, updated_at) VALUES ('w', 0)")
    assert waiter.conn.execute("PRAGMA busy_timeout").fetchone()[0] == 300  # restored for other statements
    assert holder.conn.execute("SELECT count(*) FROM lanes WHERE name = 'w'").fetchone()[0] == 1
    holder.close()
    waiter.close()

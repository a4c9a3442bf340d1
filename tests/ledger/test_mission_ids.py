"""Issue 10, finding 8: a mission id is never handed out twice, on a new ledger and on one migrated from schema
version 2 (migration step 0003_mission_ids_never_reused: ``AUTOINCREMENT``)."""
from __future__ import annotations

import sqlite3

import pytest

from lanectl.ledger import Ledger, schema
from lanectl.ledger import missions as ms
from tests.ledger.conftest import T0, make_fleet


def _submit(led: Ledger, fleet, i: int) -> int:
    return ms.submit(led, fleet, cls="background", payload={"argv": ["x", str(i)]}, now=T0 + i).mission.id


def test_mission_ids_are_never_reused_after_the_newest_is_gone(backend) -> None:  # type: ignore[no-untyped-def]
    fleet = make_fleet(backend.root)
    with backend.open() as led:
        ids = [_submit(led, fleet, i) for i in range(3)]
        ms.cancel(led, ids[-1], now=T0 + 5)
        with led.transaction() as conn:  # what a lost commit, a prune or a hand edit leaves
            conn.execute("UPDATE retention SET horizon = ?", (T0 + 6,))  # a prune (only old finished ones go)
            conn.execute("DELETE FROM missions WHERE id = ?", (ids[-1],))
        assert _submit(led, fleet, 9) == ids[-1] + 1


def _old_ledger(conn: sqlite3.Connection, version: int) -> None:
    """A ledger as lanectl left it at schema ``version`` (the steps of that time, run as they were)."""
    conn.execute("PRAGMA journal_mode = WAL")
    for n, step in enumerate(schema.MIGRATIONS[:version], start=1):
        conn.execute("BEGIN")
        for stmt in schema._statements(step.sql):
            conn.execute(stmt)
        conn.execute("INSERT INTO schema_migrations VALUES (?, ?, ?)", (n, step.name, T0))
        conn.execute(f"PRAGMA user_version = {n}")
        conn.execute("COMMIT")
    conn.close()


@pytest.mark.backends("sqlite")  # SQLite's migration steps 1-3 (the PostgreSQL schema starts at the latest)
def test_an_old_ledger_is_migrated_and_never_reuses_ids(backend) -> None:  # type: ignore[no-untyped-def]
    _old_ledger(backend.connect(isolation_level=None), 2)
    fleet = make_fleet(backend.root)
    with backend.open(migrate=False) as old:  # rows as the version-2 code wrote them: plain INTEGER PRIMARY KEY
        with old.transaction() as conn:
            ids = []
            for i in range(5):
                ids.append(conn.execute(
                    "INSERT INTO missions (class, rank, state, payload, request_hash, max_attempts, created_at, "
                    "updated_at) VALUES ('background', 2, 'queued', ?, ?, 3, ?, ?) RETURNING id",
                    (f'{{"argv":["x","{i}"]}}', f"{i:064d}", T0 + i, T0 + i)).fetchone()[0])
                conn.execute("INSERT INTO events (at, kind, mission) VALUES (?, 'submitted', ?)", (T0 + i, ids[-1]))
            conn.execute("DELETE FROM missions WHERE id IN (?, ?)", (ids[-1], ids[-2]))  # its events remain
    with backend.open() as led:
        assert led.version() == schema.LATEST
        assert "AUTOINCREMENT" in led.conn.execute("SELECT sql FROM sqlite_master WHERE name = 'missions'").fetchone()[0]
        assert led.conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        assert led.conn.execute("PRAGMA foreign_key_check").fetchall() == []
        assert led.conn.execute("PRAGMA foreign_keys").fetchone()[0] == 1
        kept = [r["id"] for r in led.query("SELECT id FROM missions ORDER BY id")]
        assert kept == ids[:3]
        depth = led.conn.execute("SELECT sum(n) FROM queue_depth").fetchone()[0]
        assert _submit(led, fleet, 9) == ids[-1] + 1  # not ids[-2]: the events still name the deleted ones
        assert led.conn.execute("SELECT sum(n) FROM queue_depth").fetchone()[0] == depth + 1  # triggers rebuilt
        names = {r["name"] for r in led.query("SELECT name FROM sqlite_master WHERE tbl_name = 'missions'")}
        assert {"missions_queue", "missions_edf", "missions_active", "missions_state", "missions_session",
                "queue_depth_insert", "queue_depth_leave", "queue_depth_enter", "queue_depth_delete"} <= names

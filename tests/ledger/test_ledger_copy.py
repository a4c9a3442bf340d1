"""``lanectl ledger copy`` (lanectl.ledger.transfer, issue 12 item 5): a ledger moves between SQLite and PostgreSQL
and back, every table of the schema with it, verified by counts and checksums; a non-empty destination, a source at
another schema version and a destination that would not match are refused with nothing written.

Each test runs with its backend as the source engine; the other engine is the middle of the round trip (a fresh
database of the session's PostgreSQL server, or a new file)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lanectl.errors import ExitCode, LanectlError
from lanectl.states import MISSION_STATES
from lanectl.ledger import Ledger, hosts, lanes as lane_ops, missions as ms, retention, rollups, schema, tick, transfer
from tests.ledger.conftest import T0, make_fleet, open_ledger



def _dispatch(led: Ledger, fleet: Any, now: float) -> list[ms.Dispatch]:
    return tick.run_once(led, fleet, now=now).dispatches


def build_world(led: Ledger, fleet: Any, tmp: Path) -> None:
    """A ledger with a row in every table: missions in every state, attempts, sessions, lanes, hosts, events,
    usage, queue waits, rollups, and a prune behind it (the retention row moved, an archive written)."""
    now = T0
    sub = lambda **kw: ms.submit(led, fleet, now=now, **kw).mission.id  # noqa: E731
    hosts.register(led, "web-1", "a" * 32, "boot-1", 4242, now, 10.0, sorted(fleet.lanes))  # lanes.host too
    # old history that the prune below archives and deletes
    old = sub(cls="interactive", payload={"old": True})
    d = {x.mission: x for x in _dispatch(led, fleet, now)}
    ms.complete(led, old, lane=d[old].lane, attempt=1, token=d[old].token, now=now + 1, result={"ok": 1})
    now = T0 + 3600
    done = sub(cls="interactive", payload={"argv": ["true"], "n": 1.5, "big": 10 ** 15}, tags=[])
    failed = sub(cls="interactive", payload={"k": "é ü \u2603"})
    dead = sub(cls="background", payload=[1, 2, 3], max_attempts=1)
    running = sub(cls="interactive", payload={"s": "x"}, session="alpha:chat-1")
    d = {x.mission: x for x in _dispatch(led, fleet, now)}
    assert {done, failed, dead, running} <= set(d), d
    ms.complete(led, done, lane=d[done].lane, attempt=1, token=d[done].token, now=now + 1,
                result={"out": "hi", "z": None, "a": [1.0, 2]})
    ms.fail(led, failed, lane=d[failed].lane, attempt=1, token=d[failed].token, now=now + 1, error="boom", retry=False)
    ms.fail(led, dead, lane=d[dead].lane, attempt=1, token=d[dead].token, now=now + 1, error="no more")
    ms.started(led, running, lane=d[running].lane, attempt=1, token=d[running].token, now=now + 2, lease_sec=600)
    now += 10
    dispatched = sub(cls="deadline", payload={"d": 1}, deadline=now + 7200)
    _dispatch(led, fleet, now)
    cancelled = sub(cls="interactive", payload={"c": 1})
    ms.cancel(led, cancelled, now=now + 1)
    expired = sub(cls="deadline", payload={"e": 1}, deadline=now + 5)
    sub(cls="interactive", payload={"q": 1}, tags=["gpu"])  # the gpu lane takes no interactive work: it waits
    lane_ops.set_weight(led, "beta", 7, now=now)
    now += 60
    _dispatch(led, fleet, now)  # expires the deadline, records the waits
    with led.transaction() as conn:
        rollups.roll_up(conn, now + 3 * 3600, max_buckets=50)
    retention.prune(led, cutoff=T0 + 100, archive=tmp / "archive.jsonl.gz", now=now + 100)
    got = {m.state for m in ms.list_missions(led, limit=100)}
    assert got == set(MISSION_STATES), got
    assert ms.get(led, expired).state == "expired" and ms.get(led, dispatched).state == "dispatched"


def tables_of(led: Ledger) -> dict[str, int]:
    return {t: led.conn.execute(f"SELECT count(*) FROM {t}").fetchone()[0] for t in transfer._names(led, "tables")}


def sums(res: transfer.CopyResult) -> dict[str, tuple[int, str]]:
    return {t.name: (t.rows, t.source_sha256) for t in res.tables}


@pytest.fixture
def other(backend_name: str, request: pytest.FixtureRequest, tmp_path: Path):
    """Locations on the engine the backend is not: ``other()`` gives a new one each call (nothing created yet on
    SQLite; an empty database on PostgreSQL)."""
    made: list[str] = []
    if backend_name == "sqlite":
        server = request.getfixturevalue("pg_server")

        def new() -> str:
            made.append(server.create_db("copy", empty=True))
            return server.url(made[-1])
        yield new
        for db in made:
            server.drop_db(db)
    else:
        n = iter(range(1, 100))
        yield lambda: str(tmp_path / "other" / f"copy{next(n)}.db")


def test_round_trip_through_the_other_engine_keeps_every_row_and_a_working_ledger(backend, other, tmp_path):
    fleet = make_fleet(tmp_path)
    src = backend.open()
    build_world(src, fleet, tmp_path)
    counts = tables_of(src)
    assert sorted(counts) == sorted(transfer._names(src, "tables"))
    # every table of the schema holds rows here: a table added by a later migration must be added to build_world,
    # and is then copied and compared like the others
    assert [t for t, n in counts.items() if n == 0] == []
    max_id = src.conn.execute("SELECT max(id) FROM missions").fetchone()[0]
    mark = {t: m for t, (_, m) in transfer._id_marks(src, list(counts), {"missions": ["id"], "events": ["id"]}).items()}
    assert set(mark) == {"missions", "events"}
    src.close()

    middle = other()
    told: list[str] = []
    there = transfer.copy(backend.location(), middle, progress=told.append)
    assert f"copying events: {counts['events']}/{counts['events']} rows" in told
    assert "verifying the destination" in told
    assert there.verified and {t.name for t in there.tables} == set(counts)
    assert {t.name: t.rows for t in there.tables} == counts
    back = backend.location("back")
    again = transfer.copy(middle, back)
    assert sums(again) == sums(there)  # identical rows on all three, checksums as computed on each side
    assert all(t.match for t in again.tables) and again.verified
    assert again.id_marks["missions"]["destination"] >= mark["missions"] >= max_id

    same = transfer.copy(backend.location(), backend.location("same"))  # and to the same engine
    assert sums(same) == sums(there) and same.verified

    led = open_ledger(back)
    try:
        assert tables_of(led) == counts
        new = ms.submit(led, fleet, cls="interactive", payload={"after": "copy"}, now=T0 + 9000).mission.id
        assert new > mark["missions"]  # ids continue past the highest ever handed out, never reused
        assert new in {x.mission for x in _dispatch(led, fleet, T0 + 9001)}
        assert ms.get(led, new).state == "dispatched"
        assert led.version() == schema.LATEST
    finally:
        led.close()


def test_a_destination_that_holds_anything_is_refused_and_left_as_it_was(backend, other, tmp_path):
    fleet = make_fleet(tmp_path)
    src = backend.open()
    ms.submit(src, fleet, cls="interactive", payload={"a": 1}, now=T0)
    src.close()
    dst = other()
    transfer.copy(backend.location(), dst)
    led = open_ledger(dst)
    ms.submit(led, fleet, cls="interactive", payload={"mine": 1}, now=T0 + 5)
    before = tables_of(led)
    led.close()
    with pytest.raises(LanectlError) as err:
        transfer.copy(backend.location(), dst)
    assert err.value.code == "ledger_not_empty" and err.value.exit_code == ExitCode.CONFLICT
    assert "missions (2 rows)" in err.value.message and "events" in err.value.message
    led = open_ledger(dst)
    try:
        assert tables_of(led) == before
    finally:
        led.close()


def _set_version(led: Ledger, version: int) -> None:
    if led.dialect == "postgresql":
        led.conn.execute("DELETE FROM schema_migrations WHERE version > ?", (min(version, schema.LATEST),))
        if version > schema.LATEST:
            led.conn.execute("INSERT INTO schema_migrations (version, name, applied_at) VALUES (?, 'future', 0)",
                             (version,))
    else:
        led.conn.execute(f"PRAGMA user_version = {version:d}")


@pytest.mark.parametrize("version, code, exit_code", [
    (schema.LATEST - 1, "ledger_needs_migration", ExitCode.CONFLICT),
    (schema.LATEST + 1, "ledger_too_new", ExitCode.CONFIG),
])
def test_a_source_at_another_schema_version_is_refused(backend, other, tmp_path, version, code, exit_code):
    led = backend.open()
    ms.submit(led, make_fleet(tmp_path), cls="interactive", payload={}, now=T0)
    _set_version(led, version)
    led.close()
    dst = other()
    with pytest.raises(LanectlError) as err:
        transfer.copy(backend.location(), dst)
    assert err.value.code == code and err.value.exit_code == exit_code
    if code == "ledger_needs_migration":
        assert "lanectl ledger migrate" in (err.value.hint or "")
    if dst.startswith("postgresql"):
        assert schema.pg_current_version(open_ledger(dst, migrate=False).conn) == 0  # not even migrated
    else:
        assert not Path(dst).exists()  # the file it would have created is not left behind


_EVIL = {
    "sqlite": ["CREATE TRIGGER evil AFTER INSERT ON lanes BEGIN UPDATE lanes SET swrr = swrr + 1 "
               "WHERE name = NEW.name; END"],
    "postgresql": ["CREATE FUNCTION evil() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN NEW.swrr := NEW.swrr + 1; "
                   "RETURN NEW; END $$; CREATE TRIGGER evil BEFORE INSERT ON lanes FOR EACH ROW "
                   "EXECUTE FUNCTION evil();"],
}


def test_a_destination_that_changes_what_it_is_given_is_rolled_back(backend, tmp_path):
    """A trigger planted on the destination alters each lane row as it is inserted: the checksums differ, the copy
    fails (exit 1) naming the table, and the destination keeps nothing of it."""
    fleet = make_fleet(tmp_path)
    src = backend.open()
    ms.submit(src, fleet, cls="interactive", payload={}, now=T0)
    _dispatch(src, fleet, T0)
    src.close()
    dst = backend.open("dst")
    for stmt in _EVIL[backend.name]:
        (dst.conn.script if backend.name == "postgresql" else dst.conn.execute)(stmt)
    dst.close()
    with pytest.raises(LanectlError) as err:
        transfer.copy(backend.location(), backend.location("dst"))
    assert err.value.code == "ledger_copy_mismatch" and err.value.exit_code == ExitCode.ERROR
    assert "lanes" in err.value.message and "rolled back" in err.value.message
    dst = backend.open("dst")
    assert tables_of(dst)["missions"] == 0 and tables_of(dst)["lanes"] == 0


def test_the_same_ledger_twice_is_refused(backend):
    backend.open().close()
    with pytest.raises(LanectlError) as err:
        transfer.copy(backend.location(), backend.location())
    assert err.value.code == "ledger_copy_same" and err.value.exit_code == ExitCode.USAGE


@pytest.mark.backends("postgresql")
def test_the_json_columns_and_id_tables_are_those_of_the_postgresql_catalog(backend):
    led = backend.open()
    rows = led.conn.execute("SELECT table_name, column_name FROM information_schema.columns WHERE "
                            "table_schema = current_schema() AND data_type = 'jsonb'").fetchall()
    want: dict[str, set[str]] = {}
    for t, c in rows:
        want.setdefault(t, set()).add(c)
    assert {t: set(c) for t, c in transfer.json_columns().items()} == want
    identity = {t for (t,) in led.conn.execute("SELECT table_name FROM information_schema.columns WHERE "
                                               "table_schema = current_schema() AND is_identity = 'YES'").fetchall()}
    assert transfer.id_tables() == identity == {"missions", "events"}


_text = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=20)
"""Text PostgreSQL's jsonb can hold (no NUL: a payload with one cannot be copied there, ledger_copy_refused)."""
_json = st.recursive(
    st.none() | st.booleans() | st.integers(-2 ** 70, 2 ** 70) | st.floats(allow_nan=False, allow_infinity=False)
    | _text, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(_text, inner, max_size=4), max_leaves=12)


@pytest.mark.backends("postgresql")
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(value=_json, other_value=_json)
def test_a_json_value_renders_the_same_however_postgresql_rewrites_its_text(backend, value, other_value):
    """jsonb reorders keys, drops spaces and rewrites numbers (1e2 -> 100): the canonical rendering of what the
    ledger reads back equals that of what was written, and tells different values apart."""
    led = backend.open("json")
    text = json.dumps(value, indent=1)
    try:
        back = led.conn.execute("SELECT ?::jsonb::text", (text,)).fetchone()[0]
    finally:
        led.close()
    cols = frozenset({"v"})
    assert transfer.render({"v": back}, cols) == transfer.render({"v": text}, cols)
    if transfer.json_value(json.dumps(value)) != transfer.json_value(json.dumps(other_value)):
        assert transfer.render({"v": json.dumps(other_value)}, cols) != transfer.render({"v": text}, cols)


@given(x=st.floats(allow_nan=False), y=st.floats(allow_nan=False))
@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_floats_render_exactly(backend, x, y):
    assert (transfer.render({"a": x}) == transfer.render({"a": y})) == (x == y and str(x) == str(y))


@pytest.mark.backends("sqlite")  # SQLite's own old steps (the PostgreSQL schema starts at the latest version)
def test_an_old_source_is_refused_until_ledger_migrate_brings_it_up(backend, other, tmp_path):
    from lanectl.ledger import where

    conn = backend.connect(isolation_level=None)
    conn.execute("PRAGMA journal_mode = WAL")
    for n, step in enumerate(schema.MIGRATIONS[:schema.LATEST - 1], start=1):  # as lanectl left it back then
        conn.execute("BEGIN")
        for stmt in schema._statements(step.sql):
            conn.execute(stmt)
        conn.execute("INSERT INTO schema_migrations VALUES (?, ?, ?)", (n, step.name, T0))
        conn.execute(f"PRAGMA user_version = {n}")
        conn.execute("COMMIT")
    conn.close()
    dst = other()
    with pytest.raises(LanectlError) as err:
        transfer.copy(backend.location(), dst)
    assert err.value.code == "ledger_needs_migration"
    res = where.migrate(backend.location())
    assert (res["from_version"], res["to_version"], res["applied"]) == (
        schema.LATEST - 1, schema.LATEST, [schema.MIGRATIONS[-1].name])
    assert where.migrate(backend.location())["changed"] is False
    assert transfer.copy(backend.location(), dst).verified


def test_a_writer_during_the_copy_does_not_tear_it(backend, other, tmp_path):
    """The source is read in one snapshot: missions submitted (by another connection, as a running supervisor or
    producer would) while the copy runs are in none of its tables, so no event of the copy names a mission it lacks,
    and the counts are those of the moment the copy began."""
    fleet = make_fleet(tmp_path)
    src = backend.open()
    for i in range(5):
        ms.submit(src, fleet, cls="interactive", payload={"i": i}, now=T0 + i)
    before = tables_of(src)
    writer = backend.open()
    late: list[int] = []

    def meanwhile(text: str) -> None:
        if text.startswith("copying") and len(late) < 3:  # between the copy's reads of its tables
            late.append(ms.submit(writer, fleet, cls="interactive", payload={"late": len(late)}, now=T0 + 99).mission.id)

    dst = other()
    res = transfer.copy(backend.location(), dst, progress=meanwhile)
    assert len(late) == 3 and res.verified
    assert {t.name: t.rows for t in res.tables} == before
    copy = open_ledger(dst)
    try:
        ids = {r[0] for r in copy.conn.execute("SELECT id FROM missions").fetchall()}
        named = {r[0] for r in copy.conn.execute("SELECT mission FROM events WHERE mission IS NOT NULL").fetchall()}
        assert named <= ids and not ids & set(late)
    finally:
        copy.close()
    assert tables_of(src)["missions"] == before["missions"] + 3


@pytest.mark.backends("postgresql")
def test_ids_handed_out_by_postgresql_but_rolled_back_are_never_reused_on_sqlite(backend, other, tmp_path):
    """A PostgreSQL sequence moves for transactions that rolled back: the mission counter on the SQLite copy starts
    past it (a mission id is never given twice); events continue past the highest copied (SQLite's events have no
    counter, and no reader ever saw an id that was not committed)."""
    fleet = make_fleet(tmp_path)
    led = backend.open()
    ms.submit(led, fleet, cls="interactive", payload={}, now=T0)
    led.conn.execute("SELECT setval(pg_get_serial_sequence('missions', 'id'), 500)")  # 499 submits rolled back
    led.conn.execute("SELECT setval(pg_get_serial_sequence('events', 'id'), 900)")
    led.close()
    dst = other()
    res = transfer.copy(backend.location(), dst)
    assert res.verified and res.id_marks == {"missions": {"source": 500, "destination": 500},
                                             "events": {"source": 1, "destination": 1}}
    copy = open_ledger(dst)
    try:
        assert ms.submit(copy, fleet, cls="interactive", payload={"n": 2}, now=T0 + 1).mission.id == 501
    finally:
        copy.close()
    back = transfer.copy(dst, backend.location("back"))  # and to PostgreSQL again: the sequence at 501
    assert back.verified and back.id_marks["missions"] == {"source": 501, "destination": 501}

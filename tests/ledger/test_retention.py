"""Retention (issue 17 item 4): `ledger prune` archives exactly the finished old history, then deletes it.

A generated ledger holds old and young missions in every state, with their attempts and events, and events of no
mission; the prune must archive (and delete) exactly the finished missions last changed before the cutoff, their
attempts and events, and the old events of no mission; the archive must be readable and complete; nothing
unfinished or young may change; the triggers must still refuse to delete or update young events; space must go
back to the file system.
"""
from __future__ import annotations

import gzip
import json
import sqlite3
from pathlib import Path

import pytest

from lanectl.config import ClassPolicy, Lane, LaneSet, LeaseSettings, Settings
from lanectl.errors import ExitCode, LanectlError
from lanectl.ledger import Ledger, retention, tick
from lanectl.ledger import missions as ms
from lanectl.states import CLASSES

OLD = 1_700_000_000.0
DAY = 86400.0
YOUNG = OLD + 40 * DAY
CUTOFF = OLD + 30 * DAY


def big_fleet(tmp: Path) -> LaneSet:
    lanes = {"alpha": Lane(port=9001, workspace="/var/lib/lanes/alpha", capacity=1024),
             "beta": Lane(port=9002, workspace="/var/lib/lanes/beta", capacity=1024),
             "gamma": Lane(port=9003, workspace="/var/lib/lanes/gamma", capacity=1)}  # drained: its queue waits
    classes = {c: ClassPolicy(queue_limit=10**7, max_attempts=2) for c in CLASSES}
    settings = Settings(classes=classes, leases=LeaseSettings(lease_sec=1e9, retry_backoff_sec=0))
    return LaneSet(lanes, settings, tmp, tmp / "lanes.d")


def generation(led: Ledger, fleet: LaneSet, t: float, n: int, *, finish: bool = True) -> dict[str, list[int]]:
    """Submit n missions at t and take them through every outcome: succeeded, failed (not retried), dead (two failed
    attempts), cancelled while queued; with finish=False a tenth is left running and n/10 more left queued. Returns
    the mission ids by fate."""
    fates: dict[str, list[int]] = {k: [] for k in ("succeeded", "failed", "dead", "cancelled", "running", "queued")}

    def submit(count: int, lane: str | None = None) -> list[int]:
        out: list[int] = []
        for i in range(0, count, 500):
            reqs = [ms.SubmitRequest(cls="background", payload={"argv": ["job", str(j)], "pad": "x" * 200},
                                     session=f"alpha:s{j % 7}" if j % 3 == 0 and lane is None else None, lane=lane)
                    for j in range(i, min(count, i + 500))]
            out += [r.mission.id for r in ms.submit_many(led, fleet, reqs, now=t)]
        return out

    ids = submit(n)
    fate_of = {m: k % 10 for k, m in enumerate(ids)}
    for m, f in fate_of.items():
        if f == 9:
            ms.cancel(led, m, now=t + 1)
            fates["cancelled"].append(m)
    step = 10.0
    while True:
        res = tick.run_once(led, fleet, now=t + step)
        if not res.dispatches:
            break
        for d in res.dispatches:
            f = fate_of[d.mission]
            ms.started(led, d.mission, lane=d.lane, attempt=d.attempt, token=d.token, now=t + step, lease_sec=1e9)
            if f <= 4 or (f == 8 and finish):
                ms.complete(led, d.mission, lane=d.lane, attempt=d.attempt, token=d.token, now=t + step,
                            result={"ok": f})
                fates["succeeded"].append(d.mission)
            elif f in (5, 6):
                ms.fail(led, d.mission, lane=d.lane, attempt=d.attempt, token=d.token, now=t + step,
                        error="exit code 1", retry=False)
                fates["failed"].append(d.mission)
            elif f == 7:
                ms.fail(led, d.mission, lane=d.lane, attempt=d.attempt, token=d.token, now=t + step,
                        error="lost", retry=True)  # re-queued once, then dead
                if d.attempt == 2:
                    fates["dead"].append(d.mission)
            else:
                fates["running"].append(d.mission)
        step += 10.0
    if not finish:
        ms.set_lane(led, "gamma", now=t + step, state="drained")
        fates["queued"] = submit(max(1, n // 10), lane="gamma")
    ms.set_lane(led, "alpha", now=t + step, healthy=False)  # events of no mission
    ms.set_lane(led, "alpha", now=t + step + 1, healthy=True)
    return fates


def dump(conn: sqlite3.Connection, table: str, key: str) -> dict[object, tuple]:
    cur = conn.execute(f"SELECT * FROM {table}")
    cols = [d[0] for d in cur.description]
    return {tuple(r[cols.index(k)] for k in key.split(",")): dict(zip(cols, r)) for r in cur.fetchall()}


@pytest.fixture
def world(backend, tmp_path: Path):
    fleet = big_fleet(tmp_path)
    led = backend.open()
    old = generation(led, fleet, OLD, 1500, finish=False)
    young = generation(led, fleet, YOUNG, 300, finish=True)
    yield led, fleet, old, young
    led.close()


@pytest.mark.backends("sqlite")  # and the space goes back to the file system
def test_prune_archives_exactly_the_finished_old_history(world, backend, tmp_path: Path) -> None:
    led, fleet, old, young = world
    conn = led.conn
    assert old["running"] and old["queued"] and old["dead"] and old["failed"] and old["cancelled"]
    before = {t: dump(conn, t, k) for t, k in (("missions", "id"), ("attempts", "mission,n"), ("events", "id"))}
    finished_old = {m for m, row in before["missions"].items()
                    if row["state"] in retention.FINISHED and row["updated_at"] < CUTOFF}
    assert finished_old == {(m,) for f in ("succeeded", "failed", "dead", "cancelled") for m in old[f]}
    unfinished_old = {(m,) for m in old["running"] + old["queued"]}
    top = max(before["events"])
    want_events = {k for k, e in before["events"].items()
                   if ((e["mission"],) in finished_old) or (e["mission"] is None and e["at"] < CUTOFF and k != top)}
    want_attempts = {k for k in before["attempts"] if (k[0],) in finished_old}
    size_before = backend.path().stat().st_size

    archive = tmp_path / "archive" / "old.jsonl.gz"
    archive.parent.mkdir()
    res = retention.prune(led, cutoff=CUTOFF, archive=archive, now=YOUNG + DAY, batch=97)

    # the archive: readable (plain gzip + JSON lines), complete (trailer), exactly the rows taken, as they were
    lines = [json.loads(x) for x in gzip.decompress(archive.read_bytes()).splitlines()]
    assert lines[0]["lanectl_archive"] == 1 and lines[0]["cutoff"] == CUTOFF
    assert lines[-1] == {"end": True, "missions": len(finished_old), "attempts": len(want_attempts),
                         "events": len(want_events)}
    arch = retention.load_archive(archive)
    assert {(m["id"],) for m in arch["missions"]} == finished_old
    assert {(a["mission"], a["n"]) for a in arch["attempts"]} == want_attempts
    assert {(e["id"],) for e in arch["events"]} == want_events
    for m in arch["missions"]:
        assert m == before["missions"][(m["id"],)]
    for a in arch["attempts"]:
        assert a == before["attempts"][(a["mission"], a["n"])]
    for e in arch["events"]:
        assert e == before["events"][(e["id"],)]
    assert archive.stat().st_mode & 0o777 == 0o600
    assert not list(archive.parent.glob("*.tmp-*"))

    # the ledger: exactly the rest, unchanged
    after = {t: dump(conn, t, k) for t, k in (("missions", "id"), ("attempts", "mission,n"), ("events", "id"))}
    assert after["missions"] == {k: v for k, v in before["missions"].items() if k not in finished_old}
    assert after["attempts"] == {k: v for k, v in before["attempts"].items() if k not in want_attempts}
    prune_events = {k: e for k, e in after["events"].items() if e["kind"] == "prune"}
    # one when the deleting began (on record even if the prune is killed), one with the figures at the end
    phases = [json.loads(e["data"]) for _, e in sorted(prune_events.items())]
    assert [p["phase"] for p in phases] == ["deleting", "done"] and {p["archive"] for p in phases} == {str(archive)}
    assert (phases[0]["missions_from"], phases[0]["missions_to"]) == (min(finished_old)[0], max(finished_old)[0])
    assert {k: e for k, e in after["events"].items() if k not in prune_events} == \
        {k: v for k, v in before["events"].items() if k not in want_events}
    assert unfinished_old <= set(after["missions"])
    assert any(e["at"] < CUTOFF for e in after["events"].values())  # old events of unfinished missions are kept
    assert (res.missions, res.attempts, res.events, res.kept) == (len(finished_old), len(want_attempts),
                                                                len(want_events), 0)
    st = retention.state(led)
    assert st["horizon"] == CUTOFF and st["pruned_missions"] == res.missions and st["last_archive"] == str(archive)

    # space goes back to the file system (a new ledger is in incremental auto-vacuum mode)
    assert conn.execute("PRAGMA freelist_count").fetchone()[0] == 0
    assert res.file_bytes_after < res.file_bytes_before and res.reclaimed_bytes > 0
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    assert backend.path().stat().st_size < size_before

    # the ledger still works: the queued old missions dispatch once their lane is back
    assert ms.get(led, old["queued"][0]).state == "queued"
    ms.set_lane(led, "gamma", now=YOUNG + 2 * DAY, state="active")
    assert tick.run_once(led, fleet, now=YOUNG + 2 * DAY).dispatches

    # a pruned mission is not found, and the error says where its record went
    with pytest.raises(LanectlError) as err:
        ms.get(led, old["succeeded"][0])
    assert err.value.exit_code == ExitCode.NOT_FOUND and "pruned" in err.value.hint and str(archive) in err.value.hint
    with pytest.raises(LanectlError) as err:
        ms.get(led, 10**9)  # never handed out
    assert "pruned" not in err.value.hint

    # a second prune with the same cutoff finds nothing and writes no archive
    again = retention.prune(led, cutoff=CUTOFF, archive=tmp_path / "archive" / "again.jsonl.gz", now=YOUNG + DAY)
    assert again.archive is None and again.missions == again.events == 0
    assert not (tmp_path / "archive" / "again.jsonl.gz").exists()


def test_young_events_stay_append_only(world, backend, tmp_path: Path) -> None:
    led, fleet, old, young = world
    conn = led.conn
    (tmp_path / "a").mkdir()
    retention.prune(led, cutoff=CUTOFF, archive=tmp_path / "a" / "x.jsonl.gz", now=YOUNG + DAY)
    young_event = conn.execute("SELECT id FROM events WHERE at >= ? ORDER BY id LIMIT 1", (CUTOFF,)).fetchone()[0]
    old_of_unfinished = conn.execute("SELECT id FROM events WHERE at < ? AND mission = ?",
                                     (CUTOFF, old["running"][0])).fetchone()[0]
    newest = conn.execute("SELECT max(id) FROM events").fetchone()[0]
    refused = [
        ("DELETE FROM events WHERE id = ?", (young_event,)),
        ("UPDATE events SET kind = 'x' WHERE id = ?", (young_event,)),
        ("UPDATE events SET kind = 'x' WHERE id = ?", (old_of_unfinished,)),
        # REPLACE fires neither the update nor the delete trigger: an existing id cannot be written again
        ("INSERT OR REPLACE INTO events (id, at, kind, state, data) VALUES (?, 1.0, 'succeeded', 'x', '{}')",
         (young_event,)),
        ("DELETE FROM events WHERE id = ?", (old_of_unfinished,)),  # its mission is still in the ledger
        ("DELETE FROM events WHERE id = ?", (newest,)),
        ("DELETE FROM missions WHERE id = ?", (old["running"][0],)),  # unfinished
        ("DELETE FROM missions WHERE id = ?", (old["queued"][0],)),
        ("DELETE FROM missions WHERE id = ?", (young["succeeded"][0],)),  # finished, but young
        ("DELETE FROM attempts WHERE mission = ?", (young["succeeded"][0],)),
        ("UPDATE retention SET horizon = ?", (CUTOFF - 1,)),  # the horizon only moves forward
        ("DELETE FROM retention", ()),
    ]
    for sql, args in refused:
        with pytest.raises(backend.integrity_error):
            conn.execute(sql, args)
    assert conn.execute("SELECT count(*) FROM events WHERE id IN (?, ?, ?)",
                        (young_event, old_of_unfinished, newest)).fetchone()[0] == 3


@pytest.mark.backends("sqlite")  # the copy is SQLite's online backup
def test_a_redo_after_a_crash_between_archive_and_delete(world, backend, tmp_path: Path) -> None:
    """A prune that wrote its archive and stopped before deleting (here: the same prune run on a copy) leaves every
    row; run again with the same archive name it writes the same archive again. An archive whose rows are gone is
    never replaced."""
    led, fleet, old, young = world
    copy_path = backend.location("copy")
    dst = backend.connect("copy")
    led.conn.backup(dst)
    dst.close()
    (tmp_path / "a").mkdir()
    archive = tmp_path / "a" / "old.jsonl.gz"
    with backend.open("copy") as copy:
        retention.prune(copy, cutoff=CUTOFF, archive=archive, now=YOUNG + DAY)
    first = retention.load_archive(archive)
    n = led.conn.execute("SELECT count(*) FROM missions").fetchone()[0]
    res = retention.prune(led, cutoff=CUTOFF, archive=archive, now=YOUNG + DAY)  # the original still has its rows
    redone = retention.load_archive(archive)
    assert redone["header"]["ledger"] == str(led.path) and first["header"]["ledger"] == str(copy_path)
    assert {k: v for k, v in redone.items() if k != "header"} == {k: v for k, v in first.items() if k != "header"}
    assert res.missions == len(first["missions"]) and n - res.missions == \
        led.conn.execute("SELECT count(*) FROM missions").fetchone()[0]
    # now the rows are gone: a later prune may not replace that archive
    generation(led, fleet, OLD + DAY, 20)
    with pytest.raises(LanectlError) as err:
        retention.prune(led, cutoff=CUTOFF, archive=archive, now=YOUNG + DAY)
    assert err.value.code == "archive_exists" and err.value.exit_code == ExitCode.CONFLICT
    assert retention.load_archive(archive) == redone


def test_a_mission_retried_after_the_archive_is_kept(world, tmp_path: Path) -> None:
    led, fleet, old, young = world
    (tmp_path / "a").mkdir()
    target = old["failed"][0]

    def retry_during(phase: str, n: int) -> None:
        if phase == "archived" and ms.get(led, target).state == "failed":
            ms.retry(led, target, now=YOUNG)  # between the archive and the delete
    res = retention.prune(led, cutoff=CUTOFF, archive=tmp_path / "a" / "x.jsonl.gz", now=YOUNG + DAY,
                          progress=retry_during)
    assert res.kept == 1
    assert ms.get(led, target).state == "queued"
    assert led.conn.execute("SELECT count(*) FROM events WHERE mission = ?", (target,)).fetchone()[0] > 0


@pytest.mark.backends("sqlite")  # SQLite's auto_vacuum modes and free pages
def test_an_old_ledger_reuses_pages_and_vacuum_converts_it(backend, tmp_path: Path) -> None:
    conn = backend.connect("old")  # a ledger created before auto-vacuum: mode NONE
    conn.execute("PRAGMA journal_mode = WAL")
    conn.close()
    fleet = big_fleet(tmp_path)
    with backend.open("old") as led:
        assert led.conn.execute("PRAGMA auto_vacuum").fetchone()[0] == 0
        generation(led, fleet, OLD, 600)
        (tmp_path / "a").mkdir()
        res = retention.prune(led, cutoff=CUTOFF, archive=tmp_path / "a" / "1.jsonl.gz", now=YOUNG)
        assert res.missions > 0 and res.reclaimed_bytes == 0
        assert led.conn.execute("PRAGMA freelist_count").fetchone()[0] > 0  # reused by new rows
        res = retention.prune(led, cutoff=CUTOFF, archive=tmp_path / "a" / "2.jsonl.gz", now=YOUNG, vacuum=True)
        assert led.conn.execute("PRAGMA auto_vacuum").fetchone()[0] == 2
        assert res.reclaimed_bytes > 0 and led.conn.execute("PRAGMA freelist_count").fetchone()[0] == 0


def test_cli_ledger_prune(world, tmp_path: Path) -> None:
    """`lanectl ledger prune`: the result in the JSON envelope, a prune event, clear refusals with their exits."""
    import os
    import subprocess
    import sys

    led, fleet, old, young = world
    # the generated history is dated 2023; a cutoff of 30 days before today takes every finished mission
    n_finished = led.conn.execute(f"SELECT count(*) FROM missions WHERE {retention._FIN_SQL}").fetchone()[0]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2]), "LANECTL_CONFIG_DIR": str(tmp_path)}

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "lanectl", "ledger", "prune", "--ledger", str(led.path), *args],
                              capture_output=True, text=True, env=env, timeout=300)

    r = cli("--older-than", "30d", "--archive", str(tmp_path / "nodir" / "a.gz"))
    assert r.returncode == 3 and "does not exist" in r.stderr
    r = cli("--older-than", "soon", "--archive", str(tmp_path / "a.gz"))
    assert r.returncode == 2 and "older-than" in r.stderr
    r = cli("--older-than", "30d", "--archive", str(tmp_path / "a.gz"), "--dry-run", "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["data"]["missions"] == n_finished
    r = cli("--older-than", "30d", "--archive", str(tmp_path / "a.gz"), "--json")
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)["data"]
    assert data["missions"] == n_finished and data["archive"] == str(tmp_path / "a.gz")
    assert len(retention.load_archive(tmp_path / "a.gz")["missions"]) == n_finished
    ev = [json.loads(r[0]) for r in led.conn.execute("SELECT data FROM events WHERE kind = 'prune' ORDER BY id")]
    assert [e["phase"] for e in ev] == ["deleting", "done"] and ev[1]["missions"] == n_finished
    (tmp_path / "b.gz").write_bytes(b"not an archive")
    generation(led, fleet, OLD, 10)
    r = cli("--older-than", "30d", "--archive", str(tmp_path / "b.gz"))
    assert r.returncode == 5 and "already there" in r.stderr and (tmp_path / "b.gz").read_bytes() == b"not an archive"
    # a cron job with a missing archive directory learns of it on a day with nothing to prune too (exit 3, not 0)
    r = cli("--older-than", "3650d", "--archive", str(tmp_path / "nodir" / "c.gz"))
    assert r.returncode == 3 and "does not exist" in r.stderr, r.stdout + r.stderr


@pytest.mark.backends("sqlite")  # reads SQLite's table_info
def test_the_archive_names_every_column_the_schema_has(backend) -> None:  # type: ignore[no-untyped-def]
    """A column added by a later migration must be archived too (or a prune would lose it)."""
    from lanectl.ledger import retention

    led = backend.open("l")
    try:
        for table, cols in (("missions", retention._MISSION_COLS), ("attempts", retention._ATTEMPT_COLS),
                            ("events", retention._EVENT_COLS)):
            have = {r[1] for r in led.conn.execute(f"PRAGMA table_info({table})")}
            assert have == set(cols), (table, have ^ set(cols))
    finally:
        led.close()


def test_another_ledgers_archive_is_never_replaced(backend, tmp_path: Path) -> None:
    """Two ledgers with the same mission ids (another host, or this one recreated): a prune of the second never
    replaces the first one's archive, even though every id in it exists here."""
    fleet = big_fleet(tmp_path)
    a, b = (backend.open(n) for n in ("a", "b"))
    try:
        generation(a, fleet, OLD, 10)
        generation(b, fleet, OLD + 3600, 10)  # the same ids, other rows
        retention.prune(a, cutoff=CUTOFF, archive=tmp_path / "x.gz", now=YOUNG)
        kept = (tmp_path / "x.gz").read_bytes()
        generation(b, fleet, OLD, 5)  # b's rows under a's archived ids differ (other times, other payloads)
        with pytest.raises(LanectlError) as err:
            retention.prune(b, cutoff=CUTOFF, archive=tmp_path / "x.gz", now=YOUNG)
        assert err.value.code == "archive_exists" and (tmp_path / "x.gz").read_bytes() == kept
    finally:
        a.close()
        b.close()


def test_one_prune_at_a_time(backend, tmp_path: Path) -> None:
    from lanectl.ledger.retention import _one_prune_at_a_time

    fleet = big_fleet(tmp_path)
    led = backend.open("l")
    other = backend.open("l")
    try:
        generation(led, fleet, OLD, 10)
        with _one_prune_at_a_time(other):  # the supervisor's pass, say
            with pytest.raises(LanectlError) as err:
                retention.prune(led, cutoff=CUTOFF, archive=tmp_path / "a.gz", now=YOUNG)
            assert err.value.code == "prune_running" and err.value.exit_code == ExitCode.CONFLICT
        assert not (tmp_path / "a.gz").exists()
        assert retention.prune(led, cutoff=CUTOFF, archive=tmp_path / "a.gz", now=YOUNG).missions > 0
    finally:
        led.close()
        other.close()


def test_a_prune_killed_while_deleting_is_on_record(backend, tmp_path: Path) -> None:
    """The 'deleting' event (with the archive and the id range) is committed before the first delete, so a prune
    killed midway is on record and 'mission show' names the archive that holds a pruned mission."""
    fleet = big_fleet(tmp_path)
    led = backend.open("l")
    try:
        generation(led, fleet, OLD, 30)
        calls = []

        def stop_after_first_batch(what: str, n: int) -> None:
            calls.append((what, n))
            if what == "deleted":
                raise KeyboardInterrupt  # as a kill -9 would, after the first batch
        with pytest.raises(KeyboardInterrupt):
            retention.prune(led, cutoff=CUTOFF, archive=tmp_path / "a.gz", now=YOUNG, batch=10,
                            progress=stop_after_first_batch)
        ev = [json.loads(r[0]) for r in led.conn.execute("SELECT data FROM events WHERE kind = 'prune'")]
        assert [e["phase"] for e in ev] == ["deleting"] and ev[0]["archive"] == str(tmp_path / "a.gz")
        gone = ev[0]["missions_from"]
        with pytest.raises(LanectlError) as err:
            ms.get(led, gone)
        assert str(tmp_path / "a.gz") in err.value.hint
    finally:
        led.close()

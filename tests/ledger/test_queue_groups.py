"""No head-of-line blocking: missions that cannot be placed never keep placeable ones from being placed.

The queue is read per group (class, bound lane, tags); these tests build large unplaceable backlogs (pinned to a
full, drained or unhealthy lane, or over quota) and check that a pass places exactly what a pass over the whole
queue would, that every blocked mission gets its wait reason and a ``waiting`` event, and that the target lane a
group is keyed by follows reroutes and session moves.
"""
from __future__ import annotations

import dataclasses

import pytest
from conftest import T0, make_fleet
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lanectl import dispatch
from lanectl.config import ClassPolicy
from lanectl.dispatch import Snapshot
from lanectl.ledger import events, schema, tick
from lanectl.ledger import lanes as lane_ops
from lanectl.ledger import missions as ms
from lanectl.ledger.events import EventKind
from lanectl.states import CLASSES

BIG = ClassPolicy(queue_limit=100_000, max_wait_sec=600)


def big_fleet(tmp_path):
    """The ledger tests' fleet with room for large backlogs, and leases that outlast every test (what is
    compared is placement, not lease expiry)."""
    f = make_fleet(tmp_path, interactive=ClassPolicy(queue_limit=100_000, max_wait_sec=30),
                   deadline=ClassPolicy(queue_limit=100_000, max_wait_sec=120), background=BIG)
    leases = f.settings.leases.model_copy(update={"lease_sec": 1e6})
    return dataclasses.replace(f, settings=f.settings.model_copy(update={"leases": leases}))


def submit_many(led, fleet, n, now, **kw):
    reqs = [ms.SubmitRequest(kw.get("cls", "background"), {"argv": ["true"]}, kw.get("deadline"), kw.get("lane"),
                             tuple(kw.get("tags", ())), kw.get("session")) for _ in range(n)]
    out = []
    for i in range(0, n, ms.MAX_BATCH):
        out += [r.mission.id for r in ms.submit_many(led, fleet, reqs[i:i + ms.MAX_BATCH], now=now)]
    return out


def queued(led):
    return {r[0] for r in led.conn.execute("SELECT id FROM missions WHERE state = 'queued'")}


def fill(led, fleet, lane, now):
    """Dispatch missions pinned to ``lane`` until it is full; returns their ids."""
    ids = submit_many(led, fleet, fleet.lanes[lane].capacity, now, lane=lane, cls="background")
    res = tick.run_once(led, fleet, now=now)
    assert {d.mission for d in res.dispatches} >= set(ids)
    return ids


def test_unpinned_work_behind_a_pinned_backlog_goes_to_an_idle_lane(led, tmp_path):
    fleet = big_fleet(tmp_path)
    fill(led, fleet, "alpha", T0)
    pinned = submit_many(led, fleet, 100, T0 + 1, lane="alpha")  # alpha is full: none of these can run
    free = submit_many(led, fleet, 3, T0 + 2)
    res = tick.run_once(led, fleet, now=T0 + 3)
    placed = {d.mission: d.lane for d in res.dispatches}
    assert set(free) <= set(placed) and not set(pinned) & set(placed)
    assert {placed[m] for m in free} <= {"beta", "gamma"}


def test_a_deadline_mission_behind_a_pinned_backlog_runs_before_its_deadline(led, tmp_path):
    fleet = big_fleet(tmp_path)
    lane_ops.drain(led, fleet, "gamma", now=T0, who="test")
    submit_many(led, fleet, 150, T0, lane="gamma", cls="deadline", deadline=T0 + 50)  # earlier than urgent
    urgent = submit_many(led, fleet, 1, T0 + 1, cls="deadline", deadline=T0 + 60)
    res = tick.run_once(led, fleet, now=T0 + 2)
    assert [d.mission for d in res.dispatches] == urgent


def test_every_blocked_mission_gets_the_reason_and_one_waiting_event(led, tmp_path):
    fleet = big_fleet(tmp_path)
    lane_ops.drain(led, fleet, "gamma", now=T0, who="test")
    pinned = submit_many(led, fleet, 1200, T0, lane="gamma")
    for i in range(3):  # WAIT_SWEEP a pass: two passes write the reason onto all 1200
        tick.run_once(led, fleet, now=T0 + 1 + i, sweep=1000)
    rows = dict(led.conn.execute("SELECT id, wait_reason FROM missions WHERE state = 'queued'").fetchall())
    assert set(rows) == set(pinned)
    reasons = set(rows.values())
    assert len(reasons) == 1 and "gamma" in reasons.pop()
    waits = events.query(led.conn, kind=EventKind.WAITING, limit=10_000)
    assert sorted(e["mission"] for e in waits if e["mission"]) == sorted(pinned)  # one each, not one per pass
    group = [e for e in waits if e["mission"] is None]
    assert len(group) == 1 and group[0]["lane"] == "gamma" and group[0]["data"]["group"] is True
    # a mission re-entering the blocked group with an old id gets the reason (and its event) again
    m = pinned[0]
    led.conn.execute("UPDATE missions SET wait_reason = NULL WHERE id = ?", (m,))  # as a fresh re-queue has
    with led.transaction() as conn:
        conn.execute("UPDATE missions SET state = 'queued' WHERE id = ?", (m,))  # fires the re-entry trigger
    tick.run_once(led, fleet, now=T0 + 10)
    assert ms.get(led, m).wait_reason is not None
    assert len(events.query(led.conn, kind=EventKind.WAITING, mission=m)) == 2


def test_an_undrained_lane_takes_its_backlog_and_the_reason_changes_with_the_cause(led, tmp_path):
    fleet = big_fleet(tmp_path)
    lane_ops.drain(led, fleet, "gamma", now=T0, who="test")
    submit_many(led, fleet, 10, T0, lane="gamma")
    tick.run_once(led, fleet, now=T0 + 1)
    drained = {r[0] for r in led.conn.execute("SELECT wait_reason FROM missions WHERE state = 'queued'")}
    lane_ops.undrain(led, fleet, "gamma", now=T0 + 2, who="test")
    res = tick.run_once(led, fleet, now=T0 + 3)
    assert [d.lane for d in res.dispatches] == ["gamma"]  # capacity 1
    assert led.conn.execute("SELECT blocked FROM queue_waits").fetchall() in ([(0,)], [(1,)])
    tick.run_once(led, fleet, now=T0 + 4)  # gamma full now: blocked again, for another reason
    now_reasons = {r[0] for r in led.conn.execute("SELECT wait_reason FROM missions WHERE state = 'queued'")}
    assert now_reasons != drained and len(now_reasons) == 1
    # a new reason for the whole group is one group event, not one per mission
    group = [e for e in events.query(led.conn, kind=EventKind.WAITING) if e["mission"] is None]
    assert [e["data"]["reason"] for e in group] == [*drained, *now_reasons]


def test_the_target_follows_reroute_and_session_moves(led, tmp_path):
    fleet = big_fleet(tmp_path)
    a = submit_many(led, fleet, 2, T0, lane="alpha")
    s = submit_many(led, fleet, 2, T0, session="beta:s1")

    def targets():
        return dict(led.conn.execute("SELECT id, target FROM missions").fetchall())

    assert {targets()[m] for m in a} == {"alpha"} and {targets()[m] for m in s} == {"beta"}
    lane_ops.reroute(led, fleet, "alpha", "beta", now=T0 + 1, who="test")
    assert {targets()[m] for m in a} == {"beta"}
    ms.move_session(led, "beta:s1", "alpha", now=T0 + 2)
    assert {targets()[m] for m in s} == {"alpha"}


@pytest.mark.backends("sqlite")  # SQLite's migration step 3 (the PostgreSQL schema starts at the latest)
def test_migration_sets_targets_of_an_old_ledger(backend):
    conn = backend.connect("old", isolation_level=None)
    for step in schema.MIGRATIONS[:2]:
        for statement in schema._statements(step.sql):
            conn.execute(statement)
    conn.execute("PRAGMA user_version = 2")
    conn.execute("INSERT INTO sessions (id, lane, created_at, updated_at) VALUES ('beta:s1', 'alpha', 0, 0)")
    cols = ("class, rank, state, payload, request_hash, lane, session, max_attempts, created_at, updated_at, "
            "current_lane")
    for lane, session, state, current in ((None, None, "queued", None), ("gamma", None, "queued", None),
                                          (None, "beta:s1", "queued", None), ("beta", None, "running", "beta"),
                                          ("beta", None, "succeeded", None)):
        conn.execute(f"INSERT INTO missions ({cols}) VALUES ('background', 2, ?, '{{}}', ?, ?, ?, 3, 0, 0, ?)",
                     (state, "0" * 64, lane, session, current))
    conn.close()
    led = backend.open("old")
    try:
        got = [r[0] for r in led.conn.execute("SELECT target FROM missions ORDER BY id")]
        assert got == ["", "gamma", "alpha", "beta", ""]
    finally:
        led.close()


# ------------------------------------------------------------------------------------------------ property


def full_decision(led, fleet, now):
    """What one pass would place if it read the whole queue: the reference the grouped read must match."""
    conn = led.conn
    lanes, swrr = tick.lane_views(conn, fleet, now)
    everything = tick.queue_head(conn, [(g, 10**9) for g in tick.queue_groups(conn)], now=now,
                                 backoff_s=fleet.settings.leases.retry_backoff_sec)
    snap = Snapshot(lanes, tuple(everything), {c: p.max_wait_sec for c, p in fleet.settings.classes.items()}, swrr)
    return [(a.mission, a.lane) for a in dispatch.decide(snap, now).assignments]


backlog = st.lists(st.tuples(st.sampled_from(["alpha", "beta", "gamma", None]),
                             st.sampled_from(CLASSES),
                             st.sampled_from([(), ("gpu",)]),
                             st.integers(1, 160)), min_size=1, max_size=6)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                  HealthCheck.too_slow])
@given(backlog=backlog, states=st.dictionaries(st.sampled_from(["alpha", "beta", "gamma"]),
                                               st.sampled_from(["drained", "unhealthy", "full"])),
       ages=st.integers(0, 900))
def test_a_grouped_pass_places_what_a_pass_over_the_whole_queue_would(backend, backlog, states, ages):
    fleet = big_fleet(backend.root)
    led = backend.fresh()
    try:
        now = T0
        for lane, state in sorted(states.items()):
            if state == "full":
                fill(led, fleet, lane, now)
            elif state == "drained":
                lane_ops.drain(led, fleet, lane, now=now, who="test")
            else:
                ms.set_lane(led, lane, now=now, healthy=False)
        for lane, cls, tags, n in backlog:
            if lane is not None and cls not in fleet.lanes[lane].classes:
                continue
            if lane is not None and tags and not set(tags) <= set(fleet.lanes[lane].tags):
                tags = ()
            submit_many(led, fleet, n, now, lane=lane, cls=cls, tags=tags,
                        deadline=now + 3600 if cls == "deadline" else None)
        later = now + ages  # some missions are aged by now: they go first, wherever they are in the queue
        expected = full_decision(led, fleet, later)
        res = tick.run_once(led, fleet, now=later)
        assert [(d.mission, d.lane) for d in res.dispatches] == expected
        # and nothing placeable is left behind: a second pass over the whole queue places nothing more
        # than the grouped second pass does
        expected2 = full_decision(led, fleet, later + 1)
        res2 = tick.run_once(led, fleet, now=later + 1)
        assert [(d.mission, d.lane) for d in res2.dispatches] == expected2
    finally:
        backend.discard(led)


@pytest.mark.parametrize("cause", ["full", "drained", "quota"])
def test_blocked_groups_are_read_by_a_sample_only(led, tmp_path, cause):
    """A pass reads one mission of a group no lane can take from, however large it is."""
    fleet = big_fleet(tmp_path)
    if cause == "full":
        fill(led, fleet, "gamma", T0)
    elif cause == "drained":
        lane_ops.drain(led, fleet, "gamma", now=T0, who="test")
    else:
        for _ in range(2):  # gamma's rate quota: 2 background a minute (and capacity 1)
            fill(led, fleet, "gamma", T0)
            led.conn.execute("UPDATE missions SET state = 'succeeded', current_lane = NULL "
                             "WHERE state IN ('dispatched', 'running')")
    submit_many(led, fleet, 300, T0 + 1, lane="gamma")
    view = tick.read_queue(led.conn, fleet, T0 + 2)
    assert len(view.snapshot.queue) == 1 and list(view.blocked) == [(2, "gamma", "[]")]


def test_a_busy_sessions_backlog_does_not_hide_other_work_bound_to_its_lane(led, tmp_path):
    """Found by attacking these fixes: a session with a mission still running on its draining lane, and 10 more
    queued, filled its group's head; 3 missions bound to that lane by --lane (which may take its fallback) were
    never read, with no wait reason, past the aging bound."""
    fleet = big_fleet(tmp_path)
    submit_many(led, fleet, 1, T0, session="beta:s1")
    assert [d.lane for d in tick.run_once(led, fleet, now=T0).dispatches] == ["beta"]
    lane_ops.drain(led, fleet, "beta", now=T0 + 1, who="test")  # draining: the session's mission runs on
    session = submit_many(led, fleet, 10, T0 + 2, session="beta:s1")  # these must wait for beta
    pinned = submit_many(led, fleet, 3, T0 + 3, lane="beta")  # these may take beta's fallback, alpha
    res = tick.run_once(led, fleet, now=T0 + 10)
    placed = {d.mission: d.lane for d in res.dispatches}
    assert placed == {m: "alpha" for m in pinned[:2]}  # alpha's capacity is 2
    assert not set(session) & set(placed)
    res = tick.run_once(led, fleet, now=T0 + 11)
    assert ms.get(led, session[0]).wait_reason is not None  # the session's own missions say why they wait


def test_explain_says_a_mission_backs_off_rather_than_that_it_is_eligible(led, tmp_path):
    fleet = big_fleet(tmp_path)
    (m,) = submit_many(led, fleet, 1, T0)
    with led.transaction() as conn:  # as after three lost attempts: the third retry waits 2**2 backoffs
        conn.execute("UPDATE missions SET attempts = 4, updated_at = ? WHERE id = ?", (T0 + 1, m))
    backoff = fleet.settings.leases.retry_backoff_sec
    summary = tick.explain(led, fleet, m, now=T0 + 1.5)["summary"]
    assert summary.startswith("backing off after 4 lost attempts"), summary
    later = T0 + 1 + min(tick.BACKOFF_CAP_S, backoff * 4) + 1
    assert tick.explain(led, fleet, m, now=later)["summary"].startswith("eligible now")

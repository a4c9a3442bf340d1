"""Missions through the ledger: submit rules, fencing, recovery, sessions, deadlines, operator actions."""
from __future__ import annotations

import json

import pytest
from conftest import T0, make_fleet

from lanectl.config import ClassPolicy
from lanectl.errors import ExitCode, LanectlError
from lanectl.ledger import events, tick
from lanectl.ledger import missions as ms
from lanectl.ledger.events import EventKind


def count(led, table):
    return led.conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0]


def kinds(led, mission=None):
    return [e["kind"] for e in events.query(led.conn, mission=mission)]


def test_idempotent_submit(led, fleet):
    a = ms.submit(led, fleet, cls="interactive", payload={"argv": ["x"]}, now=T0, idempotency_key="job-1")
    b = ms.submit(led, fleet, cls="interactive", payload={"argv": ["x"]}, now=T0 + 5, idempotency_key="job-1")
    assert a.created and not b.created and a.mission.id == b.mission.id
    with pytest.raises(LanectlError) as err:
        ms.submit(led, fleet, cls="interactive", payload={"argv": ["y"]}, now=T0, idempotency_key="job-1")
    assert err.value.exit_code == ExitCode.CONFLICT == 5
    assert err.value.code == "idempotency_conflict"
    assert count(led, "missions") == 1


def test_queue_limit_refuses_and_records(led, tmp_path):
    fleet = make_fleet(tmp_path, interactive=ClassPolicy(queue_limit=2))
    for i in range(2):
        ms.submit(led, fleet, cls="interactive", payload=i, now=T0)
    with pytest.raises(LanectlError) as err:
        ms.submit(led, fleet, cls="interactive", payload=3, now=T0)
    assert err.value.code == "queue_full" and err.value.exit_code == ExitCode.CONFLICT
    assert "queue_limit" in err.value.hint
    assert count(led, "missions") == 2
    refused = events.query(led.conn, kind=EventKind.SUBMIT_REFUSED)
    assert len(refused) == 1 and refused[0]["data"]["limit"] == 2
    ms.submit(led, fleet, cls="background", payload=4, now=T0)  # other classes are not affected


BAD = [
    (dict(cls="urgent"), ExitCode.USAGE, "unknown_class", "class"),
    (dict(deadline=T0 - 1), ExitCode.USAGE, "deadline_past", "deadline"),
    (dict(cls="deadline"), ExitCode.USAGE, "deadline_missing", "deadline"),
    (dict(payload="{not json"), ExitCode.USAGE, "payload_not_json", "payload"),
    (dict(payload={"x": "a" * (256 * 1024)}), ExitCode.USAGE, "payload_too_large", "payload"),
    (dict(payload={"x": float("nan")}), ExitCode.USAGE, "payload_not_json", "payload"),
    (dict(lane="nope"), ExitCode.NOT_FOUND, "lane_not_found", "lane"),
    (dict(lane="gamma", cls="interactive"), ExitCode.USAGE, "lane_class", "lane"),
    (dict(session="zeta:s1"), ExitCode.NOT_FOUND, "session_not_found", "session"),
    (dict(session="no colon"), ExitCode.USAGE, "bad_session", "session"),
    (dict(tags=["tpu"]), ExitCode.NOT_FOUND, "tag_not_found", "tag"),
    (dict(max_attempts=0), ExitCode.USAGE, "bad_max_attempts", "max_attempts"),
    (dict(idempotency_key="has space"), ExitCode.USAGE, "bad_idempotency_key", "idempotency_key"),
    (dict(session="beta:s1", lane="alpha"), ExitCode.CONFLICT, "session_lane_mismatch", "session"),
]


@pytest.mark.parametrize(("kw", "exit_code", "code", "field"), BAD, ids=[b[2] for b in BAD])
def test_bad_input_writes_nothing(led, fleet, kw, exit_code, code, field):
    args = {"cls": "interactive", "payload": {"argv": ["true"]}, **kw}
    with pytest.raises(LanectlError) as err:
        ms.submit(led, fleet, now=T0, **args)
    assert err.value.exit_code == exit_code
    assert err.value.code == code
    assert err.value.message.startswith(field)
    assert err.value.hint
    assert count(led, "missions") == count(led, "events") == count(led, "sessions") == 0


def dispatch_one(led, fleet, now):
    res = tick.run_once(led, fleet, now=now)
    assert len(res.dispatches) == 1, res
    return res.dispatches[0]


def test_lifecycle_and_fencing(led, fleet):
    m = ms.submit(led, fleet, cls="interactive", payload={}, now=T0, lane="alpha").mission
    d = dispatch_one(led, fleet, T0 + 1)
    assert (d.mission, d.attempt, d.lane) == (m.id, 1, "alpha")
    ok = dict(lane="alpha", attempt=1, token=d.token)
    for bad in (dict(ok, token="forged"), dict(ok, lane="beta"), dict(ok, attempt=2)):
        with pytest.raises(LanectlError) as err:
            ms.complete(led, m.id, now=T0 + 2, **bad)
        assert err.value.code == "lease_fenced" and err.value.exit_code == ExitCode.CONFLICT
    assert len(events.query(led.conn, kind=EventKind.CALLBACK_REJECTED)) == 3
    assert ms.started(led, m.id, now=T0 + 2, lease_sec=30, **ok).changed
    assert ms.heartbeat(led, m.id, now=T0 + 3, lease_sec=30, **ok).mission.state == "running"
    assert ms.complete(led, m.id, now=T0 + 4, result={"rc": 0}, **ok).changed
    again = ms.complete(led, m.id, now=T0 + 5, result={"rc": 0}, **ok)
    assert not again.changed and again.mission.state == "succeeded" and again.mission.result == {"rc": 0}
    with pytest.raises(LanectlError):
        ms.fail(led, m.id, now=T0 + 6, error="late", **ok)  # a finished attempt cannot fail afterwards
    assert kinds(led, m.id) == ["submitted", "dispatched", "callback_rejected", "callback_rejected",
                                "callback_rejected", "started", "succeeded", "callback_rejected"]


def test_lease_expiry_requeues_then_dead_and_old_token_is_fenced(led, fleet):
    m = ms.submit(led, fleet, cls="background", payload={}, now=T0, lane="alpha").mission  # max_attempts 2
    d1 = dispatch_one(led, fleet, T0)
    lease = fleet.settings.leases.lease_sec
    res = tick.run_once(led, fleet, now=T0 + lease + 1)  # reaps the lease and re-dispatches at once
    assert res.expired_leases == [m.id] and res.dispatches[0].attempt == 2
    with pytest.raises(LanectlError) as err:
        ms.complete(led, m.id, lane="alpha", attempt=1, token=d1.token, now=T0 + lease + 2)
    assert err.value.code == "lease_fenced"
    ms.expire_leases(led, now=T0 + 2 * lease + 5)
    assert ms.get(led, m.id).state == "dead"
    assert kinds(led, m.id)[-1] == "dead"


def test_retryable_failure_and_final_failure(led, fleet):
    m = ms.submit(led, fleet, cls="interactive", payload={}, now=T0, max_attempts=3).mission
    d = dispatch_one(led, fleet, T0)
    ms.fail(led, m.id, lane=d.lane, attempt=1, token=d.token, now=T0 + 1, error="boom")
    assert ms.get(led, m.id).state == "queued"
    assert not ms.fail(led, m.id, lane=d.lane, attempt=1, token=d.token, now=T0 + 1, error="boom").changed
    d2 = dispatch_one(led, fleet, T0 + 2)
    ms.fail(led, m.id, lane=d2.lane, attempt=2, token=d2.token, now=T0 + 3, error="bad input", retry=False)
    got = ms.get(led, m.id)
    assert got.state == "failed" and got.error == "bad input"


def test_requeue_lane_and_new_invocation(led, fleet):
    ms.set_lane(led, "alpha", now=T0, invocation="inv-1")
    ids = [ms.submit(led, fleet, cls="interactive", payload=i, now=T0, lane="alpha").mission.id for i in range(2)]
    res = tick.run_once(led, fleet, now=T0 + 1)
    assert {d.invocation for d in res.dispatches} == {"inv-1"}
    assert sorted(ms.set_lane(led, "alpha", now=T0 + 2, invocation="inv-2")) == ids
    assert {ms.get(led, i).state for i in ids} == {"queued"}
    assert events.query(led.conn, kind=EventKind.LANE_INVOCATION)[0]["data"]["previous"] == "inv-1"
    # both were in flight when the lane restarted: suspects now, they run alone (one at a time on alpha)
    res = tick.run_once(led, fleet, now=T0 + 3)
    assert [d.mission for d in res.dispatches] == ids[:1]
    assert ms.requeue_lane(led, "alpha", "operator failover", now=T0 + 4) == ids[:1]


def test_unavailable_lane_falls_back_and_session_moves_by_event(led, fleet):
    m1 = ms.submit(led, fleet, cls="interactive", payload=1, now=T0, session="beta:chat").mission
    ms.set_lane(led, "beta", now=T0, state="draining")
    d = dispatch_one(led, fleet, T0 + 1)
    assert d.lane == "alpha"
    moved = events.query(led.conn, kind=EventKind.SESSION_MOVED)
    assert len(moved) == 1 and moved[0]["data"] == {"from_lane": "beta", "reason": "fallback"}
    assert led.conn.execute("SELECT lane FROM sessions WHERE id = 'beta:chat'").fetchone()[0] == "alpha"
    ms.set_lane(led, "beta", now=T0 + 2, state="active")
    ms.submit(led, fleet, cls="interactive", payload=2, now=T0 + 2, session="beta:chat")
    assert dispatch_one(led, fleet, T0 + 3).lane == "alpha"  # stays with its new owner
    assert ms.get(led, m1.id).current_lane == "alpha"
    with pytest.raises(LanectlError) as err:
        ms.move_session(led, "beta:chat", "beta", now=T0 + 4)
    assert err.value.code == "session_busy"


def test_no_fallback_waits_with_an_event(led, fleet):
    m = ms.submit(led, fleet, cls="background", payload={}, now=T0, lane="alpha").mission
    ms.set_lane(led, "alpha", now=T0, healthy=False)
    res = tick.run_once(led, fleet, now=T0 + 1)
    assert not res.dispatches and "unavailable" in res.waiting[m.id]
    tick.run_once(led, fleet, now=T0 + 2)  # same reason: no second event
    assert kinds(led, m.id) == ["submitted", "waiting"]
    why = tick.explain(led, fleet, m.id, now=T0 + 3)
    assert {v["lane"] for v in why["lanes"]} == {"alpha", "beta", "gamma"}
    assert all(not v["eligible"] for v in why["lanes"])
    assert "no fallback" in why["summary"]


def test_deadlines_expire_instead_of_running_late(led, fleet):
    m = ms.submit(led, fleet, cls="deadline", payload={}, now=T0, deadline=T0 + 10, tags=["gpu"]).mission
    ms.set_lane(led, "gamma", now=T0, state="drained")
    res = tick.run_once(led, fleet, now=T0 + 11)
    assert res.expired_deadlines == [m.id] and ms.get(led, m.id).state == "expired"
    with pytest.raises(LanectlError) as err:
        ms.retry(led, m.id, now=T0 + 12)
    assert err.value.code == "deadline_past"
    assert ms.retry(led, m.id, now=T0 + 12, deadline=T0 + 100).mission.state == "queued"


def test_cancel_and_retry(led, fleet):
    a = ms.submit(led, fleet, cls="interactive", payload=1, now=T0).mission
    b = ms.submit(led, fleet, cls="interactive", payload=2, now=T0, lane="alpha").mission
    assert ms.cancel(led, a.id, now=T0).changed
    assert not ms.cancel(led, a.id, now=T0).changed
    d = dispatch_one(led, fleet, T0 + 1)
    assert d.mission == b.id
    assert ms.cancel(led, b.id, now=T0 + 2).mission.state == "cancelled"
    with pytest.raises(LanectlError) as err:
        ms.complete(led, b.id, lane="alpha", attempt=1, token=d.token, now=T0 + 3)
    assert err.value.code == "lease_fenced"
    with pytest.raises(LanectlError) as err:
        ms.retry(led, ms.submit(led, fleet, cls="interactive", payload=3, now=T0).mission.id, now=T0)
    assert err.value.code == "mission_active"
    assert ms.retry(led, b.id, now=T0 + 4).mission.state == "queued"
    again = {d.mission: d.attempt for d in tick.run_once(led, fleet, now=T0 + 5).dispatches}
    assert again[b.id] == 2
    with pytest.raises(LanectlError) as err:
        ms.get(led, 999)
    assert err.value.exit_code == ExitCode.NOT_FOUND


def test_rate_quota_and_capacity_hold_in_the_ledger(led, fleet):
    for i in range(5):
        ms.submit(led, fleet, cls="background", payload=i, now=T0, tags=["gpu"])
    got = tick.run_once(led, fleet, now=T0 + 1).dispatches
    assert [d.lane for d in got] == ["gamma"]  # capacity 1
    d = got[0]
    ms.complete(led, d.mission, lane="gamma", attempt=1, token=d.token, now=T0 + 2)
    assert len(tick.run_once(led, fleet, now=T0 + 3).dispatches) == 1  # second of 2 per minute
    d = ms.list_missions(led, state="dispatched")[0]
    led.conn.execute("UPDATE attempts SET state = 'succeeded' WHERE mission = ?", (d.id,))
    led.conn.execute("UPDATE missions SET state = 'succeeded', current_lane = NULL WHERE id = ?", (d.id,))
    res = tick.run_once(led, fleet, now=T0 + 4)
    assert not res.dispatches and all("rate quota" in r for r in res.waiting.values())
    assert len(tick.run_once(led, fleet, now=T0 + 62).dispatches) == 1  # the window slid on


def test_replay_matches_tables(led, fleet):
    for i in range(6):
        ms.submit(led, fleet, cls=("interactive", "background")[i % 2], payload=i, now=T0)
    ds = tick.run_once(led, fleet, now=T0 + 1).dispatches
    ms.complete(led, ds[0].mission, lane=ds[0].lane, attempt=1, token=ds[0].token, now=T0 + 2)
    ms.requeue_lane(led, ds[1].lane, "test", now=T0 + 3)
    rebuilt = events.replay(led.conn)
    for row in led.query("SELECT id, state, attempts, current_lane FROM missions"):
        r = rebuilt[row["id"]]
        assert (r.state, r.attempts, r.lane) == (row["state"], row["attempts"], row["current_lane"])
    assert json.loads(json.dumps(ms.get(led, ds[0].mission).as_dict()))["state"] == "succeeded"


def test_finished_missions_keep_the_lane_they_ran_on(led, fleet):
    m = ms.submit(led, fleet, cls="interactive", payload={}, now=T0).mission
    assert m.last_lane is None
    d = tick.run_once(led, fleet, now=T0).dispatches[0]
    ms.complete(led, m.id, lane=d.lane, attempt=1, token=d.token, now=T0)
    done = ms.get(led, m.id)
    assert (done.current_lane, done.last_lane, done.as_dict()["last_lane"]) == (None, d.lane, d.lane)
    assert [x.id for x in ms.list_missions(led, lane=d.lane)] == [m.id]
    other = next(n for n in fleet.lanes if n != d.lane)
    assert ms.list_missions(led, lane=other) == []

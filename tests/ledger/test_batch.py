"""Batched writes: ``submit_many`` and ``apply_callbacks_in`` (the supervisor's group commit).

The batch paths read fencing data once and keep their own view of the batch in memory, so the strongest check is
differential: the same callbacks applied one per transaction and all in one batch must leave identical tables and
identical event logs.
"""
from __future__ import annotations


import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import T0, make_fleet
from lanectl.config import ClassPolicy
from lanectl.errors import ExitCode, LanectlError
from lanectl.ledger import Ledger, events, tick
from lanectl.ledger import missions as ms
from lanectl.states import UNFINISHED

KINDS = ("started", "heartbeat", "succeeded", "failed", "failed_retry", "cancelled")


def _callback(d: ms.Dispatch, kind: str, forge: str | None) -> ms.Callback:
    lane, token = d.lane, d.token
    if forge == "token":
        token = "forged"
    elif forge == "lane":
        lane = "beta" if d.lane != "beta" else "alpha"
    elif forge == "attempt":
        return ms.Callback(kind.removesuffix("_retry"), d.mission, lane, d.attempt + 1, token)
    return ms.Callback(kind.removesuffix("_retry"), d.mission, lane, d.attempt, token,
                       result={"exit_code": 0} if kind == "succeeded" else None,
                       error="boom" if kind.startswith("failed") else None, retry=kind == "failed_retry")


def _single(led: Ledger, cb: ms.Callback, now: float) -> None:
    common = dict(lane=cb.lane, attempt=cb.attempt, token=cb.token, now=now)
    try:
        if cb.kind == "started":
            ms.started(led, cb.mission, lease_sec=30, **common)
        elif cb.kind == "heartbeat":
            ms.heartbeat(led, cb.mission, lease_sec=30, **common)
        elif cb.kind == "succeeded":
            ms.complete(led, cb.mission, result=cb.result, **common)
        elif cb.kind == "failed":
            ms.fail(led, cb.mission, error=cb.error or "", retry=cb.retry, **common)
        else:
            ms.confirm_cancelled(led, cb.mission, **common)
    except LanectlError as exc:
        assert exc.code == "lease_fenced"


def _dump(led: Ledger) -> tuple[list, list, list]:
    c = led.conn
    return (c.execute("SELECT * FROM missions ORDER BY id").fetchall(),
            c.execute("SELECT mission, n, lane, class, state, dispatched_at, started_at, heartbeat_at, lease_expires, "
                      "finished_at FROM attempts ORDER BY mission, n").fetchall(),
            c.execute("SELECT at, kind, mission, lane, session, attempt, state, data FROM events ORDER BY id")
            .fetchall())


def _prepared(led: Ledger, fleet, n: int) -> tuple[Ledger, list[ms.Dispatch]]:
    ms.submit_many(led, fleet, [ms.SubmitRequest("interactive", {"i": i}) for i in range(n)], now=T0)
    return led, tick.run_once(led, fleet, now=T0 + 1).dispatches


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(calls=st.lists(st.tuples(st.integers(0, 99), st.sampled_from(KINDS),
                                st.sampled_from([None, None, None, "token", "lane", "attempt"])),
                      min_size=1, max_size=25))
def test_a_batch_equals_the_same_callbacks_one_by_one(backend, calls):
    fleet = make_fleet(backend.root)
    one, d1 = _prepared(backend.fresh(), fleet, 4)
    many, d2 = _prepared(backend.fresh(), fleet, 4)
    assert [(d.mission, d.attempt, d.lane) for d in d1] == [(d.mission, d.attempt, d.lane) for d in d2]
    now = T0 + 2
    for i, kind, forge in calls:
        _single(one, _callback(d1[i % len(d1)], kind, forge), now)
    with many.transaction() as conn:
        out = ms.apply_callbacks_in(conn, [_callback(d2[i % len(d2)], kind, forge) for i, kind, forge in calls],
                                    now=now, lease_sec=30)
    assert len(out) == len(calls)
    assert _dump(one) == _dump(many)
    for (_, _, forge), o in zip(calls, out):
        if forge is not None:
            assert o.rejected is not None and not o.changed
    events.replay(many.conn)  # the log stays a valid history
    backend.discard(one)
    backend.discard(many)


def test_started_and_succeeded_in_one_batch(led, fleet):
    ms.submit(led, fleet, cls="interactive", payload={}, now=T0)
    d = tick.run_once(led, fleet, now=T0).dispatches[0]
    cbs = [ms.Callback("started", d.mission, d.lane, d.attempt, d.token),
           ms.Callback("succeeded", d.mission, d.lane, d.attempt, d.token, result={"exit_code": 0}),
           ms.Callback("succeeded", d.mission, d.lane, d.attempt, d.token)]  # a repeat: acknowledged, no change
    with led.transaction() as conn:
        out = ms.apply_callbacks_in(conn, cbs, now=T0 + 1, lease_sec=30)
    assert [(o.changed, o.state, o.rejected) for o in out] == [(True, "running", None), (True, "succeeded", None),
                                                                (False, "succeeded", None)]
    m = ms.get(led, d.mission)
    assert (m.state, m.result) == ("succeeded", {"exit_code": 0})
    kinds = [e["kind"] for e in events.query(led.conn, mission=d.mission)]
    assert kinds == ["submitted", "dispatched", "started", "succeeded"]


def test_rejections_in_a_batch_are_recorded_and_change_nothing(led, fleet):
    ms.submit(led, fleet, cls="interactive", payload={}, now=T0)
    d = tick.run_once(led, fleet, now=T0).dispatches[0]
    cbs = [ms.Callback("succeeded", 999, d.lane, 1, d.token),
           ms.Callback("succeeded", d.mission, d.lane, d.attempt, "forged"),
           ms.Callback("bogus", d.mission, d.lane, d.attempt, d.token)]
    with led.transaction() as conn:
        out = ms.apply_callbacks_in(conn, cbs, now=T0 + 1, lease_sec=30)
    assert [o.rejected for o in out] == ["no such mission", "token does not match", "unknown callback 'bogus'"]
    assert out[0].state is None and out[1].state == "dispatched"
    assert len(events.query(led.conn, kind="callback_rejected")) == 3
    assert ms.get(led, d.mission).state == "dispatched"


def test_submit_many_returns_missions_in_order_with_events(led, fleet):
    reqs = [ms.SubmitRequest("background", {"i": i}, session="alpha:s1" if i % 2 else None) for i in range(5)]
    res = ms.submit_many(led, fleet, reqs, now=T0)
    assert [r.created for r in res] == [True] * 5
    ids = [r.mission.id for r in res]
    assert ids == sorted(ids)
    for r, req in zip(res, reqs):
        assert r.mission == ms.get(led, r.mission.id)  # what it returns is what it stored
        assert r.mission.payload == req.payload
    kinds = [e["kind"] for e in events.query(led.conn)]
    assert kinds == ["submitted", "session_created", "submitted", "submitted", "submitted", "submitted"]


def test_submit_many_idempotency_inside_and_across_batches(led, fleet):
    first = ms.submit_many(led, fleet, [ms.SubmitRequest("interactive", {"a": 1}, idempotency_key="k1"),
                                        ms.SubmitRequest("interactive", {"a": 1}, idempotency_key="k1")], now=T0)
    assert [r.created for r in first] == [True, False]
    assert first[0].mission.id == first[1].mission.id
    again = ms.submit_many(led, fleet, [ms.SubmitRequest("interactive", {"a": 1}, idempotency_key="k1"),
                                        ms.SubmitRequest("interactive", {"b": 2})], now=T0)
    assert [r.created for r in again] == [False, True]
    assert again[0].mission.id == first[0].mission.id
    with pytest.raises(LanectlError) as exc:
        ms.submit_many(led, fleet, [ms.SubmitRequest("interactive", {"c": 3}, idempotency_key="k2"),
                                    ms.SubmitRequest("interactive", {"c": 4}, idempotency_key="k2")], now=T0)
    assert exc.value.code == "idempotency_conflict"
    assert led.conn.execute("SELECT count(*) FROM missions").fetchone()[0] == 2  # nothing of that batch


def test_submit_many_is_all_or_nothing_on_bad_input(led, fleet):
    with pytest.raises(LanectlError) as exc:
        ms.submit_many(led, fleet, [ms.SubmitRequest("interactive", {"ok": 1}),
                                    ms.SubmitRequest("interactive", {"ok": 2}),
                                    ms.SubmitRequest("urgent", {"bad": 1})], now=T0)
    assert exc.value.code == "unknown_class" and exc.value.exit_code == ExitCode.USAGE
    assert exc.value.message.startswith("request 2: ")
    assert exc.value.problems[0].field == "requests[2].class"
    assert led.conn.execute("SELECT count(*) FROM missions").fetchone()[0] == 0
    assert led.conn.execute("SELECT count(*) FROM events").fetchone()[0] == 0


def test_submit_many_admits_the_whole_batch_or_none(led, tmp_path):
    fleet = make_fleet(tmp_path, interactive=ClassPolicy(queue_limit=3))
    ms.submit_many(led, fleet, [ms.SubmitRequest("interactive", {"i": i}) for i in range(2)], now=T0)
    with pytest.raises(LanectlError) as exc:
        ms.submit_many(led, fleet, [ms.SubmitRequest("interactive", {"i": i}) for i in range(2, 4)], now=T0)
    assert exc.value.code == "queue_full" and exc.value.exit_code == ExitCode.CONFLICT
    assert "this batch adds 2" in exc.value.message
    assert led.conn.execute("SELECT count(*) FROM missions").fetchone()[0] == 2
    refused = events.query(led.conn, kind="submit_refused")
    assert len(refused) == 2 and refused[0]["data"]["batch"] == 2  # each refused request is on record
    assert len(ms.submit_many(led, fleet, [ms.SubmitRequest("interactive", {"i": 9})], now=T0)) == 1


def test_submit_many_limits_the_batch_size(led, fleet):
    with pytest.raises(LanectlError) as exc:
        ms.submit_many(led, fleet, [ms.SubmitRequest("interactive", {})] * (ms.MAX_BATCH + 1), now=T0)
    assert exc.value.code == "batch_too_large"
    assert ms.submit_many(led, fleet, [], now=T0) == []


def test_a_mission_planned_twice_is_dispatched_once(led, fleet):
    from lanectl.dispatch import Assignment

    m = ms.submit(led, fleet, cls="interactive", payload={}, now=T0).mission
    out = ms.assign(led, [Assignment(m.id, "alpha", "interactive"), Assignment(m.id, "beta", "interactive")],
                    now=T0, lease_sec=30)
    assert [(d.mission, d.lane) for d in out] == [(m.id, "alpha")]
    assert led.conn.execute("SELECT count(*) FROM attempts").fetchone()[0] == 1


def _supervisor_with(led: Ledger, fleet):
    from lanectl.supervisor import Supervisor

    sup = Supervisor(fleet, led.path, use_systemd=False, notifier=None)
    sup.ledger = led
    return sup


def _push(sup, *msgs):
    from concurrent.futures import Future

    from lanectl.protocol import CallbackMsg
    from lanectl.supervisor import Pending

    futures = []
    for mission, attempt, lane, token, event in msgs:
        fut: Future = Future()
        sup.callbacks.inbox.put(Pending(CallbackMsg(mission, attempt, lane, token, event, exit_code=0), fut))
        futures.append(fut)
    return futures


def test_supervisor_group_commit_answers_each_callback(led, fleet):
    ms.submit_many(led, fleet, [ms.SubmitRequest("interactive", {"i": i}) for i in range(2)], now=T0)
    d1, d2 = tick.run_once(led, fleet, now=T0).dispatches
    sup = _supervisor_with(led, fleet)
    futs = _push(sup, (d1.mission, 1, d1.lane, d1.token, "started"), (d1.mission, 1, d1.lane, d1.token, "succeeded"),
                 (d2.mission, 1, d2.lane, "forged", "succeeded"))
    assert sup.callbacks.apply(T0 + 1) == 3
    answers = [f.result(0) for f in futs]
    assert answers[0] == (200, {"ok": True, "changed": True, "state": "running"})
    assert answers[1] == (200, {"ok": True, "changed": True, "state": "succeeded"})
    assert answers[2][0] == 409 and answers[2][1]["error"] == "lease_fenced"
    assert sup.counters["callbacks"] == 3 and sup.counters["rejected"] == 1
    sup.dispatcher.pool.shutdown()


def test_supervisor_falls_back_to_one_by_one_when_a_batch_fails(led, fleet, monkeypatch):
    """A bug hit by one callback must not fail the others of its batch."""
    ms.submit_many(led, fleet, [ms.SubmitRequest("interactive", {"i": i}) for i in range(2)], now=T0)
    d1, d2 = tick.run_once(led, fleet, now=T0).dispatches
    real = ms.apply_callbacks_in

    def flaky(conn, cbs, **kw):
        if any(cb.mission == d2.mission for cb in cbs):
            raise RuntimeError("injected")
        return real(conn, cbs, **kw)

    monkeypatch.setattr(ms, "apply_callbacks_in", flaky)
    sup = _supervisor_with(led, fleet)
    futs = _push(sup, (d1.mission, 1, d1.lane, d1.token, "succeeded"), (d2.mission, 1, d2.lane, d2.token, "succeeded"))
    sup.callbacks.apply(T0 + 1)
    assert [f.result(0)[0] for f in futs] == [200, 500]
    assert ms.get(led, d1.mission).state == "succeeded"
    assert ms.get(led, d2.mission).state == "dispatched"  # the lane retries; nothing half-applied
    sup.dispatcher.pool.shutdown()


@pytest.mark.backends("sqlite")
def test_checkpointer_keeps_the_wal_checkpointed(backend, fleet):
    from lanectl.ledger import Checkpointer

    led = backend.open("c", autocheckpoint=False)
    assert led.conn.execute("PRAGMA wal_autocheckpoint").fetchone()[0] == 0
    ms.submit_many(led, fleet, [ms.SubmitRequest("background", {"i": i}) for i in range(40)], now=T0)
    before = led.path.stat().st_size  # with no checkpoint yet, the pages live in the WAL only
    cp = Checkpointer(led.path, interval=0.05).start()
    try:
        import time

        deadline = time.monotonic() + 10
        while cp.checkpoints < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        cp.stop()
    assert cp.checkpoints >= 2 and cp.errors == 0
    assert led.path.stat().st_size > before  # the thread copied the WAL into the database file
    led.close()


def test_state_counts_match_the_rows_without_counting_the_queue(led, fleet):
    ms.submit_many(led, fleet, [ms.SubmitRequest(c, {"i": i}, deadline=T0 + 60 if c == "deadline" else None)
                                for i, c in enumerate(ms.CLASSES * 5)], now=T0)
    d = tick.run_once(led, fleet, now=T0).dispatches
    ms.started(led, d[0].mission, lane=d[0].lane, attempt=1, token=d[0].token, now=T0, lease_sec=30)
    expected = dict(led.conn.execute("SELECT state, count(*) FROM missions GROUP BY state").fetchall())
    assert ms.state_counts(led.conn) == expected and set(expected) == set(UNFINISHED)


@pytest.mark.backends("sqlite")
def test_checkpointer_survives_a_ledger_it_cannot_open_yet(backend):
    from lanectl.ledger import Checkpointer

    missing = backend.path("l")  # connect fails every round, and must not create the file (nor its directory)
    cp = Checkpointer(missing, interval=0.02).start()
    try:
        import time

        deadline = time.monotonic() + 10
        while cp.errors < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert cp.errors >= 2 and cp._thread.is_alive()  # it keeps trying instead of dying
        missing.parent.mkdir()
        time.sleep(0.1)
        assert not missing.exists()  # the ledger's own open creates it, with its modes
        led = backend.open("l", autocheckpoint=False)
        deadline = time.monotonic() + 10
        while cp.checkpoints < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert cp.checkpoints >= 1
        led.close()
    finally:
        cp.stop()

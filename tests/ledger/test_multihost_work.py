"""Issue 13, work across hosts, on both engines: host drain and undrain, sessions that move off a dead or drained
host (or wait for their lane, by their choice), a lane's fallback on another host, and the lane verbs (drain,
undrain, reroute) from a host that does not run the lane. Two hosts share one ledger here: ``a`` runs lane ``a1``,
``b`` runs lane ``b1``; each policy pass is the one its own supervisor runs (``holder``) with its own lanes.d/."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from lanectl.config import ClassPolicy, Lane, LaneSet, Settings
from lanectl.errors import ExitCode, LanectlError
from lanectl.ledger import Ledger, hosts, tick
from lanectl.ledger import lanes as lane_ops
from lanectl.ledger import missions as ms
from lanectl.states import CLASSES

T0 = 1_800_000_000.0
LEASE = 10.0


def lane_set(tmp: Path, host: str, lanes: dict[str, Lane]) -> LaneSet:
    classes = {c: ClassPolicy(max_wait_sec=600, queue_limit=100) for c in CLASSES}
    return LaneSet(lanes, Settings(classes=classes, host=host), tmp / host, tmp / host / "lanes.d")


def specs(fleet: LaneSet) -> dict[str, dict]:
    return {n: tick.lane_spec(n, ln) for n, ln in fleet.lanes.items()}


@pytest.fixture
def two(tmp_path: Path, backend):  # type: ignore[no-untyped-def]
    """Hosts ``a`` (lane a1, falling back to b1 on host b) and ``b`` (lane b1), both up."""
    fa = lane_set(tmp_path, "a", {"a1": Lane(port=9101, workspace="/var/lib/lanes/a1", capacity=2, fallback="b1")})
    fb = lane_set(tmp_path, "b", {"b1": Lane(port=9201, workspace="/var/lib/lanes/b1", capacity=2)})
    led = backend.open()
    hosts.register(led, "b", "inc-b", "boot-b", 2, T0, LEASE, ["b1"], specs=specs(fb))
    hosts.register(led, "a", "inc-a", "boot-a", 1, T0, LEASE, ["a1"], specs=specs(fa))
    return led, fa, fb


def run(led: Ledger, fleet: LaneSet, host: str, now: float) -> tick.TickResult:
    res = tick.run_once(led, fleet, now=now, holder=(host, f"inc-{host}"))
    assert res.held
    return res


def events(led: Ledger, kind: str) -> list[dict]:
    return [json.loads(r[0]) if isinstance(r[0], str) else r[0]
            for r in led.conn.execute("SELECT data FROM events WHERE kind = ? ORDER BY id", (kind,))]


def session_lane(led: Ledger, session: str) -> str:
    return led.conn.execute("SELECT lane FROM sessions WHERE id = ?", (session,)).fetchone()[0]


def renew_both(led: Ledger, now: float) -> None:
    for h in ("a", "b"):
        hosts.renew(led, h, f"inc-{h}", now, LEASE)


# ------------------------------------------------------------------------------------------------- host drain


def test_a_drained_host_claims_nothing_until_undrained_and_stays_drained_across_restarts(two) -> None:  # type: ignore[no-untyped-def]
    led, fa, fb = two
    running = ms.submit(led, fa, cls="background", payload={}, lane="a1", now=T0).mission.id
    [d0] = run(led, fa, "a", T0 + 1).dispatches
    assert d0.lane == "a1"
    assert hosts.drain(led, "a", now=T0 + 2, who="alice", reason="kernel update")
    assert not hosts.drain(led, "a", now=T0 + 3, who="bob")  # idempotent: said so, nothing written
    [ev] = events(led, "host_drained")
    assert ev == {"host": "a", "actor": "alice", "reason": "kernel update", "state": "up", "lanes": ["a1"],
                  "in_flight": 1}
    # a1 is bound to a1 only through --lane: it falls back to b1 on host b, not to a1 on the drained host
    pinned = ms.submit(led, fa, cls="background", payload={}, lane="a1", now=T0 + 4).mission.id
    assert run(led, fa, "a", T0 + 5).dispatches == []
    assert ms.get(led, pinned).wait_reason is None  # b's lane can take it: b's pass does, a records no wait
    [d] = run(led, fb, "b", T0 + 5).dispatches
    assert (d.mission, d.lane) == (pinned, "b1")
    # what a1 runs finishes: the drain waits for it (lanectl host drain --wait)
    [row_a] = [r for r in hosts.listing(led, T0 + 6) if r["name"] == "a"]
    assert row_a["drained"] is True and row_a["drained_by"] == "alice" and row_a["in_flight"] == 1
    assert hosts.in_flight(led.conn, "a") == [running]
    assert ms.complete(led, running, lane="a1", attempt=1, token=d0.token, now=T0 + 6).changed
    assert hosts.in_flight(led.conn, "a") == []
    # a restart of a's supervisor (a new incarnation) keeps the drain
    hosts.register(led, "a", "inc-a2", "boot-a", 3, T0 + 7, LEASE, ["a1"], specs=specs(fa))
    assert hosts.get(led.conn, "a").drained_at == T0 + 2  # type: ignore[union-attr]
    lane_ops.drain(led, fb, "b1", now=T0 + 8)  # b1 away too: nothing can take a1's work now
    queued = ms.submit(led, fa, cls="background", payload={}, lane="a1", now=T0 + 8).mission.id
    assert tick.run_once(led, fa, now=T0 + 9, holder=("a", "inc-a2")).dispatches == []
    assert "its host a is drained" in (ms.get(led, queued).wait_reason or "")
    assert hosts.undrain(led, "a", now=T0 + 10, who="alice")
    assert not hosts.undrain(led, "a", now=T0 + 11, who="alice")
    assert events(led, "host_undrained") == [{"host": "a", "actor": "alice", "drained_s": 8.0,
                                              "drained_by": "alice"}]
    [d] = tick.run_once(led, fa, now=T0 + 12, holder=("a", "inc-a2")).dispatches
    assert (d.mission, d.lane) == (queued, "a1")


def test_drain_of_an_unknown_host_is_not_found(two) -> None:  # type: ignore[no-untyped-def]
    led, _, _ = two
    for verb in (hosts.drain, hosts.undrain):
        with pytest.raises(LanectlError) as err:
            verb(led, "zz", now=T0, who="alice")
        assert err.value.code == "host_unknown" and err.value.exit_code == ExitCode.NOT_FOUND
        assert "'a'" not in err.value.message and "a, b" in err.value.message


# ------------------------------------------------------------------------------------------------- sessions


def test_a_session_on_a_dead_hosts_lane_moves_with_its_next_mission(two) -> None:  # type: ignore[no-untyped-def]
    led, fa, fb = two
    # no fallback here: the session moves because its lane's host is dead, not by a1's fallback chain
    fa.lanes["a1"] = fa.lanes["a1"].model_copy(update={"fallback": None})
    hosts.claim(led, "a", "inc-a", ["a1"], now=T0, specs=specs(fa))
    first = ms.submit(led, fa, cls="interactive", payload={}, session="a1:chat-1", now=T0).mission.id
    [d] = run(led, fa, "a", T0 + 1).dispatches
    assert (d.mission, d.lane) == (first, "a1")
    hosts.renew(led, "b", "inc-b", T0 + LEASE, LEASE)  # a stops renewing (its machine is gone)
    [dead] = hosts.reap(led, T0 + LEASE + 1, by="b")
    assert dead["missions"] == [first] and ms.get(led, first).state == "queued"
    res = run(led, fb, "b", T0 + LEASE + 2)
    [d] = res.dispatches
    assert (d.mission, d.lane, d.attempt) == (first, "b1", 2)
    assert session_lane(led, "a1:chat-1") == "b1"
    [moved] = events(led, "session_moved")
    assert moved == {"from_lane": "a1", "from_host": "a", "to_host": "b", "reason": "its host a is dead"}
    # the session stays on b1: its next mission goes there, and nothing moves twice
    nxt = ms.submit(led, fb, cls="interactive", payload={}, session="a1:chat-1", now=T0 + LEASE + 3).mission.id
    hosts.renew(led, "b", "inc-b", T0 + LEASE + 3, LEASE)
    ms.complete(led, first, lane="b1", attempt=2, token=d.token, now=T0 + LEASE + 3)
    [d2] = run(led, fb, "b", T0 + LEASE + 4).dispatches
    assert (d2.mission, d2.lane) == (nxt, "b1") and len(events(led, "session_moved")) == 1


def test_a_session_that_chose_to_wait_waits_for_its_lanes_host(two) -> None:  # type: ignore[no-untyped-def]
    led, fa, fb = two
    m = ms.submit(led, fa, cls="interactive", payload={}, session="a1:keep", session_stays=True, now=T0).mission.id
    assert events(led, "session_created")[-1] == {"stays": True}
    hosts.renew(led, "b", "inc-b", T0 + LEASE, LEASE)
    hosts.reap(led, T0 + LEASE + 1, by="b")
    # a1's fallback is b1, but the session waits for a1: neither the fallback nor a move takes it
    assert run(led, fb, "b", T0 + LEASE + 2).dispatches == []
    assert session_lane(led, "a1:keep") == "a1"
    assert ms.get(led, m).wait_reason == "session a1:keep waits for its lane 'a1': its host a is dead"
    # a comes back (a new incarnation): its own pass runs it on a1
    hosts.register(led, "a", "inc-a", "boot-a", 4, T0 + LEASE + 3, LEASE, ["a1"], specs=specs(fa))
    [d] = run(led, fa, "a", T0 + LEASE + 4).dispatches
    assert (d.mission, d.lane) == (m, "a1") and events(led, "session_moved") == []


def test_a_session_moves_off_a_drained_host_once_its_work_there_is_done(two) -> None:  # type: ignore[no-untyped-def]
    led, fa, fb = two
    first = ms.submit(led, fa, cls="interactive", payload={}, session="a1:s", now=T0).mission.id
    [d] = run(led, fa, "a", T0 + 1).dispatches
    second = ms.submit(led, fa, cls="interactive", payload={}, session="a1:s", now=T0 + 2).mission.id
    hosts.drain(led, "a", now=T0 + 3, who="alice")
    # its first mission still runs on a1: the session is kept there, its next mission waits
    assert run(led, fb, "b", T0 + 4).dispatches == [] and run(led, fa, "a", T0 + 4).dispatches == []
    assert "still has missions on unavailable lane 'a1'" in (ms.get(led, second).wait_reason or "")
    ms.complete(led, first, lane="a1", attempt=1, token=d.token, now=T0 + 5)
    assert hosts.in_flight(led.conn, "a") == []
    assert run(led, fa, "a", T0 + 6).dispatches == []  # a claims nothing for itself while drained
    [d] = run(led, fb, "b", T0 + 6).dispatches
    assert (d.mission, d.lane) == (second, "b1") and session_lane(led, "a1:s") == "b1"
    [moved] = events(led, "session_moved")
    assert (moved["from_host"], moved["to_host"]) == ("a", "b")
    # a1 falls back to b1: the chain comes first, so the reason is the drain all the same
    assert moved["reason"] == "its host a is drained"


def test_a_stopped_hosts_sessions_wait_for_it(two) -> None:  # type: ignore[no-untyped-def]
    """A host stopped cleanly is expected back: its lanes are unavailable (their fallback applies to work pinned
    with --lane), but its sessions are not moved away."""
    led, fa, fb = two
    fa.lanes["a1"] = fa.lanes["a1"].model_copy(update={"fallback": None})
    hosts.claim(led, "a", "inc-a", ["a1"], now=T0, specs=specs(fa))
    m = ms.submit(led, fa, cls="interactive", payload={}, session="a1:x", now=T0).mission.id
    assert hosts.stop(led, "a", "inc-a", T0 + 1)
    assert tick.run_once(led, fb, now=T0 + 2, holder=("b", "inc-b")).dispatches == []
    assert "its host a is stopped" in (ms.get(led, m).wait_reason or "")


def test_the_sessions_choice_is_set_at_creation_and_changed_by_a_later_submit(two) -> None:  # type: ignore[no-untyped-def]
    led, fa, _ = two
    ms.submit(led, fa, cls="interactive", payload={}, session="a1:c", now=T0)
    stays = lambda: led.conn.execute("SELECT stays FROM sessions WHERE id = 'a1:c'").fetchone()[0]  # noqa: E731
    assert stays() == 0
    ms.submit(led, fa, cls="interactive", payload={}, session="a1:c", now=T0 + 1)  # no choice given: kept
    ms.submit(led, fa, cls="interactive", payload={}, session="a1:c", session_stays=True, now=T0 + 2)
    assert stays() == 1
    ms.submit(led, fa, cls="interactive", payload={}, session="a1:c", session_stays=True, now=T0 + 3)
    assert events(led, "session_choice") == [{"stays": True}]  # only a change is recorded
    with pytest.raises(LanectlError) as err:
        ms.submit(led, fa, cls="interactive", payload={}, session_stays=True, now=T0 + 4)
    assert err.value.code == "session_missing" and err.value.exit_code == ExitCode.USAGE


def test_a_submit_on_one_host_may_name_another_hosts_lane_and_sessions(two) -> None:  # type: ignore[no-untyped-def]
    led, fa, fb = two
    assert "a1" not in fb.lanes
    # from host b: a session of a1's prefix, and --lane a1, as the ledger knows a1 (its host published it)
    s = ms.submit(led, fb, cls="interactive", payload={}, session="a1:from-b", now=T0).mission.id
    p = ms.submit(led, fb, cls="background", payload={}, lane="a1", now=T0).mission.id
    assert session_lane(led, "a1:from-b") == "a1"
    assert run(led, fb, "b", T0 + 1).dispatches == []  # a1 is a's: b leaves it
    assert sorted(d.mission for d in run(led, fa, "a", T0 + 1).dispatches) == [s, p]
    # a session that moved to b1 takes submits from host a too (b1 is not in a's lanes.d/)
    ms.submit(led, fb, cls="interactive", payload={}, session="a1:moved", now=T0 + 2)
    lane_ops.reroute(led, fb, "a1", "b1", now=T0 + 2, sessions=True)
    assert session_lane(led, "a1:moved") == "b1"
    again = ms.submit(led, fa, cls="interactive", payload={}, session="a1:moved", now=T0 + 3).mission.id
    assert ms.get(led, again).session == "a1:moved"
    for bad, code in (({"lane": "nowhere"}, "lane_not_found"), ({"session": "zz:1"}, "session_not_found"),
                      ({"tags": ["gpu"]}, "tag_not_found")):
        with pytest.raises(LanectlError) as err:
            ms.submit(led, fb, cls="background", payload={}, now=T0 + 4, **bad)
        assert err.value.code == code
    # checked before the ledger is opened: on a shared ledger another host's lane is left to the ledger's check
    ms.check_requests(fb, [ms.SubmitRequest("background", {}, lane="a1")], T0, shared=True)
    with pytest.raises(LanectlError, match="no lane named 'a1'"):
        ms.check_requests(fb, [ms.SubmitRequest("background", {}, lane="a1")], T0)


# ------------------------------------------------------------------------------------------------- fallback


def test_a_fallback_on_another_host_is_taken_by_that_hosts_pass(two) -> None:  # type: ignore[no-untyped-def]
    led, fa, fb = two
    lane_ops.drain(led, fa, "a1", now=T0)
    m = ms.submit(led, fa, cls="background", payload={}, lane="a1", now=T0).mission.id
    assert run(led, fa, "a", T0 + 1).dispatches == []
    assert ms.get(led, m).wait_reason is None  # not waiting: b1 takes it
    assert led.conn.execute("SELECT count(*) FROM queue_waits WHERE blocked = 1").fetchone()[0] == 0
    [d] = run(led, fb, "b", T0 + 2).dispatches  # b's lanes.d has no a1: it learns a1's fallback from the ledger
    assert (d.mission, d.lane) == (m, "b1")
    [ev] = [e for e in events(led, "dispatched")]
    assert ev["fallback_from"] == "a1"
    # the explanation on host a names b1 as eligible, on host b
    m2 = ms.submit(led, fa, cls="background", payload={}, lane="a1", now=T0 + 3).mission.id
    out = tick.explain(led, fa, m2, now=T0 + 3, host="a")
    b1 = next(v for v in out["lanes"] if v["lane"] == "b1")
    assert b1["eligible"] and "on host b" in b1["reason"]


def test_a_fallback_no_host_runs_refuses_the_start(backend, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    led = backend.open()
    fa = lane_set(tmp_path, "a", {"a1": Lane(port=9101, workspace="/var/lib/lanes/a1", fallback="nowhere")})
    with pytest.raises(LanectlError) as err:
        hosts.register(led, "a", "inc-a", "boot", 1, T0, LEASE, ["a1"], specs=specs(fa))
    e = err.value
    assert e.code == "fallback_unknown" and e.exit_code == ExitCode.CONFIG
    assert "'a1' falls back to 'nowhere'" in e.message and "lanes.d/a1.toml" in e.message
    assert hosts.get(led.conn, "a") is None  # nothing written


# ------------------------------------------------------------------------------------------------- lane verbs


def test_drain_undrain_reroute_act_on_another_hosts_lane(two) -> None:  # type: ignore[no-untyped-def]
    led, fa, fb = two
    assert "a1" not in fb.lanes
    assert lane_ops.drain(led, fb, "a1", now=T0, who="bob")
    assert lane_ops.state_of(led, "a1") == "drained"
    assert not lane_ops.drain(led, fb, "a1", now=T0 + 1, who="bob")
    assert lane_ops.undrain(led, fb, "a1", now=T0 + 2, who="bob")
    assert lane_ops.state_of(led, "a1") == "active"
    queued = [ms.submit(led, fa, cls="background", payload={}, lane="a1", now=T0 + 3).mission.id for _ in range(2)]
    ms.submit(led, fa, cls="interactive", payload={}, session="a1:r", now=T0 + 3)
    res = lane_ops.reroute(led, fb, "a1", "b1", now=T0 + 4, sessions=True, who="bob")
    assert res.missions == queued and res.sessions == ["a1:r"] and session_lane(led, "a1:r") == "b1"
    res = lane_ops.reroute(led, fa, "b1", "a1", now=T0 + 5, who="alice")  # and back, from the other host
    assert res.missions == queued
    with pytest.raises(LanectlError) as err:
        lane_ops.drain(led, fb, "nope", now=T0 + 6)
    assert err.value.code == "lane_not_found" and err.value.exit_code == ExitCode.NOT_FOUND
    assert "on other hosts: a1" in (err.value.hint or "")

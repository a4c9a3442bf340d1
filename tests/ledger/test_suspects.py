"""Issue 17 item 2 in the ledger: a lane death is not charged to every bystander; suspects run alone; a mission that
keeps killing its lane while it runs alone ends dead, with an error that says so."""
from __future__ import annotations

from lanectl.ledger import events
from lanectl.ledger import missions as ms
from lanectl.ledger import tick
from lanectl.ledger.events import EventKind
from tests.ledger.conftest import T0


def dispatched(res: tick.TickResult) -> list[int]:
    return [d.mission for d in res.dispatches]


def test_bystanders_are_not_charged_and_the_poison_ends_dead_alone(led, fleet) -> None:  # type: ignore[no-untyped-def]
    ids = [ms.submit(led, fleet, cls="interactive", payload=i, now=T0, lane="alpha").mission.id for i in range(2)]
    poison, bystander = ids
    assert sorted(dispatched(tick.run_once(led, fleet, now=T0))) == ids
    # the lane dies with both in flight: neither is charged, both are suspects
    assert sorted(ms.requeue_lane(led, "alpha", "lane process exited", now=T0 + 1)) == ids
    for i in ids:
        m = ms.get(led, i)
        assert m.state == "queued" and m.attempts - m.round_start == 0
    req = [e for e in events.query(led.conn, kind=EventKind.REQUEUED) if e["mission"] in ids]
    assert all(e["data"]["charged"] is False and e["data"]["suspect"] == 1 for e in req), req
    now = T0 + 2
    # suspects run alone: one at a time on alpha, nothing else beside it
    other = ms.submit(led, fleet, cls="interactive", payload={"other": 1}, now=now, lane="alpha").mission.id
    assert dispatched(tick.run_once(led, fleet, now=now)) == [poison]
    assert dispatched(tick.run_once(led, fleet, now=now)) == []  # alpha runs a suspect alone
    why = tick.explain(led, fleet, other, now=now)
    assert any("suspect mission alone" in v["reason"] for v in why["lanes"] if v["lane"] == "alpha"), why
    for n in range(1, 4):  # it kills alpha each time it runs alone: each death is charged to it
        ms.requeue_lane(led, "alpha", "lane process exited", now=now)
        now += 100  # past any retry backoff
        got = ms.get(led, poison)
        if got.state == "dead":
            break
        assert dispatched(tick.run_once(led, fleet, now=now)) == [poison]
    got = ms.get(led, poison)
    assert got.state == "dead" and got.attempts - got.round_start == 3, got
    assert got.error and got.error.startswith(ms.KILLED_ITS_LANE), got.error
    dead = [e for e in events.query(led.conn, kind=EventKind.DEAD) if e["mission"] == poison]
    assert "suspected of killing its lane runtime" in dead[0]["data"]["reason"]
    # the bystander then runs alone, completes; then the innocent newcomer runs
    res = tick.run_once(led, fleet, now=now)
    assert dispatched(res) == [bystander]
    d = res.dispatches[0]
    ms.complete(led, bystander, lane=d.lane, attempt=d.attempt, token=d.token, now=now + 1)
    res = tick.run_once(led, fleet, now=now + 2)
    assert dispatched(res) == [other]
    assert ms.get(led, bystander).state == "succeeded"


def test_a_lane_death_with_one_mission_alone_is_charged_like_before(led, fleet) -> None:  # type: ignore[no-untyped-def]
    m = ms.submit(led, fleet, cls="interactive", payload=1, now=T0, max_attempts=2).mission.id
    assert dispatched(tick.run_once(led, fleet, now=T0)) == [m]
    ms.requeue_lane(led, ms.get(led, m).current_lane, "lane process exited", now=T0 + 1)
    got = ms.get(led, m)
    assert got.state == "queued" and got.attempts - got.round_start == 1 and got.error is None

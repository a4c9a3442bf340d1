"""The pure dispatch policy: hypothesis properties over random snapshots, plus a few worked examples."""
from __future__ import annotations

from collections import Counter
from dataclasses import replace

from hypothesis import given, settings
from hypothesis import strategies as st

from lanectl.dispatch import (CLASSES, LaneView, QueuedMission, Snapshot, decide, explain, is_aged, priority,
                              route, verdict)

NOW = 10_000.0
MAX_WAIT = {"interactive": 30.0, "deadline": 120.0, "background": 600.0}
NAMES = ("a", "b", "c", "d")


@st.composite
def snapshots(draw):
    n = draw(st.integers(1, 4))
    lanes = []
    for i in range(n):
        cap = draw(st.integers(1, 4))
        classes = draw(st.sets(st.sampled_from(CLASSES), min_size=1))
        rate = draw(st.dictionaries(st.sampled_from(CLASSES), st.integers(1, 5), max_size=2))
        budget = draw(st.dictionaries(st.sampled_from(CLASSES), st.integers(1, 8), max_size=2))
        lanes.append(LaneView(
            name=NAMES[i], capacity=cap, classes=frozenset(classes),
            state=draw(st.sampled_from(["active"] * 4 + ["draining", "drained", "degraded", "disabled"])),
            healthy=draw(st.booleans() | st.just(True)), in_flight=draw(st.integers(0, cap)),
            weight=draw(st.integers(0, 5)), fallback=draw(st.none() | st.sampled_from(NAMES[:i])) if i else None,
            tags=frozenset(draw(st.sets(st.sampled_from(["gpu", "big"])))), rate_per_minute=rate,
            daily_budget=budget, used_minute={c: draw(st.integers(0, v)) for c, v in rate.items()},
            used_day={c: draw(st.integers(0, v)) for c, v in budget.items()}))
    names = [ln.name for ln in lanes]
    sessions = {f"s{j}": draw(st.sampled_from(names)) for j in range(3)}
    active = {s: draw(st.none() | st.just(owner)) for s, owner in sessions.items()}
    queue = []
    for mid in range(1, draw(st.integers(0, 25)) + 1):
        cls = draw(st.sampled_from(CLASSES))
        created = NOW - draw(st.floats(0, 1500))
        deadline = NOW + draw(st.floats(-50, 500)) if cls == "deadline" or draw(st.booleans()) else None
        session = draw(st.none() | st.sampled_from(sorted(sessions)))
        lane = None if session else draw(st.none() | st.sampled_from(names))
        queue.append(QueuedMission(mid, cls, created, deadline, lane,
                                   frozenset(draw(st.sets(st.sampled_from(["gpu", "big"]), max_size=1))), session,
                                   sessions.get(session) if session else None,
                                   active.get(session) if session else None))
    swrr = {ln.name: draw(st.integers(-10, 10)) for ln in lanes}
    return Snapshot(tuple(lanes), tuple(queue), MAX_WAIT, swrr)


@settings(max_examples=150, deadline=None)
@given(snapshots())
def test_capacity_and_quotas_are_never_exceeded(snap):
    d = decide(snap, NOW)
    per_lane = Counter(a.lane for a in d.assignments)
    per_class = Counter((a.lane, a.cls) for a in d.assignments)
    assert len({a.mission for a in d.assignments}) == len(d.assignments)  # nobody twice
    for ln in snap.lanes:
        assert ln.in_flight + per_lane[ln.name] <= ln.capacity
        for c, rate in ln.rate_per_minute.items():
            assert ln.used_minute.get(c, 0) + per_class[ln.name, c] <= rate
        for c, budget in ln.daily_budget.items():
            assert ln.used_day.get(c, 0) + per_class[ln.name, c] <= budget


@settings(max_examples=150, deadline=None)
@given(snapshots())
def test_assignments_respect_eligibility_and_expiry(snap):
    d = decide(snap, NOW)
    lanes = {ln.name: ln for ln in snap.lanes}
    queue = {m.id: m for m in snap.queue}
    for a in d.assignments:
        m, ln = queue[a.mission], lanes[a.lane]
        assert ln.available and m.cls in ln.classes and m.tags <= ln.tags
        assert m.deadline is None or m.deadline > NOW
        pinned, _, _ = route(m, lanes)
        if m.session_active_lane is not None:
            assert a.lane == m.session_active_lane
        elif pinned is not None and not (m.session and any(
                b.session == m.session and b.mission != m.id for b in d.assignments)):
            assert a.lane == pinned
    assert set(d.expired) == {m.id for m in snap.queue if m.deadline is not None and m.deadline <= NOW}
    assert not set(d.expired) & {a.mission for a in d.assignments}
    assert set(d.waiting).isdisjoint({a.mission for a in d.assignments})


@settings(max_examples=150, deadline=None)
@given(snapshots())
def test_no_lower_class_while_a_higher_eligible_one_waits(snap):
    """For every lane that got mission m2, any waiting mission that comes first in priority order (higher class,
    or aged) and could have gone to that lane was stopped only by that lane's quota for its own class."""
    d = decide(snap, NOW)
    lanes = {ln.name: ln for ln in snap.lanes}
    queue = {m.id: m for m in snap.queue}
    placed_sessions = {a.session for a in d.assignments if a.session}
    taken = Counter((a.lane, a.cls) for a in d.assignments)
    for a in d.assignments:
        m2 = queue[a.mission]
        for mid in d.waiting:
            m1 = queue[mid]
            if m1.session in placed_sessions or priority(m1, MAX_WAIT, NOW) >= priority(m2, MAX_WAIT, NOW):
                continue
            ln = lanes[a.lane]
            pinned, _, wait = route(m1, lanes)
            static = verdict(m1, LaneView(ln.name, capacity=10**6, classes=ln.classes, state=ln.state,
                                          healthy=ln.healthy, tags=ln.tags), pinned, wait)
            if static is None:
                used_min = ln.used_minute.get(m1.cls, 0) + taken[ln.name, m1.cls]
                used_day = ln.used_day.get(m1.cls, 0) + taken[ln.name, m1.cls]
                assert (used_min >= ln.rate_per_minute.get(m1.cls, 10**9)
                        or used_day >= ln.daily_budget.get(m1.cls, 10**9)), (m1, m2, ln)
            if m1.cls == "interactive" and m2.cls != "interactive" and not is_aged(m2, MAX_WAIT, NOW):
                assert static is not None or used_min >= ln.rate_per_minute.get("interactive", 10**9) \
                    or used_day >= ln.daily_budget.get("interactive", 10**9)


@settings(max_examples=150, deadline=None)
@given(snapshots())
def test_a_session_lands_on_one_lane_and_plans_are_deterministic(snap):
    d = decide(snap, NOW)
    by_session: dict[str, set[str]] = {}
    for a in d.assignments:
        if a.session:
            by_session.setdefault(a.session, set()).add(a.lane)
    assert all(len(v) == 1 for v in by_session.values())
    again = decide(snap, NOW)
    assert again.assignments == d.assignments and again.swrr == d.swrr


@settings(max_examples=60, deadline=None)
@given(lanes=st.integers(1, 3), capacity=st.integers(1, 3), max_wait=st.integers(2, 40),
       tick=st.integers(1, 5), start=st.integers(0, 10))
def test_background_is_dispatched_within_max_wait_plus_one_tick_under_interactive_load(
        lanes, capacity, max_wait, tick, start):
    """Every tick all capacity frees and more interactive work than capacity arrives; the background mission
    waits while fresh interactive work is queued but must go by max_wait + one tick."""
    waits = {"interactive": 10**9, "deadline": 10**9, "background": float(max_wait)}
    views = tuple(LaneView(NAMES[i], capacity=capacity) for i in range(lanes))
    bg = QueuedMission(0, "background", float(start))
    swrr: dict[str, int] = {}
    next_id, t = 1, float(start)
    while True:
        arrivals = [QueuedMission(next_id + k, "interactive", t) for k in range(lanes * capacity + 1)]
        next_id += len(arrivals)
        d = decide(Snapshot(views, (bg, *arrivals), waits, swrr), t)
        swrr = d.swrr
        if any(a.mission == 0 for a in d.assignments):
            break
        t += tick
        assert t <= start + max_wait + tick, "background starved past max_wait + one tick"
    assert t - start <= max_wait + tick


def test_smooth_weighted_round_robin_shares_by_weight():
    lanes = (LaneView("a", capacity=10**6, weight=3), LaneView("b", capacity=10**6, weight=1))
    queue = tuple(QueuedMission(i, "background", NOW) for i in range(400))
    d = decide(Snapshot(lanes, queue, MAX_WAIT), NOW)
    assert Counter(a.lane for a in d.assignments) == {"a": 300, "b": 100}
    assert [a.lane for a in d.assignments[:4]] == ["a", "b", "a", "a"]  # smooth, not bursty; SWRR ties go to the lane with less in flight


def test_swrr_state_carries_across_passes():
    lanes = (LaneView("a", capacity=100, weight=1), LaneView("b", capacity=100, weight=1))
    swrr: dict[str, int] = {}
    picks = []
    for i in range(6):
        d = decide(Snapshot(lanes, (QueuedMission(i, "interactive", NOW),), MAX_WAIT, swrr), NOW)
        swrr = d.swrr
        picks.append(d.assignments[0].lane)
    assert picks == ["a", "b"] * 3


def test_edf_order_and_classes():
    lane = (LaneView("a", capacity=3),)
    queue = (QueuedMission(1, "background", NOW - 1), QueuedMission(2, "deadline", NOW - 5, NOW + 50),
             QueuedMission(3, "deadline", NOW - 1, NOW + 20), QueuedMission(4, "interactive", NOW),
             QueuedMission(5, "deadline", NOW - 9, NOW - 1))
    d = decide(Snapshot(lane, queue, MAX_WAIT), NOW)
    assert [a.mission for a in d.assignments] == [4, 3, 2]
    assert d.expired == [5] and "full" in d.waiting[1]


def test_aged_background_goes_before_fresh_interactive():
    lane = (LaneView("a", capacity=1),)
    queue = (QueuedMission(1, "interactive", NOW), QueuedMission(2, "background", NOW - 601))
    d = decide(Snapshot(lane, queue, MAX_WAIT), NOW)
    assert [(a.mission, a.aged) for a in d.assignments] == [(2, True)]


def test_fallback_chain_and_weight_zero():
    lanes = (LaneView("a", capacity=2, state="degraded", fallback=None),
             LaneView("b", capacity=2, healthy=False, fallback="a"),
             LaneView("c", capacity=2, fallback="b", state="draining"),
             LaneView("d", capacity=2, weight=0), LaneView("e", capacity=2, weight=1))
    pinned = QueuedMission(1, "interactive", NOW, lane="c")
    d = decide(Snapshot(lanes, (pinned, QueuedMission(2, "interactive", NOW)), MAX_WAIT), NOW)
    assert "no fallback lane is available" in d.waiting[1]
    assert [a.lane for a in d.assignments] == ["e"]  # weight 0 only when nothing weighted is eligible
    moved = QueuedMission(3, "interactive", NOW, session="s", session_lane="b")
    lanes2 = (LaneView("a", capacity=1), LaneView("b", capacity=1, healthy=False, fallback="a"))
    a = decide(Snapshot(lanes2, (moved,), MAX_WAIT), NOW).assignments[0]
    assert (a.lane, a.fallback_from, a.session_move) == ("a", "b", ("b", "a"))


def test_a_spent_daily_budget_takes_the_fallback_and_a_used_rate_quota_waits():
    spent = LaneView("b", capacity=2, fallback="a", daily_budget={"background": 3}, used_day={"background": 3})
    lanes = (LaneView("a", capacity=2), spent)
    d = decide(Snapshot(lanes, (QueuedMission(1, "background", NOW, lane="b"),), MAX_WAIT), NOW)
    assert [(x.lane, x.fallback_from) for x in d.assignments] == [("a", "b")]  # not held until midnight UTC
    lonely = (replace(spent, fallback=None),)
    d = decide(Snapshot(lonely, (QueuedMission(1, "background", NOW, lane="b"),), MAX_WAIT), NOW)
    assert "daily budget" in d.waiting[1] and not d.assignments
    rate = (LaneView("a", capacity=2),
            LaneView("b", capacity=2, fallback="a", rate_per_minute={"background": 1}, used_minute={"background": 1}))
    d = decide(Snapshot(rate, (QueuedMission(1, "background", NOW, lane="b"),), MAX_WAIT), NOW)
    assert not d.assignments and "rate quota" in d.waiting[1]  # refills within the minute: it waits


def test_explain_names_every_lane_and_reason():
    lanes = (LaneView("a", capacity=1, in_flight=1), LaneView("b", capacity=1, classes=frozenset({"background"})),
             LaneView("c", capacity=1, state="drained"), LaneView("d", capacity=1, tags=frozenset({"gpu"}),
                                                                   rate_per_minute={"interactive": 1},
                                                                   used_minute={"interactive": 1}))
    got = {v.lane: v.reason for v in explain(QueuedMission(1, "interactive", NOW), Snapshot(lanes, ()), NOW)}
    assert got == {"a": "lane is full (1/1 in flight)", "b": "lane does not serve interactive",
                   "c": "lane is drained", "d": "rate quota used (1/1 interactive per minute)"}

"""The pure dispatch policy with several hosts' lanes in one snapshot (issue 13): a pass assigns only to its own
host's lanes, leaves to another host what only that host's lanes can take (no wait recorded), and moves a session off a lane whose host is dead or drained unless it chose to wait."""
from __future__ import annotations

from dataclasses import replace

from hypothesis import given, settings
from hypothesis import strategies as st

from lanectl.dispatch import CLASSES, LaneView, QueuedMission, Snapshot, decide, group_room
from tests.unit.test_dispatch import NOW, snapshots


def as_host(snap: Snapshot, mine: frozenset[str]) -> Snapshot:
    """The same snapshot as the host that runs the lanes in ``mine`` sees it."""
    return replace(snap, lanes=tuple(replace(ln, local=ln.name in mine) for ln in snap.lanes))


@settings(max_examples=150, deadline=None)
@given(snapshots(), st.data())
def test_each_host_assigns_only_to_its_lanes_and_agrees_on_what_waits(snap: Snapshot, data: st.DataObject) -> None:
    names = [ln.name for ln in snap.lanes]
    mine = frozenset(data.draw(st.sets(st.sampled_from(names))))
    alone = decide(snap, NOW)  # one host runs every lane
    here = decide(as_host(snap, mine), NOW)
    there = decide(as_host(snap, frozenset(names) - mine), NOW)
    assert all(a.lane in mine for a in here.assignments)
    assert all(a.lane not in mine for a in there.assignments)
    # a host records a wait only for what no lane of any host could take in its pass: never for a mission the
    # other host assigned in its own pass from the same snapshot
    assert not set(here.waiting) & {a.mission for a in there.assignments}
    assert not set(there.waiting) & {a.mission for a in here.assignments}
    for d in (here, there):
        assert set(d.waiting) <= set(alone.waiting) | {a.mission for a in alone.assignments}
    # SWRR credit moves only for the lanes a host assigned to
    for d, own in ((here, mine), (there, frozenset(names) - mine)):
        changed = {n for n in names if d.swrr.get(n, 0) != snap.swrr.get(n, 0)}
        assert changed <= own


def lane(name: str, **kw: object) -> LaneView:
    return LaneView(name=name, capacity=2, **kw)  # type: ignore[arg-type]


def test_a_fallback_on_another_host_is_left_to_that_host_then_taken_by_it() -> None:
    a1 = lane("a1", state="drained", fallback="b1", host="a")
    b1 = lane("b1", host="b")
    m = QueuedMission(1, "background", NOW - 1, lane="a1")
    on_a = decide(Snapshot((a1, replace(b1, local=False)), (m,)), NOW)
    assert on_a.assignments == [] and on_a.waiting == {}
    on_b = decide(Snapshot((replace(a1, local=False), b1), (m,)), NOW)
    [a] = on_b.assignments
    assert (a.lane, a.fallback_from) == ("b1", "a1")
    assert group_room("a1", frozenset(), "background", {"a1": replace(a1, local=False), "b1": b1},
                      local_only=True) == 2
    assert group_room("a1", frozenset(), "background", {"a1": a1, "b1": replace(b1, local=False)},
                      local_only=True) == 0


def test_a_session_leaves_a_lost_hosts_lane_unless_it_waits_for_it() -> None:
    a1 = lane("a1", host="a", local=False, away="its host a is dead", away_moves=True)
    b1 = lane("b1", host="b")
    m = QueuedMission(1, "interactive", NOW - 1, session="a1:x", session_lane="a1")
    [a] = decide(Snapshot((a1, b1), (m,)), NOW).assignments
    assert (a.lane, a.session_move, a.move_reason) == ("b1", ("a1", "b1"), "its host a is dead")
    waits = decide(Snapshot((a1, b1), (replace(m, session_stays=True),)), NOW)
    assert waits.assignments == [] and waits.waiting == {1: "session a1:x waits for its lane 'a1': its host a is dead"}
    stopped = replace(a1, away="its host a is stopped", away_moves=False)  # expected back: the session waits
    d = decide(Snapshot((stopped, b1), (m,)), NOW)
    assert d.assignments == [] and "its host a is stopped" in d.waiting[1]
    assert all(c in CLASSES for c in a1.classes)

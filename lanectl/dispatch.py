"""The dispatch policy: a pure function from a snapshot (lanes, usage, queue head, SWRR state, now) to assignments.

No I/O and no clock: ``lanectl.ledger.tick`` builds the snapshot inside the write transaction and records the
result. Rules (DESIGN.md, "Dispatch policy"):

- A lane is eligible for a mission when it is ``active`` and healthy, serves the mission's class, carries every
  tag the mission asks for, has capacity left and has quota left (per-class rate per minute, daily budget).
- Order: ``interactive > deadline > background`` strictly; deadline missions earliest-deadline-first; others
  first in, first out. A mission that has waited longer than its class's ``max_wait_sec`` is *aged*: aged
  missions go before all fresh work (then by class, then oldest first). "One class up" alone would leave an aged
  background mission behind interactive work forever under sustained interactive load; this ordering bounds its
  wait by ``max_wait_sec`` plus one tick, which the property tests check.
- A queued mission whose deadline has passed is expired instead of dispatched.
- A mission pinned to a lane (``--lane``, or its session's owner) goes there; when that lane is unavailable (not
  active or not healthy, or its daily budget for the class is spent) it follows the ``fallback`` chain to the first available lane, and a session moves with
  it (recorded). A session with missions still active on one lane is kept there. With no lane it waits, and the
  reason is returned (recorded as a ``waiting`` event).
- Several hosts (issue 13): the snapshot holds every host's lanes; this host may assign only to its own
  (``local``). A mission that only another host's lane can take now is left to that host (neither assigned nor
  waiting): every host computes the same routes and records a wait only for what no host's lane can take. A lane
  whose host cannot run it (``away``: the host is dead, forgotten, stopped or drained) is unavailable, and its
  fallback chain applies. A session whose lane's host is dead or drained (``away_moves``) follows the chain and,
  with no lane on it, moves to any lane that can take its mission (``session_move``, with the reason); a session
  that chose to wait for its lane (``session_stays``) waits instead.
- Among eligible lanes: smooth weighted round-robin (nginx's SWRR) by ``weight`` over the lanes eligible for this
  mission, ties broken by least in flight, then name. Lanes of weight 0 are used only when no lane with weight is
  eligible. The SWRR state is part of the snapshot and of the result, so a plan is deterministic.
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace

from lanectl.states import AVAILABLE as AVAILABLE_STATE
from lanectl.states import CLASSES, RANK


@dataclass(frozen=True)
class LaneView:
    name: str
    capacity: int
    classes: frozenset[str] = frozenset(CLASSES)
    state: str = "active"  # active | draining | drained | degraded | disabled
    healthy: bool = True
    in_flight: int = 0
    weight: int = 100
    fallback: str | None = None
    tags: frozenset[str] = frozenset()
    rate_per_minute: Mapping[str, int] = field(default_factory=dict)
    daily_budget: Mapping[str, int] = field(default_factory=dict)
    used_minute: Mapping[str, int] = field(default_factory=dict)
    used_day: Mapping[str, int] = field(default_factory=dict)
    invocation: str | None = None
    quarantine: bool = False
    """It runs a suspect mission (one that was in flight when a lane died), which runs alone: nothing else goes
    there until it ends."""
    host: str | None = None
    local: bool = True
    """This host runs the lane: the pass may assign to it. Another host's lane is in the snapshot so that routes
    (fallback chains, sessions) are the same on every host, but only its own host assigns to it."""
    away: str | None = None
    """Why the lane's host cannot run it now (its host is dead, forgotten, stopped or drained); None: it can."""
    away_moves: bool = False
    """Its host is dead, forgotten or drained: the lane's sessions move elsewhere (unless they chose to wait)."""

    @property
    def available(self) -> bool:
        return self.state == AVAILABLE_STATE and self.healthy and self.away is None


@dataclass(frozen=True)
class QueuedMission:
    id: int
    cls: str
    created_at: float
    deadline: float | None = None
    lane: str | None = None  # asked for with --lane
    tags: frozenset[str] = frozenset()
    session: str | None = None
    session_lane: str | None = None  # the session's owner lane
    session_active_lane: str | None = None  # lane where the session has missions in flight
    suspect: int = 0  # lane deaths it was in flight for: it runs alone, on an idle lane
    session_stays: bool = False  # its session waits for its lane when the lane's host is dead or drained


@dataclass(frozen=True)
class Snapshot:
    lanes: tuple[LaneView, ...]
    queue: tuple[QueuedMission, ...]
    max_wait: Mapping[str, float] = field(default_factory=lambda: {"interactive": 30.0, "deadline": 120.0,
                                                                   "background": 600.0})
    swrr: Mapping[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class Assignment:
    mission: int
    lane: str
    cls: str
    aged: bool = False
    fallback_from: str | None = None
    session: str | None = None
    session_move: tuple[str, str] | None = None  # (from lane, to lane)
    budget_spent: bool = False  # fell back because the bound lane's daily budget is spent (not because it is away)
    move_reason: str | None = None  # why the session moves: fallback, or its lane's host is dead or drained


@dataclass
class Decision:
    assignments: list[Assignment]
    expired: list[int]
    waiting: dict[int, str]
    swrr: dict[str, int]


@dataclass(frozen=True)
class LaneVerdict:
    lane: str
    eligible: bool
    reason: str


def is_aged(m: QueuedMission, max_wait: Mapping[str, float], now: float) -> bool:
    return now - m.created_at > max_wait.get(m.cls, math.inf)


def priority(m: QueuedMission, max_wait: Mapping[str, float], now: float) -> tuple[int, int, float, int]:
    """Sort key: aged first, then class, then deadline (deadline class, EDF) or age."""
    if is_aged(m, max_wait, now):
        return (0, RANK[m.cls], m.created_at, m.id)
    if m.cls == "deadline" and m.deadline is not None:
        return (1, RANK[m.cls], m.deadline, m.id)
    return (1, RANK[m.cls], m.created_at, m.id)


def quota_left(lane: LaneView, cls: str) -> str | None:
    """None when the lane may take one more mission of ``cls`` now, else the reason it may not."""
    rate = lane.rate_per_minute.get(cls)
    if rate is not None and lane.used_minute.get(cls, 0) >= rate:
        return f"rate quota used ({lane.used_minute.get(cls, 0)}/{rate} {cls} per minute)"
    budget = lane.daily_budget.get(cls)
    if budget is not None and lane.used_day.get(cls, 0) >= budget:
        return f"daily budget used ({lane.used_day.get(cls, 0)}/{budget} {cls} today)"
    return None


def route(m: QueuedMission, lanes: Mapping[str, LaneView]) -> tuple[str | None, str | None, str | None]:
    """(pinned lane or None for any, fallback_from, wait reason). Follows the fallback chain when pinned."""
    if m.session_active_lane is not None:
        pin = m.session_active_lane
        if pin not in lanes or not lanes[pin].available:
            return None, None, f"session {m.session} still has missions on unavailable lane {pin!r}"
        return pin, None, None
    pin = m.session_lane or m.lane
    if pin is None:
        return None, None, None
    owner = lanes.get(m.session_lane) if m.session_lane is not None else None
    host_lost = owner is not None and owner.away is not None and owner.away_moves
    if host_lost and m.session_stays:
        return None, None, f"session {m.session} waits for its lane {pin!r}: {owner.away}"  # type: ignore[union-attr]
    seen: list[str] = []
    current: str | None = pin
    while current is not None and current not in seen:
        seen.append(current)
        view = lanes.get(current)
        if view is not None and view.available and not budget_spent(view, m.cls):
            return current, (pin if current != pin else None), None
        current = view.fallback if view is not None else None
    if host_lost:
        return None, None, None  # the session moves to any lane that can take the mission
    first = lanes.get(pin)
    if first is not None and first.away is not None:
        return None, None, (f"lane {pin!r} is unavailable ({first.away}) and no fallback lane is available (tried "
                            f"{', '.join(seen)})")
    return None, None, (f"lane {pin!r} is unavailable (or its daily budget for {m.cls} is spent) and no fallback "
                        f"lane is available (tried {', '.join(seen)})")


def moves_anywhere(target: str, lanes: Mapping[str, LaneView]) -> bool:
    """Work bound to ``target`` may go to any lane: its host is dead or drained, so its sessions move (those that
    chose to wait excepted)."""
    view = lanes.get(target)
    return view is not None and view.away is not None and view.away_moves


def budget_spent(lane: LaneView, cls: str) -> bool:
    """The lane's daily budget for the class is used up: work bound to it takes its fallback rather than wait
    until midnight UTC (a rate quota refills within the minute: that work waits)."""
    budget = lane.daily_budget.get(cls)
    return budget is not None and lane.used_day.get(cls, 0) >= budget


def group_room(target: str | None, tags: frozenset[str], cls: str, lanes: Mapping[str, LaneView], *,
               local_only: bool = False) -> int:
    """How many missions of one queue group (one class, one target lane or none, one tag set) this pass could
    place at most: the free slots, within quota, of the lanes that could take them (``verdict``'s rules, without
    sessions). 0 means that none of the group can be placed now, however many it holds: the tick then reads only a
    sample of it, for its wait reason, so an unplaceable backlog never keeps placeable work from being read.
    ``local_only``: count only this host's lanes (what this host could place)."""
    if target and moves_anywhere(target, lanes):
        candidates: Iterable[LaneView] = lanes.values()  # an upper bound: its sessions may move anywhere
    elif target:
        pinned, _, wait = route(QueuedMission(0, cls, 0.0, lane=target, tags=tags), lanes)
        if wait is not None or pinned is None:
            return 0
        # from the lane it routes to on along its fallback chain: a daily budget spent within this pass sends
        # the rest of the group further down the chain (an upper bound is enough: it only sizes a read)
        chain: list[LaneView] = []
        current: str | None = pinned
        while current is not None and current in lanes and all(c.name != current for c in chain):
            chain.append(lanes[current])
            current = lanes[current].fallback
        candidates = chain
    else:
        candidates = lanes.values()
    return sum(_room(ln, cls, tags) for ln in candidates if ln.local or not local_only)


def _room(lane: LaneView, cls: str, tags: frozenset[str]) -> int:
    if not lane.available or cls not in lane.classes or not tags <= lane.tags or lane.quarantine:
        return 0
    room = lane.capacity - lane.in_flight
    rate = lane.rate_per_minute.get(cls)
    if rate is not None:
        room = min(room, rate - lane.used_minute.get(cls, 0))
    budget = lane.daily_budget.get(cls)
    if budget is not None:
        room = min(room, budget - lane.used_day.get(cls, 0))
    return max(0, room)


def verdict(m: QueuedMission, lane: LaneView, pinned: str | None, route_wait: str | None) -> str | None:
    """None when ``lane`` is eligible for ``m``, else why not."""
    if route_wait is not None:
        return route_wait
    if pinned is not None and lane.name != pinned:
        return f"mission is bound to lane {pinned!r}"
    if lane.away is not None:
        return f"lane is unavailable: {lane.away}"
    if lane.state != AVAILABLE_STATE:
        return f"lane is {lane.state}"
    if not lane.healthy:
        return "lane is not healthy"
    if m.cls not in lane.classes:
        return f"lane does not serve {m.cls}"
    missing = sorted(m.tags - lane.tags)
    if missing:
        return f"lane lacks tag(s) {', '.join(missing)}"
    if lane.quarantine:
        return "lane runs a suspect mission alone (one in flight when a lane died)"
    if lane.in_flight >= lane.capacity:
        return f"lane is full ({lane.in_flight}/{lane.capacity} in flight)"
    if m.suspect and lane.in_flight:
        return (f"mission runs alone (it was in flight when a lane died {m.suspect} time(s)); lane has "
                f"{lane.in_flight} in flight")
    return quota_left(lane, m.cls)


def swrr_pick(eligible: list[LaneView], state: dict[str, int]) -> LaneView:
    weighted = [ln for ln in eligible if ln.weight > 0] or eligible
    total = sum(ln.weight for ln in weighted)
    for ln in weighted:
        state[ln.name] = state.get(ln.name, 0) + ln.weight
    best = max(weighted, key=lambda ln: (state[ln.name], -ln.in_flight, _neg(ln.name)))
    state[best.name] -= total
    return best


def _neg(name: str) -> tuple[int, ...]:
    return tuple(-ord(c) for c in name)


def decide(snapshot: Snapshot, now: float) -> Decision:
    """The whole pass: expirations, assignments in priority order, the waits and the new SWRR state."""
    lanes = {ln.name: ln for ln in snapshot.lanes}
    swrr = dict(snapshot.swrr)
    expired = [m.id for m in snapshot.queue if m.deadline is not None and m.deadline <= now]
    gone = set(expired)
    queue = sorted((m for m in snapshot.queue if m.id not in gone),
                   key=lambda m: priority(m, snapshot.max_wait, now))
    out: list[Assignment] = []
    waiting: dict[int, str] = {}
    session_lane: dict[str, str] = {}  # sessions placed during this pass stay on one lane
    for m in queue:
        if m.session is not None and m.session in session_lane:
            m = replace(m, session_active_lane=session_lane[m.session])
        pinned, fallback_from, wait = route(m, lanes)
        reasons = {name: verdict(m, ln, pinned, wait) for name, ln in lanes.items()}
        eligible = [lanes[n] for n, r in reasons.items() if r is None]
        mine = [ln for ln in eligible if ln.local]
        if not mine:
            if not eligible:
                waiting[m.id] = _summary(m, reasons, wait)
            continue  # else another host's lane takes it: that host's pass assigns it
        best = swrr_pick(mine, swrr)
        used_min = dict(best.used_minute)
        used_day = dict(best.used_day)
        used_min[m.cls] = used_min.get(m.cls, 0) + 1
        used_day[m.cls] = used_day.get(m.cls, 0) + 1
        lanes[best.name] = replace(best, in_flight=best.in_flight + 1, used_minute=used_min, used_day=used_day,
                                   quarantine=best.quarantine or m.suspect > 0)
        move = why = None
        if m.session is not None:
            session_lane[m.session] = best.name
            if m.session_lane is not None and m.session_lane != best.name:
                move = (m.session_lane, best.name)
                owner = lanes.get(m.session_lane)
                why = (owner.away if owner is not None and owner.away is not None and owner.away_moves
                       else "fallback" if fallback_from else "reroute")
        spent = fallback_from is not None and fallback_from in lanes and lanes[fallback_from].available
        out.append(Assignment(m.id, best.name, m.cls, is_aged(m, snapshot.max_wait, now), fallback_from,
                              m.session, move, spent, why))
    return Decision(out, expired, waiting, swrr)


def _summary(m: QueuedMission, reasons: Mapping[str, str | None], wait: str | None) -> str:
    if wait is not None:
        return wait
    if not reasons:
        return "no lanes are configured"
    distinct = sorted({r for r in reasons.values() if r})
    return "no eligible lane: " + "; ".join(distinct[:4])


def plan(snapshot: Snapshot, now: float) -> list[Assignment]:
    """The assignments of one policy pass (see ``decide`` for expirations, waits and SWRR state)."""
    return decide(snapshot, now).assignments


def explain(mission: QueuedMission, snapshot: Snapshot, now: float) -> list[LaneVerdict]:
    """Every lane considered for ``mission`` as it stands now, and why it would be skipped."""
    lanes = {ln.name: ln for ln in snapshot.lanes}
    if mission.deadline is not None and mission.deadline <= now:
        return [LaneVerdict(n, False, "deadline passed: the mission expires") for n in sorted(lanes)]
    pinned, fallback_from, wait = route(mission, lanes)
    out = []
    for name in sorted(lanes):
        reason = verdict(mission, lanes[name], pinned, wait)
        if reason is None and fallback_from is not None:
            reason_text = f"eligible (fallback for {fallback_from!r})"
        else:
            reason_text = reason or "eligible"
        if reason is None and not lanes[name].local:
            reason_text += f" (on host {lanes[name].host}: its supervisor takes it)"
        out.append(LaneVerdict(name, reason is None, reason_text))
    return out

"""One policy pass against the ledger: the glue between the tables and the pure ``lanectl.dispatch`` policy.

``run_once`` is what the supervisor calls every tick (and ``lanectl dispatch --once``): in one ``BEGIN
IMMEDIATE`` transaction it expires leases and deadlines, reads a snapshot, plans, and records every assignment
and every new wait reason. Taking the snapshot under the write lock makes the decision atomic with the data it
was made from: no other writer can change a mission between the plan and its record.

The queue part of the snapshot is read per *group*: queued missions of one class, bound to one lane (their
``--lane`` or their session's owner) or to none, asking for one set of tags, are alike to the policy. Groups are
found with one index seek each; from a group some lane can take work from, the pass reads its head (twice its
room, at least ``HEAD_MIN``); from a group no lane can take from now (its lane full, drained, down, out of quota,
with no fallback), it reads one mission, for the wait reason. So a tick costs the same with a thousand or a million
missions waiting, and no backlog, however large, keeps placeable work from being read (no head-of-line blocking).
A blocked group's reason is kept in ``queue_waits`` and written onto its missions, with a ``waiting`` event each,
``WAIT_SWEEP`` missions a pass.
"""
from __future__ import annotations

import json
import sqlite3
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

from lanectl import dispatch
from lanectl.dispatch import LaneView, QueuedMission, Snapshot
from lanectl.ledger import Ledger
from lanectl.ledger import missions as ms
from lanectl.states import CLASSES, RANK

if TYPE_CHECKING:
    from lanectl.config import LaneSet

HEAD_MIN: Final = 8
"""Fewest queued missions a snapshot reads from a group that some lane can take from (else twice its room)."""
HEAD_MAX: Final = 256
WAIT_SWEEP: Final = 1000
"""Most missions of blocked groups that one pass writes the group's wait reason onto (with a waiting event)."""
RATE_WINDOW_S: Final = 60.0
_QCOLS: Final = ("m.id, m.class, m.created_at, m.deadline, m.lane, m.tags, m.session, s.lane, m.suspect, s.stays")


@dataclass
class TickResult:
    dispatches: list[ms.Dispatch]
    expired_deadlines: list[int]
    expired_leases: list[int]
    waiting: dict[int, str]
    held: bool = True
    """False: the pass ran for a host incarnation that no longer holds its host's record; it did nothing."""

    def as_dict(self) -> dict[str, Any]:
        return {
            "dispatched": [{"mission": d.mission, "attempt": d.attempt, "lane": d.lane, "class": d.cls,
                            "session": d.session} for d in self.dispatches],
            "expired_deadlines": self.expired_deadlines,
            "expired_leases": self.expired_leases,
            "waiting": {str(k): v for k, v in sorted(self.waiting.items())},
        }


def lane_views(conn: sqlite3.Connection, fleet: LaneSet, now: float, full: frozenset[str] = frozenset(),
               host: str | None = None) -> tuple[tuple[LaneView, ...], dict[str, int]]:
    """Every lane as the policy sees it; a lane in ``full`` (it refused a dispatch as full since its last health
    report) counts as having no room, whatever the ledger says it holds.

    ``host``, this host's name (a supervisor's pass): the lanes of other hosts are in the snapshot too, as their
    hosts published them (``lanes.spec``), not ``local`` (this pass never assigns to them), and a lane whose host
    is dead, forgotten, stopped or drained is ``away`` (this host's own lanes when it is drained)."""
    from lanectl.ledger import hosts

    rows = {r[0]: r[1:] for r in conn.execute("SELECT name, state, healthy, invocation, swrr, weight FROM lanes")}
    away = hosts.away(conn) if host is not None else {}
    remote = {} if host is None else {
        r[0]: (r[1], json.loads(r[2])) for r in conn.execute(
            "SELECT name, host, spec FROM lanes WHERE host IS NOT NULL AND host <> ? AND spec IS NOT NULL", (host,))
        if r[0] not in fleet.lanes}
    flight: dict[str, int] = {}
    quarantined: set[str] = set()
    for lane_name, n, suspects in conn.execute("SELECT current_lane, count(*), max(suspect) FROM missions "
                                               "WHERE state IN ('dispatched', 'running') GROUP BY current_lane"):
        flight[lane_name] = n
        if suspects:
            quarantined.add(lane_name)
    day = int(now // 86400)
    daily: dict[tuple[str, str], int] = {(r[0], r[1]): r[2] for r in conn.execute(
        "SELECT lane, class, n FROM usage_daily WHERE day = ?", (day,))}
    views, swrr = [], {}
    specs = [(name, host, lane_spec(name, lane)) for name, lane in fleet.lanes.items()]
    specs += [(name, owner, spec) for name, (owner, spec) in remote.items()]
    for name, owner, spec in sorted(specs, key=lambda x: x[0]):
        state, healthy, invocation, weight_state, promoted = rows.get(name, ("active", 1, None, 0, None))
        if not spec["enabled"]:
            state = "disabled"
        quotas = spec.get("quotas") or {}
        rate = {c: q["rate_per_minute"] for c, q in quotas.items() if q.get("rate_per_minute") is not None}
        budget = {c: q["daily_budget"] for c, q in quotas.items() if q.get("daily_budget") is not None}
        used_min = {c: conn.execute("SELECT count(*) FROM attempts WHERE lane = ? AND class = ? "
                                    "AND dispatched_at > ?", (name, c, now - RATE_WINDOW_S)).fetchone()[0]
                    for c in rate}
        local = name in fleet.lanes
        gone = away.get(owner) if owner is not None else None
        views.append(LaneView(name=name, capacity=spec["capacity"], classes=frozenset(spec["classes"]), state=state,
                              healthy=bool(healthy),
                              in_flight=max(flight.get(name, 0), spec["capacity"] if local and name in full else 0),
                              weight=spec["weight"] if promoted is None else promoted,
                              fallback=spec.get("fallback"), tags=frozenset(spec.get("tags") or ()),
                              rate_per_minute=rate, daily_budget=budget, used_minute=used_min,
                              used_day={c: daily.get((name, c), 0) for c in budget}, invocation=invocation,
                              quarantine=name in quarantined, host=owner, local=local,
                              away=None if gone is None else gone[0], away_moves=gone is not None and gone[1]))
        if local:
            swrr[name] = weight_state
    return tuple(views), swrr


def lane_spec(name: str, lane: Any) -> dict[str, Any]:
    """What the policy needs of a lane (``lanectl.config.Lane``), as its host publishes it for other hosts' passes
    (``lanes.spec``, written at start and reload: ``lanectl.ledger.hosts.claim_in``)."""
    return {"capacity": lane.capacity, "classes": sorted(lane.classes), "tags": sorted(lane.tags),
            "fallback": lane.fallback, "weight": lane.weight, "enabled": lane.enabled,
            "session_prefix": lane.resolved_prefix(name),
            "quotas": {c: {"rate_per_minute": q.rate_per_minute, "daily_budget": q.daily_budget}
                       for c, q in sorted(lane.quotas.items())}}


_NO_TAGS: Final = frozenset[str]()


def _queued(row: tuple[Any, ...], active: dict[str, str]) -> QueuedMission:
    mid, cls, created, deadline, lane, tags, session, owner, suspect, stays = row
    return QueuedMission(mid, cls, created, deadline, lane, _NO_TAGS if tags == "[]" else frozenset(json.loads(tags)),
                         session, owner, active.get(session) if session is not None else None, suspect,
                         bool(stays))


BACKOFF_CAP_S: Final = 60.0
GroupKey = tuple[int, str, str]
"""A queue group: (rank, target lane or '', tags as stored). Missions of one group are alike to the policy."""

_GROUP_FROM: Final = "SELECT rank, target, tags FROM missions INDEXED BY missions_queue WHERE state = 'queued' AND "
_GROUP_NEXT: Final = (
    # the next group after (rank, target, tags), one index seek each: the next tags of this target, else the next
    # target of this rank, else the next rank. (A row-value "(rank, target, tags) > (?, ?, ?)" would step over
    # every mission of the current group: SQLite seeks to it and filters.)
    _GROUP_FROM + "rank = ? AND target = ? AND tags > ? ORDER BY tags LIMIT 1",
    _GROUP_FROM + "rank = ? AND target > ? ORDER BY target, tags LIMIT 1",
    _GROUP_FROM + "rank > ? ORDER BY rank, target, tags LIMIT 1",
)


def queue_groups(conn: sqlite3.Connection) -> list[GroupKey]:
    """The groups that have queued missions: a loose scan of ``missions_queue`` (a few seeks per group), so
    finding them costs the same with ten or a million missions queued."""
    out: list[GroupKey] = []
    row = conn.execute(_GROUP_NEXT[2], (-1,)).fetchone()
    while row is not None:
        out.append(row)
        rank, target, tags = row
        row = (conn.execute(_GROUP_NEXT[0], (rank, target, tags)).fetchone()
               or conn.execute(_GROUP_NEXT[1], (rank, target)).fetchone()
               or conn.execute(_GROUP_NEXT[2], (rank,)).fetchone())
    return out


_NOT_BUSY: Final = (" AND (m.session IS NULL OR NOT EXISTS (SELECT 1 FROM missions b WHERE b.session = m.session "
                    "AND b.state IN ('dispatched', 'running')))")
"""A mission of a session that has missions in flight can only go where they run: it is read per session (below),
never as part of its group, so that a busy session's backlog cannot fill its group's head."""


def queue_head(conn: sqlite3.Connection, groups: list[tuple[GroupKey, int]], *, now: float | None = None,
               backoff_s: float = 0.0, sessions: Sequence[tuple[str, int]] = ()) -> list[QueuedMission]:
    """The first missions of each group by id (and of the deadline class by deadline too), ``n`` for each.

    Retries back off: a mission on its second attempt is taken at once (failover must be fast); from the third
    on it waits ``backoff_s * 2**(attempts - 2)`` (at most BACKOFF_CAP_S) after it was re-queued.
    """
    seen: dict[int, tuple[Any, ...]] = {}
    base = f"SELECT {_QCOLS} FROM missions m INDEXED BY %s LEFT JOIN sessions s ON s.id = m.session "
    ready = ""
    args: tuple[Any, ...] = ()
    if backoff_s > 0 and now is not None:
        ready = (" AND (m.attempts - m.round_start < 2 OR m.updated_at + min(?, ? * (1 << min(m.attempts - "
                 "m.round_start - 2, 16))) <= ?)")
        args = (BACKOFF_CAP_S, backoff_s, now)
    for (rank, target, tags), n in groups:
        # the partial indexes by name: with few rows (or no statistics) the planner would rather take
        # missions_state and sort, which grows with the queue
        rows = conn.execute(base % "missions_queue" + f"WHERE m.state = 'queued' AND m.rank = {rank:d} "
                            "AND m.target = ? AND m.tags = ?" + ready + _NOT_BUSY + " ORDER BY m.id LIMIT ?",
                            (target, tags, *args, n)).fetchall()
        if rank == 1:
            rows += conn.execute(base % "missions_group_edf" + "WHERE m.state = 'queued' AND m.rank = 1 "
                                 "AND m.deadline IS NOT NULL AND m.target = ? AND m.tags = ?" + ready + _NOT_BUSY
                                 + " ORDER BY m.deadline LIMIT ?", (target, tags, *args, n)).fetchall()
        for r in rows:
            seen.setdefault(r[0], r)
    for session, n in sessions:  # busy sessions: few (at most the missions in flight), each read on its own
        for r in conn.execute(base % "missions_session" + "WHERE m.session = ? AND m.state = 'queued'" + ready
                              + " ORDER BY m.id LIMIT ?", (session, *args, n)):
            seen.setdefault(r[0], r)
    active: dict[str, str] = {}
    for session in {r[6] for r in seen.values() if r[6] is not None}:
        row = conn.execute("SELECT current_lane FROM missions WHERE session = ? AND state IN ('dispatched', "
                           "'running') LIMIT 1", (session,)).fetchone()
        if row:
            active[session] = row[0]
    return [_queued(seen[mid], active) for mid in sorted(seen)]


@dataclass
class QueueView:
    """What one pass reads: the snapshot for the policy, every group with queued missions, and for each group
    that no lane can take from now (``group_room`` 0) the id of the one mission read from it (its sample)."""

    snapshot: Snapshot
    groups: list[GroupKey]
    blocked: dict[GroupKey, int | None]


def read_queue(conn: sqlite3.Connection, fleet: LaneSet, now: float, full: frozenset[str] = frozenset(),
               host: str | None = None) -> QueueView:
    lanes, swrr = lane_views(conn, fleet, now, full, host)
    views = {ln.name: ln for ln in lanes}
    groups = queue_groups(conn)
    plan: list[tuple[GroupKey, int]] = []
    blocked: dict[GroupKey, int | None] = {}
    for key in groups:
        rank, target, tags = key
        room = dispatch.group_room(target or None, _tagset(tags), CLASSES[rank], views, local_only=True)
        if room:
            plan.append((key, min(HEAD_MAX, max(HEAD_MIN, 2 * room))))
        elif dispatch.group_room(target or None, _tagset(tags), CLASSES[rank], views):
            continue  # only another host's lanes can take from it now: that host reads it (and its waits)
        else:
            plan.append((key, 1))
            blocked[key] = None
    busy = []
    for session, lane in conn.execute("SELECT session, min(current_lane) FROM missions WHERE state IN "
                                      "('dispatched', 'running') AND session IS NOT NULL GROUP BY session"):
        view = views.get(lane)
        if view is not None and not view.local and view.available:
            continue  # it runs on another host's lane: that host takes the rest of it
        free = view.capacity - view.in_flight if view is not None and view.available else 0
        busy.append((session, min(HEAD_MAX, max(HEAD_MIN, 2 * free)) if free > 0 else 1))
    queue = queue_head(conn, plan, now=now, backoff_s=fleet.settings.leases.retry_backoff_sec, sessions=busy)
    for q in queue:
        key = (RANK[q.cls], _target(q), _tags_text(q.tags))
        if key in blocked and blocked[key] is None and q.session_active_lane is None:
            blocked[key] = q.id
    max_wait = {c: p.max_wait_sec for c, p in fleet.settings.classes.items()}
    return QueueView(Snapshot(lanes, tuple(queue), max_wait, swrr), groups, blocked)


def snapshot(conn: sqlite3.Connection, fleet: LaneSet, now: float, host: str | None = None) -> Snapshot:
    return read_queue(conn, fleet, now, host=host).snapshot


def _tagset(tags: str) -> frozenset[str]:
    return _NO_TAGS if tags == "[]" else frozenset(json.loads(tags))


def _tags_text(tags: frozenset[str]) -> str:
    return ms.canonical(sorted(tags)) if tags else "[]"


def _target(q: QueuedMission) -> str:
    return q.session_lane or q.lane or ""


def run_once(ledger: Ledger, fleet: LaneSet, *, now: float, sweep: int = WAIT_SWEEP,
             full: frozenset[str] = frozenset(), holder: tuple[str, str] | None = None) -> TickResult:
    """One atomic policy pass: reap leases, expire deadlines, plan, record assignments and waits (the waits of
    whole groups that cannot be placed are written onto their missions ``sweep`` missions a pass); lanes in
    ``full`` get nothing this pass.

    ``holder`` (host, incarnation), the supervisor's: the pass does nothing (``held`` False) unless that
    incarnation still holds the host's record and it is ``up``, read inside the pass's own transaction, so a host
    whose record was taken over (or forgotten) meanwhile claims nothing, however late its turn runs."""
    from lanectl.ledger import hosts

    with ledger.transaction() as conn:
        if holder is not None and not hosts.holds(conn, *holder):
            return TickResult([], [], [], {}, held=False)
        leases = ms.expire_leases_in(conn, now=now)
        deadlines = ms.expire_deadlines_in(conn, now=now)
        view = read_queue(conn, fleet, now, full, None if holder is None else holder[0])
        snap = view.snapshot
        decision = dispatch.decide(snap, now)
        invocations = {ln.name: ln.invocation for ln in snap.lanes}
        done = ms.assign_in(conn, decision.assignments, now=now, lease_sec=fleet.settings.leases.lease_sec,
                            swrr=decision.swrr if decision.assignments else None, invocations=invocations)
        ms.record_waits_in(conn, decision.waiting, now=now)
        reasons = {key: decision.waiting.get(sample) if sample is not None else None
                   for key, sample in view.blocked.items()}
        ms.record_group_waits_in(conn, view.groups, reasons, now=now)
        if sweep:
            ms.sweep_waits_in(conn, now=now, limit=sweep)
    return TickResult(done, deadlines, leases, decision.waiting)


NOT_INSTALLED = "not installed: in lanes.d but it has no unit yet ('lanectl install', then 'lanectl up LANE')"


def explain(ledger: Ledger, fleet: LaneSet, mission_id: int, *, now: float,
            installed: Collection[str] | None = None, host: str | None = None) -> dict[str, Any]:
    """Why a mission is (not) running: its state, and for a queued one every lane and why it is skipped.

    ``installed``: the lanes of the installed fleet (its manifest); a lane of lanes.d that is not among them
    cannot run anything yet and is never called eligible (None: not known, every lane of ``fleet`` counts)."""
    m = ms.get(ledger, mission_id)
    out: dict[str, Any] = {"mission": m.id, "state": m.state, "class": m.cls, "wait_reason": m.wait_reason,
                           "lanes": []}
    if m.state != "queued":
        out["summary"] = (f"on lane {m.current_lane} (attempt {m.attempts})" if m.current_lane
                          else f"not queued: {m.state}")
        return out
    conn = ledger.conn
    snap = snapshot(conn, fleet, now, host)
    owner = None
    active = None
    stays = False
    if m.session is not None:
        row = conn.execute("SELECT lane, stays FROM sessions WHERE id = ?", (m.session,)).fetchone()
        owner, stays = (row[0], bool(row[1])) if row else (None, False)
        row = conn.execute("SELECT current_lane FROM missions WHERE session = ? AND state IN ('dispatched', "
                           "'running') LIMIT 1", (m.session,)).fetchone()
        active = row[0] if row else None
    suspect = conn.execute("SELECT suspect FROM missions WHERE id = ?", (m.id,)).fetchone()[0]
    q = QueuedMission(m.id, m.cls, m.created_at, m.deadline, m.lane, frozenset(m.tags), m.session, owner, active,
                      suspect, stays)
    verdicts = dispatch.explain(q, snap, now)
    if installed is not None:
        verdicts = [v if v.lane in installed or v.lane not in fleet.lanes
                    else dispatch.LaneVerdict(v.lane, False, NOT_INSTALLED) for v in verdicts]
    out["lanes"] = [{"lane": v.lane, "eligible": v.eligible, "reason": v.reason} for v in verdicts]
    ahead = conn.execute("SELECT coalesce(sum(n), 0) FROM queue_depth WHERE rank < ?",  # kept by triggers
                         (RANK[m.cls],)).fetchone()[0]
    out["higher_class_queued"] = ahead
    out["aged"] = dispatch.is_aged(q, snap.max_wait, now)
    lost = m.attempts - m.round_start
    backoff = fleet.settings.leases.retry_backoff_sec
    ready_at = m.updated_at + min(BACKOFF_CAP_S, backoff * 2 ** min(lost - 2, 16)) if lost >= 2 and backoff else None
    if ready_at is not None and ready_at > now:
        out["summary"] = (f"backing off after {lost} lost attempts: it may be dispatched again in "
                          f"{ready_at - now:.0f}s")
    elif any(v.eligible for v in verdicts):
        out["summary"] = "eligible now: it waits for its turn (priority order) or the next tick"
    else:
        out["summary"] = "no lane can take it: " + "; ".join(sorted({v.reason for v in verdicts})[:3])
    return out

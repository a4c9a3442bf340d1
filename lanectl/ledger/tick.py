"""One policy pass against the ledger: the glue between the tables and the pure ``lanectl.dispatch`` policy.

``run_once`` is what the supervisor calls every tick (and ``lanectl dispatch --once``): in one ``BEGIN
IMMEDIATE`` transaction it expires leases and deadlines, reads a snapshot, plans, and records every assignment
and every new wait reason. Taking the snapshot under the write lock makes the decision atomic with the data it
was made from: no other writer can change a mission between the plan and its record.

The queue part of the snapshot is the *head* of each class (``HEAD_MIN`` or twice the free capacity, whichever is
larger, from the partial indexes on queued missions), never the whole queue, so a tick costs the same with a
thousand or a million missions waiting. A mission pinned to a full lane deeper than that head waits a tick longer.
"""
from __future__ import annotations

import json
import sqlite3
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

from lanectl import dispatch
from lanectl.dispatch import LaneView, QueuedMission, Snapshot
from lanectl.ledger import Ledger
from lanectl.ledger import missions as ms

if TYPE_CHECKING:
    from lanectl.config import LaneSet

HEAD_MIN: Final = 64
"""Fewest queued missions of each class a snapshot looks at."""
RATE_WINDOW_S: Final = 60.0
_QCOLS: Final = ("m.id, m.class, m.created_at, m.deadline, m.lane, m.tags, m.session, s.lane")


@dataclass
class TickResult:
    dispatches: list[ms.Dispatch]
    expired_deadlines: list[int]
    expired_leases: list[int]
    waiting: dict[int, str]

    def as_dict(self) -> dict[str, Any]:
        return {
            "dispatched": [{"mission": d.mission, "attempt": d.attempt, "lane": d.lane, "class": d.cls,
                            "session": d.session} for d in self.dispatches],
            "expired_deadlines": self.expired_deadlines,
            "expired_leases": self.expired_leases,
            "waiting": {str(k): v for k, v in sorted(self.waiting.items())},
        }


def lane_views(conn: sqlite3.Connection, fleet: LaneSet, now: float) -> tuple[tuple[LaneView, ...], dict[str, int]]:
    rows = {r[0]: r[1:] for r in conn.execute("SELECT name, state, healthy, invocation, swrr, weight FROM lanes")}
    flight = dict(conn.execute("SELECT current_lane, count(*) FROM missions "
                               "WHERE state IN ('dispatched', 'running') GROUP BY current_lane").fetchall())
    day = int(now // 86400)
    daily: dict[tuple[str, str], int] = {(r[0], r[1]): r[2] for r in conn.execute(
        "SELECT lane, class, n FROM usage_daily WHERE day = ?", (day,))}
    views, swrr = [], {}
    for name, lane in sorted(fleet.lanes.items()):
        state, healthy, invocation, weight_state, promoted = rows.get(name, ("active", 1, None, 0, None))
        if not lane.enabled:
            state = "disabled"
        rate = {c: q.rate_per_minute for c, q in lane.quotas.items() if q.rate_per_minute is not None}
        budget = {c: q.daily_budget for c, q in lane.quotas.items() if q.daily_budget is not None}
        used_min = {c: conn.execute("SELECT count(*) FROM attempts WHERE lane = ? AND class = ? "
                                    "AND dispatched_at > ?", (name, c, now - RATE_WINDOW_S)).fetchone()[0]
                    for c in rate}
        views.append(LaneView(name=name, capacity=lane.capacity, classes=frozenset(lane.classes), state=state,
                              healthy=bool(healthy), in_flight=flight.get(name, 0),
                              weight=lane.weight if promoted is None else promoted,
                              fallback=lane.fallback, tags=frozenset(lane.tags), rate_per_minute=rate,
                              daily_budget=budget, used_minute=used_min,
                              used_day={c: daily.get((name, c), 0) for c in budget}, invocation=invocation))
        swrr[name] = weight_state
    return tuple(views), swrr


_NO_TAGS: Final = frozenset[str]()


def _queued(row: tuple[Any, ...], active: dict[str, str]) -> QueuedMission:
    mid, cls, created, deadline, lane, tags, session, owner = row
    return QueuedMission(mid, cls, created, deadline, lane, _NO_TAGS if tags == "[]" else frozenset(json.loads(tags)),
                         session, owner, active.get(session) if session is not None else None)


BACKOFF_CAP_S: Final = 60.0


def queue_head(conn: sqlite3.Connection, head: int, *, now: float | None = None,
               backoff_s: float = 0.0) -> list[QueuedMission]:
    """The first missions of each class by id (and of the deadline class by deadline).

    Retries back off: a mission on its second attempt is taken at once (failover must be fast); from the third
    on it waits ``backoff_s * 2**(attempts - 2)`` (at most BACKOFF_CAP_S) after it was re-queued.
    """
    seen: dict[int, tuple[Any, ...]] = {}
    base = f"SELECT {_QCOLS} FROM missions m LEFT JOIN sessions s ON s.id = m.session "
    ready = ""
    args: tuple[Any, ...] = ()
    if backoff_s > 0 and now is not None:
        ready = (" AND (m.attempts - m.round_start < 2 OR m.updated_at + min(?, ? * (1 << min(m.attempts - "
                 "m.round_start - 2, 16))) <= ?)")
        args = (BACKOFF_CAP_S, backoff_s, now)
    for rank in range(3):
        # state = 'queued' literally, so the planner picks the partial indexes (missions_queue/_edf).
        rows = conn.execute(base + "WHERE m.state = 'queued' AND m.rank = ?" + ready + " ORDER BY m.id LIMIT ?",
                            (rank, *args, head)).fetchall()
        if rank == 1:
            rows += conn.execute(base + "WHERE m.state = 'queued' AND m.rank = 1 AND m.deadline IS NOT NULL" + ready
                                 + " ORDER BY m.deadline LIMIT ?", (*args, head)).fetchall()
        for r in rows:
            seen.setdefault(r[0], r)
    active: dict[str, str] = {}
    for session in {r[6] for r in seen.values() if r[6] is not None}:
        row = conn.execute("SELECT current_lane FROM missions WHERE session = ? AND state IN ('dispatched', "
                           "'running') LIMIT 1", (session,)).fetchone()
        if row:
            active[session] = row[0]
    return [_queued(seen[mid], active) for mid in sorted(seen)]


def snapshot(conn: sqlite3.Connection, fleet: LaneSet, now: float) -> Snapshot:
    lanes, swrr = lane_views(conn, fleet, now)
    free = sum(max(0, ln.capacity - ln.in_flight) for ln in lanes if ln.available)
    queue = queue_head(conn, max(HEAD_MIN, 2 * free), now=now,
                       backoff_s=fleet.settings.leases.retry_backoff_sec)
    max_wait = {c: p.max_wait_sec for c, p in fleet.settings.classes.items()}
    return Snapshot(lanes, tuple(queue), max_wait, swrr)


def run_once(ledger: Ledger, fleet: LaneSet, *, now: float) -> TickResult:
    """One atomic policy pass: reap leases, expire deadlines, plan, record assignments and waits."""
    with ledger.transaction() as conn:
        leases = ms.expire_leases_in(conn, now=now)
        deadlines = ms.expire_deadlines_in(conn, now=now)
        snap = snapshot(conn, fleet, now)
        decision = dispatch.decide(snap, now)
        invocations = {ln.name: ln.invocation for ln in snap.lanes}
        done = ms.assign_in(conn, decision.assignments, now=now, lease_sec=fleet.settings.leases.lease_sec,
                            swrr=decision.swrr if decision.assignments else None, invocations=invocations)
        ms.record_waits_in(conn, decision.waiting, now=now)
    return TickResult(done, deadlines, leases, decision.waiting)


def explain(ledger: Ledger, fleet: LaneSet, mission_id: int, *, now: float) -> dict[str, Any]:
    """Why a mission is (not) running: its state, and for a queued one every lane and why it is skipped."""
    m = ms.get(ledger, mission_id)
    out: dict[str, Any] = {"mission": m.id, "state": m.state, "class": m.cls, "wait_reason": m.wait_reason,
                           "lanes": []}
    if m.state != "queued":
        out["summary"] = (f"on lane {m.current_lane} (attempt {m.attempts})" if m.current_lane
                          else f"not queued: {m.state}")
        return out
    conn = ledger.conn
    snap = snapshot(conn, fleet, now)
    owner = None
    active = None
    if m.session is not None:
        row = conn.execute("SELECT lane FROM sessions WHERE id = ?", (m.session,)).fetchone()
        owner = row[0] if row else None
        row = conn.execute("SELECT current_lane FROM missions WHERE session = ? AND state IN ('dispatched', "
                           "'running') LIMIT 1", (m.session,)).fetchone()
        active = row[0] if row else None
    q = QueuedMission(m.id, m.cls, m.created_at, m.deadline, m.lane, frozenset(m.tags), m.session, owner, active)
    verdicts = dispatch.explain(q, snap, now)
    out["lanes"] = [{"lane": v.lane, "eligible": v.eligible, "reason": v.reason} for v in verdicts]
    ahead = conn.execute("SELECT coalesce(sum(n), 0) FROM queue_depth WHERE rank < ?",  # kept by triggers
                         (ms.RANK[m.cls],)).fetchone()[0]
    out["higher_class_queued"] = ahead
    out["aged"] = dispatch.is_aged(q, snap.max_wait, now)
    if any(v.eligible for v in verdicts):
        out["summary"] = "eligible now: it waits for its turn (priority order) or the next tick"
    else:
        out["summary"] = "no lane can take it: " + "; ".join(sorted({v.reason for v in verdicts})[:3])
    return out

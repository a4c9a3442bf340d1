"""Promotion and rollback: rules that act on the evidence in the ledger (the operating model's section 7).

*Promotion* (raising a lane's weight) is allowed only when, over ``[promotion] window_sec``, the lane's failure and
fallback rates and its p95 queue wait meet the policy, no interactive mission starved, and a passing drill of the
lane is recent enough. ``--force`` records an override with the operator's reason.

*Rollback triggers*, evaluated by the supervisor every tick over ``[rollback] window_sec``: a failure spike, a
fallback spike, interactive starvation, heartbeat instability (leases expiring) or restart instability. A tripped
lane is drained, its queued work and idle sessions move to its fallback, a snapshot is captured and a
``rollback`` event records trigger and evidence. An automatic action never takes out the last healthy lane that
serves a class: then an ``alert`` is recorded instead (once per cooldown), because a fleet-wide false alarm must
not become an outage.

All figures come from indexed queries bounded by time, so a tick costs the same on a large ledger.
"""
from __future__ import annotations

import json
import sqlite3
from dataclasses import asdict, dataclass, field
from typing import Any

from lanectl.config import LaneSet
from lanectl.evidence import percentile


@dataclass
class LaneEvidence:
    lane: str
    window_s: float
    finished: int = 0
    failed: int = 0
    dispatched: int = 0
    fallback_away: int = 0
    """Missions meant for this lane that went to its fallback (dispatched with fallback_from = lane)."""
    p95_queue_wait_s: float | None = None
    oldest_interactive_wait_s: float = 0.0
    """Age of the oldest queued interactive mission bound to this lane (pinned or by session)."""
    lease_expiries: int = 0
    restarts: int = 0
    last_drill: dict[str, Any] | None = None

    @property
    def failure_rate(self) -> float:
        return self.failed / self.finished if self.finished else 0.0

    @property
    def fallback_rate(self) -> float:
        meant = self.dispatched + self.fallback_away
        return self.fallback_away / meant if meant else 0.0

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["failure_rate"] = round(self.failure_rate, 4)
        d["fallback_rate"] = round(self.fallback_rate, 4)
        return d


def fleet_evidence(conn: sqlite3.Connection, lanes: list[str], *, now: float, window_s: float,
                   waits: bool = False) -> dict[str, LaneEvidence]:
    """Evidence of every lane at once: a few grouped queries on time-bounded index ranges (cheap every tick)."""
    since = now - window_s
    out = {name: LaneEvidence(name, window_s) for name in lanes}
    for lane, kind, n in conn.execute("SELECT lane, kind, count(*) FROM events WHERE kind IN ('succeeded', "
                                      "'failed', 'dead') AND at >= ? GROUP BY lane, kind", (since,)):
        if lane in out:
            out[lane].finished += n
            if kind != "succeeded":
                out[lane].failed += n
    for lane, n in conn.execute("SELECT lane, count(*) FROM events WHERE kind = 'dispatched' AND at >= ? "
                                "GROUP BY lane", (since,)):
        if lane in out:
            out[lane].dispatched = n
    # a drill's mission goes to the fallback on purpose: it is not evidence against the lane
    for lane, n in conn.execute(
            "SELECT json_extract(e.data, '$.fallback_from'), count(*) FROM events e JOIN missions m ON m.id = e.mission "
            "WHERE e.kind = 'dispatched' AND e.at >= ? AND e.data LIKE '%fallback_from%' "
            "AND json_extract(m.payload, '$.drill') IS NULL GROUP BY 1", (since,)):
        if lane in out:
            out[lane].fallback_away = n
    for lane, n in conn.execute("SELECT lane, count(*) FROM events WHERE kind IN ('requeued', 'dead') AND at >= ? "
                                "AND data LIKE '%lease expired%' GROUP BY lane", (since,)):
        if lane in out:
            out[lane].lease_expiries = n
    # a lane_invocation event carries how many restarts systemd counted since the last one it saw
    for lane, n in conn.execute("SELECT lane, sum(coalesce(json_extract(data, '$.restarts'), 1)) FROM events "
                                "WHERE kind = 'lane_invocation' AND at >= ? GROUP BY lane", (since,)):
        if lane in out:
            out[lane].restarts = n
    for lane, oldest in conn.execute(
            "SELECT coalesce(m.lane, s.lane), min(m.created_at) FROM missions m LEFT JOIN sessions s "
            "ON s.id = m.session WHERE m.state = 'queued' AND m.rank = 0 GROUP BY 1"):
        if lane in out and oldest is not None:
            out[lane].oldest_interactive_wait_s = max(0.0, now - oldest)
    for lane, at, data in conn.execute(
            "SELECT lane, max(at), data FROM events WHERE kind = 'drill' GROUP BY lane"):
        if lane in out:
            out[lane].last_drill = {"at": at, **json.loads(data or "{}")}
    if waits:
        for name, ev in out.items():
            values = [r[0] for r in conn.execute(
                "SELECT a.dispatched_at - m.created_at FROM attempts a JOIN missions m ON m.id = a.mission "
                "WHERE a.lane = ? AND a.class IN ('interactive', 'deadline', 'background') "
                "AND a.dispatched_at >= ? AND a.n = 1", (name, since))]
            ev.p95_queue_wait_s = percentile(values, 95)
    return out


def lane_evidence(conn: sqlite3.Connection, lane: str, *, now: float, window_s: float) -> LaneEvidence:
    return fleet_evidence(conn, [lane], now=now, window_s=window_s, waits=True)[lane]


# ------------------------------------------------------------------------------------------------ rollback
@dataclass
class Trip:
    lane: str
    trigger: str
    detail: str
    evidence: dict[str, Any] = field(default_factory=dict)


def rollback_trips(conn: sqlite3.Connection, fleet: LaneSet, *, now: float,
                   states: dict[str, str] | None = None) -> list[Trip]:
    """Every lane (taking work) whose evidence crosses a rollback threshold, with the first trigger it trips."""
    pol = fleet.settings.rollback
    if not pol.enabled:
        return []
    states = states if states is not None else dict(conn.execute("SELECT name, state FROM lanes").fetchall())
    trips = []
    watched = [n for n, ln in sorted(fleet.lanes.items())
               if ln.enabled and states.get(n, "active") in ("active", "degraded")]
    evidence = fleet_evidence(conn, watched, now=now, window_s=pol.window_sec)
    for name in watched:
        ev = evidence[name]
        trip = _first_trigger(ev, pol)
        if trip is not None:
            trips.append(Trip(name, trip[0], trip[1], ev.as_dict()))
    return trips


def _first_trigger(ev: LaneEvidence, pol: Any) -> tuple[str, str] | None:
    if ev.finished >= pol.min_samples and ev.failure_rate >= pol.failure_rate:
        return "failure_spike", f"failure rate {ev.failure_rate:.0%} of {ev.finished} >= {pol.failure_rate:.0%}"
    meant = ev.dispatched + ev.fallback_away
    if meant >= pol.min_samples and ev.fallback_rate >= pol.fallback_rate:
        return "fallback_spike", f"fallback rate {ev.fallback_rate:.0%} of {meant} >= {pol.fallback_rate:.0%}"
    if ev.oldest_interactive_wait_s >= pol.interactive_starvation_sec:
        return ("interactive_starvation",
                f"an interactive mission bound to it waits {ev.oldest_interactive_wait_s:.0f}s "
                f">= {pol.interactive_starvation_sec:g}s")
    if ev.lease_expiries >= pol.max_lease_expiries:
        return "heartbeat_instability", f"{ev.lease_expiries} leases expired >= {pol.max_lease_expiries}"
    if ev.restarts >= pol.max_restarts:
        return "restart_instability", f"{ev.restarts} restarts >= {pol.max_restarts}"
    return None


def last_healthy_for(fleet: LaneSet, lane: str, states: dict[str, str], healthy: dict[str, bool]) -> list[str]:
    """The classes for which ``lane`` is the last lane taking work and healthy (acting on it would stop them)."""
    out = []
    for cls in fleet.lanes[lane].classes:
        others = [n for n, ln in fleet.lanes.items() if n != lane and ln.enabled and cls in ln.classes
                  and states.get(n, "active") == "active" and healthy.get(n, False)]
        if not others:
            out.append(cls)
    return out


# ------------------------------------------------------------------------------------------------ promotion
@dataclass
class Verdict:
    lane: str
    allowed: bool
    reasons: list[str]
    evidence: dict[str, Any]


def promotion_verdict(conn: sqlite3.Connection, fleet: LaneSet, lane: str, *, now: float) -> Verdict:
    """Does the evidence over the promotion window allow raising this lane's weight? Every unmet rule is listed."""
    pol = fleet.settings.promotion
    ev = lane_evidence(conn, lane, now=now, window_s=pol.window_sec)
    reasons = []
    if ev.finished < pol.min_samples:
        reasons.append(f"only {ev.finished} missions finished in the window (need {pol.min_samples})")
    if ev.failure_rate > pol.max_failure_rate:
        reasons.append(f"failure rate {ev.failure_rate:.1%} > {pol.max_failure_rate:.1%}")
    if ev.fallback_rate > pol.max_fallback_rate:
        reasons.append(f"fallback rate {ev.fallback_rate:.1%} > {pol.max_fallback_rate:.1%}")
    if ev.p95_queue_wait_s is not None and ev.p95_queue_wait_s > pol.max_p95_queue_wait_sec:
        reasons.append(f"p95 queue wait {ev.p95_queue_wait_s:.2f}s > {pol.max_p95_queue_wait_sec:g}s")
    starved = conn.execute(
        "SELECT count(*) FROM attempts a JOIN missions m ON m.id = a.mission WHERE a.n = 1 AND a.class = "
        "'interactive' AND a.lane = ? AND a.dispatched_at >= ? AND a.dispatched_at - m.created_at > ?",
        (lane, now - pol.window_sec, pol.interactive_starvation_sec)).fetchone()[0]
    if starved or ev.oldest_interactive_wait_s > pol.interactive_starvation_sec:
        reasons.append(f"interactive starvation: {starved} mission(s) waited over {pol.interactive_starvation_sec:g}s")
    drill = ev.last_drill
    if drill is None:
        reasons.append("no drill of this lane on record (run 'lanectl drill')")
    elif not drill.get("passed"):
        reasons.append("the last drill of this lane failed")
    elif now - drill["at"] > pol.drill_max_age_sec:
        reasons.append(f"the last passing drill is {(now - drill['at']) / 3600:.1f}h old "
                       f"(max {pol.drill_max_age_sec / 3600:g}h)")
    evidence = {**ev.as_dict(), "starved_interactive": starved}
    return Verdict(lane, not reasons, reasons, evidence)

"""Promotion and rollback: rules that act on the evidence in the ledger (the operating model's section 7).

*Promotion* (raising a lane's weight) is allowed only when, over ``[promotion] window_sec``, the lane's failure and
fallback lost rates and its p95 queue wait meet the policy, no interactive mission starved, and a passing drill of the
lane is recent enough. ``--force`` records an override with the operator's reason.

*Rollback triggers*, evaluated by the supervisor every tick over ``[rollback] window_sec``: a failure spike, a
fallback spike, interactive starvation or heartbeat instability (leases expiring). A tripped lane is drained, its
queued work and idle sessions move to its fallback, a snapshot is captured and a ``rollback`` event records
trigger and evidence. A lane is judged against the fleet: a failure spike that every lane with evidence shows
alike is the work's fault, not a lane's, and gives one fleet-wide ``alert`` instead of drains. A lane's evidence
window starts afresh when it returns to service (an operator's undrain, its recovery from degraded), so the
failures that got it drained cannot drain it again. An automatic action never takes out the last healthy lane
that serves a class, and one pass drains at most one lane per trigger (the supervisor's ``govern``): otherwise
an ``alert`` is recorded instead (once per cooldown), because a fleet-wide false alarm must not become an outage.
Restart storms are not a rollback trigger: the supervisor degrades such a lane, and it recovers by itself
(docs/supervisor.md).

All figures come from indexed queries bounded by time, so a tick costs the same on a large ledger.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

from lanectl.config import LaneSet
from lanectl.evidence import percentile
from lanectl.ledger import reads
from lanectl.ledger.reads import Source


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
    def fallback_lost_rate(self) -> float:
        """Work meant for this lane that went to its fallback / work meant for it (not metrics' fallback received
        rate: work a lane took as another's fallback)."""
        meant = self.dispatched + self.fallback_away
        return self.fallback_away / meant if meant else 0.0

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["failure_rate"] = round(self.failure_rate, 4)
        d["fallback_lost_rate"] = round(self.fallback_lost_rate, 4)
        return d


def fleet_evidence(conn: Source, lanes: list[str], *, now: float, window_s: float,
                   waits: bool = False) -> dict[str, LaneEvidence]:
    """Evidence of every lane at once: a few grouped queries on time-bounded index ranges (cheap every tick)."""
    since = now - window_s
    out = {name: LaneEvidence(name, window_s) for name in lanes}
    for lane, kind, n in reads.outcomes_by_lane(conn, since):
        if lane in out:
            out[lane].finished += n
            if kind != "succeeded":
                out[lane].failed += n
    for lane, n in reads.dispatches_by_lane(conn, since):
        if lane in out:
            out[lane].dispatched = n
    # a drill's mission goes to the fallback on purpose: it is not evidence against the lane (nor a spent budget)
    for lane, n in reads.fallbacks_away(conn, since):
        if lane in out:
            out[lane].fallback_away = n
    for lane, n in reads.lease_expiries(conn, since):
        if lane in out:
            out[lane].lease_expiries = n
    # a lane_invocation event carries how many restarts systemd counted since the last one it saw
    for lane, n in reads.restarts_by_lane(conn, since):
        if lane in out:
            out[lane].restarts = n
    for lane, oldest in reads.oldest_interactive_by_lane(conn):
        if lane in out and oldest is not None:  # from the window's start: a lane back in service starts afresh
            out[lane].oldest_interactive_wait_s = max(0.0, now - max(oldest, since))
    for lane, at, data in reads.last_drills(conn):
        if lane in out:
            out[lane].last_drill = {"at": at, **json.loads(data or "{}")}
    if waits:
        for name, ev in out.items():
            values = reads.first_waits(conn, name, since)
            ev.p95_queue_wait_s = percentile(values, 95)
    return out


def lane_evidence(conn: Source, lane: str, *, now: float, window_s: float) -> LaneEvidence:
    return fleet_evidence(conn, [lane], now=now, window_s=window_s, waits=True)[lane]


# ------------------------------------------------------------------------------------------------ rollback
FLEET: str = "*"
"""The ``lane`` of a fleet-wide trip (every lane shows it alike: the work's fault, not a lane's)."""


@dataclass
class Trip:
    lane: str
    trigger: str
    detail: str
    evidence: dict[str, Any] = field(default_factory=dict)
    lanes: list[str] = field(default_factory=list)
    """For a fleet-wide trip (``lane == FLEET``): the lanes that show it."""

    @property
    def fleet_wide(self) -> bool:
        return self.lane == FLEET


def evidence_starts(conn: Source, *, now: float, window_s: float) -> dict[str, float]:
    """Lanes that returned to service within the window, and when: an ``undrain`` (by an operator, or at the end of
    a graceful restart) or the recovery of a degraded lane. Their evidence counts only from then on."""
    since = now - window_s
    starts: dict[str, float] = {}
    for lane, at in reads.undrains_since(conn, since):
        if lane is not None:
            starts[lane] = at
    for lane, at in reads.recoveries_since(conn, since):
        if lane is not None:
            starts[lane] = max(at, starts.get(lane, at))
    return starts


def windowed_evidence(conn: Source, lanes: list[str], *, now: float,
                      window_s: float) -> dict[str, LaneEvidence]:
    """``fleet_evidence`` where each lane's window starts no earlier than its return to service."""
    starts = evidence_starts(conn, now=now, window_s=window_s)
    out = fleet_evidence(conn, [n for n in lanes if n not in starts], now=now, window_s=window_s)
    for name in lanes:
        if name in starts:
            out[name] = fleet_evidence(conn, [name], now=now, window_s=max(0.0, now - starts[name]))[name]
    return out


def rollback_trips(conn: Source, fleet: LaneSet, *, now: float,
                   states: dict[str, str] | None = None) -> list[Trip]:
    """Every lane (taking work) whose evidence crosses a rollback threshold, with the first trigger it trips; and
    one fleet-wide trip (``lane == FLEET``) when the failure spike is everywhere alike (see ``judge_trips``)."""
    pol = fleet.settings.rollback
    if not pol.enabled:
        return []
    states = states if states is not None else reads.lane_states(conn)
    enabled = [n for n, ln in sorted(fleet.lanes.items()) if ln.enabled]
    evidence = windowed_evidence(conn, enabled, now=now, window_s=pol.window_sec)
    return judge_trips(evidence, {n: states.get(n, "active") for n in enabled}, pol)


def judge_trips(evidence: dict[str, LaneEvidence], states: dict[str, str], pol: Any) -> list[Trip]:
    """The rollback rules over the evidence of every enabled lane (a pure function: tests feed it windows).

    - Only lanes taking work (``active``, ``degraded``) can trip; every enabled lane's evidence is the fleet's.
    - ``failure_spike`` is judged against the fleet: when the other lanes with enough samples all fail at the
      threshold too, the failures are the work's, and the lane trips nothing; such lanes are reported together as
      one fleet-wide trip. Peers without enough samples are no evidence either way (the lane is judged alone).
    - A degraded lane's work goes to its fallback by design: that traffic is no ``fallback_spike`` of its own.
    """
    trips: list[Trip] = []
    alike: list[str] = []
    for name in sorted(evidence):
        if states.get(name, "active") not in ("active", "degraded"):
            continue
        ev = evidence[name]
        for trigger, detail in _triggers(ev, pol, degraded=states.get(name) == "degraded"):
            if trigger == "failure_spike":
                peers = [p for n, p in evidence.items() if n != name and p.finished >= pol.min_samples]
                if peers and all(p.failure_rate >= pol.failure_rate for p in peers):
                    alike.append(name)
                    continue  # the work's fault: look at the lane's other triggers
            trips.append(Trip(name, trigger, detail, ev.as_dict()))
            break
    if alike:
        failing = sorted(n for n, p in evidence.items()
                         if p.finished >= pol.min_samples and p.failure_rate >= pol.failure_rate)
        finished = sum(evidence[n].finished for n in failing)
        failed = sum(evidence[n].failed for n in failing)
        trips.append(Trip(FLEET, "failure_spike",
                          f"every lane with evidence fails alike ({', '.join(failing)}: {failed} of {finished} "
                          f"failed, >= {pol.failure_rate:.0%} each): the work, not a lane",
                          {n: evidence[n].as_dict() for n in failing}, failing))
    return trips


def _triggers(ev: LaneEvidence, pol: Any, *, degraded: bool = False) -> list[tuple[str, str]]:
    out = []
    if ev.finished >= pol.min_samples and ev.failure_rate >= pol.failure_rate:
        out.append(("failure_spike",
                    f"failure rate {ev.failure_rate:.0%} of {ev.finished} >= {pol.failure_rate:.0%}"))
    meant = ev.dispatched + ev.fallback_away
    if not degraded and meant >= pol.min_samples and ev.fallback_lost_rate >= pol.fallback_lost_rate:
        out.append(("fallback_spike",
                    f"fallback lost rate {ev.fallback_lost_rate:.0%} of {meant} >= {pol.fallback_lost_rate:.0%}"))
    if ev.oldest_interactive_wait_s >= pol.interactive_starvation_sec:
        out.append(("interactive_starvation",
                    f"an interactive mission bound to it waits {ev.oldest_interactive_wait_s:.0f}s "
                    f">= {pol.interactive_starvation_sec:g}s"))
    if ev.lease_expiries >= pol.max_lease_expiries:
        out.append(("heartbeat_instability", f"{ev.lease_expiries} leases expired >= {pol.max_lease_expiries}"))
    return out


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


def promotion_verdict(conn: Source, fleet: LaneSet, lane: str, *, now: float) -> Verdict:
    """Does the evidence over the promotion window allow raising this lane's weight? Every unmet rule is listed."""
    pol = fleet.settings.promotion
    ev = lane_evidence(conn, lane, now=now, window_s=pol.window_sec)
    reasons = []
    if ev.finished < pol.min_samples:
        reasons.append(f"only {ev.finished} missions finished in the window (need {pol.min_samples})")
    if ev.failure_rate > pol.max_failure_rate:
        reasons.append(f"failure rate {ev.failure_rate:.1%} > {pol.max_failure_rate:.1%}")
    if ev.fallback_lost_rate > pol.max_fallback_lost_rate:
        reasons.append(f"fallback lost rate {ev.fallback_lost_rate:.1%} > {pol.max_fallback_lost_rate:.1%}")
    if ev.p95_queue_wait_s is not None and ev.p95_queue_wait_s > pol.max_p95_queue_wait_sec:
        reasons.append(f"p95 queue wait {ev.p95_queue_wait_s:.2f}s > {pol.max_p95_queue_wait_sec:g}s")
    starved = reads.starved_interactive(conn, lane, now - pol.window_sec, pol.interactive_starvation_sec)
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


@dataclass
class Promotion:
    """What ``promote`` did: the weight before and now, and the evidence it judged (None when the weight was
    already the one asked: nothing was judged)."""

    lane: str
    weight: int
    previous: int
    changed: bool
    forced: bool = False
    evidence: dict[str, Any] | None = None
    unmet: list[str] = field(default_factory=list)
    """The rules the evidence did not meet (a forced promotion overrode them)."""

    def as_dict(self) -> dict[str, Any]:
        if not self.changed:
            return {"lane": self.lane, "weight": self.weight, "changed": False}
        return {"lane": self.lane, "weight": self.weight, "previous": self.previous, "changed": True,
                "forced": self.forced, "evidence": self.evidence, "unmet": self.unmet}


def promote(lane: str, weight: int, *, force: bool = False, reason: str | None = None, config_dir: str | None = None,
            ledger: str | None = None, now: float | None = None) -> Promotion:
    """``lanectl promote``: set a lane's weight, raising it only when ``promotion_verdict`` allows (``force``, which
    needs a ``reason``, overrides it and records the override). Lowering needs no evidence; the weight in force
    again changes nothing. A refusal is recorded (``promote_refused``) and raised: ``promotion_refused``, exit 8,
    one problem per unmet rule."""
    import time

    from lanectl import config
    from lanectl.errors import ExitCode, LanectlError, Problem
    from lanectl.ledger import lanes as lane_ops
    from lanectl.ledger.events import EventKind

    fleet = config.load(config_dir)
    fleet.get(lane)
    if force and not reason:
        raise LanectlError("--force needs --reason", "say why the evidence is being overridden", "reason_required",
                           ExitCode.USAGE)
    with config.open_ledger(fleet, ledger) as led:
        now = led.clock() if now is None else now  # the ledger's clock (PostgreSQL: the server's)
        promoted = lane_ops.weight_of(led, lane)
        current = promoted if promoted is not None else fleet.lanes[lane].weight
        if weight == current:
            return Promotion(lane, weight, current, changed=False)
        verdict = promotion_verdict(led, fleet, lane, now=now)
        raising = weight > current
        if raising and not verdict.allowed and not force:
            lane_ops.record(led, EventKind.PROMOTE_REFUSED, now=now, lane=lane, weight=weight, previous=current,
                            reasons=verdict.reasons, evidence=verdict.evidence, reason=reason)
            raise LanectlError(
                f"promotion of {lane} to weight {weight} refused: the evidence does not meet the policy",
                "fix what is listed, run 'lanectl drill', or override with --force --reason",
                "promotion_refused", ExitCode.UNHEALTHY,
                [Problem(r, field="evidence", code="promotion_rule", lane=lane) for r in verdict.reasons])
        lane_ops.set_weight(led, lane, weight, now=now)
        lane_ops.record(led, EventKind.PROMOTE, now=now, lane=lane, weight=weight, previous=current,
                        direction="up" if raising else "down", forced=bool(force and not verdict.allowed),
                        overridden=verdict.reasons if force and not verdict.allowed else None,
                        evidence=verdict.evidence, reason=reason)
    return Promotion(lane, weight, current, changed=True, forced=force and not verdict.allowed,
                     evidence=verdict.evidence, unmet=verdict.reasons)

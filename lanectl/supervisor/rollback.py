"""Rollback: the governance triggers evaluated every ``supervisor.tick_sec``, and what the supervisor does about
a tripped one (drain the lane, move its work to its fallback, snapshot, record) or an ``alert`` instead."""
from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any

from lanectl.ledger import lanes as lane_ops
from lanectl.ledger import reads
from lanectl.ledger.events import EventKind
from lanectl.supervisor.shared import Shared

log = logging.getLogger("lanectl.supervisor")
WHO = "lanectl-supervisor"


class Governor:
    def __init__(self, shared: Shared) -> None:
        self.shared = shared
        self.last_govern = 0.0
        self.alerted: dict[tuple[str, str], float] = {}
        """(lane, trigger) -> when its last alert was recorded (at most one per ``rollback.cooldown_sec``)."""

    def maybe_govern(self, now: float) -> None:
        if now - self.last_govern >= self.shared.settings.supervisor.tick_sec:
            self.last_govern = now
            self.govern(now)

    def govern(self, now: float) -> None:
        """Rollback triggers: drain a tripped lane, move its work to the fallback, snapshot, record; or alert
        instead when the trip is fleet-wide (the work's fault), when acting would take out the last healthy lane
        of a class, or when this pass already drained a lane for the same trigger (rollbacks are bounded)."""
        from lanectl import governance

        s = self.shared
        states = reads.lane_states(s.db)
        acted: dict[str, str] = {}  # trigger -> the lane this pass drained for it
        for trip in governance.rollback_trips(s.db, s.fleet, now=now, states=states):
            if trip.fleet_wide:
                self.alert(trip, now, lane=None, lanes=trip.lanes,
                           reason="not acted on: every lane with evidence shows it alike (the work, not a lane)")
                continue
            if trip.trigger == "fallback_spike":  # the policy already routes around a lane that cannot take work
                self.alert(trip, now, lane=trip.lane, reason="its pinned work goes to its fallback; not drained: "
                           "draining a lane that is away anyway would only keep it away once it is back")
                continue
            if trip.trigger in acted:
                self.alert(trip, now, lane=trip.lane, reason=f"not acted on: this pass already rolled back "
                                                             f"{acted[trip.trigger]} for {trip.trigger}")
                continue
            healthy = {n: w.healthy for n, w in s.lanes.items()}
            guard = governance.last_healthy_for(s.fleet, trip.lane, states, healthy)
            if guard:
                self.alert(trip, now, lane=trip.lane, classes=guard,
                           reason="not acted on: it is the last healthy lane for " + ", ".join(guard))
                continue
            self.rollback(trip, now)
            acted[trip.trigger] = trip.lane
            states[trip.lane] = "draining"

    def alert(self, trip: Any, now: float, *, lane: str | None, reason: str, **data: Any) -> None:
        """An ``alert`` event instead of an action, at most once per ``rollback.cooldown_sec`` per lane (or the
        fleet) and trigger."""
        key = (trip.lane, trip.trigger)
        if now - self.alerted.get(key, float("-inf")) < self.shared.settings.rollback.cooldown_sec:
            return
        self.alerted[key] = now
        log.warning("rollback trigger %s on lane=%s: %s", trip.trigger, lane or "*", reason)
        lane_ops.record(self.shared.db, EventKind.ALERT, now=now, lane=lane, trigger=trip.trigger, detail=trip.detail,
                        evidence=trip.evidence, actor=WHO, reason=reason, **data)

    def rollback(self, trip: Any, now: float) -> None:
        s = self.shared
        why = f"rollback: {trip.trigger}"
        fallback = s.fleet.lanes[trip.lane].fallback
        lane_ops.drain(s.db, s.fleet, trip.lane, now=now, reason=why, who=WHO)
        moved: dict[str, Any] = {}
        if fallback:
            res = lane_ops.reroute(s.db, s.fleet, trip.lane, fallback, now=now, sessions=True, reason=why, who=WHO)
            moved = {"missions": len(res.missions), "sessions": res.sessions}
        snap_dir = Path(s.settings.state_dir) / "snapshots"
        path = self.snapshot_async(trip.lane, snap_dir, why, now) if s.settings.rollback.snapshots else None
        lane_ops.record(s.db, EventKind.ROLLBACK, now=now, lane=trip.lane, trigger=trip.trigger,
                        detail=trip.detail, evidence=trip.evidence, fallback=fallback, moved=moved, snapshot=path,
                        actor=WHO, reason=trip.detail)
        s.lanes[trip.lane].state = "draining"
        log.warning("lane=%s rolled back (%s): drained, work moved to %s, snapshot %s", trip.lane, trip.detail,
                    fallback or "nowhere (no fallback)", path)
        s.dirty = True

    def snapshot_async(self, lane: str, out: Path, reason: str, now: float) -> str:
        """Capture in a thread (systemctl, journalctl and an integrity check may take seconds; the main loop must
        keep pinging the watchdog); returns where it will be."""
        from lanectl import incident

        fleet, ledger_path = self.shared.fleet, self.shared.ledger_path

        def run() -> None:
            try:
                incident.capture(fleet, ledger_path, out, lane=lane, reason=reason, actor=WHO, now=now)
            except Exception:
                log.exception("lane=%s: snapshot failed", lane)

        threading.Thread(target=run, name="snapshot", daemon=True).start()
        return str(incident.final_path(out, lane, now))

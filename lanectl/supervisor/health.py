"""Health and degradation: a lane's healthy flag in the ledger, and the judgement made after each observation.

A lane whose unit failed, or that systemd restarted ``restart.max_restarts`` times within
``health.restart_window_sec`` (a restart storm), is degraded: its sessions move to its fallback. A degraded lane
that has been up and healthy for ``health.recover_sec`` with no restart in that time becomes active again.
A restarting lane that is still the last healthy one for a class is not degraded (an ``alert`` instead).
"""
from __future__ import annotations

import logging

from lanectl.errors import LanectlError
from lanectl.ledger import lanes as lane_ops
from lanectl.ledger import missions as ms
from lanectl.ledger import reads
from lanectl.ledger.events import EventKind, append
from lanectl.supervisor.rollback import Governor
from lanectl.supervisor.shared import LaneWatch, Shared

log = logging.getLogger("lanectl.supervisor")


class Health:
    def __init__(self, shared: Shared, governor: Governor) -> None:
        self.shared = shared
        self.governor = governor

    def set_health(self, lane: LaneWatch, healthy: bool, now: float, why: str = "") -> None:
        if lane.healthy == healthy and lane.health_recorded:
            return
        # a lane that should take work and stops answering is a warning; one drained, disabled or not up yet (this
        # process's first look) is not
        should_run = lane.enabled and lane.state in ("active", "degraded")
        if healthy:
            log.info("lane=%s healthy", lane.name)
        else:
            log.log(logging.WARNING if should_run and lane.health_recorded else logging.INFO,
                    "lane=%s down: %s%s", lane.name, why or "not healthy",
                    "" if should_run else f" ({lane.state if lane.enabled else 'disabled'}: not expected to run)")
        lane.health_recorded = True
        lane.healthy = healthy
        lane.healthy_since = now if healthy else None
        ms.set_lane(self.shared.db, lane.name, now=now, healthy=healthy)
        self.shared.dirty = True

    def count_restarts(self, w: LaneWatch, restarts: int, now: float) -> None:
        """systemd's restart counter (NRestarts) as read now: the restarts since the last reading join the lane's
        window of recent restarts (the first reading of this process only sets the base)."""
        delta = restarts - w.restarts if w.restarts >= 0 and restarts > w.restarts else 0
        w.restart_times.extend([now] * delta)
        w.unrecorded_restarts += delta
        w.restarts = restarts

    def forget_old_restarts(self, w: LaneWatch, now: float) -> None:
        window = self.shared.settings.health.restart_window_sec
        while w.restart_times and w.restart_times[0] < now - window:
            w.restart_times.popleft()

    def judge(self, w: LaneWatch, now: float) -> None:
        """Degrade a lane whose unit failed or that restarts too often; let a stable one recover.

        The lane's start limit is above ``restart.max_restarts`` (config), so systemd is still restarting it when
        it is degraded. A lane that recovers starts its restart count and its evidence window afresh."""
        h = self.shared.settings.health
        storm = len(w.restart_times) >= w.max_restarts
        recover = h.recover_sec
        if w.state == "active" and w.enabled and (w.active == "failed" or storm):
            why = ("unit failed" if w.active == "failed" else
                   f"restart_instability: {len(w.restart_times)} restarts in "
                   f"{h.restart_window_sec:g}s >= {w.max_restarts}")
            guard = self.last_healthy_classes(w.name) if w.active != "failed" else []
            if guard:  # a restarting lane that is still the only one for a class keeps serving it
                from lanectl.governance import Trip

                self.governor.alert(Trip(w.name, "restart_instability", why), now, lane=w.name, classes=guard,
                                    reason="not degraded: it is the last healthy lane for " + ", ".join(guard))
                return
            self.degrade(w, why, now)
        elif (w.state == "degraded" and w.healthy and w.healthy_since is not None
              and now - w.healthy_since >= recover
              and (not w.restart_times or now - w.restart_times[-1] >= recover)):
            self.recover(w, now)

    def recover(self, w: LaneWatch, now: float) -> None:
        recover = self.shared.settings.health.recover_sec
        with self.shared.db.transaction() as conn:
            lane_ops.mark_recovered(conn, w.name, now=now)
            append(conn, EventKind.LANE_STATE, now, lane=w.name, to="active", previous="degraded",
                   reason=f"healthy for {recover:g}s")
        w.state = "active"
        log.info("lane=%s active again: healthy for %gs", w.name, recover)
        w.restart_times.clear()  # the storm that degraded it is over: count afresh
        self.shared.dirty = True

    def last_healthy_classes(self, lane: str) -> list[str]:
        from lanectl import governance

        s = self.shared
        states = reads.lane_states(s.db)
        return governance.last_healthy_for(s.fleet, lane, states, {n: w.healthy for n, w in s.lanes.items()})

    def degrade(self, w: LaneWatch, why: str, now: float) -> None:
        s = self.shared
        fallback = s.fleet.lanes[w.name].fallback
        with s.db.transaction() as conn:
            lane_ops.mark_degraded(conn, w.name, now=now)
            append(conn, EventKind.LANE_STATE, now, lane=w.name, to="degraded", previous=w.state, reason=why,
                   fallback=fallback)
        w.state = "degraded"
        log.warning("lane=%s degraded (%s); fallback %s", w.name, why, fallback or "none")
        if fallback:
            for session in reads.session_ids(s.db, w.name):
                try:
                    ms.move_session(s.db, session, fallback, now=now, reason=f"failover: {w.name} degraded")
                except LanectlError as exc:
                    log.info("session=%s stays on lane=%s for now: %s", session, w.name, exc.message)
        s.dirty = True

"""Recovery drills: break a lane on purpose under supervision and measure what happens (the evidence promotion
asks for).

A drill submits one mission pinned to the lane, waits until the lane runs it, then kills the lane's main process
(``crash``: SIGKILL) or freezes it (``hang``: SIGSTOP, so that only the watchdog can notice). It measures the time
until the supervisor re-queued the mission (detect) and until the lane was up again (recover), checks that no
mission was left active on the dead invocation (orphaned), waits for the mission to end, and records a ``drill``
event with the figures. It passes when nothing was orphaned, the mission succeeded, detection came within the
limit (5 s for a crash, ``watchdog_sec`` + 5 s for a hang), and the lane is still in service at the end: a drill
after which the supervisor drained the lane (a rollback) has not shown that the lane recovers. A lane ``degraded``
at the end passes (``lane_state`` says so): drills in a row are restarts in a row, which the supervisor counts as a
storm, and a degraded lane returns to service by itself once stable. Every unmet condition is in ``failures``.

A lane that does not run, or takes no work (drained, draining, degraded), is refused: exit 5 (``lane_down``,
``lane_not_active``); a supervisor that does not run: exit 6.
"""
from __future__ import annotations

import os
import signal
import time
from dataclasses import asdict, dataclass
from typing import Any

from lanectl import systemd
from lanectl.config import LaneSet
from lanectl.errors import Conflict, Timeout, Unavailable
from lanectl.ledger import Ledger
from lanectl.ledger import lanes as lane_ops
from lanectl.ledger import missions as ms
from lanectl.ledger import reads
from lanectl.ledger.events import EventKind
from lanectl.poll import until
from lanectl.states import FINISHED, HELD
from lanectl.units import SUPERVISOR, unit_name

POLL_S = 0.02
CRASH_LIMIT_S = 5.0


@dataclass
class DrillResult:
    lane: str
    type: str  # crash or hang ("kind" is taken: it names the event)
    mission: int
    detect_s: float | None
    recover_s: float | None
    end_s: float | None
    orphaned: int
    mission_state: str
    limit_s: float
    passed: bool
    lane_state: str = "active"
    """The lane's dispatch state when the drill ended (draining or drained fails it)."""
    failures: list[str] | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _wait(pred: Any, timeout: float, what: str, progress: Any = None) -> Any:
    def told(_value: Any, left: float) -> None:
        if progress is not None:
            progress(f"drill: waiting for {what}; {left:.0f}s left")

    value = until(pred, timeout, interval=POLL_S, progress=told)
    if not value:
        raise Timeout(f"drill: timed out after {timeout:g}s waiting for {what}", "look at 'lanectl status' "
                      "and 'lanectl events --kind requeued'", "drill_timeout")
    return value


def run(ledger: Ledger, fleet: LaneSet, lane: str, kind: str, *, timeout: float = 60.0,
        progress: Any = None) -> DrillResult:
    """``progress`` (optional) is told what the drill waits for at each step."""
    cfg = fleet.get(lane)
    if kind not in ("crash", "hang"):
        raise Conflict(f"unknown drill kind {kind!r}", "use crash or hang", "drill_kind")
    unit = unit_name(lane)
    shown = systemd.show([unit, SUPERVISOR], ("Id", "ActiveState", "SubState", "MainPID", "InvocationID"))
    if shown.get(SUPERVISOR, {}).get("ActiveState") != "active":
        raise Unavailable("drill: the supervisor is not running", "start it: lanectl up", "supervisor_down")
    if shown.get(unit, {}).get("SubState") != "running":
        raise Conflict(f"drill: lane {lane} is not running", f"start it first: lanectl up {lane}", "lane_down")
    if lane_ops.state_of(ledger, lane) != "active":
        raise Conflict(f"drill: lane {lane} is {lane_ops.state_of(ledger, lane)}, not active",
                       "drill a lane that takes work", "lane_not_active")
    cls = cfg.classes[0]
    now = ledger.clock()  # the ledger's clock (PostgreSQL: the server's)
    mission = ms.submit(ledger, fleet, cls=cls, payload={"argv": ["/bin/sh", "-c", "sleep 2"], "drill": kind},
                        now=now, lane=lane, deadline=now + 3600 if cls == "deadline" else None).mission.id

    def running_on_lane() -> bool:
        m = ms.get(ledger, mission)
        return m.state == "running" and m.current_lane == lane

    _wait(running_on_lane, timeout, f"lane {lane} to run the drill mission", progress)
    props = systemd.show([unit], ("Id", "MainPID", "InvocationID"))[unit]
    pid, old_inv = int(props["MainPID"]), props["InvocationID"]
    t0 = time.time()
    os.kill(pid, signal.SIGKILL if kind == "crash" else signal.SIGSTOP)
    limit = CRASH_LIMIT_S if kind == "crash" else cfg.watchdog_sec + 5.0
    detect = recover = None
    try:
        at = _wait(lambda: reads.first_loss_at(ledger, mission, t0), max(timeout, limit + 10),
                   "the supervisor to re-queue the mission", progress)
        detect = at - t0

        def back_up() -> bool:
            p = systemd.show([unit], ("Id", "SubState", "InvocationID"))[unit]
            return p.get("SubState") == "running" and p.get("InvocationID") not in ("", old_inv)

        _wait(back_up, timeout, f"lane {lane} to be restarted", progress)
        recover = time.time() - t0
    finally:
        if kind == "hang":  # never leave a frozen process behind, whatever happened
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass
    orphaned = reads.orphaned_attempts(ledger, lane, old_inv)
    final = _wait(lambda: (lambda m: m if m.state in FINISHED else None)(ms.get(ledger, mission)), timeout,
                  "the drill mission to finish", progress)
    end = time.time() - t0
    after = lane_ops.state_of(ledger, lane)
    failures = []
    if orphaned:
        failures.append(f"{orphaned} mission(s) left active on the dead invocation")
    if final.state != "succeeded":
        failures.append(f"the drill mission ended {final.state}")
    if detect is None or detect > limit:
        failures.append(f"detection took {_r(detect)}s > {limit:g}s")
    if after not in ("active", "degraded"):  # degraded: the drill's own restarts made a storm; it returns by itself
        why = lane_ops.drained_by(ledger, lane) if after in HELD else None
        failures.append(f"the lane is {after} after the drill" + (f" (drained by {why})" if why else ""))
    res = DrillResult(lane, kind, mission, _r(detect), _r(recover), _r(end), orphaned, final.state, limit,
                      not failures, after, failures)
    data = res.as_dict()
    del data["lane"]
    lane_ops.record(ledger, EventKind.DRILL, now=ledger.clock(), lane=lane, **data)
    return res


def _r(v: float | None) -> float | None:
    return None if v is None else round(v, 3)

"""Lane watching: what runs, from systemd, a pidfd per lane process and each lane's health endpoint.

- A lane process that exits is seen at once through its pidfd (the main loop's selector reports it, the next turn
  calls :meth:`LaneWatcher.reap`): what it held is settled from its execution log, the rest re-queued.
- Every ``health.observe_sec`` (every 0.25 s while a lane that went down is settling): the health endpoint of every
  lane, and every ``health.systemd_sec`` (or while settling) systemd's view (active state, InvocationID,
  NRestarts, MainPID) over D-Bus (:class:`lanectl.systemd.UnitBus`) of the lanes without a live pidfd (all of
  them every SYSTEMD_ALL_EVERY-th time, and while settling). A new invocation re-queues what the old one
  held; each observation ends with the lane's judgement (:class:`lanectl.supervisor.health.Health`).
- After a supervisor restart, attempts a lane does not hold are reconciled (lost) for RECONCILE_FOR_S.
"""
from __future__ import annotations

import logging
import os
import selectors
import threading
from concurrent.futures import Future
from pathlib import Path
from typing import Any

from lanectl import systemd
from lanectl.errors import LanectlError
from lanectl.ledger import Error as LedgerError
from lanectl.ledger import lanes as lane_ops
from lanectl.ledger import missions as ms
from lanectl.ledger import reads
from lanectl.protocol import LogScan, log_key, scan_execution_log, tcp_listener_uids
from lanectl.healthcheck import check_health_many
from lanectl.supervisor.dispatcher import Dispatcher
from lanectl.supervisor.health import Health
from lanectl.supervisor.shared import LaneWatch, Shared
from lanectl.supervisor.users import LaneUsers

log = logging.getLogger("lanectl.supervisor")
SETTLE_S = 30.0
"""After a lane process exits, systemd is read every 0.25 s for this long (or until the lane is back)."""
SETTLE_OBSERVE_S = 0.25
RECONCILE_GRACE_S = 5.0
"""An attempt dispatched this recently may still be on its way to the lane; reconciliation leaves it alone."""
RECONCILE_FOR_S = 2 * RECONCILE_GRACE_S
"""After a start, reconciliation runs after every observation for this long (not once): an attempt recorded just
before the previous process died and never sent is re-queued as soon as it is RECONCILE_GRACE_S old."""
LOG_READ_TIMEOUT_S = 1.0
"""The longest the main loop waits for a lane's execution log to be read (in a thread); at most a quarter of the
supervisor's watchdog."""
UNIT_PROPS = ("Id", "ActiveState", "SubState", "MainPID", "InvocationID", "NRestarts")
SYSTEMD_ALL_EVERY = 6
"""When systemd is asked (every ``health.systemd_sec``), lanes whose running process the supervisor holds a pidfd
of are included only every SYSTEMD_ALL_EVERY-th time, and always while a lane is settling: their exit is seen at
once through the pidfd, and nothing systemd says of a unit (state, invocation, restarts, main PID) changes while
its main process lives. At 48 idle lanes, parsing those D-Bus answers was a third of the idle supervisor's CPU."""


class LaneWatcher:
    def __init__(self, shared: Shared, sel: selectors.BaseSelector, health: Health, dispatcher: Dispatcher,
                 users: LaneUsers) -> None:
        self.shared = shared
        self.sel = sel
        self.health = health
        self.dispatcher = dispatcher
        self.users = users
        self.settling = False
        self.settle_until = float("-inf")
        self.last_systemd = float("-inf")
        self.last_systemd_all = float("-inf")
        self.last_observe = float("-inf")
        self.started_at = 0.0
        """When this process started supervising (the loop's clock): reconciliation runs for RECONCILE_FOR_S."""
        self.exited: set[str] = set()
        """Lanes whose pidfd turned readable (their process is gone), for the next turn to reap."""
        self.log_read: Future[LogScan] | None = None
        self.port_alerted: dict[str, float] = {}

    # ------------------------------------------------------------------------------------------ lanes in and out
    def add(self, w: LaneWatch, recorded_invocation: str) -> None:
        w.recorded_invocation = recorded_invocation
        self.shared.lanes[w.name] = w

    def remove(self, name: str) -> LaneWatch:
        w = self.shared.lanes.pop(name)
        self.unwatch_pid(w)
        self.exited.discard(name)
        self.dispatcher.drop_cancels(name)
        self.shared.full.discard(name)
        self.users.forget(name)
        return w

    def look_again(self) -> None:
        """Ask systemd about every lane at the next observation (the fleet changed)."""
        self.last_systemd = self.last_systemd_all = float("-inf")

    # ------------------------------------------------------------------------------------------ pidfds
    def watch_pid(self, lane: LaneWatch, pid: int) -> None:
        if pid == lane.main_pid and lane.pidfd is not None:
            return
        if pid <= 0 and lane.pidfd is not None:
            # systemd names no main process (the unit is stopping) but ours may still run: keep watching it until
            # it is gone, or its exit would go unseen (its pidfd turns readable then, and lane_exited re-queues)
            return
        self.unwatch_pid(lane)
        lane.main_pid = pid
        if pid <= 0:
            return
        try:
            lane.pidfd = os.pidfd_open(pid)
        except OSError:  # gone already, or no pidfd support: the next observation notices
            lane.pidfd = None
            return
        self.sel.register(lane.pidfd, selectors.EVENT_READ, lane.name)

    def unwatch_pid(self, lane: LaneWatch) -> None:
        if lane.pidfd is not None:
            self.sel.unregister(lane.pidfd)
            os.close(lane.pidfd)
            lane.pidfd = None

    def pid_exited(self, name: str) -> None:
        """From the loop's wait: the lane's pidfd is readable. Reaped by the next turn."""
        self.exited.add(name)

    def reap(self, now: float) -> None:
        """The lanes whose process exited since the last turn: settle and re-queue what they held."""
        while self.exited:
            name = self.exited.pop()
            lane = self.shared.lanes.get(name)
            if lane is None or lane.pidfd is None:
                continue  # removed from the fleet meanwhile (its work was re-queued then)
            try:
                self.lane_exited(lane, now)
            except (LedgerError, LanectlError) as exc:
                # not recorded: the next look at systemd sees the new invocation and re-queues then
                log.error("lane=%s exited but the ledger is unavailable: %s", lane.name, exc)
                self.settling = True
                self.settle_until = now + SETTLE_S

    def lane_exited(self, lane: LaneWatch, now: float) -> None:
        """The lane's main process is gone (crash, watchdog kill, stop): what it held cannot complete."""
        s = self.shared
        self.unwatch_pid(lane)
        lane.main_pid = 0
        self.dispatcher.drop_cancels(lane.name)
        s.full.discard(lane.name)
        self.settle_from_log(lane, lane.invocation or lane.recorded_invocation, now)
        lost = ms.requeue_lane(s.db, lane.name, "lane process exited", now=now)
        if lost:
            s.counters["failovers"] += 1
            log.warning("lane=%s exited; re-queued %s", lane.name, " ".join(f"mission={m}" for m in lost))
        self.health.set_health(lane, False, now, "its process exited")
        self.settling = True
        self.settle_until = now + SETTLE_S
        s.dirty = True

    # ------------------------------------------------------------------------------------------ execution logs
    def read_lane_log(self, lane: LaneWatch) -> list[dict[str, Any]]:
        """The authentic entries of a lane's execution log. The read runs in a thread with a deadline: whatever sits
        in the workspace, the main loop waits at most LOG_READ_TIMEOUT_S, and never again while a read hangs."""
        fleet = self.shared.fleet
        if self.log_read is not None and not self.log_read.done():
            log.warning("lane=%s: execution log not read: an earlier read has not returned", lane.name)
            return []
        uid = self.users.uid_of(lane.name)
        if uid is None:
            log.warning("lane=%s: execution log not read: its user %s does not exist", lane.name,
                        fleet.lanes[lane.name].resolved_user(lane.name))
            return []
        workspace = Path(fleet.lanes[lane.name].workspace)
        fut: Future[LogScan] = Future()
        key = log_key(lane.key, lane.name)

        def read() -> None:  # a daemon thread: one that never returned would not hold up the supervisor's exit
            try:
                fut.set_result(scan_execution_log(workspace, owner=uid, key=key))
            except BaseException as exc:
                fut.set_exception(exc)

        self.log_read = fut
        threading.Thread(target=read, name="execlog", daemon=True).start()
        wait = min(LOG_READ_TIMEOUT_S, self.shared.settings.supervisor.watchdog_sec / 4)
        try:
            scan = fut.result(timeout=wait)
        except TimeoutError:
            log.warning("lane=%s: execution log not read within %gs", lane.name, wait)
            return []
        except Exception:
            log.exception("lane=%s: reading the execution log failed", lane.name)
            return []
        if scan.refused:
            log.warning("lane=%s: execution log not read: %s", lane.name, scan.refused)
        if scan.unauthentic:
            log.warning("lane=%s: %d line(s) of its execution log failed authentication and were ignored",
                        lane.name, scan.unauthentic)
        return scan.entries

    def settle_from_log(self, lane: LaneWatch, invocation: str, now: float) -> list[int]:
        """Before re-queuing a dead lane's missions: the outcomes it logged but could not report yet.

        The runtime appends the end of every execution to ``WORKSPACE/.lanectl/executions.log`` before it sends
        the callback; a lane killed between the two would otherwise have its finished work run a second time.
        Missions run as the lane's user and can write that file too: only lines whose MAC verifies under the
        lane's log key (which only its runtime holds) count, and only for that lane, invocation and current
        attempt; anything else there costs at most a re-run.
        """
        led = self.shared.db
        active = reads.active_attempts(led, lane.name)
        if not active or not invocation:
            return []
        settled = []
        for entry in self.read_lane_log(lane):
            key = (entry.get("mission"), entry.get("attempt"))
            if (entry.get("event") != "end" or key not in active or entry.get("lane") != lane.name
                    or entry.get("invocation") != invocation or entry.get("outcome") not in ("succeeded", "failed")):
                continue
            code = entry.get("exit_code")
            error = entry.get("error")
            result = {"exit_code": code if type(code) is int else None, "output_tail": None}
            if ms.settle_from_lane(led, key[0], key[1], lane.name, entry["outcome"], now=now, result=result,
                                   error=error if isinstance(error, str) else None):
                settled.append(key[0])
                active.discard(key)
        if settled:
            log.info("lane=%s: settled %s from its execution log", lane.name,
                     " ".join(f"mission={m}" for m in settled))
        return settled

    # ------------------------------------------------------------------------------------------ observation
    def observe_every(self) -> float:
        observe_sec = self.shared.settings.health.observe_sec
        return min(SETTLE_OBSERVE_S, observe_sec) if self.settling else observe_sec

    def next_observe(self) -> float:
        return self.last_observe + self.observe_every()

    def maybe_observe(self, now: float) -> bool:
        """Observe when one is due (every ``health.observe_sec``, SETTLE_OBSERVE_S while settling); for
        RECONCILE_FOR_S after the start, reconcile after each. Whether it observed."""
        every = self.observe_every()
        if now - self.last_observe < every:
            return False
        self.observe(now)
        self.last_observe = now
        if now - self.started_at <= RECONCILE_FOR_S + every:
            self.reconcile(now)
        return True

    def observe(self, now: float) -> None:
        """systemd's view and the health endpoint of every lane; invocation changes, degradation, recovery."""
        s = self.shared
        led = s.db
        settings = s.settings
        watches = list(s.lanes.values())
        # process exits come through pidfds at once; systemd itself is asked less often unless a lane is settling
        asked: set[str] = set()
        props: dict[str, dict[str, str]] = {}
        systemd_sec = settings.health.systemd_sec
        if s.use_systemd and (self.settling or now - self.last_systemd >= systemd_sec):
            self.last_systemd = now
            everyone = self.settling or now - self.last_systemd_all >= SYSTEMD_ALL_EVERY * systemd_sec
            if everyone:
                self.last_systemd_all = now
            asked = {w.unit for w in watches if everyone or w.pidfd is None or not w.running}
            if asked:
                props = systemd.show([w.unit for w in watches if w.unit in asked], UNIT_PROPS)
        healths = check_health_many([(w.port, w.health_path) for w in watches], settings.health.health_timeout_sec)
        # who holds each lane's port: only the lane's own user may (with systemd: real lane users)
        holders = tcp_listener_uids({w.port for w in watches}) if s.use_systemd else {}
        states = reads.lane_states(led)
        for w, h in zip(watches, healths):
            p = props.get(w.unit, {})
            w.state = states.get(w.name, "active")
            w.active, w.sub = p.get("ActiveState", w.active), p.get("SubState", w.sub)
            if "NRestarts" in p:  # only when systemd was asked this turn (an empty answer is not zero restarts)
                self.health.count_restarts(w, int(p["NRestarts"] or 0), now)
            self.health.forget_old_restarts(w, now)
            inv = p.get("InvocationID", "")
            if w.running and inv and inv != w.invocation:
                self.new_invocation(w, inv, now)
            if w.unit in asked:
                self.watch_pid(w, int(p.get("MainPID") or 0) if w.running else 0)
                if w.active in ("failed", "inactive") and w.pidfd is None and lane_ops.in_flight(led, w.name):
                    self.lane_exited(w, now)  # its process is gone and the pidfd missed it: re-queue at once
            self.take_health(w, h, holders, now)
            self.health.judge(w, now)
        # for a while after a lane went down, look again soon: its new invocation should be seen at once (a lane
        # stopped on purpose must not keep systemd busy forever, hence the time limit)
        self.settling = now < self.settle_until and any(w.enabled and not (w.running and w.healthy)
                                                         for w in watches)

    def new_invocation(self, w: LaneWatch, inv: str, now: float) -> None:
        """systemd runs the lane under a new invocation: what the old one held is gone."""
        prev = w.invocation or w.recorded_invocation  # at start: the invocation of before the outage
        if prev and prev != inv:  # that one is gone: what it logged as done but could not report
            self.settle_from_log(w, prev, now)
        # only restarts systemd did on its own (NRestarts) count: an operator's `lanectl restart` or
        # `apply` starts a new invocation with restarts 0; None: the supervisor cannot tell (it was down)
        lost = ms.set_lane(self.shared.db, w.name, now=now, invocation=inv,
                           restarts=w.unrecorded_restarts if w.invocation else None)
        w.unrecorded_restarts = 0
        if lost:
            self.shared.counters["failovers"] += 1
        self.dispatcher.drop_cancels(w.name)
        w.invocation = inv
        self.shared.dirty = True

    def take_health(self, w: LaneWatch, h: Any, holders: dict[int, set[int]], now: float) -> None:
        """One lane's health report: healthy or not (and why), what it holds (its leases run on), whether it is
        full."""
        s = self.shared
        body = h.body or {}
        ok = h.ok and (not s.use_systemd or w.running) and body.get("lane", w.name) == w.name
        why = ("" if ok else f"unit {w.active}/{w.sub}" if s.use_systemd and not w.running
               else f"health endpoint: {h.error or f'HTTP {h.http_status}'}" if not h.ok
               else f"its health endpoint answers as lane {body.get('lane')!r}")
        uid = self.users.uid_of(w.name) if holders else None
        if ok and uid is not None and holders.get(w.port) != {uid}:
            ok = False  # another process holds the lane's port: it would get the lane's dispatches and key
            why = f"port {w.port} held by another user"
            if self.port_alerted.get(w.name, 0.0) < now - 60:
                self.port_alerted[w.name] = now
                log.error("lane=%s: port %d is held by uid(s) %s, not by the lane's user (uid %d): no work is "
                          "sent there", w.name, w.port, sorted(holders.get(w.port) or ()), uid)
        self.health.set_health(w, ok, now, why)
        s.full.discard(w.name)
        if not ok:
            return
        w.held = {x for key in ("missions", "reporting") for x in _ints(body.get(key))}
        cap = body.get("capacity")
        if isinstance(cap, int) and isinstance(body.get("in_flight"), int) and body["in_flight"] >= cap:
            s.full.add(w.name)
        if w.held and (not s.use_systemd or body.get("invocation") in (None, w.invocation)):
            # what the lane says it holds is alive: its lease runs on, even when its heartbeats are late
            lease = s.settings.leases.lease_sec
            ms.extend_leases(s.db, until=now + lease, below=now + lease / 2, lane=w.name, missions=sorted(w.held))

    def reconcile(self, now: float) -> None:
        """After a supervisor restart: attempts an earlier process gave to a lane that the lane does not hold (by
        its last health report), and that are at least RECONCILE_GRACE_S old, are lost. Runs at the start and after
        every observation for RECONCILE_FOR_S, so an attempt recorded just before a crash is re-queued within
        seconds rather than when its lease runs out."""
        s = self.shared
        before = min(now - RECONCILE_GRACE_S, self.started_at or now)
        for w in s.lanes.values():
            if not w.healthy:
                continue
            for mission, attempt in ms.active_on(s.db, w.name, dispatched_before=before):
                if mission in w.held:
                    continue
                ms.lose_attempt(s.db, mission, attempt, w.name, "lane does not hold it (supervisor restart)",
                                now=now)
                s.dirty = True

    def close(self) -> None:
        for w in self.shared.lanes.values():
            self.unwatch_pid(w)


def _ints(value: object) -> set[int]:
    """The mission ids of a list a lane's /healthz sent: anything else (a bool, a number, null, an object) is no
    list of ids and means none. A lane's answer is hostile input: a wrong type must never reach ``int()``."""
    if not isinstance(value, list):
        return set()
    return {x for x in value if isinstance(x, int) and not isinstance(x, bool)}

"""Dispatch: the policy pass, the POSTs of what it assigned, their results, and cancels forwarded to lanes.

POSTs run in a small thread pool after the assignment committed; their results come back through a queue the
main loop drains (``apply_results``). A lane that answered 429 full / 503 stopping gets the attempt back
uncharged and no work until one of its missions ends or its next health report; one that refused otherwise or
could not be reached loses the attempt. A cancel that did not reach its lane is sent again, backing off.
"""
from __future__ import annotations

import collections
import json
import logging
import queue
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

from lanectl.errors import Conflict, NotFound
from lanectl.ledger import missions as ms
from lanectl.ledger import reads
from lanectl.ledger import tick as ticks
from lanectl.protocol import DispatchMsg
from lanectl.supervisor.health import Health
from lanectl.supervisor.shared import Shared

log = logging.getLogger("lanectl.supervisor")
DISPATCH_TIMEOUT_S = 2.0
CANCEL_RETRY_S = 0.5
CANCEL_RETRY_MAX_S = 10.0
"""A cancel that did not reach its lane is sent again, backing off from CANCEL_RETRY_S to CANCEL_RETRY_MAX_S, until
the lane acknowledges it (202) or says it does not hold the mission (404), or its process is gone."""


class Dispatcher:
    def __init__(self, shared: Shared, health: Health) -> None:
        self.shared = shared
        self.health = health
        self.pool = ThreadPoolExecutor(max_workers=8, thread_name_prefix="dispatch")
        self.results: queue.Queue[tuple[ms.Dispatch, int | None, str]] = queue.Queue()
        self.unapplied: collections.deque[tuple[ms.Dispatch, int | None, str]] = collections.deque()
        self.last_tick = 0.0
        self.holder: tuple[str, str] | None = None
        """(host, incarnation): a policy pass claims nothing unless the ledger's host record is still theirs."""
        self.lost_hold = False
        """A pass found the host's record held by another incarnation (or forgotten, stopped)."""
        self.cancel_cursor = 0
        """The last event the cancels were looked for up to (set when the ledger opens)."""
        self.cancels: dict[tuple[int, str], list[float]] = {}
        """Cancels to forward: (mission, lane) -> [when next due (the loop's now), backoff, 1 while a POST is out]."""
        self.cancel_results: queue.Queue[tuple[int, str, int | None]] = queue.Queue()

    # ------------------------------------------------------------------------------------------ dispatches
    def dispatch(self, now: float) -> int:
        """One policy pass (``ledger.tick.run_once``) and the POSTs of what it assigned (after its commit)."""
        s = self.shared
        res = ticks.run_once(s.db, s.fleet, now=now, full=frozenset(s.full), holder=self.holder)
        self.last_tick = now
        if not res.held:
            self.lost_hold = True
        for d in res.dispatches:
            s.counters["dispatched"] += 1
            self.send(d)
        return len(res.dispatches)

    def send(self, d: ms.Dispatch) -> None:
        lane = self.shared.lanes[d.lane]
        body = json.dumps(DispatchMsg(d.mission, d.attempt, d.lane, d.token, d.cls, d.session, d.deadline,
                                      d.payload).as_json()).encode()
        results, wake = self.results, self.shared.wake

        def post() -> None:
            req = urllib.request.Request(f"http://127.0.0.1:{lane.port}/missions", data=body, method="POST",
                                         headers={"Content-Type": "application/json",
                                                  "Authorization": f"Bearer {lane.key}"})
            try:
                with urllib.request.urlopen(req, timeout=DISPATCH_TIMEOUT_S) as resp:
                    resp.read()
                    results.put((d, resp.status, ""))
            except urllib.error.HTTPError as exc:
                results.put((d, exc.code, exc.read(500).decode(errors="replace")))
            except (OSError, ValueError) as exc:
                results.put((d, None, str(exc)))
            wake()

        self.pool.submit(post)

    def apply_results(self, now: float) -> None:
        """The results of dispatch POSTs, in order. One whose ledger write fails stays first in line (with those
        after it) for the next turn: an outage of the ledger loses no lane's refusal."""
        s = self.shared
        while True:
            try:
                self.unapplied.append(self.results.get_nowait())
            except queue.Empty:
                break
        while self.unapplied:
            self.apply_result(*self.unapplied[0], now)
            self.unapplied.popleft()

    def apply_result(self, d: ms.Dispatch, status: int | None, text: str, now: float) -> None:
        s = self.shared
        if status is not None and 200 <= status < 300:
            return
        if status in (429, 503):
            # the lane ran nothing (full, or stopping): the mission goes back uncharged, and the lane gets no
            # more work until its next health report
            why = "lane full" if status == 429 else "lane stopping"
            log.info("mission=%d attempt=%d lane=%s: %s (HTTP %d), re-queued, not charged", d.mission, d.attempt,
                     d.lane, why, status)
            ms.return_attempt(s.db, d.mission, d.attempt, d.lane, d.token,
                              f"{why} (HTTP {status}): not charged", now=now)
            s.full.add(d.lane)
            s.counters["dispatch_failed"] += 1
            if status == 503 and d.lane in s.lanes:
                self.health.set_health(s.lanes[d.lane], False, now, "it is stopping (HTTP 503 to a dispatch)")
            s.dirty = True
            return
        reason = f"lane refused the dispatch (HTTP {status}): {text[:200]}" if status else f"lane unreachable: {text}"
        log.warning("mission=%d attempt=%d lane=%s: dispatch failed: %s", d.mission, d.attempt, d.lane, reason)
        try:
            ms.fail(s.db, d.mission, lane=d.lane, attempt=d.attempt, token=d.token, now=now,
                    error=reason, retry=True)
        except (Conflict, NotFound):
            pass  # already over (cancelled, or re-queued by a failover)
        s.counters["dispatch_failed"] += 1
        if (status is None or status >= 500) and d.lane in s.lanes:
            self.health.set_health(s.lanes[d.lane], False, now, f"dispatch failed: {reason}")
        s.dirty = True

    # ------------------------------------------------------------------------------------------ cancels
    def forward_cancels(self, now: float) -> None:
        """A mission cancelled while a lane ran it: tell that lane to stop it (after the cancel committed)."""
        led = self.shared.db
        top = reads.last_event_id(led)
        if top == self.cancel_cursor:
            return
        rows = reads.cancels_between(led, self.cancel_cursor, top)
        self.cancel_cursor = top
        for mission, lane in rows:
            if lane in self.shared.lanes:
                self.cancels.setdefault((mission, lane), [now, CANCEL_RETRY_S, 0])
        self.send_cancels(now)

    def send_cancels(self, now: float) -> None:
        """POST the cancels that are due; each is sent again (backing off) until its lane answers 202 or 404."""
        results, wake = self.cancel_results, self.shared.wake
        for (mission, lane), entry in self.cancels.items():
            if entry[2] or entry[0] > now:
                continue
            entry[2] = 1
            w = self.shared.lanes[lane]
            req = urllib.request.Request(f"http://127.0.0.1:{w.port}/missions/{mission}/cancel", data=b"{}",
                                         method="POST", headers={"Content-Type": "application/json",
                                                                 "Authorization": f"Bearer {w.key}"})

            def post(req: urllib.request.Request = req, mission: int = mission, lane: str = lane) -> None:
                status: int | None = None
                try:
                    with urllib.request.urlopen(req, timeout=DISPATCH_TIMEOUT_S) as resp:
                        resp.read()
                        status = resp.status
                except urllib.error.HTTPError as exc:
                    status = exc.code
                except (OSError, ValueError):
                    pass
                results.put((mission, lane, status))
                wake()

            self.pool.submit(post)

    def next_cancel_due(self) -> float:
        """When the next cancel is due to be sent (again); one whose POST is out wakes the loop when it returns."""
        return min((e[0] for e in self.cancels.values() if not e[2]), default=float("inf"))

    def cancels_pending(self) -> bool:
        return bool(self.cancels) or not self.cancel_results.empty()

    def apply_cancel_results(self, now: float) -> None:
        while True:
            try:
                mission, lane, status = self.cancel_results.get_nowait()
            except queue.Empty:
                break
            entry = self.cancels.get((mission, lane))
            if entry is None:
                continue  # the lane's process is gone meanwhile: nothing left to stop
            if status is not None and (200 <= status < 300 or status == 404):
                del self.cancels[(mission, lane)]  # stopping, or not held (never got it, or over)
                continue
            log.warning("mission=%d lane=%s: the cancel did not reach the lane (%s); retrying in %gs", mission, lane,
                        f"HTTP {status}" if status else "unreachable", entry[1])
            entry[:] = [now + entry[1], min(entry[1] * 2, CANCEL_RETRY_MAX_S), 0]
        if self.cancels:
            self.send_cancels(now)

    def drop_cancels(self, lane: str) -> None:
        """The lane's process is gone: what it ran is stopped with it."""
        for key in [k for k in self.cancels if k[1] == lane]:
            del self.cancels[key]

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)

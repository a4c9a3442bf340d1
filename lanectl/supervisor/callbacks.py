"""Callbacks: HTTP threads hand them over and wait; the main loop applies what arrived in one transaction.

Group commit: every callback that arrived since the last turn is fenced (mission, lane, attempt, token) and
written by ``missions.apply_callbacks_in`` in one transaction, and each waiting thread gets its own verdict.
Also here: the counters of callbacks refused without a ledger write, and the token bucket that bounds the
``callback_rejected`` events one lane can cause.
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

from lanectl.ledger import missions as ms
from lanectl.protocol import CallbackMsg
from lanectl.supervisor.shared import Shared

log = logging.getLogger("lanectl.supervisor")
CALLBACK_WAIT_S = 10.0
"""The longest an HTTP thread waits for the main loop's verdict on a callback (then 503: the lane retries)."""
REJECTED_PER_S = 1.0
REJECTED_BURST = 20
"""``callback_rejected`` events per lane: a token bucket of REJECTED_BURST refilled at REJECTED_PER_S; rejections
beyond it are counted (``lanectl_callbacks_refused_total{reason="unrecorded"}``), not written."""

Answer = tuple[int, dict[str, Any]]


@dataclass
class Pending:
    msg: CallbackMsg
    future: Future[Answer]


class Refusals:
    """Callbacks refused without a ledger write, by reason, since this process started (any thread)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.counts_: dict[str, int] = {"unauthenticated": 0, "foreign_lane": 0, "tcp": 0, "unrecorded": 0}

    def add(self, reason: str, n: int = 1) -> None:
        with self.lock:
            self.counts_[reason] += n

    def counts(self) -> dict[str, int]:
        with self.lock:
            return dict(self.counts_)


def as_callback(m: CallbackMsg) -> ms.Callback:
    """The ledger's view of a lane's callback message."""
    if m.event == "succeeded":
        return ms.Callback("succeeded", m.mission, m.lane, m.attempt, m.token,
                           result={"exit_code": m.exit_code, "output_tail": m.output_tail})
    if m.event == "failed":
        err = m.error or (f"exit code {m.exit_code}" if m.exit_code is not None else "failed")
        # retry: the mission could not even start (EAGAIN, ENOMEM): the lane ran nothing, so the attempt goes
        # back uncharged and is no failure of the lane (as a 429), and the lane is full for now
        return ms.Callback("failed", m.mission, m.lane, m.attempt, m.token, error=err, uncharged=m.retry)
    return ms.Callback(m.event, m.mission, m.lane, m.attempt, m.token)


def unreachable(exc: BaseException) -> bool:
    """Whether ``exc`` means the ledger could not be used at all (nothing of the batch was written): a database
    error, an OS error, or a LanectlError with exit 6 (ledger_unavailable, ledger_busy, ledger_full ...)."""
    from lanectl.errors import ExitCode, LanectlError
    from lanectl.ledger import Error as LedgerError

    if isinstance(exc, LanectlError):
        return exc.exit_code == ExitCode.UNAVAILABLE
    return isinstance(exc, (LedgerError, OSError))


def unavailable_answer(why: BaseException | str) -> Answer:
    msg = getattr(why, "message", None) or str(why)
    return 503, {"error": "ledger_unavailable", "message": f"the supervisor cannot reach its ledger ({msg[:300]}); "
                 "retry"}


class Callbacks:
    def __init__(self, shared: Shared, refusals: Refusals) -> None:
        self.shared = shared
        self.refusals = refusals
        self.inbox: queue.Queue[Pending] = queue.Queue()
        self.buckets: dict[str, tuple[float, float]] = {}  # lane -> (tokens, when last taken: the loop's now)
        self.rejected_per_s, self.rejected_burst = REJECTED_PER_S, float(REJECTED_BURST)

    # ------------------------------------------------------------------------------------------ HTTP threads
    def submit(self, msgs: list[CallbackMsg]) -> list[Answer]:
        """Several callbacks of one request, handed over together (so they land in one group commit, in order);
        one verdict each. Called from an HTTP thread: waits for the main loop, at most CALLBACK_WAIT_S."""
        futures: list[Future[Answer] | Answer] = []
        for msg in msgs:
            if msg.lane not in self.shared.lanes:
                futures.append((409, {"error": "unknown_lane", "message": f"no lane {msg.lane!r}"}))
                continue
            fut: Future[Answer] = Future()
            futures.append(fut)
            self.inbox.put(Pending(msg, fut))
        self.shared.wake()
        deadline = time.monotonic() + CALLBACK_WAIT_S
        out = []
        for f in futures:
            if not isinstance(f, Future):
                out.append(f)
                continue
            try:
                out.append(f.result(timeout=max(0.0, deadline - time.monotonic())))
            except TimeoutError:
                out.append((503, {"error": "busy", "message": "the supervisor did not answer in time; retry"}))
        return out

    # ------------------------------------------------------------------------------------------ main loop
    def apply(self, now: float) -> int:
        """Apply every callback that arrived since the last turn in one transaction (group commit).

        The batch is fenced and written by ``missions.apply_callbacks_in`` (one read, grouped writes). Should the
        batch fail for an unexpected reason, each callback is retried alone in its own savepoint, so a bug on one
        cannot fail the others; a broken ledger answers 500 and the lanes retry."""
        batch: list[Pending] = []
        while True:
            try:
                batch.append(self.inbox.get_nowait())
            except queue.Empty:
                break
        if not batch:
            return 0
        led = self.shared.db
        cbs = [as_callback(p.msg) for p in batch]
        lease = self.shared.settings.leases.lease_sec
        answers: list[Answer] = []
        record = self.rejection_recorder(now)
        try:
            with led.transaction() as conn:
                outcomes = ms.apply_callbacks_in(conn, cbs, now=now, lease_sec=lease, record_rejected=record)
            answers = [self.answer(cb, o) for cb, o in zip(cbs, outcomes)]
        except Exception as exc:
            if unreachable(exc):  # nothing was applied: the lanes keep these and send them again
                for p in batch:
                    p.future.set_result(unavailable_answer(exc))
                raise
            log.exception("applying a batch of %d callbacks failed; applying them one by one", len(batch))
            try:
                with led.transaction():
                    answers = [self.apply_one(cb, now) for cb in cbs]
            except Exception:
                log.exception("applying %d callbacks failed", len(batch))
                answers = [(500, {"error": "internal", "message": "the supervisor could not apply it; retry"})] \
                    * len(batch)
        for p, answer in zip(batch, answers):
            p.future.set_result(answer)
        full = self.shared.full
        if full:  # a lane that reports an outcome has a slot free again: no need to wait for its health report
            full.difference_update(cb.lane for cb in cbs if cb.kind in ("succeeded", "failed", "cancelled")
                                   and not cb.uncharged)
        # a lane that could not start a mission (no task or memory left) gets no work until one of its missions
        # ends or its next health report: the attempt went back uncharged, never a tight loop of refusals
        full.update(cb.lane for cb, (status, _) in zip(cbs, answers) if cb.uncharged and status == 200)
        self.shared.dirty = True
        return len(batch)

    def refuse_pending(self, why: str) -> int:
        """While the ledger is unreachable: answer every callback that arrived with 503 at once (the lanes keep
        them and retry, backing off), rather than let each HTTP thread wait CALLBACK_WAIT_S."""
        n = 0
        while True:
            try:
                p = self.inbox.get_nowait()
            except queue.Empty:
                return n
            p.future.set_result(unavailable_answer(why))
            n += 1

    def answer(self, cb: ms.Callback, o: ms.CallbackOutcome) -> Answer:
        counters = self.shared.counters
        counters["callbacks"] += 1
        if o.rejected is not None:
            counters["rejected"] += 1
            err = o.refusal(cb)
            return 409, {"error": err.code, "message": err.message}
        return 200, {"ok": True, "changed": o.changed, "state": o.state}

    def apply_one(self, cb: ms.Callback, now: float) -> Answer:
        """One callback in its own savepoint (the fallback when its batch failed)."""
        try:
            with self.shared.db.transaction() as conn:
                out = ms.apply_callbacks_in(conn, [cb], now=now, lease_sec=self.shared.settings.leases.lease_sec,
                                            record_rejected=self.rejection_recorder(now))
            return self.answer(cb, out[0])
        except Exception:
            log.exception("callback %s for mission=%d attempt=%d lane=%s failed", cb.kind, cb.mission, cb.attempt,
                          cb.lane)
            return 500, {"error": "internal", "message": "the supervisor could not apply it; retry"}

    def rejection_recorder(self, now: float) -> Any:
        """Token bucket per lane, on the loop's clock: may this rejection be written as a callback_rejected
        event? One over the rate is counted (``unrecorded``) instead."""

        def record(cb: ms.Callback) -> bool:
            tokens, at = self.buckets.get(cb.lane, (self.rejected_burst, now))
            tokens = min(self.rejected_burst, tokens + max(0.0, now - at) * self.rejected_per_s)
            ok = tokens >= 1.0
            self.buckets[cb.lane] = (tokens - 1.0 if ok else tokens, now)
            if not ok:
                self.refusals.add("unrecorded")
            return ok

        return record

"""Evidence from the ledger: event queries, windowed metrics, Prometheus exposition and the operator report.

Read-only: nothing here writes to the ledger. Every query is bounded by time through an index (``events_kind``
``(kind, at)``, ``events_lane`` ``(lane, at)``, ``events_at``, the partial ``missions_active``/``attempts_lease``
indexes for what is in flight now), so a metrics window costs what happened in the window, not the size of the
history (docs/benchmarks.md "Evidence").

Definitions (docs/observability.md repeats them for operators), over the window ``[now - window_s, now)``:

- **queue wait**: ``dispatched`` event of attempt 1 minus the mission's ``created_at``, for first dispatches in
  the window (a re-queued attempt's second wait is not a queue wait; it is visible as ``requeued``).
- **run time**: ``finished_at - started_at`` (``dispatched_at`` when the lane never reported ``started``) of the
  attempt that succeeded, for successes in the window.
- **end-to-end**: the terminal event's time minus ``created_at``, for missions that finished in the window.
- **finished** = ``succeeded + failed + dead`` in the window (cancelled and expired are counted apart);
  **throughput** = finished per minute; **failure rate** = ``(failed + dead) / finished``.
- **fallback received rate**: dispatches to a lane as another lane's fallback (data has ``fallback_from``) /
  dispatches to it. Not governance's *fallback lost rate* (work meant for a lane that went to its fallback).
- **restarts**: ``lane_invocation`` events (a new systemd InvocationID); ``operator_restarts``: ``lane_restart``.
- **utilization**: busy seconds of every attempt overlapping the window (from dispatch to finish, or now while it
  runs, clipped to the window) / (lane capacity x window); ``None`` without a capacity.
- **in flight**: missions ``dispatched`` or ``running`` now.

Percentiles use the **nearest-rank** method (no interpolation): the p-th percentile of n sorted values is the
value at rank ``ceil(p/100 * n)``, so it is always an observed value (1..1000 ms gives p50 500, p95 950, p99 990).
"""
from __future__ import annotations

import json
import math
import struct
import time
from bisect import bisect_left, bisect_right
from collections.abc import Iterable, Iterator, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Callable, Final

from lanectl.ledger import reads, rollups
from lanectl.ledger import events as events_mod
from lanectl.ledger.events import EventKind
from lanectl.states import ENDS, HELD, LANE_STATES, RANK

QUANTILES: Final = (50, 95, 99)
"""The percentiles every duration metric reports."""
ROUTINE_KINDS: Final = frozenset({
    EventKind.SUBMITTED, EventKind.SUBMIT_REFUSED, EventKind.DISPATCHED, EventKind.STARTED, EventKind.SUCCEEDED,
    EventKind.FAILED, EventKind.REQUEUED, EventKind.DEAD, EventKind.CANCELLED, EventKind.RETRIED,
    EventKind.EXPIRED, EventKind.CALLBACK_REJECTED, EventKind.WAITING, EventKind.SESSION_CREATED,
    EventKind.SESSION_MOVED, EventKind.SESSION_CHOICE, EventKind.REROUTED,
})
"""Mission-level traffic: counted by metrics, not listed one by one in the report."""
DECISION_KINDS: Final = tuple(k for k in EventKind if k not in ROUTINE_KINDS)
"""Kinds the report lists as decisions (every kind that is not routine, so a new kind shows up by default; a kind
this lanectl does not know, written by a newer one, is listed too)."""
EVIDENCE_WINDOW_S: Final = 3600.0
"""The report's evidence for a decision: the lane's metrics over this long before it."""
FOLLOW_POLL_S: Final = 0.25
FOLLOW_MAX_POLL_S: Final = 2.0
"""``follow`` polls every FOLLOW_POLL_S while events arrive and backs off to at most FOLLOW_MAX_POLL_S when idle."""
EVENT_COLUMNS: Final = events_mod.COLUMNS

Ledgerish = Any  # a lanectl.ledger.Ledger, a path (opened read-only), or the supervisor's connection (reads.Source)


# ------------------------------------------------------------------------------------------------ basics


def rfc3339(ts: float | None) -> str | None:
    """UTC, millisecond precision, ``Z`` suffix."""
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def percentile(values: Sequence[float], p: float, *, presorted: bool = False) -> float | None:
    """Nearest-rank percentile (0 < p <= 100): the value at rank ceil(p/100 * n) of the sorted values."""
    if not values:
        return None
    if not 0 < p <= 100:
        raise ValueError(f"percentile {p} is not in (0, 100]")
    data = values if presorted else sorted(values)
    rank = max(1, math.ceil(p / 100 * len(data) - 1e-9))  # 1e-9: 95/100*1000 must not round up to 951
    return float(data[rank - 1])


def summary(values: list[float]) -> dict[str, Any]:
    """count, p50, p95, p99 (seconds; None when empty)."""
    values.sort()
    out: dict[str, Any] = {"count": len(values)}
    for q in QUANTILES:
        v = percentile(values, q, presorted=True)
        # differences of epoch floats carry ~1e-7 s of noise: microseconds are what the clocks give anyway
        out[f"p{q}"] = None if v is None else round(v, 6)
    return out


# ------------------------------------------------------------------------------------------------ events


def _row(row: Sequence[Any]) -> dict[str, Any]:
    ev = dict(zip(EVENT_COLUMNS, row))
    ev["ts"] = ev["at"]
    ev["at"] = rfc3339(ev["at"])
    ev["data"] = json.loads(ev["data"] or "{}")
    return ev


def events(ledger: Ledgerish, *, lane: str | None = None, mission: int | None = None, session: str | None = None,
           kind: str | Iterable[str] | None = None, since: float | None = None, until: float | None = None,
           limit: int = 1000, after_id: int = 0, latest: bool = False, host: str | None = None) -> list[dict[str, Any]]:
    """Events matching every filter, oldest first (``at`` RFC 3339, ``ts`` epoch seconds, ``data`` a dict,
    ``host``: ``with_host``).

    ``latest``: the last ``limit`` matches instead of the first (still returned oldest first). The query is the
    ledger's one event-query builder (``lanectl.ledger.events.select``), which says which index each filter uses.
    ``host``: the events of that host's lanes and about the host itself.
    """
    from lanectl.ledger import fleetview

    src, own = reads.open_source(ledger)
    try:
        rows = reads.events(src, lane=lane, mission=mission, session=session, kind=kind, since=since, until=until,
                            after_id=after_id, limit=limit, latest=latest, host=host)
        owners = fleetview.lane_hosts(src)
    finally:
        if own:
            reads.close(src)
    return [with_host(_row(r), owners) for r in rows]


def with_host(ev: dict[str, Any], owners: Mapping[str, str]) -> dict[str, Any]:
    """The event's ``host``: for an event of a lane, the host that owns the lane now (``owners``); for one
    without a lane (host_started, host_dead, ...), the host it is about (``data.host``); else None."""
    host = owners.get(ev["lane"]) if ev["lane"] is not None else ev["data"].get("host")
    ev["host"] = host if isinstance(host, str) else None
    return ev


def last_id(ledger: Ledgerish) -> int:
    src, own = reads.open_source(ledger)
    try:
        return reads.last_event_id(src)
    finally:
        if own:
            reads.close(src)


def follow(ledger: Ledgerish, *, after_id: int | None = None, lane: str | None = None, mission: int | None = None,
           session: str | None = None, kind: str | Iterable[str] | None = None, poll_s: float = FOLLOW_POLL_S,
           max_poll_s: float = FOLLOW_MAX_POLL_S, batch: int = 1000, sleep: Callable[[float], None] = time.sleep,
           stop: Callable[[], bool] = lambda: False, host: str | None = None) -> Iterator[dict[str, Any]]:
    """Yield new matching events as they are appended (``after_id`` None: from now on), polling by id.

    Each poll reads ``id > last`` through the rowid alone (``reads.poll_events``): the new tail is small, while a
    lane or kind index would walk that lane's whole history on every poll. The sleep doubles while nothing
    arrives, up to ``max_poll_s``, and drops back to ``poll_s`` when something does. ``stop()`` ends it.
    """
    src, own = reads.open_source(ledger)
    kinds = [kind] if isinstance(kind, str) else sorted(set(kind)) if kind else None
    try:
        last = reads.last_event_id(src) if after_id is None else after_id
        wait = poll_s
        while not stop():
            rows = reads.poll_events(src, last, lane=lane, mission=mission, session=session, kind=kinds,
                                     limit=batch, host=host)
            if rows:
                from lanectl.ledger import fleetview

                owners = fleetview.lane_hosts(src)  # per batch: a lane may have moved meanwhile
                for r in rows:
                    yield with_host(_row(r), owners)
                last = rows[-1][0]
                wait = poll_s
                if len(rows) == batch:
                    continue
            else:
                # filtered polls may match nothing while others are appended: move the cursor on anyway
                last = max(last, reads.last_event_id(src))
                wait = min(max_poll_s, wait * 2) if wait < max_poll_s else max_poll_s
            sleep(wait if not rows else poll_s)
    finally:
        if own:
            reads.close(src)


# ------------------------------------------------------------------------------------------------ metrics


class _Acc:
    """Raw figures of one (lane, class) group, or of a roll-up of several."""

    __slots__ = ("queue_wait", "run_time", "end_to_end", "succeeded", "failed", "dead", "cancelled", "expired",
                 "requeued", "dispatched", "fallback", "busy_s")

    def __init__(self) -> None:
        self.queue_wait: list[float] = []
        self.run_time: list[float] = []
        self.end_to_end: list[float] = []
        self.succeeded = self.failed = self.dead = self.cancelled = self.expired = self.requeued = 0
        self.dispatched = self.fallback = 0
        self.busy_s = 0.0

    def merge(self, other: _Acc) -> None:
        for name in self.__slots__:
            setattr(self, name, getattr(self, name) + getattr(other, name))  # lists concatenate, numbers add

    def render(self, window_s: float) -> dict[str, Any]:
        finished = self.succeeded + self.failed + self.dead
        # summary() sorts in place: a group's lists are sorted once, and a roll-up's are concatenations of
        # sorted runs, which timsort merges in linear time
        return {
            "queue_wait_s": summary(self.queue_wait),
            "run_time_s": summary(self.run_time),
            "end_to_end_s": summary(self.end_to_end),
            "finished": finished, "succeeded": self.succeeded, "failed": self.failed, "dead": self.dead,
            "cancelled": self.cancelled, "expired": self.expired, "requeued": self.requeued,
            "throughput_per_min": finished / (window_s / 60.0) if window_s > 0 else None,
            "failure_rate": (self.failed + self.dead) / finished if finished else None,
            "dispatched": self.dispatched, "fallback_dispatches": self.fallback,
            "fallback_received_rate": self.fallback / self.dispatched if self.dispatched else None,
            "busy_s": round(self.busy_s, 6),
        }


def _capacities(fleet: Any = None, capacity: Mapping[str, int] | None = None) -> dict[str, int]:
    if capacity is not None:
        return dict(capacity)
    if fleet is not None:
        return {name: int(lane.capacity) for name, lane in fleet.lanes.items()}
    return {}


def metrics_conn(conn: reads.Source, *, window_s: float, now: float, lane: str | None = None,
                 fleet: Any = None, capacity: Mapping[str, int] | None = None) -> dict[str, Any]:
    """The metrics of the window ``[now - window_s, now)`` per (lane, class), per lane, per class and in total.

    ``capacity`` (lane -> slots) or ``fleet`` (a LaneSet) gives utilization; without either it is ``None``.
    """
    t0, t1 = now - window_s, now
    groups: dict[tuple[str, str], _Acc] = {}

    # 1. dispatches in the window: queue wait (attempt 1) and fallback received rate. The loops below run once per
    # mission in the window (tens of thousands an hour), so they are kept flat: no calls, no attribute lookups.
    for ln, cls, n, wait, fb in reads.dispatches(conn, t0, t1, lane):
        a = groups.get((ln, cls))
        if a is None:
            a = groups[(ln, cls)] = _Acc()
        a.dispatched += 1
        if fb is not None:
            a.fallback += 1
        if n == 1:
            a.queue_wait.append(wait)

    # 2. ends in the window: outcomes, run time, end-to-end, and the busy time of every attempt that ended in it
    # (an attempt still running is counted in 3; one that started in the window and ended after it, in a window
    # that ends in the past, is not seen: documented)
    for kind, at, ln, cls, e2e, dispatched, started in reads.ends(conn, ENDS, t0, t1, lane):
        a = groups.get((ln, cls))
        if a is None:
            a = groups[(ln, cls)] = _Acc()
        if kind == "succeeded":
            a.succeeded += 1
            a.end_to_end.append(e2e)
            if dispatched is not None:
                a.run_time.append(at - (dispatched if started is None else started))
        elif kind == "requeued":
            a.requeued += 1
        elif kind == "failed":
            a.failed += 1
            a.end_to_end.append(e2e)
        elif kind == "dead":
            a.dead += 1
            a.end_to_end.append(e2e)
        elif kind == "cancelled":
            a.cancelled += 1
        else:
            a.expired += 1
        if dispatched is not None:
            a.busy_s += at - (dispatched if dispatched > t0 else t0)

    # 3. attempts in flight now (the partial attempts_lease index), busy until the end of the window
    in_flight: dict[tuple[str, str], int] = {}
    for (ln, cls), (n, busy) in _in_flight(conn, t0, t1, lane).items():
        in_flight[(ln, cls)] = n
        a = groups.get((ln, cls))
        if a is None:
            a = groups[(ln, cls)] = _Acc()
        a.busy_s += busy

    out = _assemble(groups, in_flight, _restarts(conn, t0, t1, lane), _capacities(fleet, capacity), window_s, now,
                    lane)
    out["now_state"] = state_now(conn, now=now, fleet=fleet, lane=lane)
    with_hosts(conn, out, now)
    return out


def lanes_of_fleet(ledger: Ledgerish) -> set[str]:
    """Every lane some host has claimed in the ledger (another host's lane may be named by ``metrics --lane``)."""
    from lanectl.ledger import fleetview

    src, own = reads.open_source(ledger)
    try:
        return set(fleetview.lane_hosts(src))
    finally:
        if own:
            reads.close(src)


def with_hosts(conn: reads.Source, m: dict[str, Any], now: float) -> None:
    """Several hosts on one ledger (issue 13): each lane's row (per lane, per lane and class, now) gets its
    ``host`` (the owner the ledger records; None: no host claimed it), and ``hosts`` lists every host not
    forgotten (lanectl.ledger.fleetview.hosts, judged at ``now``: the ledger's clock, as the supervisor's and
    ``lanectl metrics`` pass it) with the window's figures of its
    lanes: ``finished``, ``failed`` (failed + dead), ``failure_rate``, ``dispatched``, ``restarts``."""
    from lanectl.ledger import fleetview

    owners = fleetview.lane_hosts(conn)
    for rows in (m["groups"], m["lanes"], m["now_state"]["lanes"]):
        for r in rows:
            r["host"] = owners.get(r["lane"])
    hosts = []
    for h in fleetview.hosts(conn, now):
        if h["status"] == "forgotten":
            continue
        mine = [r for r in m["lanes"] if r["host"] == h["name"]]
        finished = sum(r["finished"] for r in mine)
        failed = sum(r["failed"] + r["dead"] for r in mine)
        hosts.append({**h, "finished": finished, "failed": failed,
                      "failure_rate": failed / finished if finished else None,
                      "dispatched": sum(r["dispatched"] for r in mine), "restarts": sum(r["restarts"] for r in mine)})
    m["hosts"] = hosts


def _in_flight(conn: reads.Source, t0: float, t1: float,
               lane: str | None) -> dict[tuple[str, str], tuple[int, float]]:
    """(lane, class) -> (attempts dispatched or running now, their busy seconds in the window)."""
    out: dict[tuple[str, str], tuple[int, float]] = {}
    for ln, cls, dispatched in reads.attempts_in_flight(conn, lane):
        n, busy = out.get((ln, cls), (0, 0.0))
        out[(ln, cls)] = (n + 1, busy + max(0.0, t1 - max(dispatched, t0)))
    return out


def _restarts(conn: reads.Source, t0: float, t1: float, lane: str | None) -> dict[str, dict[str, int]]:
    restarts: dict[str, dict[str, int]] = {}
    for ln, kind, count in reads.restart_counts(conn, t0, t1, lane):
        restarts.setdefault(ln or "-", {})[kind] = count
    return restarts




def state_now(conn: reads.Source, *, now: float, fleet: Any = None, lane: str | None = None) -> dict[str, Any]:
    """What holds *now*, not over a window: each lane's dispatch state and health as the supervisor last recorded
    them in the ledger, whether lanes.d enables it (with ``fleet``), and per class the queue depth and the age of
    the oldest queued mission (what ``lanectl probe`` judges for interactive work).

    Cheap at any size: the lanes table, the trigger-kept ``queue_depth`` rows and, per class, a range of the
    partial queue index (what is queued now, never the history).
    """
    lanes: dict[str, dict[str, Any]] = {}
    for name, state, healthy in reads.lane_health(conn):
        lanes[name] = {"lane": name, "state": state, "healthy": bool(healthy), "enabled": None, "automatic": False}
    if any(r["state"] in HELD for r in lanes.values()):
        from lanectl.probe import lane_views  # who drained it: the probe's reading, not a second one

        for name, view in lane_views(conn).items():
            if name in lanes:
                lanes[name]["automatic"] = bool(view.get("automatic"))
    if fleet is not None:
        for name, cfg in fleet.lanes.items():
            row = lanes.setdefault(name, {"lane": name, "state": None, "healthy": None, "enabled": None,
                                          "automatic": False})
            row["enabled"] = bool(cfg.enabled)
    if lane is not None:
        lanes = {k: v for k, v in lanes.items() if k == lane}
    depth = reads.queue_depth(conn)
    classes = []
    for cls, rank in RANK.items():
        oldest = reads.oldest_queued(conn, rank)
        classes.append({"class": cls, "queued": int(depth.get(rank, 0)),
                        "oldest_wait_s": round(max(0.0, now - oldest), 6) if oldest is not None else 0.0})
    return {"lanes": [lanes[k] for k in sorted(lanes)], "classes": classes}


def _assemble(groups: dict[tuple[str, str], _Acc], in_flight: dict[tuple[str, str], int],
              restarts: dict[str, dict[str, int]], capacity: dict[str, int], window_s: float, now: float,
              lane: str | None) -> dict[str, Any]:
    for key in in_flight:
        groups.setdefault(key, _Acc())
    lanes = sorted({k[0] for k in groups} | set(restarts) | ({lane} if lane else set())
                   | (set(capacity) if lane is None else set()))
    by_lane: dict[str, _Acc] = {ln: _Acc() for ln in lanes}
    by_class: dict[str, _Acc] = {}
    total = _Acc()
    rows = []
    for (ln, cls), a in sorted(groups.items()):  # render (and sort) each group before it is merged
        rows.append({"lane": ln, "class": cls, **a.render(window_s), "in_flight": in_flight.get((ln, cls), 0)})
        by_lane[ln].merge(a)
        by_class.setdefault(cls, _Acc()).merge(a)
        total.merge(a)
    lane_rows = []
    for ln in lanes:
        r = by_lane[ln].render(window_s)
        cap = capacity.get(ln)
        r.update({
            "lane": ln,
            "in_flight": sum(v for (l2, _), v in in_flight.items() if l2 == ln),
            "restarts": restarts.get(ln, {}).get("lane_invocation", 0),
            "operator_restarts": restarts.get(ln, {}).get("lane_restart", 0),
            "capacity": cap,
            "utilization": r["busy_s"] / (cap * window_s) if cap and window_s > 0 else None,
        })
        lane_rows.append(r)
    class_rows = [{"class": c, **a.render(window_s),
                   "in_flight": sum(v for (_, c2), v in in_flight.items() if c2 == c)}
                  for c, a in sorted(by_class.items())]
    tot = total.render(window_s)
    tot["in_flight"] = sum(in_flight.values())
    tot["restarts"] = sum(r.get("lane_invocation", 0) for r in restarts.values())
    return {"window_s": window_s, "now": rfc3339(now), "since": rfc3339(now - window_s), "lane": lane,
            "quantile_method": "nearest-rank", "groups": rows, "lanes": lane_rows, "classes": class_rows,
            "total": tot}


def metrics(ledger: Ledgerish, window_s: float, now: float | None = None, lane: str | None = None, *,
            fleet: Any = None, capacity: Mapping[str, int] | None = None) -> dict[str, Any]:
    """See ``metrics_conn``; ``ledger`` is a Ledger, a connection or a path (opened read-only)."""
    src, own = reads.open_source(ledger)
    try:
        return metrics_conn(src, window_s=window_s, now=time.time() if now is None else now, lane=lane,
                            fleet=fleet, capacity=capacity)
    finally:
        if own:
            reads.close(src)


# ------------------------------------------------------------------------------------------------ report figures

_SIGN: Final = 1 << 63


def _order_key(x: float) -> int:
    """An integer that sorts like the float (IEEE 754 bits, sign-adjusted)."""
    b = struct.unpack("<Q", struct.pack("<d", x))[0]
    return b ^ 0xFFFFFFFFFFFFFFFF if b & _SIGN else b | _SIGN


def _from_key(k: int) -> float:
    b = k ^ _SIGN if k & _SIGN else k ^ 0xFFFFFFFFFFFFFFFF
    return struct.unpack("<d", struct.pack("<Q", b))[0]


class _Runs:
    """The samples of a group as the sorted runs they were stored in (roll-ups, raw parts), never merged: the
    k-th smallest is found by bisecting the value range and counting each run with ``bisect``."""

    __slots__ = ("runs", "n")

    def __init__(self) -> None:
        self.runs: list[Sequence[float]] = []
        self.n = 0

    def add(self, run: Sequence[float]) -> None:
        if run:
            self.runs.append(run)
            self.n += len(run)

    def extend(self, other: _Runs) -> None:
        for r in other.runs:
            self.add(r)

    def percentile(self, p: float) -> float | None:
        """The nearest-rank percentile, as ``percentile`` gives it over all the samples (exactly the same value)."""
        if not self.n:
            return None
        k = max(1, math.ceil(p / 100 * self.n - 1e-9))
        lo = _order_key(min(r[0] for r in self.runs))
        hi = _order_key(max(r[-1] for r in self.runs))
        while lo < hi:  # the smallest value with at least k samples at or below it
            mid = (lo + hi) // 2
            v = _from_key(mid)
            if sum(bisect_right(r, v) for r in self.runs) >= k:
                hi = mid
            else:
                lo = mid + 1
        v = _from_key(lo)
        for r in self.runs:  # the stored sample itself (-0.0 and 0.0 compare equal but print differently)
            i = bisect_left(r, v)
            if i < len(r) and r[i] == v:
                return float(r[i])
        return v


def report_figures(conn: reads.Source, t0: float, t1: float, *, lane: str | None = None,
                   capacity: Mapping[str, int] | None = None, fast: bool = True) -> dict[str, Any]:
    """What the report prints about a window: per lane and in total, finished, failure and fallback received rates, p95 of
    queue wait, run time and end-to-end, restarts, utilization, in flight; and the traffic counts per kind.

    ``fast`` reads the roll-ups the supervisor maintains (lanectl/ledger/rollups.py) for the buckets the window
    covers wholly and raw events for the rest; without it, every event of the window is read (``metrics_conn``).
    Both give the same figures: the samples are the same floats and the percentiles the same nearest-rank picks
    (busy time, a sum, may differ in its last bits)."""
    cap = dict(capacity or {})
    window_s = t1 - t0
    flight = _in_flight(conn, t0, t1, lane)
    restarts = _restarts(conn, t0, t1, lane)
    if not fast:
        m = metrics_conn(conn, window_s=window_s, now=t1, lane=lane, capacity=cap)
        rows = {r["lane"]: r for r in m["lanes"]}
        traffic = reads.traffic_counts(conn, t0, t1) if lane is None else {}

        def pick(r: Mapping[str, Any]) -> dict[str, Any]:
            return {k: r.get(k) for k in ("finished", "failure_rate", "fallback_received_rate", "dispatched", "in_flight",
                                          "restarts", "utilization")} | {
                "queue_wait_p95": r["queue_wait_s"]["p95"], "run_time_p95": r["run_time_s"]["p95"],
                "end_to_end_p95": r["end_to_end_s"]["p95"]}

        return {"lanes": {ln: pick(r) | {"lane": ln} for ln, r in rows.items()}, "total": pick(m["total"]),
                "traffic": traffic}
    w = reads.rollup_window(conn, t0, t1, lane)
    groups: dict[str, dict[str, Any]] = {}

    def acc(key: str) -> dict[str, Any]:
        if key not in groups:
            groups[key] = {"counts": dict.fromkeys(("succeeded", "failed", "dead", "dispatched", "fallback"), 0),
                           "busy": 0.0, "in_flight": 0, **{k: _Runs() for k in rollups.SAMPLES}}
        return groups[key]

    for (ln, _cls), parts in w.groups.items():
        for g in (acc(ln), acc("*")):
            for a, _start in parts:
                for k in g["counts"]:
                    g["counts"][k] += getattr(a, k)
                for k in rollups.SAMPLES:
                    g[k].add(getattr(a, k))
            g["busy"] += rollups.busy(parts, t0)
    for (ln, _cls), (n, busy) in flight.items():
        for g in (acc(ln), acc("*")):
            g["in_flight"] += n
            g["busy"] += busy
    lanes = sorted({k for k in groups if k != "*"} | set(restarts) | ({lane} if lane else set())
                   | (set(cap) if lane is None else set()))

    def row(g: dict[str, Any] | None, n_restarts: int, c: int | None) -> dict[str, Any]:
        g = g or acc("\0empty")
        n = g["counts"]
        finished = n["succeeded"] + n["failed"] + n["dead"]
        busy = round(g["busy"], 6)
        return {"finished": finished, "dispatched": n["dispatched"], "in_flight": g["in_flight"],
                "failure_rate": (n["failed"] + n["dead"]) / finished if finished else None,
                "fallback_received_rate": n["fallback"] / n["dispatched"] if n["dispatched"] else None,
                "restarts": n_restarts,
                "utilization": busy / (c * window_s) if c and window_s > 0 else None,
                **{f"{k}_p95": (None if (v := g[k].percentile(95)) is None else round(v, 6))
                   for k in rollups.SAMPLES}}

    out_lanes = {ln: row(groups.get(ln), restarts.get(ln, {}).get("lane_invocation", 0), cap.get(ln)) | {"lane": ln}
                 for ln in lanes}
    total = row(groups.get("*"), sum(r.get("lane_invocation", 0) for r in restarts.values()), None)
    total["utilization"] = None
    return {"lanes": out_lanes, "total": total, "traffic": w.traffic if lane is None else {}}


# ------------------------------------------------------------------------------------------------ Prometheus

_DURATIONS: Final = (("queue_wait_s", "lanectl_queue_wait_seconds", "Time from submit to the first dispatch."),
                     ("run_time_s", "lanectl_run_time_seconds", "Run time of the attempt that succeeded."),
                     ("end_to_end_s", "lanectl_end_to_end_seconds", "Time from submit to the terminal outcome."))
_GROUP_GAUGES: Final = (
    ("finished", "lanectl_finished", "Missions that succeeded, failed or died in the window."),
    ("succeeded", "lanectl_succeeded", "Missions that succeeded in the window."),
    ("failed", "lanectl_failed", "Missions that failed (not retried) in the window."),
    ("dead", "lanectl_dead", "Missions that ran out of attempts in the window."),
    ("requeued", "lanectl_requeued", "Attempts lost and re-queued in the window."),
    ("dispatched", "lanectl_dispatched", "Dispatches in the window."),
    ("throughput_per_min", "lanectl_throughput_per_minute", "Finished missions per minute over the window."),
    ("failure_rate", "lanectl_failure_rate", "(failed + dead) / finished over the window."),
    ("fallback_received_rate", "lanectl_fallback_received_rate",
     "Dispatches to this lane as another lane's fallback / dispatches to it over the window."),
    ("in_flight", "lanectl_in_flight", "Missions dispatched or running now."),
)
_LANE_GAUGES: Final = (
    ("restarts", "lanectl_lane_restarts", "Lane restarts (new systemd InvocationID) in the window."),
    ("operator_restarts", "lanectl_lane_operator_restarts", "Restarts by lanectl restart in the window."),
    ("utilization", "lanectl_lane_utilization", "Busy attempt-seconds / (capacity x window)."),
    ("capacity", "lanectl_lane_capacity", "Missions the lane runs at once."),
    ("in_flight", "lanectl_lane_in_flight", "Missions dispatched to or running on the lane now."),
)


def _label_value(v: str) -> str:
    return v.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(**kv: str | None) -> str:
    """A label set; a label whose value is None is left out (a lane no host has claimed has no ``host``)."""
    return "{" + ",".join(f'{k}="{_label_value(str(v))}"' for k, v in kv.items() if v is not None) + "}"


def _num(v: float) -> str:
    if isinstance(v, bool):
        return "1" if v else "0"
    if isinstance(v, int):
        return str(v)
    return repr(float(v)) if math.isfinite(v) else ("+Inf" if v > 0 else "-Inf" if v < 0 else "NaN")


def prometheus_text(m: Mapping[str, Any], *, generated: float | None = None) -> str:
    """The metrics in the Prometheus text exposition format (0.0.4): labels lane and class (and quantile); every
    series of a lane has its ``host`` too once a host has claimed the lane, and the ``lanectl_host_*`` gauges one
    series per host (issue 13).

    Every series describes the window (``lanectl_window_seconds``) and is recomputed from the ledger each time,
    so the counts are gauges, not counters. Durations are summaries with quantiles and ``_count`` but no
    ``_sum``. A metric with no value (no sample, no capacity) is left out rather than written as NaN.
    """
    out: list[str] = []

    def head(name: str, help_: str, kind: str = "gauge") -> None:
        out.append(f"# HELP {name} {help_}")
        out.append(f"# TYPE {name} {kind}")

    head("lanectl_window_seconds", "Length of the window the other lanectl_* series cover.")
    out.append(f"lanectl_window_seconds {_num(float(m['window_s']))}")
    for key, name, help_ in _DURATIONS:
        head(name, help_ + " Nearest-rank quantiles over the window.", "summary")
        for g in m["groups"]:
            s = g[key]
            for q in QUANTILES:
                if s[f"p{q}"] is not None:
                    labels = _labels(lane=g['lane'], host=g.get('host'), **{'class': g['class']},
                                     quantile=str(q / 100))
                    out.append(f"{name}{labels} {_num(s[f'p{q}'])}")
            out.append(f"{name}_count{_labels(lane=g['lane'], host=g.get('host'), **{'class': g['class']})} "
                       f"{s['count']}")
    for key, name, help_ in _GROUP_GAUGES:
        head(name, help_)
        for g in m["groups"]:
            if g[key] is not None:
                out.append(f"{name}{_labels(lane=g['lane'], host=g.get('host'), **{'class': g['class']})} "
                           f"{_num(g[key])}")
    for key, name, help_ in _LANE_GAUGES:
        head(name, help_)
        for r in m["lanes"]:
            if r[key] is not None:
                out.append(f"{name}{_labels(lane=r['lane'], host=r.get('host'))} {_num(r[key])}")
    state = m.get("now_state") or {"lanes": [], "classes": []}
    head("lanectl_lane_healthy", "1 when the supervisor last found the lane's unit running and its health endpoint "
         "answering as the lane, else 0.")
    for r in state["lanes"]:
        if r["healthy"] is not None:
            out.append(f"lanectl_lane_healthy{_labels(lane=r['lane'], host=r.get('host'))} {_num(r['healthy'])}")
    head("lanectl_lane_state", "The lane's dispatch state in the ledger: 1 for the current one, 0 for the others.")
    for r in state["lanes"]:
        if r["state"] is not None:
            for st in LANE_STATES:
                out.append(f"lanectl_lane_state{_labels(lane=r['lane'], host=r.get('host'), state=st)} "
                           f"{_num(st == r['state'])}")
    head("lanectl_lane_drained_by_lanectl", "1 while lanectl itself (a rollback) holds the lane draining or drained: "
         "an alarm until an operator undrains it or takes the drain over ('lanectl drain'), as lanectl probe says.")
    for r in state["lanes"]:
        if r["state"] is not None:
            out.append(f"lanectl_lane_drained_by_lanectl{_labels(lane=r['lane'], host=r.get('host'))} "
                       f"{_num(bool(r.get('automatic')))}")
    head("lanectl_lane_enabled", "1 when lanes.d enables the lane (it should run), 0 when it is disabled there.")
    for r in state["lanes"]:
        if r["enabled"] is not None:
            out.append(f"lanectl_lane_enabled{_labels(lane=r['lane'], host=r.get('host'))} {_num(r['enabled'])}")
    hosts = m.get("hosts") or []
    head("lanectl_host_up", "1 while the host holds its lease in the ledger (up, or fenced: running what it holds, "
         "claiming nothing), else 0 (lease run out, stopped, dead).")
    for h in hosts:
        out.append(f"lanectl_host_up{_labels(host=h['name'])} {_num(h['status'] in ('up', 'fenced'))}")
    head("lanectl_host_fenced", "1 while the host's lease runs but was not renewed for lease - margin: its "
         "supervisor claims no new work (it cannot reach the ledger, or it is frozen).")
    for h in hosts:
        out.append(f"lanectl_host_fenced{_labels(host=h['name'])} {_num(h['status'] == 'fenced')}")
    head("lanectl_host_expired", "1 while the host is recorded up with its lease run out: a live host declares it "
         "dead and re-queues its lanes' work within a second; lanectl probe is CRITICAL while work is in flight on "
         "it.")
    for h in hosts:
        out.append(f"lanectl_host_expired{_labels(host=h['name'])} {_num(h['status'] == 'expired')}")
    head("lanectl_host_lease_left_seconds", "Seconds until the host's lease runs out (negative: since it ran out), "
         "on the ledger's clock.")
    for h in hosts:
        out.append(f"lanectl_host_lease_left_seconds{_labels(host=h['name'])} {_num(float(h['lease_left_s']))}")
    head("lanectl_host_in_flight", "Missions dispatched to or running on the host's lanes now.")
    for h in hosts:
        out.append(f"lanectl_host_in_flight{_labels(host=h['name'])} {_num(h['in_flight'])}")
    head("lanectl_queued", "Missions queued now.")
    for c in state["classes"]:
        out.append(f"lanectl_queued{_labels(**{'class': c['class']})} {_num(c['queued'])}")
    head("lanectl_queue_oldest_wait_seconds", "Age of the oldest queued mission now (0 when none is queued).")
    for c in state["classes"]:
        out.append(f"lanectl_queue_oldest_wait_seconds{_labels(**{'class': c['class']})} {_num(c['oldest_wait_s'])}")
    if generated is not None:
        head("lanectl_metrics_generated_timestamp_seconds", "When these metrics were computed (epoch seconds).")
        out.append(f"lanectl_metrics_generated_timestamp_seconds {_num(float(generated))}")
    return "\n".join(out) + "\n"


def write_textfile(path: str | Path, text: str) -> None:
    """Atomically (temp file + rename), mode 0644, for node_exporter's textfile collector (``*.prom``)."""
    from lanectl.fsutil import atomic_write

    atomic_write(Path(path), text, 0o644)


# ------------------------------------------------------------------------------------------------ report


def _md(text: Any) -> str:
    """One Markdown table cell."""
    s = "" if text is None else str(text)
    return s.replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ").replace("`", "'") or "-"


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{v:.1%}"


def _secs(v: float | None) -> str:
    return "-" if v is None else f"{v:.3f}s" if v < 10 else f"{v:.0f}s"


def _evidence(conn: reads.Source, lane: str | None, at: float,
              cache: dict[tuple[str | None, float], dict[str, Any]], fast: bool = True) -> str:
    key = (lane, at)
    if key not in cache:
        f = report_figures(conn, at - EVIDENCE_WINDOW_S, at, lane=lane, fast=fast)
        cache[key] = (f["lanes"].get(lane) if lane else f["total"]) or {}
    r = cache[key]
    if not r or not (r.get("finished") or r.get("dispatched")):
        return "no traffic in the hour before"
    return (f"failure {_pct(r['failure_rate'])} of {r['finished']}, p95 queue wait {_secs(r['queue_wait_p95'])}"
            f", fallback received {_pct(r['fallback_received_rate'])}, restarts {r.get('restarts', 0)}")


_OWN_FIELDS: Final = ("actor", "reason")


def _details(ev: Mapping[str, Any]) -> str:
    data = {k: v for k, v in ev["data"].items() if k not in _OWN_FIELDS}
    return ", ".join(f"{k}={json.dumps(v, sort_keys=True, separators=(',', ':'))}" for k, v in sorted(data.items()))


def decisions(conn: reads.Source, since: float, until: float) -> list[dict[str, Any]]:
    """The decision events in ``[since, until)``, oldest first: DECISION_KINDS plus kinds this lanectl does not
    know. A ``lane_state`` event written together with a drain or undrain is left out (that row says it)."""
    known = {str(k) for k in EventKind}
    rows = reads.events_of_kinds(conn, [str(k) for k in DECISION_KINDS], since, until)
    # kinds from a newer lanectl: a distinct-kind walk of events_kind (one seek per kind), then their rows
    other = [k for k in reads.event_kinds(conn) if k not in known]
    if other:
        rows += reads.events_of_kinds(conn, other, since, until)
    out = [_row(r) for r in sorted(rows)]
    return [ev for ev in out if not (ev["kind"] == "lane_state" and ev["data"].get("reason") in ("drain", "undrain"))]


def report(ledger: Ledgerish, since: float, until: float | None = None, now: float | None = None, *,
           fleet: Any = None, capacity: Mapping[str, int] | None = None, fast: bool = True) -> str:
    """A Markdown status and decision log for ``[since, until)``: the lanes now, the period's figures per lane,
    and every decision with who, when, why and the evidence at the time (the lane's metrics over the hour
    before it; fleet-wide for a decision without a lane). ``fast``: from the roll-ups (``report_figures``)."""
    now = time.time() if now is None else now
    until = now if until is None else until
    src, own = reads.open_source(ledger)
    try:
        return _report(src, since, until, now, _capacities(fleet, capacity), fast)
    finally:
        if own:
            reads.close(src)


def _report(conn: reads.Source, since: float, until: float, now: float, capacity: dict[str, int],
            fast: bool = True) -> str:
    lines = [f"# lanectl report {rfc3339(since)} to {rfc3339(until)}", "",
             f"Generated {rfc3339(now)} from the ledger's events. Times are UTC (RFC 3339).", ""]
    states = {name: (state, bool(healthy)) for name, state, healthy in reads.lane_health(conn)}
    period = report_figures(conn, since, until, capacity=capacity, fast=fast)
    tot = period["total"]
    lines += ["## Status", "",
              f"Over the period: {tot['finished']} finished, failure rate {_pct(tot['failure_rate'])}, p95 queue "
              f"wait {_secs(tot['queue_wait_p95'])}, p95 end-to-end {_secs(tot['end_to_end_p95'])}, "
              f"{tot['in_flight']} in flight now.", "",
              "| lane | host | state | healthy | in flight | finished | failure rate | fallback received "
              "| p95 queue wait | p95 run time | restarts | utilization |",
              "| --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    from lanectl.ledger import fleetview

    owners = fleetview.lane_hosts(conn)
    for r in period["lanes"].values():
        state, healthy = states.get(r["lane"], ("active", True))
        lines.append(f"| {_md(r['lane'])} | {_md(owners.get(r['lane']))} | {state} | {'yes' if healthy else 'no'} | "
                     f"{r['in_flight']} | "
                     f"{r['finished']} | {_pct(r['failure_rate'])} | {_pct(r['fallback_received_rate'])} | "
                     f"{_secs(r['queue_wait_p95'])} | {_secs(r['run_time_p95'])} | {r['restarts']} | "
                     f"{_pct(r['utilization'])} |")
    hosts = [h for h in fleetview.hosts(conn, now) if h["status"] != "forgotten"]
    if len(hosts) > 1:  # several hosts on one ledger: each one's state now
        lines += ["", "## Hosts", "", "| host | status | heartbeat | lease left | lanes | in flight |",
                  "| --- | --- | --- | ---: | --- | ---: |"]
        for h in hosts:
            lines.append(f"| {_md(h['name'])} | {h['status']} | {rfc3339(h['heartbeat_at'])} | "
                         f"{h['lease_left_s']:.1f}s | {_md(', '.join(h['lanes']))} | {h['in_flight']} |")
    evs = decisions(conn, since, until)
    lines += ["", "## Decisions", ""]
    if not evs:
        lines.append("No decisions recorded in the period.")
    else:
        lines += ["| when | what | lane | who | why | details | evidence (hour before) |",
                  "| --- | --- | --- | --- | --- | --- | --- |"]
        cache: dict[tuple[str | None, float], dict[str, Any]] = {}
        for ev in evs:
            lines.append(f"| {ev['at']} | {_md(ev['kind'])} | {_md(ev['lane'])} | {_md(ev['data'].get('actor'))} | "
                         f"{_md(ev['data'].get('reason'))} | {_md(_details(ev))} | "
                         f"{_md(_evidence(conn, ev['lane'], ev['ts'], cache, fast))} |")
    counts = period["traffic"]
    lines += ["", "## Traffic", "",
              ", ".join(f"{k} {counts.get(k, 0)}" for k in ("submitted", *ENDS, "callback_rejected")) + ".", ""]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ docs


def event_kind_table() -> str:
    """The Markdown table of event kinds in docs/observability.md, from ``EventKind`` and its ``#:`` comments
    (scripts/gen-event-docs writes it; tests/unit/test_evidence_docs.py checks it is current)."""
    import inspect
    import re

    notes = dict(re.findall(r'^\s+[A-Z_]+ = "([a-z_]+)"\s+#: (.+)$', inspect.getsource(events_mod), re.M))
    rows = ["| kind | in the report | recorded when |", "| --- | --- | --- |"]
    for k in EventKind:
        group = "decision" if k in DECISION_KINDS else "traffic"
        rows.append(f"| `{k}` | {group} | {_md(notes.get(str(k), ''))} |")
    return "\n".join(rows) + "\n"

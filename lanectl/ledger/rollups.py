"""Pre-aggregated metric windows: what `report` and long `metrics` windows read instead of every event.

The supervisor rolls the ledger's traffic up as time passes (``roll_up``, a few buckets per pass, in its own
write transaction): per 5-minute bucket and per hour, per (lane, class), the counts of every outcome, the
dispatches and fallback dispatches, the busy seconds of the attempts that ended in the bucket, and the *samples*
of queue wait, run time and end-to-end time as sorted float64 arrays. Samples, not histograms: the figures read
from roll-ups are the very values the full computation gives (nearest-rank percentiles pick an observed value),
at ~48 bytes per mission (both levels; docs/ledger.md).

Exactness with writers that race the roll-up: ``rollup_state`` holds ``rolled_until`` (every bucket before it is
rolled) and ``watermark`` (the largest event id the roll-ups have seen; the roll-up runs in a write transaction,
so every id up to it was committed). An event that arrives later with a time inside a rolled bucket (a
supervisor's clock stepped back) has a larger id: the next roll-up folds it into its buckets, and until then a
reader takes it raw (``id > watermark``). A window therefore reads roll-ups for the buckets it covers wholly and
raw events for the rest (its two ragged ends, what is not rolled yet, and such late events), never both for one
event.
"""
from __future__ import annotations

import math
import sqlite3
import sys
from array import array
from bisect import bisect_left
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Final

from lanectl.ledger import windows
from lanectl.states import ENDS

BUCKET_S: Final = 300
HOUR_S: Final = 3600
GRACE_S: Final = 60.0
"""A bucket is rolled up once it ended this long ago (callbacks in flight land first; later ones are folded in)."""
TRAFFIC: Final = ("submitted", *ENDS, "callback_rejected")
SAMPLES: Final = ("queue_wait", "run_time", "end_to_end")


def _pack(values: list[float]) -> bytes:
    a = array("d", values)
    if sys.byteorder != "little":
        a.byteswap()
    return a.tobytes()


def _unpack(blob: bytes | None) -> array[float]:
    a = array("d")
    if blob:
        a.frombytes(blob)
        if sys.byteorder != "little":
            a.byteswap()
    return a


@dataclass
class Agg:
    """The figures of one (bucket, lane, class)."""

    succeeded: int = 0
    failed: int = 0
    dead: int = 0
    cancelled: int = 0
    expired: int = 0
    requeued: int = 0
    dispatched: int = 0
    fallback: int = 0
    busy: float = 0.0
    """Sum of (end - dispatch) of the attempts that ended in the bucket (clip with ``early``)."""
    early: list[float] = field(default_factory=list)
    """Dispatch times of those attempts that were dispatched before the bucket began (sorted)."""
    queue_wait: list[float] = field(default_factory=list)
    run_time: list[float] = field(default_factory=list)
    end_to_end: list[float] = field(default_factory=list)

    def add(self, other: Agg) -> None:
        for k in ("succeeded", "failed", "dead", "cancelled", "expired", "requeued", "dispatched", "fallback"):
            setattr(self, k, getattr(self, k) + getattr(other, k))
        self.busy += other.busy
        for k in ("early", *SAMPLES):
            merged = getattr(self, k) + getattr(other, k)
            merged.sort()  # two sorted runs: timsort merges them in linear time
            setattr(self, k, merged)


# ---------------------------------------------------------------------------------------------------- raw rows

def traffic_counts(conn: sqlite3.Connection, t0: float, t1: float, after_id: int | None = None) -> dict[str, int]:
    sql = (f"SELECT kind, count(*) FROM events INDEXED BY events_kind WHERE kind IN ({','.join('?' * len(TRAFFIC))}) "
           "AND at >= ? AND at < ?")
    args: list = [*TRAFFIC, t0, t1]
    if after_id is not None:
        sql = sql.replace("INDEXED BY events_kind", "NOT INDEXED") + " AND id > ?"
        args.append(after_id)
    return dict(conn.execute(sql + " GROUP BY kind", args).fetchall())


def aggregate(dispatches: Iterable[tuple], ends: Iterable[tuple], bucket_s: int | None = None,
              clip: float = -math.inf) -> dict[tuple[float, str, str], Agg]:
    """Raw rows -> {(bucket start, lane, class): Agg} (samples sorted). Without ``bucket_s`` everything lands in
    one bucket starting at ``clip`` (a raw part of a window: its busy time is clipped there)."""
    out: dict[tuple[float, str, str], Agg] = {}
    for at, ln, cls, n, wait, fb in dispatches:
        b = math.floor(at / bucket_s) * bucket_s if bucket_s else clip
        a = out.get((b, ln, cls))
        if a is None:
            a = out[(b, ln, cls)] = Agg()
        a.dispatched += 1
        if fb is not None:
            a.fallback += 1
        if n == 1:
            a.queue_wait.append(wait)
    for kind, at, ln, cls, e2e, dispatched, started in ends:
        b = math.floor(at / bucket_s) * bucket_s if bucket_s else clip
        a = out.get((b, ln, cls))
        if a is None:
            a = out[(b, ln, cls)] = Agg()
        setattr(a, kind, getattr(a, kind) + 1)
        if kind in ("succeeded", "failed", "dead"):
            a.end_to_end.append(e2e)
        if kind == "succeeded" and dispatched is not None:
            a.run_time.append(at - (dispatched if started is None else started))
        if dispatched is not None:
            a.busy += at - dispatched
            if dispatched < b:
                a.early.append(dispatched)
    for a in out.values():
        for k in ("early", *SAMPLES):
            getattr(a, k).sort()
    return out


# ---------------------------------------------------------------------------------------------------- writing

def state(conn: sqlite3.Connection) -> tuple[float | None, int]:
    """(rolled_until, watermark); (None, 0) before the first roll-up."""
    row = conn.execute("SELECT rolled_until, watermark FROM rollup_state WHERE id = 1").fetchone()
    return (None, 0) if row is None else (float(row[0]), int(row[1]))


def rolled_from(conn: sqlite3.Connection) -> float:
    """Roll-ups cover [rolled_from, rolled_until): before it (history older than the first roll-up, or pruned)
    a window reads raw events."""
    row = conn.execute("SELECT rolled_from FROM rollup_state WHERE id = 1").fetchone()
    return math.inf if row is None else float(row[0])


def roll_up(conn: sqlite3.Connection, now: float, *, max_buckets: int = 2, grace_s: float = GRACE_S) -> int:
    """Roll up to ``max_buckets`` closed 5-minute buckets (and every hour they complete), and fold in events that
    arrived for buckets already rolled. The caller holds a write transaction. Returns the buckets rolled."""
    until, watermark = state(conn)
    before = (until, watermark)
    top = int(conn.execute("SELECT coalesce(max(id), 0) FROM events").fetchone()[0])
    if until is None:
        first = conn.execute("SELECT min(at) FROM events INDEXED BY events_at").fetchone()[0]
        until = start = math.floor((now if first is None else first) / BUCKET_S) * BUCKET_S
        watermark = 0
    elif top > watermark:  # late arrivals for rolled buckets: fold them in (both levels)
        late = aggregate(windows.dispatches(conn, -math.inf, until, at=True, after_id=watermark),
                         windows.ends(conn, ENDS, -math.inf, until, after_id=watermark), BUCKET_S)
        _merge_rows(conn, BUCKET_S, late)
        hours: dict[tuple[float, str, str], Agg] = {}
        for (b, ln, cls), a in late.items():
            h = math.floor(b / HOUR_S) * HOUR_S
            if h + HOUR_S <= until:  # that hour's row exists already
                hours.setdefault((h, ln, cls), Agg()).add(a)
        _merge_rows(conn, HOUR_S, hours)
        _merge_traffic(conn, BUCKET_S, _traffic_by_bucket(conn, -math.inf, until, watermark, BUCKET_S))
        _merge_traffic(conn, HOUR_S, {k: v for k, v in _traffic_by_bucket(conn, -math.inf, until, watermark,
                                                                           HOUR_S).items()
                                      if k[0] + HOUR_S <= until})
    closed = math.floor((now - grace_s) / BUCKET_S) * BUCKET_S
    end = min(closed, until + max_buckets * BUCKET_S)
    rolled = 0
    if end > until:
        aggs = aggregate(windows.dispatches(conn, until, end, at=True), windows.ends(conn, ENDS, until, end), BUCKET_S)
        _merge_rows(conn, BUCKET_S, aggs)
        _merge_traffic(conn, BUCKET_S, _traffic_by_bucket(conn, until, end, None, BUCKET_S))
        rolled = int((end - until) // BUCKET_S)
        # hours completed by this step: their rows from their twelve buckets
        h = math.floor(until / HOUR_S) * HOUR_S
        while h + HOUR_S <= end:
            if h + HOUR_S > until:
                _make_hour(conn, h)
            h += HOUR_S
        until = end
    if before[0] is None:
        conn.execute("INSERT INTO rollup_state (id, rolled_from, rolled_until, watermark) VALUES (1, ?, ?, ?)",
                     (start, until, top))
    elif (until, top) != before:  # an idle ledger is not written to (no commit, no fsync)
        conn.execute("UPDATE rollup_state SET rolled_until = ?, watermark = ? WHERE id = 1", (until, top))
    return rolled


def _traffic_by_bucket(conn: sqlite3.Connection, t0: float, t1: float, after_id: int | None,
                       bucket_s: int) -> dict[tuple[float, str], int]:
    sql = (f"SELECT at, kind FROM events {'NOT INDEXED' if after_id is not None else 'INDEXED BY events_kind'} "
           f"WHERE kind IN ({','.join('?' * len(TRAFFIC))}) AND at >= ? AND at < ?"
           + (" AND id > ?" if after_id is not None else ""))
    out: dict[tuple[float, str], int] = {}
    for at, kind in conn.execute(sql, [*TRAFFIC, t0, t1, *([after_id] if after_id is not None else [])]):
        key = (math.floor(at / bucket_s) * bucket_s, kind)
        out[key] = out.get(key, 0) + 1
    return out


def _merge_traffic(conn: sqlite3.Connection, bucket_s: int, counts: dict[tuple[float, str], int]) -> None:
    conn.executemany("INSERT INTO rollup_traffic (bucket_s, start, kind, n) VALUES (?, ?, ?, ?) "
                     "ON CONFLICT (bucket_s, start, kind) DO UPDATE SET n = n + excluded.n",
                     [(bucket_s, b, k, n) for (b, k), n in counts.items()])


_COLS: Final = ("succeeded", "failed", "dead", "cancelled", "expired", "requeued", "dispatched", "fallback", "busy",
                "early", *SAMPLES)


def _read_rows(conn: sqlite3.Connection, bucket_s: int, t0: float, t1: float, lane: str | None = None, *,
               for_reading: bool = False) -> dict[tuple[float, str, str], Agg]:
    """Roll-up rows as Aggs: samples as lists to merge into, or (``for_reading``) as the packed arrays
    themselves, which ``bisect`` searches without making a Python float of every sample."""
    sql = (f"SELECT start, lane, class, {', '.join(_COLS)} FROM rollups WHERE bucket_s = ? AND start >= ? "
           "AND start < ?" + (" AND lane = ?" if lane is not None else ""))
    out: dict[tuple[float, str, str], Agg] = {}
    for row in conn.execute(sql, (bucket_s, t0, t1, *([lane] if lane is not None else []))):
        b, ln, cls, *vals = row
        a = Agg(*vals[:9])
        a.early, a.queue_wait, a.run_time, a.end_to_end = (
            _unpack(v) if for_reading else list(_unpack(v)) for v in vals[9:])  # type: ignore[misc]
        out[(float(b), ln, cls)] = a
    return out


def _merge_rows(conn: sqlite3.Connection, bucket_s: int, aggs: dict[tuple[float, str, str], Agg]) -> None:
    for (b, ln, cls), a in aggs.items():
        old = _read_rows(conn, bucket_s, b, b + bucket_s / 2).get((b, ln, cls)) if aggs else None
        if old is not None:
            old.add(a)
            a = old
        conn.execute(f"INSERT OR REPLACE INTO rollups (bucket_s, start, lane, class, {', '.join(_COLS)}) VALUES "
                     f"(?, ?, ?, ?, {', '.join('?' * len(_COLS))})",
                     (bucket_s, b, ln, cls, a.succeeded, a.failed, a.dead, a.cancelled, a.expired, a.requeued,
                      a.dispatched, a.fallback, a.busy, _pack(a.early), _pack(a.queue_wait), _pack(a.run_time),
                      _pack(a.end_to_end)))


def _make_hour(conn: sqlite3.Connection, h: float) -> None:
    hour: dict[tuple[float, str, str], Agg] = {}
    for (_, ln, cls), a in _read_rows(conn, BUCKET_S, h, h + HOUR_S).items():
        # an hour's busy time is clipped at the hour, not its buckets: early dispatches are relative to the hour
        a.early = [d for d in a.early if d < h]
        hour.setdefault((h, ln, cls), Agg()).add(a)
    _merge_rows(conn, HOUR_S, hour)
    counts = conn.execute("SELECT kind, sum(n) FROM rollup_traffic WHERE bucket_s = ? AND start >= ? AND start < ? "
                          "GROUP BY kind", (BUCKET_S, h, h + HOUR_S)).fetchall()
    _merge_traffic(conn, HOUR_S, {(h, k): int(n) for k, n in counts})


def prune_before(conn: sqlite3.Connection, cutoff: float) -> int:
    """Retention: drop the roll-ups of every bucket that begins before ``cutoff`` (their events are being pruned)
    and let roll-ups begin at the first 5-minute boundary after it; what is left before it (events of missions
    that had not finished) is read raw, so a window over pruned time sees only what is left, both ways."""
    n = conn.execute("DELETE FROM rollups WHERE start < ?", (cutoff,)).rowcount
    conn.execute("DELETE FROM rollup_traffic WHERE start < ?", (cutoff,))
    first = math.ceil(cutoff / BUCKET_S) * BUCKET_S
    conn.execute("UPDATE rollup_state SET rolled_from = max(rolled_from, ?), rolled_until = max(rolled_until, ?) "
                 "WHERE id = 1", (first, first))
    return n


# ---------------------------------------------------------------------------------------------------- reading

@dataclass
class Window:
    """A window's figures from roll-ups where they cover it and raw events elsewhere: ``groups`` per (lane,
    class), ``traffic`` per kind, and ``t0`` for clipping busy time."""

    t0: float
    t1: float
    groups: dict[tuple[str, str], list[tuple[Agg, float]]]
    """(lane, class) -> [(figures, the start they were clipped against: bucket start, or t0 for raw)]."""
    traffic: dict[str, int]


def read_window(conn: sqlite3.Connection, t0: float, t1: float, lane: str | None = None) -> Window:
    until, watermark = state(conn)
    groups: dict[tuple[str, str], list[tuple[Agg, float]]] = {}
    traffic: dict[str, int] = {}

    def put(aggs: dict[tuple[float, str, str], Agg], clip: float | None) -> None:
        for (b, ln, cls), a in aggs.items():
            groups.setdefault((ln, cls), []).append((a, b if clip is None else clip))

    def add_traffic(counts: dict[str, int]) -> None:
        for k, n in counts.items():
            traffic[k] = traffic.get(k, 0) + int(n)

    u0 = max(math.ceil(t0 / BUCKET_S) * BUCKET_S, rolled_from(conn))
    u1 = min(math.floor(t1 / BUCKET_S) * BUCKET_S, until if until is not None else -math.inf)
    raw: list[tuple[float, float]] = []
    if until is None or u1 <= u0:
        raw.append((t0, t1))
    else:
        raw += [(t0, u0), (u1, t1)]
        h0, h1 = math.ceil(u0 / HOUR_S) * HOUR_S, math.floor(u1 / HOUR_S) * HOUR_S
        pieces = [(u0, h0, BUCKET_S), (h0, h1, HOUR_S), (h1, u1, BUCKET_S)] if h1 > h0 else [(u0, u1, BUCKET_S)]
        for p0, p1, size in pieces:
            if p1 > p0:
                put(_read_rows(conn, size, p0, p1, lane, for_reading=True), None)
                add_traffic({k: n for k, n in conn.execute(
                    "SELECT kind, sum(n) FROM rollup_traffic WHERE bucket_s = ? AND start >= ? AND start < ? "
                    "GROUP BY kind", (size, p0, p1))})
        # events that arrived for those buckets after they were rolled up
        put(aggregate(windows.dispatches(conn, u0, u1, lane, at=True, after_id=watermark),
                      windows.ends(conn, ENDS, u0, u1, lane, after_id=watermark), clip=t0), t0)
        add_traffic(traffic_counts(conn, u0, u1, watermark) if lane is None else {})
    for r0, r1 in raw:
        if r1 > r0:
            put(aggregate(windows.dispatches(conn, r0, r1, lane, at=True), windows.ends(conn, ENDS, r0, r1, lane),
                          clip=t0), t0)
            if lane is None:
                add_traffic(traffic_counts(conn, r0, r1))
    return Window(t0, t1, groups, traffic)


def busy(parts: list[tuple[Agg, float]], t0: float) -> float:
    """Busy seconds of the attempts that ended in the window, each clipped at ``t0``."""
    total = 0.0
    for a, _start in parts:
        total += a.busy
        if a.early:  # only dispatches before t0 are clipped (``early`` holds those before the part began)
            total -= sum(t0 - d for d in a.early[:bisect_left(a.early, t0)])
    return total

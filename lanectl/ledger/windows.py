"""The raw rows behind metrics: dispatches and attempt ends in a time window, one statement each.

``metrics``/``report`` (lanectl.evidence, through ``lanectl.ledger.reads``, which re-exports both) and the
roll-ups (lanectl.ledger.rollups) read them, so the metrics SQL exists once; a module of its own because the
roll-ups are also read through ``reads`` (no import circle).
"""
from __future__ import annotations

import sqlite3
from collections.abc import Iterable
from typing import Any, Union

from lanectl.ledger import Ledger

Source = Union[Ledger, sqlite3.Connection]
"""A ledger to read: a ``Ledger`` (read-write or read-only) or a bare connection."""


def _c(src: Source) -> sqlite3.Connection:
    return src.conn if isinstance(src, Ledger) else src


def dispatches(src: Source, t0: float, t1: float, lane: str | None = None, *, at: bool = False,
               after_id: int | None = None) -> list[tuple]:
    """Dispatches in ``[t0, t1)``: (lane or '-', class, attempt, at - created_at, data.fallback_from), with the
    event's time in front when ``at`` (the roll-ups bucket by it). A lane filter goes through events_lane (lane,
    at); otherwise events_kind (kind, at) bounds the scan by time. ``after_id`` keeps only events above that id
    (late events behind the roll-ups' watermark: few, found by id rather than by time). The one statement behind
    ``metrics``/``report`` (lanectl.evidence) and the roll-ups (lanectl.ledger.rollups)."""
    return _window_rows(src, _DISPATCHES_AT if at else _DISPATCHES, (), t0, t1, lane, after_id)


def ends(src: Source, kinds: Iterable[str], t0: float, t1: float, lane: str | None = None, *,
         after_id: int | None = None) -> list[tuple[str, float, str, str, float, float | None, float | None]]:
    """Events of ``kinds`` (the ends of attempts and missions) in ``[t0, t1)``: (kind, at, lane or '-', class,
    at - created_at, the attempt's dispatched_at, its started_at); ``lane`` and ``after_id`` as for
    ``dispatches``."""
    wanted = tuple(kinds)
    sql = _ENDS.format(marks=",".join("?" * len(wanted)), idx="{idx}")
    return _window_rows(src, sql, wanted, t0, t1, lane, after_id)


_DISPATCH_FROM = ("FROM events e INDEXED BY {idx} JOIN missions m ON m.id = e.mission "
                  "WHERE e.kind = 'dispatched' AND e.at >= ? AND e.at < ?")
_DISPATCHES = ("SELECT coalesce(e.lane, '-'), m.class, e.attempt, e.at - m.created_at, "
               "json_extract(e.data, '$.fallback_from') " + _DISPATCH_FROM)
_DISPATCHES_AT = ("SELECT e.at, coalesce(e.lane, '-'), m.class, e.attempt, e.at - m.created_at, "
                  "json_extract(e.data, '$.fallback_from') " + _DISPATCH_FROM)
_ENDS = ("SELECT e.kind, e.at, coalesce(e.lane, a.lane, m.lane, '-'), m.class, e.at - m.created_at, "
         "a.dispatched_at, a.started_at FROM events e INDEXED BY {idx} JOIN missions m ON m.id = e.mission "
         "LEFT JOIN attempts a ON a.mission = e.mission AND a.n = e.attempt "
         "WHERE e.kind IN ({marks}) AND e.at >= ? AND e.at < ?")


def _window_rows(src: Source, sql: str, pre: tuple, t0: float, t1: float, lane: str | None,
                 after_id: int | None) -> list[tuple]:
    args: list[Any] = [*pre, t0, t1]
    if after_id is not None:  # late events: few, found by id (a rowid range) rather than by time
        sql = sql.replace("INDEXED BY {idx}", "NOT INDEXED") + " AND e.id > ?"
        args.append(after_id)
    else:
        sql = sql.format(idx="events_lane" if lane is not None else "events_kind")
    if lane is not None:
        sql += " AND e.lane = ?"
        args.append(lane)
    return _c(src).execute(sql, args).fetchall()

"""The ledger's read API: every query that metrics, events, the report, governance, the probe, ``status``,
``top``, snapshots and drills run, as named operations with typed results.

Nothing outside ``lanectl/ledger/`` writes SQL or touches ``sqlite3`` (tests/test_layers.py enforces it): those
modules call these functions and compute on the rows. The SQL here is the SQL they ran before (issue 11 moved it,
it did not change it), so every query still goes through the index it was written for; the comments say which.

Every function takes a ``Source``: a ``Ledger`` (``Ledger.open`` for a writer, ``Ledger.open_readonly`` for a
reader) or a bare ``sqlite3.Connection`` (what ledger functions that run inside a caller's transaction hold). Rows come back as plain tuples whose shape each function's return type names: the
metrics loops run once per mission in a window (tens of thousands an hour), and a tuple is what SQLite hands
over without a copy. Module imports stay light (``sqlite3`` and the package): ``lanectl probe`` imports this
module on its start-up path.
"""
from __future__ import annotations

import sqlite3
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lanectl.ledger import BUSY_TIMEOUT_S, Ledger
from lanectl.ledger.windows import Source, _c, dispatches, ends  # noqa: F401 (dispatches, ends: part of this API)

if TYPE_CHECKING:
    from lanectl.ledger.events import Row as EventRow
    from lanectl.ledger.rollups import Window

def open_source(ledger: Source | str | Path, *, timeout_s: float = BUSY_TIMEOUT_S) -> tuple[Source, bool]:
    """(source, opened here): a ``Ledger`` or connection is used as it is; a path is opened read-only
    (``Ledger.open_readonly``) and the caller closes it with ``close`` when the second value is True."""
    if isinstance(ledger, (Ledger, sqlite3.Connection)) or hasattr(ledger, "execute"):  # (or a PgConn)
        return ledger, False  # type: ignore[return-value]
    from lanectl.ledger import _is_url

    where = ledger if _is_url(ledger) else Path(ledger)  # a postgresql:// URL is no path
    return Ledger.open_readonly(where, timeout_s=timeout_s), True


def close(src: Source) -> None:
    src.close()


# ------------------------------------------------------------------------------------------------ events


def events(src: Source, *, lane: str | None = None, mission: int | None = None, session: str | None = None,
           kind: str | Iterable[str] | None = None, since: float | None = None, until: float | None = None,
           after_id: int = 0, limit: int = 1000, latest: bool = False, host: str | None = None) -> list[EventRow]:
    """Stored events matching every filter, oldest first (``lanectl.ledger.events.select``)."""
    from lanectl.ledger import events as ev

    return ev.select(_c(src), lane=lane, mission=mission, session=session, kind=kind, since=since, until=until,
                     after_id=after_id, limit=limit, latest=latest, host=host)


def poll_events(src: Source, after_id: int, *, lane: str | None = None, mission: int | None = None,
                session: str | None = None, kind: str | Iterable[str] | None = None,
                limit: int = 1000, host: str | None = None) -> list[EventRow]:
    """The next matching events after ``after_id`` (``lanectl.ledger.events.poll``: a follower's poll)."""
    from lanectl.ledger import events as ev

    return ev.poll(_c(src), after_id, lane=lane, mission=mission, session=session, kind=kind, limit=limit, host=host)


def last_event_id(src: Source) -> int:
    """The id of the newest event, 0 when there is none."""
    from lanectl.ledger import events as ev

    return ev.last_id(_c(src))


def cancels_between(src: Source, after_id: int, upto_id: int) -> list[tuple[int, str]]:
    """``cancelled`` events with ids in ``(after_id, upto_id]`` that name a lane: (mission, lane), oldest first
    (the missions the supervisor tells their lane to stop)."""
    return _c(src).execute(
        "SELECT mission, lane FROM events WHERE id > ? AND id <= ? AND kind = 'cancelled' AND lane IS NOT NULL "
        "ORDER BY id", (after_id, upto_id)).fetchall()


def event_kinds(src: Source) -> list[str]:
    """Every distinct kind in the log (including kinds a newer lanectl wrote), sorted."""
    from lanectl.ledger import events as ev

    return ev.kinds_stored(_c(src))


def events_of_kinds(src: Source, kinds: Iterable[str], since: float, until: float) -> list[EventRow]:
    """Events of these kinds in ``[since, until)`` through ``events_kind``, in no particular order."""
    from lanectl.ledger import events as ev

    return ev.of_kinds(_c(src), kinds, since, until)


def window_events(src: Source, since: float, lane: str | None, lane_since: float) -> Iterator[EventRow]:
    """Events at or after ``since``, oldest first, streamed (a snapshot writes them as they come); with ``lane``,
    the lane's own and those of every mission dispatched to it since ``lane_since``."""
    q = "SELECT id, at, kind, mission, lane, session, attempt, state, data FROM events WHERE at >= ?"
    args: list[Any] = [since]
    if lane:
        q += " AND (lane = ? OR mission IN (SELECT mission FROM attempts WHERE lane = ? AND dispatched_at >= ?))"
        args += [lane, lane, lane_since]
    yield from _c(src).execute(q + " ORDER BY id", args)


# ------------------------------------------------------------------------------------------------ metrics


def _lane_filter(lane: str | None, col: str = "e.lane") -> tuple[str, list[Any]]:
    return (f" AND {col} = ?", [lane]) if lane is not None else ("", [])




def attempts_in_flight(src: Source, lane: str | None = None) -> list[tuple[str, str, float]]:
    """Attempts dispatched or running now (the partial attempts_lease index): (lane, class, dispatched_at)."""
    return _c(src).execute(
        "SELECT lane, class, dispatched_at FROM attempts INDEXED BY attempts_lease "
        "WHERE state IN ('dispatched', 'running')" + (" AND lane = ?" if lane is not None else ""),
        [lane] if lane is not None else []).fetchall()


def restart_counts(src: Source, t0: float, t1: float, lane: str | None = None) -> list[tuple[str | None, str, int]]:
    """``lane_invocation`` and ``lane_restart`` events in ``[t0, t1)`` per lane and kind: (lane, kind, count)."""
    idx = "events_lane" if lane is not None else "events_kind"
    lf, lp = _lane_filter(lane)
    return _c(src).execute(
        f"SELECT e.lane, e.kind, count(*) FROM events e INDEXED BY {idx} "
        f"WHERE e.kind IN ('lane_invocation', 'lane_restart') AND e.at >= ? AND e.at < ?{lf} "
        f"GROUP BY e.lane, e.kind", (t0, t1, *lp)).fetchall()


def rollup_window(src: Source, t0: float, t1: float, lane: str | None = None) -> Window:
    """The roll-ups covering ``[t0, t1)`` plus raw rows for its edges (``lanectl.ledger.rollups.read_window``)."""
    from lanectl.ledger import rollups

    return rollups.read_window(_c(src), t0, t1, lane)


def traffic_counts(src: Source, t0: float, t1: float) -> dict[str, int]:
    """Events per kind in ``[t0, t1)`` (``lanectl.ledger.rollups.traffic_counts``)."""
    from lanectl.ledger import rollups

    return rollups.traffic_counts(_c(src), t0, t1)


# ------------------------------------------------------------------------------------------------ lanes and queue now


def lane_health(src: Source) -> list[tuple[str, str, int | None]]:
    """Every lane the ledger has a row for: (name, dispatch state, healthy as the supervisor last recorded it)."""
    return _c(src).execute("SELECT name, state, healthy FROM lanes").fetchall()


def lane_states(src: Source) -> dict[str, str]:
    """Lane -> dispatch state, for every lane the ledger has a row for (no row: ``active``)."""
    return dict(_c(src).execute("SELECT name, state FROM lanes").fetchall())


def active_attempts(src: Source, lane: str) -> set[tuple[int, int]]:
    """(mission, attempt) of every mission the lane holds now (dispatched or running there)."""
    return {(r[0], r[1]) for r in _c(src).execute(
        "SELECT id, attempts FROM missions WHERE current_lane = ? AND state IN ('dispatched', 'running')",
        (lane,))}


def draining_idle(src: Source) -> list[str]:
    """Lanes that are ``draining`` with nothing dispatched or running on them (ready to be ``drained``)."""
    return [r[0] for r in _c(src).execute(
        "SELECT l.name FROM lanes l WHERE l.state = 'draining' AND NOT EXISTS (SELECT 1 FROM missions m "
        "WHERE m.current_lane = l.name AND m.state IN ('dispatched', 'running'))").fetchall()]


def session_ids(src: Source, lane: str) -> list[str]:
    """The ids of the sessions pinned to the lane."""
    return [r[0] for r in _c(src).execute("SELECT id FROM sessions WHERE lane = ?", (lane,))]


def lane_rows(src: Source) -> list[tuple[str, str, int | None, float]]:
    """Every lane row: (name, dispatch state, promoted weight or None, since when)."""
    return _c(src).execute("SELECT name, state, weight, updated_at FROM lanes").fetchall()


def last_drain(src: Source, lane: str) -> tuple[float, str | None, str | None] | None:
    """The lane's latest ``drain`` event: (at, actor, reason), or None."""
    return _c(src).execute("SELECT at, json_extract(data, '$.actor'), json_extract(data, '$.reason') FROM events "
                           "WHERE lane = ? AND kind = 'drain' ORDER BY at DESC, id DESC LIMIT 1",
                           (lane,)).fetchone()


def queue_depth(src: Source) -> dict[int, int]:
    """Queued missions per rank (the trigger-kept ``queue_depth`` rows)."""
    return dict(_c(src).execute("SELECT rank, n FROM queue_depth").fetchall())


def oldest_queued(src: Source, rank: int) -> float | None:
    """``created_at`` of the oldest queued mission of a rank (a range of the partial queue index), or None."""
    return _c(src).execute("SELECT min(created_at) FROM missions WHERE state = 'queued' AND rank = ?",
                           (rank,)).fetchone()[0]


def oldest_queued_interactive(src: Source) -> float | None:
    """``created_at`` of the oldest queued interactive mission: the first row of the partial queue index."""
    row = _c(src).execute("SELECT min(created_at) FROM missions WHERE state = 'queued' AND rank = 0").fetchone()
    return row[0] if row else None


def queued_targets(src: Source) -> list[tuple[str, int]]:
    """Queued missions bound to a lane (pinned, or through a session): (lane, count). One pass over the queue
    index's targets (the queue is bounded by admission control)."""
    return _c(src).execute("SELECT target, count(*) FROM missions INDEXED BY missions_queue WHERE state = 'queued' "
                           "AND target != '' GROUP BY target").fetchall()


def outcome_counts(src: Source, since: float) -> dict[str, int]:
    """``succeeded``, ``failed`` and ``dead`` events at or after ``since``, per kind (events_kind)."""
    return dict(_c(src).execute(
        "SELECT kind, count(*) FROM events WHERE kind IN ('succeeded', 'failed', 'dead') AND at >= ? "
        "GROUP BY kind", (since,)).fetchall())


# ------------------------------------------------------------------------------------------------ governance


def outcomes_by_lane(src: Source, since: float) -> list[tuple[str | None, str, int]]:
    """(lane, kind, count) of ``succeeded``, ``failed`` and ``dead`` events at or after ``since``."""
    return _c(src).execute("SELECT lane, kind, count(*) FROM events WHERE kind IN ('succeeded', "
                           "'failed', 'dead') AND at >= ? GROUP BY lane, kind", (since,)).fetchall()


def dispatches_by_lane(src: Source, since: float) -> list[tuple[str | None, int]]:
    """(lane, count) of dispatches at or after ``since``."""
    return _c(src).execute("SELECT lane, count(*) FROM events WHERE kind = 'dispatched' AND at >= ? "
                           "GROUP BY lane", (since,)).fetchall()


def fallbacks_away(src: Source, since: float) -> list[tuple[str | None, int]]:
    """(lane, count) of dispatches since ``since`` that went to a fallback instead of that lane; neither a
    drill's mission (sent away on purpose) nor a spent budget (the plan, not the lane) counts."""
    return _c(src).execute(
        "SELECT json_extract(e.data, '$.fallback_from'), count(*) FROM events e JOIN missions m ON m.id = e.mission "
        "WHERE e.kind = 'dispatched' AND e.at >= ? AND e.data LIKE '%fallback_from%' "
        "AND json_extract(e.data, '$.budget_spent') IS NULL "
        "AND json_extract(m.payload, '$.drill') IS NULL GROUP BY 1", (since,)).fetchall()


def lease_expiries(src: Source, since: float) -> list[tuple[str | None, int]]:
    """(lane, count) of attempts lost to an expired lease since ``since``."""
    return _c(src).execute("SELECT lane, count(*) FROM events WHERE kind IN ('requeued', 'dead') AND at >= ? "
                           "AND data LIKE '%lease expired%' GROUP BY lane", (since,)).fetchall()


def restarts_by_lane(src: Source, since: float) -> list[tuple[str | None, int]]:
    """(lane, restarts) since ``since``: a ``lane_invocation`` event carries how many restarts systemd counted
    since the last one it saw (1 when it does not say)."""
    return _c(src).execute("SELECT lane, sum(coalesce(json_extract(data, '$.restarts'), 1)) FROM events "
                           "WHERE kind = 'lane_invocation' AND at >= ? GROUP BY lane", (since,)).fetchall()


def oldest_interactive_by_lane(src: Source) -> list[tuple[str | None, float | None]]:
    """(lane, created_at) of the oldest queued interactive mission bound to each lane (pinned or by session)."""
    return _c(src).execute(
        "SELECT coalesce(m.lane, s.lane), min(m.created_at) FROM missions m LEFT JOIN sessions s "
        "ON s.id = m.session WHERE m.state = 'queued' AND m.rank = 0 GROUP BY 1").fetchall()


def last_drills(src: Source) -> list[tuple[str | None, float, str]]:
    """(lane, at, data as JSON text) of each lane's latest ``drill`` event."""
    conn = _c(src)
    return conn.execute(_LAST_DRILLS[getattr(conn, "dialect", "sqlite")]).fetchall()


_LAST_DRILLS = {  # SQLite takes the bare column from the row of max(at); PostgreSQL says so with DISTINCT ON
    "sqlite": "SELECT lane, max(at), data FROM events WHERE kind = 'drill' GROUP BY lane",
    "postgresql": "SELECT DISTINCT ON (lane) lane, at, data FROM events WHERE kind = 'drill' ORDER BY lane, at DESC",
}


def first_waits(src: Source, lane: str, since: float) -> list[float]:
    """Queue waits (dispatched_at - created_at) of the first attempts dispatched to ``lane`` since ``since``."""
    return [r[0] for r in _c(src).execute(
        "SELECT a.dispatched_at - m.created_at FROM attempts a JOIN missions m ON m.id = a.mission "
        "WHERE a.lane = ? AND a.class IN ('interactive', 'deadline', 'background') "
        "AND a.dispatched_at >= ? AND a.n = 1", (lane, since))]


def undrains_since(src: Source, since: float) -> list[tuple[str | None, float]]:
    """(lane, at) of each lane's latest ``undrain`` at or after ``since``."""
    return _c(src).execute("SELECT lane, max(at) FROM events WHERE kind = 'undrain' AND at >= ? "
                           "GROUP BY lane", (since,)).fetchall()


def recoveries_since(src: Source, since: float) -> list[tuple[str | None, float]]:
    """(lane, at) of each lane's latest return from ``degraded`` to ``active`` at or after ``since``."""
    return _c(src).execute(
        "SELECT lane, max(at) FROM events WHERE kind = 'lane_state' AND at >= ? "
        "AND json_extract(data, '$.to') = 'active' AND json_extract(data, '$.previous') = 'degraded' "
        "GROUP BY lane", (since,)).fetchall()


def starved_interactive(src: Source, lane: str, since: float, over_s: float) -> int:
    """First attempts of interactive missions dispatched to ``lane`` since ``since`` that waited over ``over_s``."""
    return _c(src).execute(
        "SELECT count(*) FROM attempts a JOIN missions m ON m.id = a.mission WHERE a.n = 1 AND a.class = "
        "'interactive' AND a.lane = ? AND a.dispatched_at >= ? AND a.dispatched_at - m.created_at > ?",
        (lane, since, over_s)).fetchone()[0]


# ------------------------------------------------------------------------------------------------ drills, snapshots


def first_loss_at(src: Source, mission: int, since: float) -> float | None:
    """When the mission's attempt was first lost (``requeued`` or ``dead``) at or after ``since``, or None."""
    return _c(src).execute(
        "SELECT min(at) FROM events WHERE mission = ? AND kind IN ('requeued', 'dead') AND at >= ?",
        (mission, since)).fetchone()[0]


def orphaned_attempts(src: Source, lane: str, invocation: str) -> int:
    """Current attempts still active on ``lane``'s invocation ``invocation`` whose mission is still active."""
    return _c(src).execute(
        "SELECT count(*) FROM attempts a JOIN missions m ON m.id = a.mission AND m.attempts = a.n "
        "WHERE a.lane = ? AND a.invocation = ? AND a.state IN ('dispatched', 'running') "
        "AND m.state IN ('dispatched', 'running')", (lane, invocation)).fetchone()[0]


_INTEGRITY = {
    "sqlite": "PRAGMA integrity_check",
    # PostgreSQL guards its own pages (and has no PRAGMA): what a snapshot checks there are the ledger's invariants
    # that no constraint states, the counts its triggers keep and the attempt every active mission runs.
    "postgresql": (
        "SELECT 'queue_depth of rank ' || d.rank || ' is ' || d.n || ' but ' || coalesce(q.n, 0) || ' are queued' "
        "FROM queue_depth d LEFT JOIN (SELECT rank, count(*) AS n FROM missions WHERE state = 'queued' "
        "GROUP BY rank) q ON q.rank = d.rank WHERE d.n <> coalesce(q.n, 0) "
        "UNION ALL SELECT 'mission ' || m.id || ' is ' || m.state || ' without its attempt ' || m.attempts "
        "FROM missions m WHERE m.state IN ('dispatched', 'running') AND NOT EXISTS "
        "(SELECT 1 FROM attempts a WHERE a.mission = m.id AND a.n = m.attempts)"),
}


def integrity_check(src: Source) -> list[str]:
    """``["ok"]`` for a sound ledger, else what is wrong: SQLite's ``PRAGMA integrity_check`` of the file; on
    PostgreSQL the ledger's own invariants (``_INTEGRITY``)."""
    conn = _c(src)
    dialect = getattr(conn, "dialect", "sqlite")
    found = [r[0] for r in conn.execute(_INTEGRITY[dialect]).fetchall()]
    return found if dialect == "sqlite" or found else ["ok"]

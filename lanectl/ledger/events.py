"""The append-only event log: every mission transition, refusal, rejection and session move, with its time.

The ``events`` table cannot be updated or deleted (``BEFORE UPDATE/DELETE`` triggers raise ``ABORT``). Every
transition appends its event in the same transaction as the change, so the log and the state never disagree;
``replay()`` rebuilds mission states from the log alone (the property tests compare it with the tables).
"""
from __future__ import annotations

import json
import sqlite3
from dataclasses import dataclass, field
from enum import StrEnum
from collections.abc import Iterable
from typing import Any

from lanectl.states import ACTIVE


class EventKind(StrEnum):
    """Every event kind the ledger emits (docs/ledger.md lists the same set)."""

    SUBMITTED = "submitted"  #: a new mission entered the queue
    SUBMIT_REFUSED = "submit_refused"  #: admission control refused a submit (queue_full)
    DISPATCHED = "dispatched"  #: attempt n assigned to a lane (data: fallback_from, aged, token-less)
    STARTED = "started"  #: the lane reported that it started the attempt
    SUCCEEDED = "succeeded"  #: the lane reported success
    FAILED = "failed"  #: the lane reported a failure that is not retried
    REQUEUED = "requeued"  #: an attempt was lost (lease expired, failover, retryable failure) or refused uncharged
    DEAD = "dead"  #: an attempt was lost or failed with no attempts left
    CANCELLED = "cancelled"  #: cancelled by an operator or producer
    RETRIED = "retried"  #: an operator put a finished mission back in the queue
    EXPIRED = "expired"  #: its deadline passed before it could run
    CALLBACK_REJECTED = "callback_rejected"  #: a stale or foreign callback was refused (fencing)
    WAITING = "waiting"  #: no lane can take it now; data.reason says why (on a change; data.group: a queue group)
    SESSION_CREATED = "session_created"  #: a session got its owner lane
    SESSION_MOVED = "session_moved"  #: a session moved to another lane (data: from_lane, reason: fallback, reroute, or its lane's host is dead or drained; from_host, to_host)
    SESSION_CHOICE = "session_choice"  #: a session's choice when its lane's host is dead or drained changed (data: stays: true waits for its lane, false moves)
    LANE_STATE = "lane_state"  #: a lane's dispatch state or health changed
    LANE_INVOCATION = "lane_invocation"  #: new InvocationID (data: restarts, automatic ones only)
    DRAIN = "drain"  #: a lane was drained, by an operator or a rollback (data: actor, reason, taken_over)
    UNDRAIN = "undrain"  #: an operator put a drained lane back into service (data: actor, reason)
    REROUTE = "reroute"  #: an operator moved a lane's queued work (data: to, missions, sessions, actor, reason)
    REROUTED = "rerouted"  #: one queued mission moved to another lane (data: from_lane, actor)
    LANE_RESTART = "lane_restart"  #: lanectl restarted a lane's unit (graceful or not; data: actor, reason)
    APPLY = "apply"  #: lanectl apply installed changed units (data: written, lanes, actor)
    SUPERVISOR = "supervisor"  #: install or apply reloaded or restarted the supervisor (data: action, by, lanes, error)
    SNAPSHOT = "snapshot"  #: an incident snapshot was written (data: path, reason, actor)
    PROMOTE = "promote"  #: a lane's weight was raised on evidence, or forced (data: weight, evidence, forced, actor)
    PROMOTE_REFUSED = "promote_refused"  #: a promotion was refused: the evidence did not meet the policy
    ROLLBACK = "rollback"  #: a rollback trigger drained a lane and moved its work (data: trigger, evidence, snapshot)
    ALERT = "alert"  #: a trigger not acted on: fleet-wide, last healthy lane, or one rollback per pass
    DRILL = "drill"  #: a recovery drill ran (data: type, detect_s, recover_s, orphaned, passed)
    PRUNE = "prune"  #: finished history older than a cutoff was archived and deleted (data: cutoff, counts, archive)
    HOST_STARTED = "host_started"  #: a host's supervisor started a new incarnation (data: host, incarnation, previous, boot_id, pid)
    HOST_STOPPED = "host_stopped"  #: a host's supervisor stopped cleanly (data: host, incarnation)
    HOST_FENCED = "host_fenced"  #: a host stopped claiming new work: its lease could not be renewed in time, or another incarnation holds its record (data: host, incarnation, reason, since: when the fence began, on the host's clock)
    HOST_UNFENCED = "host_unfenced"  #: a fenced host renewed its lease and claims work again (data: host, incarnation, fenced_s)
    HOST_FORGOTTEN = "host_forgotten"  #: an operator forgot a host: its lanes may be claimed by another (data: host, incarnation, lanes, actor)
    HOST_DEAD = "host_dead"  #: a host's lease ran out: another host declared it dead and took back its lanes' work (data: host, incarnation, by, lease_expires, lanes, missions)
    HOST_DRAINED = "host_drained"  #: an operator drained a host: its lanes take no new work, its sessions move (data: host, actor, reason, state, lanes, in_flight)
    HOST_UNDRAINED = "host_undrained"  #: an operator put a drained host back into service (data: host, actor, reason, drained_s, drained_by)
    LANE_HOST = "lane_host"  #: a lane's owning host changed (data: host, previous)


#: Mission state after each mission event kind (None: the kind does not change the mission's state).
STATE_AFTER: dict[EventKind, str | None] = {
    EventKind.SUBMITTED: "queued",
    EventKind.DISPATCHED: "dispatched",
    EventKind.STARTED: "running",
    EventKind.SUCCEEDED: "succeeded",
    EventKind.FAILED: "failed",
    EventKind.REQUEUED: "queued",
    EventKind.DEAD: "dead",
    EventKind.CANCELLED: "cancelled",
    EventKind.RETRIED: "queued",
    EventKind.EXPIRED: "expired",
}

#: Allowed transitions (from state -> event kinds). replay() refuses anything else.
TRANSITIONS: dict[str | None, set[EventKind]] = {
    None: {EventKind.SUBMITTED},
    "queued": {EventKind.DISPATCHED, EventKind.CANCELLED, EventKind.EXPIRED},
    "dispatched": {EventKind.STARTED, EventKind.SUCCEEDED, EventKind.FAILED, EventKind.REQUEUED, EventKind.DEAD,
                   EventKind.CANCELLED},
    "running": {EventKind.SUCCEEDED, EventKind.FAILED, EventKind.REQUEUED, EventKind.DEAD, EventKind.CANCELLED},
    "succeeded": set(),
    "failed": {EventKind.RETRIED},
    "dead": {EventKind.RETRIED},
    "cancelled": {EventKind.RETRIED},
    "expired": {EventKind.RETRIED},
}


EventRow = tuple[float, str, "int | None", "str | None", "str | None", "int | None", "str | None", str]
_INSERT = "INSERT INTO events (at, kind, mission, lane, session, attempt, state, data) VALUES (?,?,?,?,?,?,?,?)"
_dumps = json.JSONEncoder(sort_keys=True, separators=(",", ":")).encode


def row(kind: EventKind, at: float, *, mission: int | None = None, lane: str | None = None,
        session: str | None = None, attempt: int | None = None, **data: Any) -> EventRow:
    """One event as a row for ``append_many`` (batched writers collect these and insert them at once)."""
    if data and None in data.values():
        data = {k: v for k, v in data.items() if v is not None}
    return (at, str(kind), mission, lane, session, attempt, STATE_AFTER.get(kind), _dumps(data) if data else "{}")


def append(conn: sqlite3.Connection, kind: EventKind, at: float, *, mission: int | None = None,
           lane: str | None = None, session: str | None = None, attempt: int | None = None,
           **data: Any) -> None:
    """Append one event; call inside the transaction that makes the change it records."""
    conn.execute(_INSERT, row(kind, at, mission=mission, lane=lane, session=session, attempt=attempt, **data))


def append_many(conn: sqlite3.Connection, rows: list[EventRow]) -> None:
    """Append events in list order (ids follow it); call inside the transaction that made the changes."""
    if rows:
        conn.executemany(_INSERT, rows)


COLUMNS: tuple[str, ...] = ("id", "at", "kind", "mission", "lane", "session", "attempt", "state", "data")
"""The columns of an event row as ``select``, ``poll`` and ``decision_rows`` return it, in this order."""
Row = tuple[int, float, str, "int | None", "str | None", "str | None", "int | None", "str | None", str]
"""One stored event: the values of ``COLUMNS`` (``data`` still JSON text)."""
_SELECT = f"SELECT {', '.join(COLUMNS)} FROM events"


def _where(lane: str | None, mission: int | None, session: str | None, kind: str | Iterable[str] | None,
           since: float | None, until: float | None, after_id: int,
           host: str | None = None) -> tuple[list[str], list[Any]]:
    """The WHERE terms and parameters of an event filter (the one builder of event queries). ``host``: events of
    the lanes that host owns now (``lanes.host``) and events about the host itself (``data.host``: host_* and
    lane_host events); no index of its own (the lane list is small, the other terms and the limit bound it)."""
    where: list[str] = []
    params: list[Any] = []
    if host is not None:
        where.append("(lane IN (SELECT name FROM lanes WHERE host = ?) OR json_extract(data, '$.host') = ?)")
        params += [host, host]
    if after_id:
        where.append("id > ?")
        params.append(after_id)
    for col, val in (("mission", mission), ("lane", lane), ("session", session)):
        if val is not None:
            where.append(f"{col} = ?")
            params.append(val)
    kinds = [kind] if isinstance(kind, str) else sorted(set(kind)) if kind else []
    if kinds:
        where.append(f"kind IN ({','.join('?' * len(kinds))})")
        params += kinds
    if since is not None:
        where.append("at >= ?")
        params.append(since)
    if until is not None:
        where.append("at < ?")
        params.append(until)
    return where, params


def select(conn: sqlite3.Connection, *, lane: str | None = None, mission: int | None = None,
           session: str | None = None, kind: str | Iterable[str] | None = None, since: float | None = None,
           until: float | None = None, after_id: int = 0, limit: int = 1000, latest: bool = False,
           host: str | None = None) -> list[Row]:
    """Stored events matching every filter, oldest first; ``latest``: the last ``limit`` matches (still oldest
    first). Filters go through the ledger's indexes: mission (``events_mission``), lane and session with time
    (``events_lane``, ``events_session``), kind with time (``events_kind``), time alone (``events_at``),
    ``after_id`` (rowid)."""
    where, params = _where(lane, mission, session, kind, since, until, after_id, host)
    # ORDER BY id tempts the planner into a rowid scan from the first event; a time bound with no other
    # indexed filter must seek through events_at instead (then sort the window, small next to the history).
    hint = " INDEXED BY events_at" if since is not None and mission is None and lane is None \
        and session is None and not kind else ""
    sql = (f"{_SELECT}{hint}" + (f" WHERE {' AND '.join(where)}" if where else "")
           + f" ORDER BY id {'DESC' if latest else ''} LIMIT ?")
    rows = conn.execute(sql, (*params, limit)).fetchall()
    if latest:
        rows.reverse()
    return rows


def poll(conn: sqlite3.Connection, after_id: int, *, lane: str | None = None, mission: int | None = None,
         session: str | None = None, kind: str | Iterable[str] | None = None, limit: int = 1000,
         host: str | None = None) -> list[Row]:
    """The next matching events after ``after_id``, oldest first, through the rowid alone (``NOT INDEXED``): a
    follower's new tail is small, while a lane or kind index would walk that lane's whole history every poll."""
    where, params = _where(lane, mission, session, kind, None, None, 0, host)
    return conn.execute(f"{_SELECT} NOT INDEXED WHERE id > ?" + "".join(f" AND {w}" for w in where)
                        + " ORDER BY id LIMIT ?", (after_id, *params, limit)).fetchall()


def last_id(conn: sqlite3.Connection) -> int:
    """The id of the newest event (0 for an empty log)."""
    return int(conn.execute("SELECT coalesce(max(id), 0) FROM events").fetchone()[0])


def kinds_stored(conn: sqlite3.Connection) -> list[str]:
    """Every distinct kind in the log, sorted: a walk of ``events_kind`` with one seek per kind."""
    out: list[str] = []
    k = conn.execute("SELECT min(kind) FROM events").fetchone()[0]
    while k is not None:
        out.append(k)
        k = conn.execute("SELECT min(kind) FROM events WHERE kind > ?", (k,)).fetchone()[0]
    return out


def of_kinds(conn: sqlite3.Connection, kinds: Iterable[str], since: float, until: float) -> list[Row]:
    """Events of these kinds in ``[since, until)`` through ``events_kind`` (unordered: the caller sorts)."""
    wanted = list(kinds)
    if not wanted:
        return []
    return conn.execute(f"{_SELECT} INDEXED BY events_kind WHERE kind IN ({','.join('?' * len(wanted))}) "
                        f"AND at >= ? AND at < ?", (*wanted, since, until)).fetchall()


def query(conn: sqlite3.Connection, *, mission: int | None = None, lane: str | None = None,
          session: str | None = None, kind: str | None = None, since: float | None = None,
          until: float | None = None, after_id: int = 0, limit: int = 1000) -> list[dict[str, Any]]:
    """Events matching every filter given, oldest first, as dicts (``at`` epoch seconds, ``data`` decoded)."""
    out = []
    for r in select(conn, mission=mission, lane=lane, session=session, kind=kind, since=since, until=until,
                    after_id=after_id, limit=limit):
        ev = dict(zip(COLUMNS, r))
        ev["data"] = json.loads(ev["data"])
        out.append(ev)
    return out


@dataclass
class Replayed:
    state: str | None = None
    attempts: int = 0
    lane: str | None = None
    history: list[str] = field(default_factory=list)


class ReplayError(ValueError):
    """The log holds a transition the state machine does not allow."""


def replay(conn: sqlite3.Connection) -> dict[int, Replayed]:
    """Rebuild every mission's state, attempt count and holding lane from the events alone."""
    out: dict[int, Replayed] = {}
    cur = conn.execute("SELECT id, kind, mission, lane, attempt FROM events WHERE mission IS NOT NULL ORDER BY id")
    for ev_id, kind_s, mission, lane, attempt in cur:
        try:
            kind = EventKind(kind_s)
        except ValueError:
            continue  # a kind from a newer lanectl: not a transition we know
        if kind not in STATE_AFTER:
            continue
        rec = out.setdefault(mission, Replayed())
        if kind not in TRANSITIONS[rec.state]:
            raise ReplayError(f"event {ev_id}: {kind} is not allowed from {rec.state!r} (mission {mission})")
        rec.state = STATE_AFTER[kind]
        rec.history.append(str(kind))
        if kind is EventKind.DISPATCHED:
            rec.attempts = attempt
            rec.lane = lane
        elif rec.state not in ACTIVE:
            rec.lane = None
    return out

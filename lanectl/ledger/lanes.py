"""Operator verbs on lanes, recorded in the ledger: drain, undrain, reroute. The supervisor reconciles them.

Drain and reroute are rows, not messages: the supervisor reads the lane's state on every policy pass, so an
operator's verb takes effect at its next turn even if it was down when the verb ran.
"""
from __future__ import annotations

import getpass
import os
from dataclasses import dataclass, field
from typing import Any

from lanectl.config import LaneSet
from lanectl.errors import Conflict
from lanectl.ledger import Ledger
from lanectl.ledger import missions as ms
from lanectl.ledger.events import EventKind, append


def actor() -> str:
    """Who is acting: the user behind sudo, else the login name."""
    who = os.environ.get("SUDO_USER")
    if who:
        return who
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return f"uid {os.getuid()}"


SUPERVISOR_ACTOR = "lanectl-supervisor"
"""The ``actor`` of what the supervisor does by itself (lanectl.probe names the same)."""


def drained_by(ledger: Ledger, lane: str) -> str | None:
    """Who drained the lane last (the actor of its latest ``drain`` event)."""
    row = ledger.conn.execute("SELECT json_extract(data, '$.actor') FROM events WHERE lane = ? AND kind = 'drain' "
                              "ORDER BY at DESC, id DESC LIMIT 1", (lane,)).fetchone()
    return row[0] if row else None


def state_of(ledger: Ledger, lane: str) -> str:
    row = ledger.conn.execute("SELECT state FROM lanes WHERE name = ?", (lane,)).fetchone()
    return row[0] if row else "active"


def recorded_invocations(ledger: Ledger) -> dict[str, str]:
    """Each lane's systemd InvocationID as the ledger last recorded it (what its in-flight attempts are bound to)."""
    return {r[0]: r[1] for r in ledger.conn.execute("SELECT name, invocation FROM lanes WHERE invocation IS NOT NULL")}


def in_flight(ledger: Ledger, lane: str) -> list[int]:
    return [r[0] for r in ledger.conn.execute(
        "SELECT id FROM missions WHERE current_lane = ? AND state IN ('dispatched', 'running') ORDER BY id", (lane,))]


def _set_state(conn: Any, lane: str, state: str, now: float) -> None:
    conn.execute("INSERT INTO lanes (name, state, updated_at) VALUES (?, ?, ?) ON CONFLICT (name) DO UPDATE SET "
                 "state = excluded.state, updated_at = excluded.updated_at", (lane, state, now))


def drain(ledger: Ledger, fleet: LaneSet, lane: str, *, now: float, reason: str | None = None,
          who: str | None = None, take_over: bool = False) -> bool:
    """No new work for the lane; what it runs finishes. False when it was draining or drained already.

    With ``take_over`` (an operator's ``lanectl drain``), draining a lane the supervisor drained (a rollback) takes
    that drain over: the state stays, a ``drain`` event records the operator (``taken_over``), and ``lanectl
    probe`` stops alarming about it. Other callers (a graceful restart) never take a drain over."""
    fleet.get(lane)
    who = who or actor()
    with ledger.transaction() as conn:
        old = state_of(ledger, lane)
        if old in ("draining", "drained"):
            if not take_over or who == SUPERVISOR_ACTOR or drained_by(ledger, lane) != SUPERVISOR_ACTOR:
                return False
            append(conn, EventKind.DRAIN, now, lane=lane, actor=who, reason=reason, previous=old,
                   taken_over=SUPERVISOR_ACTOR)
            return True
        new = "drained" if not in_flight(ledger, lane) else "draining"
        _set_state(conn, lane, new, now)
        append(conn, EventKind.DRAIN, now, lane=lane, actor=who, reason=reason, previous=old)
        append(conn, EventKind.LANE_STATE, now, lane=lane, to=new, previous=old, reason="drain")
        return True


def undrain(ledger: Ledger, fleet: LaneSet, lane: str, *, now: float, reason: str | None = None,
            who: str | None = None) -> bool:
    """Back into service. False when it was taking work already."""
    fleet.get(lane)
    with ledger.transaction() as conn:
        old = state_of(ledger, lane)
        if old == "active":
            return False
        _set_state(conn, lane, "active", now)
        append(conn, EventKind.UNDRAIN, now, lane=lane, actor=who or actor(), reason=reason, previous=old)
        append(conn, EventKind.LANE_STATE, now, lane=lane, to="active", previous=old, reason="undrain")
        return True


@dataclass
class RerouteResult:
    lane: str
    to: str
    missions: list[int] = field(default_factory=list)
    sessions: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)

    @property
    def changed(self) -> bool:
        return bool(self.missions or self.sessions)


def reroute(ledger: Ledger, fleet: LaneSet, lane: str, to: str, *, now: float, cls: str | None = None,
            sessions: bool = False, reason: str | None = None, who: str | None = None) -> RerouteResult:
    """Move the lane's queued missions (pinned to it) to ``to``, and with ``sessions`` its idle sessions too.

    Missions of a class ``to`` does not serve stay (and are listed in ``skipped``); running missions are never
    moved. Every move is an event; running it again moves nothing more.
    """
    fleet.get(lane)
    target = fleet.get(to)
    if lane == to:
        raise Conflict(f"cannot reroute lane {lane!r} to itself", "name another lane with --to", "reroute_self")
    if cls is not None and cls not in target.classes:
        raise Conflict(f"lane {to!r} does not serve class {cls!r}", "pick a lane that serves it", "class_not_served")
    who = who or actor()
    res = RerouteResult(lane, to)
    with ledger.transaction() as conn:
        rows = conn.execute("SELECT id, class FROM missions WHERE state = 'queued' AND lane = ?"
                            + (" AND class = ?" if cls else "") + " ORDER BY id",
                            (lane, cls) if cls else (lane,)).fetchall()
        for mission, mcls in rows:
            if mcls not in target.classes:
                res.skipped[str(mission)] = f"{to} does not serve {mcls}"
                continue
            conn.execute("UPDATE missions SET lane = ?, updated_at = ? WHERE id = ? AND state = 'queued'",
                         (to, now, mission))
            append(conn, EventKind.REROUTED, now, mission=mission, lane=to, from_lane=lane, actor=who)
            res.missions.append(mission)
        if sessions:
            for (sid,) in conn.execute("SELECT id FROM sessions WHERE lane = ? ORDER BY id", (lane,)).fetchall():
                try:
                    if ms.move_session(ledger, sid, to, now=now, reason=f"reroute by {who}"):
                        res.sessions.append(sid)
                except Conflict as exc:
                    res.skipped[sid] = exc.message
        if res.changed:
            append(conn, EventKind.REROUTE, now, lane=lane, to=to, cls=cls, missions=len(res.missions),
                   sessions=res.sessions, actor=who, reason=reason)
    return res


def record(ledger: Ledger, kind: EventKind, *, now: float, lane: str | None = None, **data: Any) -> None:
    with ledger.transaction() as conn:
        append(conn, kind, now, lane=lane, actor=data.pop("actor", None) or actor(), **data)

"""Operator verbs on lanes, recorded in the ledger: drain, undrain, reroute. The supervisor reconciles them.

Drain and reroute are rows, not messages: the supervisor reads the lane's state on every policy pass, so an
operator's verb takes effect at its next turn even if it was down when the verb ran.
"""
from __future__ import annotations

import getpass
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from lanectl.errors import Conflict, NotFound
from lanectl.ledger import Ledger
from lanectl.ledger import missions as ms
from lanectl.ledger.events import EventKind, append
from lanectl.states import HELD

if TYPE_CHECKING:
    from lanectl.config import LaneSet


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


def weight_of(ledger: Ledger, lane: str) -> int | None:
    """The lane's promoted weight (``lanectl promote``), or None when none was set (its lane file's applies)."""
    row = ledger.conn.execute("SELECT weight FROM lanes WHERE name = ?", (lane,)).fetchone()
    return row[0] if row else None


def set_weight(ledger: Ledger, lane: str, weight: int, *, now: float) -> None:
    """Record the lane's promoted weight (its own transaction; the caller records the ``promote`` event)."""
    with ledger.transaction() as conn:
        conn.execute("INSERT INTO lanes (name, weight, updated_at) VALUES (?, ?, ?) ON CONFLICT (name) DO UPDATE "
                     "SET weight = excluded.weight, updated_at = excluded.updated_at", (lane, weight, now))


def save_swrr(conn: Any, swrr: Mapping[str, int], *, now: float) -> None:
    """Keep each lane's smooth weighted round-robin credit (the dispatch policy's state) across ticks; inside the
    tick's transaction (``missions.assign_in``). A new row's ``updated_at`` is ``now``; an old one keeps its own."""
    for lane, value in swrr.items():
        conn.execute("INSERT INTO lanes (name, swrr, updated_at) VALUES (?, ?, ?) "
                     "ON CONFLICT (name) DO UPDATE SET swrr = excluded.swrr", (lane, value, now))


def write_observed(conn: Any, lane: str, *, state: str, healthy: int, invocation: str | None, now: float) -> None:
    """Store a lane's dispatch state, health and invocation as observed (``missions.set_lane``, inside its
    transaction, which also appends the events and re-queues what a lost invocation held)."""
    conn.execute("INSERT INTO lanes (name, state, healthy, invocation, updated_at) VALUES (?, ?, ?, ?, ?) "
                 "ON CONFLICT (name) DO UPDATE SET state = excluded.state, healthy = excluded.healthy, "
                 "invocation = excluded.invocation, updated_at = excluded.updated_at",
                 (lane, state, healthy, invocation, now))


def recorded_invocations(ledger: Ledger) -> dict[str, str]:
    """Each lane's systemd InvocationID as the ledger last recorded it (what its in-flight attempts are bound to)."""
    return {r[0]: r[1] for r in ledger.conn.execute("SELECT name, invocation FROM lanes WHERE invocation IS NOT NULL")}


def in_flight(ledger: Ledger, lane: str) -> list[int]:
    return [r[0] for r in ledger.conn.execute(
        "SELECT id FROM missions WHERE current_lane = ? AND state IN ('dispatched', 'running') ORDER BY id", (lane,))]


def _set_state(conn: Any, lane: str, state: str, now: float) -> None:
    conn.execute("INSERT INTO lanes (name, state, updated_at) VALUES (?, ?, ?) ON CONFLICT (name) DO UPDATE SET "
                 "state = excluded.state, updated_at = excluded.updated_at", (lane, state, now))


def mark_recovered(conn: Any, lane: str, *, now: float) -> None:
    """A degraded lane is ``active`` again (the supervisor, inside its transaction with the ``lane_state``
    event)."""
    conn.execute("UPDATE lanes SET state = 'active', updated_at = ? WHERE name = ?", (now, lane))


def mark_degraded(conn: Any, lane: str, *, now: float) -> None:
    """The lane is ``degraded`` (the supervisor, inside its transaction with the ``lane_state`` event)."""
    conn.execute("INSERT INTO lanes (name, state, updated_at) VALUES (?, 'degraded', ?) ON CONFLICT (name) "
                 "DO UPDATE SET state = 'degraded', updated_at = excluded.updated_at", (lane, now))


def mark_drained(conn: Any, lane: str, *, now: float) -> bool:
    """A ``draining`` lane is ``drained``; False when it was not draining any more (the supervisor, inside its
    transaction, appends the ``lane_state`` event only on True)."""
    cur = conn.execute("UPDATE lanes SET state = 'drained', updated_at = ? WHERE name = ? "
                       "AND state = 'draining'", (now, lane))
    return bool(cur.rowcount)


def host_of(ledger: Ledger, fleet: LaneSet, lane: str) -> str | None:
    """Where the verbs on ``lane`` act: None for a lane of this host's ``lanes.d/``, else the other host that runs
    it as the ledger knows (issue 13: drain, undrain and reroute act through the ledger, from any host). A lane
    neither knows is ``lane_not_found`` (exit 4), naming both."""
    if lane in fleet.lanes:
        return None
    host, _ = spec_of(ledger.conn, lane)
    if host is not None:
        return host
    others = sorted(set(owners(ledger.conn)) - set(fleet.lanes))
    raise NotFound(f"no lane named {lane!r} in {fleet.lanes_dir} nor on another host of the ledger",
                   f"lanes here: {', '.join(sorted(fleet.lanes)) or 'none'}; on other hosts: "
                   f"{', '.join(others) or 'none'} ('lanectl hosts')", "lane_not_found")


def classes_of(ledger: Ledger, fleet: LaneSet, lane: str) -> list[str]:
    """The classes ``lane`` serves: from this host's ``lanes.d/``, else as its host published them."""
    if host_of(ledger, fleet, lane) is None:
        return list(fleet.lanes[lane].classes)
    _, spec = spec_of(ledger.conn, lane)
    if spec is None:
        raise Conflict(f"lane {lane!r} runs on another host whose supervisor has not published what it serves yet",
                       "restart that host's supervisor with this lanectl version", "lane_spec_unknown")
    return list(spec["classes"])


def drain(ledger: Ledger, fleet: LaneSet, lane: str, *, now: float, reason: str | None = None,
          who: str | None = None, take_over: bool = False) -> bool:
    """No new work for the lane; what it runs finishes. False when it was draining or drained already.

    With ``take_over`` (an operator's ``lanectl drain``), draining a lane the supervisor drained (a rollback) takes
    that drain over: the state stays, a ``drain`` event records the operator (``taken_over``), and ``lanectl
    probe`` stops alarming about it. Other callers (a graceful restart) never take a drain over. ``lane`` may run
    on another host (``host_of``)."""
    host_of(ledger, fleet, lane)
    who = who or actor()
    with ledger.transaction() as conn:
        old = state_of(ledger, lane)
        if old in HELD:
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
    """Back into service. False when it was taking work already. ``lane`` may run on another host."""
    host_of(ledger, fleet, lane)
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


@dataclass
class Bound:
    """What the ledger binds to one lane: queued missions that only it may take (pinned with --lane or through
    a session it owns), missions in flight on it, and the sessions it owns."""

    lane: str
    queued: list[int] = field(default_factory=list)
    in_flight: list[int] = field(default_factory=list)
    sessions: list[str] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.queued or self.in_flight or self.sessions)

    def describe(self) -> str:
        parts = []
        if self.in_flight:
            parts.append(f"{len(self.in_flight)} mission(s) in flight {_ids(self.in_flight)}")
        if self.queued:
            parts.append(f"{len(self.queued)} queued mission(s) pinned to it {_ids(self.queued)}")
        if self.sessions:
            parts.append(f"{len(self.sessions)} session(s) {', '.join(self.sessions[:5])}"
                         + (" ..." if len(self.sessions) > 5 else ""))
        return "; ".join(parts)

    def as_dict(self) -> dict[str, Any]:
        return {"lane": self.lane, "queued": self.queued, "in_flight": self.in_flight, "sessions": self.sessions}


def _ids(ids: list[int]) -> str:
    return "(" + ", ".join(map(str, ids[:10])) + (", ..." if len(ids) > 10 else "") + ")"


def bound(ledger: Ledger, lane: str) -> Bound:
    """Everything that would be stranded if the lane went away."""
    conn = ledger.conn
    return Bound(
        lane,
        queued=[r[0] for r in conn.execute("SELECT id FROM missions WHERE state = 'queued' AND target = ? ORDER BY id",
                                           (lane,))],
        in_flight=in_flight(ledger, lane),
        sessions=[r[0] for r in conn.execute("SELECT id FROM sessions WHERE lane = ? ORDER BY id", (lane,))])


def stranded(ledger: Ledger, lanes: Any) -> dict[str, int]:
    """Queued missions bound to a lane that is not among ``lanes`` (no lane can ever take them): lane -> count."""
    known = set(lanes)
    rows = ledger.conn.execute("SELECT target, count(*) FROM missions WHERE state = 'queued' AND target != '' "
                               "GROUP BY target").fetchall()
    return {t: n for t, n in rows if t not in known}


def known_in_ledger(ledger: Ledger, lane: str) -> bool:
    """Whether the ledger remembers the lane (its state, sessions, missions pinned to it or run on it)."""
    conn = ledger.conn
    return any(conn.execute(q, (lane,)).fetchone() for q in (
        "SELECT 1 FROM lanes WHERE name = ?",
        "SELECT 1 FROM sessions WHERE lane = ? LIMIT 1",
        "SELECT 1 FROM missions WHERE state = 'queued' AND target = ? LIMIT 1",
        "SELECT 1 FROM missions WHERE current_lane = ? AND state IN ('dispatched', 'running') LIMIT 1"))


def reroute(ledger: Ledger, fleet: LaneSet, lane: str, to: str, *, now: float, cls: str | None = None,
            sessions: bool = False, reason: str | None = None, who: str | None = None) -> RerouteResult:
    """Move the lane's queued missions (pinned to it) to ``to``, and with ``sessions`` its idle sessions too.

    Missions of a class ``to`` does not serve stay (and are listed in ``skipped``); running missions are never
    moved. Every move is an event; running it again moves nothing more. ``lane`` may be one that is gone from
    the fleet but still known to the ledger (removed or renamed with work bound to it): its sessions are then
    always moved, since nothing else could ever serve them. Either lane may run on another host (``host_of``).
    """
    owner = spec_of(ledger.conn, lane)[0]
    if lane not in fleet.lanes and (owner is None or owner == getattr(fleet.settings, "host", None)):
        # gone from this host's lanes.d/ (its spec may still be in the ledger): nobody else runs it
        if not known_in_ledger(ledger, lane):
            host_of(ledger, fleet, lane)  # NotFound, naming the known lanes
        sessions = True
    served = classes_of(ledger, fleet, to)
    if lane == to:
        raise Conflict(f"cannot reroute lane {lane!r} to itself", "name another lane with --to", "reroute_self")
    if cls is not None and cls not in served:
        raise Conflict(f"lane {to!r} does not serve class {cls!r}", "pick a lane that serves it", "class_not_served")
    who = who or actor()
    res = RerouteResult(lane, to)
    with ledger.transaction() as conn:
        rows = conn.execute("SELECT id, class FROM missions WHERE state = 'queued' AND lane = ?"
                            + (" AND class = ?" if cls else "") + " ORDER BY id",
                            (lane, cls) if cls else (lane,)).fetchall()
        for mission, mcls in rows:
            if mcls not in served:
                res.skipped[str(mission)] = f"{to} does not serve {mcls}"
                continue
            conn.execute("UPDATE missions SET lane = ?, updated_at = ? WHERE id = ? AND state = 'queued'",
                         (to, now, mission))
            append(conn, EventKind.REROUTED, now, mission=mission, lane=to, from_lane=lane, actor=who)
            res.missions.append(mission)
        if sessions:
            for (sid,) in conn.execute("SELECT id FROM sessions WHERE lane = ? ORDER BY id", (lane,)).fetchall():
                # a session goes only where its queued missions can run: moved elsewhere they would wait for ever
                unserved = sorted({c for (c,) in conn.execute(
                    "SELECT DISTINCT class FROM missions WHERE session = ? AND state = 'queued'", (sid,))}
                    - set(served))
                if unserved:
                    res.skipped[sid] = f"{to} does not serve {', '.join(unserved)} (its queued missions)"
                    continue
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


class _Refused(Exception):
    def __init__(self, left: Bound, moved: RerouteResult) -> None:
        super().__init__()
        self.left, self.moved = left, moved


def release(ledger: Ledger, fleet: LaneSet, lane: str, to: str | None, *, now: float, reason: str | None = None,
            who: str | None = None) -> tuple[Bound, RerouteResult | None]:
    """Make the lane safe to remove: with ``to``, drain it and move its queued missions and sessions there first.

    Raises ``Conflict`` (``lane_in_use``) while anything is still bound to it afterwards: without ``to`` any work
    or session; with it, missions still in flight or what ``to`` could not take (a class it does not serve, a
    session with queued missions of such a class). All or nothing: a refusal moves nothing (the moves are one
    transaction, rolled back); only the drain stays, so what runs finishes and the next try finds it done.
    Returns what was bound before and what was moved."""
    before = bound(ledger, lane)
    moved = None
    if to is not None and before:
        if to == lane:
            raise Conflict(f"cannot move lane {lane!r}'s work to itself", "name another lane with --reroute-to",
                           "reroute_self")
        fleet.get(to)
        if lane in fleet.lanes:
            drain(ledger, fleet, lane, now=now, reason=reason or f"removing the lane; work moves to {to}", who=who)
        try:
            with ledger.transaction():
                moved = reroute(ledger, fleet, lane, to, now=now, sessions=True, reason=reason or "lane removed",
                                who=who)
                left = bound(ledger, lane)
                if left:
                    raise _Refused(left, moved)
        except _Refused as exc:
            left, tried = exc.left, exc.moved
            if tried.skipped:
                why = "; ".join(f"{k}: {v}" for k, v in sorted(tried.skipped.items())[:10])
                fix = (f"{to} cannot take {why}; name a lane that serves them, cancel them, or put them on "
                       f"another lane first ('lanectl reroute {lane} --to OTHER --class CLASS')")
            elif left.in_flight:
                fix = (f"the lane is {'draining' if lane in fleet.lanes else 'gone'}: wait ('lanectl drain {lane} "
                       f"--wait') or cancel them, then run this again")
            else:
                fix = f"see 'lanectl reroute {lane} --to {to} --sessions --json'"
            raise Conflict(f"lane {lane!r} still has work bound to it: {left.describe()}; nothing was moved"
                           + (" (the lane was left draining)" if lane in fleet.lanes else ""),
                           fix, "lane_in_use") from None
    left = bound(ledger, lane) if moved is not None else before
    if left:
        fix = (f"move it first: 'lanectl lane remove {lane} --reroute-to OTHER' (or 'lanectl reroute {lane} "
               f"--to OTHER --sessions'), or cancel it")
        raise Conflict(f"lane {lane!r} still has work bound to it: {left.describe()}", fix, "lane_in_use")
    return before, moved


def owners(conn: Any) -> dict[str, str]:
    """Each lane's owning host as recorded (issue 13; lanes no host has claimed yet are left out)."""
    return {r[0]: r[1] for r in conn.execute("SELECT name, host FROM lanes WHERE host IS NOT NULL")}


def set_host(conn: Any, lane: str, host: str | None, *, now: float) -> None:
    """Record that ``host`` runs ``lane`` (None: no host does) (``lanectl.ledger.hosts``, inside its transaction with the ``lane_host``
    event); a new row's ``updated_at`` is ``now``, an old one keeps its own (its dispatch state did not change)."""
    conn.execute("INSERT INTO lanes (name, host, updated_at) VALUES (?, ?, ?) "
                 "ON CONFLICT (name) DO UPDATE SET host = excluded.host", (lane, host, now))


def set_spec(conn: Any, lane: str, spec: str) -> None:
    """Publish what other hosts' policy passes need of ``lane`` (JSON: ``lanectl.ledger.tick.lane_spec``), inside
    its host's claim (``lanectl.ledger.hosts.claim_in``)."""
    conn.execute("UPDATE lanes SET spec = ? WHERE name = ? AND spec IS NOT ?", (spec, lane, spec))


def spec_of(conn: Any, lane: str) -> tuple[str | None, dict[str, Any] | None]:
    """``lane``'s owning host and its published spec, as the ledger knows them ((None, None): no host has it)."""
    row = conn.execute("SELECT host, spec FROM lanes WHERE name = ? AND host IS NOT NULL", (lane,)).fetchone()
    if row is None:
        return None, None
    return row[0], (None if row[1] is None else json.loads(row[1]))

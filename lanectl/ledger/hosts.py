"""Hosts sharing one ledger (issue 13): who they are, which incarnation of each runs, their leases, their lanes.

The ``hosts`` table has one row per host whose supervisor has ever started on this ledger; this module is its
only writer. A supervisor :func:`register` s at start with a new random *incarnation*: the row then names that
incarnation, and the host claims the lanes of its ``lanes.d/`` (``lanes.host``, written through
``lanectl.ledger.lanes``). A lane another host owns is refused (``lane_owned_by_other_host``, exit 3) unless that
host was declared dead (:func:`reap`) or forgotten (``lanectl host forget``): lane names are unique across the
fleet. The running supervisor :func:`renew` s its lease; a renew that finds another incarnation in the row (the
host started again elsewhere, was declared dead or forgotten) changes nothing and returns False, and the supervisor
fences itself (docs/multihost.md). Any live host :func:`reap` s hosts whose lease has run out: dead, their lanes'
attempts lost, their missions re-queued or dead.

Every time is the ledger's clock (``Ledger.clock``: on PostgreSQL the database server's), passed in as ``now``.
"""
from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from lanectl.errors import Conflict, ExitCode, LanectlError, NotFound
from lanectl.ledger import Ledger
from lanectl.ledger import lanes as lane_ops
from lanectl.ledger import missions as ms
from lanectl.ledger.events import EventKind, append
from lanectl.states import RELEASED

_RECORD = "name, incarnation, boot_id, pid, started_at, heartbeat_at, lease_expires, state"
"""What a supervisor's start writes (``register``)."""
_COLUMNS = _RECORD + ", drained_at, drained_by"


@dataclass(frozen=True)
class Host:
    """One row of ``hosts``."""

    name: str
    incarnation: str
    boot_id: str
    pid: int
    started_at: float
    heartbeat_at: float
    lease_expires: float
    state: str
    drained_at: float | None = None
    """When an operator drained the host (``lanectl host drain``): its lanes take no new work. None: not drained.
    A flag beside ``state``: it outlives restarts of the host's supervisor (``register`` leaves it alone)."""
    drained_by: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def get(conn: Any, name: str) -> Host | None:
    row = conn.execute(f"SELECT {_COLUMNS} FROM hosts WHERE name = ?", (name,)).fetchone()
    return None if row is None else Host(*row)


def holds(conn: Any, name: str, incarnation: str) -> bool:
    """Whether ``incarnation`` still holds host ``name``'s record and it is ``up`` (a policy pass checks it inside
    its transaction: ``lanectl.ledger.tick.run_once``)."""
    return conn.execute("SELECT 1 FROM hosts WHERE name = ? AND incarnation = ? AND state = 'up'",
                        (name, incarnation)).fetchone() is not None


def all_hosts(conn: Any) -> list[Host]:
    return [Host(*r) for r in conn.execute(f"SELECT {_COLUMNS} FROM hosts ORDER BY name")]


def conflicts(conn: Any, name: str, lanes: list[str] | tuple[str, ...] | set[str]) -> list[tuple[str, str]]:
    """``(lane, other host)`` for each of ``lanes`` that another host owns and that is not dead or forgotten."""
    owners = lane_ops.owners(conn)
    states = {h.name: h.state for h in all_hosts(conn)}
    return [(lane, owners[lane]) for lane in sorted(lanes)
            if owners.get(lane) not in (None, name) and states.get(owners[lane], RELEASED[0]) not in RELEASED]


def owned_elsewhere(name: str, found: list[tuple[str, str]]) -> LanectlError:
    """The error a start (or a reload) gets when lanes of its ``lanes.d/`` belong to another host."""
    what = ", ".join(f"{lane!r} (host {other!r})" for lane, other in found)
    other = found[0][1]
    return LanectlError(
        f"host {name!r} cannot run lanes that another host owns: {what}; lane names are unique across the fleet",
        f"if host {other!r} is really gone for good, 'lanectl host forget {other}' releases its lanes; otherwise "
        f"rename the lane on this host (or remove it from this host's lanes.d/)",
        "lane_owned_by_other_host", ExitCode.CONFIG)


Specs = Mapping[str, Mapping[str, Any]]
"""Each lane's published policy view (``lanectl.ledger.tick.lane_spec``), for other hosts' passes."""


def register(ledger: Ledger, name: str, incarnation: str, boot_id: str, pid: int, now: float, lease_sec: float,
             lanes: list[str] | tuple[str, ...] | set[str] = (), *, exclusive: bool = False,
             specs: Specs | None = None, machine: str | None = None) -> Host | None:
    """A supervisor starts: record its new ``incarnation`` (state ``up``, lease until ``now + lease_sec``) and
    claim ``lanes`` for host ``name``, in one transaction with a ``host_started`` event (``previous``: the
    incarnation it replaces) and a ``lane_host`` event per lane whose owner changes. Returns the record it
    replaced (None for a new host).

    A lane owned by another host that is not dead or forgotten refuses the whole start (``lane_owned_by_other_host``,
    exit 3; nothing written). ``exclusive`` (an SQLite ledger, which one host alone can open) takes such lanes
    over instead: the file cannot be shared, so another name in it is this same machine renamed.

    ``machine`` (the supervisor's machine id, kept in its state directory): on a shared ledger, a record that is
    ``up`` with its lease running, written from another machine, refuses the start (``host_name_in_use``, exit 5;
    nothing written): a second machine was given this host's name (a copied ``lanectl.toml``, cloned machines
    with one host name). Taking the record over would fence the real host's supervisor for good and release its
    lanes. Once that lease has run out (the other machine is gone) the start goes through; the same machine (its
    supervisor restarted) always does."""
    with ledger.transaction() as conn:
        found = conflicts(conn, name, lanes)
        if found and not exclusive:
            raise owned_elsewhere(name, found)
        old = get(conn, name)
        if old is not None and not exclusive and machine is not None and old.state == "up" \
                and old.lease_expires > now:
            other = conn.execute("SELECT machine FROM hosts WHERE name = ?", (name,)).fetchone()[0]
            if other is not None and other != machine:
                raise Conflict(f"host {name!r} is up on another machine: incarnation {old.incarnation[:8]} (pid "
                               f"{old.pid}) renewed its lease {now - old.heartbeat_at:.1f}s ago, it runs for "
                               f"{old.lease_expires - now:.1f}s more; this machine's id differs from the one "
                               "that runs it",
                               f"give this machine its own name ('host = \"NAME\"' in lanectl.toml; names must "
                               f"be unique across the fleet); if the machine that ran {name!r} is gone for good, "
                               f"this start goes through once its lease has run out (systemd retries it)",
                               "host_name_in_use")
        conn.execute(f"INSERT INTO hosts ({_RECORD}) VALUES (?, ?, ?, ?, ?, ?, ?, 'up') ON CONFLICT (name) DO UPDATE "
                     "SET incarnation = excluded.incarnation, boot_id = excluded.boot_id, pid = excluded.pid, "
                     "started_at = excluded.started_at, heartbeat_at = excluded.heartbeat_at, "
                     "lease_expires = excluded.lease_expires, state = 'up'",
                     (name, incarnation, boot_id, pid, now, now, now + lease_sec))
        if machine is not None:
            conn.execute("UPDATE hosts SET machine = ? WHERE name = ?", (machine, name))
        append(conn, EventKind.HOST_STARTED, now, host=name, incarnation=incarnation,
               previous=None if old is None else old.incarnation,
               previous_state=None if old is None else old.state, boot_id=boot_id,
               rebooted=None if old is None else old.boot_id != boot_id, pid=pid, lease_sec=lease_sec)
        claim_in(conn, name, lanes, now=now, specs=specs)
        return old


def claim_in(conn: Any, name: str, lanes: list[str] | tuple[str, ...] | set[str], *, now: float,
             specs: Specs | None = None) -> list[str]:
    """Host ``name`` owns exactly ``lanes`` (inside the caller's transaction, after :func:`conflicts` was checked):
    it claims those it did not own and releases those it owned that are no longer among them (a lane removed from
    its ``lanes.d/`` may then be added on another host). The lanes whose owner changed, each with a ``lane_host``
    event (``host`` absent: released). ``specs``: what other hosts' passes need of each lane, published with it.
    A lane's ``fallback`` that no host of the ledger has is refused (``fallback_unknown``, exit 3)."""
    if specs:
        check_fallbacks(conn, name, lanes, specs)
    owners = lane_ops.owners(conn)
    changed = []
    for lane in sorted(lanes):
        if owners.get(lane) != name:
            lane_ops.set_host(conn, lane, name, now=now)
            append(conn, EventKind.LANE_HOST, now, lane=lane, host=name, previous=owners.get(lane))
            changed.append(lane)
    for lane in sorted(set(owners) - set(lanes)):
        if owners[lane] == name:
            lane_ops.set_host(conn, lane, None, now=now)
            append(conn, EventKind.LANE_HOST, now, lane=lane, host=None, previous=name)
            changed.append(lane)
    for lane in sorted(lanes):
        if specs and lane in specs:
            lane_ops.set_spec(conn, lane, json.dumps(specs[lane], sort_keys=True, separators=(",", ":")))
    return changed


def check_fallbacks(conn: Any, name: str, lanes: Any, specs: Specs) -> None:
    """Each lane's fallback is one of ``lanes`` or a lane another host of this ledger runs (a lane on another
    host is known once that host's supervisor has started with it); else ``fallback_unknown`` (exit 3)."""
    known = set(lanes) | set(lane_ops.owners(conn))
    bad = sorted((lane, spec["fallback"]) for lane, spec in specs.items()
                 if lane in lanes and spec.get("fallback") and spec["fallback"] not in known)
    if bad:
        lane, fb = bad[0]
        raise LanectlError(
            f"host {name!r}: lane {lane!r} falls back to {fb!r}, which no host of the ledger runs "
            f"(lanes.d/{lane}.toml, field fallback)", f"start the host that runs {fb!r} first (its supervisor publishes its lanes), fix "
            "the name, or remove the field", "fallback_unknown", ExitCode.CONFIG)


def claim(ledger: Ledger, name: str, incarnation: str, lanes: list[str] | tuple[str, ...] | set[str], *,
          now: float, exclusive: bool = False, specs: Specs | None = None) -> list[str]:
    """A running supervisor adopts lanes (a reload): the same refusal as :func:`register`, and only while
    ``incarnation`` is still the host's current one (else ``host_superseded``, exit 5)."""
    with ledger.transaction() as conn:
        cur = get(conn, name)
        if cur is None or cur.incarnation != incarnation or cur.state != "up":
            raise Conflict(f"host {name!r}: this supervisor's incarnation {incarnation[:8]} is no longer the "
                           "host's current one", "restart the supervisor", "host_superseded")
        found = conflicts(conn, name, lanes)
        if found and not exclusive:
            raise owned_elsewhere(name, found)
        return claim_in(conn, name, lanes, now=now, specs=specs)


def renew(ledger: Ledger, name: str, incarnation: str, now: float, lease_sec: float, *,
          unfenced_after: float | None = None, lane_units: str | None = None) -> bool:
    """Extend the lease of host ``name`` to ``now + lease_sec`` if ``incarnation`` is still its current one and
    it is ``up``; False (nothing written) when another incarnation holds the record or it was forgotten or
    stopped. ``unfenced_after`` (seconds fenced): a successful renew also records ``host_unfenced``.
    ``lane_units``: what the supervisor last saw of its lanes' units (JSON text, ``lanectl.ledger.fleetview``),
    stored with the lease in the same row write; None keeps the one stored."""
    with ledger.transaction() as conn:
        cur = conn.execute("UPDATE hosts SET heartbeat_at = ?, lease_expires = ?, lane_units = coalesce(?, lane_units) "
                           "WHERE name = ? AND incarnation = ? AND state = 'up'",
                           (now, now + lease_sec, lane_units, name, incarnation))
        ok = cur.rowcount == 1
        if ok and unfenced_after is not None:
            append(conn, EventKind.HOST_UNFENCED, now, host=name, incarnation=incarnation,
                   fenced_s=round(unfenced_after, 3))
        return ok


def record_fenced(ledger: Ledger, name: str, incarnation: str, now: float, reason: str,
                  since: float | None = None) -> None:
    """The supervisor of ``name`` stopped claiming new work (``reason``) from ``since`` (default ``now``): a
    ``host_fenced`` event, written at ``now`` (a fence for want of a renewal is recorded when the ledger answers
    again, after it began)."""
    with ledger.transaction() as conn:
        append(conn, EventKind.HOST_FENCED, now, host=name, incarnation=incarnation, reason=reason,
               since=round(now if since is None else since, 3))


def stop(ledger: Ledger, name: str, incarnation: str, now: float) -> bool:
    """A supervisor closes cleanly: its record becomes ``stopped`` (its lanes stay the host's), if ``incarnation``
    is still the current one; False otherwise (nothing written)."""
    with ledger.transaction() as conn:
        cur = conn.execute("UPDATE hosts SET state = 'stopped', heartbeat_at = ? WHERE name = ? AND incarnation = ? "
                           "AND state = 'up'", (now, name, incarnation))
        if cur.rowcount != 1:
            return False
        append(conn, EventKind.HOST_STOPPED, now, host=name, incarnation=incarnation)
        return True


def forget(ledger: Ledger, name: str, *, now: float, who: str, force: bool = False) -> bool:
    """``lanectl host forget NAME``: the host is gone for good, its lanes may be claimed by another host. Refused
    while its lease runs (``host_alive``, exit 5: a live supervisor would go on running them) unless ``force``;
    ``host_unknown`` (exit 4) for a host never recorded; False when it was forgotten already."""
    with ledger.transaction() as conn:
        cur = get(conn, name)
        if cur is None:
            known = ", ".join(h.name for h in all_hosts(conn)) or "none"
            raise NotFound(f"no host {name!r} in the ledger (hosts: {known})", "see 'lanectl hosts'",
                           "host_unknown")
        if cur.state == "forgotten":
            return False
        if cur.state == "up" and cur.lease_expires > now and not force:
            raise Conflict(f"host {name!r} is up: its lease runs for {cur.lease_expires - now:.1f}s more "
                           f"(incarnation {cur.incarnation[:8]}, pid {cur.pid})",
                           f"stop its supervisor first ('systemctl stop lanectl-supervisor' on {name}), or wait "
                           "until its lease has run out; --force forgets it anyway", "host_alive")
        lanes = sorted(lane for lane, host in lane_ops.owners(conn).items() if host == name)
        conn.execute("UPDATE hosts SET state = 'forgotten' WHERE name = ?", (name,))
        append(conn, EventKind.HOST_FORGOTTEN, now, host=name, incarnation=cur.incarnation, lanes=lanes,
               previous=cur.state, actor=who, forced=force)
        return True


def reap(ledger: Ledger, now: float, *, by: str) -> list[dict[str, Any]]:
    """Declare dead every host (other than ``by``, the caller's) whose record is ``up`` with its lease run out by
    ``now``, the ledger's clock: one transaction per host sets it ``dead``, loses every attempt in flight on its
    lanes (each mission re-queued, attempt n+1, or dead when its attempts are used up, with its event) and appends
    ``host_dead``. Idempotent, and safe for any number of hosts at once: the transaction re-reads the record
    (writers are serialised) and does nothing for a host that renewed, restarted or was reaped meanwhile. A late
    outcome of a lost attempt is then refused by the usual fencing (attempt + token). Returns what was reaped."""
    candidates = [(r[0], r[1]) for r in ledger.conn.execute(
        "SELECT name, incarnation FROM hosts WHERE state = 'up' AND lease_expires <= ? AND name <> ? ORDER BY name",
        (now, by))]
    out = []
    for name, incarnation in candidates:
        with ledger.transaction() as conn:
            cur = conn.execute("UPDATE hosts SET state = 'dead' WHERE name = ? AND incarnation = ? AND state = 'up' "
                               "AND lease_expires <= ? RETURNING lease_expires", (name, incarnation, now)).fetchone()
            if cur is None:
                continue
            lanes = sorted(lane for lane, host in lane_ops.owners(conn).items() if host == name)
            reason = f"host {name} lost: its lease ran out (declared dead by {by})"
            lost = [m for lane in lanes for m in ms.lose_lane_in(conn, lane, reason, now=now)]
            append(conn, EventKind.HOST_DEAD, now, host=name, incarnation=incarnation, by=by,
                   lease_expires=cur[0], lanes=lanes, missions=lost)
            out.append({"host": name, "incarnation": incarnation, "lanes": lanes, "missions": lost})
    return out


def away(conn: Any) -> dict[str, tuple[str, bool]]:
    """Each host whose lanes cannot take new work now, with why and whether their sessions move elsewhere (dead,
    forgotten, drained: yes; stopped: no, it is expected back)."""
    out: dict[str, tuple[str, bool]] = {}
    for h in all_hosts(conn):
        if h.state in RELEASED:
            out[h.name] = (f"its host {h.name} is {h.state}", True)
        elif h.drained_at is not None:
            out[h.name] = (f"its host {h.name} is drained", True)
        elif h.state == "stopped":
            out[h.name] = (f"its host {h.name} is stopped", False)
    return out


def _known(conn: Any, name: str) -> Host:
    cur = get(conn, name)
    if cur is None:
        known = ", ".join(h.name for h in all_hosts(conn)) or "none"
        raise NotFound(f"no host {name!r} in the ledger (hosts: {known})", "see 'lanectl hosts'", "host_unknown")
    return cur


def lanes_of(conn: Any, name: str) -> list[str]:
    return sorted(lane for lane, host in lane_ops.owners(conn).items() if host == name)


def in_flight(conn: Any, name: str) -> list[int]:
    """The missions dispatched or running on host ``name``'s lanes."""
    return [r[0] for r in conn.execute(
        "SELECT m.id FROM missions m JOIN lanes l ON l.name = m.current_lane WHERE l.host = ? "
        "AND m.state IN ('dispatched', 'running') ORDER BY m.id", (name,))]


def drain(ledger: Ledger, name: str, *, now: float, who: str, reason: str | None = None) -> bool:
    """``lanectl host drain NAME``: host ``name``'s lanes take no new work (every host's policy pass sees it: its
    own claims nothing for them, sessions bound to them move), what they run finishes. A flag, not a ``state``:
    it outlives restarts of the host's supervisor. ``host_drained`` event; False when it was drained already;
    ``host_unknown`` (exit 4)."""
    with ledger.transaction() as conn:
        cur = _known(conn, name)
        if cur.drained_at is not None:
            return False
        conn.execute("UPDATE hosts SET drained_at = ?, drained_by = ? WHERE name = ?", (now, who, name))
        append(conn, EventKind.HOST_DRAINED, now, host=name, actor=who, reason=reason, state=cur.state,
               lanes=lanes_of(conn, name), in_flight=len(in_flight(conn, name)))
        return True


def undrain(ledger: Ledger, name: str, *, now: float, who: str, reason: str | None = None) -> bool:
    """``lanectl host undrain NAME``: its lanes take work again (``host_undrained``); False when it was not
    drained; ``host_unknown`` (exit 4). Sessions that moved away meanwhile stay where they went."""
    with ledger.transaction() as conn:
        cur = _known(conn, name)
        if cur.drained_at is None:
            return False
        conn.execute("UPDATE hosts SET drained_at = NULL, drained_by = NULL WHERE name = ?", (name,))
        append(conn, EventKind.HOST_UNDRAINED, now, host=name, actor=who, reason=reason,
               drained_s=round(now - cur.drained_at, 3), drained_by=cur.drained_by)
        return True


def listing(ledger: Ledger, now: float) -> list[dict[str, Any]]:
    """``lanectl hosts``: every host with its state, lease and lanes, and how many missions are in flight
    (dispatched or running) on its lanes; ``lease_left_s`` is negative once the lease has run out."""
    conn = ledger.conn
    owners = lane_ops.owners(conn)
    flying = dict(conn.execute(
        "SELECT l.host, count(*) FROM missions m JOIN lanes l ON l.name = m.current_lane "
        "WHERE m.state IN ('dispatched', 'running') AND l.host IS NOT NULL GROUP BY l.host").fetchall())
    out = []
    for h in all_hosts(conn):
        out.append({**h.as_dict(), "heartbeat_age_s": round(now - h.heartbeat_at, 3),
                    "lease_left_s": round(h.lease_expires - now, 3),
                    "expired": h.state == "up" and h.lease_expires <= now, "drained": h.drained_at is not None,
                    "lanes": sorted(lane for lane, host in owners.items() if host == h.name),
                    "in_flight": int(flying.get(h.name, 0))})
    return out

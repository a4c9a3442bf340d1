"""The fleet as the ledger records it (issue 13, fleet-wide views): every host's record judged at one instant,
which host owns each lane, what each lane holds in flight. ``status``, ``probe``, ``metrics`` and ``events`` read
it; nothing here writes.

A host's *status* is one word derived from its record and the ledger's clock ``now``:

- ``up``: its lease runs and was renewed within ``lease - margin``;
- ``fenced``: its lease still runs but was not renewed for ``lease - margin`` or more: by then its supervisor has
  stopped claiming new work (``lanectl.supervisor.hostlease``: it cannot reach the ledger, or it is frozen); the
  margin is the supervisor's own, ``max(1 s, lease / 10)`` (``HostSettings.fence_margin_s``), the lease the
  record's ``lease_expires - heartbeat_at``;
- ``expired``: recorded ``up`` with its lease run out: any live host declares it dead within a second (SQLite: one
  host, nothing reaps it; its supervisor is not running);
- ``stopped``, ``dead``, ``forgotten``: as recorded (``lanectl.ledger.hosts``).

Light imports only: ``lanectl probe`` and ``lanectl status`` import this on their start-up path.
"""
from __future__ import annotations

import json
from typing import Any

from lanectl.ledger.windows import Source, _c

MISSIONS_NAMED = 10
"""How many mission ids a host's view names (``missions``); ``in_flight`` counts them all."""


def margin(lease_s: float) -> float:
    """The supervisor's fence margin for a lease of ``lease_s`` (``HostSettings.fence_margin_s``)."""
    return max(1.0, lease_s / 10)


def has_hosts(src: Source) -> bool:
    """Whether the ledger has the hosts (0008_hosts): an SQLite file that its supervisor has not migrated yet (the
    package upgraded, the supervisor not restarted yet) has not, and a reader never migrates. Asked of the catalog,
    so that nothing fails inside a PostgreSQL transaction."""
    conn = _c(src)
    if getattr(conn, "dialect", None) == "postgresql":
        return bool(conn.execute("SELECT to_regclass('hosts') IS NOT NULL").fetchone()[0])
    return conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'hosts'").fetchone() is not None


def has_column(src: Source, column: str, table: str = "hosts") -> bool:
    """Whether ``table`` has ``column`` (a later migration's: ``hosts.drained_at`` and ``lanes.spec`` 0009,
    ``hosts.lane_units`` 0010), asked of the catalog like :func:`has_hosts`."""
    conn = _c(src)
    if getattr(conn, "dialect", None) == "postgresql":
        return conn.execute("SELECT 1 FROM information_schema.columns WHERE table_schema = current_schema() "
                            "AND table_name = ? AND column_name = ?", (table, column)).fetchone() is not None
    return conn.execute("SELECT 1 FROM pragma_table_info(?) WHERE name = ?", (table, column)).fetchone() is not None


def lane_units(src: Source) -> dict[str, dict[str, dict[str, Any]]]:
    """Host -> lane -> what that host's supervisor last saw of the lane's unit, written with its last lease renewal
    (``hosts.renew``; as of its ``heartbeat_at``): ``unit`` (systemd's ActiveState/SubState), ``pid``,
    ``restarts`` (systemd's NRestarts), ``healthy``. Hosts that have not renewed since they started this version
    (or a ledger older than 0010_host_lane_units) are left out."""
    if not has_hosts(src) or not has_column(src, "lane_units"):
        return {}
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for name, text in _c(src).execute("SELECT name, lane_units FROM hosts WHERE lane_units IS NOT NULL"):
        try:
            doc = json.loads(text)
        except ValueError:
            continue
        if isinstance(doc, dict):
            out[name] = {k: v for k, v in doc.items() if isinstance(v, dict)}
    return out


def lane_hosts(src: Source) -> dict[str, str]:
    """Lane -> the host that owns it, for every lane some host has claimed."""
    if not has_hosts(src):
        return {}
    return {r[0]: r[1] for r in _c(src).execute("SELECT name, host FROM lanes WHERE host IS NOT NULL")}


def in_flight(src: Source) -> dict[str, list[int]]:
    """Lane -> ids of the missions dispatched to or running on it now (``missions_current_lane`` range)."""
    out: dict[str, list[int]] = {}
    for lane, mid in _c(src).execute("SELECT current_lane, id FROM missions WHERE state IN ('dispatched', 'running') "
                                     "AND current_lane IS NOT NULL ORDER BY id"):
        out.setdefault(lane, []).append(int(mid))
    return out


def lane_rows(src: Source) -> dict[str, dict[str, Any]]:
    """Lane -> what its supervisor last recorded of it: dispatch ``state``, ``healthy``, ``invocation`` (systemd's
    InvocationID of its unit), ``updated_at``, ``host`` and ``weight`` (its lane file's, as its host published
    it; None when not published)."""
    host = "host" if has_hosts(src) else "NULL"
    spec = "spec" if has_column(src, "spec", "lanes") else "NULL"
    rows = _c(src).execute(f"SELECT name, state, healthy, invocation, updated_at, {host}, {spec} FROM lanes").fetchall()
    return {r[0]: {"state": r[1], "healthy": None if r[2] is None else bool(r[2]), "invocation": r[3],
                   "updated_at": r[4], "host": r[5], "weight": _spec_weight(r[6])} for r in rows}


def _spec_weight(text: str | None) -> int | None:
    try:
        weight = json.loads(text).get("weight") if text else None
    except (ValueError, AttributeError):
        return None
    return weight if isinstance(weight, int) and not isinstance(weight, bool) else None


def status_of(state: str, heartbeat_at: float, lease_expires: float, now: float) -> str:
    """The one-word status of a host record at ``now`` (module docstring)."""
    if state != "up":
        return state
    if lease_expires <= now:
        return "expired"
    if now - heartbeat_at >= (lease_expires - heartbeat_at) - margin(lease_expires - heartbeat_at):
        return "fenced"
    return "up"


def hosts(src: Source, now: float, flying: dict[str, list[int]] | None = None,
          owners: dict[str, str] | None = None) -> list[dict[str, Any]]:
    """Every host recorded, by name: ``name``, ``state`` (as recorded), ``status`` (module docstring),
    ``incarnation``, ``pid``, ``heartbeat_at``, ``heartbeat_age_s``, ``lease_s``, ``lease_expires``,
    ``lease_left_s`` (negative once run out), ``lanes``, ``in_flight`` (missions dispatched or running on its
    lanes), ``missions`` (the first MISSIONS_NAMED of their ids) and ``drained``, ``drained_at``, ``drained_by``
    (``lanectl host drain``: its lanes take no new work, whatever its status)."""
    conn = _c(src)
    if not has_hosts(src):
        return []
    flying = in_flight(src) if flying is None else flying
    owners = lane_hosts(src) if owners is None else owners
    drain = "drained_at, drained_by" if has_column(src, "drained_at") else "NULL, NULL"
    out = []
    for name, inc, pid, hb, lease, state, drained_at, drained_by in conn.execute(
            f"SELECT name, incarnation, pid, heartbeat_at, lease_expires, state, {drain} FROM hosts ORDER BY name"):
        lanes = sorted(lane for lane, h in owners.items() if h == name)
        ids = sorted(m for lane in lanes for m in flying.get(lane, []))
        out.append({"name": name, "state": state, "status": status_of(state, hb, lease, now), "incarnation": inc,
                    "pid": pid, "heartbeat_at": hb, "heartbeat_age_s": round(now - hb, 3),
                    "lease_s": round(lease - hb, 3), "lease_expires": lease, "lease_left_s": round(lease - now, 3),
                    "lanes": lanes, "in_flight": len(ids), "missions": ids[:MISSIONS_NAMED],
                    "drained": drained_at is not None, "drained_at": drained_at, "drained_by": drained_by})
    return out


def view(src: Source, now: float) -> dict[str, Any]:
    """One read of the fleet: ``hosts`` (:func:`hosts`; empty on a ledger without them), ``lanes``
    (:func:`lane_rows`), ``in_flight`` (lane -> mission ids) and ``units`` (:func:`lane_units`)."""
    flying = in_flight(src)
    lanes = lane_rows(src)
    owners = {k: v["host"] for k, v in lanes.items() if v["host"]}
    return {"hosts": hosts(src, now, flying, owners), "lanes": lanes, "in_flight": flying, "units": lane_units(src)}

"""Helpers of the two-host tests under real systemd (tests/systemd/test_multihost.py, test_multihost_chaos.py): a
host is a private systemd of its own (scripts/sdbox) with its own configuration, all hosts sharing one PostgreSQL
ledger; these start and read them."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.systemd.conftest import _boot
from tests.systemd.lanehelpers import Fleet, host_config, sql, up_fleet, wait_for

SUP = "lanectl-supervisor.service"


def start_host(request: pytest.FixtureRequest, tmp: Path, name: str, lanes: dict[str, str], url: str, extra: str,
               *, watchdog_sec: float = 60, config: Path | None = None, machine_id: str | None = None) -> Fleet:
    """A host of its own: a new sandbox (torn down by the request's finalizer), its configuration (``config``: one
    written before, e.g. the same host's again after it was torn down; else a new one under ``tmp``), installed,
    up, its lanes healthy. ``machine_id``: the supervisor's machine id to find on its disk (a machine that boots
    again keeps /var/lib/lanectl, which the harness discards with a sandbox)."""
    sb = _boot(request)
    if machine_id:
        sb.exec(["install", "-D", "-m", "0644", "/dev/stdin", "/var/lib/lanectl/machine-id"], input=machine_id + "\n",
                check=True)
    cfg = config or host_config(tmp / f"host-{name}", name, lanes, url, extra, watchdog_sec=watchdog_sec)
    f = up_fleet(sb, cfg)
    f.host = name  # type: ignore[attr-defined]
    f.lane_names = sorted(lanes)  # type: ignore[attr-defined]
    wait_for(lambda: all_up(f), 90, interval=0.5, what=f"host {name}'s lanes healthy")
    return f


def stop_host(f: Fleet) -> None:
    if f.sb.running():
        f.lanectl("down")


def health(f: Fleet, port: int = 8700) -> dict[str, Any]:
    """The supervisor's /healthz (``port`` 8700), or a lane runtime's (its port), from inside the host; {} when it
    does not answer."""
    proc = f.sb.exec(["curl", "-s", "-m", "5", f"http://127.0.0.1:{port}/healthz"], check=False)
    try:
        return json.loads(proc.stdout) if proc.returncode == 0 and proc.stdout else {}
    except ValueError:
        return {}


def all_up(f: Fleet) -> bool:
    h = health(f)
    return bool(h.get("lanes")) and all(ln["healthy"] and ln["state"] == "active" for ln in h["lanes"].values())


def hosts(f: Fleet) -> dict[str, dict[str, Any]]:
    code, doc = f.json("hosts")
    assert code == 0, doc
    return {h["name"]: h for h in doc["data"]["hosts"]}


def last_event(f: Fleet) -> int:
    return int(sql(f, "SELECT coalesce(max(id), 0) FROM events")[0][0])


def events(f: Fleet, kind: str, after: int = 0, **match: Any) -> list[dict[str, Any]]:
    """Events of ``kind`` after event id ``after`` whose data has every ``match`` key equal: id, at, mission, lane,
    attempt and the data's keys."""
    out = []
    for eid, at, mission, lane, attempt, data in sql(f, "SELECT id, at, mission, lane, attempt, data FROM events "
                                                       "WHERE kind = ? AND id > ? ORDER BY id", kind, after):
        d = data if isinstance(data, dict) else json.loads(data)
        if all(d.get(k) == v for k, v in match.items()):
            out.append({**d, "id": eid, "at": at, "mission": mission, "lane": lane, "attempt": attempt})
    return out


def in_flight_on(f: Fleet, ids: list[int], lanes: list[str], state: str = "running") -> int:
    rows = sql(f, f"SELECT count(*) FROM missions WHERE state = ? AND id BETWEEN ? AND ? AND current_lane IN "
                  f"({','.join('?' * len(lanes))})", state, min(ids), max(ids), *lanes)
    return int(rows[0][0])


def nrestarts(f: Fleet) -> int:
    return int(f.show(SUP, "NRestarts")["NRestarts"])


def supervisor_pid(f: Fleet) -> int:
    return int(f.show(SUP, "MainPID")["MainPID"])





def overlay_machine_id(f: Fleet) -> str | None:
    """The machine id a dead sandbox's supervisor kept (lanectl.supervisor.hostlease.machine_id), read from its /var
    overlay like :func:`overlay_executions`."""
    p = f.sb.state_dir / "run" / "ovl" / "var.upper" / "lib" / "lanectl" / "machine-id"
    return p.read_text().strip() if p.is_file() else None


def overlay_executions(f: Fleet, lanes: list[str], root: str = "/var/lib/lanes") -> list[dict[str, Any]]:
    """What the lanes of a host whose sandbox is dead (killed, ``down`` not run yet) had logged: their executions
    logs, read on the host's side from the sandbox's /var overlay (which ``down`` discards)."""
    upper = f.sb.state_dir / "run" / "ovl" / "var.upper" / Path(root).relative_to("/var")
    out = []
    for lane in lanes:
        p = upper / lane / ".lanectl" / "executions.log"
        if p.is_file():
            out += [json.loads(line) for line in p.read_text().splitlines() if line.strip()]
    return out

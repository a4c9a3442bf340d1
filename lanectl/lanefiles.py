"""Create, show and remove lane files (``lanes.d/NAME.toml``) so that the result is always valid."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import tomli_w

from lanectl import config
from lanectl.config import NAME_RE, Lane, LaneSet
from lanectl.errors import Conflict, LanectlError, NotFound, Problem, config_error
from lanectl.fsutil import atomic_write
from lanectl.states import CLASSES, HELD


def _existing(config_path: str | Path | None) -> LaneSet:
    try:
        return config.load(config_path, require_lanes=False)
    except LanectlError as exc:
        raise LanectlError("the existing lane files are invalid; fix them first ('lanectl validate')",
                           code="config_invalid", exit_code=exc.exit_code, problems=exc.problems) from exc


def add(name: str, config_path: str | Path | None = None, *, port: int | None = None,
        workspace: str | None = None, classes: list[str] | None = None, capacity: int | None = None,
        weight: int | None = None, fallback: str | None = None, tags: list[str] | None = None,
        description: str | None = None) -> tuple[Path, dict[str, Any]]:
    """Write a new, valid lane file with a free port and a workspace of its own picked when not given."""
    if not NAME_RE.match(name):
        raise config_error([Problem(f"{name!r} is not a lane name", field="name",
                                    hint="use 1-31 of a-z 0-9 -, starting with a letter", code="bad_name")])
    fleet = _existing(config_path)
    path = fleet.lanes_dir / f"{name}.toml"
    if path.exists() or name in fleet.lanes:
        raise Conflict(f"lane {name!r} exists already ({path})", "edit the file, or remove it first", "lane_exists")
    doc: dict[str, Any] = {}
    if description:
        doc["description"] = description
    doc["port"] = port if port is not None else config.free_port({l.port for l in fleet.lanes.values()})
    root = fleet.settings.workspace_root
    doc["workspace"] = workspace or f"{root.rstrip('/')}/{name}"
    doc["classes"] = classes or list(CLASSES)
    doc["capacity"] = capacity if capacity is not None else 4
    doc["weight"] = weight if weight is not None else 100
    if fallback:
        doc["fallback"] = fallback
    if tags:
        doc["tags"] = tags
    # validate the new lane alone and together with the fleet before writing anything
    problems: list[Problem] = []
    try:
        lane = Lane.model_validate(doc)
    except Exception as exc:  # pydantic ValidationError
        from pydantic import ValidationError

        if not isinstance(exc, ValidationError):
            raise
        raise config_error(config.problems_from(exc, str(path), Lane, name)) from exc
    problems += [p for p in config.cross_check({**fleet.lanes, name: lane}, fleet.lanes_dir,
                                                 shared_ledger=config.shared_ledger(fleet.settings)) if p.lane == name
                 or name in p.message]
    if [p for p in problems if p.severity == "error"]:
        raise config_error(problems)
    atomic_write(path, tomli_w.dumps(doc), 0o644)
    return path, doc


def show(name: str, config_path: str | Path | None = None) -> dict[str, Any]:
    fleet = config.load(config_path)
    lane = fleet.get(name)
    return {
        "name": name,
        "file": str(fleet.lanes_dir / f"{name}.toml"),
        "user": lane.resolved_user(name),
        "session_prefix": lane.resolved_prefix(name),
        **lane.model_dump(exclude={"name", "user", "session_prefix"}),
    }


def live(name: str, unit_dir: str | None = None, config_path: str | Path | None = None) -> dict[str, Any]:
    """How the lane runs now, as ``lanectl status`` sees it: its unit, the ledger's dispatch state and the weight
    in force. What cannot be read (no systemd, no ledger) is "unknown" with ``state_error`` saying why."""
    from lanectl import paths
    from lanectl.errors import LanectlError
    from lanectl.status import collect, installed_fleet

    try:
        fleet = installed_fleet(paths.unit_dir(unit_dir), str(config_path) if config_path else None)
        if name not in fleet["lanes"]:
            return {"state": "not installed", "dispatch": "unknown"}
        row = collect(fleet["lanes"], [name], ledger=fleet.get("ledger"))[0]
    except LanectlError as exc:
        return {"state": "unknown", "dispatch": "unknown", "state_error": exc.message}
    out: dict[str, Any] = {"state": row.state, "unit_state": f"{row.active_state}/{row.sub_state}",
                           "result": row.result, "gave_up": row.gave_up, "dispatch": row.dispatch,
                           "weight_in_force": row.weight, "promoted": row.promoted}
    if row.dispatch in HELD:
        out.update(drained_by=row.drained_by, drain_reason=row.drain_reason, drained_by_lanectl=row.automatic)
    if row.dispatch_error:
        out["dispatch_error"] = row.dispatch_error
    return out


def remove(name: str, config_path: str | Path | None = None, *, ledger: str | Path | None = None,
           reroute_to: str | None = None, reason: str | None = None) -> tuple[Path, dict[str, Any]]:
    """Delete a lane file, never stranding work: refused (``lane_in_use``, exit 5) while missions or sessions are
    bound to the lane in the ledger, unless ``reroute_to`` names a lane that takes them (the lane is drained
    first; missions still in flight keep it refused until they finish). Returns the file and what was moved.

    A ledger that does not exist yet (nothing was ever installed) binds nothing; one named explicitly
    (``ledger``) must exist."""
    import time

    from lanectl.ledger import lanes as lane_ops
    from lanectl.ledger.where import exists as ledger_exists

    _, lanes_dir = config.resolve_dirs(config_path)
    path = lanes_dir / f"{name}.toml"
    if not path.exists():
        raise NotFound(f"no lane file {path}", "see 'lanectl lane list'", "lane_not_found")
    fleet = _existing(config_path)
    users = [n for n, l in fleet.lanes.items() if l.fallback == name and n != name]
    if users:
        raise Conflict(f"lanes {', '.join(users)} fall back to {name!r}",
                       "change their fallback first, then remove this lane", "lane_in_use")
    if reroute_to is not None:
        if reroute_to == name:
            raise Conflict(f"cannot move lane {name!r}'s work to itself", "name another lane with --reroute-to",
                           "reroute_self")
        fleet.get(reroute_to)
    moved: dict[str, Any] = {"missions": [], "sessions": []}
    if ledger is not None or ledger_exists(config.ledger_path(fleet)):
        with config.open_ledger(fleet, ledger) as led:
            _, res = lane_ops.release(led, fleet, name, reroute_to, now=led.clock(), reason=reason)
        if res is not None:
            moved = {"missions": res.missions, "sessions": res.sessions}
    path.unlink()
    return path, moved

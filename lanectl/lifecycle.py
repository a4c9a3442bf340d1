"""Start, stop and restart lanes through systemd (idempotent; every result says what changed)."""
from __future__ import annotations

from dataclasses import dataclass, field
from collections.abc import Callable
from typing import Any

from lanectl import systemd
from lanectl.errors import NotFound
from lanectl.poll import until
from lanectl.units import PROBE_TIMER, SUPERVISOR, TARGET


@dataclass
class OpResult:
    action: str
    lanes: list[str]
    changed: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    reset: dict[str, str] = field(default_factory=dict)
    """Lanes whose failed state was cleared first (``systemctl reset-failed``), with systemd's Result then
    (how its last run ended: ``signal``, ``exit-code``, ``start-limit-hit``)."""


def select(lanes: dict[str, dict[str, Any]], names: list[str] | None, *, enabled_only: bool) -> list[str]:
    if names:
        unknown = [n for n in names if n not in lanes]
        if unknown:
            raise NotFound(f"no lane named {unknown[0]!r} is installed",
                           f"known lanes: {', '.join(sorted(lanes)) or 'none'}; run 'lanectl install' first",
                           "lane_not_found")
        return list(dict.fromkeys(names))
    return [n for n in sorted(lanes) if lanes[n].get("enabled", True) or not enabled_only]


def active_states(units: list[str]) -> dict[str, str]:
    """Each unit's ActiveState (``unknown`` when systemd does not say)."""
    return {u: p.get("ActiveState", "unknown") for u, p in systemd.show(units, ("Id", "ActiveState")).items()}


def _clear_failed(res: OpResult, chosen: list[str], units: list[str]) -> dict[str, str]:
    """``systemctl reset-failed`` on every chosen unit that is failed (systemd gave up on it, or its last run
    failed): a failed unit that hit its start limit refuses start and restart until then. Returns the active
    states as they were; ``res.reset`` names what was cleared, with systemd's Result."""
    shown = systemd.show(units, ("Id", "ActiveState", "Result")) if units else {}
    before = {u: p.get("ActiveState", "unknown") for u, p in shown.items()}
    failed = [(n, u) for n, u in zip(chosen, units) if before.get(u) == "failed"]
    if failed:
        systemd.run("reset-failed", *(u for _, u in failed), check=False)
        for n, u in failed:
            res.reset[n] = shown[u].get("Result") or "failed"
    return before


def up(lanes: dict[str, dict[str, Any]], names: list[str] | None = None) -> OpResult:
    """Enable and start lanes (all enabled lanes and lanectl.target when none is named); waits for READY=1."""
    chosen = select(lanes, names, enabled_only=True)
    units = [lanes[n]["unit"] for n in chosen]
    res = OpResult("up", chosen)
    before = _clear_failed(res, chosen, units)
    extra = [] if names else [TARGET, SUPERVISOR]
    if units or extra:
        systemd.run("enable", "--quiet", *extra, *([PROBE_TIMER] if extra else []), *units)
    for name, unit in zip(chosen, units):
        if before.get(unit) == "active":
            continue
        proc = systemd.run("start", unit, check=False)
        if proc.returncode != 0:
            res.failed[name] = (proc.stderr.strip().splitlines() or ["start failed"])[0]
        else:
            res.changed.append(name)
    if extra:
        # the supervisor after the lanes, so that its first look finds them up
        proc = systemd.run("start", SUPERVISOR, check=False)
        if proc.returncode != 0:
            res.failed["supervisor"] = (proc.stderr.strip().splitlines() or ["start failed"])[0]
        systemd.run("start", "--no-block", *extra, PROBE_TIMER, check=False)
    return res


def down(lanes: dict[str, dict[str, Any]], names: list[str] | None = None, unit_dir: Any = None) -> OpResult:
    """Stop and disable lanes (all of them and lanectl.target when none is named), so they stay down.

    With ``unit_dir``, lane units enabled or running with no installed lane (a lane file deleted by hand:
    lanectl.status.orphan_units) are stopped and disabled too: by name, or all of them when none is named."""
    if unit_dir is not None:
        from lanectl.status import orphan_units

        orphans = orphan_units(lanes, unit_dir)
        wanted = orphans if not names else {n: u for n, u in orphans.items() if n in names}
        lanes = {**lanes, **{n: {"unit": u} for n, u in wanted.items()}}
    chosen = select(lanes, names, enabled_only=False)
    units = [lanes[n]["unit"] for n in chosen]
    before = active_states(units)
    res = OpResult("down", chosen)
    extra = [] if names else [TARGET, SUPERVISOR, PROBE_TIMER]
    systemd.run("disable", "--quiet", *extra, *units, check=False)
    if units or extra:
        systemd.run("stop", *extra, *units)
    res.changed = [n for n, u in zip(chosen, units) if before.get(u) not in ("inactive", "failed", "unknown")]
    systemd.run("reset-failed", *units, check=False)
    return res


def restart(lanes: dict[str, dict[str, Any]], name: str) -> OpResult:
    """Restart one lane; a failed one (systemd gave up on it) has its failed state cleared first."""
    chosen = select(lanes, [name], enabled_only=False)
    unit = lanes[chosen[0]]["unit"]
    res = OpResult("restart", chosen)
    _clear_failed(res, chosen, [unit])
    proc = systemd.run("restart", unit, check=False)
    if proc.returncode != 0:
        res.failed[name] = (proc.stderr.strip().splitlines() or ["restart failed"])[0]
    else:
        res.changed.append(name)
    return res


def bring_back(name: str, unit_dir: str | None, config_dir: str | None) -> dict[str, Any]:
    """After an undrain: start the lane's unit if it is enabled but not running (``drain --stop`` stopped it),
    clearing a failed state first. A disabled unit (``lanectl down``) stays down: an operator's down is not undone
    by an undrain. Returns what happened (started, reset, failed, note)."""
    from lanectl import paths
    from lanectl.status import installed_lanes

    lanes = installed_lanes(paths.unit_dir(unit_dir), config_dir)
    if name not in lanes:
        return {"note": "not installed"}
    unit = lanes[name]["unit"]
    props = systemd.show([unit], ("Id", "ActiveState", "UnitFileState", "Result")).get(unit, {})
    active = props.get("ActiveState", "unknown")
    if active in ("active", "activating", "reloading"):
        return {"active_state": active}
    if props.get("UnitFileState") not in ("enabled", "enabled-runtime") or not lanes[name].get("enabled", True):
        return {"active_state": active, "note": f"its unit is {active} and disabled; start it with 'lanectl up {name}'"}
    res = up(lanes, [name])
    return {"active_state": active, "started": name in res.changed, "reset": res.reset.get(name),
            "failed": res.failed.get(name)}


# ----------------------------------------------------------------------------------------------- with the ledger
Progress = Callable[[str], None]
"""Told what a wait is waiting for, each time it looks (lanectl.output.waiting shows it on a terminal)."""


def _ids(ids: list[int], most: int = 8) -> str:
    shown = ", ".join(str(i) for i in ids[:most])
    return shown + (f" and {len(ids) - most} more" if len(ids) > most else "")


def wait_drained(ledger_path: Any, lane: str, timeout: float, poll: float = 0.2,
                 progress: Progress | None = None) -> list[int]:
    """Wait until nothing is in flight on the lane; returns what is still in flight at the deadline (empty: done)."""
    from lanectl.ledger import Ledger
    from lanectl.ledger import lanes as lane_ops

    def told(left: list[int], rest: float) -> None:
        if progress is not None:
            progress(f"draining {lane}: {len(left)} mission(s) in flight (missions {_ids(left)}); "
                     f"{rest:.0f}s left of the timeout")

    with Ledger.open(ledger_path, migrate=False) as led:
        return until(lambda: lane_ops.in_flight(led, lane), timeout, done=lambda left: not left, interval=poll,
                     progress=told)


def wait_host_drained(ledger_path: Any, host: str, timeout: float, poll: float = 0.2,
                      progress: Progress | None = None) -> list[int]:
    """Wait until nothing is in flight on host ``host``'s lanes; what is still in flight at the deadline (empty:
    done)."""
    from lanectl.ledger import Ledger
    from lanectl.ledger import hosts

    def told(left: list[int], rest: float) -> None:
        if progress is not None:
            progress(f"draining host {host}: {len(left)} mission(s) in flight on its lanes (missions {_ids(left)}); "
                     f"{rest:.0f}s left of the timeout")

    with Ledger.open(ledger_path, migrate=False) as led:
        return until(lambda: hosts.in_flight(led.conn, host), timeout, done=lambda left: not left, interval=poll,
                     progress=told)


def wait_up(lanes: dict[str, dict[str, Any]], name: str, timeout: float, poll: float = 0.1,
            progress: Progress | None = None) -> bool:
    """Wait until the lane's unit runs and its health endpoint answers."""
    from lanectl.status import collect

    def told(row: Any, rest: float) -> None:
        if progress is not None:
            progress(f"starting {name}: unit {row.active_state}/{row.sub_state}, health "
                     f"{'answers' if row.health.ok else 'not answering yet'}; {rest:.0f}s left")

    row = until(lambda: collect(lanes, [name])[0], timeout, done=lambda r: r.state == "up", interval=poll,
                progress=told)
    return row.state == "up"


def _supervisor_health(port: int) -> dict[str, Any] | None:
    import json
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2.0) as resp:
            doc = json.loads(resp.read())
            return doc if isinstance(doc, dict) else None
    except (OSError, ValueError):
        return None


def reload_supervisor(port: int, lanes: list[str], timeout: float = 30.0, poll: float = 0.1) -> str | None:
    """``systemctl reload`` the supervisor (SIGHUP: it re-reads the configuration) and wait until its /healthz
    shows a new configuration generation with exactly ``lanes``; None when it did, else what went wrong."""
    before = _supervisor_health(port)
    proc = systemd.run("reload", SUPERVISOR, check=False)
    if proc.returncode != 0:
        return (proc.stderr.strip().splitlines() or ["reload failed"])[0]
    if before is None:
        return None  # its /healthz does not answer (port taken?): the reload was sent, it cannot be confirmed

    def restarted(now: dict[str, Any] | None) -> bool:  # restarted meanwhile: it loaded the fleet from scratch
        return now is not None and now.get("pid") != before.get("pid")

    def reloaded(now: dict[str, Any] | None) -> bool:
        return now is not None and (now.get("reloads") or 0) > (before.get("reloads") or 0) and bool(
            now.get("reload_error") or sorted(now.get("lanes") or {}) == sorted(lanes))

    now = until(lambda: _supervisor_health(port), timeout, done=lambda h: restarted(h) or reloaded(h),
                interval=poll)
    if restarted(now):
        return None
    if not reloaded(now):
        return f"the supervisor did not confirm the reload within {timeout:g}s"
    if now and now.get("reload_error"):
        return f"the supervisor kept its previous configuration: {now['reload_error']}"
    return None


def bound_warnings(ledger_path: Any, names: list[str]) -> list[Any]:
    """Warnings for lanes going down with work or sessions bound to them (it waits until they are up again).
    An unreadable or missing ledger gives none: ``down`` must work without it."""
    from lanectl.errors import LanectlError, Problem
    from lanectl.ledger import Ledger
    from lanectl.ledger import lanes as lane_ops

    out = []
    try:
        with Ledger.open(ledger_path, migrate=False, create=False) as led:
            for name in names:
                left = lane_ops.bound(led, name)
                if left:
                    out.append(Problem(f"lane {name!r} is down with work bound to it: {left.describe()}",
                                       hint=f"it waits until 'lanectl up {name}', or move it: 'lanectl reroute "
                                            f"{name} --to LANE --sessions'", code="lane_down_with_work",
                                       lane=name, severity="warning"))
    except LanectlError:
        pass
    return out


def journal_argv(lanes: dict[str, dict[str, Any]], names: list[str] | None, *, supervisor: bool = False,
                 follow: bool = False, since: str | None = None, lines: int | None = None) -> list[str]:
    """The journalctl command for ``lanectl logs``: the named lanes (and/or the supervisor), else every lane and
    the supervisor, interleaved by time. ``supervisor`` as a name means the supervisor unless a lane has that
    name."""
    import shutil

    from lanectl.errors import Unavailable

    names = list(names or [])
    if "supervisor" in names and "supervisor" not in lanes:
        names.remove("supervisor")
        supervisor = True
    units = [lanes[n]["unit"] for n in select(lanes, names, enabled_only=False)] if names else []
    if supervisor:
        units.append(SUPERVISOR)
    if not units:
        units = [lanes[n]["unit"] for n in sorted(lanes)] + [SUPERVISOR]
    exe = shutil.which("journalctl")
    if exe is None:
        raise Unavailable("journalctl is not installed here", "install systemd, or read the logs where journald runs",
                          "journal_unavailable")
    argv = [exe, "--no-pager", "-o", "short-iso"]
    for u in units:
        argv += ["-u", u]
    if since:
        argv += ["--since", since]
    if lines is not None:
        argv += ["-n", str(lines)]
    elif not since:
        argv += ["-n", "100"]
    if follow:
        argv.append("-f")
    return argv

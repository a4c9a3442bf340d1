"""Write rendered units to a unit directory atomically, detect drift, provision lane users and workspaces."""
from __future__ import annotations

import grp
import json
import os
import pwd
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lanectl import keys, paths, systemd
from lanectl.config import USER_MARKER, LaneSet
from lanectl.errors import LanectlError
from lanectl.fsutil import atomic_write, read_text_or_none
from lanectl.units import SUPERVISOR as SUPERVISOR_UNIT
from lanectl.units import UnitFile, parse_generated, render, unit_name

LIVE_UNIT_DIRS = (Path("/etc/systemd/system"), Path("/run/systemd/system"))


@dataclass
class Drift:
    path: str
    state: str  # missing | differs | edited | stale

    def as_dict(self) -> dict[str, str]:
        return {"path": self.path, "state": self.state}


@dataclass
class InstallResult:
    unit_dir: str
    written: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    reloaded: bool = False
    provisioned: list[str] = field(default_factory=list)
    notices: list[str] = field(default_factory=list)
    """What install found and left alone for the operator to fix (a workspace it did not create, ...)."""
    manifest_changed: bool = False
    """The installed fleet (lanes, their ports, classes, weights, ...) differs from what was installed before."""
    ledger_created: str | None = None
    supervisor: str | None = None
    """What install did to a running supervisor: "reloaded", "restarted" (its unit changed), or None."""
    supervisor_error: str | None = None
    stopped: list[str] = field(default_factory=list)
    """Lanes removed from the fleet whose units apply stopped and disabled."""

    @property
    def changed(self) -> bool:
        return bool(self.written or self.removed or self.manifest_changed or self.stopped)


def generated_on_disk(unit_dir: Path) -> list[str]:
    """Relative paths of every file in unit_dir that lanectl generated (by its header)."""
    found = []
    if not unit_dir.is_dir():
        return found
    for p in sorted(unit_dir.glob("lanectl*")):
        cands = sorted(p.glob("*.conf")) if p.is_dir() else [p]
        for f in cands:
            text = read_text_or_none(f)
            if text is not None and parse_generated(text)[0] is not None:
                found.append(str(f.relative_to(unit_dir)))
    return found


def drift(files: list[UnitFile], unit_dir: Path) -> list[Drift]:
    out = []
    wanted = {f.path for f in files}
    for f in files:
        text = read_text_or_none(unit_dir / f.path)
        if text is None:
            out.append(Drift(f.path, "missing"))
            continue
        recorded, body = parse_generated(text)
        if recorded is not None and UnitFile(f.path, body, "").digest != recorded:
            out.append(Drift(f.path, "edited"))
        elif text != f.text:
            out.append(Drift(f.path, "differs"))
    out += [Drift(p, "stale") for p in generated_on_disk(unit_dir) if p not in wanted]
    return out


def drift_diffs(files: list[UnitFile], unit_dir: Path, found: list[Drift]) -> dict[str, str]:
    """A unified diff per drifted file: what is on disk (a/) against what install would write (b/)."""
    import difflib

    wanted = {f.path: f.text for f in files}
    out = {}
    for d in found:
        have = read_text_or_none(unit_dir / d.path) or ""
        want = wanted.get(d.path, "")  # stale: install would remove it
        out[d.path] = "".join(difflib.unified_diff(have.splitlines(keepends=True), want.splitlines(keepends=True),
                                                   f"a/{d.path}" if d.state != "missing" else "/dev/null",
                                                   f"b/{d.path}" if d.state != "stale" else "/dev/null"))
    return out


@dataclass
class DriftReport:
    """``lanectl render --check``: what differs between the units the fleet renders and a directory."""

    dir: str
    files: int
    """How many files the fleet renders."""
    found: list[Drift]
    diffs: dict[str, str] | None = None
    """With ``diff``: a unified diff per drifted file (``drift_diffs``)."""

    @property
    def in_sync(self) -> bool:
        return not self.found

    def as_dict(self) -> dict[str, Any]:
        diffs = self.diffs
        return {"dir": self.dir, "drift": [{**d.as_dict(), **({"diff": diffs[d.path]} if diffs is not None else {})}
                                           for d in self.found], "in_sync": self.in_sync}


@dataclass
class RenderedTo:
    """``lanectl render --out DIR``: the files rendered, and those written because they were missing or differed."""

    dir: str
    files: list[str]
    written: list[str] = field(default_factory=list)

    @property
    def changed(self) -> bool:
        return bool(self.written)

    def as_dict(self) -> dict[str, Any]:
        return {"dir": self.dir, "files": self.files, "written": self.written, "changed": self.changed}


def rendered(config_dir: str | None = None, python: str | None = None) -> list[UnitFile]:
    """``lanectl render``: the units of the configuration in ``config_dir``, as install would write them."""
    from lanectl import config

    return render(config.load(config_dir), python)


def check_rendered(target: str | Path | None = None, *, unit_dir: str | None = None, python: str | None = None,
                   config_dir: str | None = None, diff: bool = False) -> DriftReport:
    """``lanectl render --check``: compare the rendered units with ``target`` (default: the unit dir)."""
    files = rendered(config_dir, python)
    where = Path(target) if target else paths.unit_dir(unit_dir)
    found = drift(files, where)
    return DriftReport(str(where), len(files), found, drift_diffs(files, where, found) if diff else None)


def render_to(out: str, *, python: str | None = None, config_dir: str | None = None) -> RenderedTo:
    """``lanectl render --out DIR``: write each rendered unit into ``out`` (atomically) when it is missing there or
    differs; what is already current is left alone (its mtime too)."""
    files = rendered(config_dir, python)
    res = RenderedTo(out, [f.path for f in files])
    for f in files:
        target_file = Path(out) / f.path
        if not target_file.exists() or target_file.read_text() != f.text:
            atomic_write(target_file, f.text, 0o644)
            res.written.append(f.path)
    return res


def write_files(files: list[UnitFile], unit_dir: Path, result: InstallResult) -> None:
    for f in files:
        target = unit_dir / f.path
        if read_text_or_none(target) == f.text:
            result.unchanged.append(f.path)
            continue
        atomic_write(target, f.text, 0o644)
        result.written.append(f.path)


def remove_stale(files: list[UnitFile], unit_dir: Path, result: InstallResult) -> None:
    wanted = {f.path for f in files}
    for rel in generated_on_disk(unit_dir):
        if rel in wanted:
            continue
        path = unit_dir / rel
        path.unlink()
        result.removed.append(rel)
        if path.parent != unit_dir and not any(path.parent.iterdir()):
            path.parent.rmdir()


def manifest(fleet: LaneSet) -> dict:
    """The installed fleet in plain JSON, for commands that must start fast (status, probe)."""
    lanes = {}
    for name, lane in sorted(fleet.lanes.items()):
        lanes[name] = {
            "unit": unit_name(name),
            "port": lane.port,
            "health_path": lane.health_path,
            "workspace": lane.workspace,
            "enabled": lane.enabled,
            "capacity": lane.capacity,
            "classes": list(lane.classes),
            "weight": lane.weight,
            "fallback": lane.fallback,
            "watchdog_sec": lane.watchdog_sec,
        }
    from lanectl.units import SUPERVISOR

    from lanectl.config import ledger_path

    return {"lanectl_manifest": 1, "config_dir": str(fleet.config_dir), "host": fleet.settings.host, "lanes": lanes,
            "supervisor": {"unit": SUPERVISOR, "port": fleet.settings.supervisor.port},
            "ledger": str(ledger_path(fleet)), "probe": fleet.settings.probe.model_dump()}


def ensure_user(name: str, home: str) -> bool:
    try:
        pwd.getpwnam(name)
        return False
    except KeyError:
        pass
    cmd = ["useradd", "--system", "--user-group", "--no-create-home", "--home-dir", home,
           "--shell", "/usr/sbin/nologin", "--comment", USER_MARKER, name]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise LanectlError(f"cannot create lane user {name}: {proc.stderr.strip()}",
                           "create it by hand or set user= in the lane file", "user_create_failed")
    return True


def ensure_workspace(path: str, user: str) -> tuple[bool, str | None]:
    """Create the workspace owned by the lane user, mode 0700: (created, notice).

    A directory that already exists is never chowned or chmodded (it may be anything: a home, a shared tree);
    when its owner or mode is not the lane's, the notice says so and how to fix it."""
    ws = Path(path)
    uid = pwd.getpwnam(user).pw_uid
    gid = grp.getgrnam(user).gr_gid if _group_exists(user) else pwd.getpwnam(user).pw_gid
    try:
        ws.parent.mkdir(parents=True, exist_ok=True)
        ws.mkdir(mode=0o700)
    except FileExistsError:
        st = ws.lstat()
        if not ws.is_dir() or ws.is_symlink():
            return False, f"workspace {path} exists and is not a directory; lanectl left it alone: remove it"
        if (st.st_uid, st.st_gid) != (uid, gid) or st.st_mode & 0o777 != 0o700:
            return False, (f"workspace {path} exists (owner {st.st_uid}:{st.st_gid}, mode {st.st_mode & 0o777:04o}) "
                           f"and lanectl did not create it, so it left it alone; if it is meant for the lane: "
                           f"chown {user}:{user} {path} && chmod 0700 {path}")
        return False, None
    os.chown(ws, uid, gid)
    os.chmod(ws, 0o700)  # mkdir's mode is filtered by the umask
    return True, None


def _group_exists(name: str) -> bool:
    try:
        grp.getgrnam(name)
        return True
    except KeyError:
        return False


def provision(fleet: LaneSet, notices: list[str] | None = None) -> list[str]:
    """Each lane's own system user, and its workspace owned by that user, mode 0700 (no lane reads another's)."""
    done = []
    notices = [] if notices is None else notices
    state = Path(fleet.settings.state_dir)
    if state.is_dir() and state.stat().st_mode & 0o007:
        notices.append(f"state_dir {state} is open to every user (mode {state.stat().st_mode & 0o777:04o}) and "
                       f"lanectl did not create it, so it left it alone; its secrets are 0600 root, but: chmod 0750 "
                       f"{state}")
    changed_keys = keys.write_lane_keys(Path(fleet.settings.state_dir), sorted(fleet.lanes))
    done += [f"dispatch key {n}" for n in changed_keys]
    for name, lane in sorted(fleet.lanes.items()):
        user = lane.resolved_user(name)
        if ensure_user(user, lane.workspace):
            done.append(f"user {user}")
        created, notice = ensure_workspace(lane.workspace, user)
        if created:
            done.append(f"workspace {lane.workspace}")
        if notice:
            notices.append(notice)
    return done


def check_removals(fleet: LaneSet, unit_dir: Path, ledger: str | Path | None = None) -> None:
    """Refuse (``lane_in_use``, exit 5) to uninstall a lane that work or sessions are still bound to in the ledger:
    the installed lanes missing from ``fleet`` (a lane file removed or renamed by hand) would strand them."""
    from lanectl import config, manifest as installed
    from lanectl.errors import Conflict
    from lanectl.ledger import lanes as lane_ops

    before = installed.read(unit_dir)
    gone = sorted((set((before or {}).get("lanes", {})) - set(fleet.lanes)) | set(live_orphans(fleet, unit_dir)))
    from lanectl.ledger.where import exists as ledger_exists

    if not gone or not ledger_exists(config.ledger_path(fleet, ledger)):
        return
    with config.open_ledger(fleet, ledger) as led:
        for name in gone:
            left = lane_ops.bound(led, name)
            if left:
                raise Conflict(f"lane {name!r} is gone from {fleet.lanes_dir} but still has work bound to it: "
                               f"{left.describe()}",
                               f"move it to a lane that stays ('lanectl reroute {name} --to LANE --sessions'; "
                               f"wait for what is in flight), or put its lane file back; then install again",
                               "lane_in_use")


def is_live(unit_dir: Path) -> bool:
    """Whether ``unit_dir`` is one systemd reads (and systemd can be reached): only then is anything started,
    stopped or reloaded."""
    return unit_dir.resolve() in [d.resolve() for d in LIVE_UNIT_DIRS if d.exists()] and systemd.available()


def live_orphans(fleet: LaneSet, unit_dir: Path) -> dict[str, str]:
    """Lane units enabled or running in a live unit dir whose lane is not in ``fleet`` (lanectl.status.orphan_units);
    nothing for a unit dir systemd does not read."""
    from lanectl.status import orphan_units

    return orphan_units(fleet.lanes, unit_dir) if is_live(unit_dir) else {}


def install(fleet: LaneSet, unit_dir: Path, *, python: str | None = None, reload: bool | None = None,
            do_provision: bool | None = None, create_ledger: bool | None = None,
            supervisor: bool | None = None) -> InstallResult:
    """Render, then write only what changed; remove what lanectl wrote for lanes that are gone; reload once.

    Where the unit dir is live (default) it also creates the configured ledger when there is none
    (``create_ledger``: the only command besides ``ledger init`` that does) and makes a running supervisor pick
    up a changed fleet (``supervisor``): a reload (SIGHUP: re-reads the configuration, in-flight work runs on),
    or a restart when its own unit changed."""
    files = render(fleet, python)  # validates everything before the first byte is written
    live = is_live(unit_dir)
    result = InstallResult(str(unit_dir))
    if do_provision if do_provision is not None else (live and os.geteuid() == 0):
        result.provisioned = provision(fleet, result.notices)
    if create_ledger if create_ledger is not None else live:
        result.ledger_created = ensure_ledger(fleet)
    write_files(files, unit_dir, result)
    remove_stale(files, unit_dir, result)
    new = manifest(fleet)
    data = json.dumps(new, indent=2, sort_keys=True) + "\n"
    mpath = paths.manifest_path(unit_dir)
    from lanectl import manifest as installed

    old = installed.read(unit_dir) or {}
    # what the supervisor binds at start (its port, its ledger) cannot change by a reload
    restart = SUPERVISOR_UNIT in result.written or any(
        key in old and old[key] != new[key] for key in ("supervisor", "ledger"))
    if read_text_or_none(mpath) != data:
        atomic_write(mpath, data, 0o644)
        result.manifest_changed = True
    if (result.written or result.removed) and (reload if reload is not None else live):
        systemd.daemon_reload()
        result.reloaded = True
    if result.changed and (supervisor if supervisor is not None else live):
        signal_supervisor(fleet, result, restart=restart)
    return result


def ensure_ledger(fleet: LaneSet) -> str | None:
    """Create (and migrate) the configured ledger when it does not exist; its path when created."""
    from lanectl import config

    from lanectl.ledger.where import exists as ledger_exists
    from lanectl.ledgerurl import shown

    path = config.ledger_path(fleet)
    if ledger_exists(path):
        return None
    config.open_ledger(fleet, create=True).close()
    return shown(path)


def signal_supervisor(fleet: LaneSet, result: InstallResult, *, restart: bool = False) -> None:
    """Reload a running supervisor (``restart``: restart it) and wait until it runs the new fleet."""
    from lanectl import lifecycle
    from lanectl.units import SUPERVISOR

    if lifecycle.active_states([SUPERVISOR]).get(SUPERVISOR) not in ("active", "reloading"):
        return  # not running: it loads the new fleet when it starts
    if restart:
        proc = systemd.run("restart", SUPERVISOR, check=False)
        result.supervisor = "restarted"
    else:
        proc = None
        err = lifecycle.reload_supervisor(fleet.settings.supervisor.port, sorted(fleet.lanes))
        result.supervisor = "reloaded"
        if err:
            result.supervisor_error = err
    if proc is not None and proc.returncode != 0:
        result.supervisor_error = (proc.stderr.strip().splitlines() or ["restart failed"])[0]


def install_fleet(fleet: LaneSet, unit_dir: Path, *, ledger: str | Path | None = None, by: str = "install",
                  reason: str | None = None, **kwargs: Any) -> InstallResult:
    """What ``lanectl install`` and ``apply`` do: refuse to strand work (``check_removals``), install, and
    record a supervisor reload or restart as a ``supervisor`` event."""
    import time

    from lanectl import config
    from lanectl.ledger import lanes as lane_ops
    from lanectl.ledger.events import EventKind

    from lanectl import manifest as installed

    check_removals(fleet, unit_dir, ledger)
    before = set((installed.read(unit_dir) or {}).get("lanes", {}))
    orphans = live_orphans(fleet, unit_dir)  # also those an earlier install forgot (lanectl < F3 only said so)
    res = install(fleet, unit_dir, **kwargs)
    if is_live(unit_dir):
        stop_removed(sorted((before - set(fleet.lanes)) | set(orphans)), res, enabled=set(orphans))
    from lanectl.ledger.where import exists as ledger_exists

    if res.supervisor and ledger_exists(config.ledger_path(fleet, ledger)):
        with config.open_ledger(fleet, ledger) as led:
            lane_ops.record(led, EventKind.SUPERVISOR, now=led.clock(), action=res.supervisor, by=by,
                            lanes=sorted(fleet.lanes), added=sorted(set(fleet.lanes) - before),
                            removed=sorted(before - set(fleet.lanes)), error=res.supervisor_error, reason=reason)
    return res


def print_supervisor(con: Any, res: InstallResult) -> None:
    """The human line about the supervisor (install and apply print it alike)."""
    from lanectl.output import escape

    if res.supervisor_error:
        con.print(f"[red]supervisor {res.supervisor}, but: {escape(res.supervisor_error)}[/]")
    elif res.supervisor == "reloaded":
        con.print("supervisor reloaded: it runs the new fleet (in-flight work kept)")
    elif res.supervisor == "restarted":
        con.print("supervisor restarted: its unit changed (in-flight work is reconciled)")


def stop_removed(gone: list[str], res: InstallResult, *, enabled: set[str] = frozenset()) -> None:  # type: ignore[assignment]
    """A lane removed from the fleet whose unit still runs, or is still enabled (``lanectl up`` would start it
    through lanectl.target), would go on without its drop-in: no User= (as root), no port; it crash-loops.
    ``install`` and ``apply`` stop and disable it (``stopped`` in ``--json``; work bound to it was refused
    before, ``lane_in_use``). ``enabled``: lanes whose unit is linked in lanectl.target.wants or runs."""
    if not gone or not systemd.available():
        return
    from lanectl import lifecycle

    units = {unit_name(n): n for n in gone}
    active = lifecycle.active_states(list(units))
    doomed = [u for u in units if active.get(u) not in ("inactive", "failed", "unknown") or units[u] in enabled]
    if not doomed:
        return
    systemd.run("disable", "--now", "--quiet", *doomed, check=False)
    systemd.run("reset-failed", *doomed, check=False)
    res.stopped = [units[u] for u in doomed]

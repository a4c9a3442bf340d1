"""What runs: systemd's view of every lane, its cgroup's usage, its port and its health (checked by lanectl.healthcheck)."""
from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import KW_ONLY, dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar

from lanectl import systemd
from lanectl.healthcheck import Health, HealthRound
from lanectl.errors import NotFound, Problem

LANE_UNIT_PREFIX, LANE_UNIT_SUFFIX = "lanectl-lane@", ".service"
STATUS_PROPS = (*(p for p in systemd.SHOW_PROPS if p not in ("MemoryCurrent", "CPUUsageNSec", "TasksCurrent")),
                "ControlGroup")
"""What status asks systemd for each unit: its cgroup's usage is read from the cgroup's files (cgroup_usage)."""
CGROUP_SLICES = ("/sys/fs/cgroup/systemd/lanectl.slice", "/sys/fs/cgroup/unified/lanectl.slice",
                 "/sys/fs/cgroup/lanectl.slice")
"""Where systemd puts a running lane's cgroup (Slice=lanectl.slice): v1 name=systemd, hybrid v2, unified v2."""


def orphan_units(lanes: Any, unit_dir: Path) -> dict[str, str]:
    """Lane units with no installed lane (a lane file deleted by hand, then installed): lane -> unit, for every
    ``lanectl-lane@NAME.service`` that is enabled (its link in ``lanectl.target.wants``: ``lanectl up`` starts it
    again) or running (its cgroup under lanectl.slice) while NAME is not among ``lanes``. Such a unit has no
    drop-in: no User=, no port; it restarts as root and crash-loops. Reads directories only (no systemctl)."""
    found: set[str] = set()
    dirs = [Path(unit_dir) / "lanectl.target.wants", *map(Path, CGROUP_SLICES)]
    for d in dirs:
        try:
            names = os.listdir(d)
        except OSError:
            continue
        found.update(n for n in names if n.startswith(LANE_UNIT_PREFIX) and n.endswith(LANE_UNIT_SUFFIX)
                     and len(n) > len(LANE_UNIT_PREFIX) + len(LANE_UNIT_SUFFIX))
    out = {u[len(LANE_UNIT_PREFIX):-len(LANE_UNIT_SUFFIX)]: u for u in sorted(found)}
    return {name: unit for name, unit in out.items() if name not in lanes}


@dataclass(slots=True)
class LaneStatus:
    """One row of ``status``: a lane, the supervisor (``kind``) or a lane unit with no lane (``orphan``).

    The JSON shape of ``status --json`` is declared here: one key per field, in this order (``health`` an object
    of Health's fields), then the derived ``ok``, ``state`` and ``gave_up``, and ``reload_error`` for the supervisor
    (``json_keys``). Adding a field adds a key; tests/unit/test_status_records.py holds the two together."""

    name: str
    unit: str
    enabled: bool
    port: int
    _: KW_ONLY  # the rest by name only (``kind=``, ``weight=``), as before
    load_state: str = "unknown"
    active_state: str = "unknown"
    sub_state: str = "unknown"
    result: str = ""
    main_pid: int | None = None
    invocation_id: str = ""
    uptime_s: float | None = None
    restarts: int = 0
    status_text: str = ""
    watchdog_sec: float | None = None
    watchdog_ping_age_s: float | None = None
    memory_bytes: int | None = None
    cpu_seconds: float | None = None
    cpu_percent_avg: float | None = None
    processes: int = 0
    health: Health = field(default_factory=Health)
    kind: str = "lane"
    """"lane", "supervisor" or "orphan"."""
    dispatch: str = "unknown"
    """The ledger's dispatch state: active, draining, drained, degraded, disabled; "unknown" when the ledger
    could not be read (``dispatch_error`` says why)."""
    dispatch_since: float | None = None
    dispatch_error: str | None = None
    drained_by: str | None = None
    drain_reason: str | None = None
    automatic: bool = False
    """Drained by lanectl itself (the supervisor's rollback), not by an operator."""
    weight: int | None = None
    """The traffic weight in force: a promoted one (``lanectl promote``), else the lane file's."""
    promoted: bool = False
    host: str | None = None
    """The host that runs the lane (issue 13): this host's name for its own lanes (the supervisor's one when the
    install manifest does not name it), the owner the ledger records for another host's; None when neither is
    known (the ledger could not be read and the supervisor did not answer)."""
    remote: bool = False
    """A lane of another host sharing the ledger: its state comes from what its supervisor records in the ledger
    (``recorded_healthy``, ``invocation_id``; ``active_state``, ``sub_state``, ``main_pid`` and ``restarts`` as it
    saw the unit at its last lease renewal, ``unknown`` before one) and from its host's lease (``host_status``);
    systemd's live details (uptime, memory, CPU, watchdog, the health check) are that host's to read."""
    host_status: str | None = None
    """The lane's host as the ledger has it now: up, fenced, expired, stopped, dead, forgotten
    (lanectl.ledger.fleetview); None when the ledger could not be read."""
    in_flight: int | None = None
    """Missions dispatched to or running on the lane now, as the ledger has it (None: not read)."""
    recorded_healthy: bool | None = None
    """The lane's health as its supervisor last recorded it in the ledger (None: not read)."""

    DERIVED: ClassVar[tuple[str, ...]] = ("ok", "state", "gave_up")
    """Keys of ``as_dict`` computed from the fields (properties of the same names)."""

    @classmethod
    def json_keys(cls, kind: str = "lane") -> tuple[str, ...]:
        """The keys of ``as_dict`` for a row of this ``kind``, in order."""
        return (*_LANE_FIELDS, *cls.DERIVED, *(("reload_error",) if kind == "supervisor" else ()))

    def set_dispatch(self, view: dict[str, Any] | None) -> None:
        """Take the ledger's view of the lane (lanectl.probe.lane_views); None: the ledger has no row, active."""
        view = view or {}
        self.dispatch = view.get("state", "active")
        self.dispatch_since = view.get("since")
        self.drained_by = view.get("drained_by")
        self.drain_reason = view.get("drain_reason")
        self.automatic = bool(view.get("automatic"))
        if view.get("weight") is not None:
            self.weight, self.promoted = int(view["weight"]), True

    @property
    def host_alive(self) -> bool:
        """The lane's host holds its lease (up, or fenced: running what it holds, claiming nothing)."""
        return self.host_status in ("up", "fenced")

    @property
    def gave_up(self) -> bool:
        """systemd stopped restarting the lane: its unit (Restart=on-failure) is ``failed``, which happens when its
        start limit is hit; ``result`` says how its last run ended. ``lanectl restart`` or ``up`` clears it."""
        return self.kind == "lane" and self.active_state == "failed"

    @property
    def running(self) -> bool:
        return self.active_state == "active" and self.sub_state == "running"

    @property
    def ok(self) -> bool:
        """What ``status`` exits 0 on: a disabled lane; a lane an operator drained (stopped or not) whose unit
        did not fail; else running and healthy (a degraded lane that runs healthy is recovering: ok). A lane
        lanectl drained by itself is not ok until an operator acts."""
        if self.kind == "orphan":
            return False
        if self.remote:  # another host's: what its supervisor records, while its host holds its lease
            if self.dispatch == "disabled":
                return True
            if self.dispatch in ("draining", "drained"):
                return not self.automatic
            return self.host_alive and bool(self.recorded_healthy) and self.active_state != "failed"
        if not self.enabled:
            return True
        if self.dispatch in ("draining", "drained"):
            return not self.automatic and self.active_state != "failed"
        return self.running and self.health.ok and not self.reload_error

    @property
    def reload_error(self) -> str | None:
        """The supervisor's last reload failed (``reload_error`` in its /healthz): it runs the configuration it
        had before, not the one on disk. None for a lane, or when the last reload worked."""
        if self.kind != "supervisor" or not isinstance(self.health.body, dict):
            return None
        err = self.health.body.get("reload_error")
        return str(err) if err else None

    @property
    def state(self) -> str:
        """One word for people: up, degraded (running but unhealthy), down, failed, starting, disabled;
        ``orphan`` for a lane unit whose lane is not installed. Another host's lane (``remote``): up or unhealthy
        (``failed`` when its unit failed) as its supervisor records it while its host holds its lease, disabled,
        else ``lost`` (its host's lease ran out, or it was declared dead), ``down`` (its host stopped cleanly) or
        ``released`` (its host forgotten)."""
        if self.kind == "orphan":
            return "orphan"
        if self.remote:
            if not self.host_alive:
                return {"stopped": "down", "forgotten": "released"}.get(self.host_status or "", "lost")
            if self.dispatch == "disabled":
                return "disabled"
            if self.active_state == "failed":  # as its supervisor saw the unit at its last renewal
                return "failed"
            return "up" if self.recorded_healthy else "unhealthy"
        if self.running:
            return "up" if self.health.ok else "degraded"
        if self.active_state in ("activating", "reloading"):
            return "starting"
        if self.active_state == "failed":
            return "failed"
        return "down" if self.enabled else "disabled"

    def as_dict(self) -> dict[str, Any]:
        d = {name: getattr(self, name) for name in _LANE_FIELDS}
        d["health"] = self.health.as_dict()
        d["ok"] = self.ok
        d["state"] = self.state
        d["gave_up"] = self.gave_up
        if self.kind == "supervisor":
            d["reload_error"] = self.reload_error
        return d


_LANE_FIELDS = tuple(f.name for f in fields(LaneStatus))


def _processes(pid: int | None) -> tuple[int | None, float | None, float | None, int]:
    """Memory and CPU of a process tree through psutil: the fallback where systemd keeps no accounting."""
    if not pid:
        return None, None, None, 0
    import psutil  # imported only on the fallback path: it costs start-up time

    try:
        main = psutil.Process(pid)
        procs = [main, *main.children(recursive=True)]
        mem = 0
        cpu = 0.0
        for p in procs:
            try:
                mem += p.memory_info().rss
                t = p.cpu_times()
                cpu += t.user + t.system
            except psutil.Error:
                continue
        age = max(time.time() - main.create_time(), 1e-3)
        return mem, round(cpu, 3), round(100.0 * cpu / age, 2), len(procs)
    except psutil.Error:
        return None, None, None, 0


def _num(value: str | None) -> int:
    try:
        return int(value or 0)
    except ValueError:
        return 0


def collect(lanes: dict[str, dict[str, Any]], names: list[str] | None = None,
            supervisor: dict[str, Any] | None = None,
            meanwhile: Callable[[], None] | None = None, ledger: str | None = None,
            unit_dir: Path | None = None, usage: bool = True, host: str | None = None,
            fleet: dict[str, Any] | None = None) -> list[LaneStatus]:
    """Status of the named lanes (default: all, and the supervisor when given), from one burst of unit reads
    (systemd.show_start: D-Bus, else one systemctl) and health checks in flight meanwhile (HealthRound);
    ``meanwhile`` runs while both answer (the probe reads the ledger then). With
    ``ledger`` (a path), each lane's dispatch state, drain and weight are read from it (read-only) meanwhile.
    With ``unit_dir`` and no names, lane units with no installed lane follow (kind ``orphan``, never ok).
    ``usage=False`` leaves memory, CPU and tasks unread (None, 0): the probe judges none of them.

    Several hosts on one ledger (issue 13): each lane row carries its ``host`` (``host``: this host's name, from
    the install manifest; else the supervisor's /healthz; else the owner the ledger records for these lanes),
    and without names the lanes of the other hosts the ledger knows follow this host's (``remote``: their state
    from the ledger, see LaneStatus). ``fleet`` (a dict) receives ``host`` (this host's name) and ``hosts``
    (lanectl.ledger.fleetview.hosts; absent when the ledger could not be read)."""
    fleet = {} if fleet is None else fleet
    installed = set(lanes)
    wanted = names or sorted(lanes)
    foreign = [n for n in wanted if n not in lanes]  # another host's, if the ledger knows them (read below)
    if foreign and ledger is None:
        raise not_found(foreign[0], lanes)
    out = [LaneStatus(n, lanes[n]["unit"], bool(lanes[n].get("enabled", True)), int(lanes[n]["port"]),
                      weight=lanes[n].get("weight")) for n in wanted if n in lanes]
    if supervisor and not names:
        out.append(LaneStatus("supervisor", supervisor["unit"], True, int(supervisor["port"]), kind="supervisor"))
        lanes = {**lanes, "supervisor": {"health_path": "/healthz"}}
    orphans = [LaneStatus(n, u, False, 0, kind="orphan")
               for n, u in (orphan_units(lanes, unit_dir) if unit_dir is not None and not names else {}).items()]
    units = [s.unit for s in out + orphans]
    # the lanes answer their health checks while systemd answers and the ledger is read
    checks = HealthRound([(s.port, lanes[s.name].get("health_path", "/healthz")) for s in out])
    try:
        proc = systemd.show_start(units, STATUS_PROPS)
        checks.pump()
        out += orphans
        if meanwhile is not None:
            meanwhile()
        if ledger is not None:
            _dispatch(out, ledger, fleet)
        shown = systemd.show_finish(proc, units)
    except BaseException:
        checks.close()
        raise
    healths = checks.finish() + [Health(error="no lane") for _ in orphans]
    now_us = systemd.monotonic_now_us()
    for s, health in zip(out, healths):
        s.health = health
        props = shown.get(s.unit, {})
        s.load_state = props.get("LoadState", "unknown")
        s.active_state = props.get("ActiveState", "unknown")
        s.sub_state = props.get("SubState", "unknown")
        s.result = props.get("Result", "")
        s.main_pid = _num(props.get("MainPID")) or None
        s.invocation_id = props.get("InvocationID", "")
        s.restarts = _num(props.get("NRestarts"))
        s.status_text = props.get("StatusText", "")
        since = _num(props.get("ExecMainStartTimestampMonotonic"))
        if s.running and since:
            s.uptime_s = round((now_us - since) / 1e6, 3)
        wd = systemd.parse_timespan_us(props.get("WatchdogUSec", "")) or 0
        s.watchdog_sec = wd / 1e6 if wd else None
        ping = _num(props.get("WatchdogTimestampMonotonic"))
        if s.running and ping:
            s.watchdog_ping_age_s = round((now_us - ping) / 1e6, 3)
        if usage:
            _usage(s, props, since, now_us)
    place(out, fleet, host, installed, with_remote=not names, only=foreign)
    missing = [n for n in foreign if n not in {r.name for r in out}]
    if missing:
        raise not_found(missing[0], lanes, fleet.get("error"))
    return out


def not_found(name: str, lanes: dict[str, Any], unread: str | None = None) -> NotFound:
    """``lane_not_found`` for a lane neither installed here nor owned by another host in the ledger."""
    hint = f"known lanes: {', '.join(sorted(lanes)) or 'none'}"
    if unread:
        hint += f" (another host's lanes are unknown: the ledger could not be read: {unread})"
    return NotFound(f"no lane named {name!r} is installed", hint, "lane_not_found")


def place(rows: list[LaneStatus], fleet: dict[str, Any], host: str | None, installed: set[str], *,
          with_remote: bool, only: list[str] | tuple[str, ...] = ()) -> None:
    """Each lane row's host, its host's status, what it holds in flight and its recorded health, from the fleet
    view ``_dispatch`` read (``fleet["view"]``); with ``with_remote``, another host's lanes are inserted after
    this host's (sorted by host, then name; lanes of a forgotten host are left out: they are nobody's), and
    with ``only`` those of them (lanes named on the command line that are not installed here)."""
    sup = next((r for r in rows if r.kind == "supervisor"), None)
    body = sup.health.body if sup is not None and isinstance(sup.health.body, dict) else {}
    if host is None and isinstance(body.get("host"), str):
        host = body["host"]
    view = fleet.pop("view", None)
    if view is None:
        for r in rows:
            r.host = host
        fleet["host"] = host
        return
    recorded, flying = view["lanes"], view["in_flight"]
    hosts = {h["name"]: h for h in view["hosts"]}
    if host is None:
        owners = [recorded[r.name]["host"] for r in rows
                  if r.kind == "lane" and r.name in recorded and recorded[r.name]["host"]]
        host = max(sorted(set(owners)), key=owners.count) if owners else None
    fleet["host"], fleet["hosts"] = host, view["hosts"]
    for r in rows:
        r.host = host
        r.host_status = hosts[host]["status"] if host in hosts else None
        if r.kind == "lane":
            r.in_flight = len(flying.get(r.name, ()))
            r.recorded_healthy = recorded[r.name]["healthy"] if r.name in recorded else None
    if not with_remote and not only:
        return
    remote = []
    for name, rec in recorded.items():
        if only and name not in only:
            continue
        owner = rec["host"]
        if name in installed or owner is None or owner == host or owner not in hosts \
                or hosts[owner]["status"] == "forgotten":
            continue
        r = LaneStatus(name, f"{LANE_UNIT_PREFIX}{name}{LANE_UNIT_SUFFIX}", rec["state"] != "disabled", 0,
                       remote=True, host=owner, host_status=hosts[owner]["status"],
                       in_flight=len(flying.get(name, ())), recorded_healthy=rec["healthy"],
                       invocation_id=rec["invocation"] or "", weight=rec.get("weight"))
        r.set_dispatch(view["views"].get(name))
        seen = view.get("units", {}).get(owner, {}).get(name)
        if seen:  # what its supervisor saw of the unit at its last lease renewal
            unit = str(seen.get("unit") or "unknown")
            r.active_state, _, r.sub_state = unit.partition("/")
            r.sub_state = r.sub_state or "unknown"
            r.main_pid = seen.get("pid") if isinstance(seen.get("pid"), int) else None
            r.restarts = seen.get("restarts") if isinstance(seen.get("restarts"), int) else 0
        remote.append(r)
    at = sum(1 for r in rows if r.kind == "lane")
    rows[at:at] = sorted(remote, key=lambda r: (r.host or "", r.name))


def dispatch_unknown(error: str, lane: str | None = None) -> Problem:
    """The warning of a read whose ledger part failed (``status``, ``lane show``): the lanes' units are shown, their
    dispatch state is not. Its hint fits the cause: no permission (a non-root user) -> run it as root; anything
    else (a PostgreSQL server that cannot be reached, a file that is not a ledger) -> the message says what to fix."""
    if "permission denied" in error.lower():
        fix = "run it as root (or as a user that may read the ledger)"
    else:
        fix = "fix what the message names (docs/runbooks.md has 'The database is down' for a PostgreSQL ledger)"
    return Problem(f"dispatch state unknown: {error}", hint=f"{fix}: until then a lane lanectl drained by itself "
                   "cannot be told apart from an active one", code="ledger_unreadable", lane=lane,
                   severity="warning")


def _dispatch(rows: list[LaneStatus], ledger: str, fleet: dict[str, Any] | None = None) -> None:
    from lanectl.errors import LanectlError
    from lanectl.ledger import Error as LedgerError
    from lanectl.probe import read_fleet

    try:
        views, view = read_fleet(ledger)
    except (OSError, LedgerError, LanectlError) as exc:  # LanectlError: a PostgreSQL server that cannot be used
        for r in rows:
            r.dispatch_error = f"ledger {ledger} unreadable: {exc}"
        if fleet is not None:
            fleet["error"] = str(exc)
        return
    if fleet is not None:
        fleet["view"] = {**view, "views": views}
    for r in rows:
        if r.kind == "lane":
            r.set_dispatch(views.get(r.name))


def _usage(s: LaneStatus, props: dict[str, str], since_us: int, now_us: int) -> None:
    """Memory, CPU and tasks of the lane's whole cgroup (what MemoryMax= limits), read from the kernel's files;
    psutil over the process tree where they cannot be read."""
    if not s.running:
        return
    cgroup = props.get("ControlGroup")
    mem, cpu_ns, tasks = cgroup_usage(cgroup) if cgroup else (None, None, None)
    if mem is None or cpu_ns is None:
        s.memory_bytes, s.cpu_seconds, s.cpu_percent_avg, s.processes = _processes(s.main_pid)
        return
    s.memory_bytes = mem
    s.cpu_seconds = round(cpu_ns / 1e9, 3)
    age = max((now_us - since_us) / 1e6, 1e-3) if since_us else None
    s.cpu_percent_avg = round(100.0 * s.cpu_seconds / age, 2) if age else None
    s.processes = tasks or 0


CGROUP_ROOT = "/sys/fs/cgroup"


def cgroup_usage(cgroup: str, root: str = CGROUP_ROOT) -> tuple[int | None, int | None, int | None]:
    """Memory (bytes), CPU time (ns) and tasks of a cgroup with everything below it, from the kernel's own
    counters -- the ones systemd reports as MemoryCurrent, CPUUsageNSec and TasksCurrent, read directly: systemd
    252 on a cgroup v1 hybrid host leaves CPUUsageNSec unset (no cpuacct.usage under its cpu hierarchy), while
    the unified hierarchy's ``cpu.stat`` counts every cgroup's CPU time without a controller. Each figure from
    cgroup v2 (the root, or ``unified/`` on a hybrid host) first, then the v1 hierarchy; None when neither has
    it. ``cgroup`` is systemd's ControlGroup (``/lanectl.slice/lanectl-lane@NAME.service``)."""
    mem = _read_int(f"{root}{cgroup}/memory.current")
    if mem is None:
        mem = _read_int(f"{root}/memory{cgroup}/memory.usage_in_bytes")
    tasks = _read_int(f"{root}{cgroup}/pids.current")
    if tasks is None:
        tasks = _read_int(f"{root}/pids{cgroup}/pids.current")
    cpu_ns = None
    for base in (f"{root}{cgroup}", f"{root}/unified{cgroup}"):
        try:
            with open(f"{base}/cpu.stat", "rb") as f:
                text = f.read()
        except OSError:
            continue
        for line in text.splitlines():
            key, _, value = line.partition(b" ")
            if key == b"usage_usec" and value.strip().isdigit():
                cpu_ns = int(value) * 1000
                break
        break
    if cpu_ns is None:
        cpu_ns = _read_int(f"{root}/cpuacct{cgroup}/cpuacct.usage")
    return mem, cpu_ns, tasks


def _read_int(path: str) -> int | None:
    try:
        with open(path, "rb") as f:
            text = f.read().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def installed_lanes(unit_dir: Path, config_path: str | None = None) -> dict[str, dict[str, Any]]:
    """The installed fleet's lanes (manifest beside the units); the lane files when nothing is installed."""
    return installed_fleet(unit_dir, config_path)["lanes"]


def installed_fleet(unit_dir: Path, config_path: str | None = None) -> dict[str, Any]:
    """The installed fleet (its manifest); the configuration's own when nothing is installed, or when ``-c``
    names another configuration than the installed one (``-c`` is honoured like by every other command)."""
    from lanectl import manifest as installed

    data = installed.read(unit_dir)
    if data is not None and (config_path is None or _same_config(config_path, data.get("config_dir"))):
        return data
    from lanectl import config
    from lanectl.install import manifest

    return manifest(config.load(config_path))


def _same_config(config_path: str, installed_dir: Any) -> bool:
    import os

    from lanectl.config import resolve_dirs

    if not isinstance(installed_dir, str):
        return False
    return os.path.realpath(resolve_dirs(config_path)[0]) == os.path.realpath(installed_dir)

"""A changed fleet rolled out lane by lane: ``lanectl apply`` and ``lanectl restart --graceful``.

The library side of both commands (the CLI parses, calls ``apply`` or ``restart_gracefully`` and renders what
they return). A graceful restart drains the lane, waits until nothing is in flight, restarts its unit, waits
until it is up and puts it back into service; ``apply`` installs what changed and restarts gracefully, one at a
time, the running lanes whose units changed. Waits tell a ``progress`` callback what they wait for
(``lanectl.output.waiting`` shows it on a terminal).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from lanectl import config, install as installer, lifecycle, paths, systemd, units
from lanectl.errors import ExitCode, LanectlError, Timeout
from lanectl.ledger import Ledger
from lanectl.ledger import lanes as lane_ops
from lanectl.ledger.events import EventKind


@dataclass
class ApplyResult:
    """What ``apply`` did: the install's result, and the lanes restarted gracefully or that failed to."""

    install: installer.InstallResult
    changed_lanes: list[str] = field(default_factory=list)
    """Lanes whose units changed (all of them when the template or the slice did)."""
    restarted: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    """Lane -> why it did not come back (the lane is left as the failed restart left it)."""

    @property
    def ok(self) -> bool:
        return not self.failed and not self.install.supervisor_error

    def as_dict(self) -> dict[str, Any]:
        res = self.install
        return {"written": res.written, "removed": res.removed, "restarted": self.restarted, "failed": self.failed,
                "notices": res.notices, "supervisor": res.supervisor, "supervisor_error": res.supervisor_error,
                "ledger_created": res.ledger_created, "stopped": res.stopped, "changed": res.changed}


def graceful_restart(led: Ledger, fleet: config.LaneSet, lanes: dict[str, Any], name: str, timeout: float,
                     reason: str | None, progress: lifecycle.Progress | None = None) -> None:
    """Drain, wait until nothing is in flight, restart, wait until up, undrain (back to its previous state).

    Raises ``Timeout`` (exit 7, ``drain_timeout``; the lane stays draining) when work is still in flight after
    ``timeout`` seconds, and ``restart_failed`` (exit 8) when the lane is not up 60 s after its restart."""
    previous = lane_ops.state_of(led, name)
    lane_ops.drain(led, fleet, name, now=led.clock(), reason=f"graceful restart: {reason or ''}".strip(": "))
    left = lifecycle.wait_drained(led.path, name, timeout, progress=progress)
    if left:
        raise Timeout(f"lane {name} still has {len(left)} mission(s) in flight after {timeout:g}s",
                      "it stays draining; wait, cancel them, or restart without --graceful", "drain_timeout")
    systemd.run("reset-failed", lanes[name]["unit"], check=False)  # a unit systemd gave up on restarts too
    systemd.run("restart", lanes[name]["unit"])
    lane_ops.record(led, EventKind.LANE_RESTART, now=led.clock(), lane=name, graceful=True, reason=reason)
    if progress is not None:
        progress(f"restarting {name}")
    up = lifecycle.wait_up(lanes, name, 60, progress=progress)
    if previous in ("active", "degraded"):
        lane_ops.undrain(led, fleet, name, now=led.clock(), reason="graceful restart done")
    if not up:
        raise LanectlError(f"lane {name} did not come back up within 60s", "see 'lanectl status' and its journal",
                           "restart_failed", ExitCode.UNHEALTHY)


def restart_gracefully(lane: str, *, timeout: float, reason: str | None = None, unit_dir: str | None = None,
                       config_dir: str | None = None, ledger: str | None = None,
                       progress: lifecycle.Progress | None = None) -> lifecycle.OpResult:
    """``lanectl restart --graceful LANE``: ``graceful_restart`` of one installed lane (exit 4 for a lane that is
    not installed); the result says it was restarted."""
    from lanectl.status import installed_lanes

    lanes = installed_lanes(paths.unit_dir(unit_dir), config_dir)
    lifecycle.select(lanes, [lane], enabled_only=False)
    fleet = config.load(config_dir)
    with config.open_ledger(fleet, ledger) as led:
        graceful_restart(led, fleet, lanes, lane, timeout, reason, progress)
    return lifecycle.OpResult("restart", [lane], [lane])


def apply(*, timeout: float, reason: str | None = None, unit_dir: str | None = None, config_dir: str | None = None,
          ledger: str | None = None, progress: lifecycle.Progress | None = None) -> ApplyResult:
    """``lanectl apply``: install what changed, record an ``apply`` event when something did, then restart
    gracefully, one at a time, the changed lanes whose units run (a stopped one takes its new unit when it starts).

    A lane that fails to come back is listed in ``failed`` and the next one is tried; a lane that did not drain in
    ``timeout`` stops the rollout (``Timeout``, exit 7: it is left draining)."""
    fleet = config.load(config_dir, check_host=True)  # what install checks (accounts, secret env files)
    udir = paths.unit_dir(unit_dir)
    res = installer.install_fleet(fleet, udir, ledger=ledger, by="apply", reason=reason)
    template_changed = any(p in (units.TEMPLATE, units.SLICE) for p in res.written)
    changed_lanes = sorted({n for n in fleet.lanes if units.dropin_path(n) in res.written} |
                           (set(fleet.lanes) if template_changed else set()))
    lanes = installer.manifest(fleet)["lanes"]
    active = lifecycle.active_states([lanes[n]["unit"] for n in changed_lanes]) if changed_lanes else {}
    out = ApplyResult(res, changed_lanes)
    with config.open_ledger(fleet, config.ledger_path(fleet, ledger)) as led:
        if res.changed:
            lane_ops.record(led, EventKind.APPLY, now=led.clock(), written=res.written, removed=res.removed,
                            lanes=changed_lanes, reason=reason)
        for i, name in enumerate(changed_lanes):
            if active.get(lanes[name]["unit"]) != "active":
                continue  # not running: the new unit applies when it starts
            try:
                if progress is not None:
                    progress(f"apply: {name} ({i + 1} of {len(changed_lanes)} changed lanes)")
                graceful_restart(led, fleet, lanes, name, timeout, reason or "apply", progress)
                out.restarted.append(name)
            except LanectlError as exc:
                out.failed[name] = exc.message
                if exc.exit_code == ExitCode.TIMEOUT:
                    raise
    return out


@dataclass
class DrainResult:
    """What ``drain`` did. ``drained`` is None when it was not asked to wait."""

    lane: str
    changed: bool
    previous: str | None
    """The lane's dispatch state before (``draining``/``drained`` with ``changed``: a drain lanectl made by
    itself, a rollback, taken over)."""
    in_flight: list[int] = field(default_factory=list)
    drained: bool | None = None
    stopped: bool = False

    @property
    def taken_over(self) -> bool:
        return self.changed and self.previous in ("draining", "drained")

    def as_dict(self) -> dict[str, Any]:
        return {"lane": self.lane, "changed": self.changed, "in_flight": self.in_flight, "drained": self.drained,
                "stopped": self.stopped, "previous": self.previous}


def drain(lane: str, *, wait: bool = False, stop: bool = False, timeout: float = 300.0, reason: str | None = None,
          config_dir: str | None = None, ledger: str | None = None,
          progress: lifecycle.Progress | None = None) -> DrainResult:
    """``lanectl drain``: the lane takes no new work (an operator's drain takes over one lanectl made by itself).
    With ``wait`` (or ``stop``), wait until nothing is in flight: ``Timeout`` (exit 7, ``drain_timeout``) after
    ``timeout`` seconds; with ``stop``, then stop the lane's unit."""
    fleet = config.load(config_dir)
    with config.open_ledger(fleet, ledger) as led:
        host = lane_ops.host_of(led, fleet, lane)
        if stop and host is not None:
            raise LanectlError(f"lane {lane!r} runs on host {host!r}: its unit cannot be stopped from this host",
                               f"drain it from here without --stop, or run 'lanectl drain {lane} --stop' on {host}",
                               "lane_on_other_host", ExitCode.CONFLICT)
        previous = lane_ops.state_of(led, lane)
        changed = lane_ops.drain(led, fleet, lane, now=led.clock(), reason=reason, take_over=True)
        path = led.path
    res = DrainResult(lane, changed, previous)
    if wait or stop:
        res.in_flight = lifecycle.wait_drained(path, lane, timeout, progress=progress)
        res.drained = not res.in_flight
    if res.in_flight:
        left = res.in_flight
        raise Timeout(f"lane {lane} still has {len(left)} mission(s) in flight after {timeout:g}s: {left[:10]}",
                      "wait longer, or cancel them ('lanectl mission cancel ID')", "drain_timeout")
    if stop:
        systemd.run("stop", units.unit_name(lane))
        res.stopped = True
    return res


@dataclass
class HostDrainResult:
    """What ``host_drain`` / ``host_undrain`` did; ``in_flight`` and ``drained`` only when it waited."""

    host: str
    changed: bool
    lanes: list[str] = field(default_factory=list)
    in_flight: list[int] = field(default_factory=list)
    drained: bool | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"host": self.host, "changed": self.changed, "lanes": self.lanes, "in_flight": self.in_flight,
                "drained": self.drained}


def host_drain(name: str, *, wait: bool = False, timeout: float = 300.0, reason: str | None = None,
               config_dir: str | None = None, ledger: str | None = None,
               progress: lifecycle.Progress | None = None) -> HostDrainResult:
    """``lanectl host drain``: host ``name``'s lanes take no new work, from any host (through the ledger). With
    ``wait``, wait until nothing is in flight on its lanes: ``Timeout`` (exit 7, ``host_drain_timeout``)."""
    from lanectl.ledger import hosts

    with config.open_ledger(config_dir, ledger) as led:
        changed = hosts.drain(led, name, now=led.clock(), who=lane_ops.actor(), reason=reason)
        res = HostDrainResult(name, changed, hosts.lanes_of(led.conn, name), hosts.in_flight(led.conn, name))
        path = led.path
    if wait:
        res.in_flight = lifecycle.wait_host_drained(path, name, timeout, progress=progress)
        res.drained = not res.in_flight
        if res.in_flight:
            left = res.in_flight
            raise Timeout(f"host {name} still has {len(left)} mission(s) in flight on its lanes after {timeout:g}s: "
                          f"{left[:10]}", "wait longer ('lanectl host drain NAME --wait' again), or cancel them "
                          "('lanectl mission cancel ID')", "host_drain_timeout")
    return res


def host_undrain(name: str, *, reason: str | None = None, config_dir: str | None = None,
                 ledger: str | None = None) -> HostDrainResult:
    """``lanectl host undrain``: host ``name``'s lanes take work again."""
    from lanectl.ledger import hosts

    with config.open_ledger(config_dir, ledger) as led:
        changed = hosts.undrain(led, name, now=led.clock(), who=lane_ops.actor(), reason=reason)
        return HostDrainResult(name, changed, hosts.lanes_of(led.conn, name), hosts.in_flight(led.conn, name))


@dataclass
class UndrainResult:
    """What ``undrain`` did: the ledger's change, and what ``lifecycle.bring_back`` did to the unit (None without
    systemd)."""

    lane: str
    changed: bool
    unit: dict[str, Any] | None = None

    @property
    def unit_failed(self) -> bool:
        return bool(self.unit and self.unit.get("failed"))

    def as_dict(self) -> dict[str, Any]:
        return {"lane": self.lane, "changed": self.changed or bool(self.unit and self.unit.get("started")),
                "unit": self.unit}


def undrain(lane: str, *, reason: str | None = None, unit_dir: str | None = None, config_dir: str | None = None,
            ledger: str | None = None) -> UndrainResult:
    """``lanectl undrain``: back into service, and its unit started when it is enabled but stopped (as ``drain
    --stop`` leaves it)."""
    fleet = config.load(config_dir)
    with config.open_ledger(fleet, ledger) as led:
        host = lane_ops.host_of(led, fleet, lane)
        changed = lane_ops.undrain(led, fleet, lane, now=led.clock(), reason=reason)
    if host is not None:  # its unit is another host's: that host's supervisor sees the ledger's change
        return UndrainResult(lane, changed, {"note": f"its unit runs on host {host} (not started from here)"})
    unit = lifecycle.bring_back(lane, unit_dir, config_dir) if systemd.available() else None
    return UndrainResult(lane, changed, unit)

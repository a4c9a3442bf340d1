"""supervise, drain, undrain, reroute, apply: the control plane and the operator's verbs on it."""
from __future__ import annotations

import signal
import time
from typing import Any, Optional

import typer

from lanectl import config, install as installer, operate, paths, systemd, units
from lanectl.cli.options import CONFIG, JSON, LEDGER, UNIT_DIR, complete_lanes
from lanectl.errors import ExitCode, LanectlError, Timeout
from lanectl.ledger import Ledger
from lanectl.ledger import lanes as lane_ops
from lanectl.ledger.events import EventKind
from lanectl.output import command, escape, finish, stdout_console, waiting

REASON = typer.Option(None, "--reason", help="Why: recorded with the event and your user name.")


def register(app: typer.Typer) -> None:
    app.command("supervise")(supervise)
    app.command("drain")(drain)
    app.command("undrain")(undrain)
    app.command("reroute")(reroute)
    app.command("apply")(apply)
    app.command("snapshot")(snapshot)


def setup_logging() -> None:
    """To stderr; under journald with sd-daemon priority prefixes on every line (lanectl.journal)."""
    from lanectl import journal

    journal.setup()


@command("supervise")
def supervise(config_dir: Optional[str] = CONFIG, ledger: Optional[str] = LEDGER, json_out: bool = JSON) -> None:
    """Run the supervisor in the foreground (lanectl-supervisor.service does).

    Dispatches missions, takes callbacks on 127.0.0.1:PORT/callbacks, watches lanes and fails over. Sends
    READY=1 after the ledger is migrated and the lanes are loaded, WATCHDOG=1 from its main loop. SIGTERM stops
    it. Exits 3 when the configuration or the ledger is invalid, 5 (supervisor_running, naming its pid and unit)
    when a supervisor already runs on this ledger or callback socket, 6 (ledger_missing) when the ledger named by
    --ledger or $LANECTL_LEDGER does not exist.
    """
    import os

    from lanectl.runtime import Notifier
    from lanectl.supervisor import Supervisor

    setup_logging()
    fleet = config.load(config_dir)
    sup = Supervisor(fleet, config.ledger_path(fleet, ledger), notifier=Notifier(), use_systemd=systemd.available(),
                     config_source=config_dir, create=not (ledger or os.environ.get("LANECTL_LEDGER")))
    signal.signal(signal.SIGTERM, lambda *_: (sup.stop.set(), sup.wake()))
    signal.signal(signal.SIGHUP, lambda *_: sup.request_reload())  # systemctl reload: re-read the configuration
    signal.signal(signal.SIGINT, lambda *_: (sup.stop.set(), sup.wake()))
    code = sup.run()
    raise typer.Exit(code)


def _open(config_dir: Optional[str], ledger: Optional[str]) -> tuple[config.LaneSet, Ledger]:
    fleet = config.load(config_dir)
    return fleet, config.open_ledger(fleet, ledger)


@command("drain")
def drain(
    lane: str = typer.Argument(..., autocompletion=complete_lanes),
    wait: bool = typer.Option(False, "--wait", help="Wait until nothing is in flight on the lane."),
    timeout: float = typer.Option(300.0, help="Seconds --wait waits before exiting 7."),
    stop: bool = typer.Option(False, "--stop", help="Stop the lane's unit once drained (implies --wait)."),
    reason: Optional[str] = REASON,
    config_dir: Optional[str] = CONFIG,
    ledger: Optional[str] = LEDGER,
    json_out: bool = JSON,
) -> None:
    """Take no new work on a lane; what it runs finishes.

    Idempotent (draining a drained lane changes nothing, exit 0). Draining a lane lanectl drained by itself (a
    rollback) takes that drain over: it stays drained and 'lanectl probe' stops alarming. With --wait, returns
    when nothing is in flight (exit 7 at --timeout); with --stop, then stops the unit ('undrain' starts it).
    """
    fleet, led = _open(config_dir, ledger)
    with led:
        previous = lane_ops.state_of(led, lane)
        changed = lane_ops.drain(led, fleet, lane, now=time.time(), reason=reason, take_over=True)
        path = led.path
    left: list[int] = []
    if wait or stop:
        with waiting(json_out) as progress:
            left = operate.wait_drained(path, lane, timeout, progress=progress)
    stopped = False
    if stop and not left:
        systemd.run("stop", units.unit_name(lane))
        stopped = True
    data = {"lane": lane, "changed": changed, "in_flight": left, "drained": not left if (wait or stop) else None,
            "stopped": stopped, "previous": previous}
    if left:
        exc = Timeout(f"lane {lane} still has {len(left)} mission(s) in flight after {timeout:g}s: {left[:10]}",
                      "wait longer, or cancel them ('lanectl mission cancel ID')", "drain_timeout")
        raise exc

    def human() -> None:
        con = stdout_console()
        word = ("drain taken over from lanectl (the probe no longer alarms)" if changed and data["previous"]
                in ("draining", "drained") else "draining" if changed else "already draining or drained")
        con.print(f"{escape(lane)}: {word}"
                  + ("; nothing in flight" if (wait or stop) else "") + ("; unit stopped" if stopped else ""))

    finish(["drain"], data, json_mode=json_out, human=human)


@command("undrain")
def undrain(lane: str = typer.Argument(..., autocompletion=complete_lanes), reason: Optional[str] = REASON, unit_dir: Optional[str] = UNIT_DIR,
            config_dir: Optional[str] = CONFIG, ledger: Optional[str] = LEDGER, json_out: bool = JSON) -> None:
    """Put a drained (or degraded) lane back into service.

    A lane whose unit is stopped but enabled (as 'drain --stop' leaves it) is started too, and a failed one is
    cleared first (reset-failed); a lane taken down with 'lanectl down' stays down (start it with 'lanectl up').
    Exits 8 when the unit did not start.
    """
    fleet, led = _open(config_dir, ledger)
    with led:
        changed = lane_ops.undrain(led, fleet, lane, now=time.time(), reason=reason)
    unit = operate.bring_back(lane, unit_dir, config_dir) if systemd.available() else None
    data = {"lane": lane, "changed": changed or bool(unit and unit.get("started")), "unit": unit}

    def human() -> None:
        con = stdout_console()
        text = f"{escape(lane)}: {'active' if changed else 'already active'}"
        if unit and unit.get("reset"):
            text += f"; its unit was failed ({escape(unit['reset'])}), cleared"
        if unit and unit.get("started"):
            text += "; unit started"
        elif unit and unit.get("failed"):
            text += f"; [red]its unit did not start[/]: {escape(unit['failed'])}"
        elif unit and unit.get("note"):
            text += f"; {escape(unit['note'])}"
        con.print(text)

    finish(["undrain"], data, json_mode=json_out, human=human,
           exit_code=ExitCode.UNHEALTHY if unit and unit.get("failed") else ExitCode.OK)


@command("reroute")
def reroute(
    lane: str = typer.Argument(..., autocompletion=complete_lanes),
    to: str = typer.Option(..., "--to", help="The lane that takes the work.", autocompletion=complete_lanes),
    cls: Optional[str] = typer.Option(None, "--class", help="Only missions of this class."),
    sessions: bool = typer.Option(False, "--sessions", help="Move the lane's idle sessions too."),
    reason: Optional[str] = REASON,
    config_dir: Optional[str] = CONFIG,
    ledger: Optional[str] = LEDGER,
    json_out: bool = JSON,
) -> None:
    """Move a lane's queued missions (and sessions) to another lane.

    Running missions are never moved; missions of a class the target does not serve stay and are listed.
    Every move is recorded; running it again moves nothing more (exit 0).
    """
    fleet, led = _open(config_dir, ledger)
    with led:
        res = lane_ops.reroute(led, fleet, lane, to, now=time.time(), cls=cls, sessions=sessions, reason=reason)
    data = {"lane": lane, "to": to, "missions": res.missions, "sessions": res.sessions, "skipped": res.skipped,
            "changed": res.changed}

    def human() -> None:
        con = stdout_console()
        con.print(f"{escape(lane)} -> {escape(to)}: {len(res.missions)} mission(s), {len(res.sessions)} session(s)")
        for k, v in res.skipped.items():
            con.print(f"  skipped {escape(k)}: {escape(v)}")

    finish(["reroute"], data, json_mode=json_out, human=human)


@command("apply")
def apply(
    timeout: float = typer.Option(300.0, help="Seconds to wait for each lane to drain."),
    reason: Optional[str] = REASON,
    unit_dir: Optional[str] = UNIT_DIR,
    config_dir: Optional[str] = CONFIG,
    ledger: Optional[str] = LEDGER,
    json_out: bool = JSON,
) -> None:
    """Re-render and install; gracefully restart only the lanes whose units changed.

    One lane at a time: drain, wait until nothing is in flight, restart, wait until it is up, undrain. A
    running supervisor picks up a changed fleet: it is reloaded (it re-reads the configuration; in-flight work
    runs on), or restarted when its own unit changed; either is said and recorded as a 'supervisor' event.
    Refused (exit 5) while work or sessions are bound to a lane that is gone from lanes.d. Exits 7 if a lane
    did not drain in time (it is left draining), 8 if a lane did not come back up or the supervisor did not
    take the new fleet.
    """
    fleet = config.load(config_dir, check_host=True)  # what install checks (accounts, secret env files)
    udir = paths.unit_dir(unit_dir)
    res = installer.install_fleet(fleet, udir, ledger=ledger, by="apply", reason=reason)
    template_changed = any(p in (units.TEMPLATE, units.SLICE) for p in res.written)
    changed_lanes = sorted({n for n in fleet.lanes if units.dropin_path(n) in res.written} |
                           (set(fleet.lanes) if template_changed else set()))
    lanes = installer.manifest(fleet)["lanes"]
    active = operate._active([lanes[n]["unit"] for n in changed_lanes]) if changed_lanes else {}
    restarted, failed = [], {}
    ledger_file = config.ledger_path(fleet, ledger)
    with config.open_ledger(fleet, ledger_file) as led, waiting(json_out) as progress:
        if res.changed:
            lane_ops.record(led, EventKind.APPLY, now=time.time(), written=res.written, removed=res.removed,
                            lanes=changed_lanes, reason=reason)
        for name in changed_lanes:
            if active.get(lanes[name]["unit"]) != "active":
                continue  # not running: the new unit applies when it starts
            try:
                if progress is not None:
                    progress(f"apply: {name} ({changed_lanes.index(name) + 1} of {len(changed_lanes)} changed lanes)")
                graceful_restart(led, fleet, lanes, name, timeout, reason or "apply", progress)
                restarted.append(name)
            except LanectlError as exc:
                failed[name] = exc.message
                if exc.exit_code == ExitCode.TIMEOUT:
                    raise
    data = {"written": res.written, "removed": res.removed, "restarted": restarted, "failed": failed,
            "notices": res.notices, "supervisor": res.supervisor, "supervisor_error": res.supervisor_error,
            "ledger_created": res.ledger_created, "stopped": res.stopped, "changed": res.changed}

    def human() -> None:
        con = stdout_console()
        for n in res.notices:
            con.print(f"[yellow]left alone[/]: {escape(n)}")
        if not res.changed:
            con.print("nothing changed")
        for p in res.written:
            con.print(f"wrote {escape(p)}")
        for p in res.removed:
            con.print(f"removed {escape(p)}")
        for n in res.stopped:
            con.print(f"{escape(n)}: removed from the fleet, unit stopped and disabled")
        if res.ledger_created:
            con.print(f"created the ledger {escape(res.ledger_created)}")
        installer.print_supervisor(con, res)
        for n in restarted:
            con.print(f"{escape(n)}: restarted gracefully")
        for n, why in failed.items():
            con.print(f"[red]{escape(n)}: {escape(why)}[/]")

    finish(["apply"], data, json_mode=json_out, human=human,
           exit_code=ExitCode.UNHEALTHY if failed or res.supervisor_error else ExitCode.OK)


def graceful_restart(led: Ledger, fleet: config.LaneSet, lanes: dict[str, Any], name: str, timeout: float,
                     reason: str | None, progress: operate.Progress | None = None) -> None:
    """Drain, wait until nothing is in flight, restart, wait until up, undrain (back to its previous state)."""
    previous = lane_ops.state_of(led, name)
    lane_ops.drain(led, fleet, name, now=time.time(), reason=f"graceful restart: {reason or ''}".strip(": "))
    left = operate.wait_drained(led.path, name, timeout, progress=progress)
    if left:
        raise Timeout(f"lane {name} still has {len(left)} mission(s) in flight after {timeout:g}s",
                      "it stays draining; wait, cancel them, or restart without --graceful", "drain_timeout")
    systemd.run("reset-failed", lanes[name]["unit"], check=False)  # a unit systemd gave up on restarts too
    systemd.run("restart", lanes[name]["unit"])
    lane_ops.record(led, EventKind.LANE_RESTART, now=time.time(), lane=name, graceful=True, reason=reason)
    if progress is not None:
        progress(f"restarting {name}")
    up = operate.wait_up(lanes, name, 60, progress=progress)
    if previous in ("active", "degraded"):
        lane_ops.undrain(led, fleet, name, now=time.time(), reason="graceful restart done")
    if not up:
        raise LanectlError(f"lane {name} did not come back up within 60s", "see 'lanectl status' and its journal",
                           "restart_failed", ExitCode.UNHEALTHY)


@command("snapshot")
def snapshot(
    lane: Optional[str] = typer.Argument(None, help="Focus on one lane (default: the whole fleet).",
                                         autocompletion=complete_lanes),
    out: Optional[str] = typer.Option(None, "--out", metavar="DIR", help="Where to write it.",
                                      show_default="STATE_DIR/snapshots"),
    reason: Optional[str] = REASON,
    config_dir: Optional[str] = CONFIG,
    ledger: Optional[str] = LEDGER,
    json_out: bool = JSON,
) -> None:
    """Capture an incident snapshot (written atomically).

    Units, status, the last hour of events, metrics, the journal tail where journald runs, and a ledger
    integrity check, in DIR/snapshot-TIME-LANE/. What could not be captured is listed in problems.txt.
    """
    from pathlib import Path

    from lanectl import snapshot as snap

    fleet = config.load(config_dir)
    path = config.ledger_path(fleet, ledger)
    target = Path(out) if out else Path(fleet.settings.state_dir) / "snapshots"
    who = lane_ops.actor()
    made = snap.capture(fleet, path, target, lane=lane, reason=reason, actor=who)
    try:
        with config.open_ledger(fleet, path) as led:
            lane_ops.record(led, EventKind.SNAPSHOT, now=time.time(), lane=lane, path=str(made), reason=reason,
                            actor=who)
    except LanectlError:
        pass  # the snapshot is the point; an unwritable ledger is one of the things it records
    problems = (made / "problems.txt").read_text().splitlines()
    finish(["snapshot"], {"path": str(made), "problems": problems, "changed": True}, json_mode=json_out,
           human=lambda: stdout_console().print(f"snapshot written to {escape(str(made))}"
                                                + (f" ({len(problems)} part(s) missing)" if problems else "")))

"""supervise, drain, undrain, reroute, apply, snapshot: the control plane and the operator's verbs on it."""
from __future__ import annotations

import contextlib
import signal
from typing import Optional

import typer

from lanectl import config, install as installer, rollout, systemd
from lanectl.cli.options import CONFIG, JSON, LEDGER, UNIT_DIR, complete_lanes
from lanectl.errors import ExitCode
from lanectl.ledger import Ledger
from lanectl.ledger import lanes as lane_ops
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
    when a supervisor already runs on this ledger or callback socket, 5 (host_reaped) when another host declared
    this host dead while it could not renew its lease (systemd starts it again, as a new incarnation), 6
    (ledger_missing) when the ledger named by --ledger or $LANECTL_LEDGER does not exist.
    """
    import os

    from lanectl.notify import Notifier
    from lanectl.supervisor import Supervisor

    from lanectl.ledger import pg

    setup_logging()
    pg.set_role("lanectl-supervisor")  # its retention pass's connection too
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
    with waiting(json_out) if (wait or stop) else contextlib.nullcontext() as progress:
        res = rollout.drain(lane, wait=wait, stop=stop, timeout=timeout, reason=reason, config_dir=config_dir,
                            ledger=ledger, progress=progress)

    def human() -> None:
        con = stdout_console()
        word = ("drain taken over from lanectl (the probe no longer alarms)" if res.taken_over
                else "draining" if res.changed else "already draining or drained")
        con.print(f"{escape(lane)}: {word}"
                  + ("; nothing in flight" if (wait or stop) else "") + ("; unit stopped" if res.stopped else ""))

    finish(["drain"], res.as_dict(), json_mode=json_out, human=human)


@command("undrain")
def undrain(lane: str = typer.Argument(..., autocompletion=complete_lanes), reason: Optional[str] = REASON, unit_dir: Optional[str] = UNIT_DIR,
            config_dir: Optional[str] = CONFIG, ledger: Optional[str] = LEDGER, json_out: bool = JSON) -> None:
    """Put a drained (or degraded) lane back into service.

    A lane whose unit is stopped but enabled (as 'drain --stop' leaves it) is started too, and a failed one is
    cleared first (reset-failed); a lane taken down with 'lanectl down' stays down (start it with 'lanectl up').
    Exits 8 when the unit did not start.
    """
    res = rollout.undrain(lane, reason=reason, unit_dir=unit_dir, config_dir=config_dir, ledger=ledger)
    unit = res.unit

    def human() -> None:
        con = stdout_console()
        text = f"{escape(lane)}: {'active' if res.changed else 'already active'}"
        if unit and unit.get("reset"):
            text += f"; its unit was failed ({escape(unit['reset'])}), cleared"
        if unit and unit.get("started"):
            text += "; unit started"
        elif unit and unit.get("failed"):
            text += f"; [red]its unit did not start[/]: {escape(unit['failed'])}"
        elif unit and unit.get("note"):
            text += f"; {escape(unit['note'])}"
        con.print(text)

    finish(["undrain"], res.as_dict(), json_mode=json_out, human=human,
           exit_code=ExitCode.UNHEALTHY if res.unit_failed else ExitCode.OK)


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
        res = lane_ops.reroute(led, fleet, lane, to, now=led.clock(), cls=cls, sessions=sessions, reason=reason)
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
    with waiting(json_out) as progress:
        res = rollout.apply(timeout=timeout, reason=reason, unit_dir=unit_dir, config_dir=config_dir, ledger=ledger,
                            progress=progress)
    inst = res.install

    def human() -> None:
        con = stdout_console()
        for n in inst.notices:
            con.print(f"[yellow]left alone[/]: {escape(n)}")
        if not inst.changed:
            con.print("nothing changed")
        for p in inst.written:
            con.print(f"wrote {escape(p)}")
        for p in inst.removed:
            con.print(f"removed {escape(p)}")
        for n in inst.stopped:
            con.print(f"{escape(n)}: removed from the fleet, unit stopped and disabled")
        if inst.ledger_created:
            con.print(f"created the ledger {escape(inst.ledger_created)}")
        installer.print_supervisor(con, inst)
        for n in res.restarted:
            con.print(f"{escape(n)}: restarted gracefully")
        for n, why in res.failed.items():
            con.print(f"[red]{escape(n)}: {escape(why)}[/]")

    finish(["apply"], res.as_dict(), json_mode=json_out, human=human,
           exit_code=ExitCode.OK if res.ok else ExitCode.UNHEALTHY)


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
    from lanectl import incident as snap

    res = snap.take(lane=lane, out=out, reason=reason, config_dir=config_dir, ledger=ledger)
    finish(["snapshot"], res.as_dict(), json_mode=json_out,
           human=lambda: stdout_console().print(f"snapshot written to {escape(str(res.path))}"
                                                + (f" ({len(res.problems)} part(s) missing)" if res.problems
                                                   else "")))

"""up, down, restart, status, top: operate the installed fleet through systemd and watch it."""
from __future__ import annotations

import os
from typing import Any, List, Optional

import typer

from lanectl import lifecycle, paths
from lanectl.cli.options import CONFIG, JSON, LEDGER, UNIT_DIR, complete_lanes
from lanectl.errors import ExitCode, LanectlError
from lanectl.cli.statusview import run_status
from lanectl.output import command, escape, finish, stderr_console, stdout_console, waiting

LANES = typer.Argument(None, metavar="LANE", help="Lanes to act on (default: all).", autocompletion=complete_lanes)


def register(app: typer.Typer) -> None:
    app.command("up")(up)
    app.command("down")(down)
    app.command("restart")(restart)
    app.command("status")(status)
    app.command("probe")(probe)
    app.command("logs")(logs)
    app.command("top")(top)


def _lanes(unit_dir: Optional[str], config_dir: Optional[str]) -> dict[str, dict[str, Any]]:
    from lanectl.status import installed_lanes

    return installed_lanes(paths.unit_dir(unit_dir), config_dir)


def _report(res: lifecycle.OpResult, json_out: bool, verb: str, warnings: list[Any] | None = None) -> None:
    data = {"action": res.action, "lanes": res.lanes, "changed": res.changed, "failed": res.failed,
            "reset": res.reset}

    def human() -> None:
        con = stdout_console()
        for n in res.lanes:
            if n in res.reset:
                con.print(f"{escape(n)}: was failed ({escape(res.reset[n])}); cleared it (systemctl reset-failed)")
            if n in res.failed:
                con.print(f"[red]{escape(n)}: failed[/] {escape(res.failed[n])}")
            elif n in res.changed:
                con.print(f"{escape(n)}: {verb}")
            else:
                con.print(f"{escape(n)}: already {verb}")
        if res.failed:
            stderr_console().print("see 'lanectl status' and 'journalctl -u lanectl-lane@LANE'")

    code = ExitCode.UNHEALTHY if res.failed else ExitCode.OK
    finish([res.action], data, json_mode=json_out, human=human, exit_code=code, warnings=warnings,
           status="partial" if res.failed and res.changed else None)


@command("up")
def up(lanes: Optional[List[str]] = LANES, unit_dir: Optional[str] = UNIT_DIR,
       config_dir: Optional[str] = CONFIG, json_out: bool = JSON) -> None:
    """Enable and start lanes; waits until each sent READY=1.

    A failed lane (systemd gave up on it) has its failed state cleared first (reset-failed), and says so.
    Exits 8 when a lane failed to start (the others are started anyway), 6 when this user may not manage
    units.
    """
    _report(lifecycle.up(_lanes(unit_dir, config_dir), lanes or None), json_out, "started")


@command("down")
def down(lanes: Optional[List[str]] = LANES, unit_dir: Optional[str] = UNIT_DIR,
         config_dir: Optional[str] = CONFIG, json_out: bool = JSON) -> None:
    """Stop and disable lanes (they stay down across reboots).

    Warns about missions and sessions bound to a lane it stops: they wait until the lane is up again. Also stops
    and disables a lane unit whose lane is no longer installed (its file was deleted by hand), by name or, with
    no names, with the rest.
    """
    from lanectl.status import installed_fleet

    fleet = installed_fleet(paths.unit_dir(unit_dir), config_dir)
    res = lifecycle.down(fleet["lanes"], lanes or None, paths.unit_dir(unit_dir))
    _report(res, json_out, "stopped", lifecycle.bound_warnings(fleet.get("ledger"), res.lanes) if lanes else None)


@command("restart")
def restart(lane: str = typer.Argument(..., autocompletion=complete_lanes),
            graceful: bool = typer.Option(False, "--graceful",
                                          help="Drain, wait until nothing is in flight, restart, undrain."),
            timeout: float = typer.Option(300.0, help="Seconds --graceful waits for the lane to drain."),
            reason: Optional[str] = typer.Option(None, "--reason", help="Why: recorded with the event."),
            unit_dir: Optional[str] = UNIT_DIR, config_dir: Optional[str] = CONFIG,
            ledger: Optional[str] = LEDGER, json_out: bool = JSON) -> None:
    """Restart one lane; waits for READY=1.

    Plain: systemctl restart (the supervisor re-queues what it was running); a failed lane (systemd gave up on
    it) has its failed state cleared first (reset-failed), and says so. --graceful: drain, wait until nothing
    is in flight (exit 7 at --timeout, the lane stays draining), restart, wait until up, undrain. Exits 8 when
    the lane did not start, 6 when this user may not manage units.
    """
    if not graceful:
        _report(lifecycle.restart(_lanes(unit_dir, config_dir), lane), json_out, "restarted")
        return
    from lanectl import rollout

    with waiting(json_out) as progress:
        res = rollout.restart_gracefully(lane, timeout=timeout, reason=reason, unit_dir=unit_dir,
                                         config_dir=config_dir, ledger=ledger, progress=progress)
    _report(res, json_out, "restarted gracefully")


@command("status")
def status(lanes: Optional[List[str]] = LANES, unit_dir: Optional[str] = UNIT_DIR,
           config_dir: Optional[str] = CONFIG, json_out: bool = JSON) -> None:
    """Show what runs: unit state, dispatch state, weight, PID, uptime, restarts, watchdog, memory, CPU, port,
    health.

    The dispatch state is the ledger's: active, draining, drained (by whom), degraded; the weight is the one in
    force (a promoted one is marked). Without lane names the supervisor is shown too. Exits 0 when every enabled
    lane (and the supervisor) is running and healthy or drained by an operator, 8 when one is not (down,
    failed: systemd gave up on it, or drained by lanectl itself), when the supervisor's last reload failed, or
    when a lane unit is enabled or running with no installed lane; 6 when systemd is unreachable or the ledger
    cannot be read (dispatch "unknown (ledger unreadable)", a warning on stderr: run it as root).

    Several hosts on one ledger: every row has its host, and without lane names the other hosts' lanes follow,
    from what their supervisors record in the ledger (health, unit state, PID and restarts as of their last lease
    renewal, in flight, their host's lease); they count for the exit code too, and may be named. A line under the
    table for each other host that is fenced, lost, dead or stopped; a warning when this host's supervisor cannot
    reach the ledger, saying since when (docs/multihost.md).
    """
    from lanectl import manifest
    from lanectl.status import collect, installed_fleet

    data = installed_fleet(paths.unit_dir(unit_dir), config_dir)
    fleet: dict[str, Any] = {}
    run_status(collect(data["lanes"], lanes or None, data.get("supervisor"), ledger=manifest.ledger(data),
                       unit_dir=paths.unit_dir(unit_dir), host=data.get("host"), fleet=fleet), json_out, fleet)


@command("top")
def top(interval: float = typer.Option(1.0, "--interval", "-n", min=0.2, max=60.0, help="Seconds between refreshes."),
        window: str = typer.Option("5m", help="The window of the p95 queue wait: 1m, 5m, 1h."),
        once: bool = typer.Option(False, "--once", help="Print one frame and exit (also when stdout is no terminal)."),
        unit_dir: Optional[str] = UNIT_DIR, config_dir: Optional[str] = CONFIG,
        ledger: Optional[str] = LEDGER) -> None:
    """A live view: lanes, queue and the last events, refreshed every second; q or Ctrl-C leaves.

    Per lane: dispatch state (active, draining, drained, degraded) or what is wrong with it, unit state,
    in flight / capacity, CPU since the last refresh, memory, restarts, watchdog ping age, health, uptime. Per
    class: queued, the oldest queued mission's wait, p95 queue wait over --window. Then the last events, as
    many as fit. Reads what status, metrics and events read; the ledger read-only. Narrow terminals lose
    columns from the right. With --once (or no terminal) it exits 6 when the ledger or systemd could not be read.
    """
    from lanectl import manifest
    from lanectl import top as live
    from lanectl.status import installed_fleet
    from lanectl.timeparse import parse_duration

    data = installed_fleet(paths.unit_dir(unit_dir), config_dir)
    source = live.Source(data, manifest.ledger(data, ledger) or data["ledger"], window_s=parse_duration(window))
    raise typer.Exit(live.run(source, interval_s=interval, once=once))


def probe(lanes: Optional[List[str]] = LANES, unit_dir: Optional[str] = UNIT_DIR,
          config_dir: Optional[str] = CONFIG,
          ledger: Optional[str] = LEDGER,
          json_out: bool = JSON) -> None:
    """One check for cron and monitoring (monitoring-plugins).

    Exits 0 OK, 1 WARNING, 2 CRITICAL, 3 UNKNOWN and prints one status line with perfdata. A lane that should
    run but is down or failed (systemd gave up on it), or a supervisor that is down, is CRITICAL, and so is a
    lane lanectl drained by itself (a rollback) until an operator undrains it or takes the drain over with
    'lanectl drain'; a degraded lane or a threshold of lanectl.toml [probe] crossed is a WARNING or CRITICAL; a
    lane an operator drained is not an alarm (WARNING if its unit failed); a ledger or systemd that cannot be
    read is UNKNOWN. Queued missions bound to a lane that is gone (no lane can ever take
    them) are CRITICAL. A lane unit enabled or running with no installed lane (its file deleted by hand), or a
    supervisor whose last reload failed, is a WARNING. Several hosts on one ledger: a host whose lease ran out with
    missions in flight on its lanes is CRITICAL; a fenced host, one whose lease ran out with nothing in flight, a
    stopped or dead one that owns lanes, and this host's supervisor while it cannot reach the ledger (since when)
    are WARNINGs (docs/multihost.md).
    """
    from lanectl import manifest
    from lanectl.cli.probeview import run_probe, unknown
    from lanectl.status import installed_fleet

    try:
        data = installed_fleet(paths.unit_dir(unit_dir), config_dir)
    except Exception as exc:  # no manifest and no valid config: UNKNOWN, as the convention wants
        unknown(f"no installed fleet: {exc}", json_out, "no_installed_fleet")
    try:
        where = manifest.ledger(data, ledger)
    except LanectlError as exc:  # a ledger URL that cannot be used (a password in it, ...): UNKNOWN, never a trace
        unknown(exc.message, json_out, exc.code)
    run_probe({**data, "ledger": where}, lanes or None, json_out, paths.unit_dir(unit_dir))


@command("logs")
def logs(lanes: Optional[List[str]] = typer.Argument(
             None, metavar="LANE", autocompletion=complete_lanes,
             help="Lanes whose journal to show; 'supervisor' is the supervisor's (default: every lane and it)."),
         supervisor: bool = typer.Option(False, "--supervisor", help="Show the supervisor's journal too."),
         follow: bool = typer.Option(False, "--follow", "-f", help="Keep printing new entries."),
         since: Optional[str] = typer.Option(None, "--since", metavar="TIME",
                                             help="From this time on: '-1h', '10 min ago', '2026-01-31 12:00'."),
         lines: Optional[int] = typer.Option(None, "--lines", "-n", metavar="N", min=0,
                                             help="The last N entries.", show_default="100 unless --since"),
         unit_dir: Optional[str] = UNIT_DIR, config_dir: Optional[str] = CONFIG) -> None:
    """Show the lanes' and the supervisor's logs from journald (journalctl underneath).

    Exits 4 for a lane that is not installed, 6 when journalctl is missing; otherwise journalctl's own code.
    """
    argv = lifecycle.journal_argv(_lanes(unit_dir, config_dir), lanes or None, supervisor=supervisor, follow=follow,
                                since=since, lines=lines)
    os.execv(argv[0], argv)

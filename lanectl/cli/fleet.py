"""up, down, restart, status: operate the installed fleet through systemd."""
from __future__ import annotations

from typing import Any, List, Optional

import typer

from lanectl import operate, paths
from lanectl.cli.options import CONFIG, JSON, UNIT_DIR
from lanectl.errors import ExitCode
from lanectl.output import command, escape, finish, human_bytes, human_duration, stderr_console, stdout_console

LANES = typer.Argument(None, metavar="[LANE]...", help="Lanes to act on (default: all).")


def register(app: typer.Typer) -> None:
    app.command("up")(up)
    app.command("down")(down)
    app.command("restart")(restart)
    app.command("status")(status)


def _lanes(unit_dir: Optional[str], config_dir: Optional[str]) -> dict[str, dict[str, Any]]:
    from lanectl.status import installed_lanes

    return installed_lanes(paths.unit_dir(unit_dir), config_dir)


def _report(res: operate.OpResult, json_out: bool, verb: str) -> None:
    data = {"action": res.action, "lanes": res.lanes, "changed": res.changed, "failed": res.failed}

    def human() -> None:
        con = stdout_console()
        for n in res.lanes:
            if n in res.failed:
                con.print(f"[red]{escape(n)}: failed[/] {escape(res.failed[n])}")
            elif n in res.changed:
                con.print(f"{escape(n)}: {verb}")
            else:
                con.print(f"{escape(n)}: already {verb}")
        if res.failed:
            stderr_console().print("see 'lanectl status' and 'journalctl -u lanectl-lane@LANE'")

    code = ExitCode.UNHEALTHY if res.failed else ExitCode.OK
    finish([res.action], data, json_mode=json_out, human=human, exit_code=code,
           status="partial" if res.failed and res.changed else None)


@command("up")
def up(lanes: Optional[List[str]] = LANES, unit_dir: Optional[str] = UNIT_DIR,
       config_dir: Optional[str] = CONFIG, json_out: bool = JSON) -> None:
    """Enable and start lanes; waits until each sent READY=1.

    Exits 8 when a lane failed to start (the others are started anyway).
    """
    _report(operate.up(_lanes(unit_dir, config_dir), lanes or None), json_out, "started")


@command("down")
def down(lanes: Optional[List[str]] = LANES, unit_dir: Optional[str] = UNIT_DIR,
         config_dir: Optional[str] = CONFIG, json_out: bool = JSON) -> None:
    """Stop and disable lanes (they stay down across reboots)."""
    _report(operate.down(_lanes(unit_dir, config_dir), lanes or None), json_out, "stopped")


@command("restart")
def restart(lane: str = typer.Argument(...), unit_dir: Optional[str] = UNIT_DIR,
            config_dir: Optional[str] = CONFIG, json_out: bool = JSON) -> None:
    """Restart one lane (systemctl restart; waits for READY=1)."""
    _report(operate.restart(_lanes(unit_dir, config_dir), lane), json_out, "restarted")


@command("status")
def status(lanes: Optional[List[str]] = LANES, unit_dir: Optional[str] = UNIT_DIR,
           config_dir: Optional[str] = CONFIG, json_out: bool = JSON) -> None:
    """Show what runs: unit state, PID, uptime, restarts, watchdog, memory, CPU, port, health.

    Exits 0 when every enabled lane is running and healthy, 8 when one is not, 6 when systemd is unreachable.
    """
    from lanectl.status import collect

    run_status(collect(_lanes(unit_dir, config_dir), lanes or None), json_out)


def run_status(rows: list, json_out: bool) -> None:  # type: ignore[type-arg]
    code = ExitCode.OK if all(r.ok for r in rows) else ExitCode.UNHEALTHY
    data = {"lanes": [r.as_dict() for r in rows], "ok": code == ExitCode.OK}
    finish(["status"], data, json_mode=json_out, human=lambda: print_table(rows), exit_code=code)


STATE_STYLE = {"up": "green", "degraded": "yellow", "starting": "yellow", "failed": "bold red", "down": "red",
               "disabled": "dim"}


def print_table(rows: list) -> None:  # type: ignore[type-arg]
    from rich import box
    from rich.table import Table

    t = Table("lane", "state", "unit", "pid", "up", "restarts", "watchdog", "mem", "cpu", "port", "health",
              "status", box=box.SIMPLE_HEAD)
    for r in rows:
        style = STATE_STYLE.get(r.state, "")
        wd = "-" if r.watchdog_sec is None else (
            f"{r.watchdog_ping_age_s:.1f}/{r.watchdog_sec:g}s" if r.watchdog_ping_age_s is not None
            else f"{r.watchdog_sec:g}s")
        health = "ok" if r.health.ok else (r.health.error or "-")
        if r.health.ok and r.health.latency_ms is not None:
            health = f"ok {r.health.latency_ms:.0f}ms"
        t.add_row(escape(r.name), f"[{style}]{r.state}[/]" if style else r.state,
                  f"{r.active_state}/{r.sub_state}", str(r.main_pid or "-"), human_duration(r.uptime_s),
                  str(r.restarts), wd, human_bytes(r.memory_bytes),
                  "-" if r.cpu_percent_avg is None else f"{r.cpu_percent_avg:.1f}%",
                  f"{r.port}" + ("" if r.health.listening else " (closed)"), escape(health),
                  escape(r.status_text or "-"))
    stdout_console().print(t)

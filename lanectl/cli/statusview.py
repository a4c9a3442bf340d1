"""Rendering of `lanectl status` (no typer here: the fast start-up path uses it too)."""
from __future__ import annotations

from lanectl.errors import ExitCode
from lanectl.output import escape, finish, human_bytes, human_duration, stdout_console
from lanectl.status import LaneStatus


def run_status(rows: list[LaneStatus], json_out: bool) -> None:
    code = ExitCode.OK if all(r.ok for r in rows) else ExitCode.UNHEALTHY
    data = {"lanes": [r.as_dict() for r in rows if r.kind == "lane"], "ok": code == ExitCode.OK}
    sup = [r.as_dict() for r in rows if r.kind == "supervisor"]
    if sup:
        data["supervisor"] = sup[0]
    finish(["status"], data, json_mode=json_out, human=lambda: print_table(rows), exit_code=code)


STATE_STYLE = {"up": "green", "degraded": "yellow", "starting": "yellow", "failed": "bold red", "down": "red",
               "disabled": "dim"}


def print_table(rows: list[LaneStatus]) -> None:
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
        name = escape(r.name) if r.kind == "lane" else "[bold](supervisor)[/]"
        if r.kind == "supervisor":
            t.add_section()
        t.add_row(name, f"[{style}]{r.state}[/]" if style else r.state,
                  f"{r.active_state}/{r.sub_state}", str(r.main_pid or "-"), human_duration(r.uptime_s),
                  str(r.restarts), wd, human_bytes(r.memory_bytes),
                  "-" if r.cpu_percent_avg is None else f"{r.cpu_percent_avg:.1f}%",
                  f"{r.port}" + ("" if r.health.listening else " (closed)"), escape(health),
                  escape(r.status_text or "-"))
    stdout_console().print(t)

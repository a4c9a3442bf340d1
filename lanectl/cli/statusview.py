"""Rendering of `lanectl status` (no typer here: the fast start-up path uses it too)."""
from __future__ import annotations

from lanectl.errors import ExitCode
from lanectl.output import escape, finish, human_bytes, human_duration, stdout_console
from lanectl.states import HELD
from lanectl.status import LaneStatus, dispatch_unknown


def run_status(rows: list[LaneStatus], json_out: bool) -> None:
    """Exit 0 when every lane is ok, 8 when one is not; 6 (status "partial", a ``ledger_unreadable`` warning) when
    none is known to be failing but the ledger could not be read: then a lane lanectl drained by itself would
    look fine, so the run cannot say the fleet is ok (a non-root user who may not read the ledger, typically)."""
    code = ExitCode.OK if all(r.ok for r in rows) else ExitCode.UNHEALTHY
    unread = next((r.dispatch_error for r in rows if r.kind == "lane" and r.dispatch_error), None)
    warnings = []
    if unread:
        warnings.append(dispatch_unknown(unread))
        if code == ExitCode.OK:
            code = ExitCode.UNAVAILABLE
    data = {"lanes": [r.as_dict() for r in rows if r.kind == "lane"], "ok": code == ExitCode.OK}
    sup = [r.as_dict() for r in rows if r.kind == "supervisor"]
    if sup:
        data["supervisor"] = sup[0]
    data["orphans"] = [{"lane": r.name, "unit": r.unit, "active_state": r.active_state, "sub_state": r.sub_state,
                        "restarts": r.restarts} for r in rows if r.kind == "orphan"]
    finish(["status"], data, json_mode=json_out, human=lambda: print_table(rows), exit_code=code,
           warnings=warnings, status="partial" if code == ExitCode.UNAVAILABLE else None)


STATE_STYLE = {"up": "green", "degraded": "yellow", "starting": "yellow", "failed": "bold red", "down": "red",
               "disabled": "dim", "orphan": "bold red"}


def print_table(rows: list[LaneStatus]) -> None:
    from rich import box
    from rich.table import Table

    t = Table("lane", "state", "dispatch", "weight", "unit", "pid", "up", "restarts", "watchdog", "mem", "cpu",
              "port", "health", "status", box=box.SIMPLE_HEAD)
    for r in rows:
        style = STATE_STYLE.get(r.state, "")
        state = f"[{style}]{r.state}[/]" if style else r.state
        if r.gave_up:
            state += " [bold red](gave up)[/]"
        dispatch, weight = "", ""
        if r.kind == "lane":
            dispatch = dispatch_text(r)
            weight = "-" if r.weight is None else f"{r.weight}" + (" (promoted)" if r.promoted else "")
        wd = "-" if r.watchdog_sec is None else (
            f"{r.watchdog_ping_age_s:.1f}/{r.watchdog_sec:g}s" if r.watchdog_ping_age_s is not None
            else f"{r.watchdog_sec:g}s")
        health = "ok" if r.health.ok else (r.health.error or "-")
        if r.health.ok and r.health.latency_ms is not None:
            health = f"ok {r.health.latency_ms:.0f}ms"
        name = (escape(r.name) if r.kind == "lane" else f"{escape(r.name)} (no lane)" if r.kind == "orphan"
                else "[bold](supervisor)[/]")
        if r.kind == "supervisor":
            t.add_section()
        t.add_row(name, state, dispatch, weight, f"{r.active_state}/{r.sub_state}", str(r.main_pid or "-"),
                  human_duration(r.uptime_s),
                  str(r.restarts), wd, human_bytes(r.memory_bytes),
                  "-" if r.cpu_percent_avg is None else f"{r.cpu_percent_avg:.1f}%",
                  f"{r.port}" + ("" if r.health.listening else " (closed)"), escape(health),
                  escape(r.status_text or "-"))
    stdout_console().print(t)
    for r in rows:
        if r.kind == "orphan":
            stdout_console().print(f"[bold red]{escape(r.unit)} is installed but lane {escape(r.name)} is not[/] "
                                   f"(its lane file is gone; no drop-in: it would run as root): 'lanectl down "
                                   f"{escape(r.name)}' or 'lanectl apply' stops and disables it")
        if r.reload_error:
            stdout_console().print(f"[bold red]supervisor: the last reload failed, it runs its previous "
                                   f"configuration:[/] {escape(r.reload_error)}\n  fix the configuration "
                                   f"('lanectl validate'), then 'systemctl reload lanectl-supervisor'")


DISPATCH_STYLE = {"active": "green", "draining": "yellow", "drained": "yellow", "degraded": "yellow",
                  "disabled": "dim", "unknown": "dim"}


def dispatch_text(r: LaneStatus) -> str:
    """The ledger's dispatch state, who drained it (lanectl itself is red: it needs an operator) and since when."""
    style = "bold red" if r.automatic else DISPATCH_STYLE.get(r.dispatch, "")
    text = f"[{style}]{escape(r.dispatch)}[/]" if style else escape(r.dispatch)
    if r.dispatch_error:
        return text + " [yellow](ledger unreadable)[/]"
    if r.dispatch in HELD:
        text += " by lanectl" if r.automatic else (f" by {escape(r.drained_by)}" if r.drained_by else "")
    if r.dispatch != "active" and r.dispatch_since is not None:
        import time

        text += f" {human_duration(time.time() - r.dispatch_since)}"
    return text

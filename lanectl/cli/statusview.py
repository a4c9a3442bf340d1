"""Rendering of `lanectl status` (no typer here: the fast start-up path uses it too)."""
from __future__ import annotations

from typing import Any

from lanectl.errors import ExitCode, Problem
from lanectl.output import escape, finish, human_bytes, human_duration, stdout_console
from lanectl.states import HELD
from lanectl.status import LaneStatus, dispatch_unknown


def run_status(rows: list[LaneStatus], json_out: bool, fleet: dict[str, Any] | None = None) -> None:
    """Exit 0 when every lane is ok, 8 when one is not; 6 (status "partial", a ``ledger_unreadable`` warning) when
    none is known to be failing but the ledger could not be read: then a lane lanectl drained by itself would
    look fine, so the run cannot say the fleet is ok (a non-root user who may not read the ledger, typically).

    Every lane of the fleet counts, another host's too (``remote``: ok while its host holds its lease and its
    supervisor records it healthy). ``fleet`` (what ``collect`` filled in) adds ``host`` (this host) and
    ``hosts`` (every host the ledger records, lanectl.ledger.fleetview.hosts) to the JSON, and a line per other
    host that is not up under the table; a supervisor that cannot reach the ledger adds a ``ledger_unreachable``
    warning saying since when."""
    fleet = fleet or {}
    code = ExitCode.OK if all(r.ok for r in rows) else ExitCode.UNHEALTHY
    unread = next((r.dispatch_error for r in rows if r.kind == "lane" and r.dispatch_error), None)
    warnings = []
    if unread:
        warnings.append(dispatch_unknown(unread))
        if code == ExitCode.OK:
            code = ExitCode.UNAVAILABLE
    down = ledger_down(rows)
    if down is not None:
        warnings.append(down)
    data = {"lanes": [r.as_dict() for r in rows if r.kind == "lane"], "ok": code == ExitCode.OK,
            "host": fleet.get("host"), "hosts": fleet.get("hosts")}
    sup = [r.as_dict() for r in rows if r.kind == "supervisor"]
    if sup:
        data["supervisor"] = sup[0]
    data["orphans"] = [{"lane": r.name, "unit": r.unit, "active_state": r.active_state, "sub_state": r.sub_state,
                        "restarts": r.restarts} for r in rows if r.kind == "orphan"]
    finish(["status"], data, json_mode=json_out, human=lambda: print_table(rows, fleet), exit_code=code,
           warnings=warnings, status="partial" if code == ExitCode.UNAVAILABLE else None)


def ledger_down(rows: list[LaneStatus]) -> Problem | None:
    """This host's supervisor cannot reach the ledger (``ledger_ok`` false in its /healthz): since when, and
    what the host does meanwhile (docs/multihost.md, "The database is down"); or it is fenced (``fenced`` in its
    /healthz: it claims no new work)."""
    import time

    sup = next((r for r in rows if r.kind == "supervisor"), None)
    body = sup.health.body if sup is not None and isinstance(sup.health.body, dict) else {}
    who = f"host {sup.host}" if sup is not None and sup.host else "this host"
    if body.get("ledger_ok") is not False:
        if body.get("fenced"):  # it reaches the ledger but holds no lease (superseded, declared dead, forgotten)
            return Problem(f"{who} is fenced: {body.get('fence_reason') or 'no reason given'}",
                           hint="it claims no new work; its lanes run what they hold (docs/multihost.md)",
                           code="host_fenced", severity="warning")
        return None
    since = body.get("ledger_unreachable_since")
    when = (f" since {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime(since))} ({time.time() - since:.0f}s)"
            if isinstance(since, (int, float)) else "")
    return Problem(f"ledger unreachable{when} from {who} (its supervisor says: {body.get('ledger_error') or '?'})",
                   hint="meanwhile its lanes run what they hold, their outcomes are kept and delivered when the "
                        "ledger answers again, and nothing new is claimed (docs/multihost.md, 'The database is "
                        "down')", code="ledger_unreachable", severity="warning")


def host_notes(hosts: list[dict[str, Any]] | None, here: str | None) -> list[str]:
    """One line (rich markup) per other host that is not up, and per drained host (this one included): what it
    means and what to do."""
    import time

    out = []
    for h in hosts or []:
        name, st = escape(h["name"]), h["status"]
        if h.get("drained") and st != "forgotten":
            since = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(h["drained_at"]))
            left = f", {h['in_flight']} mission(s) still in flight" if h["in_flight"] else ""
            out.append(f"[yellow]host {name} drained[/] since {since} by {escape(str(h['drained_by'] or '?'))}: its "
                       f"lanes take no new work{left}; 'lanectl host undrain {name}' takes it back")
        if h["name"] == here or st in ("up", "forgotten"):
            continue
        work = (f" with {h['in_flight']} mission(s) in flight ({', '.join(map(str, h['missions']))}"
                f"{', ...' if h['in_flight'] > len(h['missions']) else ''})" if h["in_flight"] else "")
        if st == "fenced":
            since = time.strftime("%H:%M:%SZ", time.gmtime(h["heartbeat_at"]))
            out.append(f"[yellow]host {name} fenced:[/] no lease renewal since {since} ({h['heartbeat_age_s']:.1f}s, "
                       f"lease {h['lease_s']:g}s): its supervisor cannot reach the ledger or is frozen; it claims "
                       f"nothing new, its lanes run what they hold{work}")
        elif st == "expired":
            out.append(f"[bold red]host {name} lost:[/] its lease ran out {-h['lease_left_s']:.0f}s ago{work}; a "
                       f"live host declares it dead and re-queues its lanes' work")
        elif st == "dead":
            out.append(f"[bold red]host {name} dead:[/] declared dead, its lanes take no work; restart its "
                       f"supervisor there ('systemctl restart lanectl-supervisor'), or 'lanectl host forget {name}' "
                       "if it is gone for good")
        elif st == "stopped":
            out.append(f"[yellow]host {name} stopped:[/] its supervisor was stopped; its lanes take no work until "
                       "it starts again")
    return out


STATE_STYLE = {"up": "green", "degraded": "yellow", "starting": "yellow", "failed": "bold red", "down": "red",
               "disabled": "dim", "orphan": "bold red", "unhealthy": "yellow", "lost": "bold red", "released": "dim"}
HOST_STYLE = {"up": "", "fenced": "yellow", "expired": "bold red", "dead": "bold red", "stopped": "red"}


def remote_text(r: LaneStatus) -> str:
    """The status cell of another host's lane: its host, and what the ledger says it holds."""
    flying = f"{r.in_flight} in flight" if r.in_flight is not None else ""
    return f"on host {r.host} ({r.host_status})" + (f", {flying}" if flying else "")


def print_table(rows: list[LaneStatus], fleet: dict[str, Any] | None = None) -> None:
    from rich import box
    from rich.table import Table

    t = Table("lane", "host", "state", "dispatch", "weight", "unit", "pid", "up", "restarts", "watchdog", "mem", "cpu",
              "port", "health", "status", box=box.SIMPLE_HEAD)
    t.columns[1].min_width = max((len(r.host or "-") for r in rows), default=1)  # a host name is never cut short
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
        where = escape(r.host or "-")
        if r.remote:
            style = HOST_STYLE.get(r.host_status or "", "dim")
            where = f"[{style}]{where}[/]" if style else where
            recorded = {True: "ok (recorded)", False: "unhealthy (recorded)"}.get(r.recorded_healthy, "-")
            unit = "-" if r.active_state == "unknown" else f"{r.active_state}/{r.sub_state}"
            t.add_row(name, where, state, dispatch, weight, escape(unit), str(r.main_pid or "-"), "-",
                      str(r.restarts) if unit != "-" else "-", "-", "-", "-", "-", recorded, escape(remote_text(r)))
            continue
        t.add_row(name, where, state, dispatch, weight, f"{r.active_state}/{r.sub_state}", str(r.main_pid or "-"),
                  human_duration(r.uptime_s),
                  str(r.restarts), wd, human_bytes(r.memory_bytes),
                  "-" if r.cpu_percent_avg is None else f"{r.cpu_percent_avg:.1f}%",
                  f"{r.port}" + ("" if r.health.listening else " (closed)"), escape(health),
                  escape(r.status_text or "-"))
    stdout_console().print(t)
    for line in host_notes((fleet or {}).get("hosts"), (fleet or {}).get("host")):
        stdout_console().print(line)
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

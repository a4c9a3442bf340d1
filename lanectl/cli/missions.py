"""submit, missions, mission show/cancel/retry/explain, and dispatch --once."""
from __future__ import annotations

import re
import time
from datetime import datetime
from typing import Any, List, Optional

import typer

from lanectl import config, paths
from lanectl.cli.options import CONFIG, JSON
from lanectl.client import Client
from lanectl.ledger import Ledger
from lanectl.ledger import missions as ms
from lanectl.ledger import tick
from lanectl.output import command, escape, finish, stdout_console

mission_app = typer.Typer(help="Inspect and act on one mission.", no_args_is_help=True)

LEDGER = typer.Option(None, "--ledger", metavar="PATH", help="Ledger file.",
                      show_default="$LANECTL_LEDGER or $STATE_DIRECTORY/ledger.db")
RELATIVE_RE = re.compile(r"^\+(\d+(?:\.\d+)?)([smhd])$")
UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def register(app: typer.Typer) -> None:
    app.command("submit")(submit)
    app.command("missions")(list_)
    app.command("dispatch")(dispatch_)
    app.add_typer(mission_app, name="mission")


def parse_deadline(text: str | None, now: float) -> float | None:
    """``+30s``/``+10m``/``+2h``/``+1d``, an RFC 3339 time (UTC if no offset), or seconds since the epoch."""
    if text is None:
        return None
    m = RELATIVE_RE.match(text.strip())
    if m:
        return now + float(m.group(1)) * UNIT_S[m.group(2)]
    return absolute_time(text, "deadline", "use +10m, 2030-01-01T12:00:00Z or epoch seconds", "bad_deadline")


def absolute_time(text: str, field: str, hint: str, code: str) -> float:
    """Seconds since the epoch, or an RFC 3339 time (UTC if it has no offset); else a bad-input error."""
    t = text.strip()
    try:
        return float(t)
    except ValueError:
        pass
    try:
        dt = datetime.fromisoformat(t.replace("Z", "+00:00"))
    except ValueError as exc:
        raise ms.invalid(field, f"{text!r} is not a time", hint, code) from exc
    if dt.tzinfo is None:
        from datetime import UTC

        dt = dt.replace(tzinfo=UTC)
    return dt.timestamp()


def _human_mission(m: ms.Mission) -> None:
    from rich.table import Table

    t = Table(show_header=False, box=None)
    for k, v in m.as_dict().items():
        t.add_row(f"[bold]{k}[/]", escape("-" if v is None else str(v)))
    stdout_console().print(t)


@command("submit")
def submit(
    argv: Optional[List[str]] = typer.Argument(None, metavar="[-- COMMAND ARGS]",
                                               help="Command for the reference runtime (stored as {argv: [...]})."),
    cls: str = typer.Option("background", "--class", help="interactive, deadline or background."),
    payload: Optional[str] = typer.Option(None, "--payload", help="Payload as a JSON document."),
    deadline: Optional[str] = typer.Option(None, help="Deadline: +10m, RFC 3339 time or epoch seconds."),
    lane: Optional[str] = typer.Option(None, help="Run on this lane (or its fallback)."),
    tag: Optional[List[str]] = typer.Option(None, "--tag", help="Require a lane with this tag (repeatable)."),
    session: Optional[str] = typer.Option(None, help="Session PREFIX:ID; runs on the lane owning it."),
    idempotency_key: Optional[str] = typer.Option(None, help="Resubmitting with this key returns the same mission."),
    max_attempts: Optional[int] = typer.Option(None, help="Attempts before the mission is dead (default per class)."),
    ledger: Optional[str] = LEDGER,
    config_dir: Optional[str] = CONFIG,
    json_out: bool = JSON,
) -> None:
    """Queue a mission.

    Example: lanectl submit --class interactive -- /bin/echo hello
    Exit 5 with code queue_full when the class queue is at its limit (backpressure: retry later).
    """
    now = time.time()
    if payload is not None and argv:
        raise ms.invalid("payload", "both --payload and a command were given", "give one of them",
                         "payload_ambiguous")
    if payload is None and not argv:
        raise ms.invalid("payload", "no payload", "give --payload JSON or '-- COMMAND ARGS'", "payload_missing")
    body: Any = payload if payload is not None else {"argv": list(argv or [])}
    when = parse_deadline(deadline, now)
    fleet = config.load(config_dir)
    with Ledger.open(config.ledger_path(config_dir, ledger)) as led:
        res = ms.submit(led, fleet, cls=cls, payload=body, now=now, deadline=when, lane=lane, tags=tag or (),
                        session=session, idempotency_key=idempotency_key, max_attempts=max_attempts)
    data = {**res.mission.as_dict(), "changed": res.created}

    def human() -> None:
        verb = "queued" if res.created else "already submitted as"
        stdout_console().print(f"{verb} mission {res.mission.id} ({res.mission.cls})")

    finish(["submit"], data, json_mode=json_out, human=human)


@command("missions")
def list_(
    state: Optional[str] = typer.Option(None, help="Only missions in this state."),
    lane: Optional[str] = typer.Option(None, help="Only missions for or on this lane."),
    cls: Optional[str] = typer.Option(None, "--class", help="Only this class."),
    session: Optional[str] = typer.Option(None, help="Only this session."),
    limit: int = typer.Option(100, min=1, max=10_000, help="Page size."),
    after: int = typer.Option(0, help="Page on: ids greater than this."),
    ledger: Optional[str] = LEDGER,
    config_dir: Optional[str] = CONFIG,
    json_out: bool = JSON,
) -> None:
    """List missions, oldest first."""
    with Ledger.open(config.ledger_path(config_dir, ledger)) as led:
        rows = ms.list_missions(led, state=state, lane=lane, cls=cls, session=session, limit=limit, after_id=after)
    data = {"missions": [m.as_dict() for m in rows], "next_after": rows[-1].id if len(rows) == limit else None}

    def human() -> None:
        from rich.table import Table

        t = Table("id", "class", "state", "lane", "session", "attempts", "created")
        for m in rows:
            t.add_row(str(m.id), m.cls, m.state, escape(m.current_lane or m.lane or "-"), escape(m.session or "-"),
                      str(m.attempts), ms.iso(m.created_at) or "-")
        stdout_console().print(t)

    finish(["missions"], data, json_mode=json_out, human=human)


@mission_app.command("show")
@command("mission", "show")
def show(
    mission_id: int = typer.Argument(..., metavar="ID"),
    wait: bool = typer.Option(False, "--wait", help="Wait until the mission is finished."),
    timeout: float = typer.Option(60.0, help="Seconds --wait waits before exiting 7."),
    ledger: Optional[str] = LEDGER,
    config_dir: Optional[str] = CONFIG,
    json_out: bool = JSON,
) -> None:
    """Show one mission with its attempts."""
    with Client(config.ledger_path(config_dir, ledger)) as client:
        m = client.wait(mission_id, timeout=timeout) if wait else client.get(mission_id)
        data = {**m.as_dict(), "attempt_rows": ms.attempts_of(client.ledger, mission_id)}
    finish(["mission", "show"], data, json_mode=json_out, human=lambda: _human_mission(m))


@mission_app.command("cancel")
@command("mission", "cancel")
def cancel(mission_id: int = typer.Argument(..., metavar="ID"), ledger: Optional[str] = LEDGER,
           config_dir: Optional[str] = CONFIG, json_out: bool = JSON) -> None:
    """Cancel a queued or running mission (no-op if already cancelled)."""
    with Ledger.open(config.ledger_path(config_dir, ledger)) as led:
        res = ms.cancel(led, mission_id, now=time.time())
    finish(["mission", "cancel"], {**res.mission.as_dict(), "changed": res.changed}, json_mode=json_out,
           human=lambda: stdout_console().print(f"mission {mission_id}: cancelled"
                                                + ("" if res.changed else " (already)")))


@mission_app.command("retry")
@command("mission", "retry")
def retry(mission_id: int = typer.Argument(..., metavar="ID"),
          deadline: Optional[str] = typer.Option(None, help="New deadline (+10m, RFC 3339, epoch)."),
          ledger: Optional[str] = LEDGER, config_dir: Optional[str] = CONFIG, json_out: bool = JSON) -> None:
    """Queue a failed, dead, cancelled or expired mission again."""
    now = time.time()
    with Ledger.open(config.ledger_path(config_dir, ledger)) as led:
        res = ms.retry(led, mission_id, now=now, deadline=parse_deadline(deadline, now))
    finish(["mission", "retry"], {**res.mission.as_dict(), "changed": True}, json_mode=json_out,
           human=lambda: stdout_console().print(f"mission {mission_id}: queued again"))


@mission_app.command("explain")
@command("mission", "explain")
def explain(mission_id: int = typer.Argument(..., metavar="ID"), ledger: Optional[str] = LEDGER,
            config_dir: Optional[str] = CONFIG, json_out: bool = JSON) -> None:
    """Why a mission is not running: every lane and why it is skipped."""
    fleet = config.load(config_dir)
    with Ledger.open(config.ledger_path(config_dir, ledger)) as led:
        data = tick.explain(led, fleet, mission_id, now=time.time())

    def human() -> None:
        out = stdout_console()
        out.print(f"mission {mission_id} ({data['class']}, {data['state']}): {escape(data['summary'])}")
        for v in data["lanes"]:
            mark = "[green]yes[/]" if v["eligible"] else "[red]no[/]"
            out.print(f"  {escape(v['lane'])}: {mark} {escape(v['reason'])}")

    finish(["mission", "explain"], data, json_mode=json_out, human=human)


@command("dispatch")
def dispatch_(
    once: bool = typer.Option(False, "--once", help="Run one policy pass and record its assignments."),
    ledger: Optional[str] = LEDGER,
    config_dir: Optional[str] = CONFIG,
    json_out: bool = JSON,
) -> None:
    """Run one dispatch pass (what the supervisor does every tick).

    Records assignments, expirations and waits; sending missions to lanes is the supervisor's job.
    """
    if not once:
        raise ms.invalid("once", "only one pass at a time is supported here", "add --once (the supervisor loops)",
                         "once_required")
    fleet = config.load(config_dir)
    with Ledger.open(config.ledger_path(config_dir, ledger)) as led:
        res = tick.run_once(led, fleet, now=time.time())
    data = {**res.as_dict(), "changed": bool(res.dispatches or res.expired_deadlines or res.expired_leases)}

    def human() -> None:
        out = stdout_console()
        for d in res.dispatches:
            out.print(f"mission {d.mission} -> {escape(d.lane)} (attempt {d.attempt}, {d.cls})")
        out.print(f"{len(res.dispatches)} dispatched, {len(res.expired_deadlines)} expired, "
                  f"{len(res.expired_leases)} leases reaped, {len(res.waiting)} waiting")

    finish(["dispatch"], data, json_mode=json_out, human=human)

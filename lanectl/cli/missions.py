"""submit, missions, mission show/cancel/retry/explain, and dispatch --once."""
from __future__ import annotations

import os
import sys
import time
from typing import Any, List, Optional

import typer

from lanectl import batch as batches, config
from lanectl.batch import BATCH_MAX_BYTES, BATCH_MAX_LINE_BYTES  # noqa: F401 (the limits, named where submit is)
from lanectl.cli import missionview
from lanectl.cli.options import CONFIG, JSON, LEDGER, complete_lane_files
from lanectl.client import Client
from lanectl.ledger import missions as ms
from lanectl.ledger import tick
from lanectl.output import command, escape, finish, stdout_console, waiting
from lanectl.timeparse import deadline_request, parse_deadline

mission_app = typer.Typer(help="Inspect and act on one mission.", no_args_is_help=True)



def register(app: typer.Typer) -> None:
    app.command("submit")(submit)
    app.command("missions")(list_)
    app.command("dispatch")(dispatch_)
    app.add_typer(mission_app, name="mission")


@command("submit")
def submit(
    argv: Optional[List[str]] = typer.Argument(None, metavar="-- COMMAND ARGS",
                                               help="Command for the reference runtime (stored as {argv: [...]})."),
    cls: str = typer.Option("background", "--class", help="interactive, deadline or background."),
    payload: Optional[str] = typer.Option(None, "--payload", help="Payload as a JSON document."),
    deadline: Optional[str] = typer.Option(
        None, help="Deadline: +10m (a retry with the same text and --idempotency-key is the same request), "
                   "RFC 3339 time or epoch seconds."),
    lane: Optional[str] = typer.Option(None, help="Run on this lane (or its fallback).",
                                       autocompletion=complete_lane_files),
    tag: Optional[List[str]] = typer.Option(None, "--tag", help="Require a lane with this tag (repeatable)."),
    session: Optional[str] = typer.Option(None, help="Session PREFIX:ID; runs on the lane owning it."),
    session_stays: Optional[bool] = typer.Option(
        None, "--session-wait/--session-move",
        help="When the session's lane's host is dead or drained: wait for its lane, or move to a lane that can "
             "take it (a new session's default: move; an existing session keeps its choice unless given)."),
    idempotency_key: Optional[str] = typer.Option(None, help="Resubmitting with this key returns the same mission."),
    max_attempts: Optional[int] = typer.Option(None, help="Attempts before the mission is dead (default per class)."),
    batch: Optional[str] = typer.Option(
        None, "--batch", metavar="FILE",
        help=f"Queue many missions at once, all or nothing: one JSON object per line ('-' for stdin), at most "
             f"{ms.MAX_BATCH} and {BATCH_MAX_BYTES // 2**20} MiB; keys: class, payload or argv, deadline, lane, "
             f"tags, session, session_stays, idempotency_key, max_attempts."),
    ledger: Optional[str] = LEDGER,
    config_dir: Optional[str] = CONFIG,
    json_out: bool = JSON,
) -> None:
    """Queue a mission (or a batch of them with --batch).

    Example: lanectl submit --class interactive -- /bin/echo hello
    Exit 5 with code queue_full when the class queue is at its limit (backpressure: retry later); a batch that
    does not fit is refused whole.
    """
    now = time.time()
    if batch is not None:
        if argv or payload is not None:
            raise ms.invalid("batch", "--batch was given together with a payload or command",
                             "put every mission in the batch file", "payload_ambiguous")
        res = batches.submit_batch(batch, config_dir=config_dir, ledger=ledger)  # timed by the ledger's clock
        finish(["submit"], res.as_dict(), json_mode=json_out,
               human=lambda: stdout_console().print(f"queued {res.created} mission(s), {res.existing} already "
                                                    f"submitted; ids {min(res.ids)}..{max(res.ids)}"))
        return
    if payload is not None and argv:
        raise ms.invalid("payload", "both --payload and a command were given", "give one of them",
                         "payload_ambiguous")
    if payload is None and not argv:
        raise ms.invalid("payload", "no payload", "give --payload JSON or '-- COMMAND ARGS'", "payload_missing")
    body: Any = payload if payload is not None else {"argv": list(argv or [])}
    req = ms.SubmitRequest(cls, body, deadline_request(deadline, now), lane, tuple(tag or ()), session,
                           idempotency_key, max_attempts, session_stays)
    res = batches.submit_one(req, config_dir=config_dir, ledger=ledger)  # timed by the ledger's clock
    data = {**res.mission.as_dict(), "changed": res.created}

    def human() -> None:
        verb = "queued" if res.created else "already submitted as"
        stdout_console().print(f"{verb} mission {res.mission.id} ({res.mission.cls})")

    finish(["submit"], data, json_mode=json_out, human=human)


@command("missions")
def list_(
    state: Optional[str] = typer.Option(None, help="Only missions in this state."),
    lane: Optional[str] = typer.Option(
        None, help="Only missions pinned to this lane or whose latest attempt ran there."),
    cls: Optional[str] = typer.Option(None, "--class", help="Only this class."),
    session: Optional[str] = typer.Option(None, help="Only this session."),
    limit: int = typer.Option(100, min=1, max=missionview.MAX_LIMIT, help="Page size."),
    after: int = typer.Option(0, help="Page on: ids greater than this."),
    ledger: Optional[str] = LEDGER,
    config_dir: Optional[str] = CONFIG,
    json_out: bool = JSON,
) -> None:
    """List missions, oldest first."""
    with config.open_ledger(config_dir, ledger) as led:
        rows, data = missionview.list_data(led, state=state, lane=lane, cls=cls, session=session, limit=limit,
                                           after_id=after)
    finish(["missions"], data, json_mode=json_out, human=lambda: missionview.human_list(rows))


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
        if wait:
            with waiting(json_out) as progress:
                m = client.wait(mission_id, timeout=timeout, progress=progress)
        else:
            m = client.get(mission_id)
        data = missionview.show_data(client.ledger, m)
    finish(["mission", "show"], data, json_mode=json_out, human=lambda: missionview.human_mission(m))


@mission_app.command("logs")
@command("mission", "logs")
def logs(mission_id: int = typer.Argument(..., metavar="ID"),
         attempt: Optional[int] = typer.Option(None, "--attempt", min=1, help="This attempt (default: the latest)."),
         max_bytes: Optional[int] = typer.Option(None, "--max-bytes", min=1, show_default="the lane's [output] "
                                                 "max_bytes + 4096", help="Read at most this many bytes."),
         ledger: Optional[str] = LEDGER, config_dir: Optional[str] = CONFIG, json_out: bool = JSON) -> None:
    """Print a mission's stored output (stdout and stderr, at most the lane's [output] max_bytes: its head and tail,
    with a line saying what was cut). The file's path goes to stderr first. Read from the lane's workspace without
    following links, only if the lane's user owns it."""
    from lanectl import missionlogs

    fleet = config.load(config_dir, require_lanes=False)
    with config.open_ledger(fleet, ledger) as led:
        out = missionlogs.mission_output(fleet, led, mission_id, attempt=attempt, limit=max_bytes)
    raw = out.pop("output")

    def human() -> None:
        more = f", first {out['shown']} shown" if out["truncated"] else ""
        sys.stderr.write(f"# mission {mission_id} attempt {out['attempt']} on lane {out['lane']}: {out['path']} "
                         f"({out['bytes']} bytes{more})\n")
        sys.stderr.flush()
        # to a terminal, a hostile mission's escape sequences (clear screen, set title, write the clipboard) are
        # shown, not obeyed; piped, the bytes go through as stored
        sys.stdout.buffer.write(missionlogs.visible(raw) if sys.stdout.isatty() else raw)
        sys.stdout.flush()
    finish(["mission", "logs"], {**out, "output": raw.decode(errors="replace")}, json_mode=json_out, human=human)


@mission_app.command("cancel")
@command("mission", "cancel")
def cancel(mission_id: int = typer.Argument(..., metavar="ID"), ledger: Optional[str] = LEDGER,
           config_dir: Optional[str] = CONFIG, json_out: bool = JSON) -> None:
    """Cancel a queued or running mission (no-op if already cancelled)."""
    with config.open_ledger(config_dir, ledger) as led:
        res = ms.cancel(led, mission_id, now=led.clock())
    finish(["mission", "cancel"], {**res.mission.as_dict(), "changed": res.changed}, json_mode=json_out,
           human=lambda: stdout_console().print(f"mission {mission_id}: cancelled"
                                                + ("" if res.changed else " (already)")))


@mission_app.command("retry")
@command("mission", "retry")
def retry(mission_id: int = typer.Argument(..., metavar="ID"),
          deadline: Optional[str] = typer.Option(None, help="New deadline (+10m, RFC 3339, epoch)."),
          ledger: Optional[str] = LEDGER, config_dir: Optional[str] = CONFIG, json_out: bool = JSON) -> None:
    """Queue a failed, dead, cancelled or expired mission again."""
    with config.open_ledger(config_dir, ledger) as led:
        now = led.clock()
        res = ms.retry(led, mission_id, now=now, deadline=parse_deadline(deadline, now))
    finish(["mission", "retry"], {**res.mission.as_dict(), "changed": True}, json_mode=json_out,
           human=lambda: stdout_console().print(f"mission {mission_id}: queued again"))


@mission_app.command("explain")
@command("mission", "explain")
def explain(mission_id: int = typer.Argument(..., metavar="ID"), ledger: Optional[str] = LEDGER,
            config_dir: Optional[str] = CONFIG, json_out: bool = JSON) -> None:
    """Why a mission is not running: every lane and why it is skipped.

    A lane of lanes.d that the installed fleet does not have yet is "not installed", never eligible.
    """
    fleet = config.load(config_dir)
    with config.open_ledger(config_dir, ledger) as led:
        data = tick.explain(led, fleet, mission_id, now=led.clock(), installed=_installed_lanes(fleet),
                            host=fleet.settings.host)

    def human() -> None:
        out = stdout_console()
        out.print(f"mission {mission_id} ({data['class']}, {data['state']}): {escape(data['summary'])}")
        for v in data["lanes"]:
            mark = "[green]yes[/]" if v["eligible"] else "[red]no[/]"
            out.print(f"  {escape(v['lane'])}: {mark} {escape(v['reason'])}")

    finish(["mission", "explain"], data, json_mode=json_out, human=human)


def _installed_lanes(fleet: config.LaneSet) -> set[str] | None:
    """The lanes of the installed fleet (manifest beside the units) when it is this configuration's; else None."""
    from lanectl import manifest, paths

    data = manifest.read(paths.unit_dir())
    if data is None or not isinstance(data.get("lanes"), dict) or not isinstance(data.get("config_dir"), str):
        return None
    if os.path.realpath(data["config_dir"]) != os.path.realpath(fleet.config_dir):
        return None
    return set(data["lanes"])


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
    with config.open_ledger(config_dir, ledger) as led:
        res = tick.run_once(led, fleet, now=led.clock())
    data = {**res.as_dict(), "changed": bool(res.dispatches or res.expired_deadlines or res.expired_leases)}

    def human() -> None:
        out = stdout_console()
        for d in res.dispatches:
            out.print(f"mission {d.mission} -> {escape(d.lane)} (attempt {d.attempt}, {d.cls})")
        out.print(f"{len(res.dispatches)} dispatched, {len(res.expired_deadlines)} expired, "
                  f"{len(res.expired_leases)} leases reaped, {len(res.waiting)} waiting")

    finish(["dispatch"], data, json_mode=json_out, human=human)

"""submit, missions, mission show/cancel/retry/explain, and dispatch --once."""
from __future__ import annotations

import io
import json
import os
import re
import stat
import sys
import time
from typing import Any, BinaryIO, List, Optional, Union

import typer
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from lanectl import config
from lanectl.cli import missionview
from lanectl.cli.options import CONFIG, JSON, LEDGER, complete_lane_files
from lanectl.client import Client
from lanectl.errors import ExitCode, LanectlError, Problem
from lanectl.ledger import missions as ms
from lanectl.ledger import tick
from lanectl.output import command, escape, finish, stdout_console, waiting
from lanectl.timeparse import deadline_request, parse_deadline

mission_app = typer.Typer(help="Inspect and act on one mission.", no_args_is_help=True)

BATCH_MAX_BYTES = 32 * 1024 * 1024
"""The largest batch file `submit --batch` reads; a larger one is refused before it is read."""
BATCH_MAX_LINE_BYTES = ms.MAX_PAYLOAD_BYTES + 64 * 1024
"""The longest line of a batch file: a payload at its limit plus room for the other keys."""


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
    idempotency_key: Optional[str] = typer.Option(None, help="Resubmitting with this key returns the same mission."),
    max_attempts: Optional[int] = typer.Option(None, help="Attempts before the mission is dead (default per class)."),
    batch: Optional[str] = typer.Option(
        None, "--batch", metavar="FILE",
        help=f"Queue many missions at once, all or nothing: one JSON object per line ('-' for stdin), at most "
             f"{ms.MAX_BATCH} and {BATCH_MAX_BYTES // 2**20} MiB; keys: class, payload or argv, deadline, lane, tags, session, idempotency_key, "
             f"max_attempts."),
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
        return _submit_batch(batch, now, ledger, config_dir, json_out)
    if payload is not None and argv:
        raise ms.invalid("payload", "both --payload and a command were given", "give one of them",
                         "payload_ambiguous")
    if payload is None and not argv:
        raise ms.invalid("payload", "no payload", "give --payload JSON or '-- COMMAND ARGS'", "payload_missing")
    body: Any = payload if payload is not None else {"argv": list(argv or [])}
    req = ms.SubmitRequest(cls, body, deadline_request(deadline, now), lane, tuple(tag or ()), session,
                           idempotency_key, max_attempts)
    fleet = config.load(config_dir)
    ms.check_requests(fleet, [req], now)  # a refused request creates no ledger file
    with config.open_ledger(config_dir, ledger) as led:
        res = ms.submit_many(led, fleet, [req], now=now)[0]
    data = {**res.mission.as_dict(), "changed": res.created}

    def human() -> None:
        verb = "queued" if res.created else "already submitted as"
        stdout_console().print(f"{verb} mission {res.mission.id} ({res.mission.cls})")

    finish(["submit"], data, json_mode=json_out, human=human)


class BatchLine(BaseModel):
    """One line of ``lanectl submit --batch``: the flags of ``lanectl submit`` as JSON keys."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    cls: str = Field("background", alias="class")
    payload: Any = None
    argv: Optional[List[str]] = None
    deadline: Optional[Union[float, str]] = None
    lane: Optional[str] = None
    tags: List[str] = []
    session: Optional[str] = None
    idempotency_key: Optional[str] = None
    max_attempts: Optional[int] = None


def read_batch(text: str | bytes, source: str, now: float) -> tuple[list[ms.SubmitRequest], list[int]]:
    """Parse a batch held in memory (see ``read_batch_stream``)."""
    data = text.encode() if isinstance(text, str) else text
    return read_batch_stream(io.BytesIO(data), source, now)


def read_batch_stream(fh: BinaryIO, source: str, now: float) -> tuple[list[ms.SubmitRequest], list[int]]:
    """Parse a batch file (JSON lines; blank lines and lines starting with # are skipped) into requests and their
    line numbers, reading it line by line: the first bad line is an error naming the file, the line and the field,
    exit 2. A file beyond ``BATCH_MAX_BYTES``, a line beyond ``BATCH_MAX_LINE_BYTES`` and a mission beyond
    ``MAX_BATCH`` are refused as soon as they are met, so a huge input is never read whole."""
    out: list[ms.SubmitRequest] = []
    numbers: list[int] = []
    total = 0
    n = 0
    while True:
        raw_bytes = fh.readline(BATCH_MAX_LINE_BYTES + 1)
        if not raw_bytes:
            break
        n += 1
        total += len(raw_bytes)
        if total > BATCH_MAX_BYTES:
            raise _batch_error(source, "", f"is larger than {BATCH_MAX_BYTES} bytes",
                               f"split it into batches of at most {ms.MAX_BATCH} lines, e.g. split -l {ms.MAX_BATCH}")
        where = f"line {n}"
        if len(raw_bytes) > BATCH_MAX_LINE_BYTES:
            raise _batch_error(source, where, f"is longer than {BATCH_MAX_LINE_BYTES} bytes",
                               "store large inputs in the lane's workspace and pass their path")
        try:
            line = raw_bytes.decode().strip()
        except UnicodeDecodeError as exc:
            raise _batch_error(source, where, "is not UTF-8", "write the batch file in UTF-8") from exc
        if not line or line.startswith("#"):
            continue
        if len(out) >= ms.MAX_BATCH:
            raise _batch_error(source, where, f"is mission {len(out) + 1}, more than {ms.MAX_BATCH} in one batch",
                               f"split it, e.g. split -l {ms.MAX_BATCH}")
        try:
            doc = json.loads(line)
        except ValueError as exc:
            raise _batch_error(source, where, f"is not JSON ({exc})", "write one JSON object per line") from exc
        except RecursionError as exc:
            raise _batch_error(source, where, "is nested too deeply to read", "flatten the payload") from exc
        try:
            item = BatchLine.model_validate(doc)
        except ValidationError as exc:
            err = exc.errors()[0]
            loc = ".".join(str(p) for p in err["loc"])
            raise _batch_error(source, f"{where}.{loc}" if loc else where, err["msg"],
                               "keys: class, payload or argv, deadline, lane, tags, session, idempotency_key, "
                               "max_attempts") from exc
        if (item.payload is None) == (item.argv is None):
            raise _batch_error(source, where, "needs exactly one of payload and argv", "give one of them")
        deadline = item.deadline if isinstance(item.deadline, float) or item.deadline is None \
            else _line_deadline(source, where, item.deadline, now)
        out.append(ms.SubmitRequest(item.cls, item.payload if item.argv is None else {"argv": item.argv}, deadline,
                                    item.lane, tuple(item.tags), item.session, item.idempotency_key,
                                    item.max_attempts))
        numbers.append(n)
    if not out:
        raise _batch_error(source, "", "holds no missions", "write one JSON object per line")
    return out, numbers


def _line_deadline(source: str, where: str, text: str, now: float) -> float | str | None:
    try:
        return deadline_request(text, now)
    except LanectlError as exc:
        raise _batch_error(source, f"{where}.deadline", exc.message.removeprefix("deadline: "),
                           exc.hint or "") from exc


def _batch_error(source: str, where: str, message: str, hint: str) -> LanectlError:
    text = f"{source}: {where}: {message}" if where else f"{source}: {message}"
    return LanectlError(text, hint, "bad_batch", ExitCode.USAGE,
                        [Problem(message, file=source, field=where or None, hint=hint, code="bad_batch")])


def _submit_batch(batch: str, now: float, ledger: str | None, config_dir: str | None, json_out: bool) -> None:
    if batch == "-":
        requests, numbers = read_batch_stream(sys.stdin.buffer, "<stdin>", now)
        source = "<stdin>"
    else:
        source = batch
        try:
            with open(batch, "rb") as fh:
                size = os.fstat(fh.fileno()).st_size
                if stat.S_ISREG(os.fstat(fh.fileno()).st_mode) and size > BATCH_MAX_BYTES:
                    raise _batch_error(source, "", f"is {size} bytes, larger than {BATCH_MAX_BYTES}",
                                       f"split it into batches of at most {ms.MAX_BATCH} lines, e.g. "
                                       f"split -l {ms.MAX_BATCH}")
                requests, numbers = read_batch_stream(fh, source, now)
        except OSError as exc:
            raise LanectlError(f"{batch}: cannot read the batch file ({exc})", "check the path",
                               "bad_batch", ExitCode.USAGE) from exc
    fleet = config.load(config_dir)
    try:
        ms.check_requests(fleet, requests, now)  # every refusal before the ledger is opened (or created)
        with config.open_ledger(config_dir, ledger) as led:
            results = ms.submit_many(led, fleet, requests, now=now)
    except LanectlError as exc:
        m = re.match(r"request (\d+): ", exc.message)
        if m:  # name the file and line, not the index of the request
            where = f"line {numbers[int(m.group(1))]}"
            exc.message = f"{source}: {where}: {exc.message[m.end():]}"
            for p in exc.problems:
                p.file = source
                p.field = (p.field or "").replace(f"requests[{m.group(1)}]", where)
        raise
    data = {"missions": [{"id": r.mission.id, "created": r.created, "class": r.mission.cls} for r in results],
            "created": sum(r.created for r in results), "existing": sum(not r.created for r in results)}

    def human() -> None:
        ids = [r.mission.id for r in results]
        stdout_console().print(f"queued {data['created']} mission(s), {data['existing']} already submitted; "
                               f"ids {min(ids)}..{max(ids)}")

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
    with config.open_ledger(config_dir, ledger) as led:
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
        data = tick.explain(led, fleet, mission_id, now=time.time(), installed=_installed_lanes(fleet))

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
        res = tick.run_once(led, fleet, now=time.time())
    data = {**res.as_dict(), "changed": bool(res.dispatches or res.expired_deadlines or res.expired_leases)}

    def human() -> None:
        out = stdout_console()
        for d in res.dispatches:
            out.print(f"mission {d.mission} -> {escape(d.lane)} (attempt {d.attempt}, {d.cls})")
        out.print(f"{len(res.dispatches)} dispatched, {len(res.expired_deadlines)} expired, "
                  f"{len(res.expired_leases)} leases reaped, {len(res.waiting)} waiting")

    finish(["dispatch"], data, json_mode=json_out, human=human)

"""``lanectl missions`` and ``lanectl mission show``: the data and rendering both CLI paths share, and the fast path.

People and scripts poll these two in loops, so ``lanectl.entry`` answers them without typer and pydantic (about
150 ms of imports) when the arguments are simple and the ledger is known without reading ``lanectl.toml``:
``--ledger``, ``$LANECTL_LEDGER``, or the path recorded in the install manifest. Anything else (``--help``,
``--config``, ``--wait``, a malformed option) goes to the typer application, which gives the same output.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from lanectl.fastargs import parse_options
from lanectl.ledger import Ledger
from lanectl.ledger import missions as ms
from lanectl.output import escape, finish, stdout_console

LIST_OPTIONS = {"--state": "state", "--lane": "lane", "--class": "cls", "--session": "session",
                "--limit": "limit", "--after": "after_id", "--ledger": "ledger"}
MAX_LIMIT = 10_000


def list_data(led: Ledger, *, limit: int, **filters: Any) -> tuple[list[ms.Mission], dict[str, Any]]:
    rows = ms.list_missions(led, limit=limit, **filters)
    return rows, {"missions": [m.as_dict() for m in rows], "next_after": rows[-1].id if len(rows) == limit else None}


def human_list(rows: list[ms.Mission]) -> None:
    from rich.table import Table

    t = Table("id", "class", "state", "lane", "session", "attempts", "created")
    for m in rows:
        lane = m.current_lane or m.last_lane or m.lane or "-"
        t.add_row(str(m.id), m.cls, m.state, escape(lane), escape(m.session or "-"), str(m.attempts),
                  ms.iso(m.created_at) or "-")
    stdout_console().print(t)


def show_data(led: Ledger, m: ms.Mission) -> dict[str, Any]:
    return {**m.as_dict(), "attempt_rows": ms.attempts_of(led, m.id)}


def human_mission(m: ms.Mission) -> None:
    from rich.table import Table

    t = Table(show_header=False, box=None)
    for k, v in m.as_dict().items():
        t.add_row(f"[bold]{k}[/]", escape("-" if v is None else str(v)))
    stdout_console().print(t)


def _ledger(override: str | None) -> Path | str | None:
    """The ledger as every command finds it (lanectl.paths.ledger_path), when that needs no lanectl.toml: None
    (the typer path reads it) for another configuration than the installed one, or no installed fleet."""
    from lanectl import manifest, paths

    if override or os.environ.get("LANECTL_LEDGER"):
        return paths.ledger_path(override)
    data = manifest.read(paths.unit_dir())
    if data is None:
        return None
    chosen = os.environ.get("LANECTL_CONFIG_DIR")
    if chosen and not (isinstance(data.get("config_dir"), str)
                       and os.path.realpath(chosen) == os.path.realpath(data["config_dir"])):
        return None  # another configuration than the installed one: let its lanectl.toml decide
    found = manifest.ledger(data)
    if not found:
        return None
    from lanectl.ledgerurl import is_url

    return found if is_url(found) else Path(found)  # a URL stays a str: Path() would fold its '//'


def fast(command: str, argv: list[str]) -> bool:
    """Answer ``missions`` or ``mission show ID``; False when the typer application must."""
    from lanectl.errors import LanectlError
    from lanectl.output import fail

    if command == "missions":
        parsed = parse_options(argv, LIST_OPTIONS)
        if parsed is None or parsed[1]:
            return False
        opts, _, json_out = parsed
        try:
            limit = int(opts.get("--limit", "100"))
            after = int(opts.get("--after", "0"))
        except ValueError:
            return False
        if not 1 <= limit <= MAX_LIMIT:
            return False
        filters = {LIST_OPTIONS[k]: v for k, v in opts.items() if k not in ("--limit", "--after", "--ledger")}
        try:
            path = _ledger(opts.get("--ledger"))  # a refused URL is an error like any other (exit 2)
            if path is None:
                return False
            with Ledger.open(path, create=False) as led:
                rows, data = list_data(led, limit=limit, after_id=after, **filters)
        except LanectlError as exc:
            fail(["missions"], exc, json_out)
        finish(["missions"], data, json_mode=json_out, human=lambda: human_list(rows))
        return True
    if argv[:1] != ["show"]:
        return False
    parsed = parse_options(argv[1:], ("--ledger",))
    if parsed is None or len(parsed[1]) != 1 or not parsed[1][0].isdigit():
        return False
    opts, (ident,), json_out = parsed
    try:
        path = _ledger(opts.get("--ledger"))
        if path is None:
            return False
        with Ledger.open(path, create=False) as led:
            m = ms.get(led, int(ident))
            data = show_data(led, m)
    except LanectlError as exc:
        fail(["mission", "show"], exc, json_out)
    finish(["mission", "show"], data, json_mode=json_out, human=lambda: human_mission(m))
    return True

"""One place that turns results and errors into output: rich text for people, one JSON envelope for scripts.

Envelope (``--json``): ``{"lanectl_json": 1, "command": [...], "status": "ok|partial|error", "exit_code": N,
"data": {...}, "errors": [{"code", "message", "hint", "file", "field", "lane", "severity"}]}``, keys sorted.
"""
from __future__ import annotations

import contextlib
import functools
import json
import sys
from collections.abc import Callable, Iterator
from typing import Any, NoReturn, TypeVar

from lanectl.errors import ExitCode, LanectlError, Problem

ENVELOPE_VERSION = 1
F = TypeVar("F", bound=Callable[..., Any])


def envelope(command: list[str], data: Any, exit_code: int, errors: list[Problem] | None = None,
             status: str | None = None) -> dict[str, Any]:
    if status is None:
        status = "ok" if exit_code == 0 else "error"
    return {
        "lanectl_json": ENVELOPE_VERSION,
        "command": command,
        "status": status,
        "exit_code": int(exit_code),
        "data": data,
        "errors": [p.as_dict() for p in errors or []],
    }


def print_json(doc: Any) -> None:
    sys.stdout.write(json.dumps(doc, sort_keys=True, indent=2, default=str) + "\n")
    sys.stdout.flush()


def stderr_console():  # type: ignore[no-untyped-def]
    from rich.console import Console

    return Console(stderr=True, highlight=False, soft_wrap=True)


def stdout_console():  # type: ignore[no-untyped-def]
    from rich.console import Console

    console = Console(highlight=False)
    if not console.is_terminal:
        # piped to a file or over a non-tty ssh: do not squeeze tables into 80 columns
        console = Console(highlight=False, width=200)
    return console


@contextlib.contextmanager
def waiting(json_mode: bool) -> Iterator[Callable[[str], None] | None]:
    """Progress where people wait: a callback that shows what the command waits for, on one line of stderr that
    updates in place, only when stderr is a terminal and the output is not --json; None otherwise, so piped and
    --json output is exactly what it is without it. The line is gone when the wait ends."""
    if json_mode or not sys.stderr.isatty():
        yield None
        return
    from rich.status import Status

    status = Status("", console=stderr_console(), spinner="dots")
    status.start()
    try:
        yield lambda text: status.update(text)
    finally:
        status.stop()


def exit_with(code: int) -> NoReturn:
    sys.stdout.flush()
    raise SystemExit(int(code))


def finish(command: list[str], data: Any, *, json_mode: bool, human: Callable[[], None] | None = None,
           exit_code: int = ExitCode.OK, warnings: list[Problem] | None = None, status: str | None = None) -> None:
    """Render a successful (or partially successful) result and exit with its code."""
    if json_mode:
        print_json(envelope(command, data, exit_code, warnings, status))
    else:
        if warnings:
            err = stderr_console()
            for w in warnings:
                err.print(f"[yellow]warning:[/] {escape(w.render())}")
        if human is not None:
            human()
    if exit_code:
        exit_with(exit_code)


def fail(command: list[str], exc: LanectlError, json_mode: bool) -> NoReturn:
    problems = exc.all_problems()
    if json_mode:
        print_json(envelope(command, None, exc.exit_code, problems))
    else:
        err = stderr_console()
        if exc.problems:
            err.print(f"[bold red]error:[/] {escape(exc.message)}")
            for p in problems:
                tag = "[yellow]warning[/]" if p.severity == "warning" else "[red]error[/]"
                err.print(f"  {tag} {escape(p.render())}")
        else:
            err.print(f"[bold red]error:[/] {escape(str(exc))}")
    exit_with(exc.exit_code)


def escape(text: str) -> str:
    from rich.markup import escape as rich_escape

    return rich_escape(text)


def command(*name: str) -> Callable[[F], F]:
    """Turn library errors raised by a CLI command into the documented output and exit code."""

    def deco(fn: F) -> F:
        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            try:
                return fn(*args, **kwargs)
            except LanectlError as exc:
                fail(list(name), exc, bool(kwargs.get("json_out")))
            except PermissionError as exc:  # a file or directory this user may not write (or read)
                where = f" {exc.filename}" if exc.filename else ""
                fail(list(name), LanectlError(
                    f"permission denied:{where} ({exc.strerror or exc})",
                    "run it as root (sudo lanectl ...): it writes lanectl's state, units or lane files",
                    "permission_denied", ExitCode.UNAVAILABLE), bool(kwargs.get("json_out")))
            except Exception as exc:
                ledger = sys.modules.get("lanectl.ledger")  # loaded whenever a ledger error can happen
                if ledger is None or not isinstance(exc, ledger.Error):
                    raise
                mapped = ledger.ledger_error(ledger.last_opened(), exc)  # a read outside a transaction
                if mapped is None:
                    raise
                fail(list(name), mapped, bool(kwargs.get("json_out")))

        return wrapper  # type: ignore[return-value]

    return deco


def human_bytes(n: int | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "K", "M", "G", "T"):
        if n < 1024 or unit == "T":
            return f"{n:.0f}{unit}" if unit == "B" else f"{n:.1f}{unit}"
        n /= 1024  # type: ignore[assignment]
    return "-"


def human_duration(s: float | None) -> str:
    if s is None:
        return "-"
    s = int(s)
    d, s = divmod(s, 86400)
    h, s = divmod(s, 3600)
    m, s = divmod(s, 60)
    if d:
        return f"{d}d{h}h"
    if h:
        return f"{h}h{m}m"
    if m:
        return f"{m}m{s}s"
    return f"{s}s"

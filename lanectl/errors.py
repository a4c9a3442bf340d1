"""Exit codes and the error types the library raises; the CLI turns them into output in one place.

Problem is a dataclass (slots): its fields are declared. ``dataclasses`` (and the ``inspect`` it imports, ~7 ms) is
on the path of every `lanectl status` and `lanectl probe` anyway since lanectl.systemd (UnitBus) uses it, so the
declared records cost those commands no import (docs/decisions.md, "Records, not bags").
"""
from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum


class ExitCode(IntEnum):
    """Documented exit codes of every lanectl command (docs/exit-codes.md is checked against this)."""

    OK = 0  #: done, or already in the requested state (idempotent no-op)
    ERROR = 1  #: internal error, or a partial failure
    USAGE = 2  #: bad flags or arguments
    CONFIG = 3  #: lane definitions or settings invalid; nothing written
    NOT_FOUND = 4  #: no such lane, mission or unit
    CONFLICT = 5  #: refused by state (drift, idempotency key reused with another payload, ...)
    UNAVAILABLE = 6  #: systemd, the ledger or a lane endpoint cannot be reached
    TIMEOUT = 7  #: a --wait deadline passed; the operation may still complete
    UNHEALTHY = 8  #: a check ran and found a failing condition (a lane down, drift found)


@dataclass(slots=True)
class Problem:
    """One thing wrong, with where it is and how to fix it: an entry of ``errors`` / ``warnings`` in every JSON
    envelope (``as_dict``)."""

    message: str
    file: str | None = None
    field: str | None = None
    hint: str | None = None
    code: str = "invalid"
    lane: str | None = None
    severity: str = "error"
    """"error" or "warning"."""

    def render(self) -> str:
        where = ":".join(p for p in (self.file, self.field) if p)
        text = f"{where}: {self.message}" if where else self.message
        if self.hint:
            text += f"; {self.hint}"
        return text

    def as_dict(self) -> dict[str, str | None]:
        return {
            "code": self.code,
            "message": self.message,
            "hint": self.hint,
            "file": self.file,
            "field": self.field,
            "lane": self.lane,
            "severity": self.severity,
        }


class LanectlError(Exception):
    """Base error: a stable code, a message that says what and where, and a hint that says how to fix it."""

    def __init__(self, message: str, hint: str | None = None, code: str = "error",
                 exit_code: ExitCode = ExitCode.ERROR, problems: list[Problem] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint
        self.code = code
        self.exit_code = exit_code
        self.problems: list[Problem] = [] if problems is None else problems

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(message={self.message!r}, hint={self.hint!r}, code={self.code!r}, "
                f"exit_code={self.exit_code!r}, problems={self.problems!r})")

    def __str__(self) -> str:
        return self.message + (f"; {self.hint}" if self.hint else "")

    def all_problems(self) -> list[Problem]:
        return self.problems or [Problem(self.message, hint=self.hint, code=self.code)]


def config_error(problems: list[Problem]) -> LanectlError:
    errors = [p for p in problems if p.severity == "error"]
    return LanectlError(
        f"{len(errors)} problem(s) in the lane configuration",
        code="config_invalid",
        exit_code=ExitCode.CONFIG,
        problems=problems,
    )


class NotFound(LanectlError):
    def __init__(self, message: str, hint: str | None = None, code: str = "not_found") -> None:
        super().__init__(message, hint, code, ExitCode.NOT_FOUND)


class Conflict(LanectlError):
    def __init__(self, message: str, hint: str | None = None, code: str = "conflict") -> None:
        super().__init__(message, hint, code, ExitCode.CONFLICT)


class Unavailable(LanectlError):
    def __init__(self, message: str, hint: str | None = None, code: str = "unavailable") -> None:
        super().__init__(message, hint, code, ExitCode.UNAVAILABLE)


class Timeout(LanectlError):
    def __init__(self, message: str, hint: str | None = None, code: str = "timeout") -> None:
        super().__init__(message, hint, code, ExitCode.TIMEOUT)

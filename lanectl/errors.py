"""Exit codes and the error types the library raises; the CLI turns them into output in one place.

These types are on the path of every `lanectl status` and `lanectl probe` (cron runs them every minute), so they
are built on ``types.SimpleNamespace`` (attributes, equality and repr, implemented in C) rather than dataclasses:
importing ``dataclasses`` pulls in ``inspect`` and costs ~7 ms before anything runs (docs/benchmarks.md).
"""
from __future__ import annotations

from enum import IntEnum
from types import SimpleNamespace


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


class Problem(SimpleNamespace):
    """One thing wrong, with where it is and how to fix it."""

    message: str
    file: str | None
    field: str | None
    hint: str | None
    code: str
    lane: str | None
    severity: str  # "error" or "warning"

    def __init__(self, message: str, file: str | None = None, field: str | None = None, hint: str | None = None,
                 code: str = "invalid", lane: str | None = None, severity: str = "error") -> None:
        super().__init__(message=message, file=file, field=field, hint=hint, code=code, lane=lane,
                         severity=severity)

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

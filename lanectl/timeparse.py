"""Times and durations as people type them, parsed in one place (the CLI, the client and the ledger use it).

- a duration: ``30s``, ``15m``, ``1h``, ``7d``, ``2w`` (``parse_duration``: also plain seconds);
- a time: seconds since the epoch or an RFC 3339 time, UTC when it has no offset (``absolute_time``);
- a time back from now: a duration (``parse_time``: ``--since 1h``);
- a deadline: ``+30s``, ``+10m``, ``+2h``, ``+1d`` from now, or a time (``parse_deadline``); a relative one stays
  text in a submit (``deadline_request``) and the ledger resolves it (``relative_deadline``) when it creates the
  mission, so a retry with the same idempotency key and text is the same request.

Bad input is a ``LanectlError`` with exit 2 (usage) naming the option. Standard library and lanectl.errors only:
no typer, no ledger (the fast start-up paths and the ledger itself import it).
"""
from __future__ import annotations

import re
from typing import Final

from lanectl.errors import ExitCode, LanectlError, Problem

UNIT_S: Final = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
"""Seconds per unit of every duration lanectl reads (options, lanectl.toml)."""
DURATION_RE: Final = re.compile(r"^\+?(\d+(?:\.\d+)?)([smhdw])$")
"""A duration as an option takes it: ``15m``, ``+1h``."""
RELATIVE_RE: Final = re.compile(r"^\+(\d+(?:\.\d+)?)([smhd])$")
"""A relative deadline as a producer writes it: +30s, +10m, +2h, +1d."""


def bad_input(field: str, message: str, hint: str, code: str) -> LanectlError:
    """Bad input from a producer or operator: exit 2 (usage), naming the field and how to write it."""
    return LanectlError(f"{field}: {message}", hint, code, ExitCode.USAGE,
                        [Problem(message, field=field, hint=hint, code=code)])


def relative_deadline(text: str, now: float) -> float | None:
    """``+30m`` resolved against ``now``; None when the text is not a relative deadline."""
    m = RELATIVE_RE.match(text.strip())
    return now + float(m.group(1)) * UNIT_S[m.group(2)] if m else None


def absolute_time(text: str, field: str, hint: str, code: str) -> float:
    """Seconds since the epoch, or an RFC 3339 time (UTC if it has no offset); else a bad-input error."""
    from datetime import UTC, datetime

    t = text.strip()
    try:
        return float(t)
    except ValueError:
        pass
    try:
        dt = datetime.fromisoformat(t.replace("Z", "+00:00"))
    except ValueError as exc:
        raise bad_input(field, f"{text!r} is not a time", hint, code) from exc
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return dt.timestamp()


def parse_deadline(text: str | None, now: float) -> float | None:
    """``+30s``/``+10m``/``+2h``/``+1d``, an RFC 3339 time (UTC if no offset), or seconds since the epoch."""
    if text is None:
        return None
    rel = relative_deadline(text, now)
    if rel is not None:
        return rel
    return absolute_time(text, "deadline", "use +10m, 2030-01-01T12:00:00Z or epoch seconds", "bad_deadline")


def deadline_request(text: str | None, now: float) -> float | str | None:
    """A deadline for a submit: a relative one stays text (``+30m``), resolved by the ledger at the submit that
    creates the mission, so that a retry with the same idempotency key and text is the same request."""
    if text is not None and RELATIVE_RE.match(text.strip()):
        return text.strip()
    return parse_deadline(text, now)


def parse_duration(text: str, field: str = "window") -> float:
    """``30s``, ``15m``, ``1h``, ``24h``, ``7d``, ``2w`` (or plain seconds) -> seconds, > 0."""
    t = text.strip()
    m = DURATION_RE.match(t)
    try:
        secs = float(m.group(1)) * UNIT_S[m.group(2)] if m else float(t)
    except ValueError:
        secs = -1.0
    if not secs > 0:
        raise bad_input(field, f"{text!r} is not a duration", "use e.g. 15m, 1h, 24h or 7d", "bad_duration")
    return secs


def parse_time(text: str | None, now: float, field: str = "since") -> float | None:
    """A duration back from now (``1h``, ``7d``), an RFC 3339 time (UTC if no offset) or epoch seconds."""
    if text is None:
        return None
    t = text.strip()
    m = DURATION_RE.match(t)
    if m:
        return now - float(m.group(1)) * UNIT_S[m.group(2)]
    return absolute_time(t, field, "use 1h, 7d, 2030-01-01T12:00:00Z or epoch seconds", "bad_time")

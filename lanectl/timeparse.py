"""Times as people write them on the command line and in batch files: deadlines (``+10m``, RFC 3339, epoch
seconds) and absolute times. Library code (``lanectl.batch`` reads batch files with it), so no CLI module
is needed to parse one."""
from __future__ import annotations

from datetime import UTC, datetime

from lanectl.ledger import missions as ms


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
        dt = dt.replace(tzinfo=UTC)
    return dt.timestamp()


def parse_deadline(text: str | None, now: float) -> float | None:
    """``+30s``/``+10m``/``+2h``/``+1d``, an RFC 3339 time (UTC if no offset), or seconds since the epoch."""
    if text is None:
        return None
    rel = ms.relative_deadline(text, now)
    if rel is not None:
        return rel
    return absolute_time(text, "deadline", "use +10m, 2030-01-01T12:00:00Z or epoch seconds", "bad_deadline")


def deadline_request(text: str | None, now: float) -> float | str | None:
    """A deadline for a submit: a relative one stays text (``+30m``), resolved by the ledger at the submit that
    creates the mission, so that a retry with the same idempotency key and text is the same request."""
    if text is not None and ms.RELATIVE_RE.match(text.strip()):
        return text.strip()
    return parse_deadline(text, now)

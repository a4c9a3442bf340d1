"""Where a ledger is: a file (SQLite) or a ``postgresql://`` URL (PostgreSQL). The one parser of ``--ledger``,
``LANECTL_LEDGER`` and ``ledger =`` in lanectl.toml (issue 12, item 1).

``resolve(value)`` gives a ``Path`` for anything that is not a PostgreSQL URL (a path keeps meaning SQLite, as
before) and the URL, checked, as a ``str`` otherwise. A password inside the URL is refused (``ledger_url_password``,
exit 2): a URL on a command line is visible to every user in ``ps``, and one in lanectl.toml or the environment
ends up in logs and unit files; libpq's own sources (``~/.pgpass``, ``PGPASSFILE``, ``PGSERVICEFILE`` services)
work unchanged. ``redact(url)`` is what output and errors show of a URL.
"""
from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import parse_qsl, urlsplit

from lanectl.errors import ExitCode, LanectlError

SCHEMES = ("postgresql://", "postgres://")


def is_url(value: object) -> bool:
    """Whether ``value`` names a PostgreSQL ledger (a ``postgresql://`` or ``postgres://`` URL)."""
    return isinstance(value, str) and value.startswith(SCHEMES)


def resolve(value: str | Path) -> Path | str:
    """A ledger location from what a user wrote: the URL (checked) or the path."""
    if isinstance(value, Path) or not is_url(value):
        return Path(value)
    check_url(value)
    return value


def check_url(url: str) -> str:
    try:
        parts = urlsplit(url)
        query = dict(parse_qsl(parts.query, keep_blank_values=True))
        _ = parts.port  # raises ValueError on a port that is not a number
    except ValueError as exc:
        raise LanectlError(f"ledger URL {redact(url)} cannot be read: {exc}",
                           "write it as postgresql://[user@][host][:port]/dbname[?host=/socket/dir]",
                           "bad_ledger_url", ExitCode.USAGE) from None
    if parts.password is not None or "password" in query:
        raise LanectlError(f"ledger URL {redact(url)} carries a password",
                           "remove it from the URL and put it in ~/.pgpass (or the file PGPASSFILE names) or a "
                           "service file (PGSERVICEFILE): a URL is visible to other users in ps and ends up in logs",
                           "ledger_url_password", ExitCode.USAGE)
    if not parts.path.strip("/") and "dbname" not in query and "service" not in query:
        raise LanectlError(f"ledger URL {redact(url)} names no database",
                           "add the database: postgresql://host/lanectl (or ?service=NAME)",
                           "bad_ledger_url", ExitCode.USAGE)
    return url


def shown(location: str | Path) -> str:
    """A ledger location as output shows it: a path as it is, a URL redacted."""
    return redact(location) if is_url(location) else str(location)


def redact(url: str) -> str:
    """The URL with any password replaced by ``***`` (for output and errors); the rest exactly as written."""
    url = re.sub(r"^([a-z]+://[^/@:?#]*):[^@/?#]*@", r"\1:***@", url)
    return re.sub(r"([?&]password=)[^&#]*", r"\1***", url)

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
from urllib.parse import parse_qsl, unquote, urlsplit

from lanectl.errors import ExitCode, LanectlError

SCHEMES = ("postgresql://", "postgres://")
PREFIXES = ("postgresql:", "postgres:")
"""What a location that means a URL starts with: one without ``//`` after it is a malformed URL (``bad_ledger_url``),
never the name of a file."""
FORM = "write it as postgresql://[user@][host][:port]/dbname[?host=/socket/dir]"

PARAMETERS = frozenset((
    "application_name", "channel_binding", "client_encoding", "connect_timeout", "dbname",
    "fallback_application_name", "gssdelegation", "gssencmode", "gsslib", "host", "hostaddr", "keepalives",
    "keepalives_count", "keepalives_idle", "keepalives_interval", "krbsrvname", "load_balance_hosts",
    "max_protocol_version", "min_protocol_version", "oauth_client_id", "oauth_issuer", "oauth_scope", "options",
    "passfile", "port", "replication", "require_auth", "requirepeer", "service", "ssl_max_protocol_version",
    "ssl_min_protocol_version", "sslcert", "sslcertmode", "sslcompression", "sslcrl", "sslcrldir", "sslkey",
    "sslkeylogfile", "sslmode", "sslnegotiation", "sslrootcert", "sslsni", "target_session_attrs",
    "tcp_user_timeout", "user"))
"""libpq's connection parameters (``PQconndefaults`` of libpq 18, the one psycopg[binary] bundles) a ledger URL may
carry; any other is refused, naming it (a typo such as ``sslmod=require`` would otherwise be an error only at
connect time, or silently ignored by another client)."""
SECRETS = frozenset(("password", "sslpassword", "oauth_client_secret", "scram_client_key", "scram_server_key"))
"""libpq parameters that hold a secret: refused in a URL like a password in its userinfo."""
CHOICES = {
    "sslmode": ("disable", "allow", "prefer", "require", "verify-ca", "verify-full"),
    "target_session_attrs": ("any", "read-write", "read-only", "primary", "standby", "prefer-standby"),
    "gssencmode": ("disable", "prefer", "require"),
    "channel_binding": ("disable", "prefer", "require"),
    "load_balance_hosts": ("disable", "random"),
    "sslnegotiation": ("postgres", "direct"),
    "sslcertmode": ("disable", "allow", "require"),
}
"""The libpq parameters whose value is one of a fixed set (libpq's documentation), checked here."""


def is_url(value: object) -> bool:
    """Whether ``value`` names a PostgreSQL ledger (a ``postgresql://`` or ``postgres://`` URL)."""
    return isinstance(value, str) and value.startswith(SCHEMES)


def resolve(value: str | Path) -> Path | str:
    """A ledger location from what a user wrote: the URL (checked) or the path."""
    if isinstance(value, Path) or not (is_url(value) or value.startswith(PREFIXES)):
        return Path(value)
    check_url(value)
    return value


def _bad(url: str, what: str, hint: str = FORM) -> LanectlError:
    return LanectlError(f"ledger URL {redact(url)} {what}", hint, "bad_ledger_url", ExitCode.USAGE)


def check_url(url: str) -> str:
    """The URL, when it is one lanectl connects with: a ``postgresql://`` (or ``postgres://``) URL without a
    password, naming a database, whose query holds only libpq's parameters with valid values. Else
    ``ledger_url_password`` or ``bad_ledger_url`` (exit 2), naming the parameter and never showing a secret."""
    if not is_url(url):
        raise _bad(url, "is not a URL lanectl can use (postgresql: must be followed by //)")
    try:
        parts = urlsplit(url)
        pairs = parse_qsl(parts.query, keep_blank_values=True, strict_parsing=bool(parts.query))
        query = dict(pairs)
        for host in parts.netloc.rpartition("@")[2].split(","):  # libpq takes host1:port1,host2:port2
            port = host.rpartition("]")[2].rpartition(":")[2] if ":" in host.rpartition("]")[2] else ""
            if port and not port.isdigit():
                raise ValueError(f"port {port!r} is not a number")
    except ValueError as exc:
        raise LanectlError(f"ledger URL {redact(url)} cannot be read: {exc}", FORM,
                           "bad_ledger_url", ExitCode.USAGE) from None
    if parts.password is not None or SECRETS & set(query):
        raise LanectlError(f"ledger URL {redact(url)} carries a password",
                           "remove it from the URL and put it in ~/.pgpass (or the file PGPASSFILE names) or a "
                           "service file (PGSERVICEFILE): a URL is visible to other users in ps and ends up in logs",
                           "ledger_url_password", ExitCode.USAGE)
    unknown = sorted(set(query) - PARAMETERS)
    if unknown:
        raise _bad(url, f"has parameters libpq does not know: {', '.join(unknown)}",
                   f"use libpq's connection parameters (e.g. host, port, sslmode, application_name, passfile, "
                   f"service); check {', '.join(unknown)} for a typo")
    for name, allowed in CHOICES.items():
        if name in query and query[name] not in allowed:
            raise _bad(url, f"has {name}={query[name]!r}, which libpq does not accept",
                       f"{name} is one of: {', '.join(allowed)}")
    if "passfile" in query and not query["passfile"].startswith("/"):
        raise _bad(url, f"has passfile={query['passfile']!r}, which is not an absolute path",
                   "passfile names the password file (libpq's .pgpass format) by its absolute path, e.g. "
                   "?passfile=/etc/lanectl/pgpass (mode 0600); the password itself never goes in the URL")
    if not parts.path.strip("/") and "dbname" not in query and "service" not in query:
        raise _bad(url, "names no database", "add the database: postgresql://host/lanectl (or ?service=NAME)")
    return url


def shown(location: str | Path) -> str:
    """A ledger location as output shows it: a path as it is, a URL redacted."""
    return redact(location) if is_url(location) else str(location)


def redact(url: str) -> str:
    """The URL with any secret replaced by ``***`` (for output and errors); the rest exactly as written.

    Hidden: the userinfo's password; the value of every query parameter whose name, percent-decoded and in any case,
    is one of SECRETS (libpq decodes ``pass%77ord`` to ``password``); and the value of every parameter libpq does not
    know (``PassWord=...`` is refused as unknown, and may still be somebody's password)."""
    url = re.sub(r"^([a-z]+://[^/@:?#]*):[^@/?#]*@", r"\1:***@", url)

    def hide(m: re.Match[str]) -> str:
        key = unquote(m.group(2))
        if key.lower() in SECRETS or key not in PARAMETERS:
            return f"{m.group(1)}{m.group(2)}=***"
        return m.group(0)

    return re.sub(r"([?&])([^=&#]*)=([^&#]*)", hide, url)

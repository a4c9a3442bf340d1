"""Questions about a ledger's location that callers outside this package used to answer with ``Path`` methods:
does a ledger exist there, and migrating it. A location is a ``Path`` (SQLite) or a ``postgresql://`` URL, a
``str`` (``lanectl.ledgerurl``), on which ``.exists()`` means nothing; these work for both."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from lanectl.ledgerurl import is_url, redact


def exists(location: str | Path) -> bool:
    """Whether a ledger is at ``location``: a file there (SQLite: even an empty one, which opening turns into a
    ledger, as before), or a PostgreSQL database that holds the ledger's tables. A database that does not exist is
    no ledger (False); a server that cannot be reached, or refuses the login, raises its ``LanectlError``
    (``ledger_unavailable``, ``ledger_auth``): whether a ledger is there is then unknown, and guessing "no" would
    let a caller create or skip what it must not."""
    if not is_url(location):
        return os.path.exists(location)
    from lanectl.ledger import pg, schema

    try:
        conn = pg.connect(str(location), busy_timeout_s=5.0, readonly=True)
    except Exception as exc:
        if getattr(exc, "code", None) == "ledger_missing":
            return False
        raise
    try:
        return schema.pg_current_version(conn) > 0
    finally:
        conn.close()


def migrate(location: str | Path) -> dict[str, Any]:
    """Bring an existing ledger to this lanectl's schema (``ledger_missing``, exit 6, when there is none). What
    ``lanectl ledger migrate`` reports: the version before and after and the steps applied."""
    from lanectl.ledger import Ledger, schema

    with Ledger.open(location, migrate=False, create=False) as led:
        before = led.version()
    with Ledger.open(location, migrate=True, create=False) as led:
        after = led.version()
    steps = [m.name for m in schema.MIGRATIONS[before:after]]
    where = redact(str(location)) if is_url(location) else str(location)
    return {"ledger": where, "from_version": before, "to_version": after, "applied": steps,
            "changed": after != before}

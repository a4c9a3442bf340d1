"""The PostgreSQL side of the ledger's seam (issue 12): a connection that speaks the ledger's SQL to PostgreSQL.

The ledger's modules (missions, tick, events, lanes, reads, rollups, retention) hold one copy of their logic and
run their statements through ``ledger.conn.execute(sql, params)``. For a PostgreSQL ledger ``conn`` is a
``PgConn``: it turns each statement of the common dialect into PostgreSQL's once (``translate``, cached by
statement text) and runs it with psycopg 3. What the translation does, and nothing more:

- parameters: ``?`` -> ``%s``, ``?N`` -> ``%s`` with the arguments re-ordered, a literal ``%`` -> ``%%``;
- SQLite's planner hints ``INDEXED BY x`` / ``NOT INDEXED`` are dropped (PostgreSQL plans by statistics);
- ``a IS ?`` / ``a IS NOT b`` -> ``IS [NOT] DISTINCT FROM`` (SQLite's IS compares any two values);
- ``data LIKE`` on a JSON column -> ``data::text LIKE``; ``json_extract(...) <= ?`` and
  ``coalesce(json_extract(...), 1)`` are numbers;
- scalar ``max(a, b)`` / ``min(a, b)`` -> ``greatest``/``least``;
- ``INSERT OR IGNORE`` -> ``INSERT ... ON CONFLICT DO NOTHING``; ``INSERT OR REPLACE INTO t (cols)`` ->
  ``INSERT ... ON CONFLICT (t's key) DO UPDATE SET`` every other column (``KEYS`` names each table's key; an
  update of ``events`` is refused by its append-only trigger, as SQLite's ``events_no_replace`` refuses it);
- ``CROSS JOIN t ON ...`` (SQLite's way to fix the join order) -> ``JOIN t ON ...``;
- in an upsert, ``SET n = n + excluded.n`` -> ``SET n = table.n + excluded.n`` (PostgreSQL finds a bare ``n``
  ambiguous there).

Statements whose meaning differs (the id high-water mark, PRAGMAs, claims) are not translated: the module that
owns them picks the dialect's statement (``Ledger.dialect``). ``json_extract(x, '$.k')`` is a function the
PostgreSQL schema defines (``lanectl/ledger/schema.py``, ``PG_BASELINE``), returning text.

Types: ``double precision`` for times (floats both ways), ``bigint`` for integers, ``jsonb`` for JSON columns,
read back as text (the loader below) so that callers parse JSON exactly as they do SQLite's; ``numeric`` results
(``sum`` of integers) come back as ``int`` when whole.

Transactions: every ``Ledger.transaction()`` on PostgreSQL is ``BEGIN`` plus a transaction-scoped advisory lock
of the ledger (``pg_advisory_xact_lock``), so writers are serialised exactly as SQLite's ``BEGIN IMMEDIATE``
serialises them: every read-then-write of the ledger's logic (admission against queue depth, a claim, a fenced
callback) sees what it would see on SQLite, and fencing is exactly as strict. ``lock_timeout`` is the busy
timeout (``ledger_busy``, exit 6, when it runs out).
"""
from __future__ import annotations

import re
from decimal import Decimal
from functools import lru_cache
from typing import Any

from lanectl.errors import ExitCode, LanectlError, Unavailable
from lanectl.ledgerurl import redact

LOCK_KEY = 0x6C616E65  # 'lane': the advisory lock every write transaction of a ledger database takes


def _import_psycopg() -> Any:
    try:
        import psycopg
    except ImportError as exc:
        raise LanectlError("the PostgreSQL ledger needs psycopg 3, which is not installed",
                           "install lanectl with its postgresql extra: pip install 'lanectl[postgresql]' "
                           "(scripts/setup does)", "postgresql_driver_missing", ExitCode.CONFIG) from exc
    return psycopg


def Error() -> type[Exception]:  # noqa: N802 - the class, looked up late (psycopg is optional)
    return _import_psycopg().Error


_PARAM = re.compile(r"'(?:[^']|'')*'|\?(\d+)?|%")
_HINT = re.compile(r"\s+(?:INDEXED\s+BY\s+\w+|NOT\s+INDEXED)\b", re.IGNORECASE)
_IS_PARAM = re.compile(r"\bIS\s+(NOT\s+)?(?!NULL\b|TRUE\b|FALSE\b|DISTINCT\b|NOT\b)(\?|[a-z_][\w.]*)", re.IGNORECASE)
_JSON_LIKE = re.compile(r"\b((?:\w+\.)?(?:data|payload|tags|result))\s+(NOT\s+)?LIKE\b", re.IGNORECASE)
_JSON_COALESCE = re.compile(r"coalesce\((json_extract\([^()]*\)),\s*(-?\d+(?:\.\d+)?)\)", re.IGNORECASE)
_JSON_CMP = re.compile(r"(json_extract\([^()]*\))(\s*(?:<=|>=|<|>)\s*\?)", re.IGNORECASE)
_OR_IGNORE = re.compile(r"^\s*INSERT\s+OR\s+IGNORE\s+INTO\b", re.IGNORECASE)
_OR_REPLACE = re.compile(r"^\s*INSERT\s+OR\s+REPLACE\s+INTO\s+(\w+)\s*\(([^)]*)\)", re.IGNORECASE)
KEYS = {"rollups": ("bucket_s", "start", "lane", "class"), "events": ("id",), "missions": ("id",),
        "rollup_traffic": ("bucket_s", "start", "kind"), "rollup_state": ("id",), "lanes": ("name",)}
"""The primary key of each table an ``INSERT OR REPLACE`` may name (the conflict target PostgreSQL needs)."""
_MINMAX = re.compile(r"\b(max|min)\(", re.IGNORECASE)
_UPSERT_ADD = re.compile(r"\b(\w+)\s*=\s*\1(\s*\+\s*excluded\.\1)\b")
_INTO = re.compile(r"\bINSERT\s+INTO\s+(\w+)", re.IGNORECASE)
_CROSS_ON = re.compile(r"\bCROSS\s+JOIN(\s+\w+(?:\s+\w+)?\s+ON\b)", re.IGNORECASE)


def _scalar_minmax(sql: str) -> str:
    """``max(a, b)`` -> ``greatest(a, b)`` (a top-level comma inside the parentheses); aggregates stay."""
    out, pos = [], 0
    for m in _MINMAX.finditer(sql):
        if m.start() < pos:
            continue
        depth, i, comma = 1, m.end(), False
        while i < len(sql) and depth:
            c = sql[i]
            if c == "(":
                depth += 1
            elif c == ")":
                depth -= 1
            elif c == "," and depth == 1:
                comma = True
            elif c == "'":
                i = sql.index("'", i + 1)
            i += 1
        if comma:
            out.append(sql[pos:m.start()])
            out.append("greatest(" if m.group(1).lower() == "max" else "least(")
            pos = m.end()
    out.append(sql[pos:])
    return "".join(out)


@lru_cache(maxsize=4096)
def translate(sql: str) -> tuple[str, tuple[int, ...] | None]:
    """(PostgreSQL text, argument order or None) of a statement of the common dialect."""
    sql = _HINT.sub("", sql)
    sql = _CROSS_ON.sub(r"JOIN\1", sql)
    if "excluded." in sql and (into := _INTO.search(sql)):
        sql = _UPSERT_ADD.sub(lambda m: f"{m.group(1)} = {into.group(1)}.{m.group(1)}{m.group(2)}", sql)
    sql = _IS_PARAM.sub(lambda m: ("IS DISTINCT FROM " if m.group(1) else "IS NOT DISTINCT FROM ") + m.group(2), sql)
    sql = _JSON_LIKE.sub(lambda m: f"{m.group(1)}::text {m.group(2) or ''}LIKE", sql)
    sql = _JSON_CMP.sub(r"(\1)::numeric\2", sql)
    sql = _JSON_COALESCE.sub(r"coalesce((\1)::numeric, \2)", sql)
    ignore = bool(_OR_IGNORE.match(sql))
    if ignore:
        sql = _OR_IGNORE.sub("INSERT INTO", sql) + " ON CONFLICT DO NOTHING"
    replace = _OR_REPLACE.match(sql)
    if replace:
        table, cols = replace.group(1), [c.strip() for c in replace.group(2).split(",")]
        key = KEYS[table]
        sets = ", ".join(f"{c} = excluded.{c}" for c in cols if c not in key)
        sql = (re.sub(r"^\s*INSERT\s+OR\s+REPLACE\s+INTO", "INSERT INTO", sql, flags=re.IGNORECASE)
               + f" ON CONFLICT ({', '.join(key)}) DO " + (f"UPDATE SET {sets}" if sets else "NOTHING"))
    if "max(" in sql.lower() or "min(" in sql.lower():
        sql = _scalar_minmax(sql)
    order: list[int] = []
    numbered = False
    seq = 0

    def sub(m: re.Match[str]) -> str:
        nonlocal numbered, seq
        tok = m.group(0)
        if tok.startswith("'"):
            return tok.replace("%", "%%")
        if tok == "%":
            return "%%"
        if m.group(1):
            numbered = True
            order.append(int(m.group(1)) - 1)
        else:
            order.append(seq)
            seq += 1
        return "%s"

    out = _PARAM.sub(sub, sql)
    return out, (tuple(order) if numbered else None)


def _args(params: Any, order: tuple[int, ...] | None) -> Any:
    if order is None or params is None:
        return params
    return [params[i] for i in order]


class _Many:
    """What ``PgConn.executemany`` leaves: the rows it changed, no result set (as sqlite3's executemany)."""

    __slots__ = ("rowcount",)
    description = None

    def __init__(self, rowcount: int) -> None:
        self.rowcount = rowcount


class PgCursor:
    """What the ledger's code uses of an sqlite3 cursor: fetchone/fetchall/iteration/description/rowcount."""

    __slots__ = ("_cur",)

    def __init__(self, cur: Any) -> None:
        self._cur = cur

    def fetchone(self) -> Any:
        return self._cur.fetchone() if self._cur.description is not None else None

    def fetchall(self) -> list[Any]:
        return self._cur.fetchall() if self._cur.description is not None else []

    def __iter__(self) -> Any:
        return iter(self.fetchall())

    @property
    def description(self) -> Any:
        return self._cur.description

    @property
    def rowcount(self) -> int:
        return self._cur.rowcount


class PgConn:
    """A psycopg connection (autocommit: transactions are the ledger's explicit BEGIN/COMMIT) behind the subset of
    the sqlite3.Connection interface the ledger's modules use."""

    dialect = "postgresql"

    def __init__(self, raw: Any, url: str) -> None:
        self.raw = raw
        self.url = url

    def execute(self, sql: str, params: Any = ()) -> PgCursor:
        text, order = translate(sql)
        try:
            cur = self.raw.cursor()  # raises too when the connection is gone
            cur.execute(text, _args(params, order) or None)
        except Exception as exc:
            raise as_dbapi(exc) from exc
        return PgCursor(cur)

    def executemany(self, sql: str, seq: Any) -> PgCursor:
        """One statement per row, each its own protocol exchange, not psycopg's ``executemany``: that one runs in
        pipeline mode, where the server does not say ReadyForQuery until the client syncs at the end of the batch,
        and a backend that has not said it never starts ``idle_in_transaction_session_timeout``: a process stopped
        inside a batch (SIGSTOP, a stalled VM) held the ledger's write lock, which every host's lease renewal needs,
        for as long as it stayed stopped (found by tests/systemd/test_multihost_chaos.py). The rowcount is the sum,
        as sqlite3's ``executemany`` gives it."""
        text, order = translate(sql)
        total = 0
        try:
            cur = self.raw.cursor()
            for p in seq:
                cur.execute(text, _args(p, order))
                total += max(cur.rowcount, 0)
        except Exception as exc:
            raise as_dbapi(exc) from exc
        return PgCursor(_Many(total))

    def script(self, sql: str) -> None:
        """A script of PostgreSQL statements as it is (the schema's migrations)."""
        try:
            self.raw.execute(sql)  # type: ignore[arg-type]
        except Exception as exc:
            raise as_dbapi(exc) from exc

    @property
    def in_transaction(self) -> bool:
        from psycopg.pq import TransactionStatus as T

        # UNKNOWN (a broken connection) is not a transaction to roll back: there is nothing left of it
        return self.raw.info.transaction_status in (T.ACTIVE, T.INTRANS, T.INERROR)

    @property
    def backend_pid(self) -> int:
        """The server process of this connection (NOTIFY names the sender's: the supervisor ignores its own)."""
        return int(self.raw.info.backend_pid)

    @property
    def closed(self) -> bool:
        return bool(self.raw.closed)

    def close(self) -> None:
        self.raw.close()


def _loaders(psycopg: Any, conn: Any) -> None:
    from psycopg.types.string import TextLoader

    class NumericLoader(psycopg.adapt.Loader):  # type: ignore[misc,name-defined]
        def load(self, data: Any) -> Any:
            d = Decimal(bytes(data).decode())
            return int(d) if d == d.to_integral_value() else float(d)

    conn.adapters.register_loader("jsonb", TextLoader)
    conn.adapters.register_loader("json", TextLoader)
    conn.adapters.register_loader("numeric", NumericLoader)


IDLE_IN_TRANSACTION_S = 15
"""``idle_in_transaction_session_timeout`` of every ledger connection: a process frozen inside a transaction (a
stopped debugger, a SIGSTOP, a hung host) is disconnected by the server after this long, so it can never hold the
ledger's write lock (or row locks) for ever; its transaction is rolled back, nothing of it is written."""
CHANNEL = "lanectl_ledger"
"""The NOTIFY channel: every write transaction sends one notification on it, delivered at COMMIT (its payload is
the newest event id the transaction leaves); the supervisor LISTENs on it (``lanectl.wakeup.PgListener``)."""
ROLE = "lanectl-cli"
"""The default ``application_name`` of this process's ledger connections (``set_role``): what
``pg_stat_activity`` shows an operator. The CLI's is this default (so its fast paths, which start before anything
is set, are named alike); the supervisor's process sets ``lanectl-supervisor``, the library passes
``lanectl-client``."""


def set_role(name: str) -> None:
    """Name this process's ledger connections (``application_name``) unless a caller names its own."""
    global ROLE
    ROLE = name


def app_name(url: str, name: str) -> str | None:
    """The ``application_name`` to connect with: ``name``, unless the URL names one itself (``?application_name=
    lanectl-web1``: the operator's choice, which then names every connection of that ledger); None lets libpq take
    the URL's (a keyword argument would replace it)."""
    from urllib.parse import parse_qs, urlsplit

    return None if "application_name" in parse_qs(urlsplit(url).query) else name


def settings_sql(busy_timeout_s: float, readonly: bool) -> list[str]:
    """What every ledger connection sets after it connects (its own and pooled ones alike)."""
    out = [f"SET lock_timeout = {int(busy_timeout_s * 1000):d}",
           f"SET idle_in_transaction_session_timeout = {IDLE_IN_TRANSACTION_S * 1000:d}",
           "SET TIME ZONE 'UTC'"]
    if readonly:
        out.append("SET default_transaction_read_only = on")
    return out


def connect(url: str, *, busy_timeout_s: float, readonly: bool = False, role: str | None = None) -> PgConn:
    """Connect to the ledger database; errors a person can act on become LanectlErrors naming the URL.
    ``role`` is the connection's ``application_name`` (default ``ROLE``)."""
    psycopg = _import_psycopg()
    try:
        raw = psycopg.connect(url, autocommit=True, connect_timeout=max(1, int(busy_timeout_s)),
                              application_name=app_name(url, role or ROLE))
    except psycopg.OperationalError as exc:
        raise connect_error(url, exc) from None
    try:
        _loaders(psycopg, raw)
        for sql in settings_sql(busy_timeout_s, readonly):
            raw.execute(sql)
    except psycopg.Error as exc:
        raw.close()
        raise ledger_error(url, exc) or connect_error(url, exc) from None
    return PgConn(raw, url)


def listen_connect(url: str, *, role: str, connect_timeout: int = 5) -> Any:
    """A psycopg connection (autocommit) LISTENing on ``CHANNEL``, for ``lanectl.wakeup.PgListener``; psycopg's
    errors are raised as they are (the listener retries with backoff)."""
    psycopg = _import_psycopg()
    conn = psycopg.connect(url, autocommit=True, connect_timeout=connect_timeout,
                           application_name=app_name(url, role))
    try:
        conn.execute(f"SET idle_in_transaction_session_timeout = {IDLE_IN_TRANSACTION_S * 1000:d}")
        conn.execute(f"LISTEN {CHANNEL}")
    except BaseException:
        conn.close()
        raise
    return conn


def server_offset(conn: PgConn) -> float:
    """The server's clock minus this host's, in seconds: ``clock_timestamp()`` as epoch seconds minus the local
    midpoint of the round trip that read it (the error is at most half the round trip)."""
    import time

    t0 = time.time()
    server = float(conn.execute("SELECT extract(epoch from clock_timestamp())").fetchone()[0])
    t1 = time.time()
    return server - (t0 + t1) / 2


class ReadPool:
    """Read-only ledger connections shared by the threads of one process (psycopg_pool.ConnectionPool): the
    supervisor's HTTP threads (GET /metrics) borrow one per read instead of connecting per request. Each
    connection is set up as ``connect`` sets up a read-only one; a broken one is dropped when it is handed back
    or checked out (``check``), so a server restart costs one failed read at most."""

    def __init__(self, url: str, *, busy_timeout_s: float = 5.0, min_size: int = 1, max_size: int = 4,
                 role: str | None = None) -> None:
        psycopg = _import_psycopg()
        from psycopg_pool import ConnectionPool

        def configure(raw: Any) -> None:
            _loaders(psycopg, raw)
            for sql in settings_sql(busy_timeout_s, True):
                raw.execute(sql)

        self.url = url
        self.busy_timeout_s = busy_timeout_s
        self.pool = ConnectionPool(
            url, min_size=min_size, max_size=max_size, open=False, configure=configure,
            check=ConnectionPool.check_connection, timeout=max(1.0, busy_timeout_s), name="lanectl-reads",
            kwargs={"autocommit": True, "application_name": app_name(url, (role or ROLE) + "-reads"),
                    "connect_timeout": max(1, int(busy_timeout_s))})

    def open(self) -> ReadPool:
        """Start the pool without waiting for its connections (the server may be down at the moment)."""
        self.pool.open(wait=False)
        return self

    def connection(self) -> Any:
        """A context manager giving a ``PgConn`` of a pooled connection (returned to the pool at its end); a
        server that cannot be reached is ``ledger_unavailable``."""
        import contextlib

        psycopg = _import_psycopg()
        from psycopg_pool import PoolTimeout

        @contextlib.contextmanager
        def borrow() -> Any:
            try:
                cm = self.pool.connection()
                raw = cm.__enter__()
            except (PoolTimeout, psycopg.OperationalError) as exc:
                raise Unavailable(f"{redact(self.url)}: no connection to the ledger's server ({exc})",
                                  "check that the server runs; then retry", "ledger_unavailable") from None
            try:
                yield PgConn(raw, self.url)
            except BaseException as exc:
                cm.__exit__(type(exc), exc, exc.__traceback__)
                raise
            cm.__exit__(None, None, None)

        return borrow()

    def stats(self) -> dict[str, int]:
        return dict(self.pool.get_stats())

    def close(self) -> None:
        self.pool.close()


def connect_error(url: str, exc: Exception) -> LanectlError:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    where = redact(url)
    low = text.lower()
    if "does not exist" in low and "database" in low:
        return Unavailable(f"{where}: no ledger there ({text})",
                           "create the database (createdb), then 'lanectl ledger init' creates the ledger in it",
                           "ledger_missing")
    if "password" in low or "authentication" in low:
        return LanectlError(f"{where}: the server refused the login ({text})",
                            "check the user in the URL and its password in ~/.pgpass / PGPASSFILE",
                            "ledger_auth", ExitCode.CONFIG)
    return Unavailable(f"{where}: cannot reach the ledger's PostgreSQL server ({text})",
                       "check that the server runs and the host/port/socket in the URL; then retry",
                       "ledger_unavailable")


def ledger_error(url: str, exc: BaseException) -> LanectlError | None:
    """The LanectlError a psycopg error on the ledger means, or None (``lanectl.ledger.ledger_error``'s twin)."""
    try:
        import psycopg
        from psycopg import errors as e
    except ImportError:
        return None
    if isinstance(exc, LanectlError):
        return exc
    if not isinstance(exc, psycopg.Error):
        return None
    where = redact(url)
    if isinstance(exc, (e.LockNotAvailable, e.DeadlockDetected, e.SerializationFailure)):
        return Unavailable(f"{where}: the ledger is busy ({exc})",
                           "another writer held the ledger's lock past the busy timeout; retry", "ledger_busy")
    if isinstance(exc, e.DiskFull):
        return Unavailable(f"{where}: the ledger's server is out of disk ({exc}); nothing was written",
                           "free space on the database server, then retry", "ledger_full")
    if isinstance(exc, e.ReadOnlySqlTransaction):
        return LanectlError(f"{where}: the ledger is read-only here ({exc}); nothing was written",
                            "connect to the primary server, as a user that may write", "ledger_readonly",
                            ExitCode.UNAVAILABLE)
    if isinstance(exc, e.InsufficientPrivilege):
        return LanectlError(f"{where}: no permission on the ledger ({exc})",
                            "grant the user in the URL the ledger's tables (or connect as their owner)",
                            "ledger_permission", ExitCode.UNAVAILABLE)
    if isinstance(exc, getattr(e, "IdleInTransactionSessionTimeout", ())):
        return Unavailable(f"{where}: the server ended the connection: it stayed idle inside a transaction longer "
                           f"than {IDLE_IN_TRANSACTION_S} s (idle_in_transaction_session_timeout); the transaction "
                           "was rolled back", "retry (the process was stopped or stalled mid-transaction)",
                           "ledger_unavailable")
    if isinstance(exc, psycopg.OperationalError):
        return Unavailable(f"{where}: the connection to the ledger's server failed ({exc}); the transaction was "
                           "rolled back", "check the server, then retry", "ledger_unavailable")
    return None


NOTIFY_COMMIT = (f"SELECT m, pg_notify('{CHANNEL}', m::text) FROM (SELECT coalesce(max(id), 0) AS m FROM events) n")
"""Run just before COMMIT of every write transaction: the newest event id (under the write lock: this
transaction's or older) and ONE notification, delivered to the listeners when the COMMIT is done (never for a
transaction rolled back)."""


def begin(conn: PgConn) -> None:
    """``BEGIN`` and the ledger's write lock (see the module's docstring)."""
    conn.execute("BEGIN")
    conn.execute("SELECT pg_advisory_xact_lock(?)", (LOCK_KEY,))


def as_dbapi(exc: Exception) -> Exception:
    """A psycopg error as the sqlite3 class of the same DB-API kind (the original is its ``__cause__``), so the
    ledger's one copy of its logic catches ``sqlite3.IntegrityError`` and the like on both engines, and readers
    keep catching ``lanectl.ledger.Error``. Anything else is returned as it is."""
    import sqlite3

    try:
        import psycopg
    except ImportError:
        return exc
    if not isinstance(exc, psycopg.Error):
        return exc
    for theirs, ours in ((psycopg.IntegrityError, sqlite3.IntegrityError), (psycopg.DataError, sqlite3.DataError),
                         (psycopg.OperationalError, sqlite3.OperationalError),
                         (psycopg.ProgrammingError, sqlite3.ProgrammingError),
                         (psycopg.InternalError, sqlite3.InternalError),
                         (psycopg.NotSupportedError, sqlite3.NotSupportedError)):
        if isinstance(exc, theirs):
            return ours(str(exc).strip())
    return sqlite3.DatabaseError(str(exc).strip())

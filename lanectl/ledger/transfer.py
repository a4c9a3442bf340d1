"""``lanectl ledger copy SRC DST``: a whole ledger from one location to another (SQLite <-> PostgreSQL, also
PostgreSQL -> PostgreSQL and SQLite -> SQLite), verified (issue 12, item 5).

What is copied: every table of the schema, read from the engine's catalog (``sqlite_master`` / ``pg_tables``), never
from a list here that could drift from the migrations; columns by name (the engines order them differently), rows in
batches by primary key. Tables are written parents first (foreign keys from the catalog), and the tables a new
ledger already holds rows of (``queue_depth``, ``retention``, ``schema_migrations``: the seed of the migrations) are
overwritten row by row with the source's, after the others, so the triggers that keep ``queue_depth`` while missions
are inserted leave nothing of theirs behind. The id high-water marks (SQLite's ``sqlite_sequence``, PostgreSQL's
identity sequences) are set past the copied ids, so a mission id is never handed out twice on the copy.

Consistency: the source is read in one snapshot (SQLite: one read transaction on a read-only connection;
PostgreSQL: ``REPEATABLE READ READ ONLY``), so a running supervisor cannot tear the copy; the destination is written
in one transaction under its write lock. The copy still only holds what the source held when it started: a
supervisor that keeps running on the source makes the two diverge (docs/ledger.md says to stop it first).

Refusals (nothing written): a destination with a row in any table a new ledger has none of (``ledger_not_empty``,
exit 5); a source at another schema version than this lanectl's (``ledger_needs_migration``, exit 5: migrate it
first; a newer one is ``ledger_too_new``, exit 3); the same ledger twice (``ledger_copy_same``, exit 2).

Verification: per table, the row count and a checksum over a canonical rendering of every row, computed on the
source while it is read and on the destination inside the writing transaction, before it commits. A mismatch
(``ledger_copy_mismatch``, exit 1) rolls the destination back. The checksum of a table is the sum, modulo 2**256, of
the SHA-256 of each row's rendering: independent of row order (which the engines do not share for text keys) and
computed in one pass. A row renders as JSON of its columns sorted by name; JSON columns as their parsed value
(PostgreSQL's ``jsonb`` rewrites the text: key order, spaces, ``1e2`` as ``100``: numbers are compared by
their exact decimal value), floats exactly (``float.hex``), bytes as hex.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import sqlite3
import time
from decimal import Decimal
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from lanectl.errors import Conflict, ExitCode, LanectlError, Problem
from lanectl.ledger import Ledger, require_ledger_file, schema
from lanectl.ledgerurl import is_url, shown

BATCH: Final = 2000
"""Rows per read (keyset pagination on the primary key) and per insert."""
_MOD: Final = 1 << 256

Progress = Callable[[str], None]

# The catalog, per engine: the statements differ, their meaning does not.
_CATALOG: Final = {
    "sqlite": {
        "tables": "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite\\_%' ESCAPE '\\' "
                  "ORDER BY name",
        "columns": "SELECT name FROM pragma_table_info(?) ORDER BY cid",
        "key": "SELECT name FROM pragma_table_info(?) WHERE pk > 0 ORDER BY pk",
        "parents": "SELECT DISTINCT \"table\" FROM pragma_foreign_key_list(?)",
    },
    "postgresql": {
        "tables": "SELECT tablename FROM pg_tables WHERE schemaname = current_schema() ORDER BY tablename",
        "columns": "SELECT column_name FROM information_schema.columns WHERE table_schema = current_schema() "
                   "AND table_name = ? ORDER BY ordinal_position",
        "key": "SELECT a.attname FROM pg_index i JOIN pg_attribute a ON a.attrelid = i.indrelid "
               "AND a.attnum = ANY (i.indkey) WHERE i.indrelid = to_regclass(?) AND i.indisprimary "
               "ORDER BY array_position(i.indkey::int2[], a.attnum)",
        "parents": "SELECT DISTINCT confrelid::regclass::text FROM pg_constraint WHERE conrelid = to_regclass(?) "
                   "AND contype = 'f'",
    },
}


def _names(led: Ledger, what: str, *args: Any) -> list[str]:
    return [str(r[0]) for r in led.conn.execute(_CATALOG[led.dialect][what], args).fetchall()]


def json_columns() -> dict[str, frozenset[str]]:
    """The JSON columns of each table, read from the PostgreSQL schema's text (``jsonb``): the baseline's
    ``CREATE TABLE`` blocks and every later step's ``ADD COLUMN ... jsonb``. (SQLite stores JSON as TEXT; a test
    compares this with a live PostgreSQL ledger's catalog.)"""
    out: dict[str, set[str]] = {}
    texts = [schema.PG_BASELINE, *(m.pg for m in schema.MIGRATIONS if m.pg)]
    for text in texts:
        for table, body in re.findall(r"CREATE TABLE (\w+) \((.*?)\n\);", text, re.S):
            for col in re.findall(r"^\s*(\w+)\s+jsonb\b", body, re.M):
                out.setdefault(table, set()).add(col)
        for table, col in re.findall(r"ALTER TABLE (\w+) ADD COLUMN (?:IF NOT EXISTS )?(\w+)\s+jsonb\b", text):
            out.setdefault(table, set()).add(col)
    return {t: frozenset(c) for t, c in out.items()}


def id_tables() -> frozenset[str]:
    """The tables whose ids the ledger hands out (an identity column in the PostgreSQL schema; AUTOINCREMENT or the
    rowid on SQLite), read from the schema's text like ``json_columns``."""
    texts = [schema.PG_BASELINE, *(m.pg for m in schema.MIGRATIONS if m.pg)]
    return frozenset(t for text in texts for t, _ in re.findall(
        r"CREATE TABLE (\w+) \(\s*(\w+) bigint GENERATED (?:BY DEFAULT|ALWAYS) AS IDENTITY", text))


def _number(text: str) -> dict[str, str]:
    d = Decimal(text)
    return {"num": "0" if d == 0 else str(d.normalize())}


def json_value(text: str) -> Any:
    """A JSON document as the checksum sees it: numbers by their exact decimal value (``1e2``, ``100`` and
    ``100.0`` are one number, as in ``jsonb``), objects by their keys (the last of a repeated key, as ``jsonb``)."""
    return json.loads(text, parse_float=_number, parse_int=_number)


def _value(v: Any, is_json: bool) -> Any:
    if v is None:
        return None
    if is_json:
        return {"json": json_value(v)}
    if isinstance(v, bool):
        return int(v)
    if isinstance(v, int):
        return v
    if isinstance(v, float):
        return {"float": v.hex()}
    if isinstance(v, (bytes, bytearray, memoryview)):
        return {"bytes": bytes(v).hex()}
    return str(v)


def render(row: dict[str, Any], json_cols: frozenset[str] = frozenset()) -> str:
    """The canonical rendering of one row (columns sorted by name; see the module's docstring)."""
    return json.dumps({c: _value(row[c], c in json_cols) for c in sorted(row)}, sort_keys=True,
                      separators=(",", ":"), ensure_ascii=False, allow_nan=True)


@dataclass
class _Sum:
    rows: int = 0
    acc: int = 0

    def add(self, text: str) -> None:
        self.rows += 1
        self.acc = (self.acc + int.from_bytes(hashlib.sha256(text.encode()).digest(), "big")) % _MOD

    @property
    def hexdigest(self) -> str:
        return f"{self.acc:064x}"


@dataclass
class TableCopy:
    name: str
    rows: int
    source_sha256: str
    destination_rows: int
    destination_sha256: str

    @property
    def match(self) -> bool:
        return self.rows == self.destination_rows and self.source_sha256 == self.destination_sha256

    def as_dict(self) -> dict[str, Any]:
        return {"rows": self.rows, "source_sha256": self.source_sha256, "destination_rows": self.destination_rows,
                "destination_sha256": self.destination_sha256, "match": self.match}


@dataclass
class CopyResult:
    source: str
    destination: str
    schema_version: int
    tables: list[TableCopy] = field(default_factory=list)
    id_marks: dict[str, dict[str, int]] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def rows(self) -> int:
        return sum(t.rows for t in self.tables)

    @property
    def verified(self) -> bool:
        return all(t.match for t in self.tables) and all(
            m["destination"] >= m["source"] for m in self.id_marks.values())

    def as_dict(self) -> dict[str, Any]:
        return {"source": self.source, "destination": self.destination, "schema_version": self.schema_version,
                "rows": self.rows, "verified": self.verified, "seconds": round(self.seconds, 3),
                "tables": {t.name: t.as_dict() for t in self.tables}, "id_marks": self.id_marks, "changed": True}


_where = shown


def _rows(led: Ledger, table: str, cols: list[str], key: list[str]) -> Iterator[dict[str, Any]]:
    """Every row of ``table`` in batches of BATCH, by primary key (keyset pagination: each batch is an index range
    scan, so a large table is neither held in memory at once nor skipped over again and again)."""
    collist = ", ".join(cols)
    if not key:
        for row in led.conn.execute(f"SELECT {collist} FROM {table}").fetchall():
            yield dict(zip(cols, row))
        return
    order = ", ".join(key)
    first = f"SELECT {collist} FROM {table} ORDER BY {order} LIMIT {BATCH:d}"
    after = (f"SELECT {collist} FROM {table} WHERE ({order}) > ({', '.join('?' * len(key))}) "
             f"ORDER BY {order} LIMIT {BATCH:d}")
    batch = led.conn.execute(first).fetchall()
    while batch:
        for row in batch:
            yield dict(zip(cols, row))
        if len(batch) < BATCH:
            return
        last = dict(zip(cols, batch[-1]))
        batch = led.conn.execute(after, [last[k] for k in key]).fetchall()


def _order(led: Ledger, tables: list[str]) -> list[str]:
    """The tables, each after those it references (foreign keys from the catalog)."""
    parents = {t: [p for p in _names(led, "parents", t) if p != t and p in tables] for t in tables}
    done: list[str] = []

    def visit(t: str, path: tuple[str, ...]) -> None:
        if t in done or t in path:
            return
        for p in parents[t]:
            visit(p, (*path, t))
        done.append(t)

    for t in tables:
        visit(t, ())
    return done


def seeded_tables() -> dict[str, int]:
    """The tables a new ledger already holds rows in (the migrations' seed) and how many: a new in-memory SQLite
    ledger, migrated, asked. Every other table of a new ledger is empty."""
    conn = sqlite3.connect(":memory:", isolation_level=None)
    try:
        schema.apply(conn, ":memory:", now=0.0)
        names = [r[0] for r in conn.execute(_CATALOG["sqlite"]["tables"]).fetchall()]
        counts = {t: conn.execute(f"SELECT count(*) FROM {t}").fetchone()[0] for t in names}
    finally:
        conn.close()
    return {t: n for t, n in counts.items() if n}


def _id_marks(led: Ledger, tables: list[str], keys: dict[str, list[str]]) -> dict[str, tuple[int, int]]:
    """(highest id held, high-water mark) of each table whose ids the ledger hands out: the mark is the largest id
    it holds or ever handed out (SQLite: ``sqlite_sequence``; PostgreSQL: its identity sequence, which also moves
    for a transaction that was rolled back)."""
    marks: dict[str, tuple[int, int]] = {}
    handed_out = id_tables()
    for t in tables:
        if keys.get(t) != ["id"] or t not in handed_out:
            continue
        high = int(led.conn.execute(f"SELECT coalesce(max(id), 0) FROM {t}").fetchone()[0])
        marks[t] = (high, max(high, _sequence(led, t) or 0))
    return marks


def _has_counter(led: Ledger, table: str) -> bool:
    """Whether ``table`` keeps a high-water mark of its ids beside its rows (PostgreSQL's identity sequence,
    SQLite's AUTOINCREMENT); without one (an SQLite rowid table: events) the next id is the highest held + 1, so the
    highest copied id is the mark that matters (no event id is ever deleted from the top: events_no_delete)."""
    if led.dialect == "postgresql":
        return led.conn.execute("SELECT pg_get_serial_sequence(?, 'id')", (table,)).fetchone()[0] is not None
    return led.conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ? "
                            "AND sql LIKE '%AUTOINCREMENT%'", (table,)).fetchone() is not None


def _sequence(led: Ledger, table: str) -> int | None:
    if led.dialect == "postgresql":
        name = led.conn.execute("SELECT pg_get_serial_sequence(?, 'id')", (table,)).fetchone()[0]
        if name is None:
            return None
        return led.conn.execute("SELECT coalesce(pg_sequence_last_value(to_regclass(?)), 0)",
                                (name,)).fetchone()[0]
    try:
        row = led.conn.execute("SELECT seq FROM sqlite_sequence WHERE name = ?", (table,)).fetchone()
    except sqlite3.OperationalError:  # no AUTOINCREMENT table at all: no sqlite_sequence
        return None
    return None if row is None else int(row[0])


def _set_mark(led: Ledger, table: str, mark: int) -> None:
    """Let ``table``'s ids continue past ``mark`` on the destination."""
    if led.dialect == "postgresql":
        name = led.conn.execute("SELECT pg_get_serial_sequence(?, 'id')", (table,)).fetchone()[0]
        if name is not None and mark > 0:
            led.conn.execute("SELECT setval(to_regclass(?), ?, true)", (name, mark))
        return
    if not _has_counter(led, table):
        return  # ids are max(id) + 1: the copied rows carry the mark
    if led.conn.execute("UPDATE sqlite_sequence SET seq = max(seq, ?) WHERE name = ?", (mark, table)).rowcount == 0:
        led.conn.execute("INSERT INTO sqlite_sequence (name, seq) VALUES (?, ?)", (table, mark))


def _checksum(led: Ledger, table: str, cols: list[str], key: list[str], jcols: frozenset[str]) -> _Sum:
    s = _Sum()
    for row in _rows(led, table, cols, key):
        s.add(render(row, jcols))
    return s


def _occupied(led: Ledger, tables: list[str], seeded: dict[str, int]) -> list[str]:
    """The tables of ``led`` that hold rows a new ledger has not (tables the migrations seed: more rows than the
    seed)."""
    out = []
    for t in tables:
        n = led.conn.execute(f"SELECT count(*) FROM {t}").fetchone()[0]
        if n > seeded.get(t, 0):
            out.append(f"{t} ({n - seeded.get(t, 0)} rows)")
    return out


def _not_empty(where: str, occupied: list[str]) -> LanectlError:
    return Conflict(f"{where}: the destination ledger is not empty: {', '.join(occupied)}; nothing was written",
                    "copy into a new ledger: a new SQLite file, or a new database (createdb) for PostgreSQL",
                    "ledger_not_empty")


def _same(src: str | Path, dst: str | Path) -> bool:
    if is_url(src) or is_url(dst):
        return str(src) == str(dst)
    try:
        return os.path.samefile(src, dst)
    except OSError:
        return Path(src).absolute() == Path(dst).absolute()


def copy(source: str | Path, destination: str | Path, *, progress: Progress | None = None,
         busy_timeout_s: float = 30.0) -> CopyResult:
    """Copy the ledger at ``source`` into the new (or empty) ledger at ``destination``, verify, commit; see the
    module's docstring. ``progress`` is told what is being copied (table, rows so far)."""
    src_where, dst_where = _where(source), _where(destination)
    if _same(source, destination):
        raise LanectlError(f"{src_where}: source and destination are the same ledger",
                           "name a new ledger as the destination", "ledger_copy_same", ExitCode.USAGE)
    started = time.monotonic()
    say = progress or (lambda text: None)
    if not is_url(source):
        require_ledger_file(Path(source))  # ledger_missing (exit 6), as every command but init says it
    src = Ledger.open_readonly(source, must_exist=True, timeout_s=busy_timeout_s, check=True)
    try:
        _begin_snapshot(src)
        try:
            version = src.version()
            if version == 0:
                from lanectl.errors import Unavailable

                raise Unavailable(f"{src_where}: no ledger there (no ledger tables)",
                                  "check the source location", "ledger_missing")
            schema.check_not_newer(version, src_where)
            if version != schema.LATEST:
                raise Conflict(f"{src_where}: the source ledger has schema version {version}, this lanectl "
                               f"writes version {schema.LATEST}; nothing was written",
                               f"migrate it first: lanectl ledger migrate --ledger {src_where} (stop its "
                               "supervisor during the copy), then copy again", "ledger_needs_migration")
            return _copy_into(src, source, destination, version, say, started, busy_timeout_s)
        finally:
            _end_snapshot(src)
    finally:
        src.close()


def _begin_snapshot(led: Ledger) -> None:
    if led.dialect == "postgresql":
        led.conn.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
    else:
        led.conn.execute("BEGIN")


def _end_snapshot(led: Ledger) -> None:
    if led.conn.in_transaction:
        led.conn.execute("ROLLBACK")


def _copy_into(src: Ledger, source: str | Path, destination: str | Path, version: int, say: Progress,
               started: float, busy_timeout_s: float) -> CopyResult:
    created_file = not is_url(destination) and not Path(destination).exists()
    try:
        return _write(src, source, destination, version, say, started, busy_timeout_s)
    except BaseException:
        if created_file:  # a file this copy created: nothing of it stays behind
            for p in (Path(destination), Path(f"{destination}-wal"), Path(f"{destination}-shm"),
                      Path(f"{destination}-journal")):
                p.unlink(missing_ok=True)
        raise


def _write(src: Ledger, source: str | Path, destination: str | Path, version: int, say: Progress,
           started: float, busy_timeout_s: float) -> CopyResult:
    src_where, dst_where = _where(source), _where(destination)
    seeded = seeded_tables()
    # look before migrating: a destination that holds anything is refused before anything is written to it
    with Ledger.open(destination, migrate=False, create=True, busy_timeout_s=busy_timeout_s) as peek:
        if peek.version():
            occupied = _occupied(peek, _names(peek, "tables"), seeded)
            if occupied:
                raise _not_empty(dst_where, occupied)
    dst = Ledger.open(destination, migrate=True, create=True, busy_timeout_s=busy_timeout_s)
    try:
        tables = _names(src, "tables")
        dst_tables = _names(dst, "tables")
        if sorted(tables) != sorted(dst_tables):
            raise LanectlError(f"{src_where} and {dst_where} have different tables at schema version {version}: "
                               f"{sorted(set(tables) ^ set(dst_tables))}", "report this as a bug of lanectl",
                               "ledger_schema_mismatch", ExitCode.ERROR)
        jcols = json_columns()
        cols = {t: _names(src, "columns", t) for t in tables}
        for t in tables:
            theirs = _names(dst, "columns", t)
            if sorted(theirs) != sorted(cols[t]):
                raise LanectlError(f"table {t} has columns {cols[t]} in {src_where} but {theirs} in {dst_where}",
                                   "report this as a bug of lanectl", "ledger_schema_mismatch", ExitCode.ERROR)
        keys = {t: _names(src, "key", t) for t in tables}
        order = _order(src, tables)
        order = [t for t in order if t not in seeded] + [t for t in order if t in seeded]
        result = CopyResult(src_where, dst_where, version)
        sums: dict[str, _Sum] = {}
        src_marks = _id_marks(src, tables, keys)
        with dst.transaction():
            occupied = _occupied(dst, tables, seeded)  # again, under the write lock
            if occupied:
                raise _not_empty(dst_where, occupied)
            for t in order:
                sums[t] = _copy_table(src, dst, t, cols[t], keys[t], jcols.get(t, frozenset()), t in seeded, say)
            for t, (_, mark) in src_marks.items():
                _set_mark(dst, t, mark)
            say("verifying the destination")
            for t in order:
                mine = _checksum(dst, t, cols[t], keys[t], jcols.get(t, frozenset()))
                result.tables.append(TableCopy(t, sums[t].rows, sums[t].hexdigest, mine.rows, mine.hexdigest))
            dst_marks = _id_marks(dst, tables, keys)
            result.id_marks = {t: {"source": mark if _has_counter(dst, t) else high,
                                   "destination": dst_marks.get(t, (0, 0))[1]}
                               for t, (high, mark) in src_marks.items()}
            result.tables.sort(key=lambda tc: tc.name)
            if not result.verified:
                bad = [tc for tc in result.tables if not tc.match]
                marks = [t for t, m in result.id_marks.items() if m["destination"] < m["source"]]
                problems = [Problem(f"table {tc.name}: source {tc.rows} rows sha256 {tc.source_sha256}, destination "
                                    f"{tc.destination_rows} rows sha256 {tc.destination_sha256}",
                                    code="ledger_copy_mismatch") for tc in bad]
                problems += [Problem(f"table {t}: ids would restart below the source's high-water mark",
                                     code="ledger_copy_mismatch") for t in marks]
                raise LanectlError(
                    f"{dst_where}: the copy does not match {src_where} "
                    f"({', '.join([tc.name for tc in bad] + marks)}); the destination was rolled back, nothing "
                    "was written", "look for triggers or rules on the destination that change rows; report it "
                    "as a bug of lanectl otherwise", "ledger_copy_mismatch", ExitCode.ERROR, problems)
        result.seconds = time.monotonic() - started
        return result
    finally:
        dst.close()


def _copy_table(src: Ledger, dst: Ledger, table: str, cols: list[str], key: list[str], jcols: frozenset[str],
                seeded: bool, say: Progress) -> _Sum:
    """Copy one table; its source checksum. A seeded table's rows replace the seed's (by primary key)."""
    s = _Sum()
    total = src.conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0]  # in the snapshot: what will come
    say(f"copying {table}: 0/{total} rows")
    insert = f"INSERT INTO {table} ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})"
    rest = [c for c in cols if c not in key]
    update = (f"UPDATE {table} SET {', '.join(f'{c} = ?' for c in rest)} WHERE "
              f"{' AND '.join(f'{k} = ?' for k in key)}") if key and rest else None
    batch: list[dict[str, Any]] = []

    def flush() -> None:
        try:
            if seeded and update is not None:
                for row in batch:
                    if dst.conn.execute(update, [row[c] for c in rest] + [row[k] for k in key]).rowcount == 0:
                        dst.conn.execute(insert, [row[c] for c in cols])
            else:
                dst.conn.executemany(insert, [[row[c] for c in cols] for row in batch])
        except sqlite3.Error as exc:
            raise LanectlError(f"table {table}: the destination refused a row ({exc}); the destination was rolled "
                               "back, nothing was written", "see the message: the destination's engine cannot "
                               "hold this value", "ledger_copy_refused", ExitCode.ERROR) from exc
        say(f"copying {table}: {s.rows}/{total} rows")
        batch.clear()

    for row in _rows(src, table, cols, key):
        s.add(render(row, jcols))
        batch.append(row)
        if len(batch) >= BATCH:
            flush()
    if batch:
        flush()
    # a seed row the source does not hold (no command deletes one) would stay: the verification finds it
    return s

"""The mission ledger: one SQLite file in WAL mode, written only by the supervisor and the operator's CLI.

``Ledger.open(path)`` creates the file (mode 0640, directory 0750), applies pending migrations and refuses a file
that is not SQLite or was written by a newer schema (both ``ExitCode.CONFIG``). Every write goes through
``with ledger.transaction():`` (``BEGIN IMMEDIATE``), so concurrent writers queue on the busy timeout instead of
failing half way; WAL readers keep reading meanwhile.

``synchronous=NORMAL`` is the default (see docs/ledger.md and docs/benchmarks.md): in WAL mode it never corrupts
the file and loses nothing on a process crash; only an OS crash or power cut can lose the last transactions
before a checkpoint. ``FULL`` is available (``Ledger.open(path, synchronous="FULL")``) for boxes that want every
commit on disk before acknowledging it.
"""
from __future__ import annotations

import contextlib
import os
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Final, Literal

from lanectl.errors import ExitCode, LanectlError, Unavailable
from lanectl.ledger import schema

BUSY_TIMEOUT_S: Final = 5.0
"""How long a writer waits for the write lock before giving up with ``ledger_busy`` (exit 6)."""
FILE_MODE: Final = 0o640
DIR_MODE: Final = 0o750
SQLITE_MAGIC: Final = b"SQLite format 3\x00"
Synchronous = Literal["OFF", "NORMAL", "FULL", "EXTRA"]


def _not_sqlite(path: Path, detail: str) -> LanectlError:
    return LanectlError(
        f"{path}: is not an SQLite ledger ({detail})",
        "point --ledger/LANECTL_LEDGER at a lanectl ledger, or move the file away so a new one is created",
        "ledger_not_sqlite",
        ExitCode.CONFIG,
    )


class Ledger:
    """An open ledger connection (autocommit; explicit transactions only)."""

    def __init__(self, conn: sqlite3.Connection, path: Path) -> None:
        self.conn = conn
        self.path = path
        self._depth = 0

    @classmethod
    def open(cls, path: str | Path, *, synchronous: Synchronous = "NORMAL",
             busy_timeout_s: float = BUSY_TIMEOUT_S, migrate: bool = True) -> Ledger:
        path = Path(path)
        _prepare_file(path)
        try:
            conn = sqlite3.connect(str(path), isolation_level=None, timeout=busy_timeout_s,
                                   check_same_thread=False)
        except sqlite3.Error as exc:
            raise Unavailable(f"{path}: cannot open the ledger: {exc}", "check the path and its permissions",
                              "ledger_unavailable") from exc
        try:
            conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout_s * 1000):d}")
            mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise Unavailable(f"{path}: cannot switch the ledger to WAL (got {mode})",
                                  "put the ledger on a local file system", "ledger_unavailable")
            conn.execute(f"PRAGMA synchronous = {synchronous}")
            conn.execute("PRAGMA foreign_keys = ON")
            if migrate:
                schema.apply(conn, str(path))
            else:
                schema.pending(conn, str(path))
        except sqlite3.DatabaseError as exc:
            conn.close()
            if "not a database" in str(exc) or "malformed" in str(exc):
                raise _not_sqlite(path, str(exc)) from exc
            raise _busy(path, exc) from exc
        except BaseException:
            conn.close()
            raise
        with contextlib.suppress(OSError):
            os.chmod(path, FILE_MODE)
        return cls(conn, path)

    def close(self) -> None:
        self.conn.close()

    def __enter__(self) -> Ledger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextlib.contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """``BEGIN IMMEDIATE`` ... ``COMMIT`` (or ROLLBACK on error); nested calls become savepoints."""
        if self._depth:
            name = f"sp{self._depth}"
            self.conn.execute(f"SAVEPOINT {name}")
            self._depth += 1
            try:
                yield self.conn
            except BaseException:
                if self.conn.in_transaction:  # SQLite may have rolled back already (disk full, I/O error)
                    self.conn.execute(f"ROLLBACK TO {name}")
                    self.conn.execute(f"RELEASE {name}")
                raise
            else:
                self.conn.execute(f"RELEASE {name}")
            finally:
                self._depth -= 1
            return
        try:
            self.conn.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as exc:
            raise _busy(self.path, exc) from exc
        self._depth = 1
        try:
            yield self.conn
        except BaseException:
            self._depth = 0
            if self.conn.in_transaction:  # SQLite may have rolled back already (disk full, I/O error)
                self.conn.execute("ROLLBACK")
            raise
        self._depth = 0
        try:
            self.conn.execute("COMMIT")
        except sqlite3.OperationalError as exc:
            if self.conn.in_transaction:
                self.conn.execute("ROLLBACK")
            raise _busy(self.path, exc) from exc

    def query(self, sql: str, params: tuple[Any, ...] | list[Any] = ()) -> list[dict[str, Any]]:
        cur = self.conn.execute(sql, params)
        cols = [d[0] for d in cur.description or ()]
        return [dict(zip(cols, row)) for row in cur.fetchall()]

    def version(self) -> int:
        return schema.current_version(self.conn)


def _busy(path: Path, exc: Exception) -> LanectlError:
    if "full" in str(exc).lower():
        return Unavailable(f"{path}: the disk holding the ledger is full ({exc})",
                           "free space on that filesystem; nothing was written, retry afterwards", "ledger_full")
    return Unavailable(f"{path}: the ledger is busy or unavailable ({exc})",
                       "another writer held it past the busy timeout; retry", "ledger_busy")


def _prepare_file(path: Path) -> None:
    """Create the directory (0750) and the file (0640) before SQLite does, so no umask can widen them."""
    if path.is_dir():
        raise _not_sqlite(path, "it is a directory")
    if not path.parent.exists():
        path.parent.mkdir(parents=True, mode=DIR_MODE, exist_ok=True)
        with contextlib.suppress(OSError):
            os.chmod(path.parent, DIR_MODE)
    if path.exists():
        with path.open("rb") as fh:
            head = fh.read(len(SQLITE_MAGIC))
        if head and head != SQLITE_MAGIC:
            raise _not_sqlite(path, "no SQLite header")
        return
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, FILE_MODE)
        os.close(fd)
        os.chmod(path, FILE_MODE)
    except FileExistsError:
        pass
    except OSError as exc:
        raise Unavailable(f"{path}: cannot create the ledger: {exc.strerror}",
                          "check that the directory exists and is writable by lanectl", "ledger_unavailable") from exc

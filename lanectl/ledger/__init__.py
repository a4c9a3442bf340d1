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

    def __init__(self, conn: sqlite3.Connection, path: Path, busy_timeout_s: float = BUSY_TIMEOUT_S,
                 busy_poll: bool = True) -> None:
        self.conn = conn
        self.path = path
        self._depth = 0
        self._busy_timeout_ms = int(busy_timeout_s * 1000)
        self._busy_poll = busy_poll

    @classmethod
    def open(cls, path: str | Path, *, synchronous: Synchronous = "NORMAL",
             busy_timeout_s: float = BUSY_TIMEOUT_S, migrate: bool = True, autocheckpoint: bool = True,
             busy_poll: bool = True) -> Ledger:
        """Open (create, migrate) the ledger. ``autocheckpoint=False`` leaves WAL checkpoints to a
        ``Checkpointer`` (the supervisor), so no commit of this connection ever pays for one. ``busy_poll=False``
        waits for the write lock with SQLite's own busy handler instead of ``_begin``'s (for comparisons)."""
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
            if not autocheckpoint:
                conn.execute("PRAGMA wal_autocheckpoint = 0")
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
        return cls(conn, path, busy_timeout_s, busy_poll)

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
        self._begin()
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

    def _begin(self) -> None:
        """``BEGIN IMMEDIATE``, waiting for the write lock at most the busy timeout.

        SQLite's busy handler sleeps 1, 2, 5, 10, 15, 20, 25 ... 100 ms between attempts, so with a few writers a
        waiter often sleeps through several releases of the lock: measured here, one-mission submits beside the
        supervisor's loop had a p99 of 19-55 ms and maxima of 80-230 ms for writes that hold the lock about a
        millisecond (docs/benchmarks.md, writer fairness). This polls instead, with short jittered sleeps (50 us
        doubling to 2 ms), so a waiter takes the lock within about 2 ms of its release. Statements other than
        BEGIN keep SQLite's handler (busy_timeout): in WAL mode they are not expected to wait.
        """
        if not self._busy_poll:
            try:
                self.conn.execute("BEGIN IMMEDIATE")
            except sqlite3.OperationalError as exc:
                raise _busy(self.path, exc) from exc
            return
        import random
        import time

        deadline = 0.0
        pause = 0.00005
        self.conn.execute("PRAGMA busy_timeout = 0")
        try:
            while True:
                try:
                    self.conn.execute("BEGIN IMMEDIATE")
                    return
                except sqlite3.OperationalError as exc:
                    if "locked" not in str(exc) and "busy" not in str(exc):
                        raise _busy(self.path, exc) from exc
                    if not deadline:
                        deadline = time.monotonic() + self._busy_timeout_ms / 1000
                    elif time.monotonic() >= deadline:
                        raise _busy(self.path, exc) from exc
                time.sleep(random.uniform(pause / 2, pause))
                pause = min(pause * 2, 0.002)
        finally:
            self.conn.execute(f"PRAGMA busy_timeout = {self._busy_timeout_ms:d}")

    def query(self, sql: str, params: tuple[Any, ...] | list[Any] = ()) -> list[dict[str, Any]]:
        cur = self.conn.execute(sql, params)
        cols = [d[0] for d in cur.description or ()]
        return [dict(zip(cols, row)) for row in cur.fetchall()]

    def version(self) -> int:
        return schema.current_version(self.conn)


class Checkpointer:
    """Checkpoints the WAL off the dispatch path: a thread with its own connection runs a PASSIVE checkpoint
    every ``interval`` seconds.

    By default SQLite checkpoints inside the commit that pushes the WAL past 1000 pages: that commit copies the WAL
    into the database file and syncs it. In the supervisor that commit is a dispatch decision, and it set the p99
    of one (under 1 ms otherwise) to about 4 ms (docs/benchmarks.md). The supervisor therefore opens the ledger with
    ``autocheckpoint=False`` and runs this thread. A PASSIVE checkpoint never blocks writers or readers; SQLite
    releases the GIL while it runs. Other writers (the CLI) keep automatic checkpoints, so the WAL stays bounded
    even when the supervisor is down.
    """

    def __init__(self, path: str | Path, *, interval: float = 1.0) -> None:
        import threading

        self.path = Path(path)
        self.interval = interval
        self.checkpoints = 0
        self.frames = 0
        self.errors = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="ledger-checkpoint", daemon=True)

    def start(self) -> Checkpointer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10)

    def _run(self) -> None:
        conn: sqlite3.Connection | None = None
        try:
            while True:
                stopping = self._stop.wait(self.interval)
                try:
                    if conn is None:
                        conn = sqlite3.connect(self.path.resolve().as_uri() + "?mode=rw", uri=True,
                                               isolation_level=None, timeout=BUSY_TIMEOUT_S)  # never creates it
                    self.checkpoint(conn)
                except sqlite3.Error:
                    self.errors += 1  # disk full, I/O error, cannot open: try again next round
                if stopping:
                    return
        finally:
            if conn is not None:
                conn.close()

    def checkpoint(self, conn: sqlite3.Connection) -> None:
        """One PASSIVE checkpoint; raises sqlite3.Error (the loop counts it and tries again next round)."""
        _, log_frames, _ = conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        self.checkpoints += 1
        self.frames = max(0, log_frames)


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

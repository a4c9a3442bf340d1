"""The mission ledger: one SQLite file in WAL mode (the default) or a PostgreSQL database (``lanectl.ledger.pg``), written only by the supervisor and the operator's CLI.

``Ledger.open(path)`` creates the file (mode 0640, directory 0750), applies pending migrations and refuses a file
that is not SQLite or was written by a newer schema (both ``ExitCode.CONFIG``). Every write goes through
``with ledger.transaction():`` (``BEGIN IMMEDIATE``), so concurrent writers queue on the busy timeout instead of
failing half way; WAL readers keep reading meanwhile.

``synchronous=FULL`` is the default (docs/ledger.md): in WAL mode every COMMIT syncs the WAL before it returns, so
a mission id returned by ``submit`` (exit 0) or an outcome acknowledged to a lane is on disk and survives a power
cut. ``[ledger] synchronous = "NORMAL"`` in lanectl.toml (``config.open_ledger``) trades that for speed: NORMAL
never corrupts the file and loses nothing on a process crash, but an OS crash or power cut can lose the last
transactions before a checkpoint. Every connection also sets ``journal_size_limit`` (``WAL_SIZE_LIMIT``), so the
WAL file shrinks back to that size each time a checkpoint lets it restart.

SQLite errors that mean the environment is wrong are turned into ``LanectlError``s with their own code, message
(naming the ledger file) and fix by ``ledger_error()``: busy, disk full, read-only, no permission, corrupt, I/O.
"""
from __future__ import annotations

import contextlib
import os
import stat
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Final, Literal, get_args

from lanectl.errors import ExitCode, LanectlError, Unavailable

BUSY_TIMEOUT_S: Final = 5.0
"""How long a writer waits for the write lock before giving up with ``ledger_busy`` (exit 6)."""
FILE_MODE: Final = 0o640
DIR_MODE: Final = 0o750
Synchronous = Literal["OFF", "NORMAL", "FULL", "EXTRA"]
DEFAULT_SYNCHRONOUS: Final[Synchronous] = "FULL"
"""Every commit is on disk before it returns (docs/ledger.md, durability); ``[ledger] synchronous`` changes it."""
WAL_SIZE_LIMIT: Final = 16 * 1024 * 1024
"""``PRAGMA journal_size_limit``: whenever a checkpoint lets the WAL restart, it is truncated to at most this."""


def _not_sqlite(path: Path, detail: str) -> LanectlError:
    return LanectlError(
        f"{path}: is not an SQLite ledger ({detail})",
        "point --ledger/LANECTL_LEDGER at a lanectl ledger, or move the file away so a new one is created",
        "ledger_not_sqlite",
        ExitCode.CONFIG,
    )


Error = sqlite3.Error
"""What a read of the ledger raises when the file cannot be read as one (not SQLite, not a ledger, locked past
the timeout, gone): readers outside this package catch ``(OSError, lanectl.ledger.Error)`` and never import
sqlite3 themselves."""


class Ledger:
    """An open ledger connection (autocommit; explicit transactions only)."""

    def __init__(self, conn: sqlite3.Connection, path: Path, busy_timeout_s: float = BUSY_TIMEOUT_S,
                 busy_poll: bool = True, dialect: str = "sqlite") -> None:
        self.conn = conn
        self.path = path
        self.dialect = dialect
        self._seen_event = 0  # PostgreSQL's data_version: the newest event id this connection knows of
        self._others = 0
        """``sqlite`` or ``postgresql`` (a ``postgresql://`` location: ``conn`` is a ``lanectl.ledger.pg.PgConn``)."""
        self._depth = 0
        self._busy_timeout_ms = int(busy_timeout_s * 1000)
        self._busy_poll = busy_poll
        self.readonly = False
        self.role: str | None = None
        """PostgreSQL: the connection's ``application_name`` (None: ``pg.ROLE``), kept for ``reconnect``."""
        self._offset = 0.0  # PostgreSQL: the server's clock minus this host's (``clock``)
        self._offset_at = float("-inf")  # time.monotonic() when ``_offset`` was measured

    @classmethod
    def open(cls, path: str | Path, *, synchronous: Synchronous = DEFAULT_SYNCHRONOUS,
             busy_timeout_s: float = BUSY_TIMEOUT_S, migrate: bool = True, autocheckpoint: bool = True,
             busy_poll: bool = True, create: bool = True, role: str | None = None) -> Ledger:
        """Open (create, migrate) the ledger. ``create=False`` refuses a file that does not exist
        (``ledger_missing``, exit 6) instead of creating it: the CLI passes it everywhere but ``install`` and
        ``ledger init``, so a mistyped ``--ledger`` path is an error rather than a new, empty ledger. ``autocheckpoint=False`` leaves WAL checkpoints to a
        ``Checkpointer`` (the supervisor), so no commit of this connection ever pays for one. ``busy_poll=False``
        waits for the write lock with SQLite's own busy handler instead of ``_begin``'s (for comparisons). ``role``
        names a PostgreSQL connection (``application_name``, default ``pg.ROLE``); SQLite ignores it."""
        from lanectl.ledger import schema  # here, not at the top: a read-only open (the probe) never needs it

        if _is_url(path):
            return cls._open_pg(str(path), busy_timeout_s=busy_timeout_s, migrate=migrate, create=create, role=role)
        path = Path(path)
        check_synchronous(synchronous)
        if not create:
            _require_file(path)
        _prepare_file(path)
        try:
            conn = sqlite3.connect(str(path), isolation_level=None, timeout=busy_timeout_s,
                                   check_same_thread=False)
        except sqlite3.Error as exc:
            raise ledger_error(path, exc) or Unavailable(
                f"{path}: cannot open the ledger: {exc}", "check the path and its permissions",
                "ledger_unavailable") from exc
        try:
            conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout_s * 1000):d}")
            if conn.execute("PRAGMA page_count").fetchone()[0] == 0:
                # a new ledger: pages freed by a prune go back to the file system in short steps (retention.py);
                # only possible before the first table exists
                conn.execute("PRAGMA auto_vacuum = INCREMENTAL")
            mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise Unavailable(f"{path}: cannot switch the ledger to WAL (got {mode})",
                                  "put the ledger on a local file system", "ledger_unavailable")
            conn.execute(f"PRAGMA synchronous = {synchronous}")
            conn.execute(f"PRAGMA journal_size_limit = {WAL_SIZE_LIMIT:d}")
            conn.execute("PRAGMA foreign_keys = ON")
            if not autocheckpoint:
                conn.execute("PRAGMA wal_autocheckpoint = 0")
            if migrate:
                schema.apply(conn, str(path))
            else:
                schema.pending(conn, str(path))
        except sqlite3.DatabaseError as exc:
            conn.close()
            if _code(exc) == sqlite3.SQLITE_NOTADB:
                raise _not_sqlite(path, str(exc)) from exc
            raise ledger_error(path, exc) or _other(path, exc) from exc
        except BaseException:
            conn.close()
            raise
        with contextlib.suppress(OSError):
            os.chmod(path, FILE_MODE)
        global _last_opened
        _last_opened = path
        led = cls(conn, path, busy_timeout_s, busy_poll)
        return led

    @classmethod
    def open_readonly(cls, path: str | Path, *, timeout_s: float = BUSY_TIMEOUT_S, must_exist: bool = False,
                      check: bool = False, any_thread: bool = False) -> Ledger:
        """A read-only handle on the ledger (SQLite URI ``mode=ro``): it never creates, migrates or writes the file,
        and a WAL reader never blocks the writers. What the probe, ``status``, ``top``, metrics, events, the
        report and snapshots read through. ``must_exist`` raises FileNotFoundError for a path that is no file
        (instead of SQLite's "unable to open"); ``check`` reads one row of ``missions`` so that a file that is
        not a ledger fails here (``Error``) rather than at the first query; ``any_thread`` lets another thread
        use the connection (``top`` reads from its refresh thread). Nothing else is set: no PRAGMA, no
        migration check, so the probe's read costs what it did when it opened the file itself."""
        if _is_url(path):
            return cls._open_pg(str(path), busy_timeout_s=timeout_s, migrate=False, readonly=True, check=check)
        if must_exist:
            try:
                st = os.stat(path)
            except PermissionError:  # a directory on the way this user may not search: not "missing"
                raise PermissionError(f"ledger {path}: permission denied (read it as root, or give this user read "
                                      "access to the ledger and its directory)") from None
            except FileNotFoundError:
                raise FileNotFoundError(f"ledger {path} does not exist") from None
            if not stat.S_ISREG(st.st_mode):
                raise FileNotFoundError(f"ledger {path} is not a file")
            if not os.access(path, os.R_OK):
                raise PermissionError(f"ledger {path}: permission denied (read it as root, or give this user read "
                                      "access to the ledger and its directory)")
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=timeout_s, check_same_thread=not any_thread)
        if check:
            try:
                conn.execute("SELECT 1 FROM missions LIMIT 1").fetchall()  # not SQLite / not a ledger -> Error
            except BaseException:
                conn.close()
                raise
        return cls(conn, Path(path))

    @classmethod
    def _open_pg(cls, url: str, *, busy_timeout_s: float, migrate: bool, readonly: bool = False,
                 check: bool = False, create: bool = True, role: str | None = None) -> Ledger:
        """A PostgreSQL ledger (issue 12): connect, then migrate (or only refuse a newer schema). ``create=False``
        refuses a database without the ledger's tables (``ledger_missing``), as it refuses a missing file."""
        from lanectl.ledger import pg, schema

        conn = pg.connect(url, busy_timeout_s=busy_timeout_s, readonly=readonly, role=role)
        try:
            if not create and schema.pg_current_version(conn) == 0:
                raise Unavailable(
                    f"{pg.redact(url)}: no ledger there (the database has no ledger tables)",
                    "check --ledger / LANECTL_LEDGER / ledger= in lanectl.toml for a typo; 'lanectl install' creates "
                    "the configured ledger, 'lanectl ledger init' creates one explicitly", "ledger_missing")
            if migrate:
                schema.pg_apply(conn, pg.redact(url))
            elif check or not readonly:
                schema.pg_pending(conn, pg.redact(url))
        except BaseException as exc:
            conn.close()
            mapped = pg.ledger_error(url, exc.__cause__ or exc) if isinstance(exc, Error) else None
            if mapped is not None:
                raise mapped from exc
            raise
        led = cls(conn, url, busy_timeout_s, dialect="postgresql")  # type: ignore[arg-type]
        led.readonly, led.role = readonly, role
        return led

    def close(self) -> None:
        self.conn.close()

    CLOCK_REFRESH_S = 30.0
    """PostgreSQL: how often ``clock`` measures the server's clock again (and at every ``reconnect``)."""

    def clock(self) -> float:
        """The ledger's clock in epoch seconds: what leases, deadlines and event times are measured on.

        SQLite: this host's ``time.time()``. PostgreSQL: the database server's clock, as this host's clock plus an
        offset measured at connect and again every CLOCK_REFRESH_S (outside a transaction) and on ``reconnect``
        (``pg.server_offset``), so that hosts whose clocks disagree write leases and event times that agree. A
        measurement that fails keeps the last offset (the next write reports the broken connection)."""
        import time

        if self.dialect != "postgresql":
            return time.time()
        if time.monotonic() - self._offset_at >= self.CLOCK_REFRESH_S and not self.conn.in_transaction:
            self._measure_clock()
        return time.time() + self._offset

    def _measure_clock(self) -> None:
        import time

        from lanectl.ledger import pg

        try:
            self._offset = pg.server_offset(self.conn)  # type: ignore[arg-type]
        except Exception:
            pass  # the connection is broken: the caller's next statement says so (ledger_unavailable)
        self._offset_at = time.monotonic()

    def reconnect(self) -> None:
        """Drop a broken PostgreSQL connection and open a new one with the same settings (role, read-only, busy
        timeout; no migration); the server's clock is measured again. Raises ``ledger_unavailable`` (exit 6) when
        the server cannot be reached yet. SQLite: nothing to do (a file needs no reconnect)."""
        if self.dialect != "postgresql":
            return
        from lanectl.ledger import pg

        with contextlib.suppress(Exception):
            self.conn.close()
        self._depth = 0
        self.conn = pg.connect(str(self.path), busy_timeout_s=self._busy_timeout_ms / 1000,  # type: ignore[assignment]
                               readonly=self.readonly, role=self.role)
        self._offset_at = float("-inf")

    def broken(self) -> bool:
        """PostgreSQL: whether this connection is gone (the server restarted or terminated it), without a round
        trip; a long-lived holder (``lanectl.client.Client``) then opens a new one. SQLite: never."""
        if self.dialect != "postgresql":
            return False
        raw = self.conn.raw  # type: ignore[attr-defined]
        return bool(raw.closed or raw.broken)

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
        except BaseException as exc:
            self._depth = 0
            self._rollback()
            mapped = self._error(exc) if isinstance(exc, sqlite3.Error) else None
            if mapped is not None:
                raise mapped from exc
            raise
        self._depth = 0
        try:
            if self.dialect == "postgresql":
                # under the write lock the newest event is this transaction's or older; the one notification of
                # this transaction goes out with it (delivered at COMMIT: lanectl.wakeup.PgListener)
                own = self._notify_commit()
            self.conn.execute("COMMIT")  # with synchronous=FULL, the WAL is on disk when this returns
        except sqlite3.Error as exc:
            self._rollback()
            raise self._error(exc) or _other(self.path, exc) from exc
        if self.dialect == "postgresql":
            self._seen_event = own

    def _rollback(self) -> None:
        """End a failed transaction, if one is still open (SQLite may have rolled back already: disk full, I/O
        error). On PostgreSQL a ROLLBACK that fails means the connection is gone, and the server rolled the
        transaction back itself: the error that broke it is the one to report, not this one."""
        if not self.conn.in_transaction:
            return
        try:
            self.conn.execute("ROLLBACK")
        except sqlite3.Error:
            if self.dialect != "postgresql":
                raise

    def _error(self, exc: BaseException) -> LanectlError | None:
        if self.dialect == "postgresql":
            from lanectl.ledger import pg

            return pg.ledger_error(str(self.path), exc.__cause__ or exc)
        return ledger_error(self.path, exc)

    def _begin(self) -> None:
        """``BEGIN IMMEDIATE``, waiting for the write lock at most the busy timeout.

        SQLite's busy handler sleeps 1, 2, 5, 10, 15, 20, 25 ... 100 ms between attempts, so with a few writers a
        waiter often sleeps through several releases of the lock: measured here, one-mission submits beside the
        supervisor's loop had a p99 of 19-55 ms and maxima of 80-230 ms for writes that hold the lock about a
        millisecond (docs/benchmarks.md, writer fairness). This polls instead, with short jittered sleeps (50 us
        doubling to 2 ms), so a waiter takes the lock within about 2 ms of its release. Statements other than
        BEGIN keep SQLite's handler (busy_timeout): in WAL mode they are not expected to wait.
        """
        if self.dialect == "postgresql":
            from lanectl.ledger import pg

            try:
                pg.begin(self.conn)  # type: ignore[arg-type]
                if self._newest_event() != self._seen_event:  # others committed since this connection looked
                    self._others += 1
            except sqlite3.Error as exc:
                self._rollback()
                raise self._error(exc) or _other(self.path, exc) from exc
            return
        if not self._busy_poll:
            try:
                self.conn.execute("BEGIN IMMEDIATE")
            except sqlite3.OperationalError as exc:
                raise ledger_error(self.path, exc) or _other(self.path, exc) from exc
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
                    if _code(exc) not in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED):
                        raise ledger_error(self.path, exc) or _other(self.path, exc) from exc
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

    def data_version(self) -> int:
        """``PRAGMA data_version``: changes when another connection committed to the file since this one last
        looked (the supervisor's loop ticks on it when it has no inotify watch or one was missed). PostgreSQL has no
        such counter: there it counts the times the newest event id (every write of the ledger appends an event)
        moved other than by this connection's own commits (each of which notes the id it left)."""
        if self.dialect == "postgresql":
            newest = self._newest_event()
            if newest != self._seen_event:
                self._seen_event = newest
                self._others += 1
            return self._others
        return self.conn.execute("PRAGMA data_version").fetchone()[0]

    def _notify_commit(self) -> int:
        from lanectl.ledger import pg

        if self.readonly:
            return self._newest_event()
        return int(self.conn.execute(pg.NOTIFY_COMMIT).fetchone()[0])

    def _newest_event(self) -> int:
        return int(self.conn.execute("SELECT coalesce(max(id), 0) FROM events").fetchone()[0])

    def version(self) -> int:
        from lanectl.ledger import schema

        if self.dialect == "postgresql":
            return schema.pg_current_version(self.conn)
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

    def __init__(self, path: str | Path, *, interval: float = 1.0,
                 synchronous: Synchronous = DEFAULT_SYNCHRONOUS) -> None:
        import threading

        self.path = Path(path)
        self.synchronous = check_synchronous(synchronous)
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
                        conn.execute(f"PRAGMA synchronous = {self.synchronous}")  # FULL/NORMAL: syncs the database
                        conn.execute(f"PRAGMA journal_size_limit = {WAL_SIZE_LIMIT:d}")
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


_last_opened: Path | None = None


def _is_url(value: object) -> bool:
    """A ``postgresql://`` location (``lanectl.ledgerurl.is_url``, without importing it on the fast path)."""
    return isinstance(value, str) and value.startswith(("postgresql://", "postgres://"))


def last_opened() -> Path:
    """The ledger this process opened last (names the file in errors raised outside a ``Ledger`` method)."""
    return _last_opened or Path("ledger")


def check_synchronous(value: str) -> Synchronous:
    """The value goes into a PRAGMA: only SQLite's four names pass."""
    if value not in get_args(Synchronous):
        raise LanectlError(f"synchronous={value!r} is not one of {', '.join(get_args(Synchronous))}",
                           "set [ledger] synchronous in lanectl.toml to FULL (the default) or NORMAL",
                           "bad_synchronous", ExitCode.CONFIG)
    return value  # type: ignore[return-value]


def _code(exc: BaseException) -> int | None:
    """The primary SQLite result code of an sqlite3 error (extended codes carry it in the low byte)."""
    code = getattr(exc, "sqlite_errorcode", None)
    return None if code is None else code & 0xFF


def _fs_full(path: Path) -> bool:
    """Whether the file system holding the ledger has no space (or inodes) left for this user."""
    for where in (path, path.parent):
        try:
            st = os.statvfs(where)
        except OSError:
            continue
        return st.f_bavail * st.f_frsize < 64 * 1024 or (st.f_files > 0 and st.f_favail == 0)
    return False


def _fs_readonly(path: Path) -> bool:
    for where in (path, path.parent):
        try:
            return bool(os.statvfs(where).f_flag & os.ST_RDONLY)
        except OSError:
            continue
    return False


def _owner_hint(path: Path) -> str:
    try:
        st = path.stat()
    except OSError:
        try:
            st = path.parent.stat()
        except OSError:
            return "run lanectl as root or as the ledger's owner"
    import pwd

    try:
        owner = pwd.getpwuid(st.st_uid).pw_name
    except KeyError:
        owner = f"uid {st.st_uid}"
    return f"run lanectl as root or as the ledger's owner ({owner}), e.g. with sudo"


def full_error(path: Path, detail: object) -> LanectlError:
    return Unavailable(f"{path}: the file system holding the ledger is full ({detail}); nothing was written",
                       "free space on that file system (or move the ledger), then retry", "ledger_full")


def readonly_error(path: Path, detail: object) -> LanectlError:
    # this user lacks the access (the command needs root or the ledger's owner): exit 6, like permission_denied;
    # a read-only mount or file is the host's state, which retrying cannot change: exit 3
    code = ExitCode.UNAVAILABLE
    if _fs_readonly(path):
        why, fix = "is on a read-only file system", "remount it read-write (or move the ledger), then retry"
        code = ExitCode.CONFIG
    elif os.geteuid() != 0 and path.exists() and not os.access(path, os.W_OK):
        why, fix = "is not writable by this user", _owner_hint(path)
    elif os.geteuid() != 0 and not os.access(path.parent, os.W_OK):
        why, fix = "is in a directory this user cannot write (SQLite needs its -wal and -shm files)", _owner_hint(path)
    else:
        why, fix = "is read-only", "make the file (and its -wal/-shm files and directory) writable by lanectl"
        code = ExitCode.CONFIG
    return LanectlError(f"{path}: the ledger {why} ({detail}); nothing was written", fix, "ledger_readonly", code)


def permission_error(path: Path, detail: object) -> LanectlError:
    return LanectlError(f"{path}: no permission to open the ledger ({detail})", _owner_hint(path),
                        "ledger_permission", ExitCode.UNAVAILABLE)


def ledger_error(path: Path, exc: BaseException) -> LanectlError | None:
    """The LanectlError an SQLite (or OS) error on the ledger means, or None when it is not one of these.

    | code | when | exit |
    | ledger_busy | the write lock was held past the busy timeout (SQLITE_BUSY/LOCKED) | 6 |
    | ledger_full | SQLITE_FULL, or an I/O error while the file system has no space left (ENOSPC) | 6 |
    | ledger_io_error | any other I/O error (SQLITE_IOERR) | 6 |
    | ledger_readonly | SQLITE_READONLY, EROFS: read-only mount (3), or the file is not writable by this user (6) | 3/6 |
    | ledger_permission | EACCES / SQLITE_PERM / SQLITE_CANTOPEN for want of permission (run as root) | 6 |
    | ledger_corrupt | SQLITE_CORRUPT | 3 |
    """
    import errno

    if isinstance(exc, LanectlError):
        return exc
    if isinstance(exc, OSError):
        if exc.errno == errno.ENOSPC or exc.errno == errno.EDQUOT:
            return full_error(path, exc.strerror)
        if exc.errno == errno.EROFS:
            return readonly_error(path, exc.strerror)
        if exc.errno in (errno.EACCES, errno.EPERM):
            return permission_error(path, exc.strerror)
        return None
    code = _code(exc)
    if code is None:
        return None
    if code in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED):
        return _busy(path, exc)
    if code == sqlite3.SQLITE_FULL or (code == sqlite3.SQLITE_IOERR and _fs_full(path)):
        return full_error(path, exc)
    if code == sqlite3.SQLITE_READONLY:
        return readonly_error(path, exc)
    if code in (sqlite3.SQLITE_PERM, sqlite3.SQLITE_AUTH) or (
            code == sqlite3.SQLITE_CANTOPEN and _no_access(path)):
        return permission_error(path, exc)
    if code == sqlite3.SQLITE_CANTOPEN and _fs_readonly(path):
        return readonly_error(path, exc)
    if code == sqlite3.SQLITE_CORRUPT:
        return LanectlError(f"{path}: the ledger file is corrupt ({exc})",
                            "stop the supervisor, copy the file aside, and recover it (docs/runbooks.md); "
                            "'sqlite3 ledger.db .recover' salvages what is readable", "ledger_corrupt",
                            ExitCode.CONFIG)
    if code == sqlite3.SQLITE_NOTADB:
        return _not_sqlite(path, str(exc))
    if code == sqlite3.SQLITE_IOERR:
        return Unavailable(f"{path}: I/O error on the ledger ({exc}); the transaction was rolled back",
                           "check the disk and the kernel log (dmesg), then retry", "ledger_io_error")
    return None


def _no_access(path: Path) -> bool:
    if os.geteuid() == 0:
        return False
    return (path.exists() and not os.access(path, os.R_OK)) or not os.access(path.parent, os.X_OK)


def _other(path: Path, exc: Exception) -> LanectlError:
    return Unavailable(f"{path}: the ledger cannot be used ({exc}); nothing was written",
                       "check the file, its directory and the disk; then retry", "ledger_unavailable")


def _busy(path: Path, exc: Exception) -> LanectlError:
    return Unavailable(f"{path}: the ledger is busy ({exc})",
                       "another writer held the write lock past the busy timeout; retry", "ledger_busy")


def _require_file(path: Path) -> None:
    try:
        os.stat(path)
    except FileNotFoundError:
        raise Unavailable(
            f"{path}: no ledger there",
            "check --ledger / LANECTL_LEDGER / ledger= in lanectl.toml for a typo; 'lanectl install' creates the "
            "configured ledger, 'lanectl ledger init' creates one explicitly", "ledger_missing") from None
    except OSError:
        pass  # no permission and the like: opening it reports that with its own code


require_ledger_file = _require_file
"""``ledger_missing`` (exit 6) when nothing is at ``path`` (for a caller that must check before it opens)."""


def _prepare_file(path: Path) -> None:
    """Create the directory (0750) and the file (0640) before SQLite does, so no umask can widen them."""
    try:
        _create_file(path)
    except OSError as exc:
        raise ledger_error(path, exc) or Unavailable(
            f"{path}: cannot create the ledger: {exc.strerror}",
            "check that the directory exists and is writable by lanectl", "ledger_unavailable") from exc


def _create_file(path: Path) -> None:
    try:
        st = os.stat(path)  # raises PermissionError (EACCES) for a directory we cannot search, unlike exists()
    except FileNotFoundError:
        st = None
    if st is not None:
        import stat

        if stat.S_ISDIR(st.st_mode):
            raise _not_sqlite(path, "it is a directory")
        # Never open the file here to look at its header: closing any descriptor of a file releases every POSIX
        # lock this process holds on it, including those of its SQLite connections (the supervisor opens its
        # Checkpointer's after its own, producers open a ledger per Client). Another process could then take the
        # ledger for unused, checkpoint and delete the WAL under live connections: acknowledged commits lost,
        # later "database disk image is malformed" (found by issue 16's supervisor_outage chaos fault).
        # SQLite checks the header itself: SQLITE_NOTADB is ledger_not_sqlite (Ledger.open).
        return
    if not path.parent.exists():
        path.parent.mkdir(parents=True, mode=DIR_MODE, exist_ok=True)
        with contextlib.suppress(OSError):
            os.chmod(path.parent, DIR_MODE)
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, FILE_MODE)
        os.close(fd)
        os.chmod(path, FILE_MODE)
    except FileExistsError:
        pass

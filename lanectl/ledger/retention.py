"""Retention: archive finished history older than a cutoff to a compressed JSON-lines file, then delete it.

``prune(led, cutoff=..., archive=PATH)`` (``lanectl ledger prune --older-than 30d --archive PATH``, and the
supervisor by itself with ``[ledger] retention``) works in three phases:

1. **Archive.** Every finished mission (succeeded, failed, cancelled, expired, dead) last changed before the
   cutoff, with its attempts and events, and every event older than the cutoff that belongs to no mission still in
   the ledger (lane, operator and governance events; a late callback rejection of a pruned mission), is written to
   ``PATH.tmp-PID`` (gzip, mode 0600), fsynced, renamed to ``PATH`` and the directory fsynced. Nothing has been
   deleted yet: a crash here leaves every row in the ledger, and the same command run again writes the archive
   again (an existing ``PATH`` is replaced only when none of what it holds has been deleted; else ``archive_exists``).
2. **Delete**, in short transactions of ``batch`` missions (the supervisor keeps dispatching between them). Each
   re-checks what it deletes: a mission retried since it was archived is kept. The ``retention`` row's horizon
   moves to the cutoff first; the schema's triggers (step ``0005_retention``) refuse to delete any event younger
   than the horizon, any event of a mission still in the ledger, the newest event, and any mission that is
   unfinished or younger than the horizon, so the event log stays append-only for everything younger.
3. **Reclaim.** A ledger in incremental auto-vacuum mode (every ledger created by this version) gives the freed
   pages back to the file system in steps of ``VACUUM_STEP_PAGES`` (one short transaction each); an older ledger
   reuses them for new rows, and ``vacuum=True`` converts it once (``VACUUM``, which holds the write lock while it
   copies the file).

Archive format (one JSON object per line, UTF-8, gzip): a header ``{"lanectl_archive": 1, "cutoff": ...,
"created_at": ..., "ledger": ..., "schema": N}``, then ``{"table": "missions"|"attempts"|"events", "row": {...}}``
lines (each mission followed by its attempts and events), then a trailer ``{"end": true, "missions": n,
"attempts": n, "events": n}``: an archive without its trailer is incomplete. ``read_archive()`` reads one back.
"""
from __future__ import annotations

import contextlib
import fcntl
import gzip
import json
import os
import time
from array import array
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Final

from lanectl.errors import Conflict, ExitCode, LanectlError, Unavailable
from lanectl.ledger import Ledger, events, rollups
from lanectl.ledger.events import EventKind
from lanectl.states import FINISHED

ARCHIVE_VERSION: Final = 1
BATCH: Final = 1000
"""Missions (or stray events) deleted per transaction: each holds the write lock a few milliseconds."""
VACUUM_STEP_PAGES: Final = 1024
"""Pages (4 KiB each) one incremental-vacuum transaction gives back to the file system."""
_FIN_SQL: Final = "state IN (" + ", ".join(f"'{s}'" for s in FINISHED) + ")"
_MISSION_COLS: Final = ("id", "class", "rank", "state", "payload", "request_hash", "idempotency_key", "lane", "tags",
                        "session", "deadline", "max_attempts", "attempts", "round_start", "current_lane",
                        "wait_reason", "created_at", "updated_at", "result", "error", "target", "suspect")
_ATTEMPT_COLS: Final = ("mission", "n", "lane", "class", "invocation", "token_hash", "state", "dispatched_at",
                        "started_at", "heartbeat_at", "lease_expires", "finished_at")
_EVENT_COLS: Final = ("id", "at", "kind", "mission", "lane", "session", "attempt", "state", "data")


@dataclass
class PruneResult:
    cutoff: float
    archive: str | None
    missions: int = 0
    attempts: int = 0
    events: int = 0
    kept: int = 0
    """Missions archived but not deleted: they changed (were retried) between the archive and the delete."""
    archive_bytes: int = 0
    reclaimed_bytes: int = 0
    file_bytes_before: int = 0
    file_bytes_after: int = 0
    seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def candidates(led: Ledger, cutoff: float) -> tuple[int, int]:
    """(finished missions last changed before ``cutoff``, events older than it): what a prune would take at most."""
    conn = led.conn
    m = conn.execute(f"SELECT count(*) FROM missions WHERE {_FIN_SQL} AND updated_at < ?", (cutoff,)).fetchone()[0]
    e = conn.execute("SELECT count(*) FROM events WHERE at < ?", (cutoff,)).fetchone()[0]
    return int(m), int(e)


def state(led: Ledger) -> dict[str, Any]:
    """The ``retention`` row: horizon, totals pruned so far, the last prune's time and archive."""
    row = led.conn.execute("SELECT horizon, pruned_missions, pruned_attempts, pruned_events, last_prune_at, "
                           "last_archive FROM retention WHERE id = 1").fetchone()
    keys = ("horizon", "pruned_missions", "pruned_attempts", "pruned_events", "last_prune_at", "last_archive")
    return dict(zip(keys, row))


PRUNE_LOCK_KEY: Final = 0x6C616E67
"""The advisory lock (PostgreSQL) that keeps two prunes of one ledger apart."""


def _file_bytes(led: Ledger) -> int:
    if led.dialect == "postgresql":
        return int(led.conn.execute("SELECT pg_database_size(current_database())").fetchone()[0])
    page_size = led.conn.execute("PRAGMA page_size").fetchone()[0]
    return int(led.conn.execute("PRAGMA page_count").fetchone()[0]) * int(page_size)


def _rows(cur: Any, cols: tuple[str, ...]) -> Iterator[dict[str, Any]]:
    for r in cur:
        yield dict(zip(cols, r))


def _line(doc: dict[str, Any]) -> bytes:
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode() + b"\n"


class _ArchiveWriter:
    """gzip JSON lines into ``PATH.tmp-PID`` (0600, never following a link); ``commit()`` fsyncs and renames."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.tmp)  # left by a crashed run of this pid number
        fd = os.open(self.tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        self.raw = os.fdopen(fd, "wb")
        self.gz = gzip.GzipFile(filename="", mode="wb", fileobj=self.raw, compresslevel=6, mtime=0)
        self.counts = {"missions": 0, "attempts": 0, "events": 0}

    def write(self, table: str, row: dict[str, Any]) -> None:
        self.gz.write(_line({"table": table, "row": row}))
        self.counts[table] += 1

    def header(self, doc: dict[str, Any]) -> None:
        self.gz.write(_line(doc))

    def commit(self) -> int:
        self.gz.write(_line({"end": True, **self.counts}))
        self.gz.close()
        self.raw.flush()
        os.fsync(self.raw.fileno())
        size = os.fstat(self.raw.fileno()).st_size
        self.raw.close()
        os.replace(self.tmp, self.path)
        dfd = os.open(self.path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
        return size

    def abort(self) -> None:
        with contextlib.suppress(Exception):
            self.gz.close()
        with contextlib.suppress(Exception):
            self.raw.close()
        with contextlib.suppress(OSError):
            os.unlink(self.tmp)


def read_archive(path: str | Path) -> Iterator[dict[str, Any]]:
    """Every line of an archive, header first and trailer last; ``ValueError`` naming the file and line for a line
    that is not JSON, ``EOFError`` for a truncated gzip stream."""
    with gzip.open(path, "rb") as fh:
        for n, raw in enumerate(fh, 1):
            try:
                yield json.loads(raw)
            except ValueError as exc:
                raise ValueError(f"{path}: line {n} is not JSON ({exc})") from None


def load_archive(path: str | Path) -> dict[str, Any]:
    """An archive as ``{"header", "missions", "attempts", "events", "end"}`` (lists of rows; ``end`` None when the
    trailer is missing, i.e. the archive is incomplete)."""
    out: dict[str, Any] = {"header": None, "missions": [], "attempts": [], "events": [], "end": None}
    for doc in read_archive(path):
        if out["header"] is None:
            out["header"] = doc
        elif doc.get("end") is True:
            out["end"] = doc
        else:
            out[doc["table"]].append(doc["row"])
    return out


def _check_existing(led: Ledger, path: Path) -> None:
    """An existing archive may be replaced only when it is a lanectl archive none of whose rows has been deleted
    (a prune that stopped between writing it and deleting): otherwise replacing it would lose history."""
    if not os.path.lexists(path):
        return
    refuse = Conflict(f"{path}: an archive (or another file) is already there and holds history this ledger no "
                      "longer has", "name a new archive file; keep the old one", "archive_exists")
    try:
        doc = load_archive(path)
    except (OSError, ValueError, EOFError, KeyError, TypeError, AttributeError):
        raise refuse from None
    if not (isinstance(doc["header"], dict) and doc["header"].get("lanectl_archive") == ARCHIVE_VERSION):
        raise refuse
    conn = led.conn
    # every archived row must still be in this ledger exactly as archived: ids alone would match another ledger
    # (or this one recreated) whose rows merely have the same numbers, and replacing its archive would lose them
    for table, cols, rows in (("missions", _MISSION_COLS, doc["missions"]), ("events", _EVENT_COLS, doc["events"])):
        for i in range(0, len(rows), 500):
            chunk = rows[i:i + 500]
            ids = [r["id"] for r in chunk]
            have = {r["id"]: r for r in _rows(conn.execute(
                f"SELECT {', '.join(cols)} FROM {table} WHERE id IN ({','.join('?' * len(ids))})", ids), cols)}
            if any(have.get(r["id"]) != {c: r.get(c) for c in cols} for r in chunk):
                raise refuse


@contextlib.contextmanager
def _one_prune_at_a_time(led: Ledger) -> Iterator[None]:
    """An exclusive flock on ``LEDGER.prune-lock`` (a file of its own: lanectl never opens the ledger file itself,
    whose POSIX locks are SQLite's): the supervisor's retention pass and an operator's prune never overlap. On
    PostgreSQL, a session advisory lock of the ledger's database (``PRUNE_LOCK_KEY``) does the same."""
    if led.dialect == "postgresql":
        if not led.conn.execute("SELECT pg_try_advisory_lock(?)", (PRUNE_LOCK_KEY,)).fetchone()[0]:
            raise Conflict(f"{led.path}: another prune of this ledger is running (the supervisor's retention pass, "
                           "or another 'lanectl ledger prune')", "wait for it to finish, then run this one again",
                           "prune_running")
        try:
            yield
        finally:
            led.conn.execute("SELECT pg_advisory_unlock(?)", (PRUNE_LOCK_KEY,))
        return
    lock = Path(str(led.path) + ".prune-lock")
    try:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    except OSError as exc:
        raise Unavailable(f"{lock}: cannot open the prune lock ({exc.strerror or exc}); nothing was deleted",
                          "run the prune as the ledger's owner (root)", "prune_lock") from exc
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise Conflict(f"{led.path}: another prune of this ledger is running (the supervisor's retention pass, "
                           "or another 'lanectl ledger prune')", "wait for it to finish, then run this one again",
                           "prune_running") from None
        yield
    finally:
        os.close(fd)


def prune(led: Ledger, *, cutoff: float, archive: str | Path, now: float | None = None, batch: int = BATCH,
          vacuum: bool = False, actor: str | None = None,
          progress: Callable[[str, int], None] | None = None) -> PruneResult:
    """Archive, then delete, finished history older than ``cutoff`` (module docstring); records a ``prune`` event
    when the deleting begins (so a prune killed midway is on record) and one with the figures at the end. With
    nothing to prune no archive is written (``PruneResult.archive`` is None) and no event recorded. One prune of a
    ledger at a time (``prune_running``, exit 5)."""
    with _one_prune_at_a_time(led):
        return _prune(led, cutoff=cutoff, archive=archive, now=now, batch=batch, vacuum=vacuum, actor=actor,
                      progress=progress)


def _prune(led: Ledger, *, cutoff: float, archive: str | Path, now: float | None, batch: int, vacuum: bool,
           actor: str | None, progress: Callable[[str, int], None] | None) -> PruneResult:
    started = time.monotonic()
    now = led.clock() if now is None else now
    path = Path(archive)
    if not path.parent.is_dir():  # checked first, so that a cron job learns of it on a day with nothing to prune
        raise LanectlError(f"{path}: its directory {path.parent} does not exist", "create it, or name another file",
                           "archive_dir_missing", ExitCode.CONFIG)
    res = PruneResult(cutoff=cutoff, archive=None, file_bytes_before=_file_bytes(led))
    conn = led.conn
    # ---------------------------------------------------------------- 1. archive
    mission_ids = array("q", (r[0] for r in conn.execute(
        f"SELECT id FROM missions WHERE {_FIN_SQL} AND updated_at < ? ORDER BY id", (cutoff,))))
    # the newest event is never taken (its id would be handed out again); a mission's events newer than the
    # archive (a late callback rejection) stay, and a later prune takes them as events of no mission
    top_event = int(conn.execute("SELECT coalesce(max(id), 0) FROM events").fetchone()[0])
    stray_sql = ("SELECT id FROM events WHERE at < ? AND id < ? AND (mission IS NULL OR NOT EXISTS "
                 "(SELECT 1 FROM missions m WHERE m.id = events.mission)) ORDER BY id")
    stray = array("q", (r[0] for r in conn.execute(stray_sql, (cutoff, top_event))))
    if not mission_ids and not stray:
        res.file_bytes_after = res.file_bytes_before
        res.reclaimed_bytes = _reclaim(led, vacuum)
        res.file_bytes_after = _file_bytes(led)
        res.seconds = time.monotonic() - started
        return res
    _check_existing(led, path)
    try:
        writer = _ArchiveWriter(path)
    except OSError as exc:
        raise Unavailable(f"{path}: cannot create the archive ({exc.strerror or exc}); nothing was deleted",
                          "name a file in a directory lanectl may write, then run the prune again",
                          "archive_write_failed") from exc
    try:
        writer.header({"lanectl_archive": ARCHIVE_VERSION, "cutoff": cutoff, "created_at": now,
                       "ledger": str(led.path), "schema": led.version()})
        mcols, acols, ecols = ", ".join(_MISSION_COLS), ", ".join(_ATTEMPT_COLS), ", ".join(_EVENT_COLS)
        for i in range(0, len(mission_ids), batch):
            chunk = list(mission_ids[i:i + batch])
            marks = ",".join("?" * len(chunk))
            with led.transaction():  # one snapshot per chunk: a mission and its rows agree
                missions = list(_rows(conn.execute(f"SELECT {mcols} FROM missions WHERE id IN ({marks}) ORDER BY id",
                                                   chunk), _MISSION_COLS))
                attempts: dict[int, list[dict[str, Any]]] = {}
                for a in _rows(conn.execute(f"SELECT {acols} FROM attempts WHERE mission IN ({marks}) "
                                            "ORDER BY mission, n", chunk), _ATTEMPT_COLS):
                    attempts.setdefault(a["mission"], []).append(a)
                evs: dict[int, list[dict[str, Any]]] = {}
                for e in _rows(conn.execute(f"SELECT {ecols} FROM events WHERE mission IN ({marks}) AND id < ? "
                                            "ORDER BY mission, id", (*chunk, top_event)), _EVENT_COLS):
                    evs.setdefault(e["mission"], []).append(e)
            for m in missions:
                writer.write("missions", m)
                for a in attempts.get(m["id"], ()):
                    writer.write("attempts", a)
                for e in evs.get(m["id"], ()):
                    writer.write("events", e)
            if progress:
                progress("archived", min(i + batch, len(mission_ids)))
        for i in range(0, len(stray), batch):
            chunk = list(stray[i:i + batch])
            for e in _rows(conn.execute(f"SELECT {ecols} FROM events WHERE id IN ({','.join('?' * len(chunk))}) "
                                        "ORDER BY id", chunk), _EVENT_COLS):
                writer.write("events", e)
        res.archive_bytes = writer.commit()
    except OSError as exc:
        writer.abort()
        raise Unavailable(f"{path}: cannot write the archive ({exc.strerror or exc}); nothing was deleted",
                          "free space or fix the directory's permissions, then run the prune again",
                          "archive_write_failed") from exc
    except BaseException:
        writer.abort()
        raise
    res.archive = str(path)
    # ---------------------------------------------------------------- 2. delete
    with led.transaction():  # on record before anything is deleted: the archive that holds what goes next
        conn.execute("UPDATE retention SET horizon = max(horizon, ?), last_archive = ? WHERE id = 1",
                     (cutoff, res.archive))
        events.append(conn, EventKind.PRUNE, now, phase="deleting", cutoff=cutoff, archive=res.archive,
                      missions_from=int(mission_ids[0]) if mission_ids else None,
                      missions_to=int(mission_ids[-1]) if mission_ids else None, missions=len(mission_ids),
                      actor=actor)
    for i in range(0, len(mission_ids), batch):
        chunk = list(mission_ids[i:i + batch])
        marks = ",".join("?" * len(chunk))
        with led.transaction():
            gone = [r[0] for r in conn.execute(
                f"SELECT id FROM missions WHERE id IN ({marks}) AND {_FIN_SQL} AND updated_at < ?", (*chunk, cutoff))]
            res.kept += len(chunk) - len(gone)
            if gone:
                gm = ",".join("?" * len(gone))
                res.attempts += conn.execute(f"DELETE FROM attempts WHERE mission IN ({gm})", gone).rowcount
                res.missions += conn.execute(f"DELETE FROM missions WHERE id IN ({gm})", gone).rowcount
                res.events += conn.execute(f"DELETE FROM events WHERE mission IN ({gm}) AND id < ?",
                                           (*gone, top_event)).rowcount
        if progress:
            progress("deleted", min(i + batch, len(mission_ids)))
    for i in range(0, len(stray), batch):
        chunk = list(stray[i:i + batch])
        with led.transaction():
            res.events += conn.execute(f"DELETE FROM events WHERE id IN ({','.join('?' * len(chunk))}) AND at < ?",
                                       (*chunk, cutoff)).rowcount
    with led.transaction():
        rollups.prune_before(conn, cutoff)  # roll-ups before the horizon go with their events (read raw there)
        conn.execute("UPDATE retention SET pruned_missions = pruned_missions + ?, pruned_attempts = "
                     "pruned_attempts + ?, pruned_events = pruned_events + ?, last_prune_at = ?, last_archive = ? "
                     "WHERE id = 1", (res.missions, res.attempts, res.events, now, res.archive))
        events.append(conn, EventKind.PRUNE, now, phase="done", cutoff=cutoff, missions=res.missions,
                      attempts=res.attempts,
                      events=res.events, kept=res.kept, archive=res.archive, archive_bytes=res.archive_bytes,
                      actor=actor)
    # ---------------------------------------------------------------- 3. reclaim
    res.reclaimed_bytes = _reclaim(led, vacuum)
    res.file_bytes_after = _file_bytes(led)
    res.seconds = time.monotonic() - started
    return res


def _reclaim(led: Ledger, vacuum: bool) -> int:
    """Give free pages back to the file system; returns the bytes given back (by this connection's count). On
    PostgreSQL: ``VACUUM`` of the pruned tables (``VACUUM FULL`` with ``vacuum``, which rewrites them under an
    exclusive lock), measured by the database's size."""
    conn = led.conn
    if led.dialect == "postgresql":
        before = _file_bytes(led)
        conn.execute(f"VACUUM {'FULL ' if vacuum else ''}missions, attempts, events, rollups")
        return max(0, before - _file_bytes(led))
    page = int(conn.execute("PRAGMA page_size").fetchone()[0])
    before = int(conn.execute("PRAGMA page_count").fetchone()[0])
    mode = int(conn.execute("PRAGMA auto_vacuum").fetchone()[0])
    if mode != 2 and vacuum:
        conn.execute("PRAGMA auto_vacuum = INCREMENTAL")  # takes effect with the VACUUM below
        conn.execute("VACUUM")
        mode = int(conn.execute("PRAGMA auto_vacuum").fetchone()[0])
    if mode == 2:
        while int(conn.execute("PRAGMA freelist_count").fetchone()[0]) > 0:
            with led.transaction():
                conn.execute(f"PRAGMA incremental_vacuum({VACUUM_STEP_PAGES:d})").fetchall()
    after = int(conn.execute("PRAGMA page_count").fetchone()[0])
    return max(0, before - after) * page

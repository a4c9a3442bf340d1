"""Ordered, named schema migrations for the ledger.

Each step runs in its own ``BEGIN IMMEDIATE`` transaction together with its version record (``PRAGMA
user_version`` plus a row in ``schema_migrations``), so a crash leaves the ledger at a whole step, never half of
one. ``pending()`` is read-only. A ledger written by a newer lanectl (``user_version`` beyond the last step we
know) is refused with ``ledger_too_new`` (exit 3, CONFIG): running older code on it could silently drop what the
newer schema means, and the supervisor must not restart into that loop (``RestartPreventExitStatus=3``).
"""
from __future__ import annotations

import re
import sqlite3
import time
from dataclasses import dataclass
from typing import Any, Final

from lanectl.errors import ExitCode, LanectlError


@dataclass(frozen=True)
class Migration:
    name: str
    sql: str
    rebuilds: bool = False
    """The step rebuilds a table that others reference: it runs with foreign keys off (SQLite's documented
    procedure for a table rebuild) and must leave ``PRAGMA foreign_key_check`` empty before it commits."""
    pg: str | None = None
    """The step in PostgreSQL terms: required for every step after ``PG_BASELINE_VERSION`` (the baseline
    script creates what the earlier ones built)."""


_V1: Final = """
CREATE TABLE schema_migrations (
    version INTEGER PRIMARY KEY CHECK (version >= 1),
    name TEXT NOT NULL UNIQUE,
    applied_at REAL NOT NULL
) STRICT;

CREATE TABLE missions (
    id INTEGER PRIMARY KEY,
    class TEXT NOT NULL CHECK (class IN ('interactive', 'deadline', 'background')),
    rank INTEGER NOT NULL CHECK (rank IN (0, 1, 2)),
    state TEXT NOT NULL CHECK (state IN ('queued', 'dispatched', 'running', 'succeeded', 'failed',
                                         'cancelled', 'expired', 'dead')),
    payload TEXT NOT NULL CHECK (json_valid(payload) AND length(payload) <= 262144),
    request_hash TEXT NOT NULL CHECK (length(request_hash) = 64),
    idempotency_key TEXT UNIQUE CHECK (idempotency_key IS NULL OR length(idempotency_key) BETWEEN 1 AND 200),
    lane TEXT,
    tags TEXT NOT NULL DEFAULT '[]' CHECK (json_valid(tags)),
    session TEXT,
    deadline REAL,
    max_attempts INTEGER NOT NULL CHECK (max_attempts BETWEEN 1 AND 100),
    attempts INTEGER NOT NULL DEFAULT 0 CHECK (attempts >= 0),
    round_start INTEGER NOT NULL DEFAULT 0 CHECK (round_start >= 0 AND round_start <= attempts),
    current_lane TEXT,
    wait_reason TEXT,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    result TEXT CHECK (result IS NULL OR json_valid(result)),
    error TEXT,
    CHECK ((state IN ('dispatched', 'running')) = (current_lane IS NOT NULL)),
    CHECK (rank = CASE class WHEN 'interactive' THEN 0 WHEN 'deadline' THEN 1 ELSE 2 END)
) STRICT;
-- The claim path: 'WHERE state = ''queued''' is repeated literally in every queue query so the planner uses
-- these partial indexes; finished history never enters them, so a pick stays O(log n) however long it grows.
CREATE INDEX missions_queue ON missions (rank, id) WHERE state = 'queued';
CREATE INDEX missions_edf ON missions (rank, deadline) WHERE state = 'queued' AND deadline IS NOT NULL;
CREATE INDEX missions_active ON missions (current_lane) WHERE state IN ('dispatched', 'running');
CREATE INDEX missions_state ON missions (state, id);
CREATE INDEX missions_session ON missions (session, state) WHERE session IS NOT NULL;

-- Admission control reads queue depth per class on every submit; counting a million-row partial index each time
-- is too slow, so triggers keep the count exact in the same transaction as the change.
CREATE TABLE queue_depth (
    rank INTEGER PRIMARY KEY CHECK (rank IN (0, 1, 2)),
    n INTEGER NOT NULL CHECK (n >= 0)
) STRICT;
INSERT INTO queue_depth (rank, n) VALUES (0, 0), (1, 0), (2, 0);
CREATE TRIGGER queue_depth_insert AFTER INSERT ON missions WHEN NEW.state = 'queued'
BEGIN UPDATE queue_depth SET n = n + 1 WHERE rank = NEW.rank; END;
CREATE TRIGGER queue_depth_leave AFTER UPDATE OF state ON missions
    WHEN OLD.state = 'queued' AND NEW.state <> 'queued'
BEGIN UPDATE queue_depth SET n = n - 1 WHERE rank = OLD.rank; END;
CREATE TRIGGER queue_depth_enter AFTER UPDATE OF state ON missions
    WHEN OLD.state <> 'queued' AND NEW.state = 'queued'
BEGIN UPDATE queue_depth SET n = n + 1 WHERE rank = NEW.rank; END;
CREATE TRIGGER queue_depth_delete AFTER DELETE ON missions WHEN OLD.state = 'queued'
BEGIN UPDATE queue_depth SET n = n - 1 WHERE rank = OLD.rank; END;

CREATE TABLE attempts (
    mission INTEGER NOT NULL REFERENCES missions (id),
    n INTEGER NOT NULL CHECK (n >= 1),
    lane TEXT NOT NULL,
    class TEXT NOT NULL CHECK (class IN ('interactive', 'deadline', 'background')),
    invocation TEXT,
    token_hash TEXT NOT NULL CHECK (length(token_hash) = 64),
    state TEXT NOT NULL CHECK (state IN ('dispatched', 'running', 'succeeded', 'failed', 'lost', 'cancelled')),
    dispatched_at REAL NOT NULL,
    started_at REAL,
    heartbeat_at REAL,
    lease_expires REAL NOT NULL,
    finished_at REAL,
    PRIMARY KEY (mission, n)
) STRICT;
CREATE INDEX attempts_lease ON attempts (lease_expires) WHERE state IN ('dispatched', 'running');
CREATE INDEX attempts_rate ON attempts (lane, class, dispatched_at);

CREATE TABLE usage_daily (
    lane TEXT NOT NULL,
    class TEXT NOT NULL CHECK (class IN ('interactive', 'deadline', 'background')),
    day INTEGER NOT NULL,
    n INTEGER NOT NULL CHECK (n >= 0),
    PRIMARY KEY (lane, class, day)
) STRICT, WITHOUT ROWID;

CREATE TABLE sessions (
    id TEXT PRIMARY KEY CHECK (instr(id, ':') > 1),
    lane TEXT NOT NULL,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL
) STRICT, WITHOUT ROWID;

CREATE TABLE lanes (
    name TEXT PRIMARY KEY,
    state TEXT NOT NULL DEFAULT 'active'
        CHECK (state IN ('active', 'draining', 'drained', 'degraded', 'disabled')),
    healthy INTEGER NOT NULL DEFAULT 1 CHECK (healthy IN (0, 1)),
    invocation TEXT,
    swrr INTEGER NOT NULL DEFAULT 0,
    updated_at REAL NOT NULL
) STRICT, WITHOUT ROWID;

CREATE TABLE events (
    id INTEGER PRIMARY KEY,
    at REAL NOT NULL,
    kind TEXT NOT NULL CHECK (length(kind) BETWEEN 1 AND 64),
    mission INTEGER,
    lane TEXT,
    session TEXT,
    attempt INTEGER,
    state TEXT,
    data TEXT NOT NULL DEFAULT '{}' CHECK (json_valid(data))
) STRICT;
CREATE INDEX events_mission ON events (mission, id) WHERE mission IS NOT NULL;
CREATE INDEX events_lane ON events (lane, at) WHERE lane IS NOT NULL;
CREATE INDEX events_session ON events (session, at) WHERE session IS NOT NULL;
CREATE INDEX events_kind ON events (kind, at);
CREATE INDEX events_at ON events (at);
CREATE TRIGGER events_no_update BEFORE UPDATE ON events
BEGIN SELECT RAISE(ABORT, 'events are append-only'); END;
CREATE TRIGGER events_no_delete BEFORE DELETE ON events
BEGIN SELECT RAISE(ABORT, 'events are append-only'); END;
"""

_V2: Final = """
-- a promoted lane's traffic weight (lanectl promote); NULL: the weight of its lane file
ALTER TABLE lanes ADD COLUMN weight INTEGER CHECK (weight IS NULL OR weight BETWEEN 0 AND 10000);
"""



def _statements(sql: str) -> list[str]:
    """Split a script into statements (executescript() would COMMIT our transaction)."""
    out: list[str] = []
    buf = ""
    for line in sql.splitlines(keepends=True):
        if line.lstrip().startswith("--"):
            continue
        buf += line
        if sqlite3.complete_statement(buf):
            out.append(buf.strip())
            buf = ""
    if buf.strip():
        out.append(buf.strip())
    return out


def _missions_autoincrement() -> str:
    """Step 3: mission ids are never handed out twice.

    With a plain ``INTEGER PRIMARY KEY`` SQLite gives a new row max(id) + 1, so once the newest mission is gone
    (deleted, or a commit lost to a power cut at synchronous=NORMAL) its id would go to another mission, and a
    producer holding the old id would read someone else's mission. ``AUTOINCREMENT`` keeps a high-water mark in
    ``sqlite_sequence`` instead. SQLite cannot add it to a table, so the table is rebuilt (same columns, checks,
    indexes and triggers as step 1) and the mark starts at the highest id any table has ever recorded."""
    stmts = _statements(_V1)
    table = next(s for s in stmts if s.startswith("CREATE TABLE missions ("))
    new = table.replace("CREATE TABLE missions (", "CREATE TABLE missions_new (", 1)
    new = new.replace("id INTEGER PRIMARY KEY,", "id INTEGER PRIMARY KEY AUTOINCREMENT,", 1)
    assert new != table and "AUTOINCREMENT" in new
    dependents = [s for s in stmts if s.startswith("CREATE INDEX missions_")
                  or (s.startswith("CREATE TRIGGER") and re.search(r"\sON missions\s", s))]
    assert len(dependents) == 9, dependents
    return ";\n".join([
        new.rstrip(";"),
        "INSERT INTO missions_new SELECT * FROM missions",
        "DROP TABLE missions",
        "ALTER TABLE missions_new RENAME TO missions",
        *(d.rstrip(";") for d in dependents),
        "INSERT INTO sqlite_sequence (name, seq) SELECT 'missions', 0 "
        "WHERE NOT EXISTS (SELECT 1 FROM sqlite_sequence WHERE name = 'missions')",
        "UPDATE sqlite_sequence SET seq = max(seq, coalesce((SELECT max(id) FROM missions), 0), "
        "coalesce((SELECT max(mission) FROM attempts), 0), coalesce((SELECT max(mission) FROM events), 0)) "
        "WHERE name = 'missions'",
    ]) + ";\n"


_V4: Final = """
-- Queue groups (no head-of-line blocking): queued missions are read per group of (class, target lane, tags), so a
-- backlog that cannot be placed (pinned to a full, drained or down lane) never hides placeable work behind it.
-- target: the lane a mission is bound to, its session's owner or its --lane; '' when any lane may take it.
ALTER TABLE missions ADD COLUMN target TEXT NOT NULL DEFAULT '';
UPDATE missions SET target = coalesce((SELECT s.lane FROM sessions s WHERE s.id = missions.session), lane, '')
    WHERE state IN ('queued', 'dispatched', 'running');
DROP INDEX missions_queue;
CREATE INDEX missions_queue ON missions (rank, target, tags, id) WHERE state = 'queued';
CREATE INDEX missions_group_edf ON missions (target, tags, deadline)
    WHERE state = 'queued' AND rank = 1 AND deadline IS NOT NULL;
-- the target follows --lane changes (reroute) and session moves, whoever makes them
CREATE TRIGGER missions_target_lane AFTER UPDATE OF lane ON missions
BEGIN UPDATE missions SET target = coalesce((SELECT s.lane FROM sessions s WHERE s.id = NEW.session), NEW.lane, '')
    WHERE id = NEW.id; END;
CREATE TRIGGER sessions_target AFTER UPDATE OF lane ON sessions
BEGIN UPDATE missions SET target = NEW.lane WHERE session = NEW.id AND state IN ('queued', 'dispatched', 'running');
END;
-- The wait of a group that could not be placed: its reason, whether it still cannot (blocked), and how far (by
-- mission id) the reason has been written onto its missions. A mission that re-enters the group with an older id
-- (re-queued, moved) sends the cursor back so that it gets the reason too; new missions have higher ids anyway.
CREATE TABLE queue_waits (
    rank INTEGER NOT NULL CHECK (rank IN (0, 1, 2)),
    target TEXT NOT NULL,
    tags TEXT NOT NULL,
    reason TEXT NOT NULL,
    since REAL NOT NULL,
    blocked INTEGER NOT NULL DEFAULT 1 CHECK (blocked IN (0, 1)),
    cursor INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (rank, target, tags)
) STRICT, WITHOUT ROWID;
CREATE TRIGGER queue_waits_reenter AFTER UPDATE OF state, target ON missions WHEN NEW.state = 'queued'
BEGIN UPDATE queue_waits SET cursor = NEW.id - 1
    WHERE rank = NEW.rank AND target = NEW.target AND tags = NEW.tags AND cursor >= NEW.id; END;
"""

_V5: Final = """
-- Retention (issue 17): finished history older than the retention horizon may be archived and deleted
-- (lanectl.ledger.retention); everything younger stays append-only. The horizon only moves forward.
CREATE TABLE retention (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    horizon REAL NOT NULL DEFAULT 0,
    pruned_missions INTEGER NOT NULL DEFAULT 0 CHECK (pruned_missions >= 0),
    pruned_attempts INTEGER NOT NULL DEFAULT 0 CHECK (pruned_attempts >= 0),
    pruned_events INTEGER NOT NULL DEFAULT 0 CHECK (pruned_events >= 0),
    last_prune_at REAL,
    last_archive TEXT
) STRICT;
INSERT INTO retention (id, horizon) VALUES (1, 0);
CREATE TRIGGER retention_forward BEFORE UPDATE OF horizon ON retention WHEN NEW.horizon < OLD.horizon
BEGIN SELECT RAISE(ABORT, 'the retention horizon only moves forward'); END;
CREATE TRIGGER retention_no_delete BEFORE DELETE ON retention
BEGIN SELECT RAISE(ABORT, 'the retention row cannot be deleted'); END;
-- An event may be deleted only once it is older than the horizon, its mission (if any) is gone, and it is not the
-- newest event (whose id the next event would otherwise reuse: event ids are cursors for 'events --after').
DROP TRIGGER events_no_delete;
CREATE TRIGGER events_no_delete BEFORE DELETE ON events
    WHEN OLD.at >= (SELECT horizon FROM retention WHERE id = 1)
      OR OLD.id >= (SELECT max(id) FROM events)
      OR (OLD.mission IS NOT NULL AND EXISTS (SELECT 1 FROM missions WHERE id = OLD.mission))
BEGIN SELECT RAISE(ABORT, 'events are append-only (only finished history older than the retention horizon may be pruned)'); END;
-- INSERT OR REPLACE of an existing event would rewrite it without firing the update or delete triggers.
CREATE TRIGGER events_no_replace BEFORE INSERT ON events
    WHEN NEW.id IS NOT NULL AND EXISTS (SELECT 1 FROM events WHERE id = NEW.id)
BEGIN SELECT RAISE(ABORT, 'events are append-only (an event id cannot be written again)'); END;
-- A mission (and its attempts) may be deleted only when it is finished and last changed before the horizon.
CREATE TRIGGER missions_no_delete BEFORE DELETE ON missions
    WHEN OLD.state IN ('queued', 'dispatched', 'running')
      OR OLD.updated_at >= (SELECT horizon FROM retention WHERE id = 1)
BEGIN SELECT RAISE(ABORT, 'only finished missions older than the retention horizon may be deleted'); END;
CREATE TRIGGER attempts_no_delete BEFORE DELETE ON attempts
    WHEN EXISTS (SELECT 1 FROM missions WHERE id = OLD.mission AND (state IN ('queued', 'dispatched', 'running')
                 OR updated_at >= (SELECT horizon FROM retention WHERE id = 1)))
BEGIN SELECT RAISE(ABORT, 'only attempts of finished missions older than the retention horizon may be deleted'); END;
"""

# Pre-aggregated metric windows (lanectl/ledger/rollups.py): what report and long metrics windows read.
_V_ROLLUPS: Final = """
CREATE TABLE rollups (
    bucket_s INTEGER NOT NULL CHECK (bucket_s IN (300, 3600)),
    start REAL NOT NULL,
    lane TEXT NOT NULL,
    class TEXT NOT NULL,
    succeeded INTEGER NOT NULL, failed INTEGER NOT NULL, dead INTEGER NOT NULL, cancelled INTEGER NOT NULL,
    expired INTEGER NOT NULL, requeued INTEGER NOT NULL, dispatched INTEGER NOT NULL, fallback INTEGER NOT NULL,
    busy REAL NOT NULL,
    early BLOB NOT NULL,
    queue_wait BLOB NOT NULL,
    run_time BLOB NOT NULL,
    end_to_end BLOB NOT NULL,
    PRIMARY KEY (bucket_s, start, lane, class)
) STRICT;
CREATE TABLE rollup_traffic (
    bucket_s INTEGER NOT NULL,
    start REAL NOT NULL,
    kind TEXT NOT NULL,
    n INTEGER NOT NULL,
    PRIMARY KEY (bucket_s, start, kind)
) STRICT, WITHOUT ROWID;
CREATE TABLE rollup_state (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    rolled_from REAL NOT NULL,
    rolled_until REAL NOT NULL,
    watermark INTEGER NOT NULL
) STRICT;
"""

_V6: Final = """
-- Lane deaths a mission was in flight for (issue 17): such a loss is not charged to every bystander; a suspect runs
-- alone on an idle lane, and a lane death while it runs alone is charged to it (lanectl/ledger/missions.py).
ALTER TABLE missions ADD COLUMN suspect INTEGER NOT NULL DEFAULT 0 CHECK (suspect >= 0);
"""


# Hosts (issue 13): one row per host whose supervisor shares this ledger, and which host runs each lane
# (lanectl/ledger/hosts.py owns the table; lanes.host is written by lanectl/ledger/lanes.py).
_V8: Final = """
CREATE TABLE hosts (
    name TEXT PRIMARY KEY CHECK (length(name) BETWEEN 1 AND 63),
    incarnation TEXT NOT NULL CHECK (length(incarnation) BETWEEN 1 AND 64),
    boot_id TEXT NOT NULL,
    pid INTEGER NOT NULL CHECK (pid > 0),
    started_at REAL NOT NULL,
    heartbeat_at REAL NOT NULL,
    lease_expires REAL NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('up', 'stopped', 'dead', 'forgotten'))
) STRICT, WITHOUT ROWID;
ALTER TABLE lanes ADD COLUMN host TEXT;
CREATE INDEX lanes_host ON lanes (host) WHERE host IS NOT NULL;
"""

_V8_PG: Final = """
CREATE TABLE hosts (
    name text PRIMARY KEY CHECK (length(name) BETWEEN 1 AND 63),
    incarnation text NOT NULL CHECK (length(incarnation) BETWEEN 1 AND 64),
    boot_id text NOT NULL,
    pid integer NOT NULL CHECK (pid > 0),
    started_at double precision NOT NULL,
    heartbeat_at double precision NOT NULL,
    lease_expires double precision NOT NULL,
    state text NOT NULL CHECK (state IN ('up', 'stopped', 'dead', 'forgotten'))
);
ALTER TABLE lanes ADD COLUMN host text;
CREATE INDEX lanes_host ON lanes (host) WHERE host IS NOT NULL;
"""


# Several hosts, continued (issue 13): a host an operator drained (a flag beside its lifecycle ``state``: a drained
# host stays drained across restarts of its supervisor), what other hosts' policy passes need to know of a lane
# (``spec``: its classes, tags, capacity, fallback, session prefix, as JSON, written by its host at start and
# reload), and a session's choice when its lane's host is dead or drained (``stays`` 1: it waits for its lane;
# 0, the default: it moves to a lane that can take it).
_V9: Final = """
ALTER TABLE hosts ADD COLUMN drained_at REAL;
ALTER TABLE hosts ADD COLUMN drained_by TEXT;
ALTER TABLE lanes ADD COLUMN spec TEXT;
ALTER TABLE sessions ADD COLUMN stays INTEGER NOT NULL DEFAULT 0 CHECK (stays IN (0, 1));
"""

_V9_PG: Final = """
ALTER TABLE hosts ADD COLUMN drained_at double precision;
ALTER TABLE hosts ADD COLUMN drained_by text;
ALTER TABLE lanes ADD COLUMN spec text;
ALTER TABLE sessions ADD COLUMN stays integer NOT NULL DEFAULT 0 CHECK (stays IN (0, 1));
"""


# What each host's supervisor last saw of its lanes' units (issue 13, fleet-wide views): written with the host's
# lease renewal (lanectl/ledger/hosts.py), read by other hosts' ``status`` (lanectl/ledger/fleetview.py). JSON text:
# {lane: {"unit": "active/running", "pid": N, "restarts": N, "healthy": bool}}; NULL until the first renewal.
_V10: Final = """
ALTER TABLE hosts ADD COLUMN lane_units TEXT;
"""
_V10_PG: Final = """
ALTER TABLE hosts ADD COLUMN lane_units text;
"""


# Which machine runs a host's supervisor (issue 13, a second machine started under a host's name): a random id the
# supervisor keeps in its state directory (``lanectl.supervisor.hostlease.machine_id``), written at every start; a
# start under the same name from another machine is refused while the record's lease runs (``hosts.register``).
_V11: Final = """
ALTER TABLE hosts ADD COLUMN machine TEXT;
"""
_V11_PG: Final = """
ALTER TABLE hosts ADD COLUMN machine text;
"""


MIGRATIONS: Final[tuple[Migration, ...]] = (
    Migration("0001_missions_attempts_events_sessions_lanes", _V1),
    Migration("0002_lane_weight_override", _V2),
    Migration("0003_mission_ids_never_reused", _missions_autoincrement(), rebuilds=True),
    Migration("0004_queue_groups", _V4),
    Migration("0005_retention", _V5),
    Migration("0006_metric_rollups", _V_ROLLUPS),
    Migration("0007_lane_death_suspects", _V6),
    Migration("0008_hosts", _V8, pg=_V8_PG),
    Migration("0009_host_drain_lane_specs_session_stays", _V9, pg=_V9_PG),
    Migration("0010_host_lane_units", _V10, pg=_V10_PG),
    Migration("0011_host_machine", _V11, pg=_V11_PG),
)
LATEST: Final = len(MIGRATIONS)


def current_version(conn: sqlite3.Connection) -> int:
    return int(conn.execute("PRAGMA user_version").fetchone()[0])


def check_not_newer(version: int, where: str) -> None:
    if version > LATEST:
        raise LanectlError(
            f"{where}: the ledger has schema version {version}, newer than this lanectl knows ({LATEST})",
            "upgrade lanectl to the version that wrote it, or point --ledger/LANECTL_LEDGER at another file",
            "ledger_too_new",
            ExitCode.CONFIG,
        )


def pending(conn: sqlite3.Connection, where: str = "ledger") -> list[Migration]:
    """Steps not yet applied (read-only)."""
    version = current_version(conn)
    check_not_newer(version, where)
    return list(MIGRATIONS[version:])


def apply(conn: sqlite3.Connection, where: str = "ledger", now: float | None = None) -> list[str]:
    """Apply every pending step, one transaction each; safe when several processes open a new ledger at once."""
    done: list[str] = []
    while True:
        peek = current_version(conn)
        check_not_newer(peek, where)
        if peek >= LATEST:
            return done
        rebuilds = MIGRATIONS[peek].rebuilds
        fk_on = bool(conn.execute("PRAGMA foreign_keys").fetchone()[0])
        if rebuilds and fk_on:
            conn.execute("PRAGMA foreign_keys = OFF")  # a no-op inside a transaction: before BEGIN
        try:
            conn.execute("BEGIN IMMEDIATE")
            try:
                version = current_version(conn)  # re-read under the write lock: another process may have migrated
                check_not_newer(version, where)
                if version != peek:
                    conn.execute("COMMIT")
                    continue
                step = MIGRATIONS[version]
                for statement in _statements(step.sql):
                    conn.execute(statement)
                if rebuilds and conn.execute("PRAGMA foreign_key_check").fetchall():
                    raise RuntimeError(f"{where}: migration {step.name} would break a foreign key")
                conn.execute("INSERT INTO schema_migrations (version, name, applied_at) VALUES (?, ?, ?)",
                             (version + 1, step.name, time.time() if now is None else now))
                conn.execute(f"PRAGMA user_version = {version + 1:d}")
                conn.execute("COMMIT")
                done.append(step.name)
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
        finally:
            if rebuilds and fk_on:
                conn.execute("PRAGMA foreign_keys = ON")


# ------------------------------------------------------------------------------------------------ PostgreSQL
# The PostgreSQL ledger (issue 12) starts at PG_BASELINE_VERSION: one step creates in PostgreSQL terms what SQLite's
# steps 1 to 7 built (jsonb, CHECKs, partial indexes WHERE state = 'queued', trigger functions) and records each of
# their names, so a schema version means the same tables on both engines. A later step must carry both texts
# (``Migration.pg``): tests/ledger/test_pg_schema.py fails on a step after the baseline without one.
PG_BASELINE_VERSION: Final = 7

PG_BASELINE: Final = """
CREATE TABLE schema_migrations (
    version integer PRIMARY KEY CHECK (version >= 1),
    name text NOT NULL UNIQUE,
    applied_at double precision NOT NULL
);
-- SQLite's json_extract(x, '$.a.b'), as text (what the ledger's reads compare and group by)
CREATE FUNCTION json_extract(j jsonb, path text) RETURNS text LANGUAGE sql IMMUTABLE PARALLEL SAFE AS
$$ SELECT j #>> string_to_array(substr(path, 3), '.') $$;

CREATE TABLE missions (
    id bigint GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
    class text NOT NULL CHECK (class IN ('interactive', 'deadline', 'background')),
    rank smallint NOT NULL CHECK (rank IN (0, 1, 2)),
    state text NOT NULL CHECK (state IN ('queued', 'dispatched', 'running', 'succeeded', 'failed',
                                         'cancelled', 'expired', 'dead')),
    payload jsonb NOT NULL CHECK (length(payload::text) <= 262144),
    request_hash text NOT NULL CHECK (length(request_hash) = 64),
    idempotency_key text UNIQUE CHECK (idempotency_key IS NULL OR length(idempotency_key) BETWEEN 1 AND 200),
    lane text,
    tags jsonb NOT NULL DEFAULT '[]',
    session text,
    deadline double precision,
    max_attempts integer NOT NULL CHECK (max_attempts BETWEEN 1 AND 100),
    attempts integer NOT NULL DEFAULT 0 CHECK (attempts >= 0),
    round_start integer NOT NULL DEFAULT 0 CHECK (round_start >= 0 AND round_start <= attempts),
    current_lane text,
    wait_reason text,
    created_at double precision NOT NULL,
    updated_at double precision NOT NULL,
    result jsonb,
    error text,
    target text NOT NULL DEFAULT '',
    suspect integer NOT NULL DEFAULT 0 CHECK (suspect >= 0),
    CHECK ((state IN ('dispatched', 'running')) = (current_lane IS NOT NULL)),
    CHECK (rank = CASE class WHEN 'interactive' THEN 0 WHEN 'deadline' THEN 1 ELSE 2 END)
);
CREATE INDEX missions_queue ON missions (rank, target, tags, id) WHERE state = 'queued';
CREATE INDEX missions_edf ON missions (rank, deadline) WHERE state = 'queued' AND deadline IS NOT NULL;
CREATE INDEX missions_group_edf ON missions (target, tags, deadline)
    WHERE state = 'queued' AND rank = 1 AND deadline IS NOT NULL;
CREATE INDEX missions_active ON missions (current_lane) WHERE state IN ('dispatched', 'running');
CREATE INDEX missions_state ON missions (state, id);
CREATE INDEX missions_session ON missions (session, state) WHERE session IS NOT NULL;

CREATE TABLE queue_depth (
    rank smallint PRIMARY KEY CHECK (rank IN (0, 1, 2)),
    n bigint NOT NULL CHECK (n >= 0)
);
INSERT INTO queue_depth (rank, n) VALUES (0, 0), (1, 0), (2, 0);

CREATE TABLE attempts (
    mission bigint NOT NULL REFERENCES missions (id),
    n integer NOT NULL CHECK (n >= 1),
    lane text NOT NULL,
    class text NOT NULL CHECK (class IN ('interactive', 'deadline', 'background')),
    invocation text,
    token_hash text NOT NULL CHECK (length(token_hash) = 64),
    state text NOT NULL CHECK (state IN ('dispatched', 'running', 'succeeded', 'failed', 'lost', 'cancelled')),
    dispatched_at double precision NOT NULL,
    started_at double precision,
    heartbeat_at double precision,
    lease_expires double precision NOT NULL,
    finished_at double precision,
    PRIMARY KEY (mission, n)
);
CREATE INDEX attempts_lease ON attempts (lease_expires) WHERE state IN ('dispatched', 'running');
CREATE INDEX attempts_rate ON attempts (lane, class, dispatched_at);

CREATE TABLE usage_daily (
    lane text NOT NULL,
    class text NOT NULL CHECK (class IN ('interactive', 'deadline', 'background')),
    day bigint NOT NULL,
    n bigint NOT NULL CHECK (n >= 0),
    PRIMARY KEY (lane, class, day)
);
CREATE TABLE sessions (
    id text PRIMARY KEY CHECK (strpos(id, ':') > 1),
    lane text NOT NULL,
    created_at double precision NOT NULL,
    updated_at double precision NOT NULL
);
CREATE TABLE lanes (
    name text PRIMARY KEY,
    state text NOT NULL DEFAULT 'active'
        CHECK (state IN ('active', 'draining', 'drained', 'degraded', 'disabled')),
    healthy integer NOT NULL DEFAULT 1 CHECK (healthy IN (0, 1)),
    invocation text,
    swrr bigint NOT NULL DEFAULT 0,
    updated_at double precision NOT NULL,
    weight integer CHECK (weight IS NULL OR weight BETWEEN 0 AND 10000)
);
CREATE TABLE events (
    id bigint GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
    at double precision NOT NULL,
    kind text NOT NULL CHECK (length(kind) BETWEEN 1 AND 64),
    mission bigint,
    lane text,
    session text,
    attempt integer,
    state text,
    data jsonb NOT NULL DEFAULT '{}'
);
CREATE INDEX events_mission ON events (mission, id) WHERE mission IS NOT NULL;
CREATE INDEX events_lane ON events (lane, at) WHERE lane IS NOT NULL;
CREATE INDEX events_session ON events (session, at) WHERE session IS NOT NULL;
CREATE INDEX events_kind ON events (kind, at);
CREATE INDEX events_at ON events (at);

CREATE TABLE queue_waits (
    rank smallint NOT NULL CHECK (rank IN (0, 1, 2)),
    target text NOT NULL,
    tags jsonb NOT NULL,
    reason text NOT NULL,
    since double precision NOT NULL,
    blocked integer NOT NULL DEFAULT 1 CHECK (blocked IN (0, 1)),
    cursor bigint NOT NULL DEFAULT 0,
    PRIMARY KEY (rank, target, tags)
);
CREATE TABLE retention (
    id integer PRIMARY KEY CHECK (id = 1),
    horizon double precision NOT NULL DEFAULT 0,
    pruned_missions bigint NOT NULL DEFAULT 0 CHECK (pruned_missions >= 0),
    pruned_attempts bigint NOT NULL DEFAULT 0 CHECK (pruned_attempts >= 0),
    pruned_events bigint NOT NULL DEFAULT 0 CHECK (pruned_events >= 0),
    last_prune_at double precision,
    last_archive text
);
INSERT INTO retention (id, horizon) VALUES (1, 0);
CREATE TABLE rollups (
    bucket_s integer NOT NULL CHECK (bucket_s IN (300, 3600)),
    start double precision NOT NULL,
    lane text NOT NULL,
    class text NOT NULL,
    succeeded bigint NOT NULL, failed bigint NOT NULL, dead bigint NOT NULL, cancelled bigint NOT NULL,
    expired bigint NOT NULL, requeued bigint NOT NULL, dispatched bigint NOT NULL, fallback bigint NOT NULL,
    busy double precision NOT NULL,
    early bytea NOT NULL,
    queue_wait bytea NOT NULL,
    run_time bytea NOT NULL,
    end_to_end bytea NOT NULL,
    PRIMARY KEY (bucket_s, start, lane, class)
);
CREATE TABLE rollup_traffic (
    bucket_s integer NOT NULL,
    start double precision NOT NULL,
    kind text NOT NULL,
    n bigint NOT NULL,
    PRIMARY KEY (bucket_s, start, kind)
);
CREATE TABLE rollup_state (
    id integer PRIMARY KEY CHECK (id = 1),
    rolled_from double precision NOT NULL,
    rolled_until double precision NOT NULL,
    watermark bigint NOT NULL
);

-- queue depth per rank, exact in the transaction of the change (SQLite's four queue_depth_* triggers)
CREATE FUNCTION queue_depth_count() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP IN ('UPDATE', 'DELETE') AND OLD.state = 'queued' AND (TG_OP = 'DELETE' OR NEW.state <> 'queued') THEN
        UPDATE queue_depth SET n = n - 1 WHERE rank = OLD.rank;
    END IF;
    IF TG_OP IN ('INSERT', 'UPDATE') AND NEW.state = 'queued' AND (TG_OP = 'INSERT' OR OLD.state <> 'queued') THEN
        UPDATE queue_depth SET n = n + 1 WHERE rank = NEW.rank;
    END IF;
    RETURN NULL;
END $$;
CREATE TRIGGER queue_depth_count AFTER INSERT OR DELETE OR UPDATE OF state ON missions
    FOR EACH ROW EXECUTE FUNCTION queue_depth_count();

-- the target follows --lane changes (reroute) and session moves
CREATE FUNCTION missions_target_lane() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    UPDATE missions SET target = coalesce((SELECT s.lane FROM sessions s WHERE s.id = NEW.session), NEW.lane, '')
        WHERE id = NEW.id;
    RETURN NULL;
END $$;
CREATE TRIGGER missions_target_lane AFTER UPDATE OF lane ON missions
    FOR EACH ROW EXECUTE FUNCTION missions_target_lane();
CREATE FUNCTION sessions_target() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    UPDATE missions SET target = NEW.lane WHERE session = NEW.id AND state IN ('queued', 'dispatched', 'running');
    RETURN NULL;
END $$;
CREATE TRIGGER sessions_target AFTER UPDATE OF lane ON sessions FOR EACH ROW EXECUTE FUNCTION sessions_target();
CREATE FUNCTION queue_waits_reenter() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    UPDATE queue_waits SET cursor = NEW.id - 1
        WHERE rank = NEW.rank AND target = NEW.target AND tags = NEW.tags AND cursor >= NEW.id;
    RETURN NULL;
END $$;
CREATE TRIGGER queue_waits_reenter AFTER UPDATE OF state, target ON missions
    FOR EACH ROW WHEN (NEW.state = 'queued') EXECUTE FUNCTION queue_waits_reenter();

-- append-only history; what retention may delete (SQLite's step 5), refused as integrity violations (23000)
CREATE FUNCTION refuse() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION '%', TG_ARGV[0] USING ERRCODE = 'integrity_constraint_violation';
END $$;
CREATE TRIGGER events_no_update BEFORE UPDATE ON events
    FOR EACH ROW EXECUTE FUNCTION refuse('events are append-only');
CREATE FUNCTION events_no_delete() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF OLD.at >= (SELECT horizon FROM retention WHERE id = 1) OR OLD.id >= (SELECT max(id) FROM events)
       OR (OLD.mission IS NOT NULL AND EXISTS (SELECT 1 FROM missions WHERE id = OLD.mission)) THEN
        RAISE EXCEPTION 'events are append-only (only finished history older than the retention horizon may be pruned)'
            USING ERRCODE = 'integrity_constraint_violation';
    END IF;
    RETURN OLD;
END $$;
CREATE TRIGGER events_no_delete BEFORE DELETE ON events FOR EACH ROW EXECUTE FUNCTION events_no_delete();
CREATE TRIGGER retention_forward BEFORE UPDATE OF horizon ON retention
    FOR EACH ROW WHEN (NEW.horizon < OLD.horizon) EXECUTE FUNCTION refuse('the retention horizon only moves forward');
CREATE TRIGGER retention_no_delete BEFORE DELETE ON retention
    FOR EACH ROW EXECUTE FUNCTION refuse('the retention row cannot be deleted');
CREATE FUNCTION missions_no_delete() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF OLD.state IN ('queued', 'dispatched', 'running') OR OLD.updated_at >= (SELECT horizon FROM retention WHERE id = 1) THEN
        RAISE EXCEPTION 'only finished missions older than the retention horizon may be deleted'
            USING ERRCODE = 'integrity_constraint_violation';
    END IF;
    RETURN OLD;
END $$;
CREATE TRIGGER missions_no_delete BEFORE DELETE ON missions FOR EACH ROW EXECUTE FUNCTION missions_no_delete();
CREATE FUNCTION attempts_no_delete() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF EXISTS (SELECT 1 FROM missions WHERE id = OLD.mission AND (state IN ('queued', 'dispatched', 'running')
               OR updated_at >= (SELECT horizon FROM retention WHERE id = 1))) THEN
        RAISE EXCEPTION 'only attempts of finished missions older than the retention horizon may be deleted'
            USING ERRCODE = 'integrity_constraint_violation';
    END IF;
    RETURN OLD;
END $$;
CREATE TRIGGER attempts_no_delete BEFORE DELETE ON attempts FOR EACH ROW EXECUTE FUNCTION attempts_no_delete();
"""

PG_LOCK_KEY: Final = 0x6C616E66
"""The advisory lock a migration of a PostgreSQL ledger holds (several processes may open a new ledger at once)."""


def pg_current_version(conn: Any) -> int:
    """The schema version of a PostgreSQL ledger (0: no ledger tables yet)."""
    exists = conn.execute("SELECT to_regclass('schema_migrations') IS NOT NULL").fetchone()[0]
    if not exists:
        return 0
    return int(conn.execute("SELECT coalesce(max(version), 0) FROM schema_migrations").fetchone()[0])


def pg_pending(conn: Any, where: str = "ledger") -> list[Migration]:
    version = pg_current_version(conn)
    check_not_newer(version, where)
    return [] if version >= LATEST else list(MIGRATIONS[max(version, 0):])


def pg_apply(conn: Any, where: str = "ledger", now: float | None = None) -> list[str]:
    """Bring a PostgreSQL ledger to LATEST: the baseline on an empty database, then each later step's ``pg`` text,
    all in one transaction under a migration lock (PostgreSQL's DDL is transactional)."""
    done: list[str] = []
    conn.execute("BEGIN")
    try:
        conn.execute("SELECT pg_advisory_xact_lock(?)", (PG_LOCK_KEY,))
        version = pg_current_version(conn)
        check_not_newer(version, where)
        at = time.time() if now is None else now
        if version == 0:
            conn.script(PG_BASELINE)  # one script: psycopg sends it as one simple query
            for n, step in enumerate(MIGRATIONS[:PG_BASELINE_VERSION], start=1):
                conn.execute("INSERT INTO schema_migrations (version, name, applied_at) VALUES (?, ?, ?)",
                             (n, step.name, at))
                done.append(step.name)
            version = PG_BASELINE_VERSION
        for n in range(version, LATEST):
            step = MIGRATIONS[n]
            if step.pg is None:
                raise RuntimeError(f"{where}: migration {step.name} has no PostgreSQL text")
            conn.script(step.pg)
            conn.execute("INSERT INTO schema_migrations (version, name, applied_at) VALUES (?, ?, ?)",
                         (n + 1, step.name, at))
            done.append(step.name)
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    return done

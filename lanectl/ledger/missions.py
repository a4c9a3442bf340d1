"""Missions in the ledger: submit (idempotent, admission-controlled), assign, fenced callbacks, recovery.

States: ``queued -> dispatched -> running -> succeeded | failed | cancelled | expired``, ``dead`` when attempts
run out. Every function here that changes a mission does it in one ``BEGIN IMMEDIATE`` transaction that also
appends the event (lanectl.ledger.events). Time is always passed in (``now``, seconds since the epoch).

Fencing: each dispatch is attempt ``n`` of a mission, bound to one lane and the lane's systemd invocation, with a
random token of which only the SHA-256 is stored. A callback must name mission, lane, attempt and token; anything
else is refused with ``lease_fenced`` (exit 5) and recorded as ``callback_rejected``. A repeated completion of
the same kind is a no-op (``changed=False``).
"""
from __future__ import annotations

import base64
import hashlib
import hmac
import json
import math
import re
import secrets
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Final

from lanectl.errors import Conflict, ExitCode, LanectlError, NotFound, Problem
from lanectl.states import ACTIVE, CLASS_NAMES, CLASSES, FINISHED, RANK, UNFINISHED
from lanectl.states import MISSION_STATES as STATES
from lanectl.timeparse import relative_deadline
from lanectl.ledger import Ledger, events
from lanectl.ledger.events import EventKind, append

if TYPE_CHECKING:
    from lanectl.config import LaneSet
    from lanectl.dispatch import Assignment

MAX_PAYLOAD_BYTES: Final = 256 * 1024
"""Largest payload accepted, as canonical JSON (``payload_too_large`` beyond it)."""
SESSION_RE: Final = re.compile(r"^([a-z][a-z0-9-]{0,30}):([A-Za-z0-9._-]{1,128})$")
KEY_RE: Final = re.compile(r"^[\x21-\x7e]{1,200}$")


MAX_DEADLINE: Final = 253402300799.0
"""9999-12-31T23:59:59Z: the latest deadline (every reader prints deadlines as dates)."""


COLUMNS: Final = ("id, class, state, payload, idempotency_key, lane, tags, session, deadline, max_attempts, "
                  "attempts, round_start, current_lane, wait_reason, created_at, updated_at, result, error, "
                  "(SELECT a.lane FROM attempts a WHERE a.mission = missions.id AND a.n = missions.attempts)")


def iso(ts: float | None) -> str | None:
    return None if ts is None else datetime.fromtimestamp(ts, UTC).isoformat().replace("+00:00", "Z")


def canonical(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def _tokens(n: int) -> Iterator[str]:
    """``n`` fresh attempt tokens: 192 random bits each, URL-safe, like ``secrets.token_urlsafe(24)``, drawn from
    the OS's CSPRNG in one call for the whole batch."""
    pool = secrets.token_bytes(24 * n)
    for i in range(0, 24 * n, 24):
        yield base64.urlsafe_b64encode(pool[i:i + 24]).rstrip(b"=").decode("ascii")


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def invalid(field_: str, message: str, hint: str, code: str = "invalid_input") -> LanectlError:
    """Bad input from a producer or operator: exit 2 (USAGE), nothing written."""
    return LanectlError(f"{field_}: {message}", hint, code, ExitCode.USAGE,
                        [Problem(message, field=field_, hint=hint, code=code)])


@dataclass(frozen=True)
class Mission:
    id: int
    cls: str
    state: str
    payload: Any
    idempotency_key: str | None
    lane: str | None
    tags: list[str]
    session: str | None
    deadline: float | None
    max_attempts: int
    attempts: int
    round_start: int
    current_lane: str | None
    wait_reason: str | None
    created_at: float
    updated_at: float
    result: Any = None
    error: str | None = None
    last_lane: str | None = None
    """The lane of its latest attempt (where it runs, or where it last ran), None before its first dispatch."""

    @classmethod
    def from_row(cls, row: Sequence[Any]) -> Mission:
        r = list(row)
        r[3] = json.loads(r[3])
        r[6] = json.loads(r[6])
        r[16] = None if r[16] is None else json.loads(r[16])
        return cls(*r)

    def as_dict(self) -> dict[str, Any]:
        return {
            "id": self.id, "class": self.cls, "state": self.state, "payload": self.payload,
            "idempotency_key": self.idempotency_key, "lane": self.lane, "tags": self.tags,
            "session": self.session, "deadline": iso(self.deadline), "max_attempts": self.max_attempts,
            "attempts": self.attempts, "current_lane": self.current_lane, "wait_reason": self.wait_reason,
            "created_at": iso(self.created_at), "updated_at": iso(self.updated_at), "result": self.result,
            "error": self.error, "last_lane": self.last_lane,
        }


@dataclass(frozen=True)
class SubmitResult:
    mission: Mission
    created: bool


@dataclass(frozen=True)
class Dispatch:
    """One recorded assignment: what the supervisor POSTs to the lane after commit (the token is shown once)."""

    mission: int
    attempt: int
    lane: str
    token: str
    cls: str
    session: str | None
    deadline: float | None
    payload: Any
    invocation: str | None
    lease_expires: float


@dataclass(frozen=True)
class CallbackResult:
    mission: Mission
    changed: bool


# ---------------------------------------------------------------------------------------------------- submit


@dataclass
class _Request:
    cls: str
    payload_json: str
    deadline: float | None
    lane: str | None
    tags: list[str]
    session: str | None
    session_owner: str | None
    key: str | None
    max_attempts: int
    hash: str = field(default="")
    session_stays: bool | None = None


def _validate(fleet: LaneSet, *, cls: str, payload: Any, deadline: float | str | None, lane: str | None,
              tags: Iterable[str], session: str | None, key: str | None, max_attempts: int | None,
              now: float, known_sessions: Mapping[str, str] | None) -> _Request:
    if cls not in RANK:
        raise invalid("class", f"{cls!r} is not a mission class", f"use {CLASS_NAMES}",
                      "unknown_class")
    if isinstance(payload, (str, bytes)):
        try:
            payload = json.loads(payload)
        except ValueError as exc:
            raise invalid("payload", f"is not JSON ({exc})", "pass a JSON document, or '-- COMMAND ARGS'",
                          "payload_not_json") from exc
    try:
        payload_json = canonical(payload)
    except (TypeError, ValueError, RecursionError) as exc:
        raise invalid("payload", f"cannot be stored as JSON ({exc})", "use only JSON types (no NaN)",
                      "payload_not_json") from exc
    size = len(payload_json.encode())
    if size > MAX_PAYLOAD_BYTES:
        raise invalid("payload", f"is {size} bytes, more than the {MAX_PAYLOAD_BYTES} allowed",
                      "store large inputs in the lane's workspace and pass their path", "payload_too_large")
    # The idempotency fingerprint covers the request as the producer wrote it: a relative deadline is its text
    # ("+30m", resolved once, at the submit that creates the mission), so a retry of the same text is the same
    # request however much later it comes, and another text is another request.
    deadline_as_written: Any = deadline
    if isinstance(deadline, str):
        text = deadline.strip()
        resolved = relative_deadline(text, now)
        if resolved is None:
            raise invalid("deadline", f"{deadline!r} is not a relative deadline",
                          "give +30s, +10m, +2h or +1d, or a time as seconds since the epoch", "bad_deadline")
        deadline, deadline_as_written = resolved, {"relative": text}
    if deadline is not None and not (isinstance(deadline, (int, float)) and math.isfinite(deadline)
                                     and deadline <= MAX_DEADLINE):
        raise invalid("deadline", f"{deadline!r} is not a time lanectl can store (at most {iso(MAX_DEADLINE)})",
                      "give a time before the year 10000, e.g. --deadline +30d", "bad_deadline")
    if deadline is not None and deadline <= now:
        raise invalid("deadline", f"{iso(deadline)} is not in the future (now {iso(now)})",
                      "give a later time, e.g. --deadline +10m", "deadline_past")
    if cls == "deadline" and deadline is None:
        raise invalid("deadline", "the deadline class needs a deadline", "add --deadline, or use another class",
                      "deadline_missing")
    if max_attempts is None:
        max_attempts = fleet.settings.classes[cls].max_attempts  # type: ignore[index]
    if not 1 <= max_attempts <= 100:
        raise invalid("max_attempts", f"{max_attempts} is out of range", "use 1 to 100", "bad_max_attempts")
    if key is not None and not KEY_RE.match(key):
        raise invalid("idempotency_key", "must be 1-200 printable ASCII characters without spaces",
                      "use e.g. a UUID or 'producer:job-42'", "bad_idempotency_key")
    tags = sorted(set(tags))
    if lane is not None:
        if lane not in fleet.lanes:
            known = ", ".join(sorted(fleet.lanes)) or "none"
            raise NotFound(f"lane: no lane named {lane!r}", f"use one of: {known}", "lane_not_found")
        served = fleet.lanes[lane]
        if cls not in served.classes:
            raise invalid("lane", f"lane {lane!r} does not serve the {cls} class",
                          f"it serves {', '.join(served.classes)}; pick another lane or class", "lane_class")
    for tag in tags:
        if not any(tag in ln.tags for ln in fleet.lanes.values()):
            raise NotFound(f"tag: no lane carries the tag {tag!r}", "check the tags in lanes.d/*.toml",
                           "tag_not_found")
    owner = None
    if session is not None and known_sessions is None:  # checked against the ledger's sessions later
        if not SESSION_RE.match(session):
            raise invalid("session", f"{session!r} is not a session id", "use PREFIX:ID, e.g. alpha:chat-42",
                          "bad_session")
    elif session is not None:
        owner = _session_owner(fleet, session, known_sessions)
        if lane is not None and lane != owner:
            raise Conflict(f"session: {session!r} belongs to lane {owner!r}, not {lane!r}",
                           "drop --lane, or submit without --session", "session_lane_mismatch")
        if cls not in fleet.lanes[owner].classes:  # it could never run: no other lane may take a session's work
            raise invalid("session", f"session {session!r} belongs to lane {owner!r}, which does not serve the "
                          f"{cls} class", f"it serves {', '.join(fleet.lanes[owner].classes)}; submit without "
                          f"--session, or move the session ('lanectl reroute {owner} --to LANE --sessions')",
                          "lane_class")
    req = _Request(cls, payload_json, deadline, lane, tags, session, owner, key, max_attempts)
    req.hash = hashlib.sha256(canonical([cls, payload_json, deadline_as_written, lane, tags, session, max_attempts])
                              .encode()).hexdigest()
    return req


def _session_owner(fleet: LaneSet, session: str, known: Mapping[str, str]) -> str:
    if session in known:
        if known[session] not in fleet.lanes:  # its lane was removed or renamed: nothing could ever run it
            raise Conflict(f"session: {session!r} belongs to lane {known[session]!r}, which is no longer in the fleet",
                           f"move its sessions: 'lanectl reroute {known[session]} --to LANE --sessions'",
                           "session_lane_gone")
        return known[session]
    m = SESSION_RE.match(session)
    if not m:
        raise invalid("session", f"{session!r} is not a session id", "use PREFIX:ID, e.g. alpha:chat-42",
                      "bad_session")
    for name, lane in fleet.lanes.items():
        if lane.resolved_prefix(name) == m.group(1):
            return name
    prefixes = ", ".join(sorted(ln.resolved_prefix(n) for n, ln in fleet.lanes.items())) or "none"
    raise NotFound(f"session: no lane owns the session prefix {m.group(1)!r}",
                   f"known prefixes: {prefixes}", "session_not_found")


@dataclass(frozen=True)
class SubmitRequest:
    """One mission to queue with ``submit_many`` (the keyword arguments of ``submit``)."""

    cls: str
    payload: Any
    deadline: float | str | None = None
    """Seconds since the epoch, or a relative deadline as text (``+30m``): see ``relative_deadline``."""
    lane: str | None = None
    tags: tuple[str, ...] = ()
    session: str | None = None
    idempotency_key: str | None = None
    max_attempts: int | None = None
    session_stays: bool | None = None
    """The session's choice when its lane's host is dead or drained: True, it waits for its lane; False, it moves
    to a lane that can take it (a new session's default); None: a new session gets the default, an existing one
    keeps its choice. Not part of the idempotency fingerprint: it is the session's, not the mission's."""


MAX_BATCH: Final = 1000
"""Most requests one ``submit_many`` call takes (one transaction; keeps the write lock short)."""
_INSERT_CHUNK: Final = 200
_MISSION_INSERT: Final = ("INSERT INTO missions (class, rank, state, payload, request_hash, idempotency_key, lane, "
                          "tags, session, target, deadline, max_attempts, created_at, updated_at) VALUES ")


def submit(ledger: Ledger, fleet: LaneSet, *, cls: str, payload: Any, now: float,
           deadline: float | str | None = None,
           lane: str | None = None, tags: Iterable[str] = (), session: str | None = None,
           idempotency_key: str | None = None, max_attempts: int | None = None,
           session_stays: bool | None = None) -> SubmitResult:
    """Queue a mission; the same idempotency key and request returns the existing one (``created=False``)."""
    req = SubmitRequest(cls, payload, deadline, lane, tuple(tags), session, idempotency_key, max_attempts,
                        session_stays)
    return submit_many(ledger, fleet, [req], now=now)[0]


def submit_many(ledger: Ledger, fleet: LaneSet, requests: Sequence[SubmitRequest], *,
                now: float) -> list[SubmitResult]:
    """Queue several missions in one transaction, all or nothing, results in request order.

    Every request is validated first; any bad one fails the whole batch with its index in the message and
    nothing written. Admission control counts the whole batch: if it does not fit a class's queue limit, no
    mission of the batch is queued, each request is recorded as ``submit_refused`` and ``queue_full`` is raised.
    Idempotency keys that exist already (or repeat inside the batch) return the first mission (``created=False``).
    """
    if not requests:
        return []
    if len(requests) > MAX_BATCH:
        raise invalid("requests", f"{len(requests)} missions in one batch, more than {MAX_BATCH}",
                      f"split the batch into chunks of at most {MAX_BATCH}", "batch_too_large")
    sessions = sorted({r.session for r in requests if r.session is not None})
    known = _known_sessions(ledger.conn, sessions)
    deferred: LanectlError | None = None
    try:
        reqs: list[_Request] | None = _validate_all(fleet, requests, now, known)
    except LanectlError as exc:  # it may name another host's lane, tag or session: checked with theirs below
        deferred, reqs = exc, None
    refused: LanectlError | None = None
    with ledger.transaction() as conn:
        again = _known_sessions(conn, sessions) if sessions else known  # a session may have appeared or moved
        if reqs is None or again != known:
            known = again
            full = with_other_hosts(conn, fleet) if deferred is not None else fleet
            reqs = _validate_all(full, requests, now, known)
        results: list[SubmitResult | None] = [None] * len(reqs)
        keys = [r.key for r in reqs if r.key is not None]
        existing: dict[str, tuple[Any, ...]] = {}
        for i in range(0, len(keys), 500):
            chunk = keys[i:i + 500]
            for row in conn.execute(f"SELECT request_hash, {COLUMNS} FROM missions WHERE idempotency_key IN "
                                    f"({','.join('?' * len(chunk))})", chunk):
                existing[row[5]] = row
        new: list[int] = []
        first_of_key: dict[str, int] = {}
        for i, req in enumerate(reqs):
            if req.key is not None and req.key in existing:
                row = existing[req.key]
                if row[0] != req.hash:
                    raise _idempotency_conflict(req.key, row[1])
                results[i] = SubmitResult(Mission.from_row(row[1:]), False)
            elif req.key is not None and req.key in first_of_key:
                if reqs[first_of_key[req.key]].hash != req.hash:
                    raise _idempotency_conflict(req.key, None)
                new.append(i)  # filled in from its first occurrence below
            else:
                if req.key is not None:
                    first_of_key[req.key] = i
                new.append(i)
        creating = [i for i in new if reqs[i].key is None or first_of_key[reqs[i].key] == i]  # type: ignore[index]
        depth = dict(conn.execute("SELECT rank, n FROM queue_depth").fetchall())
        wanted: dict[str, int] = {}
        for i in creating:
            wanted[reqs[i].cls] = wanted.get(reqs[i].cls, 0) + 1
        full = {c: (depth[RANK[c]], fleet.settings.classes[c].queue_limit)  # type: ignore[index]
                for c, n in wanted.items()
                if depth[RANK[c]] + n > fleet.settings.classes[c].queue_limit}  # type: ignore[index]
        if full:
            events.append_many(conn, [
                events.row(EventKind.SUBMIT_REFUSED, now, lane=reqs[i].lane, session=reqs[i].session,
                           cls=reqs[i].cls, queued=full[reqs[i].cls][0], limit=full[reqs[i].cls][1],
                           idempotency_key=reqs[i].key, batch=len(creating) if len(creating) > 1 else None)
                for i in creating if reqs[i].cls in full])
            c, (queued, limit) = sorted(full.items(), key=lambda kv: RANK[kv[0]])[0]
            more = f", this batch adds {wanted[c]}" if len(creating) > 1 else ""
            refused = Conflict(f"class: the {c} queue is full ({queued} queued, limit {limit}{more})",
                               f"retry later (backpressure), or raise classes.{c}.queue_limit in lanectl.toml",
                               "queue_full")
        else:
            _insert_new(conn, reqs, creating, results, known, now)
            for i in new:
                if results[i] is None:  # a key repeated inside the batch: the mission its first use created
                    results[i] = SubmitResult(results[first_of_key[reqs[i].key]].mission, False)  # type: ignore
    if refused is not None:
        raise refused
    return results  # type: ignore[return-value]


def _known_sessions(conn: Any, sessions: Sequence[str]) -> dict[str, str]:
    known: dict[str, str] = {}
    for i in range(0, len(sessions), 500):
        chunk = sessions[i:i + 500]
        known.update(conn.execute(f"SELECT id, lane FROM sessions WHERE id IN ({','.join('?' * len(chunk))})",
                                  chunk).fetchall())
    return known


def check_requests(fleet: LaneSet, requests: Sequence[SubmitRequest], now: float, *, shared: bool = False) -> None:
    """Every check of ``submit_many`` that needs no ledger (sessions' owners excepted), with the same errors: run
    it before opening the ledger, so that a refused request creates no ledger file. ``shared`` (a PostgreSQL
    ledger other hosts may share): a lane or tag not in this host's ``lanes.d/`` may be another host's, so it is
    left to ``submit_many``, which knows every host's lanes."""
    if len(requests) > MAX_BATCH:
        raise invalid("requests", f"{len(requests)} missions in one batch, more than {MAX_BATCH}",
                      f"split the batch into chunks of at most {MAX_BATCH}", "batch_too_large")
    try:
        _validate_all(fleet, requests, now, None)
    except LanectlError as exc:
        if not (shared and exc.code in ("lane_not_found", "tag_not_found")):
            raise
        # the first refusal may be another host's lane or tag: from that request on, the batch is checked in
        # order by submit_many, against every host's lanes (a PostgreSQL ledger is never created by a submit)


@dataclass(frozen=True)
class _Published:
    """Another host's lane as the ledger knows it (its host's published spec): what a submit checks of it."""

    classes: list[str]
    tags: list[str]
    session_prefix: str

    def resolved_prefix(self, name: str) -> str:
        return self.session_prefix or name


@dataclass(frozen=True)
class _Fleet:
    lanes: Mapping[str, Any]
    settings: Any
    lanes_dir: Any = None


def with_other_hosts(conn: Any, fleet: LaneSet) -> LaneSet:
    """``fleet`` and the lanes other hosts of the ledger run (their published specs), for a submit's checks:
    ``--lane``, ``--tag`` and ``--session`` may name them (issue 13). Not this host's own lanes (one removed from
    its lanes.d/ is gone, ``session_lane_gone``, even though its spec is still in the ledger), nor a forgotten
    host's (nobody runs them). The same fleet when there are none (SQLite)."""
    other: dict[str, Any] = {}
    here = getattr(fleet.settings, "host", None)
    for name, spec in conn.execute("SELECT l.name, l.spec FROM lanes l JOIN hosts h ON h.name = l.host "
                                   "WHERE l.spec IS NOT NULL AND h.state <> 'forgotten' AND l.host <> ?",
                                   (here or "",)):
        if name not in fleet.lanes:
            doc = json.loads(spec)
            other[name] = _Published(list(doc["classes"]), list(doc.get("tags") or ()),
                                     doc.get("session_prefix") or name)
    if not other:
        return fleet
    return _Fleet({**fleet.lanes, **other}, fleet.settings, fleet.lanes_dir)  # type: ignore[return-value]


def _validate_all(fleet: LaneSet, requests: Sequence[SubmitRequest], now: float,
                  known: Mapping[str, str] | None) -> list[_Request]:
    out = []
    for i, r in enumerate(requests):
        try:
            out.append(_validate(fleet, cls=r.cls, payload=r.payload, deadline=r.deadline, lane=r.lane,
                                 tags=r.tags, session=r.session, key=r.idempotency_key,
                                 max_attempts=r.max_attempts, now=now, known_sessions=known))
            out[-1].session_stays = r.session_stays
            if r.session_stays is not None and r.session is None:
                raise invalid("session_stays", "is a choice of a session, and the mission has none",
                              "add --session, or drop the choice", "session_missing")
        except LanectlError as exc:
            if len(requests) > 1:
                exc.message = f"request {i}: {exc.message}"
                for p in exc.problems:
                    p.field = f"requests[{i}].{p.field}" if p.field else f"requests[{i}]"
            raise
    return out


def _idempotency_conflict(key: str, mission: int | None) -> Conflict:
    where = f"mission {mission}" if mission is not None else "another mission of this batch"
    return Conflict(f"idempotency_key: {key!r} was used for {where} with another request",
                    "use a new key for a new mission, or resend the original request", "idempotency_conflict")


def _insert_new(conn: Any, reqs: list[_Request], creating: list[int], results: list[SubmitResult | None],
                known: Mapping[str, str], now: float) -> None:
    """Insert the new missions (multi-row INSERTs), their new sessions and their events, in request order."""
    ids: list[int] = []
    for c in range(0, len(creating), _INSERT_CHUNK):
        chunk = creating[c:c + _INSERT_CHUNK]
        params: list[Any] = []
        for i in chunk:
            r = reqs[i]
            params += (r.cls, RANK[r.cls], r.payload_json, r.hash, r.key, r.lane,
                       canonical(r.tags) if r.tags else "[]", r.session, r.session_owner or r.lane or "",
                       r.deadline, r.max_attempts, now, now)
        rows = conn.execute(_MISSION_INSERT + ",".join(["(?,?,'queued',?,?,?,?,?,?,?,?,?,?,?)"] * len(chunk))
                            + " RETURNING id, request_hash", params).fetchall()
        rows.sort()  # rowids are handed out in VALUES order (max + 1 each); RETURNING's order is unspecified
        if [h for _, h in rows] != [reqs[i].hash for i in chunk]:
            raise RuntimeError("mission ids did not follow insertion order")  # rolls the batch back
        ids += [r[0] for r in rows]
    created: dict[str, str] = {}
    new_sessions: list[tuple[str, str, float, float, int]] = []
    evs: list[events.EventRow] = []
    chosen: dict[str, bool] = {}  # an existing session's choice, as the batch last gives it
    for i, mission_id in zip(creating, ids):
        r = reqs[i]
        if r.session is not None and r.session not in known and r.session not in created:
            created[r.session] = r.session_owner  # type: ignore[assignment]
            new_sessions.append((r.session, r.session_owner, now, now, int(bool(r.session_stays))))  # type: ignore
            evs.append(events.row(EventKind.SESSION_CREATED, now, lane=r.session_owner, session=r.session,
                                  stays=bool(r.session_stays) or None))
        elif r.session is not None and r.session_stays is not None and r.session not in created:
            chosen[r.session] = r.session_stays
        evs.append(events.row(EventKind.SUBMITTED, now, mission=mission_id, lane=r.lane, session=r.session,
                              cls=r.cls, deadline=r.deadline))
        results[i] = SubmitResult(Mission(mission_id, r.cls, "queued", json.loads(r.payload_json), r.key, r.lane,
                                          list(r.tags), r.session, r.deadline, r.max_attempts, 0, 0, None, None,
                                          now, now), True)
    if new_sessions:
        conn.executemany("INSERT INTO sessions (id, lane, created_at, updated_at, stays) VALUES (?, ?, ?, ?, ?)",
                         new_sessions)
    for session, stays in sorted(chosen.items()):
        row = conn.execute("UPDATE sessions SET stays = ?, updated_at = ? WHERE id = ? AND stays <> ? RETURNING lane",
                           (int(stays), now, session, int(stays))).fetchone()
        if row is not None:
            evs.append(events.row(EventKind.SESSION_CHOICE, now, lane=row[0], session=session, stays=stays))
    events.append_many(conn, evs)


# ---------------------------------------------------------------------------------------------------- reads


_HANDED_OUT: Final = {
    # the retention row when mission id ? was handed out (at or below the ids' high-water mark) and may be pruned
    "sqlite": "SELECT r.horizon, r.last_archive FROM retention r, sqlite_sequence s WHERE r.id = 1 AND "
              "r.last_archive IS NOT NULL AND s.name = 'missions' AND ? <= s.seq",
    "postgresql": "SELECT r.horizon, r.last_archive FROM retention r WHERE r.id = 1 AND r.last_archive IS NOT NULL "
                  "AND ? <= coalesce(pg_sequence_last_value(pg_get_serial_sequence('missions', 'id')), 0)",
}


def get(ledger: Ledger, mission_id: int) -> Mission:
    row = ledger.conn.execute(f"SELECT {COLUMNS} FROM missions WHERE id = ?", (mission_id,)).fetchone()
    if row is None:
        hint = "list them with 'lanectl missions'"
        # the prune that took it: each one records the range of mission ids it archives before it deletes any
        where = [r[0] for r in ledger.conn.execute(
            "SELECT json_extract(data, '$.archive') FROM events INDEXED BY events_kind WHERE kind = 'prune' "
            "AND json_extract(data, '$.missions_from') <= ?1 AND json_extract(data, '$.missions_to') >= ?1 "
            "GROUP BY 1 ORDER BY max(id) DESC LIMIT 3", (mission_id,)) if r[0]]
        pruned = ledger.conn.execute(_HANDED_OUT[ledger.dialect], (mission_id,)).fetchone()
        if where:  # (two prunes' id ranges can overlap around a long-running mission: every candidate is named)
            hint = f"it was pruned: its record is in the retention archive {' or '.join(where)}"
        elif pruned is not None:  # the id was handed out: it finished before the retention horizon and was pruned
            hint = (f"it was pruned if it finished before {iso(pruned[0])} (the retention horizon): its record is in "
                    f"a retention archive (the latest: {pruned[1]}); else {hint}")
        raise NotFound(f"no mission {mission_id} in {ledger.path}", hint, "mission_not_found")
    return Mission.from_row(row)


def list_missions(ledger: Ledger, *, state: str | None = None, lane: str | None = None, cls: str | None = None,
                  session: str | None = None, limit: int = 100, after_id: int = 0) -> list[Mission]:
    """Missions matching every filter, oldest first (``after_id`` pages on)."""
    if state is not None and state not in STATES:
        raise invalid("state", f"{state!r} is not a mission state", f"use one of {', '.join(STATES)}",
                      "unknown_state")
    if cls is not None and cls not in RANK:
        raise invalid("class", f"{cls!r} is not a mission class", f"use {CLASS_NAMES}",
                      "unknown_class")
    where, params = ["id > ?"], [after_id]
    if state == "queued":
        where.append("state = 'queued'")  # literal, so the partial index serves it
    elif state is not None:
        where.append("state = ?")
        params.append(state)
    if cls is not None:
        where.append("rank = ?")
        params.append(RANK[cls])
    if lane is not None:  # pinned to it, or its latest attempt is (or was) there
        where.append("(lane = ? OR current_lane = ? OR EXISTS (SELECT 1 FROM attempts a WHERE a.mission = missions.id "
                     "AND a.n = missions.attempts AND a.lane = ?))")
        params += [lane, lane, lane]
    if session is not None:
        where.append("session = ?")
        params.append(session)
    rows = ledger.conn.execute(f"SELECT {COLUMNS} FROM missions WHERE {' AND '.join(where)} ORDER BY id LIMIT ?",
                               (*params, limit)).fetchall()
    return [Mission.from_row(r) for r in rows]


def state_counts(conn: Any) -> dict[str, int]:
    """Missions queued, dispatched and running, in O(classes + in flight): the queue depth comes from the
    trigger-kept ``queue_depth`` table, never from counting a possibly million-row queue."""
    counts = {"queued": int(conn.execute("SELECT coalesce(sum(n), 0) FROM queue_depth").fetchone()[0])}
    counts.update(conn.execute("SELECT state, count(*) FROM missions WHERE state IN ('dispatched', 'running') "
                               "GROUP BY state").fetchall())
    return {k: v for k, v in counts.items() if v}


def attempts_of(ledger: Ledger, mission_id: int) -> list[dict[str, Any]]:
    rows = ledger.query("SELECT n, lane, class, invocation, state, dispatched_at, started_at, heartbeat_at, "
                        "lease_expires, finished_at FROM attempts WHERE mission = ? ORDER BY n", (mission_id,))
    for r in rows:
        for k in ("dispatched_at", "started_at", "heartbeat_at", "lease_expires", "finished_at"):
            r[k] = iso(r[k])
    return rows


# ---------------------------------------------------------------------------------------------------- assign


def assign(ledger: Ledger, assignments: Sequence[Assignment], *, now: float, lease_sec: float,
           swrr: Mapping[str, int] | None = None, invocations: Mapping[str, str | None] | None = None
           ) -> list[Dispatch]:
    """Record a dispatch decision atomically (one transaction: group commit); stale entries are skipped."""
    with ledger.transaction() as conn:
        return assign_in(conn, assignments, now=now, lease_sec=lease_sec, swrr=swrr, invocations=invocations)


_CLAIM_SET: Final = ("UPDATE missions SET state = 'dispatched', attempts = attempts + 1, current_lane = ?, "
                     "wait_reason = NULL, updated_at = ? WHERE ")
_CLAIM_RETURNING: Final = " RETURNING id, attempts, class, session, deadline, payload"
_CLAIMS: Final = {
    # the claim of planned missions, per dialect. PostgreSQL: the rows are locked FOR UPDATE SKIP LOCKED first, so
    # a mission row another transaction holds (a tool's SELECT ... FOR UPDATE, a later multi-host claimer) is
    # skipped by this pass instead of waited on: it stays queued and a later pass takes it. The outer
    # "state = 'queued'" re-checks the row as locked (docs/decisions.md, claims on PostgreSQL).
    "sqlite": _CLAIM_SET + "state = 'queued' AND id IN ({})" + _CLAIM_RETURNING,
    "postgresql": _CLAIM_SET + "id IN (SELECT id FROM missions WHERE state = 'queued' AND id IN ({}) "
                  "FOR UPDATE SKIP LOCKED) AND state = 'queued'" + _CLAIM_RETURNING,
}
_CLAIM_CHUNK: Final = 500


def assign_in(conn: Any, assignments: Sequence[Assignment], *, now: float, lease_sec: float,
              swrr: Mapping[str, int] | None = None, invocations: Mapping[str, str | None] | None = None
              ) -> list[Dispatch]:
    out: list[Dispatch] = []
    day = int(now // 86400)
    invocations = invocations or {}
    attempts: list[tuple[Any, ...]] = []
    usage: dict[tuple[str, str], int] = {}
    evs: list[events.EventRow] = []
    tokens = _tokens(len(assignments))
    claim = _CLAIMS[getattr(conn, "dialect", "sqlite")]
    # Missions without a session cannot conflict with one another: claim them with one statement per lane.
    claimed: dict[int, tuple[Any, ...]] = {}
    plain: dict[str, list[int]] = {}
    for a in assignments:
        if a.session is None:
            plain.setdefault(a.lane, []).append(a.mission)
    for lane, ids in plain.items():
        for i in range(0, len(ids), _CLAIM_CHUNK):
            chunk = ids[i:i + _CLAIM_CHUNK]
            for r in conn.execute(claim.format(",".join("?" * len(chunk))), (lane, now, *chunk)):
                claimed[r[0]] = r[1:]
    for a in assignments:
        if a.session is not None:
            owner = conn.execute("SELECT lane FROM sessions WHERE id = ?", (a.session,)).fetchone()
            busy = conn.execute("SELECT 1 FROM missions WHERE session = ? AND state IN ('dispatched', 'running') "
                                "AND current_lane <> ? LIMIT 1", (a.session, a.lane)).fetchone()
            if busy or (owner and owner[0] != a.lane and a.session_move is None):
                continue  # would put one session on two lanes: the plan was stale
            if owner and a.session_move is not None and owner[0] != a.session_move[0]:
                continue  # the session moved meanwhile (another host's pass, an operator): the plan was stale
            found = conn.execute(claim.format("?"), (a.lane, now, a.mission)).fetchone()
            row = None if found is None else found[1:]
        else:
            row = claimed.pop(a.mission, None)  # pop: a mission planned twice is dispatched once
        if row is None:
            continue  # no longer queued (cancelled meanwhile): the plan was stale
        n, cls, session, deadline, payload = row
        if a.session_move is not None and session is not None:
            old, new = a.session_move
            conn.execute("UPDATE sessions SET lane = ?, updated_at = ? WHERE id = ?", (new, now, session))
            hosts = dict(conn.execute("SELECT name, host FROM lanes WHERE name IN (?, ?)", (old, new)).fetchall())
            evs.append(events.row(EventKind.SESSION_MOVED, now, lane=new, session=session, from_lane=old,
                                  reason=a.move_reason or ("fallback" if a.fallback_from else "reroute"),
                                  from_host=hosts.get(old), to_host=hosts.get(new)))
        token = next(tokens)
        invocation = invocations.get(a.lane)
        attempts.append((a.mission, n, a.lane, cls, invocation, token_hash(token), now, now + lease_sec))
        usage[(a.lane, cls)] = usage.get((a.lane, cls), 0) + 1
        evs.append(events.row(EventKind.DISPATCHED, now, mission=a.mission, lane=a.lane, session=session, attempt=n,
                              cls=cls, fallback_from=a.fallback_from, aged=a.aged or None,
                              budget_spent=a.budget_spent or None))
        out.append(Dispatch(a.mission, n, a.lane, token, cls, session, deadline, json.loads(payload), invocation,
                            now + lease_sec))
    if attempts:
        conn.executemany("INSERT INTO attempts (mission, n, lane, class, invocation, token_hash, state, "
                         "dispatched_at, lease_expires) VALUES (?, ?, ?, ?, ?, ?, 'dispatched', ?, ?)", attempts)
        conn.executemany("INSERT INTO usage_daily (lane, class, day, n) VALUES (?, ?, ?, ?) "
                         "ON CONFLICT (lane, class, day) DO UPDATE SET n = n + excluded.n",
                         [(lane, cls, day, k) for (lane, cls), k in usage.items()])
    events.append_many(conn, evs)
    if swrr:
        from lanectl.ledger import lanes  # the lanes table's one writer (it imports this module: not at the top)

        lanes.save_swrr(conn, swrr, now=now)
    return out


# ---------------------------------------------------------------------------------------------------- callbacks

_DONE_AS: Final = {"succeeded": "succeeded", "failed": "failed", "cancelled": "cancelled", "lost": "cancelled"}
CALLBACK_KINDS: Final = ("started", "heartbeat", "succeeded", "failed", "cancelled")
_FENCE_CHUNK: Final = 400


@dataclass(frozen=True)
class Callback:
    """One report from a lane about an attempt it holds; ``apply_callbacks_in`` fences and applies it.

    ``cancelled`` confirms the lane stopped an attempt that is already over in the ledger (it changes nothing);
    ``failed`` with ``retry`` re-queues the mission while attempts remain; with ``uncharged`` (the lane could not
    start it: no task or memory left, its command never ran) it goes back to the queue without costing an attempt
    and without counting as a failure of the lane, as a dispatch the lane refused (``return_attempt``).
    """

    kind: str
    mission: int
    lane: str
    attempt: int
    token: str
    result: Any = None
    error: str | None = None
    retry: bool = False
    uncharged: bool = False


@dataclass(frozen=True)
class CallbackOutcome:
    changed: bool
    state: str | None
    """The mission's state after the callback (None when there is no such mission)."""
    rejected: str | None = None
    """Why the callback was refused (fencing), None when it was accepted."""

    def refusal(self, cb: Callback) -> Conflict:
        return Conflict(f"callback {cb.kind} for mission {cb.mission} attempt {cb.attempt} from lane {cb.lane!r} "
                        f"refused: {self.rejected}",
                        "the lane must drop this attempt; it was re-dispatched or never its own", "lease_fenced")


class _Deferred:
    """Row updates of a callback batch, applied in order per table, one ``executemany`` per run of equal SQL.

    Per-table order is all that matters: none of these statements reads the other table. Anything that must read
    a row it may have changed (``_lose``) flushes first."""

    def __init__(self, conn: Any) -> None:
        self.conn = conn
        self.tables: dict[str, list[tuple[str, list[tuple[Any, ...]], bool]]] = {"attempts": [], "missions": []}

    def add(self, table: str, sql: str, params: tuple[Any, ...], *, checked: bool = False) -> None:
        runs = self.tables[table]
        if runs and runs[-1][0] == sql:
            runs[-1][1].append(params)
        else:
            runs.append((sql, [params], checked))

    def flush(self) -> None:
        for runs in self.tables.values():
            for sql, rows, checked in runs:
                cur = self.conn.executemany(sql, rows)
                if checked and cur.rowcount != len(rows):  # fencing guarantees it; never commit otherwise
                    raise RuntimeError(f"{len(rows) - cur.rowcount} of {len(rows)} finished attempts were not active")
            runs.clear()


def apply_callbacks_in(conn: Any, callbacks: Sequence[Callback], *, now: float, lease_sec: float,
                       record_rejected: Callable[[Callback], bool] | None = None) -> list[CallbackOutcome]:
    """Fence and apply callbacks in order inside the caller's transaction (group commit); one outcome each.

    Fencing: the callback must name an attempt of the mission that belongs to its lane, carry that attempt's token
    (compared by hash in constant time) and the attempt must be the mission's current, active one; a repeat of the
    report that finished it is acknowledged without change. Anything else is refused (``rejected``) and recorded
    as ``callback_rejected``, unless ``record_rejected`` (the supervisor's rate limit) says False for it. One read
    fetches the fencing data of the whole batch.
    """
    missions: dict[int, list[Any]] = {}  # id -> [state, attempts]
    holds: dict[tuple[int, int], list[Any]] = {}  # (mission, n) -> [lane, token_hash, state]
    pairs = sorted({(c.mission, c.attempt) for c in callbacks})
    for i in range(0, len(pairs), _FENCE_CHUNK):
        chunk = pairs[i:i + _FENCE_CHUNK]
        sql = (f"WITH req (mission, n) AS (VALUES {','.join(['(?, ?)'] * len(chunk))}) "
               "SELECT req.mission, req.n, m.state, m.attempts, a.lane, a.token_hash, a.state FROM req "
               "JOIN missions m ON m.id = req.mission LEFT JOIN attempts a ON a.mission = m.id AND a.n = req.n")
        for mid, n, m_state, current, a_lane, a_hash, a_state in conn.execute(sql, [v for p in chunk for v in p]):
            missions[mid] = [m_state, current]
            if a_lane is not None:
                holds[(mid, n)] = [a_lane, a_hash, a_state]
    out: list[CallbackOutcome] = []
    evs: list[events.EventRow] = []
    writes = _Deferred(conn)
    for cb in callbacks:
        m = missions.get(cb.mission)
        hold = holds.get((cb.mission, cb.attempt))
        rejected = None
        changed = False
        if cb.kind not in CALLBACK_KINDS:
            rejected = f"unknown callback {cb.kind!r}"
        elif m is None:
            rejected = "no such mission"
        elif hold is None:
            rejected = f"mission has no attempt {cb.attempt}"
        elif hold[0] != cb.lane:
            rejected = f"attempt {cb.attempt} belongs to lane {hold[0]!r}"
        elif not hmac.compare_digest(hold[1], token_hash(cb.token)):
            rejected = "token does not match"
        elif hold[2] in ACTIVE and cb.attempt == m[1]:
            changed = _apply_callback(writes, cb, hold, m, now, lease_sec, evs)
        elif not (_DONE_AS.get(hold[2]) == cb.kind or (cb.kind in ("started", "heartbeat")
                                                       and hold[2] == "succeeded")):
            rejected = f"attempt {cb.attempt} is {hold[2]} (current attempt {m[1]})"
        # else: a repeat of the report that finished it: acknowledge, change nothing
        if rejected is not None and (record_rejected is None or record_rejected(cb)):
            evs.append(events.row(EventKind.CALLBACK_REJECTED, now, mission=cb.mission if m else None, lane=cb.lane,
                                  attempt=cb.attempt, callback=cb.kind, reason=rejected))
        out.append(CallbackOutcome(changed, m[0] if m else None, rejected))
    writes.flush()
    events.append_many(conn, evs)
    return out


def _apply_callback(writes: _Deferred, cb: Callback, hold: list[Any], m: list[Any], now: float, lease_sec: float,
                    evs: list[events.EventRow]) -> bool:
    """Apply one fenced callback to its current, active attempt; updates ``hold`` and ``m`` (the batch's view)."""
    mission_id, attempt = cb.mission, cb.attempt
    if cb.kind in ("started", "heartbeat"):
        to_running = cb.kind == "started" and hold[2] != "running"
        writes.add("attempts", "UPDATE attempts SET heartbeat_at = ?, lease_expires = max(lease_expires, ?), "
                   "state = ?, started_at = CASE WHEN ? THEN ? ELSE started_at END WHERE mission = ? AND n = ?",
                   (now, now + lease_sec, "running" if to_running else hold[2], to_running, now, mission_id, attempt))
        if not to_running:
            return False  # heartbeats are not transitions: no event, the attempt row keeps the last one
        writes.add("missions", "UPDATE missions SET state = 'running', updated_at = ? WHERE id = ?",
                   (now, mission_id))
        evs.append(events.row(EventKind.STARTED, now, mission=mission_id, lane=cb.lane, attempt=attempt))
        hold[2] = m[0] = "running"
        return True
    if cb.kind == "cancelled":
        return False
    if cb.kind == "succeeded":
        _finish(writes, mission_id, attempt, "succeeded", "succeeded", now,
                result=None if cb.result is None else canonical(cb.result))
        evs.append(events.row(EventKind.SUCCEEDED, now, mission=mission_id, lane=cb.lane, attempt=attempt))
        hold[2] = m[0] = "succeeded"
    elif cb.uncharged:
        writes.flush()
        _return(writes.conn, mission_id, attempt, cb.lane, f"{cb.error or 'could not start'}: not charged"[:500],
                now, evs)
        hold[2] = "lost"
        m[0] = "queued"
    elif cb.retry:
        error = cb.error or ""
        writes.flush()
        m[0] = _lose(writes.conn, mission_id, attempt, cb.lane, f"attempt failed: {error}"[:500], now, evs,
                     attempt_state="failed", error=error)
        hold[2] = "failed"
    else:
        error = cb.error or ""
        _finish(writes, mission_id, attempt, "failed", "failed", now, error=error)
        evs.append(events.row(EventKind.FAILED, now, mission=mission_id, lane=cb.lane, attempt=attempt,
                              error=error[:500]))
        hold[2] = m[0] = "failed"
    return True


def _one_callback(ledger: Ledger, cb: Callback, now: float, lease_sec: float = 0.0) -> CallbackResult:
    with ledger.transaction() as conn:
        outcome = apply_callbacks_in(conn, [cb], now=now, lease_sec=lease_sec)[0]
    if outcome.rejected is not None:  # raised after the commit: the rejection is on record
        raise outcome.refusal(cb)
    return CallbackResult(get(ledger, cb.mission), outcome.changed)


def started(ledger: Ledger, mission_id: int, *, lane: str, attempt: int, token: str, now: float,
            lease_sec: float) -> CallbackResult:
    return _one_callback(ledger, Callback("started", mission_id, lane, attempt, token), now, lease_sec)


def heartbeat(ledger: Ledger, mission_id: int, *, lane: str, attempt: int, token: str, now: float,
              lease_sec: float) -> CallbackResult:
    """Extend the lease (no event: heartbeats are not transitions; the attempt row keeps the last one)."""
    return _one_callback(ledger, Callback("heartbeat", mission_id, lane, attempt, token), now, lease_sec)


def confirm_cancelled(ledger: Ledger, mission_id: int, *, lane: str, attempt: int, token: str,
                      now: float) -> CallbackResult:
    """The lane confirms it stopped an attempt (cancelled, or superseded after it was lost): fenced like any
    callback; it changes nothing in the ledger."""
    return _one_callback(ledger, Callback("cancelled", mission_id, lane, attempt, token), now)


def complete(ledger: Ledger, mission_id: int, *, lane: str, attempt: int, token: str, now: float,
             result: Any = None) -> CallbackResult:
    return _one_callback(ledger, Callback("succeeded", mission_id, lane, attempt, token, result=result), now)


def fail(ledger: Ledger, mission_id: int, *, lane: str, attempt: int, token: str, now: float,
         error: str = "", retry: bool = True) -> CallbackResult:
    """A failed attempt: re-queued while attempts remain and ``retry``, else ``dead`` (or ``failed``)."""
    return _one_callback(ledger, Callback("failed", mission_id, lane, attempt, token, error=error, retry=retry),
                         now)


_FINISH_ATTEMPT: Final = "UPDATE attempts SET state = ?, finished_at = ? WHERE mission = ? AND n = ?"
_FINISH_MISSION: Final = ("UPDATE missions SET state = ?, current_lane = NULL, updated_at = ?, result = ?, error = ? "
                          "WHERE id = ? AND attempts = ? AND state IN ('dispatched', 'running')")


def _finish(conn: Any, mission_id: int, attempt: int, m_state: str, a_state: str, now: float, *,
            result: str | None = None, error: str | None = None) -> None:
    """End the mission's active attempt with a final state; ``conn`` may be a ``_Deferred`` batch."""
    if isinstance(conn, _Deferred):
        conn.add("attempts", _FINISH_ATTEMPT, (a_state, now, mission_id, attempt))
        conn.add("missions", _FINISH_MISSION, (m_state, now, result, error, mission_id, attempt), checked=True)
        return
    conn.execute(_FINISH_ATTEMPT, (a_state, now, mission_id, attempt))
    cur = conn.execute(_FINISH_MISSION, (m_state, now, result, error, mission_id, attempt))
    if cur.rowcount != 1:
        raise RuntimeError(f"mission {mission_id} attempt {attempt} was not active")  # fencing guarantees it


def _lose(conn: Any, mission_id: int, attempt: int, lane: str, reason: str, now: float,
          evs: list[events.EventRow] | None = None, *, attempt_state: str = "lost", error: str | None = None) -> str:
    """The attempt is over without a result: re-queue the mission (attempt n+1 next) or declare it dead.

    The event goes to ``evs`` when given (the caller appends the batch), else straight into the log."""
    conn.execute("UPDATE attempts SET state = ?, finished_at = ? WHERE mission = ? AND n = ?",
                 (attempt_state, now, mission_id, attempt))
    new = conn.execute("UPDATE missions SET state = CASE WHEN attempts - round_start >= max_attempts THEN 'dead' "
                       "ELSE 'queued' END, current_lane = NULL, updated_at = ?, error = coalesce(?, error) "
                       "WHERE id = ? AND attempts = ? AND state IN ('dispatched', 'running') RETURNING state",
                       (now, error, mission_id, attempt)).fetchone()
    if new is None:
        raise RuntimeError(f"mission {mission_id} attempt {attempt} was not active")  # callers check it first
    new = new[0]
    ev = events.row(EventKind.DEAD if new == "dead" else EventKind.REQUEUED, now, mission=mission_id, lane=lane,
                    attempt=attempt, reason=reason)
    if evs is None:
        events.append_many(conn, [ev])
    else:
        evs.append(ev)
    return new


# ---------------------------------------------------------------------------------------------------- recovery


def lose_attempt(ledger: Ledger, mission_id: int, attempt: int, lane: str, reason: str, *, now: float) -> bool:
    """One attempt is over without a result (e.g. the lane does not hold it): re-queue or dead; False if it was
    not the mission's current active attempt any more."""
    with ledger.transaction() as conn:
        row = conn.execute("SELECT attempts, state, current_lane FROM missions WHERE id = ?", (mission_id,)).fetchone()
        if row is None or row[0] != attempt or row[1] not in ACTIVE or row[2] != lane:
            return False
        _lose(conn, mission_id, attempt, lane, reason, now)
        return True


def return_attempt(ledger: Ledger, mission_id: int, attempt: int, lane: str, token: str, reason: str, *,
                   now: float) -> bool:
    """The lane refused the dispatch before running anything (429 full, 503 stopping): the mission goes back to
    the queue and the attempt is not charged (``round_start`` moves with it, so ``max_attempts`` and the retry
    backoff count only attempts that reached a lane). Fenced like a callback; False if it is no longer the
    mission's current, active attempt on that lane."""
    with ledger.transaction() as conn:
        row = conn.execute("SELECT m.attempts, m.state, m.current_lane, a.token_hash FROM missions m JOIN attempts a "
                           "ON a.mission = m.id AND a.n = ? WHERE m.id = ?", (attempt, mission_id)).fetchone()
        if (row is None or row[0] != attempt or row[1] not in ACTIVE or row[2] != lane
                or not hmac.compare_digest(row[3], token_hash(token))):
            return False
        _return(conn, mission_id, attempt, lane, reason, now)
        return True


def _return(conn: Any, mission_id: int, attempt: int, lane: str, reason: str, now: float,
            evs: list[events.EventRow] | None = None) -> None:
    """Back to the queue, the attempt not charged (``round_start`` moves with it): the lane ran nothing."""
    conn.execute("UPDATE attempts SET state = 'lost', finished_at = ? WHERE mission = ? AND n = ?",
                 (now, mission_id, attempt))
    conn.execute("UPDATE missions SET state = 'queued', current_lane = NULL, round_start = round_start + 1, "
                 "updated_at = ? WHERE id = ?", (now, mission_id))
    ev = events.row(EventKind.REQUEUED, now, mission=mission_id, lane=lane, attempt=attempt, reason=reason,
                    charged=False)
    if evs is None:
        events.append_many(conn, [ev])
    else:
        evs.append(ev)


def extend_leases(ledger: Ledger, *, until: float, lane: str | None = None,
                  missions: Sequence[int] | None = None, below: float | None = None,
                  lanes: Sequence[str] | None = None) -> int:
    """Push the lease of active attempts out to ``until``: every one, or those of ``lanes`` (the supervisor's
    start and the end of its ledger outage: an outage is forgiven, measured from its return; on a shared ledger
    only its own host's lanes), or those of ``lane`` among ``missions`` (what the lane says it holds); only
    leases that end before ``below`` (default ``until``) move. Returns how many did."""
    sql = ("UPDATE attempts SET lease_expires = ? WHERE state IN ('dispatched', 'running') AND lease_expires < ? "
           "AND EXISTS (SELECT 1 FROM missions m WHERE m.id = attempts.mission AND m.attempts = attempts.n)")
    args: list[Any] = [until, until if below is None else below]
    if lane is not None:
        sql += " AND lane = ?"
        args.append(lane)
    if lanes is not None:
        if not lanes:
            return 0
        sql += f" AND lane IN ({','.join('?' * len(lanes))})"
        args.extend(lanes)
    with ledger.transaction() as conn:
        if missions is None:
            return conn.execute(sql, args).rowcount
        moved = 0
        ids = sorted(set(missions))
        for i in range(0, len(ids), _CLAIM_CHUNK):
            chunk = ids[i:i + _CLAIM_CHUNK]
            moved += conn.execute(sql + f" AND mission IN ({','.join('?' * len(chunk))})", [*args, *chunk]).rowcount
        return moved


def active_on(ledger: Ledger, lane: str, *, dispatched_before: float) -> list[tuple[int, int]]:
    """(mission, attempt) of every active current attempt on ``lane`` dispatched before the given time."""
    return [(r[0], r[1]) for r in ledger.conn.execute(
        "SELECT m.id, m.attempts FROM missions m JOIN attempts a ON a.mission = m.id AND a.n = m.attempts "
        "WHERE m.state IN ('dispatched', 'running') AND m.current_lane = ? AND a.dispatched_at < ?",
        (lane, dispatched_before))]


def settle_from_lane(ledger: Ledger, mission_id: int, attempt: int, lane: str, outcome: str, *, now: float,
                     result: Any = None, error: str | None = None) -> bool:
    """Apply an outcome the lane recorded in its own execution log but could not report before it died.

    Same fencing as a callback minus the token (the supervisor read it from the lane's workspace, which only that
    lane writes): the attempt must be the mission's current one, active, and on that lane. False otherwise.
    """
    with ledger.transaction() as conn:
        row = conn.execute("SELECT attempts, state, current_lane FROM missions WHERE id = ?", (mission_id,)).fetchone()
        if row is None or row[0] != attempt or row[1] not in ACTIVE or row[2] != lane:
            return False
        if outcome == "succeeded":
            _finish(conn, mission_id, attempt, "succeeded", "succeeded", now,
                    result=None if result is None else canonical(result))
            append(conn, EventKind.SUCCEEDED, now, mission=mission_id, lane=lane, attempt=attempt, source="lane log")
        else:
            err = (error or "failed")[:500]
            _finish(conn, mission_id, attempt, "failed", "failed", now, error=err)
            append(conn, EventKind.FAILED, now, mission=mission_id, lane=lane, attempt=attempt, error=err,
                   source="lane log")
        return True


def requeue_lane(ledger: Ledger, lane: str, reason: str, *, now: float) -> list[int]:
    """Failover: every mission active on ``lane`` is re-queued (or dead); returns their ids."""
    with ledger.transaction() as conn:
        return requeue_lane_in(conn, lane, reason, now=now)


KILLED_ITS_LANE: Final = "killed its lane runtime"


def requeue_lane_in(conn: Any, lane: str, reason: str, *, now: float) -> list[int]:
    """The lane died (or restarted) with missions in flight: which one killed it is unknown.

    Each mission in flight becomes a *suspect* once more (``suspect``). With others beside it the loss is not
    charged (``round_start`` moves, as for a refusal): a poison mission must not cost its bystanders their attempts.
    A suspect is dispatched alone, to an idle lane (lanectl/dispatch.py); a lane that dies with one mission alone in
    flight charges that one the attempt, and a mission that runs out of attempts that way ends ``dead`` with
    ``killed its lane runtime`` as its error."""
    rows = conn.execute("SELECT id, attempts, suspect FROM missions WHERE state IN ('dispatched', 'running') "
                        "AND current_lane = ?", (lane,)).fetchall()
    alone = len(rows) == 1
    for mission_id, attempt, suspect in rows:
        if alone:
            n = suspect + 1
            conn.execute("UPDATE missions SET suspect = ? WHERE id = ?", (n, mission_id))
            state = _lose(conn, mission_id, attempt, lane, f"{reason} while it ran alone: suspected of killing "
                          f"its lane runtime ({n} lane death(s) in flight)", now)
            if state == "dead":
                conn.execute("UPDATE missions SET error = ? WHERE id = ?",
                             (f"{KILLED_ITS_LANE}: lane {lane} died while it ran alone ({n} lane death(s) while it "
                              "was in flight)", mission_id))
        else:
            conn.execute("UPDATE attempts SET state = 'lost', finished_at = ? WHERE mission = ? AND n = ?",
                         (now, mission_id, attempt))
            conn.execute("UPDATE missions SET state = 'queued', current_lane = NULL, round_start = round_start + 1, "
                         "suspect = suspect + 1, updated_at = ? WHERE id = ?", (now, mission_id))
            append(conn, EventKind.REQUEUED, now, mission=mission_id, lane=lane, attempt=attempt,
                   reason=f"{reason} with {len(rows)} missions in flight: not charged; it runs alone next",
                   charged=False, suspect=suspect + 1)
    return [r[0] for r in rows]


def expire_leases(ledger: Ledger, *, now: float) -> list[int]:
    """Recovery of abandoned work: attempts whose lease ran out are lost; their missions re-queue or die."""
    with ledger.transaction() as conn:
        return expire_leases_in(conn, now=now)


def lose_lane_in(conn: Any, lane: str, reason: str, *, now: float) -> list[int]:
    """Every attempt in flight on ``lane`` is lost, charged as an expired lease is (its host was declared dead:
    ``lanectl.ledger.hosts.reap``): each mission re-queued (attempt n+1 next) or dead; their ids."""
    rows = conn.execute("SELECT id, attempts FROM missions WHERE state IN ('dispatched', 'running') "
                        "AND current_lane = ? ORDER BY id", (lane,)).fetchall()
    for mission_id, attempt in rows:
        _lose(conn, mission_id, attempt, lane, reason, now)
    return [r[0] for r in rows]


def expire_leases_in(conn: Any, *, now: float) -> list[int]:
    """Attempts whose lease ran out are lost, except on the lanes of a host whose supervisor was stopped cleanly
    (``hosts.state = 'stopped'``): their lanes go on running what they hold, the heartbeats have nowhere to go
    until the supervisor is back, and its start restarts those leases (an upgrade or a restart re-runs nothing, as
    on one host). Another host's pass must not lose them meanwhile: that would run them twice at once. A host that
    does not come back is forgotten (``lanectl host forget``), and then they expire here."""
    # CROSS JOIN keeps attempts (its lease index) the outer loop: with statistics for missions and none yet for
    # attempts (ANALYZE on a young ledger), the planner would otherwise scan every mission on every pass
    rows = conn.execute("SELECT a.mission, a.n, a.lane FROM attempts a CROSS JOIN missions m ON m.id = a.mission "
                        "AND m.attempts = a.n WHERE a.state IN ('dispatched', 'running') AND a.lease_expires < ? "
                        "AND NOT EXISTS (SELECT 1 FROM lanes l JOIN hosts h ON h.name = l.host "
                        "WHERE l.name = a.lane AND h.state = 'stopped')", (now,)).fetchall()
    for mission_id, n, lane in rows:
        _lose(conn, mission_id, n, lane, "lease expired", now)
    return [r[0] for r in rows]


def expire_deadlines_in(conn: Any, *, now: float) -> list[int]:
    """Queued missions whose deadline passed become ``expired`` rather than run late."""
    ids: list[int] = []
    for rank in range(3):
        ids += [r[0] for r in conn.execute("SELECT id FROM missions WHERE state = 'queued' AND rank = ? "
                                           "AND deadline IS NOT NULL AND deadline <= ?", (rank, now))]
    for mission_id in ids:
        conn.execute("UPDATE missions SET state = 'expired', updated_at = ? WHERE id = ?", (now, mission_id))
        append(conn, EventKind.EXPIRED, now, mission=mission_id)
    return ids


def record_waits_in(conn: Any, waits: Mapping[int, str], *, now: float) -> int:
    """Make a wait visible: one ``waiting`` event each time a mission's reason changes (not every tick).

    Set-based: one ``UPDATE ... RETURNING`` per distinct reason and chunk of ids (a pass has a handful of reasons),
    then the events in one ``executemany``, in the order of ``waits`` as the row-by-row version wrote them. A
    backlog's surplus over the free slots is waited on every pass, so this was a statement pair per mission and the
    largest single cost of a pass on PostgreSQL (docs/benchmarks.md, PostgreSQL ledger)."""
    by_reason: dict[str, list[int]] = {}
    for mission_id, reason in waits.items():
        by_reason.setdefault(reason, []).append(mission_id)
    changed: set[int] = set()
    for reason, ids in by_reason.items():
        for i in range(0, len(ids), _WAIT_CHUNK):
            chunk = ids[i:i + _WAIT_CHUNK]
            changed.update(r[0] for r in conn.execute(
                f"UPDATE missions SET wait_reason = ? WHERE state = 'queued' AND wait_reason IS NOT ? "
                f"AND id IN ({','.join('?' * len(chunk))}) RETURNING id", (reason, reason, *chunk)))
    if changed:
        events.append_many(conn, [events.row(EventKind.WAITING, now, mission=m, reason=r)
                                  for m, r in waits.items() if m in changed])
    return len(changed)


_WAIT_CHUNK: Final = 400


def record_group_waits_in(conn: Any, groups: Sequence[tuple[int, str, str]],
                          blocked: Mapping[tuple[int, str, str], str | None], *, now: float) -> None:
    """Keep ``queue_waits`` in step with one pass: a group no lane can take from gets (or keeps) its reason and is
    marked blocked; a changed reason starts its sweep over; a group that can be placed again is not swept; a group
    with nothing queued is forgotten. ``None`` for a blocked group: its reason was not learnt this pass."""
    known = {(r[0], r[1], r[2]): (r[3], r[4]) for r in
             conn.execute("SELECT rank, target, tags, reason, blocked FROM queue_waits")}
    live = set(groups)
    for key in known.keys() - live:
        conn.execute("DELETE FROM queue_waits WHERE rank = ? AND target = ? AND tags = ?", key)
    for key in live:
        old = known.get(key)
        reason = blocked.get(key)
        if key in blocked and reason is not None and (old is None or old[0] != reason):
            rank, target, tags = key
            append(conn, EventKind.WAITING, now, lane=target or None, cls=CLASSES[rank],
                   tags=json.loads(tags) or None, reason=reason, group=True)
            conn.execute("INSERT INTO queue_waits (rank, target, tags, reason, since, blocked, cursor) "
                         "VALUES (?, ?, ?, ?, ?, 1, 0) ON CONFLICT (rank, target, tags) DO UPDATE SET "
                         "reason = excluded.reason, since = excluded.since, blocked = 1, cursor = 0",
                         (*key, reason, now))
        elif old is not None and old[1] != (key in blocked):
            conn.execute("UPDATE queue_waits SET blocked = ? WHERE rank = ? AND target = ? AND tags = ?",
                         (int(key in blocked), *key))


_SWEEP_CHUNK: Final = 400


def sweep_waits_in(conn: Any, *, now: float, limit: int) -> int:
    """Write each blocked group's reason onto up to ``limit`` of its missions (past its cursor), with a
    ``waiting`` event for each mission that had no reason yet; returns how many missions were looked at.

    A later change of the group's reason is one group ``waiting`` event (``record_group_waits_in``) and a new
    reason on each mission, not an event per mission: a backlog of 100k behind a flapping lane would otherwise
    write 100k events per flap (docs/decisions.md)."""
    seen = 0
    for rank, target, tags, reason, cursor in conn.execute(
            "SELECT rank, target, tags, reason, cursor FROM queue_waits WHERE blocked = 1").fetchall():
        while seen < limit:
            ids = [r[0] for r in conn.execute(
                f"SELECT id FROM missions INDEXED BY missions_queue WHERE state = 'queued' AND rank = {int(rank):d} "
                "AND target = ? "
                "AND tags = ? AND id > ? ORDER BY id LIMIT ?",
                (target, tags, cursor, min(_SWEEP_CHUNK, limit - seen)))]
            if not ids:
                break
            seen += len(ids)
            cursor = ids[-1]
            marks = ",".join("?" * len(ids))
            first = [r[0] for r in conn.execute(f"UPDATE missions SET wait_reason = ? WHERE id IN ({marks}) "
                                                "AND wait_reason IS NULL RETURNING id", (reason, *ids))]
            conn.execute(f"UPDATE missions SET wait_reason = ? WHERE id IN ({marks}) AND wait_reason IS NOT ?",
                         (reason, *ids, reason))
            events.append_many(conn, [events.row(EventKind.WAITING, now, mission=m, reason=reason)
                                      for m in sorted(first)])
            conn.execute("UPDATE queue_waits SET cursor = ? WHERE rank = ? AND target = ? AND tags = ?",
                         (cursor, rank, target, tags))
        if seen >= limit:
            break
    return seen


# ---------------------------------------------------------------------------------------------------- operator


def cancel(ledger: Ledger, mission_id: int, *, now: float, reason: str = "cancelled by operator") -> CallbackResult:
    """Cancel a queued or active mission (an active one's lane is told after commit by the supervisor)."""
    with ledger.transaction() as conn:
        m = get(ledger, mission_id)
        if m.state == "cancelled":
            return CallbackResult(m, False)
        if m.state in FINISHED:
            raise Conflict(f"mission {mission_id} is already {m.state}", "nothing to cancel", "mission_finished")
        if m.state in ACTIVE:
            _finish(conn, mission_id, m.attempts, "cancelled", "cancelled", now, error=reason)
        else:
            conn.execute("UPDATE missions SET state = 'cancelled', updated_at = ?, error = ? WHERE id = ? "
                         "AND state = 'queued'", (now, reason, mission_id))
        append(conn, EventKind.CANCELLED, now, mission=mission_id, lane=m.current_lane,
               attempt=m.attempts if m.state in ACTIVE else None, reason=reason)
        return CallbackResult(get(ledger, mission_id), True)


def retry(ledger: Ledger, mission_id: int, *, now: float, deadline: float | None = None) -> CallbackResult:
    """Put a failed, dead, cancelled or expired mission back in the queue with a fresh attempt budget."""
    with ledger.transaction() as conn:
        m = get(ledger, mission_id)
        if m.state in UNFINISHED:
            raise Conflict(f"mission {mission_id} is {m.state}", "only a finished mission can be retried",
                           "mission_active")
        if m.state == "succeeded":
            raise Conflict(f"mission {mission_id} succeeded", "submit a new mission to run it again",
                           "mission_succeeded")
        new_deadline = deadline if deadline is not None else m.deadline
        if new_deadline is not None and new_deadline <= now:
            raise invalid("deadline", f"{iso(new_deadline)} has passed", "retry with a later --deadline",
                          "deadline_past")
        conn.execute("UPDATE missions SET state = 'queued', round_start = attempts, deadline = ?, error = NULL, "
                     "wait_reason = NULL, updated_at = ? WHERE id = ?", (new_deadline, now, mission_id))
        append(conn, EventKind.RETRIED, now, mission=mission_id, previous=m.state)
        return CallbackResult(get(ledger, mission_id), True)


def move_session(ledger: Ledger, session: str, lane: str, *, now: float, reason: str = "reroute") -> bool:
    """Move a session to another lane (refused while it has missions active on its current lane)."""
    with ledger.transaction() as conn:
        row = conn.execute("SELECT lane FROM sessions WHERE id = ?", (session,)).fetchone()
        if row is None:
            raise NotFound(f"no session {session!r}", "sessions appear when a mission is submitted with --session",
                           "session_not_found")
        if row[0] == lane:
            return False
        if conn.execute("SELECT 1 FROM missions WHERE session = ? AND state IN ('dispatched', 'running') LIMIT 1",
                        (session,)).fetchone():
            raise Conflict(f"session {session!r} has missions running on lane {row[0]!r}",
                           "wait for them or cancel them first", "session_busy")
        conn.execute("UPDATE sessions SET lane = ?, updated_at = ? WHERE id = ?", (lane, now, session))
        append(conn, EventKind.SESSION_MOVED, now, lane=lane, session=session, from_lane=row[0], reason=reason)
        return True


def set_lane(ledger: Ledger, name: str, *, now: float, state: str | None = None, healthy: bool | None = None,
             invocation: str | None = None, restarts: int | None = None) -> list[int]:
    """Record a lane's dispatch state, health or invocation; a new invocation re-queues what the old one held."""
    from lanectl.ledger import lanes  # the lanes table's one writer (it imports this module: not at the top)

    with ledger.transaction() as conn:
        row = conn.execute("SELECT state, healthy, invocation FROM lanes WHERE name = ?", (name,)).fetchone()
        old_state, old_healthy, old_inv = row if row else ("active", 1, None)
        new_state = state or old_state
        new_healthy = int(old_healthy if healthy is None else healthy)
        new_inv = invocation or old_inv
        lanes.write_observed(conn, name, state=new_state, healthy=new_healthy, invocation=new_inv, now=now)
        if (new_state, new_healthy) != (old_state, old_healthy):
            append(conn, EventKind.LANE_STATE, now, lane=name, to=new_state, healthy=bool(new_healthy),
                   previous=old_state)
        lost: list[int] = []
        if old_inv is not None and new_inv != old_inv:
            append(conn, EventKind.LANE_INVOCATION, now, lane=name, invocation=new_inv, previous=old_inv,
                   restarts=restarts)
            lost = requeue_lane_in(conn, name, "lane restarted (new invocation)", now=now)
        return lost

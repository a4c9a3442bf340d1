"""The ledger's read API (issue 11): the read-only open, the one event-query builder, the weight writer."""
from __future__ import annotations

import os

import pytest

from lanectl import evidence
from lanectl.errors import LanectlError
from lanectl.ledger import Error, Ledger, reads
from lanectl.ledger import events as ev
from lanectl.ledger import lanes as lane_ops
from lanectl.ledger.events import EventKind, append

T0 = 1_700_000_000.0


def _events(led: Ledger) -> None:
    with led.transaction() as conn:
        for i in range(30):
            lane = ("alpha", "beta", None)[i % 3]
            kind = (EventKind.LANE_RESTART, EventKind.DRAIN, EventKind.UNDRAIN, EventKind.ALERT)[i % 4]
            append(conn, kind, T0 + i, lane=lane, session=f"{lane}:s" if lane and i % 5 == 0 else None,
                   actor="ops", n=i)


@pytest.mark.backends("sqlite")  # a file that is not there, SQLite's mode=ro
def test_open_readonly_never_creates_migrates_or_writes(led: Ledger, backend) -> None:  # type: ignore[no-untyped-def]
    missing = backend.path("nowhere/ledger")
    with pytest.raises(FileNotFoundError, match=f"ledger {missing} does not exist"):
        backend.open_readonly("nowhere/ledger", must_exist=True)
    with pytest.raises(Error):  # without must_exist, SQLite's own refusal: mode=ro never creates
        backend.open_readonly("nowhere/ledger")
    assert not missing.parent.exists()

    _events(led)
    ro = backend.open_readonly(check=True)
    try:
        assert reads.last_event_id(ro) == 30
        with pytest.raises(LanectlError) as err:  # a write through it is refused, naming the file
            lane_ops.set_weight(ro, "alpha", 5, now=T0)
        assert err.value.code == "ledger_readonly" and str(led.path) in err.value.message
    finally:
        ro.close()
    assert lane_ops.weight_of(led, "alpha") is None


@pytest.mark.backends("sqlite")  # files that are not SQLite ledgers
def test_open_readonly_check_refuses_a_file_that_is_no_ledger(backend) -> None:  # type: ignore[no-untyped-def]
    junk = backend.path("junk")
    junk.parent.mkdir(parents=True)
    junk.write_bytes(os.urandom(4096))
    with pytest.raises(Error):
        backend.open_readonly("junk", check=True)
    # an SQLite file without the ledger's tables fails the check too (building it is the test's business)
    backend.connect("other").execute("CREATE TABLE t (x)").connection.close()
    with pytest.raises(Error, match="no such table: missions"):
        backend.open_readonly("other", check=True)
    backend.open_readonly("other").close()  # without check the open itself succeeds


def test_open_readonly_reads_what_the_writer_committed(led: Ledger, backend) -> None:  # type: ignore[no-untyped-def]
    ro = backend.open_readonly()
    try:
        assert reads.last_event_id(ro) == 0
        _events(led)
        assert reads.last_event_id(ro) == 30  # WAL: a reader sees each commit, never blocks the writer
        assert reads.events(ro, lane="alpha", limit=3) == ev.select(led.conn, lane="alpha", limit=3)
    finally:
        ro.close()


@pytest.mark.parametrize("filters", [
    {}, {"lane": "alpha"}, {"session": "beta:s"}, {"kind": "drain"}, {"kind": ["drain", "alert"]},
    {"since": T0 + 10}, {"since": T0 + 5, "until": T0 + 20}, {"after_id": 12}, {"lane": "beta", "since": T0 + 3},
    {"limit": 4}, {"limit": 4, "latest": True}, {"kind": "undrain", "latest": True, "limit": 2},
])
def test_one_event_builder_behind_evidence_and_the_ledger(led: Ledger, filters: dict) -> None:
    """evidence.events (CLI, top, report) and events.query (the ledger's own callers) are the same query now."""
    _events(led)
    rows = ev.select(led.conn, **filters)
    want = [r for r in ev.select(led.conn, limit=10_000) if _matches(r, filters)]
    if filters.get("latest"):
        want = want[-filters["limit"]:]
    else:
        want = want[:filters.get("limit", 1000)]
    assert rows == want and rows, filters
    shown = evidence.events(led, **filters)
    assert [e["id"] for e in shown] == [r[0] for r in rows]
    assert [e["ts"] for e in shown] == [r[1] for r in rows]
    if not filters.get("latest") and not isinstance(filters.get("kind"), list):
        assert [e["id"] for e in ev.query(led.conn, **filters)] == [r[0] for r in rows]
    assert evidence.events(led.path, **filters) == shown  # a path is opened read-only, same answer


def _matches(r: tuple, f: dict) -> bool:
    row = dict(zip(ev.COLUMNS, r))
    kinds = [f["kind"]] if isinstance(f.get("kind"), str) else f.get("kind")
    return ((f.get("lane") is None or row["lane"] == f["lane"])
            and (f.get("session") is None or row["session"] == f["session"])
            and (not kinds or row["kind"] in kinds)
            and (f.get("since") is None or row["at"] >= f["since"])
            and (f.get("until") is None or row["at"] < f["until"])
            and row["id"] > f.get("after_id", 0))


def test_poll_reads_the_tail_after_an_id(led: Ledger) -> None:
    _events(led)
    assert [r[0] for r in reads.poll_events(led, 25)] == [26, 27, 28, 29, 30]
    assert [r[0] for r in reads.poll_events(led, 0, lane="alpha", kind="lane_restart")] == [1, 13, 25]
    assert reads.poll_events(led, 30) == []
    assert reads.event_kinds(led) == ["alert", "drain", "lane_restart", "undrain"]
    assert {r[2] for r in reads.events_of_kinds(led, ["drain"], T0, T0 + 30)} == {"drain"}


def test_weight_is_written_by_the_lanes_module(led: Ledger) -> None:
    assert lane_ops.weight_of(led, "alpha") is None
    lane_ops.set_weight(led, "alpha", 7, now=T0)
    assert lane_ops.weight_of(led, "alpha") == 7
    assert lane_ops.state_of(led, "alpha") == "active"  # a new row: the weight only, state as the schema says
    lane_ops.set_weight(led, "alpha", 3, now=T0 + 1)
    assert lane_ops.weight_of(led, "alpha") == 3
    assert [(n, w, t) for n, _s, w, t in reads.lane_rows(led)] == [("alpha", 3, T0 + 1)]


def test_the_supervisors_lane_writes_and_reads(led: Ledger) -> None:
    """degrade / recover / settle-drained (lanes.py, inside the caller's transaction) and what the supervisor
    reads around them (issue 11: its SQL moved behind the ledger)."""
    with led.transaction() as conn:
        lane_ops.mark_degraded(conn, "alpha", now=T0)  # no row yet: one is made
    assert reads.lane_states(led) == {"alpha": "degraded"}
    with led.transaction() as conn:
        lane_ops.mark_recovered(conn, "alpha", now=T0 + 1)
        lane_ops.mark_recovered(conn, "beta", now=T0 + 1)  # no row: nothing to recover, none made
    assert [(n, s, t) for n, s, _w, t in reads.lane_rows(led)] == [("alpha", "active", T0 + 1)]
    with led.transaction() as conn:
        assert not lane_ops.mark_drained(conn, "alpha", now=T0 + 2)  # not draining: stays as it is
        lane_ops._set_state(conn, "alpha", "draining", T0 + 2)
    assert reads.draining_idle(led) == ["alpha"]  # nothing in flight on it
    with led.transaction() as conn:
        assert lane_ops.mark_drained(conn, "alpha", now=T0 + 3)
        assert not lane_ops.mark_drained(conn, "alpha", now=T0 + 3)  # once only: the event is appended once
    assert reads.lane_states(led) == {"alpha": "drained"} and reads.draining_idle(led) == []
    with pytest.raises(ZeroDivisionError), led.transaction() as conn:  # the caller's transaction decides
        lane_ops.mark_degraded(conn, "alpha", now=T0 + 4)
        1 / 0
    assert reads.lane_states(led) == {"alpha": "drained"}
    assert reads.session_ids(led, "alpha") == []


def test_cancels_between_and_data_version(led: Ledger, backend) -> None:  # type: ignore[no-untyped-def]
    before = led.data_version()
    with led.transaction() as conn:
        append(conn, EventKind.CANCELLED, T0, mission=1, lane="alpha")
        append(conn, EventKind.CANCELLED, T0, mission=2)  # queued when cancelled: no lane to tell
        append(conn, EventKind.DRAIN, T0, lane="alpha")
        append(conn, EventKind.CANCELLED, T0, mission=3, lane="beta")
    assert led.data_version() == before  # its own commits do not count
    assert reads.cancels_between(led, 0, reads.last_event_id(led)) == [(1, "alpha"), (3, "beta")]
    assert reads.cancels_between(led, 1, 3) == []
    other = backend.open()
    try:
        with other.transaction() as conn:
            append(conn, EventKind.CANCELLED, T0 + 1, mission=4, lane="alpha")
    finally:
        other.close()
    assert led.data_version() != before  # another connection's commit does
    assert reads.cancels_between(led, 4, 5) == [(4, "alpha")]

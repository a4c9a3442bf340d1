"""Issue 12 items 3-4 on the ledger: claims that skip locked rows, strict fencing of late callbacks, the database's
clock, connection hygiene (reconnect after ``pg_terminate_backend``) and one NOTIFY per write transaction.

The PostgreSQL tests run on the session's real server (tests/pgserver.py); the fencing test runs on both backends.
No timed assertions: waits are on conditions (a marker notification, an event) with generous timeouts.
"""
from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from conftest import T0, make_fleet, open_ledger

from lanectl.config import ClassPolicy
from lanectl.errors import ExitCode, LanectlError
from lanectl.ledger import events, pg, tick
from lanectl.ledger import missions as ms
from lanectl.ledger.events import EventKind

PG = pytest.mark.backends("postgresql")


@contextlib.contextmanager
def raw(backend: Any, *, autocommit: bool = True) -> Iterator[Any]:
    """A plain psycopg connection to the test's ledger database: another process's view."""
    conn = backend.connect(autocommit=autocommit)
    try:
        yield conn
    finally:
        conn.close()


def rows(led: Any) -> tuple[list[Any], list[Any]]:
    """Everything of missions and attempts, in order: what a refused callback must leave exactly as it was."""
    m = led.conn.execute("SELECT id, state, attempts, current_lane, result, error, updated_at, round_start "
                         "FROM missions ORDER BY id").fetchall()
    a = led.conn.execute("SELECT mission, n, lane, state, started_at, heartbeat_at, lease_expires, finished_at "
                         "FROM attempts ORDER BY mission, n").fetchall()
    return [tuple(r) for r in m], [tuple(r) for r in a]


# ------------------------------------------------------------------------------------------------ claims


@PG
def test_a_claim_skips_a_row_locked_elsewhere_and_takes_it_after_release(backend, led, fleet):
    plain = ms.submit(led, fleet, cls="interactive", payload={"n": 1}, now=T0).mission.id
    in_session = ms.submit(led, fleet, cls="interactive", payload={"n": 2}, now=T0, session="alpha:s1").mission.id
    free = ms.submit(led, fleet, cls="interactive", payload={"n": 3}, now=T0).mission.id
    with raw(backend, autocommit=False) as other:
        # another transaction holds both rows (no advisory lock: a tool, a claimer of another design)
        locked = other.execute("SELECT id FROM missions WHERE id IN (%s, %s) FOR UPDATE",
                               (plain, in_session)).fetchall()
        assert sorted(r[0] for r in locked) == [plain, in_session]
        # lock_timeout is the busy timeout (5 s): a claim that waited for the rows would fail with ledger_busy
        first = tick.run_once(led, fleet, now=T0 + 1)
        assert [d.mission for d in first.dispatches] == [free]
        assert {m.id: m.state for m in ms.list_missions(led)} == {plain: "queued", in_session: "queued",
                                                                   free: "dispatched"}
        other.rollback()
    second = tick.run_once(led, fleet, now=T0 + 2)
    assert sorted(d.mission for d in second.dispatches) == [plain, in_session]
    assert all(ms.get(led, i).attempts == 1 for i in (plain, in_session, free))
    assert len(events.query(led.conn, kind=EventKind.DISPATCHED)) == 3


def test_the_claim_statement_of_each_dialect(backend, led, fleet):
    """The claim the pass runs is the dialect's: SKIP LOCKED on PostgreSQL only (SQLite has no row locks), and
    both claim a mission once, however often a plan names it."""
    text = ms._CLAIMS[led.dialect]
    assert ("FOR UPDATE SKIP LOCKED" in text) == (led.dialect == "postgresql")
    m = ms.submit(led, fleet, cls="interactive", payload={}, now=T0).mission.id
    from lanectl.dispatch import Assignment

    twice = [Assignment(mission=m, lane="alpha", cls="interactive")] * 2
    got = ms.assign(led, twice, now=T0 + 1, lease_sec=30)
    assert [(d.mission, d.attempt) for d in got] == [(m, 1)]
    assert ms.assign(led, twice[:1], now=T0 + 2, lease_sec=30) == []  # no longer queued


# ------------------------------------------------------------------------------------------------ fencing


def test_late_and_stale_callbacks_change_nothing(led, fleet):
    """After a lease was reaped and the mission re-dispatched, every callback of the old attempt (its own right
    token), of the current attempt with a wrong token or from another lane, one at a time or in one batch, is
    refused and leaves missions and attempts exactly as they were; so is a late one after the mission finished."""
    m = ms.submit(led, fleet, cls="interactive", payload={}, now=T0, lane="alpha").mission.id
    d1 = tick.run_once(led, fleet, now=T0).dispatches[0]
    lease = fleet.settings.leases.lease_sec
    res = tick.run_once(led, fleet, now=T0 + lease + 1)
    assert res.expired_leases == [m]
    d2 = res.dispatches[0]
    assert (d2.mission, d2.attempt) == (m, 2) and d2.token != d1.token
    at = T0 + lease + 2
    stale = []
    for kind in ms.CALLBACK_KINDS:
        extra: dict[str, Any] = {"result": {"rc": 0}} if kind == "succeeded" else (
            {"error": "late", "retry": True} if kind == "failed" else {})
        stale += [ms.Callback(kind, m, "alpha", 1, d1.token, **extra),        # the old attempt, its own token
                  ms.Callback(kind, m, "alpha", 2, d1.token, **extra),        # the current attempt, old token
                  ms.Callback(kind, m, "alpha", 2, "forged", **extra),        # a wrong token
                  ms.Callback(kind, m, "beta", 2, d2.token, **extra)]         # right token, another lane
    before = rows(led)
    rejected_before = len(events.query(led.conn, kind=EventKind.CALLBACK_REJECTED))
    with led.transaction() as conn:
        outcomes = ms.apply_callbacks_in(conn, stale, now=at, lease_sec=lease)
    assert all(not o.changed for o in outcomes)
    refused = [cb for cb, o in zip(stale, outcomes) if o.rejected is None]
    # a "cancelled" of an attempt that is over is a confirmation (no change): everything else is refused
    assert all(cb.kind == "cancelled" and cb.attempt == 1 for cb in refused), refused
    assert rows(led) == before
    for cb in stale[:8]:
        with contextlib.suppress(LanectlError):
            ms._one_callback(led, cb, at, lease)
    assert rows(led) == before
    assert len(events.query(led.conn, kind=EventKind.CALLBACK_REJECTED)) > rejected_before
    # the current attempt finishes; then a late failure of it and the old attempt's success change nothing
    assert ms.complete(led, m, lane="alpha", attempt=2, token=d2.token, now=at + 1, result={"rc": 0}).changed
    done = rows(led)
    for late in (dict(attempt=2, token=d2.token), dict(attempt=1, token=d1.token)):
        with pytest.raises(LanectlError) as err:
            ms.fail(led, m, lane="alpha", now=at + 2, error="late", **late)
        assert err.value.code == "lease_fenced" and err.value.exit_code == ExitCode.CONFLICT
    ms.expire_leases(led, now=at + 10 * lease)
    assert rows(led) == done
    assert ms.get(led, m).state == "succeeded"


# ------------------------------------------------------------------------------------------------ the clock


@pytest.mark.backends("sqlite")
def test_sqlite_clock_is_this_hosts(backend, led):
    before = time.time()
    assert before <= led.clock() <= time.time()


@PG
def test_a_host_with_a_wrong_clock_writes_the_servers_time(backend, fleet, monkeypatch):
    """A process whose clock is an hour fast (time.time monkeypatched) writes leases and event times in the
    database server's time, and a supervisor-side pass on its loop clock does not reap a fresh lease."""
    from lanectl.supervisor.shared import Clock

    real = time.time
    monkeypatch.setattr(time, "time", lambda: real() + 3600.0)
    led = backend.open()
    with raw(backend) as other:
        server = float(other.execute("SELECT extract(epoch from now())").fetchone()[0])
    assert abs(led.clock() - server) < 60, (led.clock(), server)  # an hour off without the offset
    m = ms.submit(led, fleet, cls="interactive", payload={}, now=led.clock()).mission
    d = tick.run_once(led, fleet, now=led.clock()).dispatches[0]
    with raw(backend) as other:
        server = float(other.execute("SELECT extract(epoch from now())").fetchone()[0])
    lease = fleet.settings.leases.lease_sec
    assert abs(d.lease_expires - (server + lease)) < 60
    at = [r[0] for r in led.conn.execute("SELECT at FROM events WHERE mission = ?", (m.id,))]
    assert at and all(abs(a - server) < 60 for a in at)
    assert time.time() > d.lease_expires + lease  # this host's own clock would call the lease long expired
    loop = Clock()
    loop.follow(led.clock)  # what the supervisor does on a PostgreSQL ledger
    res = tick.run_once(led, fleet, now=loop.now())
    assert res.expired_leases == [] and ms.get(led, m.id).state == "dispatched"


@PG
def test_the_clock_offset_is_measured_again_on_reconnect(backend, monkeypatch):
    led = backend.open()
    first = led.clock()
    real = time.time
    monkeypatch.setattr(time, "time", lambda: real() - 7200.0)  # the host's clock steps back two hours
    led.reconnect()
    assert abs(led.clock() - first) < 60


# ------------------------------------------------------------------------------------------------ connections


def _terminate(backend: Any, pid: int) -> None:
    with raw(backend) as other:
        assert other.execute("SELECT pg_terminate_backend(%s)", (pid,)).fetchone()[0]
        # the backend is gone once pg_stat_activity no longer lists it (a condition, not a sleep)
        deadline = time.monotonic() + 60
        while other.execute("SELECT 1 FROM pg_stat_activity WHERE pid = %s", (pid,)).fetchone():
            assert time.monotonic() < deadline, "the terminated backend did not go away"
            time.sleep(0.01)


@PG
def test_connection_settings_name_the_role_and_bound_idle_transactions(backend):
    led = backend.open(role="lanectl-test-role")
    pid = led.conn.backend_pid
    with raw(backend) as other:
        name = other.execute("SELECT application_name FROM pg_stat_activity WHERE pid = %s", (pid,)).fetchone()[0]
    assert name == "lanectl-test-role"
    assert led.conn.execute("SHOW idle_in_transaction_session_timeout").fetchone()[0] == \
        f"{pg.IDLE_IN_TRANSACTION_S}s"
    ro = backend.open_readonly()
    assert ro.conn.execute("SHOW idle_in_transaction_session_timeout").fetchone()[0] == \
        f"{pg.IDLE_IN_TRANSACTION_S}s"
    led.reconnect()  # the same settings on the new connection
    assert led.conn.backend_pid != pid
    with raw(backend) as other:
        name = other.execute("SELECT application_name FROM pg_stat_activity WHERE pid = %s",
                             (led.conn.backend_pid,)).fetchone()[0]
    assert name == "lanectl-test-role"


@PG
def test_an_application_name_in_the_url_names_the_connections(backend):
    """docs/ledger.md, connection settings: ``?application_name=`` in the URL is the operator's name for every
    connection of that ledger (a keyword argument of the driver would replace it with lanectl's role)."""
    led = backend.open()
    url = str(led.path) + "&application_name=lanectl-web1"
    named = open_ledger(url, role="lanectl-test-role")
    pool = pg.ReadPool(url, role="lanectl-test-role").open()
    try:
        with pool.connection() as conn:
            pooled = conn.backend_pid
            with raw(backend) as other:
                names = dict(other.execute("SELECT pid, application_name FROM pg_stat_activity WHERE pid IN (%s, %s)",
                                           (named.conn.backend_pid, pooled)).fetchall())
        assert names == {named.conn.backend_pid: "lanectl-web1", pooled: "lanectl-web1"}, names
        assert pg.app_name(str(led.path), "lanectl-cli") == "lanectl-cli"  # none in the URL: the role names it
    finally:
        pool.close()
        named.close()


@PG
def test_a_frozen_transaction_cannot_hold_the_ledger_lock_for_ever(backend, fleet, monkeypatch):
    """A process stopped inside a write transaction (here: one that just does not go on) is disconnected by the
    server after ``idle_in_transaction_session_timeout`` (1 s here, 15 s in production): its lock is released,
    another writer goes on, and nothing of the frozen transaction is written."""
    monkeypatch.setattr(pg, "IDLE_IN_TRANSACTION_S", 1)
    frozen = backend.open()
    other = backend.open()
    with pytest.raises(LanectlError) as err:
        with frozen.transaction() as conn:
            events.append(conn, EventKind.SUBMITTED, T0, lane="alpha")
            pid = frozen.conn.backend_pid
            with raw(backend) as look:  # wait until the server has ended the idle transaction's session
                deadline = time.monotonic() + 60
                while look.execute("SELECT 1 FROM pg_stat_activity WHERE pid = %s", (pid,)).fetchone():
                    assert time.monotonic() < deadline, "the idle transaction was never ended"
                    time.sleep(0.05)
            conn.execute("SELECT 1").fetchone()
    assert err.value.code == "ledger_unavailable"
    assert ms.submit(other, fleet, cls="interactive", payload={}, now=T0).created  # the lock is free
    with raw(backend) as look:
        assert look.execute("SELECT count(*) FROM events").fetchone()[0] == 1  # only the other's submit


FROZEN_IN_A_BATCH = r"""
import sys
from lanectl.ledger import Ledger, pg
pg.IDLE_IN_TRANSACTION_S = 1
open_ = getattr(Ledger, "open")  # another process's own connection to the backend's ledger (argv[1])
led = open_(sys.argv[1], migrate=False)
print(led.conn.backend_pid, flush=True)
with led.transaction():
    led.conn.executemany("UPDATE missions SET updated_at = updated_at WHERE id = ?", [(int(sys.argv[2]),)] * 3)
print("done", flush=True)
"""


@PG
def test_a_process_frozen_inside_a_batch_cannot_hold_the_ledger_lock_for_ever(backend, fleet):
    """A process stopped (SIGSTOP: a stalled VM, a frozen supervisor) while one of its write transactions runs a
    batch (``executemany``: the callback batches, the events of a turn) is disconnected by the server after
    ``idle_in_transaction_session_timeout`` like any idle transaction, so the ledger's write lock, which every
    host's lease renewal needs, is free again. Found by the chaos run across hosts: psycopg runs ``executemany``
    in pipeline mode, whose batch the server does not end with ReadyForQuery until the client syncs, and a
    backend that has not said ReadyForQuery never starts that timeout: a supervisor frozen inside a batch held the
    lock until its watchdog killed it, and no other host could renew its lease or reap it. Here the frozen
    process is a real one: its batch waits on a row lock this test holds, the process is stopped, the lock
    released; its batch then completes on the server, and its session must end within the timeout (1 s)."""
    import os
    import signal
    import subprocess
    import sys

    mid = ms.submit(backend.open(), fleet, cls="interactive", payload={}, now=T0).mission.id
    with raw(backend, autocommit=False) as holder:
        holder.execute("SELECT id FROM missions WHERE id = %s FOR UPDATE", (mid,)).fetchall()
        proc = subprocess.Popen([sys.executable, "-c", FROZEN_IN_A_BATCH, backend.location(), str(mid)],
                                stdout=subprocess.PIPE, text=True)
        try:
            pid = int(proc.stdout.readline())
            with raw(backend) as look:
                deadline = time.monotonic() + 60
                while look.execute("SELECT 1 FROM pg_stat_activity WHERE pid = %s AND wait_event_type = 'Lock'",
                                   (pid,)).fetchone() is None:
                    assert time.monotonic() < deadline, "the batch never waited for the row lock"
                    time.sleep(0.02)
                os.kill(proc.pid, signal.SIGSTOP)
                holder.commit()  # the batch goes on in the server; its client is stopped
                deadline = time.monotonic() + 30
                while look.execute("SELECT 1 FROM pg_stat_activity WHERE pid = %s", (pid,)).fetchone():
                    state = look.execute("SELECT state, wait_event FROM pg_stat_activity WHERE pid = %s",
                                         (pid,)).fetchone()
                    assert time.monotonic() < deadline, f"the frozen batch's session was never ended: {state}"
                    time.sleep(0.05)
        finally:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
    led = backend.open()
    with led.transaction():  # the lock is free
        led.conn.execute("SELECT 1").fetchone()


@PG
def test_a_killed_backend_is_ledger_unavailable_then_reconnect_works(backend, fleet):
    led = backend.open()
    _terminate(backend, led.conn.backend_pid)
    with pytest.raises(LanectlError) as err:
        ms.submit(led, fleet, cls="interactive", payload={}, now=T0)
    assert err.value.code == "ledger_unavailable" and err.value.exit_code == ExitCode.UNAVAILABLE == 6
    led.reconnect()
    assert ms.submit(led, fleet, cls="interactive", payload={}, now=T0).created
    # killed in the middle of a transaction: nothing of it is written
    with pytest.raises(LanectlError) as err:
        with led.transaction() as conn:
            events.append(conn, EventKind.SUBMITTED, T0, mission=None, lane="alpha")
            _terminate(backend, led.conn.backend_pid)
            conn.execute("SELECT 1").fetchone()
    assert err.value.code == "ledger_unavailable"
    led.reconnect()
    with raw(backend) as other:
        assert other.execute("SELECT count(*) FROM missions").fetchone()[0] == 1
        assert other.execute("SELECT count(*) FROM events").fetchone()[0] == 1  # the one submit's event
    assert tick.run_once(led, fleet, now=T0 + 1).dispatches


@pytest.mark.backends("sqlite")
def test_reconnect_on_sqlite_changes_nothing(backend, led, fleet):
    conn = led.conn
    led.reconnect()
    assert led.conn is conn and ms.submit(led, fleet, cls="interactive", payload={}, now=T0).created


# ------------------------------------------------------------------------------------------------ NOTIFY


def _notifications_until_marker(listen: Any, backend: Any) -> list[Any]:
    """The notifications on the ledger's channel that arrive before a marker sent now from another connection
    (notifications are delivered in commit order: everything committed before the marker comes first)."""
    with raw(backend) as other:
        other.execute(f"NOTIFY {pg.CHANNEL}, 'marker'")
    got = []
    for n in listen.notifies(timeout=60):
        if n.payload == "marker":
            return got
        got.append(n)
    raise AssertionError(f"the marker did not arrive; got {got}")


@PG
def test_one_notification_per_write_transaction(backend, led, tmp_path):
    fleet = make_fleet(tmp_path, background=ClassPolicy(queue_limit=1000))
    with raw(backend) as listen:
        listen.execute(f"LISTEN {pg.CHANNEL}")
        reqs = [ms.SubmitRequest("background", {"i": i}) for i in range(100)]
        ms.submit_many(led, fleet, reqs, now=T0)
        got = _notifications_until_marker(listen, backend)
        assert len(got) == 1, got
        assert got[0].pid == led.conn.backend_pid
        newest = led.conn.execute("SELECT max(id) FROM events").fetchone()[0]
        assert int(got[0].payload) == newest
        # a transaction rolled back sends nothing; two transactions send two
        with pytest.raises(LanectlError):
            ms.submit(led, fleet, cls="nope", payload={}, now=T0)
        with contextlib.suppress(RuntimeError), led.transaction() as conn:
            events.append(conn, EventKind.SUBMITTED, T0, lane="alpha")
            raise RuntimeError("rolled back")
        ms.submit(led, fleet, cls="interactive", payload={}, now=T0)
        ms.submit(led, fleet, cls="interactive", payload={}, now=T0)
        assert len(_notifications_until_marker(listen, backend)) == 2


@PG
def test_the_listener_wakes_on_others_commits_and_ignores_its_own(backend, led, fleet):
    from lanectl.wakeup import PgListener

    woken = threading.Event()
    own = backend.open("ledger")  # the "supervisor's" connection
    listener = PgListener(backend.location(), woken.set, lambda: own.conn.backend_pid, poll_s=0.05).start()
    try:
        assert listener.connected.wait(60)
        woken.clear()  # the wake-up every (re)connect gives
        ms.submit(own, fleet, cls="interactive", payload={}, now=T0)  # its own: ignored
        ms.submit(led, fleet, cls="interactive", payload={}, now=T0)  # another process's: wakes
        assert woken.wait(60)
        assert listener.accepted == 1
        deadline = time.monotonic() + 60
        while listener.ignored < 1:  # delivered before the other's (commit order), counted by now
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert listener.ignored == 1
    finally:
        listener.stop()
    assert not listener.connected.is_set()


@PG
def test_the_listener_reconnects_after_its_connection_is_killed(backend, led, fleet):
    from lanectl.wakeup import PgListener

    woken = threading.Event()
    listener = PgListener(backend.location(), woken.set, lambda: None, poll_s=0.05).start()
    try:
        assert listener.connected.wait(60)
        with raw(backend) as other:
            pid = other.execute("SELECT pid FROM pg_stat_activity WHERE application_name = %s",
                                (listener.role,)).fetchone()[0]
        _terminate(backend, pid)
        deadline = time.monotonic() + 60
        while listener.connects < 2 or not listener.connected.is_set():
            assert time.monotonic() < deadline, (listener.connects, listener.last_error)
            time.sleep(0.01)
        assert listener.errors >= 1
        woken.clear()
        ms.submit(led, fleet, cls="interactive", payload={}, now=T0)
        assert woken.wait(60)
    finally:
        listener.stop()


def test_listen_can_be_turned_off(backend, monkeypatch):
    """``[ledger] listen`` and ``LANECTL_PG_LISTEN`` (the supervisor's choice; the same on either backend)."""
    from lanectl import config
    from lanectl.wakeup import LISTEN_ENV, listen_enabled

    monkeypatch.delenv(LISTEN_ENV, raising=False)
    assert listen_enabled(True) and not listen_enabled(False)
    for off in ("0", "false", "off"):
        monkeypatch.setenv(LISTEN_ENV, off)
        assert not listen_enabled(True)
    monkeypatch.setenv(LISTEN_ENV, "1")
    assert listen_enabled(True)
    assert config.LedgerSettings(listen=False).listen is False
    with pytest.raises(Exception) as err:
        config.LedgerSettings(listen="sometimes")
    assert "listen" in str(err.value)


@PG
def test_the_client_library_times_its_writes_by_the_ledgers_clock(backend, fleet, monkeypatch):
    """``lanectl.client.Client`` (what producers embed; the CLI's writing commands do the same through
    ``Ledger.clock``) on a host an hour fast: the mission and its event carry the server's time."""
    from lanectl.client import Client

    real = time.time
    monkeypatch.setattr(time, "time", lambda: real() + 3600.0)
    with Client(ledger=backend.location(), fleet=fleet) as client:
        m = client.submit("interactive", {"argv": ["true"]})
        cancelled = client.cancel(m.id)
    with raw(backend) as other:
        server = float(other.execute("SELECT extract(epoch from now())").fetchone()[0])
        at = [r[0] for r in other.execute("SELECT at FROM events WHERE mission = %s", (m.id,))]
    assert abs(m.created_at - server) < 60 and abs(cancelled.updated_at - server) < 60
    assert len(at) == 2 and all(abs(a - server) < 60 for a in at)

"""Issue 12 item 7: the supervisor through an outage of its PostgreSQL ledger, turn by turn (no sleeping, no systemd).

A real :class:`Supervisor` (``use_systemd=False``) on a database of a real PostgreSQL server (tests/pgserver.py):
its connection terminated (``pg_terminate_backend``) and the server stopped and started again, with the turns'
``now`` chosen by the test. The same under real systemd, with lanes and load: tests/systemd/test_pg_ledger.py.
"""
from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from lanectl import config
from lanectl.dispatch import Assignment
from lanectl.ledger import missions as ms
from lanectl.protocol import CallbackMsg
from lanectl.supervisor import Supervisor
from lanectl.supervisor.loop import APPLICATION_NAME, LEDGER_BACKOFF_S, LEDGER_RETRY_S
from tests.pgserver import PgServer, find_bindir
from tests.unit.test_supervisor_turns import LEASE, T0, TICK, free_port, state_of, write_config

pytestmark = pytest.mark.skipif(os.geteuid() != 0 or find_bindir() is None,
                                reason="needs root and Debian's postgresql package (scripts/setup installs it)")


@pytest.fixture(scope="module")
def pg() -> Iterator[PgServer]:
    """A server of this module's own, not the session's (tests/conftest.py): these tests stop and start it."""
    server = PgServer().start()
    try:
        yield server
    finally:
        server.stop()


class Recorder:
    """A notifier that keeps what the supervisor tells systemd (WATCHDOG=1, STATUS=, EXTEND_TIMEOUT_USEC=)."""

    def __init__(self) -> None:
        self.sent: list[str] = []

    def send(self, msg: str) -> None:
        self.sent.append(msg)


def unopened(tmp_path: Path, ledger: str | Path, lanes: tuple[str, ...] = ("alpha",),
             notifier: Recorder | None = None) -> Supervisor:
    """A supervisor of ``lanes`` (free ports, this user) on ``ledger``, not opened yet."""
    ports = {n: free_port() for n in lanes}
    fleet = config.load(write_config(tmp_path, ports))
    return Supervisor(fleet, ledger, use_systemd=False, notifier=notifier, callback_socket=str(tmp_path / "cb.sock"),
                      lane_uids={n: os.getuid() for n in ports})


def supervisor(tmp_path: Path, ledger: str | Path) -> Supervisor:
    sup = unopened(tmp_path, ledger, ("alpha", "beta"))
    sup.open()
    return sup


@pytest.fixture
def sup(tmp_path: Path, pg: PgServer) -> Iterator[Supervisor]:
    s = supervisor(tmp_path, pg.url(pg.create_db("outage")))
    try:
        s.start(T0)
        yield s
    finally:
        if not pg.running:
            pg.resume()
        s.close()


def terminate(pg: PgServer) -> list[int]:
    with pg.admin() as conn:
        return [r[1] for r in conn.execute("SELECT pg_terminate_backend(pid), pid FROM pg_stat_activity WHERE "
                                           "application_name = %s", (APPLICATION_NAME,)).fetchall() if r[0]]


def callback_from_thread(sup: Supervisor, msg: CallbackMsg) -> dict[str, Any]:
    """A lane's callback as an HTTP thread hands it over: it waits for the main loop's verdict."""
    out: dict[str, Any] = {}
    t = threading.Thread(target=lambda: out.update(answer=sup.callbacks.submit([msg])[0]))
    t.start()
    while sup.callbacks.inbox.empty() and t.is_alive():
        t.join(0.01)
    out["thread"] = t
    return out


def test_a_terminated_connection_is_one_failed_turn_then_a_new_connection(sup: Supervisor, pg: PgServer) -> None:
    assert sup.ledger is not None
    m = ms.submit(sup.ledger, sup.fleet, cls="background", payload={"argv": ["true"]}, now=T0).mission.id
    [d] = ms.assign(sup.ledger, [Assignment(m, "alpha", "background")], now=T0, lease_sec=LEASE)
    assert terminate(pg), "the supervisor's connection is named lanectl-supervisor"
    assert not sup.turn(T0 + 1)  # the dead connection fails the turn
    assert sup.outage is not None and sup.health()["ledger_ok"] is False
    assert sup.health()["ledger_unreachable_since"] == T0 + 1 and "ledger" in sup.health()["ledger_error"]
    assert sup.status_line().startswith("ledger unreachable since ")
    # a callback that arrives meanwhile is answered 503 at once (not after CALLBACK_WAIT_S): the lane retries
    cb = callback_from_thread(sup, CallbackMsg(m, d.attempt, "alpha", d.token, "started"))
    assert not sup.turn(T0 + 1 + LEDGER_BACKOFF_S[0] / 2)  # before the next try: refused, nothing written
    cb["thread"].join(5)
    assert cb["answer"][0] == 503 and cb["answer"][1]["error"] == "ledger_unavailable", cb
    assert sup.turn(T0 + 1 + LEDGER_BACKOFF_S[0])  # the next try reconnects and the turn works
    assert sup.outage is None and sup.health()["ledger_ok"] is True
    assert state_of(sup, m) == "dispatched"
    # the lane's retry of the same callback is applied now
    cb = callback_from_thread(sup, CallbackMsg(m, d.attempt, "alpha", d.token, "started"))
    assert sup.turn(T0 + 2)
    cb["thread"].join(5)
    assert cb["answer"][0] == 200 and state_of(sup, m) == "running"


def test_a_server_down_longer_than_the_lease_backs_off_and_costs_no_attempt(sup: Supervisor, pg: PgServer) -> None:
    assert sup.ledger is not None
    m = ms.submit(sup.ledger, sup.fleet, cls="background", payload={"argv": ["true"]}, now=T0).mission.id
    ms.assign(sup.ledger, [Assignment(m, "alpha", "background")], now=T0, lease_sec=LEASE)
    pg.halt("fast")
    now = T0 + 1
    assert not sup.turn(now)
    delays = []
    while now < T0 + 2 * LEASE:  # each turn at the next try: the wait doubles up to its maximum
        assert sup.outage is not None
        delays.append(round(sup.outage.delay, 3))
        now = sup.outage.next_try
        assert sup.idle_timeout(now - 0.05) <= 0.05 + 1e-9  # the loop sleeps until then, not longer
        assert not sup.turn(now)
    assert delays[:4] == [0.1, 0.2, 0.4, 0.8] and max(delays) == LEDGER_BACKOFF_S[1], delays
    assert sup.outage.tries == len(delays) + 1
    pg.resume()
    back = sup.outage.next_try
    assert sup.turn(back)  # reconnected; the leases that ran out meanwhile are forgiven
    assert sup.outage is None and state_of(sup, m) == "dispatched"
    assert sup.turn(back + LEASE - 1) and state_of(sup, m) == "dispatched"
    assert sup.turn(back + LEASE + TICK) and state_of(sup, m) == "queued"  # a lease from the return runs out


def test_sqlite_keeps_its_fixed_retry(tmp_path: Path) -> None:
    """On SQLite (here: another process holds the write lock past the busy timeout, ``ledger_busy``) the outage is
    the same state, retried every LEDGER_RETRY_S without backoff and without a reconnect."""
    import sqlite3

    path = tmp_path / "state" / "ledger.db"
    s = supervisor(tmp_path, path)
    holder = sqlite3.connect(str(path), isolation_level=None)
    try:
        s.start(T0)
        s.dirty = True
        holder.execute("BEGIN IMMEDIATE")
        assert not s.turn(T0 + 1) and s.outage is not None  # the policy pass waited BUSY_TIMEOUT_S for the lock
        assert "busy" in s.outage.error
        assert s.outage.delay == LEDGER_RETRY_S and s.outage.next_try == T0 + 1 + LEDGER_RETRY_S
        holder.execute("ROLLBACK")
        assert s.turn(s.outage.next_try) and s.outage is None
    finally:
        holder.close()
        s.close()


def test_a_supervisor_started_while_the_server_is_down_waits_for_it(tmp_path: Path, pg: PgServer) -> None:
    """Not exit 6 into systemd's start limit: open() waits (backing off, WATCHDOG=1 and EXTEND_TIMEOUT_USEC sent),
    and returns once the server answers."""
    rec = Recorder()
    sup = unopened(tmp_path, pg.url(pg.create_db("late")), notifier=rec)
    pg.halt("fast")
    opened = threading.Event()
    failed: list[BaseException] = []

    def run() -> None:
        try:
            sup.open()
            opened.set()
        except BaseException as exc:  # noqa: BLE001
            failed.append(exc)

    t = threading.Thread(target=run)
    t.start()
    try:
        assert not opened.wait(1.0) and not failed  # still waiting, not failed
        assert any("WATCHDOG=1" in m and "EXTEND_TIMEOUT_USEC=" in m and "waiting for the ledger" in m for m in rec.sent)
    finally:
        pg.resume()
    t.join(30)
    try:
        assert opened.is_set() and not failed, failed
        assert sup.ledger is not None and sup.ledger.version() > 0
    finally:
        sup.close()


def test_a_supervisor_stopped_while_it_waits_for_the_server_exits(tmp_path: Path, pg: PgServer) -> None:
    sup = unopened(tmp_path, pg.url(pg.create_db("never")))
    pg.halt("fast")
    failed: list[BaseException] = []
    t = threading.Thread(target=lambda: failed.append(pytest.raises(Exception, sup.open).value))
    try:
        t.start()
        t.join(0.5)
        sup.stop.set()  # SIGTERM
        t.join(15)
        assert not t.is_alive() and getattr(failed[0], "code", None) == "ledger_unavailable", failed
    finally:
        pg.resume()
        sup.close()


def test_the_ledger_lock_held_elsewhere_is_an_outage_not_a_watchdog_kill(tmp_path: Path, pg: PgServer) -> None:
    """Attack finding F1: any login may take the ledger's advisory lock (a CLI frozen inside a transaction, a hostile
    session). The supervisor waits for it at most PG_LOCK_WAIT_S a statement, so its turn fails into the outage
    state, which keeps WATCHDOG=1 going, and a supervisor started meanwhile waits instead of exiting 6."""
    import psycopg

    from lanectl.ledger.pg import LOCK_KEY
    from lanectl.supervisor.loop import PG_LOCK_WAIT_S

    url = pg.url(pg.create_db("locked"))
    rec = Recorder()
    sup = unopened(tmp_path, url, notifier=rec)
    with psycopg.connect(url, autocommit=True) as holder:
        holder.execute("SELECT pg_advisory_lock(%s)", (LOCK_KEY,))  # held by a session: no idle timeout ends it
        opened = threading.Event()
        failed: list[BaseException] = []

        def run() -> None:
            try:
                sup.open()
                sup.start(T0)
                opened.set()
            except BaseException as exc:  # noqa: BLE001
                failed.append(exc)

        t = threading.Thread(target=run)
        t.start()
        try:
            t.join(3 * PG_LOCK_WAIT_S + 5)  # open and start wait for the lock; neither gives up
            assert not failed, "".join(__import__("traceback").format_exception(failed[0])) if failed else ""
            assert any("WATCHDOG=1" in m and "waiting for the ledger" in m for m in rec.sent), rec.sent
        finally:
            holder.execute("SELECT pg_advisory_unlock(%s)", (LOCK_KEY,))
    t.join(60)
    try:
        assert opened.is_set() and not failed, failed
        assert sup.ledger is not None
        shown = sup.ledger.conn.execute("SHOW lock_timeout").fetchone()[0]
        assert shown == f"{int(PG_LOCK_WAIT_S)}s", shown
        with psycopg.connect(url, autocommit=True) as holder:
            holder.execute("SELECT pg_advisory_lock(%s)", (LOCK_KEY,))
            try:
                rec.sent.clear()
                assert not sup.turn(T0 + 1)  # the lock wait ran out: one failed turn, an outage, not a hang
                assert sup.outage is not None and "busy" in sup.health()["ledger_error"]
                assert any("WATCHDOG=1" in m for m in rec.sent), rec.sent
            finally:
                holder.execute("SELECT pg_advisory_unlock(%s)", (LOCK_KEY,))
        assert sup.turn(T0 + 1 + LEDGER_BACKOFF_S[1])
        assert sup.outage is None
    finally:
        sup.close()

"""Issue 12 items 3-5 in the supervisor on a real PostgreSQL server (tests/pgserver.py): the loop's clock follows
the server's, LISTEN/NOTIFY wakes the loop (polling stays the fallback: with LISTEN off work is still dispatched),
and GET /metrics reads through a small pool of read-only connections that survives a killed backend.

A real :class:`Supervisor` (``use_systemd=False``) and, where work must be dispatched, a real lane runtime in a
thread, as in test_supervisor_turns.py. Waits are on conditions with generous bounds, never on durations.
"""
from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from lanectl import config
from lanectl.ledger import Ledger
from lanectl.ledger import missions as ms
from lanectl.runtime import LaneInfo, LaneRuntime
from lanectl.supervisor import Supervisor
from lanectl.supervisor.loop import IDLE_MAX_S, POLL_S
from lanectl.wakeup import LISTEN_ENV
from tests.pgserver import PgServer
from tests.unit.test_supervisor_turns import Null, free_port

OBSERVE = 0.5


@pytest.fixture
def url(pg_server: PgServer) -> Iterator[str]:
    db = pg_server.create_db("sup")
    yield pg_server.url(db)
    pg_server.drop_db(db)


def until(cond: Callable[[], Any], what: str, timeout: float = 60.0) -> Any:
    end = time.monotonic() + timeout
    while not (got := cond()):
        assert time.monotonic() < end, what
        time.sleep(0.01)
    return got


def make(tmp_path: Path, url: str, lanes: dict[str, int], listen: bool | None = None) -> Supervisor:
    etc, state = tmp_path / "etc", tmp_path / "state"
    (etc / "lanes.d").mkdir(parents=True)
    state.mkdir()
    (etc / "lanectl.toml").write_text(
        f'state_dir = "{state}"\n[ledger]\npath = "{url}"\n'
        + ("" if listen is None else f"listen = {str(listen).lower()}\n")
        + f'[supervisor]\nport = {free_port()}\ntick_sec = 5\n'
        f'[health]\nobserve_sec = {OBSERVE}\n[leases]\nlease_sec = 60\nheartbeat_sec = 0.5\n')
    for name, port in lanes.items():
        ws = tmp_path / name
        ws.mkdir()
        (etc / "lanes.d" / f"{name}.toml").write_text(
            f'port = {port}\nworkspace = "{ws}"\ncapacity = 1\nclasses = ["interactive", "background"]\n')
    fleet = config.load(etc)
    sup = Supervisor(fleet, url, use_systemd=False, notifier=None, callback_socket=str(tmp_path / "callbacks.sock"),
                     lane_uids={n: os.getuid() for n in lanes})
    # Supervisor.open() also takes the one-supervisor-per-ledger lock, a file beside an SQLite ledger; its
    # PostgreSQL form belongs to the supervisor's fault handling (another branch): these tests open the rest
    sup._open()
    return sup


def run_loop(sup: Supervisor) -> threading.Thread:
    """The supervisor's main loop (``Supervisor.run`` without open/close) in a thread, until ``sup.stop``."""
    def loop() -> None:
        while not sup.stop.is_set():
            if not sup.turn(sup.clock.now()):
                sup.stop.wait(0.2)
            sup.wait(sup.idle_timeout(sup.clock.now()))

    th = threading.Thread(target=loop, name="supervisor-loop", daemon=True)
    th.start()
    return th


def test_the_loop_clock_is_the_servers_and_a_notification_wakes_a_waiting_loop(tmp_path: Path, url: str,
                                                                                 monkeypatch) -> None:
    real = time.time
    monkeypatch.setattr(time, "time", lambda: real() + 3600.0)  # this host's clock is an hour fast
    sup = make(tmp_path, url, {"alpha": free_port()})
    try:
        with Ledger.open(url) as other:
            server = float(other.conn.execute("SELECT extract(epoch from now())").fetchone()[0])
        assert abs(sup.clock.now() - server) < 60
        sup.start(sup.clock.now())
        assert sup.listener is not None and sup.listener.connected.wait(60)
        sup.dirty = False
        now = sup.clock.now()
        assert sup.idle_timeout(now) == min(IDLE_MAX_S, max(0.0, sup.next_due() - now))  # no 10 ms polling
        before = sup.listener.accepted
        woke = threading.Event()

        def waiter() -> None:
            while sup.listener.accepted == before and not sup.stop.is_set():
                sup.wait(600)  # only a wake-up ends it
            woke.set()

        th = threading.Thread(target=waiter, daemon=True)
        th.start()
        with Ledger.open(url) as other:  # another process submits
            ms.submit(other, sup.fleet, cls="background", payload={"argv": ["true"]}, now=other.clock())
        assert woke.wait(60), "no wake-up from the other process's commit"
        assert sup.listener.accepted == before + 1
        sup.listener.stop()  # the LISTEN connection is gone: the loop polls
        assert sup.idle_timeout(sup.clock.now()) == POLL_S
    finally:
        sup.stop.set()
        sup.wake()
        sup.close()


@pytest.mark.parametrize("listen", ["env", "toml", "on"])
def test_work_is_dispatched_with_and_without_listen(tmp_path: Path, url: str, monkeypatch, listen: str) -> None:
    """With LISTEN off (``LANECTL_PG_LISTEN=0`` or ``[ledger] listen = false``) the loop polls: a mission submitted
    by another process is dispatched all the same; with it on, by the notification."""
    if listen == "env":
        monkeypatch.setenv(LISTEN_ENV, "0")
    else:
        monkeypatch.delenv(LISTEN_ENV, raising=False)
    port = free_port()
    sup = make(tmp_path, url, {"alpha": port}, False if listen == "toml" else None)
    assert (sup.listener is None) == (listen != "on")
    info = LaneInfo(lane="alpha", port=port, workspace=str(tmp_path / "alpha"), session_prefix="alpha", capacity=1,
                    callback_url=f"unix:{tmp_path / 'callbacks.sock'}", dispatch_key=sup.lanes["alpha"].key,
                    heartbeat_sec=0.5, supervisor_uid=os.getuid())
    lane = LaneRuntime(info, notifier=Null())  # type: ignore[arg-type]
    lane_th = threading.Thread(target=lane.run, name="lane-main", daemon=True)
    lane_th.start()
    loop = None
    try:
        sup.start(sup.clock.now())
        loop = run_loop(sup)
        until(lambda: sup.lanes["alpha"].healthy, "the lane never turned healthy")
        if listen != "on":
            assert sup.idle_timeout(sup.clock.now()) == POLL_S
        with Ledger.open(url) as other:
            m = ms.submit(other, sup.fleet, cls="interactive", payload={"argv": ["true"]}, now=other.clock()).mission
            until(lambda: ms.get(other, m.id).state == "succeeded", "the mission was not dispatched and run")
            assert ms.get(other, m.id).attempts == 1
    finally:
        sup.stop.set()
        sup.wake()
        if loop is not None:
            loop.join(30)
        lane.stop.set()
        lane.inbox.put(0)
        lane_th.join(15)
        sup.close()


def test_metrics_read_through_a_pool_that_survives_a_killed_backend(tmp_path: Path, url: str,
                                                                      pg_server: PgServer) -> None:
    sup = make(tmp_path, url, {"alpha": free_port()})
    try:
        sup.start(sup.clock.now())
        pool = sup.metrics.pool
        assert pool is not None
        first = sup.metrics_text()
        assert "lanectl_" in first
        sup.metrics.invalidate()
        sup.metrics_text()
        stats = pool.stats()
        assert stats["requests_num"] == 2 and stats["connections_num"] == 1  # one connection, reused
        with pg_server.admin() as admin:
            pids = [r[0] for r in admin.execute("SELECT pid FROM pg_stat_activity WHERE application_name = %s",
                                                ("lanectl-supervisor-reads",))]
            assert len(pids) == 1
            admin.execute("SELECT pg_terminate_backend(%s)", (pids[0],))
            until(lambda: not admin.execute("SELECT 1 FROM pg_stat_activity WHERE pid = %s", (pids[0],)).fetchone(),
                  "the pooled backend did not go away")
        sup.metrics.invalidate()
        assert "lanectl_" in sup.metrics_text()  # the broken connection was checked and replaced
        assert pool.stats()["connections_num"] >= 2  # a new one replaced it (and min_size is kept)
        assert pool.pool.max_size == 4
    finally:
        sup.close()
    assert pool.pool.closed


def test_listen_is_taken_at_start_a_reload_says_so() -> None:
    from lanectl.config import LedgerSettings, Settings
    from lanectl.supervisor import bound_settings

    off = Settings(ledger=LedgerSettings(listen=False))
    assert bound_settings(Settings(), off) == [("[ledger] listen", True, False)]

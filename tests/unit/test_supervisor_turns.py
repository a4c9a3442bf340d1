"""Issue 11 item 9: the supervisor's main loop driven turn by turn with explicit ``now`` values, no sleeping.

A real :class:`Supervisor` (``use_systemd=False``: no unit state; its callback socket and TCP listener bound in a
temporary directory) on a real SQLite ledger. Each test chooses the instants of its turns: a lease that expires
exactly at the turn past it, the policy pass's cadence, roll-ups (catching up two buckets per turn every 0.5 s,
then every 10 s), restart-storm accounting within ``health.restart_window_sec``, recovery after
``health.recover_sec`` of health (with a real lane runtime answering /healthz), and how long the idle loop sleeps.
"""
from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from lanectl import config
from lanectl.dispatch import Assignment
from lanectl.ledger import Ledger, reads, rollups
from lanectl.ledger import missions as ms
from lanectl.runtime import LaneInfo, LaneRuntime
from lanectl.supervisor import Supervisor
from lanectl.supervisor.history import ROLLUP_CATCHUP_S, ROLLUP_EVERY_S
from lanectl.supervisor.loop import IDLE_MAX_S, IDLE_S, SUMMARY_EVERY_S

T0 = 1_700_000_100.0  # a 5-minute bucket boundary (300 * 5_666_667)
LEASE = 60.0
TICK = 5.0
OBSERVE = 3.0
WINDOW = 300.0
RECOVER = 30.0
GRACE = rollups.GRACE_S


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def write_config(tmp_path: Path, lanes: dict[str, int]) -> Path:
    etc, state = tmp_path / "etc", tmp_path / "state"
    (etc / "lanes.d").mkdir(parents=True)
    state.mkdir()
    (etc / "lanectl.toml").write_text(
        f'state_dir = "{state}"\nledger = "{state}/ledger.db"\n'
        f'[supervisor]\nport = {free_port()}\ntick_sec = {TICK}\n'
        f'[health]\nobserve_sec = {OBSERVE}\nrestart_window_sec = {WINDOW}\nrecover_sec = {RECOVER}\n'
        f'[leases]\nlease_sec = {LEASE}\nheartbeat_sec = 0.5\n')
    for name, port in lanes.items():
        ws = tmp_path / name
        ws.mkdir()
        (etc / "lanes.d" / f"{name}.toml").write_text(
            f'port = {port}\nworkspace = "{ws}"\ncapacity = 1\nclasses = ["interactive", "background"]\n'
            '[restart]\nmax_restarts = 3\n')
    return etc


def supervisor(tmp_path: Path, lanes: dict[str, int]) -> Supervisor:
    fleet = config.load(write_config(tmp_path, lanes))
    sup = Supervisor(fleet, tmp_path / "state" / "ledger.db", use_systemd=False, notifier=None,
                     callback_socket=str(tmp_path / "callbacks.sock"), lane_uids={n: os.getuid() for n in lanes})
    sup.open()
    return sup


@pytest.fixture
def sup(tmp_path: Path) -> Iterator[Supervisor]:
    """Two lanes with nothing listening on their ports: they are never healthy, so the policy gives them
    nothing and what the ledger holds changes only by the supervisor's turns."""
    s = supervisor(tmp_path, {"alpha": free_port(), "beta": free_port()})
    try:
        s.start(T0)
        yield s
    finally:
        s.close()


def state_of(sup: Supervisor, mission: int) -> str:
    assert sup.ledger is not None
    return ms.get(sup.ledger, mission).state


def kinds_of(sup: Supervisor, mission: int) -> list[str]:
    assert sup.ledger is not None
    return [e[2] for e in reads.events(sup.ledger, mission=mission)]  # (id, at, kind, ...)


# ---------------------------------------------------------------------------------------------- leases
def test_a_lease_expires_at_the_first_turn_past_it(sup: Supervisor) -> None:
    assert sup.ledger is not None
    m = ms.submit(sup.ledger, sup.fleet, cls="background", payload={"argv": ["true"]}, now=T0).mission.id
    [d] = ms.assign(sup.ledger, [Assignment(m, "alpha", "background")], now=T0, lease_sec=LEASE)
    assert d.lane == "alpha" and state_of(sup, m) == "dispatched"
    for at in (T0 + 1, T0 + 1 + TICK, T0 + LEASE - 0.5):  # policy passes run; the lease still holds
        assert sup.turn(at)
        assert sup.last_tick == at and state_of(sup, m) == "dispatched"
    assert sup.turn(T0 + LEASE + 0.5)  # past the lease, but no policy pass is due: leases are reaped by one
    assert sup.last_tick == T0 + LEASE - 0.5 and state_of(sup, m) == "dispatched"
    assert sup.turn(T0 + LEASE - 0.5 + TICK)
    assert state_of(sup, m) == "queued"  # back in the queue: alpha and beta are down, nobody takes it
    assert kinds_of(sup, m)[:3] == ["submitted", "dispatched", "requeued"], kinds_of(sup, m)


def test_a_restart_forgives_the_outage_every_lease_runs_from_the_start(tmp_path: Path) -> None:
    sup = supervisor(tmp_path, {"alpha": free_port(), "beta": free_port()})
    try:
        assert sup.ledger is not None
        m = ms.submit(sup.ledger, sup.fleet, cls="background", payload={}, now=T0).mission.id
        ms.assign(sup.ledger, [Assignment(m, "alpha", "background")], now=T0, lease_sec=LEASE)
        later = T0 + 10 * LEASE  # the supervisor was away far longer than the lease
        sup.start(later)
        assert sup.turn(later + LEASE - 1) and state_of(sup, m) == "dispatched"
        assert sup.turn(later + LEASE - 1 + TICK) and state_of(sup, m) == "queued"
    finally:
        sup.close()


# ---------------------------------------------------------------------------------------------- cadences
def test_the_policy_pass_runs_every_tick_sec_and_when_another_process_commits(sup: Supervisor) -> None:
    assert sup.turn(T0 + 0.1) and sup.last_tick == T0 + 0.1
    assert sup.turn(T0 + 1) and sup.last_tick == T0 + 0.1  # nothing changed, tick_sec not over
    with Ledger.open(sup.ledger_path) as other:  # another process's commit (a submit)
        ms.submit(other, sup.fleet, cls="background", payload={}, now=T0 + 1.5)
    assert sup.turn(T0 + 2) and sup.last_tick == T0 + 2
    assert sup.turn(T0 + 2 + TICK - 0.01) and sup.last_tick == T0 + 2
    assert sup.turn(T0 + 2 + TICK) and sup.last_tick == T0 + 2 + TICK


def test_roll_ups_catch_up_two_buckets_a_turn_then_run_every_ten_seconds(sup: Supervisor) -> None:
    assert sup.ledger is not None
    conn = sup.ledger.conn
    assert sup.turn(T0)
    assert rollups.state(conn)[0] == T0 and sup.history.next_rollup == T0 + ROLLUP_EVERY_S
    late = T0 + 10 * 300 + GRACE  # ten buckets closed since
    assert sup.turn(late)
    assert rollups.state(conn)[0] == T0 + 2 * 300 and sup.history.next_rollup == late + ROLLUP_CATCHUP_S
    assert sup.turn(late + ROLLUP_CATCHUP_S / 2)  # not due yet
    assert rollups.state(conn)[0] == T0 + 2 * 300
    at = late + ROLLUP_CATCHUP_S
    for n in (4, 6, 8, 10):
        assert sup.turn(at)
        assert rollups.state(conn)[0] == T0 + n * 300
        at += ROLLUP_CATCHUP_S
    assert sup.turn(at)  # caught up: nothing rolled, the next look in ROLLUP_EVERY_S
    assert rollups.state(conn)[0] == T0 + 10 * 300 and sup.history.next_rollup == at + ROLLUP_EVERY_S


def test_the_idle_loop_sleeps_until_the_next_thing_due(sup: Supervisor) -> None:
    """With inotify (Linux) every event wakes the loop; by the clock it has something to do only when a cadence
    is due, so it sleeps until then (at most IDLE_MAX_S) instead of turning ten times a second."""
    assert sup.commits is not None, "no inotify: the loop polls (POLL_S) and this test does not apply"
    sup.ping_every = 60.0  # no watchdog here: the summary (every SUMMARY_EVERY_S) is the next thing due
    assert sup.turn(T0 + 0.1)
    assert not sup.dirty
    # start(T0) refreshed the summary: the next is due at T0 + SUMMARY_EVERY_S
    assert sup.idle_timeout(T0 + 0.1) == pytest.approx(min(IDLE_MAX_S, SUMMARY_EVERY_S - 0.1), abs=1e-6)
    assert sup.idle_timeout(T0 + 0.6) == pytest.approx(SUMMARY_EVERY_S - 0.6, abs=1e-6)
    assert sup.idle_timeout(T0 + 5) == 0.0  # overdue: no sleep at all
    sup.dirty = True  # a part asked for a policy pass
    assert sup.idle_timeout(T0 + 0.1) == IDLE_S
    sup.dirty = False
    sup.last_summary = T0 + 100
    assert sup.idle_timeout(T0 + 0.1) == IDLE_MAX_S  # the next observation (OBSERVE) is further than that
    sup.watch.settling = True  # a lane went down: it is observed every 0.25 s
    sup.watch.last_observe = T0
    assert sup.idle_timeout(T0 + 0.1) == pytest.approx(0.15, abs=1e-6)


# ---------------------------------------------------------------------------------------------- restart storms
def test_restarts_degrade_a_lane_only_when_max_restarts_fall_within_the_window(sup: Supervisor) -> None:
    """Restart-storm accounting (``Health.count_restarts``, what an observation does with systemd's NRestarts)
    against the ledger: three restarts spread wider than the window leave alpha active; three within it
    degrade it -- unless it is the last healthy lane of a class (an alert instead)."""
    h = sup.lane_health
    w = sup.lanes["alpha"]
    h.count_restarts(w, 5, T0)  # this process's first reading only sets the base
    assert list(w.restart_times) == []
    for n, at in enumerate((T0 + 10, T0 + 10 + WINDOW / 2 + 1, T0 + 10 + WINDOW + 2), start=6):
        h.count_restarts(w, n, at)
        h.forget_old_restarts(w, at)
        h.judge(w, at)
        assert w.state == "active" and reads.lane_states(sup.ledger)["alpha"] == "active"  # type: ignore[arg-type]
    assert len(w.restart_times) == 2  # the first fell out of the window
    storm = T0 + 10 + WINDOW + 3
    h.count_restarts(w, 9, storm)
    h.forget_old_restarts(w, storm)
    h.judge(w, storm)  # beta is down: alpha is the last lane for its classes and keeps serving them
    assert w.state == "active" and reads.lane_states(sup.ledger)["alpha"] == "active"  # type: ignore[arg-type]
    alerts = reads.events(sup.ledger, lane="alpha", kind="alert")  # type: ignore[arg-type]
    assert [e[1] for e in alerts] == [storm]  # (id, at, ...)
    h.set_health(sup.lanes["beta"], True, storm)
    h.count_restarts(w, 10, storm + 1)
    h.forget_old_restarts(w, storm + 1)
    h.judge(w, storm + 1)
    assert w.state == "degraded" and reads.lane_states(sup.ledger)["alpha"] == "degraded"  # type: ignore[arg-type]
    assert w.unrecorded_restarts == 5 and len(w.restart_times) == 4


# ---------------------------------------------------------------------------------------------- recovery
class Null:
    def send(self, msg: str) -> None:
        pass


def test_a_degraded_lane_recovers_at_the_first_turn_after_recover_sec_of_health(tmp_path: Path) -> None:
    port = free_port()
    sup = supervisor(tmp_path, {"alpha": port})
    info = LaneInfo(lane="alpha", port=port, workspace=str(tmp_path / "alpha"), session_prefix="alpha", capacity=1,
                    callback_url=f"unix:{tmp_path / 'callbacks.sock'}", dispatch_key=sup.lanes["alpha"].key,
                    heartbeat_sec=0.5, supervisor_uid=os.getuid())
    lane = LaneRuntime(info, notifier=Null())  # type: ignore[arg-type]
    th = threading.Thread(target=lane.run, name="lane-main", daemon=True)
    th.start()
    try:
        w = sup.lanes["alpha"]
        sup.start(T0)
        at = T0
        end = time.monotonic() + 30
        while not w.healthy:  # the lane's HTTP server comes up in its thread: observe until it answers
            assert time.monotonic() < end, "the lane never answered /healthz"
            at += OBSERVE
            sup.turn(at)
        since = w.healthy_since
        assert since == at
        sup.lane_health.degrade(w, "restart_instability: test", at)
        assert reads.lane_states(sup.ledger)["alpha"] == "degraded"  # type: ignore[arg-type]
        last = since + RECOVER - 0.5
        for t in (at + OBSERVE, last):  # observations: healthy, but not for recover_sec yet
            assert sup.turn(t)
            assert sup.watch.last_observe == t and w.state == "degraded" and w.healthy
        assert sup.turn(since + RECOVER)  # recover_sec is over, but it takes an observation to judge
        assert w.state == "degraded"
        assert sup.turn(last + OBSERVE)
        assert w.state == "active" and reads.lane_states(sup.ledger)["alpha"] == "active"  # type: ignore[arg-type]
    finally:
        lane.stop.set()
        lane.inbox.put(0)
        th.join(15)
        sup.close()


def test_a_commit_wake_up_that_shows_nothing_new_is_looked_at_again(sup: Supervisor, tmp_path: Path) -> None:
    """inotify fires when a process writes the WAL, before its commit is visible: a turn that sees nothing new
    looks again after RECHECK_S[0], then later and later, instead of sleeping until the next thing due (up to
    IDLE_MAX_S); a commit it then sees ends the rechecks. A commit of the supervisor's own connection is the
    deterministic case of "woken, nothing new" (PRAGMA data_version counts other connections' commits only)."""
    from lanectl.ledger.events import EventKind, append
    from lanectl.supervisor.loop import RECHECK_S

    assert sup.commits is not None, "no inotify: the loop polls (POLL_S) and this test does not apply"
    sup.ping_every = 60.0
    sup.last_summary = T0 + 100
    assert sup.turn(T0 + 0.1)
    assert sup.idle_timeout(T0 + 0.1) == IDLE_MAX_S
    with sup.shared.db.transaction() as conn:  # the supervisor's own commit: the WAL changes, data_version not
        append(conn, EventKind.LANE_STATE, T0, lane="alpha", to="active", previous="active", reason="test")
    sup.wait(5.0)  # returns at the inotify event
    assert sup.recheck == -1
    seen = []
    for i in range(len(RECHECK_S)):
        assert sup.turn(T0 + 0.2 + i * 0.01)
        seen.append(sup.idle_timeout(T0 + 0.2 + i * 0.01))
    assert seen == list(RECHECK_S)
    assert sup.turn(T0 + 0.3)
    assert sup.recheck is None and sup.idle_timeout(T0 + 0.3) == IDLE_MAX_S  # given up: sleeps until due
    # another process's commit that the next turn sees ends the rechecks at once
    with sup.shared.db.transaction() as conn:
        append(conn, EventKind.LANE_STATE, T0, lane="alpha", to="active", previous="active", reason="test")
    sup.wait(5.0)
    other = Ledger.open(tmp_path / "state" / "ledger.db")
    try:
        with other.transaction() as conn:
            append(conn, EventKind.LANE_STATE, T0, lane="beta", to="active", previous="active", reason="test")
    finally:
        other.close()
    assert sup.turn(T0 + 0.4)
    assert sup.recheck is None and sup.idle_timeout(T0 + 0.4) == IDLE_MAX_S


@pytest.mark.parametrize("value", [True, None, 7, "1,2", {"1": 2}, [1, True, "2", 3.0, 4]])
def test_a_healthz_list_of_the_wrong_type_means_no_missions(value: object) -> None:
    """Attack finding F2: a lane answering ``"reporting": true`` crashed the supervisor at every start."""
    from lanectl.supervisor.watch import _ints

    assert _ints(value) == ({1, 4} if isinstance(value, list) else set())

"""Issue 16 (2, 7), in-process: a real :class:`Supervisor` (driven turn by turn, ``use_systemd=False``) and a real
:class:`LaneRuntime` (its work loop and HTTP server in threads) against a temporary ledger.

- Clock jumps change nothing: the supervisor's clock is injected; the wall clock steps +10 min and -10 min under
  running missions and a mission in retry backoff: no lease expires, the backoff lasts what it lasts, no rollback
  or alert, and /healthz reports the skew.
- A lane that refuses a dispatch because it is full costs the mission no attempt (with ``max_attempts = 1`` the old
  code declared it dead on the first 429).
- A lane stops the process of an attempt the supervisor fenced (the old runtime ran it on).
"""
from __future__ import annotations

import os
import socket
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from lanectl import config
from lanectl.ledger import missions as ms
from lanectl.protocol import DispatchMsg
from lanectl.runtime import LaneInfo, LaneRuntime
from lanectl.supervisor import Clock, Supervisor

LEASE = 30.0
BACKOFF = 2.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Null:
    def send(self, msg: str) -> None:
        pass


class Wall:
    """The wall clock the supervisor would read, with a step we control."""

    def __init__(self) -> None:
        self.step = 0.0

    def __call__(self) -> float:
        return time.time() + self.step


@dataclass
class Rig:
    sup: Supervisor
    lane: LaneRuntime
    thread: threading.Thread
    wall: Wall

    def turn(self) -> None:
        self.sup.turn(self.sup.clock.now())
        self.sup.wait(0.01)

    def until(self, pred: Callable[[], bool], timeout: float = 20.0, what: str = "condition") -> None:
        end = time.monotonic() + timeout
        while not pred():
            if time.monotonic() > end:
                raise AssertionError(f"timed out waiting for {what}")
            self.turn()

    def spin(self, seconds: float) -> None:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            self.turn()

    def q(self, sql: str, *args: Any) -> list[tuple[Any, ...]]:
        assert self.sup.ledger is not None
        return self.sup.ledger.conn.execute(sql, args).fetchall()

    def state(self, mission: int) -> str:
        return self.q("SELECT state FROM missions WHERE id = ?", mission)[0][0]

    def submit(self, argv: list[str], cls: str = "interactive") -> int:
        assert self.sup.ledger is not None
        m = ms.submit(self.sup.ledger, self.sup.fleet, cls=cls, payload={"argv": argv}, now=self.sup.clock.now())
        self.sup.dirty = True
        return m.mission.id


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    etc, state, ws = tmp_path / "etc", tmp_path / "state", tmp_path / "alpha"
    (etc / "lanes.d").mkdir(parents=True)
    state.mkdir()
    ws.mkdir()
    port = free_port()
    (etc / "lanectl.toml").write_text(
        f'state_dir = "{state}"\nledger = "{state}/ledger.db"\n'
        f'[supervisor]\nport = {free_port()}\ntick_sec = 0.2\n[health]\nobserve_sec = 0.3\n'
        f'[leases]\nlease_sec = {LEASE}\nheartbeat_sec = 0.5\nretry_backoff_sec = {BACKOFF}\n'
        f'[classes.interactive]\nmax_wait_sec = 5\nmax_attempts = 1\n'
        f'[classes.background]\nmax_wait_sec = 600\nmax_attempts = 5\n')
    (etc / "lanes.d" / "alpha.toml").write_text(f'port = {port}\nworkspace = "{ws}"\ncapacity = 1\n'
                                               'classes = ["interactive", "background"]\n')
    fleet = config.load(etc)
    sock = str(tmp_path / "callbacks.sock")
    wall = Wall()
    sup = Supervisor(fleet, state / "ledger.db", use_systemd=False, notifier=None, callback_socket=sock,
                     lane_uids={"alpha": os.getuid()}, clock=Clock(wall, time.monotonic))
    sup.open()  # makes the box secret in state_dir; the lane gets its derived key
    info = LaneInfo(lane="alpha", port=port, workspace=str(ws), session_prefix="alpha", capacity=1,
                    callback_url=f"unix:{sock}", dispatch_key=sup.lanes["alpha"].key, heartbeat_sec=0.5,
                    supervisor_uid=os.getuid())
    lane = LaneRuntime(info, notifier=Null())  # type: ignore[arg-type]
    th = threading.Thread(target=lane.run, name="lane-main", daemon=True)
    th.start()
    r = Rig(sup, lane, th, wall)
    now = sup.clock.now()
    r.until(lambda: (sup.watch.observe(now), sup.lanes["alpha"].healthy)[1], what="the lane to be healthy")
    sup.watch.started_at = now
    sup.watch.last_observe = sup.clock.now()
    yield r
    lane.stop.set()
    lane.inbox.put(0)
    for rr in list(lane.held.values()):
        lane.kill_mission(rr, time.monotonic())
    th.join(15)
    sup.close()


def post_dispatch(rig: Rig, mission: int, argv: list[str]) -> int:
    """A dispatch straight to the lane (as root could, with the lane's key), for a mission the ledger never
    gave it: the lane is then fuller than the ledger knows."""
    body = DispatchMsg(mission, 1, "alpha", "t" * 32, "interactive", None, None, {"argv": argv}).as_json()
    import json

    req = urllib.request.Request(f"http://127.0.0.1:{rig.lane.info.port}/missions", data=json.dumps(body).encode(),
                                 method="POST", headers={"Content-Type": "application/json",
                                                         "Authorization": f"Bearer {rig.sup.lanes['alpha'].key}"})
    with urllib.request.urlopen(req, timeout=5) as resp:
        return int(resp.status)


@pytest.mark.parametrize("step", [600.0, -600.0])
def test_a_wall_clock_step_changes_nothing(rig: Rig, step: float) -> None:
    running = rig.submit(["/bin/sh", "-c", "sleep 30"], cls="background")
    rig.until(lambda: rig.state(running) == "running", what="the mission to run")
    # a second mission, in retry backoff: its first attempt fails and is retried (not the command's fault)
    backoff = rig.submit(["true"], cls="background")
    assert rig.sup.ledger is not None
    with rig.sup.ledger.transaction() as conn:  # as after two lost attempts: the next one waits BACKOFF
        conn.execute("UPDATE missions SET attempts = 2, round_start = 0, updated_at = ? WHERE id = ?",
                     (rig.sup.clock.now(), backoff))
    lease_before = rig.q("SELECT lease_expires FROM attempts WHERE mission = ?", running)[0][0]
    events_before = rig.q("SELECT max(id) FROM events")[0][0]
    t_requeued = rig.sup.clock.now()
    rig.wall.step = step  # the wall clock jumps: an NTP correction
    rig.spin(0.6)  # several ticks, observations and heartbeats
    assert rig.state(running) == "running"
    assert rig.state(backoff) == "queued", "the backoff ended early"
    lease_after = rig.q("SELECT lease_expires FROM attempts WHERE mission = ?", running)[0][0]
    assert abs(lease_after - lease_before) < 5, (lease_before, lease_after)  # heartbeats moved it a little
    kinds = {k for (k,) in rig.q("SELECT kind FROM events WHERE id > ?", events_before)}
    assert not kinds & {"requeued", "dead", "rollback", "alert", "expired"}, kinds
    rig.sup.refresh_summary()
    assert abs(rig.sup.summary["clock_skew_s"] - step) < 5
    # the backoff lasts BACKOFF on the supervisor's clock; the running mission's slot is taken, so free it
    ms.cancel(rig.sup.ledger, running, now=rig.sup.clock.now())
    rig.until(lambda: rig.state(backoff) != "queued", what="the mission in backoff to be dispatched")
    waited = rig.q("SELECT min(at) FROM events WHERE mission = ? AND kind = 'dispatched'", backoff)[0][0]
    assert waited - t_requeued >= BACKOFF - 0.01
    assert waited - t_requeued < abs(step) / 2


def test_a_full_lane_refusing_a_dispatch_costs_no_attempt(rig: Rig) -> None:
    # the lane runs something the ledger does not know of (it ignores SIGTERM: it holds the slot ~5 s even after
    # the supervisor fences it), so its one slot is taken while the ledger sees room
    assert post_dispatch(rig, 999, ["/bin/sh", "-c", "trap '' TERM; sleep 20"]) == 202
    m = rig.submit(["true"])  # max_attempts = 1: a charged refusal would make it dead at once
    rig.until(lambda: rig.q("SELECT count(*) FROM events WHERE mission = ? AND kind IN ('requeued', 'dead')",
                            m)[0][0] > 0, what="the lane to refuse the dispatch")
    rig.until(lambda: rig.state(m) in ("succeeded", "dead", "failed"), timeout=30, what="the mission to end")
    assert rig.state(m) == "succeeded", rig.q("SELECT kind, data FROM events WHERE mission = ?", m)
    ev = rig.q("SELECT data FROM events WHERE mission = ? AND kind = 'requeued'", m)
    assert ev and all('"charged":false' in d.replace(" ", "") for (d,) in ev), ev
    used = rig.q("SELECT attempts - round_start FROM missions WHERE id = ?", m)[0][0]
    assert used == 1  # only the attempt that ran counts
    refusals = len(ev)
    assert refusals <= 10, f"{refusals} refusals: the supervisor went on dispatching to a full lane"


def test_the_lane_stops_an_attempt_the_supervisor_fenced(rig: Rig) -> None:
    # an attempt the ledger does not count (it names no current attempt): the supervisor answers its callbacks
    # 409 lease_fenced, and the lane must stop it rather than run it on beside the ledger's attempt
    assert post_dispatch(rig, 998, ["/bin/sh", "-c", "sleep 30"]) == 202
    rig.until(lambda: 998 in rig.lane.held and rig.lane.held[998].proc is not None, what="the attempt to start")
    proc = rig.lane.held[998].proc
    assert proc is not None
    rig.until(lambda: proc.poll() is not None, timeout=15, what="the lane to stop the fenced attempt")
    rig.until(lambda: 998 not in rig.lane.held, what="the lane to let go of it")


def test_a_reload_adopts_added_and_removed_lanes_and_keeps_what_runs(rig: Rig, tmp_path: Path) -> None:
    """Issue 15 item 4, in-process: SIGHUP's reload (``Supervisor.reload``) with a mission running on alpha."""
    sup = rig.sup
    mid = rig.submit(["/bin/sh", "-c", "sleep 2"], cls="background")
    rig.until(lambda: rig.state(mid) == "running", what="the mission to run")
    etc = Path(sup.config_source)
    (etc / "lanes.d" / "delta.toml").write_text(f'port = {free_port()}\nworkspace = "{tmp_path}/delta"\n')
    assert sup.reload(sup.clock.now()) is True
    assert sorted(sup.lanes) == ["alpha", "delta"] and sorted(sup.fleet.lanes) == ["alpha", "delta"]
    assert sup.health()["generation"] == 1 and sup.health()["reloads"] == 1 and sup.health()["reload_error"] is None
    assert sorted(sup.health()["lanes"]) == ["alpha", "delta"]
    # a configuration that does not load changes nothing
    (etc / "lanes.d" / "delta.toml").write_text("port = 1\n")
    assert sup.reload(sup.clock.now()) is False
    assert sorted(sup.lanes) == ["alpha", "delta"] and sup.health()["generation"] == 1
    assert "delta.toml" in sup.health()["reload_error"] and sup.health()["reloads"] == 2
    (etc / "lanes.d" / "delta.toml").unlink()
    assert sup.reload(sup.clock.now()) is True and sorted(sup.lanes) == ["alpha"]
    assert sup.health()["reload_error"] is None
    rig.until(lambda: rig.state(mid) == "succeeded", what="the mission to finish")
    assert rig.q("SELECT count(*) FROM attempts WHERE mission = ?", mid) == [(1,)]


def test_settings_bound_at_start_are_named_at_a_reload(tmp_path: Path) -> None:
    from lanectl.config import Settings
    from lanectl.supervisor import bound_settings

    old = Settings()
    new = Settings.model_validate({"supervisor": {"port": 8799, "tick_sec": 0.5}, "ledger": {"path": "/x.db"}})
    assert [n for n, _, _ in bound_settings(old, new)] == ["[supervisor] port", "[ledger] path"]
    assert bound_settings(old, Settings()) == []

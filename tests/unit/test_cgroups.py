"""lanectl/cgroups.py and lanectl/landlock.py without a systemd: parsing, reserves, counters, the callback's retry
flag (the behaviour under a real systemd is in tests/systemd/test_containment.py)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lanectl import cgroups, landlock
from lanectl.protocol import BadMessage, CallbackMsg, parse_callback

HYBRID = """12:pids:/lanectl.slice/lanectl-lane@a.service/runtime
4:memory:/lanectl.slice/lanectl-lane@a.service/runtime
9:name=systemd:/lanectl.slice/lanectl-lane@a.service
2:cpu,cpuacct:/lanectl.slice
0::/lanectl.slice/lanectl-lane@a.service/runtime
"""


def test_proc_cgroup_is_read_per_hierarchy() -> None:
    got = cgroups.parse_proc_cgroup(HYBRID)
    assert got["unified"] == "/lanectl.slice/lanectl-lane@a.service/runtime"
    assert got["pids"] == got["memory"] == "/lanectl.slice/lanectl-lane@a.service/runtime"
    assert got["cpu"] == got["cpuacct"] == "/lanectl.slice"
    assert got["name=systemd"] == "/lanectl.slice/lanectl-lane@a.service"


def test_mounts_tell_pure_v2_from_hybrid(tmp_path: Path) -> None:
    (tmp_path / "cgroup.controllers").write_text("cpu memory pids\n")
    assert cgroups.mounts(tmp_path) == {"unified": tmp_path}
    hybrid = tmp_path / "h"
    for d in ("unified", "pids", "memory", "cpu"):
        (hybrid / d).mkdir(parents=True)
    (hybrid / "unified" / "cgroup.controllers").write_text("")
    for d in ("pids", "memory", "cpu"):
        (hybrid / d / "cgroup.procs").write_text("")
    assert cgroups.mounts(hybrid) == {"unified": hybrid / "unified", "pids": hybrid / "pids",
                                      "memory": hybrid / "memory"}


@pytest.mark.parametrize("limit, asked, want", [(64, None, 16), (1000, None, 250), (20, None, 10), (64, 40, 32),
                                                (64, 5, 5), (2, None, 1)])
def test_the_runtime_keeps_a_task_reserve(limit: int, asked: int | None, want: int) -> None:
    assert cgroups.tasks_reserve(limit, asked) == want


def test_the_memory_reserve_is_a_quarter_at_most_64_mib() -> None:
    assert cgroups.memory_reserve(128 << 20) == 32 << 20
    assert cgroups.memory_reserve(4 << 30) == 64 << 20


def test_oom_kills_are_read_from_v1_and_v2_counters(tmp_path: Path) -> None:
    v2, v1 = tmp_path / "u", tmp_path / "m"
    v2.mkdir()
    v1.mkdir()
    (v2 / "memory.events").write_text("low 0\nhigh 0\nmax 12\noom 1\noom_kill 1\noom_group_kill 0\n")
    (v1 / "memory.oom_control").write_text("oom_kill_disable 0\nunder_oom 0\noom_kill 2\n")
    assert cgroups.MissionCgroup("m1-1-1", {"unified": v2}).oom_kills() == 1
    assert cgroups.MissionCgroup("m1-1-1", {"memory": v1}).oom_kills() == 2
    assert cgroups.MissionCgroup("m1-1-1", {"unified": tmp_path / "gone"}).oom_kills() == 0


def test_a_runtime_outside_a_delegated_cgroup_is_refused_not_half_set_up(tmp_path: Path) -> None:
    with pytest.raises(OSError):
        cgroups.Containment.setup(root=tmp_path)  # nothing mounted there


def test_the_callback_retry_flag_round_trips_only_on_failed() -> None:
    msg = CallbackMsg(1, 2, "a", "t", "failed", error="could not start", retry=True)
    assert parse_callback(json.dumps(msg.as_json()).encode()).retry is True
    doc = CallbackMsg(1, 2, "a", "t", "succeeded").as_json()
    assert "retry" not in doc
    assert parse_callback(json.dumps({**doc, "retry": True}).encode()).retry is False
    with pytest.raises(BadMessage):
        parse_callback(json.dumps({**doc, "event": "failed", "retry": "yes"}).encode())


@pytest.mark.skipif(landlock.abi() < 1, reason="the kernel has no Landlock")
def test_a_landlocked_child_writes_only_where_it_may(tmp_path: Path) -> None:
    ok, other = tmp_path / "ok", tmp_path / "other"
    ok.mkdir()
    other.mkdir()
    rs = landlock.Ruleset.create([str(ok)], scope_signals=False)
    try:
        proc = subprocess.run([sys.executable, "-c", "import sys\nfor p in sys.argv[1:]:\n    try:\n"
                               "        open(p, 'w').close(); print('ok')\n    except OSError:\n"
                               "        print('refused')", str(ok / "f"), str(other / "f")],
                              preexec_fn=rs.restrict, capture_output=True, text=True, check=True)
    finally:
        os.close(rs.fd)
    assert proc.stdout.split() == ["ok", "refused"]


@pytest.mark.parametrize("total, capacity, minimum, want", [
    (48, 4, 8, 24),  # a 64-task lane of 4 slots: one mission takes at most 24 of the missions' 48, 8 stay for each other
    (48, 1, 8, 48),  # a lane of one slot: all of it
    (20, 4, 8, 5),  # too small to give every slot its minimum: an even split
    (192 << 20, 4, 32 << 20, 96 << 20),
    (3, 8, 8, 1),
])
def test_a_mission_leaves_every_other_slot_its_minimum(total: int, capacity: int, minimum: int, want: int) -> None:
    got = cgroups.mission_share(total, capacity, minimum)
    assert got == want
    assert got >= 1
    if total >= capacity * minimum:  # the other slots keep their minimum whatever one mission does
        assert total - got >= (capacity - 1) * minimum


def fake_hybrid(tmp_path: Path, tasks: int, memory: int) -> dict[str, Path]:
    base = {}
    for h in ("unified", "pids", "memory"):
        d = tmp_path / h / "lane"
        (d / cgroups.MISSIONS).mkdir(parents=True)
        base[h] = d
    (base["pids"] / "pids.max").write_text(f"{tasks}\n")
    (base["memory"] / "memory.limit_in_bytes").write_text(f"{memory}\n")
    for f in ("pids/lane/missions/pids.max", "memory/lane/missions/memory.limit_in_bytes"):  # as cgroupfs makes them
        (tmp_path / f).write_text("")
    return base


def test_each_mission_cgroup_gets_its_own_limits_before_it_runs(tmp_path: Path) -> None:
    c = cgroups.Containment(fake_hybrid(tmp_path, 64, 256 << 20), capacity=4)
    c.apply_reserve(None)
    assert (c.tasks_max, c.memory_max) == (48, 192 << 20)
    assert (c.mission_tasks_max, c.mission_memory_max) == (24, 96 << 20)
    assert (c.base["pids"] / "missions" / "pids.max").read_text() == "48"
    files = c.limit_files("m7-1-1")
    assert files == [(c.missions["pids"] / "m7-1-1" / "pids.max", 24),
                     (c.missions["memory"] / "m7-1-1" / "memory.limit_in_bytes", 96 << 20)]
    # on a pure v2 host the unified hierarchy holds both
    v2 = tmp_path / "v2" / "lane"
    (v2 / "missions").mkdir(parents=True)
    (v2 / "pids.max").write_text("64\n")
    (v2 / "memory.max").write_text(f"{256 << 20}\n")
    (v2 / "missions" / "pids.max").write_text("")
    (v2 / "missions" / "memory.max").write_text("")
    c2 = cgroups.Containment({"unified": v2}, capacity=4)
    c2.apply_reserve(None)
    assert c2.limit_files("m1-1-1") == [(v2 / "missions" / "m1-1-1" / "pids.max", 24),
                                        (v2 / "missions" / "m1-1-1" / "memory.max", 96 << 20)]


def test_whose_memory_limit_the_kernel_enforced_is_read_from_the_cgroup(tmp_path: Path) -> None:
    v1, v2 = tmp_path / "m", tmp_path / "u"
    v1.mkdir()
    v2.mkdir()
    (v1 / "memory.failcnt").write_text("0\n")
    assert not cgroups.MissionCgroup("m1-1-1", {"memory": v1}).hit_own_memory_limit()
    (v1 / "memory.failcnt").write_text("37\n")
    assert cgroups.MissionCgroup("m1-1-1", {"memory": v1}).hit_own_memory_limit()
    (v2 / "memory.events.local").write_text("low 0\nhigh 0\nmax 0\noom 1\noom_kill 1\n")
    assert not cgroups.MissionCgroup("m1-1-1", {"unified": v2}).hit_own_memory_limit()
    (v2 / "memory.events.local").write_text("low 0\nhigh 0\nmax 4\noom 1\noom_kill 1\n")
    assert cgroups.MissionCgroup("m1-1-1", {"unified": v2}).hit_own_memory_limit()


def test_a_start_the_lane_refused_goes_back_uncharged_and_is_no_failure(tmp_path: Path) -> None:
    """The lane could not start the mission (no task left): the supervisor's callback returns the attempt
    uncharged (no failed or dead event: nothing for rollback to count), the mission runs again and can succeed;
    a plain retryable failure is still charged."""
    from lanectl.config import ClassPolicy, Lane, LaneSet, Settings
    from lanectl.ledger import Ledger, events, tick
    from lanectl.ledger import missions as ms
    from lanectl.ledger.events import EventKind
    from lanectl.supervisor.callbacks import as_callback

    fleet = LaneSet({"a": Lane(port=9001, workspace="/var/lib/lanes/a", capacity=2)},
                    Settings(classes={"background": ClassPolicy(max_wait_sec=600, queue_limit=50, max_attempts=2)}),
                    tmp_path, tmp_path / "lanes.d")
    led = Ledger.open(tmp_path / "ledger.db")
    try:
        t = 1_700_000_000.0
        m = ms.submit(led, fleet, cls="background", payload=1, now=t, lane="a").mission.id
        for n in range(5):  # refused more often than max_attempts: never dead
            [d] = tick.run_once(led, fleet, now=t).dispatches
            msg = CallbackMsg(m, d.attempt, "a", d.token, "failed", error="could not start: no task", retry=True)
            cb = as_callback(msg)
            assert cb.uncharged
            with led.transaction() as conn:
                [o] = ms.apply_callbacks_in(conn, [cb], now=t + 1, lease_sec=20)
            assert o.rejected is None and o.state == "queued"
            got = ms.get(led, m)
            assert got.state == "queued" and got.attempts - got.round_start == 0, got
            t += 1  # no backoff: nothing was charged
        kinds = {e["kind"] for e in events.query(led.conn, mission=m)}
        assert not kinds & {"failed", "dead"}, kinds
        req = [e for e in events.query(led.conn, kind=EventKind.REQUEUED) if e["mission"] == m]
        assert len(req) == 5 and all(e["data"]["charged"] is False and "could not start" in e["data"]["reason"]
                                     for e in req), req
        [d] = tick.run_once(led, fleet, now=t).dispatches
        ms.complete(led, m, lane="a", attempt=d.attempt, token=d.token, now=t + 1)
        assert ms.get(led, m).state == "succeeded"
    finally:
        led.close()

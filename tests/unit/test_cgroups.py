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

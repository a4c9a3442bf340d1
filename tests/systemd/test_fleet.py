"""The example fleet under a real systemd: install, up, crash, hang, down."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tests.conftest import LANECTL_BIN
from tests.systemd.lanehelpers import Fleet, copy_example, wait_for

pytestmark = pytest.mark.systemd
LANES = ("alpha", "beta", "gamma")


@pytest.fixture(scope="module")
def fleet(sandbox, tmp_path_factory) -> Fleet:  # type: ignore[no-untyped-def]
    f = Fleet(sandbox, copy_example(tmp_path_factory.mktemp("fleet")))
    code, doc = f.json("install")
    assert code == 0, doc
    assert doc["data"]["reloaded"] is True
    yield f
    f.lanectl("down")


def test_install_is_idempotent(fleet: Fleet) -> None:
    code, doc = fleet.json("install")
    assert code == 0 and doc["data"]["changed"] is False and doc["data"]["reloaded"] is False
    proc = fleet.lanectl("install")
    assert "nothing changed" in proc.stdout


def test_up_starts_every_lane_after_ready(fleet: Fleet) -> None:
    code, doc = fleet.json("up")
    assert code == 0, doc
    st = fleet.status()
    for lane in LANES:
        s = st[lane]
        assert (s["active_state"], s["sub_state"]) == ("active", "running"), s
        assert s["health"]["ok"] and s["health"]["body"]["lane"] == lane
        assert s["status_text"].startswith(f"lane {lane}:")  # the runtime's STATUS= line
        assert s["main_pid"] and s["memory_bytes"] and s["watchdog_sec"]
    proc = fleet.sb.exec([LANECTL_BIN, "status"], check=False)
    assert proc.returncode == 0 and "alpha" in proc.stdout
    # idempotent
    code, doc = fleet.json("up")
    assert code == 0 and doc["data"]["changed"] == []


def test_status_json_keys_are_the_declared_fields(fleet: Fleet) -> None:
    """Issue 11 item 8: every lane of the real `status --json` (the fast path) has exactly LaneStatus's declared keys,
    its health Health's; memory, CPU and tasks are the lane cgroup's, read from the kernel's files on this host."""
    import dataclasses

    from lanectl.healthcheck import Health
    from lanectl.status import LaneStatus

    assert fleet.json("up")[0] == 0
    proc = fleet.sb.exec([LANECTL_BIN, "status", "--json"], check=False)
    data = json.loads(proc.stdout)["data"]
    assert sorted(lane["name"] for lane in data["lanes"]) == sorted(LANES)
    for lane in data["lanes"]:
        assert sorted(lane) == sorted(LaneStatus.json_keys("lane"))
        assert sorted(lane["health"]) == sorted(f.name for f in dataclasses.fields(Health))
        assert lane["memory_bytes"] > 0 and lane["cpu_seconds"] is not None and lane["processes"] >= 1, lane
    assert sorted(data["supervisor"]) == sorted(LaneStatus.json_keys("supervisor"))
    # the figures come from the cgroup files (not psutil's fallback): read them the same way, by hand
    unit = "lanectl-lane@alpha.service"
    cg = fleet.show(unit, "ControlGroup")["ControlGroup"]
    code = ("import sys; from lanectl.status import cgroup_usage; "
            "print(*cgroup_usage(sys.argv[1]))")
    mem, cpu_ns, tasks = fleet.sb.exec([str(Path(LANECTL_BIN).parent / "python"), "-c", code, cg],
                                       check=True).stdout.split()
    assert int(mem) > 0 and int(cpu_ns) > 0 and int(tasks) >= 1


def test_kill_9_is_restarted_and_status_shows_it(fleet: Fleet) -> None:
    fleet.json("up")
    before = fleet.status("alpha")["alpha"]
    fleet.sb.exec(["kill", "-9", str(before["main_pid"])], check=True)

    def restarted():  # type: ignore[no-untyped-def]
        s = fleet.status("alpha")["alpha"]
        return s if s["restarts"] > before["restarts"] and s["state"] == "up" else None

    after = wait_for(restarted, 15, what="alpha to be restarted after kill -9")
    assert after["main_pid"] != before["main_pid"]
    assert after["invocation_id"] != before["invocation_id"]


def test_sigstop_trips_the_watchdog(fleet: Fleet) -> None:
    fleet.json("up")
    before = fleet.status("beta")["beta"]
    fleet.sb.exec(["kill", "-STOP", str(before["main_pid"])], check=True)

    def restarted():  # type: ignore[no-untyped-def]
        s = fleet.status("beta")["beta"]
        return s if s["restarts"] > before["restarts"] and s["state"] == "up" else None

    wait_for(restarted, 5 + 10, interval=0.2, what="the watchdog to restart beta")
    journal = fleet.sb.exec(["journalctl", "-u", "lanectl-lane@beta.service", "--no-pager"], check=False).stdout
    assert "Watchdog timeout" in journal


def test_down_stops_all_and_status_says_so(fleet: Fleet) -> None:
    fleet.json("up")
    code, doc = fleet.json("down")
    assert code == 0 and sorted(doc["data"]["changed"]) == list(LANES)
    proc = fleet.sb.exec([LANECTL_BIN, "status", "--json"], check=False)
    assert proc.returncode == 8
    for lane in LANES:
        assert fleet.show(f"lanectl-lane@{lane}.service", "ActiveState")["ActiveState"] == "inactive"
    code, doc = fleet.json("down")
    assert code == 0 and doc["data"]["changed"] == []
    assert fleet.json("up")[0] == 0

"""Issue 17 items 1 and 2 under a real systemd: a mission's processes end with the mission, and one poison mission
harms no one else.

Two lanes: ``ct`` as every lane runs (a cgroup per mission, PID + user namespaces and Landlock per mission;
TasksMax=64, MemoryMax=256M), and ``px`` with mission namespaces switched off (its ``exec=`` sets
``LANECTL_MISSION_NAMESPACES=0`` before the reference runtime), standing for a runtime whose missions can reach it:
there ``kill -9 $PPID`` kills the runtime, and what is tested is the supervisor's charging of lane deaths
(bystanders not charged, suspects run alone, the poison ends dead naming it).
"""
from __future__ import annotations

import json
import textwrap
from pathlib import Path
from typing import Any

import pytest

from tests.systemd.lanehelpers import PYTHON, ROOT, Fleet, history, sql, states, wait_for, wait_terminal

pytestmark = pytest.mark.systemd
CT, PX = "ct", "px"
UNIT = "lanectl-lane@{}.service"

SUBMIT = r'''
import json, sys
from lanectl.client import Client
spec = json.load(sys.stdin)
with Client(config_dir=spec["config"]) as c:
    print(json.dumps([c.submit(m.get("cls", "background"), m["payload"], lane=m["lane"],
                               max_attempts=m.get("max_attempts")).id for m in spec["missions"]]))
'''

FILL = textwrap.dedent('''
    import os, sys, time
    kids = 0
    while True:  # fork until the missions' task limit says no, hold them, then leave
        try:
            pid = os.fork()
        except BlockingIOError:
            break
        if pid == 0:
            time.sleep(60)
            os._exit(0)
        kids += 1
    open(sys.argv[1], "w").write(str(kids))
    time.sleep(float(sys.argv[2]))
''')


@pytest.fixture(scope="module")
def fleet(sandbox, tmp_path_factory):  # type: ignore[no-untyped-def]
    cfg = tmp_path_factory.mktemp("contain")
    (cfg / "lanes.d").mkdir()
    text = (ROOT / "lanectl.toml").read_text()
    (cfg / "lanectl.toml").write_text(
        f'ledger = "/var/lib/lanectl/test-contain.db"\n' + text
        + "\n[leases]\nlease_sec = 20\nheartbeat_sec = 1\n[health]\nsystemd_sec = 0.5\n[rollback]\nenabled = false\n")
    (cfg / "lanes.d" / f"{CT}.toml").write_text(
        'port = 8761\nworkspace = "/var/lib/lanes/ct"\ncapacity = 4\n'
        '[resources]\nmemory_max = "256M"\ntasks_max = 64\n')
    (cfg / "lanes.d" / f"{PX}.toml").write_text(
        'port = 8762\nworkspace = "/var/lib/lanes/px"\ncapacity = 4\n'
        f'exec = ["/usr/bin/env", "LANECTL_MISSION_NAMESPACES=0", "{PYTHON}", "-m", "lanectl.runtime"]\n'
        '[restart]\nrestart_sec = 0.2\nmax_restarts = 20\nstart_limit_burst = 40\n')
    f = Fleet(sandbox, cfg)
    f.write_file("/var/lib/lanes-contain/fill.py", FILL)
    assert f.json("install")[0] == 0
    code, doc = f.json("up")
    assert code == 0, doc
    wait_for(lambda: healthz(f, 8761).get("containment") == "cgroup+landlock+ns" and healthz(f, 8762), 30,
             what="both lanes up, ct with per-mission cgroups")
    # px runs its missions without namespaces: its /healthz says what is really in force
    assert healthz(f, 8762)["containment"] == "cgroup+landlock"
    wait_for(lambda: f.sb.exec(["systemctl", "is-active", "lanectl-supervisor.service"], check=False).stdout.strip()
             == "active", 20, what="the supervisor")
    yield f
    f.lanectl("down")


def healthz(fleet: Fleet, port: int) -> dict[str, Any]:
    proc = fleet.sb.exec(["curl", "-s", f"http://127.0.0.1:{port}/healthz"], check=False)
    try:
        return json.loads(proc.stdout) if proc.returncode == 0 else {}
    except ValueError:
        return {}


def submit(fleet: Fleet, missions: list[dict[str, Any]]) -> list[int]:
    proc = fleet.sb.exec([PYTHON, "-c", SUBMIT], input=json.dumps({"config": str(fleet.config_dir),
                                                                  "missions": missions}), check=True)
    return json.loads(proc.stdout)


def lane_processes(fleet: Fleet, lane: str) -> list[str]:
    """The command line of every process in the lane unit's cgroup (all its sub-cgroups too)."""
    script = (f"for f in $(find /sys/fs/cgroup/pids/lanectl.slice/{UNIT.format(lane)} -name cgroup.procs); do "
              "for p in $(cat $f); do tr '\\0' ' ' < /proc/$p/cmdline; echo; done; done")
    return [l for l in fleet.sb.exec(["sh", "-c", script], check=False).stdout.splitlines() if l.strip()]


def leftovers(fleet: Fleet, lane: str, marker: str) -> list[str]:
    return [p for p in lane_processes(fleet, lane) if marker in p]


def unit_state(fleet: Fleet, lane: str) -> tuple[str, str]:
    p = fleet.show(UNIT.format(lane), "MainPID", "NRestarts")
    return p["MainPID"], p["NRestarts"]


def sh(script: str, **extra: Any) -> dict[str, Any]:
    return {"argv": ["sh", "-c", script], **extra}


def mission(fleet: Fleet, mid: int) -> dict[str, Any]:
    row = sql(fleet, "SELECT state, error, attempts, round_start, suspect FROM missions WHERE id = ?", mid)[0]
    return dict(zip(("state", "error", "attempts", "round_start", "suspect"), row))


def test_fork_flood_leftovers_die_with_the_mission_and_innocents_run(fleet: Fleet) -> None:
    before = unit_state(fleet, CT)
    [flood] = submit(fleet, [{"lane": CT, "payload": sh("for i in $(seq 100); do sleep 40 & done; wait")}])
    assert wait_terminal(fleet, [flood], 60)[flood] == "failed", history(fleet, [flood])
    wait_for(lambda: not leftovers(fleet, CT, "sleep 40"), 10, what="the flood's sleeps gone")
    innocents = submit(fleet, [{"lane": CT, "payload": sh("echo ok; sleep 0.2; echo done")} for _ in range(3)])
    st = wait_terminal(fleet, innocents, 60)
    assert set(st.values()) == {"succeeded"}, history(fleet, innocents)
    assert unit_state(fleet, CT) == before  # the runtime never died
    assert healthz(fleet, 8761)["containment"] == "cgroup+landlock+ns"


def test_setsid_children_die_with_their_mission_also_on_timeout(fleet: Fleet) -> None:
    ok, slow = submit(fleet, [
        {"lane": CT, "payload": sh("setsid sleep 300 & setsid sh -c 'sleep 301 &' ; echo background")},
        {"lane": CT, "payload": sh("setsid sleep 302 & exec sleep 303", timeout_sec=2)},
    ])
    st = wait_terminal(fleet, [ok, slow], 60)
    assert st == {ok: "succeeded", slow: "failed"}, history(fleet, [ok, slow])
    assert mission(fleet, slow)["error"] == "timed out"
    for marker in ("sleep 300", "sleep 301", "sleep 302", "sleep 303"):
        wait_for(lambda: not leftovers(fleet, CT, marker), 10, what=f"{marker} gone")
    assert fleet.sb.exec(["pgrep", "-f", "sleep 30[0-3]"], check=False).returncode == 1  # nowhere in the box


MISSION_TASKS = 24  # ct: TasksMax=64, a reserve of 16, 48 for missions; one takes at most 48 - 3 * 8


def test_a_task_hog_takes_only_its_share_and_refused_starts_cost_nothing(fleet: Fleet) -> None:
    """Issue 17 F1. A mission forking until EAGAIN gets only its own share of the missions' tasks; two of them
    fill the lane, and the bystanders submitted after them cannot start: each such start goes back uncharged (no
    failed or dead event, nothing rollback counts against the lane), the lane is asked again only after its next
    health report or a mission's end, and every bystander runs once the hogs end. The runtime keeps its reserve."""
    markers = ["/var/lib/lanes/ct/filled-1", "/var/lib/lanes/ct/filled-2"]
    fleet.sb.exec(["rm", "-f", *markers], check=False)
    hogs = submit(fleet, [{"lane": CT, "payload": {"argv": ["python3", "/var/lib/lanes-contain/fill.py", m, "8"]}}
                          for m in markers])
    for m in markers:
        wait_for(lambda: fleet.sb.exec(["test", "-s", m], check=False).returncode == 0, 30,
                 what="a hog to take every task it may")
    kids = [int(fleet.read_file(m)) for m in markers]
    assert all(0 < k <= MISSION_TASKS for k in kids), kids  # its own limit, not all of the lane's
    bystanders = submit(fleet, [{"lane": CT, "payload": sh("echo bystander")} for _ in range(2)])
    st = wait_terminal(fleet, [*hogs, *bystanders], 120)
    report = history(fleet, [*hogs, *bystanders])
    assert set(st.values()) == {"succeeded"}, report
    for b in bystanders:
        m = mission(fleet, b)
        assert m["attempts"] - m["round_start"] == 1, report  # only the attempt that ran was charged
    refused = [json.loads(r[0]) for r in sql(
        fleet, f"SELECT data FROM events WHERE kind = 'requeued' AND mission IN ({','.join('?' * len(bystanders))})",
        *bystanders)]
    assert refused, "the bystanders were never refused: the hogs did not fill the lane"
    assert all(e.get("charged") is False and "could not start" in e.get("reason", "") for e in refused), refused
    assert sql(fleet, "SELECT count(*) FROM events WHERE lane = ? AND kind IN ('failed', 'dead') AND at >= "
                      "(SELECT min(created_at) FROM missions WHERE id = ?)", CT, hogs[0]) == [[0]]
    # never a tight loop: the lane was asked again at most once per health report (0.5 s) or mission end, not
    # thousands of times
    assert len(refused) < 200, len(refused)
    assert sql(fleet, "SELECT state FROM lanes WHERE name = ?", CT) == [["active"]]
    assert healthz(fleet, 8761)  # the runtime answered throughout (its reserve)


def test_a_mission_cannot_signal_its_runtime(fleet: Fleet) -> None:
    before = unit_state(fleet, CT)
    poison, *bystanders = submit(fleet, [
        {"lane": CT, "payload": sh("sleep 0.5; kill -9 $PPID; kill -9 -1; for p in /proc/[0-9]*; do "
                                   "kill -9 ${p#/proc/}; done; exit 3")},
        *({"lane": CT, "payload": sh("sleep 2; echo bystander")} for _ in range(3)),
    ])
    st = wait_terminal(fleet, [poison, *bystanders], 60)
    assert all(st[b] == "succeeded" for b in bystanders), history(fleet, bystanders)
    assert st[poison] == "failed"
    assert unit_state(fleet, CT) == before  # same runtime process, no restart


def test_poison_that_kills_its_runtime_ends_dead_and_no_bystander_does(fleet: Fleet) -> None:
    poison, *bystanders = submit(fleet, [
        {"lane": PX, "payload": sh("sleep 0.5; kill -9 $PPID")},
        *({"lane": PX, "payload": sh("sleep 3; echo bystander")} for _ in range(3)),
    ])
    st = wait_terminal(fleet, [poison, *bystanders], 180)
    report = history(fleet, [poison, *bystanders], unless="__none__")
    assert st[poison] == "dead", report
    assert all(st[b] == "succeeded" for b in bystanders), report
    m = mission(fleet, poison)
    assert m["error"].startswith("killed its lane runtime"), m
    for b in bystanders:  # a lane death beside others costs no attempt
        assert mission(fleet, b)["attempts"] - mission(fleet, b)["round_start"] == 1, report


def test_memory_hog_is_reported_out_of_memory_and_the_lane_stays_up(fleet: Fleet) -> None:
    before = unit_state(fleet, CT)
    hog, other = submit(fleet, [
        {"lane": CT, "payload": {"argv": ["python3", "-c", "b = bytearray(400 << 20); print(len(b))"]}},
        {"lane": CT, "payload": sh("sleep 2; echo fine")},
    ])
    st = wait_terminal(fleet, [hog, other], 60)
    assert st == {hog: "failed", other: "succeeded"}, history(fleet, [hog, other])
    err = mission(fleet, hog)["error"]
    assert err.startswith("out of memory"), err
    assert "exit code -9" not in err
    assert unit_state(fleet, CT) == before
    assert fleet.sb.exec(["systemctl", "is-active", UNIT.format(CT)], check=False).stdout.strip() == "active"


ESCAPE = r'''
cg=$(grep ':pids:' /proc/self/cgroup | cut -d: -f3); d=/sys/fs/cgroup/pids$cg
t() { if sh -c "$2" 2>/dev/null; then echo "$1 ok"; else echo "$1 refused"; fi; }
{
t raise_own_limit "echo 100000 > $d/pids.max"
t starve_runtime "echo 1 > $d/../../runtime/pids.max"
t leave_cgroup "echo $$ > $d/../../runtime/cgroup.procs"
t new_cgroup "mkdir $d/../escape"
t own_workspace "echo x > /var/lib/lanes/ct/escape-probe"
t own_tmp "echo x > /tmp/escape-probe"
} > /var/lib/lanes/ct/escape.txt
setsid sleep 304 &
'''


def test_a_mission_cannot_leave_or_loosen_its_cgroup(fleet: Fleet) -> None:
    """The lane's cgroups belong to the lane's user, which missions run as: Landlock keeps them out of them."""
    [m] = submit(fleet, [{"lane": CT, "payload": sh(ESCAPE)}])
    assert wait_terminal(fleet, [m], 60)[m] == "succeeded", history(fleet, [m])
    got = dict(l.split() for l in fleet.read_file("/var/lib/lanes/ct/escape.txt").splitlines())
    assert got == {"raise_own_limit": "refused", "starve_runtime": "refused", "leave_cgroup": "refused",
                   "new_cgroup": "refused", "own_workspace": "ok", "own_tmp": "ok"}, got
    wait_for(lambda: not leftovers(fleet, CT, "sleep 304"), 10, what="sleep 304 gone")


MEMORY_BYSTANDER = """
import sys, time
b = bytearray(60 << 20)
for i in range(0, len(b), 4096):
    b[i] = 1
open(sys.argv[1], "w").write("allocated")
time.sleep(8)
print("bystander-ok")
"""

MEMORY_ATTACKER = """
import os
kids = []
for i in range(20):  # 200 MiB over many small processes: no one of them is the largest process of the lane
    pid = os.fork()
    if pid == 0:
        b = bytearray(10 << 20)
        for j in range(0, len(b), 4096):
            b[j] = 1
        import time; time.sleep(3)
        os._exit(0)
    kids.append(pid)
killed = sum(1 for p in kids if os.WIFSIGNALED(os.waitpid(p, 0)[1]))
print("killed", killed)
raise SystemExit(1 if killed else 0)
"""


def test_many_small_processes_hit_their_own_memory_limit_not_a_bystander(fleet: Fleet) -> None:
    """Issue 17 F2. An attacker spreads 200 MiB over 20 processes while a bystander holds one 60 MiB process: the
    attacker's own cgroup limit (96 MiB of the missions' 192) is hit first, the kernel kills within it, and the
    OOM report names it; the bystander runs to its end."""
    marker = "/var/lib/lanes/ct/allocated"
    fleet.sb.exec(["rm", "-f", marker], check=False)
    [bystander] = submit(fleet, [{"lane": CT, "payload": {"argv": ["python3", "-c", MEMORY_BYSTANDER, marker]}}])
    wait_for(lambda: fleet.sb.exec(["test", "-s", marker], check=False).returncode == 0, 30,
             what="the bystander to hold its memory")
    [attacker] = submit(fleet, [{"lane": CT, "payload": {"argv": ["python3", "-c", MEMORY_ATTACKER]}}])
    st = wait_terminal(fleet, [bystander, attacker], 90)
    report = history(fleet, [bystander, attacker], unless="__none__")
    assert st == {bystander: "succeeded", attacker: "failed"}, report
    err = mission(fleet, attacker)["error"]
    assert err.startswith("out of memory") and "at its own memory limit" in err, err


def test_a_chmodded_state_dir_does_not_wedge_the_lane(fleet: Fleet) -> None:
    """Issue 17 F4: a mission does ``chmod 000 .lanectl/out .lanectl`` (they are its uid's): the next mission runs
    and keeps its output, and so does one after a restart of the lane (its runtime gives the modes back)."""
    [brick] = submit(fleet, [{"lane": CT, "payload": sh("chmod 000 .lanectl/out .lanectl")}])
    assert wait_terminal(fleet, [brick], 60)[brick] == "succeeded", history(fleet, [brick])
    [victim] = submit(fleet, [{"lane": CT, "payload": sh("echo victim-ran")}])
    assert wait_terminal(fleet, [victim], 60)[victim] == "succeeded", history(fleet, [victim])
    assert fleet.read_file(f"/var/lib/lanes/ct/.lanectl/out/{victim}-1.log") == "victim-ran\n"
    [brick2] = submit(fleet, [{"lane": CT, "payload": sh("chmod 000 .lanectl/out .lanectl")}])
    assert wait_terminal(fleet, [brick2], 60)[brick2] == "succeeded", history(fleet, [brick2])
    pid, _ = unit_state(fleet, CT)
    fleet.sb.exec(["systemctl", "restart", UNIT.format(CT)], check=True)
    wait_for(lambda: unit_state(fleet, CT)[0] not in ("0", pid) and healthz(fleet, 8761), 60,
             what="the lane back after its restart")
    [after] = submit(fleet, [{"lane": CT, "payload": sh("echo after-restart")}])
    assert wait_terminal(fleet, [after], 60)[after] == "succeeded", history(fleet, [after])
    modes = fleet.sb.exec(["stat", "-c", "%a", "/var/lib/lanes/ct/.lanectl", "/var/lib/lanes/ct/.lanectl/out"],
                          check=True).stdout.split()
    assert modes == ["700", "700"], modes


PLANT = r"""
n=$LANECTL_MISSION
mkdir -p .lanectl/out/$((n+1))-1.log/deep .lanectl/out/$((n+2))-1.log
mkfifo .lanectl/out/$((n+3))-1.log
ln -s /etc/passwd .lanectl/out/$((n+4))-1.log
ln .lanectl/executions.log .lanectl/out/$((n+5))-1.log
"""


def test_things_planted_at_the_next_missions_log_paths_fail_no_one(fleet: Fleet) -> None:
    """Issue 17 F5: a mission plants directories, a FIFO, a link and a hard link to the execution log at the next
    missions' log paths: those missions run and keep their output; the execution log is not truncated."""
    [planter] = submit(fleet, [{"lane": CT, "payload": sh(PLANT)}])
    assert wait_terminal(fleet, [planter], 60)[planter] == "succeeded", history(fleet, [planter])
    log_before = fleet.read_file("/var/lib/lanes/ct/.lanectl/executions.log")
    victims = submit(fleet, [{"lane": CT, "payload": sh(f"echo victim-{i}")} for i in range(5)])
    assert victims == [planter + i for i in range(1, 6)], victims
    st = wait_terminal(fleet, victims, 90)
    assert set(st.values()) == {"succeeded"}, history(fleet, victims)
    for i, v in enumerate(victims):
        assert fleet.read_file(f"/var/lib/lanes/ct/.lanectl/out/{v}-1.log") == f"victim-{i}\n"
    assert fleet.read_file("/var/lib/lanes/ct/.lanectl/executions.log").startswith(log_before)

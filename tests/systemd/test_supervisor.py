"""Gates B2 and B4 under a real systemd: the supervisor dispatches, takes callbacks and fails over, with three
lanes and lanectl-supervisor.service; every mission ends exactly once, none is lost or orphaned."""
from __future__ import annotations

import collections
import json
import random
import time
import urllib.request
from pathlib import Path

import pytest

from lanectl.states import CLASSES
from tests.systemd.lanehelpers import (PYTHON, TERMINAL, Fleet, executions, history, sql, states,
                                       submit_many, up_example, wait_for, wait_terminal)

pytestmark = pytest.mark.systemd
LANES = ["alpha", "beta", "gamma"]


@pytest.fixture(scope="module")
def fleet(sandbox, tmp_path_factory):  # type: ignore[no-untyped-def]
    # faults here are on purpose; rollback has its own tests
    f = up_example(sandbox, tmp_path_factory.mktemp("sup"), "\n[rollback]\nenabled = false\n")
    yield f
    f.lanectl("down")


def supervisor_health(fleet: Fleet) -> dict:
    proc = fleet.sb.exec(["curl", "-s", "http://127.0.0.1:8700/healthz"], check=False)
    return json.loads(proc.stdout) if proc.returncode == 0 and proc.stdout else {}


def all_up(fleet: Fleet) -> bool:
    h = supervisor_health(fleet)
    ok = bool(h) and all(l["healthy"] and l["state"] == "active" for l in h.get("lanes", {}).values())
    if not ok:
        all_up.last = h  # type: ignore[attr-defined]
    return ok


def ended_once(fleet: Fleet, ids: list[int]) -> None:
    """Exactly one terminal event per mission, and no mission executed to success twice."""
    rows = sql(fleet, "SELECT mission, count(*) FROM events WHERE kind IN ('succeeded','failed','dead','cancelled',"
                      "'expired') AND mission BETWEEN ? AND ? GROUP BY mission", min(ids), max(ids))
    counts = {r[0]: r[1] for r in rows}
    assert set(counts) == set(ids), f"no terminal event: {sorted(set(ids) - set(counts))[:10]}"
    assert max(counts.values()) == 1, {k: v for k, v in counts.items() if v > 1}
    # the workspaces outlive this module's ledger: only executions since these missions were submitted count
    since = sql(fleet, "SELECT min(created_at) FROM missions WHERE id BETWEEN ? AND ?", min(ids), max(ids))[0][0]
    ex = [e for e in executions(fleet, LANES) if e["at"] >= since]
    ends = collections.Counter(e["mission"] for e in ex
                               if e["event"] == "end" and e.get("outcome") == "succeeded" and e["mission"] in set(ids))
    twice = [m for m, n in ends.items() if n > 1]
    detail = {m: ([e for e in ex if e["mission"] == m],
                  sql(fleet, "SELECT id, at, kind, lane, attempt, data FROM events WHERE mission = ?", m))
              for m in twice[:3]}
    assert not twice, f"missions ran to success twice: {detail}"
    orphans = sql(fleet, "SELECT count(*) FROM missions WHERE state IN ('dispatched','running') AND id BETWEEN ? AND ?",
                  min(ids), max(ids))[0][0]
    assert orphans == 0


def test_500_missions_with_a_lane_killed_mid_mission(fleet: Fleet) -> None:
    wait_for(lambda: all_up(fleet), 60, interval=0.5, what="all lanes healthy in the supervisor's view")
    rnd = random.Random(4)
    missions = []
    for i in range(500):
        cls = CLASSES[i % 3]
        missions.append({"cls": cls, "argv": ["/bin/sh", "-c", f"sleep 0.0{rnd.randint(1, 5)}; echo {i}"]})
    ids = submit_many(fleet, missions)
    assert len(ids) == 500 and len(set(ids)) == 500

    def alpha_busy():  # type: ignore[no-untyped-def]
        return sql(fleet, "SELECT count(*) FROM missions WHERE current_lane='alpha' AND state='running'")[0][0] > 0

    wait_for(alpha_busy, 30, interval=0.05, what="alpha to run a mission")
    pid = fleet.main_pid("alpha")
    fleet.sb.exec(["kill", "-9", str(pid)], check=True)
    st = wait_terminal(fleet, ids, 240)
    assert collections.Counter(st.values())["succeeded"] == 500, collections.Counter(st.values())
    ended_once(fleet, ids)
    lost = sql(fleet, "SELECT count(*) FROM events WHERE kind='requeued' AND lane='alpha' AND mission BETWEEN ? AND ?",
               min(ids), max(ids))[0][0]
    assert lost >= 1, "the killed lane held no mission: the test proved nothing"
    reran = sql(fleet, "SELECT count(*) FROM missions WHERE attempts > 1 AND id BETWEEN ? AND ?", min(ids), max(ids))
    assert reran[0][0] >= 1


def test_hung_lane_is_restarted_by_the_watchdog_and_its_missions_recovered(fleet: Fleet) -> None:
    wait_for(lambda: all_up(fleet), 60, interval=0.5, what="all lanes healthy")
    ids = submit_many(fleet, [{"cls": "interactive", "lane": "alpha", "argv": ["/bin/sh", "-c", "sleep 1"]}
                              for _ in range(3)])
    wait_for(lambda: sql(fleet, "SELECT count(*) FROM missions WHERE current_lane='alpha' AND state='running' "
                                "AND id >= ?", min(ids))[0][0] > 0, 30, what="alpha running the missions")
    pid = fleet.main_pid("alpha")
    t0 = time.monotonic()
    fleet.sb.exec(["kill", "-STOP", str(pid)], check=True)
    st = wait_terminal(fleet, ids, 60)
    assert set(st.values()) == {"succeeded"}, st
    assert fleet.main_pid("alpha") != pid
    journal = fleet.sb.exec(["journalctl", "-u", "lanectl-lane@alpha.service", "--no-pager"], check=False).stdout
    assert "Watchdog timeout" in journal
    assert time.monotonic() - t0 < 40
    lost = sql(fleet, "SELECT count(*) FROM events WHERE kind='requeued' AND mission BETWEEN ? AND ?", min(ids),
               max(ids))[0][0]
    assert lost >= 1
    ended_once(fleet, ids)


def test_supervisor_killed_mid_dispatch_loses_and_doubles_nothing(fleet: Fleet) -> None:
    wait_for(lambda: all_up(fleet), 60, interval=0.5, what="all lanes healthy")
    ids = submit_many(fleet, [{"cls": CLASSES[i % 3], "argv": ["/bin/sh", "-c", "sleep 0.05"]} for i in range(200)])
    wait_for(lambda: sql(fleet, "SELECT count(*) FROM missions WHERE state='succeeded' AND id >= ?", min(ids))[0][0]
             > 10, 30, interval=0.05, what="dispatch under way")
    sup = int(fleet.show("lanectl-supervisor.service", "MainPID")["MainPID"])
    fleet.sb.exec(["kill", "-9", str(sup)], check=True)
    wait_for(lambda: int(fleet.show("lanectl-supervisor.service", "MainPID")["MainPID"]) not in (0, sup), 20,
             what="systemd to restart the supervisor")
    st = wait_terminal(fleet, ids, 180)
    assert collections.Counter(st.values())["succeeded"] == 200, \
        f"{collections.Counter(st.values())}{history(fleet, ids)}"
    ended_once(fleet, ids)
    assert int(fleet.show("lanectl-supervisor.service", "NRestarts")["NRestarts"]) >= 1


def test_drain_under_load_then_undrain(fleet: Fleet) -> None:
    wait_for(lambda: all_up(fleet), 60, interval=0.5, what="all lanes healthy")
    ids = submit_many(fleet, [{"cls": "deadline", "argv": ["/bin/sh", "-c", "sleep 0.2"]} for _ in range(60)])
    wait_for(lambda: sql(fleet, "SELECT count(*) FROM missions WHERE current_lane='beta' AND id >= ?",
                         min(ids))[0][0] > 0, 30, interval=0.05, what="beta to take work")
    proc = fleet.lanectl("drain", "beta", "--wait", "--timeout", "60", "--reason", "test", "--json")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["data"]["changed"] is True and doc["data"]["in_flight"] == []
    drained_at = sql(fleet, "SELECT max(id) FROM events WHERE kind='drain' AND lane='beta'")[0][0]
    st = wait_terminal(fleet, ids, 120)
    assert set(st.values()) == {"succeeded"}
    late = sql(fleet, "SELECT count(*) FROM events WHERE kind='dispatched' AND lane='beta' AND id > ?", drained_at)
    assert late[0][0] == 0, "a mission reached the drained lane"
    ev = sql(fleet, "SELECT data FROM events WHERE id = ?", drained_at)[0][0]
    assert json.loads(ev)["reason"] == "test" and json.loads(ev)["actor"]
    assert json.loads(fleet.lanectl("drain", "beta", "--json").stdout)["data"]["changed"] is False
    assert json.loads(fleet.lanectl("undrain", "beta", "--json").stdout)["data"]["changed"] is True
    ended_once(fleet, ids)


def test_reroute_moves_exactly_the_queued_missions_and_sessions(fleet: Fleet) -> None:
    wait_for(lambda: all_up(fleet), 60, interval=0.5, what="all lanes healthy")
    assert fleet.lanectl("drain", "gamma").returncode == 0
    wait_for(lambda: sql(fleet, "SELECT state FROM lanes WHERE name='gamma'")[0][0] == "drained", 30,
             what="gamma drained")
    pinned = submit_many(fleet, [{"cls": "background", "lane": "gamma", "argv": ["/bin/true"]} for _ in range(5)])
    sess = submit_many(fleet, [{"cls": "deadline", "session": "gamma:s1", "argv": ["/bin/true"]}])
    other = submit_many(fleet, [{"cls": "background", "lane": "beta", "argv": ["/bin/true"]}])
    time.sleep(0.5)
    assert set(states(fleet, pinned).values()) == {"queued"}
    proc = fleet.lanectl("reroute", "gamma", "--to", "beta", "--sessions", "--reason", "maintenance", "--json")
    doc = json.loads(proc.stdout)
    assert proc.returncode == 0, doc
    assert doc["data"]["missions"] == pinned and doc["data"]["sessions"] == ["gamma:s1"]
    st = wait_terminal(fleet, pinned + sess + other, 60)
    assert set(st.values()) == {"succeeded"}
    lanes = sql(fleet, "SELECT DISTINCT lane FROM attempts WHERE mission BETWEEN ? AND ?", min(pinned), max(sess))
    assert lanes == [["beta"]]
    moved = sql(fleet, "SELECT count(*) FROM events WHERE kind='rerouted' AND mission BETWEEN ? AND ?", min(pinned),
                max(pinned))[0][0]
    assert moved == 5
    again = json.loads(fleet.lanectl("reroute", "gamma", "--to", "beta", "--json").stdout)
    assert again["data"]["changed"] is False
    fleet.lanectl("undrain", "gamma")


CALLBACK = r'''
import json, sys
from lanectl.protocol import UnixHTTPConnection
c = UnixHTTPConnection("/run/lanectl/callbacks.sock", 5)
c.request("POST", "/callbacks", body=sys.stdin.read().encode(), headers={"Content-Type": "application/json"})
print(c.getresponse().status)
'''


def post_callback(fleet: Fleet, doc: dict, user: str = "lane-alpha") -> int:
    """POST a callback over the supervisor's socket as ``user`` (root: "root")."""
    argv = [PYTHON, "-c", CALLBACK]
    if user != "root":
        argv = ["setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups", *argv]
    return int(fleet.sb.exec(argv, input=json.dumps(doc), check=True).stdout)


def test_forged_stale_and_foreign_callbacks_are_rejected(fleet: Fleet) -> None:
    wait_for(lambda: all_up(fleet), 60, interval=0.5, what="all lanes healthy")
    # the mission runs until the test releases it (a file in its workspace), so "still running" is a condition
    release = "/var/lib/lanes/alpha/release-forged-test"
    fleet.sb.exec(["rm", "-f", release], check=False)
    (mid,) = submit_many(fleet, [{"cls": "interactive", "lane": "alpha",
                                  "argv": ["/bin/sh", "-c", f"while [ ! -e {release} ]; do sleep 0.1; done"]}])
    wait_for(lambda: states(fleet, [mid])[mid] == "running", 30, what="the mission to run")
    attempt = sql(fleet, "SELECT attempts FROM missions WHERE id = ?", mid)[0][0]
    before = sql(fleet, "SELECT count(*) FROM events WHERE kind='callback_rejected'")[0][0]
    forged = {"mission": mid, "attempt": attempt, "lane": "alpha", "token": "f" * 43, "event": "succeeded"}
    assert post_callback(fleet, forged) == 409  # alpha's uid, wrong token: fenced, recorded
    stale = {**forged, "attempt": attempt + 5}
    assert post_callback(fleet, stale) == 409
    foreign = {**forged, "lane": "beta"}
    assert post_callback(fleet, foreign) == 403  # alpha's uid speaking for beta: refused unrecorded
    unknown = {**forged, "lane": "nope"}
    assert post_callback(fleet, unknown) == 403
    assert post_callback(fleet, forged, user="root") == 403  # no lane runs as root
    assert post_callback(fleet, forged, user="lane-beta") == 403
    assert states(fleet, [mid])[mid] == "running"
    after = sql(fleet, "SELECT count(*) FROM events WHERE kind='callback_rejected'")[0][0]
    assert after - before == 2
    fleet.sb.exec(["touch", release], check=True)
    assert wait_terminal(fleet, [mid], 60)[mid] == "succeeded"
    fleet.sb.exec(["rm", "-f", release], check=False)

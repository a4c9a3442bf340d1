"""Issue 16 (2, 3, 6, 8) under a real systemd: supervisor restarts, lane exits and refusals lose nothing.

One fleet (the example's three lanes and lanectl-supervisor.service) with short leases, so that "longer than
lease_sec" takes seconds: ``lease_sec = 8``, heartbeats every second, systemd read every 0.5 s.
"""
from __future__ import annotations

import collections
import json
import shlex
import threading
import time

import pytest

from tests.systemd.lanehelpers import (LANECTL, PYTHON, ROOT, Fleet, copy_example, history, sql, submit_many, wait_for,
                                       wait_terminal)
from tests.systemd.test_supervisor import ended_once, supervisor_health

pytestmark = pytest.mark.systemd
LEASE = 8
SUP = "lanectl-supervisor.service"


@pytest.fixture(scope="module")
def fleet(sandbox, tmp_path_factory):  # type: ignore[no-untyped-def]
    cfg = copy_example(tmp_path_factory.mktemp("flow"))
    with open(cfg / "lanectl.toml", "a") as fh:
        fh.write(f"\n[leases]\nlease_sec = {LEASE}\nheartbeat_sec = 1\n"
                 "[health]\nsystemd_sec = 0.5\n"
                 "[rollback]\nenabled = false\n")  # faults here are on purpose; rollback has its own tests
    f = Fleet(sandbox, cfg)
    assert f.json("install")[0] == 0
    code, doc = f.json("up")
    assert code == 0, doc
    wait_for(lambda: active(f, SUP), 20, what="the supervisor")
    yield f
    f.lanectl("down")


def active(fleet: Fleet, unit: str) -> bool:
    return fleet.sb.exec(["systemctl", "is-active", unit], check=False).stdout.strip() == "active"


def all_up(fleet: Fleet) -> bool:
    h = supervisor_health(fleet)
    return bool(h) and all(l["healthy"] and l["state"] == "active" for l in h.get("lanes", {}).values())


def running(fleet: Fleet, ids: list[int]) -> int:
    return sql(fleet, "SELECT count(*) FROM missions WHERE state = 'running' AND id BETWEEN ? AND ?",
               min(ids), max(ids))[0][0]


def events_of(fleet: Fleet, ids: list[int], kind: str) -> list[list]:  # type: ignore[type-arg]
    return sql(fleet, "SELECT mission, lane, attempt, data FROM events WHERE kind = ? AND mission BETWEEN ? AND ?",
               kind, min(ids), max(ids))


def runbook_steps(section: str) -> list[str]:
    """The commands of a docs/runbooks.md section, in order (the ``# `` prompt lines of its console blocks,
    without their trailing comments)."""
    text = (ROOT / "docs" / "runbooks.md").read_text()
    start = text.index(section)
    end = text.find("\n## ", start + 1)
    out, inside = [], False
    for line in text[start:end if end > 0 else None].splitlines():
        if line.startswith("```"):
            inside = not inside and line.strip() == "```console"
            continue
        if inside and line.startswith("# ") and not line.startswith("# ..."):
            out.append(" ".join(shlex.split(line[2:], comments=True)))
    return out


def test_supervisor_upgrade_by_the_runbook_reruns_nothing(fleet: Fleet) -> None:
    """docs/runbooks.md "Upgrade the supervisor", followed literally, with missions running on every lane and the
    supervisor away for longer than lease_sec: nothing re-runs, no attempt is charged, every mission ends once."""
    wait_for(lambda: all_up(fleet), 60, interval=0.5, what="all lanes healthy")
    outage = LEASE + 4
    ids = submit_many(fleet, [{"cls": c, "argv": ["/bin/sh", "-c", f"sleep {outage + 6}"]}
                              for c in ["interactive"] * 6 + ["background"] * 2])
    wait_for(lambda: running(fleet, ids) == len(ids), 30, interval=0.2, what="every mission running")
    steps = runbook_steps("## Upgrade the supervisor")
    stop = [i for i, s in enumerate(steps) if s.startswith("systemctl stop lanectl-supervisor")]
    start = [i for i, s in enumerate(steps) if s.startswith("systemctl start lanectl-supervisor")]
    assert stop and start and stop[0] < start[0], steps
    for i, step in enumerate(steps):
        if "pip install" in step:
            continue  # installing the new version: the version under test is installed already
        if i == start[0]:
            time.sleep(outage)  # the upgrade took longer than lease_sec (the fault itself, not an assertion)
        if step.startswith("lanectl "):
            argv = [LANECTL, *shlex.split(step)[1:], "-c", str(fleet.config_dir)]
        else:
            argv = ["sh", "-c", step]
        proc = fleet.sb.exec(argv, check=False)
        assert proc.returncode == 0, (step, proc.stdout, proc.stderr)
    st = wait_terminal(fleet, ids, 90)
    assert collections.Counter(st.values()) == {"succeeded": len(ids)}, history(fleet, ids)
    assert events_of(fleet, ids, "requeued") == [], history(fleet, ids, unless="")
    attempts = sql(fleet, "SELECT id, attempts FROM missions WHERE id BETWEEN ? AND ?", min(ids), max(ids))
    assert {n for _, n in attempts} == {1}, attempts
    ended_once(fleet, ids)


LEDGER_ASSIGN = r'''
import json, sys, time
from lanectl import config
from lanectl.dispatch import Assignment
from lanectl.ledger import Ledger
from lanectl.ledger import missions as ms
q = json.load(sys.stdin)
fleet = config.load(q["config"])
led = Ledger.open(q["ledger"])
m = ms.submit(led, fleet, cls="interactive", payload={"argv": ["true"]}, lane="alpha", now=time.time()).mission
ms.assign(led, [Assignment(m.id, "alpha", "interactive")], now=time.time(), lease_sec=float(q["lease"]))
print(json.dumps(m.id))
'''


def test_a_dispatch_recorded_but_never_sent_is_requeued_within_seconds(fleet: Fleet) -> None:
    """The supervisor died between recording a dispatch and sending it (as a kill -9 there leaves it: an attempt
    only the ledger knows of) and is back a moment later: the attempt is re-queued within a few seconds, not
    when its lease runs out."""
    wait_for(lambda: all_up(fleet), 60, interval=0.5, what="all lanes healthy")
    fleet.sb.exec(["systemctl", "stop", SUP], check=True)
    proc = fleet.sb.exec([PYTHON, "-c", LEDGER_ASSIGN], input=json.dumps(
        {"config": str(fleet.config_dir), "ledger": fleet.ledger, "lease": 30}), check=True)
    mid = json.loads(proc.stdout)
    fleet.sb.exec(["systemctl", "start", SUP], check=True)  # back within about a second, as systemd restarts it
    # the lease is 30 s: only reconciliation re-queues it sooner (a bounded wait, well under the lease)
    wait_for(lambda: events_of(fleet, [mid], "requeued"), 15, interval=0.2,
             what="the orphaned attempt to be re-queued")
    st = wait_terminal(fleet, [mid], 30)
    assert st == {mid: "succeeded"}, history(fleet, [mid])
    assert "does not hold it" in events_of(fleet, [mid], "requeued")[0][3]


def test_a_lane_stopped_while_the_supervisor_looks_has_its_missions_requeued_at_once(fleet: Fleet) -> None:
    """The lane takes ~5 s to stop (its missions ignore SIGTERM), and the supervisor reads systemd every 0.5 s, so
    it sees the unit deactivating while the lane's process still runs: the exit must not go unseen."""
    wait_for(lambda: all_up(fleet), 60, interval=0.5, what="all lanes healthy")
    ids = submit_many(fleet, [{"cls": "interactive", "lane": "alpha",
                               "argv": ["/bin/sh", "-c", "trap '' TERM; sleep 3; sleep 3; sleep 3"]}
                              for _ in range(2)])
    wait_for(lambda: running(fleet, ids) == 2, 30, interval=0.2, what="alpha running both")
    fleet.sb.exec(["systemctl", "stop", "--no-block", "lanectl-lane@alpha.service"], check=True)
    wait_for(lambda: fleet.show("lanectl-lane@alpha.service", "ActiveState")["ActiveState"] in ("inactive", "failed"),
             30, interval=0.1, what="alpha to stop")
    # the lease is 8 s and would re-queue them too: the pidfd (or the unit seen inactive) must do it well before
    wait_for(lambda: len(events_of(fleet, ids, "requeued")) == 2, 3, interval=0.1,
             what="alpha's missions to be re-queued once its process is gone")
    reasons = {json.loads(d)["reason"] for _, _, _, d in events_of(fleet, ids, "requeued")}
    assert "lease expired" not in reasons, reasons
    fleet.sb.exec(["systemctl", "start", "lanectl-lane@alpha.service"], check=True)
    st = wait_terminal(fleet, ids, 60)
    assert set(st.values()) == {"succeeded"}, history(fleet, ids)


HOG = r'''
import socket, sys, time, os
conns = []
for _ in range(int(sys.argv[2])):
    conns.append(socket.create_connection(("127.0.0.1", int(sys.argv[1]))))
open(sys.argv[3], "w").close()
time.sleep(float(sys.argv[4]))
'''


def test_a_cancel_that_does_not_reach_its_lane_is_retried(fleet: Fleet) -> None:
    """The lane's server is full (every connection slot held by another local process) when the cancel is
    forwarded, so the lane answers it 503; the supervisor must send it again until the lane takes it."""
    wait_for(lambda: all_up(fleet), 60, interval=0.5, what="all lanes healthy")
    (mid,) = submit_many(fleet, [{"cls": "interactive", "lane": "alpha", "argv": ["/bin/sh", "-c", "sleep 60"]}])
    wait_for(lambda: running(fleet, [mid]) == 1, 30, interval=0.2, what="alpha running it")
    marker = "/run/lanectl-flow-hog"
    fleet.sb.exec(["rm", "-f", marker], check=False)
    hog = threading.Thread(target=fleet.sb.exec, args=([PYTHON, "-c", HOG, "8701", "40", marker, "4"],),
                           kwargs={"check": False}, daemon=True)
    hog.start()
    wait_for(lambda: fleet.sb.exec(["test", "-e", marker], check=False).returncode == 0, 10, interval=0.05,
             what="the lane's connection slots to be taken")
    proc = fleet.lanectl("mission", "cancel", str(mid))
    assert proc.returncode == 0, proc.stderr
    hog.join(30)

    def stopped() -> bool:
        out = fleet.sb.exec(["curl", "-s", "http://127.0.0.1:8701/healthz"], check=False).stdout
        try:
            return mid not in json.loads(out).get("missions", [mid])
        except ValueError:
            return False

    wait_for(stopped, 20, interval=0.2, what="the lane to stop the cancelled mission")
    ends = [e for e in fleet.sb.exec(["cat", "/var/lib/lanes/alpha/.lanectl/executions.log"], check=False)
            .stdout.splitlines() if f'"mission":{mid},' in e.replace(" ", "") and '"event":"end"' in e]
    assert ends, "the mission's process was not stopped"


KEYED_POST = r'''
import json, sys, urllib.request
key = [l.split("=", 1)[1].strip() for l in open(sys.argv[2]) if l.startswith("LANECTL_DISPATCH_KEY=")][0]
body = {"mission": int(sys.argv[3]), "attempt": 1, "lane": sys.argv[1], "token": "t" * 32, "class": "background",
        "session": None, "deadline": None, "payload": {"argv": ["/bin/sh", "-c", "trap '' TERM; sleep 20"]}}
req = urllib.request.Request("http://127.0.0.1:" + sys.argv[4] + "/missions", data=json.dumps(body).encode(),
                             method="POST",
                             headers={"Content-Type": "application/json", "Authorization": "Bearer " + key})
print(urllib.request.urlopen(req, timeout=5).status)
'''


def test_a_full_lane_refusing_a_dispatch_costs_no_attempt(fleet: Fleet) -> None:
    """gamma (capacity 2) runs two processes the ledger does not know of, so it answers the supervisor's dispatch
    429: the mission must not be charged for it (three refusals made it dead before)."""
    wait_for(lambda: all_up(fleet), 60, interval=0.5, what="all lanes healthy")
    keys = "/var/lib/lanectl/keys/gamma.env"
    for fake in (900001, 900002):
        out = fleet.sb.exec([PYTHON, "-c", KEYED_POST, "gamma", keys, str(fake), "8703"], check=True).stdout
        assert out.strip() == "202", out
    (mid,) = submit_many(fleet, [{"cls": "background", "lane": "gamma", "argv": ["true"]}])
    st = wait_terminal(fleet, [mid], 60)
    assert st == {mid: "succeeded"}, history(fleet, [mid], unless="")
    refused = events_of(fleet, [mid], "requeued")
    assert all(json.loads(d).get("charged") is False for *_, d in refused), refused
    used = sql(fleet, "SELECT attempts - round_start FROM missions WHERE id = ?", mid)[0][0]
    assert used == 1, history(fleet, [mid], unless="")


def test_a_lane_down_when_the_supervisor_starts_gets_no_work_and_costs_none(fleet: Fleet) -> None:
    """Found by attacking issue 16's fixes: the new supervisor knew alpha was down but never wrote it (it started
    believing 'unhealthy' and skipped the write as 'no change'); the ledger still said healthy from the previous
    process, and a mission pinned to alpha burned its three attempts on the dead port within a second."""
    wait_for(lambda: all_up(fleet), 60, interval=0.5, what="all lanes up")
    fleet.sb.exec(["systemctl", "stop", SUP], check=True)
    fleet.sb.exec(["systemctl", "stop", "lanectl-lane@alpha.service"], check=True)
    try:
        fleet.sb.exec(["systemctl", "start", SUP], check=True)
        wait_for(lambda: sql(fleet, "SELECT healthy FROM lanes WHERE name = 'alpha'") == [[0]], 20, interval=0.2,
                 what="the ledger to say alpha is not healthy")
        (mid,) = submit_many(fleet, [{"cls": "interactive", "lane": "alpha", "argv": ["true"]}])
        assert wait_terminal(fleet, [mid], 60)[mid] == "succeeded"  # on alpha's fallback, beta
        # no attempt went to the dead port: dispatched once, to beta, nothing lost or re-queued
        kinds = [r[0] for r in sql(fleet, "SELECT kind FROM events WHERE mission = ? ORDER BY id", mid)]
        assert "requeued" not in kinds and "dead" not in kinds, history(fleet, [mid], unless="")
        assert sql(fleet, "SELECT lane FROM attempts WHERE mission = ?", mid) == [["beta"]]
    finally:
        fleet.sb.exec(["systemctl", "start", "lanectl-lane@alpha.service"], check=True)


def test_a_lane_killed_during_an_outage_has_its_logged_outcomes_settled_not_rerun(fleet: Fleet) -> None:
    """Found by attacking issue 16's fixes: missions that finished on beta while the supervisor was away (outcome
    logged, callback held back), then beta killed before the supervisor returned: the new supervisor had no
    invocation of its own to settle from and re-ran all three. It now settles from the ledger's."""
    wait_for(lambda: all_up(fleet), 60, interval=0.5, what="all lanes up")
    ids = submit_many(fleet, [{"cls": "background", "lane": "beta", "argv": ["/bin/sh", "-c", "sleep 2"]}
                              for _ in range(3)])
    wait_for(lambda: running(fleet, ids) == len(ids), 30, interval=0.2, what="beta's missions to run")
    fleet.sb.exec(["systemctl", "stop", SUP], check=True)
    try:
        log = "/var/lib/lanes/beta/.lanectl/executions.log"
        wait_for(lambda: sum('"event":"end"' in line and any(f'"mission":{m},' in line for m in ids)
                             for line in fleet.read_file(log).splitlines()) == len(ids), 90, interval=0.2,
                 what="beta to log the three ends")  # generous: a condition, not a timing (a loaded machine)
        fleet.sb.exec(["systemctl", "kill", "-s", "KILL", "--kill-whom=main", "lanectl-lane@beta.service"], check=True)
    finally:
        fleet.sb.exec(["systemctl", "start", SUP], check=True)
    st = wait_terminal(fleet, ids, 60)
    assert set(st.values()) == {"succeeded"}, st
    assert sql(fleet, "SELECT count(*) FROM attempts WHERE mission BETWEEN ? AND ?", min(ids), max(ids)) == [[3]]

"""Issue 15 items 1, 2, 3, 5 and 7 under a real systemd: a lane lanectl took out of service pages until an operator
acts; restart and up recover a lane systemd gave up on and say so; status and lane show tell the dispatch state,
who drained, the weight in force and a unit systemd gave up on; undrain after drain --stop brings the lane back;
a drill refuses a drained lane with a documented exit; a root-only verb run by another user exits 6 naming the
access it needs."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.systemd.lanehelpers import LANECTL, PYTHON, Fleet, copy_example, sql, submit_many, wait_for, wait_terminal
from tests.systemd.test_governance import POLICY, boot, rolled_back

pytestmark = pytest.mark.systemd


def probe(f: Fleet) -> tuple[int, str]:
    proc = f.sb.exec([LANECTL, "probe"], check=False)
    return proc.returncode, proc.stdout.strip()


def status(f: Fleet, *lanes: str) -> tuple[int, dict]:
    proc = f.sb.exec([LANECTL, "status", *lanes, "--json"], check=False)
    doc = json.loads(proc.stdout)
    return proc.returncode, {r["name"]: r for r in doc["data"]["lanes"]}


def unit(f: Fleet, lane: str) -> dict[str, str]:
    return f.show(f"lanectl-lane@{lane}.service", "ActiveState", "Result", "MainPID")


def test_a_lane_lanectl_drained_pages_until_an_operator_acts(fresh_sandbox, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    f = boot(fresh_sandbox, tmp_path)
    wait_for(lambda: probe(f)[0] == 0, 30, interval=0.3, what="probe OK")
    ids = submit_many(f, [{"cls": "interactive", "lane": "alpha", "argv": ["/bin/false"]} for _ in range(6)])
    rolled_back(f, "alpha", "failure_spike")
    wait_terminal(f, ids, 30)

    code, line = wait_for(lambda: (lambda r: r if "drained by" in r[1] else None)(probe(f)), 30, interval=0.3,
                          what="alpha drained")
    assert code == 2, line
    assert line.startswith("LANECTL CRITICAL - alpha drained by lanectl (rollback: failure_spike)"), line
    assert "'lanectl drain alpha'" in line
    code, lanes = status(f)
    assert code == 8
    a = lanes["alpha"]
    assert a["state"] == "up" and a["dispatch"] == "drained" and a["automatic"] is True and a["ok"] is False, a
    assert a["drained_by"] == "lanectl-supervisor" and a["drain_reason"].startswith("rollback: failure_spike")
    table = f.sb.exec([LANECTL, "status"], check=False).stdout
    assert "drained by lanectl" in table

    # the operator takes the drain over: no alarm any more, the lane stays drained
    proc = f.lanectl("drain", "alpha", "--reason", "looking into it", "--json")
    assert proc.returncode == 0 and json.loads(proc.stdout)["data"]["changed"] is True
    wait_for(lambda: probe(f)[0] == 0, 10, interval=0.3, what="probe OK after the operator's drain")
    code, lanes = status(f)
    assert code == 0 and lanes["alpha"]["dispatch"] == "drained" and lanes["alpha"]["automatic"] is False
    assert lanes["alpha"]["drained_by"] == "root"
    # a second drain changes nothing (idempotent)
    assert json.loads(f.lanectl("drain", "alpha", "--json").stdout)["data"]["changed"] is False
    code, doc = f.json("lane", "show", "alpha")
    assert code == 0 and doc["data"]["dispatch"] == "drained" and doc["data"]["drained_by"] == "root"
    assert doc["data"]["drained_by_lanectl"] is False


def kill_until_systemd_gives_up(f: Fleet, lane: str) -> None:
    """SIGKILL the lane's main process each time it is back, until systemd's start limit stops it."""
    for _ in range(20):
        props = unit(f, lane)
        if props["ActiveState"] == "failed":
            break
        pid = int(props["MainPID"])
        if pid:
            f.sb.exec(["kill", "-9", str(pid)], check=False)
        wait_for(lambda: unit(f, lane)["ActiveState"] == "failed" or int(unit(f, lane)["MainPID"]) not in (0, pid),
                 20, interval=0.05, what=f"{lane} restarted or given up")
    assert unit(f, lane)["ActiveState"] == "failed"


def test_restart_and_up_recover_a_lane_systemd_gave_up_on(fresh_sandbox, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    f = boot(fresh_sandbox, tmp_path)
    kill_until_systemd_gives_up(f, "alpha")

    code, lanes = status(f, "alpha")
    assert code == 8 and lanes["alpha"]["state"] == "failed" and lanes["alpha"]["gave_up"] is True
    assert "(gave up)" in f.sb.exec([LANECTL, "status"], check=False).stdout
    code, line = probe(f)
    assert code == 2 and "alpha failed" in line and "systemd gave up restarting it" in line, line
    code, doc = f.json("lane", "show", "alpha")
    assert doc["data"]["gave_up"] is True and doc["data"]["result"] == "signal"

    proc = f.lanectl("restart", "alpha")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "was failed (signal); cleared it" in proc.stdout and "alpha: restarted" in proc.stdout
    assert unit(f, "alpha")["ActiveState"] == "active"
    wait_for(lambda: status(f, "alpha")[1]["alpha"]["state"] == "up", 30, interval=0.3, what="alpha up")

    # the same through up, with --json
    kill_until_systemd_gives_up(f, "alpha")
    code, doc = f.json("up", "alpha")
    assert code == 0, doc
    assert doc["data"]["reset"] == {"alpha": "signal"} and doc["data"]["changed"] == ["alpha"]
    assert unit(f, "alpha")["ActiveState"] == "active"


def test_status_shows_draining_drained_degraded_and_the_weight_in_force(fresh_sandbox, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    f = boot(fresh_sandbox, tmp_path)
    code, lanes = status(f)
    assert code == 0 and {r["dispatch"] for r in lanes.values()} == {"active"}
    assert lanes["alpha"]["weight"] == 100 and lanes["alpha"]["promoted"] is False

    # draining while a mission runs, drained once it ended; both by the operator, with the reason
    (busy,) = submit_many(f, [{"cls": "interactive", "lane": "beta", "argv": ["/bin/sleep", "3"]}])
    wait_for(lambda: sql(f, "SELECT state FROM missions WHERE id=?", busy)[0][0] == "running", 30, what="running")
    assert f.lanectl("drain", "beta", "--reason", "kernel update").returncode == 0
    code, lanes = status(f)
    b = lanes["beta"]
    assert b["dispatch"] == "draining" and b["drained_by"] == "root" and b["drain_reason"] == "kernel update", b
    assert code == 0  # an operator's drain is no failure
    assert "draining by root" in f.sb.exec([LANECTL, "status"], check=False).stdout
    wait_terminal(f, [busy], 30)
    wait_for(lambda: status(f)[1]["beta"]["dispatch"] == "drained", 30, interval=0.3, what="beta drained")
    assert f.lanectl("undrain", "beta").returncode == 0

    # a promoted weight is the one in force
    assert f.lanectl("promote", "alpha", "--weight", "250", "--force", "--reason", "test").returncode == 0
    code, lanes = status(f)
    assert lanes["alpha"]["weight"] == 250 and lanes["alpha"]["promoted"] is True
    assert "250 (promoted)" in f.sb.exec([LANECTL, "status"], check=False).stdout
    code, doc = f.json("lane", "show", "alpha")
    assert doc["data"]["weight"] == 100 and doc["data"]["weight_in_force"] == 250 and doc["data"]["promoted"]
    shown = f.lanectl("lane", "show", "alpha").stdout
    assert "None" not in shown.split() and "True" not in shown.split() and "true" in shown.split()

    # degraded by the supervisor (a restart storm): status says so and exits 8
    for _ in range(3):
        pid = f.main_pid("gamma")
        f.sb.exec(["kill", "-9", str(pid)], check=True)
        wait_for(lambda: f.main_pid("gamma") not in (0, pid), 15, what="gamma restarted")
    wait_for(lambda: status(f)[1]["gamma"]["dispatch"] == "degraded", 30, interval=0.3, what="gamma degraded")
    assert "degraded" in f.sb.exec([LANECTL, "status"], check=False).stdout


def test_undrain_after_drain_stop_and_a_drill_of_a_drained_lane(fresh_sandbox, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    f = boot(fresh_sandbox, tmp_path)
    proc = f.lanectl("drain", "gamma", "--stop", "--reason", "maintenance")
    assert proc.returncode == 0 and "unit stopped" in proc.stdout
    assert unit(f, "gamma")["ActiveState"] == "inactive"
    assert wait_for(lambda: probe(f)[0] == 0, 10, interval=0.3, what="probe OK with gamma drained and stopped")
    assert status(f)[0] == 0  # an operator's drained, stopped lane is no failure either

    code, doc = f.json("drill", "gamma")
    assert code == 5 and doc["errors"][0]["code"] == "lane_down"
    f.sb.exec(["systemctl", "start", "lanectl-lane@gamma.service"], check=True)
    code, doc = f.json("drill", "gamma")
    assert code == 5 and doc["errors"][0]["code"] == "lane_not_active", doc
    f.sb.exec(["systemctl", "stop", "lanectl-lane@gamma.service"], check=True)

    proc = f.lanectl("undrain", "gamma", "--reason", "done")
    assert proc.returncode == 0 and "gamma: active; unit started" in proc.stdout, proc.stdout + proc.stderr
    assert unit(f, "gamma")["ActiveState"] == "active"
    wait_for(lambda: status(f)[1]["gamma"]["state"] == "up", 30, interval=0.3, what="gamma up")
    (m,) = submit_many(f, [{"cls": "background", "lane": "gamma", "argv": ["/bin/true"]}])
    assert wait_terminal(f, [m], 30)[m] == "succeeded"

    # a lane taken down on purpose stays down: undrain does not undo 'lanectl down'
    assert f.lanectl("drain", "gamma").returncode == 0
    assert f.lanectl("down", "gamma").returncode == 0
    proc = f.lanectl("undrain", "gamma")
    assert proc.returncode == 0 and "lanectl up gamma" in proc.stdout
    assert unit(f, "gamma")["ActiveState"] == "inactive"


def test_a_root_only_verb_run_by_another_user_exits_6(fresh_sandbox, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    f = boot(fresh_sandbox, tmp_path)
    for verb in (["restart", "alpha"], ["up", "alpha"], ["down", "alpha"]):
        proc = f.sb.exec(["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", LANECTL, *verb, "--json"],
                         check=False)
        assert proc.returncode == 6, (verb, proc.stdout, proc.stderr)
        err = json.loads(proc.stdout)["errors"][0]
        assert err["code"] == "permission_denied" and "nobody" in err["message"] and "root" in err["hint"], err
        assert "Traceback" not in proc.stderr
    assert unit(f, "alpha")["ActiveState"] == "active"
    # reading needs no root (status exits 6 for a user who may not read the ledger: tests/systemd/test_nonroot_reads.py)
    proc = f.sb.exec(["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", LANECTL, "status", "--json"],
                     check=False)
    assert proc.returncode == 6 and {ln["name"] for ln in json.loads(proc.stdout)["data"]["lanes"]}, proc.stderr


def test_validate_does_not_warn_about_a_running_lanes_own_port(fresh_sandbox, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    f = boot(fresh_sandbox, tmp_path)
    code, doc = f.json("validate")
    assert code == 0 and not [e for e in doc["errors"] if e["code"] == "port_taken"], doc
    # another process on a lane's port is still a warning
    assert f.lanectl("down", "gamma").returncode == 0
    holder = f.sb.exec(["systemd-run", "--unit", "port-squatter", "/usr/bin/python3", "-c",
                        "import socket, time; s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); "
                        "s.bind(('127.0.0.1', 8703)); s.listen(); "
                        "time.sleep(600)"], check=True)
    try:
        taken = [PYTHON, "-c", "import sys; from lanectl.config import port_taken; sys.exit(not port_taken(8703))"]
        wait_for(lambda: f.sb.exec(taken, check=False).returncode == 0, 30,
                 what="the squatter listening: " + f.sb.exec(["systemctl", "status", "port-squatter", "--no-pager"],
                                                             check=False).stdout)
        code, doc = f.json("validate")
        warned = [e for e in doc["errors"] if e["code"] == "port_taken"]
        assert code == 0 and [e["lane"] for e in warned] == ["gamma"], doc
    finally:
        f.sb.exec(["systemctl", "stop", "port-squatter"], check=False)
    assert holder.returncode == 0


def test_a_drill_that_ends_with_its_lane_rolled_back_fails(fresh_sandbox, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """lanectl takes the lane out of service while it is drilled (a rollback): the drill must not report `passed`.

    The rollback is made the way the supervisor makes one (a drain whose actor is lanectl-supervisor, through the
    ledger API), while the drill's mission runs again after the kill: failures cannot stand in for it any more,
    because the drill's mission, alone on the lane when it was killed, now runs alone again (a suspect of the lane
    death) and no other mission runs on the lane meanwhile (issue 17)."""
    import threading

    # alpha without a fallback: its pinned drill mission waits for it after the kill and runs on it again (2 s)
    cfg = copy_example(tmp_path)
    with open(cfg / "lanectl.toml", "a") as fh:
        fh.write(POLICY)
    alpha = cfg / "lanes.d" / "alpha.toml"
    alpha.write_text("".join(line for line in alpha.read_text().splitlines(True) if not line.startswith("fallback")))
    f = Fleet(fresh_sandbox, cfg)
    assert f.json("install")[0] == 0 and f.json("up")[0] == 0
    wait_for(lambda: probe(f)[0] == 0, 60, interval=0.3, what="every lane up and healthy")
    out: dict[str, object] = {}
    t = threading.Thread(target=lambda: out.update(proc=f.lanectl("drill", "alpha", "--kind", "crash", "--json")))
    t.start()
    try:
        wait_for(lambda: sql(f, "SELECT 1 FROM missions WHERE json_extract(payload, '$.drill') IS NOT NULL "
                                "AND attempts >= 2 AND state = 'running' AND current_lane = 'alpha'"), 60,
                 interval=0.02, what="the drill mission running on alpha again")
        rollback = ("import sys; from lanectl import config; from lanectl.ledger import lanes as l; "
                    "fleet = config.load(sys.argv[1]); led = config.open_ledger(fleet); "
                    "l.drain(led, fleet, 'alpha', now=__import__('time').time(), reason='rollback: failure_spike', "
                    "who='lanectl-supervisor'); led.close()")
        f.sb.exec([PYTHON, "-c", rollback, str(cfg)], check=True)
    finally:
        t.join(180)
    proc = out["proc"]
    doc = json.loads(proc.stdout)  # type: ignore[attr-defined]
    assert proc.returncode == 8 and doc["data"]["passed"] is False, doc  # type: ignore[attr-defined]
    assert doc["data"]["lane_state"] in ("draining", "drained")
    assert any("drained by lanectl-supervisor" in why for why in doc["data"]["failures"]), doc
    drill = json.loads(sql(f, "SELECT data FROM events WHERE kind = 'drill' AND lane = 'alpha'")[0][0])
    assert drill["passed"] is False

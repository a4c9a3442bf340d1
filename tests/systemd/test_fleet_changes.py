"""Issue 15 items 4, 6 and 10 under a real systemd: the fleet changes while the supervisor runs.

- 4: a lane added with `lane add` + `install` + `up` gets its pinned mission without a supervisor restart; the
  reload keeps in-flight work (no re-run, no extra attempt); `apply` says it reloaded and records it.
- 6: a mistyped --ledger is exit 6 and creates nothing; `install` creates the configured ledger.
- 10: removing a lane with work or sessions bound is refused, or moves them with --reroute-to; `apply` refuses
  while a lane removed by hand still has work; `reroute` takes a lane only the ledger knows; sessions of a gone
  lane are refused; `probe` reports queued missions no installed lane can ever take.
"""
from __future__ import annotations

import json
import shutil

import pytest

from tests.systemd.lanehelpers import LANECTL, Fleet, copy_example, sql, submit_many, wait_for, wait_terminal
from tests.systemd.test_supervisor import supervisor_health

pytestmark = pytest.mark.systemd
SUP = "lanectl-supervisor.service"


@pytest.fixture(scope="module")
def fleet(sandbox, tmp_path_factory):  # type: ignore[no-untyped-def]
    cfg = copy_example(tmp_path_factory.mktemp("fleetchanges"))
    with open(cfg / "lanectl.toml", "a") as fh:
        fh.write("\n[health]\nsystemd_sec = 0.5\n[rollback]\nenabled = false\n")
    f = Fleet(sandbox, cfg)
    assert sandbox.exec(["test", "-e", f.ledger], check=False).returncode != 0
    code, doc = f.json("install")
    assert code == 0, doc
    assert doc["data"]["ledger_created"] == f.ledger  # install is what creates the ledger
    code, doc = f.json("up")
    assert code == 0, doc
    wait_for(lambda: healthy(f, "alpha", "beta", "gamma"), 60, interval=0.3, what="the supervisor and its lanes")
    yield f
    f.lanectl("down")


def healthy(fleet: Fleet, *lanes: str) -> bool:
    h = supervisor_health(fleet)
    seen = h.get("lanes", {})
    return all(seen.get(n, {}).get("healthy") for n in lanes)


def sup_pid(fleet: Fleet) -> int:
    return int(fleet.show(SUP, "MainPID")["MainPID"])


def add_lane(fleet: Fleet, name: str, port: int, classes: str = "background,deadline") -> None:
    code, doc = fleet.json("lane", "add", name, "--port", str(port), "--classes", classes)
    assert code == 0, doc


def run_json(fleet: Fleet, *args: str) -> tuple[int, dict]:  # type: ignore[type-arg]
    proc = fleet.lanectl(*args, "--json")
    return proc.returncode, json.loads(proc.stdout) if proc.stdout.strip() else {}


def test_a_mistyped_ledger_is_exit_6_and_creates_nothing(fleet: Fleet) -> None:
    typo = fleet.ledger + ".typo"
    for args in (["drain", "alpha"], ["submit", "--class", "interactive", "--payload", '{"argv": ["true"]}'],
                 ["missions"], ["mission", "show", "1"], ["events"], ["reroute", "alpha", "--to", "beta"]):
        code, doc = run_json(fleet, *args, "--ledger", typo)
        assert code == 6, (args, doc)
        assert doc["errors"][0]["code"] == "ledger_missing" and typo in doc["errors"][0]["message"], doc
    assert fleet.sb.exec(["test", "-e", typo], check=False).returncode != 0
    code, doc = run_json(fleet, "ledger", "init", "--ledger", typo)
    assert code == 0 and doc["data"]["changed"] is True
    assert fleet.sb.exec(["test", "-f", typo], check=False).returncode == 0
    # the explicit ledger is honoured by probe too
    proc = fleet.sb.exec([LANECTL, "probe", "--ledger", fleet.ledger + ".absent"], check=False)
    assert proc.returncode == 3 and "ledger unreadable" in proc.stdout, proc.stdout


def test_a_new_lane_gets_its_pinned_mission_and_the_reload_keeps_in_flight_work(fleet: Fleet) -> None:
    pid = sup_pid(fleet)
    # in flight on alpha across the reload
    [long] = submit_many(fleet, [{"cls": "interactive", "lane": "alpha", "argv": ["/bin/sh", "-c", "sleep 6"]}])
    wait_for(lambda: sql(fleet, "SELECT state FROM missions WHERE id = ?", long)[0][0] == "running", 30,
             interval=0.2, what="the long mission to run")
    add_lane(fleet, "delta", 8714)
    code, doc = fleet.json("install")
    assert code == 0, doc
    assert doc["data"]["supervisor"] == "reloaded" and doc["data"]["supervisor_error"] is None, doc
    assert "delta" in supervisor_health(fleet)["lanes"]  # install returned once the supervisor ran the new fleet
    code, doc = fleet.json("up", "delta")
    assert code == 0, doc
    [pinned] = submit_many(fleet, [{"cls": "background", "lane": "delta", "argv": ["true"]}])
    done = wait_terminal(fleet, [pinned, long], 60)
    assert done == {pinned: "succeeded", long: "succeeded"}, done
    assert sql(fleet, "SELECT lane FROM attempts WHERE mission = ?", pinned) == [["delta"]]
    # the reload lost nothing: one attempt, never re-queued
    assert sql(fleet, "SELECT count(*) FROM attempts WHERE mission = ?", long) == [[1]]
    assert sql(fleet, "SELECT count(*) FROM events WHERE mission = ? AND kind = 'requeued'", long) == [[0]]
    assert sup_pid(fleet) == pid, "the supervisor was restarted, not reloaded"
    ev = sql(fleet, "SELECT data FROM events WHERE kind = 'supervisor' ORDER BY id DESC LIMIT 1")
    data = json.loads(ev[0][0])
    assert data["action"] == "reloaded" and data["by"] == "install" and data["added"] == ["delta"], data
    # and its journal says so, through lanectl logs
    proc = fleet.sb.exec([LANECTL, "logs", "supervisor", "--since", "-10min"], check=False)
    assert proc.returncode == 0 and "lane delta added to the fleet" in proc.stdout, proc.stdout + proc.stderr
    proc = fleet.sb.exec([LANECTL, "logs", "delta", "--since", "-10min"], check=False)
    assert proc.returncode == 0 and "lanectl-lane@delta" in proc.stdout, proc.stdout + proc.stderr


def test_apply_says_it_reloads_the_supervisor_and_records_it(fleet: Fleet) -> None:
    pid = sup_pid(fleet)
    text = (fleet.config_dir / "lanes.d" / "delta.toml").read_text()
    (fleet.config_dir / "lanes.d" / "delta.toml").write_text(text.replace("weight = 100", "weight = 60")
                                                             if "weight = 100" in text else text + "weight = 60\n")
    proc = fleet.lanectl("apply")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "supervisor reloaded" in proc.stdout, proc.stdout
    assert sup_pid(fleet) == pid
    rows = sql(fleet, "SELECT data FROM events WHERE kind = 'supervisor' ORDER BY id DESC LIMIT 1")
    assert json.loads(rows[0][0])["by"] == "apply"


def test_removing_a_lane_with_work_is_refused_or_moves_it(fleet: Fleet) -> None:
    add_lane(fleet, "epsilon", 8715)
    assert fleet.json("install")[0] == 0
    # epsilon is installed but down: its pinned work and its session wait for it
    ids = submit_many(fleet, [{"cls": "background", "lane": "epsilon", "argv": ["true"]},
                              {"cls": "background", "lane": "epsilon", "argv": ["true"]},
                              {"cls": "background", "session": "epsilon:s1", "argv": ["true"]}])
    code, doc = fleet.json("down", "epsilon")
    assert code == 0 and any(w["code"] == "lane_down_with_work" for w in doc["errors"]), doc
    code, doc = run_json(fleet, "lane", "remove", "epsilon")
    assert code == 5 and doc["errors"][0]["code"] == "lane_in_use", doc
    assert "3 queued" in doc["errors"][0]["message"] and "epsilon:s1" in doc["errors"][0]["message"], doc
    assert (fleet.config_dir / "lanes.d" / "epsilon.toml").exists()
    code, doc = run_json(fleet, "lane", "remove", "epsilon", "--reroute-to", "beta")
    assert code == 0, doc
    assert sorted(doc["data"]["moved"]["missions"]) == ids[:2] and doc["data"]["moved"]["sessions"] == ["epsilon:s1"]
    assert not (fleet.config_dir / "lanes.d" / "epsilon.toml").exists()
    done = wait_terminal(fleet, ids, 60)
    assert set(done.values()) == {"succeeded"}, done
    assert {r[0] for r in sql(fleet, f"SELECT lane FROM attempts WHERE mission IN ({','.join(map(str, ids))})")} \
        == {"beta"}
    code, doc = fleet.json("install")
    assert code == 0 and doc["data"]["supervisor"] == "reloaded", doc
    assert "epsilon" not in supervisor_health(fleet)["lanes"]


def test_apply_refuses_while_a_lane_removed_by_hand_has_work(fleet: Fleet) -> None:
    add_lane(fleet, "zeta", 8716)
    assert fleet.json("install")[0] == 0
    ids = submit_many(fleet, [{"cls": "background", "lane": "zeta", "argv": ["true"]},
                              {"cls": "background", "session": "zeta:s1", "argv": ["true"]}])
    kept = fleet.config_dir / "zeta.toml.kept"
    shutil.move(fleet.config_dir / "lanes.d" / "zeta.toml", kept)  # a rename by hand: the file is gone
    code, doc = run_json(fleet, "apply")
    assert code == 5 and doc["errors"][0]["code"] == "lane_in_use" and "zeta" in doc["errors"][0]["message"], doc
    assert "zeta" in supervisor_health(fleet)["lanes"]  # nothing was installed
    # sessions of a lane that is gone from the configuration are refused, not queued for nobody
    code, doc = run_json(fleet, "submit", "--class", "background", "--session", "zeta:s1", "--payload",
                         '{"argv": ["true"]}')
    assert code == 5 and doc["errors"][0]["code"] == "session_lane_gone", doc
    # reroute takes the lane that only the ledger (and the installed units) still know
    code, doc = run_json(fleet, "reroute", "zeta", "--to", "beta")
    assert code == 0 and doc["data"]["missions"] == ids[:1] and doc["data"]["sessions"] == ["zeta:s1"], doc
    code, doc = run_json(fleet, "apply")
    assert code == 0 and doc["data"]["supervisor"] == "reloaded", doc
    assert set(wait_terminal(fleet, ids, 60).values()) == {"succeeded"}


def test_probe_reports_missions_no_lane_can_ever_take(fleet: Fleet, tmp_path) -> None:  # type: ignore[no-untyped-def]
    # a producer with a stale configuration (a lane "ghost" this box does not run) queues work for it
    stale = copy_example(tmp_path / "stale")
    (stale / "lanectl.toml").write_text(f'ledger = "{fleet.ledger}"\n'
                                        + (fleet.config_dir / "lanectl.toml").read_text().split("\n", 1)[1])
    (stale / "lanes.d" / "ghost.toml").write_text('port = 8719\nworkspace = "/var/lib/lanes/ghost"\n')
    ids = submit_many(Fleet(fleet.sb, stale), [{"cls": "background", "lane": "ghost", "argv": ["true"]},
                                               {"cls": "background", "session": "ghost:s1", "argv": ["true"]}])
    proc = fleet.sb.exec([LANECTL, "probe"], check=False)
    assert proc.returncode == 2 and "2 queued mission(s) bound to a lane that is gone (2 on ghost)" in proc.stdout, \
        proc.stdout
    code, doc = run_json(fleet, "reroute", "ghost", "--to", "beta")
    assert code == 0 and doc["data"]["sessions"] == ["ghost:s1"], doc
    assert set(wait_terminal(fleet, ids, 60).values()) == {"succeeded"}
    proc = fleet.sb.exec([LANECTL, "probe"], check=False)
    assert "gone" not in proc.stdout and "stranded=0" in proc.stdout, proc.stdout

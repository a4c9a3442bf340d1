"""Issue 15 follow-ups under a real systemd: what an attack found, attacked again.

- F1: a second ``lanectl supervise`` while lanectl-supervisor.service runs (same ledger, or another ledger on the
  same socket) is refused (exit 5, ``supervisor_running``, naming the service); the service keeps its socket (same
  inode), callbacks keep landing, and nothing runs twice, not even across a restart of the service.
- F2: ``supervise --ledger TYPO`` exits 6 (``ledger_missing``) and creates nothing.
"""
from __future__ import annotations

import collections
import json

import pytest

from tests.systemd.lanehelpers import (Fleet, executions, sql, submit_many, wait_for, wait_terminal, up_example)

pytestmark = pytest.mark.systemd
LANES = ["alpha", "beta", "gamma"]
SOCK = "/run/lanectl/callbacks.sock"


@pytest.fixture(scope="module")
def fleet(sandbox, tmp_path_factory):  # type: ignore[no-untyped-def]
    f = up_example(sandbox, tmp_path_factory.mktemp("fixop"), "\n[rollback]\nenabled = false\n")
    yield f
    f.lanectl("down")


def inode(fleet: Fleet) -> str:
    return fleet.sb.exec(["stat", "-c", "%i", SOCK], check=False).stdout.strip()


def supervise(fleet: Fleet, *args: str) -> tuple[int, dict]:
    # `timeout`: should the refusal regress, the intruder is stopped rather than the test hanging
    from tests.systemd.lanehelpers import LANECTL

    proc = fleet.sb.exec(["timeout", "60", LANECTL, "supervise", *args, "-c", str(fleet.config_dir), "--json"],
                         check=False)
    return proc.returncode, json.loads(proc.stdout) if proc.stdout.strip() else {"stderr": proc.stderr}


def test_a_second_supervisor_is_refused_and_steals_nothing(fleet: Fleet) -> None:
    main_pid = fleet.show("lanectl-supervisor.service", "MainPID")["MainPID"]
    before = inode(fleet)
    assert before
    ids = submit_many(fleet, [{"cls": "background", "argv": ["/bin/sh", "-c", f"sleep 2; echo {i}"]}
                              for i in range(6)])
    wait_for(lambda: sql(fleet, "SELECT count(*) FROM missions WHERE state IN ('dispatched', 'running') "
                                "AND id BETWEEN ? AND ?", min(ids), max(ids))[0][0] > 0, 60,
             what="missions in flight")

    code, doc = supervise(fleet)  # the same ledger and socket, as docs/operations.md's foreground run
    assert code == 5, doc
    err = doc["errors"][0]
    assert err["code"] == "supervisor_running", err
    assert f"pid {main_pid}" in err["message"] and "lanectl-supervisor.service" in err["message"], err

    other = "/var/lib/lanectl/fixop-other.db"  # another ledger, the same socket
    assert fleet.json("ledger", "init", "--ledger", other)[0] == 0
    code, doc = supervise(fleet, "--ledger", other)
    assert code == 5 and doc["errors"][0]["code"] == "supervisor_running", doc
    assert SOCK in doc["errors"][0]["message"]

    # the service still owns its socket, and callbacks land: every mission succeeds, once
    assert inode(fleet) == before
    assert fleet.show("lanectl-supervisor.service", "MainPID", "ActiveState") == {"MainPID": main_pid,
                                                                                  "ActiveState": "active"}
    ids += submit_many(fleet, [{"cls": "background", "argv": ["/bin/sh", "-c", "echo after"]}])
    assert set(wait_terminal(fleet, ids, 120).values()) == {"succeeded"}

    # a restart of the service re-runs nothing: no callback was lost
    fleet.sb.exec(["systemctl", "restart", "lanectl-supervisor.service"], check=True)
    wait_for(lambda: fleet.sb.exec(["systemctl", "is-active", "lanectl-supervisor.service"],
                                   check=False).stdout.strip() == "active", 30, what="the supervisor back")
    later = submit_many(fleet, [{"cls": "background", "argv": ["/bin/sh", "-c", "echo later"]}])
    assert set(wait_terminal(fleet, later, 120).values()) == {"succeeded"}
    since = sql(fleet, "SELECT min(created_at) FROM missions WHERE id = ?", min(ids))[0][0]
    runs = collections.Counter(e["mission"] for e in executions(fleet, LANES)
                               if e["at"] >= since and e["event"] == "start" and e["mission"] in set(ids))
    assert runs and set(runs) == set(ids) and max(runs.values()) == 1, runs


def test_supervise_with_a_ledger_that_does_not_exist_creates_none(fleet: Fleet) -> None:
    typo = "/var/lib/lanectl/ledgr.db"
    code, doc = supervise(fleet, "--ledger", typo)
    assert code == 6 and doc["errors"][0]["code"] == "ledger_missing", doc
    listing = fleet.sb.exec(["ls", "/var/lib/lanectl"], check=True).stdout.split()
    assert not [n for n in listing if n.startswith("ledgr")], listing


def enabled(fleet: Fleet, unit: str) -> str:
    return fleet.sb.exec(["systemctl", "is-enabled", unit], check=False).stdout.strip()


def test_a_lane_file_deleted_by_hand_leaves_no_unit_behind(fleet: Fleet) -> None:
    """F3 (attack/orphan-unit.sh): the unit of a lane whose file was deleted by hand went on enabled and running
    with no drop-in (no User=: as root), 'down NAME' said it was not installed, apply said nothing changed, and
    status and probe stayed green."""
    unit = "lanectl-lane@eps.service"
    assert fleet.json("lane", "add", "eps", "--port", "8731", "--classes", "background")[0] == 0
    assert fleet.json("install")[0] == 0
    code, doc = fleet.json("up", "eps")
    assert code == 0, doc
    (fleet.config_dir / "lanes.d" / "eps.toml").unlink()  # by hand

    code, doc = fleet.json("install")  # nothing is bound to eps: its unit is stopped and disabled
    assert code == 0 and doc["data"]["stopped"] == ["eps"], doc
    assert fleet.show(unit, "ActiveState")["ActiveState"] in ("inactive", "failed") and enabled(fleet, unit) != "enabled"

    def orphaned() -> None:  # what an older lanectl left: enabled in lanectl.target.wants, running as root
        fleet.sb.exec(["systemctl", "enable", "--now", unit], check=False)
        wait_for(lambda: enabled(fleet, unit) == "enabled", 20, what="the orphan enabled")

    orphaned()
    code, doc = fleet.json("status")
    assert code == 8 and [o["lane"] for o in doc["data"]["orphans"]] == ["eps"], doc
    code, doc = fleet.json("probe")
    checks = {c["name"]: c for c in doc["data"]["checks"]}
    assert code >= 1 and checks["orphan:eps"]["status"] == "WARNING", doc
    assert "lanectl down eps" in checks["orphan:eps"]["text"]

    code, doc = fleet.json("down", "eps")  # the hint tells the truth: it stops and disables it
    assert code == 0 and doc["data"]["lanes"] == ["eps"], doc
    assert enabled(fleet, unit) != "enabled"
    wait_for(lambda: fleet.show(unit, "ActiveState")["ActiveState"] in ("inactive", "failed"), 30, what="eps down")
    code, doc = fleet.json("status")
    assert doc["data"]["orphans"] == [], doc

    orphaned()  # and apply, which used to say "nothing changed"
    code, doc = fleet.json("apply", "--reason", "orphan")
    assert code == 0 and doc["data"]["stopped"] == ["eps"], doc
    assert enabled(fleet, unit) != "enabled"
    code, doc = fleet.json("up")  # lanectl.target no longer starts it
    assert fleet.show(unit, "ActiveState")["ActiveState"] in ("inactive", "failed")
    assert fleet.json("status")[1]["data"]["orphans"] == []


def healthz(fleet: Fleet) -> dict:
    proc = fleet.sb.exec(["curl", "-s", "http://127.0.0.1:8700/healthz"], check=False)
    return json.loads(proc.stdout) if proc.returncode == 0 and proc.stdout.strip() else {}


def test_a_failed_reload_is_not_green(fleet: Fleet) -> None:
    """F6: 'systemctl reload lanectl-supervisor' with a configuration that does not load left probe OK and status
    exit 0 while the supervisor ran the old configuration."""
    lane_file = fleet.config_dir / "lanes.d" / "alpha.toml"
    good = lane_file.read_text()
    reloads = healthz(fleet).get("reloads", 0)
    try:
        lane_file.write_text(good + 'capacity = "many"\n')
        fleet.sb.exec(["systemctl", "reload", "lanectl-supervisor.service"], check=True)
        h = wait_for(lambda: (lambda d: d if d.get("reloads", 0) > reloads else None)(healthz(fleet)), 30,
                     what="the reload to be tried")
        assert h["reload_error"], h
        code, doc = fleet.json("status")
        assert code == 8 and doc["data"]["supervisor"]["reload_error"] == h["reload_error"], doc
        assert all(l["ok"] for l in doc["data"]["lanes"] if l["enabled"]), doc  # nothing else is wrong
        code, doc = fleet.json("probe")
        checks = {c["name"]: c for c in doc["data"]["checks"]}
        assert code == 1 and checks["supervisor_reload"]["status"] == "WARNING", doc
        assert "the last reload failed" in doc["data"]["line"]
        text = fleet.lanectl("status").stdout
        assert "the last reload failed" in " ".join(text.split()), text
    finally:
        lane_file.write_text(good)
    fleet.sb.exec(["systemctl", "reload", "lanectl-supervisor.service"], check=True)
    wait_for(lambda: healthz(fleet).get("reload_error", "x") is None, 30, what="a good reload")
    code, doc = fleet.json("probe")
    assert "supervisor_reload" not in {c["name"] for c in doc["data"]["checks"]}, doc
    assert fleet.json("status")[0] == 0

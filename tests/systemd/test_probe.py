"""`lanectl probe` exit codes under a real systemd: OK, WARNING, CRITICAL, UNKNOWN (monitoring-plugins)."""
from __future__ import annotations

import json

import pytest

from tests.systemd.lanehelpers import LANECTL, Fleet, copy_example, submit_many, wait_for

pytestmark = pytest.mark.systemd


@pytest.fixture(scope="module")
def fleet(sandbox, tmp_path_factory):  # type: ignore[no-untyped-def]
    cfg = copy_example(tmp_path_factory.mktemp("probe"))
    with open(cfg / "lanectl.toml", "a") as fh:
        fh.write("\n[probe]\ninteractive_wait_warn_sec = 1\ninteractive_wait_crit_sec = 600\n")
    f = Fleet(sandbox, cfg)
    assert f.json("install")[0] == 0
    assert f.json("up")[0] == 0
    yield f
    f.lanectl("down")


def probe(f: Fleet) -> tuple[int, str, dict]:
    line = f.sb.exec([LANECTL, "probe"], check=False)
    doc = json.loads(f.sb.exec([LANECTL, "probe", "--json"], check=False).stdout)
    return line.returncode, line.stdout.strip(), doc


def test_probe_states(fleet: Fleet) -> None:
    wait_for(lambda: probe(fleet)[0] == 0, 30, interval=0.3, what="probe OK")
    code, line, doc = probe(fleet)
    assert line.startswith("LANECTL OK - ") and " | lanes_up=3;" in line
    assert doc["data"]["status"] == "OK" and doc["exit_code"] == 0

    # a drained lane is not an alarm, even stopped
    assert fleet.lanectl("drain", "gamma", "--stop").returncode == 0
    assert probe(fleet)[0] == 0

    # an interactive mission that nobody can take: WARNING once it waited past the threshold
    for lane in ("alpha", "beta"):
        assert fleet.lanectl("drain", lane).returncode == 0
    submit_many(fleet, [{"cls": "interactive", "argv": ["/bin/true"]}])
    code, line, doc = wait_for(lambda: (lambda r: r if r[0] == 1 else None)(probe(fleet)), 10, interval=0.3,
                               what="probe WARNING")
    assert line.startswith("LANECTL WARNING - oldest queued interactive mission waits")
    for lane in ("alpha", "beta"):
        fleet.lanectl("undrain", lane)
    wait_for(lambda: probe(fleet)[0] == 0, 30, interval=0.3, what="probe OK again")

    # a lane that should run but does not: CRITICAL
    fleet.sb.exec(["systemctl", "stop", "lanectl-lane@alpha.service"], check=True)
    code, line, doc = probe(fleet)
    assert code == 2 and "alpha down" in line and doc["data"]["status"] == "CRITICAL"
    fleet.sb.exec(["systemctl", "start", "lanectl-lane@alpha.service"], check=True)
    wait_for(lambda: probe(fleet)[0] == 0, 30, interval=0.3, what="probe OK after restart")

    # the ledger cannot be read: UNKNOWN
    fleet.sb.exec(["mv", fleet.ledger, fleet.ledger + ".away"], check=True)
    try:
        code, line, doc = probe(fleet)
        assert code == 3 and line.startswith("LANECTL UNKNOWN - ledger unreadable")
    finally:
        fleet.sb.exec(["mv", fleet.ledger + ".away", fleet.ledger], check=True)
    fleet.lanectl("undrain", "gamma")

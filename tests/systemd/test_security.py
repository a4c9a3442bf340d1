"""The security pass under a real systemd: files are created with the intended modes, everything listens on
loopback only, and lane users cannot read the box secret or any dispatch key."""
from __future__ import annotations

import json

import pytest

from tests.conftest import LANECTL_BIN
from tests.systemd.lanehelpers import Fleet, copy_example, submit_many, wait_for, wait_terminal

pytestmark = pytest.mark.systemd


@pytest.fixture(scope="module")
def fleet(sandbox, tmp_path_factory):  # type: ignore[no-untyped-def]
    f = Fleet(sandbox, copy_example(tmp_path_factory.mktemp("sec")))
    assert f.json("install")[0] == 0
    assert f.json("up")[0] == 0
    yield f
    f.lanectl("down")


def stat(f: Fleet, path: str) -> tuple[str, str, str]:
    out = f.sb.exec(["stat", "-c", "%a %U %G", path], check=True).stdout.split()
    return out[0], out[1], out[2]


def test_files_have_the_intended_modes(fleet: Fleet) -> None:
    ids = submit_many(fleet, [{"cls": "interactive", "argv": ["/bin/true"]}])
    wait_terminal(fleet, ids, 30)
    assert stat(fleet, "/var/lib/lanectl") == ("750", "root", "root")
    assert stat(fleet, "/var/lib/lanectl/secret.key") == ("600", "root", "root")
    assert stat(fleet, "/var/lib/lanectl/keys") == ("700", "root", "root")
    for lane in ("alpha", "beta", "gamma"):
        assert stat(fleet, f"/var/lib/lanectl/keys/{lane}.env") == ("600", "root", "root")
        assert stat(fleet, f"/var/lib/lanes/{lane}") == ("700", f"lane-{lane}", f"lane-{lane}")
        assert stat(fleet, f"/etc/systemd/system/lanectl-lane@{lane}.service.d/50-lanectl.conf")[0] == "644"
    assert stat(fleet, fleet.ledger)[0] == "640"
    assert stat(fleet, "/etc/systemd/system/lanectl-lane@.service")[0] == "644"
    # what a lane writes is its own (UMask=0077 in the unit)
    log = "/var/lib/lanes/alpha/.lanectl/executions.log"
    if fleet.sb.exec(["test", "-e", log], check=False).returncode == 0:
        assert stat(fleet, log)[0] == "600"


def test_everything_listens_on_loopback_only(fleet: Fleet) -> None:
    wait_for(lambda: fleet.sb.exec(["curl", "-sf", "http://127.0.0.1:8700/healthz"], check=False).returncode == 0,
             20, what="the supervisor")
    rows = fleet.sb.exec(["cat", "/proc/net/tcp", "/proc/net/tcp6"], check=True).stdout.splitlines()
    listening = []
    for row in rows:
        parts = row.split()
        if len(parts) > 3 and parts[3] == "0A":  # TCP_LISTEN
            addr, port = parts[1].rsplit(":", 1)
            listening.append((addr, int(port, 16)))
    ours = [(a, p) for a, p in listening if p in (8700, 8701, 8702, 8703)]
    assert {p for _, p in ours} == {8700, 8701, 8702, 8703}
    for addr, port in ours:
        assert addr in ("0100007F", "00000000000000000000000001000000"), (addr, port)  # 127.0.0.1 / ::1


def test_a_non_loopback_supervisor_address_is_refused(fleet: Fleet, tmp_path) -> None:  # type: ignore[no-untyped-def]
    cfg = copy_example(tmp_path / "bad")
    text = (cfg / "lanectl.toml").read_text().replace('host = "127.0.0.1"', 'host = "0.0.0.0"')
    (cfg / "lanectl.toml").write_text(text)
    proc = fleet.sb.exec([LANECTL_BIN, "validate", str(cfg), "--json"], check=False)
    doc = json.loads(proc.stdout)
    assert proc.returncode == 3 and doc["errors"][0]["field"] == "supervisor.host"

"""Gate B1 under a real systemd: a lane writes only its own workspace and cannot read another lane's."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.systemd.lanehelpers import PYTHON, Fleet, wait_for

pytestmark = pytest.mark.systemd

PROBE = r'''
import json, os, sys, time
import sdnotify
ws = os.environ["LANECTL_WORKSPACE"]
other = sys.argv[1]
def tryw(path):
    try:
        with open(path, "w") as f:
            f.write("x")
        return "ok"
    except OSError as e:
        return e.strerror
def tryr(path):
    try:
        with open(path) as f:
            f.read()
        return "ok"
    except OSError as e:
        return e.strerror
r = {"own": tryw(ws + "/own.txt"), "other_write": tryw(other + "/intruder.txt"),
     "other_read": tryr(other + "/secret.txt"), "ledger_read": tryr("/var/lib/lanectl/ledger.db"),
     "state_read": tryr("/var/lib/lanectl/planted"), "key_read": tryr("/var/lib/lanectl/keys/iso-a.env"),
     "box_secret_read": tryr("/var/lib/lanectl/secret.key"),
     "secret_read": tryr("/etc/lanectl/callback.key"), "uid": os.getuid()}
for p in ("/etc/probe", "/opt/lanectl/probe", "/var/lib/lanectl/probe", "/var/lib/probe", "/root/probe",
          "/home/probe", "/dev/shm/probe", "/usr/local/probe", "/srv/probe"):
    r[p] = tryw(p)
with open(ws + "/probe.json", "w") as f:
    json.dump(r, f)
n = sdnotify.SystemdNotifier()
n.notify("READY=1")
while True:
    n.notify("WATCHDOG=1")
    time.sleep(0.5)
'''


def test_lane_cannot_touch_other_workspaces_or_the_control_plane(sandbox, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    cfg = tmp_path / "iso"
    (cfg / "lanes.d").mkdir(parents=True)
    (cfg / "lanes.d" / "iso-a.toml").write_text(
        'port = 8751\nworkspace = "/var/lib/lanes-iso/iso-a"\n'
        f'exec = ["{PYTHON}", "/var/lib/lanes-probe/probe.py", "/var/lib/lanes-iso/iso-b"]\n')
    (cfg / "lanes.d" / "iso-b.toml").write_text('port = 8752\nworkspace = "/var/lib/lanes-iso/iso-b"\n')
    f = Fleet(sandbox, cfg)
    f.write_file("/var/lib/lanes-probe/probe.py", PROBE)
    # the control plane's files, world-readable on purpose: only the unit's InaccessiblePaths= protects them
    f.write_file("/var/lib/lanectl/planted", "state")
    f.write_file("/etc/lanectl/callback.key", "secret")
    assert f.json("install")[0] == 0
    sandbox.exec(["install", "-o", "lane-iso-b", "-m", "0644", "/dev/null", "/var/lib/lanes-iso/iso-b/secret.txt"],
                 check=True)
    try:
        code, doc = f.json("up")
        assert code == 0, doc
        raw = wait_for(lambda: sandbox.exec(["cat", "/var/lib/lanes-iso/iso-a/probe.json"], check=False).stdout, 10,
                       what="the probe lane's report")
        r = json.loads(raw)
        assert r["own"] == "ok"
        assert r["uid"] != 0
        assert r["other_write"] in ("Read-only file system", "Permission denied")
        assert r["other_read"] == "Permission denied"
        for key in ("ledger_read", "state_read", "key_read", "box_secret_read", "secret_read"):
            assert r[key] != "ok", (key, r)
        for p in ("/etc/probe", "/opt/lanectl/probe", "/var/lib/lanectl/probe", "/var/lib/probe", "/root/probe",
                  "/home/probe", "/dev/shm/probe", "/usr/local/probe", "/srv/probe"):
            assert r[p] != "ok", (p, r)
        assert sandbox.exec(["test", "-e", "/var/lib/lanes-iso/iso-b/intruder.txt"], check=False).returncode != 0
        mode = sandbox.exec(["stat", "-c", "%a %U", "/var/lib/lanes-iso/iso-a"], check=True).stdout.split()
        assert mode == ["700", "lane-iso-a"]
    finally:
        f.lanectl("down")

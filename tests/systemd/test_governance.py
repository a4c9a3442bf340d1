"""Gate B4/B5 under a real systemd: injected failures trip each rollback trigger (the lane ends drained, its
work on the fallback, a snapshot on disk); the last healthy lane of a class is never taken out; promotion is
refused without evidence and allowed with it; drills are recorded with their figures."""
from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from tests.systemd.lanehelpers import PYTHON, Fleet, copy_example, sql, states, submit_many, wait_for, wait_terminal

pytestmark = pytest.mark.systemd

POLICY = """
[leases]
lease_sec = 2
heartbeat_sec = 0.5

[rollback]
window_sec = 120
min_samples = 5
failure_rate = 0.5
fallback_rate = 0.5
interactive_starvation_sec = 3
max_lease_expiries = 2
cooldown_sec = 0

[health]
recover_sec = 3

[promotion]
window_sec = 600
min_samples = 5
max_p95_queue_wait_sec = 5
drill_max_age_sec = 600
"""

SILENT_LANE = r'''
# a lane that accepts every dispatch and never calls back (so its leases expire)
import json, os, time, threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
import sdnotify
class H(BaseHTTPRequestHandler):
    def do_GET(self):
        body = json.dumps({"lane": os.environ["LANECTL_LANE"], "missions": []}).encode()
        self.send_response(200); self.send_header("Content-Length", str(len(body))); self.end_headers()
        self.wfile.write(body)
    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.send_response(202); self.send_header("Content-Length", "2"); self.end_headers(); self.wfile.write(b"{}")
    def log_message(self, *a):
        pass
srv = ThreadingHTTPServer(("127.0.0.1", int(os.environ["LANECTL_PORT"])), H)
threading.Thread(target=srv.serve_forever, daemon=True).start()
n = sdnotify.SystemdNotifier(); n.notify("READY=1")
while True:
    n.notify("WATCHDOG=1"); time.sleep(0.5)
'''


def boot(sb, tmp: Path, extra: str = "", silent_alpha: bool = False) -> Fleet:  # type: ignore[no-untyped-def]
    cfg = copy_example(tmp)
    with open(cfg / "lanectl.toml", "a") as fh:
        fh.write(POLICY + extra)
    f = Fleet(sb, cfg)
    if silent_alpha:
        f.write_file("/var/lib/lanes-probe/silent.py", SILENT_LANE)
        text = (cfg / "lanes.d" / "alpha.toml").read_text()
        (cfg / "lanes.d" / "alpha.toml").write_text(
            f'exec = ["{PYTHON}", "/var/lib/lanes-probe/silent.py"]\n' + text)
    assert f.json("install")[0] == 0
    code, doc = f.json("up")
    assert code == 0, doc
    wait_for(lambda: sb.exec(["curl", "-sf", "http://127.0.0.1:8700/healthz"], check=False).returncode == 0, 20,
             what="the supervisor")
    wait_for(lambda: all(v["healthy"] for v in json.loads(sb.exec(["curl", "-s", "http://127.0.0.1:8700/healthz"], check=False)
                                                              .stdout)["lanes"].values()), 20, what="healthy lanes")
    return f


def rolled_back(f: Fleet, lane: str, trigger: str) -> dict:
    rows = wait_for(lambda: sql(f, "SELECT data FROM events WHERE kind='rollback' AND lane=?", lane), 30,
                    interval=0.2, what=f"a rollback of {lane}")
    data = json.loads(rows[0][0])
    assert data["trigger"] == trigger, data
    assert sql(f, "SELECT state FROM lanes WHERE name=?", lane)[0][0] in ("draining", "drained")
    snap = data["snapshot"]
    wait_for(lambda: f.sb.exec(["test", "-f", f"{snap}/meta.json"], check=False).returncode == 0, 30, what="the snapshot")
    assert f.sb.exec(["cat", f"{snap}/ledger-check.txt"], check=False).stdout.strip() == "ok"
    return data


def session_on(f: Fleet, session: str) -> str:
    return sql(f, "SELECT lane FROM sessions WHERE id=?", session)[0][0]


def test_failure_spike_rolls_back_to_the_fallback(fresh_sandbox, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    f = boot(fresh_sandbox, tmp_path)
    (s1,) = submit_many(f, [{"cls": "interactive", "session": "alpha:s1", "argv": ["/bin/true"]}])
    wait_terminal(f, [s1], 30)
    assert session_on(f, "alpha:s1") == "alpha"
    ids = submit_many(f, [{"cls": "interactive", "lane": "alpha", "argv": ["/bin/false"]} for _ in range(6)])
    data = rolled_back(f, "alpha", "failure_spike")
    assert data["fallback"] == "beta" and data["evidence"]["failure_rate"] >= 0.5
    assert data["moved"]["sessions"] == ["alpha:s1"] and session_on(f, "alpha:s1") == "beta"
    wait_terminal(f, ids, 30)
    (later,) = submit_many(f, [{"cls": "interactive", "lane": "alpha", "argv": ["/bin/true"]}])
    assert wait_terminal(f, [later], 30)[later] == "succeeded"
    assert sql(f, "SELECT lane FROM attempts WHERE mission=?", later) == [["beta"]]  # the work is on the fallback


def test_fallback_spike(fresh_sandbox, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    f = boot(fresh_sandbox, tmp_path)
    f.sb.exec(["systemctl", "stop", "lanectl-lane@alpha.service"], check=True)
    ids = submit_many(f, [{"cls": "interactive", "lane": "alpha", "argv": ["/bin/true"]} for _ in range(6)])
    wait_terminal(f, ids, 30)
    data = rolled_back(f, "alpha", "fallback_spike")
    assert data["evidence"]["fallback_rate"] >= 0.5


def test_interactive_starvation(fresh_sandbox, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    f = boot(fresh_sandbox, tmp_path)
    busy = submit_many(f, [{"cls": "deadline", "lane": "alpha", "argv": ["/bin/sh", "-c", "sleep 30"]}
                           for _ in range(4)])
    wait_for(lambda: sql(f, "SELECT count(*) FROM missions WHERE state='running' AND current_lane='alpha'")[0][0] == 4,
             20, what="alpha full")
    (starved,) = submit_many(f, [{"cls": "interactive", "lane": "alpha", "argv": ["/bin/true"]}])
    data = rolled_back(f, "alpha", "interactive_starvation")
    assert data["moved"]["missions"] >= 1  # the starved mission, pinned to alpha, moved to beta
    assert wait_terminal(f, [starved], 30)[starved] == "succeeded"
    assert sql(f, "SELECT lane FROM attempts WHERE mission=?", starved) == [["beta"]]
    for m in busy:
        f.lanectl("mission", "cancel", str(m))


def test_heartbeat_instability(fresh_sandbox, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    f = boot(fresh_sandbox, tmp_path, silent_alpha=True)
    ids = submit_many(f, [{"cls": "interactive", "lane": "alpha", "argv": ["/bin/true"]} for _ in range(3)])
    data = rolled_back(f, "alpha", "heartbeat_instability")
    assert data["evidence"]["lease_expiries"] >= 2
    st = wait_terminal(f, ids, 60)
    assert set(st.values()) <= {"succeeded", "dead"}


def test_restart_instability_and_the_last_healthy_lane_guard(fresh_sandbox, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    f = boot(fresh_sandbox, tmp_path)
    for _ in range(3):
        pid = f.main_pid("gamma")
        f.sb.exec(["kill", "-9", str(pid)], check=True)
        wait_for(lambda: f.main_pid("gamma") not in (0, pid), 15, what="gamma restarted")
    rolled_back(f, "gamma", "restart_instability")
    # beta is now the last healthy lane for background (gamma drained): tripping it must only alert
    for _ in range(3):
        pid = f.main_pid("beta")
        f.sb.exec(["kill", "-9", str(pid)], check=True)
        wait_for(lambda: f.main_pid("beta") not in (0, pid), 15, what="beta restarted")
    rows = wait_for(lambda: sql(f, "SELECT data FROM events WHERE kind='alert' AND lane='beta'"), 30,
                    what="an alert for beta")
    assert "background" in json.loads(rows[0][0])["classes"]
    assert sql(f, "SELECT count(*) FROM events WHERE kind='rollback' AND lane='beta'")[0][0] == 0
    assert sql(f, "SELECT coalesce((SELECT state FROM lanes WHERE name='beta'), 'active')")[0][0] in ("active", "degraded")


def test_promotion_needs_evidence_and_drills_are_recorded(fresh_sandbox, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    f = boot(fresh_sandbox, tmp_path)
    proc = f.lanectl("promote", "alpha", "--weight", "200", "--json")
    doc = json.loads(proc.stdout)
    assert proc.returncode == 8 and doc["errors"][0]["code"] == "promotion_rule"
    assert any("drill" in e["message"] for e in doc["errors"])
    assert sql(f, "SELECT count(*) FROM events WHERE kind='promote_refused' AND lane='alpha'")[0][0] == 1
    ids = submit_many(f, [{"cls": "interactive", "lane": "alpha", "argv": ["/bin/true"]} for _ in range(6)])
    wait_terminal(f, ids, 30)
    for kind in ("crash", "hang"):
        proc = f.lanectl("drill", "alpha", "--kind", kind, "--json")
        res = json.loads(proc.stdout)["data"]
        assert proc.returncode == 0 and res["passed"] and res["orphaned"] == 0, res
        assert res["detect_s"] <= res["limit_s"] and res["recover_s"] is not None
        wait_for(lambda: json.loads(f.sb.exec(["curl", "-s", "http://127.0.0.1:8700/healthz"], check=False).stdout)
                 ["lanes"]["alpha"]["healthy"], 20, what="alpha healthy after the drill")
    drills = [json.loads(r[0]) for r in sql(f, "SELECT data FROM events WHERE kind='drill' AND lane='alpha'")]
    assert [d["type"] for d in drills] == ["crash", "hang"]
    ids = submit_many(f, [{"cls": "interactive", "lane": "alpha", "argv": ["/bin/true"]} for _ in range(20)])
    wait_terminal(f, ids, 30)
    proc = f.lanectl("promote", "alpha", "--weight", "200", "--json")
    assert proc.returncode == 0, proc.stdout
    assert sql(f, "SELECT weight FROM lanes WHERE name='alpha'") == [[200]]
    assert json.loads(sql(f, "SELECT data FROM events WHERE kind='promote'")[0][0])["forced"] is False

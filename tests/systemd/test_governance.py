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
fallback_lost_rate = 0.5
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


def supervisor_health(f: Fleet) -> dict:
    return json.loads(f.sb.exec(["curl", "-s", "http://127.0.0.1:8700/healthz"], check=False).stdout or "{}")


def governed(f: Fleet, passes: int = 3) -> None:
    """Wait until the supervisor has run this many more policy passes (tick_sec = 1; rollback rules run in them)."""
    t0 = time.time()
    wait_for(lambda: supervisor_health(f).get("last_tick", 0) >= t0 + passes, passes + 20, interval=0.2,
             what=f"{passes} more supervisor passes")


def lane_state(f: Fleet, lane: str) -> str:
    return sql(f, "SELECT coalesce((SELECT state FROM lanes WHERE name=?), 'active')", lane)[0][0]


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
    # the operator undrains it: a fresh evidence window, the failures that drained it do not drain it again
    assert f.lanectl("undrain", "alpha", "--reason", "fixed").returncode == 0
    governed(f, passes=3)
    assert lane_state(f, "alpha") == "active"
    assert sql(f, "SELECT count(*) FROM events WHERE kind='rollback' AND lane='alpha'")[0][0] == 1


def test_fallback_spike_alerts_and_does_not_drain(fresh_sandbox, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """A lane whose pinned work goes to its fallback is away already (stopped, crashed, restarting): the policy
    routes around it. Draining it would only keep it away once it is back (found by attacking issue 16's fixes:
    one crash plus pinned traffic drained a healthy lane until an operator undrained it). It is an alert."""
    f = boot(fresh_sandbox, tmp_path)
    f.sb.exec(["systemctl", "stop", "lanectl-lane@alpha.service"], check=True)
    ids = submit_many(f, [{"cls": "interactive", "lane": "alpha", "argv": ["/bin/true"]} for _ in range(6)])
    wait_terminal(f, ids, 30)
    rows = wait_for(lambda: sql(f, "SELECT data FROM events WHERE kind='alert' AND lane='alpha'"), 30,
                    interval=0.2, what="an alert for alpha")
    data = json.loads(rows[0][0])
    assert data["trigger"] == "fallback_spike" and data["evidence"]["fallback_lost_rate"] >= 0.5, data
    f.sb.exec(["systemctl", "start", "lanectl-lane@alpha.service"], check=True)
    assert not sql(f, "SELECT 1 FROM events WHERE kind='rollback' AND lane='alpha'")
    assert sql(f, "SELECT state FROM lanes WHERE name='alpha'")[0][0] == "active"


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


def crash(f: Fleet, lane: str, times: int) -> None:
    for _ in range(times):
        pid = f.main_pid(lane)
        f.sb.exec(["kill", "-9", str(pid)], check=True)
        wait_for(lambda: f.main_pid(lane) not in (0, pid), 15, what=f"{lane} restarted")


def seen(f: Fleet, lane: str) -> None:
    """Wait until the supervisor has recorded the lane's current invocation."""
    current = f.show(f"lanectl-lane@{lane}.service", "InvocationID")["InvocationID"]
    wait_for(lambda: sql(f, "SELECT invocation FROM lanes WHERE name=?", lane) == [[current]], 30,
             what=f"the supervisor sees {lane}'s invocation {current}")


def test_restart_storm_degrades_and_the_last_healthy_lane_guard(fresh_sandbox, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    f = boot(fresh_sandbox, tmp_path)
    crash(f, "gamma", 3)  # restart.max_restarts = 3: degraded (not drained)
    wait_for(lambda: lane_state(f, "gamma") == "degraded", 30, what="gamma degraded")
    # (it would recover after recover_sec: the operator keeps it out) beta is now the last healthy lane for
    # background: its storm must only alert
    assert f.lanectl("drain", "gamma", "--reason", "keep it out").returncode == 0
    crash(f, "beta", 3)
    rows = wait_for(lambda: sql(f, "SELECT data FROM events WHERE kind='alert' AND lane='beta'"), 30,
                    what="an alert for beta")
    data = json.loads(rows[0][0])
    assert "background" in data["classes"] and data["trigger"] == "restart_instability"
    assert sql(f, "SELECT count(*) FROM events WHERE kind='rollback'")[0][0] == 0
    assert lane_state(f, "beta") == "active"


def test_a_crash_looping_lane_degrades_and_returns_to_service_by_itself(fresh_sandbox, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Issue 16 item 5: the documented outcome (degraded, then active again without an operator) happens; the
    start limit does not stop the lane first, no rollback drains it, and its own pinned traffic to its fallback
    while degraded is no fallback_spike."""
    f = boot(fresh_sandbox, tmp_path)
    crash(f, "alpha", 3)
    rows = wait_for(lambda: sql(f, "SELECT data FROM events WHERE kind='lane_state' AND lane='alpha' "
                                   "AND json_extract(data, '$.to')='degraded'"), 30, what="alpha degraded")
    assert "restart_instability" in json.loads(rows[0][0])["reason"]
    # while it is degraded its pinned work runs on its fallback
    ids = submit_many(f, [{"cls": "interactive", "lane": "alpha", "argv": ["/bin/true"]} for _ in range(8)])
    assert set(wait_terminal(f, ids, 30).values()) == {"succeeded"}
    on_beta = sql(f, "SELECT count(*) FROM attempts WHERE lane='beta' AND mission IN (%s)" % ",".join(map(str, ids)))
    assert on_beta[0][0] >= 5  # at least min_samples meant for alpha went to beta
    # it stopped crashing: healthy for recover_sec (3 s) and it is active again, by itself
    wait_for(lambda: lane_state(f, "alpha") == "active", 60, interval=0.2, what="alpha back in service")
    assert f.show("lanectl-lane@alpha.service", "ActiveState")["ActiveState"] == "active"
    governed(f, passes=3)
    assert lane_state(f, "alpha") == "active"
    assert sql(f, "SELECT count(*) FROM events WHERE kind IN ('rollback', 'drain') AND lane='alpha'")[0][0] == 0
    (later,) = submit_many(f, [{"cls": "interactive", "lane": "alpha", "argv": ["/bin/true"]}])
    assert wait_terminal(f, [later], 30)[later] == "succeeded"
    assert sql(f, "SELECT lane FROM attempts WHERE mission=?", later) == [["alpha"]]


def test_operator_restarts_and_applies_are_not_instability(fresh_sandbox, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Issue 16 item 9: two real crashes plus two `lanectl restart` and one `lanectl apply` of the same lane
    neither degrade it, nor alert, nor roll it back; the ledger records only systemd's own restarts."""
    f = boot(fresh_sandbox, tmp_path)
    for _ in range(2):
        crash(f, "gamma", 1)
        seen(f, "gamma")
    for _ in range(2):
        pid = f.main_pid("gamma")
        assert f.lanectl("restart", "gamma").returncode == 0
        wait_for(lambda: f.main_pid("gamma") not in (0, pid), 15, what="gamma restarted by the operator")
        seen(f, "gamma")
    lane_file = tmp_path / "lanes.d" / "gamma.toml"
    lane_file.write_text(lane_file.read_text().replace('description = "batch runtime"',
                                                       'description = "batch runtime, applied"'))
    proc = f.lanectl("apply", "--reason", "test", "--json")
    assert proc.returncode == 0 and json.loads(proc.stdout)["data"]["restarted"] == ["gamma"], proc.stdout
    seen(f, "gamma")
    rows = [json.loads(r[0]) for r in sql(f, "SELECT data FROM events WHERE kind='lane_invocation' AND lane='gamma'")]
    assert [r["restarts"] for r in rows] == [1, 1, 0, 0, 0], rows
    governed(f, passes=3)
    assert lane_state(f, "gamma") == "active"
    assert sql(f, "SELECT kind, data FROM events WHERE kind IN ('rollback', 'alert') OR (kind='lane_state' AND "
                  "json_extract(data, '$.to')='degraded')") == []


def test_an_always_failing_burst_drains_at_most_one_lane(fresh_sandbox, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Issue 16 item 4: 36 missions that always fail, spread over the three lanes, are the work's fault: an
    alert, at most one lane drained (before the others had evidence), and an undrain sticks."""
    f = boot(fresh_sandbox, tmp_path)
    ids = submit_many(f, [{"cls": "deadline", "argv": ["/bin/false"]} for _ in range(36)])
    st = wait_terminal(f, ids, 60)
    assert set(st.values()) == {"failed"}
    ran_on = {r[0] for r in sql(f, "SELECT DISTINCT lane FROM attempts")}
    assert len(ran_on) >= 2, ran_on  # the burst was spread
    rows = wait_for(lambda: sql(f, "SELECT lane, data FROM events WHERE kind='alert'"), 30, what="an alert")
    assert any(json.loads(d)["trigger"] == "failure_spike" for _, d in rows), rows
    governed(f, passes=3)
    drained = [r[0] for r in sql(f, "SELECT lane FROM events WHERE kind='rollback'")]
    assert len(drained) <= 1, drained
    for lane in drained:
        assert f.lanectl("undrain", lane, "--reason", "it was the work").returncode == 0
    governed(f, passes=3)
    assert sql(f, "SELECT count(*) FROM events WHERE kind='rollback'")[0][0] == len(drained)
    assert all(lane_state(f, n) == "active" for n in ("alpha", "beta", "gamma"))


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

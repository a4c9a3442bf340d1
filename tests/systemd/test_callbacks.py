"""Issue 10 under a real systemd, with real lane users: who may send callbacks, what a mission can reach of its
runtime, what a flood of refused callbacks costs the ledger, and slow clients (docs/reliability.md, "Security
(issue 10)"). Every attack runs as a mission on lane alpha, as lane-alpha, inside alpha's unit."""
from __future__ import annotations

import json
import re
import time
from typing import Any

import pytest

from lanectl.protocol import MAX_CONNECTIONS, REQUEST_DEADLINE_S
from lanectl.states import CLASSES
from lanectl.supervisor import REJECTED_BURST, REJECTED_PER_S, SOCKET_PER_PEER
from tests.systemd.lanehelpers import (PYTHON, Fleet, copy_example, sql, states, submit_many, wait_for,
                                       wait_terminal)

pytestmark = pytest.mark.systemd
SOCK = "/run/lanectl/callbacks.sock"
SUP = "lanectl-supervisor.service"


@pytest.fixture(scope="module")
def fleet(sandbox, tmp_path_factory):  # type: ignore[no-untyped-def]
    cfg = copy_example(tmp_path_factory.mktemp("cb"))
    with open(cfg / "lanectl.toml", "a") as fh:  # the faults here are on purpose
        fh.write("\n[rollback]\nenabled = false\n")
    f = Fleet(sandbox, cfg)
    assert f.json("install")[0] == 0
    assert f.json("up")[0] == 0
    wait_for(lambda: all_up(f), 60, interval=0.5, what="all lanes healthy")
    yield f
    f.lanectl("down")


def health(f: Fleet) -> dict[str, Any]:
    proc = f.sb.exec(["curl", "-s", "http://127.0.0.1:8700/healthz"], check=False)
    return json.loads(proc.stdout) if proc.returncode == 0 and proc.stdout else {}


def all_up(f: Fleet) -> bool:
    h = health(f)
    return bool(h) and all(lane["healthy"] for lane in h.get("lanes", {}).values())


def mission(f: Fleet, lane: str, script: str, *args: str) -> int:
    """A Python mission on ``lane`` (it runs as the lane's user, inside the lane's unit)."""
    cls = "deadline" if lane == "alpha" else "background"
    (mid,) = submit_many(f, [{"cls": cls, "lane": lane, "argv": [PYTHON, "-c", script, *args]}])
    return mid


def output(f: Fleet, lane: str, mid: int) -> str:
    """What a mission printed so far (its output file in the lane's workspace)."""
    return f.sb.exec(["cat", f"/var/lib/lanes/{lane}/.lanectl/out/{mid}-1.log"], check=False).stdout


def last_json(text: str) -> dict[str, Any] | None:
    for line in reversed(text.splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    return None


def running(f: Fleet, *ids: int) -> bool:
    st = states(f, list(ids))
    return all(st.get(i) == "running" for i in ids)


def ended(f: Fleet, lane: str, mid: int) -> bool:
    log = f.sb.exec(["cat", f"/var/lib/lanes/{lane}/.lanectl/executions.log"], check=False).stdout
    return any(json.loads(x).get("mission") == mid and json.loads(x).get("event") == "end"
               for x in log.splitlines() if x.strip())


# ---------------------------------------------------------------------------------------------------- squatter
SQUAT = r'''
import errno, json, os, socket, time
out = {"bound": False, "received": [], "unix": []}
s = None
end = time.monotonic() + 40
while time.monotonic() < end:  # take the supervisor's TCP port the moment it is free
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        s.bind(("127.0.0.1", 8700))
        s.listen(64)
        break
    except OSError as e:
        s.close()
        s = None
        if e.errno in (errno.EPERM, errno.EACCES):  # SocketBindDeny= enforced: the better outcome
            out["bind_error"] = e.strerror
            break
        time.sleep(0.01)
for path in ("/run/lanectl/callbacks.sock", "/run/lanectl/other.sock"):  # stand in for the callback socket
    u = socket.socket(socket.AF_UNIX)
    try:
        try:
            os.unlink(path)
            out["unix"].append("unlinked " + path)
        except FileNotFoundError:
            pass
        u.bind(path)
        out["unix"].append("bound " + path)
    except OSError as e:
        out["unix"].append(f"{path}: {e.strerror}")
    finally:
        u.close()
if s is not None:
    out["bound"] = True
    print("bound", flush=True)
    s.settimeout(0.2)
    hold = time.monotonic() + 8
    while time.monotonic() < hold:  # answer 200 to whatever comes, keeping what it sent
        try:
            c, _ = s.accept()
        except OSError:
            continue
        c.settimeout(1)
        try:
            out["received"].append(c.recv(65536).decode("latin-1"))
            c.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 11\r\nConnection: close\r\n\r\n{\"ok\":true}")
        except OSError:
            pass
        c.close()
    s.close()
print(json.dumps(out), flush=True)
'''


def test_a_squatter_on_the_supervisor_address_gets_nothing_of_another_lane(fleet: Fleet) -> None:
    """Issue 10 finding 1: a mission on alpha squats the supervisor's TCP port and tries to replace the callback
    socket while the supervisor restarts; beta finishes a mission meanwhile. The squatter gets no callback and no
    token, changes nothing of beta, and beta's real outcome is recorded."""
    wait_for(lambda: all_up(fleet), 60, interval=0.5, what="all lanes healthy")
    squat = mission(fleet, "alpha", SQUAT)
    (real,) = submit_many(fleet, [{"cls": "background", "lane": "beta",
                                   "argv": ["/bin/sh", "-c", "sleep 4; echo beta-real-outcome"]}])
    wait_for(lambda: running(fleet, squat, real), 30, what="both missions to run")
    fleet.sb.exec(["systemctl", "stop", SUP], check=True)
    try:
        wait_for(lambda: "bound" in output(fleet, "alpha", squat) or last_json(output(fleet, "alpha", squat)), 30,
                 what="the squatter to take the port (or be refused it)")
        # beta's mission ends while the supervisor is down: its runtime keeps the outcome and retries
        wait_for(lambda: ended(fleet, "beta", real), 30, what="beta's mission to end")
    finally:
        fleet.sb.exec(["systemctl", "start", "--no-block", SUP], check=True)  # it binds once the squatter lets go
    st = wait_terminal(fleet, [squat, real], 90)
    # the squatted TCP port did not keep the supervisor from starting: it took callbacks on its socket at once
    assert fleet.show(SUP, "NRestarts")["NRestarts"] == "0"
    report = last_json(output(fleet, "alpha", squat))
    assert report is not None, output(fleet, "alpha", squat)
    assert st[real] == "succeeded", st
    result = json.loads(sql(fleet, "SELECT result FROM missions WHERE id = ?", real)[0][0])
    assert "beta-real-outcome" in (result.get("output_tail") or ""), result
    # the squatter received no callback at all, so no token of anybody's
    assert not any("callbacks" in r or "token" in r for r in report["received"]), report
    # and could not put a socket of its own where lanes send callbacks
    assert not any(x.startswith(("bound", "unlinked")) for x in report["unix"]), report
    kinds = [r[0] for r in sql(fleet, "SELECT kind FROM events WHERE mission = ? ORDER BY id", real)]
    assert "callback_rejected" not in kinds and kinds.count("succeeded") == 1, kinds
    # beta's lane row says nothing of alpha either
    assert sql(fleet, "SELECT count(*) FROM attempts WHERE mission = ? AND lane != 'beta'", real)[0][0] == 0


# ---------------------------------------------------------------------------------------------------- lane port
LANE_SQUAT = r'''
import json, socket, sys, time
port, lane = int(sys.argv[1]), sys.argv[2]
out = {"bound": None, "requests": []}
s = None
end = time.monotonic() + 40
while time.monotonic() < end:  # take the other lane's port the moment it is free
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        s.bind(("127.0.0.1", port))
        s.listen(64)
        break
    except OSError:
        s.close()
        s = None
        time.sleep(0.003)
if s is not None:
    out["bound"] = time.time()
    print("bound", flush=True)
    s.settimeout(0.2)
    hold = time.monotonic() + 12
    while time.monotonic() < hold:  # pose as the lane: healthy, accepting every dispatch
        try:
            c, _ = s.accept()
        except OSError:
            continue
        c.settimeout(1)
        try:
            head = c.recv(65536).decode("latin-1")
            out["requests"].append(head.split("\r\n", 1)[0] + (" AUTH" if "uthorization" in head else ""))
            body = json.dumps({"lane": lane, "pid": 1, "invocation": "x", "in_flight": 0, "capacity": 4,
                               "missions": [], "reporting": []}).encode()
            code = b"200 OK" if head.startswith("GET") else b"202 Accepted"
            c.sendall(b"HTTP/1.1 " + code + b"\r\nContent-Type: application/json\r\nContent-Length: "
                      + str(len(body)).encode() + b"\r\nConnection: close\r\n\r\n" + body)
        except OSError:
            pass
        c.close()
    s.close()
print(json.dumps(out), flush=True)
'''


def test_a_mission_squatting_another_lanes_port_while_it_restarts_gets_no_dispatch(fleet: Fleet) -> None:
    """Found by the issue-10 attack: beta's runtime closed its port as soon as it began to stop and then waited
    for its missions; a mission on alpha bound the port, answered /healthz as beta and was sent beta's dispatches
    with beta's key. Now the runtime holds its port until it exits (the supervisor sees the exit at once) and the
    supervisor sends nothing to a lane whose port another uid holds."""
    wait_for(lambda: all_up(fleet), 60, interval=0.5, what="all lanes healthy")
    squat = mission(fleet, "alpha", LANE_SQUAT, "8702", "beta")
    (slow,) = submit_many(fleet, [{"cls": "background", "lane": "beta",
                                   "argv": ["/bin/sh", "-c", 'trap "sleep 4; exit 0" TERM; sleep 300 & wait']}])
    wait_for(lambda: running(fleet, squat, slow), 30, what="the squatter and beta's slow-to-stop mission to run")
    fleet.sb.exec(["systemctl", "restart", "--no-block", "lanectl-lane@beta.service"], check=True)
    try:
        pinned = []
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:  # work for beta keeps coming while it restarts
            pinned += submit_many(fleet, [{"cls": "background", "lane": "beta", "argv": ["/bin/true"]}])
            time.sleep(0.5)
        st = wait_terminal(fleet, [squat], 60)
        report = last_json(output(fleet, "alpha", squat))
        assert st[squat] == "succeeded" and report is not None, output(fleet, "alpha", squat)
        assert not [r for r in report["requests"] if r.startswith("POST") or r.endswith("AUTH")], report
    finally:  # beta could not bind while the squatter held its port: put it back for the next tests
        fleet.sb.exec(["systemctl", "reset-failed", "lanectl-lane@beta.service"], check=False)
        fleet.sb.exec(["systemctl", "restart", "lanectl-lane@beta.service"], check=False)
        wait_for(lambda: all_up(fleet), 90, interval=0.5, what="all lanes healthy again")
    wait_terminal(fleet, pinned, 120)  # nothing was lost to the squatter: beta (or its fallback) ran them all
    assert all(s == "succeeded" for s in states(fleet, pinned).values()), states(fleet, pinned)


# ---------------------------------------------------------------------------------------------------- /proc
PROC = r'''
import json, os, sys
ppid = int(sys.argv[1])  # its own parent is a namespace wrapper (issue 17): it is told the runtime's pid
out = {"ppid": ppid, "key_in_env": any(k.startswith("LANECTL_DISPATCH") for k in os.environ)}
for name in ("environ", "mem", "maps"):
    try:
        with open(f"/proc/{ppid}/{name}", "rb") as fh:
            fh.read(4096)
        out[name] = "read"
    except OSError as e:
        out[name] = e.strerror
print(json.dumps(out), flush=True)
'''


def test_a_mission_cannot_read_its_runtime_key_or_tokens(fleet: Fleet) -> None:
    """Issue 10 finding 3: the runtime is not dumpable, so /proc/<runtime>/environ and mem are root's; and the key
    is gone from its initial environment block (what environ shows even to root)."""
    wait_for(lambda: all_up(fleet), 60, interval=0.5, what="all lanes healthy")
    runtime = fleet.main_pid("alpha")
    mid = mission(fleet, "alpha", PROC, str(runtime))
    assert wait_terminal(fleet, [mid], 60)[mid] == "succeeded"
    out = last_json(output(fleet, "alpha", mid))
    assert out is not None
    assert out["ppid"] == runtime == fleet.main_pid("alpha"), out  # it looked at the runtime itself
    # root's now: denied, or (ProtectProc=invisible hides what the caller may not ptrace) not even there
    unreachable = ("Permission denied", "No such file or directory")
    assert all(out[n] in unreachable for n in ("environ", "mem", "maps")) and not out["key_in_env"], out
    key = fleet.read_file("/var/lib/lanectl/keys/alpha.env").strip().split("=", 1)[1]
    environ = fleet.sb.exec(["cat", f"/proc/{fleet.main_pid('alpha')}/environ"], check=True).stdout
    assert "LANECTL_LANE=alpha" in environ and key not in environ


# ---------------------------------------------------------------------------------------------------- flood
FLOOD = r'''
import json, sys, time, urllib.request, urllib.error
from lanectl.protocol import UnixHTTPConnection
spec = json.loads(sys.argv[1])
counts = {}
end = time.monotonic() + spec["seconds"]
i = 0
while time.monotonic() < end:
    doc = spec["docs"][i % len(spec["docs"])]
    i += 1
    c = UnixHTTPConnection("/run/lanectl/callbacks.sock", 5)
    try:
        c.request("POST", "/callbacks", body=json.dumps(doc).encode(), headers={"Content-Type": "application/json"})
        status = str(c.getresponse().status)
    except OSError as e:
        status = type(e).__name__
    finally:
        c.close()
    key = doc["lane"] + ":" + status
    counts[key] = counts.get(key, 0) + 1
req = urllib.request.Request("http://127.0.0.1:8700/callbacks", data=json.dumps(spec["docs"][0]).encode(),
                             method="POST", headers={"Content-Type": "application/json"})
try:
    urllib.request.urlopen(req, timeout=5)
    counts["tcp"] = 200
except urllib.error.HTTPError as e:
    counts["tcp"] = e.code
print(json.dumps(counts), flush=True)
'''
FLOOD_S = 15
WAL_BOUND = 4 << 20
"""docs/reliability.md: after a flood of refused callbacks the WAL stays under 4 MiB."""


def metric(text: str, name: str, **labels: str) -> float:
    sel = ",".join(f'{k}="{v}"' for k, v in labels.items())
    m = re.search(rf"^{re.escape(name)}\{{{re.escape(sel)}\}} (\S+)$", text, re.M)
    assert m, f"{name}{{{sel}}} not in /metrics"
    return float(m.group(1))


def test_a_callback_flood_costs_a_bounded_ledger_and_names_no_other_lane(fleet: Fleet) -> None:
    """Issue 10 findings 1 and 4: a mission on alpha floods the socket with wrong-token callbacks of its own lane
    and with callbacks that name beta's running mission. Beta's are refused (403) with no ledger write; alpha's
    are refused (409) and recorded at most REJECTED_BURST + REJECTED_PER_S per second; the rest are counted in
    /metrics; the WAL stays within its bound; beta's mission is untouched and ends with its real outcome."""
    wait_for(lambda: all_up(fleet), 60, interval=0.5, what="all lanes healthy")
    (victim,) = submit_many(fleet, [{"cls": "background", "lane": "beta",
                                     "argv": ["/bin/sh", "-c", f"sleep {FLOOD_S + 5}; echo beta-real"]}])
    wait_for(lambda: running(fleet, victim), 30, what="beta's mission to run")
    first = sql(fleet, "SELECT coalesce(max(id), 0) FROM events")[0][0]
    docs = [{"mission": victim, "attempt": 1, "lane": "beta", "token": "x" * 43, "event": e}
            for e in ("succeeded", "failed", "started")]
    docs += [{"mission": 10**9, "attempt": 1, "lane": "alpha", "token": "y" * 43, "event": "succeeded"}]
    flood = mission(fleet, "alpha", FLOOD, json.dumps({"seconds": FLOOD_S, "docs": docs}))
    assert wait_terminal(fleet, [flood], FLOOD_S + 60)[flood] == "succeeded"
    counts = last_json(output(fleet, "alpha", flood))
    assert counts is not None
    # (503: a connection beyond the per-uid cap, or the supervisor busy: the flood is told to retry)
    assert set(counts) <= {"beta:403", "beta:503", "alpha:409", "alpha:503", "tcp"} and counts["tcp"] == 403, counts
    assert counts["beta:403"] > 0, counts
    assert counts["alpha:409"] > REJECTED_BURST + REJECTED_PER_S * FLOOD_S, counts  # the flood did exceed the bound
    rows = sql(fleet, "SELECT kind, lane, mission, at FROM events WHERE id > ? AND kind = 'callback_rejected'", first)
    assert not [r for r in rows if r[1] == "beta" or r[2] == victim], rows
    spread = max(r[3] for r in rows) - min(r[3] for r in rows) if rows else 0.0
    assert len(rows) <= REJECTED_BURST + REJECTED_PER_S * spread + 1, (len(rows), spread)
    text = fleet.sb.exec(["curl", "-sf", "http://127.0.0.1:8700/metrics"], check=True).stdout
    assert metric(text, "lanectl_callbacks_refused_total", reason="foreign_lane") >= counts["beta:403"]
    assert metric(text, "lanectl_callbacks_refused_total", reason="unrecorded") >= counts["alpha:409"] - len(rows)
    assert metric(text, "lanectl_callbacks_refused_total", reason="tcp") >= 1
    wal = fleet.sb.exec(["stat", "-c", "%s", fleet.ledger + "-wal"], check=False)
    assert wal.returncode != 0 or int(wal.stdout) <= WAL_BOUND, wal.stdout
    assert wait_terminal(fleet, [victim], 60)[victim] == "succeeded"
    result = json.loads(sql(fleet, "SELECT result FROM missions WHERE id = ?", victim)[0][0])
    assert "beta-real" in result["output_tail"]


# ---------------------------------------------------------------------------------------------------- slow clients
SLOW = r'''
import json, select, socket, sys, time
n_tcp, n_unix = int(sys.argv[1]), int(sys.argv[2])
conns = [("tcp", socket.create_connection(("127.0.0.1", 8700), timeout=5)) for _ in range(n_tcp)]
for _ in range(n_unix):
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(5)
    s.connect("/run/lanectl/callbacks.sock")
    conns.append(("unix", s))
open("/run/lanectl-test-slow.started", "w").close()
head = b"POST /callbacks HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
closed = {}
t0 = time.monotonic()
# an answer the server gave at once (503: full) is read before a byte is sent (a send would reset the connection)
while time.monotonic() - t0 < 2.0:
    waiting = {s: k for k, (_, s) in enumerate(conns) if k not in closed}
    ready, _, _ = select.select(list(waiting), [], [], max(0.0, 2.0 - (time.monotonic() - t0)))
    for s in ready:
        k = waiting[s]
        try:
            closed[k] = [conns[k][0], round(time.monotonic() - t0, 1), s.recv(4096)[:12].decode("latin-1")]
        except OSError as e:
            closed[k] = [conns[k][0], round(time.monotonic() - t0, 1), type(e).__name__]
i = 0
while len(closed) < len(conns) and time.monotonic() - t0 < 60:  # one header byte per connection per second
    for k, (kind, s) in enumerate(conns):
        if k in closed:
            continue
        try:
            s.send(head[i % len(head):i % len(head) + 1])
            s.setblocking(False)
            try:
                data = s.recv(4096)
                closed[k] = [kind, round(time.monotonic() - t0, 1), data[:12].decode("latin-1")]
            except BlockingIOError:
                pass
            s.settimeout(5)
        except OSError as e:
            closed[k] = [kind, round(time.monotonic() - t0, 1), type(e).__name__]
    i += 1
    time.sleep(1)
json.dump({"n": len(conns), "closed": closed}, open("/run/lanectl-test-slow.json", "w"))
'''


def test_slow_clients_do_not_stop_dispatching(fleet: Fleet) -> None:
    """Issue 10 finding 7: more slow clients than the supervisor takes, on TCP and on the callback socket, each
    dripping one header byte a second. Missions keep being dispatched and reported meanwhile; every slow
    connection is either turned away at once (503: the server is full) or cut at the request deadline."""
    wait_for(lambda: all_up(fleet), 60, interval=0.5, what="all lanes healthy")
    n_tcp, n_unix = MAX_CONNECTIONS + 16, SOCKET_PER_PEER + 4
    fleet.sb.exec(["rm", "-f", "/run/lanectl-test-slow.started", "/run/lanectl-test-slow.json"], check=True)
    fleet.sb.exec(["systemd-run", "--unit=lanectl-test-slow", "--collect", PYTHON, "-c", SLOW, str(n_tcp),
                   str(n_unix)], check=True)
    try:
        wait_for(lambda: fleet.sb.exec(["test", "-e", "/run/lanectl-test-slow.started"], check=False).returncode == 0,
                 30, what="the slow clients to connect")
        ids = submit_many(fleet, [{"cls": c, "argv": ["/bin/true"]}
                                  for c in CLASSES * 3])
        st = wait_terminal(fleet, ids, 60)
        assert set(st.values()) == {"succeeded"}, st
        done = wait_for(lambda: fleet.sb.exec(["cat", "/run/lanectl-test-slow.json"], check=False).stdout, 90,
                        interval=0.5, what="the slow clients to be cut off")
    finally:
        fleet.sb.exec(["systemctl", "stop", "lanectl-test-slow.service"], check=False)
    report = json.loads(done)
    assert len(report["closed"]) == report["n"] == n_tcp + n_unix, report  # the server closed every one of them
    busy = [c for c in report["closed"].values() if c[2].startswith("HTTP/1.1 503")]
    cut = [c for c in report["closed"].values() if not c[2].startswith("HTTP/1.1 503")]
    assert len(busy) >= (n_tcp - MAX_CONNECTIONS) + (n_unix - SOCKET_PER_PEER), report
    assert cut and max(c[1] for c in cut) >= REQUEST_DEADLINE_S - 1, report  # held until the deadline, no longer
    text = fleet.sb.exec(["curl", "-sf", "http://127.0.0.1:8700/metrics"], check=True).stdout
    assert metric(text, "lanectl_connections_refused_total", server="tcp") >= 1
    assert metric(text, "lanectl_connections_refused_total", server="socket") >= 1

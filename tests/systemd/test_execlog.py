"""Issue 10, findings 2 and 3, attacked under a real systemd: a mission plants something in its lane's execution log
(a FIFO, a link to /dev/zero, a linked .lanectl directory, forged end lines) and kills its runtime. The supervisor
keeps ticking (same main PID, NRestarts unchanged, no watchdog kill), nothing forged is applied, and the lane's
missions are re-queued and run again."""
from __future__ import annotations

import json
import time

import pytest

from tests.systemd.lanehelpers import PYTHON, Fleet, copy_example, sql, submit_many, wait_for, wait_terminal

pytestmark = pytest.mark.systemd
SUPERVISOR = "lanectl-supervisor.service"
LANES = ("alpha", "beta", "gamma")
# on its first attempt only: the re-run must succeed (wherever it runs) for the test to see the re-queue through
FIRST = 'if [ "$LANECTL_ATTEMPT" = 1 ]; then {}; fi; echo ran'
# an attacker waits until the runtime logged its start, so that the runtime has nothing to write (and move aside)
# between the attack and its kill
LOGGED = ('until grep -qs "\\"event\\":\\"start\\".*\\"mission\\":$LANECTL_MISSION," .lanectl/executions.log; '
          'do sleep 0.05; done')


@pytest.fixture(scope="module")
def fleet(sandbox, tmp_path_factory):  # type: ignore[no-untyped-def]
    cfg = copy_example(tmp_path_factory.mktemp("execlog"))
    with open(cfg / "lanectl.toml", "a") as fh:  # the kills here are on purpose; rollback has its own tests
        fh.write("\n[rollback]\nenabled = false\n")
    # Each attack tampers with the log, then kills its runtime (kill -9 $PPID) so that the supervisor reads it. The
    # reference runtime's missions cannot reach it (own PID namespace, issue 17): these lanes run it with mission
    # namespaces off, standing for a runtime that a mission can kill; the log defences are what is tested here.
    for lane in LANES:
        path = cfg / "lanes.d" / f"{lane}.toml"
        path.write_text(f'exec = ["/usr/bin/env", "LANECTL_MISSION_NAMESPACES=0", "{PYTHON}", "-m", '
                        f'"lanectl.runtime"]\n' + path.read_text())
    f = Fleet(sandbox, cfg)
    assert f.json("install")[0] == 0
    code, doc = f.json("up")
    assert code == 0, doc
    yield f
    f.lanectl("down")
    # nothing planted may outlive this module: other modules of the session read these logs with cat
    for lane in LANES:
        sandbox.exec(["sh", "-c", f"cd /var/lib/lanes/{lane} && rm -rf trap && {{ [ -L .lanectl ] && rm -f .lanectl; "
                                  f"[ -f .lanectl/executions.log ] || rm -rf .lanectl/executions.log; }}; true"],
                     check=False)


def supervisor(f: Fleet) -> tuple[int, int]:
    p = f.show(SUPERVISOR, "MainPID", "NRestarts")
    return int(p["MainPID"]), int(p["NRestarts"])


def supervisor_health(f: Fleet) -> dict:
    proc = f.sb.exec(["curl", "-s", "--max-time", "2", "http://127.0.0.1:8700/healthz"], check=False)
    try:
        return json.loads(proc.stdout) if proc.returncode == 0 else {}
    except ValueError:
        return {}


def all_up(f: Fleet) -> bool:
    h = supervisor_health(f)
    return bool(h) and all(l["healthy"] and l["state"] == "active" for l in h.get("lanes", {}).values())


def lane_ready(f: Fleet, lane: str) -> bool:
    """The ledger's view, which dispatch reads (the supervisor's /healthz summary may be a second old)."""
    return sql(f, "SELECT healthy, state FROM lanes WHERE name = ?", lane) == [[1, "active"]]


def journal_since(f: Fleet, since: float) -> str:
    return f.sb.exec(["journalctl", "--no-pager", "-o", "cat", "-u", SUPERVISOR, "--since", f"@{since:.0f}"],
                     check=False).stdout


def running(f: Fleet, ids: list[int], lane: str) -> bool:
    rows = sql(f, f"SELECT state, current_lane FROM missions WHERE id IN ({','.join('?' * len(ids))})", *ids)
    return len(rows) == len(ids) and all(r == ["running", lane] for r in rows)


def first_lane(f: Fleet, mission: int) -> str:
    return sql(f, "SELECT lane FROM attempts WHERE mission = ? AND n = 1", mission)[0][0]


def attack(f: Fleet, lane: str, argv: list[str], bystanders: int = 1) -> tuple[list[int], int]:
    """Bystander missions running on ``lane``, then a mission that attacks it; returns (bystanders, attacker)
    once all are over, having checked that the supervisor kept running and re-queued the lane's missions."""
    wait_for(lambda: all_up(f) and lane_ready(f, lane), 90, interval=0.5, what="all lanes healthy")
    before = supervisor(f)
    since = time.time() - 1
    calm = submit_many(f, [{"cls": "deadline", "lane": lane, "argv": ["/bin/sh", "-c", FIRST.format("sleep 60")]}
                           for _ in range(bystanders)])
    wait_for(lambda: running(f, calm, lane), 30, what=f"the bystanders running on {lane}")
    (bad,) = submit_many(f, [{"cls": "deadline", "lane": lane, "argv": argv}])
    st = wait_terminal(f, calm + [bad], 120)
    assert first_lane(f, bad) == lane
    assert supervisor(f) == before, "the supervisor was restarted"
    text = journal_since(f, since)
    assert "Watchdog timeout" not in text, text[-2000:]
    assert set(st.values()) == {"succeeded"}, st
    for m in calm + [bad]:
        rows = sql(f, "SELECT attempts FROM missions WHERE id = ?", m)
        assert rows[0][0] >= 2, f"mission {m} did not run again"
        requeued = sql(f, "SELECT count(*) FROM events WHERE mission = ? AND kind = 'requeued' AND lane = ? "
                          "AND attempt = 1", m, lane)[0][0]
        assert requeued == 1, f"mission {m} was not re-queued from {lane}"
    # and it still dispatches: a fresh mission runs on the lane, once it is back
    wait_for(lambda: lane_ready(f, lane), 90, interval=0.2, what=f"{lane} back in the ledger's view")
    (fresh,) = submit_many(f, [{"cls": "deadline", "lane": lane, "argv": ["/bin/true"]}])
    assert wait_terminal(f, [fresh], 60)[fresh] == "succeeded"
    assert first_lane(f, fresh) == lane, sql(f, "SELECT at, kind, lane, data FROM events WHERE at > ? AND "
                                                 "(mission = ? OR mission IS NULL)", since, fresh)
    assert supervisor(f) == before
    return calm, bad


def test_a_fifo_for_a_log_does_not_stall_the_supervisor(fleet: Fleet) -> None:
    since = time.time() - 1
    plant = f"{LOGGED}; mkfifo .lanectl/f && mv -f .lanectl/f .lanectl/executions.log && kill -9 $PPID; sleep 30"
    attack(fleet, "alpha", ["/bin/sh", "-c", FIRST.format(plant)])
    assert "execution log not read: .lanectl/executions.log is not a regular file" in journal_since(fleet, since)
    # the runtime moved the FIFO aside when it next logged, and logs again
    kinds = fleet.sb.exec(["sh", "-c", "cd /var/lib/lanes/alpha/.lanectl && stat -c '%F' executions.log "
                                       "executions.log.refused-*"], check=True).stdout.split("\n")
    assert kinds[0] == "regular file" and "fifo" in kinds[1]


def test_a_link_to_dev_zero_is_not_read(fleet: Fleet) -> None:
    since = time.time() - 1
    plant = f"{LOGGED}; ln -sf /dev/zero .lanectl/executions.log && kill -9 $PPID; sleep 30"
    attack(fleet, "beta", ["/bin/sh", "-c", FIRST.format(plant)])
    assert "execution log not read: .lanectl/executions.log is a symbolic link" in journal_since(fleet, since)


def test_a_linked_state_directory_is_not_followed(fleet: Fleet) -> None:
    since = time.time() - 1
    # .lanectl -> a directory whose executions.log is a FIFO: whoever follows the link blocks
    plant = (f"{LOGGED}; mkdir -p trap && rm -f trap/executions.log && mkfifo trap/executions.log "
             "&& mv .lanectl .lanectl.mine && ln -s /var/lib/lanes/gamma/trap .lanectl && kill -9 $PPID; sleep 30")
    attack(fleet, "gamma", ["/bin/sh", "-c", FIRST.format(plant)])
    assert "execution log not read: .lanectl is a symbolic link" in journal_since(fleet, since)
    assert fleet.sb.exec(["test", "-L", "/var/lib/lanes/gamma/.lanectl"], check=False).returncode != 0


FORGE = r'''
import json, os, signal, sys, time
if os.environ["LANECTL_ATTEMPT"] != "1":
    sys.exit(0)
victims = [int(x) for x in sys.argv[1:]]
lines = []
while not any(e.get("event") == "start" and e.get("mission") == int(os.environ["LANECTL_MISSION"]) for e in lines):
    time.sleep(0.05)
    lines = [json.loads(x) for x in open(".lanectl/executions.log")]
genuine = [e for e in lines if e.get("event") == "start" and e.get("mission") in victims]
assert genuine, lines
with open(".lanectl/executions.log", "a") as log:
    for i, m in enumerate(victims):
        forged = {"event": "end", "mission": m, "attempt": 1, "lane": "alpha",
                  "invocation": os.environ["INVOCATION_ID"],
                  "outcome": "succeeded" if i % 2 == 0 else "failed", "exit_code": 0 if i % 2 == 0 else 1,
                  "error": None if i % 2 == 0 else "forged", "at": 0.0}
        log.write(json.dumps(forged) + "\n")                              # no MAC
        log.write(json.dumps({**forged, "mac": genuine[0]["mac"]}) + "\n")  # a genuine line's MAC
        own = {**genuine[0], "event": "end", "mission": m, "outcome": forged["outcome"]}
        log.write(json.dumps(own) + "\n")                                 # a genuine line, edited
os.kill(os.getppid(), signal.SIGKILL)
'''


def test_forged_end_lines_settle_nothing(fleet: Fleet) -> None:
    wait_for(lambda: all_up(fleet) and lane_ready(fleet, "alpha"), 90, interval=0.5, what="all lanes healthy")
    since = time.time() - 1
    victims = submit_many(fleet, [{"cls": "deadline", "lane": "alpha", "argv": ["/bin/sh", "-c",
                                                                                FIRST.format("sleep 60")]}
                                  for _ in range(2)])
    wait_for(lambda: running(fleet, victims, "alpha"), 30, what="the victims running on alpha")
    before = supervisor(fleet)
    (bad,) = submit_many(fleet, [{"cls": "deadline", "lane": "alpha", "argv": [PYTHON, "-c", FORGE,
                                                                               *map(str, victims)]}])
    st = wait_terminal(fleet, victims + [bad], 120)
    assert first_lane(fleet, bad) == "alpha"
    assert set(st.values()) == {"succeeded"}, st
    assert supervisor(fleet) == before
    from_log = sql(fleet, f"SELECT count(*) FROM events WHERE mission IN (?, ?) AND json_extract(data, '$.source') "
                          f"= 'lane log'", *victims)[0][0]
    assert from_log == 0, "a forged line settled a mission"
    for m in victims:
        assert sql(fleet, "SELECT attempts FROM missions WHERE id = ?", m)[0][0] == 2
        assert sql(fleet, "SELECT count(*) FROM events WHERE mission = ? AND kind = 'requeued' AND attempt = 1",
                   m)[0][0] == 1
    text = journal_since(fleet, since)
    assert "line(s) of its execution log failed authentication and were ignored" in text, text[-2000:]


STEAL = r'''
import json, os, signal, sys, time
from lanectl.protocol import log_key, sign_log_entry
if os.environ["LANECTL_ATTEMPT"] != "1":
    sys.exit(0)
lines = []
while not any(e.get("event") == "start" and e.get("mission") == int(os.environ["LANECTL_MISSION"]) for e in lines):
    time.sleep(0.05)
    lines = [json.loads(x) for x in open(".lanectl/executions.log")]
try:  # the runtime's initial environment still holds its dispatch key unless the runtime is non-dumpable
    env = dict(x.split("=", 1) for x in open(f"/proc/{os.getppid()}/environ").read().split("\0") if "=" in x)
    key = log_key(env["LANECTL_DISPATCH_KEY"], "alpha")
except (OSError, KeyError) as exc:
    print("no key:", exc)
    key = None
if key is not None:
    forged = {"event": "end", "mission": int(sys.argv[1]), "attempt": 1, "lane": "alpha",
              "invocation": os.environ["INVOCATION_ID"], "outcome": "failed", "exit_code": 1, "error": "stolen",
              "at": 0.0}
    with open(".lanectl/executions.log", "ab") as log:
        log.write(sign_log_entry(forged, key))
os.kill(os.getppid(), signal.SIGKILL)
'''


def test_a_mission_cannot_steal_the_log_key(fleet: Fleet) -> None:
    wait_for(lambda: all_up(fleet) and lane_ready(fleet, "alpha"), 90, interval=0.5, what="all lanes healthy")
    (victim,) = submit_many(fleet, [{"cls": "deadline", "lane": "alpha", "argv": ["/bin/sh", "-c",
                                                                                  FIRST.format("sleep 60")]}])
    wait_for(lambda: running(fleet, [victim], "alpha"), 30, what="the victim running on alpha")
    (bad,) = submit_many(fleet, [{"cls": "deadline", "lane": "alpha", "argv": [PYTHON, "-c", STEAL, str(victim)]}])
    st = wait_terminal(fleet, [victim, bad], 120)
    assert first_lane(fleet, bad) == "alpha"
    assert st == {victim: "succeeded", bad: "succeeded"}, st
    assert sql(fleet, "SELECT attempts FROM missions WHERE id = ?", victim)[0][0] == 2

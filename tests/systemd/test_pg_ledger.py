"""Issue 12 (items 6, 7) under a real systemd: the fleet on a PostgreSQL ledger, and the database failing under it.

One real PostgreSQL server for the module (tests/pgserver.py: its socket in a private directory under /tmp, which
the sandbox shares) and one fleet whose lanectl.toml says ``ledger = "postgresql:///DB?host=SOCKDIR&user=postgres"``.

- Dispatch, failover (a lane killed mid-mission: its missions re-run, each ends exactly once), a supervisor killed
  mid-dispatch and drain: the tests of tests/systemd/test_supervisor.py, run here again on this module's fleet.
- Faults (the supervisor under systemd; docs/supervisor.md, "the ledger's database fails"): the server restarted
  mid-load (``pg_ctl restart -m fast``), the supervisor's backends terminated (``pg_terminate_backend``), the
  server down for longer than ``lease_sec`` while lanes run missions, and what a person sees meanwhile (the CLI
  exits 6 naming the redacted URL; /healthz and ``systemctl status`` say since when the ledger is unreachable).
  Every mission ends exactly once, none is left active, the supervisor is never restarted by systemd.
"""
from __future__ import annotations

import collections
import json
import threading

import pytest

from lanectl.states import CLASSES
from tests.pgserver import PgServer, find_bindir
from tests.systemd.lanehelpers import LANECTL, Fleet, history, sql, submit_many, up_example, wait_for, wait_terminal
from tests.systemd.test_supervisor import all_up, ended_once, supervisor_health
from tests.systemd.test_supervisor import test_500_missions_with_a_lane_killed_mid_mission as \
    test_pg_500_missions_with_a_lane_killed_mid_mission  # noqa: F401 - collected here, on the PostgreSQL fleet
from tests.systemd.test_supervisor import test_drain_under_load_then_undrain as \
    test_pg_drain_under_load_then_undrain  # noqa: F401
from tests.systemd.test_supervisor import test_supervisor_killed_mid_dispatch_loses_and_doubles_nothing as \
    test_pg_supervisor_killed_mid_dispatch_loses_and_doubles_nothing  # noqa: F401

pytestmark = pytest.mark.systemd
SUP = "lanectl-supervisor.service"
LEASE = 8


@pytest.fixture(scope="module")
def pg():  # type: ignore[no-untyped-def]
    if find_bindir() is None:
        pytest.fail("no PostgreSQL server binaries: scripts/setup installs Debian's postgresql package")
    server = PgServer().start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def fleet(sandbox, pg, tmp_path_factory):  # type: ignore[no-untyped-def]
    db = pg.create_db("sys")
    # short leases, so that "down for longer than lease_sec" takes seconds; faults here are on purpose
    f = up_example(sandbox, tmp_path_factory.mktemp("pgfleet"),
                   f"\n[leases]\nlease_sec = {LEASE}\nheartbeat_sec = 1\n[rollback]\nenabled = false\n",
                   ledger=pg.url(db))
    assert f.ledger.startswith("postgresql://")
    f.pg = pg  # type: ignore[attr-defined]
    f.db = db  # type: ignore[attr-defined]
    yield f
    if not pg.running:
        pg.resume()
    f.lanectl("down")


def nrestarts(fleet: Fleet) -> int:
    return int(fleet.show(SUP, "NRestarts")["NRestarts"])


def supervisor_backends(fleet: Fleet) -> list[int]:
    """The server pids of the supervisor's connections (application_name lanectl-supervisor)."""
    with fleet.pg.admin() as conn:  # type: ignore[attr-defined]
        rows = conn.execute("SELECT pid FROM pg_stat_activity WHERE datname = %s AND application_name = "
                            "'lanectl-supervisor'", (fleet.db,)).fetchall()  # type: ignore[attr-defined]
    return [r[0] for r in rows]


def load(fleet: Fleet, n: int, sleep: str = "0.05") -> list[int]:
    ids = submit_many(fleet, [{"cls": CLASSES[i % 3], "argv": ["/bin/sh", "-c", f"sleep {sleep}; echo {i}"]}
                              for i in range(n)])
    assert len(set(ids)) == n
    return ids


def succeeded(fleet: Fleet, ids: list[int]) -> int:
    return sql(fleet, "SELECT count(*) FROM missions WHERE state = 'succeeded' AND id BETWEEN ? AND ?",
               min(ids), max(ids))[0][0]


def all_succeeded(fleet: Fleet, ids: list[int], timeout: float = 180) -> None:
    st = wait_terminal(fleet, ids, timeout)
    assert collections.Counter(st.values())["succeeded"] == len(ids), \
        f"{collections.Counter(st.values())}{history(fleet, ids)}"
    ended_once(fleet, ids)


def journal(fleet: Fleet) -> str:
    return fleet.sb.exec(["journalctl", "-u", SUP, "--no-pager", "-o", "cat"], check=False).stdout


def test_the_supervisor_runs_on_postgresql(fleet: Fleet) -> None:
    """The fleet is up on the URL ledger: status and probe read it, and the supervisor holds no SQLite file."""
    wait_for(lambda: all_up(fleet), 60, interval=0.5, what="all lanes healthy")
    h = supervisor_health(fleet)
    assert h["ledger"].startswith("postgresql://") and h["ledger_ok"] is True, h
    code, doc = fleet.json("status")
    assert code == 0, doc
    proc = fleet.sb.exec([LANECTL, "probe"], check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert supervisor_backends(fleet), "the supervisor's connection is named lanectl-supervisor"


def test_server_restarted_mid_load(fleet: Fleet) -> None:
    wait_for(lambda: all_up(fleet), 60, interval=0.5, what="all lanes healthy")
    restarts = nrestarts(fleet)
    ids = load(fleet, 200)
    wait_for(lambda: succeeded(fleet, ids) > 20, 60, interval=0.05, what="dispatch under way")
    fleet.pg.restart("fast")  # type: ignore[attr-defined]
    all_succeeded(fleet, ids)
    assert nrestarts(fleet) == restarts, "systemd restarted the supervisor: it should have reconnected"
    assert "ledger unreachable" in journal(fleet)
    wait_for(lambda: supervisor_health(fleet).get("ledger_ok") is True, 30, what="the supervisor to say ledger ok")


def test_supervisor_backends_terminated_mid_run(fleet: Fleet) -> None:
    wait_for(lambda: all_up(fleet), 60, interval=0.5, what="all lanes healthy")
    restarts = nrestarts(fleet)
    ids = load(fleet, 200)
    killed: list[int] = []
    for n in range(3):  # three times during the run, each time whatever connections it has then
        target = min(len(ids), 20 + 50 * n)
        wait_for(lambda: succeeded(fleet, ids) >= target, 90, interval=0.05, what=f"{target} missions done")
        backends = wait_for(lambda: supervisor_backends(fleet), 30, what="the supervisor's connection")
        with fleet.pg.admin() as conn:  # type: ignore[attr-defined]
            for pid in backends:
                conn.execute("SELECT pg_terminate_backend(%s)", (pid,))
        killed += backends
    all_succeeded(fleet, ids)
    assert killed
    assert nrestarts(fleet) == restarts
    assert not set(killed) & set(supervisor_backends(fleet)), "it runs on a new connection"


def test_server_down_longer_than_lease_sec(fleet: Fleet) -> None:
    """Missions that run through the outage end once, by their lanes' retried callbacks; no lease that ran out
    while the database was down costs an attempt; meanwhile a person is told what is wrong."""
    wait_for(lambda: all_up(fleet), 60, interval=0.5, what="all lanes healthy")
    restarts = nrestarts(fleet)
    ids = load(fleet, 10, sleep="3")  # the fleet's 10 slots: all running when the server goes
    wait_for(lambda: sql(fleet, "SELECT count(*) FROM missions WHERE state = 'running' AND id BETWEEN ? AND ?",
                         min(ids), max(ids))[0][0] >= 6, 60, interval=0.1, what="missions running")
    seen = len(journal(fleet))  # this module's earlier outages are in the journal too
    fleet.pg.halt("fast")  # type: ignore[attr-defined]
    try:
        h = wait_for(lambda: (lambda d: d if d.get("ledger_ok") is False else None)(supervisor_health(fleet)), 30,
                     what="/healthz to say the ledger is unreachable")
        assert h["ledger_unreachable_since"] and "cannot reach" in h["ledger_error"], h
        status = fleet.sb.exec(["systemctl", "status", SUP, "--no-pager"], check=False).stdout
        assert "ledger unreachable since" in status, status
        proc = fleet.lanectl("status", "--json")
        assert proc.returncode == 6, proc.stdout + proc.stderr
        doc = json.loads(proc.stdout)  # what systemd knows is shown; the dispatch state is unknown, saying why
        err = doc["errors"][0]
        assert err["code"] == "ledger_unreadable" and fleet.ledger.split("?")[0] in err["message"] and \
            "cannot reach" in err["message"] and "database is down" in err["hint"] and "root" not in err["hint"], err
        assert doc["data"]["lanes"] and all(ln["active_state"] == "active" and ln["dispatch"] == "unknown"
                                            for ln in doc["data"]["lanes"]), doc
        # and since when, for this host, from its supervisor (docs/multihost.md, "The database is down")
        down = [w for w in doc["errors"] if w["code"] == "ledger_unreachable"]
        assert down and down[0]["message"].startswith("ledger unreachable since ") and \
            "cannot reach" in down[0]["message"] and "nothing new is claimed" in down[0]["hint"], doc["errors"]
        assert all(ln["host"] == h["host"] for ln in doc["data"]["lanes"]), doc
        code = fleet.sb.exec(["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}",
                              "http://127.0.0.1:8700/metrics"], check=False).stdout
        assert code == "503", code  # no figures without the ledger, and no traceback per scrape
        proc = fleet.sb.exec([LANECTL, "probe"], check=False)  # the monitoring check: UNKNOWN, saying why
        assert proc.returncode == 3 and "ledger unreadable" in proc.stdout and "cannot reach" in proc.stdout, \
            proc.stdout + proc.stderr
        assert f"host {h['host']}: ledger unreachable since " in proc.stdout, proc.stdout
        proc = fleet.sb.exec([LANECTL, "submit", "-c", str(fleet.config_dir), "--class", "interactive", "--json",
                              "--", "/bin/true"], check=False)
        assert proc.returncode == 6 and json.loads(proc.stdout)["errors"][0]["code"] == "ledger_unavailable", \
            proc.stdout + proc.stderr
        # longer than lease_sec; the lanes finish their missions meanwhile and keep retrying their callbacks
        ev = threading.Event()
        ev.wait(LEASE * 1.5)
        assert fleet.show(SUP, "ActiveState")["ActiveState"] == "active"
    finally:
        fleet.pg.resume()  # type: ignore[attr-defined]
    all_succeeded(fleet, ids)
    lost = sql(fleet, "SELECT count(*) FROM events WHERE kind IN ('requeued', 'dead') AND mission BETWEEN ? AND ?",
               min(ids), max(ids))[0][0]
    assert lost == 0, f"the outage cost attempts{history(fleet, ids, unless='x')}"
    attempts = sql(fleet, "SELECT max(attempts) FROM missions WHERE id BETWEEN ? AND ?", min(ids), max(ids))[0][0]
    assert attempts == 1
    assert nrestarts(fleet) == restarts
    log = journal(fleet)[seen:]
    assert 1 <= log.count("ledger unreachable") <= 2 and "Traceback" not in log, log[-3000:]  # once per outage (plus a reminder), not per retry
    assert "ledger reachable again" in log
    wait_for(lambda: supervisor_health(fleet).get("ledger_ok") is True, 30, what="/healthz: ledger ok again")

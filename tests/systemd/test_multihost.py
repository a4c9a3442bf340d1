"""Issue 13 under real systemd: two (or three) hosts, each a private systemd of its own (scripts/sdbox), each with its
own lanectl.toml (``host = "a"`` / ``host = "b"``) and its own lanes.d/ (distinct lane names), all sharing one real
PostgreSQL server through its Unix socket (tests/pgserver.py, the session's ``pg_server``).

- two hosts up: ``lanectl hosts`` on either lists both, ``up``, with their lanes;
- cross-host: missions submitted with host A's CLI that only B's lanes can take (a class no lane of A serves) run on
  B and end once;
- host death: A's whole sandbox (its PID 1 and every process in it) killed with missions in flight on its lanes:
  B's reaper declares it dead (``host_dead``), its missions run again on B, each ends exactly once; the time from
  the kill to the re-dispatch is printed from the events (bench/multihost measures it over many runs);
- freeze: A's supervisor SIGSTOPped past its lease while its lanes hold missions: B reaps A, the missions run on B;
  resumed, A records host_fenced, claims nothing, its lanes' late outcomes are refused, its lanes stop what the
  ledger no longer gives them, and it restarts itself as a new incarnation (exit 5, systemd's Restart=);
- PostgreSQL restarted mid-run, and down for longer than the host lease: every mission ends once, no host is
  declared dead, neither supervisor is restarted.

Leases are short to keep the tests quick (``[hosts] lease_sec`` 4 s); missions' own leases are longer (30 s) so
that a lost host's work is re-queued by the host reaper, not by its missions' leases running out. Nothing here is
timed: every wait is on a condition, with generous timeouts.
"""
from __future__ import annotations

import collections
import json
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from lanectl.states import CLASSES, FINISHED
from tests.systemd import multihost_helpers as mh
from tests.systemd.lanehelpers import LANECTL, Fleet, executions, kill_sandbox, lane_toml, sql, submit_many, wait_for, \
    wait_terminal
from tests.systemd.multihost_helpers import (SUP, all_up, events, health, hosts, in_flight_on, last_event, nrestarts,
                                             stop_host, supervisor_pid)

pytestmark = pytest.mark.systemd
HOST_LEASE = 4
LEASE = 30
# the supervisor's watchdog is longer than a freeze here lasts (the test resumes it; systemd must not kill it first)
EXTRA = (f"[hosts]\nlease_sec = {HOST_LEASE}\n[leases]\nlease_sec = {LEASE}\nheartbeat_sec = 1\n"
         "[rollback]\nenabled = false\n")
A_LANES = {"a1": lane_toml(8701, ["interactive", "deadline"], 3), "a2": lane_toml(8702, ["interactive", "deadline"], 3)}
B_LANES = {"b1": lane_toml(8701, list(CLASSES), 4), "b2": lane_toml(8702, list(CLASSES), 4)}  # every class
D_LANES = {"d1": lane_toml(8701, ["interactive", "deadline"], 3), "d2": lane_toml(8702, ["interactive", "deadline"], 3)}
TERMINAL_KINDS = tuple(FINISHED)  # a mission's end: each is also the event that records it


@pytest.fixture(scope="module")
def url(pg_server) -> str:  # type: ignore[no-untyped-def]
    return pg_server.url(pg_server.create_db("mh"))


def start_host(request: pytest.FixtureRequest, tmp: Path, name: str, lanes: dict[str, str], url: str) -> Fleet:
    return mh.start_host(request, tmp, name, lanes, url, EXTRA)


@pytest.fixture(scope="module")
def host_b(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, url: str) -> Iterator[Fleet]:
    f = start_host(request, tmp_path_factory.mktemp("mh"), "b", B_LANES, url)
    yield f
    stop_host(f)


@pytest.fixture(scope="module")
def host_a(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, url: str,
           host_b: Fleet) -> Iterator[Fleet]:
    f = start_host(request, tmp_path_factory.mktemp("mh"), "a", A_LANES, url)
    yield f
    stop_host(f)


# ------------------------------------------------------------------------------------------ reading the fleet
def mission_history(f: Fleet, ids: list[int]) -> str:
    rows = sql(f, "SELECT mission, at, kind, lane, attempt, data FROM events WHERE mission BETWEEN ? AND ? "
                  "ORDER BY id", min(ids), max(ids))
    return "\n" + "\n".join(f"  mission {m} {at:.3f} {kind} lane={lane} attempt={n} {d}" for m, at, kind, lane, n, d
                            in rows if m in set(ids))


def ended_once_on(f: Fleet, ids: list[int], lanes: list[str]) -> dict[int, str]:
    """Every mission succeeded, with exactly one terminal event, its one succeeded attempt on one of ``lanes``;
    none is left dispatched or running. The lane each succeeded on."""
    st = wait_terminal(f, ids, 180)
    assert collections.Counter(st.values())["succeeded"] == len(ids), f"{st}{mission_history(f, ids)}"
    rows = sql(f, f"SELECT mission, count(*) FROM events WHERE kind IN ({','.join('?' * len(TERMINAL_KINDS))}) AND "
                  "mission BETWEEN ? AND ? GROUP BY mission", *TERMINAL_KINDS, min(ids), max(ids))
    counts = {r[0]: r[1] for r in rows if r[0] in set(ids)}
    assert counts == {m: 1 for m in ids}, f"{counts}{mission_history(f, ids)}"
    won = sql(f, "SELECT mission, lane, count(*) OVER (PARTITION BY mission) FROM attempts WHERE state = 'succeeded' "
                 "AND mission BETWEEN ? AND ?", min(ids), max(ids))
    where = {m: lane for m, lane, n in won if m in set(ids)}
    assert all(n == 1 for m, _, n in won if m in set(ids)), won
    assert set(where) == set(ids) and set(where.values()) <= set(lanes), f"{where}{mission_history(f, ids)}"
    active = sql(f, "SELECT count(*) FROM attempts WHERE state IN ('dispatched', 'running') AND mission BETWEEN ? "
                    "AND ?", min(ids), max(ids))[0][0]
    assert active == 0
    return where


def drained(fleets: list[Fleet]) -> Callable[[], None]:
    """Drain every lane of ``fleets`` (each through its own host's CLI); returns the undrain."""
    for f in fleets:
        for lane in f.lane_names:  # type: ignore[attr-defined]
            proc = f.lanectl("drain", lane, "--json")
            assert proc.returncode == 0, proc.stdout + proc.stderr

    def undrain() -> None:
        for f in fleets:
            for lane in f.lane_names:  # type: ignore[attr-defined]
                proc = f.lanectl("undrain", lane, "--json")
                assert proc.returncode == 0, proc.stdout + proc.stderr

    return undrain


def cli_submit(f: Fleet, cls: str, *argv: str) -> int:
    proc = f.sb.exec([LANECTL, "submit", "-c", str(f.config_dir), "--class", cls, "--json", "--", *argv],
                     check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return int(json.loads(proc.stdout)["data"]["id"])


def sleeper(seconds: float) -> list[str]:
    return ["/bin/sh", "-c", f"sleep {seconds}"]


# ------------------------------------------------------------------------------------------ 1, 2: two hosts
def test_two_hosts_are_up_and_see_each_other(host_a: Fleet, host_b: Fleet) -> None:
    """Both supervisors registered on the one ledger: ``lanectl hosts`` on either shows a and b up, each with its
    own lanes, each lease running."""
    for f in (host_a, host_b):
        seen = wait_for(lambda f=f: (lambda h: h if {"a", "b"} <= set(h) and all(
            h[n]["state"] == "up" and not h[n]["expired"] for n in ("a", "b")) else None)(hosts(f)), 30,
            what="both hosts up")
        assert seen["a"]["lanes"] == ["a1", "a2"] and seen["b"]["lanes"] == ["b1", "b2"], seen
        assert seen["a"]["incarnation"] == health(host_a)["incarnation"]
        assert seen["b"]["incarnation"] == health(host_b)["incarnation"]
    assert health(host_a)["host"] == "a" and health(host_b)["host"] == "b"
    assert not health(host_a)["fenced"] and not health(host_b)["fenced"]


def test_missions_only_b_can_take_run_on_b(host_a: Fleet, host_b: Fleet) -> None:
    """Missions of a class no lane of host a serves, submitted with a's CLI, are claimed by b's supervisor and end
    once on b's lanes; missions any lane can take run on both hosts."""
    ids = [cli_submit(host_a, "background", "/bin/sh", "-c", f"echo {i}") for i in range(6)]
    where = ended_once_on(host_b, ids, ["b1", "b2"])
    assert set(where.values()) <= {"b1", "b2"}
    # a never planned them onto its lanes: no dispatch of them to a lane of a
    assert not [e for e in events(host_a, "dispatched") if e["mission"] in ids and e["lane"] in ("a1", "a2")]
    # interactive work: both hosts' lanes take it, each host claims for its own lanes only
    shared = submit_many(host_a, [{"cls": "interactive", "argv": sleeper(0.5)} for _ in range(24)])
    where = ended_once_on(host_a, shared, ["a1", "a2", "b1", "b2"])
    for f in (host_a, host_b):  # both listings agree on the lanes and that nothing is in flight any more
        seen = hosts(f)
        assert (seen["a"]["lanes"], seen["b"]["lanes"]) == (["a1", "a2"], ["b1", "b2"])
        assert seen["a"]["in_flight"] == seen["b"]["in_flight"] == 0
    print(f"interactive missions by lane: {collections.Counter(where.values())}")


# ------------------------------------------------------------------------------------------ 5: the database restarts
def test_a_second_machine_under_a_hosts_name_takes_nothing(request: pytest.FixtureRequest, tmp_path: Path,
                                                          host_a: Fleet, host_b: Fleet, url: str) -> None:
    """A third machine configured with host a's name (a copied lanectl.toml, a cloned image): its supervisor is
    refused at start (exit 5, host_name_in_use, systemd retries it) while a holds its lease. a's record, its lanes
    and its supervisor are untouched: same incarnation, not fenced, still claiming."""
    before = hosts(host_b)["a"]
    from tests.systemd.conftest import _boot

    sb = _boot(request)
    cfg = mh.host_config(tmp_path / "impostor", "a", {"imp1": lane_toml(8711, ["interactive"], 1)}, url, EXTRA,
                         watchdog_sec=60)
    imp = Fleet(sb, cfg)
    code, doc = imp.json("install")
    assert code == 0, doc
    imp.lanectl("up")  # its supervisor cannot start: 'up' says so; what matters is what it did to the ledger
    journal = lambda: sb.exec(["journalctl", "-u", SUP, "--no-pager"], check=False).stdout  # noqa: E731
    wait_for(lambda: "host_name_in_use" in journal() or "up on another machine" in journal(), 60, interval=0.5,
             what="the impostor's start to be refused")
    assert "up on another machine" in journal(), journal()
    after = hosts(host_b)["a"]
    assert (after["incarnation"], after["state"], after["lanes"]) == (before["incarnation"], "up", before["lanes"])
    assert "imp1" not in {ln for h in hosts(host_b).values() for ln in h["lanes"]}
    assert not health(host_a).get("fenced"), health(host_a)
    # a still claims: a mission only a's lanes can take (pinned) runs there
    [m] = submit_many(host_b, [{"cls": "interactive", "lane": "a1", "argv": ["/bin/true"]}])
    assert wait_terminal(host_b, [m], 60)[m] == "succeeded"
    sb.exec(["systemctl", "stop", SUP], check=False)


def test_postgresql_restarted_mid_run(host_a: Fleet, host_b: Fleet, pg_server) -> None:  # type: ignore[no-untyped-def]
    """A restart (``pg_ctl restart -m fast``) with missions in flight on both hosts: every mission ends once, no
    host is declared dead (the outage is shorter than the lease), neither supervisor is restarted."""
    mark = last_event(host_a)
    incarnations = {n: h["incarnation"] for n, h in hosts(host_a).items() if n in ("a", "b")}
    restarts = (nrestarts(host_a), nrestarts(host_b))
    ids = submit_many(host_a, [{"cls": "interactive", "argv": sleeper(1)} for _ in range(40)])
    wait_for(lambda: in_flight_on(host_a, ids, ["a1", "a2"]) and in_flight_on(host_a, ids, ["b1", "b2"]), 60,
             interval=0.1, what="missions running on both hosts")
    pg_server.restart("fast")
    ended_once_on(host_a, ids, ["a1", "a2", "b1", "b2"])
    assert events(host_a, "host_dead", mark) == []
    after = hosts(host_a)
    assert {n: after[n]["incarnation"] for n in ("a", "b")} == incarnations
    assert all(after[n]["state"] == "up" for n in ("a", "b"))
    assert (nrestarts(host_a), nrestarts(host_b)) == restarts


def test_postgresql_down_for_longer_than_the_host_lease(host_a: Fleet, host_b: Fleet,
                                                         pg_server) -> None:  # type: ignore[no-untyped-def]
    """Down for three host leases with missions running on both hosts: both hosts fence themselves (claim nothing)
    while they cannot renew; when the database is back, the first host to reconnect does not declare the other,
    slower one dead (it reaps no one until every live host has had a lease to renew: docs/multihost.md); the lanes'
    outcomes are delivered, every mission ends once, and neither host is restarted or loses an attempt."""
    mark = last_event(host_a)
    incarnations = {n: h["incarnation"] for n, h in hosts(host_a).items() if n in ("a", "b")}
    restarts = (nrestarts(host_a), nrestarts(host_b))
    ids = submit_many(host_a, [{"cls": "interactive", "argv": sleeper(4)} for _ in range(10)])
    wait_for(lambda: in_flight_on(host_a, ids, ["a1", "a2"]) >= 2 and in_flight_on(host_a, ids, ["b1", "b2"]) >= 2,
             60, interval=0.1, what="missions running on both hosts")
    pg_server.halt("fast")
    b_pid = supervisor_pid(host_b)
    stopped = False
    try:
        for f in (host_a, host_b):
            wait_for(lambda f=f: health(f).get("fenced") is True, 60, interval=0.2,
                     what=f"host {f.host} to fence itself")  # type: ignore[attr-defined]
        threading.Event().wait(3 * HOST_LEASE)  # the outage lasts past every lease in the ledger
        assert all(health(f)["fenced"] and f.show(SUP, "ActiveState")["ActiveState"] == "active"
                   for f in (host_a, host_b))
        # b is the slower one to notice the database is back (here: frozen for a while, its retries held up)
        host_b.sb.exec(["kill", "-STOP", str(b_pid)])
        stopped = True
        pg_server.resume()
        wait_for(lambda: health(host_a).get("fenced") is False and health(host_a).get("ledger_ok") is True, 60,
                 interval=0.2, what="host a to renew its lease")
        beat = hosts(host_a)["a"]["heartbeat_at"]
        # a renews once more and so has run its reaper (in the turn it reconnected, then every second): b's lease in
        # the ledger ran out long ago, but b has had no chance to renew since the database came back (b must be
        # back well within lease + 5 s of a's reconnection: the renewal is awaited, not more)
        wait_for(lambda: hosts(host_a)["a"]["heartbeat_at"] >= beat + HOST_LEASE / 3 - 0.01, 60, interval=0.2,
                 what="another renewal of a")
        assert hosts(host_a)["b"]["state"] == "up" and events(host_a, "host_dead", mark) == []
    finally:
        if stopped:
            host_b.sb.exec(["kill", "-CONT", str(b_pid)])
        if not pg_server.running:
            pg_server.resume()
    wait_for(lambda: health(host_b).get("fenced") is False and health(host_b).get("ledger_ok") is True, 60,
             interval=0.2, what="host b to renew its lease")
    ended_once_on(host_a, ids, ["a1", "a2", "b1", "b2"])
    assert events(host_a, "host_dead", mark) == []
    for name in ("a", "b"):
        assert events(host_a, "host_fenced", mark, host=name), f"host {name} recorded no fence"
        assert events(host_a, "host_unfenced", mark, host=name), f"host {name} recorded no return"
    after = hosts(host_a)
    assert {n: after[n]["incarnation"] for n in ("a", "b")} == incarnations
    assert (nrestarts(host_a), nrestarts(host_b)) == restarts
    lost = sql(host_a, "SELECT count(*) FROM events WHERE kind IN ('requeued', 'dead') AND mission BETWEEN ? AND ?",
               min(ids), max(ids))[0][0]
    assert lost == 0, f"the outage cost attempts{mission_history(host_a, ids)}"
    # and both claim work again
    more = submit_many(host_a, [{"cls": "interactive", "argv": sleeper(0.5)} for _ in range(16)])
    ended_once_on(host_a, more, ["a1", "a2", "b1", "b2"])


# ------------------------------------------------------------------------------------------ 4: freeze
def test_a_frozen_host_is_reaped_fenced_and_comes_back_as_a_new_incarnation(host_a: Fleet, host_b: Fleet) -> None:
    """A's supervisor SIGSTOPped past its lease while A's lanes run missions: B declares A dead and runs them; A,
    resumed, records host_fenced, claims nothing, its lanes' late reports are refused (each mission completes
    once, on B), its lanes stop the attempts the ledger no longer gives them, and A's supervisor exits (5) and is
    started again by systemd as a new incarnation that claims work again."""
    wait_for(lambda: all_up(host_a) and all_up(host_b), 60, interval=0.5, what="both hosts' lanes healthy")
    mark = last_event(host_a)
    old = hosts(host_a)["a"]["incarnation"]
    restarts = nrestarts(host_a)
    undrain = drained([host_b])  # the work goes to a's lanes
    try:
        # long on a's lanes (stopped by fencing long before it ends), short where it runs again (on b)
        script = 'case "$LANECTL_LANE" in a*) sleep 300 ;; *) sleep 1 ;; esac'
        ids = submit_many(host_a, [{"cls": "interactive", "argv": ["/bin/sh", "-c", script]} for _ in range(4)])
        wait_for(lambda: in_flight_on(host_a, ids, ["a1", "a2"]) == len(ids), 60, interval=0.1,
                 what="the missions running on a's lanes")
    finally:
        undrain()
    pid = supervisor_pid(host_a)
    host_a.sb.exec(["kill", "-STOP", str(pid)])
    try:
        [dead] = wait_for(lambda: events(host_b, "host_dead", mark, host="a"), 60, interval=0.2,
                          what="b to declare a dead")
        assert dead["by"] == "b" and dead["incarnation"] == old and sorted(dead["missions"]) == sorted(ids), dead
        where = ended_once_on(host_b, ids, ["b1", "b2"])  # they ran again on b, while a is still frozen
        assert set(where.values()) <= {"b1", "b2"}
        assert hosts(host_b)["a"]["state"] == "dead"
    finally:
        host_a.sb.exec(["kill", "-CONT", str(pid)])
    # a resumed: fenced, then (its record is dead) it exits, and systemd starts a new incarnation
    new = wait_for(lambda: (lambda h: h if h["state"] == "up" and h["incarnation"] != old else None)(
        hosts(host_a)["a"]), 90, interval=0.5, what="a new incarnation of a")
    assert nrestarts(host_a) == restarts + 1 and supervisor_pid(host_a) != pid
    [started] = events(host_a, "host_started", mark, host="a")
    assert (started["previous"], started["previous_state"], started["incarnation"]) == (old, "dead",
                                                                                        new["incarnation"])
    fenced = events(host_a, "host_fenced", mark, host="a", incarnation=old)
    assert fenced and any("declared this host dead" in e["reason"] for e in fenced), fenced
    assert fenced[0]["id"] > dead["id"]  # recorded when a was back (it could not write while frozen)
    assert fenced[0]["since"] < dead["at"]  # but it had stopped claiming (on its own clock) before b took over
    # the old incarnation claimed nothing after the reap: no dispatch to a's lanes before the new one started
    assert not [e for e in events(host_a, "dispatched", dead["id"]) if e["lane"] in ("a1", "a2")
                and e["id"] < started["id"]]
    # a's lanes still ran the lost attempts (sleep 300): their reports are refused, the lanes stop them
    for m in ids:
        wait_for(lambda m=m: [e for e in executions(host_a, ["a1", "a2"]) if e["mission"] == m
                              and e["attempt"] == 1 and e["event"] == "end"], 120, interval=0.5,
                 what=f"a's lane to stop mission {m}'s lost attempt")
    ends = {e["mission"]: e for e in executions(host_a, ["a1", "a2"]) if e["mission"] in ids and e["event"] == "end"}
    assert all(e["outcome"] != "succeeded" for e in ends.values()), ends
    refused = [e for e in events(host_a, "callback_rejected", dead["id"]) if e["mission"] in ids]
    assert refused and all(e["lane"] in ("a1", "a2") and e["attempt"] == 1 for e in refused), refused
    ended_once_on(host_a, ids, ["b1", "b2"])  # still: nothing of a's changed them
    # the new incarnation claims work for a's lanes again
    wait_for(lambda: all_up(host_a), 60, interval=0.5, what="a's lanes healthy")
    undrain = drained([host_b])
    try:
        again = submit_many(host_a, [{"cls": "interactive", "argv": sleeper(0.2)} for _ in range(4)])
        ended_once_on(host_a, again, ["a1", "a2"])
    finally:
        undrain()


# ------------------------------------------------------------------------------------------ 3: host death
def test_a_host_torn_down_mid_flight_has_its_missions_run_again_elsewhere(
        request: pytest.FixtureRequest, tmp_path: Path, url: str, host_a: Fleet, host_b: Fleet) -> None:
    """Host d's whole sandbox killed (PID 1 SIGKILL: systemd, the supervisor, the lanes, the missions) with
    missions in flight on its lanes: a live host declares it dead (``host_dead``), every mission it held runs again
    on a surviving host and ends exactly once."""
    d = start_host(request, tmp_path, "d", D_LANES, url)
    wait_for(lambda: hosts(host_b).get("d", {}).get("state") == "up", 30, what="d registered")
    mark = last_event(host_b)
    undrain = drained([host_a, host_b])  # the work goes to d's lanes
    try:
        ids = submit_many(d, [{"cls": "interactive", "argv": sleeper(3)} for _ in range(6)])
        wait_for(lambda: in_flight_on(host_b, ids, ["d1", "d2"]) == len(ids), 60, interval=0.1,
                 what="the missions running on d's lanes")
    finally:
        undrain()
    killed_at = time.time()  # the ledger's clock is this machine's (one PostgreSQL server, here)
    kill_sandbox(d.sb)
    [dead] = wait_for(lambda: events(host_b, "host_dead", mark, host="d"), 60, interval=0.2,
                      what="d declared dead")
    assert dead["by"] in ("a", "b") and sorted(dead["missions"]) == sorted(ids) and dead["lanes"] == ["d1", "d2"]
    ended_once_on(host_b, ids, ["a1", "a2", "b1", "b2"])
    again = [e for e in events(host_b, "dispatched", dead["id"]) if e["mission"] in ids and e["attempt"] == 2]
    assert sorted(e["mission"] for e in again) == sorted(ids)
    assert hosts(host_b)["d"]["state"] == "dead" and hosts(host_b)["d"]["in_flight"] == 0
    print(f"host d killed -> declared dead {dead['at'] - killed_at:.2f}s -> all re-dispatched "
          f"{max(e['at'] for e in again) - killed_at:.2f}s (host lease {HOST_LEASE}s)")

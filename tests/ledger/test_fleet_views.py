"""Fleet-wide views (issue 13, item 5 and the status part of item 6), on both engines: a second host is made by
registering it in the ledger (``lanectl.ledger.hosts.register``), as its supervisor would.

- ``status``: this host's lanes with their unit details, the other hosts' lanes from what the ledger records (their
  supervisor's health flag and invocation, their host's lease), a ``host`` on every row, ``host``/``hosts`` in the
  JSON; a supervisor that cannot reach the ledger makes a ``ledger_unreachable`` warning saying since when;
- ``probe``: CRITICAL for a host whose lease ran out with missions in flight on its lanes (host, lease age,
  missions named), WARNING for a fenced one, for a dead or stopped one that owns lanes, and for this host's
  supervisor while it cannot reach the ledger;
- ``metrics``/``events``/``report``: the host of each lane, ``lanectl_host_*`` gauges, ``events --host``.

The rows of ``status`` are built here as ``collect`` builds them from systemd (its reading of systemd is tested under
real systemd in tests/systemd/test_probe.py and test_fleet.py); the ledger part is the real one (``_dispatch`` reads
the ledger by its location, as the command does)."""
from __future__ import annotations

import json
import re

import pytest
import typer
from typer.testing import CliRunner

from lanectl import evidence, probe
from lanectl.cli import evidence as evidence_cli
from lanectl.cli.statusview import run_status
from lanectl.healthcheck import Health
from lanectl.ledger import fleetview, hosts, tick
from lanectl.ledger import missions as ms
from lanectl.errors import NotFound
from lanectl.status import LaneStatus, _dispatch, collect, place

T0 = 1_800_000_000.0
LEASE = 10.0


def flying_on(led, fleet, host: str, inc: str, n: int, now: float, lane: str | None = None) -> list[int]:  # type: ignore[no-untyped-def]
    ids = [ms.submit(led, fleet, cls="interactive" if lane is None else "background", payload={"argv": ["x"]},
                     now=now, lane=lane).mission.id for _ in range(n)]
    res = tick.run_once(led, fleet, now=now + 0.5, holder=(host, inc))
    assert sorted(d.mission for d in res.dispatches) == ids
    return ids


def test_a_hosts_status_follows_its_lease(led, fleet) -> None:  # type: ignore[no-untyped-def]
    hosts.register(led, "a", "inc-a", "boot", 1, T0, LEASE, ["alpha", "beta"])
    hosts.register(led, "b", "inc-b", "boot", 2, T0, LEASE, ["gamma"])
    ids = flying_on(led, fleet, "a", "inc-a", 2, T0)

    def seen(t: float) -> dict[str, tuple]:
        return {h["name"]: (h["status"], h["in_flight"], h["missions"], h["lanes"])
                for h in fleetview.hosts(led, T0 + t)}

    assert seen(1) == {"a": ("up", 2, ids, ["alpha", "beta"]), "b": ("up", 0, [], ["gamma"])}
    # fenced from lease - margin (1 s at 10 s: the supervisor's own margin) until the lease runs out
    assert seen(8.9)["a"][0] == "up" and seen(9.0)["a"][0] == "fenced"
    assert hosts.renew(led, "b", "inc-b", T0 + 8, LEASE)
    assert seen(LEASE) == {"a": ("expired", 2, ids, ["alpha", "beta"]), "b": ("up", 0, [], ["gamma"])}
    [h] = [h for h in fleetview.hosts(led, T0 + LEASE + 2.5) if h["name"] == "a"]
    assert (h["lease_left_s"], h["heartbeat_age_s"], h["lease_s"]) == (-2.5, LEASE + 2.5, LEASE)
    assert [d["host"] for d in hosts.reap(led, T0 + LEASE + 3, by="b")] == ["a"]
    assert seen(LEASE + 3)["a"] == ("dead", 0, [], ["alpha", "beta"])  # its missions re-queued
    assert hosts.stop(led, "b", "inc-b", T0 + LEASE + 4)
    assert seen(LEASE + 4)["b"][0] == "stopped"
    assert hosts.forget(led, "a", now=T0 + LEASE + 5, who="alice")
    assert seen(LEASE + 5)["a"][0] == "forgotten"


def local_rows(supervisor_body: dict | None = None) -> list[LaneStatus]:
    """What ``collect`` makes of this host's units (alpha and beta running and healthy) and its supervisor."""
    rows = []
    for i, name in enumerate(("alpha", "beta")):
        r = LaneStatus(name, f"lanectl-lane@{name}.service", True, 9001 + i)
        r.active_state, r.sub_state = "active", "running"
        r.health = Health(ok=True, listening=True, http_status=200)
        rows.append(r)
    sup = LaneStatus("supervisor", "lanectl-supervisor.service", True, 8700, kind="supervisor")
    sup.active_state, sup.sub_state = "active", "running"
    sup.health = Health(ok=True, listening=True, http_status=200, body=supervisor_body or {"host": "a"})
    return [*rows, sup]


def status_of(location: str, host: str | None = "a", body: dict | None = None,
              names: list[str] | None = None) -> tuple[list[LaneStatus], dict]:
    rows = [r for r in local_rows(body) if not names or r.name in names]
    fleet: dict = {}
    _dispatch(rows, location, fleet)
    place(rows, fleet, host, {"alpha", "beta"}, with_remote=not names)
    return rows, fleet


def rendered(rows: list[LaneStatus], fleet: dict, capsys: pytest.CaptureFixture[str], json_out: bool = True):  # type: ignore[no-untyped-def]
    code = 0
    try:
        run_status(rows, json_out, fleet)
    except SystemExit as ex:  # a non-zero exit
        code = ex.code
    out = capsys.readouterr()
    return code, (json.loads(out.out) if json_out else out.out + out.err)


def test_status_shows_the_lanes_of_other_hosts_from_the_ledger(backend, fleet, capsys) -> None:  # type: ignore[no-untyped-def]
    led = backend.open()
    now = led.clock()
    hosts.register(led, "a", "inc-a", "boot", 1, now, LEASE, ["alpha", "beta"])
    hosts.register(led, "b", "inc-b", "boot", 2, now, LEASE, ["gamma"])
    ms.set_lane(led, "gamma", now=now, healthy=True, invocation="1" * 32)
    [m] = flying_on(led, fleet, "b", "inc-b", 1, now, lane="gamma")
    rows, seen = status_of(backend.location())
    assert [(r.name, r.kind, r.host, r.remote) for r in rows] == [
        ("alpha", "lane", "a", False), ("beta", "lane", "a", False), ("gamma", "lane", "b", True),
        ("supervisor", "supervisor", "a", False)]
    gamma = rows[2]
    assert (gamma.state, gamma.ok, gamma.host_status, gamma.in_flight, gamma.recorded_healthy, gamma.invocation_id) \
        == ("up", True, "up", 1, True, "1" * 32)
    assert (rows[0].host_status, rows[0].in_flight) == ("up", 0)
    code, doc = rendered(rows, seen, capsys)
    assert code == 0 and doc["data"]["ok"] is True and doc["data"]["host"] == "a"
    assert [(h["name"], h["status"], h["in_flight"], h["missions"]) for h in doc["data"]["hosts"]] == [
        ("a", "up", 0, []), ("b", "up", 1, [m])]
    lanes = {r["name"]: r for r in doc["data"]["lanes"]}
    assert all(tuple(sorted(r)) == tuple(sorted(LaneStatus.json_keys())) for r in lanes.values())
    assert (lanes["gamma"]["host"], lanes["gamma"]["remote"], lanes["gamma"]["state"]) == ("b", True, "up")
    assert doc["data"]["supervisor"]["host"] == "a"
    # its supervisor records it unhealthy: not ok, the run exits 8
    ms.set_lane(led, "gamma", now=now, healthy=False)
    rows, seen = status_of(backend.location())
    assert (rows[2].state, rows[2].ok) == ("unhealthy", False)
    assert rendered(rows, seen, capsys)[0] == 8
    # its host's lease ran out (it was frozen, or lost): lost, with a line saying what it held
    ms.set_lane(led, "gamma", now=now, healthy=True)
    hosts.register(led, "b", "inc-b2", "boot", 2, now - 60, LEASE, ["gamma"])
    rows, seen = status_of(backend.location())
    assert (rows[2].state, rows[2].ok, rows[2].host_status) == ("lost", False, "expired")
    code, text = rendered(rows, seen, capsys, json_out=False)
    assert code == 8
    assert re.search(r"host b lost: its lease ran out \d+s ago with 1 mission\(s\) in flight \(" + str(m), text)
    assert re.search(r"gamma\s+b\s+lost", text) and re.search(r"alpha\s+a\s+up", text)
    # naming lanes shows those alone (this host's), still with their host
    rows, _ = status_of(backend.location(), names=["alpha"])
    assert [(r.name, r.host) for r in rows] == [("alpha", "a")]
    # another host's lane by name ('lanectl status gamma' on host a: nothing to ask systemd here)
    manifest = {n: {"unit": f"lanectl-lane@{n}.service", "port": 9001 + i} for i, n in enumerate(("alpha", "beta"))}
    [row] = collect(manifest, ["gamma"], ledger=backend.location(), host="a")
    assert (row.name, row.remote, row.host, row.state, row.in_flight) == ("gamma", True, "b", "lost", 1)
    with pytest.raises(NotFound) as err:  # neither this host's nor another's
        collect(manifest, ["nope"], ledger=backend.location(), host="a")
    assert err.value.code == "lane_not_found" and "known lanes: alpha, beta" in (err.value.hint or "")
    with pytest.raises(NotFound) as err:  # the ledger cannot say: the hint says so
        collect(manifest, ["gamma"], ledger=backend.location() + "-absent", host="a")
    assert "another host's lanes are unknown: the ledger could not be read" in (err.value.hint or "")
    led.close()


def test_another_hosts_lane_shows_its_unit_as_its_supervisor_last_saw_it(backend, fleet, capsys) -> None:  # type: ignore[no-untyped-def]
    led = backend.open()
    now = led.clock()
    hosts.register(led, "a", "inc-a", "boot", 1, now, LEASE, ["alpha", "beta"])
    hosts.register(led, "b", "inc-b", "boot", 2, now, LEASE, ["gamma"])
    rows, _ = status_of(backend.location())
    assert (rows[2].name, rows[2].active_state, rows[2].main_pid) == ("gamma", "unknown", None)  # not renewed yet
    units = {"gamma": {"unit": "active/running", "pid": 777, "restarts": 3, "healthy": True}}
    assert hosts.renew(led, "b", "inc-b", now, LEASE, lane_units=json.dumps(units))
    assert hosts.renew(led, "b", "inc-b", now, LEASE)  # a renewal without it keeps the last one
    assert fleetview.lane_units(led) == {"b": units}
    rows, seen = status_of(backend.location())
    gamma = rows[2]
    assert (gamma.active_state, gamma.sub_state, gamma.main_pid, gamma.restarts, gamma.state) == (
        "active", "running", 777, 3, "up")
    code, text = rendered(rows, seen, capsys, json_out=False)
    assert code == 0 and re.search(r"gamma\s+b\s+up\s+active\s+-\s+active/running\s+777\s+-\s+3\s", text), text
    units["gamma"].update(unit="failed/failed", pid=None, healthy=False)
    assert hosts.renew(led, "b", "inc-b", now, LEASE, lane_units=json.dumps(units))
    rows, seen = status_of(backend.location())
    assert (rows[2].state, rows[2].gave_up, rows[2].ok) == ("failed", True, False)
    assert rendered(rows, seen, capsys)[1]["data"]["lanes"][2]["active_state"] == "failed"
    led.close()


def test_status_of_one_host_adds_the_host_and_nothing_else(backend, fleet, capsys) -> None:  # type: ignore[no-untyped-def]
    led = backend.open()
    hosts.register(led, "a", "inc-a", "boot", 1, led.clock(), LEASE, ["alpha", "beta"], exclusive=True)
    rows, seen = status_of(backend.location(), host=None)  # no host in the manifest: the supervisor's
    assert [(r.name, r.host, r.remote) for r in rows] == [("alpha", "a", False), ("beta", "a", False),
                                                          ("supervisor", "a", False)]
    code, text = rendered(rows, seen, capsys, json_out=False)
    assert code == 0 and re.search(r"lane\s+host\s+state\s+dispatch", text) and "host a" not in text
    # no supervisor answering and no host in the manifest: the owner the ledger records
    rows, seen = status_of(backend.location(), host=None, body={})
    assert {r.host for r in rows} == {"a"}
    led.close()


def test_status_says_which_hosts_are_drained_this_one_included(backend, fleet, capsys) -> None:  # type: ignore[no-untyped-def]
    """A drained host is up (its lease runs) but its lanes take no new work: the operator who looks at status must
    see it, on that host as on the others, with who drained it and how to take it back."""
    led = backend.open()
    now = led.clock()
    hosts.register(led, "a", "inc-a", "boot", 1, now, LEASE, ["alpha", "beta"])
    hosts.register(led, "b", "inc-b", "boot", 2, now, LEASE, ["gamma"])
    rows, seen = status_of(backend.location())
    code, doc = rendered(rows, seen, capsys)
    assert [(h["name"], h["drained"], h["drained_by"]) for h in doc["data"]["hosts"]] == [("a", False, None),
                                                                                          ("b", False, None)]
    assert hosts.drain(led, "b", now=now, who="ops", reason="kernel") and hosts.drain(led, "a", now=now, who="ops")
    rows, seen = status_of(backend.location())
    code, doc = rendered(rows, seen, capsys)
    assert code == 0 and [(h["name"], h["status"], h["drained"]) for h in doc["data"]["hosts"]] == [
        ("a", "up", True), ("b", "up", True)]
    code, text = rendered(rows, seen, capsys, json_out=False)
    assert code == 0
    for name in ("a", "b"):
        assert re.search(rf"host {name} drained since \S+ by ops: its lanes take no new work; 'lanectl host "
                         rf"undrain {name}' takes it back", " ".join(text.split())), text
    led.close()


def test_probe_is_critical_for_a_lost_host_with_work_and_warns_for_a_fenced_one(led, fleet) -> None:  # type: ignore[no-untyped-def]
    hosts.register(led, "a", "inc-a", "boot", 1, T0, LEASE, ["alpha", "beta"])
    hosts.register(led, "b", "inc-b", "boot", 2, T0 + 3, LEASE, ["gamma"])
    hosts.register(led, "c", "inc-c", "boot", 3, T0 + 5, LEASE, [])
    ids = flying_on(led, fleet, "a", "inc-a", 2, T0)

    def judged(t: float, here: str | None = "c") -> probe.ProbeResult:
        res = probe.ProbeResult()
        probe.judge_hosts(res, fleetview.hosts(led, T0 + t), here)
        return res

    res = judged(5)
    assert res.code == probe.OK and res.line() == "LANECTL OK -  | hosts_up=3;;;0;3"
    res = judged(9.5)  # a fenced (no renewal for 9.5 s of 10), b and c up
    assert res.code == probe.WARNING
    assert [c.text for c in res.checks] == [
        f"host a fenced: no lease renewal for 9.5s (lease 10s), it claims no new work; 2 mission(s) in flight "
        f"({ids[0]}, {ids[1]})"]
    res = judged(LEASE + 2)  # a's lease ran out 2 s ago, work on it; b fenced
    assert res.code == probe.CRITICAL
    assert res.line().startswith(f"LANECTL CRITICAL - host a lease expired 2.0s ago with 2 mission(s) in flight on "
                                 f"its lanes ({ids[0]}, {ids[1]}); host b fenced")
    assert "hosts_up=2;;;0;3" in res.line()
    assert judged(LEASE + 2, here="a").code == probe.WARNING  # this host is judged by its supervisor instead
    hosts.reap(led, T0 + LEASE + 2, by="c")
    res = judged(LEASE + 2)  # reaped: its work re-queued; dead with lanes that take no work: a warning
    assert res.code == probe.WARNING and res.checks[0].text == (
        "host a dead: its lanes take no work (alpha, beta); restart its supervisor, or 'lanectl host forget a' if "
        "it is gone for good")
    hosts.forget(led, "a", now=T0 + LEASE + 3, who="alice")
    hosts.stop(led, "b", "inc-b", T0 + LEASE + 3)
    res = judged(LEASE + 3)
    assert [c.text for c in res.checks] == ["host b stopped: its lanes take no work (gamma); start its supervisor "
                                            "again"]
    assert "hosts_up=1;;;0;2" in res.line()  # the forgotten host is not counted
    # an expired host with nothing in flight warns (no work waits on it)
    hosts.register(led, "d", "inc-d", "boot", 4, T0, LEASE, [])
    assert "host d lease expired 4.0s ago (nothing in flight on its lanes: none)" in judged(LEASE + 4).line()


def test_metrics_carry_each_lanes_host_and_each_hosts_lease(backend, fleet) -> None:  # type: ignore[no-untyped-def]
    led = backend.open()
    hosts.register(led, "a", "inc-a", "boot", 1, T0, LEASE, ["alpha", "beta"])
    hosts.register(led, "b", "inc-b", "boot", 2, T0 + 5, LEASE, ["gamma"])
    ids = flying_on(led, fleet, "a", "inc-a", 2, T0)
    m = evidence.metrics_conn(led, window_s=900.0, now=T0 + 12, fleet=fleet)
    assert {r["lane"]: r["host"] for r in m["lanes"]} == {"alpha": "a", "beta": "a", "gamma": "b"}
    assert {g["host"] for g in m["groups"]} == {"a"}
    assert {r["lane"]: r["host"] for r in m["now_state"]["lanes"]} == {"alpha": "a", "beta": "a", "gamma": "b"}
    hs = {h["name"]: h for h in m["hosts"]}
    assert (hs["a"]["status"], hs["a"]["in_flight"], hs["a"]["missions"], hs["a"]["dispatched"]) == (
        "expired", 2, ids, 2)
    assert (hs["b"]["status"], hs["b"]["lease_left_s"], hs["b"]["finished"]) == ("up", 3.0, 0)
    text = evidence.prometheus_text(m)
    for line in ('lanectl_host_up{host="a"} 0', 'lanectl_host_up{host="b"} 1', 'lanectl_host_expired{host="a"} 1',
                 'lanectl_host_fenced{host="b"} 0', 'lanectl_host_lease_left_seconds{host="a"} -2.0',
                 'lanectl_host_in_flight{host="a"} 2', 'lanectl_lane_healthy{lane="gamma",host="b"} 1',
                 'lanectl_lane_in_flight{lane="alpha",host="a"} 1',
                 'lanectl_dispatched{lane="alpha",host="a",class="interactive"} 1'):
        assert line in text.splitlines(), line
    led.close()


def test_a_lane_no_host_claimed_has_no_host_label(backend, fleet) -> None:  # type: ignore[no-untyped-def]
    led = backend.open()
    ms.submit(led, fleet, cls="interactive", payload={"argv": ["x"]}, now=T0)
    tick.run_once(led, fleet, now=T0 + 1)
    m = evidence.metrics_conn(led, window_s=900.0, now=T0 + 2, fleet=fleet)
    assert m["hosts"] == [] and {r["host"] for r in m["lanes"]} == {None}
    text = evidence.prometheus_text(m)
    assert "host=" not in text and "# TYPE lanectl_host_up gauge" in text
    led.close()


runner = CliRunner()


@pytest.fixture
def cli(backend, tmp_path, monkeypatch):  # type: ignore[no-untyped-def]
    """The evidence commands on a ledger shared by web-1 (alpha, this host's lanes.d) and web-2 (gamma)."""
    cfg = tmp_path / "etc"
    (cfg / "lanes.d").mkdir(parents=True)
    (cfg / "lanes.d" / "alpha.toml").write_text('port = 9101\nworkspace = "/var/lib/lanes/alpha"\ncapacity = 1\n')
    monkeypatch.setenv("LANECTL_CONFIG_DIR", str(cfg))
    monkeypatch.setenv("LANECTL_LEDGER", backend.location())
    led = backend.open()
    now = led.clock()
    hosts.register(led, "web-1", "a" * 32, "boot-1", 1, now, LEASE, ["alpha"])
    hosts.register(led, "web-2", "b" * 32, "boot-2", 2, now, LEASE, ["gamma"])
    ms.set_lane(led, "gamma", now=now, healthy=False)
    led.close()
    app = typer.Typer()
    evidence_cli.register(app)
    return app


def run(app, *args: str):  # type: ignore[no-untyped-def]
    res = runner.invoke(app, list(args), prog_name="lanectl")
    return res, (json.loads(res.stdout) if "--json" in args and res.stdout.strip() else None)


def test_events_name_their_host_and_filter_by_it(cli) -> None:  # type: ignore[no-untyped-def]
    res, doc = run(cli, "events", "--host", "web-2", "--json")
    assert res.exit_code == 0, res.output
    evs = doc["data"]["events"]
    assert {("host_started", None), ("lane_host", "gamma")} <= {(e["kind"], e["lane"]) for e in evs}
    assert all(e["host"] == "web-2" and e["lane"] in (None, "gamma") for e in evs)
    res, doc = run(cli, "events", "--json")
    assert {e["host"] for e in doc["data"]["events"]} == {"web-1", "web-2"}
    res, _ = run(cli, "events", "--host", "web-1")
    assert res.exit_code == 0 and "host=web-1 lane=alpha" in res.stdout and "web-2" not in res.stdout
    res, doc = run(cli, "events", "--host", "nobody", "--json")
    assert res.exit_code == 0 and doc["data"]["events"] == []


def test_metrics_and_report_show_each_lanes_host(cli) -> None:  # type: ignore[no-untyped-def]
    res, doc = run(cli, "metrics", "--lane", "gamma", "--json")  # another host's lane, not in this lanes.d
    assert res.exit_code == 0, res.output
    assert [(r["lane"], r["host"]) for r in doc["data"]["lanes"]] == [("gamma", "web-2")]
    assert [h["name"] for h in doc["data"]["hosts"]] == ["web-1", "web-2"]
    res, doc = run(cli, "metrics", "--lane", "nope", "--json")
    assert res.exit_code == 4 and doc["errors"][0]["code"] == "lane_not_found"
    res, _ = run(cli, "metrics")
    assert res.exit_code == 0 and re.search(r"web-2\W+up\W", res.stdout)
    res, doc = run(cli, "report", "--json")
    assert res.exit_code == 0, res.output
    md = doc["data"]["markdown"]
    assert "| lane | host | state |" in md and "## Hosts" in md
    assert re.search(r"\| web-2 \| up \| [0-9T:.\-]+Z \| [0-9.]+s \| gamma \| 0 \|", md)


def test_work_bound_to_another_hosts_lane_is_not_stranded_until_that_host_is_forgotten(led, fleet) -> None:  # type: ignore[no-untyped-def]
    """probe on host a: missions pinned to host b's lane are b's to run (or to fall back from); only once b is
    forgotten is its lane nobody's, and the work bound to it stranded (CRITICAL)."""
    hosts.register(led, "a", "inc-a", "boot", 1, T0, LEASE, ["alpha", "beta"])
    hosts.register(led, "b", "inc-b", "boot", 2, T0, LEASE, ["gamma"])
    m = ms.submit(led, fleet, cls="background", payload={"argv": ["x"]}, lane="gamma", now=T0).mission.id
    here = {"alpha": {}, "beta": {}}
    assert probe.stranded(led, here) == {}
    hosts.stop(led, "b", "inc-b", T0 + 1)  # stopped (expected back): still b's
    assert probe.stranded(led, here) == {}
    hosts.forget(led, "b", now=T0 + 2, who="ops")
    assert probe.stranded(led, here) == {"gamma": 1} and ms.get(led, m).state == "queued"


def test_another_hosts_lane_shows_the_weight_its_host_published(backend, fleet) -> None:  # type: ignore[no-untyped-def]
    led = backend.open()
    now = led.clock()
    hosts.register(led, "a", "inc-a", "boot", 1, now, LEASE, ["alpha", "beta"])
    hosts.register(led, "b", "inc-b", "boot", 2, now, LEASE, ["gamma"],
                   specs={"gamma": tick.lane_spec("gamma", fleet.lanes["gamma"])})
    rows, _ = status_of(backend.location())
    [gamma] = [r for r in rows if r.name == "gamma"]
    assert gamma.remote and gamma.weight == fleet.lanes["gamma"].weight and not gamma.promoted
    led.close()

"""``lanectl hosts`` and ``lanectl host forget`` through typer's CliRunner, on both backends: the JSON shape, the
documented exit codes, the human table."""
from __future__ import annotations

import json

import pytest
import typer
from typer.testing import CliRunner

from lanectl.cli import hosts as host_cli
from lanectl.ledger import hosts

runner = CliRunner()
LEASE = 10.0


@pytest.fixture
def app():
    app = typer.Typer()
    host_cli.register(app)
    return app


@pytest.fixture
def env(backend, tmp_path, monkeypatch):
    cfg = tmp_path / "etc"
    (cfg / "lanes.d").mkdir(parents=True)
    (cfg / "lanes.d" / "alpha.toml").write_text('port = 9101\nworkspace = "/var/lib/lanes/alpha"\ncapacity = 1\n')
    monkeypatch.setenv("LANECTL_CONFIG_DIR", str(cfg))
    monkeypatch.setenv("LANECTL_LEDGER", backend.location())
    backend.open().close()  # as 'lanectl install' would: no other command creates it
    return backend


def run(app, *args):
    res = runner.invoke(app, list(args), prog_name="lanectl")
    doc = json.loads(res.stdout) if "--json" in args and res.stdout.strip() else None
    return res, doc


def test_hosts_lists_state_lease_lanes_and_in_flight(app, env) -> None:  # type: ignore[no-untyped-def]
    res, doc = run(app, "hosts", "--json")
    assert res.exit_code == 0 and doc["data"]["hosts"] == []
    res, _ = run(app, "hosts")
    assert res.exit_code == 0 and "no host has registered yet" in res.stdout
    led = env.open()
    now = led.clock()
    hosts.register(led, "web-1", "a" * 32, "boot-1", 1234, now, LEASE, ["alpha"])
    hosts.register(led, "web-2", "b" * 32, "boot-2", 99, now - 60, LEASE, [])  # its lease ran out a while ago
    res, doc = run(app, "hosts", "--json")
    assert res.exit_code == 0 and doc["command"] == ["hosts"] and doc["status"] == "ok"
    rows = {r["name"]: r for r in doc["data"]["hosts"]}
    assert sorted(rows) == ["web-1", "web-2"]
    one = rows["web-1"]
    assert set(one) == {"name", "incarnation", "boot_id", "pid", "started_at", "heartbeat_at", "lease_expires",
                        "state", "heartbeat_age_s", "lease_left_s", "expired", "lanes", "in_flight", "drained",
                        "drained_at", "drained_by"}
    assert (one["state"], one["incarnation"], one["pid"], one["lanes"], one["in_flight"]) == (
        "up", "a" * 32, 1234, ["alpha"], 0)
    assert 0 < one["lease_left_s"] <= LEASE and one["expired"] is False
    assert rows["web-2"]["expired"] is True and rows["web-2"]["lease_left_s"] < -40
    res, _ = run(app, "hosts")
    assert res.exit_code == 0 and "web-1" in res.stdout and "aaaaaaaa" in res.stdout and "expired" in res.stdout


def test_host_forget_exit_codes(app, env) -> None:  # type: ignore[no-untyped-def]
    led = env.open()
    hosts.register(led, "web-1", "a" * 32, "boot-1", 1234, led.clock(), LEASE, ["alpha"])
    res, doc = run(app, "host", "forget", "nope", "--json")
    assert res.exit_code == 4 and doc["errors"][0]["code"] == "host_unknown"
    res, doc = run(app, "host", "forget", "web-1", "--json")
    assert res.exit_code == 5 and doc["errors"][0]["code"] == "host_alive"
    res, doc = run(app, "host", "forget", "web-1", "--force", "--json")
    assert res.exit_code == 0 and doc["data"] == {"host": "web-1", "changed": True}
    res, doc = run(app, "host", "forget", "web-1", "--json")
    assert res.exit_code == 0 and doc["data"]["changed"] is False
    res, doc = run(app, "hosts", "--json")
    assert doc["data"]["hosts"][0]["state"] == "forgotten"


def test_host_drain_and_undrain_from_any_host(app, env) -> None:  # type: ignore[no-untyped-def]
    """This host's lanes.d/ has alpha; web-2 runs zeta: its drain acts through the ledger from here."""
    led = env.open()
    now = led.clock()
    hosts.register(led, "web-2", "b" * 32, "boot-2", 99, now, LEASE, ["zeta"])
    res, doc = run(app, "host", "drain", "nope", "--json")
    assert res.exit_code == 4 and doc["errors"][0]["code"] == "host_unknown"
    res, doc = run(app, "host", "drain", "web-2", "--reason", "maintenance", "--json")
    assert res.exit_code == 0 and doc["data"] == {"host": "web-2", "changed": True, "lanes": ["zeta"],
                                                  "in_flight": [], "drained": None}
    res, doc = run(app, "host", "drain", "web-2", "--wait", "--json")  # idempotent; nothing in flight: at once
    assert res.exit_code == 0 and doc["data"]["changed"] is False and doc["data"]["drained"] is True
    res, _ = run(app, "host", "drain", "web-2")
    assert res.exit_code == 0 and "already drained" in res.stdout
    res, doc = run(app, "hosts", "--json")
    [row] = doc["data"]["hosts"]
    assert row["drained"] is True and row["drained_by"] and row["drained_at"] is not None
    res, _ = run(app, "hosts")
    assert "drained" in res.stdout
    ev = led.conn.execute("SELECT data FROM events WHERE kind = 'host_drained'").fetchone()[0]
    ev = json.loads(ev) if isinstance(ev, str) else ev
    assert ev["reason"] == "maintenance" and ev["actor"] == row["drained_by"]
    res, doc = run(app, "host", "undrain", "web-2", "--json")
    assert res.exit_code == 0 and doc["data"]["changed"] is True
    res, doc = run(app, "host", "undrain", "web-2", "--json")
    assert res.exit_code == 0 and doc["data"]["changed"] is False
    res, doc = run(app, "host", "undrain", "nope", "--json")
    assert res.exit_code == 4 and doc["errors"][0]["code"] == "host_unknown"


def test_host_drain_wait_times_out_with_exit_7_while_work_is_in_flight(app, env) -> None:  # type: ignore[no-untyped-def]
    from lanectl.dispatch import Assignment
    from lanectl.ledger import missions as ms
    from tests.ledger.conftest import make_fleet

    led = env.open()
    now = led.clock()
    hosts.register(led, "web-2", "b" * 32, "boot-2", 99, now, LEASE, ["alpha"])
    fleet = make_fleet(env.root)
    m = ms.submit(led, fleet, cls="interactive", payload={}, now=now).mission.id
    ms.assign(led, [Assignment(m, "alpha", "interactive")], now=now, lease_sec=600)
    res, doc = run(app, "host", "drain", "web-2", "--wait", "--timeout", "0.3", "--json")
    assert res.exit_code == 7 and doc["errors"][0]["code"] == "host_drain_timeout"
    assert str(m) in doc["errors"][0]["message"]
    res, doc = run(app, "hosts", "--json")
    assert doc["data"]["hosts"][0]["drained"] is True  # it stays drained: the wait only timed out


def test_lane_verbs_act_on_a_lane_of_another_host(backend, tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from lanectl.cli import control
    from lanectl.ledger import lanes as lane_ops
    from lanectl.ledger import missions as ms
    from lanectl.ledger import tick
    from lanectl.config import Lane
    from tests.ledger.conftest import make_fleet

    cfg = tmp_path / "etc"
    (cfg / "lanes.d").mkdir(parents=True)
    (cfg / "lanes.d" / "alpha.toml").write_text('port = 9101\nworkspace = "/var/lib/lanes/alpha"\ncapacity = 1\n')
    monkeypatch.setenv("LANECTL_CONFIG_DIR", str(cfg))
    monkeypatch.setenv("LANECTL_LEDGER", backend.location())
    monkeypatch.setattr("lanectl.systemd.available", lambda: False)
    led = backend.open()
    now = led.clock()
    zeta = Lane(port=9301, workspace="/var/lib/lanes/zeta", capacity=1)
    hosts.register(led, "web-2", "b" * 32, "boot-2", 99, now, LEASE, ["zeta"],
                   specs={"zeta": tick.lane_spec("zeta", zeta)})
    app = typer.Typer()
    control.register(app)
    res, doc = run(app, "drain", "zeta", "--json")
    assert res.exit_code == 0 and doc["data"]["changed"] is True and lane_ops.state_of(led, "zeta") == "drained"
    res, doc = run(app, "drain", "zeta", "--stop", "--json")
    assert res.exit_code == 5 and doc["errors"][0]["code"] == "lane_on_other_host"
    res, doc = run(app, "undrain", "zeta", "--json")
    assert res.exit_code == 0 and doc["data"]["changed"] is True and "host web-2" in doc["data"]["unit"]["note"]
    fleet = make_fleet(tmp_path)
    m = ms.submit(led, fleet, cls="interactive", payload={}, lane="alpha", now=now).mission.id
    res, doc = run(app, "reroute", "alpha", "--to", "zeta", "--json")
    assert res.exit_code == 0 and doc["data"]["missions"] == [m]
    res, doc = run(app, "drain", "nowhere", "--json")
    assert res.exit_code == 4 and doc["errors"][0]["code"] == "lane_not_found"

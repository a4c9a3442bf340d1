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

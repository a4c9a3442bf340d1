"""Issue 13, work across hosts, in the supervisor (turn by turn, chosen ``now`` values, real ledgers, no systemd):
a drained host's own policy pass claims nothing for its lanes and stays drained across a restart of its
supervisor; the supervisor publishes its lanes' specs (what other hosts' passes route by) at start and at reload;
a lane's fallback may name another host's lane on a shared (PostgreSQL) ledger, and a start is refused when no
host of the ledger runs it."""
from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from lanectl import config
from lanectl.errors import ExitCode, LanectlError
from lanectl.ledger import Ledger, hosts, tick
from lanectl.ledger import missions as ms
from lanectl.supervisor import Supervisor
from tests.pgserver import PgServer
from tests.unit.test_supervisor_turns import T0, free_port, supervisor, write_config

HOST_LEASE = 10.0


@pytest.fixture
def sup(tmp_path: Path) -> Iterator[Supervisor]:
    s = supervisor(tmp_path, {"alpha": free_port(), "beta": free_port()})
    try:
        s.start(T0)
        yield s
    finally:
        s.close()


def spec(led: Ledger, lane: str) -> dict:
    row = led.conn.execute("SELECT spec FROM lanes WHERE name = ?", (lane,)).fetchone()
    assert row is not None and row[0] is not None
    return json.loads(row[0])


def test_a_drained_host_claims_nothing_for_its_lanes_and_stays_drained_when_restarted(tmp_path: Path) -> None:
    s = supervisor(tmp_path, {"alpha": free_port(), "beta": free_port()})
    try:
        s.start(T0)
        assert s.ledger is not None
        m = ms.submit(s.ledger, s.fleet, cls="background", payload={}, now=T0).mission.id
        s.dirty = True
        assert s.turn(T0 + 1)
        assert "not healthy" in (ms.get(s.ledger, m).wait_reason or "")  # nothing listens on the lanes' ports
        assert hosts.drain(s.ledger, s.host.name, now=T0 + 2, who="alice")
        s.dirty = True
        assert s.turn(T0 + 3)
        assert f"its host {s.host.name} is drained" in (ms.get(s.ledger, m).wait_reason or "")
    finally:
        s.close()
    again = Supervisor(config.load(tmp_path / "etc"), tmp_path / "state" / "ledger.db", use_systemd=False,
                       callback_socket=str(tmp_path / "callbacks.sock"),
                       lane_uids={"alpha": os.getuid(), "beta": os.getuid()})
    again.open()
    try:
        again.start(T0 + 10)
        assert again.ledger is not None
        h = hosts.get(again.ledger.conn, again.host.name)
        assert h is not None and h.state == "up" and h.drained_at == T0 + 2 and h.drained_by == "alice"
        again.dirty = True
        assert again.turn(T0 + 11)
        assert "is drained" in (ms.get(again.ledger, m).wait_reason or "")
        assert hosts.undrain(again.ledger, again.host.name, now=T0 + 12, who="alice")
        again.dirty = True
        assert again.turn(T0 + 13)
        assert "not healthy" in (ms.get(again.ledger, m).wait_reason or "")
    finally:
        again.close()


def test_the_supervisor_publishes_its_lanes_specs_at_start_and_at_reload(sup: Supervisor, tmp_path: Path) -> None:
    assert sup.ledger is not None
    alpha = spec(sup.ledger, "alpha")
    assert alpha == tick.lane_spec("alpha", sup.fleet.lanes["alpha"])
    assert (alpha["capacity"], alpha["classes"], alpha["fallback"]) == (1, ["background", "interactive"], None)
    f = tmp_path / "etc" / "lanes.d" / "alpha.toml"
    f.write_text(f.read_text().replace("capacity = 1", "capacity = 3\nfallback = \"beta\""))
    assert sup.reload(T0 + 1)
    assert (spec(sup.ledger, "alpha")["capacity"], spec(sup.ledger, "alpha")["fallback"]) == (3, "beta")


def test_a_fallback_outside_lanes_d_is_left_to_the_ledger_on_postgresql(tmp_path: Path) -> None:
    etc = write_config(tmp_path, {"alpha": free_port()})
    f = etc / "lanes.d" / "alpha.toml"
    f.write_text(f.read_text().replace("capacity = 1", 'capacity = 1\nfallback = "zeta"'))
    with pytest.raises(LanectlError) as err:  # SQLite: one host, so the fallback must be a lane of lanes.d/
        config.load(etc)
    assert any(p.code == "fallback_unknown" for p in err.value.problems)
    toml = etc / "lanectl.toml"
    toml.write_text(toml.read_text().replace(f'ledger = "{tmp_path}/state/ledger.db"',
                                             'ledger = "postgresql:///lanectl?host=/nonexistent"'))
    assert config.load(etc).lanes["alpha"].fallback == "zeta"


def test_a_start_is_refused_a_fallback_no_host_runs_and_accepted_once_one_does(tmp_path: Path,
                                                                                pg_server: PgServer) -> None:
    db = pg_server.create_db("fallback")
    url = pg_server.url(db)
    etc = write_config(tmp_path, {"alpha": free_port()})
    f = etc / "lanes.d" / "alpha.toml"
    f.write_text(f.read_text().replace("capacity = 1", 'capacity = 1\nfallback = "zeta"'))
    toml = etc / "lanectl.toml"
    toml.write_text(toml.read_text().replace(f'ledger = "{tmp_path}/state/ledger.db"', f'ledger = "{url}"'))

    def start() -> Supervisor:
        return Supervisor(config.load(etc), url, use_systemd=False, callback_socket=str(tmp_path / "cb.sock"),
                          lane_uids={"alpha": os.getuid()})

    refused = start()
    with pytest.raises(LanectlError) as err:
        refused.open()
    assert refused.locks == []  # the start ended cleanly
    refused.close()  # its ledger connection, LISTEN thread and read pool (opened before the refusal)
    assert err.value.code == "fallback_unknown" and err.value.exit_code == ExitCode.CONFIG
    assert "'alpha' falls back to 'zeta'" in err.value.message
    with Ledger.open(url) as led:
        assert hosts.get(led.conn, config.default_host()) is None  # nothing written
        zeta = config.Lane(port=free_port(), workspace="/var/lib/lanes/zeta")
        hosts.register(led, "web-9", "9" * 32, "boot", 1, led.clock(), HOST_LEASE, ["zeta"],
                       specs={"zeta": tick.lane_spec("zeta", zeta)})
    s = start()
    s.open()
    try:
        s.start(T0)
        assert s.ledger is not None and spec(s.ledger, "alpha")["fallback"] == "zeta"
    finally:
        s.close()
    pg_server.drop_db(db)

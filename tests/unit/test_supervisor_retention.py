"""The supervisor applies ``[ledger] retention`` by itself (issue 17 item 4): its retention pass, started from the
main loop's ``maybe_prune`` when due, archives and deletes finished history older than the setting."""
from __future__ import annotations

import json

import os
import time
from pathlib import Path

from lanectl import config
from lanectl.ledger import Ledger, retention
from lanectl.supervisor import Supervisor
from tests.ledger.test_retention import OLD, big_fleet, generation


def test_the_supervisor_prunes_by_itself(tmp_path: Path) -> None:
    etc, state, ws = tmp_path / "etc", tmp_path / "state", tmp_path / "alpha"
    (etc / "lanes.d").mkdir(parents=True)
    state.mkdir()
    ws.mkdir()
    (etc / "lanectl.toml").write_text(f'state_dir = "{state}"\n[ledger]\npath = "{state}/ledger.db"\n'
                                      'retention = "30d"\nprune_every = "1h"\n')
    (etc / "lanes.d" / "alpha.toml").write_text(f'port = 9001\nworkspace = "{ws}"\n')
    fleet = config.load(etc)
    with Ledger.open(state / "ledger.db") as led:
        old = generation(led, big_fleet(tmp_path), OLD, 400, finish=False)  # 2023: older than 30 days
        young = generation(led, big_fleet(tmp_path), time.time() - 86400, 100)  # yesterday
        finished_old = led.conn.execute(f"SELECT count(*) FROM missions WHERE {retention._FIN_SQL} AND "
                                        "updated_at < ?", (OLD + 86400 * 30,)).fetchone()[0]
    sup = Supervisor(fleet, state / "ledger.db", use_systemd=False, notifier=None,
                     callback_socket=str(tmp_path / "cb.sock"), lane_uids={"alpha": os.getuid()})
    sup.history.next_prune = 0.0
    th = sup.history.maybe_prune(sup.clock.now())
    assert th is not None
    th.join(300)
    assert not th.is_alive() and sup.history.last_prune is not None
    assert sup.history.maybe_prune(sup.clock.now()) is None  # the next one is due in an hour
    archives = list((state / "archive").glob("ledger-*.jsonl.gz"))
    assert len(archives) == 1 and (state / "archive").stat().st_mode & 0o777 == 0o700
    arch = retention.load_archive(archives[0])
    assert arch["end"]["missions"] == finished_old == sup.history.last_prune["missions"]
    with Ledger.open(state / "ledger.db") as led:
        left = {r[0] for r in led.conn.execute("SELECT id FROM missions")}
        assert set(old["running"] + old["queued"]) <= left  # unfinished: kept
        assert set(young["succeeded"]) <= left  # young: kept
        assert not {m["id"] for m in arch["missions"]} & left
        assert [json.loads(r[0])['phase'] for r in led.conn.execute("SELECT data FROM events WHERE kind = 'prune' ORDER BY id")] == ['deleting', 'done']
    sup.close()


def test_no_retention_setting_no_pass(tmp_path: Path) -> None:
    (tmp_path / "etc" / "lanes.d").mkdir(parents=True)
    (tmp_path / "etc" / "lanectl.toml").write_text(f'state_dir = "{tmp_path}/state"\n')
    (tmp_path / "etc" / "lanes.d" / "alpha.toml").write_text(f'port = 9001\nworkspace = "{tmp_path}/alpha"\n')
    sup = Supervisor(config.load(tmp_path / "etc"), tmp_path / "ledger.db", use_systemd=False, notifier=None,
                     callback_socket=str(tmp_path / "cb.sock"), lane_uids={})
    assert sup.history.maybe_prune(sup.clock.now() + 1e6) is None and sup.history.retention_pass(time.time()) is None
    sup.close()

"""The ledger survives kill -9 of any writer at any point: integrity_check stays ok, every committed transaction
is whole (the events replay to the tables), and the file keeps working, at both settings of ``[ledger]
synchronous``: FULL (the default: every commit is synced) and NORMAL, which in WAL mode loses no committed
transaction on a process crash either (only an OS crash could roll back the last ones; docs/ledger.md)."""
from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lanectl.ledger import events

WRITER = r'''
import sys, time
sys.path.insert(0, sys.argv[3])
from tests.ledger.conftest import make_fleet, open_ledger
from pathlib import Path
from lanectl.ledger import missions as ms, tick
fleet = make_fleet(Path(sys.argv[2]))
led = open_ledger(sys.argv[1], synchronous=sys.argv[5])
assert led.conn.execute("PRAGMA synchronous").fetchone()[0] == {"FULL": 2, "NORMAL": 1}[sys.argv[5]]
i = 0
while True:
    now = time.time()
    i += 1
    m = ms.submit(led, fleet, cls=("interactive", "background")[i % 2], payload={"argv": ["x", str(i)]}, now=now,
                  idempotency_key=f"{sys.argv[4]}-{i}").mission
    print(m.id, m.idempotency_key, flush=True)  # acknowledged: the caller was told it is queued
    for d in tick.run_once(led, fleet, now=now).dispatches:
        ms.started(led, d.mission, lane=d.lane, attempt=d.attempt, token=d.token, now=now, lease_sec=30)
        if d.mission % 3:
            ms.complete(led, d.mission, lane=d.lane, attempt=d.attempt, token=d.token, now=now, result={"i": i})
        else:
            ms.fail(led, d.mission, lane=d.lane, attempt=d.attempt, token=d.token, now=now, error="x", retry=True)
'''
ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.backends("sqlite")  # SQLite's file, its WAL and its synchronous settings under kill -9
@pytest.mark.parametrize("sync", ["FULL", "NORMAL"])
def test_kill_9_of_writers_at_random_points_never_corrupts(backend, tmp_path: Path, sync: str) -> None:
    path = backend.path()
    backend.open().close()
    rnd = random.Random(11)
    kills = 0
    for round_ in range(6):
        procs = []
        for n in range(3):
            with (tmp_path / f"acks-{round_}-{n}").open("w") as out:
                procs.append(subprocess.Popen([sys.executable, "-c", WRITER, str(path), str(tmp_path), str(ROOT),
                                               f"r{round_}w{n}", sync], stdout=out, stderr=subprocess.DEVNULL))
        deadline = time.monotonic() + 0.6 + rnd.random()
        while time.monotonic() < deadline:
            time.sleep(rnd.uniform(0.05, 0.25))
            victim = rnd.choice(procs)
            if victim.poll() is None:
                os.kill(victim.pid, signal.SIGKILL)
                kills += 1
        for p in procs:
            if p.poll() is None:
                os.kill(p.pid, signal.SIGKILL)
            p.wait()
    assert kills >= 6
    conn = backend.connect()
    assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
    assert conn.execute("PRAGMA foreign_key_check").fetchall() == []
    n = conn.execute("SELECT count(*) FROM missions").fetchone()[0]
    assert n > 20, "the writers did too little for the test to mean anything"
    acked = [line.split() for f in tmp_path.glob("acks-*") for line in f.read_text().splitlines(keepends=True)
             if line.endswith("\n")]
    assert len(acked) > 20
    kept = dict(conn.execute("SELECT id, idempotency_key FROM missions").fetchall())
    assert all(kept.get(int(mid)) == key for mid, key in acked), "an acknowledged submit was lost or its id reused"
    rebuilt = events.replay(conn)
    for mid, state, attempts, lane in conn.execute("SELECT id, state, attempts, current_lane FROM missions"):
        r = rebuilt[mid]
        assert (r.state, r.attempts, r.lane) == (state, attempts, lane), mid
    depth = dict(conn.execute("SELECT rank, n FROM queue_depth").fetchall())
    queued = dict(conn.execute("SELECT rank, count(*) FROM missions WHERE state = 'queued' GROUP BY rank").fetchall())
    assert {k: v for k, v in depth.items() if v} == queued
    conn.close()
    with backend.open() as led:  # and it still works
        led.conn.execute("SELECT count(*) FROM events").fetchone()

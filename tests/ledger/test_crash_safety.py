"""The ledger survives kill -9 of any writer at any point: integrity_check stays ok, every committed transaction
is whole (the events replay to the tables), and the file keeps working. synchronous=NORMAL in WAL mode loses no
committed transaction on a process crash (only an OS crash could roll back the last ones; docs/ledger.md)."""
from __future__ import annotations

import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

from lanectl.ledger import Ledger, events

WRITER = r'''
import sys, time
sys.path.insert(0, sys.argv[3])
from tests.ledger.conftest import make_fleet
from pathlib import Path
from lanectl.ledger import Ledger
from lanectl.ledger import missions as ms, tick
fleet = make_fleet(Path(sys.argv[2]))
led = Ledger.open(sys.argv[1])
i = 0
while True:
    now = time.time()
    i += 1
    ms.submit(led, fleet, cls=("interactive", "background")[i % 2], payload={"argv": ["x", str(i)]}, now=now,
              idempotency_key=f"{sys.argv[4]}-{i}")
    for d in tick.run_once(led, fleet, now=now).dispatches:
        ms.started(led, d.mission, lane=d.lane, attempt=d.attempt, token=d.token, now=now, lease_sec=30)
        if d.mission % 3:
            ms.complete(led, d.mission, lane=d.lane, attempt=d.attempt, token=d.token, now=now, result={"i": i})
        else:
            ms.fail(led, d.mission, lane=d.lane, attempt=d.attempt, token=d.token, now=now, error="x", retry=True)
'''
ROOT = Path(__file__).resolve().parents[2]


def test_kill_9_of_writers_at_random_points_never_corrupts(tmp_path: Path) -> None:
    path = tmp_path / "state" / "ledger.db"
    Ledger.open(path).close()
    rnd = random.Random(11)
    kills = 0
    for round_ in range(6):
        procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(path), str(tmp_path), str(ROOT), f"r{round_}w{n}"],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for n in range(3)]
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
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
    assert conn.execute("PRAGMA foreign_key_check").fetchall() == []
    n = conn.execute("SELECT count(*) FROM missions").fetchone()[0]
    assert n > 20, "the writers did too little for the test to mean anything"
    rebuilt = events.replay(conn)
    for mid, state, attempts, lane in conn.execute("SELECT id, state, attempts, current_lane FROM missions"):
        r = rebuilt[mid]
        assert (r.state, r.attempts, r.lane) == (state, attempts, lane), mid
    depth = dict(conn.execute("SELECT rank, n FROM queue_depth").fetchall())
    queued = dict(conn.execute("SELECT rank, count(*) FROM missions WHERE state = 'queued' GROUP BY rank").fetchall())
    assert {k: v for k, v in depth.items() if v} == queued
    conn.close()
    with Ledger.open(path) as led:  # and it still works
        led.conn.execute("SELECT count(*) FROM events").fetchone()

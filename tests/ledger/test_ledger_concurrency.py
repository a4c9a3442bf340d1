"""Several processes submit and dispatch against one ledger at once: nothing lost, nothing doubled."""
from __future__ import annotations

import multiprocessing as mp
import time
from pathlib import Path

from conftest import make_fleet, open_ledger

from lanectl.config import ClassPolicy
from lanectl.ledger import events, tick
from lanectl.ledger import missions as ms

PER_PRODUCER = 150


def producer(location: str, root: str, tag: int, q) -> None:
    fleet = make_fleet(Path(root), interactive=ClassPolicy(queue_limit=10**6),
                       background=ClassPolicy(queue_limit=10**6))
    led = open_ledger(location, busy_timeout_s=30)
    worst = 0.0
    for i in range(PER_PRODUCER):
        t = time.monotonic()
        # every key is sent twice: the duplicate must come back as the same mission
        for _ in range(2):
            ms.submit(led, fleet, cls=("interactive", "background")[i % 2], payload={"p": tag, "i": i},
                      idempotency_key=f"p{tag}-{i}", now=time.time())
        worst = max(worst, time.monotonic() - t)
    q.put(("producer", tag, worst))


def dispatcher(location: str, root: str, tag: int, total: int, q) -> None:
    fleet = make_fleet(Path(root))
    led = open_ledger(location, busy_timeout_s=30)
    done = 0
    give_up = time.monotonic() + 60
    while time.monotonic() < give_up:
        res = tick.run_once(led, fleet, now=time.time())
        for d in res.dispatches:
            ms.complete(led, d.mission, lane=d.lane, attempt=d.attempt, token=d.token, now=time.time())
            done += 1
        if not res.dispatches:
            n = led.conn.execute("SELECT count(*) FROM missions WHERE state = 'succeeded'").fetchone()[0]
            if n >= total:
                break
    q.put(("dispatcher", tag, done))


def test_processes_lose_and_double_nothing(backend):
    backend.open().close()
    path, root = backend.location(), str(backend.root)
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    total = 3 * PER_PRODUCER
    procs = [ctx.Process(target=producer, args=(path, root, t, q)) for t in range(3)]
    procs += [ctx.Process(target=dispatcher, args=(path, root, t, total, q)) for t in range(2)]
    for p in procs:
        p.start()
    results = [q.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=30)
        assert p.exitcode == 0
    done_by = [r[2] for r in results if r[0] == "dispatcher"]
    with backend.open() as led:
        c = led.conn
        assert c.execute("SELECT count(*) FROM missions").fetchone()[0] == total
        assert c.execute("SELECT count(DISTINCT idempotency_key) FROM missions").fetchone()[0] == total
        assert c.execute("SELECT count(*) FROM missions WHERE state = 'succeeded'").fetchone()[0] == total
        assert sum(done_by) == total  # every completion by exactly one dispatcher
        assert c.execute("SELECT count(*) FROM attempts").fetchone()[0] == total  # never dispatched twice
        assert c.execute("SELECT count(*) FROM events WHERE kind = 'submitted'").fetchone()[0] == total
        assert c.execute("SELECT count(*) FROM events WHERE kind = 'succeeded'").fetchone()[0] == total
        assert all(r.state == "succeeded" for r in events.replay(c).values())

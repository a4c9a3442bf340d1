"""Issue 3: writer fairness. Several processes write one ledger at once: do they all get through, and how long
does the slowest write wait?

    /opt/lanectl/venv/bin/python bench/writers_bench.py [--producers 4] [--seconds 10] [--rounds 2] [--dir DIR]

One process plays the supervisor: it runs the real loop's ledger work back to back (tick.run_once, then the
callbacks of what it dispatched through apply_callbacks_in in one transaction, as if the lanes had finished at
once), on a connection opened the way the supervisor opens it (no autocheckpoint, a Checkpointer thread). The
producers are separate processes submitting one mission per transaction (what `lanectl submit` and
`Client.submit` do) with a random 0-2 ms pause between submits. Each round runs twice on a fresh ledger: every
process waiting for the write lock with SQLite's busy handler, then with lanectl's (Ledger._begin). Every
write's latency is measured from the call to the return, so time spent waiting for the write lock is included.
Prints one table row per process and Jain's fairness index over the producers' submit counts (1.0 = even).
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lanectl.errors import LanectlError  # noqa: E402
from lanectl.ledger import Checkpointer, Ledger, tick  # noqa: E402
from lanectl.ledger import missions as ms  # noqa: E402
from ledger_bench import fleet  # noqa: E402  (bench/ is sys.path[0]: the same bench fleet)


def producer(path: str, seconds: float, seed: int, poll: bool, out: mp.Queue) -> None:
    rnd = random.Random(seed)
    f = fleet(Path(path).parent, capacity=64)
    led = Ledger.open(path, busy_poll=poll)
    lat, errors = [], 0
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        t = time.perf_counter()
        try:
            ms.submit(led, f, cls=rnd.choice(ms.CLASSES[::2]), payload={"p": seed}, now=time.time())
            lat.append((time.perf_counter() - t) * 1000)
        except LanectlError:
            errors += 1
        time.sleep(rnd.uniform(0, 0.002))
    led.close()
    out.put((f"producer {seed}", lat, errors))


def supervisor(path: str, seconds: float, poll: bool, out: mp.Queue) -> None:
    f = fleet(Path(path).parent, capacity=64)
    led = Ledger.open(path, autocheckpoint=False, busy_poll=poll)
    cp = Checkpointer(path).start()
    lat, errors, done = [], 0, 0
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        t = time.perf_counter()
        try:
            now = time.time()
            res = tick.run_once(led, f, now=now)
            with led.transaction() as conn:
                ms.apply_callbacks_in(conn, [ms.Callback("succeeded", d.mission, d.lane, d.attempt, d.token)
                                             for d in res.dispatches], now=now, lease_sec=60)
            done += len(res.dispatches)
            lat.append((time.perf_counter() - t) * 1000)
        except LanectlError:
            errors += 1
        time.sleep(0.001)
    cp.stop()
    led.close()
    out.put((f"supervisor ({done} completed)", lat, errors))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--producers", type=int, default=4)
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--dir", default=None)
    p.add_argument("--rounds", type=int, default=2)
    args = p.parse_args()
    print(f"{args.producers} producers + 1 supervisor loop, {args.seconds:g} s per run, nproc {os.cpu_count()}")
    for rnd in range(args.rounds):  # alternate the two ways of waiting for the lock, same machine, same run
        for poll in (False, True):
            run(args, poll, f"round {rnd + 1}, " + ("lanectl's lock wait (Ledger._begin)" if poll
                                                    else "SQLite's busy handler"))


def run(args: argparse.Namespace, poll: bool, title: str) -> None:
    base = Path(tempfile.mkdtemp(dir=args.dir))
    path = str(base / "ledger.db")
    Ledger.open(path).close()
    out: mp.Queue = mp.Queue()
    procs = [mp.Process(target=supervisor, args=(path, args.seconds, poll, out))]
    procs += [mp.Process(target=producer, args=(path, args.seconds, i, poll, out)) for i in range(args.producers)]
    for pr in procs:
        pr.start()
    results = [out.get(timeout=args.seconds + 60) for _ in procs]
    for pr in procs:
        pr.join()
    print(f"\n{title}\n| process | writes | per s | p50 | p99 | max | ledger_busy |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    counts = []
    for name, lat, errors in sorted(results):
        lat.sort()
        if name.startswith("producer"):
            counts.append(len(lat))
        print(f"| {name} | {len(lat)} | {len(lat) / args.seconds:.0f} | {statistics.median(lat):.2f} ms | "
              f"{lat[int(len(lat) * 0.99)]:.2f} ms | {lat[-1]:.2f} ms | {errors} |")
    jain = sum(counts) ** 2 / (len(counts) * sum(c * c for c in counts))
    print(f"Jain's fairness index over producer submit counts: {jain:.3f}")
    shutil.rmtree(base)


if __name__ == "__main__":
    main()

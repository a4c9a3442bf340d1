"""procrastinate's side of bench/pg_ledger_bench.py (issue 12): run with the interpreter of a separate venv that has
procrastinate (never lanectl's: `python3 -m venv /opt/bench-procrastinate && /opt/bench-procrastinate/bin/pip install
procrastinate 'psycopg[binary]'`; bench/run-pg-bench makes it).

    python pg_procrastinate_worker.py schema URL              apply procrastinate's schema to the database URL
    python pg_procrastinate_worker.py defer URL N BATCH       defer N no-op jobs, BATCH per batch_defer call
    python pg_procrastinate_worker.py work URL CONCURRENCY    a worker (wait=False: it exits when the queue is empty)

The task is an async no-op (``async def noop(i): return None``): no thread hop, the cheapest task procrastinate runs.
``defer`` and ``work`` print one JSON line with their own wall-clock times (time.time()); ``work`` first prints
``ready`` once its connection pool is open and then waits for a line on stdin, so that start-up (imports, the pool)
is outside the measured time, as it is for lanectl's claimers.
"""
from __future__ import annotations

import asyncio
import json
import logging
import sys
import time

import procrastinate

# the app lives in this script (__main__): the worker runs it here, so procrastinate's warning about that is moot
logging.getLogger("procrastinate.blueprints").setLevel(logging.ERROR)
URL = sys.argv[2] if len(sys.argv) > 2 else ""
app = procrastinate.App(connector=procrastinate.PsycopgConnector(conninfo=URL, min_size=1, max_size=4))


@app.task(name="noop", queue="bench")
async def noop(i: int) -> None:
    return None


async def schema() -> None:
    async with app.open_async():
        await app.schema_manager.apply_schema_async()


async def defer(n: int, batch: int) -> None:
    async with app.open_async():
        t0 = time.time()
        for start in range(0, n, batch):
            await noop.batch_defer_async(*({"i": i} for i in range(start, min(n, start + batch))))
        t1 = time.time()
    print(json.dumps({"start": t0, "end": t1}), flush=True)


async def work(concurrency: int) -> None:
    async with app.open_async():
        await app.job_manager.check_connection_async()
        print("ready", flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
        t0 = time.time()
        await app.run_worker_async(queues=["bench"], concurrency=concurrency, wait=False,
                                   install_signal_handlers=False)
        t1 = time.time()
    print(json.dumps({"start": t0, "end": t1}), flush=True)


def main() -> None:
    cmd = sys.argv[1]
    if cmd == "schema":
        asyncio.run(schema())
    elif cmd == "defer":
        asyncio.run(defer(int(sys.argv[3]), int(sys.argv[4])))
    elif cmd == "work":
        asyncio.run(work(int(sys.argv[3])))
    else:
        raise SystemExit(f"pg_procrastinate_worker: unknown command {cmd!r}")


if __name__ == "__main__":
    main()

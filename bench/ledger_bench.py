"""Ledger benchmark (issue 3): full mission lifecycle and dispatch-decision latency.

    /opt/lanectl/venv/bin/python bench/ledger_bench.py [--n 3000] [--runs 3] [--sizes 1000,100000,1000000]

Lifecycle = submit -> dispatch decision + assignment -> complete, driven in batches of --batch missions:
  lanectl/percall  every submit and every completion is its own transaction; one tick per batch
  lanectl/group    group commit: a batch of submits in one transaction, one tick, completions in one transaction
  huey             SqliteHuey: enqueue a batch, then dequeue + execute (stores the result) each task
  raw              the SQLite ceiling: INSERT, claim (UPDATE ... RETURNING), complete; one transaction each
each at synchronous=NORMAL and FULL (WAL), plus huey at its defaults. Medians of --runs runs, same process.
FULL is lanectl's default since issue 10 (a commit is on disk when it returns); NORMAL was the default before.
Dispatch latency: one interactive mission submitted, then run_once timed (decision + assignment, one
transaction), with N background missions queued (lanes do not serve them, so they are scanned and skipped)
and 1M finished missions in history; with --pinned K, K of the N are bound to a drained lane (issue 16: a
blocked backlog must not slow or stall the pass). Performance is measured here, never asserted in tests.
"""
from __future__ import annotations

import argparse
import os
import platform
import shutil
import sqlite3
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lanectl.config import ClassPolicy, Lane, LaneSet, Settings  # noqa: E402
from lanectl.ledger import Ledger, tick  # noqa: E402
from lanectl.ledger import missions as ms  # noqa: E402

BIG = 10**9


def fleet(tmp: Path, classes: list[str] | None = None, capacity: int = 1024, lanes: int = 1) -> LaneSet:
    lane = Lane(port=9001, workspace="/var/lib/lanes/a", capacity=capacity,
                classes=classes or ["interactive", "deadline", "background"])
    pol = {c: ClassPolicy(queue_limit=BIG) for c in ("interactive", "deadline", "background")}
    fleet_lanes = {"a": lane}
    if lanes > 1:  # b serves everything; --pinned binds a backlog to it and drains it
        fleet_lanes["b"] = Lane(port=9002, workspace="/var/lib/lanes/b", capacity=capacity)
    return LaneSet(fleet_lanes, Settings(classes=pol), tmp, tmp)


def lanectl_lifecycle(path: Path, n: int, batch: int, sync: str, group: bool) -> float:
    """per-call: submit, complete one mission per transaction (what one CLI call or one callback costs alone).
    group: what a producer's ``submit_many`` and the supervisor's callback group commit do: a batch of submits
    in one transaction, one tick, the batch's completions through ``apply_callbacks_in`` in one transaction."""
    f = fleet(path.parent)
    led = Ledger.open(path, synchronous=sync)  # type: ignore[arg-type]
    lease = f.settings.leases.lease_sec
    t0 = time.perf_counter()
    for start in range(0, n, batch):
        now = time.time()
        ids = range(start, min(n, start + batch))
        if group:
            ms.submit_many(led, f, [ms.SubmitRequest("interactive", {"i": i}) for i in ids], now=now)
        else:
            for i in ids:
                ms.submit(led, f, cls="interactive", payload={"i": i}, now=now)
        res = tick.run_once(led, f, now=now)
        if group:
            with led.transaction() as conn:
                out = ms.apply_callbacks_in(conn, [ms.Callback("succeeded", d.mission, d.lane, d.attempt, d.token)
                                                   for d in res.dispatches], now=now, lease_sec=lease)
            assert all(o.changed for o in out)
        else:
            for d in res.dispatches:
                ms.complete(led, d.mission, lane=d.lane, attempt=d.attempt, token=d.token, now=now)
    elapsed = time.perf_counter() - t0
    done = led.conn.execute("SELECT count(*) FROM missions WHERE state = 'succeeded'").fetchone()[0]
    assert done == n, (done, n)
    led.close()
    return n / elapsed


def huey_lifecycle(path: Path, n: int, batch: int, sync: str | None) -> float:
    from huey import SqliteHuey
    from huey.storage import SqliteStorage

    class Storage(SqliteStorage):
        def _create_connection(self):  # type: ignore[no-untyped-def]
            conn = super()._create_connection()
            if sync is not None:
                conn.execute(f"pragma synchronous={sync}")
            return conn

    class Huey(SqliteHuey):
        storage_class = Storage

    h = Huey("bench", filename=str(path))

    @h.task()
    def noop(i: int) -> int:
        return i

    t0 = time.perf_counter()
    for start in range(0, n, batch):
        for i in range(start, min(n, start + batch)):
            noop(i)
        for _ in range(min(n, start + batch) - start):
            h.execute(h.dequeue())
    elapsed = time.perf_counter() - t0
    assert len(h) == 0
    return n / elapsed


def raw_lifecycle(path: Path, n: int, batch: int, sync: str) -> float:
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute(f"PRAGMA synchronous = {sync}")
    conn.execute("CREATE TABLE q (id INTEGER PRIMARY KEY, state INTEGER NOT NULL, payload TEXT, result TEXT)")
    conn.execute("CREATE INDEX q_queued ON q (id) WHERE state = 0")
    t0 = time.perf_counter()
    for start in range(0, n, batch):
        for i in range(start, min(n, start + batch)):
            conn.execute("INSERT INTO q (state, payload) VALUES (0, ?)", (f'{{"i": {i}}}',))
        for _ in range(min(n, start + batch) - start):
            mid = conn.execute("UPDATE q SET state = 1 WHERE id = (SELECT id FROM q WHERE state = 0 ORDER BY id "
                               "LIMIT 1) RETURNING id").fetchone()[0]
            conn.execute("UPDATE q SET state = 2, result = 'ok' WHERE id = ? AND state = 1", (mid,))
    elapsed = time.perf_counter() - t0
    conn.close()
    return n / elapsed


def lifecycle(args: argparse.Namespace) -> None:
    cases = [
        ("raw 3 statements", "NORMAL", lambda p: raw_lifecycle(p, args.n, args.batch, "NORMAL")),
        ("huey SqliteHuey", "NORMAL", lambda p: huey_lifecycle(p, args.n, args.batch, "1")),
        ("lanectl per-call", "NORMAL", lambda p: lanectl_lifecycle(p, args.n, args.batch, "NORMAL", False)),
        ("lanectl group commit", "NORMAL", lambda p: lanectl_lifecycle(p, args.n, args.batch, "NORMAL", True)),
        ("raw 3 statements", "FULL", lambda p: raw_lifecycle(p, args.n, args.batch, "FULL")),
        ("huey SqliteHuey (defaults)", "FULL", lambda p: huey_lifecycle(p, args.n, args.batch, None)),
        ("lanectl per-call", "FULL", lambda p: lanectl_lifecycle(p, args.n, args.batch, "FULL", False)),
        ("lanectl group commit", "FULL", lambda p: lanectl_lifecycle(p, args.n, args.batch, "FULL", True)),
    ]
    results: dict[tuple[str, str], list[float]] = {}
    for run in range(args.runs):
        for name, sync, fn in cases:
            d = Path(tempfile.mkdtemp(dir=args.dir))
            results.setdefault((name, sync), []).append(fn(d / "bench.db"))
            shutil.rmtree(d)
    print(f"\nlifecycle: {args.n} missions, batches of {args.batch}, median of {args.runs} runs (missions/s)")
    med = {k: statistics.median(v) for k, v in results.items()}
    for (name, sync), value in med.items():
        ratio_h = value / med[("huey SqliteHuey" if sync == "NORMAL" else "huey SqliteHuey (defaults)", sync)]
        ratio_r = value / med[("raw 3 statements", sync)]
        print(f"| {name} | WAL+{sync} | {value:,.0f} | {ratio_h:.2f}x | {ratio_r:.2f}x |")


def build_ledger(path: Path, history: int, queued: int, pinned: int = 0) -> None:
    """``history`` finished and ``queued`` background missions; ``pinned`` more, bound to lane ``b`` (drained, so
    none of them can run: an unplaceable backlog), submitted through the ledger's API."""
    if pinned:
        f = fleet(path.parent, lanes=2)
        led = Ledger.open(path)
        from lanectl.ledger import lanes as lane_ops

        lane_ops.drain(led, f, "b", now=time.time(), who="bench")
        req = ms.SubmitRequest("background", {"argv": ["true"]}, lane="b")
        for start in range(0, pinned, ms.MAX_BATCH):
            ms.submit_many(led, f, [req] * min(ms.MAX_BATCH, pinned - start), now=time.time() - 3600)
        led.close()
    led = Ledger.open(path)
    now = time.time() - 3600
    row = ("background", 2, '{"argv":["true"]}', "0" * 64, now, now)
    with led.transaction() as conn:
        step = 100_000
        for start in range(0, history, step):
            conn.executemany("INSERT INTO missions (class, rank, state, payload, request_hash, max_attempts, "
                             "attempts, created_at, updated_at) VALUES (?, ?, 'succeeded', ?, ?, 3, 1, ?, ?)",
                             [row] * min(step, history - start))
        for start in range(0, queued, step):
            conn.executemany("INSERT INTO missions (class, rank, state, payload, request_hash, max_attempts, "
                             "created_at, updated_at) VALUES (?, ?, 'queued', ?, ?, 3, ?, ?)",
                             [row] * min(step, queued - start))
    led.conn.execute("ANALYZE")
    led.close()


def _decisions(led: Ledger, f: LaneSet, samples: int) -> list[float]:
    out = []
    for i in range(samples):
        now = time.time()
        ms.submit(led, f, cls="interactive", payload={"i": i}, now=now)
        t = time.perf_counter()
        res = tick.run_once(led, f, now=now)
        out.append((time.perf_counter() - t) * 1000)
        d = res.dispatches[0]
        ms.complete(led, d.mission, lane=d.lane, attempt=d.attempt, token=d.token, now=now)
    return sorted(out)


def _pct(samples: list[float], q: float) -> float:
    return samples[min(len(samples) - 1, int(len(samples) * q))]


def latency(args: argparse.Namespace) -> None:
    """Two connections in turn on the same ledger: SQLite's defaults (a commit that crosses 1000 WAL pages runs the
    checkpoint) and the supervisor's (Ledger.open(autocheckpoint=False), a Checkpointer thread, gc.freeze())."""
    import gc

    from lanectl.ledger import Checkpointer

    base = Path(tempfile.mkdtemp(dir=args.dir))
    print(f"\ndispatch decision (run_once) for one interactive mission; {args.history:,} finished in history, "
          f"{args.pinned:,} of the queued pinned to a drained lane, {args.warmup} passes of warm-up, "
          f"{args.samples} samples per connection, alternating blocks of {args.samples // 4}")
    for size in args.sizes:
        path = base / f"l{size}.db"
        t0 = time.perf_counter()
        build_ledger(path, args.history, size - args.pinned, args.pinned)
        built = time.perf_counter() - t0
        f = fleet(base, classes=["interactive"], capacity=4, lanes=2 if args.pinned else 1)
        if args.warmup:  # passes before timing (a new ledger writes wait reasons onto a blocked backlog first)
            led = Ledger.open(path)
            _decisions(led, f, args.warmup)
            led.close()
        results: dict[str, list[float]] = {"default": [], "supervisor": []}
        block = max(1, args.samples // 4)
        for _ in range(4):  # alternate, so drift and neighbours hit both alike
            led = Ledger.open(path)
            results["default"] += _decisions(led, f, block)
            led.close()
            led = Ledger.open(path, autocheckpoint=False)
            cp = Checkpointer(path).start()
            gc.freeze()
            results["supervisor"] += _decisions(led, f, block)
            cp.stop()
            gc.unfreeze()
            led.close()
        led = Ledger.open(path)
        t = time.perf_counter()
        page = ms.list_missions(led, state="queued", limit=100)
        list_ms = (time.perf_counter() - t) * 1000
        t = time.perf_counter()
        ms.get(led, page[0].id)
        ms.attempts_of(led, page[0].id)
        show_ms = (time.perf_counter() - t) * 1000
        led.close()
        for name, samples in results.items():
            samples.sort()
            print(f"| {size:,} queued | {name} | {_pct(samples, 0.5):.2f} ms | {_pct(samples, 0.9):.2f} ms | "
                  f"{_pct(samples, 0.99):.2f} ms | {samples[-1]:.2f} ms |")
        print(f"  list first page {list_ms:.1f} ms, show {show_ms:.2f} ms (library calls); built in {built:.0f} s, "
              f"{path.stat().st_size / 1e6:.0f} MB")
        if args.keep:
            print(f"  kept: {path}")
        else:
            path.unlink()
    if not args.keep:
        shutil.rmtree(base)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--n", type=int, default=3000)
    p.add_argument("--batch", type=int, default=100)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--sizes", default="1000,100000,1000000")
    p.add_argument("--history", type=int, default=1_000_000)
    p.add_argument("--samples", type=int, default=2000)
    p.add_argument("--keep", action="store_true", help="Keep the built ledgers (for timing the CLI on them).")
    p.add_argument("--dir", default=None, help="Where the temporary ledgers go (default: $TMPDIR).")
    p.add_argument("--skip", default="", help="lifecycle or latency")
    p.add_argument("--pinned", type=int, default=0,
                   help="Of the queued missions, this many are bound to a drained lane (a blocked backlog).")
    p.add_argument("--warmup", type=int, default=0, help="Untimed dispatch passes before the timed ones.")
    args = p.parse_args()
    args.sizes = [int(s) for s in args.sizes.split(",") if s]
    print(f"machine: nproc {os.cpu_count()}, python {platform.python_version()}, sqlite {sqlite3.sqlite_version}, "
          f"{platform.platform()}")
    if "lifecycle" not in args.skip:
        lifecycle(args)
    if "latency" not in args.skip:
        latency(args)


if __name__ == "__main__":
    main()

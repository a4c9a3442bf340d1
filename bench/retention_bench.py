"""Issue 17 item 4: ledger bytes per mission, prune throughput, and read latencies after a prune.

    /opt/lanectl/venv/bin/python bench/retention_bench.py [--old 1000000] [--young 50000] [--runs 15]

Builds a ledger through the real write path (``submit_many`` in batches of 1,000, one ``tick.run_once``, the
batch's ``started`` and ``succeeded`` callbacks through ``apply_callbacks_in``: 4 events per mission, as a lane's
missions leave), --old missions 60 days ago and --young in the last hour, then:

1. bytes per mission: the database file after a TRUNCATE checkpoint / missions (and events per mission);
2. read latencies (median of --runs, in-process on one connection, after one warm-up): the ledger reads behind
   ``status`` (state counts), ``probe`` (``probe.queue_figures``), ``missions`` (first page of 100 and ``mission
   show`` of the newest), ``metrics`` (``evidence.metrics`` over 15 minutes); and end to end ``lanectl missions
   --json`` and ``lanectl metrics --json`` (process start to exit);
3. ``retention.prune --older-than 30d`` with its archive: wall time, missions/s and events/s, archive size;
4. the same reads after the prune, and on a baseline built in the same run that never held the old missions
   (only the --young ones): the ratio after/baseline says whether pruned history leaves anything slow behind.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lanectl import evidence, probe  # noqa: E402
from lanectl.config import ClassPolicy, Lane, LaneSet, LeaseSettings, Settings  # noqa: E402
from lanectl.ledger import Ledger, retention, tick  # noqa: E402
from lanectl.ledger import missions as ms  # noqa: E402

VENV = Path(os.environ.get("LANECTL_VENV", "/opt/lanectl/venv"))
DAY = 86400.0


def fleet(tmp: Path) -> LaneSet:
    pol = {c: ClassPolicy(queue_limit=10**8) for c in ("interactive", "deadline", "background")}
    return LaneSet({"a": Lane(port=9001, workspace="/var/lib/lanes/a", capacity=1024)},
                   Settings(classes=pol, leases=LeaseSettings(lease_sec=10 * DAY)), tmp, tmp)


def build(path: Path, f: LaneSet, n: int, start: float, span: float) -> None:
    led = Ledger.open(path, synchronous="NORMAL")  # the build only; sizes and reads do not depend on it
    lease = f.settings.leases.lease_sec
    for i in range(0, n, 1000):
        now = start + span * i / max(1, n)
        reqs = [ms.SubmitRequest("background", {"argv": ["/usr/bin/job", "--item", str(j)]})
                for j in range(i, min(n, i + 1000))]
        ms.submit_many(led, f, reqs, now=now)
        while True:  # a pass assigns a bounded number: until the batch is all through
            res = tick.run_once(led, f, now=now + 1)
            if not res.dispatches:
                break
            with led.transaction() as conn:
                cbs = [ms.Callback("started", d.mission, d.lane, d.attempt, d.token) for d in res.dispatches]
                cbs += [ms.Callback("succeeded", d.mission, d.lane, d.attempt, d.token, result={"exit_code": 0,
                        "output_tail": "done\n"}) for d in res.dispatches]
                ms.apply_callbacks_in(conn, cbs, now=now + 2, lease_sec=lease)
    led.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    led.close()


def file_bytes(path: Path) -> int:
    return path.stat().st_size + (Path(str(path) + "-wal").stat().st_size if Path(str(path) + "-wal").exists() else 0)


def median_ms(fn, runs: int) -> float:  # type: ignore[no-untyped-def]
    fn()
    xs = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        xs.append((time.perf_counter() - t) * 1000)
    return statistics.median(xs)


def reads(path: Path, runs: int, now: float) -> dict[str, float]:
    led = Ledger.open(path, migrate=False)
    newest = led.conn.execute("SELECT max(id) FROM missions").fetchone()[0]
    out = {
        "status: state counts": median_ms(lambda: ms.state_counts(led.conn), runs),
        "probe: queue figures": median_ms(lambda: probe.queue_figures(led.conn, {}, now), runs),
        "missions: first page (100)": median_ms(lambda: ms.list_missions(led, limit=100), runs),
        "mission show (newest)": median_ms(lambda: (ms.get(led, newest), ms.attempts_of(led, newest)), runs),
        "metrics: 15 min window": median_ms(lambda: evidence.metrics(led, 900, now), runs),
    }
    led.close()
    lanectl = str(VENV / "bin" / "lanectl")
    for name, cmd in (("CLI: lanectl missions --json", [lanectl, "missions", "--json", "--ledger", str(path)]),
                      ("CLI: lanectl metrics --json", [lanectl, "metrics", "--json", "--ledger", str(path)])):
        def run(cmd: list[str] = cmd) -> None:
            subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, env={**os.environ,
                                                                            "LANECTL_CONFIG_DIR": str(path.parent.parent / "etc")})
        out[name] = median_ms(run, max(5, runs // 3))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--old", type=int, default=1_000_000)
    ap.add_argument("--young", type=int, default=50_000)
    ap.add_argument("--runs", type=int, default=15)
    ap.add_argument("--dir", default=None)
    args = ap.parse_args()
    tmp = Path(args.dir or tempfile.mkdtemp(prefix="retention-bench-"))
    f = fleet(tmp)
    (tmp / "etc" / "lanes.d").mkdir(parents=True, exist_ok=True)  # for the CLI runs
    (tmp / "etc" / "lanectl.toml").write_text(f'state_dir = "{tmp}/state"\n')
    (tmp / "etc" / "lanes.d" / "a.toml").write_text('port = 9001\nworkspace = "/var/lib/lanes/a"\ncapacity = 1024\n')
    now = time.time()
    print(f"# machine: {platform.node()} {os.cpu_count()} CPUs, {platform.platform()}, Python "
          f"{platform.python_version()}, SQLite {__import__('sqlite3').sqlite_version}")
    print(f"# old={args.old} young={args.young} runs={args.runs} dir={tmp}")
    big, base = tmp / "big" / "ledger.db", tmp / "base" / "ledger.db"
    t = time.perf_counter()
    build(big, f, args.old, now - 60 * DAY, 3600.0 * 24)
    build(big, f, args.young, now - 850, 800.0)
    print(f"built {args.old + args.young} missions in {time.perf_counter() - t:.0f} s")
    build(base, f, args.young, now - 850, 800.0)
    led = Ledger.open(big, migrate=False)
    n_m = led.conn.execute("SELECT count(*) FROM missions").fetchone()[0]
    n_e = led.conn.execute("SELECT count(*) FROM events").fetchone()[0]
    n_a = led.conn.execute("SELECT count(*) FROM attempts").fetchone()[0]
    led.close()
    size = file_bytes(big)
    print(f"\n## size: {n_m} missions, {n_a} attempts, {n_e} events ({n_e / n_m:.2f} per mission); "
          f"{size / 1e6:.1f} MB; {size / n_m:.0f} bytes per mission")
    before = reads(big, args.runs, now)
    baseline = reads(base, args.runs, now)
    led = Ledger.open(big, migrate=False)
    (tmp / "archive").mkdir(exist_ok=True)
    t = time.perf_counter()
    res = retention.prune(led, cutoff=now - 30 * DAY, archive=tmp / "archive" / "old.jsonl.gz", now=now)
    took = time.perf_counter() - t
    led.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    led.close()
    after = reads(big, args.runs, now)
    print(f"\n## prune --older-than 30d: {res.missions} missions, {res.attempts} attempts, {res.events} events in "
          f"{took:.1f} s = {res.missions / took:,.0f} missions/s, {res.events / took:,.0f} events/s; archive "
          f"{res.archive_bytes / 1e6:.1f} MB ({res.archive_bytes / max(1, res.missions):.0f} bytes per mission); "
          f"ledger {size / 1e6:.1f} MB -> {file_bytes(big) / 1e6:.1f} MB (baseline of {args.young} missions: "
          f"{file_bytes(base) / 1e6:.1f} MB)")
    print("\n## read latency, median ms\n")
    print("| read | before prune | after prune | baseline (never held them) | after / baseline |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for k in before:
        print(f"| {k} | {before[k]:.2f} | {after[k]:.2f} | {baseline[k]:.2f} | {after[k] / baseline[k]:.2f}x |")


if __name__ == "__main__":
    main()

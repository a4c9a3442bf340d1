"""Issue 3: `lanectl missions --state queued --json` (first page) and `lanectl mission show ID --json` on a big
ledger, end to end (process start to exit), beside baselines in the same run.

    /opt/lanectl/venv/bin/python bench/cli_reads_bench.py --ledger PATH [--runs 30]

Build the ledger with `bench/ledger_bench.py --skip lifecycle --sizes 1000000 --keep` (1M queued background
missions + 1M finished). Commands run interleaved round-robin with the order rotated every round, after 3
untimed warm-up rounds; each is spawned with subprocess.run and timed with perf_counter; every exit code must be 0.
Baselines: the same two reads through the typer application (what every other command costs), the `sqlite3`
shell running the equivalent queries, and `python -c pass` (the floor of any Python CLI).
"""
from __future__ import annotations

import argparse
import os
import sqlite3
import statistics
import subprocess
import sys
import time
from pathlib import Path

VENV = Path(os.environ.get("LANECTL_VENV", "/opt/lanectl/venv"))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--ledger", required=True)
    p.add_argument("--runs", type=int, default=30)
    args = p.parse_args()
    led = args.ledger
    conn = sqlite3.connect(led)
    mid = conn.execute("SELECT id FROM missions WHERE state = 'queued' ORDER BY id LIMIT 1").fetchone()[0]
    total = conn.execute("SELECT count(*) FROM missions").fetchone()[0]
    queued = conn.execute("SELECT n FROM queue_depth WHERE rank = 2").fetchone()[0]
    conn.close()
    lanectl, py = str(VENV / "bin" / "lanectl"), str(VENV / "bin" / "python")
    typer_app = "import sys; from lanectl.cli.main import app; app(prog_name='lanectl')"
    cmds = {
        "lanectl missions --state queued --json": [lanectl, "missions", "--state", "queued", "--json", "--ledger", led],
        "lanectl mission show ID --json": [lanectl, "mission", "show", str(mid), "--json", "--ledger", led],
        "same list through typer": [py, "-c", typer_app, "missions", "--state", "queued", "--json", "--ledger", led],
        "same show through typer": [py, "-c", typer_app, "mission", "show", str(mid), "--json", "--ledger", led],
        "sqlite3 -json (list query)": ["sqlite3", "-json", led, "SELECT * FROM missions WHERE state = 'queued' "
                                       "ORDER BY id LIMIT 100"],
        "sqlite3 -json (show queries)": ["sqlite3", "-json", led, f"SELECT * FROM missions WHERE id = {mid}; "
                                         f"SELECT * FROM attempts WHERE mission = {mid}"],
        "python -c pass": [py, "-c", "pass"],
    }
    samples: dict[str, list[float]] = {k: [] for k in cmds}
    names = list(cmds)
    for rnd in range(3 + args.runs):
        order = names[rnd % len(names):] + names[:rnd % len(names)]
        for name in order:
            t = time.perf_counter()
            proc = subprocess.run(cmds[name], capture_output=True)
            dt = (time.perf_counter() - t) * 1000
            if proc.returncode != 0:
                sys.exit(f"{name}: exit {proc.returncode}: {proc.stderr[-500:]!r}")
            if rnd >= 3:
                samples[name].append(dt)
    print(f"ledger {led}: {total:,} missions, {queued:,} queued; {args.runs} interleaved rounds, all exits 0")
    print("| command | median | p90 | min | max |\n|---|---:|---:|---:|---:|")
    for name, s in samples.items():
        s.sort()
        print(f"| `{name}` | {statistics.median(s):.1f} ms | {s[int(len(s) * 0.9)]:.1f} ms | {s[0]:.1f} ms | "
              f"{s[-1]:.1f} ms |")


if __name__ == "__main__":
    main()

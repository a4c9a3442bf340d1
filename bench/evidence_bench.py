"""Issue 5: `lanectl metrics --window 1h` on a 1M-mission ledger (goal: under 500 ms), and the library call.

1. Builds a ledger of N missions (default 1,000,000) submitted over the 24 hours before now, with matching
   attempts and events, the way the ledger API writes them: submitted, dispatched (3 % with fallback_from),
   started, succeeded / failed (3 %) / requeued then a second attempt (2 %), a few dead and cancelled, the last
   missions still running or queued, and a lane_invocation now and then. Timestamps: exponential queue waits
   (mean 0.4 s), log-normal run times (median 2 s). Rows go in with executemany in one transaction, events in
   time order; the indexes are dropped first and re-created from their own SQL afterwards (same schema).
2. Times `lanectl.evidence.metrics(window=1h)` in-process (median of --runs) and the command
   `lanectl metrics --window 1h --json` end to end (subprocess, median of --runs), plus `--window 15m`,
   `events --since 1h --kind drain` and `report --since 24h` once each for scale.

The ledger is kept in --dir (reused by the next run when N matches, unless --rebuild). Prints one JSON document
on stdout; progress on stderr.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import sqlite3
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PY = os.environ.get("LANECTL_PY", "/opt/lanectl/venv/bin/python")
HASH = "0" * 64
LANES = {"alpha": ("interactive", "deadline"), "beta": ("interactive", "deadline", "background"),
         "gamma": ("deadline", "background")}
CLASS_MIX = (("interactive", 0.5), ("deadline", 0.2), ("background", 0.3))
RANK = {"interactive": 0, "deadline": 1, "background": 2}
# The command as lanectl's entry point will run it once register() is wired in lanectl/cli/main.py; until then
# the same app with lanectl.cli.evidence registered on it (same imports, same start-up cost).
ENTRY = ("import sys; from lanectl.cli.main import app\n"
         "if not any(c.name == 'metrics' for c in app.registered_commands):\n"
         "    from lanectl.cli.evidence import register; register(app)\n"
         "app(prog_name='lanectl')")


def log(msg: str) -> None:
    print(f"evidence_bench: {msg}", file=sys.stderr, flush=True)


def write_config(d: Path) -> None:
    (d / "lanes.d").mkdir(parents=True, exist_ok=True)
    (d / "lanectl.toml").write_text("")
    for i, (name, classes) in enumerate(LANES.items()):
        (d / "lanes.d" / f"{name}.toml").write_text(
            f'port = {8701 + i}\nworkspace = "/var/lib/lanes/{name}"\ncapacity = 16\n'
            f"classes = {json.dumps(list(classes))}\n")


def pick_class(r: float) -> str:
    for cls, share in CLASS_MIX:
        if r < share:
            return cls
        r -= share
    return "background"


def build(path: Path, n: int, end: float, seed: int = 5) -> dict[str, float]:
    from lanectl.ledger import Ledger

    t_start = time.perf_counter()
    for suffix in ("", "-wal", "-shm"):
        Path(str(path) + suffix).unlink(missing_ok=True)
    Ledger.open(path).close()  # schema through the real migrations
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA synchronous = OFF")
    indexes = conn.execute("SELECT name, sql FROM sqlite_master WHERE type = 'index' AND sql IS NOT NULL "
                           "AND tbl_name IN ('missions', 'attempts', 'events')").fetchall()
    rnd = random.Random(seed)
    lane_for = {cls: [ln for ln, cs in LANES.items() if cls in cs] for cls in RANK}
    missions, attempts, events = [], [], []
    start = end - 86400.0
    for mid in range(1, n + 1):
        created = start + (mid - 0.5) * 86400.0 / n
        cls = pick_class(rnd.random())
        lane = rnd.choice(lane_for[cls])
        ev = [(created, "submitted", mid, None, None, None, "queued", json.dumps({"cls": cls}))]
        roll = rnd.random()
        t = created + rnd.expovariate(1 / 0.4)
        if t >= end:  # still queued at the end
            missions.append((mid, cls, RANK[cls], "queued", None, 0, created, created))
            events += ev
            continue
        n_att = 2 if roll < 0.02 else 1
        state, current = "succeeded", None
        for att in range(1, n_att + 1):
            fb = rnd.random() < 0.03
            data = {"cls": cls, "fallback_from": "alpha" if fb else None}
            ev.append((t, "dispatched", mid, lane, att, None, "dispatched",
                       json.dumps({k: v for k, v in data.items() if v is not None}, sort_keys=True)))
            started = t + 0.003
            fin = started + rnd.lognormvariate(math.log(2.0), 0.8)
            if fin >= end:  # running at the end
                attempts.append((mid, att, lane, cls, "running", t, started, None))
                ev.append((started, "started", mid, lane, att, None, "running", "{}"))
                state, current = "running", lane
                break
            ev.append((started, "started", mid, lane, att, None, "running", "{}"))
            if att < n_att:
                attempts.append((mid, att, lane, cls, "lost", t, started, fin))
                ev.append((fin, "requeued", mid, lane, att, None, "queued", '{"reason":"lease expired"}'))
                t = fin + rnd.expovariate(1 / 0.4)
                continue
            outcome = "failed" if roll > 0.97 else "dead" if roll > 0.969 else "cancelled" if roll > 0.968 \
                else "succeeded"
            a_state = {"dead": "lost"}.get(outcome, outcome)
            attempts.append((mid, att, lane, cls, a_state, t, started, fin))
            ev.append((fin, outcome, mid, lane, att, None, outcome, "{}"))
            state = outcome
        missions.append((mid, cls, RANK[cls], state, current, len([a for a in ev if a[1] == "dispatched"]),
                         created, max(e[0] for e in ev)))
        events += ev
    for i in range(24):  # one lane restart an hour, round robin
        events.append((start + 3600 * i + 1800, "lane_invocation", None, list(LANES)[i % 3], None, None, None,
                       json.dumps({"invocation": f"inv{i}", "previous": f"inv{i - 1}"})))
    events.sort(key=lambda e: e[0])
    t_gen = time.perf_counter()
    conn.execute("BEGIN")
    for name, _ in indexes:
        conn.execute(f"DROP INDEX {name}")
    conn.executemany("INSERT INTO missions (id, class, rank, state, payload, request_hash, max_attempts, "
                     "current_lane, attempts, created_at, updated_at) VALUES (?,?,?,?,'{}','" + HASH + "',3,?,?,?,?)",
                     [(m[0], m[1], m[2], m[3], m[4], m[5], m[6], m[7]) for m in missions])
    conn.executemany("INSERT INTO attempts (mission, n, lane, class, token_hash, state, dispatched_at, started_at, "
                     "lease_expires, finished_at) VALUES (?,?,?,?,'" + HASH + "',?,?,?,?,?)",
                     [(a[0], a[1], a[2], a[3], a[4], a[5], a[6], a[5] + 60, a[7]) for a in attempts])
    conn.executemany("INSERT INTO events (at, kind, mission, lane, attempt, session, state, data) "
                     "VALUES (?,?,?,?,?,?,?,?)", events)
    for _, sql in indexes:
        conn.execute(sql)
    # queue_depth is trigger-maintained; the bulk insert went through the insert trigger, so it is exact
    conn.execute("COMMIT")
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()
    t_end = time.perf_counter()
    return {"missions": len(missions), "attempts": len(attempts), "events": len(events),
            "generate_s": round(t_gen - t_start, 1), "insert_s": round(t_end - t_gen, 1),
            "size_mb": round(path.stat().st_size / 1e6, 1)}


def median_ms(samples: list[float]) -> float:
    return round(statistics.median(samples) * 1000, 1)


def time_cmd(args: list[str], runs: int) -> dict[str, object]:
    samples, proc = [], None
    for _ in range(runs):
        t = time.perf_counter()
        proc = subprocess.run([PY, "-c", ENTRY, *args], capture_output=True, text=True, cwd=ROOT)
        samples.append(time.perf_counter() - t)
        if proc.returncode != 0:
            raise SystemExit(f"evidence_bench: {args} exited {proc.returncode}: {proc.stderr[-2000:]}")
    out: dict[str, object] = {"median_ms": median_ms(samples), "samples_ms": [round(s * 1000, 1) for s in samples]}
    if args[0] == "metrics" and proc is not None:  # what the command's own window (ending at its now) held
        total = json.loads(proc.stdout)["data"]["total"]
        out["window_finished"], out["window_dispatched"] = total["finished"], total["dispatched"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--dir", default="/tmp/lanectl-evidence-bench")
    ap.add_argument("--rebuild", action="store_true")
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    from lanectl import evidence

    d = Path(args.dir)
    cfg = d / "etc"
    write_config(cfg)
    db = d / "ledger.db"
    meta_path = d / "meta.json"
    meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
    if args.rebuild or meta.get("n") != args.n or not db.exists() or time.time() - meta.get("end", 0) > 600:
        end = time.time() + 120  # the build takes a while: let "now" at timing fall inside the data
        log(f"building {args.n:,} missions in {db}")
        stats = build(db, args.n, end)
        log("rolling it up, as the supervisor does while it runs")
        from lanectl.ledger import Ledger, rollups

        led = Ledger.open(db)
        t = time.perf_counter()
        n = 0
        while True:
            with led.transaction() as conn:
                k = rollups.roll_up(conn, end)
            n += k
            if not k:
                break
        led.close()
        stats["rollup_s"] = round(time.perf_counter() - t, 1)
        stats["rollup_buckets"] = n
        meta = {"n": args.n, "end": end, "build": stats}
        meta_path.write_text(json.dumps(meta))
        log(f"built: {stats}")
    now = min(time.time(), meta["end"])
    led_common = ["--ledger", str(db), "--config", str(cfg)]
    lib = []
    for _ in range(args.runs):
        t = time.perf_counter()
        m = evidence.metrics(db, 3600.0, now, capacity={ln: 16 for ln in LANES})
        lib.append(time.perf_counter() - t)
    lib_lane = []
    for _ in range(args.runs):
        t = time.perf_counter()
        evidence.metrics(db, 3600.0, now, "beta")
        lib_lane.append(time.perf_counter() - t)
    t = time.perf_counter()
    evidence.prometheus_text(m)
    prom_ms = (time.perf_counter() - t) * 1000
    rep = {}
    for fast in (True, False):
        ts = []
        for _ in range(args.runs if fast else 1):
            t = time.perf_counter()
            evidence.report(db, now - 86400, now, now, capacity={ln: 16 for ln in LANES}, fast=fast)
            ts.append(time.perf_counter() - t)
        rep["fast" if fast else "full"] = {"median_ms": median_ms(ts), "runs": len(ts)}
    log("timing the command")
    result = {
        "machine": {"nproc": os.cpu_count(), "python": platform.python_version(), "sqlite": sqlite3.sqlite_version,
                    "kernel": platform.release()},
        "ledger": meta["build"],
        "window_1h": {"finished": m["total"]["finished"], "dispatched": m["total"]["dispatched"],
                      "in_flight": m["total"]["in_flight"]},
        "library_metrics_1h_ms": {"median_ms": median_ms(lib), "samples_ms": [round(s * 1000, 1) for s in lib]},
        "library_metrics_1h_lane_ms": {"median_ms": median_ms(lib_lane)},
        "prometheus_text_ms": round(prom_ms, 1),
        "library_report_24h_ms": rep,
        "cmd_metrics_1h_json": time_cmd(["metrics", "--window", "1h", "--json", *led_common], args.runs),
        "cmd_metrics_15m_json": time_cmd(["metrics", "--window", "15m", "--json", *led_common], args.runs),
        "cmd_python_floor": time_cmd(["--version"], args.runs),
        "cmd_events_since_1h_kind": time_cmd(["events", "--since", "1h", "--kind", "lane_invocation", "--json",
                                              *led_common], 1),
        "cmd_events_since_1h_first_100": time_cmd(["events", "--since", "1h", "--json", *led_common], 1),
        "cmd_report_24h": time_cmd(["report", "--since", "24h", *led_common], 1),
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

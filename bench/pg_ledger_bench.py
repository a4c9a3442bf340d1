"""Issue 12, "What it must show": lanectl's lifecycle on a PostgreSQL ledger beside procrastinate and a raw
``FOR UPDATE SKIP LOCKED`` queue, on one durable PostgreSQL server, in one run.

    bench/run-pg-bench [options]            (makes the procrastinate venv if missing, then runs this)
    /opt/lanectl/venv/bin/python bench/pg_ledger_bench.py [--n 4000] [--rounds 3] [--claimers 1,4]
        [--sync on,off] [--systems lanectl,procrastinate,raw] [--profile FILE]

One private server (bench/pgbench_server.py: fsync, full_page_writes and synchronous_commit on, socket only). Each
run gets a fresh database on it; runs are interleaved (round 1: every system at every setting, round 2: again, ...)
and medians are reported. Every run has two timed phases:

submit   N items queued by one producer before any claimer starts, 1000 per transaction (group commit):
  lanectl        ``missions.submit_many`` (what ``lanectl submit --batch`` and ``Client.submit_many`` do)
  procrastinate  ``Task.batch_defer_async`` (its batch defer: one INSERT of 1000 jobs)
  raw            ``INSERT INTO jobs (payload) VALUES (%s)`` x 1000 (psycopg ``executemany``) per transaction
drain    C claimer processes (C = --claimers), started and connected before the clock starts, take everything:
  lanectl        each claimer is one supervisor's ledger work, with its own ledger connection and its own lanes
                 (--lanes-per-claimer x --capacity free slots, 4 x 25 = 100 by default: a claimer is a host that
                 brings its lanes; with 4 claimers the fleet is 4 times as large, no lane is shared): a loop of
                 ``tick.run_once`` (the dispatch path: reap, plan, claim every free slot in one transaction) and
                 one callback transaction per pass, ``missions.apply_callbacks_in`` with a ``started`` and a
                 ``succeeded`` callback for each mission the pass dispatched (the supervisor's group commit of what
                 the lanes reported since its last turn: a no-op mission's two callbacks arrive together).
                 2 commits per pass of up to 100 missions.
  procrastinate  C worker processes (``run_worker_async(concurrency=1, wait=False)``), an async no-op task;
                 each job: ``procrastinate_fetch_job`` (one transaction) and ``procrastinate_finish_job`` (one).
  raw            C processes each looping ``BEGIN; UPDATE jobs SET state = 'running' WHERE id = (SELECT id FROM
                 jobs WHERE state = 'queued' ORDER BY id FOR UPDATE SKIP LOCKED LIMIT 1) RETURNING id; COMMIT;``
                 then ``UPDATE jobs SET state = 'done' WHERE id = %s`` (autocommit): 2 commits per job.
Missions/s end to end = N / (submit + drain); the drain rate (claim + complete only) is shown too. Every run checks
its result (lanectl: N succeeded, one attempt each; procrastinate: N succeeded; raw: N done).

``--profile FILE``: after the runs, one more lanectl run with one claimer under cProfile (stats to FILE, the top
functions printed): where a claimer's time goes. Performance is measured here, never asserted in tests.
"""
from __future__ import annotations

import argparse
import cProfile
import json
import multiprocessing as mp
import os
import platform
import pstats
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from pgbench_server import SETTINGS, DurableServer  # noqa: E402

from lanectl.config import ClassPolicy, Lane, LaneSet, Settings  # noqa: E402
from lanectl.ledger import Ledger, tick  # noqa: E402
from lanectl.ledger import missions as ms  # noqa: E402

BIG = 10**9
BATCH = ms.MAX_BATCH
PROCR_VENV = Path(os.environ.get("BENCH_PROCRASTINATE_VENV", "/opt/bench-procrastinate"))
PROCR_SCRIPT = HERE / "pg_procrastinate_worker.py"
PROCR_TEMPLATE = "procr_template"
RAW_CLAIM = ("UPDATE jobs SET state = 'running' WHERE id = (SELECT id FROM jobs WHERE state = 'queued' ORDER BY id "
             "FOR UPDATE SKIP LOCKED LIMIT 1) RETURNING id")


def log(msg: str) -> None:
    print(f"pg_ledger_bench: {msg}", file=sys.stderr, flush=True)


def proc_cpu_s(pid: int) -> float:
    """utime + stime of a process (this one, or a PostgreSQL backend: the bench runs as root)."""
    with open(f"/proc/{pid}/stat") as fh:
        f = fh.read().rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")


# ------------------------------------------------------------------------------------------------------- lanectl
def fleet(claimer: int, lanes: int, capacity: int) -> LaneSet:
    """Claimer ``claimer``'s lanes (c<claimer>l<j>), every class, ``capacity`` slots each; ``claimer`` -1: no lane
    (the producer's view: submitting needs the classes, not the lanes)."""
    pol = {c: ClassPolicy(queue_limit=BIG) for c in ("interactive", "deadline", "background")}
    own = {} if claimer < 0 else {
        f"c{claimer}l{j}": Lane(port=20000 + 100 * claimer + j, workspace=f"/var/lib/lanes/c{claimer}l{j}",
                                capacity=capacity) for j in range(lanes)}
    tmp = Path(tempfile.gettempdir())
    return LaneSet(own, Settings(classes=pol), tmp, tmp)


def lanectl_claimer(url: str, k: int, lanes: int, capacity: int, ready: Any, go: Any, out: Any,
                    profile: str | None = None) -> None:
    f = fleet(k, lanes, capacity)
    led = Ledger.open(url)
    lease = f.settings.leases.lease_sec
    backend = led.conn.execute("SELECT pg_backend_pid()").fetchone()[0]
    if profile:  # the server's side too: time in each PL/pgSQL (trigger) function
        led.conn.execute("SET track_functions = 'pl'")
    ready.put(k)
    go.wait()
    prof = cProfile.Profile() if profile else None
    if prof:
        prof.enable()
    t0 = time.time()
    cpu0, bcpu0 = proc_cpu_s(os.getpid()), proc_cpu_s(backend)
    passes = claimed = 0
    while True:
        res = tick.run_once(led, f, now=time.time())
        passes += 1
        if not res.dispatches:
            if led.conn.execute("SELECT 1 FROM missions WHERE state = 'queued' LIMIT 1").fetchone() is None:
                break
            continue
        now = time.time()
        cbs = [ms.Callback("started", d.mission, d.lane, d.attempt, d.token) for d in res.dispatches]
        cbs += [ms.Callback("succeeded", d.mission, d.lane, d.attempt, d.token) for d in res.dispatches]
        with led.transaction() as conn:
            outcome = ms.apply_callbacks_in(conn, cbs, now=now, lease_sec=lease)
        if not all(o.changed for o in outcome):
            raise SystemExit(f"claimer {k}: a callback changed nothing: {[o for o in outcome if not o.changed][:3]}")
        claimed += len(res.dispatches)
    t1 = time.time()
    cpu, bcpu = proc_cpu_s(os.getpid()) - cpu0, proc_cpu_s(backend) - bcpu0
    functions = []
    if prof:
        prof.disable()
        prof.dump_stats(profile)
        led.conn.execute("SELECT pg_stat_force_next_flush()")
        led.conn.execute("SELECT 1")
        functions = [tuple(r) for r in led.conn.execute(
            "SELECT funcname, calls, total_time, self_time FROM pg_stat_user_functions ORDER BY total_time DESC")]
    led.close()
    out.put({"claimer": k, "start": t0, "end": t1, "claimed": claimed, "passes": passes, "cpu_s": cpu,
             "backend_cpu_s": bcpu, "functions": functions})


def run_claimers(target: Any, args_of: Any, claimers: int) -> tuple[float, list[dict[str, Any]]]:
    """Start ``claimers`` processes (fork), wait until each is connected, then start the clock and let them go;
    (drain seconds, their reports)."""
    ctx = mp.get_context("fork")
    ready, out, go = ctx.Queue(), ctx.Queue(), ctx.Event()
    procs = [ctx.Process(target=target, args=(*args_of(k), ready, go, out)) for k in range(claimers)]
    for p in procs:
        p.start()
    for _ in procs:
        ready.get(timeout=120)
    t0 = time.time()
    go.set()
    reports = [out.get(timeout=900) for _ in procs]
    t1 = time.time()
    for p in procs:
        p.join(timeout=60)
        if p.exitcode != 0:
            raise SystemExit(f"pg_ledger_bench: a claimer exited {p.exitcode}")
    return t1 - t0, reports


def lanectl_run(server: DurableServer, n: int, claimers: int, sync: str, args: argparse.Namespace,
                profile: str | None = None) -> dict[str, Any]:
    db = server.create_db("lc", synchronous_commit=sync)
    url = server.url(db)
    try:
        led = Ledger.open(url)
        producer = fleet(-1, 0, 1)
        t0 = time.time()
        for start in range(0, n, BATCH):
            ms.submit_many(led, producer, [ms.SubmitRequest("background", {"argv": ["true"], "i": i})
                                           for i in range(start, min(n, start + BATCH))], now=time.time())
        submit_s = time.time() - t0
        if profile:
            drain_s, reports = _profiled(url, args)
        else:
            drain_s, reports = run_claimers(lanectl_claimer,
                                            lambda k: (url, k, args.lanes_per_claimer, args.capacity), claimers)
        states = dict(led.conn.execute("SELECT state, count(*) FROM missions GROUP BY state").fetchall())
        attempts = led.conn.execute("SELECT count(*), count(DISTINCT mission) FROM attempts").fetchone()
        led.close()
        if states != {"succeeded": n} or tuple(attempts) != (n, n):
            raise SystemExit(f"pg_ledger_bench: lanectl run ended with {states}, attempts {attempts}")
        return {"submit_s": submit_s, "drain_s": drain_s, "passes": sum(r["passes"] for r in reports),
                "per_claimer": [r["claimed"] for r in reports], "cpu_s": sum(r["cpu_s"] for r in reports),
                "backend_cpu_s": sum(r["backend_cpu_s"] for r in reports),
                "functions": reports[0].get("functions", [])}
    finally:
        server.drop_db(db)


def _profiled(url: str, args: argparse.Namespace) -> tuple[float, list[dict[str, Any]]]:
    ctx = mp.get_context("fork")
    ready, out, go = ctx.Queue(), ctx.Queue(), ctx.Event()
    p = ctx.Process(target=lanectl_claimer, args=(url, 0, args.lanes_per_claimer, args.capacity, ready, go, out,
                                                  args.profile))
    p.start()
    ready.get(timeout=120)
    t0 = time.time()
    go.set()
    rep = out.get(timeout=900)
    t1 = time.time()
    p.join(timeout=60)
    return t1 - t0, [rep]


# ------------------------------------------------------------------------------------------------------- raw
def raw_claimer(url: str, k: int, ready: Any, go: Any, out: Any) -> None:
    import psycopg

    with psycopg.connect(url, autocommit=True) as conn:
        backend = conn.execute("SELECT pg_backend_pid()").fetchone()[0]
        ready.put(k)
        go.wait()
        t0 = time.time()
        cpu0, bcpu0 = proc_cpu_s(os.getpid()), proc_cpu_s(backend)
        done = 0
        while True:
            with conn.transaction():
                row = conn.execute(RAW_CLAIM).fetchone()
            if row is None:
                break
            conn.execute("UPDATE jobs SET state = 'done' WHERE id = %s", row)
            done += 1
        t1 = time.time()
        cpu, bcpu = proc_cpu_s(os.getpid()) - cpu0, proc_cpu_s(backend) - bcpu0
    out.put({"claimer": k, "start": t0, "end": t1, "claimed": done, "passes": done, "cpu_s": cpu,
             "backend_cpu_s": bcpu})


def raw_run(server: DurableServer, n: int, claimers: int, sync: str, args: argparse.Namespace) -> dict[str, Any]:
    import psycopg

    db = server.create_db("raw", empty=True, synchronous_commit=sync)
    url = server.url(db)
    try:
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("CREATE TABLE jobs (id bigserial PRIMARY KEY, state text NOT NULL DEFAULT 'queued', "
                         "payload jsonb NOT NULL)")
            conn.execute("CREATE INDEX jobs_queued ON jobs (id) WHERE state = 'queued'")
            t0 = time.time()
            for start in range(0, n, BATCH):
                with conn.transaction(), conn.cursor() as cur:
                    cur.executemany("INSERT INTO jobs (payload) VALUES (%s)",
                                    [(json.dumps({"argv": ["true"], "i": i}),)
                                     for i in range(start, min(n, start + BATCH))])
            submit_s = time.time() - t0
            drain_s, reports = run_claimers(raw_claimer, lambda k: (url, k), claimers)
            states = dict(conn.execute("SELECT state, count(*) FROM jobs GROUP BY state").fetchall())
        if states != {"done": n}:
            raise SystemExit(f"pg_ledger_bench: raw run ended with {states}")
        return {"submit_s": submit_s, "drain_s": drain_s, "passes": sum(r["passes"] for r in reports),
                "per_claimer": [r["claimed"] for r in reports], "cpu_s": sum(r["cpu_s"] for r in reports),
                "backend_cpu_s": sum(r["backend_cpu_s"] for r in reports)}
    finally:
        server.drop_db(db)


# ------------------------------------------------------------------------------------------------------- procrastinate
def procr(*argv: str, **kw: Any) -> Any:
    return subprocess.Popen([str(PROCR_VENV / "bin" / "python"), str(PROCR_SCRIPT), *argv], text=True, **kw)


def procr_template(server: DurableServer) -> None:
    with server.admin() as conn:
        if conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (PROCR_TEMPLATE,)).fetchone():
            return
        conn.execute(f"CREATE DATABASE {PROCR_TEMPLATE} TEMPLATE template0")
    p = procr("schema", server.url(PROCR_TEMPLATE))
    if p.wait(timeout=120):
        raise SystemExit("pg_ledger_bench: procrastinate's schema could not be applied")
    with server.admin() as conn:
        conn.execute(f"ALTER DATABASE {PROCR_TEMPLATE} WITH is_template = true ALLOW_CONNECTIONS = false")


def procrastinate_run(server: DurableServer, n: int, claimers: int, sync: str,
                      args: argparse.Namespace) -> dict[str, Any]:
    import psycopg

    db = server.create_db("pc", template=PROCR_TEMPLATE, synchronous_commit=sync)
    url = server.url(db)
    workers: list[Any] = []
    try:
        d = procr("defer", url, str(n), str(BATCH), stdout=subprocess.PIPE)
        out, _ = d.communicate(timeout=600)
        if d.returncode:
            raise SystemExit("pg_ledger_bench: procrastinate's defer failed")
        times = json.loads(out.strip().splitlines()[-1])
        submit_s = times["end"] - times["start"]
        workers = [procr("work", url, "1", stdin=subprocess.PIPE, stdout=subprocess.PIPE) for _ in range(claimers)]
        for w in workers:
            line = w.stdout.readline().strip()
            if line != "ready":
                raise SystemExit(f"pg_ledger_bench: a procrastinate worker did not start ({line!r})")
        t0 = time.time()
        for w in workers:
            w.stdin.write("\n")
            w.stdin.flush()
        reports = []
        for w in workers:
            out, _ = w.communicate(timeout=900)
            if w.returncode:
                raise SystemExit(f"pg_ledger_bench: a procrastinate worker exited {w.returncode}")
            reports.append(json.loads(out.strip().splitlines()[-1]))
        drain_s = max(r["end"] for r in reports) - t0
        with psycopg.connect(url, autocommit=True) as conn:
            states = dict(conn.execute("SELECT status::text, count(*) FROM procrastinate_jobs GROUP BY 1").fetchall())
        if states != {"succeeded": n}:
            raise SystemExit(f"pg_ledger_bench: procrastinate run ended with {states}")
        return {"submit_s": submit_s, "drain_s": drain_s, "passes": n, "per_claimer": []}
    finally:
        for w in workers:
            if w.poll() is None:
                w.kill()
                w.wait()
        server.drop_db(db)


# ------------------------------------------------------------------------------------------------------- report
RUNNERS = {"lanectl": lanectl_run, "procrastinate": procrastinate_run, "raw": raw_run}


def machine(server: DurableServer) -> dict[str, Any]:
    def sh(*cmd: str) -> str:
        r = subprocess.run(cmd, capture_output=True, text=True, check=False)
        return r.stdout.strip()

    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               "?")
    src = sh("df", "--output=source,fstype", str(server.dir)).splitlines()[-1].split()
    dev = Path(src[0]).name if src else "?"
    rot = Path(f"/sys/block/{dev}/queue/rotational")
    return {"nproc": os.cpu_count(), "cpu": cpu, "kernel": platform.release(),
            "python": platform.python_version(), "postgresql": server.version(),
            "disk": f"{src[0] if src else '?'} {src[1] if len(src) > 1 else ''}"
                    f"{' (rotational)' if rot.exists() and rot.read_text().strip() == '1' else ''}",
            "pg_test_fsync": server.test_fsync(), "settings": {k: server.show(k) for k in
                                                               ("fsync", "full_page_writes", "synchronous_commit",
                                                                "wal_sync_method", "shared_buffers")},
            "load_before": os.getloadavg()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=4000, help="items per run (missions, jobs)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--claimers", default="1,4")
    ap.add_argument("--sync", default="on", help="synchronous_commit values, e.g. on,off")
    ap.add_argument("--systems", default="lanectl,procrastinate,raw")
    ap.add_argument("--lanes-per-claimer", type=int, default=4)
    ap.add_argument("--capacity", type=int, default=25, help="slots per lane")
    ap.add_argument("--profile", metavar="FILE", help="one more 1-claimer lanectl run under cProfile (stats to FILE)")
    ap.add_argument("--json", metavar="FILE", help="write every run's figures to FILE")
    args = ap.parse_args()
    systems = [s for s in args.systems.split(",") if s]
    claimer_counts = [int(c) for c in args.claimers.split(",") if c]
    syncs = [s for s in args.sync.split(",") if s]
    for s in systems:
        if s not in RUNNERS:
            raise SystemExit(f"pg_ledger_bench: unknown system {s!r} (one of {', '.join(RUNNERS)})")
    if "procrastinate" in systems and not (PROCR_VENV / "bin" / "python").exists():
        raise SystemExit(f"pg_ledger_bench: no procrastinate venv at {PROCR_VENV} (bench/run-pg-bench makes it)")
    if not 1 <= args.n <= 1_000_000 or not 1 <= args.rounds <= 20:
        raise SystemExit("pg_ledger_bench: --n or --rounds out of range")
    server = DurableServer().start()
    results: dict[tuple[str, str, int], list[dict[str, Any]]] = {}
    try:
        info = machine(server)
        log(f"server: {info['postgresql']}; {info['settings']}")
        if "procrastinate" in systems:
            procr_template(server)
        t_all = time.time()
        for rnd in range(args.rounds):
            for sync in syncs:
                for c in claimer_counts:
                    for system in systems:
                        r = RUNNERS[system](server, args.n, c, sync, args)
                        r["load"] = os.getloadavg()[0]
                        results.setdefault((system, sync, c), []).append(r)
                        log(f"round {rnd + 1} synchronous_commit={sync} claimers={c} {system}: "
                            f"submit {r['submit_s']:.2f} s, drain {r['drain_s']:.2f} s, "
                            f"{args.n / (r['submit_s'] + r['drain_s']):,.0f}/s end to end")
        info["load_after"] = os.getloadavg()
        info["bench_s"] = round(time.time() - t_all, 1)
        prof = None
        if args.profile:
            log("profiled lanectl run (1 claimer)")
            prof = lanectl_run(server, args.n, 1, syncs[0], args, profile=args.profile)
    finally:
        server.stop()
    report(args, info, results, prof)
    return 0


def report(args: argparse.Namespace, info: dict[str, Any], results: dict[tuple[str, str, int], list[dict[str, Any]]],
           prof: dict[str, Any] | None) -> None:
    n = args.n
    print(f"machine: nproc {info['nproc']}, {info['cpu']}, kernel {info['kernel']}, python {info['python']}")
    print(f"server: {info['postgresql']}")
    print(f"disk: {info['disk']}; pg_test_fsync: {info['pg_test_fsync']}")
    print(f"settings: {info['settings']} (requested: {SETTINGS})")
    print(f"load average before {info['load_before']}, after {info['load_after']}; bench {info['bench_s']} s")
    print(f"\n{n} items per run, submit batches of {BATCH}, lanectl claimers {args.lanes_per_claimer} lanes x "
          f"{args.capacity} slots each; medians of {args.rounds} interleaved rounds\n")
    print("| synchronous_commit | claimers | system | end to end /s | submit /s | drain (claim+complete) /s | "
          "lanectl / this (end to end) | lanectl / this (drain) |")
    print("|---|---:|---|---:|---:|---:|---:|---:|")
    med: dict[tuple[str, str, int], dict[str, float]] = {}
    for key, runs in results.items():
        med[key] = {"e2e": statistics.median(n / (r["submit_s"] + r["drain_s"]) for r in runs),
                    "submit": statistics.median(n / r["submit_s"] for r in runs),
                    "drain": statistics.median(n / r["drain_s"] for r in runs)}
    for (system, sync, c), m in sorted(med.items(), key=lambda kv: (kv[0][1], kv[0][2], kv[0][0])):
        lc = med.get(("lanectl", sync, c))
        ratio_e = f"{lc['e2e'] / m['e2e']:.2f}x" if lc and system != "lanectl" else ""
        ratio_d = f"{lc['drain'] / m['drain']:.2f}x" if lc and system != "lanectl" else ""
        print(f"| {sync} | {c} | {system} | {m['e2e']:,.0f} | {m['submit']:,.0f} | {m['drain']:,.0f} | {ratio_e} | "
              f"{ratio_d} |")
    print("\nper run (end to end /s): " + "; ".join(
        f"{s}/{sc}/{c}: " + ", ".join(f"{n / (r['submit_s'] + r['drain_s']):,.0f}" for r in runs)
        for (s, sc, c), runs in sorted(results.items())))
    print("\nCPU per 1,000 items in the drain (medians; claimer processes / their PostgreSQL backends, seconds):")
    for key, runs in sorted(results.items()):
        if "cpu_s" in runs[0]:
            print(f"  {key[0]} synchronous_commit={key[1]} claimers={key[2]}: "
                  f"{statistics.median(1000 * r['cpu_s'] / n for r in runs):.3f} / "
                  f"{statistics.median(1000 * r['backend_cpu_s'] / n for r in runs):.3f}")
    lc_passes = {k: [r["passes"] for r in v] for k, v in results.items() if k[0] == "lanectl"}
    print(f"lanectl policy passes per run: {lc_passes}; missions per claimer: "
          f"{ {k: v[0]['per_claimer'] for k, v in results.items() if k[0] == 'lanectl'} }")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"machine": info, "args": vars(args), "medians": {
            "/".join(map(str, k)): v for k, v in med.items()}, "runs": {
            "/".join(map(str, k)): v for k, v in results.items()}, "profiled": prof}, indent=2))
        print(f"\nresult: {args.json}")
    if prof is not None and args.profile:
        print(f"\nprofiled lanectl run (1 claimer): drain {n / prof['drain_s']:,.0f}/s under cProfile; "
              f"top functions by cumulative time (stats in {args.profile}):\n")
        print(f"claimer process CPU {prof['cpu_s']:.2f} s, its PostgreSQL backend's CPU {prof['backend_cpu_s']:.2f} s, "
              f"drain {prof['drain_s']:.2f} s (wall)\n")
        breakdown(args.profile, prof["drain_s"], n)
        print("server side, PL/pgSQL functions (track_functions = pl in the profiled claimer's session):\n")
        print("| function | calls | total ms | self ms |\n|---|---:|---:|---:|")
        for name, calls, total, self_ in prof.get("functions", []):
            print(f"| {name} | {calls:,} | {total:.0f} | {self_:.0f} |")
        print()
        import io

        buf = io.StringIO()
        pstats.Stats(args.profile, stream=buf).sort_stats("cumulative").print_stats(25)
        print(buf.getvalue())


WHERE = (("lanectl/ledger/tick.py", "run_once"), ("lanectl/ledger/missions.py", "expire_leases_in"),
         ("lanectl/ledger/missions.py", "expire_deadlines_in"), ("lanectl/ledger/tick.py", "read_queue"),
         ("lanectl/dispatch.py", "decide"), ("lanectl/ledger/missions.py", "assign_in"),
         ("lanectl/ledger/missions.py", "record_waits_in"), ("lanectl/ledger/missions.py", "record_group_waits_in"),
         ("lanectl/ledger/missions.py", "sweep_waits_in"), ("lanectl/ledger/missions.py", "apply_callbacks_in"),
         ("lanectl/ledger/missions.py", "flush"), ("lanectl/ledger/events.py", "append"),
         ("lanectl/ledger/events.py", "append_many"), ("lanectl/ledger/pg.py", "execute"),
         ("lanectl/ledger/pg.py", "executemany"), ("lanectl/ledger/pg.py", "begin"),
         ("lanectl/ledger/__init__.py", "transaction"), ("psycopg/connection.py", "wait"))
"""Rows of the profile breakdown. ``transaction`` is the generator's own frames: BEGIN, the advisory lock and COMMIT
(the WAL flush); ``psycopg wait`` is every wait for the server's answer (statements, commits)."""


def breakdown(path: str, total_s: float, n: int) -> None:
    """The claimer's time by lanectl function (cumulative, so nested rows overlap), with call counts."""
    st = pstats.Stats(path).stats  # type: ignore[attr-defined]
    print("| function | calls | cumulative s | % of the drain | calls per mission |")
    print("|---|---:|---:|---:|---:|")
    for file, func in WHERE:
        hits = [(v[1], v[3]) for (f, _, name), v in st.items() if f.endswith(file) and name == func]
        if hits:
            calls, cum = sum(h[0] for h in hits), sum(h[1] for h in hits)
            print(f"| {file.rsplit('/', 1)[-1]}:{func} | {calls:,} | {cum:.3f} | {100 * cum / total_s:.0f}% | "
                  f"{calls / n:.2f} |")
    print()


if __name__ == "__main__":
    shutil.which("runuser") or sys.exit("pg_ledger_bench: needs runuser (util-linux) and root")
    sys.exit(main())

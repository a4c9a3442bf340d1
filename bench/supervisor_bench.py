"""Issue 4's figures: crash failover, hang detection, interactive dispatch latency, supervisor CPU and RSS.

Run INSIDE a private systemd (bench/run-supervisor-bench boots one with sdsandbox per part and runs this through
`sdsandbox exec`), as root, with the lanectl venv's interpreter. Two parts, each in a fresh sandbox (so each has
its own ledger, /var/lib/lanectl/ledger.db in the sandbox's private /var):

--part fleet3   the example fleet's three lanes (alpha, beta, gamma: same classes, capacities, fallbacks, watchdogs,
                quotas as lanes.d/) + lanectl-supervisor.service, then
  idle      the supervisor's CPU and RSS over 30 s with nothing to do (3 lanes; compare with fleet16);
  failover  N times: a mission `sleep 30` pinned to alpha; once it runs, time.time() and `kill -9` of alpha's
            MainPID; the times of the `dispatched` and `started` events of attempt n+1 (ledger `events.at`) minus
            the kill time. The mission is then cancelled and the next run waits until alpha is back and healthy
            in the supervisor's view.
  hang      N times the same with `kill -STOP`: the time to the re-dispatch, from the SIGSTOP and from the lane's
            last watchdog ping (systemd's WatchdogTimestampMonotonic), against the lane's WatchdogSec.
  dispatch  4 producer processes each submit interactive missions (`/bin/true`) at a fixed rate, first with an
            empty queue (baseline), then with 10k background missions queued (pinned to gamma, `sleep 3600`: gamma
            runs 2, the rest stay queued). Per mission: dispatched event - created_at, the lane's own start record
            (its execution log) - created_at, started event - created_at. Supervisor CPU and RSS over each phase.
--part fleet16  16 lanes (all classes, capacity 4, watchdog 10 s; --lanes N for another count, e.g. 48) + the
                supervisor; its CPU and RSS over 30 s idle, then over 30 s of load (4 producers, short missions,
                any lane; --load-sec 0 skips the load phase).

The restart policy of the bench lanes is raised (start_limit_burst 1000, max_restarts 999) so that 25 deliberate
crashes of alpha trip neither systemd's start limit nor the supervisor's restart-storm rule (which would make alpha
`failed` or `degraded` and change what is measured), and the fleet3 part sets the `[rollback]` thresholds out of reach
(min_samples, max_lease_expiries): otherwise the supervisor rightly drains alpha after a handful of
crashes ("rollback: fallback_spike"). The rules are still evaluated every tick. Everything else is the example
fleet's configuration; fleet16 uses the defaults.

Prints one JSON document on stdout (progress on stderr). Every loop is bounded in count and time. Nothing here
changes lanectl's code.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import random
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

VENV = Path(os.environ.get("LANECTL_VENV", "/opt/lanectl/venv"))
LANECTL = str(VENV / "bin" / "lanectl")
WS_ROOT = "/var/lib/lanes-bench4"
SUP_PORT = 8700
SUP_UNIT = "lanectl-supervisor.service"
CLK_TCK = os.sysconf("SC_CLK_TCK")


def log(msg: str) -> None:
    print(f"supervisor_bench: {msg}", file=sys.stderr, flush=True)


def run(cmd: list[str], check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    if check and proc.returncode != 0:
        raise SystemExit(f"supervisor_bench: {' '.join(cmd)} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


def wait_for(pred, what: str, timeout: float, interval: float = 0.1):
    t0 = time.monotonic()
    while True:
        v = pred()
        if v:
            return v
        if time.monotonic() - t0 > timeout:
            raise SystemExit(f"supervisor_bench: timed out after {timeout:g}s waiting for {what}")
        time.sleep(interval)


def pct(xs: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100)."""
    s = sorted(xs)
    k = max(0, min(len(s) - 1, int(-(-q * len(s) // 100)) - 1))
    return s[k]


def summary(xs: list[float], scale: float = 1000.0, nd: int = 1) -> dict:
    """Seconds in, milliseconds out (scale)."""
    if not xs:
        return {"n": 0}
    v = [x * scale for x in xs]
    return {"n": len(v), "p50": round(statistics.median(v), nd), "p95": round(pct(v, 95), nd),
            "p99": round(pct(v, 99), nd), "min": round(min(v), nd), "max": round(max(v), nd)}


# ---------------------------------------------------------------------------------------------- config
RESTART = "\n[restart]\nstart_limit_burst = 1000\nmax_restarts = 999\n"


def write_fleet3(cfg: Path) -> None:
    """The example fleet (lanectl.toml + lanes.d/ of the repository), restart limits raised (see the docstring)."""
    (cfg / "lanes.d").mkdir(parents=True, exist_ok=True)
    (cfg / "lanectl.toml").write_text(f"""# supervisor bench: the example fleet (bench/supervisor_bench.py)
workspace_root = "{WS_ROOT}"
[slice]
memory_max = "80%"
tasks_max = 4096
[supervisor]
host = "127.0.0.1"
port = {SUP_PORT}
tick_sec = 1.0
watchdog_sec = 10
[classes.interactive]
max_wait_sec = 30
queue_limit = 10000
# the bench crashes alpha 25 times on purpose: thresholds it cannot reach, so that the rollback rules (still
# evaluated every tick) do not drain alpha mid-bench (docs/benchmarks.md)
[rollback]
min_samples = 1000000
max_lease_expiries = 1000000
[classes.deadline]
max_wait_sec = 120
[classes.background]
max_wait_sec = 600
""")
    (cfg / "lanes.d" / "alpha.toml").write_text(f"""description = "interactive runtime"
port = 8701
workspace = "{WS_ROOT}/alpha"
classes = ["interactive", "deadline"]
capacity = 4
weight = 100
fallback = "beta"
tags = ["fast"]
watchdog_sec = 5
[resources]
memory_max = "512M"
cpu_quota = "100%"
tasks_max = 128
[restart]
restart_sec = 0.5
start_limit_burst = 1000
max_restarts = 999
[quotas.interactive]
rate_per_minute = 600
""")
    (cfg / "lanes.d" / "beta.toml").write_text(f"""description = "general runtime"
port = 8702
workspace = "{WS_ROOT}/beta"
capacity = 4
weight = 100
fallback = "gamma"
watchdog_sec = 5
[resources]
memory_max = "512M"
cpu_quota = "100%"
tasks_max = 128
[env]
LANE_MODE = "general"
""" + RESTART)
    (cfg / "lanes.d" / "gamma.toml").write_text(f"""description = "batch runtime"
port = 8703
workspace = "{WS_ROOT}/gamma"
classes = ["deadline", "background"]
capacity = 2
weight = 50
watchdog_sec = 10
[resources]
memory_max = "256M"
cpu_quota = "50%"
tasks_max = 64
[quotas.background]
rate_per_minute = 120
daily_budget = 50000
""" + RESTART)


def write_fleet16(cfg: Path, n: int = 16) -> None:
    (cfg / "lanes.d").mkdir(parents=True, exist_ok=True)
    (cfg / "lanectl.toml").write_text(f'# supervisor bench, 16 lanes\nworkspace_root = "{WS_ROOT}"\n'
                                      f"[supervisor]\nport = {SUP_PORT}\n")
    for i in range(1, n + 1):
        name = f"l{i:02d}"
        (cfg / "lanes.d" / f"{name}.toml").write_text(
            f'description = "supervisor bench lane {name}"\nport = {8800 + i}\nworkspace = "{WS_ROOT}/{name}"\n'
            "capacity = 4\nwatchdog_sec = 10\n")


# ---------------------------------------------------------------------------------------------- observation
def sup_health() -> dict:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{SUP_PORT}/healthz", timeout=2) as r:
            return json.loads(r.read())
    except (OSError, ValueError):
        return {}


def lanes_ready(names: list[str]) -> bool:
    lanes = sup_health().get("lanes", {})
    return all(lanes.get(n, {}).get("healthy") and lanes[n].get("state") == "active"
               and lanes[n].get("unit") == "active/running" for n in names)


def show(unit: str, *props: str) -> dict[str, str]:
    out = run(["systemctl", "show", "-p", ",".join(props), unit]).stdout
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def main_pid(unit: str) -> int:
    return int(show(unit, "MainPID")["MainPID"])


class Ledger:
    """Read-only look at the ledger (WAL: never blocks the supervisor)."""

    def __init__(self, path: Path) -> None:
        self.conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5, isolation_level=None)

    def q(self, sql: str, *args):
        return self.conn.execute(sql, args).fetchall()

    def event(self, kind: str, mission: int, attempt: int):
        r = self.q("SELECT at, lane FROM events WHERE kind = ? AND mission = ? AND attempt = ? ORDER BY id LIMIT 1",
                   kind, mission, attempt)
        return r[0] if r else None


class CPU:
    """CPU of one process: its own (utime+stime), with its reaped children (cutime+cstime), and its unit's cgroup."""

    def __init__(self, pid: int, unit: str) -> None:
        self.pid, self.unit = pid, unit
        self.t0, self.own0, self.all0, self.cg0 = time.monotonic(), *self.read()

    def read(self) -> tuple[float, float, float | None]:
        with open(f"/proc/{self.pid}/stat") as fh:
            f = fh.read().rsplit(")", 1)[1].split()
        ut, st, cut, cst = (int(x) / CLK_TCK for x in f[11:15])
        cg = show(self.unit, "CPUUsageNSec").get("CPUUsageNSec", "")
        return ut + st, ut + st + cut + cst, (int(cg) / 1e9 if cg.isdigit() else None)

    def done(self) -> dict:
        own, allc, cg = self.read()
        dt = time.monotonic() - self.t0
        out = {"seconds": round(dt, 2), "cpu_pct_process": round(100 * (own - self.own0) / dt, 2),
               "cpu_pct_with_children": round(100 * (allc - self.all0) / dt, 2)}
        if cg is not None and self.cg0 is not None:
            out["cpu_pct_cgroup"] = round(100 * (cg - self.cg0) / dt, 2)
        return out


def rss_mb(pid: int) -> float:
    import psutil

    return psutil.Process(pid).memory_info().rss / 2**20


def sample_rss(pid: int, seconds: float, every: float = 1.0) -> list[float]:
    out = []
    end = time.monotonic() + seconds
    for _ in range(int(seconds / every) + 2):
        out.append(rss_mb(pid))
        if time.monotonic() >= end:
            break
        time.sleep(min(every, max(0.0, end - time.monotonic())))
    return out


# ---------------------------------------------------------------------------------------------- figures 1, 2
def fault_runs(cfg: Path, led: Ledger, sig: int, runs: int, lane: str = "alpha") -> list[dict]:
    from lanectl.client import Client

    unit = f"lanectl-lane@{lane}.service"
    out = []
    with Client(config_dir=cfg) as c:
        for i in range(runs):
            wait_for(lambda: lanes_ready(["alpha", "beta", "gamma"]), "all lanes up and healthy (supervisor)", 60,
                     0.1)
            m = c.submit("interactive", {"argv": ["sleep", "30"]}, lane=lane).id
            first = wait_for(lambda: led.event("started", m, 1), f"mission {m} to start on {lane}", 20, 0.01)
            if first[1] != lane:
                raise SystemExit(f"supervisor_bench: mission {m} started on {first[1]}, not {lane}")
            n = led.q("SELECT attempts FROM missions WHERE id = ?", m)[0][0]
            pid = main_pid(unit)
            inv = sup_health()["lanes"][lane]["invocation"]
            t_sig = time.time()
            os.kill(pid, sig)
            t_sig_mono = time.monotonic()
            rec: dict = {"run": i + 1, "mission": m, "attempt": n, "pid": pid}
            try:
                if sig == signal.SIGSTOP:  # the last ping: systemd's record (the lane cannot ping any more)
                    p = show(unit, "WatchdogTimestampMonotonic", "WatchdogUSec")
                    rec["last_ping_before_sigstop_s"] = round(t_sig_mono - int(p["WatchdogTimestampMonotonic"]) / 1e6,
                                                              3)
                    rec["watchdog_usec"] = p["WatchdogUSec"]
                disp = wait_for(lambda: led.event("dispatched", m, n + 1), f"attempt {n + 1} of mission {m}", 30,
                                0.002)
                t_seen = time.time()
                started = wait_for(lambda: led.event("started", m, n + 1), f"attempt {n + 1} to start", 30, 0.002)
                req = led.event("requeued", m, n)
                rec.update(requeued_s=round(req[0] - t_sig, 4) if req else None, dispatched_s=round(disp[0] - t_sig, 4),
                           dispatched_seen_s=round(t_seen - t_sig, 4), started_s=round(started[0] - t_sig, 4),
                           to_lane=disp[1])
                if sig == signal.SIGSTOP:
                    rec["dispatched_after_last_ping_s"] = round(rec["dispatched_s"] + rec["last_ping_before_sigstop_s"],
                                                                4)
            finally:
                if sig == signal.SIGSTOP:
                    try:
                        os.kill(pid, signal.SIGCONT)  # normally gone already (the watchdog killed it)
                    except ProcessLookupError:
                        pass
            c.cancel(m)
            wait_for(lambda: main_pid(unit) not in (0, pid), f"{lane} restarted", 30, 0.05)
            # the supervisor's summary lags up to 1 s: wait until it shows the new invocation, healthy
            wait_for(lambda: sup_health().get("lanes", {}).get(lane, {}).get("invocation") not in (None, "", inv),
                     f"the supervisor to see {lane}'s new invocation", 30, 0.1)
            log(f"{signal.Signals(sig).name} run {i + 1}/{runs}: re-dispatched after {rec['dispatched_s'] * 1000:.0f} ms"
                f" to {rec['to_lane']}, started after {rec['started_s'] * 1000:.0f} ms")
            out.append(rec)
    return out


# ---------------------------------------------------------------------------------------------- figure 3
def producer(cfg: str, cls: str, count: int, rate: float, seed: int, q) -> None:
    """Submit `count` missions at `rate` per second (exponential gaps: an open-loop, Poisson arrival)."""
    from lanectl.client import Client

    rnd = random.Random(seed)
    ids = []
    errors = 0
    with Client(config_dir=cfg) as c:
        nxt = time.monotonic()
        stop = nxt + count / rate * 3 + 30  # bound in time as well as count
        for _ in range(count):
            nxt += rnd.expovariate(rate)
            delay = nxt - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            if time.monotonic() > stop:
                break
            try:
                ids.append(c.submit(cls, {"argv": ["/bin/true"]}).id)
            except Exception:  # noqa: BLE001 (counted and reported)
                errors += 1
    q.put((ids, errors))


def produce(cfg: Path, cls: str, producers: int, count: int, rate: float) -> tuple[list[int], int, float]:
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    procs = [ctx.Process(target=producer, args=(str(cfg), cls, count, rate, 40 + k, q)) for k in range(producers)]
    t0 = time.monotonic()
    for p in procs:
        p.start()
    ids, errors = [], 0
    for _ in procs:
        got, e = q.get(timeout=count / rate * 3 + 120)
        ids += got
        errors += e
    for p in procs:
        p.join(timeout=30)
    return ids, errors, time.monotonic() - t0


def lane_starts(lanes: list[str], ids: set[int]) -> dict[tuple[int, int], float]:
    """(mission, attempt) -> the lane's own record of starting it (time.time() in the lane, executions.log)."""
    from lanectl.protocol import read_execution_log

    out = {}
    for lane in lanes:
        for e in read_execution_log(Path(WS_ROOT) / lane, tail=None):
            if e.get("event") == "start" and e["mission"] in ids:
                out[(e["mission"], e["attempt"])] = e["at"]
    return out


def latencies(led: Ledger, ids: list[int], lanes: list[str]) -> dict:
    wait_for(lambda: led.q(f"SELECT count(*) FROM missions WHERE id IN ({','.join(map(str, ids))}) AND state "
                           "IN ('queued', 'dispatched')")[0][0] == 0, "the interactive missions to start", 120, 0.2)
    idset = set(ids)
    starts = lane_starts(lanes, idset)
    rows = led.q(f"""SELECT m.id, m.created_at, d.at, d.lane, s.at FROM missions m
        JOIN events d ON d.mission = m.id AND d.kind = 'dispatched' AND d.attempt = 1
        LEFT JOIN events s ON s.mission = m.id AND s.kind = 'started' AND s.attempt = 1
        WHERE m.id IN ({','.join(map(str, ids))})""")
    disp = [r[2] - r[1] for r in rows]
    start = [r[4] - r[1] for r in rows if r[4] is not None]
    lane_start = [starts[(r[0], 1)] - r[1] for r in rows if (r[0], 1) in starts]
    by_lane: dict[str, int] = {}
    for r in rows:
        by_lane[r[3]] = by_lane.get(r[3], 0) + 1
    states = dict(led.q(f"SELECT state, count(*) FROM missions WHERE id IN ({','.join(map(str, ids))}) "
                        "GROUP BY state"))
    return {"submitted": len(ids), "dispatched": summary(disp), "lane_started": summary(lane_start),
            "started_event": summary(start), "by_lane": by_lane, "states": states}


def dispatch_phase(cfg: Path, led: Ledger, label: str, args, lanes: list[str]) -> dict:
    pid = main_pid(SUP_UNIT)
    cpu = CPU(pid, SUP_UNIT)
    rss0 = rss_mb(pid)
    log(f"{label}: {args.producers} producers x {args.per_producer} interactive missions at {args.rate}/s each")
    ids, errors, wall = produce(cfg, "interactive", args.producers, args.per_producer, args.rate)
    load = cpu.done()
    res = {"label": label, "producers": args.producers, "per_producer": args.per_producer, "rate_each": args.rate,
           "submit_errors": errors, "wall_s": round(wall, 2), "supervisor_cpu": load,
           "supervisor_rss_mb": {"before": round(rss0, 1), "after": round(rss_mb(pid), 1)},
           "background_queued": led.q("SELECT count(*) FROM missions WHERE state = 'queued' AND class = 'background'")[0][0]}
    res.update(latencies(led, ids, lanes))
    log(f"{label}: dispatched p50 {res['dispatched'].get('p50')} ms p99 {res['dispatched'].get('p99')} ms")
    return res


def queue_background(cfg: Path, n: int, lane: str) -> float:
    from lanectl.client import Client

    t0 = time.monotonic()
    with Client(config_dir=cfg) as c:
        for start in range(0, n, 500):  # group commit, 500 per transaction
            with c.ledger.transaction():
                for _ in range(start, min(n, start + 500)):
                    c.submit("background", {"argv": ["sleep", "3600"]}, lane=lane)
    return time.monotonic() - t0


# ---------------------------------------------------------------------------------------------- parts
def up(cfg: Path, names: list[str]) -> None:
    run([LANECTL, "validate", "-c", str(cfg)])
    run([LANECTL, "install", "-c", str(cfg)])
    run([LANECTL, "up", "-c", str(cfg)])
    wait_for(lambda: run(["systemctl", "is-active", SUP_UNIT], check=False).stdout.strip() == "active",
             "the supervisor", 30)
    wait_for(lambda: lanes_ready(names), "every lane healthy in the supervisor's view", 60 + 2 * len(names), 0.2)


def part_fleet3(cfg: Path, args) -> dict:
    names = ["alpha", "beta", "gamma"]
    write_fleet3(cfg)
    up(cfg, names)
    from lanectl import config

    led = Ledger(config.ledger_path(cfg))
    out: dict = {"lanes": names}
    out["watchdog_usec_alpha"] = show("lanectl-lane@alpha.service", "WatchdogUSec")["WatchdogUSec"]
    pid = main_pid(SUP_UNIT)
    time.sleep(5)  # settle after start-up
    log(f"idle, 3 lanes: {args.idle_sec}s")
    cpu = CPU(pid, SUP_UNIT)
    rss = sample_rss(pid, args.idle_sec)
    out["idle"] = {**cpu.done(), "rss_mb_median": round(statistics.median(rss), 1), "rss_mb_max": round(max(rss), 1)}
    log(f"failover: {args.failover_runs} x kill -9 of alpha")
    out["failover"] = fault_runs(cfg, led, signal.SIGKILL, args.failover_runs)
    log(f"hang: {args.hang_runs} x SIGSTOP of alpha")
    out["hang"] = fault_runs(cfg, led, signal.SIGSTOP, args.hang_runs)
    wait_for(lambda: lanes_ready(names), "all lanes healthy", 60, 0.2)
    time.sleep(1)
    out["dispatch_empty"] = dispatch_phase(cfg, led, "dispatch, empty queue", args, names)
    log(f"queueing {args.background} background missions pinned to gamma")
    out["background_submit_s"] = round(queue_background(cfg, args.background, "gamma"), 2)
    time.sleep(2)
    out["dispatch_loaded"] = dispatch_phase(cfg, led, f"dispatch, {args.background} background queued", args, names)
    pid = main_pid(SUP_UNIT)
    out["supervisor_rss_mb_end"] = round(rss_mb(pid), 1)
    out["supervisor_nrestarts"] = show(SUP_UNIT, "NRestarts")["NRestarts"]
    return out


def part_fleet16(cfg: Path, args) -> dict:
    names = [f"l{i:02d}" for i in range(1, args.lanes + 1)]
    write_fleet16(cfg, args.lanes)
    up(cfg, names)
    from lanectl import config

    led = Ledger(config.ledger_path(cfg))
    pid = main_pid(SUP_UNIT)
    time.sleep(5)  # settle after start-up
    log(f"idle: {args.idle_sec}s")
    cpu = CPU(pid, SUP_UNIT)
    rss = sample_rss(pid, args.idle_sec)
    out: dict = {"lanes": len(names), "supervisor_pid": pid,
                 "idle": {**cpu.done(), "rss_mb_median": round(statistics.median(rss), 1),
                          "rss_mb_max": round(max(rss), 1), "rss_samples": len(rss)}}
    if args.load_sec <= 0:
        out["supervisor_rss_mb_end"] = round(rss_mb(pid), 1)
        return out
    rate = args.load_rate
    per = int(rate * args.load_sec)
    log(f"load: {args.producers} producers x {per} missions at {rate}/s each")
    cpu = CPU(pid, SUP_UNIT)
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    procs = [ctx.Process(target=producer, args=(str(cfg), "background", per, rate, 70 + k, q))
             for k in range(args.producers)]
    for p in procs:
        p.start()
    rss = sample_rss(pid, args.load_sec)
    ids, errors = [], 0
    for _ in procs:
        got, e = q.get(timeout=args.load_sec * 3 + 120)
        ids += got
        errors += e
    for p in procs:
        p.join(timeout=30)
    load = cpu.done()
    lat = latencies(led, ids, names)
    done = led.q(f"SELECT count(*) FROM missions WHERE id IN ({','.join(map(str, ids))}) AND state = 'succeeded'")
    out["load"] = {**load, "rss_mb_median": round(statistics.median(rss), 1), "rss_mb_max": round(max(rss), 1),
                   "missions": len(ids), "submit_errors": errors, "rate_total": rate * args.producers,
                   "succeeded_when_measured": done[0][0], **lat}
    out["supervisor_rss_mb_end"] = round(rss_mb(pid), 1)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--part", choices=["fleet3", "fleet16"], required=True)
    ap.add_argument("--failover-runs", type=int, default=20)
    ap.add_argument("--hang-runs", type=int, default=5)
    ap.add_argument("--producers", type=int, default=4)
    ap.add_argument("--per-producer", type=int, default=250, help="interactive missions per producer and phase")
    ap.add_argument("--rate", type=float, default=10.0, help="missions/s per producer (dispatch phases)")
    ap.add_argument("--background", type=int, default=10_000)
    ap.add_argument("--idle-sec", type=float, default=30.0)
    ap.add_argument("--load-sec", type=float, default=30.0, help="fleet16's load phase (0: none)")
    ap.add_argument("--lanes", type=int, default=16, help="lanes of the fleet16 part")
    ap.add_argument("--load-rate", type=float, default=25.0, help="missions/s per producer (fleet16 load)")
    ap.add_argument("--keep", action="store_true", help="leave the fleet running (debugging)")
    args = ap.parse_args()
    if not Path("/run/systemd/system").is_dir():
        raise SystemExit("supervisor_bench: no running systemd here; run it through bench/run-supervisor-bench")
    if not 1 <= args.lanes <= 99:
        raise SystemExit("supervisor_bench: --lanes out of range (1..99)")
    for k in ("failover_runs", "hang_runs", "producers", "per_producer"):
        if not 1 <= getattr(args, k) <= 10_000:
            raise SystemExit(f"supervisor_bench: --{k.replace('_', '-')} out of range")
    work = Path(tempfile.mkdtemp(prefix="lanectl-supervisor-bench."))
    os.chmod(work, 0o755)
    cfg = work / "config"
    t0 = time.monotonic()
    try:
        res = part_fleet3(cfg, args) if args.part == "fleet3" else part_fleet16(cfg, args)
    finally:
        if not args.keep and (cfg / "lanectl.toml").exists():
            log("lanectl down")
            run([LANECTL, "down", "-c", str(cfg)], check=False)
            shutil.rmtree(work, ignore_errors=True)
    res.update(part=args.part, args=vars(args), elapsed_s=round(time.monotonic() - t0, 1))
    json.dump(res, sys.stdout, indent=2)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())

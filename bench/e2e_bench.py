"""Issue 14, item 6: missions per second through the whole system, beside huey running the same command.

Run INSIDE a private systemd (bench/run-e2e-bench boots one with scripts/sdbox and runs this through
`scripts/sdbox exec`), as root, with the lanectl venv's interpreter (huey installed: `LANECTL_BENCH=1
scripts/setup` or bench/run-e2e-bench does it).

lanectl   L lanes (capacity C each, real Type=notify units of the reference runtime) + lanectl-supervisor.service,
          installed and started with `lanectl install` / `lanectl up`. N missions `{"argv": ["/bin/true"]}` are
          submitted in batches of 1000 (`Client.submit_many`, one transaction each, the way `submit --batch` does),
          then the clock runs until the ledger says all N `succeeded`: submit, dispatch by policy, the POST to a
          lane, the lane's fork+exec, its callbacks over the unix socket, the ledger's commits (synchronous=FULL).
huey      `huey_consumer` with L*C process workers (`-k process`, the same number of missions at once) over a
          SqliteHuey file in the same directory kind; N tasks that run `/bin/true` with `subprocess.run` are enqueued
          and the clock runs until all N results are stored. huey runs as a plain process (no units): it is the
          floor a Python task queue gives, not a like-for-like product.

Both start from a quiet system (the lanes/consumer started and idle), and each run is repeated `--runs` times,
interleaved (lanectl, huey, lanectl, huey, ...). Per run: missions/s, and for lanectl the CPU seconds of the
supervisor's cgroup, of all lanes' cgroups together, and of this process (the submitter), to name the bottleneck.

Prints one JSON document on stdout (progress on stderr). Nothing here changes lanectl's code.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from supervisor_bench import LANECTL, SUP_PORT, SUP_UNIT, lanes_ready, log, run, show, wait_for  # noqa: E402

VENV = Path(os.environ.get("LANECTL_VENV", "/opt/lanectl/venv"))
WS_ROOT = "/var/lib/lanes-bench-e2e"
HUEY_TASKS = '''
import subprocess
from huey import SqliteHuey
huey = SqliteHuey(filename={path!r}, fsync=True)

@huey.task()
def run_true():
    subprocess.run(["/bin/true"], check=True)
    return 1
'''


def write_fleet(cfg: Path, lanes: int, capacity: int) -> list[str]:
    (cfg / "lanes.d").mkdir(parents=True, exist_ok=True)
    (cfg / "lanectl.toml").write_text(f'# e2e bench\nworkspace_root = "{WS_ROOT}"\n[supervisor]\nport = {SUP_PORT}\n')
    names = [f"e{i:02d}" for i in range(1, lanes + 1)]
    for i, name in enumerate(names, 1):
        (cfg / "lanes.d" / f"{name}.toml").write_text(
            f'description = "e2e bench lane {name}"\nport = {8850 + i}\nworkspace = "{WS_ROOT}/{name}"\n'
            f"capacity = {capacity}\nwatchdog_sec = 10\n")
    return names


def cg_cpu_s(unit: str) -> float:
    """CPU seconds of a unit's whole cgroup: systemd's accounting, else the cgroup's own counters (v2 cpu.stat,
    v1 cpuacct.usage: the sandbox's hybrid hierarchy leaves systemd's CPUUsageNSec unset)."""
    p = show(unit, "CPUUsageNSec", "ControlGroup")
    v = p.get("CPUUsageNSec", "")
    if v.isdigit():
        return int(v) / 1e9
    cg = p.get("ControlGroup", "")
    stat = Path(f"/sys/fs/cgroup{cg}/cpu.stat")
    if cg and stat.exists() and "usage_usec" in stat.read_text():
        return int(dict(line.split() for line in stat.read_text().splitlines())["usage_usec"]) / 1e6
    acct = Path(f"/sys/fs/cgroup/cpuacct{cg}/cpuacct.usage")
    if cg and acct.exists():
        return int(acct.read_text()) / 1e9
    # no CPU accounting at all: the processes of the unit, with the children they reaped (a lane reaps its missions)
    total = 0.0
    procs = Path(f"/sys/fs/cgroup/systemd{cg}/cgroup.procs")
    for pid in (procs.read_text().split() if cg and procs.exists() else []):
        try:
            f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += sum(int(x) for x in f[11:15]) / os.sysconf("SC_CLK_TCK")
    return total if procs.exists() else float("nan")


def own_cpu_s() -> float:
    t = os.times()
    return t.user + t.system


def lanectl_run(cfg: Path, names: list[str], n: int) -> dict:
    from lanectl.client import Client
    from lanectl.ledger import missions as ms

    from lanectl import config

    ledger = config.ledger_path(cfg)
    ro = sqlite3.connect(f"file:{ledger}?mode=ro", uri=True, timeout=5, isolation_level=None)
    units = [SUP_UNIT, *(f"lanectl-lane@{x}.service" for x in names)]
    cpu0 = {u: cg_cpu_s(u) for u in units}
    me0 = own_cpu_s()
    top = ro.execute("SELECT coalesce(max(id), 0) FROM missions").fetchone()[0]
    t0 = time.monotonic()
    with Client(config_dir=cfg) as c:
        for start in range(0, n, ms.MAX_BATCH):
            c.submit_many([ms.SubmitRequest("background", {"argv": ["/bin/true"]})
                           for _ in range(min(ms.MAX_BATCH, n - start))])
    submitted = time.monotonic() - t0
    me1 = own_cpu_s()

    def done() -> bool:
        row = ro.execute("SELECT count(*) FROM missions WHERE id > ? AND state IN ('succeeded', 'failed', 'dead')",
                         (top,)).fetchone()
        return row[0] >= n

    wait_for(done, f"{n} missions finished", 60 + n / 5, 0.05)
    dt = time.monotonic() - t0
    states = dict(ro.execute("SELECT state, count(*) FROM missions WHERE id > ? GROUP BY state", (top,)).fetchall())
    phases = cycle_phases(ro, top)
    cpu = {u: round(cg_cpu_s(u) - cpu0[u], 2) for u in units}
    ro.close()
    return {"missions": n, "seconds": round(dt, 3), "per_s": round(n / dt, 1), "submit_s": round(submitted, 3),
            "states": states, "phases_ms": phases, "cpu_s": {"supervisor": cpu[SUP_UNIT],
                                        "lanes": round(sum(v for u, v in cpu.items() if u != SUP_UNIT), 2),
                                        "submitter": round(me1 - me0, 2)}}


def cycle_phases(ro: sqlite3.Connection, top: int) -> dict:
    """Where a mission's time goes (medians, ms): created -> dispatched (queue), dispatched -> started (the POST,
    the lane's fork+exec, the started callback), started -> succeeded (run + the outcome callback), and a lane
    slot's idle time: from a succeeded event to the next dispatch to that lane (the supervisor's turn)."""
    rows = ro.execute("SELECT e.mission, e.kind, e.at, e.lane, m.created_at FROM events e JOIN missions m "
                      "ON m.id = e.mission WHERE e.mission > ? AND e.kind IN ('dispatched', 'started', 'succeeded') "
                      "ORDER BY e.id", (top,)).fetchall()
    at: dict[tuple[int, str], float] = {}
    created: dict[int, float] = {}
    per_lane: dict[str, list[tuple[float, str]]] = {}
    for mission, kind, t, lane, c in rows:
        at.setdefault((mission, kind), t)
        created[mission] = c
        if lane:
            per_lane.setdefault(lane, []).append((t, kind))

    def med(xs: list[float]) -> float | None:
        return round(statistics.median(xs) * 1000, 1) if xs else None

    idle = []
    for evs in per_lane.values():
        evs.sort()
        pending = []
        for t, kind in evs:
            if kind == "succeeded":
                pending.append(t)
            elif kind == "dispatched" and pending:
                idle.append(t - pending.pop(0))
    ms_ = {m for m, _ in at}
    return {
        "queue": med([at[(m, "dispatched")] - created[m] for m in ms_ if (m, "dispatched") in at]),
        "dispatched_to_started": med([at[(m, "started")] - at[(m, "dispatched")] for m in ms_
                                      if (m, "started") in at and (m, "dispatched") in at]),
        "started_to_succeeded": med([at[(m, "succeeded")] - at[(m, "started")] for m in ms_
                                     if (m, "succeeded") in at and (m, "started") in at]),
        "slot_idle": med(idle),
    }


class Huey:
    def __init__(self, workers: int) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="e2e-huey-", dir="/var/tmp"))
        self.db = self.dir / "huey.db"
        (self.dir / "bench_tasks.py").write_text(HUEY_TASKS.format(path=str(self.db)))
        sys.path.insert(0, str(self.dir))
        import bench_tasks  # noqa: F401  (the module the consumer imports too)

        self.tasks = bench_tasks
        self.proc = subprocess.Popen([str(VENV / "bin" / "huey_consumer"), "bench_tasks.huey", "-k", "process",
                                      "-w", str(workers), "-q"], cwd=self.dir, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL, env={**os.environ, "PYTHONPATH": str(self.dir)},
                                     start_new_session=True)
        r = self.tasks.run_true()  # the consumer is up and its workers answer
        r.get(blocking=True, timeout=60)

    def run(self, n: int) -> dict:
        t0 = time.monotonic()
        me0 = own_cpu_s()
        results = [self.tasks.run_true() for _ in range(n)]
        submitted = time.monotonic() - t0
        me1 = own_cpu_s()
        for r in results:
            r.get(blocking=True, timeout=60 + n / 5)
        dt = time.monotonic() - t0
        return {"missions": n, "seconds": round(dt, 3), "per_s": round(n / dt, 1), "submit_s": round(submitted, 3),
                "cpu_s": {"submitter": round(me1 - me0, 2)}}

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)  # huey's graceful stop
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        shutil.rmtree(self.dir, ignore_errors=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lanes", type=int, default=4)
    ap.add_argument("--capacity", type=int, default=4)
    ap.add_argument("--missions", type=int, default=2000)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--py-spy", metavar="FILE", help="also record the supervisor with py-spy during one more lanectl "
                    "run (collapsed stacks to FILE; needs py-spy in the venv)")
    args = ap.parse_args()
    cfg = Path(tempfile.mkdtemp(prefix="e2e-cfg-"))
    names = write_fleet(cfg, args.lanes, args.capacity)
    huey = None
    out: dict = {"lanes": args.lanes, "capacity": args.capacity, "workers": args.lanes * args.capacity,
                 "missions": args.missions, "runs": {"lanectl": [], "huey": []}}
    try:
        run([LANECTL, "install", "-c", str(cfg)])
        run([LANECTL, "up", "-c", str(cfg)])
        wait_for(lambda: lanes_ready(names), "every lane healthy in the supervisor's view", 60, 0.2)
        huey = Huey(args.lanes * args.capacity)
        lanectl_run(cfg, names, 50)  # warm-up: page cache, first forks
        huey.run(50)
        for i in range(args.runs):
            log(f"run {i + 1}/{args.runs}: lanectl")
            out["runs"]["lanectl"].append(lanectl_run(cfg, names, args.missions))
            log(f"run {i + 1}/{args.runs}: huey")
            out["runs"]["huey"].append(huey.run(args.missions))
        if args.py_spy:
            pid = show(SUP_UNIT, "MainPID")["MainPID"]
            spy = subprocess.Popen([str(VENV / "bin" / "py-spy"), "record", "-p", pid, "-f", "raw", "-r", "200", "--gil",
                                    "-o", args.py_spy], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(1)
            out["profiled_run"] = lanectl_run(cfg, names, args.missions)
            spy.send_signal(signal.SIGINT)
            spy.wait(timeout=30)
    finally:
        if huey is not None:
            huey.close()
        run([LANECTL, "down", "-c", str(cfg)], check=False)
        shutil.rmtree(cfg, ignore_errors=True)
    med = {k: statistics.median(r["per_s"] for r in v) for k, v in out["runs"].items()}
    out["median_per_s"] = med
    out["ratio_lanectl_over_huey"] = round(med["lanectl"] / med["huey"], 3) if med["huey"] else None
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

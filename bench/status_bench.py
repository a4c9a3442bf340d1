"""Issue 2: how long does `lanectl status --json` take next to the alternatives an operator would reach for?

Run INSIDE a private systemd (bench/run-status-bench boots one with sdsandbox and runs this through
`sdsandbox exec`), as root, with the lanectl venv's interpreter. It

1. writes N lane files (ports 8801.., workspaces /var/lib/lanes-bench/lNN) into a temporary config dir,
   `lanectl install -c DIR` + `lanectl up -c DIR` (N real Type=notify units);
2. starts a supervisord (child of this process, nodaemon) managing N programs running the same reference
   runtime (`python -m lanectl.runtime`, ports 8901..), and waits until all are RUNNING and listening;
3. times, interleaved round-robin (the order rotates every round, so drift and noise hit all equally):
     lanectl      `lanectl status --json`
     probe        `lanectl probe` (on the fleet's own ledger, which `lanectl install` creates, or --probe-ledger)
     supervisorctl `supervisorctl -c CONF status`
     systemctl    `systemctl show -p ActiveState,SubState,MainPID,NRestarts,StatusText -- UNITS` (one call)
     python-floor `python -c pass` (the venv interpreter: the floor for any Python CLI)
   each spawned the same way (subprocess.run, stdout/stderr captured, time.perf_counter around it);
4. records `python -X importtime lanectl status --json` (median per module over several runs) and the time
   of each step of lanectl.status.collect run in one process (imports, unit state over D-Bus, cgroup files,
   health checks, the ledger; and psutil, which status no longer uses, for comparison);
5. tears down: supervisord by its PID (SIGTERM, wait), `lanectl down -c DIR`.

Prints one JSON document on stdout (progress goes to stderr). Nothing here changes lanectl's code.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

VENV = Path(os.environ.get("LANECTL_VENV", "/opt/lanectl/venv"))
PY = str(VENV / "bin" / "python")
LANECTL = str(VENV / "bin" / "lanectl")
SUPERVISORD = str(VENV / "bin" / "supervisord")
SUPERVISORCTL = str(VENV / "bin" / "supervisorctl")
WORKSPACE_ROOT = "/var/lib/lanes-bench"


def log(msg: str) -> None:
    print(f"status_bench: {msg}", file=sys.stderr, flush=True)


def run(cmd: list[str], check: bool = True, **kw) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(cmd, capture_output=True, text=True, **kw)
    if check and proc.returncode != 0:
        raise SystemExit(f"status_bench: {' '.join(cmd)} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


def lane_names(n: int) -> list[str]:
    return [f"l{i:02d}" for i in range(1, n + 1)]


def write_config(cfg: Path, n: int, base_port: int, ledger: str | None = None) -> None:
    (cfg / "lanes.d").mkdir(parents=True, exist_ok=True)
    (cfg / "lanectl.toml").write_text("# status benchmark fleet (bench/status_bench.py)\n"
                                      f'workspace_root = "{WORKSPACE_ROOT}"\n'
                                      + (f'ledger = "{ledger}"\n' if ledger else ""))
    for i, name in enumerate(lane_names(n)):
        (cfg / "lanes.d" / f"{name}.toml").write_text(
            f'description = "status bench lane {name}"\n'
            f"port = {base_port + i}\n"
            f'workspace = "{WORKSPACE_ROOT}/{name}"\n'
            "capacity = 4\n"
            "watchdog_sec = 10\n"
        )


def write_supervisor_conf(d: Path, n: int, base_port: int) -> Path:
    conf = d / "supervisord.conf"
    parts = [
        "[unix_http_server]", f"file={d}/supervisor.sock", "chmod=0700", "",
        "[supervisord]", "nodaemon=true", f"logfile={d}/supervisord.log", f"pidfile={d}/supervisord.pid",
        f"childlogdir={d}", "loglevel=warn", "",
        "[rpcinterface:supervisor]", "supervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface", "",
        "[supervisorctl]", f"serverurl=unix://{d}/supervisor.sock", "",
    ]
    for i, name in enumerate(lane_names(n)):
        ws = d / "ws" / name
        ws.mkdir(parents=True, exist_ok=True)
        parts += [
            f"[program:{name}]",
            f"command={PY} -m lanectl.runtime",
            f"directory={ws}",
            f'environment=LANECTL_LANE="{name}",LANECTL_PORT="{base_port + i}",LANECTL_WORKSPACE="{ws}"',
            "autostart=true", "autorestart=true", "startsecs=1",
            f"stdout_logfile={d}/{name}.out", f"stderr_logfile={d}/{name}.err", "",
        ]
    conf.write_text("\n".join(parts))
    return conf


def port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0


def wait_for(pred, what: str, timeout: float = 60.0) -> None:
    t0 = time.monotonic()
    while not pred():
        if time.monotonic() - t0 > timeout:
            raise SystemExit(f"status_bench: timed out waiting for {what}")
        time.sleep(0.2)


def timed(cmd: list[str]) -> tuple[float, int]:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    return (time.perf_counter() - t0) * 1000.0, proc.returncode


def pct(xs: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100)."""
    s = sorted(xs)
    k = max(0, min(len(s) - 1, int(-(-q * len(s) // 100)) - 1))
    return s[k]


def importtime(cmd: list[str], runs: int) -> dict:
    """`python -X importtime CMD...`: median self/cumulative per module over `runs` runs."""
    per: dict[str, list[tuple[int, int]]] = {}
    depth: dict[str, int] = {}
    for _ in range(runs):
        proc = run([PY, "-X", "importtime", *cmd], check=False)
        for line in proc.stderr.splitlines():
            if not line.startswith("import time:") or "imported package" in line:
                continue
            self_us, cum_us, raw = line[len("import time:"):].split("|", 2)
            name = raw.strip()
            depth[name] = (len(raw) - len(raw.lstrip()) - 1) // 2  # 0 = imported by the script itself
            per.setdefault(name, []).append((int(self_us), int(cum_us)))
    rows = [{"module": m, "depth": depth[m],
             "self_us": int(statistics.median(v[0] for v in vals)),
             "cumulative_us": int(statistics.median(v[1] for v in vals)), "seen": len(vals)}
            for m, vals in per.items()]
    rows.sort(key=lambda r: r["cumulative_us"], reverse=True)
    tops = [r for r in rows if r["depth"] == 0]
    return {"command": " ".join(["python", "-X", "importtime", *cmd]), "runs": runs, "top": rows[:8], "top_level": tops,
            "top_level_total_us": sum(r["cumulative_us"] for r in tops),
            "self_total_us": sum(r["self_us"] for r in rows), "modules": len(rows)}


PHASES = r"""
import json, sys, time
t = [time.perf_counter()]
from lanectl import manifest, paths, systemd
from lanectl.cli.statusview import run_status
from lanectl.status import STATUS_PROPS, _processes, cgroup_usage, collect
try:  # the health prober's own module since issue 11 item 7; in lanectl.status before (--compare runs older trees)
    from lanectl.healthcheck import check_health_many
except ImportError:
    from lanectl.status import check_health_many
t.append(time.perf_counter())
data = manifest.read(paths.unit_dir(None))
lanes = data["lanes"]
names = sorted(lanes)
t.append(time.perf_counter())
shown = systemd.show([lanes[n]["unit"] for n in names], STATUS_PROPS)
t.append(time.perf_counter())
for props in shown.values():
    cgroup_usage(props["ControlGroup"])
t.append(time.perf_counter())
check_health_many([(lanes[n]["port"], lanes[n].get("health_path", "/healthz")) for n in names])
t.append(time.perf_counter())
from lanectl.probe import read_lane_views
try:
    read_lane_views(data["ledger"])
except Exception:
    pass
t.append(time.perf_counter())
import psutil
t.append(time.perf_counter())
for props in shown.values():
    _processes(int(props["MainPID"]))
t.append(time.perf_counter())
n = len(names)
steps = ["imports (fast path)", "read the install manifest", f"unit state of {n} units (D-Bus, {len(STATUS_PROPS)} props)",
         f"cgroup files of {n} lanes", f"{n} health checks (one thread, one deadline)",
         "ledger: dispatch state (imports sqlite3)", "not done by status: import psutil",
         f"not done by status: psutil over {n} process trees (the old fallback)"]
print(json.dumps({k: (b - a) * 1000 for k, a, b in zip(steps, t, t[1:])}))
"""


def phases(runs: int) -> dict[str, float]:
    """Where `lanectl status` spends its time: the steps of lanectl.status.collect, timed in one process."""
    acc: dict[str, list[float]] = {}
    for _ in range(runs):
        for k, v in json.loads(run([PY, "-c", PHASES]).stdout).items():
            acc.setdefault(k, []).append(v)
    return {k: round(statistics.median(v), 1) for k, v in acc.items()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lanes", type=int, default=16)
    ap.add_argument("--runs", type=int, default=30, help="timed runs per command (>= 20)")
    ap.add_argument("--warmup", type=int, default=3, help="untimed rounds first")
    ap.add_argument("--importtime-runs", type=int, default=7)
    ap.add_argument("--lane-port", type=int, default=8801)
    ap.add_argument("--supervisor-port", type=int, default=8901)
    ap.add_argument("--keep", action="store_true", help="leave lanes and supervisord running (debugging)")
    ap.add_argument("--compare", action="append", default=[], metavar="NAME=VENV",
                    help="also time `status --json` and `probe` of another lanectl (e.g. an earlier commit's, in "
                         "VENV/bin/lanectl) against the same fleet, in the same rounds; repeatable")
    ap.add_argument("--probe-ledger", metavar="PATH",
                    help="the fleet's ledger, which `lanectl status` and `lanectl probe` read (e.g. the 1M-mission "
                         "one that bench/evidence_bench.py builds, fresh: its events end when it is built); default: "
                         "the one `lanectl install` creates")
    args = ap.parse_args()
    if not Path("/run/systemd/system").is_dir():
        raise SystemExit("status_bench: no running systemd here; run it through bench/run-status-bench")
    if args.runs < 20:
        raise SystemExit("status_bench: --runs must be >= 20")

    work = Path(tempfile.mkdtemp(prefix="lanectl-status-bench."))
    cfg = work / "config"
    sup_dir = work / "supervisor"
    sup_dir.mkdir()
    names = lane_names(args.lanes)
    units = [f"lanectl-lane@{n}.service" for n in names]
    supd: subprocess.Popen | None = None
    out: dict = {"lanes": args.lanes, "runs": args.runs, "warmup_rounds": args.warmup}
    try:
        write_config(cfg, args.lanes, args.lane_port, args.probe_ledger)
        out["ledger"] = args.probe_ledger or "the fleet's own (lanectl install creates it, the supervisor runs on it)"
        log(f"{args.lanes} lanes in {cfg}: install + up")
        run([LANECTL, "validate", "-c", str(cfg)])
        run([LANECTL, "install", "-c", str(cfg)])
        run([LANECTL, "up", "-c", str(cfg)])
        wait_for(lambda: run([LANECTL, "status", "--json"], check=False).returncode == 0,
                 "lanectl status to report every lane up")

        conf = write_supervisor_conf(sup_dir, args.lanes, args.supervisor_port)
        log(f"supervisord with {args.lanes} programs ({conf})")
        supd = subprocess.Popen([SUPERVISORD, "-c", str(conf)], stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        out["supervisord_pid_in_sandbox"] = supd.pid

        def sup_all_running() -> bool:
            p = run([SUPERVISORCTL, "-c", str(conf), "status"], check=False)
            return p.returncode == 0 and p.stdout.count(" RUNNING ") == args.lanes
        wait_for(sup_all_running, "supervisord programs RUNNING")
        wait_for(lambda: all(port_open(args.supervisor_port + i) for i in range(args.lanes)),
                 "supervised runtimes listening")
        wait_for(lambda: all(port_open(args.lane_port + i) for i in range(args.lanes)), "lanes listening")

        show = f"systemctl show (1 call, {args.lanes} units)"
        cmds = {
            "lanectl status --json": [LANECTL, "status", "--json"],
            "lanectl probe": [LANECTL, "probe"],
            "supervisorctl status": [SUPERVISORCTL, "-c", str(conf), "status"],
            show: ["systemctl", "show", "-p", "ActiveState,SubState,MainPID,NRestarts,StatusText", "--", *units],
            "python -c pass (floor)": [PY, "-c", "pass"],
        }
        for spec in args.compare:
            name, _, venv = spec.partition("=")
            other = str(Path(venv) / "bin" / "lanectl")
            cmds[f"{name}: lanectl status --json"] = [other, "status", "--json"]
            cmds[f"{name}: lanectl probe"] = [other, "probe"]
        out["commands"] = {k: " ".join(v) for k, v in cmds.items()}
        # sanity: what each one says, once
        status = json.loads(run(cmds["lanectl status --json"]).stdout)
        lanes = status["data"]["lanes"]
        out["lanectl_status_check"] = {"lanes": len(lanes), "up": sum(l["state"] == "up" for l in lanes)}
        out["supervisorctl_check"] = run(cmds["supervisorctl status"]).stdout.count(" RUNNING ")
        out["systemctl_check"] = run(cmds[show]).stdout.count("SubState=running")
        # what the probe says (its exit code is its verdict: 0 OK ... 3 UNKNOWN)
        p = run(cmds["lanectl probe"], check=False)
        out["probe_check"] = {"exit": p.returncode, "first_line": p.stdout.splitlines()[0] if p.stdout else ""}

        keys = list(cmds)
        times: dict[str, list[float]] = {k: [] for k in keys}
        rcs: dict[str, list[int]] = {k: [] for k in keys}
        total = args.warmup + args.runs
        log(f"timing: {args.warmup} warm-up + {args.runs} timed rounds of {len(keys)} commands, order rotating")
        for r in range(total):
            order = keys[r % len(keys):] + keys[:r % len(keys)]
            for k in order:
                ms, rc = timed(cmds[k])
                if r >= args.warmup:
                    times[k].append(ms)
                    rcs[k].append(rc)
        out["results"] = {
            k: {"n": len(v), "median_ms": round(statistics.median(v), 2), "p90_ms": round(pct(v, 90), 2),
                "min_ms": round(min(v), 2), "max_ms": round(max(v), 2),
                "nonzero_exits": sum(1 for c in rcs[k] if c != 0), "samples_ms": [round(x, 2) for x in v]}
            for k, v in times.items()
        }
        lc, sc = out["results"]["lanectl status --json"], out["results"]["supervisorctl status"]
        out["ratio_lanectl_over_supervisorctl"] = {"median": round(lc["median_ms"] / sc["median_ms"], 2),
                                                   "p90": round(lc["p90_ms"] / sc["p90_ms"], 2)}
        pc = out["results"]["lanectl probe"]
        out["ratio_probe_over_supervisorctl"] = {"median": round(pc["median_ms"] / sc["median_ms"], 2),
                                                 "p90": round(pc["p90_ms"] / sc["p90_ms"], 2)}
        log("phases of lanectl status")
        out["lanectl_phases_median_ms"] = phases(args.importtime_runs)
        log("importtime")
        out["importtime"] = importtime([LANECTL, "status", "--json"], args.importtime_runs)
        sup_it = importtime([SUPERVISORCTL, "-c", str(conf), "status"], args.importtime_runs)
        out["importtime_supervisorctl"] = {k: sup_it[k] for k in ("command", "runs", "top", "self_total_us")}
    finally:
        if not args.keep:
            if supd is not None and supd.poll() is None:
                log(f"stopping supervisord (PID {supd.pid} in the sandbox)")
                supd.send_signal(signal.SIGTERM)
                try:
                    supd.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    supd.kill()
                    supd.wait()
            if cfg.is_dir():
                log("lanectl down")
                run([LANECTL, "down", "-c", str(cfg)], check=False)
            shutil.rmtree(work, ignore_errors=True)
    json.dump(out, sys.stdout, indent=2)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())

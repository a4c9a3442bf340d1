"""What `lanectl top` costs: its own CPU, and what it adds to the supervisor, the lanes and systemd (PID 1).

Runs INSIDE a sandbox (bench/run-top-bench boots one): installs the example fleet, waits until every lane is up,
then alternates rounds without and with `lanectl top` running in a tmux pseudo-terminal (so the live loop really
draws), measuring CPU seconds (user + system, children included: `systemctl show` forks) of every process over the
same wall time. Prints JSON (every round) and a Markdown table of medians.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
VENV = Path(sys.executable).parent
LANECTL = str(VENV / "lanectl")


def sh(*argv: str, check: bool = True) -> str:
    return subprocess.run(argv, check=check, capture_output=True, text=True, timeout=120).stdout


def main_pid(unit: str) -> int:
    return int(sh("systemctl", "show", "-p", "MainPID", "--value", unit).strip() or 0)


def cpu(pid: int) -> float:
    try:
        t = psutil.Process(pid).cpu_times()
        return t.user + t.system + t.children_user + t.children_system
    except psutil.Error:
        return 0.0


def measure(pids: dict[str, int], seconds: float) -> dict[str, float]:
    """% of one core per process over ``seconds`` of wall time."""
    before = {k: cpu(p) for k, p in pids.items()}
    t0 = time.monotonic()
    time.sleep(seconds)
    wall = time.monotonic() - t0
    return {k: round(100.0 * (cpu(p) - before[k]) / wall, 3) for k, p in pids.items()}


def wait(pred, timeout: float, what: str):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = pred()
        if v:
            return v
        time.sleep(0.2)
    raise SystemExit(f"top_bench: timed out waiting for {what}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--interval", type=float, default=1.0)
    ap.add_argument("--out", default="")
    a = ap.parse_args()
    cfg = Path(tempfile.mkdtemp(prefix="top-bench-"))
    (cfg / "lanectl.toml").write_text('ledger = "/var/lib/lanectl/bench-top.db"\n' + (ROOT / "lanectl.toml").read_text())
    shutil.copytree(ROOT / "lanes.d", cfg / "lanes.d")
    sh(LANECTL, "install", "-c", str(cfg))
    sh(LANECTL, "up", "-c", str(cfg))
    lanes = sorted(p.stem for p in (cfg / "lanes.d").glob("*.toml"))
    wait(lambda: all(r["state"] == "up" for r in json.loads(
        sh(LANECTL, "status", "--json", check=False))["data"]["lanes"]), 60, "lanes up")
    time.sleep(3)  # let start-up settle
    pids = {"supervisor": main_pid("lanectl-supervisor.service"), "systemd (PID 1)": 1}
    for ln in lanes:
        pids[f"lane {ln}"] = main_pid(f"lanectl-lane@{ln}.service")
    rounds = []
    sock = "top-bench"
    try:
        for i in range(a.rounds):
            rounds.append({"round": i, "top": False, **measure(pids, a.seconds)})
            sh("tmux", "-L", sock, "new-session", "-d", "-s", "top", "-x", "132", "-y", "40",
               f"{LANECTL} top -c {cfg} --interval {a.interval:g}")
            wait(lambda: "lanectl top" in sh("tmux", "-L", sock, "capture-pane", "-p", "-t", "top", check=False),
                 30, "top drawn")
            shell = int(sh("tmux", "-L", sock, "display-message", "-p", "-t", "top", "#{pane_pid}").strip())
            top_pid = shell  # tmux runs the command through sh -c, which execs it when it is a single command
            if psutil.Process(shell).name() in ("sh", "bash", "dash"):
                top_pid = psutil.Process(shell).children()[0].pid
            time.sleep(2)  # past its first frames (imports, first connection)
            rounds.append({"round": i, "top": True, **measure({**pids, "lanectl top": top_pid}, a.seconds)})
            sh("tmux", "-L", sock, "send-keys", "-t", "top", "q")
            wait(lambda: not psutil.pid_exists(top_pid) or psutil.Process(top_pid).status() == "zombie", 15,
                 "top to quit")
    finally:
        sh("tmux", "-L", sock, "kill-server", check=False)
        sh(LANECTL, "down", "-c", str(cfg), check=False)
    keys = [*pids, "lanectl top"]
    med = {t: {k: statistics.median(r[k] for r in rounds if r["top"] == t and k in r) for k in keys
               if any(k in r for r in rounds if r["top"] == t)} for t in (False, True)}
    doc = {"seconds": a.seconds, "rounds": rounds, "median": {"without": med[False], "with": med[True]},
           "interval": a.interval, "lanes": lanes}
    if a.out:
        Path(a.out).write_text(json.dumps(doc, indent=2))
    print(json.dumps(doc, indent=2))
    print(f"\n| process | without top | with `lanectl top --interval {a.interval:g}` | added |")
    print("|---|---:|---:|---:|")
    for k in keys:
        w0, w1 = med[False].get(k), med[True].get(k)
        if w1 is None:
            continue
        print(f"| {k} | {'-' if w0 is None else f'{w0:.2f}%'} | {w1:.2f}% | {w1 - (w0 or 0.0):+.2f} |")


if __name__ == "__main__":
    main()

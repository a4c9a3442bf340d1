"""The chaos soak's driver (scripts/chaos runs it inside the sandbox, as root, with /opt/lanectl/venv/bin/python).

Phases: set up a private fleet (ledger on a small tmpfs, a 4th lane `delta` running scripts/chaos_lane.py), drive
producers at a steady rate across the three classes while a seeded schedule injects faults, stop, heal every
fault, wait (bounded) for every mission to end, then reconcile every accepted mission against the ledger (read
only) and against what the lanes executed (every lane's .lanectl/executions.log). The last line of stdout is
`key=value` pairs; the exit status is 1 when lost, duplicated or orphaned is not 0, a fault kind was never
injected, the always-failing burst (fail_burst) drained more than one lane, a supervisor outage longer than
lease_sec (supervisor_outage) cost an attempt or a mission other than a poison one ended dead (poison), 2 when the
fleet could not be set up.

Everything is bounded: the run (--duration), every fault, every command (timeouts), and the final wait (--wait).
Loopback only: the lanes and the supervisor listen on 127.0.0.1, inside the sandbox's own network namespace.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import random
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import traceback
import urllib.request
from pathlib import Path
from typing import Any, Callable

PYTHON = sys.executable  # scripts/chaos runs the driver with the venv's python
LANECTL = str(Path(sys.executable).with_name("lanectl"))
CONFIG_DIR = Path("/etc/lanectl-chaos")
LEDGER_DIR = Path("/var/lib/lanectl-chaos")
LEDGER = LEDGER_DIR / "ledger.db"
FILL = LEDGER_DIR / "chaos-fill"
BIN_DIR = Path("/var/lib/lanes-chaos/bin")
LANES = ["alpha", "beta", "gamma", "delta"]
WORKSPACES = {n: f"/var/lib/lanes/{n}" for n in LANES}
CLASSES = ["interactive", "deadline", "background"]
TERMINAL = ("succeeded", "failed", "dead", "cancelled", "expired")
SUPERVISOR_UNIT = "lanectl-supervisor.service"
SUPERVISOR_URL = "http://127.0.0.1:8700/healthz"
# every kind of fault; each is injected at least once per run
KINDS = ["kill_lane", "stop_lane", "kill_supervisor", "http500", "silent", "disk_full", "drain", "reroute", "apply",
         "fail_burst", "supervisor_outage", "poison"]
PG_KINDS = ["pg_restart", "pg_terminate"]
"""With a PostgreSQL ledger (--pg, --ledger URL): the server restarted (pg_ctl restart -m fast; only with --pg, whose
server the run owns) and the supervisor's backends terminated (pg_terminate_backend). disk_full is not run there:
the ledger is not a file on the run's tmpfs."""
LEDGER_URL: str | None = None
"""The PostgreSQL ledger of this run (--pg or --ledger URL); None: SQLite on the tmpfs."""
PG_SERVER: Any = None
"""--pg: the run's private server (tests/pgserver.py's PgServer), restarted by pg_restart, stopped at the end."""
LEASE_S = 15
"""leases.lease_sec of the chaos fleet (shorter than the default 30 s, so that an outage longer than it fits)."""
OUTAGE_S = LEASE_S + 5
"""supervisor_outage: the supervisor is stopped this long (an upgrade that takes longer than lease_sec)."""
BURST = 36
"""fail_burst: this many missions that always fail (/bin/false), unpinned deadline work every lane may take."""
POISON = ("sleep 0.3; kill -9 $PPID; kill -9 -1; for p in /proc/[0-9]*; do kill -9 ${p#/proc/}; done; "
          "sleep 2; exit 9")
"""poison: a mission that tries every way to kill its lane runtime (its parent, everything it may signal)."""
DELTA_TOML = """# chaos-only lane: the reference runtime with a switchable failure mode (scripts/chaos_lane.py).
# Its missions run without their own PID namespace (LANECTL_MISSION_NAMESPACES=0): delta stands for a runtime its
# missions can reach, so the poison fault's mission pinned here does kill it, and the supervisor's charging of lane
# deaths is what is tested (the poison ends dead, no bystander does). More restarts before it is degraded: the
# poison alone costs it four.
description = "chaos lane"
port = 8704
workspace = "/var/lib/lanes/delta"
exec = ["/usr/bin/env", "LANECTL_MISSION_NAMESPACES=0", "{python}", "{bin}/chaos_lane.py"]
capacity = 4
weight = 100
watchdog_sec = 5

[restart]
restart_sec = 0.5
max_restarts = 10
start_limit_burst = 20
"""
T0 = time.monotonic()


def now_rel() -> float:
    return time.monotonic() - T0


def say(msg: str) -> None:
    print(f"[{now_rel():7.2f}s] {msg}", file=sys.stderr, flush=True)


def errtext(proc: subprocess.CompletedProcess[str]) -> str:
    """What a failed lanectl --json command said: the error document on stdout, else stderr."""
    try:
        doc = json.loads(proc.stdout)
        err = doc.get("error") or doc
        return json.dumps(err)[-600:]
    except (ValueError, AttributeError):
        return (proc.stderr.strip() or proc.stdout.strip())[-600:]


def run(argv: list[str], timeout: float = 60, check: bool = False, input: str | None = None
        ) -> subprocess.CompletedProcess[str]:
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, input=input)
    except subprocess.TimeoutExpired as exc:
        proc = subprocess.CompletedProcess(argv, 124, exc.stdout or "", f"timed out after {timeout}s")
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} exited {proc.returncode}: {proc.stderr.strip()[-2000:]}")
    return proc


def lanectl(*args: str, timeout: float = 60, check: bool = False) -> subprocess.CompletedProcess[str]:
    return run([LANECTL, *args, "-c", str(CONFIG_DIR)], timeout=timeout, check=check)


def lanectl_retry(*args: str, timeout: float = 60, patience: float = 30) -> tuple[subprocess.CompletedProcess[str], int]:
    """An operator verb, repeated while the product refuses it as unavailable (exit 6: e.g. the ledger's disk is
    full), as an operator would; returns the last result and how many refusals came first."""
    end = time.monotonic() + patience
    refusals = 0
    while True:
        proc = lanectl(*args, timeout=timeout)
        if proc.returncode != 6 or time.monotonic() > end:
            return proc, refusals
        refusals += 1
        time.sleep(1.0)


def show(unit: str, *props: str) -> dict[str, str]:
    out = run(["systemctl", "show", "-p", ",".join(props), unit], timeout=15).stdout
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def lane_unit(lane: str) -> str:
    return f"lanectl-lane@{lane}.service"


def main_pid(unit: str) -> int:
    try:
        return int(show(unit, "MainPID").get("MainPID", "0") or 0)
    except ValueError:
        return 0


def proc_state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return ""


def http_json(url: str, timeout: float = 2.0) -> dict[str, Any]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return json.loads(resp.read())
    except (OSError, ValueError):
        return {}


def wait_until(pred: Callable[[], Any], timeout: float, interval: float = 0.2) -> Any:
    end = time.monotonic() + timeout
    while True:
        v = pred()
        if v or time.monotonic() > end:
            return v
        time.sleep(interval)


def write_mode(mode: str) -> None:
    p = Path(WORKSPACES["delta"]) / "mode"
    tmp = p.with_suffix(".tmp")
    tmp.write_text(mode + "\n")
    os.chmod(tmp, 0o644)
    os.replace(tmp, p)


# ------------------------------------------------------------------------------------------------ setup
def setup(src: Path, tmpfs_size: str) -> None:
    LEDGER_DIR.mkdir(parents=True, exist_ok=True)
    if run(["mountpoint", "-q", str(LEDGER_DIR)]).returncode != 0:
        run(["mount", "-t", "tmpfs", "-o", f"size={tmpfs_size},mode=0755", "tmpfs", str(LEDGER_DIR)], check=True)
    say(f"ledger tmpfs: {LEDGER_DIR} ({tmpfs_size})")
    BIN_DIR.mkdir(parents=True, exist_ok=True)
    os.chmod(BIN_DIR.parent, 0o755)
    os.chmod(BIN_DIR, 0o755)
    shutil.copy(src / "scripts" / "chaos_lane.py", BIN_DIR / "chaos_lane.py")
    os.chmod(BIN_DIR / "chaos_lane.py", 0o644)
    if CONFIG_DIR.exists():
        shutil.rmtree(CONFIG_DIR)
    (CONFIG_DIR / "lanes.d").mkdir(parents=True)
    (CONFIG_DIR / "lanectl.toml").write_text(f'ledger = "{LEDGER_URL or LEDGER}"\n' + (src / "lanectl.toml").read_text()
                                             + f"\n[leases]\nlease_sec = {LEASE_S}\n")
    for f in sorted((src / "lanes.d").glob("*.toml")):
        (CONFIG_DIR / "lanes.d" / f.name).write_text(f.read_text())
    (CONFIG_DIR / "lanes.d" / "delta.toml").write_text(DELTA_TOML.format(python=PYTHON, bin=BIN_DIR))
    for lane in LANES:  # every lane gets CHAOS_GEN in [env]: the value the config-change fault bumps
        p = CONFIG_DIR / "lanes.d" / f"{lane}.toml"
        text = p.read_text().rstrip("\n") + "\n"
        tables = re.findall(r"^\[([^\]]+)\]\s*$", text, re.M)
        if tables and tables[-1] == "env":
            text += 'CHAOS_GEN = "0"\n'
        elif "env" in tables:
            raise SystemExit(f"{p}: [env] is not the last table; cannot add CHAOS_GEN")
        else:
            text += '\n[env]\nCHAOS_GEN = "0"\n'
        p.write_text(text)
    lanectl("validate", timeout=60, check=True)
    lanectl("install", timeout=120, check=True)
    Path(WORKSPACES["delta"]).mkdir(parents=True, exist_ok=True)
    write_mode("normal")
    up = lanectl("up", timeout=180)
    if up.returncode != 0:
        raise RuntimeError(f"lanectl up exited {up.returncode}: {up.stderr.strip()[-2000:]}")

    def ready() -> bool:
        h = http_json(SUPERVISOR_URL)
        lanes = h.get("lanes") or {}
        return bool(lanes) and set(LANES) <= set(lanes) and all(
            lanes[n].get("healthy") and lanes[n].get("state") == "active" for n in LANES)

    if not wait_until(ready, 60, 0.3):
        raise RuntimeError(f"the fleet did not become healthy in 60 s: {http_json(SUPERVISOR_URL)}")
    say("fleet up: " + ", ".join(LANES) + " + supervisor")


# ------------------------------------------------------------------------------------------------ producers
class Producers:
    def __init__(self, n: int, rate: float, seed: int, duration: float) -> None:
        self.n, self.rate, self.seed, self.duration = n, rate, seed, duration
        self.lock = threading.Lock()
        self.ids: list[int] = []
        self.refused: collections.Counter[str] = collections.Counter()
        self.raw_errors: collections.Counter[str] = collections.Counter()
        self.by_class: collections.Counter[str] = collections.Counter()
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self.produce, args=(i,), name=f"producer-{i}", daemon=True)
                        for i in range(n)]

    def start(self) -> None:
        for t in self.threads:
            t.start()

    def join(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(timeout=30)

    def produce(self, i: int) -> None:
        from lanectl.client import Client
        from lanectl.errors import LanectlError

        rnd = random.Random(self.seed * 1000 + i)
        period = self.n / self.rate
        nxt = time.monotonic() + rnd.uniform(0, period)
        k = 0
        client = Client(config_dir=str(CONFIG_DIR))
        try:
            while not self.stop.is_set():
                delay = nxt - time.monotonic()
                if delay > 0 and self.stop.wait(delay):
                    break
                nxt += period
                cls = CLASSES[(i + k) % 3]
                k += 1
                deadline = time.time() + 600 if cls == "deadline" else None
                pin = None
                if rnd.random() < 0.1:  # a few pinned missions give drain and reroute something to move
                    pin = rnd.choice(["alpha", "beta", "gamma"] if cls == "interactive" else ["beta", "gamma"])
                    if cls == "interactive" and pin == "gamma":
                        pin = "alpha"
                argv = ["/bin/sh", "-c", f"sleep 0.0{rnd.randint(1, 9)}; echo done"]
                try:
                    m = client.submit(cls, {"argv": argv}, deadline=deadline, lane=pin)
                except LanectlError as exc:
                    with self.lock:
                        self.refused[getattr(exc, "code", "error")] += 1
                    continue
                except Exception as exc:  # noqa: BLE001 — an error the client API should have wrapped
                    with self.lock:
                        self.raw_errors[f"{type(exc).__module__}.{type(exc).__name__}: {str(exc)[:80]}"] += 1
                    try:  # the connection may be unusable now; a fresh client
                        client.close()
                    except Exception:  # noqa: BLE001
                        pass
                    client = Client(config_dir=str(CONFIG_DIR))
                    continue
                with self.lock:
                    self.ids.append(m.id)
                    self.by_class[cls] += 1
        finally:
            try:
                client.close()
            except Exception:  # noqa: BLE001
                pass


# ------------------------------------------------------------------------------------------------ faults
class Faults:
    """A seeded schedule of faults; each event runs in its own thread so a slow one (apply) never delays the rest.
    Faults that share a resource (delta's mode, the tmpfs, beta's drain, apply) wait for each other."""

    def __init__(self, seed: int, duration: float, every: float, t_start: float, kinds: list[str] | None = None
                 ) -> None:
        self.rnd = random.Random(seed)
        self.duration = duration
        self.t_start = t_start
        self.log: list[dict[str, Any]] = []
        self.counts: collections.Counter[str] = collections.Counter()
        self.lock = threading.Lock()
        self.busy: dict[str, threading.Lock] = collections.defaultdict(threading.Lock)
        self.threads: list[threading.Thread] = []
        self.stopped_pids: list[tuple[str, int, float]] = []
        self.anomalies: list[str] = []
        self.gen = 0
        self.burst_ids: list[int] = []
        self.burst_at: list[float] = []
        self.poison_ids: list[int] = []
        self.outages: list[tuple[float, float]] = []  # (stopped, started again), wall time
        lo, hi = 3.0, max(duration - 8.0, 12.0)
        self.kinds = kinds or KINDS
        n = max(len(self.kinds), int((hi - lo) / every))
        kinds = self.kinds[:]
        self.rnd.shuffle(kinds)
        kinds += [self.rnd.choice(self.kinds) for _ in range(n - len(self.kinds))]
        times = sorted(self.rnd.uniform(lo, hi) for _ in range(n))
        # the first len(KINDS) slots are spread over the run so each kind is tried early enough to finish
        self.schedule = list(zip(times, kinds))
        self.params = [self.rnd.random() for _ in range(n)]  # per-event randomness, drawn up front
        self.choices = [self.rnd.randrange(1 << 30) for _ in range(n)]

    def record(self, kind: str, target: str, detail: str, ok: bool = True) -> None:
        entry = {"t": round(time.monotonic() - self.t_start, 2), "at": time.time(), "kind": kind, "target": target,
                 "detail": detail, "ok": ok}
        with self.lock:
            self.log.append(entry)
            if ok:
                self.counts[kind] += 1
        say(f"FAULT {kind:15s} {target:10s} {detail}")

    def anomaly(self, text: str) -> None:
        with self.lock:
            self.anomalies.append(f"t={time.monotonic() - self.t_start:.1f}s {text}")
        say("ANOMALY " + text)

    def run(self, stop: threading.Event) -> None:
        for i, (t, kind) in enumerate(self.schedule):
            delay = self.t_start + t - time.monotonic()
            if delay > 0 and stop.wait(delay):
                return
            th = threading.Thread(target=self.safe, args=(kind, self.params[i], self.choices[i]),
                                  name=f"fault-{i}-{kind}", daemon=True)
            th.start()
            self.threads.append(th)

    def safe(self, kind: str, p: float, c: int) -> None:
        try:
            getattr(self, "f_" + kind)(p, c)
        except Exception as exc:  # noqa: BLE001
            self.record(kind, "-", f"driver error: {exc!r}", ok=False)
            traceback.print_exc()

    def join(self, timeout: float) -> None:
        end = time.monotonic() + timeout
        for th in self.threads:
            th.join(timeout=max(0.1, end - time.monotonic()))

    # each fault ------------------------------------------------------------------------------------------
    def _kill(self, kind: str, unit: str, sig: int) -> int:
        for _ in range(20):  # a unit that is restarting has no MainPID: try again shortly
            pid = main_pid(unit)
            if pid > 1:
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    time.sleep(0.25)
                    continue
                return pid
            time.sleep(0.25)
        return 0

    def f_kill_lane(self, p: float, c: int) -> None:
        lane = LANES[c % len(LANES)]
        pid = self._kill("kill_lane", lane_unit(lane), signal.SIGKILL)
        self.record("kill_lane", lane, f"kill -9 {pid}" if pid else "no MainPID for 5 s", ok=bool(pid))

    def f_stop_lane(self, p: float, c: int) -> None:
        lane = LANES[c % len(LANES)]
        pid = self._kill("stop_lane", lane_unit(lane), signal.SIGSTOP)
        self.record("stop_lane", lane, f"kill -STOP {pid}; the watchdog must restart it" if pid else
                    "no MainPID for 5 s", ok=bool(pid))
        if not pid:
            return
        with self.lock:
            self.stopped_pids.append((lane, pid, time.monotonic()))
        wd = 10.0 if lane == "gamma" else 5.0
        t0 = time.monotonic()
        replaced = wait_until(lambda: main_pid(lane_unit(lane)) not in (pid, 0) or not Path(f"/proc/{pid}").exists(),
                              wd + 25, 0.25)
        if not replaced:
            self.anomaly(f"{lane} pid {pid} still frozen {time.monotonic() - t0:.0f}s after SIGSTOP "
                         f"(watchdog {wd:g}s); SIGCONT")
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass
        else:
            say(f"  {lane}: frozen pid {pid} replaced after {time.monotonic() - t0:.1f}s")

    def f_kill_supervisor(self, p: float, c: int) -> None:
        with self.busy["supervisor"]:
            pid = self._kill("kill_supervisor", SUPERVISOR_UNIT, signal.SIGKILL)
        self.record("kill_supervisor", "supervisor", f"kill -9 {pid}" if pid else "no MainPID for 5 s", ok=bool(pid))

    def f_supervisor_outage(self, p: float, c: int) -> None:
        """The supervisor stopped for longer than lease_sec (a slow upgrade), while lanes run missions: when it is
        back, nothing a lane held may be re-run and no attempt charged (outage_charged counts lease expiries right
        after its return: there must be none, every lease restarts from it)."""
        with self.busy["supervisor"]:
            at = time.time()
            stop = run(["systemctl", "stop", SUPERVISOR_UNIT], timeout=60)
            self.record("supervisor_outage", "supervisor", f"systemctl stop for {OUTAGE_S}s (lease_sec {LEASE_S})",
                        ok=stop.returncode == 0)
            time.sleep(OUTAGE_S)
            start = run(["systemctl", "start", SUPERVISOR_UNIT], timeout=90)
            if start.returncode != 0:
                self.anomaly(f"systemctl start {SUPERVISOR_UNIT} after the outage exited {start.returncode}")
            with self.lock:
                self.outages.append((at, time.time()))
            say(f"  supervisor: back after {time.time() - at:.1f}s")

    def _delta_mode(self, kind: str, mode: str, p: float) -> None:
        hold = 5 + 10 * p
        with self.busy["delta"]:
            write_mode(mode)
            self.record(kind, "delta", f"mode {mode} for {hold:.1f}s")
            time.sleep(hold)
            write_mode("normal")
            say(f"  delta: mode normal again ({kind} healed)")

    def f_http500(self, p: float, c: int) -> None:
        self._delta_mode("http500", "http500", p)

    def f_silent(self, p: float, c: int) -> None:
        self._delta_mode("silent", "silent", p)

    def f_disk_full(self, p: float, c: int) -> None:
        hold = 5.0
        with self.busy["disk"]:
            st = os.statvfs(LEDGER_DIR)
            free = st.f_bavail * st.f_frsize
            proc = run(["fallocate", "-l", str(free), str(FILL)], timeout=20)
            if proc.returncode != 0:  # fall back to writing it
                run(["dd", "if=/dev/zero", f"of={FILL}", "bs=1M", "status=none"], timeout=30)
            st2 = os.statvfs(LEDGER_DIR)
            self.record("disk_full", str(LEDGER_DIR), f"filled {free >> 20} MiB, {st2.f_bavail * st2.f_frsize} "
                        f"bytes left, for {hold:g}s")
            time.sleep(hold)
            FILL.unlink(missing_ok=True)
            say("  disk_full healed (fill file removed)")

    def f_drain(self, p: float, c: int) -> None:
        hold = 5 + 15 * p
        with self.busy["drain-beta"]:
            proc, refused = lanectl_retry("drain", "beta", "--reason", "chaos", "--json", timeout=60)
            self.record("drain", "beta", f"lanectl drain beta -> exit {proc.returncode}"
                        f"{f' after {refused} refusal(s) (exit 6)' if refused else ''}; undrain in {hold:.1f}s",
                        ok=proc.returncode == 0)
            if proc.returncode != 0:
                say("  drain: " + errtext(proc))
            time.sleep(hold)
            proc, _ = lanectl_retry("undrain", "beta", "--reason", "chaos", "--json", timeout=60)
            say(f"  lanectl undrain beta -> exit {proc.returncode}")
            if proc.returncode != 0:
                self.anomaly(f"lanectl undrain beta exited {proc.returncode}: {errtext(proc)}")

    def f_reroute(self, p: float, c: int) -> None:
        proc, refused = lanectl_retry("reroute", "gamma", "--to", "beta", "--reason", "chaos", "--json", timeout=60)
        moved = "?"
        try:
            moved = str(len(json.loads(proc.stdout)["data"]["missions"]))
        except (ValueError, KeyError, TypeError):
            pass
        self.record("reroute", "gamma->beta", f"lanectl reroute gamma --to beta -> exit {proc.returncode}, "
                    f"{moved} mission(s) moved{f' after {refused} refusal(s) (exit 6)' if refused else ''}",
                    ok=proc.returncode == 0)
        if proc.returncode != 0:
            say("  reroute: " + errtext(proc))

    def f_apply(self, p: float, c: int) -> None:
        lane = LANES[c % len(LANES)]
        with self.busy["apply"]:
            with self.lock:
                self.gen += 1
                gen = self.gen
            f = CONFIG_DIR / "lanes.d" / f"{lane}.toml"
            f.write_text(re.sub(r'^CHAOS_GEN = "\d+"$', f'CHAOS_GEN = "{gen}"', f.read_text(), flags=re.M))
            t0 = time.monotonic()
            proc, refused = lanectl_retry("apply", "--timeout", "60", "--reason", "chaos", "--json", timeout=150)
            restarted = "?"
            try:
                restarted = ",".join(json.loads(proc.stdout)["data"]["restarted"]) or "-"
            except (ValueError, KeyError, TypeError):
                pass
            self.record("apply", lane, f"CHAOS_GEN={gen}; lanectl apply -> exit {proc.returncode} in "
                        f"{time.monotonic() - t0:.1f}s, restarted {restarted}"
                        f"{f' after {refused} refusal(s) (exit 6)' if refused else ''}", ok=proc.returncode == 0)
            if proc.returncode != 0:
                self.anomaly(f"lanectl apply exited {proc.returncode}: {errtext(proc)}")


    def f_fail_burst(self, p: float, c: int) -> None:
        """Missions that always fail, all at once: the work's fault, not a lane's. The rollback rules may drain at
        most one lane for it (docs/governance.md); the run counts the lanes drained after it (burst_drained)."""
        from lanectl.client import Client
        from lanectl.errors import LanectlError

        ids, refused = [], 0
        at = time.time()
        client = Client(config_dir=str(CONFIG_DIR))
        try:
            for _ in range(BURST):
                try:
                    ids.append(client.submit("deadline", {"argv": ["/bin/false"]}, deadline=time.time() + 600).id)
                except LanectlError:
                    refused += 1
        finally:
            client.close()
        with self.lock:
            self.burst_ids += ids
            self.burst_at.append(at)
        self.record("fail_burst", "deadline", f"{len(ids)} missions running /bin/false submitted"
                    f"{f', {refused} refused' if refused else ''}", ok=bool(ids))


    def f_poison(self, p: float, c: int) -> None:
        """Two missions that try to kill their lane runtime: one any lane may take (a contained lane survives it: it
        fails on its own), one pinned to delta, whose missions can reach its runtime (it kills delta each time it
        runs; it must end dead naming that, and no mission beside it may)."""
        from lanectl.client import Client

        client = Client(config_dir=str(CONFIG_DIR))
        try:
            ids = [client.submit("deadline", {"argv": ["/bin/sh", "-c", POISON]}, deadline=time.time() + 600).id,
                   client.submit("deadline", {"argv": ["/bin/sh", "-c", POISON]}, deadline=time.time() + 600,
                                 lane="delta").id]
        finally:
            client.close()
        with self.lock:
            self.poison_ids += ids
        self.record("poison", "any+delta", f"missions {ids} kill their runtime")


    def f_pg_restart(self, p: float, c: int) -> None:
        """The ledger's server restarted under load (every connection cut; commits acknowledged before survive: a
        fast shutdown writes them out)."""
        with self.busy["pg"]:
            t0 = time.monotonic()
            PG_SERVER.restart("fast")
            self.record("pg_restart", "postgresql", f"pg_ctl restart -m fast ({time.monotonic() - t0:.1f}s down)")

    def f_pg_terminate(self, p: float, c: int) -> None:
        """pg_terminate_backend of the supervisor's connections (application_name lanectl-supervisor): mid
        transaction or between two."""
        import psycopg

        with self.busy["pg"], self.busy["supervisor"]:  # not while supervisor_outage has it stopped
            pids: list[int] = []
            for _ in range(120):  # the supervisor may be between connections (restarting, reconnecting)
                with psycopg.connect(LEDGER_URL, autocommit=True, application_name="lanectl-chaos") as conn:
                    pids = [r[1] for r in conn.execute(
                        "SELECT pg_terminate_backend(pid), pid FROM pg_stat_activity WHERE datname = "
                        "current_database() AND application_name = 'lanectl-supervisor'").fetchall() if r[0]]
                if pids:
                    break
                time.sleep(0.25)
            self.record("pg_terminate", "supervisor", f"pg_terminate_backend {pids}" if pids else
                        "no supervisor connection for 30 s", ok=bool(pids))


def bystanders_dead(faults: Faults, ids: list[int]) -> list[int]:
    """Missions that ended dead although they are not poison: lane deaths must not be charged to bystanders."""
    if not ids:
        return []
    poison = set(faults.poison_ids)
    return [r[0] for r in ledger_rows("SELECT id FROM missions WHERE state = 'dead' AND id BETWEEN ? AND ?",
                                      min(ids), max(ids)) if r[0] not in poison and r[0] in set(ids)]


def poison_named(faults: Faults) -> int:
    """Poison missions that ended dead with an error naming what they did."""
    return sum(1 for i in faults.poison_ids for r in ledger_rows("SELECT state, error FROM missions WHERE id = ?", i)
               if r[0] == "dead" and (r[1] or "").startswith("killed its lane runtime"))


def outage_charged(faults: Faults) -> int:
    """Attempts lost to a lease expiry within lease_sec/2 of the supervisor's return from an outage: the outage's
    cost (every lease restarts from the return, so there must be none)."""
    n = 0
    for _, back in faults.outages:
        n += ledger_rows("SELECT count(*) FROM events WHERE kind IN ('requeued', 'dead') AND at BETWEEN ? AND ? "
                         "AND json_extract(data, '$.reason') = 'lease expired'", back - 2, back + LEASE_S / 2)[0][0]
    return n


def burst_drained(faults: Faults) -> list[str]:
    """Lanes a failure_spike rollback drained after the first fail_burst (at most one may be)."""
    if not faults.burst_at:
        return []
    return [r[0] for r in ledger_rows(
        "SELECT DISTINCT lane FROM events WHERE kind = 'rollback' AND at >= ? "
        "AND json_extract(data, '$.trigger') = 'failure_spike' ORDER BY lane", min(faults.burst_at))]


# ------------------------------------------------------------------------------------------------ heal, wait
def heal(faults: Faults) -> None:
    """Undo every fault that may still hold, and make sure every unit runs again."""
    write_mode("normal")
    FILL.unlink(missing_ok=True)
    if PG_SERVER is not None and not PG_SERVER.running:
        faults.anomaly("the PostgreSQL server is down at heal time; starting it")
        PG_SERVER.resume()
    for lane, pid, _ in list(faults.stopped_pids):
        if proc_state(pid) == "T":
            faults.anomaly(f"{lane} pid {pid} still stopped at heal time; SIGCONT")
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass
    for unit in [SUPERVISOR_UNIT] + [lane_unit(n) for n in LANES]:
        st = show(unit, "ActiveState", "SubState")
        if st.get("ActiveState") not in ("active", "activating", "reloading"):
            faults.anomaly(f"{unit} is {st.get('ActiveState')}/{st.get('SubState')} at heal time; "
                           "reset-failed + start")
            run(["systemctl", "reset-failed", unit], timeout=15)
            run(["systemctl", "start", unit], timeout=60)
    for lane in LANES:  # a drain left by a fault (or by an apply that timed out)
        try:
            state = ledger_rows("SELECT state FROM lanes WHERE name = ?", lane)
        except RuntimeError as exc:
            faults.anomaly(f"heal: {exc}")
            continue
        if state and state[0][0] in ("draining", "drained"):
            say(f"  heal: {lane} is {state[0][0]}; undrain")
            lanectl("undrain", lane, "--reason", "chaos heal", timeout=60)


READ_ERRORS: collections.Counter[str] = collections.Counter()


def ledger_rows(sql: str, *args: Any) -> list[tuple[Any, ...]]:
    """A read-only query; retried (20 x 0.25 s) on any sqlite error, each error counted for the summary."""
    last: Exception | None = None
    for _ in range(20):
        if LEDGER_URL:  # the ledger's own read-only handle: the same SQL on PostgreSQL
            from lanectl.errors import LanectlError
            from lanectl.ledger import Ledger

            try:
                led = Ledger.open_readonly(LEDGER_URL)
                try:
                    return [tuple(r) for r in led.conn.execute(sql, args).fetchall()]
                finally:
                    led.close()
            except (sqlite3.DatabaseError, LanectlError) as exc:
                READ_ERRORS[str(exc)[:200]] += 1
                say(f"ledger read error: {exc} ({sql[:60]})")
                last = exc
                time.sleep(0.5)
                continue
        try:
            conn = sqlite3.connect(f"file:{LEDGER}?mode=ro", uri=True, timeout=10)
            try:
                return conn.execute(sql, args).fetchall()
            finally:
                conn.close()
        except sqlite3.DatabaseError as exc:
            READ_ERRORS[str(exc)] += 1
            say(f"ledger read error: {exc} ({sql[:60]})")
            last = exc
            time.sleep(0.25)
    raise RuntimeError(f"cannot read the ledger ({last}): {sql}")


def integrity() -> str:
    if LEDGER_URL:  # PostgreSQL checks its own pages; here: the ledger's tables answer
        try:
            ledger_rows("SELECT count(*) FROM missions")
        except RuntimeError as exc:
            return str(exc)
        return "ok"
    try:
        rows = ledger_rows("PRAGMA integrity_check")
    except RuntimeError as exc:
        return str(exc)
    return "ok" if rows == [("ok",)] else "; ".join(str(r[0]) for r in rows[:5])


def mission_states(ids: list[int]) -> dict[int, str]:
    if not ids:
        return {}
    wanted = set(ids)
    rows = ledger_rows("SELECT id, state FROM missions WHERE id BETWEEN ? AND ?", min(ids), max(ids))
    return {r[0]: r[1] for r in rows if r[0] in wanted}


def wait_terminal(ids: list[int], timeout: float) -> float:
    t0 = time.monotonic()
    last = 0.0
    while True:
        st = mission_states(ids)
        open_ = [i for i in ids if st.get(i) not in TERMINAL]
        if not open_:
            return time.monotonic() - t0
        if time.monotonic() - t0 > timeout:
            say(f"gave up waiting after {timeout:g}s: {len(open_)} mission(s) not finished, e.g. "
                f"{[(i, st.get(i)) for i in open_[:8]]}")
            return time.monotonic() - t0
        if time.monotonic() - last > 10:
            say(f"waiting: {len(open_)} mission(s) not finished yet "
                f"({dict(collections.Counter(st.get(i, 'missing') for i in open_))})")
            last = time.monotonic()
        time.sleep(0.5)


# ------------------------------------------------------------------------------------------------ reconcile
def executions() -> list[dict[str, Any]]:
    out = []
    for lane in LANES:
        p = Path(WORKSPACES[lane]) / ".lanectl" / "executions.log"
        try:
            lines = p.read_text().splitlines()
        except OSError:
            continue
        for line in lines:
            try:
                out.append(json.loads(line))
            except ValueError:
                out.append({"event": "corrupt", "lane": lane, "raw": line[:200]})
    return out


def swallowed() -> list[dict[str, Any]]:
    p = Path(WORKSPACES["delta"]) / ".lanectl" / "swallowed.log"
    try:
        return [json.loads(x) for x in p.read_text().splitlines() if x.strip()]
    except (OSError, ValueError):
        return []


def pct(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    v = sorted(values)
    return v[min(len(v) - 1, max(0, int(round(q / 100 * len(v) + 0.5)) - 1))]


def reconcile(ids: list[int]) -> dict[str, Any]:
    """The chaos runs' one invariant checker (tests/chaos_invariants.py) on this run's ledger and lanes' logs."""
    from tests.chaos_invariants import reconcile as check

    return {**check(ids, ledger_rows, executions()), "swallowed": len(swallowed())}


def detail(ids: list[int], limit: int = 3) -> None:
    """Evidence for the first few problem missions: their events and executions."""
    ex = executions()
    for i in ids[:limit]:
        say(f"  mission {i}:")
        for r in ledger_rows("SELECT id, at, kind, lane, attempt, state, data FROM events WHERE mission = ? "
                             "ORDER BY id", i):
            say(f"    event {r}")
        for e in ex:
            if e.get("mission") == i:
                say(f"    exec  {e}")


# ------------------------------------------------------------------------------------------------ main
def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--duration", type=float, default=120.0, help="seconds of load and faults")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--rate", type=float, default=8.0, help="missions per second, all producers together")
    ap.add_argument("--producers", type=int, default=3)
    ap.add_argument("--fault-every", type=float, default=12.0, help="mean seconds between faults")
    ap.add_argument("--wait", type=float, default=120.0, help="seconds to wait for every mission to end")
    ap.add_argument("--tmpfs-size", default="64m")
    ap.add_argument("--src", default=str(Path(__file__).resolve().parents[1]), help="the checkout")
    ap.add_argument("--report", help="also write the summary as JSON here")
    ap.add_argument("--kinds", help="only these fault kinds, comma-separated (to reproduce one problem); "
                    f"default all: {','.join(KINDS)} (PostgreSQL: without disk_full, with {','.join(PG_KINDS)})")
    ap.add_argument("--ledger", help="a postgresql:// URL: run on that database (it must be empty or a ledger of "
                    "this run's only; pg_restart needs --pg)")
    ap.add_argument("--pg", action="store_true", help="start a private PostgreSQL server for the run (as "
                    "tests/pgserver.py does: initdb/pg_ctl as postgres, a socket in a private directory under /tmp) "
                    "and run on it")
    a = ap.parse_args()
    global LEDGER_URL, PG_SERVER
    if a.ledger and a.pg:
        ap.error("--ledger and --pg exclude each other")
    if a.ledger and not a.ledger.startswith(("postgresql://", "postgres://")):
        ap.error("--ledger: a postgresql:// URL (without it the ledger is SQLite on the run's tmpfs)")
    known = KINDS + PG_KINDS
    default = KINDS
    if a.pg or a.ledger:
        default = [k for k in KINDS if k != "disk_full"] + (PG_KINDS if a.pg else ["pg_terminate"])
    kinds = a.kinds.split(",") if a.kinds else default
    if not set(kinds) <= set(known):
        ap.error(f"--kinds: unknown {sorted(set(kinds) - set(known))}; known: {','.join(known)}")
    if "pg_restart" in kinds and not a.pg:
        ap.error("--kinds pg_restart needs --pg (a server of the run's own to restart)")
    if "pg_terminate" in kinds and not (a.pg or a.ledger):
        ap.error("--kinds pg_terminate needs a PostgreSQL ledger (--pg or --ledger URL)")
    if os.geteuid() != 0:
        print("chaos.py: run as root inside the sandbox (scripts/chaos does that)", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # finally: blocks run (the private server stops)
    sys.path.insert(0, str(Path(a.src)))  # tests/chaos_invariants.py (the checker), tests/pgserver.py (--pg)
    if a.ledger:
        LEDGER_URL = a.ledger
    elif a.pg:
        from tests.pgserver import PgServer

        PG_SERVER = PgServer().start()
        LEDGER_URL = PG_SERVER.url(PG_SERVER.create_db("chaos", empty=True))
        say(f"private PostgreSQL server: {LEDGER_URL}")
    try:
        return run_chaos(a, kinds)
    finally:
        if PG_SERVER is not None:
            lanectl("down", timeout=120)  # the supervisor's connection closes before its server stops
            PG_SERVER.stop()


def run_chaos(a: argparse.Namespace, kinds: list[str]) -> int:
    a.duration = max(20.0, min(a.duration, 24 * 3600.0))
    a.rate = max(0.5, min(a.rate, 200.0))
    a.wait = max(10.0, min(a.wait, 1800.0))
    try:
        setup(Path(a.src), a.tmpfs_size)
    except Exception as exc:  # noqa: BLE001
        say(f"setup failed: {exc}")
        print(f"chaos: setup failed: {exc}", file=sys.stderr)
        return 2

    t_start = time.monotonic()
    prod = Producers(a.producers, a.rate, a.seed, a.duration)
    faults = Faults(a.seed, a.duration, a.fault_every, t_start, kinds)
    say(f"run: {a.duration:g}s, seed {a.seed}, {a.rate:g} missions/s by {a.producers} producers, "
        f"{len(faults.schedule)} faults scheduled: {dict(collections.Counter(k for _, k in faults.schedule))}")
    stop = threading.Event()
    prod.start()
    fth = threading.Thread(target=faults.run, args=(stop,), name="faults", daemon=True)
    fth.start()
    end = t_start + a.duration
    while time.monotonic() < end:
        time.sleep(min(10.0, max(0.0, end - time.monotonic())))
        if time.monotonic() < end:
            h = http_json(SUPERVISOR_URL)
            say(f"progress: {len(prod.ids)} submitted, {sum(prod.refused.values())} refused; supervisor "
                f"queued={h.get('queued')} in_flight={h.get('in_flight')}")
    prod.join()
    stop.set()
    fth.join(timeout=5)
    say(f"load stopped: {len(prod.ids)} submitted; waiting for faults in progress")
    faults.join(timeout=180)
    ran_for = time.monotonic() - t_start
    drained_by_burst = burst_drained(faults)  # before heal undrains them
    charged_by_outage = outage_charged(faults)
    say("healing every fault")
    heal(faults)
    all_ids = prod.ids + faults.burst_ids + faults.poison_ids
    waited = wait_terminal(all_ids, a.wait)
    rec = reconcile(all_ids)
    integ = integrity()
    dead_bystanders = bystanders_dead(faults, all_ids)

    submitted = len(all_ids)
    st = rec["states"]
    refused = sum(prod.refused.values()) + sum(prod.raw_errors.values())
    p99 = pct(rec["waits"], 99)
    missing_kinds = [k for k in faults.kinds if faults.counts[k] == 0]
    sup = show(SUPERVISOR_UNIT, "NRestarts")
    summary = {
        "duration_s": round(ran_for, 1), "seed": a.seed, "rate": a.rate, "submitted": submitted,
        "succeeded": st["succeeded"], "failed": st["failed"], "dead": st["dead"], "cancelled": st["cancelled"],
        "expired": st["expired"], "refused": refused, "lost": len(rec["lost_ids"]),
        "duplicated": len(rec["dup_ids"]), "orphaned": len(rec["orphan_ids"]),
        "p50_interactive_wait_ms": round(pct(rec["waits"], 50), 1),
        "p99_interactive_wait_ms": round(p99, 1), "retried": rec["retried"], "reran": rec["reran"],
        "executions": rec["executions"], "swallowed": rec["swallowed"], "anomalies": len(faults.anomalies),
        "integrity": "ok" if integ == "ok" else "FAILED", "ledger_read_errors": sum(READ_ERRORS.values()),
        "burst_drained": len(drained_by_burst), "outage_charged": charged_by_outage,
        "bystanders_dead": len(dead_bystanders), "poison_dead_named": poison_named(faults),
        **{f"faults_{k}": faults.counts[k] for k in faults.kinds},
        "ledger": "postgresql" if LEDGER_URL else "sqlite",
    }
    out = sys.stdout
    print("", file=out)
    print(f"chaos run: {ran_for:.0f}s of load, seed {a.seed}, {a.rate:g} missions/s; then heal and "
          f"{waited:.1f}s until every mission ended", file=out)
    print(f"  submitted {submitted} ({dict(prod.by_class)}), refused {refused} "
          f"{dict(prod.refused)}{' raw errors ' + str(dict(prod.raw_errors)) if prod.raw_errors else ''}", file=out)
    print(f"  outcomes: {dict(st)}", file=out)
    print(f"  retried (attempts > 1): {rec['retried']}; executed more than once (at least once): {rec['reran']}; "
          f"executions logged: {rec['executions']}; missions swallowed by silent delta: {rec['swallowed']}", file=out)
    print(f"  interactive queue wait: p50 {pct(rec['waits'], 50):.1f} ms, p99 {p99:.1f} ms "
          f"({len(rec['waits'])} missions)", file=out)
    print(f"  supervisor restarts (NRestarts): {sup.get('NRestarts')}; ledger "
          f"{'check (PostgreSQL: its tables answer)' if LEDGER_URL else 'PRAGMA integrity_check'}: {integ}", file=out)
    if READ_ERRORS:
        print(f"  read-only ledger reads that failed (retried): {dict(READ_ERRORS)}", file=out)
    lanes_now = ledger_rows("SELECT name, state FROM lanes ORDER BY name")
    print(f"  lanes in the ledger at the end: {dict(lanes_now)}", file=out)
    if faults.outages:
        print(f"  supervisor_outage: {len(faults.outages)} outage(s) of {OUTAGE_S}s (lease_sec {LEASE_S}); attempts "
              f"lost to a lease expiry right after its return: {charged_by_outage} (must be 0)", file=out)
    if faults.burst_at:
        print(f"  fail_burst: {len(faults.burst_ids)} always-failing missions; lanes drained by failure_spike "
              f"after it: {drained_by_burst or 'none'} (at most 1)", file=out)
    if faults.poison_ids:
        print(f"  poison: missions {faults.poison_ids}: "
              + ", ".join(f"{i} {mission_states([i]).get(i)}" for i in faults.poison_ids)
              + f"; dead with 'killed its lane runtime': {summary['poison_dead_named']}; bystanders dead: "
              f"{dead_bystanders or 'none'} (must be none)", file=out)
        detail(dead_bystanders)
    print(f"  lost {len(rec['lost_ids'])} (missing {len(rec['missing'])}, not terminal {len(rec['not_terminal'])}, "
          f"succeeded without a logged execution {len(rec['succeeded_no_exec'])}); duplicated "
          f"{len(rec['dup_ids'])} (ledger {len(rec['dup_ledger'])}, executions {len(rec['dup_exec'])}); "
          f"orphaned {len(rec['orphan_ids'])}", file=out)
    if rec["no_terminal_event"]:
        print(f"  note: {len(rec['no_terminal_event'])} terminal mission(s) without a terminal event, e.g. "
              f"{rec['no_terminal_event'][:5]}", file=out)
    if rec["corrupt_exec_lines"]:
        print(f"  note: {rec['corrupt_exec_lines']} unreadable line(s) in executions logs", file=out)
    print("  faults:", file=out)
    for f in faults.log:
        print(f"    t={f['t']:7.2f}s {f['kind']:15s} {f['target']:12s} {'' if f['ok'] else '(FAILED) '}{f['detail']}",
              file=out)
    if faults.anomalies:
        print("  anomalies (product behaviour to look at):", file=out)
        for x in faults.anomalies:
            print(f"    {x}", file=out)
    for name, ids_ in (("lost", rec["lost_ids"]), ("duplicated", rec["dup_ids"]), ("orphaned", rec["orphan_ids"])):
        if ids_:
            print(f"  {name}: {ids_[:20]}", file=out)
            detail(ids_)
    if missing_kinds:
        print(f"  fault kinds never injected: {missing_kinds}", file=out)
    if a.report:
        Path(a.report).write_text(json.dumps({**summary, "faults": faults.log, "anomalies": faults.anomalies,
                                              "refused_by_code": dict(prod.refused),
                                              "raw_errors": dict(prod.raw_errors)}, indent=1))
    out.flush()
    print(" ".join(f"{k}={v}" for k, v in summary.items()), flush=True)
    bad = (summary["lost"] or summary["duplicated"] or summary["orphaned"] or missing_kinds or integ != "ok"
           or len(drained_by_burst) > 1 or charged_by_outage or dead_bystanders)
    return 1 if bad else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except Exception as exc:  # noqa: BLE001 — still end with a key=value line a CI job can read
        traceback.print_exc()
        print(f"error={type(exc).__name__} lost=unknown duplicated=unknown orphaned=unknown", flush=True)
        sys.exit(1)

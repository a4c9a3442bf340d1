"""Issue 12: submit -> dispatch latency of the supervisor on a PostgreSQL ledger, with LISTEN/NOTIFY and with polling
only (``LANECTL_PG_LISTEN=0``).

    /opt/lanectl/venv/bin/python bench/pg_latency_bench.py [--samples 60] [--blocks 2] [--json FILE]

One private durable server (bench/pgbench_server.py: fsync, full_page_writes, synchronous_commit on; socket only).
Per block and mode, a fresh ledger database and three processes:
  supervisor  ``lanectl.supervisor.Supervisor(...).run()``, the real main loop, run directly (``use_systemd=False``:
              no unit, no sandbox), with the configuration's defaults (tick_sec, observe_sec, ...) and the mode's
              environment: nothing set (LISTEN, the default) or ``LANECTL_PG_LISTEN=0`` (polling only);
  lane        the reference runtime (``lanectl.runtime.LaneRuntime``, capacity 4) on a loopback port, taking the
              supervisor's dispatch POSTs and sending its callbacks over the supervisor's unix socket, so every
              mission runs (``true``) and finishes;
  this one    submits one interactive mission at a time at idle (``missions.submit``, its own connection), takes
              ``time.time()`` when the submit's COMMIT returned, then polls the ledger every --poll-ms for the
              mission's ``dispatched`` event; waits for the mission to finish and a random 50-150 ms more (so the
              submits fall at every phase of the supervisor's cadence) before the next.
Per mission: ``seen`` = when this process saw the dispatched event - the submit's commit (includes up to one poll
interval); ``event`` = the event's own time (the policy pass's clock reading) - the submit's commit. Blocks
alternate the modes (LISTEN, polling, LISTEN, polling, ...); p50/p95/max over all samples of a mode, and the
supervisor's CPU (utime+stime of its process) per second over the mode's blocks.

LISTEN/NOTIFY (issue 12, item 4) may not be in the code this runs: the supervisor then polls in both modes, and the
two rows should agree. Performance is measured here, never asserted in tests.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import random
import shutil
import signal
import socket
import statistics
import sys
import tempfile
import time
import traceback
import urllib.request
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from pgbench_server import DurableServer  # noqa: E402

MODES = {"listen": {}, "poll": {"LANECTL_PG_LISTEN": "0"}}


def log(msg: str) -> None:
    print(f"pg_latency_bench: {msg}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def write_config(root: Path, url: str) -> tuple[Path, int, int]:
    etc, state, ws = root / "etc", root / "state", root / "alpha"
    (etc / "lanes.d").mkdir(parents=True)
    state.mkdir()
    ws.mkdir()
    sup_port, lane_port = free_port(), free_port()
    (etc / "lanectl.toml").write_text(f'# pg latency bench\nstate_dir = "{state}"\nledger = "{url}"\n'
                                      f"[supervisor]\nport = {sup_port}\n")
    (etc / "lanes.d" / "alpha.toml").write_text(f'port = {lane_port}\nworkspace = "{ws}"\ncapacity = 4\n'
                                               'classes = ["interactive", "background"]\n')
    return etc, sup_port, lane_port


def supervisor_proc(etc: str, sock: str, env: dict[str, str], status: Any) -> None:
    os.environ.update(env)
    try:
        from lanectl import config
        from lanectl.supervisor import Supervisor

        fleet = config.load(etc)
        sup = Supervisor(fleet, config.ledger_path(fleet), use_systemd=False, notifier=None, callback_socket=sock,
                         lane_uids={"alpha": os.getuid()})

        def stop(*_: Any) -> None:
            sup.stop.set()
            sup.wake()

        signal.signal(signal.SIGTERM, stop)
        status.put(("started", os.getpid()))
        sup.run()
    except BaseException:  # noqa: BLE001 (reported to the bench, which says why it cannot measure)
        status.put(("error", traceback.format_exc()))
        raise SystemExit(1) from None


def lane_proc(etc: str, sock: str, port: int, key: str) -> None:
    from lanectl import config
    from lanectl.runtime import LaneInfo, LaneRuntime

    fleet = config.load(etc)
    lane = fleet.lanes["alpha"]

    class Null:
        def send(self, msg: str) -> None:
            pass

    info = LaneInfo(lane="alpha", port=port, workspace=lane.workspace, session_prefix="alpha",
                    capacity=lane.capacity, callback_url=f"unix:{sock}", dispatch_key=key,
                    heartbeat_sec=fleet.settings.leases.heartbeat_sec, supervisor_uid=os.getuid())
    rt = LaneRuntime(info, notifier=Null())  # type: ignore[arg-type]

    def stop(*_: Any) -> None:
        rt.stop.set()
        rt.inbox.put(0)

    signal.signal(signal.SIGTERM, stop)
    rt.run()


def healthy(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as r:
            body = json.loads(r.read())
    except (OSError, ValueError):
        return False
    return bool(body.get("lanes", {}).get("alpha", {}).get("healthy"))


def cpu_s(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as fh:
        f = fh.read().rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")


def block(server: DurableServer, mode: str, samples: int, poll_s: float, rnd: random.Random) -> dict[str, Any]:
    from lanectl import config, keys
    from lanectl.ledger import Ledger
    from lanectl.ledger import missions as ms

    db = server.create_db("lat")
    url = server.url(db)
    root = Path(tempfile.mkdtemp(prefix="pg-latency-"))
    etc, sup_port, lane_port = write_config(root, url)
    sock = str(root / "callbacks.sock")
    # the box secret before either process starts: both would otherwise race to create it (two different keys)
    key = keys.read_lane_keys(root / "state", ["alpha"])["alpha"]
    ctx = mp.get_context("fork")
    status = ctx.Queue()
    procs = []
    try:
        sup = ctx.Process(target=supervisor_proc, args=(str(etc), sock, MODES[mode], status))
        sup.start()
        procs.append(sup)
        kind, detail = status.get(timeout=60)
        if kind == "error":
            raise RuntimeError(f"the supervisor did not start on {url}:\n{detail}")
        lane = ctx.Process(target=lane_proc, args=(str(etc), sock, lane_port, key))
        lane.start()
        procs.append(lane)
        end = time.monotonic() + 60
        while not healthy(sup_port):
            if not sup.is_alive():
                got = status.get(timeout=5) if not status.empty() else ("error", f"exit code {sup.exitcode}")
                raise RuntimeError(f"the supervisor stopped on {url}:\n{got[1]}")
            if time.monotonic() > end:
                raise RuntimeError("the supervisor did not see the lane healthy within 60 s")
            time.sleep(0.1)
        fleet = config.load(etc)
        led = Ledger.open(url)
        seen, event, cpu0, t0 = [], [], cpu_s(sup.pid), time.monotonic()
        for i in range(samples):
            time.sleep(rnd.uniform(0.05, 0.15))
            m = ms.submit(led, fleet, cls="interactive", payload={"argv": ["true"]}, now=time.time()).mission.id
            t_commit = time.time()
            deadline = time.monotonic() + 30
            while True:
                row = led.conn.execute("SELECT at FROM events WHERE mission = ? AND kind = 'dispatched'",
                                       (m,)).fetchone()
                if row is not None:
                    t_seen = time.time()
                    break
                if time.monotonic() > deadline or not sup.is_alive():
                    raise RuntimeError(f"mission {m} was not dispatched within 30 s (supervisor alive: "
                                       f"{sup.is_alive()})")
                time.sleep(poll_s)
            seen.append(t_seen - t_commit)
            event.append(row[0] - t_commit)
            deadline = time.monotonic() + 30
            while led.conn.execute("SELECT state FROM missions WHERE id = ?", (m,)).fetchone()[0] != "succeeded":
                if time.monotonic() > deadline:
                    evs = led.conn.execute("SELECT kind, lane, attempt, data FROM events WHERE mission = ? "
                                           "ORDER BY id", (m,)).fetchall()
                    raise RuntimeError(f"mission {m} did not succeed within 30 s; its events: {evs}")
                time.sleep(0.005)
        wall = time.monotonic() - t0
        cpu = cpu_s(sup.pid) - cpu0
        led.close()
        return {"mode": mode, "seen": seen, "event": event, "sup_cpu_pct": 100 * cpu / wall, "seconds": wall}
    finally:
        for p in reversed(procs):
            if p.is_alive():
                os.kill(p.pid, signal.SIGTERM)
                p.join(15)
            if p.is_alive():
                p.kill()
                p.join()
        shutil.rmtree(root, ignore_errors=True)
        server.drop_db(db)


def pct(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[max(0, min(len(s) - 1, -(-int(q * len(s)) // 100) - 1))]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=60, help="missions per mode (split over the blocks)")
    ap.add_argument("--blocks", type=int, default=2, help="blocks per mode, alternating the modes")
    ap.add_argument("--poll-ms", type=float, default=1.0, help="how often this process looks for the event")
    ap.add_argument("--json", metavar="FILE")
    args = ap.parse_args()
    if not 1 <= args.samples <= 10_000 or not 1 <= args.blocks <= 20:
        raise SystemExit("pg_latency_bench: --samples or --blocks out of range")
    rnd = random.Random(12)
    server = DurableServer().start()
    res: dict[str, dict[str, Any]] = {m: {"seen": [], "event": [], "cpu": []} for m in MODES}
    try:
        version = server.version()
        load0 = os.getloadavg()
        per = max(1, args.samples // args.blocks)
        for b in range(args.blocks):
            for mode in MODES:
                log(f"block {b + 1}/{args.blocks}: {mode}, {per} missions")
                r = block(server, mode, per, args.poll_ms / 1000, rnd)
                res[mode]["seen"] += r["seen"]
                res[mode]["event"] += r["event"]
                res[mode]["cpu"].append(r["sup_cpu_pct"])
        load1 = os.getloadavg()
    finally:
        server.stop()
    print(f"\nsubmit -> dispatch at idle, one mission at a time; server {version.split(' on ')[0]}, "
          f"synchronous_commit on; this process polls every {args.poll_ms:g} ms; load {load0} -> {load1}\n")
    print("| mode | n | seen p50 / p95 / max (ms) | event time p50 / p95 / max (ms) | supervisor CPU % |")
    print("|---|---:|---|---|---:|")
    for mode, r in res.items():
        s = [x * 1000 for x in r["seen"]]
        e = [x * 1000 for x in r["event"]]
        label = "LISTEN (default)" if mode == "listen" else "LANECTL_PG_LISTEN=0 (polling only)"
        print(f"| {label} | {len(s)} | {statistics.median(s):.1f} / {pct(s, 95):.1f} / {max(s):.1f} | "
              f"{statistics.median(e):.1f} / {pct(e, 95):.1f} / {max(e):.1f} | "
              f"{statistics.median(r['cpu']):.1f} |")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"postgresql": version, "load": [load0, load1], "args": vars(args),
                                               "results": res}, indent=2))
        print(f"\nresult: {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Issue 13, "What it must show": dispatch throughput with 1, 2 and 3 hosts on one database.

    bench/run-multihost-throughput [--hosts 1,2,3] [--rounds 3] [--missions 3000] [--lanes 4]
        [--capacity 4] [--profile DIR]
    LANECTL_PREFIX=/opt/lanectl /opt/lanectl/venv/bin/python bench/multihost_throughput.py [same]
        [--json FILE]

One private durable PostgreSQL server (bench/pgbench_server.py: ``fsync``, ``full_page_writes`` and
``synchronous_commit`` on, Unix socket only). Per run (H hosts), a fresh ledger database on it and, per
host ``hN`` (N = 1..H), its own configuration (``host = "hN"``, its own state directory, callback socket
and ``lanes.d/`` of --lanes lanes ``hNlJ`` with --capacity slots each, every class, on loopback ports),
and its own processes:

supervisor  ``lanectl.supervisor.Supervisor(...).run()``: the real class and main loop that ``lanectl
            supervise`` runs, in a process of its own, ``use_systemd=False`` (no unit: see below), the
            configuration's defaults otherwise (LISTEN/NOTIFY on, ``[hosts] lease_sec`` 10 s, the reaper
            every second);
lanes       one process per lane: the reference runtime (``lanectl.runtime.LaneRuntime``: HTTP endpoints,
            the dispatch key, the execution log, callbacks in batches over the host's unix socket) with
            ``start_mission``/``poll_mission`` overridden, the SDK's documented extension point, so that a
            mission ends as soon as it starts: no fork, no exec. The bench measures the control plane
            (submit, policy passes and claims of H supervisors on one ledger, dispatch POSTs, callbacks,
            group commits), not the work.

Why no systemd per host: systemd is not on the dispatch path (the supervisor POSTs to its lanes and takes
their callbacks over its socket; unit state is read over D-Bus only to observe lanes), while H private
systemds with 4H lane units, each mission in its own cgroup behind ``unshare`` (issue 17: ~7 ms of CPU per
mission), would spend the 2 shared cores on the work and on systemd instead of the ledger.
bench/run-multihost-bench (failover) and the tests under real systemd cover the hosts' units.

Each run: every host's lanes healthy in its supervisor's view and every host ``up`` in the ledger; a
warm-up of 50 missions; a ``CHECKPOINT``; then --missions missions ``background`` ``{"argv": ["true"]}``
submitted in batches of 1000 from host h1's configuration (``Client.submit_many``, one transaction each:
what ``lanectl submit --batch`` does), and the clock runs until the ledger has all of them ``succeeded``.
Measured per run:

- missions/s end to end: N / (first submit began -> the last mission succeeded), and the drain (submit
  done -> the last succeeded);
- dispatch rate: ``dispatched`` events / (last ``dispatched``.at - first), the ledger's times;
- each host's share of the dispatches (by the lanes' host);
- the database: ``pg_stat_database.xact_commit`` delta (every transaction, read-only ones too; the
  bench's own polling subtracted), ``pg_stat_wal`` (WAL flushes, WAL bytes), and a sampler (every 20 ms,
  its own connection) of ``pg_stat_activity`` and ``pg_locks``: how many supervisor backends wait for a
  lock (the ledger's ``pg_advisory_xact_lock`` shows as ``Lock``/``advisory``) and whether anyone holds
  the ledger's advisory lock (every write transaction of every host takes it: lanectl/ledger/pg.py);
- where a mission's time goes (medians, the ledger's event times): dispatched -> started, started ->
  succeeded, a lane slot's idle time (succeeded -> the next dispatch to that lane);
- CPU seconds per 1,000 missions of the supervisors, the lanes, and the PostgreSQL server (its
  postmaster's children: backends, WAL writer, checkpointer), utime + stime from /proc.

After one warm-up run that is not counted (the new server's caches), runs are interleaved (round 1: H = 1,
2, 3; round 2: again, ...) so that the shared machine's load hits all alike; medians per H, and the ratios
H=2/H=1 and H=3/H=1 of the medians. Every run checks its result: N succeeded, one attempt each, one
``dispatched`` event each. ``--profile DIR``: one more run at the smallest and at the largest H with every
supervisor's main thread under cProfile (wall time per 1,000 missions in the loop's parts, in BEGIN + the
advisory lock, in statements). Prints Markdown for docs/benchmarks.md; every run as JSON with --json.
Performance is measured here, never asserted in tests.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import shutil
import signal
import socket
import statistics
import sys
import tempfile
import threading
import time
import traceback
import urllib.request
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from pgbench_server import SETTINGS, DurableServer  # noqa: E402

CLK_TCK = os.sysconf("SC_CLK_TCK")
WARMUP = 50
SAMPLE_S = 0.02


def log(msg: str) -> None:
    print(f"multihost_throughput: {msg}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cpu_s(pid: int) -> float:
    """utime + stime of a process (all its threads), seconds; 0 when it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            f = fh.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(f[11]) + int(f[12])) / CLK_TCK


def children(pid: int) -> list[int]:
    out = []
    for p in Path("/proc").iterdir():
        if not p.name.isdigit():
            continue
        try:
            f = (p / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if f[1] == str(pid):
            out.append(int(p.name))
    return out


# ------------------------------------------------------------------------------------------------ the hosts
def write_host(root: Path, n: int, url: str, lanes: int, capacity: int) -> dict[str, Any]:
    """Host ``hN``: its configuration directory, state directory, socket, lanes (name -> port, workspace)."""
    name = f"h{n}"
    base = root / name
    etc, state = base / "etc", base / "state"
    (etc / "lanes.d").mkdir(parents=True)
    state.mkdir()
    port = free_port()
    (etc / "lanectl.toml").write_text(
        f'# multihost throughput bench, host {name}\nhost = "{name}"\nledger = "{url}"\nstate_dir = "{state}"\n'
        f'workspace_root = "{base}"\n[supervisor]\nport = {port}\n'
        # the whole batch fits in the queue (the default limit would refuse a run of more than 10,000)
        "[classes.background]\nqueue_limit = 1000000\n")
    lane_ports = {}
    for j in range(1, lanes + 1):
        lane = f"{name}l{j}"
        ws = base / lane
        ws.mkdir()
        lane_ports[lane] = free_port()
        (etc / "lanes.d" / f"{lane}.toml").write_text(
            f'port = {lane_ports[lane]}\nworkspace = "{ws}"\ncapacity = {capacity}\n'
            'classes = ["interactive", "deadline", "background"]\n')
    from lanectl import keys

    # the host's secret before its supervisor and lanes start: they would otherwise race to create it
    lane_keys = keys.read_lane_keys(state, list(lane_ports))
    return {"name": name, "etc": etc, "port": port, "sock": str(base / "callbacks.sock"), "lanes": lane_ports,
            "keys": lane_keys}


def supervisor_proc(etc: str, sock: str, lanes: list[str], status: Any, profile: str | None = None) -> None:
    try:
        from lanectl import config
        from lanectl.supervisor import Supervisor

        fleet = config.load(etc)
        sup = Supervisor(fleet, config.ledger_path(fleet), use_systemd=False, notifier=None, callback_socket=sock,
                         lane_uids={lane: os.getuid() for lane in lanes})

        def stop(*_: Any) -> None:
            sup.stop.set()
            sup.wake()

        signal.signal(signal.SIGTERM, stop)
        status.put(("started", os.getpid()))
        if not profile:
            sys.exit(sup.run())
        import cProfile

        prof = cProfile.Profile()  # the main thread (the loop: passes, group commits, lease), wall-clock time
        prof.enable()
        try:
            rc = sup.run()
        finally:
            prof.disable()
            prof.dump_stats(profile)
        sys.exit(rc)
    except BaseException as exc:  # noqa: BLE001 (reported to the bench, which says why it cannot measure)
        if isinstance(exc, SystemExit) and not exc.code:
            raise
        status.put(("error", traceback.format_exc()))
        raise SystemExit(1) from None


def lane_proc(etc: str, sock: str, lane: str, port: int, key: str) -> None:
    from lanectl import config
    from lanectl.runtime import LaneInfo, LaneRuntime, Running

    class Instant(LaneRuntime):
        """The reference runtime, each mission done as soon as it starts (the SDK's extension point)."""

        def start_mission(self, r: Running) -> str | None:
            self.inbox.put(0)  # the work loop turns again at once and finds it done
            return None

        def poll_mission(self, r: Running) -> int | None:
            return 0

    class Null:
        def send(self, msg: str) -> None:
            pass

    fleet = config.load(etc)
    spec = fleet.lanes[lane]
    info = LaneInfo(lane=lane, port=port, workspace=str(spec.workspace), session_prefix=lane,
                    capacity=spec.capacity, callback_url=f"unix:{sock}", dispatch_key=key,
                    heartbeat_sec=fleet.settings.leases.heartbeat_sec, supervisor_uid=os.getuid())
    rt = Instant(info, notifier=Null())  # type: ignore[arg-type]

    def stop(*_: Any) -> None:
        rt.stop.set()
        rt.inbox.put(0)

    signal.signal(signal.SIGTERM, stop)
    rt.run()


def healthy(host: dict[str, Any]) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{host['port']}/healthz", timeout=2) as r:
            body = json.loads(r.read())
    except (OSError, ValueError):
        return False
    lanes = body.get("lanes", {})
    return all(lanes.get(lane, {}).get("healthy") for lane in host["lanes"])


class Sampler(threading.Thread):
    """Every SAMPLE_S, the supervisors' backends in pg_stat_activity: how many wait for a lock, how many work."""

    def __init__(self, url: str, db: str) -> None:
        super().__init__(daemon=True)
        self.url, self.db = url, db
        self.halt = threading.Event()
        self.samples: list[tuple[int, ...]] = []
        """(backends, active, waiting on a Lock, on 'advisory', the ledger's advisory lock held by anyone)"""

    def run(self) -> None:
        import psycopg

        with psycopg.connect(self.url, autocommit=True) as conn:
            while not self.halt.wait(SAMPLE_S):
                row = conn.execute(
                    "SELECT count(*), count(*) FILTER (WHERE state = 'active'), "
                    "count(*) FILTER (WHERE wait_event_type = 'Lock'), "
                    "count(*) FILTER (WHERE wait_event_type = 'Lock' AND wait_event = 'advisory'), "
                    "(SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted AND database = "
                    " (SELECT oid FROM pg_database WHERE datname = %s)) "
                    "FROM pg_stat_activity WHERE datname = %s AND application_name LIKE 'lanectl-supervisor%%' "
                    "AND pid <> pg_backend_pid()", (self.db, self.db)).fetchone()
                self.samples.append(tuple(int(x) for x in row))

    def summary(self) -> dict[str, Any]:
        s = self.samples
        if not s:
            return {"samples": 0}
        return {"samples": len(s), "backends_max": max(x[0] for x in s),
                "active_mean": round(statistics.fmean(x[1] for x in s), 3),
                "lock_waiting_mean": round(statistics.fmean(x[2] for x in s), 3),
                "advisory_waiting_mean": round(statistics.fmean(x[3] for x in s), 3),
                "samples_with_a_lock_wait": round(sum(1 for x in s if x[2]) / len(s), 3),
                "lock_held": round(sum(1 for x in s if x[4]) / len(s), 3)}


def phases(admin: Any, top: int) -> dict[str, float | None]:
    """Where a mission's time goes (medians, ms, the ledger's event times): dispatched -> started (the POST, the
    lane's start, its callback applied), started -> succeeded, and a lane slot's idle time (a succeeded event to
    the next dispatch to that lane: the supervisor's turn)."""
    at: dict[tuple[int, str], float] = {}
    per_lane: dict[str, list[tuple[float, str]]] = {}
    for mission, kind, t, lane in admin.execute(
            "SELECT mission, kind, at, lane FROM events WHERE mission > %s AND kind IN ('dispatched', 'started', "
            "'succeeded') ORDER BY id", (top,)):
        at.setdefault((mission, kind), float(t))
        if lane:
            per_lane.setdefault(lane, []).append((float(t), kind))
    idle = []
    for evs in per_lane.values():
        evs.sort()
        done: list[float] = []
        for t, kind in evs:
            if kind == "succeeded":
                done.append(t)
            elif kind == "dispatched" and done:
                idle.append(t - done.pop(0))

    def gap(a: str, b: str) -> float | None:
        xs = [at[(m, b)] - at[(m, a)] for (m, k) in at if k == a and (m, b) in at]
        return round(1000 * statistics.median(xs), 1) if xs else None

    return {"dispatched_to_started": gap("dispatched", "started"), "started_to_succeeded": gap("started", "succeeded"),
            "slot_idle": round(1000 * statistics.median(idle), 1) if idle else None}


def db_stats(admin: Any, db: str) -> tuple[int, int, int, int]:
    """The database's committed and rolled-back transactions (every one, read-only ones too), and the server's WAL
    flushes (``pg_stat_wal.wal_sync``: a COMMIT that had to wait for the disk, group commits counted once) and WAL
    bytes."""
    row = admin.execute("SELECT xact_commit, xact_rollback, (SELECT wal_sync FROM pg_stat_wal), "
                        "(SELECT wal_bytes FROM pg_stat_wal) FROM pg_stat_database WHERE datname = %s",
                        (db,)).fetchone()
    return int(row[0]), int(row[1]), int(row[2]), int(row[3])


def run_once(server: DurableServer, hosts_n: int, n: int, lanes: int, capacity: int,
             profile: Path | None = None) -> dict[str, Any]:
    import psycopg

    from lanectl.client import Client
    from lanectl.ledger import missions as ms

    db = server.create_db("mht")
    url = server.url(db)
    root = Path(tempfile.mkdtemp(prefix="mht-"))
    os.chmod(root, 0o755)
    hosts = [write_host(root, k, url, lanes, capacity) for k in range(1, hosts_n + 1)]
    ctx = mp.get_context("fork")
    status = ctx.Queue()
    sups: list[Any] = []
    lane_procs: list[Any] = []
    try:
        for h in hosts:
            prof = str(profile / f"H{hosts_n}-{h['name']}.prof") if profile else None
            p = ctx.Process(target=supervisor_proc, args=(str(h["etc"]), h["sock"], list(h["lanes"]), status, prof),
                            name=f"sup-{h['name']}")
            p.start()
            sups.append(p)
        for _ in hosts:
            kind, detail = status.get(timeout=60)
            if kind == "error":
                raise RuntimeError(f"a supervisor did not start:\n{detail}")
        for h in hosts:
            for lane, port in h["lanes"].items():
                p = ctx.Process(target=lane_proc, args=(str(h["etc"]), h["sock"], lane, port, h["keys"][lane]),
                                name=f"lane-{lane}")
                p.start()
                lane_procs.append(p)
        end = time.monotonic() + 90
        while not all(healthy(h) for h in hosts):
            dead = [p.name for p in sups + lane_procs if not p.is_alive()]
            if dead:
                got = status.get(timeout=5) if not status.empty() else ("error", "")
                raise RuntimeError(f"{', '.join(dead)} stopped before the fleet was up\n{got[1]}")
            if time.monotonic() > end:
                raise RuntimeError("the hosts did not see all their lanes healthy within 90 s")
            time.sleep(0.1)
        admin = psycopg.connect(url, autocommit=True)
        end = time.monotonic() + 60
        while admin.execute("SELECT count(*) FROM hosts WHERE state = 'up'").fetchone()[0] < hosts_n:
            if time.monotonic() > end:
                raise RuntimeError("not every host is up in the ledger within 60 s")
            time.sleep(0.1)

        polls = [0]

        def finished_after(top: int) -> int:
            polls[0] += 1  # each is a transaction of its own (autocommit): not the fleet's, subtracted below
            return int(admin.execute("SELECT count(*) FROM missions WHERE id > %s AND state IN "
                                     "('succeeded', 'failed', 'dead', 'cancelled')", (top,)).fetchone()[0])

        def batch(c: Client, count: int) -> None:
            for start in range(0, count, ms.MAX_BATCH):
                c.submit_many([ms.SubmitRequest("background", {"argv": ["true"]})
                               for _ in range(min(ms.MAX_BATCH, count - start))])

        def wait_done(top: int, count: int, limit: float) -> None:
            end = time.monotonic() + limit
            while finished_after(top) < count:
                if time.monotonic() > end:
                    raise RuntimeError(f"{count} missions not finished within {limit:.0f} s")
                if not all(p.is_alive() for p in sups):
                    raise RuntimeError("a supervisor stopped mid-run")
                time.sleep(0.01)

        with Client(config_dir=hosts[0]["etc"]) as c:
            top = int(admin.execute("SELECT coalesce(max(id), 0) FROM missions").fetchone()[0])
            batch(c, WARMUP)
            wait_done(top, WARMUP, 60)
            admin.execute("CHECKPOINT")  # every run starts from a clean checkpoint (same full-page writes)
            time.sleep(0.5)
            pm = int((server.dir / "data" / "postmaster.pid").read_text().split()[0])  # type: ignore[operator]
            pg_pids = children(pm)
            top = int(admin.execute("SELECT coalesce(max(id), 0) FROM missions").fetchone()[0])
            x0 = db_stats(admin, db)
            cpu0 = {"supervisors": sum(cpu_s(p.pid) for p in sups), "lanes": sum(cpu_s(p.pid) for p in lane_procs),
                    "postgresql": sum(cpu_s(p) for p in pg_pids)}
            own0 = os.times()
            load0 = os.getloadavg()
            sampler = Sampler(url, db)
            polls[0] = 0
            sampler.start()
            t0 = time.monotonic()
            batch(c, n)
            t_sub = time.monotonic()
            wait_done(top, n, 120 + n / 5)
            t_end = time.monotonic()
            sampler.halt.set()
            sampler.join(10)
            own1 = os.times()
            load1 = os.getloadavg()
            cpu = {"supervisors": sum(cpu_s(p.pid) for p in sups) - cpu0["supervisors"],
                   "lanes": sum(cpu_s(p.pid) for p in lane_procs) - cpu0["lanes"],
                   "postgresql": sum(cpu_s(p) for p in pg_pids) - cpu0["postgresql"],
                   "submitter_and_sampler": own1.user + own1.system - own0.user - own0.system}
        own_xacts = polls[0] + len(sampler.samples) + 1
        time.sleep(1.2)  # the backends' statistics reach pg_stat_database within PGSTAT_MIN_INTERVAL (1 s)
        admin.execute("SELECT pg_stat_clear_snapshot()")
        x1 = db_stats(admin, db)
        states = dict(admin.execute("SELECT state, count(*) FROM missions WHERE id > %s GROUP BY state",
                                    (top,)).fetchall())
        attempts = admin.execute("SELECT max(attempts) FROM missions WHERE id > %s", (top,)).fetchone()[0]
        disp = admin.execute("SELECT e.at, l.host FROM events e JOIN lanes l ON l.name = e.lane WHERE "
                             "e.kind = 'dispatched' AND e.mission > %s ORDER BY e.at", (top,)).fetchall()
        ph = phases(admin, top)
        admin.close()
        if states != {"succeeded": n} or attempts != 1 or len(disp) != n:
            raise RuntimeError(f"run check failed: states {states}, max attempts {attempts}, {len(disp)} "
                               f"dispatched events for {n} missions")
        share: dict[str, int] = {h["name"]: 0 for h in hosts}
        for _, host in disp:
            share[host] = share.get(host, 0) + 1
        wall, drain = t_end - t0, t_end - t_sub
        span = float(disp[-1][0]) - float(disp[0][0])
        return {"hosts": hosts_n, "missions": n, "seconds": round(wall, 3), "per_s": round(n / wall, 1),
                "submit_s": round(t_sub - t0, 3), "drain_s": round(drain, 3), "drain_per_s": round(n / drain, 1),
                "dispatch_span_s": round(span, 3), "dispatch_per_s": round(n / span, 1) if span > 0 else None,
                "share": share, "xact_commit": x1[0] - x0[0] - own_xacts, "xact_rollback": x1[1] - x0[1],
                "bench_xacts": own_xacts, "xact_per_s": round((x1[0] - x0[0] - own_xacts) / wall, 1),
                "wal_syncs": x1[2] - x0[2], "wal_syncs_per_s": round((x1[2] - x0[2]) / wall, 1),
                "wal_bytes_per_mission": round((x1[3] - x0[3]) / n), "locks": sampler.summary(), "phases_ms": ph,
                "cpu_s": {k: round(v, 2) for k, v in cpu.items()}, "load": [load0[0], load1[0]]}
    finally:
        for p in sups + lane_procs:  # supervisors first (a lane gone first is logged as down)
            if p.is_alive():
                os.kill(p.pid, signal.SIGTERM)
        for p in sups + lane_procs:
            p.join(20)
            if p.is_alive():
                p.kill()
                p.join()
        shutil.rmtree(root, ignore_errors=True)
        server.drop_db(db)


# ------------------------------------------------------------------------------------------------ profile
PROFILED = [
    ("the loop's turns", "loop.py", "turn"),
    ("… policy pass + claim + POSTs handed to threads", "dispatcher.py", "dispatch"),
    ("… callbacks applied (group commit)", "callbacks.py", "apply"),
    ("… dispatch POST results", "dispatcher.py", "apply_results"),
    ("… lanes observed (health endpoints)", "watch.py", "maybe_observe"),
    ("… host lease renewed / reaper", "hostlease.py", "turn"),
    ("… has another process committed? (newest event id)", "__init__.py", "data_version"),
    ("/healthz summary (every second)", "loop.py", "publish_summary"),
    ("BEGIN + the ledger's advisory lock (incl. waiting for it)", "pg.py", "begin"),
    ("other single statements, one round trip each (COMMIT and its WAL flush included)", "pg.py", "execute"),
    ("statements in batches (PgConn.executemany)", "pg.py", "executemany"),
    ("waiting in the selector between turns", "selectors.py", "select"),
]


def profile_table(files: list[Path], missions: int) -> list[tuple[str, float, int]]:
    """Cumulative wall seconds per 1,000 missions of the PROFILED functions, summed over ``files`` (one per host).
    ``PgConn.execute`` is counted without its calls from ``pg.begin`` (BEGIN and the lock: a row of their own)."""
    import pstats

    out = []
    stats = [pstats.Stats(str(f)).stats for f in files]  # type: ignore[attr-defined]
    for label, fname, func in PROFILED:
        cum, calls = 0.0, 0
        for st in stats:
            for (file, _line, name), (_cc, nc, _tt, ct, callers) in st.items():
                if name == func and file.endswith("/" + fname):
                    cum += ct
                    calls += nc
                    if func == "execute":
                        for (cfile, _cl, cname), c in callers.items():
                            if cname == "begin" and cfile.endswith("/pg.py"):
                                # pstats keeps (calls, primitive calls, own time, cumulative time) per caller
                                calls -= c[0]
                                cum -= c[3]
        out.append((label, 1000 * cum / missions, calls))
    return out


# ------------------------------------------------------------------------------------------------ report
def med(xs: list[float]) -> float:
    return statistics.median(xs)


def fmt(x: float, nd: int = 0) -> str:
    return f"{x:,.{nd}f}"


def report(res: dict[str, Any]) -> None:
    runs: dict[int, list[dict[str, Any]]] = {}
    for r in res["runs"]:
        runs.setdefault(r["hosts"], []).append(r)
    base = runs.get(1)
    m = res["machine"]
    print(f"\nmachine: nproc {m['nproc']}, {m['cpu']}, kernel {m['kernel']}, Python {m['python']}; "
          f"{m['postgresql']}; load average {m['load_before']} before, {m['load_after']} after")
    print(f"{res['args']['missions']} missions per run, {res['args']['lanes']} lanes x capacity "
          f"{res['args']['capacity']} per host, {res['args']['rounds']} rounds interleaved; server {SETTINGS}\n")
    print("| hosts | runs | missions/s end to end | drain (submit done → all succeeded) /s | dispatched/s | "
          "end to end / H=1 | dispatched / H=1 | transactions/s | WAL flushes/s | supervisor backends waiting on a "
          "lock (mean) | samples with a lock wait |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    b_e2e = med([r["per_s"] for r in base]) if base else None
    b_disp = med([r["dispatch_per_s"] for r in base]) if base else None
    for h, rs in sorted(runs.items()):
        e2e, drain, disp = (med([r[k] for r in rs]) for k in ("per_s", "drain_per_s", "dispatch_per_s"))
        print(f"| {h} | {len(rs)} | **{fmt(e2e)}** | {fmt(drain)} | {fmt(disp)} | "
              f"{'' if not b_e2e else f'**{e2e / b_e2e:.2f}x**'} | {'' if not b_disp else f'{disp / b_disp:.2f}x'} | "
              f"{fmt(med([r['xact_per_s'] for r in rs]))} | {fmt(med([r['wal_syncs_per_s'] for r in rs]))} | "
              f"{med([r['locks'].get('lock_waiting_mean', 0) for r in rs]):.2f} | "
              f"{100 * med([r['locks'].get('samples_with_a_lock_wait', 0) for r in rs]):.0f}% |")
    print("\nwhere a mission's time goes (medians of the runs' medians, ms) and the ledger's advisory lock\n")
    print("| hosts | slots | dispatched → started | started → succeeded | slot idle (succeeded → next dispatch) | "
          "lock held (share of samples) | transactions per mission | lock held per transaction (ms) | WAL bytes "
          "per mission |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for h, rs in sorted(runs.items()):
        ph = {k: med([r["phases_ms"][k] for r in rs if r["phases_ms"][k] is not None] or [float("nan")])
              for k in rs[0]["phases_ms"]}
        print(f"| {h} | {h * res['args']['lanes'] * res['args']['capacity']} | {ph['dispatched_to_started']:.1f} | "
              f"{ph['started_to_succeeded']:.1f} | {ph['slot_idle']:.1f} | "
              f"{100 * med([r['locks'].get('lock_held', 0) for r in rs]):.0f}% | "
              f"{med([r['xact_commit'] / r['missions'] for r in rs]):.2f} | "
              f"{med([1000 * r['locks'].get('lock_held', 0) / r['xact_per_s'] for r in rs]):.2f} | "
              f"{fmt(med([r['wal_bytes_per_mission'] for r in rs]))} |")
    print("\nper host share of the dispatches (each run), CPU seconds per 1,000 missions (medians)\n")
    print("| hosts | shares per run (h1 / h2 / h3) | least / most loaded host | supervisors | lanes | PostgreSQL | "
          "submitter + sampler |")
    print("|---:|---|---|---:|---:|---:|---:|")
    for h, rs in sorted(runs.items()):
        shares = "; ".join(" / ".join(f"{100 * v / r['missions']:.0f}%" for v in r["share"].values()) for r in rs)
        lo = med([min(r["share"].values()) / r["missions"] for r in rs])
        hi = med([max(r["share"].values()) / r["missions"] for r in rs])
        per_k = {k: med([r["cpu_s"][k] * 1000 / r["missions"] for r in rs]) for k in rs[0]["cpu_s"]}
        print(f"| {h} | {shares} | {100 * lo:.0f}% / {100 * hi:.0f}% | {per_k['supervisors']:.2f} | "
              f"{per_k['lanes']:.2f} | {per_k['postgresql']:.2f} | {per_k['submitter_and_sampler']:.2f} |")
    for h, p in res.get("profile", {}).items():
        r = p["run"]
        print(f"\nprofiled run, {h} host(s) (cProfile in every supervisor's main thread: slower, not in the medians): "
              f"{r['per_s']} missions/s; wall seconds per 1,000 missions, all supervisors together "
              f"({h} x the run's wall time available)\n")
        print("| where | s per 1,000 missions | calls |\n|---|---:|---:|")
        for label, per_k, calls in p["table"]:
            print(f"| {label} | {per_k:.2f} | {calls:,} |")
    print("\nevery run (missions/s end to end, dispatched/s, load average at start):")
    for h, rs in sorted(runs.items()):
        print(f"  H={h}: " + ", ".join(f"{r['per_s']:.0f} ({r['dispatch_per_s']:.0f}, load {r['load'][0]:.1f})"
                                       for r in rs))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hosts", default="1,2,3", help="host counts, comma-separated (default 1,2,3)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--missions", type=int, default=3000)
    ap.add_argument("--lanes", type=int, default=4, help="lanes per host")
    ap.add_argument("--capacity", type=int, default=4, help="slots per lane")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--profile", type=Path, default=None, metavar="DIR",
                    help="after the rounds, one more run at the smallest and the largest host count with every "
                         "supervisor's main thread under cProfile (stats in DIR; not counted in the medians)")
    args = ap.parse_args()
    counts = [int(x) for x in args.hosts.split(",")]
    if not all(1 <= c <= 8 for c in counts) or not 1 <= args.rounds <= 20 or not 100 <= args.missions <= 100_000:
        raise SystemExit("multihost_throughput: --hosts (1..8), --rounds (1..20) or --missions (100..100000) out of "
                         "range")
    if not 1 <= args.lanes <= 16 or not 1 <= args.capacity <= 64:
        raise SystemExit("multihost_throughput: --lanes (1..16) or --capacity (1..64) out of range")
    if os.geteuid() != 0:
        raise SystemExit("multihost_throughput: needs root (it runs PostgreSQL as the postgres user)")
    server = DurableServer().start()
    res: dict[str, Any] = {"args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                           "runs": []}
    try:
        res["machine"] = {
            "nproc": os.cpu_count(), "kernel": platform.release(), "python": platform.python_version(),
            "cpu": next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo")
                         if ln.startswith("model name")), "?"),
            "postgresql": server.version().split(" on ")[0], "fsync_test": server.test_fsync(1),
            "load_before": " ".join(f"{x:.2f}" for x in os.getloadavg())}
        log(f"server up ({res['machine']['postgresql']}); fsync: {res['machine']['fsync_test']}")
        log(f"warm-up run (not counted): {max(counts)} host(s), 500 missions")
        run_once(server, max(counts), 500, args.lanes, args.capacity)
        for rnd in range(args.rounds):
            for h in counts:
                log(f"round {rnd + 1}/{args.rounds}: {h} host(s), {args.missions} missions")
                r = run_once(server, h, args.missions, args.lanes, args.capacity)
                r["round"] = rnd + 1
                res["runs"].append(r)
                log(f"  {r['per_s']}/s end to end, {r['dispatch_per_s']}/s dispatched, shares {r['share']}, "
                    f"{r['xact_per_s']} xact/s, locks {r['locks']}, cpu {r['cpu_s']}")
        if args.profile:
            args.profile.mkdir(parents=True, exist_ok=True)
            res["profile"] = {}
            for h in sorted({min(counts), max(counts)}):
                log(f"profiled run: {h} host(s), {args.missions} missions (cProfile in every supervisor)")
                r = run_once(server, h, args.missions, args.lanes, args.capacity, profile=args.profile)
                files = sorted(args.profile.glob(f"H{h}-h*.prof"))
                res["profile"][str(h)] = {"run": r, "table": profile_table(files, args.missions)}
        res["machine"]["load_after"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    finally:
        server.stop()
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(res, indent=1))
    report(res)
    if args.json:
        print(f"\nresult: {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Issue 13, "What it must show": host-loss failover time and self-fence time vs takeover time, under real systemd.

    bench/run-multihost-bench [--lease 10] [--deaths 10] [--freezes 10]
    LANECTL_PREFIX=/opt/lanectl /opt/lanectl/venv/bin/python bench/multihost_bench.py [same] [--json FILE]

Run by hand as root from the checkout, with the lanectl installed under $LANECTL_PREFIX (the hosts run it) (it uses the test harness: scripts/sdbox for one private systemd per host,
tests/pgserver.py for one PostgreSQL server whose Unix socket every host shares). Host ``b`` (lanes b1, b2) stays up
throughout; the other hosts come and go:

deaths    ``--deaths`` times: a new host ``d`` (a fresh sandbox, lanes d1, d2) starts, takes 4 missions (b's lanes
          drained meanwhile, so that d's lanes take them), and its whole sandbox is killed (SIGKILL to its PID 1: the
          pid namespace goes, systemd, supervisor, lanes and missions with it). Measured from the kill: when b (the
          reaper) declared d dead (``host_dead``.at) and when the last of d's missions was dispatched again
          (attempt 2, ``dispatched``.at). Goal (issue 13): kill -> re-dispatch within the host lease + 1 s.
freezes   ``--freezes`` times: host ``a`` (lanes a1, a2, its supervisor's watchdog longer than a freeze) takes 4
          missions, and its supervisor is SIGSTOPped until b has declared it dead, then resumed (it exits 5 and
          systemd starts a new incarnation). Measured from the SIGSTOP: when a's fence began on its own clock
          (``host_fenced``.data.since: the moment its lease stopped allowing claims) and when b took over
          (``host_dead``.at). The fence must come first in every run (``lead`` = takeover - fence > 0).

Each kill and SIGSTOP comes after a random wait over one renewal period (lease / 3, seeded), so that the host is
lost at every point between two of its renewals: the failover time depends on how long ago the last one was
(at most ``lease_sec`` plus the reaper's period, 1 s, plus a policy pass).

Times are the ledger's clock (the PostgreSQL server's, this machine's) against ``time.time()`` here: one clock.
Medians and maxima are printed as Markdown for docs/benchmarks.md, and every run as JSON with --json.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.pgserver import PgServer  # noqa: E402
from tests.sdbox import Sandbox  # noqa: E402
from tests.systemd.lanehelpers import (Fleet, host_config, kill_sandbox, lane_toml, sql, submit_many,  # noqa: E402
                                       up_fleet, wait_for)

SUP = "lanectl-supervisor.service"
HOLD = 'case "$LANECTL_LANE" in [ad]*) sleep 600 ;; *) sleep 0.2 ;; esac'
"""What each mission runs: long on the host that is lost (it never finishes there), short where it runs again."""
CLASSES = ["interactive", "deadline"]
PHASE = random.Random(13)
"""The wait before each kill and SIGSTOP (uniform over a renewal period, seeded): a host is lost at any point
between two renewals of its lease, and the failover time depends on where."""


def extra(lease: float) -> str:
    return (f"[hosts]\nlease_sec = {lease:g}\n[leases]\nlease_sec = {max(30.0, 3 * lease):g}\nheartbeat_sec = 1\n"
            "[rollback]\nenabled = false\n")


def boot(tag: str) -> Sandbox:
    sb = Sandbox(f"/tmp/sdbox/mhbench-{os.getpid()}-{tag}")
    sb.up()
    return sb


def finish_sandbox(sb: Sandbox) -> None:
    import shutil

    sb.down()
    if (sb.state_dir / ".sdbox").is_file():
        shutil.rmtree(sb.state_dir)


def health(f: Fleet) -> dict[str, Any]:
    proc = f.sb.exec(["curl", "-s", "http://127.0.0.1:8700/healthz"], check=False)
    try:
        return json.loads(proc.stdout) if proc.returncode == 0 and proc.stdout else {}
    except ValueError:
        return {}


def all_up(f: Fleet) -> bool:
    h = health(f)
    return bool(h.get("lanes")) and all(ln["healthy"] and ln["state"] == "active" for ln in h["lanes"].values())


def last_event(f: Fleet) -> int:
    return int(sql(f, "SELECT coalesce(max(id), 0) FROM events")[0][0])


def events(f: Fleet, kind: str, after: int, **match: Any) -> list[dict[str, Any]]:
    out = []
    for eid, at, mission, lane, attempt, data in sql(f, "SELECT id, at, mission, lane, attempt, data FROM events "
                                                       "WHERE kind = ? AND id > ? ORDER BY id", kind, after):
        d = data if isinstance(data, dict) else json.loads(data)
        if all(d.get(k) == v for k, v in match.items()):
            out.append({**d, "id": eid, "at": at, "mission": mission, "lane": lane, "attempt": attempt})
    return out


def host_record(f: Fleet, name: str) -> dict[str, Any]:
    code, doc = f.json("hosts")
    assert code == 0, doc
    return {h["name"]: h for h in doc["data"]["hosts"]}.get(name, {})


def set_drained(f: Fleet, lanes: list[str], drained: bool) -> None:
    for lane in lanes:
        proc = f.lanectl("drain" if drained else "undrain", lane, "--json")
        assert proc.returncode == 0, proc.stdout + proc.stderr


def load_onto(producer: Fleet, b: Fleet, lanes: list[str], n: int = 4) -> list[int]:
    """``n`` missions running on ``lanes`` (b's lanes drained while they are placed)."""
    set_drained(b, ["b1", "b2"], True)
    try:
        ids = submit_many(producer, [{"cls": "interactive", "argv": ["/bin/sh", "-c", HOLD]} for _ in range(n)])
        wait_for(lambda: sql(b, f"SELECT count(*) FROM missions WHERE state = 'running' AND id BETWEEN ? AND ? AND "
                                f"current_lane IN ({','.join('?' * len(lanes))})", min(ids), max(ids), *lanes)[0][0]
                 == n, 120, interval=0.1, what="the missions running on the host to lose")
    finally:
        set_drained(b, ["b1", "b2"], False)
    return ids


def death_run(i: int, b: Fleet, url: str, tmp: Path, lease: float) -> dict[str, Any]:
    sb = boot(f"d{i}")
    try:
        d = up_fleet(sb, host_config(tmp / f"d{i}", "d", {"d1": lane_toml(8701, CLASSES, 2),
                                                         "d2": lane_toml(8702, CLASSES, 2)}, url, extra(lease)))
        wait_for(lambda: all_up(d) and host_record(b, "d").get("state") == "up", 120, interval=0.2,
                 what="host d up")
        ids = load_onto(d, b, ["d1", "d2"])
        mark = last_event(b)
        time.sleep(PHASE.uniform(0, lease / 3))  # the kill lands anywhere between two of d's renewals
        killed = time.time()
        kill_sandbox(sb)
        [dead] = wait_for(lambda: events(b, "host_dead", mark, host="d"), 120, interval=0.05, what="d declared dead")
        again = wait_for(lambda: (lambda e: e if len(e) == len(ids) else None)(
            [e for e in events(b, "dispatched", mark) if e["mission"] in ids and e["attempt"] == 2]), 120,
            interval=0.05, what="d's missions dispatched again")
        wait_for(lambda: sql(b, "SELECT count(*) FROM missions WHERE state = 'succeeded' AND id BETWEEN ? AND ?",
                             min(ids), max(ids))[0][0] == len(ids), 120, interval=0.2, what="the missions done")
        return {"run": i, "declared_dead_s": round(dead["at"] - killed, 3),
                "redispatched_s": round(max(e["at"] for e in again) - killed, 3), "missions": len(ids)}
    finally:
        finish_sandbox(sb)


def freeze_run(i: int, a: Fleet, b: Fleet, lease: float) -> dict[str, Any]:
    wait_for(lambda: all_up(a) and host_record(b, "a").get("state") == "up", 120, interval=0.2, what="host a up")
    old = host_record(b, "a")["incarnation"]
    ids = load_onto(a, b, ["a1", "a2"])
    mark = last_event(b)
    pid = int(a.show(SUP, "MainPID")["MainPID"])
    time.sleep(PHASE.uniform(0, lease / 3))
    stopped = time.time()
    a.sb.exec(["kill", "-STOP", str(pid)])
    try:
        [dead] = wait_for(lambda: events(b, "host_dead", mark, host="a"), 120, interval=0.05, what="a declared dead")
    finally:
        a.sb.exec(["kill", "-CONT", str(pid)])
    fenced = wait_for(lambda: events(b, "host_fenced", mark, host="a", incarnation=old), 60, interval=0.1,
                      what="a's host_fenced")
    wait_for(lambda: (lambda h: h.get("state") == "up" and h.get("incarnation") != old)(host_record(b, "a")), 120,
             interval=0.2, what="a's new incarnation")
    wait_for(lambda: sql(b, "SELECT count(*) FROM missions WHERE state = 'succeeded' AND id BETWEEN ? AND ?",
                         min(ids), max(ids))[0][0] == len(ids), 120, interval=0.2, what="the missions done")
    since = fenced[0]["since"]
    return {"run": i, "fence_s": round(since - stopped, 3), "takeover_s": round(dead["at"] - stopped, 3),
            "lead_s": round(dead["at"] - since, 3), "fence_first": since < dead["at"]}


def summary(runs: list[dict[str, Any]], key: str) -> str:
    xs = [r[key] for r in runs]
    return f"{statistics.median(xs):.2f} s / {max(xs):.2f} s" if xs else "-"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lease", type=float, default=10.0, help="[hosts] lease_sec of every host (default 10)")
    ap.add_argument("--deaths", type=int, default=10)
    ap.add_argument("--freezes", type=int, default=10)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("multihost_bench: needs root (it boots private systemds with scripts/sdbox)")
    pg = PgServer().start()
    tmp = Path(tempfile.mkdtemp(prefix="mhbench-"))
    boxes: list[Sandbox] = []
    deaths: list[dict[str, Any]] = []
    freezes: list[dict[str, Any]] = []
    try:
        url = pg.url(pg.create_db("mhbench"))
        sb_b = boot("b")
        boxes.append(sb_b)
        b = up_fleet(sb_b, host_config(tmp / "b", "b", {"b1": lane_toml(8701, CLASSES, 4),
                                                        "b2": lane_toml(8702, CLASSES, 4)}, url, extra(args.lease)))
        wait_for(lambda: all_up(b), 120, interval=0.2, what="host b up")
        print(f"load before: {Path('/proc/loadavg').read_text().strip()}", flush=True)
        for i in range(args.deaths):
            deaths.append(death_run(i, b, url, tmp, args.lease))
            print(f"death {i}: {deaths[-1]}", flush=True)
        if args.freezes:
            sb_a = boot("a")
            boxes.append(sb_a)
            a = up_fleet(sb_a, host_config(tmp / "a", "a", {"a1": lane_toml(8701, CLASSES, 2),
                                                            "a2": lane_toml(8702, CLASSES, 2)}, url,
                                           extra(args.lease), watchdog_sec=max(120.0, 6 * args.lease)))
            for i in range(args.freezes):
                freezes.append(freeze_run(i, a, b, args.lease))
                print(f"freeze {i}: {freezes[-1]}", flush=True)
        print(f"load after: {Path('/proc/loadavg').read_text().strip()}", flush=True)
    finally:
        for sb in reversed(boxes):
            try:
                finish_sandbox(sb)
            except Exception as exc:  # noqa: BLE001 - the others are still torn down
                print(f"teardown of {sb.state_dir} failed: {exc}", file=sys.stderr)
        pg.stop()
    out = {"lease_sec": args.lease, "deaths": deaths, "freezes": freezes, "cpus": os.cpu_count()}
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=1))
    print(f"\n| host lease {args.lease:g} s | runs | median / max |\n| --- | --- | --- |")
    print(f"| kill -> declared dead | {len(deaths)} | {summary(deaths, 'declared_dead_s')} |")
    print(f"| kill -> all its missions dispatched again | {len(deaths)} | {summary(deaths, 'redispatched_s')} |")
    print(f"| SIGSTOP -> fence began (own clock) | {len(freezes)} | {summary(freezes, 'fence_s')} |")
    print(f"| SIGSTOP -> takeover (host_dead) | {len(freezes)} | {summary(freezes, 'takeover_s')} |")
    print(f"| fence before takeover by | {len(freezes)} | {summary(freezes, 'lead_s')} |")
    print(f"fence first in every run: {all(r['fence_first'] for r in freezes)}")


if __name__ == "__main__":
    main()

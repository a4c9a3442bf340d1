"""Roll-ups (lanectl/ledger/rollups.py) give the report the same figures as reading every event: on a generated
day of traffic, for windows with ragged ends, lane-scoped hours, and with events that arrive for buckets already
rolled up (a supervisor whose clock stepped back), before and after the next roll-up folds them in."""
from __future__ import annotations

import math
import sqlite3
import sys
from pathlib import Path

import pytest

from lanectl import config, evidence
from lanectl.dispatch import Assignment
from lanectl.ledger import Ledger, rollups
from lanectl.ledger import missions as ms

ROOT = Path(__file__).resolve().parent.parent.parent
sys.path.insert(0, str(ROOT / "bench"))
from evidence_bench import LANES, build, write_config  # noqa: E402  (the bench's generator: one definition)

N = 12_000
END = 1_900_000_000.0  # a fixed "now": the generated day is [END - 86400, END)


WINDOWS: list[tuple[float, float]] = [(END - 86400, END), (END - 86400 + 137.25, END - 61.5), (END - 3600 - 17, END - 5),
           (END - 7200 - 301, END - 3600 + 299), (END - 250, END), (END - 40_000.5, END - 39_000.25)]


@pytest.fixture(scope="module")
def day(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("rollups")
    write_config(d / "etc")
    build(d / "ledger.db", N, END)
    # attempts that straddle every window's start, bucket and hour boundaries: their busy time must be clipped
    fleet = config.load(str(d / "etc"))
    led = Ledger.open(d / "ledger.db")
    try:
        for t0, _ in WINDOWS:
            for lane, run_s in (("alpha", 4000.0), ("beta", 700.0), ("gamma", 90.0)):
                m = ms.submit(led, fleet, cls="interactive" if lane != "gamma" else "background",
                              payload={"long": t0}, now=t0 - run_s / 2 - 1, lane=lane)
                (a,) = ms.assign(led, [Assignment(m.mission.id, lane, m.mission.cls)], now=t0 - run_s / 2,
                                 lease_sec=10 * run_s)
                ms.complete(led, m.mission.id, lane=lane, attempt=1, token=a.token, now=t0 + run_s / 2,
                            result={"exit_code": 0})
    finally:
        led.close()
    return d


def roll_all(path: Path, now: float) -> tuple[float, int]:
    led = Ledger.open(path)
    try:
        while True:
            with led.transaction() as conn:
                if not rollups.roll_up(conn, now, max_buckets=60):
                    return rollups.state(conn)
    finally:
        led.close()


def figures(path: Path, t0: float, t1: float, lane: str | None, fast: bool) -> dict:
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return evidence.report_figures(conn, t0, t1, lane=lane, capacity={ln: 16 for ln in LANES}, fast=fast)
    finally:
        conn.close()


def assert_same(fast: dict, full: dict) -> None:
    assert fast["traffic"] == full["traffic"]
    assert fast["lanes"].keys() == full["lanes"].keys()
    for a, b in [*zip(fast["lanes"].values(), full["lanes"].values()), (fast["total"], full["total"])]:
        ua, ub = a.pop("utilization"), b.pop("utilization")
        assert a == b
        assert (ua is None and ub is None) or math.isclose(ua, ub, rel_tol=1e-9)


def test_before_any_roll_up_the_fast_path_reads_raw_and_agrees(day: Path) -> None:
    t0, t1 = WINDOWS[2]
    assert_same(figures(day / "ledger.db", t0, t1, None, True), figures(day / "ledger.db", t0, t1, None, False))


@pytest.mark.parametrize("window", WINDOWS, ids=lambda w: f"{w[0] - END:+.0f}..{w[1] - END:+.0f}")
@pytest.mark.parametrize("lane", [None, "alpha", "beta"])
def test_rolled_up_figures_equal_the_full_computation(day: Path, window: tuple[float, float],
                                                      lane: str | None) -> None:
    until, _ = roll_all(day / "ledger.db", END)
    assert until == math.floor((END - rollups.GRACE_S) / rollups.BUCKET_S) * rollups.BUCKET_S
    conn = sqlite3.connect(day / "ledger.db")
    hours = conn.execute("SELECT count(DISTINCT start) FROM rollups WHERE bucket_s = 3600").fetchone()[0]
    conn.close()
    assert hours >= 23  # the day's hours are there: the fast path really reads roll-ups
    assert_same(figures(day / "ledger.db", *window, lane, True), figures(day / "ledger.db", *window, lane, False))


def test_the_report_is_the_same_text(day: Path) -> None:
    roll_all(day / "ledger.db", END)
    args = (day / "ledger.db", END - 86400 + 99, END, END)
    fast = evidence.report(*args, capacity={ln: 16 for ln in LANES}, fast=True)
    full = evidence.report(*args, capacity={ln: 16 for ln in LANES}, fast=False)
    assert fast == full
    assert "| alpha |" in fast and "lane_invocation" in fast


def test_late_events_for_rolled_buckets_count_once(day: Path) -> None:
    """Missions that end with times inside buckets already rolled up (ids above the watermark): taken raw until
    the next roll-up, folded in by it, never counted twice."""
    path = day / "ledger.db"
    roll_all(path, END)
    fleet = config.load(str(day / "etc"))
    led = Ledger.open(path)
    at = END - 5000.0  # inside a rolled bucket and hour
    try:
        for i in range(5):
            m = ms.submit(led, fleet, cls="background", payload={"late": i}, now=at + i, lane="beta")
            (d,) = ms.assign(led, [Assignment(m.mission.id, "beta", "background")], now=at + i + 0.5, lease_sec=600)
            ms.started(led, m.mission.id, lane="beta", attempt=1, token=d.token, now=at + i + 0.6, lease_sec=600)
            if i % 2:
                ms.complete(led, m.mission.id, lane="beta", attempt=1, token=d.token, now=at + i + 3,
                            result={"exit_code": 0})
            else:
                ms.fail(led, m.mission.id, lane="beta", attempt=1, token=d.token, now=at + i + 3, error="x",
                        retry=False)
    finally:
        led.close()
    for t0, t1 in WINDOWS[:4]:
        full = figures(path, t0, t1, None, False)
        assert_same(figures(path, t0, t1, None, True), figures(path, t0, t1, None, False))
    roll_all(path, END)  # folds them in
    for t0, t1 in WINDOWS[:4]:
        assert_same(figures(path, t0, t1, "beta", True), figures(path, t0, t1, "beta", False))
        full = figures(path, t0, t1, None, False)
        assert_same(figures(path, t0, t1, None, True), full)


def test_runs_pick_the_same_percentile_as_sorting(day: Path) -> None:
    import random

    rnd = random.Random(3)  # (no -0.0: x - y is never -0.0 for the times the ledger subtracts)
    for _ in range(200):
        runs = [sorted(rnd.choice([0.0, 1e-7, rnd.uniform(-5, 5), rnd.lognormvariate(0, 2)])
                       for _ in range(rnd.randint(0, 30))) for _ in range(rnd.randint(1, 6))]
        r = evidence._Runs()
        for run in runs:
            r.add(run)
        flat = sorted(v for run in runs for v in run)
        for p in (1, 50, 95, 99, 100):
            got, want = r.percentile(p), evidence.percentile(flat, p) if flat else None
            assert got == want and str(got) == str(want), (p, runs)


def test_prune_drops_the_roll_ups_behind_the_horizon(tmp_path: Path) -> None:
    """After a prune both ways see only what is left, also across the horizon: the old events of missions that had
    not finished (so were kept) count, the pruned ones do not."""
    from lanectl.ledger import retention

    write_config(tmp_path / "etc")
    build(tmp_path / "ledger.db", 2000, END)
    cutoff = END - 43_200 + 100  # mid-bucket
    fleet = config.load(str(tmp_path / "etc"))
    led = Ledger.open(tmp_path / "ledger.db")
    try:
        for k in range(4):  # queued long ago, still queued: kept by the prune, with their old events
            ms.submit(led, fleet, cls="background", payload={"old": k}, now=cutoff - 5000 + 700 * k, lane="gamma")
    finally:
        led.close()
    roll_all(tmp_path / "ledger.db", END)
    led = Ledger.open(tmp_path / "ledger.db")
    try:
        retention.prune(led, cutoff=cutoff, archive=tmp_path / "a.jsonl.gz", now=END)
        starts = [r[0] for r in led.conn.execute("SELECT start FROM rollups")]
    finally:
        led.close()
    assert starts and min(starts) >= cutoff
    roll_all(tmp_path / "ledger.db", END)
    for t0, t1 in [(END - 86400, END), (cutoff - 3000.5, cutoff + 3000.5), (END - 40_000.5, END - 61.5),
                   (cutoff - 9000, cutoff - 10)]:
        fast, full = (figures(tmp_path / "ledger.db", t0, t1, None, f) for f in (True, False))
        assert_same(fast, full)
    assert figures(tmp_path / "ledger.db", cutoff - 9000, cutoff - 10, None, True)["traffic"]["submitted"] == 4


def test_an_idle_ledger_is_not_written(tmp_path: Path) -> None:
    """Roll-ups of a ledger where nothing happened write nothing (an idle supervisor does not fsync every pass)."""
    led = Ledger.open(tmp_path / "l.db")
    try:
        with led.transaction() as conn:
            rollups.roll_up(conn, END)
        before = led.conn.execute("PRAGMA data_version").fetchone()[0], led.conn.total_changes
        for k in range(5):
            with led.transaction() as conn:
                assert rollups.roll_up(conn, END + 10 * k) == 0
        assert (led.conn.execute("PRAGMA data_version").fetchone()[0], led.conn.total_changes) == before
    finally:
        led.close()

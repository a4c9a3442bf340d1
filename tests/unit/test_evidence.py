"""lanectl.evidence: percentiles against known distributions, rates, Prometheus text, report, event queries."""
from __future__ import annotations

import json
import re
import threading
from pathlib import Path
from typing import Any

import pytest

from lanectl import evidence
from lanectl.config import ClassPolicy, Lane, LaneSet, Settings
from lanectl.dispatch import Assignment
from lanectl.ledger import Ledger
from lanectl.ledger import lanes as lane_ops
from lanectl.ledger import missions as ms
from lanectl.ledger.events import EventKind, append
from lanectl.states import ACTIVE

T0 = 1_700_000_000.0
HASH = "0" * 64
RANK = {"interactive": 0, "deadline": 1, "background": 2}


def make_fleet(tmp: Path) -> LaneSet:
    lanes = {"alpha": Lane(port=9001, workspace="/var/lib/lanes/alpha", capacity=2, fallback="beta"),
             "beta": Lane(port=9002, workspace="/var/lib/lanes/beta", capacity=4)}
    classes = {c: ClassPolicy(max_wait_sec=60, queue_limit=1000) for c in RANK}
    return LaneSet(lanes, Settings(classes=classes), tmp, tmp / "lanes.d")


@pytest.fixture
def led(tmp_path: Path):
    ledger = Ledger.open(tmp_path / "state" / "ledger.db")
    yield ledger
    ledger.close()


def add(conn: Any, mid: int, *, cls: str = "interactive", lane: str = "alpha", created: float,
        wait: float = 0.0, run: float = 1.0, outcome: str = "succeeded", fallback_from: str | None = None,
        started: bool = True) -> None:
    """One mission through one attempt, rows and events as the ledger API writes them (direct inserts)."""
    dispatched = created + wait
    start = dispatched + 0.001 if started else None
    end = (start or dispatched) + run
    active = outcome in ACTIVE
    conn.execute("INSERT INTO missions (id, class, rank, state, payload, request_hash, max_attempts, attempts, "
                 "current_lane, created_at, updated_at) VALUES (?,?,?,?,'{}',?,3,1,?,?,?)",
                 (mid, cls, RANK[cls], outcome, HASH, lane if active else None, created, end))
    a_state = {"dead": "lost"}.get(outcome, outcome)
    conn.execute("INSERT INTO attempts (mission, n, lane, class, token_hash, state, dispatched_at, started_at, "
                 "lease_expires, finished_at) VALUES (?,1,?,?,?,?,?,?,?,?)",
                 (mid, lane, cls, HASH, a_state, dispatched, start, dispatched + 60, None if active else end))
    append(conn, EventKind.SUBMITTED, created, mission=mid, cls=cls)
    append(conn, EventKind.DISPATCHED, dispatched, mission=mid, lane=lane, attempt=1, cls=cls,
           fallback_from=fallback_from)
    if start is not None:
        append(conn, EventKind.STARTED, start, mission=mid, lane=lane, attempt=1)
    if not active:
        append(conn, EventKind(outcome), end, mission=mid, lane=lane, attempt=1)


# ------------------------------------------------------------------------------------------------ percentiles


def test_runs_pick_the_same_percentile_as_sorting() -> None:
    """The roll-ups' merged sorted runs (evidence._Runs) give the percentile sorting every value would."""
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


def test_percentile_nearest_rank_on_1_to_1000() -> None:
    values = list(range(1000, 0, -1))
    assert evidence.percentile(values, 50) == 500
    assert evidence.percentile(values, 95) == 950
    assert evidence.percentile(values, 99) == 990
    assert evidence.percentile(values, 100) == 1000
    assert evidence.percentile([7.0], 50) == 7.0
    assert evidence.percentile([], 50) is None
    assert evidence.percentile([1, 2, 3, 4], 50) == 2  # nearest rank: ceil(0.5 * 4) = 2, no interpolation
    with pytest.raises(ValueError):
        evidence.percentile([1], 0)


def test_metrics_percentiles_against_injected_waits(led: Ledger) -> None:
    """1000 missions with queue waits 1..1000 ms, run times 2..2000 ms: p50/p95/p99 exact."""
    now = T0 + 10_000
    with led.transaction() as conn:
        for i in range(1, 1001):
            add(conn, i, created=T0 + i, wait=i / 1000, run=2 * i / 1000)
    m = evidence.metrics(led, window_s=3 * 3600, now=now)
    (g,) = m["groups"]
    assert (g["lane"], g["class"]) == ("alpha", "interactive")
    qw = g["queue_wait_s"]
    assert qw["count"] == 1000
    assert qw["p50"] == pytest.approx(0.500, abs=1e-6)
    assert qw["p95"] == pytest.approx(0.950, abs=1e-6)
    assert qw["p99"] == pytest.approx(0.990, abs=1e-6)
    rt = g["run_time_s"]
    assert (rt["p50"], rt["p95"], rt["p99"]) == pytest.approx((1.0, 1.9, 1.98), abs=1e-6)
    e2e = g["end_to_end_s"]  # wait + 1 ms to start + run = 3i ms + 1 ms
    assert (e2e["p50"], e2e["p95"], e2e["p99"]) == pytest.approx((1.501, 2.851, 2.971), abs=1e-6)
    assert m["total"]["queue_wait_s"] == qw


def test_rates_and_groups(led: Ledger) -> None:
    now = T0 + 3600
    with led.transaction() as conn:
        mid = 0
        for outcome, n in (("succeeded", 6), ("failed", 2), ("dead", 1), ("cancelled", 1)):
            for _ in range(n):
                mid += 1
                add(conn, mid, created=T0 + mid, outcome=outcome, fallback_from="beta" if mid % 5 == 0 else None)
        mid += 1
        add(conn, mid, cls="background", lane="beta", created=T0 + 100, outcome="succeeded")
        mid += 1
        add(conn, mid, cls="background", lane="beta", created=now - 30, wait=1, outcome="running")
        append(conn, EventKind.LANE_INVOCATION, T0 + 50, lane="alpha", invocation="b", previous="a")
        append(conn, EventKind.LANE_INVOCATION, T0 + 60, lane="alpha", invocation="c", previous="b")
        append(conn, EventKind.LANE_RESTART, T0 + 70, lane="beta", actor="ops", reason="test")
        append(conn, EventKind.LANE_INVOCATION, T0 - 10, lane="alpha", invocation="a", previous="z")  # before
    m = evidence.metrics(led, window_s=3600, now=now, capacity={"alpha": 2, "beta": 4})
    alpha = next(g for g in m["groups"] if g["lane"] == "alpha")
    assert (alpha["finished"], alpha["succeeded"], alpha["failed"], alpha["dead"], alpha["cancelled"]) == (9, 6, 2, 1, 1)
    assert alpha["failure_rate"] == pytest.approx(3 / 9)
    assert alpha["dispatched"] == 10 and alpha["fallback_dispatches"] == 2
    assert alpha["fallback_received_rate"] == pytest.approx(0.2)
    assert alpha["throughput_per_min"] == pytest.approx(9 / 60)
    lanes = {r["lane"]: r for r in m["lanes"]}
    assert lanes["alpha"]["restarts"] == 2 and lanes["beta"]["operator_restarts"] == 1
    assert lanes["beta"]["in_flight"] == 1 and m["total"]["in_flight"] == 1
    # alpha: 10 attempts, each 1.001 s busy (dispatch -> finish); beta: 1.001 s + the running one's 29 s
    assert lanes["alpha"]["utilization"] == pytest.approx(10 * 1.001 / (2 * 3600))
    assert lanes["beta"]["busy_s"] == pytest.approx(1.001 + 29)
    classes = {r["class"]: r for r in m["classes"]}
    assert classes["background"]["finished"] == 1 and classes["interactive"]["finished"] == 9
    assert m["total"]["finished"] == 10
    assert evidence.metrics(led, window_s=3600, now=now)["lanes"][0]["utilization"] is None  # no capacity given


def test_window_excludes_outside_and_overlap_is_clipped(led: Ledger) -> None:
    with led.transaction() as conn:
        add(conn, 1, created=T0, wait=0, run=100)  # dispatched at T0, finished T0+100.001
        add(conn, 2, created=T0 - 7200, run=1)  # long before the window
    m = evidence.metrics(led, window_s=60, now=T0 + 90, capacity={"alpha": 1})
    lanes = {r["lane"]: r for r in m["lanes"]}
    # mission 1 was dispatched before the window [T0+30, T0+90) and is not finished inside it: not counted as an
    # end, but it finished after the window, so it is not seen either (documented: historical windows only see
    # attempts that start or end in them, or are active now)
    assert lanes["alpha"]["finished"] == 0
    m = evidence.metrics(led, window_s=60, now=T0 + 120, capacity={"alpha": 1})
    alpha = next(r for r in m["lanes"] if r["lane"] == "alpha")
    assert alpha["finished"] == 1
    assert alpha["busy_s"] == pytest.approx(100.001 - 60)  # clipped to the window start (T0 + 60)
    assert alpha["queue_wait_s"]["count"] == 0  # its dispatch was before the window


def test_lane_filter_matches_unfiltered(led: Ledger) -> None:
    with led.transaction() as conn:
        for i in range(1, 41):
            add(conn, i, lane="alpha" if i % 2 else "beta", created=T0 + i, wait=i / 10, outcome="succeeded"
                if i % 3 else "failed")
    full = evidence.metrics(led, window_s=3600, now=T0 + 600)
    only = evidence.metrics(led, window_s=3600, now=T0 + 600, lane="beta")
    assert [r["lane"] for r in only["lanes"]] == ["beta"]
    assert next(r for r in full["lanes"] if r["lane"] == "beta") == only["lanes"][0]


def test_metrics_through_the_ledger_api(led: Ledger, tmp_path: Path) -> None:
    """The real write path: submit, assign (with a fallback), started, complete and fail with injected times."""
    fleet = make_fleet(tmp_path)
    a = ms.submit(led, fleet, cls="interactive", payload={}, now=T0).mission.id
    b = ms.submit(led, fleet, cls="interactive", payload={}, now=T0 + 1).mission.id
    (da,) = ms.assign(led, [Assignment(a, "alpha", "interactive")], now=T0 + 2, lease_sec=60)
    (db,) = ms.assign(led, [Assignment(b, "beta", "interactive", fallback_from="alpha")], now=T0 + 5, lease_sec=60)
    ms.started(led, a, lane="alpha", attempt=1, token=da.token, now=T0 + 3, lease_sec=60)
    ms.complete(led, a, lane="alpha", attempt=1, token=da.token, now=T0 + 13)
    ms.fail(led, b, lane="beta", attempt=1, token=db.token, now=T0 + 8, error="boom", retry=False)
    m = evidence.metrics(led, window_s=600, now=T0 + 60, fleet=fleet)
    g = {(r["lane"], r["class"]): r for r in m["groups"]}
    alpha, beta = g[("alpha", "interactive")], g[("beta", "interactive")]
    assert alpha["queue_wait_s"]["p50"] == 2 and alpha["run_time_s"]["p50"] == 10
    assert alpha["end_to_end_s"]["p99"] == 13 and alpha["failure_rate"] == 0
    assert beta["queue_wait_s"]["p50"] == 4 and beta["failure_rate"] == 1 and beta["fallback_received_rate"] == 1
    assert beta["run_time_s"]["count"] == 0
    lanes = {r["lane"]: r for r in m["lanes"]}
    assert lanes["alpha"]["capacity"] == 2 and lanes["alpha"]["utilization"] == pytest.approx(11 / (2 * 600))


# ------------------------------------------------------------------------------------------------ Prometheus

SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{([a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\]|\\.)*"'
                    r'(?:,[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\]|\\.)*")*)\})? (-?[0-9.e+-]+|[+-]Inf|NaN)$')
META = re.compile(r"^# (HELP|TYPE) ([a-zA-Z_:][a-zA-Z0-9_:]*) (.+)$")


def parse_prometheus(text: str) -> dict[str, Any]:
    """A small parser of the text exposition format: every line is a HELP, a TYPE or a sample."""
    types: dict[str, str] = {}
    samples: list[tuple[str, dict[str, str], float]] = []
    assert text.endswith("\n")
    for line in text.splitlines():
        m = META.match(line)
        if m:
            if m.group(1) == "TYPE":
                assert m.group(3) in ("gauge", "counter", "summary", "histogram", "untyped")
                assert m.group(2) not in types, f"two TYPE lines for {m.group(2)}"
                types[m.group(2)] = m.group(3)
            continue
        s = SAMPLE.match(line)
        assert s, f"not a sample line: {line!r}"
        labels = dict(re.findall(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"', s.group(3) or ""))
        name = s.group(1)
        base = name[:-len("_count")] if name.endswith("_count") and name[:-6] in types else name
        assert base in types, f"sample {name} before its TYPE"
        samples.append((name, labels, float(s.group(4))))
    return {"types": types, "samples": samples}


def test_prometheus_text_parses_and_carries_the_figures(led: Ledger) -> None:
    with led.transaction() as conn:
        for i in range(1, 101):
            add(conn, i, lane='we"ird\\lane' if i > 90 else "alpha", created=T0 + i, wait=i / 1000,
                outcome="failed" if i % 10 == 0 else "succeeded")
    m = evidence.metrics(led, window_s=3600, now=T0 + 600, capacity={"alpha": 4})
    text = evidence.prometheus_text(m, generated=T0 + 600)
    parsed = parse_prometheus(text)
    assert parsed["types"]["lanectl_queue_wait_seconds"] == "summary"
    assert all(n.startswith("lanectl_") for n, _, _ in parsed["samples"])
    got = {(n, tuple(sorted(lb.items()))): v for n, lb, v in parsed["samples"]}
    key = (("class", "interactive"), ("lane", "alpha"), ("quantile", "0.95"))
    assert got[("lanectl_queue_wait_seconds", key)] == pytest.approx(0.086)  # 90 waits 1..90 ms: rank 86
    assert got[("lanectl_failure_rate", (("class", "interactive"), ("lane", "alpha")))] == pytest.approx(9 / 90)
    assert got[("lanectl_lane_utilization", (("lane", "alpha"),))] > 0
    assert any(lb.get("lane") == 'we\\"ird\\\\lane' for _, lb, _ in parsed["samples"])  # escaped label value


def test_write_textfile_is_atomic_and_readable(tmp_path: Path) -> None:
    target = tmp_path / "textfile" / "lanectl.prom"
    evidence.write_textfile(target, "lanectl_window_seconds 60\n")
    evidence.write_textfile(target, "lanectl_window_seconds 900\n")
    assert target.read_text() == "lanectl_window_seconds 900\n"
    assert oct(target.stat().st_mode & 0o777) == "0o644"
    assert [p.name for p in target.parent.iterdir()] == ["lanectl.prom"]  # no temp file left


# ------------------------------------------------------------------------------------------------ report


def test_report_lists_decisions_with_who_when_why_and_evidence(led: Ledger, tmp_path: Path) -> None:
    fleet = make_fleet(tmp_path)
    with led.transaction() as conn:
        for i in range(1, 21):
            add(conn, i, created=T0 + i * 60, wait=2.0, outcome="failed" if i % 4 == 0 else "succeeded")
    lane_ops.drain(led, fleet, "alpha", now=T0 + 1500, reason="failure spike", who="alice")
    lane_ops.undrain(led, fleet, "alpha", now=T0 + 1800, reason="fixed | config", who="bob")
    with led.transaction() as conn:
        append(conn, EventKind.APPLY, T0 + 1900, actor="carol", written=["alpha.service"], lanes=["alpha"])
        append(conn, EventKind.LANE_STATE, T0 + 1950, lane="beta", to="degraded", healthy=False, previous="active")
        # append() cannot take a data field called "kind" (its own parameter), which docs/ledger.md gives drill
        conn.execute("INSERT INTO events (at, kind, lane, data) VALUES (?, 'drill', 'beta', ?)",
                     (T0 + 2000, json.dumps({"actor": "dave", "kind": "crash", "detect_s": 0.2, "recover_s": 1.5,
                                             "orphaned": 0, "passed": True})))
        append(conn, "future_kind", T0 + 2100, lane="beta", actor="eve", reason="newer lanectl")  # type: ignore[arg-type]
        append(conn, EventKind.DRAIN, T0 - 10, lane="beta", actor="zed", reason="before the period")
    text = evidence.report(led, since=T0, until=T0 + 3000, now=T0 + 3000)
    assert text.startswith("# lanectl report 2023-11-14T22:13:20.000Z to ")
    log = text.split("## Decisions", 1)[1].split("## Traffic", 1)[0]
    rows = [r for r in log.splitlines() if r.startswith("| 20")]
    assert [r.split(" | ")[1] for r in rows] == ["drain", "undrain", "apply", "lane_state", "drill", "future_kind"]
    drain = rows[0]
    assert "| alice | failure spike |" in drain
    assert drain.startswith(f"| {evidence.rfc3339(T0 + 1500)} |")
    # evidence: alpha over the hour before T0+1500: all 20 missions ended in it, every 4th failed; waits 2 s
    assert "failure 25.0% of 20, p95 queue wait 2.000s, fallback received 0.0%, restarts 0" in drain
    assert "fixed \\| config" in rows[1]  # a pipe in the reason does not break the table
    assert "zed" not in text
    assert "detect_s=0.2" in rows[4] and "no traffic in the hour before" in rows[4]
    assert "## Status" in text and "| alpha | - | active | yes |" in text


def test_every_event_kind_is_either_routine_or_a_decision() -> None:
    assert set(evidence.ROUTINE_KINDS) | set(evidence.DECISION_KINDS) == set(EventKind)
    assert not set(evidence.ROUTINE_KINDS) & set(evidence.DECISION_KINDS)
    for k in ("apply", "drain", "undrain", "reroute", "lane_restart", "lane_invocation", "lane_state", "promote",
              "rollback", "drill"):
        assert EventKind(k) in evidence.DECISION_KINDS


# ------------------------------------------------------------------------------------------------ events


def test_event_filters(led: Ledger) -> None:
    with led.transaction() as conn:
        for i in range(1, 11):
            add(conn, i, lane="alpha" if i <= 5 else "beta", created=T0 + i * 10, outcome="succeeded")
        append(conn, EventKind.SESSION_CREATED, T0 + 1, lane="alpha", session="alpha:s1")
    assert {e["mission"] for e in evidence.events(led, mission=3)} == {3}
    assert len(evidence.events(led, mission=3)) == 4
    lanes = evidence.events(led, lane="beta")
    assert lanes and {e["lane"] for e in lanes} == {"beta"}
    kinds = evidence.events(led, kind=["succeeded", "dispatched"])
    assert {e["kind"] for e in kinds} == {"succeeded", "dispatched"} and len(kinds) == 20
    assert [e["kind"] for e in evidence.events(led, session="alpha:s1")] == ["session_created"]
    window = evidence.events(led, since=T0 + 50, until=T0 + 70)
    assert window and all(T0 + 50 <= e["ts"] < T0 + 70 for e in window)
    assert [e["id"] for e in window] == sorted(e["id"] for e in window)
    first = evidence.events(led, limit=3)
    assert len(first) == 3 and first[0]["id"] == 1
    last = evidence.events(led, limit=3, latest=True)
    assert [e["id"] for e in last] == [evidence.last_id(led) - 2, evidence.last_id(led) - 1, evidence.last_id(led)]
    page = evidence.events(led, after_id=first[-1]["id"], limit=2)
    assert [e["id"] for e in page] == [4, 5]
    ev = evidence.events(led, mission=1, kind="dispatched")[0]
    assert ev["at"].endswith("Z") and ev["data"] == {"cls": "interactive"} and ev["attempt"] == 1


def test_follow_yields_new_events_only_and_backs_off(led: Ledger) -> None:
    with led.transaction() as conn:
        add(conn, 1, created=T0)
    sleeps: list[float] = []
    appended = {"n": 0}

    def sleep(s: float) -> None:
        sleeps.append(s)
        if len(sleeps) in (3, 4):  # after two idle polls, others write: one beta event, then one alpha
            with led.transaction() as conn:
                append(conn, EventKind.DRAIN, T0 + 10, lane="beta" if len(sleeps) == 3 else "alpha", actor="x")
                appended["n"] += 1

    gen = evidence.follow(led, lane="alpha", poll_s=0.1, max_poll_s=0.4, sleep=sleep,
                          stop=lambda: len(sleeps) >= 8)
    got = list(gen)
    assert [(e["kind"], e["lane"]) for e in got] == [("drain", "alpha")]
    assert sleeps[:3] == [0.2, 0.4, 0.4]  # idle: doubles up to the bound
    assert sleeps[4] == 0.1  # something arrived: back to the short poll
    assert max(sleeps) <= 0.4


def test_follow_from_an_id_with_a_real_writer(led: Ledger, tmp_path: Path) -> None:
    start = evidence.last_id(led)
    stop = threading.Event()

    def writer() -> None:
        other = Ledger.open(led.path)
        with other.transaction() as conn:
            for i in range(3):
                append(conn, EventKind.LANE_RESTART, T0 + i, lane="alpha", actor="w")
        other.close()

    got: list[dict[str, Any]] = []
    t = threading.Thread(target=writer)
    t.start()
    for ev in evidence.follow(led.path, after_id=start, kind=["lane_restart"], poll_s=0.01, max_poll_s=0.05,
                              stop=stop.is_set):
        got.append(ev)
        if len(got) == 3:
            stop.set()
    t.join()
    assert [e["ts"] for e in got] == [T0, T0 + 1, T0 + 2]


def test_state_now_in_metrics_and_prometheus(led: Ledger, tmp_path: Path) -> None:
    """Lane state and health as recorded, queue depth and oldest wait per class: in the JSON and the exposition."""
    fleet = make_fleet(tmp_path)
    ms.set_lane(led, "alpha", now=T0, healthy=True)
    ms.set_lane(led, "beta", now=T0, state="drained", healthy=False)
    for at, cls in ((T0 + 10, "interactive"), (T0 + 20, "interactive"), (T0 + 50, "background")):
        ms.submit(led, fleet, cls=cls, payload={}, now=at)
    m = evidence.metrics(led, window_s=60, now=T0 + 100, fleet=fleet)
    st = m["now_state"]
    assert st["lanes"] == [{"lane": "alpha", "state": "active", "healthy": True, "enabled": True, "automatic": False,
                            "host": None},
                           {"lane": "beta", "state": "drained", "healthy": False, "enabled": True,
                            "automatic": False, "host": None}]  # no host claimed them: no host label
    assert {c["class"]: (c["queued"], c["oldest_wait_s"]) for c in st["classes"]} == {
        "interactive": (2, 90.0), "deadline": (0, 0.0), "background": (1, 50.0)}
    got = {(n, tuple(sorted(lb.items()))): v for n, lb, v in
           parse_prometheus(evidence.prometheus_text(m, generated=T0 + 100))["samples"]}
    assert got[("lanectl_lane_healthy", (("lane", "alpha"),))] == 1
    assert got[("lanectl_lane_healthy", (("lane", "beta"),))] == 0
    assert got[("lanectl_lane_state", (("lane", "beta"), ("state", "drained")))] == 1
    assert got[("lanectl_lane_state", (("lane", "beta"), ("state", "active")))] == 0
    assert sum(v for (n, lb), v in got.items() if n == "lanectl_lane_state" and ("lane", "alpha") in lb) == 1
    assert got[("lanectl_lane_drained_by_lanectl", (("lane", "beta"),))] == 0  # drained, not by lanectl
    assert got[("lanectl_queued", (("class", "interactive"),))] == 2
    assert got[("lanectl_queue_oldest_wait_seconds", (("class", "interactive"),))] == 90.0
    assert got[("lanectl_queue_oldest_wait_seconds", (("class", "deadline"),))] == 0.0
    # one lane: only its row
    assert [r["lane"] for r in evidence.metrics(led, 60, T0 + 100, "beta", fleet=fleet)["now_state"]["lanes"]] == ["beta"]


def test_a_lane_lanectl_drained_is_its_own_series(led: Ledger, tmp_path: Path) -> None:
    """What the probe pages on (lanectl drained the lane by itself) is exported, so a Prometheus rule can page too
    (contrib/prometheus/lanectl-rules.yml, LanectlLaneDrainedByLanectl)."""
    from lanectl.ledger import lanes as lane_ops

    fleet = make_fleet(tmp_path)
    lane_ops.drain(led, fleet, "alpha", now=T0, reason="rollback: failure_spike", who="lanectl-supervisor")
    lane_ops.drain(led, fleet, "beta", now=T0, reason="maintenance", who="root")
    m = evidence.metrics(led, window_s=60, now=T0 + 100, fleet=fleet)
    got = {(n, tuple(sorted(lb.items()))): v for n, lb, v in
           parse_prometheus(evidence.prometheus_text(m, generated=T0 + 100))["samples"]}
    assert got[("lanectl_lane_drained_by_lanectl", (("lane", "alpha"),))] == 1
    assert got[("lanectl_lane_drained_by_lanectl", (("lane", "beta"),))] == 0

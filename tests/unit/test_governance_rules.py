"""The rollback rules as pure functions over evidence windows (issue 16 items 4, 5, 9): a lane is judged against
the fleet, a degraded lane's fallback traffic is no fallback spike, a lane's window starts afresh when it returns
to service, restarts are no rollback trigger, and the thresholds that decide degradation agree (config)."""
from __future__ import annotations

from pathlib import Path

import pytest

from lanectl import config, governance
from lanectl.config import Lane, LaneSet, RollbackSettings, Settings
from lanectl.errors import ExitCode, LanectlError
from lanectl.governance import FLEET, LaneEvidence, judge_trips, rollback_trips
from lanectl.ledger import Ledger
from lanectl.ledger.events import EventKind, append

POL = RollbackSettings(window_sec=300, min_samples=5, failure_rate=0.5, fallback_lost_rate=0.5)
NOW = 1_700_000_000.0


def ev(lane: str, finished: int = 0, failed: int = 0, **kw: object) -> LaneEvidence:
    return LaneEvidence(lane, 300.0, finished=finished, failed=failed, **kw)  # type: ignore[arg-type]


def active(*names: str) -> dict[str, str]:
    return {n: "active" for n in names}


def test_a_lane_that_fails_where_the_fleet_does_not_is_rolled_back() -> None:
    evidence = {"alpha": ev("alpha", 10, 10), "beta": ev("beta", 10, 0), "gamma": ev("gamma", 6, 1)}
    (trip,) = judge_trips(evidence, active(*evidence), POL)
    assert (trip.lane, trip.trigger) == ("alpha", "failure_spike")


def test_failures_every_lane_shows_alike_are_the_works_fault_one_fleet_alert_no_drain() -> None:
    evidence = {"alpha": ev("alpha", 12, 12), "beta": ev("beta", 12, 12), "gamma": ev("gamma", 12, 12)}
    (trip,) = judge_trips(evidence, active(*evidence), POL)
    assert trip.fleet_wide and trip.lane == FLEET and trip.trigger == "failure_spike"
    assert trip.lanes == ["alpha", "beta", "gamma"] and set(trip.evidence) == {"alpha", "beta", "gamma"}


def test_a_drained_lane_is_still_the_fleets_evidence() -> None:
    # alpha was drained for the burst; beta and gamma now fail the same way: the work, not them
    evidence = {"alpha": ev("alpha", 8, 8), "beta": ev("beta", 14, 14), "gamma": ev("gamma", 7, 6)}
    states = {"alpha": "drained", "beta": "active", "gamma": "active"}
    trips = judge_trips(evidence, states, POL)
    assert [t.lane for t in trips] == [FLEET]
    assert trips[0].lanes == ["alpha", "beta", "gamma"]


def test_without_peer_evidence_a_lane_is_judged_alone() -> None:
    evidence = {"alpha": ev("alpha", 6, 6), "beta": ev("beta", 1, 0), "gamma": ev("gamma")}
    (trip,) = judge_trips(evidence, active(*evidence), POL)
    assert (trip.lane, trip.trigger) == ("alpha", "failure_spike")


def test_one_healthy_peer_makes_the_failing_lanes_outliers() -> None:
    evidence = {"alpha": ev("alpha", 10, 10), "beta": ev("beta", 10, 9), "gamma": ev("gamma", 10, 0)}
    trips = judge_trips(evidence, active(*evidence), POL)
    assert [(t.lane, t.trigger) for t in trips] == [("alpha", "failure_spike"), ("beta", "failure_spike")]
    # (the supervisor drains only the first of them in one pass: tests/systemd/test_governance.py)


def test_a_lane_failing_alike_still_trips_its_own_other_triggers() -> None:
    evidence = {"alpha": ev("alpha", 10, 10, lease_expiries=9), "beta": ev("beta", 10, 10)}
    trips = judge_trips(evidence, active(*evidence), POL)
    assert [(t.lane, t.trigger) for t in trips] == [("alpha", "heartbeat_instability"), (FLEET, "failure_spike")]


def test_a_degraded_lanes_own_traffic_to_its_fallback_is_no_fallback_spike() -> None:
    evidence = {"alpha": ev("alpha", dispatched=0, fallback_away=20), "beta": ev("beta", 20, 0, dispatched=20)}
    assert judge_trips(evidence, {"alpha": "degraded", "beta": "active"}, POL) == []
    (trip,) = judge_trips(evidence, active("alpha", "beta"), POL)
    assert (trip.lane, trip.trigger) == ("alpha", "fallback_spike")


def test_restarts_are_no_rollback_trigger() -> None:
    evidence = {"alpha": ev("alpha", restarts=50), "beta": ev("beta")}
    assert judge_trips(evidence, active("alpha", "beta"), POL) == []


def test_lanes_not_taking_work_never_trip() -> None:
    evidence = {"alpha": ev("alpha", 10, 10), "beta": ev("beta", 10, 0)}
    assert judge_trips(evidence, {"alpha": "drained", "beta": "active"}, POL) == []


# ---------------------------------------------------------------------------------------- windows from a ledger
def small_fleet(tmp: Path) -> LaneSet:
    lanes = {"alpha": Lane(port=9001, workspace="/var/lib/lanes/alpha", fallback="beta"),
             "beta": Lane(port=9002, workspace="/var/lib/lanes/beta")}
    return LaneSet(lanes, Settings(rollback=POL), tmp, tmp / "lanes.d")


def failures(led: Ledger, lane: str, n: int, at: float) -> None:
    with led.transaction() as conn:
        for i in range(n):
            append(conn, EventKind.FAILED, at + i * 0.01, mission=i + 1, lane=lane, attempt=1, error="exit code 1")


def test_an_undrain_starts_a_fresh_evidence_window(tmp_path: Path) -> None:
    fleet = small_fleet(tmp_path)
    with Ledger.open(tmp_path / "ledger.db") as led:
        failures(led, "alpha", 8, NOW - 60)
        (trip,) = rollback_trips(led.conn, fleet, now=NOW, states=active("alpha", "beta"))
        assert (trip.lane, trip.trigger) == ("alpha", "failure_spike")
        with led.transaction() as conn:
            append(conn, EventKind.UNDRAIN, NOW - 10, lane="alpha", actor="op", previous="drained")
        assert rollback_trips(led.conn, fleet, now=NOW, states=active("alpha", "beta")) == []
        assert governance.evidence_starts(led.conn, now=NOW, window_s=300) == {"alpha": NOW - 10}
        failures(led, "alpha", 6, NOW - 5)  # new failures after the undrain are evidence again
        (trip,) = rollback_trips(led.conn, fleet, now=NOW, states=active("alpha", "beta"))
        assert trip.lane == "alpha" and trip.evidence["finished"] == 6


def test_recovery_from_degraded_starts_a_fresh_evidence_window(tmp_path: Path) -> None:
    fleet = small_fleet(tmp_path)
    with Ledger.open(tmp_path / "ledger.db") as led:
        with led.transaction() as conn:  # while degraded, its pinned work went to beta
            for i in range(10):
                append(conn, EventKind.DISPATCHED, NOW - 60 + i, mission=i + 1, lane="beta", attempt=1,
                       fallback_from="alpha")
        assert rollback_trips(led.conn, fleet, now=NOW, states={"alpha": "degraded", "beta": "active"}) == []
        with led.transaction() as conn:
            append(conn, EventKind.LANE_STATE, NOW - 20, lane="alpha", to="active", previous="degraded")
        assert rollback_trips(led.conn, fleet, now=NOW, states=active("alpha", "beta")) == []


def test_operator_restarts_add_no_restarts_to_the_evidence(tmp_path: Path) -> None:
    with Ledger.open(tmp_path / "ledger.db") as led:
        with led.transaction() as conn:
            for i, n in enumerate([1, 0, 0, 2, None]):  # None: not known (the supervisor was down): counted once
                append(conn, EventKind.LANE_INVOCATION, NOW - 50 + i, lane="alpha", invocation=f"i{i}",
                       previous=f"i{i - 1}", restarts=n)
        assert governance.lane_evidence(led.conn, "alpha", now=NOW, window_s=300).restarts == 4


# ---------------------------------------------------------------------------------------- thresholds agree
def problems(d: Path) -> list:
    with pytest.raises(LanectlError) as ei:
        config.load(d)
    assert ei.value.exit_code == ExitCode.CONFIG
    return ei.value.problems


def test_the_start_limit_must_leave_room_to_degrade(fleet_dir: Path) -> None:
    lane = fleet_dir / "lanes.d" / "gamma.toml"
    lane.write_text(lane.read_text() + "\n[restart]\nstart_limit_burst = 3\nmax_restarts = 3\n")
    (p,) = [p for p in problems(fleet_dir) if p.file.endswith("gamma.toml")]  # (beta's fallback is gone too)
    assert p.field == "restart"
    assert "start_limit_burst (3) must be greater than max_restarts (3)" in p.message
    assert "raise start_limit_burst to at least 4" in p.hint


def test_the_start_limit_interval_may_not_outlast_the_restart_window(fleet_dir: Path) -> None:
    """Found by attacking issue 16's fixes: restart_window_sec = 5 against a 120 s start limit let systemd stop a
    crash-looping lane for good (failed, operator-only) before the supervisor ever saw 3 restarts in 5 s."""
    toml = fleet_dir / "lanectl.toml"
    toml.write_text(toml.read_text() + "\n[health]\nrestart_window_sec = 5\n")
    found = [p for p in problems(fleet_dir) if p.code == "restart_window_short"]
    assert {Path(p.file).name for p in found} == {"alpha.toml", "beta.toml", "gamma.toml"}
    assert found[0].field == "restart.start_limit_interval_sec" and "at most 5" in found[0].hint
    toml.write_text(toml.read_text().replace("restart_window_sec = 5", "restart_window_sec = 120"))
    config.load(fleet_dir)  # equal windows agree


def test_rollback_max_restarts_is_refused_with_the_fix(fleet_dir: Path) -> None:
    toml = fleet_dir / "lanectl.toml"
    toml.write_text(toml.read_text() + "\n[rollback]\nmax_restarts = 5\n")
    (p,) = problems(fleet_dir)
    assert p.file.endswith("lanectl.toml") and p.field == "rollback"
    assert "no longer a rollback trigger" in p.message and "[restart] max_restarts" in p.hint


def test_defaults_agree() -> None:
    pol = config.RestartPolicy()
    assert pol.start_limit_burst > pol.max_restarts
    assert pol.start_limit_interval_sec <= config.HealthSettings().restart_window_sec

"""The probe's verdict per lane (lanectl.probe.judge_lanes, a pure function of systemd's and the ledger's view):
who drained a lane decides whether it pages (issue 15 item 1). tests/systemd/test_day2.py runs it for real."""
from __future__ import annotations

import pytest

from lanectl import probe
from lanectl.healthcheck import Health
from lanectl.status import LaneStatus

LANES = {"alpha": {"enabled": True}, "beta": {"enabled": True}}


def row(name: str, active: str = "active", sub: str = "running", healthy: bool = True, result: str = "success"):  # type: ignore[no-untyped-def]
    r = LaneStatus(name, f"lanectl-lane@{name}.service", True, 8701)
    r.active_state, r.sub_state, r.result = active, sub, result
    r.health = Health(ok=healthy, listening=healthy)
    return r


def judge(r: LaneStatus, view: dict | None) -> tuple[int, str]:
    res = probe.ProbeResult()
    probe.judge_lanes(res, [r], {r.name: view} if view else {}, LANES)
    check = next(c for c in res.checks if c.name == f"lane:{r.name}")
    return check.code, check.text


AUTO = {"state": "drained", "drained_by": probe.SUPERVISOR_ACTOR, "drain_reason": "rollback: failure_spike",
        "automatic": True}
OPERATOR = {"state": "drained", "drained_by": "root", "drain_reason": "kernel update", "automatic": False}


@pytest.mark.parametrize("active,sub", [("active", "running"), ("inactive", "dead"), ("failed", "failed")])
def test_a_lane_lanectl_drained_is_critical_whatever_its_unit(active: str, sub: str) -> None:
    code, text = judge(row("alpha", active, sub), AUTO)
    assert code == probe.CRITICAL
    assert text.startswith("alpha drained by lanectl (rollback: failure_spike)") and "lanectl drain alpha" in text


@pytest.mark.parametrize("active,sub", [("active", "running"), ("inactive", "dead")])
def test_an_operators_drain_is_quiet_running_or_stopped(active: str, sub: str) -> None:
    assert judge(row("alpha", active, sub), OPERATOR) == (probe.OK, "alpha drained")


def test_an_operators_drained_lane_whose_unit_failed_warns() -> None:
    code, text = judge(row("alpha", "failed", "failed", healthy=False, result="signal"), OPERATOR)
    assert code == probe.WARNING and "unit failed (signal)" in text


def test_a_lane_systemd_gave_up_on_is_critical_and_says_how_to_clear_it() -> None:
    code, text = judge(row("alpha", "failed", "failed", healthy=False, result="signal"), None)
    assert code == probe.CRITICAL
    assert "systemd gave up restarting it, last result signal" in text and "lanectl restart alpha" in text


def test_degraded_by_the_supervisor_and_running_warns() -> None:
    assert judge(row("alpha"), {"state": "degraded"})[0] == probe.WARNING
    assert judge(row("alpha"), {"state": "active"}) == (probe.OK, "alpha up")


def supervisor_row(reload_error: str | None, healthy: bool = True) -> LaneStatus:
    r = LaneStatus("supervisor", "lanectl-supervisor.service", True, 8700, kind="supervisor")
    r.active_state, r.sub_state = "active", "running"
    r.health = Health(ok=healthy, listening=healthy, http_status=200,
                      body={"generation": 0, "reloads": 1, "reload_error": reload_error})
    return r


def test_a_failed_reload_warns_in_probe_and_fails_status() -> None:
    """F6: the supervisor keeps its old configuration after a reload that did not load; that is not green."""
    err = "/etc/lanectl/lanes.d/beta.toml: capacity: Input should be a valid integer"
    r = supervisor_row(err)
    res = probe.ProbeResult()
    probe.judge_supervisor(res, r)
    assert res.code == probe.WARNING
    assert [c.name for c in res.checks if c.code == probe.WARNING] == ["supervisor_reload"]
    assert err in res.line() and res.line().startswith("LANECTL WARNING - supervisor runs its previous configuration")
    assert not r.ok and r.as_dict()["reload_error"] == err  # `lanectl status` exits 8 and shows it


def test_a_good_reload_and_a_down_supervisor() -> None:
    res = probe.ProbeResult()
    probe.judge_supervisor(res, supervisor_row(None))
    assert res.code == probe.OK and supervisor_row(None).ok
    down = supervisor_row("bad", healthy=False)
    down.active_state, down.sub_state = "failed", "failed"
    res = probe.ProbeResult()
    probe.judge_supervisor(res, down)
    assert res.code == probe.CRITICAL and [c.name for c in res.checks] == ["supervisor"]  # down outranks the rest
    assert row("alpha").as_dict().get("reload_error") is None and row("alpha").reload_error is None


def test_an_enabled_lane_unit_with_no_lane_is_an_orphan(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """F3: lanectl-lane@NAME.service linked in lanectl.target.wants while no lane NAME is installed."""
    from lanectl.status import orphan_units

    wants = tmp_path / "lanectl.target.wants"
    wants.mkdir()
    for name in ("lanectl-lane@alpha.service", "lanectl-lane@eps.service", "lanectl-supervisor.service",
                 "lanectl-lane@.service"):
        (wants / name).symlink_to("/dev/null")
    assert orphan_units(LANES, tmp_path) == {"eps": "lanectl-lane@eps.service"}
    assert orphan_units({**LANES, "eps": {}}, tmp_path) == {}
    assert orphan_units(LANES, tmp_path / "nowhere") == {}

    r = LaneStatus("eps", "lanectl-lane@eps.service", False, 0, kind="orphan")
    r.active_state, r.sub_state = "activating", "auto-restart"
    assert r.state == "orphan" and not r.ok
    res = probe.ProbeResult()
    probe.judge_orphans(res, [r])
    assert res.code == probe.WARNING and "'lanectl down eps'" in res.line()
    assert res.as_dict()["perfdata"]["orphan_units"]["value"] == 1


def test_missions_bound_to_a_lane_not_installed_yet_warn_and_gone_ones_are_critical() -> None:
    """A lane in lanes.d that install has not brought yet is a WARNING ('lanectl install'), not 'gone'."""
    res = probe.ProbeResult()
    probe.judge_stranded(res, {"delta": 2, "zulu": 1}, {"delta", "alpha"})
    by = {c.name: (c.code, c.text) for c in res.checks}
    assert by["stranded"][0] == probe.CRITICAL and "gone (1 on zulu)" in by["stranded"][1]
    assert by["not_installed"][0] == probe.WARNING and "not installed yet (2 on delta)" in by["not_installed"][1]
    assert ("stranded", 1, None, 0, 0, None) in res.perf

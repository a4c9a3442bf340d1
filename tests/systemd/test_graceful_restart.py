"""``lanectl restart --graceful`` under a real systemd (its library side is lanectl.rollout.restart_gracefully; apply
restarts changed lanes the same way, tests/systemd/test_fleet_changes.py).

Drain, wait until nothing is in flight, restart, wait until up, back to the dispatch state it had: an active lane is
active again, a drained one stays drained. Work still in flight at --timeout is exit 7 (``drain_timeout``) and the
lane stays draining, its unit untouched. A lane that is not installed is exit 4. Each step is an event.
"""
from __future__ import annotations

import json

import pytest

from tests.systemd.lanehelpers import Fleet, sql, submit_many, up_example, wait_for

pytestmark = pytest.mark.systemd


@pytest.fixture(scope="module")
def fleet(sandbox, tmp_path_factory):  # type: ignore[no-untyped-def]
    f = up_example(sandbox, tmp_path_factory.mktemp("graceful"), "\n[health]\nsystemd_sec = 0.5\n"
                                                                  "[rollback]\nenabled = false\n")
    wait_for(lambda: all(r["state"] == "up" for r in f.status("alpha", "beta").values()), 60, interval=0.3,
             what="alpha and beta up")
    yield f
    f.lanectl("down")


def dispatch(f: Fleet, lane: str) -> str:
    return f.status(lane)[lane]["dispatch"]


def events_since(f: Fleet, after: int, lane: str) -> list[tuple[str, dict]]:  # type: ignore[type-arg]
    rows = sql(f, "SELECT kind, data FROM events WHERE id > ? AND lane = ? ORDER BY id", after, lane)
    return [(k, json.loads(d) if d else {}) for k, d in rows]


def last_event(f: Fleet) -> int:
    return sql(f, "SELECT COALESCE(MAX(id), 0) FROM events")[0][0]


def test_an_active_lane_is_restarted_and_back_in_service(fleet: Fleet) -> None:
    pid = fleet.main_pid("alpha")
    mark = last_event(fleet)
    code, doc = fleet.json("restart", "alpha", "--graceful", "--reason", "new runtime")
    assert code == 0, doc
    assert doc["command"] == ["restart"] and doc["data"] == {"action": "restart", "lanes": ["alpha"],
                                                            "changed": ["alpha"], "failed": {}, "reset": {}}, doc
    assert fleet.main_pid("alpha") not in (0, pid)
    assert fleet.status("alpha")["alpha"]["state"] == "up" and dispatch(fleet, "alpha") == "active"
    evs = events_since(fleet, mark, "alpha")
    steps = [(k, d) for k, d in evs if k in ("drain", "lane_restart", "undrain")]  # lane_state ones interleave
    assert [k for k, _ in steps] == ["drain", "lane_restart", "undrain"], evs
    assert steps[0][1]["reason"] == "graceful restart: new runtime", evs
    assert steps[1][1]["graceful"] is True and steps[1][1]["reason"] == "new runtime", evs
    assert steps[2][1]["reason"] == "graceful restart done", evs
    # the human form says what it did, on stdout, nothing on stderr when piped
    proc = fleet.lanectl("restart", "alpha", "--graceful")
    assert proc.returncode == 0 and proc.stdout == "alpha: restarted gracefully\n" and proc.stderr == "", proc


def test_a_drained_lane_stays_drained(fleet: Fleet) -> None:
    assert fleet.lanectl("drain", "beta", "--reason", "kept out").returncode == 0
    try:
        pid = fleet.main_pid("beta")
        code, doc = fleet.json("restart", "beta", "--graceful")
        assert code == 0 and doc["data"]["changed"] == ["beta"], doc
        assert fleet.main_pid("beta") not in (0, pid)
        assert dispatch(fleet, "beta") == "drained"
    finally:
        assert fleet.lanectl("undrain", "beta").returncode == 0


def test_work_in_flight_at_the_timeout_is_exit_7_and_the_lane_stays_draining(fleet: Fleet) -> None:
    [mid] = submit_many(fleet, [{"cls": "interactive", "lane": "alpha", "argv": ["/bin/sh", "-c", "sleep 300"]}])
    wait_for(lambda: sql(fleet, "SELECT state FROM missions WHERE id = ?", mid)[0][0] == "running", 60,
             interval=0.3, what="the mission running on alpha")
    pid = fleet.main_pid("alpha")
    try:
        code, doc = fleet.json("restart", "alpha", "--graceful", "--timeout", "1")
        assert code == 7, doc
        err = doc["errors"][0]
        assert err["code"] == "drain_timeout" and "lane alpha still has 1 mission(s) in flight after 1s" in \
            err["message"] and "stays draining" in err["hint"], doc
        assert fleet.main_pid("alpha") == pid  # not restarted
        assert dispatch(fleet, "alpha") == "draining"
    finally:
        fleet.lanectl("mission", "cancel", str(mid))
        assert fleet.lanectl("undrain", "alpha").returncode == 0


def test_a_lane_that_is_not_installed_is_exit_4(fleet: Fleet) -> None:
    code, doc = fleet.json("restart", "nosuch", "--graceful")
    assert code == 4 and doc["errors"][0]["code"] == "lane_not_found", doc

"""Rollback evidence from a real ledger, for the cases found by attacking issue 16's fixes: a spent daily budget
is the plan, not a lane's fault; an operator's undrain starts the starvation clock afresh."""
from __future__ import annotations

import dataclasses

from conftest import T0
from test_queue_groups import big_fleet, submit_many

from lanectl import governance
from lanectl.config import Quota
from lanectl.ledger import tick
from lanectl.ledger import lanes as lane_ops


def test_work_that_takes_the_fallback_because_the_budget_is_spent_is_no_fallback_spike(backend, tmp_path):
    f = big_fleet(tmp_path)
    lanes = dict(f.lanes)
    lanes["beta"] = lanes["beta"].model_copy(update={"quotas": {"background": Quota(daily_budget=5)},
                                                     "capacity": 50})
    lanes["alpha"] = lanes["alpha"].model_copy(update={"capacity": 50})
    fleet = dataclasses.replace(f, lanes=lanes)
    with backend.open() as led:
        submit_many(led, fleet, 20, T0, lane="beta")
        placed = [d.lane for d in tick.run_once(led, fleet, now=T0 + 1).dispatches]
        assert placed.count("beta") == 5 and placed.count("alpha") == 15  # the budget, then the fallback
        ev = governance.windowed_evidence(led.conn, list(fleet.lanes), now=T0 + 2, window_s=300)
        assert ev["beta"].fallback_away == 0
        assert not [t for t in governance.rollback_trips(led.conn, fleet, now=T0 + 2) if t.lane == "beta"]


def test_an_undrain_starts_the_starvation_clock_afresh(backend, tmp_path):
    fleet = big_fleet(tmp_path)
    with backend.open() as led:
        lane_ops.drain(led, fleet, "alpha", now=T0, who="lanectl-supervisor", reason="rollback: something")
        submit_many(led, fleet, 6, T0 + 10, lane="alpha", cls="interactive")  # more than alpha's capacity (2)
        back = T0 + 400
        lane_ops.undrain(led, fleet, "alpha", now=back, who="operator", reason="fixed")
        tick.run_once(led, fleet, now=back + 0.5)
        trips = governance.rollback_trips(led.conn, fleet, now=back + 1)
        assert not [t for t in trips if t.lane == "alpha" and t.trigger == "interactive_starvation"], trips
        later = back + fleet.settings.rollback.interactive_starvation_sec + 1
        trips = governance.rollback_trips(led.conn, fleet, now=later)  # still stuck 2 minutes after: evidence
        assert [t.trigger for t in trips if t.lane == "alpha"] == ["interactive_starvation"], trips

"""An operator's `lanectl drain` of a lane the supervisor drained takes that drain over (issue 15 item 1): the
state stays, the operator's drain event is recorded once, and nothing else (a graceful restart) takes it over."""
from __future__ import annotations

import json

from lanectl.ledger import lanes as lane_ops

T0 = 1_800_000_000.0


def drains(led) -> list[dict]:  # type: ignore[no-untyped-def]
    return [json.loads(r[0]) for r in led.conn.execute("SELECT data FROM events WHERE kind = 'drain' ORDER BY id")]


def test_an_operator_takes_over_the_supervisors_drain_once(led, fleet) -> None:  # type: ignore[no-untyped-def]
    assert lane_ops.drain(led, fleet, "alpha", now=T0, who=lane_ops.SUPERVISOR_ACTOR, reason="rollback: x")
    assert lane_ops.drained_by(led, "alpha") == lane_ops.SUPERVISOR_ACTOR
    # the supervisor again, or a caller that does not take over (a graceful restart): nothing changes
    assert not lane_ops.drain(led, fleet, "alpha", now=T0 + 1, who=lane_ops.SUPERVISOR_ACTOR, take_over=True)
    assert not lane_ops.drain(led, fleet, "alpha", now=T0 + 1, who="alice", reason="graceful restart: apply")
    assert lane_ops.drained_by(led, "alpha") == lane_ops.SUPERVISOR_ACTOR
    # the operator's own drain takes it over, once
    state = lane_ops.state_of(led, "alpha")
    assert lane_ops.drain(led, fleet, "alpha", now=T0 + 2, who="alice", reason="looking", take_over=True)
    assert lane_ops.state_of(led, "alpha") == state
    assert lane_ops.drained_by(led, "alpha") == "alice"
    assert not lane_ops.drain(led, fleet, "alpha", now=T0 + 3, who="bob", take_over=True)
    last = drains(led)[-1]
    assert last["actor"] == "alice" and last["taken_over"] == lane_ops.SUPERVISOR_ACTOR and last["previous"] == state
    assert len(drains(led)) == 2


def test_an_operators_drain_of_an_operators_drain_changes_nothing(led, fleet) -> None:  # type: ignore[no-untyped-def]
    assert lane_ops.drain(led, fleet, "alpha", now=T0, who="alice", take_over=True)
    assert not lane_ops.drain(led, fleet, "alpha", now=T0 + 1, who="bob", take_over=True)
    assert len(drains(led)) == 1

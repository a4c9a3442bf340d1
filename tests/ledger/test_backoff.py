"""Retries back off: the first re-queue is dispatched at once (failover), later ones wait longer each time."""
from __future__ import annotations

from lanectl.ledger import missions as ms
from lanectl.ledger import tick
from tests.ledger.conftest import T0


def dispatched(res: tick.TickResult) -> list[int]:
    return [d.mission for d in res.dispatches]


def test_first_retry_is_immediate_later_ones_back_off(led, fleet) -> None:  # type: ignore[no-untyped-def]
    m = ms.submit(led, fleet, cls="interactive", payload={"argv": ["x"]}, now=T0, max_attempts=5).mission.id
    assert dispatched(tick.run_once(led, fleet, now=T0)) == [m]
    ms.requeue_lane(led, ms.get(led, m).current_lane, "lane process exited", now=T0 + 1)
    assert dispatched(tick.run_once(led, fleet, now=T0 + 1)) == [m]  # attempt 2 at once
    ms.requeue_lane(led, ms.get(led, m).current_lane, "lane process exited", now=T0 + 2)
    backoff = fleet.settings.leases.retry_backoff_sec
    assert dispatched(tick.run_once(led, fleet, now=T0 + 2 + backoff / 2)) == []  # attempt 3 waits
    assert dispatched(tick.run_once(led, fleet, now=T0 + 2 + backoff)) == [m]
    ms.requeue_lane(led, ms.get(led, m).current_lane, "lane process exited", now=T0 + 10)
    assert dispatched(tick.run_once(led, fleet, now=T0 + 10 + 1.5 * backoff)) == []  # attempt 4 waits 2x
    assert dispatched(tick.run_once(led, fleet, now=T0 + 10 + 2 * backoff)) == [m]

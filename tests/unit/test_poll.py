"""lanectl.poll.until: the one poll-until-true loop of lanectl and its tests."""
from __future__ import annotations

import itertools

from lanectl.poll import until


def test_it_returns_the_first_value_that_is_done_and_tells_progress_before() -> None:
    counter = itertools.count(1)
    told: list[tuple[int, bool]] = []
    value = until(lambda: next(counter), 600, done=lambda n: n >= 3, interval=0.001,
                  progress=lambda v, left: told.append((v, 0 < left <= 600)))
    assert value == 3 and told == [(1, True), (2, True)]


def test_by_default_a_truthy_value_is_done() -> None:
    values = iter([None, "", [], {"ok": 1}])
    assert until(lambda: next(values), 600, interval=0.001) == {"ok": 1}


def test_at_the_deadline_it_looks_once_more_and_returns_the_last_value() -> None:
    """It never sleeps past the deadline (interval 600 s, timeout 0.5 s) and the look at the deadline counts:
    the caller tells a timeout by ``done`` not holding for what it gets back."""
    looks: list[int] = []

    def look() -> int:
        looks.append(1)
        return 0

    assert until(look, 0.5, interval=600) == 0
    assert len(looks) == 2


def test_a_condition_that_holds_at_the_deadline_is_no_timeout() -> None:
    looks = iter([False, True])
    assert until(lambda: next(looks), 0.5, interval=600) is True

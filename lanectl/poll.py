"""Poll until a condition holds: the one loop behind every wait of lanectl (--wait, drills, graceful restarts,
reloads, the client's ``wait``) and of its tests (tests/systemd/lanehelpers.wait_for).

Standard library only. The deadline is monotonic; the condition is always looked at once more when the deadline
has passed (a slow look cannot cause a spurious timeout), and the sleep never goes past the deadline.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def until(look: Callable[[], T], timeout: float, *, done: Callable[[T], object] = bool, interval: float = 0.1,
          progress: Callable[[T, float], None] | None = None) -> T:
    """Call ``look()`` until ``done(value)`` holds (by default: the value is truthy) or ``timeout`` seconds
    passed, and return the last value: the caller tells a timeout by ``done`` not holding for it and raises its
    own error. ``progress(value, seconds_left)`` is called after each look that was not done yet."""
    deadline = time.monotonic() + timeout
    while True:
        value = look()
        if done(value):
            return value
        left = deadline - time.monotonic()
        if left <= 0:
            return value
        if progress is not None:
            progress(value, left)
        time.sleep(min(interval, left))

"""What the parts of the supervisor share: its clock, the fleet, the ledger, what it knows of each lane.

Everything here is owned by the main loop's thread (HTTP threads read only ``lanes``' names and the clock); each
part gets the one :class:`Shared` and keeps its own state to itself.
"""
from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lanectl.config import LaneSet, Settings
from lanectl.ledger import Ledger


class Clock:
    """The supervisor's one clock: wall time as of its start plus the monotonic time since.

    Every duration and deadline the supervisor keeps (leases, retry backoff, aging, rollback windows, rate
    windows, budgets' days, settle and observe intervals, its own cadences) is measured on it, so a step of the
    wall clock (an NTP correction) changes nothing until the supervisor restarts; the timestamps it writes still
    read as wall time to people. ``wall`` and ``mono`` are injectable for tests."""

    def __init__(self, wall: Any = time.time, mono: Any = time.monotonic) -> None:
        self.wall = wall
        self.mono = mono
        self.base_wall = wall()
        self.base_mono = mono()

    def now(self) -> float:
        return self.base_wall + (self.mono() - self.base_mono)

    def follow(self, wall: Any) -> None:
        """Take ``wall`` as the wall clock from now on (a PostgreSQL ledger's ``Ledger.clock``: the database
        server's time), measured once more as the base: durations stay monotonic, timestamps read as its time."""
        self.wall = wall
        self.base_wall = wall()
        self.base_mono = self.mono()

    def skew(self) -> float:
        """How far the wall clock has moved away from this clock since the supervisor started (seconds)."""
        return self.wall() - self.now()


@dataclass
class LaneWatch:
    """What the supervisor knows of one lane from systemd, its pidfd and its health endpoint."""

    name: str
    unit: str
    port: int
    key: str
    health_path: str
    max_restarts: int
    enabled: bool
    active: str = "unknown"
    sub: str = ""
    main_pid: int = 0
    pidfd: int | None = None
    invocation: str = ""
    restarts: int = -1
    restart_times: deque[float] = field(default_factory=deque)
    unrecorded_restarts: int = 0
    """Restarts systemd counted (NRestarts) that no lane_invocation event carries yet."""
    healthy: bool = False
    health_recorded: bool = False
    """Whether this process has written the lane's health to the ledger yet (the ledger may hold an earlier
    process's verdict: the first observation always writes)."""
    recorded_invocation: str = ""
    """The invocation the ledger bound the lane's attempts to before this process started: the execution log to
    settle from when that invocation turns out to be gone."""
    healthy_since: float | None = None
    held: set[int] = field(default_factory=set)
    state: str = "active"  # the ledger's dispatch state (active, draining, drained, degraded, disabled)

    @property
    def running(self) -> bool:
        return self.active == "active" and self.sub == "running"


@dataclass
class Shared:
    """The state every part reads. ``dirty`` asks the loop for a policy pass this turn; ``full`` holds the lanes
    that refused a dispatch as full (429) or stopping (503), or reported no room, since their last health report:
    the policy gives them nothing until the next one says otherwise (no hot loop of 429s)."""

    clock: Clock
    fleet: LaneSet
    ledger_path: Path
    wake: Callable[[], None]
    use_systemd: bool = True
    ledger: Ledger | None = None
    lanes: dict[str, LaneWatch] = field(default_factory=dict)
    full: set[str] = field(default_factory=set)
    counters: dict[str, int] = field(default_factory=lambda: {"dispatched": 0, "callbacks": 0, "rejected": 0,
                                                              "dispatch_failed": 0, "failovers": 0})
    dirty: bool = True

    @property
    def settings(self) -> Settings:
        return self.fleet.settings

    @property
    def db(self) -> Ledger:
        """The open ledger (the loop opens it before any part runs)."""
        assert self.ledger is not None, "the supervisor's ledger is not open"
        return self.ledger

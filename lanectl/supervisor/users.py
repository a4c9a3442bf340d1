"""Who is calling: each lane's uid (its unit's User=), for the callback socket (SO_PEERCRED) and for the owner
of the lane's execution log. Read by HTTP threads and the main loop."""
from __future__ import annotations

import pwd
import time

from lanectl.supervisor.shared import Shared

UID_RESOLVE_S = 5.0
"""A uid no lane has is looked up again at most this often (a lane user created since)."""


class LaneUsers:
    def __init__(self, shared: Shared, fixed: dict[str, int] | None = None) -> None:
        """``fixed`` (lane -> uid) replaces the lane users' uids: for in-process tests only."""
        self.shared = shared
        self.fixed = fixed
        self.uids: dict[str, int] = dict(fixed or {})
        self.resolved_at = 0.0

    def resolve(self) -> None:
        """Each lane's uid (config.py keeps them unique per lane). A lane whose user does not exist (yet) has
        none, and no callback is accepted for it."""
        self.resolved_at = time.monotonic()
        if self.fixed is not None:
            return
        out = {}
        for name, lane in self.shared.fleet.lanes.items():
            try:
                out[name] = pwd.getpwnam(lane.resolved_user(name)).pw_uid
            except KeyError:
                pass
        self.uids = out

    def lanes_of(self, uid: int) -> set[str]:
        """The lanes whose callbacks a peer running as ``uid`` may send (none: refused before reading the body)."""
        found = {name for name, u in self.uids.items() if u == uid}
        if not found and time.monotonic() - self.resolved_at >= UID_RESOLVE_S:  # a lane user created since
            self.resolve()
            found = {name for name, u in self.uids.items() if u == uid}
        return found

    def uid_of(self, name: str) -> int | None:
        """The uid of the lane's user, who owns its workspace and everything its runtime writes there."""
        if name not in self.uids and self.fixed is None:
            self.resolve()  # a lane user created since
        return self.uids.get(name)

    def forget(self, name: str) -> None:
        self.uids.pop(name, None)

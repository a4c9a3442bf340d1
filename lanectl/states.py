"""The vocabulary of missions and lanes, defined once: mission classes, mission states, lane (dispatch) states.

Everything else imports these names; tests/test_layers.py fails when a second literal tuple, list or set of
them appears in another module of lanectl (or of the tests). The ledger's CHECK constraints (lanectl/ledger/
schema.py: migrations, frozen once released) spell the same values in SQL; a test checks they agree.

Plain tuples and no imports: the fast start-up paths (status, probe, missions) load this module.
"""
from __future__ import annotations

from typing import Final

CLASSES: Final = ("interactive", "deadline", "background")
"""Mission classes, in dispatch priority order (``interactive > deadline > background``)."""
RANK: Final = {c: i for i, c in enumerate(CLASSES)}
"""A class's priority rank: 0 is served first (the ledger's ``missions.rank``)."""
CLASS_NAMES: Final = f"{', '.join(CLASSES[:-1])} or {CLASSES[-1]}"
"""The classes in a sentence: ``interactive, deadline or background``."""

MISSION_STATES: Final = ("queued", "dispatched", "running", "succeeded", "failed", "cancelled", "expired", "dead")
"""Every state of a mission (``missions.state``)."""
ACTIVE: Final = ("dispatched", "running")
"""A mission a lane holds: an attempt is in flight."""
UNFINISHED: Final = ("queued", *ACTIVE)
"""A mission that can still run (queued or in flight)."""
FINISHED: Final = ("succeeded", "failed", "cancelled", "expired", "dead")
"""A mission that will never run again."""
ENDS: Final = ("succeeded", "failed", "dead", "cancelled", "expired", "requeued")
"""Events that end an attempt or a mission (``requeued``: the attempt ended, the mission did not)."""

LANE_STATES: Final = ("active", "draining", "drained", "degraded", "disabled")
"""The ledger's dispatch states of a lane (``lanes.state``)."""
AVAILABLE: Final = "active"
"""The one lane state in which a lane takes new work as a primary."""
HELD: Final = ("draining", "drained")
"""Lane states an operator (or lanectl itself) put a lane in to keep new work away from it."""

HOST_STATES: Final = ("up", "stopped", "dead", "forgotten")
"""The states of a host's record (``hosts.state``, issue 13): ``up`` while its supervisor runs (renewing its lease),
``stopped`` when that supervisor closed cleanly (its lanes stay its own: it comes back), ``dead`` when another host
found its lease run out and took its work back (``lanectl.ledger.hosts.reap``), ``forgotten`` after ``lanectl host
forget``."""
RELEASED: Final = ("dead", "forgotten")
"""The host states in which a host's lanes may be claimed by another host."""

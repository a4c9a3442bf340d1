"""The supervisor: dispatches missions to lanes, takes their callbacks, watches them, and fails over.

One thread owns the ledger and decides (the main loop, :mod:`lanectl.supervisor.loop`); HTTP handler threads only
parse and hand callbacks to it; a small pool sends dispatches. The parts, one module each, each holding its own
state and reading what they share from :class:`lanectl.supervisor.shared.Shared`:

- ``shared``      the clock (wall time at start + monotonic since: wall-clock steps change nothing), the fleet, the
                  ledger, what is known of each lane (:class:`LaneWatch`), the lanes that are full, counters;
- ``loop``        :class:`Supervisor`: open, reload (SIGHUP), close, and the main loop, whose turn takes ``now``;
- ``callbacks``   callbacks handed over by HTTP threads, applied in one transaction per turn (group commit);
- ``dispatcher``  the policy pass, the dispatch POSTs and their results, cancels forwarded to lanes;
- ``watch``       lane processes (pidfds), systemd's unit state (D-Bus), health endpoints, reconciliation after
                  a restart, settling from a dead lane's execution log;
- ``health``      a lane's healthy flag, degradation (failed unit, restart storm) and recovery;
- ``rollback``    the governance triggers: drain and reroute a tripped lane, or an ``alert``;
- ``history``     roll-ups of closed buckets and retention passes;
- ``server``      the callback socket (SO_PEERCRED) and the read-only TCP listener (/healthz, /metrics);
- ``metrics``     the /metrics cache and this process's refusal counters;
- ``users``       each lane's uid (who may send its callbacks, who owns its execution log).

SIGHUP (``systemctl reload``, which ``lanectl install`` and ``apply`` send after a change) re-reads the
configuration between two turns: lanes added start being watched and get work, lanes removed stop (what was in
flight on one is re-queued), every other lane's missions run on untouched. ``RELOADING=1`` ... ``READY=1`` bracket
it; a configuration that does not load leaves the previous one running (logged, ``reload_error`` in /healthz).

Side effects (POSTs) happen only after the assignment committed; a supervisor killed between the two leaves
attempts that the lane never got, which its restart reconciles against each lane's ``/healthz`` (repeatedly, for
RECONCILE_FOR_S). A restart forgives the outage: every lease runs from the supervisor's return.

``python -m lanectl.supervisor [OPTIONS]`` is ``lanectl supervise [OPTIONS]``.
"""
from __future__ import annotations

from lanectl.supervisor.callbacks import REJECTED_BURST, REJECTED_PER_S, Pending
from lanectl.supervisor.loop import Supervisor, bound_settings
from lanectl.supervisor.server import SOCKET_PER_PEER
from lanectl.supervisor.shared import Clock, LaneWatch

__all__ = ["REJECTED_BURST", "REJECTED_PER_S", "SOCKET_PER_PEER", "Clock", "LaneWatch", "Pending", "Supervisor",
           "bound_settings"]

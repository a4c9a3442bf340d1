"""This host's record in the ledger (issue 13): registration at start, the lease renewed, self-fencing.

At start the supervisor registers its host under a new random *incarnation* and claims the lanes of its
``lanes.d/`` (``lanectl.ledger.hosts.register``; a lane another host owns ends the start with exit 3). Every turn
that reaches the ledger renews the lease when ``[hosts] lease_sec / 3`` has passed since the last renew, before
the policy pass. The policy pass is skipped (the host claims no new work; everything else goes on: callbacks are
applied, lanes run what they hold, cancels are forwarded) while :meth:`HostLease.fenced`:

- the last successful renew is ``lease_sec - margin`` old or older on the loop's clock (a monotonic clock), so the
  host stops claiming before its lease in the ledger can run out (it could not renew: the ledger is unreachable,
  or the loop was frozen); the next successful renew lifts it (``host_unfenced``);
- or a renew found another incarnation in the host's record, or the record forgotten or stopped: another
  supervisor runs under this host's name, or an operator forgot the host. That lasts until this supervisor
  restarts (it then registers a new incarnation, and is refused lanes that moved meanwhile);
- or the record names this incarnation ``dead``: another host reaped it while it could not renew (frozen, cut off
  from the database). Then the supervisor exits (5, ``host_reaped``, :attr:`HostLease.reaped`) and systemd starts
  it again as a new incarnation.

After this supervisor's own ledger outage (or a start that had to wait for the ledger) it reaps no one for
``lease_sec`` plus the slowest retry of a supervisor in an outage: the database may have been down for every host.

Times are the loop's ``now`` (the supervisor's clock, which follows the ledger's clock on PostgreSQL), so a test
drives the fence with chosen ``now`` values.
"""
from __future__ import annotations

import json
import logging
import os
import secrets
from pathlib import Path

from collections.abc import Mapping
from typing import Any

from lanectl.ledger import hosts, tick
from lanectl.supervisor.shared import Shared

log = logging.getLogger("lanectl.supervisor")
REAP_EVERY_S = 1.0
"""PostgreSQL: how often a live, unfenced host looks for hosts whose lease has run out (``hosts.reap``): a lost
host's work is re-queued within its lease plus this."""
BOOT_ID = Path("/proc/sys/kernel/random/boot_id")


def boot_id() -> str:
    """This boot of the machine (a new one after every reboot), or ``unknown`` where the kernel does not say."""
    try:
        return BOOT_ID.read_text().strip() or "unknown"
    except OSError:
        return "unknown"


MACHINE_ID_FILE = "machine-id"
"""In the supervisor's state directory: this machine's id as lanectl knows it (``machine_id``)."""


def machine_id(state_dir: str | Path) -> str:
    """A random id for this machine, made at the supervisor's first start and kept in its state directory (which
    no other machine shares): what tells a restart of this host's supervisor from a second machine started under
    the same host name (``hosts.register``). Not ``/etc/machine-id``: cloned images share it, and a rebuilt
    machine with a new one would look like a stranger to its own record."""
    from lanectl.fsutil import atomic_write, read_text_or_none

    path = Path(state_dir) / MACHINE_ID_FILE
    known = (read_text_or_none(path) or "").strip()
    if len(known) == 32 and all(c in "0123456789abcdef" for c in known):
        return known
    made = secrets.token_hex(16)
    atomic_write(path, made + "\n", mode=0o644)
    return made


class HostLease:
    def __init__(self, shared: Shared) -> None:
        self.shared = shared
        self.incarnation = secrets.token_hex(16)
        """New on every supervisor start (this object's life)."""
        self.last_renew = float("-inf")
        """The loop's clock when the last successful renew (or the registration) began."""
        self.fenced_since: float | None = None
        self.fence_recorded = False
        self.fence_reason: str | None = None
        """Why the host is fenced, as said when it fenced itself (None: it is not)."""
        self.superseded: str | None = None
        """Why this incarnation lost its record for good (None: it holds it)."""
        self.last_reap = float("-inf")
        self.reap_from = float("-inf")
        """No reaping before this (the loop's clock): after this supervisor's own ledger outage, every other host
        gets a lease to renew first (:meth:`ledger_back`)."""
        self.reaped = False
        """The ledger declared this incarnation dead (another host reaped it while it could not renew: frozen, cut
        off from the database): the supervisor exits so that systemd starts it again as a new incarnation."""
        self.name = shared.settings.host
        """The host's name, taken once at start (a reload cannot change it: ``bound_settings``)."""


    @property
    def lease_sec(self) -> float:
        return self.shared.settings.hosts.lease_sec

    def exclusive(self) -> bool:
        """An SQLite ledger: one host's file (the ledger lock keeps a second supervisor out), so lanes recorded for
        another host name are this machine's, renamed."""
        return not isinstance(self.shared.ledger_path, str)

    def register(self, now: float) -> None:
        """At start: a new incarnation, the lease, this host's lanes (``lane_owned_by_other_host``, exit 3)."""
        old = hosts.register(self.shared.db, self.name, self.incarnation, boot_id(), os.getpid(), now,
                             self.lease_sec, sorted(self.shared.fleet.lanes), exclusive=self.exclusive(),
                             specs=self.specs(self.shared.fleet.lanes),
                             machine=None if self.exclusive() else machine_id(self.shared.settings.state_dir))
        self.last_renew = now
        log.info("host %s: incarnation %s%s, lease %gs", self.name, self.incarnation[:8],
                 "" if old is None else f" (was {old.incarnation[:8]}, {old.state})", self.lease_sec)

    def started(self, now: float) -> None:
        """The loop's first ``now``: the lease counts from it (the registration's time is the same instant)."""
        self.last_renew = now

    def claim(self, lanes: list[str], now: float, configs: Mapping[str, Any] | None = None) -> None:
        """A reload: this host owns exactly ``lanes`` from now on (refused like a start); ``configs``, the lanes'
        new configuration (``lanectl.config.Lane`` by name), is published for other hosts' passes."""
        hosts.claim(self.shared.db, self.name, self.incarnation, lanes, now=now, exclusive=self.exclusive(),
                    specs=None if configs is None else self.specs(configs))

    @staticmethod
    def specs(lanes: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
        """What other hosts' policy passes need of each of this host's lanes (``lanes.spec`` in the ledger)."""
        return {name: tick.lane_spec(name, lane) for name, lane in lanes.items()}

    def fence_at(self) -> float:
        """From when on (the loop's clock) the host claims nothing unless it renews first."""
        s = self.shared.settings.hosts
        return self.last_renew + s.lease_sec - s.fence_margin_s()

    def fence_began(self) -> float | None:
        """When the current fence began on the loop's clock: for want of a renewal, the moment the lease stopped
        allowing claims (``fence_at``: a frozen supervisor notices only when it runs again, but it claimed nothing
        after it); otherwise when it was noticed."""
        if self.fenced_since is None:
            return None
        return self.fenced_since if self.superseded is not None else min(self.fenced_since, self.fence_at())

    def fenced(self, now: float) -> bool:
        return self.superseded is not None or now >= self.fence_at()

    def check(self, now: float) -> bool:
        """Note (and log once) when the host fences itself; every turn, the ledger reachable or not."""
        if self.fenced(now) and self.fenced_since is None:
            self.fenced_since = now
            self.fence_recorded = False
            self.fence_reason = self.why(now)
            log.warning("host %s fenced: %s; claiming no new work until %s", self.name, self.fence_reason,
                        "the supervisor restarts" if self.superseded else "the lease is renewed")
        return self.fenced_since is not None

    def why(self, now: float) -> str:
        if self.superseded is not None:
            return self.superseded
        return (f"no lease renewal for {now - self.last_renew:.1f}s (lease {self.lease_sec:g}s, margin "
                f"{self.shared.settings.hosts.fence_margin_s():g}s)")

    def next_renew(self) -> float:
        return self.last_renew + self.shared.settings.hosts.renew_every_s()

    def next_due(self) -> float:
        """The next renewal, or (PostgreSQL, unfenced) the next look for lost hosts, on the loop's clock."""
        due = self.next_renew()
        if not self.exclusive() and self.superseded is None:
            due = min(due, max(self.last_reap + REAP_EVERY_S, self.reap_from))
        return due

    def maybe_reap(self, now: float) -> None:
        """PostgreSQL, while this host holds its lease: every REAP_EVERY_S, declare dead the hosts whose lease ran
        out and re-queue their lanes' work (the policy pass that follows in this turn can take it). SQLite has one
        host: nothing to reap."""
        if self.exclusive() or self.fenced(now) or now - self.last_reap < REAP_EVERY_S or now < self.reap_from:
            return
        self.last_reap = now
        for dead in hosts.reap(self.shared.db, now, by=self.name):
            log.warning("host %s declared dead (its lease ran out, incarnation %s): %d missions of its lanes %s "
                        "re-queued or dead", dead["host"], dead["incarnation"][:8], len(dead["missions"]),
                        ", ".join(dead["lanes"]) or "(none)")
            self.shared.dirty = True

    def ledger_back(self, now: float, slowest_retry_s: float) -> None:
        """This supervisor reaches the ledger again after an outage. The outage may have been the database's own,
        which every host saw: their leases ran out in the ledger too, and each notices the database is back at its
        next try (up to ``slowest_retry_s`` later). Reaping them now would declare dead hosts that are alive and
        merely slower to reconnect, losing the work their lanes still run; so this host reaps no one until
        ``lease_sec + slowest_retry_s`` from now, by which time every live host has renewed (docs/multihost.md,
        "Database outage")."""
        self.reap_from = now + self.lease_sec + slowest_retry_s

    def maybe_renew(self, now: float) -> None:
        """In a turn that reaches the ledger, before the policy pass: renew when due (or while fenced); a fence
        not yet recorded gets its ``host_fenced`` event first."""
        self.check(now)
        if self.fenced_since is not None and not self.fence_recorded:
            hosts.record_fenced(self.shared.db, self.name, self.incarnation, now, self.fence_reason or "",
                                since=self.fence_began())
            self.fence_recorded = True
        if self.superseded is not None or (now < self.next_renew() and self.fenced_since is None):
            return
        fenced_for = None if self.fenced_since is None else now - self.fenced_since
        if hosts.renew(self.shared.db, self.name, self.incarnation, now, self.lease_sec, unfenced_after=fenced_for,
                       lane_units=self.lane_units()):
            self.last_renew = now
            if self.fenced_since is not None:
                log.warning("host %s unfenced after %.1fs: lease renewed", self.name, fenced_for)
                self.fenced_since = self.fence_reason = None
            return
        self.lost(now)

    def lane_units(self) -> str:
        """What this supervisor last saw of its lanes' units (systemd's state, main PID, restarts; the health
        flag), written with each renewal so that other hosts' ``status`` can show it (``hosts.lane_units``)."""
        return json.dumps({n: {"unit": f"{w.active}/{w.sub}" if w.sub else w.active, "pid": w.main_pid or None,
                               "restarts": max(w.restarts, 0), "healthy": w.healthy}
                           for n, w in sorted(self.shared.lanes.items())}, sort_keys=True, separators=(",", ":"))

    def turn(self, now: float) -> None:
        """A turn that reaches the ledger, before anything else of it: renew when due, then look for lost hosts."""
        self.maybe_renew(now)
        self.maybe_reap(now)

    def lost(self, now: float) -> None:
        """The host's record is not this incarnation's any more (a renewal or a policy pass found it): fenced
        until the supervisor restarts, with a ``host_fenced`` event."""
        cur = hosts.get(self.shared.db.conn, self.name)
        self.reaped = cur is not None and cur.incarnation == self.incarnation and cur.state == "dead"
        self.superseded = ("the host's record is gone" if cur is None else
                           f"the host's record names incarnation {cur.incarnation[:8]} ({cur.state}), not this "
                           f"supervisor's {self.incarnation[:8]}" if cur.incarnation != self.incarnation else
                           "another host declared this host dead: its lease ran out" if self.reaped else
                           f"the host's record is {cur.state}")
        log.error("host %s: this supervisor lost the host's record: %s; it claims no new work (%s)", self.name,
                  self.superseded, "it exits, to start again as a new incarnation" if self.reaped else "restart it")
        self.fenced_since, self.fence_recorded = None, False
        self.check(now)
        hosts.record_fenced(self.shared.db, self.name, self.incarnation, now, self.fence_reason or "")
        self.fence_recorded = True

    def stop(self, now: float) -> None:
        """A clean stop: the record becomes ``stopped`` (if this incarnation still holds it)."""
        if self.superseded is None:
            hosts.stop(self.shared.db, self.name, self.incarnation, now)

"""History upkeep: roll-ups of closed 5-minute buckets (every ROLLUP_EVERY_S, sooner while catching up) and, with
``[ledger] retention`` set, retention passes every ``prune_every`` (the first RETENTION_FIRST_S after start) in a
thread with its own connection, in short transactions the loop's own interleave with."""
from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Any

from lanectl.errors import LanectlError
from lanectl.ledger import Error as LedgerError
from lanectl.ledger import Ledger, rollups
from lanectl.supervisor.shared import Shared

log = logging.getLogger("lanectl.supervisor")
ROLLUP_EVERY_S = 10.0
"""How often the supervisor rolls closed 5-minute buckets up (every 0.5 s while it is catching up)."""
ROLLUP_CATCHUP_S = 0.5
RETENTION_FIRST_S = 60.0
"""The first retention pass runs this long after start (not in the middle of a restart's reconciliation)."""


class History:
    def __init__(self, shared: Shared) -> None:
        self.shared = shared
        self.next_rollup = float("-inf")
        self.next_prune = float("inf")  # set by start()
        self.pruning: threading.Thread | None = None
        self.last_prune: dict[str, Any] | None = None

    def start(self, now: float) -> None:
        self.next_prune = now + RETENTION_FIRST_S

    def maybe_roll_up(self, now: float) -> None:
        if now >= self.next_rollup:
            self.roll_up(now)

    def roll_up(self, now: float) -> int:
        """Roll closed buckets of traffic up for report and long metrics windows: a couple per turn, each turn
        a short write transaction, so a ledger with a long history catches up without holding callbacks."""
        try:
            with self.shared.db.transaction() as conn:
                rolled = rollups.roll_up(conn, now)
        except (LedgerError, LanectlError) as exc:
            log.warning("rolling metrics up failed (report reads raw events meanwhile): %s", exc)
            rolled = 0
        self.next_rollup = now + (ROLLUP_CATCHUP_S if rolled else ROLLUP_EVERY_S)
        return rolled

    def maybe_prune(self, now: float) -> threading.Thread | None:
        """Start a retention pass in a thread when ``[ledger] retention`` is set, one is due and none is running."""
        led = self.shared.settings.ledger
        if led.retention is None or now < self.next_prune or (self.pruning and self.pruning.is_alive()):
            return None
        from lanectl.config import duration_s

        self.next_prune = now + duration_s(led.prune_every)

        def run() -> None:
            try:
                self.retention_pass(now)
            except Exception:  # a failed pass is logged and tried again at the next one; nothing was lost
                log.exception("retention pass failed")

        self.pruning = threading.Thread(target=run, name="retention", daemon=True)
        self.pruning.start()
        return self.pruning

    def retention_pass(self, now: float) -> Any:
        """Archive and delete finished history older than ``[ledger] retention`` (lanectl.ledger.retention.prune)
        into ``[ledger] archive_dir`` (default STATE_DIR/archive, created 0700), through a connection of its own.
        Returns the PruneResult, None when retention is off."""
        from lanectl.ledger import retention

        settings = self.shared.settings
        keep = settings.ledger.retention_s()
        if keep is None:
            return None
        where = Path(settings.ledger.archive_dir or Path(settings.state_dir) / "archive")
        where.mkdir(mode=0o700, parents=True, exist_ok=True)
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(now))
        with Ledger.open(self.shared.ledger_path, synchronous=settings.ledger.synchronous, migrate=False) as led:
            res = retention.prune(led, cutoff=now - keep, archive=where / f"ledger-{stamp}.jsonl.gz", now=now,
                                  actor="supervisor")
        self.last_prune = res.as_dict()
        if res.archive is not None:
            log.info("retention: archived %d missions, %d attempts, %d events older than %s to %s; ledger %d -> %d "
                     "bytes", res.missions, res.attempts, res.events, settings.ledger.retention, res.archive,
                     res.file_bytes_before, res.file_bytes_after)
        return res

"""Incident snapshots: everything an operator needs to look at later, captured at once and written atomically.

A snapshot is a directory ``snapshot-YYYYmmddTHHMMSSZ-LANE`` holding ``meta.json``, ``status.json`` (systemd and
health of every lane), ``units/`` (``systemctl cat`` of each unit), ``events.ndjson`` (the last hour, or the
lane's), ``metrics.json``, ``journal-UNIT.txt`` (where journald runs) and ``ledger-check.txt`` (``PRAGMA
integrity_check``). It is built in a hidden temporary directory next to its final place and renamed into place, so
a reader never sees half a snapshot.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from lanectl import __version__, systemd
from lanectl.config import LaneSet
from lanectl.fsutil import fsync_dir
from lanectl.ledger import Error as LedgerError
from lanectl.ledger import Ledger, reads
from lanectl.units import SUPERVISOR, unit_name

EVENTS_WINDOW_S = 3600.0
JOURNAL_LINES = 300


def _write(path: Path, data: str) -> None:
    path.write_text(data)


def _json(obj: Any) -> str:
    return json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n"


def final_path(out: Path, lane: str | None, now: float) -> Path:
    stamp = datetime.fromtimestamp(now, timezone.utc).strftime("%Y%m%dT%H%M%S") + f"{int(now * 1000) % 1000:03d}Z"
    return out / f"snapshot-{stamp}-{lane or 'fleet'}"


def capture(fleet: LaneSet, ledger_path: Path, out: Path, *, lane: str | None = None, reason: str | None = None,
            actor: str | None = None, now: float | None = None) -> Path:
    now = time.time() if now is None else now
    if lane is not None:
        fleet.get(lane)
    final = final_path(out, lane, now)
    stamp = final.name.split("-")[1]
    tmp = out / f".{final.name}.tmp"
    out.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(mode=0o750)
    try:
        problems: list[str] = []
        _write(tmp / "meta.json", _json({"at": now, "at_utc": stamp, "lane": lane, "reason": reason, "actor": actor,
                                         "host": socket.gethostname(), "lanectl": __version__,
                                         "ledger": str(ledger_path), "config_dir": str(fleet.config_dir)}))
        units = [unit_name(n) for n in sorted(fleet.lanes)] + [SUPERVISOR]
        _status(fleet, tmp, problems)
        _units(units, tmp, problems)
        _ledger(ledger_path, lane, now, tmp, problems, fleet)
        _journal(units if lane is None else [unit_name(lane), SUPERVISOR], tmp, problems)
        _write(tmp / "problems.txt", "\n".join(problems) + ("\n" if problems else ""))
        fsync_dir(tmp)
        os.rename(tmp, final)
        fsync_dir(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


@dataclass
class Snapshot:
    """A snapshot written: its directory and what could not be captured (``problems.txt``, one line each)."""

    path: Path
    problems: list[str]

    def as_dict(self) -> dict[str, Any]:
        return {"path": str(self.path), "problems": self.problems, "changed": True}


def take(*, lane: str | None = None, out: str | Path | None = None, reason: str | None = None,
         config_dir: str | None = None, ledger: str | None = None) -> Snapshot:
    """``lanectl snapshot``: ``capture`` into ``out`` (default STATE_DIR/snapshots) as the operator running it,
    then record a ``snapshot`` event; a ledger that cannot take the event does not undo the snapshot (that it
    could not be read is one of the things the snapshot records)."""
    from lanectl import config
    from lanectl.errors import LanectlError
    from lanectl.ledger import lanes as lane_ops
    from lanectl.ledger.events import EventKind

    fleet = config.load(config_dir)
    path = config.ledger_path(fleet, ledger)
    target = Path(out) if out else Path(fleet.settings.state_dir) / "snapshots"
    who = lane_ops.actor()
    made = capture(fleet, path, target, lane=lane, reason=reason, actor=who)
    try:
        with config.open_ledger(fleet, path) as led:
            lane_ops.record(led, EventKind.SNAPSHOT, now=led.clock(), lane=lane, path=str(made), reason=reason,
                            actor=who)
    except LanectlError:
        pass  # the snapshot is the point; an unwritable ledger is one of the things it records
    return Snapshot(made, (made / "problems.txt").read_text().splitlines())


def _status(fleet: LaneSet, tmp: Path, problems: list[str]) -> None:
    from lanectl.install import manifest
    from lanectl.status import collect

    m = manifest(fleet)
    try:
        rows = collect(m["lanes"], None, m["supervisor"])
        _write(tmp / "status.json", _json([r.as_dict() for r in rows]))
    except Exception as exc:  # a snapshot is taken when things are broken: record, do not fail
        problems.append(f"status: {exc}")


def _units(units: list[str], tmp: Path, problems: list[str]) -> None:
    d = tmp / "units"
    d.mkdir()
    if not systemd.available():
        problems.append("units: systemd is not running here")
        return
    for u in units:
        proc = subprocess.run(["systemctl", "cat", "--no-pager", u], capture_output=True, text=True, timeout=30)
        _write(d / f"{u}.txt", proc.stdout + (f"\n# systemctl cat: {proc.stderr}" if proc.returncode else ""))


def _ledger(path: Path, lane: str | None, now: float, tmp: Path, problems: list[str], fleet: LaneSet) -> None:
    try:
        conn = Ledger.open_readonly(path, timeout_s=5)
        try:
            check = reads.integrity_check(conn)
            _write(tmp / "ledger-check.txt", "\n".join(check) + "\n")
            since = now - EVENTS_WINDOW_S
            with open(tmp / "events.ndjson", "w") as fh:
                for row in reads.window_events(conn, since, lane, since):
                    keys = ("id", "at", "kind", "mission", "lane", "session", "attempt", "state")
                    doc = dict(zip(keys, row[:8]))
                    doc["data"] = json.loads(row[8] or "{}")
                    fh.write(json.dumps(doc, sort_keys=True) + "\n")
            _write(tmp / "metrics.json", _json(_metrics(conn, fleet, lane, now)))
        finally:
            conn.close()
    except (LedgerError, OSError, ValueError) as exc:
        problems.append(f"ledger {path}: {exc}")


def _metrics(conn: Ledger, fleet: LaneSet, lane: str | None, now: float) -> dict[str, Any]:
    from lanectl import evidence

    return evidence.metrics_conn(conn, window_s=EVENTS_WINDOW_S, now=now, lane=lane, fleet=fleet)


def _journal(units: list[str], tmp: Path, problems: list[str]) -> None:
    if not Path("/run/systemd/journal/socket").exists():
        problems.append("journal: journald is not running here")
        return
    for u in units:
        proc = subprocess.run(["journalctl", "--no-pager", "-n", str(JOURNAL_LINES), "-u", u], capture_output=True,
                              text=True, timeout=30)
        _write(tmp / f"journal-{u}.txt", proc.stdout or proc.stderr)

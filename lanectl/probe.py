"""`lanectl probe`: one check for cron and monitoring, in the monitoring-plugins convention.

Exit 0 OK, 1 WARNING, 2 CRITICAL, 3 UNKNOWN; one status line with perfdata::

    LANECTL CRITICAL - alpha down (failed) | lanes_up=2;;;0;3 supervisor_up=1;;;0;1 ...

A lane that should run (enabled, not drained or draining) but is down or failed is CRITICAL, and so is a
supervisor that is down; a degraded or unhealthy lane is a WARNING, and so is a supervisor whose last reload failed
(it runs on with its previous configuration), and so is a lane unit installed with no lane (its lane file deleted
by hand: enabled or running, with no drop-in). A lane that lanectl itself took out of service
(the supervisor's rollback drained it) is CRITICAL until an operator acts (``undrain``, or ``drain`` to take the
drain over); a lane an operator drained is not an alarm, unless systemd gave up on its unit meanwhile (WARNING). A
ledger or systemd that cannot be read is UNKNOWN. The queue (age of the oldest queued interactive mission) and the failure
rate over ``probe.window_sec`` are checked against the thresholds in lanectl.toml ``[probe]``.

It runs every minute, so it starts without typer or pydantic (the install manifest carries what it needs) and
reads the ledger read-only with indexed queries only.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NamedTuple

if TYPE_CHECKING:
    from pathlib import Path

    from lanectl.ledger import Ledger
    from lanectl.ledger.reads import Source

OK, WARNING, CRITICAL, UNKNOWN = 0, 1, 2, 3
NAMES = {OK: "OK", WARNING: "WARNING", CRITICAL: "CRITICAL", UNKNOWN: "UNKNOWN"}


@dataclass(slots=True, frozen=True)
class Check:
    """One verdict of the probe: an entry of ``checks`` in ``probe --json`` (``name``, ``status``, ``text``)."""

    name: str
    code: int
    """OK, WARNING, CRITICAL or UNKNOWN; rendered as its name (``status``)."""
    text: str

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "status": NAMES[self.code], "text": self.text}


class Perf(NamedTuple):
    """One perfdata figure: ``label=value;warn;crit;min;max`` in the status line, an entry of ``perfdata`` in
    ``probe --json`` (None: left empty). A named tuple: it compares equal to the plain tuple it was."""

    label: str
    value: float
    warn: Any = None
    crit: Any = None
    min: Any = None
    max: Any = None

    def as_dict(self) -> dict[str, Any]:
        return {"value": self.value, "warn": self.warn, "crit": self.crit, "min": self.min, "max": self.max}

    def text(self) -> str:
        return (f"{self.label}={_fmt(self.value)};{_fmt(self.warn)};{_fmt(self.crit)};{_fmt(self.min)};"
                f"{_fmt(self.max)}")


@dataclass(slots=True)
class ProbeResult:
    """The checks and perfdata of one probe; ``as_dict`` is the ``data`` of ``probe --json``: ``status``,
    ``code``, ``line``, ``checks`` (Check), ``perfdata`` (Perf, by label)."""

    checks: list[Check] = field(default_factory=list)
    perf: list[Perf] = field(default_factory=list)

    @property
    def code(self) -> int:
        codes = {c.code for c in self.checks}
        for code in (CRITICAL, UNKNOWN, WARNING):  # a known outage outranks what could not be read
            if code in codes:
                return code
        return OK

    def add(self, name: str, code: int, text: str) -> None:
        self.checks.append(Check(name, code, text))

    def line(self) -> str:
        bad = [c.text for c in self.checks if c.code != OK]
        summary = "; ".join(bad) if bad else "; ".join(c.text for c in self.checks if c.name in ("lanes", "supervisor"))
        perf = " ".join(p.text() for p in self.perf)
        return f"LANECTL {NAMES[self.code]} - {summary}" + (f" | {perf}" if perf else "")

    def as_dict(self) -> dict[str, Any]:
        return {"status": NAMES[self.code], "code": self.code, "line": self.line(),
                "checks": [c.as_dict() for c in self.checks],
                "perfdata": {p.label: p.as_dict() for p in self.perf}}


def _fmt(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.3f}".rstrip("0").rstrip(".")
    return str(v)


def _ledger(path: str) -> Ledger:
    """Read-only; raises FileNotFoundError for no file, ``lanectl.ledger.Error`` for a file that is no ledger."""
    from lanectl.ledger import Ledger  # here: importing lanectl.probe stays as cheap as it was (docs/benchmarks.md)

    return Ledger.open_readonly(path, timeout_s=2.0, must_exist=True, check=True)


SUPERVISOR_ACTOR = "lanectl-supervisor"
"""The ``actor`` of what the supervisor does by itself (a rollback's drain, a degrade)."""


def lane_views(conn: Source) -> dict[str, dict[str, Any]]:
    """Each lane's dispatch state as the ledger has it: state, since, promoted weight (None: its lane file's), and
    for a draining or drained lane who drained it and why (``automatic``: the supervisor did, by a rollback)."""
    out: dict[str, dict[str, Any]] = {}
    from lanectl.ledger import reads

    for name, state, weight, since in reads.lane_rows(conn):
        view: dict[str, Any] = {"state": state, "since": since, "weight": weight}
        if state in ("draining", "drained"):
            row = reads.last_drain(conn, name)
            at, who, why = row if row else (None, None, None)
            view.update(drained_at=at, drained_by=who, drain_reason=why, automatic=who == SUPERVISOR_ACTOR)
        out[name] = view
    return out


def read_lane_views(path: str) -> dict[str, dict[str, Any]]:
    """``lane_views`` from the ledger file, read-only (raises OSError or lanectl.ledger.Error when it cannot be
    read)."""
    conn = _ledger(path)
    try:
        return lane_views(conn)
    finally:
        conn.close()


def read_fleet(path: str) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
    """``lane_views`` and the fleet as the ledger has it (``lanectl.ledger.fleetview.view``, at the ledger's
    clock: on PostgreSQL the database server's, as the hosts' leases are), in one read-only opening."""
    from lanectl.ledger import fleetview

    conn = _ledger(path)
    try:
        return lane_views(conn), fleetview.view(conn, conn.clock())
    finally:
        conn.close()


def run(manifest: dict[str, Any], lanes: list[str] | None = None, now: float | None = None,
        unit_dir: Path | None = None) -> ProbeResult:
    from lanectl.errors import LanectlError
    from lanectl.ledger import Error as LedgerError
    from lanectl.status import collect

    now = time.time() if now is None else now
    res = ProbeResult()
    th = manifest.get("probe") or {}
    ledger: dict[str, Any] = {}

    def read_ledger() -> None:  # runs while systemctl answers: the ledger's few milliseconds come for free
        if ledger:
            return
        try:
            conn = _ledger(manifest.get("ledger") or "/var/lib/lanectl/ledger.db")
            try:
                ledger["views"] = lane_views(conn)
                ledger["queue"] = queue_figures(conn, th, now)
                ledger["stranded"] = stranded(conn, manifest["lanes"])
                from lanectl.ledger import fleetview

                ledger["hosts"] = fleetview.hosts(conn, conn.clock())
            finally:
                conn.close()
        except (OSError, LedgerError, LanectlError) as exc:  # LanectlError: a PostgreSQL server not answering
            ledger["error"] = f"ledger unreadable: {getattr(exc, 'message', None) or exc}"

    try:
        rows = collect(manifest["lanes"], lanes, manifest.get("supervisor"), meanwhile=read_ledger, unit_dir=unit_dir,
                       usage=False)
    except LanectlError as exc:
        res.add("systemd", UNKNOWN, f"cannot read lane state: {exc.message}")
        rows = []
    read_ledger()
    if "error" in ledger:
        res.add("ledger", UNKNOWN, ledger["error"])
    judge_lanes(res, [r for r in rows if r.kind == "lane"], ledger.get("views", {}), manifest["lanes"],
                known="error" not in ledger)
    sup = None
    for r in rows:
        if r.kind == "supervisor":
            judge_supervisor(res, r)
            sup = r.health.body if isinstance(r.health.body, dict) else None
    judge_ledger_link(res, sup or {})
    if "hosts" in ledger:
        here = manifest.get("host") or (sup or {}).get("host")
        judge_hosts(res, ledger["hosts"], here if isinstance(here, str) else None)
    judge_orphans(res, [r for r in rows if r.kind == "orphan"])
    if "queue" in ledger:
        judge_queue(res, ledger["queue"], th)
    if "stranded" in ledger:
        judge_stranded(res, ledger["stranded"], lane_files(manifest.get("config_dir")))
    return res


def judge_ledger_link(res: ProbeResult, body: dict[str, Any]) -> None:
    """What this host's supervisor says of its own link to the ledger (its /healthz): WARNING while it cannot
    reach the ledger (since when: its lanes run what they hold, outcomes wait, nothing is claimed) and while it is
    fenced (it claims no new work: the lease could not be renewed in time, or another incarnation holds the
    host's record)."""
    if body.get("ledger_ok") is False:
        since = body.get("ledger_unreachable_since")
        when = (f" since {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime(since))} ({time.time() - since:.0f}s)"
                if isinstance(since, (int, float)) else "")
        res.add("ledger_link", WARNING, f"host {body.get('host') or '?'}: ledger unreachable{when}: its lanes run "
                                        f"what they hold, outcomes wait, nothing new is claimed "
                                        f"({body.get('ledger_error') or 'no error given'})")
    elif body.get("fenced"):
        res.add(f"host:{body.get('host') or '?'}", WARNING,
                f"host {body.get('host') or '?'} fenced: {body.get('fence_reason') or 'no reason given'}; it "
                "claims no new work")


def judge_hosts(res: ProbeResult, hosts: list[dict[str, Any]], here: str | None) -> None:
    """The other hosts sharing the ledger, from their records (lanectl.ledger.fleetview.hosts): CRITICAL for a
    host whose lease ran out with missions in flight on its lanes (they wait until a live host declares it dead
    and re-queues them: none is alive, or the reaper fails); WARNING for one whose lease ran out with nothing in
    flight, for a fenced one (no renewal for lease - margin: it claims nothing) and for a stopped or dead one
    that still owns lanes (they take no work). This host is judged by its supervisor (``judge_supervisor``,
    ``judge_ledger_link``). Perfdata ``hosts_up`` (up or fenced) of the hosts recorded, forgotten ones left out,
    when the ledger records more than one."""
    counted = [h for h in hosts if h["status"] != "forgotten"]
    for h in counted:
        name, st = h["name"], h["status"]
        if name == here or st == "up":
            continue
        ids = ", ".join(map(str, h["missions"])) + (", ..." if h["in_flight"] > len(h["missions"]) else "")
        lanes = ", ".join(h["lanes"]) or "none"
        if st == "expired" and h["in_flight"]:
            res.add(f"host:{name}", CRITICAL, f"host {name} lease expired {-h['lease_left_s']:.1f}s ago with "
                                              f"{h['in_flight']} mission(s) in flight on its lanes ({ids})")
        elif st == "expired":
            res.add(f"host:{name}", WARNING, f"host {name} lease expired {-h['lease_left_s']:.1f}s ago (nothing "
                                             f"in flight on its lanes: {lanes})")
        elif st == "fenced":
            res.add(f"host:{name}", WARNING, f"host {name} fenced: no lease renewal for {h['heartbeat_age_s']:.1f}s "
                                             f"(lease {h['lease_s']:g}s), it claims no new work"
                                             + (f"; {h['in_flight']} mission(s) in flight ({ids})" if h["in_flight"]
                                                else ""))
        elif st in ("dead", "stopped") and h["lanes"]:
            fix = (f"restart its supervisor, or 'lanectl host forget {name}' if it is gone for good" if st == "dead"
                   else "start its supervisor again")
            res.add(f"host:{name}", WARNING, f"host {name} {st}: its lanes take no work ({lanes}); {fix}")
    if len(counted) > 1:
        res.perf.append(Perf("hosts_up", sum(h["status"] in ("up", "fenced") for h in counted), None, None, 0,
                             len(counted)))


def judge_orphans(res: ProbeResult, rows: list[Any]) -> None:
    """WARNING for each lane unit whose lane is not installed (its file deleted by hand): enabled, 'lanectl up'
    starts it again, and without its drop-in it has no User= (it would run as root) and no port."""
    for r in rows:
        res.add(f"orphan:{r.name}", WARNING,
                f"{r.unit} is installed ({r.active_state}) but lane {r.name} is not: 'lanectl down {r.name}' or "
                f"'lanectl apply' stops and disables it")
    res.perf.append(Perf("orphan_units", len(rows), 0, None, 0, None))


def judge_supervisor(res: ProbeResult, r: Any) -> None:
    """CRITICAL when it is down; WARNING when it runs but its last reload failed (``reload_error`` in /healthz):
    it goes on with the configuration it had -- dispatching, failing over -- but not with the one on disk, so an
    operator must fix the configuration, yet nothing is down."""
    up = r.running and r.health.ok
    res.add("supervisor", OK if up else CRITICAL, "supervisor up" if up else f"supervisor {r.state}")
    if up and r.reload_error:
        res.add("supervisor_reload", WARNING, f"supervisor runs its previous configuration, the last reload failed: "
                                              f"{r.reload_error}")
    res.perf.append(Perf("supervisor_up", 1 if up else 0, None, None, 0, 1))


def stranded(conn: Source, lanes: dict[str, Any]) -> dict[str, int]:
    """Queued missions bound (pinned, or through a session) to a lane that is not installed here and that no other
    host of the ledger owns (a forgotten host's lanes are nobody's): no lane can ever take them. A lane of another
    host is that host's to run, to fall back from, or to move sessions off (docs/multihost.md); its host's lease is
    judged on its own. One pass over the queue index's targets (the queue is bounded by admission control)."""
    from lanectl.ledger import fleetview, reads

    gone = {t: n for t, n in reads.queued_targets(conn) if t not in lanes}
    if gone:
        owners = fleetview.lane_hosts(conn)
        kept = {h["name"] for h in fleetview.hosts(conn, 0.0, flying={}, owners=owners) if h["state"] != "forgotten"}
        gone = {t: n for t, n in gone.items() if owners.get(t) not in kept}
    return gone


def judge_stranded(res: ProbeResult, gone: dict[str, int], pending: set[str] | frozenset[str] = frozenset()) -> None:
    """CRITICAL: such missions wait forever unless an operator moves them ('lanectl reroute LANE --to OTHER');
    WARNING for a lane that is in lanes.d but not installed yet (``pending``): 'lanectl install' will serve it."""
    lost = {lane: n for lane, n in gone.items() if lane not in pending}
    waiting = {lane: n for lane, n in gone.items() if lane in pending}
    if lost:
        where = ", ".join(f"{n} on {lane}" for lane, n in sorted(lost.items()))
        res.add("stranded", CRITICAL, f"{sum(lost.values())} queued mission(s) bound to a lane that is gone "
                                      f"({where}): no lane can ever take them")
    if waiting:
        where = ", ".join(f"{n} on {lane}" for lane, n in sorted(waiting.items()))
        res.add("not_installed", WARNING, f"{sum(waiting.values())} queued mission(s) wait for a lane of lanes.d "
                                          f"that is not installed yet ({where}): 'lanectl install', then "
                                          "'lanectl up LANE'")
    res.perf.append(Perf("stranded", sum(lost.values()), None, 0, 0, None))


def lane_files(config_dir: str | None) -> set[str]:
    """The lanes lanes.d defines (names of its *.toml files), installed or not."""
    from pathlib import Path

    if not config_dir:
        return set()
    try:
        return {p.stem for p in (Path(config_dir) / "lanes.d").glob("*.toml")}
    except OSError:
        return set()


def judge_lanes(res: ProbeResult, rows: list[Any], views: dict[str, dict[str, Any]], lanes: dict[str, Any], *,
                known: bool = True) -> None:
    """Per lane; without the ledger a stopped lane may be drained on purpose, so it is UNKNOWN, not CRITICAL."""
    up = 0
    for r in rows:
        view = views.get(r.name) or {}
        dispatch_state = view.get("state", "active")
        up += r.state == "up"
        if not lanes[r.name].get("enabled", True) or dispatch_state == "disabled":
            res.add(f"lane:{r.name}", OK, f"{r.name} disabled")
            continue
        if dispatch_state in ("drained", "draining"):
            if view.get("automatic"):  # lanectl took it out of service: an alarm until an operator acts
                res.add(f"lane:{r.name}", CRITICAL,
                        f"{r.name} {dispatch_state} by lanectl ({view.get('drain_reason') or 'automatic'}); "
                        f"undrain it or take the drain over with 'lanectl drain {r.name}'")
            elif r.state == "failed":
                res.add(f"lane:{r.name}", WARNING, f"{r.name} {dispatch_state}, its unit failed ({r.result or 'failed'})")
            else:
                res.add(f"lane:{r.name}", OK, f"{r.name} {dispatch_state}")
            continue
        if r.state == "up" and dispatch_state == "degraded":
            res.add(f"lane:{r.name}", WARNING, f"{r.name} degraded (supervisor)")
        elif r.state == "up":
            res.add(f"lane:{r.name}", OK, f"{r.name} up")
        elif r.state in ("degraded", "starting"):
            res.add(f"lane:{r.name}", WARNING, f"{r.name} {r.state} ({r.health.error or r.active_state})")
        else:
            gave_up = (f"; systemd gave up restarting it, last result {r.result or 'unknown'}: 'lanectl restart "
                       f"{r.name}' clears it" if r.state == "failed" else "")
            res.add(f"lane:{r.name}", CRITICAL if known else UNKNOWN,
                    f"{r.name} {r.state} ({r.active_state}/{r.sub_state}{gave_up})"
                    + ("" if known else ", drain state unknown"))
    res.add("lanes", OK, f"{up}/{len(rows)} lanes up")
    res.perf.append(Perf("lanes_up", up, None, None, 0, len(rows)))


def queue_figures(conn: Source, th: dict[str, Any], now: float) -> dict[str, Any]:
    """The ledger's numbers the probe judges: all index ranges, flat in the size of the history."""
    # the oldest queued interactive mission: first row of the partial queue index
    from lanectl.ledger import reads

    oldest = reads.oldest_queued_interactive(conn)
    depth = reads.queue_depth(conn)
    since = now - th.get("window_sec", 900.0)
    counts = reads.outcome_counts(conn, since)
    return {"wait": max(0.0, now - oldest) if oldest is not None else 0.0,
            "queued": sum(depth.values()), "counts": counts}


def judge_queue(res: ProbeResult, fig: dict[str, Any], th: dict[str, Any]) -> None:
    wait = fig["wait"]
    warn, crit = th.get("interactive_wait_warn_sec", 30.0), th.get("interactive_wait_crit_sec", 120.0)
    code = CRITICAL if wait >= crit else WARNING if wait >= warn else OK
    res.add("interactive_wait", code, f"oldest queued interactive mission waits {wait:.1f}s")
    res.perf.append(Perf("interactive_wait_s", round(wait, 3), warn, crit, 0, None))
    res.perf.append(Perf("queued", fig["queued"], None, None, 0, None))
    counts = fig["counts"]
    finished = sum(counts.values())
    failed = counts.get("failed", 0) + counts.get("dead", 0)
    rate = failed / finished if finished else 0.0
    fw, fc = th.get("failure_rate_warn", 0.1), th.get("failure_rate_crit", 0.25)
    if finished >= th.get("min_finished", 10):
        code = CRITICAL if rate >= fc else WARNING if rate >= fw else OK
        res.add("failure_rate", code, f"failure rate {rate:.1%} of {finished} in the window")
    res.perf.append(Perf("failure_rate", round(rate, 4), fw, fc, 0, 1))
    res.perf.append(Perf("finished", finished, None, None, 0, None))

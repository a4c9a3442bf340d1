"""events, metrics, report: the evidence an operator reads from the ledger (lanectl.evidence does the work)."""
from __future__ import annotations

import json
import sys
import time
from typing import Any, List, Optional

import typer

from lanectl import config, evidence
from lanectl.cli.options import CONFIG, JSON, LEDGER, complete_lanes
from lanectl.errors import ExitCode, LanectlError
from lanectl.ledger import Ledger
from lanectl.output import command, escape, finish, stdout_console
from lanectl.timeparse import parse_duration, parse_time



def register(app: typer.Typer) -> None:
    app.command("events")(events_)
    app.command("metrics")(metrics_)
    app.command("report")(report_)


def _ledger(config_dir: Optional[str], ledger: Optional[str]) -> Ledger:
    return config.open_ledger(config_dir, ledger)


def _line(ev: dict[str, Any]) -> str:
    ids = " ".join(f"{k}={ev[k]}" for k in ("host", "lane", "mission", "attempt", "session") if ev.get(k) is not None)
    data = json.dumps(ev["data"], sort_keys=True, separators=(",", ":")) if ev["data"] else ""
    return " ".join(x for x in (ev["at"], f"#{ev['id']}", ev["kind"], ids, data) if x)


def _emit_ndjson(ev: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(ev, sort_keys=True, separators=(",", ":")) + "\n")
    sys.stdout.flush()


@command("events")
def events_(
    lane: Optional[str] = typer.Option(None, help="Only events of this lane.", autocompletion=complete_lanes),
    mission: Optional[int] = typer.Option(None, help="Only events of this mission."),
    session: Optional[str] = typer.Option(None, help="Only events of this session."),
    host: Optional[str] = typer.Option(None, help="Only events of the lanes this host owns now, and about the host "
                                                  "itself (several hosts on one ledger)."),
    kind: Optional[List[str]] = typer.Option(None, "--kind", help="Only this kind (repeatable)."),
    since: Optional[str] = typer.Option(None, help="From: 1h, 7d, an RFC 3339 time or epoch seconds."),
    until: Optional[str] = typer.Option(None, help="Before: same forms as --since."),
    limit: int = typer.Option(100, min=1, max=100_000, help="At most this many (before --follow)."),
    after: int = typer.Option(0, "--after", help="Only events with an id greater than this (paging)."),
    follow: bool = typer.Option(False, "--follow", "-f", help="Then print new events as they are recorded."),
    config_dir: Optional[str] = CONFIG,
    ledger: Optional[str] = LEDGER,
    json_out: bool = JSON,
) -> None:
    """Query the event log, oldest first.

    Without --since or --after: the last LIMIT matching events. With them: the first LIMIT from there
    (data.next_after pages on). When more match than are printed, a line on stderr says so and how to page
    (data.more in --json). --follow keeps printing new events (one JSON object per line with --json)
    until interrupted. An unknown --kind is an error listing the kinds (exit 2); kinds: docs/observability.md.
    """
    from lanectl.ledger.events import EventKind

    unknown = sorted({k for k in kind or [] if k not in {e.value for e in EventKind}})
    if unknown:
        raise LanectlError(f"unknown event kind {unknown[0]!r} for --kind",
                           f"the kinds are: {', '.join(e.value for e in EventKind)} (docs/observability.md)",
                           "unknown_event_kind", ExitCode.USAGE)
    now = time.time()
    t_since, t_until = parse_time(since, now, "since"), parse_time(until, now, "until")
    latest = t_since is None and not after
    with _ledger(config_dir, ledger) as led:
        # one more than asked tells whether more match (older ones for the last LIMIT, newer ones for a page)
        rows = evidence.events(led, lane=lane, mission=mission, session=session, kind=kind or None,
                               since=t_since, until=t_until, limit=limit + 1, after_id=after, latest=latest, host=host)
        more = len(rows) > limit
        rows = rows[1:] if more and latest else rows[:limit]
        if follow:
            _follow(led, rows, json_out, lane=lane, mission=mission, session=session, kind=kind or None, host=host)
            return
    data = {"events": rows, "count": len(rows), "next_after": rows[-1]["id"] if len(rows) == limit else None,
            "more": more}

    def human() -> None:
        for ev in rows:
            sys.stdout.write(_line(ev) + "\n")
        sys.stdout.flush()
        if more:  # on stderr: a pipe into wc or grep sees the events alone, the person sees what is hidden
            sys.stderr.write(more_note(latest, limit, rows[-1]["id"]) + "\n")

    finish(["events"], data, json_mode=json_out, human=human)


def more_note(latest: bool, limit: int, last_id: int) -> str:
    """What ``events`` says on stderr when more events match than it printed, and how to see them."""
    if latest:
        return (f"lanectl events: older matching events not shown (these are the last {limit}); see them with "
                f"--since TIME (then --after ID pages on) or a larger --limit")
    return (f"lanectl events: more matching events not shown (these are the first {limit} from --since/--after, "
            f"oldest first); next page: --after {last_id}; the newest: leave out --since, or a larger --limit")


def _follow(led: Ledger, first: list[dict[str, Any]], json_out: bool, **filters: Any) -> None:
    """NDJSON (or one line per event) until Ctrl-C; the backlog first, then what is appended."""
    show = _emit_ndjson if json_out else (lambda ev: (sys.stdout.write(_line(ev) + "\n"), sys.stdout.flush()))
    for ev in first:
        show(ev)
    start = max([ev["id"] for ev in first] + [evidence.last_id(led)])
    try:
        for ev in evidence.follow(led, after_id=start, **filters):
            show(ev)
    except KeyboardInterrupt:
        pass


def _human_metrics(m: dict[str, Any]) -> None:
    from rich.table import Table

    def s(v: float | None) -> str:
        return "-" if v is None else f"{v:.3f}"

    def pct(v: float | None) -> str:
        return "-" if v is None else f"{v:.1%}"

    con = stdout_console()
    con.print(f"window {m['since']} .. {m['now']} ({m['window_s']:g}s); quantiles nearest-rank, seconds")
    t = Table("lane", "class", "finished", "/min", "fail", "fallback in", "wait p50", "wait p95", "wait p99",
              "run p50", "run p95", "e2e p95", "in flight")
    for g in m["groups"]:
        t.add_row(escape(g["lane"]), g["class"], str(g["finished"]), f"{g['throughput_per_min']:.2f}",
                  pct(g["failure_rate"]), pct(g["fallback_received_rate"]), s(g["queue_wait_s"]["p50"]),
                  s(g["queue_wait_s"]["p95"]), s(g["queue_wait_s"]["p99"]), s(g["run_time_s"]["p50"]),
                  s(g["run_time_s"]["p95"]), s(g["end_to_end_s"]["p95"]), str(g["in_flight"]))
    con.print(t)
    lt = Table("lane", "host", "finished", "fail", "fallback in", "wait p95", "restarts", "capacity", "utilization",
               "in flight")
    for r in m["lanes"]:
        lt.add_row(escape(r["lane"]), escape(r.get("host") or "-"), str(r["finished"]), pct(r["failure_rate"]), pct(r["fallback_received_rate"]),
                   s(r["queue_wait_s"]["p95"]), str(r["restarts"]), str(r["capacity"] or "-"), pct(r["utilization"]),
                   str(r["in_flight"]))
    con.print(lt)
    if len(m.get("hosts") or []) > 1:  # several hosts on one ledger: each one's lease and its lanes' figures
        ht = Table("host", "status", "lease left", "lanes", "finished", "fail", "restarts", "in flight")
        for h in m["hosts"]:
            ht.add_row(escape(h["name"]), h["status"], f"{h['lease_left_s']:.1f}s", escape(", ".join(h["lanes"]) or "-"),
                       str(h["finished"]), pct(h["failure_rate"]), str(h["restarts"]), str(h["in_flight"]))
        con.print(ht)


@command("metrics")
def metrics_(
    window: str = typer.Option("15m", help="How far back: 15m, 1h, 24h, 7d."),
    lane: Optional[str] = typer.Option(None, help="Only this lane."),
    textfile: Optional[str] = typer.Option(None, "--textfile", metavar="PATH",
                                           help="Also write the Prometheus text format here, atomically "
                                                "(node_exporter textfile collector: a *.prom file)."),
    config_dir: Optional[str] = CONFIG,
    ledger: Optional[str] = LEDGER,
    json_out: bool = JSON,
) -> None:
    """Queue wait, run time, failure and fallback received rates.

    Per lane and class over the window: queue wait, run time and end-to-end p50/p95/p99 (nearest rank),
    throughput, failure rate, fallback received rate (work a lane took as another's fallback), restarts, utilization (against each lane's capacity) and what is
    in flight now; each lane with its host, and per host (several hosts on one ledger) its lease and its lanes'
    figures. --lane may name another host's lane. Definitions: docs/observability.md.
    """
    now = time.time()
    window_s = parse_duration(window)
    fleet = config.load(config_dir)
    with config.open_ledger(fleet, ledger) as led:
        now = led.clock()  # the ledger's (on PostgreSQL the server's) clock: the hosts' leases are measured on it
        if lane is not None and lane not in fleet.lanes and lane not in evidence.lanes_of_fleet(led):
            fleet.get(lane)  # neither this host's nor another host's: the usual error, with the known lanes
        m = evidence.metrics(led, window_s, now, lane, fleet=fleet)
    if textfile:
        evidence.write_textfile(textfile, evidence.prometheus_text(m, generated=now))
    finish(["metrics"], m, json_mode=json_out, human=lambda: _human_metrics(m))


@command("report")
def report_(
    since: str = typer.Option("24h", help="From: 24h, 7d, an RFC 3339 time or epoch seconds."),
    until: Optional[str] = typer.Option(None, help="Before (default: now); same forms."),
    out: Optional[str] = typer.Option(None, "--out", metavar="FILE", help="Write the Markdown here (atomically)."),
    config_dir: Optional[str] = CONFIG,
    ledger: Optional[str] = LEDGER,
    json_out: bool = JSON,
) -> None:
    """Markdown status and decision log.

    The lanes now and their figures over the period, then every decision (apply, drain, undrain, reroute,
    restarts, lane state changes, promotions, rollbacks, drills, ...) with who, when, why and the lane's
    failure rate and p95 queue wait over the hour before it.
    """
    now = time.time()
    t_since = parse_time(since, now, "since")
    t_until = parse_time(until, now, "until") or now
    fleet = config.load(config_dir)
    with config.open_ledger(fleet, ledger) as led:
        text = evidence.report(led, t_since or now - 86400, t_until, now, fleet=fleet)
    if out:
        from lanectl.fsutil import atomic_write

        atomic_write(out, text, 0o644)
    data = {"since": evidence.rfc3339(t_since), "until": evidence.rfc3339(t_until), "out": out,
            "markdown": None if out else text}

    def human() -> None:
        if out:
            stdout_console().print(f"wrote {escape(out)}")
        else:
            sys.stdout.write(text)

    finish(["report"], data, json_mode=json_out, human=human)

"""hosts, host forget: the hosts that share the ledger (issue 13; lanectl.ledger.hosts does the work)."""
from __future__ import annotations

import contextlib
from typing import Any, Optional

import typer

from lanectl import config, rollout
from lanectl.cli.options import CONFIG, JSON, LEDGER
from lanectl.ledger import hosts as host_ops
from lanectl.ledger.lanes import actor
from lanectl.output import command, escape, finish, stdout_console, waiting

host_app = typer.Typer(help="Act on one host of the fleet (the hosts sharing this ledger).", no_args_is_help=True)


def register(app: typer.Typer) -> None:
    app.command("hosts")(list_)
    app.add_typer(host_app, name="host")


def _age(seconds: float) -> str:
    return f"{seconds:.1f}s" if abs(seconds) < 120 else f"{seconds / 60:.0f}m"


def _lease(row: dict[str, Any]) -> str:
    if row["state"] != "up":
        return "-"
    left = row["lease_left_s"]
    return f"[red]expired {_age(-left)} ago[/]" if left <= 0 else _age(left)


@command("hosts")
def list_(config_dir: Optional[str] = CONFIG, ledger: Optional[str] = LEDGER, json_out: bool = JSON) -> None:
    """List the hosts whose supervisors share this ledger: state, incarnation, heartbeat age, lease left, lanes,
    missions in flight on their lanes; a drained host ('host drain') shows draining, or drained once nothing is
    in flight.

    An SQLite ledger has one host (this one, once its supervisor has started). Exit 6 when the ledger cannot be
    read.
    """
    with config.open_ledger(config_dir, ledger) as led:
        now = led.clock()
        rows = host_ops.listing(led, now)

    def human() -> None:
        from rich.table import Table

        out = stdout_console()
        if not rows:
            out.print("no host has registered yet: a supervisor records its host when it starts")
            return
        t = Table("host", "state", "incarnation", "heartbeat", "lease left", "lanes", "in flight")
        for r in rows:
            state = r["state"] + (f", [yellow]{'draining' if r['in_flight'] else 'drained'}[/]" if r["drained"]
                                  else "")
            t.add_row(escape(r["name"]), state, r["incarnation"][:8], f"{_age(r['heartbeat_age_s'])} ago",
                      _lease(r), escape(", ".join(r["lanes"]) or "-"), str(r["in_flight"]))
        out.print(t)

    finish(["hosts"], {"at": now, "hosts": rows}, json_mode=json_out, human=human)


@host_app.command("forget")
@command("host", "forget")
def forget(name: str = typer.Argument(..., metavar="HOST"),
           force: bool = typer.Option(False, "--force", help="Forget it even while its lease runs."),
           config_dir: Optional[str] = CONFIG, ledger: Optional[str] = LEDGER, json_out: bool = JSON) -> None:
    """Forget a host that is gone for good: other hosts may then claim its lanes.

    Refused while the host's lease runs (exit 5: its supervisor may still run them) unless --force; exit 4 for a
    host the ledger never knew; exit 0 when it was forgotten already. A host whose lease ran out was declared
    dead by a live host already (its lanes' work re-queued then); what the lanes of a stopped host still hold
    (their leases wait for it while it is stopped) runs again elsewhere from the next policy pass.
    """
    with config.open_ledger(config_dir, ledger) as led:
        changed = host_ops.forget(led, name, now=led.clock(), who=actor(), force=force)
    finish(["host", "forget"], {"host": name, "changed": changed}, json_mode=json_out,
           human=lambda: stdout_console().print(f"host {escape(name)}: " +
                                                ("forgotten" if changed else "already forgotten")))


@host_app.command("drain")
@command("host", "drain")
def drain(name: str = typer.Argument(..., metavar="HOST"),
          wait: bool = typer.Option(False, "--wait", help="Wait until nothing is in flight on the host's lanes."),
          timeout: float = typer.Option(300.0, help="Seconds --wait waits before exiting 7."),
          reason: Optional[str] = typer.Option(None, "--reason", help="Why: recorded with the event and your user "
                                               "name."),
          config_dir: Optional[str] = CONFIG, ledger: Optional[str] = LEDGER, json_out: bool = JSON) -> None:
    """Take no new work on any lane of a host; what they run finishes. Works from any host.

    Sessions bound to its lanes move to lanes that can take their next mission (those created with
    --session-wait wait instead); it stays drained across restarts of its supervisor until 'host undrain'.
    Idempotent (draining a drained host changes nothing, exit 0). With --wait, returns when nothing is in
    flight on its lanes (exit 7 at --timeout: it stays drained). Exit 4 for a host the ledger does not know.
    """
    with waiting(json_out) if wait else contextlib.nullcontext() as progress:
        res = rollout.host_drain(name, wait=wait, timeout=timeout, reason=reason, config_dir=config_dir,
                                 ledger=ledger, progress=progress)

    def human() -> None:
        word = "draining" if res.changed else "already drained"
        left = ("; nothing in flight" if wait else
                f"; {len(res.in_flight)} mission(s) in flight on its lanes" if res.in_flight else "; nothing in flight")
        stdout_console().print(f"host {escape(name)}: {word}{left}")

    finish(["host", "drain"], res.as_dict(), json_mode=json_out, human=human)


@host_app.command("undrain")
@command("host", "undrain")
def undrain(name: str = typer.Argument(..., metavar="HOST"),
            reason: Optional[str] = typer.Option(None, "--reason", help="Why: recorded with the event and your user "
                                                 "name."),
            config_dir: Optional[str] = CONFIG, ledger: Optional[str] = LEDGER, json_out: bool = JSON) -> None:
    """Put a drained host's lanes back into service. Works from any host.

    Sessions that moved away while it was drained stay where they went. Idempotent (exit 0 when it was not
    drained); exit 4 for a host the ledger does not know.
    """
    res = rollout.host_undrain(name, reason=reason, config_dir=config_dir, ledger=ledger)
    finish(["host", "undrain"], res.as_dict(), json_mode=json_out,
           human=lambda: stdout_console().print(f"host {escape(name)}: "
                                                + ("back in service" if res.changed else "was not drained")))

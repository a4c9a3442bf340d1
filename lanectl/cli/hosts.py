"""hosts, host forget: the hosts that share the ledger (issue 13; lanectl.ledger.hosts does the work)."""
from __future__ import annotations

from typing import Any, Optional

import typer

from lanectl import config
from lanectl.cli.options import CONFIG, JSON, LEDGER
from lanectl.ledger import hosts as host_ops
from lanectl.ledger.lanes import actor
from lanectl.output import command, escape, finish, stdout_console

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
    missions in flight on their lanes.

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
            t.add_row(escape(r["name"]), r["state"], r["incarnation"][:8], f"{_age(r['heartbeat_age_s'])} ago",
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
    host the ledger never knew; exit 0 when it was forgotten already. What its lanes still hold is not moved
    (no host-loss reaper yet: docs/multihost.md).
    """
    with config.open_ledger(config_dir, ledger) as led:
        changed = host_ops.forget(led, name, now=led.clock(), who=actor(), force=force)
    finish(["host", "forget"], {"host": name, "changed": changed}, json_mode=json_out,
           human=lambda: stdout_console().print(f"host {escape(name)}: " +
                                                ("forgotten" if changed else "already forgotten")))

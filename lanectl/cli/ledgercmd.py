"""``lanectl ledger init`` (the only command besides install that creates a ledger) and ``lanectl ledger prune``
(retention of the ledger's history: lanectl.ledger.retention does the work)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from lanectl import config
from lanectl.cli.options import CONFIG, JSON, LEDGER
from lanectl.ledger import lanes as lane_ops
from lanectl.ledger import retention
from lanectl.ledger.missions import invalid
from lanectl.output import command, escape, finish, stdout_console

ledger_app = typer.Typer(help="The ledger file: create it, archive and delete old finished history.",
                         no_args_is_help=True)


def register(app: typer.Typer) -> None:
    app.add_typer(ledger_app, name="ledger")


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.1f} MiB"


@ledger_app.command("init")
@command("ledger", "init")
def ledger_init(config_dir: Optional[str] = CONFIG, ledger: Optional[str] = LEDGER, json_out: bool = JSON) -> None:
    """Create the ledger (and apply its migrations); nothing else creates one but 'lanectl install'.

    Every other command refuses a ledger that does not exist (exit 6), so a mistyped --ledger is an error, not
    a new empty ledger. Idempotent: an existing ledger is only migrated (exit 0).
    """
    existed = config.ledger_path(config_dir, ledger).exists()
    with config.open_ledger(config_dir, ledger, create=True) as led:
        path = led.path
    created = not existed
    finish(["ledger", "init"], {"ledger": str(path), "changed": created}, json_mode=json_out,
           human=lambda: stdout_console().print(f"{'created' if created else 'ready'}: {escape(str(path))}"))


@ledger_app.command("prune")
@command("ledger", "prune")
def prune(
    older_than: str = typer.Option(..., "--older-than", metavar="DURATION",
                                   help="Finished missions last changed longer ago than this (30d, 12h, 2w)."),
    archive: Path = typer.Option(..., "--archive", metavar="FILE",
                                 help="Gzip JSON-lines file to archive them to first (e.g. /var/backups/l.jsonl.gz)."),
    vacuum: bool = typer.Option(False, "--vacuum", help="Also convert a ledger created before lanectl 0.1's "
                                "retention to incremental auto-vacuum (VACUUM: holds the write lock while it runs)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Only count what would be archived."),
    ledger: Optional[str] = LEDGER, config_dir: Optional[str] = CONFIG, json_out: bool = JSON,
) -> None:
    """Archive finished missions (with their attempts and events) and events of no mission older than
    --older-than to --archive (written and fsynced before anything is deleted), delete them from the ledger in short
    transactions, and give the space back. Unfinished and younger history is never touched (docs/ledger.md,
    "Retention")."""
    try:
        seconds = config.duration_s(older_than)
    except ValueError:
        raise invalid("older-than", f"{older_than!r} is not a duration", "use e.g. 30d, 12h or 2w",
                      "bad_duration") from None
    with config.open_ledger(config_dir, ledger) as led:
        now = led.clock()
        cutoff = now - seconds
        if dry_run:
            m, e = retention.candidates(led, cutoff)
            data = {"cutoff": cutoff, "missions": m, "events_older": e, "dry_run": True}
            finish(["ledger", "prune"], data, json_mode=json_out,
                   human=lambda: stdout_console().print(
                       f"would archive {m} finished missions and at most {e} events older than {older_than}"))
            return
        res = retention.prune(led, cutoff=cutoff, archive=archive.absolute(), now=now, vacuum=vacuum,
                              actor=lane_ops.actor())

    def human() -> None:
        con = stdout_console()
        if res.archive is None:
            con.print(f"nothing older than {escape(older_than)} to prune; no archive written")
        else:
            con.print(f"archived {res.missions} missions, {res.attempts} attempts, {res.events} events to "
                      f"{escape(res.archive)} ({_mib(res.archive_bytes)}), then deleted them"
                      + (f"; {res.kept} changed meanwhile and were kept" if res.kept else ""))
        con.print(f"ledger: {_mib(res.file_bytes_before)} -> {_mib(res.file_bytes_after)} "
                  f"({_mib(res.reclaimed_bytes)} given back) in {res.seconds:.1f} s")
    finish(["ledger", "prune"], res.as_dict(), json_mode=json_out, human=human)

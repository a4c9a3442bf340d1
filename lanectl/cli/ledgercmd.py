"""``lanectl ledger init`` (the only command besides install that creates a ledger), ``ledger migrate``, ``ledger
copy`` (lanectl.ledger.transfer: SQLite <-> PostgreSQL, verified) and ``lanectl ledger prune`` (retention of the
ledger's history: lanectl.ledger.retention does the work)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from lanectl import config, ledgerurl
from lanectl.cli.options import CONFIG, JSON, LEDGER
from lanectl.ledger import lanes as lane_ops
from lanectl.ledger import retention, transfer, where
from lanectl.ledger.missions import invalid
from lanectl.output import command, escape, finish, stdout_console, waiting

ledger_app = typer.Typer(help="The ledger: create, migrate or copy it; archive and delete old finished history.",
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
    existed = where.exists(config.ledger_path(config_dir, ledger))
    with config.open_ledger(config_dir, ledger, create=True) as led:
        shown = ledgerurl.shown(led.path)
    created = not existed
    finish(["ledger", "init"], {"ledger": shown, "changed": created}, json_mode=json_out,
           human=lambda: stdout_console().print(f"{'created' if created else 'ready'}: {escape(shown)}"))


@ledger_app.command("migrate")
@command("ledger", "migrate")
def ledger_migrate(config_dir: Optional[str] = CONFIG, ledger: Optional[str] = LEDGER,
                   json_out: bool = JSON) -> None:
    """Apply the schema migrations this lanectl knows to an existing ledger (every command that writes does it
    too; this one only migrates). Exit 6 when there is no ledger, 3 when it was written by a newer lanectl."""
    res = where.migrate(config.ledger_path(config_dir, ledger))
    finish(["ledger", "migrate"], res, json_mode=json_out, human=lambda: stdout_console().print(
        f"{escape(res['ledger'])}: schema version {res['from_version']} -> {res['to_version']}"
        + (f" ({', '.join(res['applied'])})" if res["applied"] else " (up to date)")))


@ledger_app.command("copy")
@command("ledger", "copy")
def ledger_copy(
    source: str = typer.Argument(..., metavar="SRC", help="The ledger to copy: a file or a postgresql:// URL."),
    destination: str = typer.Argument(..., metavar="DST",
                                      help="A new (or empty) ledger: a file or a postgresql:// URL of a database."),
    json_out: bool = JSON,
) -> None:
    """Copy a whole ledger between SQLite and PostgreSQL (either way, or to the same engine), verified.

    Every table is copied in one transaction of the destination from one snapshot of the source; the ids continue
    past the copied ones. Both sides' row counts and checksums are printed and compared: a mismatch rolls the
    destination back (exit 1). Refused, writing nothing: a destination that holds any mission, event or other row
    (exit 5, ledger_not_empty), a source at another schema version (exit 5, ledger_needs_migration: run 'lanectl
    ledger migrate' on it; a newer one: exit 3). Stop the supervisor of the source first: what it writes after the
    copy starts is not in the copy (docs/ledger.md, "Copying a ledger").
    """
    src, dst = ledgerurl.resolve(source), ledgerurl.resolve(destination)
    with waiting(json_out) as progress:
        res = transfer.copy(src, dst, progress=progress)

    def human() -> None:
        from rich.table import Table

        table = Table(title=f"{res.source} -> {res.destination} (schema version {res.schema_version})")
        for col in ("table", "rows", "source sha256", "destination sha256", "match"):
            table.add_column(col, justify="right" if col == "rows" else "left")
        for t in res.tables:
            table.add_row(t.name, str(t.rows), t.source_sha256[:16], t.destination_sha256[:16],
                          "yes" if t.match else "NO")
        con = stdout_console()
        con.print(table)
        marks = ", ".join(f"{t} {m['destination']}" for t, m in sorted(res.id_marks.items()))
        con.print(f"copied {res.rows} rows in {res.seconds:.1f} s, verified; ids continue past: {escape(marks)}")
    finish(["ledger", "copy"], res.as_dict(), json_mode=json_out, human=human)


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

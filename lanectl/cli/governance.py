"""promote and drill: scaling on evidence, and the drills that produce it."""
from __future__ import annotations

from typing import Optional

import typer

from lanectl import config, governance
from lanectl.cli.options import CONFIG, JSON, LEDGER, complete_lanes
from lanectl.errors import ExitCode
from lanectl.output import command, escape, finish, stdout_console, waiting



def register(app: typer.Typer) -> None:
    app.command("promote")(promote)
    app.command("drill")(drill)


@command("promote")
def promote(
    lane: str = typer.Argument(..., autocompletion=complete_lanes),
    weight: int = typer.Option(..., "--weight", min=0, max=10_000, help="The lane's new traffic weight."),
    force: bool = typer.Option(False, "--force", help="Promote without the evidence (needs --reason)."),
    reason: Optional[str] = typer.Option(None, "--reason", help="Why: recorded with the event."),
    config_dir: Optional[str] = CONFIG,
    ledger: Optional[str] = LEDGER,
    json_out: bool = JSON,
) -> None:
    """Raise a lane's weight, only on evidence.

    Refused (exit 8) unless, over [promotion] window_sec, the lane's failure and fallback lost rates (work meant for it that went to its fallback), p95 queue wait
    and interactive starvation meet the policy and a passing drill is recent enough; every unmet rule is listed.
    --force --reason R promotes anyway and records the override. Lowering a weight needs no evidence. The same
    weight again changes nothing (exit 0).
    """
    res = governance.promote(lane, weight, force=force, reason=reason, config_dir=config_dir, ledger=ledger)

    def human() -> None:
        con = stdout_console()
        if not res.changed:
            con.print(f"{escape(lane)}: weight is {weight} already")
        else:
            con.print(f"{escape(lane)}: weight {res.previous} -> {weight}" + (" [yellow](forced)[/]" if res.forced
                                                                              else ""))

    finish(["promote"], res.as_dict(), json_mode=json_out, human=human)


@command("drill")
def drill(
    lane: str = typer.Argument(..., autocompletion=complete_lanes),
    kind: str = typer.Option("crash", "--kind", help="crash (SIGKILL) or hang (SIGSTOP: the watchdog must act)."),
    timeout: float = typer.Option(60.0, help="Seconds to wait for each step."),
    config_dir: Optional[str] = CONFIG,
    ledger: Optional[str] = LEDGER,
    json_out: bool = JSON,
) -> None:
    """Break a lane on purpose and measure recovery.

    Runs a mission on the lane, kills (crash) or freezes (hang) the lane, measures time to detect (the mission
    re-queued) and to recover (the lane up again), checks that nothing was orphaned and that the lane is still in
    service afterwards (not drained by a rollback), and records a drill event. Exits 0 when it passed, 8 when it
    did not (every unmet condition listed), 7 on a timeout, 5 when the lane is not running or takes no work
    (drained, degraded), 6 when the supervisor is not running.
    """
    from lanectl import drill as drills

    fleet = config.load(config_dir)
    with config.open_ledger(fleet, ledger) as led, waiting(json_out) as progress:
        res = drills.run(led, fleet, lane, kind, timeout=timeout, progress=progress)

    def human() -> None:
        con = stdout_console()
        verdict = "[green]passed[/]" if res.passed else "[red]failed[/]"
        con.print(f"drill {res.type} of {escape(lane)}: {verdict}; detected in {res.detect_s}s (limit {res.limit_s:g}s), "
                  f"lane back in {res.recover_s}s, mission {res.mission} {res.mission_state}, "
                  f"{res.orphaned} orphaned")
        for why in res.failures or []:
            con.print(f"  [red]{escape(why)}[/]")

    finish(["drill"], res.as_dict(), json_mode=json_out, human=human,
           exit_code=ExitCode.OK if res.passed else ExitCode.UNHEALTHY)

"""validate, and the lane group: add, show, list, remove."""
from __future__ import annotations

from typing import Optional

import typer

from lanectl import config, lanefiles, units
from lanectl.cli.options import CONFIG, JSON, LEDGER, UNIT_DIR, complete_lane_files
from lanectl.errors import ExitCode
from lanectl.output import command, escape, finish, stdout_console

lane_app = typer.Typer(help="Create, inspect and remove lane files (lanes.d/NAME.toml).", no_args_is_help=True)


def register(app: typer.Typer) -> None:
    app.command("validate")(validate)
    app.add_typer(lane_app, name="lane")


@command("validate")
def validate(
    directory: Optional[str] = typer.Argument(None, metavar="DIR",
                                              help="Config dir or lanes.d dir (default: --config)."),
    config_dir: Optional[str] = CONFIG,
    json_out: bool = JSON,
) -> None:
    """Check every lane file and lanectl.toml.

    Reports every problem at once, each naming file, field and fix, cross-file ones (duplicate ports, nested
    workspaces) included even for files with errors of their own; exits 3 if any is an error. A port taken on
    this host by something other than the lane's own running unit is a warning.
    """
    fleet = config.load(directory or config_dir, check_host_ports=True, check_host=True)
    units.render(fleet)  # whatever render (and so install) would refuse, validate refuses too (exit 3)
    data = {"config_dir": str(fleet.config_dir), "lanes": sorted(fleet.lanes), "valid": True}

    def human() -> None:
        stdout_console().print(f"[green]ok[/]: {len(fleet.lanes)} lane(s) valid in {escape(str(fleet.lanes_dir))}")

    finish(["validate"], data, json_mode=json_out, human=human, warnings=fleet.warnings)


@lane_app.command("add")
@command("lane", "add")
def add(
    name: str = typer.Argument(..., help="Lane name: 1-31 of a-z 0-9 -, starting with a letter."),
    port: Optional[int] = typer.Option(None, help="Port (default: the first free one from 8701)."),
    workspace: Optional[str] = typer.Option(None, help="Workspace (default: WORKSPACE_ROOT/NAME)."),
    classes: Optional[str] = typer.Option(None, help="Comma-separated classes it serves (default: all)."),
    capacity: Optional[int] = typer.Option(None, help="Missions in flight at once (default 4)."),
    weight: Optional[int] = typer.Option(None, help="Traffic share among equal lanes (default 100)."),
    fallback: Optional[str] = typer.Option(None, help="Lane that takes its work when it is unavailable."),
    tags: Optional[str] = typer.Option(None, help="Comma-separated tags."),
    description: Optional[str] = typer.Option(None, help="One line shown in the unit's Description."),
    config_dir: Optional[str] = CONFIG,
    json_out: bool = JSON,
) -> None:
    """Write a new, valid lane file."""
    config.check_config_dir(config_dir)
    split = (lambda s: [x.strip() for x in s.split(",") if x.strip()] if s else None)
    path, doc = lanefiles.add(name, config_dir, port=port, workspace=workspace, classes=split(classes),
                              capacity=capacity, weight=weight, fallback=fallback, tags=split(tags),
                              description=description)

    def human() -> None:
        stdout_console().print(f"wrote {escape(str(path))} (port {doc['port']}, workspace {escape(doc['workspace'])})")

    finish(["lane", "add"], {"file": str(path), "lane": name, "changed": True, **doc}, json_mode=json_out, human=human)


@lane_app.command("show")
@command("lane", "show")
def show(name: str = typer.Argument(..., autocompletion=complete_lane_files), unit_dir: Optional[str] = UNIT_DIR, config_dir: Optional[str] = CONFIG,
         json_out: bool = JSON) -> None:
    """Show one lane with its defaults filled in, and how it runs now.

    Besides the lane file's settings: its unit state (state, unit, result, gave_up: systemd stopped restarting
    it), the ledger's dispatch state (dispatch, drained_by, drain_reason) and the weight in force
    (weight_in_force, promoted). Values print as JSON (true, null, ["a", "b"]). Exits 6 (a warning saying
    why) when the ledger could not be read: dispatch "unknown" is not a lane known to be fine.
    """
    config.check_config_dir(config_dir)
    data = lanefiles.show(name, config_dir)
    data.update(lanefiles.live(name, unit_dir, config_dir))

    def human() -> None:
        import json

        from rich.table import Table

        t = Table(show_header=False, box=None)
        for k, v in data.items():
            t.add_row(f"[bold]{k}[/]", escape(v if isinstance(v, str) else json.dumps(v)))
        stdout_console().print(t)

    from lanectl.status import dispatch_unknown

    warnings = [dispatch_unknown(data["dispatch_error"], lane=name)] \
        if data.get("dispatch_error") else []
    finish(["lane", "show"], data, json_mode=json_out, human=human, warnings=warnings,
           exit_code=ExitCode.UNAVAILABLE if warnings else ExitCode.OK, status="partial" if warnings else None)


@lane_app.command("list")
@command("lane", "list")
def list_(config_dir: Optional[str] = CONFIG, json_out: bool = JSON) -> None:
    """List the lanes defined in lanes.d."""
    fleet = config.load(config_dir)
    rows = [{"name": n, "port": l.port, "workspace": l.workspace, "classes": list(l.classes),
             "capacity": l.capacity, "weight": l.weight, "fallback": l.fallback, "enabled": l.enabled}
            for n, l in sorted(fleet.lanes.items())]

    def human() -> None:
        from rich.table import Table

        t = Table("lane", "port", "workspace", "classes", "capacity", "weight", "fallback", "enabled")
        for r in rows:
            t.add_row(escape(r["name"]), str(r["port"]), escape(r["workspace"]), ",".join(r["classes"]),
                      str(r["capacity"]), str(r["weight"]), r["fallback"] or "-", "yes" if r["enabled"] else "no")
        stdout_console().print(t)

    finish(["lane", "list"], {"lanes": rows}, json_mode=json_out, human=human)


@lane_app.command("remove")
@command("lane", "remove")
def remove(name: str = typer.Argument(..., metavar="LANE", autocompletion=complete_lane_files),
           reroute_to: Optional[str] = typer.Option(
               None, "--reroute-to", metavar="LANE", autocompletion=complete_lane_files,
               help="Drain the lane and move its queued missions and sessions to this lane first."),
           reason: Optional[str] = typer.Option(None, "--reason", metavar="TEXT",
                                                help="Why: recorded with the moves."),
           config_dir: Optional[str] = CONFIG,
           ledger: Optional[str] = LEDGER,
           json_out: bool = JSON) -> None:
    """Delete a lane file, never stranding work.

    Refused (exit 5) while missions or sessions are bound to the lane, unless --reroute-to moves them (missions
    still running keep it refused until they finish; the lane is draining meanwhile). A rename is an add of the
    new name, then a remove of the old one with --reroute-to NEW. Then stop the lane and re-install
    ('lanectl down LANE', 'lanectl install').
    """
    from lanectl import manifest, paths

    config.check_config_dir(config_dir)
    path, moved = lanefiles.remove(name, config_dir, ledger=ledger, reroute_to=reroute_to, reason=reason)
    installed = manifest.read(paths.unit_dir())
    installed = installed is not None and name in (installed.get("lanes") or {})

    def human() -> None:
        con = stdout_console()
        if moved["missions"] or moved["sessions"]:
            con.print(f"moved {len(moved['missions'])} mission(s) and {len(moved['sessions'])} session(s) to "
                      f"{escape(reroute_to or '')}")
        if installed:
            con.print(f"removed {escape(str(path))}; run 'lanectl down {name}' and 'lanectl install'")
        else:  # never installed: there is no unit to stop ('lanectl down' would exit 4)
            con.print(f"removed {escape(str(path))}; lane {name} was not installed, nothing to stop")

    finish(["lane", "remove"], {"file": str(path), "lane": name, "changed": True, "moved": moved,
                                "installed": installed}, json_mode=json_out, human=human, exit_code=ExitCode.OK)

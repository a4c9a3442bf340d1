"""render and install: the fleet's systemd units."""
from __future__ import annotations

from typing import Optional

import typer

from lanectl import config, install as installer, paths
from lanectl.cli.options import CONFIG, JSON, UNIT_DIR
from lanectl.errors import ExitCode
from lanectl.output import command, escape, finish, stdout_console

PYTHON = typer.Option(None, "--python", metavar="PATH",
                      help="Interpreter for the reference runtime (default: python= in lanectl.toml, else this one).")


def register(app: typer.Typer) -> None:
    app.command("render")(render)
    app.command("install")(install)


@command("render")
def render(
    out: Optional[str] = typer.Option(None, "--out", metavar="DIR", help="Write the files into DIR."),
    check: bool = typer.Option(False, "--check", help="Compare with DIR (or the unit dir); exit 8 on drift."),
    diff: bool = typer.Option(False, "--diff", help="With --check: show how each drifted file differs (unified diff)."),
    unit_dir: Optional[str] = UNIT_DIR,
    python: Optional[str] = PYTHON,
    config_dir: Optional[str] = CONFIG,
    json_out: bool = JSON,
) -> None:
    """Render the units of the fleet (stdout, a dir, or a drift check).

    Without --out or --check, prints every file. --check exits 8 when a file is missing, differs, was edited
    by hand, or is left over from a removed lane; --diff shows each difference (what is on disk against what
    install would write).
    """
    if diff and not check:
        from lanectl.errors import LanectlError

        raise LanectlError("--diff needs --check", "run 'lanectl render --check --diff'", "usage", ExitCode.USAGE)
    if check:
        rep = installer.check_rendered(out, unit_dir=unit_dir, python=python, config_dir=config_dir, diff=diff)

        def human() -> None:
            con = stdout_console()
            if rep.in_sync:
                con.print(f"[green]in sync[/]: {rep.files} file(s) in {escape(rep.dir)}")
            for d in rep.found:
                con.print(f"[red]{d.state}[/]: {escape(d.path)}")
                if rep.diffs is not None:
                    print(rep.diffs[d.path], end="", flush=True)

        finish(["render"], rep.as_dict(), json_mode=json_out, human=human,
               exit_code=ExitCode.OK if rep.in_sync else ExitCode.UNHEALTHY)
        return
    if out:
        res = installer.render_to(out, python=python, config_dir=config_dir)
        finish(["render"], res.as_dict(), json_mode=json_out,
               human=lambda: stdout_console().print(f"{len(res.written)} of {len(res.files)} file(s) written to "
                                                    f"{escape(out)}"))
        return
    files = installer.rendered(config_dir, python)

    def show() -> None:
        for f in files:
            print(f"# ---- {f.path}\n{f.text}")

    finish(["render"], {"files": {f.path: f.text for f in files}}, json_mode=json_out, human=show)


@command("install")
def install(
    unit_dir: Optional[str] = UNIT_DIR,
    python: Optional[str] = PYTHON,
    reload: Optional[bool] = typer.Option(None, "--reload/--no-reload",
                                          help="daemon-reload after a change (default: when the unit dir is live)."),
    provision: Optional[bool] = typer.Option(None, "--provision/--no-provision",
                                             help="Create lane users and workspaces (default: when live and root)."),
    config_dir: Optional[str] = CONFIG,
    json_out: bool = JSON,
) -> None:
    """Install the units of the fleet; only what differs.

    Validates everything first and writes nothing on an error (exit 3). Files are replaced atomically; files
    lanectl wrote for lanes that no longer exist are removed; systemd is reloaded only when something changed.
    A second install changes nothing and says so (exit 0).
    """
    fleet = config.load(config_dir, check_host=True)
    udir = paths.unit_dir(unit_dir)
    res = installer.install_fleet(fleet, udir, python=python, reload=reload, do_provision=provision, by="install")
    data = {"unit_dir": res.unit_dir, "written": res.written, "removed": res.removed, "unchanged": res.unchanged,
            "reloaded": res.reloaded, "provisioned": res.provisioned, "notices": res.notices,
            "ledger_created": res.ledger_created, "supervisor": res.supervisor,
            "supervisor_error": res.supervisor_error, "stopped": res.stopped, "changed": res.changed}

    def human() -> None:
        con = stdout_console()
        for n in res.notices:
            con.print(f"[yellow]left alone[/]: {escape(n)}")
        for n in res.stopped:
            con.print(f"{escape(n)}: removed from the fleet, unit stopped and disabled")
        if not res.changed and not res.provisioned and not res.ledger_created:
            con.print(f"nothing changed: {len(res.unchanged)} file(s) already current in {escape(res.unit_dir)}")
            return
        for p in res.provisioned:
            con.print(f"created {escape(p)}")
        for p in res.written:
            con.print(f"wrote {escape(p)}")
        for p in res.removed:
            con.print(f"removed {escape(p)}")
        if res.reloaded:
            con.print("systemd reloaded")
        if res.ledger_created:
            con.print(f"created the ledger {escape(res.ledger_created)}")
        installer.print_supervisor(con, res)

    finish(["install"], data, json_mode=json_out, human=human, warnings=fleet.warnings,
           exit_code=ExitCode.UNHEALTHY if res.supervisor_error else ExitCode.OK)

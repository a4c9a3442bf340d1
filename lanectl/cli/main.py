"""The typer application: thin commands over the library (one module per command group)."""
from __future__ import annotations

import typer

from lanectl import __version__
from lanectl.cli import evidence, fleet, governance, lanes, ledgercmd, missions, ops, units

app = typer.Typer(
    name="lanectl",
    help="Run several long-lived runtime lanes on one server, under systemd.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _version(value: bool) -> None:
    if value:
        print(__version__)
        raise typer.Exit()


@app.callback()
def main(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                 help="Print the version and exit."),
) -> None:
    """Run several long-lived runtime lanes on one server, under systemd.

    Configuration: --config DIR (or LANECTL_CONFIG_DIR, default /etc/lanectl) holds lanectl.toml and lanes.d/.
    Exit codes: 0 ok, 1 error, 2 usage, 3 config, 4 not found, 5 conflict, 6 unavailable, 7 timeout,
    8 unhealthy (see docs/exit-codes.md).
    """


lanes.register(app)
units.register(app)
fleet.register(app)
missions.register(app)
ops.register(app)
governance.register(app)
evidence.register(app)
ledgercmd.register(app)

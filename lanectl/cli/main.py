"""The typer application: thin commands over the library (one module per command group)."""
from __future__ import annotations

import inspect
import typing

import typer

from lanectl import __version__, paths
from lanectl.cli import control, evidence, fleet, governance, hosts, lanes, ledgercmd, missions, units

app = typer.Typer(
    name="lanectl",
    help="Run several long-lived runtime lanes on one server, under systemd.\n\n"
         f"The ledger: --ledger PATH (SQLite) or URL (postgresql://...), else {paths.LEDGER_DEFAULT}.",  # said once
    no_args_is_help=True,
    add_completion=True,  # --install-completion / --show-completion (bash, zsh, fish, PowerShell)
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # plain help: no <bool>/<str> type column (rich mode shows one for every parameter)
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
control.register(app)
governance.register(app)
evidence.register(app)
ledgercmd.register(app)
hosts.register(app)


def _reflow(doc: str) -> str:
    """A docstring as help text: the lines of each paragraph joined, so the terminal wraps it (rich keeps single
    line breaks, which broke sentences in the middle); paragraphs that are lists or indented stay as written."""
    out = []
    for para in inspect.cleandoc(doc).split("\n\n"):
        lines = para.splitlines()
        if any(line[:1].isspace() or line.lstrip().startswith(("- ", "* ", "\b")) for line in lines):
            out.append(para)
        else:
            out.append(" ".join(line.strip() for line in lines))
    return "\n\n".join(out)


def _tidy(group: typer.Typer) -> None:
    """Help without type placeholders: flags show nothing after their name, other options and arguments a name
    (LANE, TIMEOUT, ...) unless they set their own metavar; every docstring reflowed (_reflow)."""
    for info in group.registered_commands:
        cb = info.callback
        if cb is None:
            continue
        if info.help is None and cb.__doc__:
            info.help = _reflow(cb.__doc__)
        hints = typing.get_type_hints(cb)
        for name, param in inspect.signature(cb).parameters.items():
            spec = param.default
            if not isinstance(spec, (typer.models.OptionInfo, typer.models.ArgumentInfo)) or spec.metavar is not None:
                continue
            hint = hints.get(name)
            flag = hint is bool or hint == typing.Optional[bool]
            if isinstance(spec, typer.models.OptionInfo):
                spec.metavar = "" if flag else name.upper()
            else:
                spec.metavar = name.upper()
    for sub in group.registered_groups:
        if sub.typer_instance is not None:
            _tidy(sub.typer_instance)


def _plain_arguments() -> None:
    """Arguments are shown by name (LANE), without typer's type placeholder (<str>) and usage braces ({LANE})."""
    arg = getattr(typer.core, "TyperArgument", None)
    if arg is None:
        return
    if hasattr(arg, "display_type_rich"):
        arg.display_type_rich = lambda self, ctx: None
    if hasattr(arg, "_usage_display_name"):
        arg._usage_display_name = lambda self: (self.display_name_raw if self.required else
                                                f"[{self.display_name_raw}]") + ("..." if self.nargs != 1 else "")


_plain_arguments()
_tidy(app)

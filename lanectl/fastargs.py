"""The option parser of the fast start-up paths (lanectl.entry): status, probe, missions, mission show.

Its own module, standard library only, so that the typer-free renderers (lanectl.cli.missionview, ...) and the
console script share it without importing each other (lanectl.entry imports them: they must not import it).
"""
from __future__ import annotations

from collections.abc import Collection


def parse_options(argv: list[str], allowed: Collection[str]) -> tuple[dict[str, str], list[str], bool] | None:
    """``--opt VALUE`` / ``--opt=VALUE`` (each of ``allowed`` at most once), ``--json`` and positionals, or None
    for anything else (help, other options, a repeated one): the fast paths then leave the command to typer."""
    opts: dict[str, str] = {}
    args: list[str] = []
    json_out = False
    it = iter(argv)
    for arg in it:
        if arg == "--json":
            json_out = True
        elif arg.startswith("--"):
            name, eq, value = arg.partition("=")
            if name not in allowed or name in opts:
                return None
            if not eq:
                nxt = next(it, None)
                if nxt is None:
                    return None
                value = nxt
            opts[name] = value
        elif arg.startswith("-"):
            return None
        else:
            args.append(arg)
    return opts, args, json_out

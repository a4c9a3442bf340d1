"""Console-script entry point, with a fast path for the commands that cron and scripts call often.

``lanectl status`` runs every minute from probes and runbooks; the full typer application costs about 120 ms of
imports (typer, pydantic) before it does anything. When the arguments are ones the fast path understands and a
fleet is installed, it answers from the install manifest without those imports; anything else goes to typer.
"""
from __future__ import annotations

import sys


def fast_status(argv: list[str]) -> bool:
    """Run `status [LANE...] [--json] [--unit-dir DIR]` without typer; False when it must go the full way."""
    json_out, unit_dir, names = False, None, []
    it = iter(argv)
    for arg in it:
        if arg == "--json":
            json_out = True
        elif arg == "--unit-dir":
            unit_dir = next(it, None)
            if unit_dir is None:
                return False
        elif arg.startswith("--unit-dir="):
            unit_dir = arg.split("=", 1)[1]
        elif arg.startswith("-"):
            return False
        else:
            names.append(arg)
    from lanectl import manifest, paths

    data = manifest.read(paths.unit_dir(unit_dir))
    if data is None:
        return False
    from lanectl.cli.statusview import run_status
    from lanectl.errors import LanectlError
    from lanectl.output import fail
    from lanectl.status import collect

    try:
        run_status(collect(data["lanes"], names or None, data.get("supervisor")), json_out)
    except LanectlError as exc:
        fail(["status"], exc, json_out)
    return True


def main() -> None:
    argv = sys.argv[1:]
    if argv[:1] == ["status"] and fast_status(argv[1:]):
        return
    from lanectl.cli.main import app

    app(prog_name="lanectl")

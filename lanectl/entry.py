"""Console-script entry point, with a fast path for the commands that cron and scripts call often.

``lanectl status`` and ``lanectl probe`` run every minute from cron, monitoring and runbooks; the full typer
application costs about 120 ms of imports (typer, pydantic) before it does anything. When the arguments are
ones the fast path understands and a fleet is installed, they answer from the install manifest without those
imports; ``lanectl missions`` and ``lanectl mission show ID`` likewise (lanectl.cli.missionview); anything else
goes to typer.
"""
from __future__ import annotations

import sys

from lanectl.fastargs import parse_options

FAST = ("status", "probe")
READS = ("missions", "mission")


def fast(command: str, argv: list[str]) -> bool:
    """Run status or probe without typer; False when it must go the full way."""
    parsed = parse_options(argv, ("--unit-dir",))
    if parsed is None:
        return False
    opts, names, json_out = parsed
    unit_dir = opts.get("--unit-dir")
    from lanectl import manifest, paths

    data = manifest.read(paths.unit_dir(unit_dir))
    if data is None:
        return False
    from lanectl.errors import LanectlError

    try:
        data = {**data, "ledger": manifest.ledger(data)}
    except LanectlError as exc:  # $LANECTL_LEDGER is a URL that cannot be used (a password in it, ...)
        if command == "probe":
            from lanectl.cli.probeview import unknown

            unknown(exc.message, json_out, exc.code)
        from lanectl.output import fail

        fail(["status"], exc, json_out)
    if command == "probe":
        from lanectl.cli.probeview import run_probe

        run_probe(data, names or None, json_out, paths.unit_dir(unit_dir))
        return True
    from lanectl.cli.statusview import run_status
    from lanectl.output import fail
    from lanectl.status import collect

    try:
        fleet: dict = {}
        run_status(collect(data["lanes"], names or None, data.get("supervisor"), ledger=data.get("ledger"),
                           unit_dir=paths.unit_dir(unit_dir), host=data.get("host"), fleet=fleet), json_out, fleet)
    except LanectlError as exc:
        fail(["status"], exc, json_out)
    return True


def main() -> None:
    argv = sys.argv[1:]
    if argv[:1] and argv[0] in FAST and fast(argv[0], argv[1:]):
        return
    if argv[:1] and argv[0] in READS:
        from lanectl.cli.missionview import fast as fast_read

        if fast_read(argv[0], argv[1:]):
            return
    from lanectl.cli.main import app

    app(prog_name="lanectl")

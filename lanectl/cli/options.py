"""Options shared by many commands (defaults are never computed from the environment at import time)."""
from __future__ import annotations

import typer

CONFIG = typer.Option(None, "--config", "-c", metavar="DIR",
                      help="Directory with lanectl.toml and lanes.d/ (or a lanes.d directory).",
                      show_default="$LANECTL_CONFIG_DIR or /etc/lanectl")
UNIT_DIR = typer.Option(None, "--unit-dir", metavar="DIR", help="Where units are installed.",
                        show_default="$LANECTL_UNIT_DIR or /etc/systemd/system")
JSON = typer.Option(False, "--json", help="Print one JSON document (the lanectl_json envelope) on stdout.")
LEDGER = typer.Option(None, "--ledger", metavar="PATH|URL", show_default=False,
                      help="The ledger: a file, or a postgresql:// URL (default: see 'lanectl --help').")
"""The one --ledger of every command; how the file is found without it (lanectl.paths.LEDGER_DEFAULT) is said
once, in the application's help, and resolved once (lanectl.paths.ledger_path)."""


def complete_lanes(incomplete: str) -> list[str]:
    """Shell completion of lane names for the verbs that act on running lanes: the installed fleet's (the manifest
    beside the units, no configuration parsed: completion runs on every TAB)."""
    from lanectl import manifest, paths

    data = manifest.read(paths.unit_dir()) or {}
    lanes = data.get("lanes") if isinstance(data.get("lanes"), dict) else {}
    return [n for n in sorted(lanes) if n.startswith(incomplete)]


def complete_lane_files(incomplete: str) -> list[str]:
    """Shell completion of lane names for the verbs on lane files (lane show, lane remove, submit --lane): the
    files in lanes.d of the default configuration, whether installed or not."""
    from lanectl import paths

    try:
        names = {p.stem for p in (paths.config_dir() / "lanes.d").glob("*.toml")}
    except OSError:
        names = set()
    return [n for n in sorted(names) if n.startswith(incomplete)]

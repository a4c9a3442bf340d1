"""Options shared by many commands (defaults are never computed from the environment at import time)."""
from __future__ import annotations

import typer

CONFIG = typer.Option(None, "--config", "-c", metavar="DIR",
                      help="Directory with lanectl.toml and lanes.d/ (or a lanes.d directory).",
                      show_default="$LANECTL_CONFIG_DIR or /etc/lanectl")
UNIT_DIR = typer.Option(None, "--unit-dir", metavar="DIR", help="Where units are installed.",
                        show_default="$LANECTL_UNIT_DIR or /etc/systemd/system")
JSON = typer.Option(False, "--json", help="Print one JSON document (the lanectl_json envelope) on stdout.")

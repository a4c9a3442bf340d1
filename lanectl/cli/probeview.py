"""Rendering of `lanectl probe` (no typer here: the fast start-up path uses it too)."""
from __future__ import annotations

import sys
from typing import Any

from lanectl.output import envelope, print_json


def run_probe(manifest: dict[str, Any], lanes: list[str] | None, json_out: bool, unit_dir: Any = None) -> None:
    """Print the probe's one status line (or the JSON envelope) and exit with its monitoring-plugins code."""
    from lanectl import probe

    try:
        res = probe.run(manifest, lanes, unit_dir=unit_dir)
    except Exception as exc:  # a probe must answer UNKNOWN, never a traceback, whatever broke
        line = f"LANECTL UNKNOWN - probe failed: {type(exc).__name__}: {exc}"
        if json_out:
            print_json(envelope(["probe"], {"status": "UNKNOWN", "code": 3, "line": line}, 3, status="error"))
        else:
            print(line)
        raise SystemExit(probe.UNKNOWN) from None
    if json_out:
        print_json(envelope(["probe"], res.as_dict(), res.code, status="ok" if res.code == 0 else "error"))
    else:
        sys.stdout.write(res.line() + "\n")
        sys.stdout.flush()
    raise SystemExit(res.code)

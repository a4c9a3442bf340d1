"""Rendering of `lanectl probe` (no typer here: the fast start-up path uses it too)."""
from __future__ import annotations

import sys
from typing import Any, NoReturn

from lanectl.output import envelope, print_json


def run_probe(manifest: dict[str, Any], lanes: list[str] | None, json_out: bool, unit_dir: Any = None) -> None:
    """Print the probe's one status line (or the JSON envelope) and exit with its monitoring-plugins code."""
    from lanectl import probe

    try:
        res = probe.run(manifest, lanes, unit_dir=unit_dir)
    except Exception as exc:  # a probe must answer UNKNOWN, never a traceback, whatever broke
        unknown(f"probe failed: {type(exc).__name__}: {exc}", json_out, "probe_failed")
    if json_out:
        print_json(envelope(["probe"], res.as_dict(), res.code, status="ok" if res.code == 0 else "error"))
    else:
        sys.stdout.write(res.line() + "\n")
        sys.stdout.flush()
    raise SystemExit(res.code)


def unknown(why: str, json_out: bool, code: str) -> NoReturn:
    """Answer UNKNOWN (exit 3) with ``why``: the one status line, or with --json the envelope around it, the
    reason in its errors as ``code`` (never a plain line: a script that asked for JSON parses what comes)."""
    from lanectl.errors import Problem
    from lanectl.probe import UNKNOWN

    line = f"LANECTL UNKNOWN - {why}"
    if json_out:
        print_json(envelope(["probe"], {"status": "UNKNOWN", "code": UNKNOWN, "line": line}, UNKNOWN,
                            [Problem(why, code=code)], status="error"))
    else:
        sys.stdout.write(line + "\n")
        sys.stdout.flush()
    raise SystemExit(UNKNOWN)

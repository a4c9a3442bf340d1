"""The installed fleet as plain JSON beside the units, so that status and probes start without pydantic."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from lanectl import paths


def read(unit_dir: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(paths.manifest_path(unit_dir).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and data.get("lanectl_manifest") == 1 else None


def ledger(data: dict[str, Any], override: str | None = None) -> str | None:
    """The installed fleet's ledger file, found like every other command's (``paths.ledger_path``): --ledger
    (``override``), else $LANECTL_LEDGER, else the one lanectl.toml named at install (the manifest records it,
    so that the fast paths read no configuration); None when none of them names one."""
    recorded = data.get("ledger") if isinstance(data.get("ledger"), str) else None
    if not (override or recorded or os.environ.get("LANECTL_LEDGER")):
        return None
    return str(paths.ledger_path(override, recorded))

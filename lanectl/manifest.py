"""The installed fleet as plain JSON beside the units, so that status and probes start without pydantic."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lanectl import paths


def read(unit_dir: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(paths.manifest_path(unit_dir).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and data.get("lanectl_manifest") == 1 else None

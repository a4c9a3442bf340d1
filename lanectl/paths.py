"""Every location lanectl uses, resolved in one place (environment overrides, then FHS defaults)."""
from __future__ import annotations

import os
from pathlib import Path

DEFAULT_CONFIG_DIR = Path("/etc/lanectl")
DEFAULT_UNIT_DIR = Path("/etc/systemd/system")
DEFAULT_STATE_DIR = Path("/var/lib/lanectl")
DEFAULT_WORKSPACE_ROOT = Path("/var/lib/lanes")
MANIFEST_NAME = "lanectl-fleet.json"
SECRET_NAME = "callback.key"


def config_dir(override: str | Path | None = None) -> Path:
    """The directory holding ``lanectl.toml`` and ``lanes.d/``."""
    if override:
        return Path(override)
    return Path(os.environ.get("LANECTL_CONFIG_DIR") or DEFAULT_CONFIG_DIR)


def unit_dir(override: str | Path | None = None) -> Path:
    if override:
        return Path(override)
    return Path(os.environ.get("LANECTL_UNIT_DIR") or DEFAULT_UNIT_DIR)


def state_dir() -> Path:
    """``$STATE_DIRECTORY`` (set by systemd for the supervisor), else ``/var/lib/lanectl``."""
    env = os.environ.get("LANECTL_STATE_DIR") or os.environ.get("STATE_DIRECTORY", "").split(":")[0]
    return Path(env) if env else DEFAULT_STATE_DIR


def ledger_path(override: str | Path | None = None) -> Path:
    if override:
        return Path(override)
    env = os.environ.get("LANECTL_LEDGER")
    return Path(env) if env else state_dir() / "ledger.db"


def manifest_path(units: Path) -> Path:
    """The resolved fleet written at install time, beside the units (read by fast status paths)."""
    return units / MANIFEST_NAME


def secret_path(cfg_dir: Path) -> Path:
    return cfg_dir / SECRET_NAME

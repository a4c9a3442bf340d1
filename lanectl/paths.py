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


LEDGER_DEFAULT = ("$LANECTL_LEDGER, else ledger= in lanectl.toml ([ledger] path), else ledger.db in "
                  "$STATE_DIRECTORY (set by systemd for the supervisor) or state_dir= (/var/lib/lanectl)")
"""How the ledger file is found when --ledger does not name it, in words: the one place people read it
(``lanectl --help``, docs/cli.md) and ``ledger_path`` implements it."""


def ledger_path(override: str | Path | None = None, configured: str | Path | None = None,
                state: str | Path | None = None) -> Path | str:
    """The ledger, resolved here and nowhere else (LEDGER_DEFAULT): ``override`` (--ledger), else
    ``$LANECTL_LEDGER``, else ``configured`` (ledger= in lanectl.toml, or the install manifest's record of it: the
    fast paths read no configuration), else ``ledger.db`` in ``$STATE_DIRECTORY``/``$LANECTL_STATE_DIR`` when
    systemd set one, else in ``state`` (state_dir= in lanectl.toml), else in /var/lib/lanectl. A
    ``postgresql://`` URL is returned checked, as a ``str`` (``lanectl.ledgerurl``); a path means SQLite."""
    chosen = override or os.environ.get("LANECTL_LEDGER") or configured
    if chosen:
        if isinstance(chosen, str) and chosen.startswith(("postgresql:", "postgres:")):  # URL, or a malformed one
            from lanectl.ledgerurl import check_url

            return check_url(chosen)
        return Path(chosen)
    if state is not None and not os.environ.get("STATE_DIRECTORY"):
        return Path(state) / "ledger.db"
    return state_dir() / "ledger.db"


def manifest_path(units: Path) -> Path:
    """The resolved fleet written at install time, beside the units (read by fast status paths)."""
    return units / MANIFEST_NAME


def secret_path(cfg_dir: Path) -> Path:
    return cfg_dir / SECRET_NAME

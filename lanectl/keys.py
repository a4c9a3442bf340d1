"""Secrets: one box secret (generated at install, mode 0600, root only) and a dispatch key per lane derived from it.

The supervisor authenticates to a lane with the lane's key (``Authorization: Bearer``), so no other local process
can push missions into a lane. systemd (PID 1, as root) reads each lane's key file when it starts the lane
(``EnvironmentFile=``) and hands the lane its own key in ``LANECTL_DISPATCH_KEY``, which the runtime removes from
its environment at once so that mission processes do not inherit it. Lanes cannot read the box secret or any key
file (mode 0600 root, and ``InaccessiblePaths=`` of the state directory). ``LoadCredential=`` would be the
idiomatic channel, but under systemd 252 in a container without ramfs it leaves the credential unreadable for
the service's user (docs/decisions.md). Callbacks come over the supervisor's unix socket, from the uid of the lane
they name (SO_PEERCRED), and are fenced by the per-attempt token the ledger issues, which the lane received with
the dispatch (docs/supervisor.md, "Authentication").
"""
from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from pathlib import Path

from lanectl.fsutil import atomic_write, read_text_or_none

SECRET_FILE = "secret.key"
KEYS_DIR = "keys"


def key_path(state_dir: Path | str, lane: str) -> Path:
    return Path(state_dir) / KEYS_DIR / f"{lane}.env"


def ensure_secret(state_dir: Path) -> tuple[bytes, bool]:
    """The box secret, created (0600) when missing; (secret, created)."""
    path = state_dir / SECRET_FILE
    text = read_text_or_none(path)
    if text and len(text.strip()) >= 64:
        return bytes.fromhex(text.strip()), False
    if not state_dir.exists():  # a directory lanectl did not create keeps its owner and mode
        state_dir.mkdir(parents=True)
        os.chmod(state_dir, 0o750)
    raw = secrets.token_bytes(32)
    atomic_write(path, raw.hex() + "\n", 0o600)
    return raw, True


def lane_key(secret: bytes, lane: str) -> str:
    return hmac.new(secret, f"lanectl-dispatch:{lane}".encode(), hashlib.sha256).hexdigest()


def write_lane_keys(state_dir: Path, lanes: list[str]) -> list[str]:
    """Write each lane's key (0600, root) where its unit's LoadCredential= reads it; returns the lanes changed."""
    secret, _ = ensure_secret(state_dir)
    keys = state_dir / KEYS_DIR
    if not keys.exists():
        keys.mkdir()
        os.chmod(keys, 0o700)
    changed = []
    for lane in lanes:
        want = f"LANECTL_DISPATCH_KEY={lane_key(secret, lane)}\n"
        if read_text_or_none(key_path(state_dir, lane)) != want:
            atomic_write(key_path(state_dir, lane), want, 0o600)
            changed.append(lane)
    return changed


def read_lane_keys(state_dir: Path, lanes: list[str]) -> dict[str, str]:
    secret, _ = ensure_secret(state_dir)
    return {lane: lane_key(secret, lane) for lane in lanes}

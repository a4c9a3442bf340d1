"""Progress where people wait (issue 14, item 2): on a terminal the waiting commands say what they wait for;
piped or with --json their output is exactly what it is without it."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lanectl import lifecycle
from lanectl.client import Client
from lanectl.config import load
from lanectl.dispatch import Assignment
from lanectl.ledger import Ledger
from lanectl.ledger import missions as ms
from tests.conftest import ROOT


@pytest.fixture
def cfg(fleet_dir: Path, tmp_path: Path) -> Path:
    with open(fleet_dir / "lanectl.toml", "a") as fh:
        fh.write(f'\n[ledger]\npath = "{tmp_path / "ledger.db"}"\n')
    Ledger.open(tmp_path / "ledger.db").close()
    return fleet_dir


def lanectl(args: list[str], tty: bool) -> subprocess.CompletedProcess[str]:
    """The CLI of this checkout; on a pseudo-terminal (script(1)) when ``tty``."""
    cmd = [sys.executable, "-m", "lanectl", *args]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "120", "TERM": "xterm"}
    if tty:
        import shlex

        cmd = ["script", "-qec", " ".join(shlex.quote(c) for c in cmd), "/dev/null"]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=60, cwd=ROOT)


def test_mission_show_wait_says_what_it_waits_for_on_a_terminal_only(cfg: Path) -> None:
    with Client(config_dir=cfg) as c:
        mid = c.submit("background", {"argv": ["true"]}).id  # no supervisor: it stays queued
    args = ["mission", "show", str(mid), "--wait", "--timeout", "1.5", "-c", str(cfg)]
    on_tty = lanectl(args, tty=True)
    assert on_tty.returncode == 7, on_tty
    assert f"mission {mid}: queued" in on_tty.stdout  # script(1) puts the terminal's stderr on its stdout
    piped = lanectl(args, tty=False)
    assert piped.returncode == 7
    assert f"mission {mid}: queued" not in piped.stdout + piped.stderr
    as_json = lanectl([*args, "--json"], tty=True)
    assert as_json.returncode == 7 and f"mission {mid}: queued" not in as_json.stdout


def test_wait_drained_tells_what_is_still_in_flight(cfg: Path) -> None:
    fleet = load(str(cfg))
    with Client(config_dir=cfg) as c:
        led = c.ledger
        mid = c.submit("interactive", {"argv": ["true"]}, lane="alpha").id
        ms.assign(led, [Assignment(mid, "alpha", "interactive")], now=time.time(), lease_sec=600)
        path = led.path
    said: list[str] = []
    left = lifecycle.wait_drained(path, "alpha", 0.5, poll=0.1, progress=said.append)
    assert left == [mid] and said
    assert said[-1].startswith(f"draining alpha: 1 mission(s) in flight (missions {mid}); ") and "left of the " \
        "timeout" in said[-1]
    assert fleet.lanes["alpha"]

from __future__ import annotations

from pathlib import Path

import pytest

from lanectl.config import ClassPolicy, Lane, LaneSet, Quota, Settings
from lanectl.ledger import Ledger

T0 = 1_700_000_000.0


def make_fleet(tmp: Path, **class_overrides: ClassPolicy) -> LaneSet:
    lanes = {
        "alpha": Lane(port=9001, workspace="/var/lib/lanes/alpha", capacity=2),
        "beta": Lane(port=9002, workspace="/var/lib/lanes/beta", capacity=2, fallback="alpha"),
        "gamma": Lane(port=9003, workspace="/var/lib/lanes/gamma", capacity=1, tags=["gpu"],
                      classes=["background", "deadline"], quotas={"background": Quota(rate_per_minute=2)}),
    }
    classes = {
        "interactive": ClassPolicy(max_wait_sec=30, queue_limit=50),
        "deadline": ClassPolicy(max_wait_sec=120, queue_limit=50),
        "background": ClassPolicy(max_wait_sec=600, queue_limit=50, max_attempts=2),
    }
    classes.update(class_overrides)
    return LaneSet(lanes, Settings(classes=classes), tmp, tmp / "lanes.d")


@pytest.fixture
def fleet(tmp_path: Path) -> LaneSet:
    return make_fleet(tmp_path)


@pytest.fixture
def led(tmp_path: Path):
    ledger = Ledger.open(tmp_path / "state" / "ledger.db")
    yield ledger
    ledger.close()

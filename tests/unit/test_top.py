"""lanectl.top's rendering at every terminal width, over a real ledger (the live loop: tests/systemd/test_top_pty.py)."""
from __future__ import annotations

import io
from pathlib import Path

import pytest
from rich.console import Console

from lanectl import top
from lanectl.ledger import Ledger
from lanectl.ledger import missions as ms
from lanectl.healthcheck import Health
from lanectl.status import LaneStatus
from tests.unit.test_evidence import T0, add, make_fleet


def lane(name: str, *, active: str = "active", sub: str = "running", ok: bool = True) -> LaneStatus:
    r = LaneStatus(name, f"lanectl-lane@{name}.service", True, 9000)
    r.active_state, r.sub_state, r.health = active, sub, Health(ok=ok, listening=ok)
    r.restarts, r.memory_bytes, r.cpu_seconds, r.watchdog_sec, r.watchdog_ping_age_s = 2, 50 << 20, 3.0, 5.0, 0.4
    r.uptime_s = 3700.0
    return r


@pytest.fixture
def frame(tmp_path: Path) -> top.Frame:
    led = Ledger.open(tmp_path / "ledger.db")
    fleet = make_fleet(tmp_path)
    with led.transaction() as conn:
        for i in range(1, 21):
            add(conn, i, lane="alpha", created=T0 + i, wait=i / 10, outcome="failed" if i == 20 else "succeeded")
    ms.set_lane(led, "alpha", now=T0, healthy=True)
    ms.set_lane(led, "beta", now=T0, state="drained", healthy=False)
    ms.submit(led, fleet, cls="interactive", payload={}, now=T0 + 100)
    src = top.Source({"lanes": {"alpha": {"capacity": 2}, "beta": {"capacity": 4}}}, str(tmp_path / "ledger.db"))
    f = top.Frame(T0 + 130)
    f.rows = [lane("alpha"), lane("beta", active="inactive", sub="dead", ok=False),
              LaneStatus("supervisor", "lanectl-supervisor.service", True, 8700, kind="supervisor")]
    f.cpu_now = {"alpha": 12.5}
    from lanectl import evidence
    f.metrics = evidence.metrics(src.ledger(), 300, T0 + 130, capacity=src.capacity)
    f.events = evidence.events(src.ledger(), limit=50, latest=True)
    src.close()
    led.close()
    return f


def screen(f: top.Frame, width: int, height: int) -> list[str]:
    out = io.StringIO()
    Console(file=out, width=width, height=height, color_system=None, highlight=False).print(
        top.render(f, width, height))
    return out.getvalue().splitlines()


def line_of(lines: list[str], name: str) -> str:
    return next(line for line in lines if line.strip().startswith(name))


@pytest.mark.parametrize("width", [132, 100, 80, 60, 46, 30])
def test_every_width_fits_and_keeps_each_lane(frame: top.Frame, width: int) -> None:
    lines = screen(frame, width, 40)
    assert all(len(line) <= width for line in lines), "\n".join(lines)
    assert line_of(lines, "alpha") and line_of(lines, "beta") and line_of(lines, "(sup")
    if width < 40:
        return  # lane, state and in flight stay, truncated
    assert line_of(lines, "(supervisor)")
    assert "active" in line_of(lines, "alpha")
    assert "down" in line_of(lines, "beta") and "drained" in line_of(lines, "beta")  # what is wrong, and why
    assert "interactive" in "\n".join(lines)


def test_wide_screen_shows_every_column(frame: top.Frame) -> None:
    lines = screen(frame, 132, 40)
    alpha = line_of(lines, "alpha")
    for cell in ("0/2", "active/running", "12.5%", "50.0M", "0.4/5s", "ok", "1h1m"):
        assert cell in alpha, alpha
    assert "1/2 lanes up" in lines[0] and "1 queued" in lines[0]
    oldest = line_of(lines, "interactive")
    assert "30.0s" in oldest and "1.9s" in oldest  # waits 30 s now; p95 of 0.1..1.9 s over the window
    assert "last events" in lines and any("submitted mission=21" in line for line in lines)


def test_narrow_screen_drops_columns_from_the_right(frame: top.Frame) -> None:
    lines = screen(frame, 46, 40)
    head = next(line for line in lines if "lane" in line and "state" in line)
    assert "flight" in head and "unit" not in head and "watchdog" not in head


def test_events_fill_only_the_height_left(frame: top.Frame) -> None:
    tall, short = screen(frame, 132, 60), screen(frame, 132, 18)
    assert len(tall) <= 60 and len(short) <= 18, (len(tall), len(short))
    assert sum("mission=" in line for line in tall) > sum("mission=" in line for line in short)


def test_a_ledger_that_is_gone_is_shown_not_raised(tmp_path: Path) -> None:
    src = top.Source({"lanes": {}, "supervisor": None}, str(tmp_path / "missing.db"))
    f = src.frame()
    assert any(e.startswith("ledger: ledger ") and "does not exist" in e for e in f.errors)
    assert "ledger:" in "\n".join(screen(f, 80, 20))

"""lanectl events, metrics, report through typer's CliRunner (a local app with lanectl.cli.evidence.register)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import typer
from typer.testing import CliRunner

from lanectl import evidence
from lanectl.ledger import Ledger
from lanectl.ledger.events import EventKind, append
from tests.unit.test_evidence import T0, add, parse_prometheus


@pytest.fixture
def led(tmp_path: Path):
    ledger = Ledger.open(tmp_path / "state" / "ledger.db")
    yield ledger
    ledger.close()


@pytest.fixture
def cli_app() -> typer.Typer:
    from lanectl.cli.evidence import register

    app = typer.Typer()
    register(app)
    return app


@pytest.fixture
def config_dir(tmp_path: Path) -> Path:
    d = tmp_path / "etc"
    (d / "lanes.d").mkdir(parents=True)
    (d / "lanectl.toml").write_text("")
    for name, port, cap in (("alpha", 8701, 2), ("beta", 8702, 4)):
        (d / "lanes.d" / f"{name}.toml").write_text(f'port = {port}\nworkspace = "/var/lib/lanes/{name}"\n'
                                                     f"capacity = {cap}\n")
    return d


def test_cli_events_metrics_report(cli_app: typer.Typer, led: Ledger, config_dir: Path, tmp_path: Path) -> None:
    import time

    now = time.time()
    with led.transaction() as conn:
        for i in range(1, 11):
            add(conn, i, created=now - 600 + i, wait=0.5, outcome="failed" if i == 10 else "succeeded")
        append(conn, EventKind.DRAIN, now - 60, lane="alpha", actor="alice", reason="spike")
    runner = CliRunner()
    common = ["--ledger", str(led.path), "--config", str(config_dir)]

    r = runner.invoke(cli_app, ["events", *common, "--kind", "drain", "--kind", "failed", "--since", "1h", "--json"])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert doc["lanectl_json"] == 1 and doc["command"] == ["events"]
    assert [e["kind"] for e in doc["data"]["events"]] == ["failed", "drain"]

    r = runner.invoke(cli_app, ["events", *common, "--lane", "alpha", "--limit", "2"])
    assert r.exit_code == 0 and "drain" in r.stdout

    r = runner.invoke(cli_app, ["events", *common, "--since", "yesterday-ish", "--json"])
    assert r.exit_code == 2 and json.loads(r.stdout)["errors"][0]["code"] == "bad_time"

    prom = tmp_path / "tf" / "lanectl.prom"
    r = runner.invoke(cli_app, ["metrics", *common, "--window", "15m", "--json", "--textfile", str(prom)])
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)["data"]
    alpha = next(x for x in data["lanes"] if x["lane"] == "alpha")
    assert alpha["finished"] == 10 and alpha["failure_rate"] == pytest.approx(0.1) and alpha["capacity"] == 2
    assert data["window_s"] == 900
    assert parse_prometheus(prom.read_text())["types"]["lanectl_failure_rate"] == "gauge"

    r = runner.invoke(cli_app, ["metrics", *common, "--window", "1h", "--lane", "alpha"])
    assert r.exit_code == 0 and "alpha" in r.stdout

    r = runner.invoke(cli_app, ["metrics", *common, "--lane", "nope"])
    assert r.exit_code == 4

    out = tmp_path / "report.md"
    r = runner.invoke(cli_app, ["report", *common, "--since", "24h", "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert "| alice | spike |" in out.read_text()
    r = runner.invoke(cli_app, ["report", *common, "--since", "2h"])
    assert r.exit_code == 0 and r.stdout.startswith("# lanectl report")


def test_cli_follow_ndjson(cli_app: typer.Typer, led: Ledger, config_dir: Path, monkeypatch) -> None:
    from lanectl.cli import evidence as cli_ev

    with led.transaction() as conn:
        append(conn, EventKind.DRAIN, T0, lane="alpha", actor="a")
        append(conn, EventKind.UNDRAIN, T0 + 1, lane="alpha", actor="a")
    calls = {"n": 0}
    real = evidence.follow

    def short_follow(*args: Any, **kw: Any):  # stop after the first idle poll
        kw["stop"] = lambda: calls.__setitem__("n", calls["n"] + 1) or calls["n"] > 2
        kw["sleep"] = lambda s: None
        return real(*args, **kw)

    monkeypatch.setattr(cli_ev.evidence, "follow", short_follow)
    r = CliRunner().invoke(cli_app, ["events", "--ledger", str(led.path), "--config", str(config_dir),
                                     "--follow", "--json"])
    assert r.exit_code == 0, r.output
    lines = [json.loads(x) for x in r.stdout.splitlines()]
    assert [x["kind"] for x in lines] == ["drain", "undrain"]


def test_events_say_on_stderr_when_more_match_than_they_print(cli_app: typer.Typer, led: Ledger,
                                                              config_dir: Path) -> None:
    """Found by an attack (issue 15 follow-up F5): `events --since 1h` printed the first 100 matches and said
    nothing, so on a busy box the runbooks' `events --lane alpha --since 1h` hid the newest events."""
    import time

    now = time.time()
    with led.transaction() as conn:
        for i in range(5):
            append(conn, EventKind.DRAIN, now - 600 + i, lane="alpha", actor="alice", reason=f"r{i}")
    ids = [e["id"] for e in evidence.events(led, lane="alpha")]
    runner = CliRunner()
    common = ["--ledger", str(led.path), "--config", str(config_dir), "--lane", "alpha"]

    # --since: the first 3 of the window, and stderr says where the next page starts
    r = runner.invoke(cli_app, ["events", *common, "--since", "1h", "--limit", "3"])
    assert r.exit_code == 0, r.output
    assert [f"#{i}" in r.stdout for i in ids] == [True, True, True, False, False], r.stdout
    assert f"next page: --after {ids[2]}" in r.stderr and "#" not in r.stderr, r.stderr
    r = runner.invoke(cli_app, ["events", *common, "--since", "1h", "--limit", "3", "--after", str(ids[2])])
    assert r.exit_code == 0 and f"#{ids[3]}" in r.stdout and f"#{ids[4]}" in r.stdout and r.stderr == "", r.stderr

    # the last LIMIT (no --since): stderr says older ones are hidden
    r = runner.invoke(cli_app, ["events", *common, "--limit", "2"])
    assert [f"#{i}" in r.stdout for i in ids] == [False, False, False, True, True], r.stdout
    assert "older matching events not shown" in r.stderr, r.stderr

    # everything printed: nothing on stderr (the runbooks' "expect none" stays silent too)
    for args in (["--since", "1h", "--limit", "5"], ["--limit", "5"], ["--kind", "requeued", "--since", "10m"]):
        r = runner.invoke(cli_app, ["events", *common, *args])
        assert r.exit_code == 0 and r.stderr == "", (args, r.stderr)

    # --json: the envelope as before, with data.more
    r = runner.invoke(cli_app, ["events", *common, "--since", "1h", "--limit", "3", "--json"])
    data = json.loads(r.stdout)["data"]
    assert data["count"] == 3 and data["next_after"] == ids[2] and data["more"] is True and r.stderr == ""
    r = runner.invoke(cli_app, ["events", *common, "--since", "1h", "--limit", "5", "--json"])
    data = json.loads(r.stdout)["data"]
    assert data["count"] == 5 and data["more"] is False

"""The fast path of ``lanectl missions`` and ``lanectl mission show`` (lanectl.cli.missionview) must answer exactly
as the typer application does, and hand everything it does not understand to it."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from lanectl.cli.main import app
from lanectl.config import ClassPolicy, Lane, LaneSet, Settings
from lanectl.ledger import Ledger, tick
from lanectl.ledger import missions as ms

ROOT = Path(__file__).resolve().parents[2]
T0 = 1_700_000_000.0


@pytest.fixture(scope="module")
def ledger(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("reads")
    lanes = {"alpha": Lane(port=9201, workspace="/var/lib/lanes/alpha", capacity=2)}
    fleet = LaneSet(lanes, Settings(classes={c: ClassPolicy() for c in ms.CLASSES}), base, base)
    path = base / "ledger.db"
    with Ledger.open(path) as led:
        ms.submit_many(led, fleet, [ms.SubmitRequest("background", {"argv": ["true"], "i": i},
                                                     session="alpha:s1" if i % 3 == 0 else None)
                                    for i in range(7)], now=T0)
        ms.submit(led, fleet, cls="interactive", payload={"x": "ünï"}, now=T0)
        tick.run_once(led, fleet, now=T0 + 1)
    return path


def fast(argv: list[str], env: dict[str, str]) -> tuple[int, str, bool]:
    """Run the fast path in a fresh interpreter; also report whether typer was imported."""
    code = ("import sys; from lanectl.entry import main\n"
            "try:\n    main()\nfinally:\n    sys.stderr.write('TYPER=%d' % ('typer' in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, cwd=ROOT,
                          env={"PATH": "/usr/bin:/bin", "COLUMNS": "200", "LANECTL_UNIT_DIR": "/nonexistent",
                               **env})
    return proc.returncode, proc.stdout, proc.stderr.endswith("TYPER=1")


def slow(argv: list[str], env: dict[str, str]) -> tuple[int, str]:
    res = CliRunner().invoke(app, argv, env={"COLUMNS": "200", "LANECTL_UNIT_DIR": "/nonexistent", **env},
                             prog_name="lanectl")
    return res.exit_code, res.stdout


CASES = [
    ["missions", "--json"],
    ["missions", "--state", "queued", "--json"],
    ["missions", "--state=dispatched", "--json"],
    ["missions", "--class", "background", "--limit", "2", "--after", "1", "--json"],
    ["missions", "--session", "alpha:s1", "--json"],
    ["missions", "--lane", "alpha", "--json"],
    ["missions", "--state", "bogus", "--json"],
    ["missions", "--class", "urgent", "--json"],
    ["mission", "show", "8", "--json"],
    ["mission", "show", "1", "--json"],
    ["mission", "show", "99", "--json"],
    ["missions", "--state", "queued"],
    ["mission", "show", "2"],
]


@pytest.mark.parametrize("argv", CASES, ids=[" ".join(a) for a in CASES])
def test_fast_path_answers_like_typer_without_importing_it(ledger: Path, argv: list[str]) -> None:
    env = {"LANECTL_LEDGER": str(ledger)}
    code, out, typer_loaded = fast(argv, env)
    assert not typer_loaded
    assert (code, out) == slow(argv, env)
    if "--json" in argv:
        doc = json.loads(out)
        assert doc["exit_code"] == code


@pytest.mark.parametrize("argv", [
    ["missions", "--help"],
    ["missions", "--limit", "0", "--json"],
    ["missions", "--limit", "many"],
    ["missions", "--state", "queued", "--state", "failed"],
    ["missions", "--colour", "red"],
    ["mission", "show", "1", "--wait", "--timeout", "0.1", "--json"],
    ["mission", "show", "--json"],
    ["mission", "cancel", "1", "--json"],
], ids=lambda a: " ".join(a))
def test_anything_else_goes_to_typer(ledger: Path, argv: list[str]) -> None:
    code, _, typer_loaded = fast(argv, {"LANECTL_LEDGER": str(ledger)})
    assert typer_loaded


def test_without_a_known_ledger_typer_reads_the_configuration(ledger: Path, tmp_path: Path) -> None:
    conf = tmp_path / "conf"
    conf.mkdir()
    (conf / "lanectl.toml").write_text(f'ledger = "{ledger}"\n')  # never the host's /var/lib/lanectl
    code, out, typer_loaded = fast(["missions", "--json"], {"LANECTL_CONFIG_DIR": str(conf)})
    assert typer_loaded and code == 0 and len(json.loads(out)["data"]["missions"]) == 8
    code, out, typer_loaded = fast(["missions", "--json", "--ledger", str(ledger)], {})
    assert code == 0 and not typer_loaded and len(json.loads(out)["data"]["missions"]) == 8


def test_the_install_manifest_names_the_ledger(ledger: Path, tmp_path: Path) -> None:
    (tmp_path / "lanectl-fleet.json").write_text(json.dumps({"lanectl_manifest": 1, "ledger": str(ledger),
                                                             "lanes": {}}))
    code, out, typer_loaded = fast(["mission", "show", "8", "--json"], {"LANECTL_UNIT_DIR": str(tmp_path)})
    assert code == 0 and not typer_loaded and json.loads(out)["data"]["payload"] == {"x": "ünï"}

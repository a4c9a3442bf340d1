"""Found by an attack (issue 15 follow-up F8): `status -c /etc/lanectl-typo` was refused (exit 3) but `missions`
and `events` with the same typo read the default (production) ledger and exited 0. Every command now refuses a
--config/-c directory that does not exist alike: exit 3, code config_dir_missing, naming the path; also when the
ledger is named with --ledger (the typo would otherwise go unnoticed)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from lanectl.cli.main import app
from lanectl.errors import ExitCode
from lanectl.ledger import Ledger
from lanectl.ledger import missions as ms

ROOT = Path(__file__).resolve().parents[2]

# every command that takes --config, with the arguments it needs (--ledger where it takes one)
COMMANDS = [
    (["missions"], True), (["events"], True), (["metrics"], True), (["report"], True),
    (["submit", "--", "true"], True), (["dispatch", "--once"], True),
    (["mission", "show", "1"], True), (["mission", "cancel", "1"], True), (["mission", "retry", "1"], True),
    (["mission", "explain", "1"], True), (["mission", "logs", "1"], True),
    (["lane", "show", "alpha"], False), (["lane", "remove", "alpha"], True), (["lane", "add", "zeta"], False),
    (["lane", "list"], False), (["validate"], False),
    (["drain", "alpha"], True), (["undrain", "alpha"], True), (["reroute", "alpha", "--to", "beta"], True),
    (["promote", "alpha", "--weight", "200"], True), (["drill", "alpha"], True),
    (["ledger", "init"], True), (["ledger", "prune", "--older-than", "30d", "--archive", "/nonexistent/a.gz"], True),
    (["status"], False), (["render"], False), (["install"], False), (["up"], False), (["down"], False),
    (["restart", "alpha"], True), (["apply"], True),
]


@pytest.fixture
def ledger(tmp_path: Path) -> Path:
    path = tmp_path / "ledger.db"
    with Ledger.open(path) as led:
        led.conn.execute("SELECT 1")
    return path


@pytest.mark.parametrize("argv,takes_ledger", COMMANDS, ids=lambda a: " ".join(a) if isinstance(a, list) else "")
@pytest.mark.parametrize("flag", ["-c", "--config"])
def test_a_config_dir_that_does_not_exist_is_refused_by_every_command(argv: list[str], takes_ledger: bool,
                                                                      flag: str, ledger: Path,
                                                                      tmp_path: Path) -> None:
    typo = tmp_path / "lanectl-typo"
    extra = ["--ledger", str(ledger)] if takes_ledger else []
    if "--" in argv:
        i = argv.index("--")
        args = [*argv[:i], flag, str(typo), *extra, "--json", *argv[i:]]
    else:
        args = [*argv, flag, str(typo), *extra, "--json"]
    res = CliRunner().invoke(app, args, prog_name="lanectl")
    assert res.exit_code == ExitCode.CONFIG, (args, res.output)
    doc = json.loads(res.stdout)
    codes = [e["code"] for e in doc["errors"]]
    assert "config_dir_missing" in codes and any(e["file"] == str(typo) for e in doc["errors"]), doc
    assert not typo.exists()


def test_the_installed_cli_refuses_it_too_on_the_fast_path_commands(ledger: Path, tmp_path: Path) -> None:
    """`missions`, `mission show`, `status`, `probe`: lanectl.entry's fast path leaves -c to typer (same output)."""
    typo = str(tmp_path / "lanectl-typo")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "LANECTL_UNIT_DIR": str(tmp_path)}
    env.pop("LANECTL_CONFIG_DIR", None)
    with Ledger.open(ledger) as led:
        fleet_cfg = tmp_path / "etc"
        (fleet_cfg / "lanes.d").mkdir(parents=True)
        (fleet_cfg / "lanes.d" / "alpha.toml").write_text('port = 9101\nworkspace = "/var/lib/lanes/alpha"\n')
        from lanectl import config

        ms.submit_many(led, config.load(fleet_cfg), [ms.SubmitRequest("background", {"argv": ["true"]})],
                       now=time.time())
    for argv in (["missions"], ["mission", "show", "1"], ["missions", "--ledger", str(ledger)]):
        for flag in ("-c", "--config", f"--config={typo}"):
            cmd = [sys.executable, "-c", "from lanectl.entry import main; main()", *argv]
            cmd += [flag] if flag.startswith("--config=") else [flag, typo]
            if "--ledger" not in argv:
                cmd += ["--ledger", str(ledger)]
            res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=60)
            assert res.returncode == ExitCode.CONFIG, (cmd, res.stdout, res.stderr)
            assert "does not exist" in res.stderr and typo in res.stderr, res.stderr
    res = subprocess.run([sys.executable, "-c", "from lanectl.entry import main; main()", "missions", "--ledger",
                          str(ledger), "--json"], capture_output=True, text=True, env=env, timeout=60)
    assert res.returncode == 0 and len(json.loads(res.stdout)["data"]["missions"]) == 1

"""Issue 15 item 7 (the parts that need no systemd): an unknown event kind is an error listing the kinds; validate
reports cross-file problems in the same run as a file's own errors; lane show prints JSON values, not reprs."""
from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from lanectl.cli.main import app
from lanectl.errors import ExitCode
from lanectl.ledger import Ledger
from lanectl.ledger.events import EventKind
from tests.conftest import write_lane

runner = CliRunner()


def run(*args: str) -> tuple[int, dict]:
    res = runner.invoke(app, [*args, "--json"], prog_name="lanectl")
    return res.exit_code, json.loads(res.stdout)


def test_an_unknown_event_kind_is_a_usage_error_listing_the_kinds(fleet_dir: Path, tmp_path: Path) -> None:
    ledger = str(tmp_path / "ledger.db")
    with Ledger.open(ledger):  # a real, empty ledger
        pass
    code, doc = run("events", "--kind", "rollbak", "--ledger", ledger, "-c", str(fleet_dir))
    assert code == ExitCode.USAGE == doc["exit_code"]
    err = doc["errors"][0]
    assert err["code"] == "unknown_event_kind" and "'rollbak'" in err["message"]
    assert all(k.value in err["hint"] for k in EventKind)
    # a known kind is accepted (whatever the ledger holds)
    code, doc = run("events", "--kind", "rollback", "--kind", "alert", "--ledger", ledger, "-c", str(fleet_dir))
    assert code != ExitCode.USAGE, doc


def test_validate_reports_cross_file_problems_with_a_files_own_errors(fleet_dir: Path) -> None:
    # alpha has an error of its own (capacity) and shares beta's port; gamma's own error (a bad fallback type)
    # and a workspace inside beta's: every problem in one run
    write_lane(fleet_dir, "alpha", 'port = 8702\nworkspace = "/var/lib/lanes/alpha"\ncapacity = -1\n')
    write_lane(fleet_dir, "gamma", 'port = 8703\nworkspace = "/var/lib/lanes/beta/inner"\ncapacity = "x"\n')
    code, doc = run("validate", str(fleet_dir))
    assert code == ExitCode.CONFIG
    got = {(Path(e["file"]).name, e["field"], e["code"]) for e in doc["errors"]}
    assert ("alpha.toml", "port", "duplicate_port") in got, got
    assert ("gamma.toml", "workspace", "workspace_overlap") in got, got
    assert {("alpha.toml", "capacity"), ("gamma.toml", "capacity")} <= {(f, fld) for f, fld, _ in got}


def test_validate_cross_checks_two_invalid_files_once(fleet_dir: Path) -> None:
    write_lane(fleet_dir, "alpha", 'port = 8799\nworkspace = "/var/lib/lanes/same"\ncapacity = -1\n')
    write_lane(fleet_dir, "beta", 'port = 8799\nworkspace = "/var/lib/lanes/same"\ncapacity = -1\n')
    code, doc = run("validate", str(fleet_dir))
    assert code == ExitCode.CONFIG
    overlaps = [e for e in doc["errors"] if e["code"] == "workspace_overlap"]
    ports = [e for e in doc["errors"] if e["code"] == "duplicate_port"]
    assert len(overlaps) == 1 and ports, doc["errors"]


def test_lane_show_prints_json_values(fleet_dir: Path, tmp_path: Path) -> None:
    res = runner.invoke(app, ["lane", "show", "alpha", "-c", str(fleet_dir), "--unit-dir", str(tmp_path)],
                        prog_name="lanectl")
    assert res.exit_code == 0, res.output
    words = res.stdout.split()
    assert "None" not in words and "True" not in words and "False" not in words, res.stdout
    assert "null" in words or "true" in words
    assert '["interactive",' in res.stdout  # a list as JSON, not a Python list

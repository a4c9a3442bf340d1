from __future__ import annotations

import json
import subprocess
import tomllib
from pathlib import Path

from typer.testing import CliRunner

from lanectl.cli.main import app
from lanectl.errors import ExitCode
from tests.conftest import LANECTL_BIN, RUNTIME_PY, write_lane

runner = CliRunner()


def run(*args: str) -> tuple[int, dict]:
    res = runner.invoke(app, [*args, "--json"], prog_name="lanectl")
    return res.exit_code, json.loads(res.stdout)


def test_envelope_keys(fleet_dir: Path) -> None:
    code, doc = run("validate", str(fleet_dir))
    assert code == 0
    assert set(doc) == {"lanectl_json", "command", "status", "exit_code", "data", "errors"}
    assert doc["command"] == ["validate"] and doc["status"] == "ok"


def test_validate_reports_every_error_and_exits_3(fleet_dir: Path) -> None:
    write_lane(fleet_dir, "alpha", 'port = 70000\nworkspace = "x"\n')
    write_lane(fleet_dir, "gamma", 'port = 8703\nworkspace = "/var/lib/lanes/gamma"\nfallback = "zzz"\n')
    code, doc = run("validate", str(fleet_dir))
    assert code == ExitCode.CONFIG == doc["exit_code"]
    got = {(Path(e["file"]).name, e["field"]) for e in doc["errors"]}
    assert {("alpha.toml", "port"), ("alpha.toml", "workspace"), ("gamma.toml", "fallback")} <= got
    assert all(e["hint"] for e in doc["errors"])


def test_validate_human_error_names_file_field_fix(fleet_dir: Path) -> None:
    write_lane(fleet_dir, "alpha", 'port = 8701\nworkspace = "/var/lib/lanes/alpha"\nbogus = 1\n')
    res = runner.invoke(app, ["validate", str(fleet_dir)], prog_name="lanectl")
    assert res.exit_code == 3
    assert "alpha.toml:bogus" in res.stderr and "remove it" in res.stderr


def test_lane_add_writes_a_valid_file_with_a_free_port(fleet_dir: Path) -> None:
    code, doc = run("lane", "add", "delta", "--config", str(fleet_dir), "--classes", "background")
    assert code == 0
    data = tomllib.loads((fleet_dir / "lanes.d" / "delta.toml").read_text())
    assert data["port"] not in (8701, 8702, 8703)
    assert data["workspace"] == "/var/lib/lanes/delta" and data["classes"] == ["background"]
    assert run("validate", str(fleet_dir))[0] == 0
    code, doc = run("lane", "add", "delta", "--config", str(fleet_dir))
    assert code == ExitCode.CONFLICT and doc["errors"][0]["code"] == "lane_exists"


def test_lane_add_refuses_bad_input_and_writes_nothing(fleet_dir: Path) -> None:
    before = sorted(p.name for p in (fleet_dir / "lanes.d").iterdir())
    assert run("lane", "add", "../x", "--config", str(fleet_dir))[0] == ExitCode.CONFIG
    assert run("lane", "add", "eps", "--port", "8701", "--config", str(fleet_dir))[0] == ExitCode.CONFIG
    assert run("lane", "add", "eps", "--fallback", "nope", "--config", str(fleet_dir))[0] == ExitCode.CONFIG
    assert sorted(p.name for p in (fleet_dir / "lanes.d").iterdir()) == before


def test_lane_show_list_remove(fleet_dir: Path) -> None:
    code, doc = run("lane", "show", "alpha", "--config", str(fleet_dir))
    assert code == 0 and doc["data"]["user"] == "lane-alpha" and doc["data"]["capacity"] == 4
    assert run("lane", "show", "nope", "--config", str(fleet_dir))[0] == ExitCode.NOT_FOUND
    code, doc = run("lane", "list", "--config", str(fleet_dir))
    assert [r["name"] for r in doc["data"]["lanes"]] == ["alpha", "beta", "gamma"]
    code, doc = run("lane", "remove", "beta", "--config", str(fleet_dir))
    assert code == ExitCode.CONFLICT and doc["errors"][0]["code"] == "lane_in_use"
    assert run("lane", "remove", "alpha", "--config", str(fleet_dir))[0] == 0
    assert not (fleet_dir / "lanes.d" / "alpha.toml").exists()
    assert run("lane", "remove", "alpha", "--config", str(fleet_dir))[0] == ExitCode.NOT_FOUND


def test_render_out_check_and_install_idempotent(fleet_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "u"
    cfg = ["--config", str(fleet_dir), "--python", RUNTIME_PY]
    assert run("render", "--check", "--out", str(out), *cfg)[0] == ExitCode.UNHEALTHY
    code, doc = run("install", "--unit-dir", str(out), "--no-reload", "--no-provision", *cfg)
    assert code == 0 and doc["data"]["changed"] is True
    code, doc = run("install", "--unit-dir", str(out), "--no-reload", "--no-provision", *cfg)
    assert code == 0 and doc["data"]["changed"] is False and doc["data"]["written"] == []
    res = runner.invoke(app, ["install", "--unit-dir", str(out), "--no-reload", "--no-provision", *cfg])
    assert res.exit_code == 0 and "nothing changed" in res.stdout
    code, doc = run("render", "--check", "--out", str(out), *cfg)
    assert code == 0 and doc["data"]["in_sync"] is True
    write_lane(fleet_dir, "gamma", 'port = 8704\nworkspace = "/var/lib/lanes/gamma"\n')
    code, doc = run("render", "--check", "--out", str(out), *cfg)
    assert code == ExitCode.UNHEALTHY
    assert doc["data"]["drift"] == [{"path": "lanectl-lane@gamma.service.d/50-lanectl.conf", "state": "differs"}]


def test_status_without_systemd_is_unavailable(fleet_dir: Path, tmp_path: Path, monkeypatch) -> None:
    from lanectl import systemd

    monkeypatch.setattr(systemd, "available", lambda: False)
    code, doc = run("status", "--config", str(fleet_dir), "--unit-dir", str(tmp_path))
    assert code == ExitCode.UNAVAILABLE and doc["errors"][0]["code"] == "systemd_unavailable"


def test_installed_entry_point_runs() -> None:
    proc = subprocess.run([LANECTL_BIN, "--version"], capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.strip()


def test_lane_remove_tells_to_stop_only_a_lane_that_was_installed(fleet_dir: Path, tmp_path: Path,
                                                                    monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """Found by an attack (issue 15 follow-up F9): removing a never-installed lane told to run 'lanectl down
    LANE', which exits 4 (no such lane is installed)."""
    units = tmp_path / "units"
    units.mkdir()
    monkeypatch.setenv("LANECTL_UNIT_DIR", str(units))
    write_lane(fleet_dir, "omega", 'port = 8799\nworkspace = "/var/lib/lanes/omega"\n')
    res = runner.invoke(app, ["lane", "remove", "omega", "--config", str(fleet_dir)], prog_name="lanectl")
    assert res.exit_code == 0, res.output
    assert "was not installed, nothing to stop" in res.stdout and "lanectl down" not in res.stdout, res.stdout
    (units / "lanectl-fleet.json").write_text(json.dumps({"lanectl_manifest": 1, "config_dir": str(fleet_dir),
                                                          "lanes": {"alpha": {}}}))
    code, doc = run("lane", "remove", "alpha", "--config", str(fleet_dir))
    assert code == 0 and doc["data"]["installed"] is True
    write_lane(fleet_dir, "alpha", 'port = 8701\nworkspace = "/var/lib/lanes/alpha"\n')
    res = runner.invoke(app, ["lane", "remove", "alpha", "--config", str(fleet_dir)], prog_name="lanectl")
    assert res.exit_code == 0 and "run 'lanectl down alpha' and 'lanectl install'" in res.stdout, res.stdout

"""Issue 10, findings 5, 6 and 12: what validate refuses (exit 3, file, field and fix) before render or install
could act on it: workspaces that are system trees or lanectl's own directories, accounts lanectl did not create,
secret env files others can read, descriptions render cannot write, interpreters the lane sandbox hides."""
from __future__ import annotations

import json
import os
import pwd
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from lanectl import config, units
from lanectl.cli.main import app
from lanectl.errors import ExitCode, LanectlError
from tests.conftest import RUNTIME_PY, write_lane

runner = CliRunner()


def validate(d: Path, *extra: str) -> tuple[int, dict]:
    res = runner.invoke(app, ["validate", str(d), *extra, "--json"], prog_name="lanectl")
    return res.exit_code, json.loads(res.stdout)


def errors_of(d: Path) -> list[dict]:
    code, doc = validate(d)
    assert code == ExitCode.CONFIG, doc
    assert all(e["file"] and e["field"] and e["hint"] for e in doc["errors"]), doc
    return doc["errors"]


def lane(ws: str, extra: str = "") -> str:
    return f'port = 8701\nworkspace = "{ws}"\n{extra}'


@pytest.fixture
def one_lane(fleet_dir: Path) -> Path:
    for f in (fleet_dir / "lanes.d").glob("*.toml"):
        f.unlink()
    return fleet_dir


@pytest.fixture
def outside_tmp() -> Iterator[Path]:
    """A scratch dir that lanes could see: not under /tmp (PrivateTmp) nor under /root or /home (ProtectHome), which
    would mask what a test checks (the checkout itself may be in /root)."""
    if not os.access("/var/lib", os.W_OK):
        pytest.skip("needs a directory outside /tmp and /home it can write: /var/lib (run as root)")
    d = Path(tempfile.mkdtemp(prefix="lanectl-test-runtime-", dir="/var/lib"))
    yield d
    shutil.rmtree(d)


# ------------------------------------------------------------------------------------------- finding 12: render
def test_validate_refuses_a_description_render_would_refuse(one_lane: Path) -> None:
    write_lane(one_lane, "alpha", lane("/var/lib/lanes/alpha", 'description = "ends in \\\\"\n'))
    errs = errors_of(one_lane)
    assert [(Path(e["file"]).name, e["field"]) for e in errs] == [("alpha.toml", "description")]
    assert "backslash" in errs[0]["message"]


def test_an_interpreter_linked_into_root_is_refused(fleet_dir: Path, outside_tmp: Path) -> None:
    (outside_tmp / "venv" / "bin").mkdir(parents=True)
    py = outside_tmp / "venv" / "bin" / "python"
    py.symlink_to("/root/.pyenv/versions/3.11.7/bin/python3.11")
    with pytest.raises(LanectlError) as ei:
        units.render(config.load(fleet_dir), str(py))
    assert ei.value.exit_code == ExitCode.CONFIG
    assert {p.code for p in ei.value.problems} == {"runtime_hidden"}
    assert all("/root/.pyenv" in p.message and p.field == "python" for p in ei.value.problems)


def test_a_venv_whose_home_is_under_root_is_refused(fleet_dir: Path, outside_tmp: Path) -> None:
    venv = outside_tmp / "venv"
    (venv / "bin").mkdir(parents=True)
    shutil.copy(os.path.realpath(RUNTIME_PY), venv / "bin" / "python")  # a --copies venv: no link to follow
    (venv / "pyvenv.cfg").write_text("home = /root/.pyenv/versions/3.11.7/bin\nversion = 3.11.7\n")
    with pytest.raises(LanectlError) as ei:
        units.render(config.load(fleet_dir), str(venv / "bin" / "python"))
    assert {p.code for p in ei.value.problems} == {"runtime_hidden"}
    assert "/root/.pyenv/versions/3.11.7/bin" in ei.value.problems[0].message


def test_the_test_venv_itself_is_visible(fleet_dir: Path) -> None:
    assert units.render(config.load(fleet_dir), RUNTIME_PY)


# ------------------------------------------------------------------------------------- finding 6: workspaces
@pytest.mark.parametrize("ws", ["/var/lib/lanectl", "/var/lib/lanectl/keys", "/root", "/root/lane", "/home", "/tmp",
                                "/opt", "/var/log", "/var/lib", "/var", "/srv", "/var/tmp", "/mnt", "/lib64"])
def test_dangerous_workspaces_are_refused(one_lane: Path, ws: str) -> None:
    write_lane(one_lane, "alpha", lane(ws))
    errs = errors_of(one_lane)
    assert {(Path(e["file"]).name, e["field"]) for e in errs} == {("alpha.toml", "workspace")}
    assert all("/var/lib/lanes/" in e["hint"] for e in errs)


@pytest.mark.parametrize("ws", ["/srv/lanes/alpha", "/var/lib/lanes-x/alpha", "/opt/lanes/alpha"])
def test_workspaces_below_a_system_tree_are_fine(one_lane: Path, ws: str) -> None:
    write_lane(one_lane, "alpha", lane(ws))
    assert validate(one_lane)[0] == 0


def test_workspaces_overlapping_lanectl_directories_are_refused(one_lane: Path, tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    units_dir = tmp_path / "units"
    monkeypatch.setenv("LANECTL_UNIT_DIR", str(units_dir))
    (one_lane / "lanectl.toml").write_text('state_dir = "/srv/lc/state"\nledger = "/srv/lc/ledger/l.db"\n')
    cases = {"a": "/srv/lc/state/keys", "b": "/srv/lc", "c": "/srv/lc/ledger", "d": str(one_lane.resolve()),
             "e": str(units_dir.resolve() / "x"), "f": str(one_lane.resolve().parent)}
    for i, (name, ws) in enumerate(cases.items()):
        write_lane(one_lane, name, f'port = {8711 + i}\nworkspace = "{ws}"\n')
    errs = errors_of(one_lane)
    unsafe = [e for e in errs if e["code"] == "workspace_unsafe"]
    assert sorted(Path(e["file"]).stem for e in unsafe) == sorted(cases)  # one error per lane
    assert all(e["field"] == "workspace" and "lanectl's" in e["message"] for e in unsafe)


def test_a_state_dir_that_is_a_system_tree_is_refused(fleet_dir: Path) -> None:
    (fleet_dir / "lanectl.toml").write_text('state_dir = "/var/lib"\n')
    errs = errors_of(fleet_dir)
    assert [(Path(e["file"]).name, e["field"]) for e in errs] == [("lanectl.toml", "state_dir")]


def test_a_workspace_that_is_a_users_home_is_refused(one_lane: Path) -> None:
    homes = [pw for pw in pwd.getpwall() if pw.pw_dir.startswith("/") and pw.pw_gecos != config.USER_MARKER]
    home = next((pw for pw in homes if _workspace_ok(pw.pw_dir)), None)
    if home is None:
        pytest.skip("no account here has a home that is a valid workspace path")
    write_lane(one_lane, "alpha", lane(home.pw_dir))
    errs = errors_of(one_lane)
    assert any(e["field"] == "workspace" and home.pw_name in e["message"] for e in errs)


def _workspace_ok(path: str) -> bool:
    try:
        config.check_workspace(path)
        return True
    except ValueError:
        return False


# ---------------------------------------------------------------------------------- finding 12: lane accounts
def test_an_existing_account_lanectl_did_not_create_is_refused(one_lane: Path) -> None:
    write_lane(one_lane, "alpha", lane("/var/lib/lanes/alpha", 'user = "daemon"\n'))
    errs = errors_of(one_lane)
    assert [(e["field"], e["code"]) for e in errs] == [("user", "user_not_lanectl")]
    assert "existing_user = true" in errs[0]["hint"]
    write_lane(one_lane, "alpha", lane("/var/lib/lanes/alpha", 'user = "daemon"\nexisting_user = true\n'))
    assert validate(one_lane)[0] == 0


# ---------------------------------------------------------------------------------- finding 5: secret env file
def secret_lane(d: Path, path: Path) -> None:
    write_lane(d, "alpha", lane("/var/lib/lanes/alpha", f'secret_env_file = "{path}"\n'))


def test_a_missing_secret_env_file_is_refused(one_lane: Path, tmp_path: Path) -> None:
    secret_lane(one_lane, tmp_path / "nope.env")
    errs = errors_of(one_lane)
    assert [(e["field"], e["code"]) for e in errs] == [("secret_env_file", "secret_env_missing")]
    assert "-m 0600" in errs[0]["hint"]


@pytest.mark.parametrize("mode,uid", [(0o644, 0), (0o640, 0), (0o604, 0), (0o600, 65534)])
def test_a_secret_env_file_others_can_read_is_refused(one_lane: Path, tmp_path: Path, mode: int, uid: int) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to own files as root and as another user")
    f = tmp_path / "alpha.env"
    f.write_text("TOKEN=s3cret\n")
    os.chmod(f, mode)
    os.chown(f, uid, 0)
    secret_lane(one_lane, f)
    errs = errors_of(one_lane)
    assert [(e["field"], e["code"]) for e in errs] == [("secret_env_file", "secret_env_unsafe")]
    assert "chmod 0600" in errs[0]["hint"]


def test_a_symlinked_secret_env_file_is_refused(one_lane: Path, tmp_path: Path) -> None:
    real = tmp_path / "real.env"
    real.write_text("TOKEN=x\n")
    os.chmod(real, 0o600)
    (tmp_path / "link.env").symlink_to(real)
    secret_lane(one_lane, tmp_path / "link.env")
    assert [e["code"] for e in errors_of(one_lane)] == ["secret_env_unsafe"]


def test_a_secret_env_file_in_a_directory_another_user_can_write_is_refused(one_lane: Path, tmp_path: Path) -> None:
    """Found by the issue-10 attack: gamma's secret file in alpha's workspace let alpha's missions replace it (and
    set gamma's dispatch key). Every directory on the path must be root's and not writable by others."""
    if os.geteuid() != 0:
        pytest.skip("needs root to own files as root and as another user")
    other = tmp_path / "other-lanes-workspace"
    other.mkdir()
    f = other / "alpha.env"
    f.write_text("TOKEN=s3cret\n")
    os.chmod(f, 0o600)
    os.chown(other, 65534, 65534)
    secret_lane(one_lane, f)
    errs = errors_of(one_lane)
    assert [(e["field"], e["code"]) for e in errs] == [("secret_env_file", "secret_env_unsafe")]
    assert "only root can write" in errs[0]["hint"]
    os.chown(other, 0, 0)
    os.chmod(other, 0o777)  # world-writable without the sticky bit: anyone may rename root's file away
    assert [e["code"] for e in errors_of(one_lane)] == ["secret_env_unsafe"]
    os.chmod(other, 0o1777)  # sticky, like /tmp: only root may rename or remove root's file
    assert validate(one_lane)[0] == 0


def test_a_secret_env_file_inside_the_workspace_is_refused(one_lane: Path) -> None:
    secret_lane(one_lane, Path("/var/lib/lanes/alpha/secret.env"))
    code, doc = validate(one_lane)
    assert code == ExitCode.CONFIG
    assert "secret_env_unsafe" in {e["code"] for e in doc["errors"]}


def test_a_good_secret_env_file_is_loaded_with_environment_file(one_lane: Path, tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to own a file as root")
    f = tmp_path / "alpha.env"
    f.write_text("TOKEN=s3cret\n")
    os.chmod(f, 0o600)
    secret_lane(one_lane, f)
    assert validate(one_lane)[0] == 0
    dropin = {u.path: u.text for u in units.render(config.load(one_lane), RUNTIME_PY)}[units.dropin_path("alpha")]
    assert f"EnvironmentFile={f}\n" in dropin
    assert "s3cret" not in dropin


def test_a_secret_env_file_may_not_override_lanectls_variables(one_lane: Path, tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to own a file as root")
    f = tmp_path / "alpha.env"
    f.write_text("TOKEN=s3cret-value\nexport LANECTL_PORT=22\n")
    os.chmod(f, 0o600)
    secret_lane(one_lane, f)
    errs = errors_of(one_lane)
    assert [(e["field"], e["code"]) for e in errs] == [("secret_env_file", "secret_env_reserved")]
    assert "LANECTL_PORT" in errs[0]["message"] and "s3cret" not in json.dumps(errs)


def test_validate_refuses_an_interpreter_render_would_refuse(fleet_dir: Path) -> None:
    (fleet_dir / "lanectl.toml").write_text('python = "/root/.pyenv/versions/3.11.7/bin/python"\n')
    errs = errors_of(fleet_dir)
    assert {(e["field"], e["code"]) for e in errs} == {("python", "runtime_hidden")}

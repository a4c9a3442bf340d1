from __future__ import annotations

from pathlib import Path

import pytest

from lanectl import config
from lanectl.errors import ExitCode, LanectlError
from tests.conftest import ROOT, write_lane


def problems(d: Path) -> list:
    with pytest.raises(LanectlError) as ei:
        config.load(d)
    assert ei.value.exit_code == ExitCode.CONFIG
    return ei.value.problems


def test_example_fleet_is_valid() -> None:
    fleet = config.load(ROOT)
    assert sorted(fleet.lanes) == ["alpha", "beta", "gamma"]
    assert fleet.lanes["alpha"].fallback == "beta"
    assert fleet.settings.supervisor.port == 8700


def test_every_error_is_reported_at_once_with_file_field_and_fix(fleet_dir: Path) -> None:
    write_lane(fleet_dir, "alpha", 'port = 80\nworkspace = "relative/x"\nbogus = 1\n')
    write_lane(fleet_dir, "beta", 'port = 8702\nworkspace = "/var/lib/lanes/beta"\nfallback = "nope"\n')
    found = problems(fleet_dir)
    by_field = {(Path(p.file).name, p.field): p for p in found}
    assert ("alpha.toml", "port") in by_field
    assert ("alpha.toml", "workspace") in by_field
    assert ("alpha.toml", "bogus") in by_field
    assert ("beta.toml", "fallback") in by_field
    assert "known:" in by_field[("alpha.toml", "bogus")].hint
    assert "absolute" in by_field[("alpha.toml", "workspace")].message
    assert all(p.hint for p in found)


@pytest.mark.parametrize("port", [0, 65536, 80, 1023, -1])
def test_bad_ports(fleet_dir: Path, port: int) -> None:
    write_lane(fleet_dir, "alpha", f'port = {port}\nworkspace = "/var/lib/lanes/alpha"\n')
    assert any(p.field == "port" for p in problems(fleet_dir))


def test_malformed_toml(fleet_dir: Path) -> None:
    write_lane(fleet_dir, "alpha", "port = = 3\n")
    (p,) = [p for p in problems(fleet_dir) if p.file.endswith("alpha.toml")]
    assert p.code == "toml_invalid" and "TOML" in p.message


def test_name_must_match_file_stem(fleet_dir: Path) -> None:
    write_lane(fleet_dir, "alpha", 'name = "other"\nport = 8701\nworkspace = "/var/lib/lanes/alpha"\n')
    assert any(p.code == "name_mismatch" for p in problems(fleet_dir))


def test_bad_file_name(fleet_dir: Path) -> None:
    (fleet_dir / "lanes.d" / "Bad_Name.toml").write_text('port = 8710\nworkspace = "/var/lib/lanes/z"\n')
    assert any(p.code == "bad_name" for p in problems(fleet_dir))


@pytest.mark.parametrize("name", ["../x", "x/y", "-a", "A"])
def test_traversal_names_rejected(fleet_dir: Path, name: str) -> None:
    write_lane(fleet_dir, "alpha", f'port = 8701\nworkspace = "/var/lib/lanes/alpha"\nfallback = "{name}"\n')
    assert any(p.field == "fallback" for p in problems(fleet_dir))


def test_duplicate_ports_and_nested_workspaces(fleet_dir: Path) -> None:
    write_lane(fleet_dir, "beta", 'port = 8701\nworkspace = "/var/lib/lanes/alpha/sub"\n')
    codes = {p.code for p in problems(fleet_dir)}
    assert {"duplicate_port", "workspace_overlap"} <= codes


def test_equal_workspaces(fleet_dir: Path) -> None:
    write_lane(fleet_dir, "beta", 'port = 8702\nworkspace = "/var/lib/lanes/alpha"\n')
    assert any(p.code == "workspace_overlap" for p in problems(fleet_dir))


def test_fallback_cycle(fleet_dir: Path) -> None:
    write_lane(fleet_dir, "gamma", 'port = 8703\nworkspace = "/var/lib/lanes/gamma"\nfallback = "alpha"\n')
    (p,) = [p for p in problems(fleet_dir) if p.code == "fallback_cycle"]
    assert "alpha -> beta -> gamma -> alpha" in p.message


def test_fallback_to_self(fleet_dir: Path) -> None:
    write_lane(fleet_dir, "gamma", 'port = 8703\nworkspace = "/var/lib/lanes/gamma"\nfallback = "gamma"\n')
    assert any(p.code == "fallback_self" for p in problems(fleet_dir))


@pytest.mark.parametrize("ws", ["/var/lib/lanes/a b", "/var/lib/lanes/%i", "/var/lib/lanes/../etc", "/etc/x",
                                "/", "/var/lib/lanes/a\nb", "/var/lib/lanes/$x", '/var/lib/"q"'])
def test_unsafe_workspaces(fleet_dir: Path, ws: str) -> None:
    import json

    write_lane(fleet_dir, "alpha", f"port = 8701\nworkspace = {json.dumps(ws)}\n")
    assert any(p.field == "workspace" for p in problems(fleet_dir))


@pytest.mark.parametrize("value", ["a\nb", "x\rExecStartPre=/bin/sh", "tab\tin", "nul\x00"])
def test_control_characters_rejected_in_exec_and_env(fleet_dir: Path, value: str) -> None:
    import json

    write_lane(fleet_dir, "alpha", "port = 8701\nworkspace = \"/var/lib/lanes/alpha\"\n"
                                   f"exec = [\"/usr/bin/env\", {json.dumps(value)}]\n[env]\nK = {json.dumps(value)}\n")
    fields = {p.field for p in problems(fleet_dir)}
    assert "exec.1" in fields and "env.K" in fields


def test_reserved_env_and_relative_exec(fleet_dir: Path) -> None:
    write_lane(fleet_dir, "alpha", 'port = 8701\nworkspace = "/var/lib/lanes/alpha"\nexec = ["python3"]\n'
                                   '[env]\nLANECTL_PORT = "1"\n')
    fields = {p.field for p in problems(fleet_dir)}
    assert "exec" in fields and any(f.startswith("env.LANECTL_PORT") for f in fields)


def test_settings_errors_name_lanectl_toml(fleet_dir: Path) -> None:
    (fleet_dir / "lanectl.toml").write_text("[supervisor]\nhost = '0.0.0.0'\n")
    (p,) = problems(fleet_dir)
    assert p.file.endswith("lanectl.toml") and p.field == "supervisor.host"


def test_port_taken_is_a_warning(fleet_dir: Path) -> None:
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen()
    port = s.getsockname()[1]
    try:
        write_lane(fleet_dir, "alpha", f'port = {port}\nworkspace = "/var/lib/lanes/alpha"\n')
        fleet = config.load(fleet_dir, check_host_ports=True)
        assert [w.code for w in fleet.warnings] == ["port_taken"]
    finally:
        s.close()


@pytest.mark.parametrize("path", ["/tmp/cb.sock", "/run/cb.sock", "/run/lanectl/a/b.sock", "/run/lanectl/../x",
                                  "/run/lanectl/", "relative.sock", "/run/lanectl/a b", "/run/lanectl/%i.sock",
                                  "/run/lanectl/" + "x" * 65])
def test_callback_socket_must_be_a_name_under_run_lanectl(fleet_dir: Path, path: str) -> None:
    """Only /run/lanectl (the supervisor's RuntimeDirectory=, root's) keeps lanes from standing in for it."""
    (fleet_dir / "lanectl.toml").write_text(f"[supervisor]\nsocket = {path!r}\n")
    (p,) = problems(fleet_dir)
    assert p.file.endswith("lanectl.toml") and p.field == "supervisor.socket" and "/run/lanectl/" in p.message


def test_callback_url_is_the_literal_socket_path(fleet_dir: Path) -> None:
    from lanectl import units

    (fleet_dir / "lanectl.toml").write_text("[supervisor]\nhost = 'localhost'\nsocket = '/run/lanectl/cb-2.sock'\n")
    fleet = config.load(fleet_dir)
    env = units.lane_env("alpha", fleet.lanes["alpha"], fleet)
    assert env["LANECTL_CALLBACK_URL"] == "unix:/run/lanectl/cb-2.sock"
    dropin = units.render_dropin("alpha", fleet.lanes["alpha"], fleet)
    assert f"SocketBindAllow=ipv4:tcp:{fleet.lanes['alpha'].port}\n" in dropin
    assert "SocketBindDeny=any\n" in units.template_text(units.TEMPLATE)


@pytest.mark.parametrize("output, field, words", [
    ('max_bytes = "8Q"', "output.max_bytes", "not a size"),
    ('max_bytes = "100"', "output.max_bytes", "below 8K"),
    ('max_bytes = "2T"', "output.max_bytes", "above 1T"),
    ('keep_bytes = "4M"', "output", "smaller than max_bytes"),
    ("keep_files = 0", "output.keep_files", ""),
    ("bogus = 1", "output.bogus", ""),
])
def test_lane_output_settings_are_validated(fleet_dir: Path, output: str, field: str, words: str) -> None:
    write_lane(fleet_dir, "alpha", f'port = 8701\nworkspace = "/var/lib/lanes/alpha"\n[output]\n{output}\n')
    (p,) = [p for p in problems(fleet_dir) if p.file.endswith("alpha.toml")]
    assert p.field == field and words in p.message and p.hint


def test_lane_output_settings_reach_the_lane(fleet_dir: Path) -> None:
    from lanectl import units

    write_lane(fleet_dir, "alpha", 'port = 8701\nworkspace = "/var/lib/lanes/alpha"\n'
                                   '[output]\nmax_bytes = "64K"\nkeep_bytes = "1M"\nkeep_files = 7\n')
    fleet = config.load(fleet_dir)
    env = units.lane_env("alpha", fleet.lanes["alpha"], fleet)
    assert (env["LANECTL_OUTPUT_MAX_BYTES"], env["LANECTL_OUTPUT_KEEP_BYTES"], env["LANECTL_OUTPUT_KEEP_FILES"]) == \
        ("65536", "1048576", "7")


@pytest.mark.parametrize("ledger, field, words", [
    ('retention = "30 days"', "ledger.retention", "not a duration"),
    ('retention = "30m"', "ledger.retention", "shorter than 1h"),
    ('prune_every = "5s"', "ledger.prune_every", "shorter than 1m"),
    ('archive_dir = "relative"', "ledger.archive_dir", ""),
])
def test_ledger_retention_settings_are_validated(fleet_dir: Path, ledger: str, field: str, words: str) -> None:
    write_lane(fleet_dir, "alpha", 'port = 8701\nworkspace = "/var/lib/lanes/alpha"\n')
    (fleet_dir / "lanectl.toml").write_text(f"[ledger]\n{ledger}\n")
    (p,) = [p for p in problems(fleet_dir) if p.file.endswith("lanectl.toml")]
    assert p.field == field and words in p.message and p.hint


def test_ledger_retention_setting(fleet_dir: Path) -> None:
    write_lane(fleet_dir, "alpha", 'port = 8701\nworkspace = "/var/lib/lanes/alpha"\n')
    (fleet_dir / "lanectl.toml").write_text('[ledger]\nretention = "30d"\n')
    assert config.load(fleet_dir).settings.ledger.retention_s() == 30 * 86400


def test_the_former_names_of_the_fallback_lost_rate_settings_are_still_read() -> None:
    """[rollback] fallback_rate and [promotion] max_fallback_rate became fallback_lost_rate and
    max_fallback_lost_rate (issue 11: metrics' fallback rate is work a lane received, governance's is work it
    lost); a lanectl.toml written before keeps working, and naming both is refused."""
    from pydantic import ValidationError

    s = config.Settings.model_validate({"rollback": {"fallback_rate": 0.3}, "promotion": {"max_fallback_rate": 0.2}})
    assert s.rollback.fallback_lost_rate == 0.3 and s.promotion.max_fallback_lost_rate == 0.2
    s = config.Settings.model_validate({"rollback": {"fallback_lost_rate": 0.4}})
    assert s.rollback.fallback_lost_rate == 0.4 and s.promotion.max_fallback_lost_rate == 0.10
    with pytest.raises(ValidationError, match="former name of fallback_lost_rate"):
        config.RollbackSettings.model_validate({"fallback_rate": 0.3, "fallback_lost_rate": 0.4})
    with pytest.raises(ValidationError, match="former name of max_fallback_lost_rate"):
        config.PromotionSettings.model_validate({"max_fallback_rate": 0.3, "max_fallback_lost_rate": 0.4})

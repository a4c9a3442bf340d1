"""Issue 15 items 6, 8 and 10 without systemd: ledger creation, help text, render --diff, logs, lane removal."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from lanectl import lifecycle
from lanectl.cli.main import app
from lanectl.errors import ExitCode, NotFound
from tests.conftest import write_lane

runner = CliRunner()


@pytest.fixture
def cfg(fleet_dir: Path, tmp_path: Path) -> Path:
    """The example fleet with its ledger and state in the test's own directory (never the host's)."""
    text = (fleet_dir / "lanectl.toml").read_text()
    (fleet_dir / "lanectl.toml").write_text(f'ledger = "{tmp_path}/state/ledger.db"\nstate_dir = "{tmp_path}/state"\n'
                                            + text)
    return fleet_dir


def run(*args: str) -> tuple[int, dict]:  # type: ignore[type-arg]
    res = runner.invoke(app, [*args, "--json"], prog_name="lanectl")
    return res.exit_code, json.loads(res.stdout) if res.stdout.strip() else {}


def test_only_ledger_init_creates_a_ledger(cfg: Path, tmp_path: Path) -> None:
    typo = tmp_path / "stat" / "ledger.db"
    for args in (["submit", "--class", "interactive", "--payload", '{"argv": ["true"]}'], ["drain", "alpha"],
                 ["missions"], ["reroute", "alpha", "--to", "beta"], ["events"]):
        code, doc = run(*args, "-c", str(cfg), "--ledger", str(typo))
        assert code == ExitCode.UNAVAILABLE, (args, doc)
        assert doc["errors"][0]["code"] == "ledger_missing" and str(typo) in doc["errors"][0]["message"]
        assert "ledger init" in doc["errors"][0]["hint"]
    assert not typo.parent.exists()
    code, doc = run("ledger", "init", "-c", str(cfg))
    assert code == 0 and doc["data"] == {"ledger": f"{tmp_path}/state/ledger.db", "changed": True}
    code, doc = run("ledger", "init", "-c", str(cfg))
    assert code == 0 and doc["data"]["changed"] is False
    code, _ = run("submit", "--class", "interactive", "--payload", '{"argv": ["true"]}', "-c", str(cfg))
    assert code == 0


def test_help_has_no_type_placeholders_and_paragraphs_are_not_broken() -> None:
    from tests.test_docs import command_paths

    for path in command_paths(app):
        res = runner.invoke(app, [*path.split(), "--help"], prog_name="lanectl")
        assert res.exit_code == 0, (path, res.output)
        for placeholder in ("<bool>", "<str>", "<int>", "<float>", "<list"):
            assert placeholder not in res.output, (path, res.output)
    drain = runner.invoke(app, ["drain", "--help"], prog_name="lanectl", terminal_width=200).output
    # one paragraph, wrapped by the terminal only: no line break in the middle of a sentence at width 200 either
    assert "With --wait, returns when nothing is in flight (exit 7 at --timeout)" in " ".join(drain.split())
    assert all(len(line) > 100 or not line.strip() or line.rstrip().endswith((".", ":", ")")) or line.startswith("  -")
               for line in drain.split("\n\n")[1].splitlines()[:-1]), drain


def test_render_check_diff_shows_each_difference(cfg: Path, tmp_path: Path) -> None:
    out = tmp_path / "units"
    assert run("render", "--out", str(out), "-c", str(cfg))[0] == 0
    dropin = out / "lanectl-lane@alpha.service.d" / "50-lanectl.conf"
    dropin.write_text(dropin.read_text().replace("MemoryMax=512M", "MemoryMax=1G"))
    (out / "lanectl-lane@beta.service.d" / "50-lanectl.conf").unlink()
    code, doc = run("render", "--check", "--diff", "--out", str(out), "-c", str(cfg))
    assert code == ExitCode.UNHEALTHY
    diffs = {d["path"]: d for d in doc["data"]["drift"]}
    alpha = diffs["lanectl-lane@alpha.service.d/50-lanectl.conf"]["diff"]
    assert "-MemoryMax=1G" in alpha and "+MemoryMax=512M" in alpha
    beta = diffs["lanectl-lane@beta.service.d/50-lanectl.conf"]
    assert beta["state"] == "missing" and beta["diff"].startswith("--- /dev/null")
    res = runner.invoke(app, ["render", "--check", "--diff", "--out", str(out), "-c", str(cfg)], prog_name="lanectl")
    assert res.exit_code == ExitCode.UNHEALTHY and "+MemoryMax=512M" in res.output
    assert run("render", "--diff", "-c", str(cfg))[0] == ExitCode.USAGE


@pytest.mark.skipif(not shutil.which("journalctl"), reason="no journalctl")
def test_logs_reads_the_journal_of_the_named_units() -> None:
    lanes = {"alpha": {"unit": "lanectl-lane@alpha.service"}, "beta": {"unit": "lanectl-lane@beta.service"}}
    argv = lifecycle.journal_argv(lanes, ["alpha", "supervisor"], follow=True, since="-1h")
    assert argv[0].endswith("journalctl")
    assert argv[argv.index("-u") + 1] == "lanectl-lane@alpha.service" and "lanectl-supervisor.service" in argv
    assert "lanectl-lane@beta.service" not in argv and argv[-1] == "-f" and "-1h" in argv and "-n" not in argv
    every = lifecycle.journal_argv(lanes, None)
    assert [every[i + 1] for i, a in enumerate(every) if a == "-u"] == [
        "lanectl-lane@alpha.service", "lanectl-lane@beta.service", "lanectl-supervisor.service"]
    assert every[every.index("-n") + 1] == "100"
    with pytest.raises(NotFound):
        lifecycle.journal_argv(lanes, ["nope"])


def test_lane_remove_refuses_while_work_is_bound_and_moves_it_with_reroute_to(cfg: Path) -> None:
    write_lane(cfg, "delta", 'port = 8714\nworkspace = "/var/lib/lanes/delta"\n')
    assert run("ledger", "init", "-c", str(cfg))[0] == 0
    ids = [run("submit", "--class", "background", "--lane", "delta", "--payload", '{"argv": ["true"]}',
               "-c", str(cfg))[1]["data"]["id"],
           run("submit", "--class", "background", "--session", "delta:s1", "--payload", '{"argv": ["true"]}',
               "-c", str(cfg))[1]["data"]["id"]]
    code, doc = run("lane", "remove", "delta", "-c", str(cfg))
    assert code == ExitCode.CONFLICT and doc["errors"][0]["code"] == "lane_in_use", doc
    assert "2 queued mission(s)" in doc["errors"][0]["message"] and "delta:s1" in doc["errors"][0]["message"]
    assert (cfg / "lanes.d" / "delta.toml").exists()
    code, doc = run("lane", "remove", "delta", "--reroute-to", "delta", "-c", str(cfg))
    assert code == ExitCode.CONFLICT and doc["errors"][0]["code"] == "reroute_self"
    code, doc = run("lane", "remove", "delta", "--reroute-to", "beta", "-c", str(cfg))
    assert code == 0, doc
    assert doc["data"]["moved"] == {"missions": ids[:1], "sessions": ["delta:s1"]}
    assert not (cfg / "lanes.d" / "delta.toml").exists()
    for mid in ids:  # both wait for beta now, not for a lane that is gone
        code, doc = run("mission", "explain", str(mid), "-c", str(cfg))
        assert code == 0 and "delta" not in doc["data"]["summary"], doc
    # the session moved with it: new work for it is accepted and goes to beta
    code, doc = run("submit", "--class", "background", "--session", "delta:s1", "--payload", '{"argv": ["true"]}',
                    "-c", str(cfg))
    assert code == 0, doc


def test_sessions_of_a_lane_gone_by_hand_are_refused_until_rerouted(cfg: Path) -> None:
    write_lane(cfg, "eps", 'port = 8715\nworkspace = "/var/lib/lanes/eps"\n')
    assert run("ledger", "init", "-c", str(cfg))[0] == 0
    submit = ("submit", "--class", "background", "--session", "eps:s1", "--payload", '{"argv": ["true"]}',
              "-c", str(cfg))
    assert run(*submit)[0] == 0
    (cfg / "lanes.d" / "eps.toml").unlink()  # removed by hand: the session's owner is gone
    code, doc = run(*submit)
    assert code == ExitCode.CONFLICT and doc["errors"][0]["code"] == "session_lane_gone", doc
    assert "reroute eps" in doc["errors"][0]["hint"]
    code, doc = run("reroute", "eps", "--to", "beta", "-c", str(cfg))
    assert code == 0 and doc["data"]["sessions"] == ["eps:s1"], doc
    assert run(*submit)[0] == 0
    code, doc = run("reroute", "never-was", "--to", "beta", "-c", str(cfg))
    assert code == ExitCode.NOT_FOUND


def test_status_and_probe_honour_c_over_the_installed_fleet(cfg: Path, tmp_path: Path) -> None:
    from lanectl.status import installed_fleet

    units = tmp_path / "units"
    code, doc = run("install", "--unit-dir", str(units), "--no-reload", "--no-provision", "-c", str(cfg))
    assert code == 0, doc
    other = tmp_path / "other"
    shutil.copytree(cfg, other)
    write_lane(other, "delta", 'port = 8714\nworkspace = "/var/lib/lanes/delta"\n')
    assert sorted(installed_fleet(units)["lanes"]) == ["alpha", "beta", "gamma"]  # the installed one
    assert sorted(installed_fleet(units, str(cfg))["lanes"]) == ["alpha", "beta", "gamma"]  # -c names it
    assert sorted(installed_fleet(units, str(other))["lanes"]) == ["alpha", "beta", "delta", "gamma"]


def _where(cfg: Path, tmp_path: Path) -> tuple[dict[int, str], dict[str, str], list[str]]:
    """Each mission's target lane, each session's lane and the move events, read from the ledger as it is."""
    import sqlite3

    conn = sqlite3.connect(f"file:{tmp_path}/state/ledger.db?mode=ro", uri=True)
    try:
        return (dict(conn.execute("SELECT id, target FROM missions").fetchall()),
                dict(conn.execute("SELECT id, lane FROM sessions").fetchall()),
                [k for (k,) in conn.execute("SELECT kind FROM events WHERE kind IN ('rerouted', 'reroute', "
                                            "'session_moved')")])
    finally:
        conn.close()


def test_a_refused_lane_remove_moves_nothing_and_sessions_go_only_where_they_can_run(cfg: Path,
                                                                                      tmp_path: Path) -> None:
    """F4: a refused 'lane remove --reroute-to' used to move the queued missions and sessions it could (exit 5,
    data null) and put a session with interactive work on a lane serving only background, stranding it."""
    write_lane(cfg, "delta", 'port = 8714\nworkspace = "/var/lib/lanes/delta"\nclasses = ["interactive", '
                             '"background"]\n')
    write_lane(cfg, "zeta", 'port = 8716\nworkspace = "/var/lib/lanes/zeta"\nclasses = ["background"]\n')
    assert run("ledger", "init", "-c", str(cfg))[0] == 0

    def submit(cls: str, *where: str) -> int:
        code, doc = run("submit", "--class", cls, *where, "--payload", '{"argv": ["true"]}', "-c", str(cfg))
        assert code == 0, doc
        return int(doc["data"]["id"])

    pinned_i, pinned_b = submit("interactive", "--lane", "delta"), submit("background", "--lane", "delta")
    in_session = submit("interactive", "--session", "delta:s9")
    before = _where(cfg, tmp_path)
    code, doc = run("lane", "remove", "delta", "--reroute-to", "zeta", "-c", str(cfg))
    assert code == ExitCode.CONFLICT and doc["status"] == "error", doc
    err = doc["errors"][0]
    assert err["code"] == "lane_in_use" and "nothing was moved" in err["message"], err
    assert f"{pinned_i}: zeta does not serve interactive" in err["hint"], err
    assert "delta:s9: zeta does not serve interactive" in err["hint"], err
    assert _where(cfg, tmp_path) == before  # the background mission stayed too: all or nothing
    assert before[0][pinned_b] == before[0][in_session] == "delta" and before[1] == {"delta:s9": "delta"}
    assert (cfg / "lanes.d" / "delta.toml").exists()

    # the operator cancels the interactive work: now everything can move, in one go
    for mid in (pinned_i, in_session):
        assert run("mission", "cancel", str(mid), "-c", str(cfg))[0] == 0
    code, doc = run("lane", "remove", "delta", "--reroute-to", "zeta", "-c", str(cfg))
    assert code == 0 and doc["data"]["moved"] == {"missions": [pinned_b], "sessions": ["delta:s9"]}, doc
    # a session never takes work its lane cannot run: refused at submit, not queued for ever
    code, doc = run("submit", "--class", "interactive", "--session", "delta:s9", "--payload", '{"argv": ["true"]}',
                    "-c", str(cfg))
    assert code == ExitCode.USAGE and doc["errors"][0]["code"] == "lane_class", doc  # as --lane LANE does
    assert "zeta" in doc["errors"][0]["message"] and "interactive" in doc["errors"][0]["message"]
    assert submit("background", "--session", "delta:s9")


def test_release_with_work_in_flight_rolls_back_every_move(cfg: Path, tmp_path: Path) -> None:
    """Ledger level: a mission in flight refuses the removal; the queued one and the session stay where they were,
    the lane is left draining (so the next try finds it done)."""
    import time

    from lanectl import config
    from lanectl.dispatch import Assignment
    from lanectl.errors import Conflict
    from lanectl.ledger import lanes as lane_ops
    from lanectl.ledger import missions as ms

    write_lane(cfg, "delta", 'port = 8714\nworkspace = "/var/lib/lanes/delta"\nclasses = ["background"]\n')
    fleet = config.load(cfg)
    with config.open_ledger(fleet, create=True) as led:
        now = time.time()
        running = ms.submit(led, fleet, cls="background", payload={"argv": ["true"]}, now=now, lane="delta")
        queued = ms.submit(led, fleet, cls="background", payload={"argv": ["true"]}, now=now, lane="delta")
        ms.submit(led, fleet, cls="background", payload={"argv": ["true"]}, now=now, session="delta:s1")
        ms.assign(led, [Assignment(running.mission.id, "delta", "background")], now=now, lease_sec=600)
        before = _where(cfg, tmp_path)
        with pytest.raises(Conflict) as info:
            lane_ops.release(led, fleet, "delta", "gamma", now=now)
        assert info.value.code == "lane_in_use" and "nothing was moved" in info.value.message
        assert "draining" in (info.value.hint or "") and "1 mission(s) in flight" in info.value.message
        assert _where(cfg, tmp_path) == before and before[0][queued.mission.id] == "delta"
        assert lane_ops.state_of(led, "delta") == "draining"


COMPLETION_CASES = [
    # the verbs on running lanes: the installed fleet's lanes (alpha, beta), not omega (only in lanes.d)
    ("lanectl drain ", ["alpha", "beta"]), ("lanectl drain a", ["alpha"]), ("lanectl undrain b", ["beta"]),
    ("lanectl restart ", ["alpha", "beta"]), ("lanectl reroute ", ["alpha", "beta"]),
    ("lanectl reroute alpha --to ", ["alpha", "beta"]), ("lanectl reroute alpha --to b", ["beta"]),
    ("lanectl drill ", ["alpha", "beta"]), ("lanectl promote a", ["alpha"]), ("lanectl snapshot ", ["alpha", "beta"]),
    ("lanectl logs ", ["alpha", "beta"]), ("lanectl up ", ["alpha", "beta"]), ("lanectl status b", ["beta"]),
    ("lanectl events --lane ", ["alpha", "beta"]),
    # the verbs on lane files: lanes.d, installed or not
    ("lanectl lane show ", ["alpha", "beta", "omega"]), ("lanectl lane remove o", ["omega"]),
    ("lanectl lane remove omega --reroute-to ", ["alpha", "beta", "omega"]),
    ("lanectl submit --lane ", ["alpha", "beta", "omega"]), ("lanectl submit --lane om", ["omega"]),
]


@pytest.mark.parametrize("line,expected", COMPLETION_CASES, ids=[c[0] for c in COMPLETION_CASES])
def test_lane_names_complete_for_every_verb_that_takes_one(tmp_path: Path, line: str, expected: list[str]) -> None:
    """Found by an attack (issue 15 follow-up F10): lane names completed only for up/down/status/probe. Through
    the shell completion protocol bash uses (the same entry point as the installed `lanectl`)."""
    import os
    import subprocess
    import sys

    from tests.conftest import ROOT

    units, etc = tmp_path / "units", tmp_path / "etc"
    units.mkdir()
    (units / "lanectl-fleet.json").write_text(json.dumps({"lanectl_manifest": 1, "config_dir": str(etc),
                                                          "lanes": {"alpha": {}, "beta": {}}}))
    for name, port in (("alpha", 8701), ("beta", 8702), ("omega", 8703)):
        (etc / "lanes.d").mkdir(parents=True, exist_ok=True)
        (etc / "lanes.d" / f"{name}.toml").write_text(f'port = {port}\nworkspace = "/var/lib/lanes/{name}"\n')
    words = line.split(" ")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "LANECTL_UNIT_DIR": str(units), "LANECTL_CONFIG_DIR": str(etc),
           "_LANECTL_COMPLETE": "complete_bash", "COMP_WORDS": line, "COMP_CWORD": str(len(words) - 1)}
    res = subprocess.run([sys.executable, "-c", "from lanectl.entry import main; main()"], capture_output=True,
                         text=True, env=env, timeout=60)
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == expected, (line, res.stdout, res.stderr)

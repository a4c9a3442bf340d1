"""The fast paths (lanectl.entry: ``status``, ``probe``; lanectl.cli.missionview: ``missions``, ``mission show``)
must answer exactly as the typer application does, byte for byte on stdout and stderr and with the same exit code,
errors included, and hand everything they do not understand to it."""
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
from lanectl.states import CLASSES

ROOT = Path(__file__).resolve().parents[2]
T0 = 1_700_000_000.0


@pytest.fixture(scope="module")
def ledger(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("reads")
    lanes = {"alpha": Lane(port=9201, workspace="/var/lib/lanes/alpha", capacity=2)}
    fleet = LaneSet(lanes, Settings(classes={c: ClassPolicy() for c in CLASSES}), base, base)
    path = base / "ledger.db"
    with Ledger.open(path) as led:
        ms.submit_many(led, fleet, [ms.SubmitRequest("background", {"argv": ["true"], "i": i},
                                                     session="alpha:s1" if i % 3 == 0 else None)
                                    for i in range(7)], now=T0)
        ms.submit(led, fleet, cls="interactive", payload={"x": "ünï"}, now=T0)
        tick.run_once(led, fleet, now=T0 + 1)
    return path


MARK = "\0TYPER="


def _run(code: str, argv: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, cwd=ROOT,
                          env={"PATH": "/usr/bin:/bin", "COLUMNS": "200", "LANECTL_UNIT_DIR": "/nonexistent",
                               **env})


def run_entry(argv: list[str], env: dict[str, str]) -> tuple[int, bytes, bytes, bool]:
    """The console script (lanectl.entry.main) in a fresh interpreter: exit code, stdout, stderr (bytes), and
    whether typer was imported (the fast path answered when it was not)."""
    code = ("import sys; from lanectl.entry import main\n"
            "try:\n    main()\nfinally:\n    sys.stderr.write('%sTYPER=%d' % (chr(0), 'typer' in sys.modules))")
    proc = _run(code, argv, env)
    err, _, mark = proc.stderr.rpartition(MARK.encode())
    return proc.returncode, proc.stdout, err, mark == b"1"


def run_typer(argv: list[str], env: dict[str, str]) -> tuple[int, bytes, bytes]:
    """The typer application only, in a fresh interpreter (never the fast path)."""
    proc = _run("from lanectl.cli.main import app\napp(prog_name='lanectl')", argv, env)
    return proc.returncode, proc.stdout, proc.stderr


def fast(argv: list[str], env: dict[str, str]) -> tuple[int, str, bool]:
    """Run the console script; also report whether typer was imported."""
    code, out, _err, typer_loaded = run_entry(argv, env)
    return code, out.decode(), typer_loaded


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


def test_another_configuration_than_the_installed_one_goes_to_typer(installed: dict[str, Path]) -> None:
    env = {**_env(installed, "fleet"), "LANECTL_CONFIG_DIR": str(installed["noledger-conf"])}
    code, out, _, typer_loaded = run_entry(["missions", "--json"], env)
    assert typer_loaded and code == 6 and "absent.db" in out.decode()


def test_the_install_manifest_names_the_ledger(ledger: Path, tmp_path: Path) -> None:
    (tmp_path / "lanectl-fleet.json").write_text(json.dumps({"lanectl_manifest": 1, "ledger": str(ledger),
                                                             "lanes": {}}))
    code, out, typer_loaded = fast(["mission", "show", "8", "--json"], {"LANECTL_UNIT_DIR": str(tmp_path)})
    assert code == 0 and not typer_loaded and json.loads(out)["data"]["payload"] == {"x": "ünï"}


# ------------------------------------------------------------------ byte for byte, status and probe included


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory, ledger: Path) -> dict[str, Path]:
    """Configurations installed as ``lanectl install`` leaves them (the manifest beside the units, written from
    the configuration): one whose ledger is the module's, one whose ledger does not exist; and a unit directory
    with nothing installed beside an empty configuration (never the host's)."""
    from lanectl.install import manifest

    base = tmp_path_factory.mktemp("installed")
    out = {}
    for name, led in (("fleet", ledger), ("noledger", base / "absent.db")):
        units, conf = base / name, base / f"{name}-conf"
        units.mkdir()
        conf.mkdir()
        (conf / "lanectl.toml").write_text(f'ledger = "{led}"\n')
        lanes = {"alpha": Lane(port=9201, workspace="/var/lib/lanes/alpha", capacity=2),
                 "beta": Lane(port=9202, workspace="/var/lib/lanes/beta", capacity=1, fallback="alpha")}
        fleet = LaneSet(lanes, Settings(classes={c: ClassPolicy() for c in CLASSES}, ledger={"path": str(led)}),
                        conf, conf)
        (units / "lanectl-fleet.json").write_text(json.dumps(manifest(fleet)))
        out[name], out[f"{name}-conf"] = units, conf
    out["nofleet"] = base / "nofleet"
    out["nofleet"].mkdir()
    out["nofleet-conf"] = base / "nofleet-conf"
    out["nofleet-conf"].mkdir()
    return out


SERVED = [  # what the fast paths answer (typer never imported)
    ("fleet", ["status"]), ("fleet", ["status", "--json"]), ("fleet", ["status", "alpha", "--json"]),
    ("fleet", ["status", "nope"]), ("fleet", ["status", "nope", "--json"]),
    ("fleet", ["probe"]), ("fleet", ["probe", "--json"]), ("fleet", ["probe", "beta"]),
    ("fleet", ["probe", "nope", "--json"]),
    ("noledger", ["status", "--json"]), ("noledger", ["probe"]), ("noledger", ["probe", "--json"]),
    ("fleet", ["missions"]), ("fleet", ["missions", "--json"]), ("fleet", ["missions", "--state", "bogus"]),
    ("fleet", ["mission", "show", "3"]), ("fleet", ["mission", "show", "99"]),
    ("fleet", ["mission", "show", "99", "--json"]),
    ("noledger", ["missions"]), ("noledger", ["missions", "--json"]), ("noledger", ["mission", "show", "1"]),
    ("noledger", ["mission", "show", "1", "--json"]),
]
HANDED_ON = [  # what the fast paths leave to typer: the same bytes either way, and typer answers them
    ("fleet", ["status", "--bogus"]), ("fleet", ["status", "--bogus", "--json"]), ("fleet", ["probe", "-x"]),
    ("fleet", ["status", "--unit-dir"]), ("fleet", ["missions", "--limit", "0"]),
    ("fleet", ["missions", "--limit", "0", "--json"]), ("fleet", ["mission", "show", "x", "--json"]),
    ("nofleet", ["status"]), ("nofleet", ["status", "--json"]), ("nofleet", ["probe"]),
    ("nofleet", ["probe", "--json"]), ("nofleet", ["missions", "--json"]), ("nofleet", ["mission", "show", "1"]),
]


def _env(installed: dict[str, Path], where: str) -> dict[str, str]:
    return {"LANECTL_UNIT_DIR": str(installed[where]), "LANECTL_CONFIG_DIR": str(installed[f"{where}-conf"])}


@pytest.mark.parametrize("where, argv", SERVED, ids=[f"{w}: {' '.join(a)}" for w, a in SERVED])
def test_the_fast_paths_answer_byte_for_byte_like_typer(installed: dict[str, Path], where: str,
                                                         argv: list[str]) -> None:
    env = _env(installed, where)
    code, out, err, typer_loaded = run_entry(argv, env)
    assert not typer_loaded, "the fast path did not answer"
    assert (code, out, err) == run_typer(argv, env)
    if "--json" in argv:
        doc = json.loads(out)
        assert doc["lanectl_json"] == 1 and doc["exit_code"] == code and not err


@pytest.mark.parametrize("where, argv", HANDED_ON, ids=[f"{w}: {' '.join(a)}" for w, a in HANDED_ON])
def test_what_the_fast_paths_hand_on_answers_like_typer(installed: dict[str, Path], where: str,
                                                        argv: list[str]) -> None:
    env = _env(installed, where)
    code, out, err, typer_loaded = run_entry(argv, env)
    assert typer_loaded
    assert (code, out, err) == run_typer(argv, env)
    if "--json" in argv and code != 2:  # a usage error is click's, before any command runs
        doc = json.loads(out)
        assert doc["lanectl_json"] == 1 and doc["exit_code"] == code


def test_probe_json_without_an_installed_fleet_is_the_envelope(installed: dict[str, Path]) -> None:
    """It printed a plain text line (issue 11 item 6): a script that asked for JSON parses what comes."""
    code, out, err, _ = run_entry(["probe", "--json"], _env(installed, "nofleet"))
    doc = json.loads(out)
    assert code == 3 and doc["exit_code"] == 3 and doc["status"] == "error" and not err
    assert doc["data"]["status"] == "UNKNOWN" and doc["data"]["line"].startswith("LANECTL UNKNOWN - no installed")
    assert [e["code"] for e in doc["errors"]] == ["no_installed_fleet"]
    code, out, _, _ = run_entry(["probe"], _env(installed, "nofleet"))
    assert code == 3 and out.startswith(b"LANECTL UNKNOWN - no installed fleet") and out.count(b"\n") == 1


def test_every_reader_finds_the_ledger_the_same_way(installed: dict[str, Path], ledger: Path,
                                                    tmp_path: Path) -> None:
    """$LANECTL_LEDGER outranks the installed fleet's ledger for status, probe and missions alike, on both paths
    (lanectl.paths.ledger_path): here it names a ledger that does not exist, so each of them says so."""
    env = {**_env(installed, "fleet"), "LANECTL_LEDGER": str(tmp_path / "nowhere.db")}
    for argv in (["missions", "--json"], ["mission", "show", "1", "--json"]):
        code, out, _, typer_loaded = run_entry(argv, env)
        assert not typer_loaded and code == 6 and "nowhere.db" in out.decode(), out
        assert (code, out) == run_typer(argv, env)[:2]
    code, out, _, _ = run_entry(["probe", "--json"], env)
    assert (code, out) == run_typer(["probe", "--json"], env)[:2]


@pytest.mark.parametrize("how", ["env", "option"])
@pytest.mark.parametrize("json_out", [False, True])
def test_probe_with_an_unusable_ledger_url_is_unknown_not_a_trace(installed: dict[str, Path], how: str,
                                                                  json_out: bool) -> None:
    """Found by an attack on issue 11 (F3): a password in a ledger URL made probe die with a traceback and exit 1
    (WARNING to Nagios). Now UNKNOWN (exit 3) naming the problem, the envelope with --json, the password never
    printed; the fast path (environment) and typer (--ledger, or the environment) answer alike."""
    url = "postgresql://bob:s3cretPW@localhost/led"
    env = _env(installed, "fleet")
    argv = ["probe", *(["--json"] if json_out else [])]
    if how == "env":
        env["LANECTL_LEDGER"] = url
        code, out, err, typer_loaded = run_entry(argv, env)
        assert not typer_loaded
        assert (code, out, err) == run_typer(argv, env)
    else:
        code, out, err = run_typer([*argv, "--ledger", url], env)
    text = (out + err).decode()
    assert code == 3 and "Traceback" not in text and "s3cretPW" not in text, text
    if json_out:
        doc = json.loads(out)
        assert doc["exit_code"] == 3 and doc["data"]["status"] == "UNKNOWN", doc
        assert [e["code"] for e in doc["errors"]] == ["ledger_url_password"], doc
    else:
        assert out.startswith(b"LANECTL UNKNOWN - ledger URL postgresql://bob:***@localhost/led carries a password")


@pytest.mark.parametrize("argv", [["status"], ["status", "--json"]])
def test_status_with_an_unusable_ledger_url_answers_like_typer(installed: dict[str, Path], argv: list[str]) -> None:
    env = {**_env(installed, "fleet"), "LANECTL_LEDGER": "postgresql://bob:s3cretPW@localhost/led"}
    code, out, err, typer_loaded = run_entry(argv, env)
    assert not typer_loaded and code == 2 and b"s3cretPW" not in out + err and b"Traceback" not in out + err
    assert (code, out, err) == run_typer(argv, env)

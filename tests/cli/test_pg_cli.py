"""The CLI on a PostgreSQL ledger where a person is waiting (issue 12, items 1, 5, 7): ``ledger init --ledger URL``,
``ledger copy``, and the errors of a URL or a server that cannot be used — each with its documented code and exit
code, the URL shown redacted, a password never printed. The server is the session's real one (tests/pgserver.py);
the CLI is this checkout's, run as a process (``python -m lanectl``)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from lanectl.errors import ExitCode
from tests.conftest import ROOT

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the test server's socket is private to root and postgres")


def lanectl(*args: str, env: dict[str, str] | None = None, json_out: bool = True) -> tuple[int, Any, str, str]:
    cmd = [sys.executable, "-m", "lanectl", *args] + (["--json"] if json_out else [])
    base = {k: v for k, v in os.environ.items() if k not in ("LANECTL_LEDGER", "LANECTL_CONFIG_DIR", "PGPASSFILE")}
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd="/",
                         env={**base, "PYTHONPATH": str(ROOT), "COLUMNS": "200", **(env or {})})
    assert "Traceback" not in res.stderr, res.stderr
    doc = json.loads(res.stdout) if json_out and res.stdout.strip() else None
    return res.returncode, doc, res.stdout, res.stderr


def error_of(doc: Any) -> dict[str, Any]:
    assert doc is not None and doc["errors"], doc
    return doc["errors"][0]


@pytest.fixture
def etc(tmp_path: Path) -> Path:
    d = tmp_path / "etc"
    (d / "lanes.d").mkdir(parents=True)
    (d / "lanes.d" / "alpha.toml").write_text('port = 9101\nworkspace = "/var/lib/lanes/alpha"\ncapacity = 2\n')
    (d / "lanectl.toml").write_text(f'state_dir = "{tmp_path / "state"}"\n')
    return d


@pytest.fixture
def empty_db(pg_server):
    """A database with nothing in it (no ledger tables): what an operator gets from createdb."""
    name = pg_server.create_db("cli", empty=True)
    yield pg_server.url(name)
    pg_server.drop_db(name)


def test_ledger_init_creates_a_ledger_in_an_empty_database_then_only_migrates(etc, empty_db):
    code, doc, _, _ = lanectl("ledger", "init", "--config", str(etc), "--ledger", empty_db)
    assert code == 0 and doc["data"] == {"ledger": empty_db, "changed": True}, doc
    code, doc, _, _ = lanectl("ledger", "init", "--config", str(etc), "--ledger", empty_db)
    assert code == 0 and doc["data"]["changed"] is False
    code, doc, _, _ = lanectl("ledger", "migrate", "--config", str(etc), "--ledger", empty_db)
    assert code == 0 and doc["data"]["changed"] is False and doc["data"]["applied"] == []
    code, doc, _, _ = lanectl("submit", "--config", str(etc), "--ledger", empty_db, "--payload", "{}")
    assert code == 0 and doc["data"]["id"] == 1


def test_commands_other_than_init_refuse_a_database_without_a_ledger(etc, empty_db):
    code, doc, _, _ = lanectl("missions", "--config", str(etc), "--ledger", empty_db)
    assert code == ExitCode.UNAVAILABLE and error_of(doc)["code"] == "ledger_missing"
    code, doc, _, _ = lanectl("ledger", "migrate", "--config", str(etc), "--ledger", empty_db)
    assert code == ExitCode.UNAVAILABLE and error_of(doc)["code"] == "ledger_missing"


def test_an_unreachable_server_is_ledger_unavailable_naming_the_url(etc, tmp_path):
    nowhere = tmp_path / "no-server"
    nowhere.mkdir()
    url = f"postgresql://lanectl@/ledger?host={nowhere}"
    for verb in (["missions"], ["ledger", "init"], ["submit", "--payload", "{}"]):
        code, doc, _, _ = lanectl(*verb, "--config", str(etc), "--ledger", url)
        err = error_of(doc)
        assert code == ExitCode.UNAVAILABLE and err["code"] == "ledger_unavailable", (verb, doc)
        assert url in err["message"] and "check that the server runs" in err["hint"]
    code, _, _, stderr = lanectl("missions", "--config", str(etc), "--ledger", url, json_out=False)
    assert code == ExitCode.UNAVAILABLE and "error:" in stderr and url in stderr


def test_a_missing_database_is_ledger_missing(etc, pg_server):
    url = pg_server.url("no_such_db")
    code, doc, _, _ = lanectl("missions", "--config", str(etc), "--ledger", url)
    assert code == ExitCode.UNAVAILABLE and error_of(doc)["code"] == "ledger_missing"
    code, doc, _, _ = lanectl("ledger", "init", "--config", str(etc), "--ledger", url)
    err = error_of(doc)
    assert code == ExitCode.UNAVAILABLE and err["code"] == "ledger_missing" and "createdb" in err["hint"]


def test_a_wrong_password_is_ledger_auth_and_the_right_one_from_pgpassfile_works(etc, pg_server, tmp_path):
    """libpq's own sources of the password work (PGPASSFILE here); a wrong one is exit 3, ledger_auth, and
    neither password ever appears in the output."""
    right, wrong = "Right-Horse-7731", "Wrong-Staple-1234"
    db = pg_server.add_password_role("lanectl_pw", right, dbname="pw")
    url = pg_server.url_as("lanectl_pw", db)
    passfile = tmp_path / "pgpass"
    passfile.write_text(f"*:*:*:lanectl_pw:{wrong}\n")
    passfile.chmod(0o600)
    env = {"PGPASSFILE": str(passfile)}
    for json_out in (True, False):
        code, doc, out, err = lanectl("missions", "--config", str(etc), "--ledger", url, env=env, json_out=json_out)
        assert code == ExitCode.CONFIG, (out, err)
        assert wrong not in out + err and right not in out + err
        if json_out:
            problem = error_of(doc)
            assert problem["code"] == "ledger_auth" and url in problem["message"]
            assert "PGPASSFILE" in problem["hint"]
    passfile.write_text(f"*:*:*:lanectl_pw:{right}\n")
    code, doc, out, err = lanectl("ledger", "init", "--config", str(etc), "--ledger", url, env=env)
    assert code == 0, (out, err)
    code, doc, out, err = lanectl("submit", "--config", str(etc), "--ledger", url, "--payload", "{}", env=env)
    assert code == 0 and doc["data"]["id"] == 1, (out, err)
    assert right not in out + err


@pytest.mark.parametrize("url, names", [
    ("postgresql:", "must be followed by //"),
    ("postgresql:///lanectl?sslmode=bogus", "sslmode='bogus'"),
    ("postgresql:///lanectl?target_session_attrs=sometimes", "target_session_attrs"),
    ("postgresql:///lanectl?sslmod=require", "sslmod"),
    ("postgresql:///lanectl?passfile=relative/pgpass", "passfile"),
])
def test_a_url_libpq_would_not_take_is_bad_ledger_url(etc, url, names):
    for verb in (["missions"], ["ledger", "init"]):
        code, doc, _, _ = lanectl(*verb, "--config", str(etc), "--ledger", url)
        err = error_of(doc)
        assert code == ExitCode.USAGE and err["code"] == "bad_ledger_url" and names in err["message"], doc
    code, doc, _, _ = lanectl("missions", "--config", str(etc), env={"LANECTL_LEDGER": url})
    assert code == ExitCode.USAGE and error_of(doc)["code"] == "bad_ledger_url"


@pytest.mark.parametrize("url", ["postgresql:///lanectl?host=/s&password=Hunter2x",
                                 "postgresql://u:Hunter2x@/lanectl?host=/s"])
def test_a_password_in_the_url_is_refused_and_never_printed(etc, url):
    code, doc, out, err = lanectl("missions", "--config", str(etc), "--ledger", url)
    assert code == ExitCode.USAGE and error_of(doc)["code"] == "ledger_url_password"
    assert "Hunter2x" not in out + err


def test_copy_sqlite_to_postgresql_and_refusals(etc, tmp_path, empty_db):
    src = tmp_path / "state" / "ledger.db"
    assert lanectl("ledger", "init", "--config", str(etc), "--ledger", str(src))[0] == 0
    for i in range(3):
        assert lanectl("submit", "--config", str(etc), "--ledger", str(src), "--payload", json.dumps({"i": i}))[0] == 0
    code, doc, _, _ = lanectl("ledger", "copy", str(src), empty_db)
    assert code == 0, doc
    data = doc["data"]
    assert data["verified"] is True and data["changed"] is True and data["source"] == str(src)
    assert data["destination"] == empty_db and data["tables"]["missions"]["rows"] == 3
    assert all(t["match"] and t["source_sha256"] == t["destination_sha256"] for t in data["tables"].values())
    assert data["id_marks"]["missions"] == {"source": 3, "destination": 3}
    # the copy is a working ledger: ids continue past the copied ones
    code, doc, _, _ = lanectl("submit", "--config", str(etc), "--ledger", empty_db, "--payload", "{}")
    assert code == 0 and doc["data"]["id"] == 4
    # again into the same database: refused, nothing written
    code, doc, _, _ = lanectl("ledger", "copy", str(src), empty_db)
    err = error_of(doc)
    assert code == ExitCode.CONFLICT and err["code"] == "ledger_not_empty" and "missions (4 rows)" in err["message"]
    # and back, human output: a table of both sides' counts and checksums
    back = tmp_path / "back.db"
    code, _, out, _ = lanectl("ledger", "copy", empty_db, str(back), json_out=False)
    assert code == 0 and "missions" in out and "verified" in out and "yes" in out
    code, doc, _, _ = lanectl("missions", "--config", str(etc), "--ledger", str(back))
    assert code == 0 and sorted(m["id"] for m in doc["data"]["missions"]) == [1, 2, 3, 4]
    code, doc, _, _ = lanectl("ledger", "copy", str(src), "postgresql:///x?sslmode=bogus")
    assert code == ExitCode.USAGE and error_of(doc)["code"] == "bad_ledger_url"
    code, doc, _, _ = lanectl("ledger", "copy", str(tmp_path / "nope.db"), str(tmp_path / "n2.db"))
    assert code == ExitCode.UNAVAILABLE and error_of(doc)["code"] == "ledger_missing"
    assert not (tmp_path / "n2.db").exists()


def test_probe_top_and_status_read_a_postgresql_ledger_and_name_one_that_cannot_be_read(pg_server, tmp_path):
    """The readers behind probe, top and status (lanectl.probe, lanectl.top, lanectl.status) on a PostgreSQL
    ledger: they read it (no Path operations on the URL), and a server that cannot be reached is the ledger's
    problem ("ledger unreadable"), never taken for systemd's."""
    from lanectl import probe, status, top
    from lanectl.ledger import Ledger, lanes as lane_ops

    db = pg_server.create_db("readers")
    url = pg_server.url(db)
    with Ledger.open(url) as led:
        lane_ops.set_weight(led, "alpha", 42, now=1.0)
    lanes = {"alpha": {"capacity": 2, "port": 9101, "unit": "lanectl-lane-alpha.service"}}
    assert probe.read_lane_views(url)["alpha"]["weight"] == 42
    source = top.Source({"lanes": lanes}, url)
    frame = source.frame()
    assert frame.metrics is not None and not [e for e in frame.errors if e.startswith("ledger")], frame.errors
    source.close()

    gone = tmp_path / "no-server"
    gone.mkdir()
    bad = f"postgresql:///x?host={gone}"
    res = probe.run({"lanes": lanes, "ledger": bad})
    ledger_checks = [c for c in res.checks if c.name == "ledger"]
    assert ledger_checks and ledger_checks[0].code == probe.UNKNOWN and "ledger unreadable" in ledger_checks[0].text
    assert bad in ledger_checks[0].text and "cannot reach" in ledger_checks[0].text
    source = top.Source({"lanes": lanes}, bad)
    frame = source.frame()
    assert [e for e in frame.errors if e.startswith("ledger:") and "cannot reach" in e], frame.errors
    rows = [status.LaneStatus("alpha", "lanectl-lane-alpha.service", True, 9101)]
    status._dispatch(rows, bad)  # what collect(ledger=...) runs beside systemd
    assert "unreadable" in (rows[0].dispatch_error or "") and bad in rows[0].dispatch_error
    pg_server.drop_db(db)


def test_the_snapshot_ledger_check_on_postgresql_finds_a_broken_invariant(pg_server):
    """reads.integrity_check on PostgreSQL: ["ok"] for a sound ledger, and what is wrong when the queue-depth count
    no longer matches the queued missions (written below the ledger's API, as a bug or a hand edit would)."""
    from lanectl.ledger import Ledger, missions as ms, reads
    from tests.ledger.conftest import T0, make_fleet

    db = pg_server.create_db("integrity")
    url = pg_server.url(db)
    try:
        with Ledger.open(url) as led:
            ms.submit(led, make_fleet(Path("/tmp")), cls="interactive", payload={}, now=T0)
            assert reads.integrity_check(led) == ["ok"]
            led.conn.execute("UPDATE queue_depth SET n = n + 2 WHERE rank = 0")
            found = reads.integrity_check(led)
            assert found == ["queue_depth of rank 0 is 3 but 1 are queued"], found
    finally:
        pg_server.drop_db(db)


def test_a_ledger_named_in_lanectl_toml_by_url_is_found_by_lane_remove_and_init(etc, empty_db):
    """`ledger = URL` in lanectl.toml, no --ledger: `ledger init` creates it, and `lane remove` asks it whether work
    is bound to the lane (it used to call Path.exists() on the URL)."""
    (etc / "lanectl.toml").write_text((etc / "lanectl.toml").read_text() + f'ledger = "{empty_db}"\n')
    (etc / "lanes.d" / "beta.toml").write_text('port = 9102\nworkspace = "/var/lib/lanes/beta"\n')
    code, doc, _, _ = lanectl("ledger", "init", "--config", str(etc))
    assert code == 0 and doc["data"] == {"ledger": empty_db, "changed": True}, doc
    assert lanectl("submit", "--config", str(etc), "--lane", "beta", "--payload", "{}")[0] == 0
    code, doc, _, _ = lanectl("lane", "remove", "beta", "--config", str(etc))
    assert code == ExitCode.CONFLICT and error_of(doc)["code"] == "lane_in_use", doc
    code, doc, _, _ = lanectl("lane", "remove", "beta", "--config", str(etc), "--reroute-to", "alpha")
    assert code == 0 and doc["data"]["moved"]["missions"] == [1], doc
    code, doc, _, _ = lanectl("missions", "--config", str(etc))
    assert code == 0 and doc["data"]["missions"][0]["lane"] == "alpha", doc

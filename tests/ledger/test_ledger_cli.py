"""The mission CLI through typer's CliRunner (a local app: lanectl.cli.main is wired at merge time)."""
from __future__ import annotations

import json

import pytest
import typer
from typer.testing import CliRunner

from lanectl.cli import missions

runner = CliRunner()


@pytest.fixture
def app():
    app = typer.Typer()
    missions.register(app)
    return app


@pytest.fixture
def env(backend, tmp_path, monkeypatch):
    cfg = tmp_path / "etc"
    (cfg / "lanes.d").mkdir(parents=True)
    (cfg / "lanes.d" / "alpha.toml").write_text('port = 9101\nworkspace = "/var/lib/lanes/alpha"\ncapacity = 1\n')
    (cfg / "lanes.d" / "beta.toml").write_text('port = 9102\nworkspace = "/var/lib/lanes/beta"\n'
                                                'classes = ["background"]\n')
    monkeypatch.setenv("LANECTL_CONFIG_DIR", str(cfg))
    monkeypatch.setenv("LANECTL_LEDGER", backend.location())
    backend.open().close()  # as 'lanectl install' would: no other command creates it
    return tmp_path


def run(app, *args):
    res = runner.invoke(app, list(args), prog_name="lanectl")
    doc = json.loads(res.stdout) if "--json" in args and res.stdout.strip() else None
    return res, doc


def test_submit_dispatch_show_cancel_retry(app, env):
    res, doc = run(app, "submit", "--class", "interactive", "--json", "--", "/bin/echo", "hi")
    assert res.exit_code == 0, res.output
    assert doc["lanectl_json"] == 1 and doc["status"] == "ok" and doc["data"]["changed"] is True
    mid = doc["data"]["id"]
    assert doc["data"]["payload"] == {"argv": ["/bin/echo", "hi"]}
    res, doc = run(app, "dispatch", "--once", "--json")
    assert res.exit_code == 0 and doc["data"]["dispatched"][0]["lane"] == "alpha"
    res, doc = run(app, "mission", "show", str(mid), "--json")
    assert doc["data"]["state"] == "dispatched" and doc["data"]["attempt_rows"][0]["lane"] == "alpha"
    res, doc = run(app, "missions", "--state", "dispatched", "--json")
    assert [m["id"] for m in doc["data"]["missions"]] == [mid]
    res, _ = run(app, "mission", "show", str(mid), "--wait", "--timeout", "0.2")
    assert res.exit_code == 7 and "still dispatched" in res.stderr
    res, doc = run(app, "mission", "cancel", str(mid), "--json")
    assert res.exit_code == 0 and doc["data"]["state"] == "cancelled"
    res, doc = run(app, "mission", "cancel", str(mid), "--json")
    assert res.exit_code == 0 and doc["data"]["changed"] is False
    res, doc = run(app, "mission", "retry", str(mid), "--json")
    assert res.exit_code == 0 and doc["data"]["state"] == "queued"
    res, _ = run(app, "mission", "show", str(mid))
    assert res.exit_code == 0 and "queued" in res.stdout


def test_explain_lists_every_lane(app, env):
    run(app, "submit", "--class", "interactive", "--payload", "{}")
    run(app, "submit", "--class", "interactive", "--payload", "[1]")
    run(app, "dispatch", "--once")
    res, doc = run(app, "mission", "explain", "2", "--json")
    assert res.exit_code == 0
    reasons = {v["lane"]: v["reason"] for v in doc["data"]["lanes"]}
    assert reasons == {"alpha": "lane is full (1/1 in flight)", "beta": "lane does not serve interactive"}
    res, _ = run(app, "mission", "explain", "2")
    assert "alpha" in res.stdout and "full" in res.stdout


def test_idempotency_conflict_exits_5(app, env):
    assert run(app, "submit", "--payload", "1", "--idempotency-key", "k")[0].exit_code == 0
    res, doc = run(app, "submit", "--payload", "1", "--idempotency-key", "k", "--json")
    assert res.exit_code == 0 and doc["data"]["changed"] is False
    res, doc = run(app, "submit", "--payload", "2", "--idempotency-key", "k", "--json")
    assert res.exit_code == 5 and doc["errors"][0]["code"] == "idempotency_conflict"


@pytest.mark.parametrize(("args", "code", "exit_code"), [
    (["--class", "urgent", "--payload", "{}"], "unknown_class", 2),
    (["--class", "deadline", "--deadline", "2001-01-01T00:00:00Z", "--payload", "{}"], "deadline_past", 2),
    (["--deadline", "tomorrowish", "--payload", "{}"], "bad_deadline", 2),
    (["--payload", "{nope"], "payload_not_json", 2),
    (["--payload", json.dumps({"x": "y" * 300_000})], "payload_too_large", 2),
    (["--lane", "nope", "--payload", "{}"], "lane_not_found", 4),
    (["--session", "zzz:1", "--payload", "{}"], "session_not_found", 4),
    ([], "payload_missing", 2),
])
def test_bad_input_names_field_and_writes_nothing(app, env, args, code, exit_code):
    res, doc = run(app, "submit", *args, "--json")
    assert res.exit_code == exit_code, res.output
    err = doc["errors"][0]
    assert err["code"] == code and err["hint"]
    res, doc = run(app, "missions", "--json")
    assert doc["data"]["missions"] == []


def test_human_error_goes_to_stderr(app, env):
    res, _ = run(app, "submit", "--class", "urgent", "--payload", "{}")
    assert res.exit_code == 2 and "class" in res.stderr and "interactive, deadline or background" in res.stderr
    assert res.stdout == ""


def test_not_sqlite_ledger_exits_3(app, env, tmp_path):
    bad = tmp_path / "junk.db"
    bad.write_text("not a database\n" * 20)
    res, doc = run(app, "missions", "--ledger", str(bad), "--json")
    assert res.exit_code == 3 and doc["errors"][0]["code"] == "ledger_not_sqlite"
    assert bad.read_text() == "not a database\n" * 20


def test_dispatch_needs_once_and_unknown_mission_is_4(app, env):
    assert run(app, "dispatch")[0].exit_code == 2
    res, doc = run(app, "mission", "show", "42", "--json")
    assert res.exit_code == 4 and doc["errors"][0]["code"] == "mission_not_found"


def test_submit_batch_from_a_file_and_stdin(app, env):
    lines = [json.dumps({"class": "interactive", "argv": ["/bin/echo", str(i)], "idempotency_key": f"b-{i}"})
             for i in range(3)]
    batch = env / "batch.ndjson"
    batch.write_text("# three missions\n" + "\n".join(lines) + "\n\n")
    res, doc = run(app, "submit", "--batch", str(batch), "--json")
    assert res.exit_code == 0, res.output
    assert doc["data"]["created"] == 3 and doc["data"]["existing"] == 0
    ids = [m["id"] for m in doc["data"]["missions"]]
    # the same file again is idempotent; from stdin, with a new mission after it
    extra = json.dumps({"payload": {"x": 1}, "deadline": "+10m", "tags": []})
    res = runner.invoke(app, ["submit", "--batch", "-", "--json"], input="\n".join(lines + [extra]) + "\n")
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    assert [m["id"] for m in doc["data"]["missions"]][:3] == ids
    assert (doc["data"]["created"], doc["data"]["existing"]) == (1, 3)
    assert doc["data"]["missions"][3]["class"] == "background"


@pytest.mark.parametrize(("line", "field", "text"), [
    ('{"class": "interactive", "argv": ["a"]', "line 2", "is not JSON"),
    ('{"argv": ["a"], "colour": "red"}', "line 2.colour", "Extra inputs"),
    ('{"argv": "a"}', "line 2.argv", "valid list"),
    ('{"class": "interactive"}', "line 2", "exactly one of payload and argv"),
    ('{"argv": ["a"], "deadline": "yesterday"}', "line 2.deadline", "is not a time"),
])
def test_submit_batch_bad_line_names_file_line_and_field_and_writes_nothing(app, env, line, field, text):
    batch = env / "bad.ndjson"
    batch.write_text('{"argv": ["ok"]}\n' + line + "\n")
    res, doc = run(app, "submit", "--batch", str(batch), "--json")
    assert res.exit_code == 2, res.output
    problem = doc["errors"][0]
    assert problem["file"] == str(batch) and problem["field"] == field and text in problem["message"]
    res, doc = run(app, "missions", "--json")
    assert doc["data"]["missions"] == []


def test_submit_batch_refused_by_the_ledger_names_the_mission(app, env):
    batch = env / "b.ndjson"
    batch.write_text('{"argv": ["ok"]}\n\n{"argv": ["x"], "lane": "nowhere"}\n{"class": "urgent", "argv": []}\n')
    res, doc = run(app, "submit", "--batch", str(batch), "--json")
    assert res.exit_code == 4, res.output
    assert doc["errors"][0]["message"].startswith(f"{batch}: line 3: lane: no lane named 'nowhere'")
    batch.write_text('{"argv": ["ok"]}\n{"class": "urgent", "argv": []}\n')
    res, doc = run(app, "submit", "--batch", str(batch), "--json")
    assert res.exit_code == 2, res.output
    assert (doc["errors"][0]["file"], doc["errors"][0]["field"]) == (str(batch), "line 2.class")
    res, doc = run(app, "missions", "--json")
    assert doc["data"]["missions"] == []
    res, doc = run(app, "submit", "--batch", str(batch), "--json", "--", "/bin/true")
    assert res.exit_code == 2


def test_explain_says_a_lane_of_lanes_d_that_is_not_installed_cannot_take_it(app, env, monkeypatch):
    """Found by an attack (issue 15 follow-up F9): `mission explain` called a lane in lanes.d that has no unit yet
    "eligible now"; only the installed fleet's lanes run missions."""
    res, doc = run(app, "submit", "--class", "background", "--lane", "beta", "--json", "--payload", "{}")
    mid = str(doc["data"]["id"])
    res, doc = run(app, "mission", "explain", mid, "--json")  # nothing installed here: lanes.d is all there is
    assert doc["data"]["summary"].startswith("eligible now"), doc
    units = env / "units"
    units.mkdir()
    (units / "lanectl-fleet.json").write_text(json.dumps({"lanectl_manifest": 1, "config_dir": str(env / "etc"),
                                                          "lanes": {"alpha": {}}}))
    monkeypatch.setenv("LANECTL_UNIT_DIR", str(units))
    res, doc = run(app, "mission", "explain", mid, "--json")
    assert res.exit_code == 0, res.output
    verdicts = {v["lane"]: v for v in doc["data"]["lanes"]}
    assert verdicts["beta"]["eligible"] is False and verdicts["beta"]["reason"].startswith("not installed"), doc
    assert doc["data"]["summary"].startswith("no lane can take it") and "not installed" in doc["data"]["summary"]
    res, _ = run(app, "mission", "explain", mid)
    assert "beta: no not installed" in res.stdout and "eligible now" not in res.stdout, res.stdout
    # the manifest of another configuration says nothing about this one
    (units / "lanectl-fleet.json").write_text(json.dumps({"lanectl_manifest": 1, "config_dir": "/etc/elsewhere",
                                                          "lanes": {"alpha": {}}}))
    res, doc = run(app, "mission", "explain", mid, "--json")
    assert doc["data"]["summary"].startswith("eligible now"), doc


def test_writing_commands_time_their_writes_by_the_ledgers_clock(app, env, backend, monkeypatch):
    """On a host whose clock is an hour fast, submit (one and --batch), dispatch --once, cancel and retry write the
    ledger's time: on PostgreSQL the server's (``Ledger.clock``), on SQLite this host's own (its only clock)."""
    import time

    real = time.time
    monkeypatch.setattr(time, "time", lambda: real() + 3600.0)
    batch = env / "batch.jsonl"
    batch.write_text('{"class": "interactive", "payload": {"n": 1}}\n')
    assert run(app, "submit", "--class", "interactive", "--payload", "{}")[0].exit_code == 0
    assert run(app, "submit", "--batch", str(batch))[0].exit_code == 0
    assert run(app, "dispatch", "--once")[0].exit_code == 0
    assert run(app, "mission", "cancel", "1")[0].exit_code == 0
    assert run(app, "mission", "retry", "1")[0].exit_code == 0
    led = backend.open()
    expected = real() if led.dialect == "postgresql" else time.time()
    times = [r[0] for r in led.conn.execute("SELECT at FROM events")]
    times += [t for r in led.conn.execute("SELECT dispatched_at, lease_expires - 30 FROM attempts") for t in r]
    assert len(times) >= 7 and all(abs(t - expected) < 60 for t in times), (times, expected)

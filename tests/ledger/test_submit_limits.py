"""Issue 10, findings 10 and 11: producer input is bounded before it is read whole, a refusal creates no ledger
file, and a retry that repeats a relative deadline's text with the same idempotency key is the same request."""
from __future__ import annotations

import json
import os
import subprocess
import threading
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from conftest import T0, make_fleet
from lanectl.cli import missions
from lanectl.errors import ExitCode, LanectlError
from lanectl.ledger import missions as ms
from tests.conftest import LANECTL_BIN

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
    (cfg / "lanes.d" / "alpha.toml").write_text('port = 9101\nworkspace = "/var/lib/lanes/alpha"\n')
    monkeypatch.setenv("LANECTL_CONFIG_DIR", str(cfg))
    monkeypatch.setenv("LANECTL_LEDGER", backend.location())
    return tmp_path


@pytest.fixture
def ledger_env(env, backend):
    """``env`` with its ledger created, as 'lanectl install' would (no other command creates one)."""
    backend.open().close()
    return env


def run(app, *args, input=None):
    res = runner.invoke(app, [*args, "--json"], prog_name="lanectl", input=input)
    return res, json.loads(res.stdout) if res.stdout.strip() else None


# ------------------------------------------------------------------------------------------ finding 10: limits
def test_a_refused_line_creates_no_ledger_file(app, env, backend):
    big = json.dumps({"payload": {"x": "y" * (ms.MAX_PAYLOAD_BYTES + 10)}})
    batch = env / "big.ndjson"
    batch.write_text('{"argv": ["ok"]}\n' + big + "\n")
    res, doc = run(app, "submit", "--batch", str(batch))
    assert res.exit_code == ExitCode.USAGE, res.output
    assert doc["errors"][0]["code"] == "payload_too_large" and doc["errors"][0]["field"] == "line 2.payload"
    assert not backend.exists()


def test_a_refused_single_submit_creates_no_ledger_file(app, env, backend):
    res, doc = run(app, "submit", "--payload", json.dumps({"x": "y" * (ms.MAX_PAYLOAD_BYTES + 10)}))
    assert res.exit_code == ExitCode.USAGE and doc["errors"][0]["code"] == "payload_too_large"
    res, doc = run(app, "submit", "--class", "deadline", "--payload", "1")
    assert res.exit_code == ExitCode.USAGE and doc["errors"][0]["code"] == "deadline_missing"
    assert not backend.exists()


def test_a_file_larger_than_the_limit_is_refused_unread(app, env, backend):
    batch = env / "huge.ndjson"
    with batch.open("wb") as fh:  # sparse: reading it would find NUL bytes, not JSON
        fh.truncate(missions.BATCH_MAX_BYTES + 1)
    res, doc = run(app, "submit", "--batch", str(batch))
    assert res.exit_code == ExitCode.USAGE, res.output
    err = doc["errors"][0]
    assert err["file"] == str(batch) and "larger than" in err["message"] and "split" in err["hint"]
    assert not backend.exists()


def _stream_refusal(env: Path, first: bytes) -> dict:
    """Feed `first` to `lanectl submit --batch -` and keep the pipe open: the command can only answer if it
    refused without waiting for the rest of the input. A command that waits for more is killed after a bound."""
    proc = subprocess.Popen([LANECTL_BIN, "submit", "--batch", "-", "--json"], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=dict(os.environ))
    out: list[bytes] = []
    reader = threading.Thread(target=lambda: out.append(proc.stdout.read()), daemon=True)  # type: ignore[union-attr]
    reader.start()
    try:
        try:
            proc.stdin.write(first)  # type: ignore[union-attr]
            proc.stdin.flush()  # type: ignore[union-attr]
        except BrokenPipeError:  # it refused (and exited) before taking all of `first`
            pass
        reader.join(timeout=60)  # EOF on stdout when the process exits, although its stdin stays open
        assert not reader.is_alive(), "lanectl kept reading: it did not refuse before the end of its input"
        assert proc.wait(timeout=60) == ExitCode.USAGE, out
        return json.loads(out[0])
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        try:
            proc.stdin.close()  # type: ignore[union-attr]
        except BrokenPipeError:
            pass


def test_a_batch_with_too_many_missions_is_refused_at_the_first_extra_line(env, backend):
    lines = b"".join(b'{"argv": ["/bin/true"]}\n' for _ in range(ms.MAX_BATCH + 1))
    doc = _stream_refusal(env, lines)
    err = doc["errors"][0]
    assert err["field"] == f"line {ms.MAX_BATCH + 1}" and f"more than {ms.MAX_BATCH}" in err["message"]
    assert not backend.exists()


def test_an_overlong_line_is_refused_before_its_end(env, backend):
    doc = _stream_refusal(env, b'{"argv": ["/bin/true"]}\n{"payload": "' + b"x" * (missions.BATCH_MAX_LINE_BYTES + 1))
    err = doc["errors"][0]
    assert err["field"] == "line 2" and "longer than" in err["message"]
    assert not backend.exists()


# ------------------------------------------------------------------------- finding 11: relative deadlines
def test_a_retry_with_the_same_relative_deadline_is_the_same_mission(app, ledger_env, monkeypatch):
    env = ledger_env
    clock = [T0]
    monkeypatch.setattr(missions.time, "time", lambda: clock[0])
    res, doc = run(app, "submit", "--deadline", "+30m", "--idempotency-key", "job-1", "--payload", "1")
    assert res.exit_code == 0, res.output
    first = doc["data"]
    assert first["changed"] is True and first["deadline"] is not None
    clock[0] += 1.0
    res, doc = run(app, "submit", "--deadline", "+30m", "--idempotency-key", "job-1", "--payload", "1")
    assert res.exit_code == 0, res.output
    assert doc["data"]["id"] == first["id"] and doc["data"]["changed"] is False
    assert doc["data"]["deadline"] == first["deadline"]  # resolved once, at the first submit
    res, doc = run(app, "submit", "--deadline", "+31m", "--idempotency-key", "job-1", "--payload", "1")
    assert res.exit_code == ExitCode.CONFLICT and doc["errors"][0]["code"] == "idempotency_conflict"


def test_a_batch_retry_with_the_same_relative_deadline_is_the_same_mission(app, ledger_env, monkeypatch):
    env = ledger_env
    clock = [T0]
    monkeypatch.setattr(missions.time, "time", lambda: clock[0])
    batch = env / "b.ndjson"
    batch.write_text('{"argv": ["x"], "deadline": "+30m", "idempotency_key": "b-1"}\n')
    res, doc = run(app, "submit", "--batch", str(batch))
    assert res.exit_code == 0 and doc["data"]["created"] == 1
    clock[0] += 1.0
    res, doc = run(app, "submit", "--batch", str(batch))
    assert res.exit_code == 0, res.output
    assert (doc["data"]["created"], doc["data"]["existing"]) == (0, 1)
    batch.write_text('{"argv": ["x"], "deadline": "+1h", "idempotency_key": "b-1"}\n')
    res, doc = run(app, "submit", "--batch", str(batch))
    assert res.exit_code == ExitCode.CONFLICT and doc["errors"][0]["code"] == "idempotency_conflict"


def test_the_client_takes_a_relative_deadline_as_text(led, tmp_path):
    fleet = make_fleet(tmp_path)
    a = ms.submit(led, fleet, cls="deadline", payload=1, now=T0, deadline="+10m", idempotency_key="k")
    b = ms.submit(led, fleet, cls="deadline", payload=1, now=T0 + 5, deadline=" +10m", idempotency_key="k")
    assert (a.created, b.created, b.mission.id, b.mission.deadline) == (True, False, a.mission.id, T0 + 600)
    with pytest.raises(LanectlError) as ei:
        ms.submit(led, fleet, cls="deadline", payload=1, now=T0 + 5, deadline=T0 + 600, idempotency_key="k")
    assert ei.value.code == "idempotency_conflict"
    with pytest.raises(LanectlError) as ei:
        ms.submit(led, fleet, cls="deadline", payload=1, now=T0, deadline="tomorrow")
    assert ei.value.code == "bad_deadline"


# ------------------------------------------------------------------------------------------ found by the attack
@pytest.mark.parametrize("line", [
    '{"argv": ["true"], "deadline": NaN}',
    '{"argv": ["true"], "deadline": 1e400}',
    '{"payload": ' + "[" * 100_000 + "]" * 100_000 + "}",
], ids=["nan-deadline", "infinite-deadline", "deeply-nested"])
def test_odd_batch_lines_are_refused_cleanly_and_write_nothing(app, env, backend, line):
    res, doc = run(app, "submit", "--batch", "-", input=line + "\n")
    assert res.exit_code == ExitCode.USAGE and doc is not None, res.output
    assert not backend.exists()


def test_a_deadline_no_date_can_show_is_refused_before_it_breaks_every_reader(app, env, backend):
    """A +99999999999d deadline was stored, then `missions`, `mission show` and `metrics` failed on it."""
    res, doc = run(app, "submit", "--class", "deadline", "--deadline", "+99999999999d", "--payload", "{}")
    assert res.exit_code == ExitCode.USAGE and doc["errors"][0]["code"] == "bad_deadline", res.output
    assert not backend.exists()
    backend.open().close()  # as 'lanectl install' would
    res, doc = run(app, "submit", "--class", "deadline", "--deadline", "+30d", "--payload", "{}")
    assert res.exit_code == 0, res.output

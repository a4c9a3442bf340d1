"""What this host's supervisor says of its link to the ledger, in ``status`` and ``probe`` (issue 13, the status
part of item 6: "ledger unreachable since ..." per host). No ledger here (it is the unreachable one): the rows are
built as ``collect`` builds them (tests/ledger/test_fleet_views.py), the supervisor's /healthz body as the
supervisor writes it (``Supervisor.health``); under systemd on PostgreSQL with the server down:
tests/systemd/test_pg_ledger.py::test_server_down_longer_than_lease_sec."""
from __future__ import annotations

from lanectl import probe
from tests.ledger.test_fleet_views import rendered, status_of


def test_status_names_the_host_and_since_when_its_supervisor_cannot_reach_the_ledger(tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    body = {"host": "web-1", "ledger_ok": False, "ledger_unreachable_since": 1_790_000_000.0,
            "ledger_error": "PostgreSQL server at /run/pg cannot be reached: connection refused"}
    rows, seen = status_of(str(tmp_path / "absent.db"), host=None, body=body)
    assert {r.host for r in rows} == {"web-1"} and rows[0].dispatch_error and rows[0].host_status is None
    code, doc = rendered(rows, seen, capsys)
    assert code == 6 and doc["status"] == "partial" and doc["data"]["hosts"] is None
    [down] = [w for w in doc["errors"] if w["code"] == "ledger_unreachable"]
    assert down["message"].startswith("ledger unreachable since 2026-09-21T") and "from host web-1" in down["message"]
    assert "connection refused" in down["message"] and "nothing new is claimed" in down["hint"]
    assert doc["errors"][0]["code"] == "ledger_unreadable"  # what this run could not read comes first
    # a supervisor that reaches the ledger but is fenced (its record changed hands): a warning, nothing else
    body = {"host": "web-1", "ledger_ok": True, "fenced": True, "fence_reason": "the host's record is dead"}
    rows, seen = status_of(str(tmp_path / "absent.db"), host=None, body=body)
    code, doc = rendered(rows, seen, capsys)
    assert [(w["code"], w["message"]) for w in doc["errors"] if w["code"] == "host_fenced"] == [
        ("host_fenced", "host web-1 is fenced: the host's record is dead")]


def test_probe_says_since_when_this_hosts_supervisor_cannot_reach_the_ledger() -> None:
    res = probe.ProbeResult()
    probe.judge_ledger_link(res, {"host": "web-1", "ledger_ok": False, "ledger_unreachable_since": 1_790_000_000.0,
                                  "ledger_error": "connection refused"})
    [c] = res.checks
    assert c.code == probe.WARNING and c.text.startswith("host web-1: ledger unreachable since 2026-09-21T")
    assert c.text.endswith("its lanes run what they hold, outcomes wait, nothing new is claimed (connection refused)")
    res = probe.ProbeResult()
    probe.judge_ledger_link(res, {"host": "web-1", "ledger_ok": True, "fenced": True,
                                  "fence_reason": "the host's record is dead"})
    assert [(c.name, c.code, c.text) for c in res.checks] == [
        ("host:web-1", probe.WARNING, "host web-1 fenced: the host's record is dead; it claims no new work")]
    res = probe.ProbeResult()
    probe.judge_ledger_link(res, {"host": "web-1", "ledger_ok": True, "fenced": False})
    assert res.checks == []

"""Issue 11 item 8: status, health, probe and error records are declared, and their JSON is what they declare.

``lanectl status --json`` renders LaneStatus rows: one key per declared field, in field order, then the derived
keys; ``health`` is Health's fields. A field added to a record without the JSON knowing (or a key added to the
JSON without the record) fails here. The real command under systemd is checked the same way in
tests/systemd/test_fleet.py::test_status_json_keys_are_the_declared_fields."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from lanectl.cli.statusview import run_status
from lanectl.errors import Problem
from lanectl.probe import CRITICAL, OK, Check, Perf, ProbeResult
from lanectl.healthcheck import Health
from lanectl.status import LaneStatus, cgroup_usage


def names(cls: type) -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(cls))


def rows() -> list[LaneStatus]:
    up = LaneStatus("alpha", "lanectl-lane@alpha.service", True, 8701, weight=3)
    up.active_state, up.sub_state, up.health = "active", "running", Health(ok=True, listening=True, http_status=200)
    sup = LaneStatus("supervisor", "lanectl-supervisor.service", True, 8700, kind="supervisor")
    sup.health = Health(ok=True, listening=True, http_status=200, body={"reload_error": "bad toml"})
    orphan = LaneStatus("ghost", "lanectl-lane@ghost.service", False, 0, kind="orphan")
    return [up, LaneStatus("beta", "lanectl-lane@beta.service", False, 8702), sup, orphan]


def status_json(capsys: pytest.CaptureFixture[str]) -> dict:
    with pytest.raises(SystemExit):
        run_status(rows(), json_out=True)
    return json.loads(capsys.readouterr().out)


def test_every_lane_of_status_json_has_exactly_the_declared_keys(capsys: pytest.CaptureFixture[str]) -> None:
    data = status_json(capsys)["data"]
    assert len(data["lanes"]) == 2
    for lane in data["lanes"]:  # (print_json sorts the keys)
        assert sorted(lane) == sorted(LaneStatus.json_keys("lane"))
        assert sorted(lane["health"]) == sorted(names(Health))
    assert sorted(data["supervisor"]) == sorted(LaneStatus.json_keys("supervisor"))
    assert [tuple(r.as_dict()) for r in rows()[:3]] == [LaneStatus.json_keys("lane")] * 2 + [
        LaneStatus.json_keys("supervisor")]
    assert data["supervisor"]["reload_error"] == "bad toml"


def test_the_declared_keys_are_the_fields_then_the_derived_ones() -> None:
    assert LaneStatus.json_keys("lane") == (*names(LaneStatus), "ok", "state", "gave_up")
    assert LaneStatus.json_keys("supervisor") == (*LaneStatus.json_keys("lane"), "reload_error")
    for key in LaneStatus.DERIVED:  # each derived key is computed by a property of that name
        assert isinstance(getattr(LaneStatus, key), property)
    assert tuple(Health().as_dict()) == names(Health)


def test_records_hold_only_their_fields() -> None:
    """slots: a misspelt attribute is an error, not a new key of the JSON."""
    for record in (LaneStatus("a", "u", True, 1), Health(), Problem("m"), ProbeResult()):
        with pytest.raises(AttributeError):
            record.not_a_field = 1  # type: ignore[union-attr]


def test_probe_json_is_its_records() -> None:
    res = ProbeResult()
    res.add("lane:alpha", CRITICAL, "alpha down")
    res.add("lanes", OK, "0/1 lanes up")
    res.perf.append(Perf("lanes_up", 0, None, None, 0, 1))
    assert res.checks[0] == Check("lane:alpha", CRITICAL, "alpha down")
    assert res.perf[0] == ("lanes_up", 0, None, None, 0, 1)
    doc = res.as_dict()
    assert list(doc) == ["status", "code", "line", "checks", "perfdata"]
    assert doc["checks"][0] == {"name": "lane:alpha", "status": "CRITICAL", "text": "alpha down"}
    assert doc["perfdata"] == {"lanes_up": {"value": 0, "warn": None, "crit": None, "min": 0, "max": 1}}
    assert doc["line"] == "LANECTL CRITICAL - alpha down | lanes_up=0;;;0;1"


def test_problem_json_keeps_its_order() -> None:
    p = Problem("bad port", file="lanes.d/a.toml", field="port", hint="use 1024-65535", code="port", lane="a")
    assert list(p.as_dict()) == ["code", "message", "hint", "file", "field", "lane", "severity"]
    assert p == Problem("bad port", "lanes.d/a.toml", "port", "use 1024-65535", "port", "a", "error")
    assert p.render() == "lanes.d/a.toml:port: bad port; use 1024-65535"


def put(root: Path, rel: str, text: str) -> None:
    path = root / rel.lstrip("/")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


CG = "/lanectl.slice/lanectl-lane@alpha.service"
CPU_STAT = "usage_usec 2500000\nuser_usec 2000000\nsystem_usec 500000\n"


def test_cgroup_usage_on_a_v1_hybrid_host(tmp_path: Path) -> None:
    """memory and pids from the v1 hierarchies, CPU from the unified hierarchy's cpu.stat (no controller needed)."""
    put(tmp_path, f"memory{CG}/memory.usage_in_bytes", "73728000\n")
    put(tmp_path, f"pids{CG}/pids.current", "3\n")
    put(tmp_path, f"unified{CG}/cpu.stat", CPU_STAT)
    put(tmp_path, f"cpuacct{CG}/cpuacct.usage", "999\n")  # the unified figure wins
    assert cgroup_usage(CG, str(tmp_path)) == (73728000, 2_500_000_000, 3)


def test_cgroup_usage_on_cgroup_v2(tmp_path: Path) -> None:
    put(tmp_path, f"{CG}/memory.current", "4096\n")
    put(tmp_path, f"{CG}/pids.current", "2\n")
    put(tmp_path, f"{CG}/cpu.stat", CPU_STAT)
    assert cgroup_usage(CG, str(tmp_path)) == (4096, 2_500_000_000, 2)


def test_cgroup_usage_v1_cpuacct_and_what_is_missing(tmp_path: Path) -> None:
    put(tmp_path, f"cpuacct{CG}/cpuacct.usage", "123456789\n")
    assert cgroup_usage(CG, str(tmp_path)) == (None, 123456789, None)
    put(tmp_path, f"memory{CG}/memory.usage_in_bytes", "max\n")  # not a number: not a figure
    assert cgroup_usage(CG, str(tmp_path))[0] is None
    assert cgroup_usage("/lanectl.slice/none.service", str(tmp_path)) == (None, None, None)


def test_health_latency_is_the_lanes_not_the_time_status_spent_meanwhile() -> None:
    """status reads systemd and the ledger between sending the health checks and reading the answers; the
    latency it reports ends when the answer arrived (the kernel's timestamp), before status got to read it."""
    import socket
    import threading
    import time

    from lanectl.healthcheck import HealthRound

    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    answered = threading.Event()

    def serve() -> None:
        conn, _ = srv.accept()
        with conn:
            data = b""
            while b"\r\n\r\n" not in data:
                data += conn.recv(4096)
            conn.sendall(b'HTTP/1.0 200 OK\r\nContent-Type: application/json\r\n\r\n{"lane": "alpha"}')
        answered.set()

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    try:
        checks = HealthRound([(srv.getsockname()[1], "/healthz")], timeout=30.0)
        for _ in range(600):  # until the request went out (pump sends it once the connection is up)
            checks.pump()
            if answered.wait(0.05):
                break
        assert answered.is_set()
        seen = time.time()  # the answer is in the socket by now; status reads it only later
        [h] = checks.finish()
    finally:
        srv.close()
        t.join(30)
    assert h.ok and h.body == {"lane": "alpha"} and h.http_status == 200
    assert checks.started + h.latency_ms / 1000 <= seen + 1e-4


@pytest.mark.parametrize("body, error", [
    (b'{"lane": "alpha"}', None), (b"", None), (b'["ok"]', "health answer is not a JSON object"),
    (b'"ok"', "health answer is not a JSON object"), (b"1", "health answer is not a JSON object"),
    (b"ok", "health answer is not JSON"),
])
def test_a_health_answer_must_be_a_json_object(body: bytes, error: str | None) -> None:
    """Found by an attack on issue 11: a /healthz answering a JSON list counted as healthy. The lane protocol's
    answer is an object (lane, pid, invocation, ...); any other JSON value is an unhealthy answer, saying why."""
    from lanectl.healthcheck import _parse_response

    h = _parse_response(b"HTTP/1.0 200 OK\r\nContent-Type: application/json\r\n\r\n" + body, 1.0)
    assert (h.ok, h.error) == (error is None, error)

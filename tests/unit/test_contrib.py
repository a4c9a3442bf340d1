"""contrib/ monitoring drop-ins, checked with the real promtool (scripts/setup installs Debian's prometheus):
the alerting rules parse and pass their own unit tests, the Grafana dashboard's queries parse, and both name only
series lanectl exports. tests/systemd/test_monitoring.py runs them against a live supervisor and Prometheus."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from lanectl import evidence
from lanectl.supervisor.callbacks import Refusals
from lanectl.supervisor.metrics import refusal_text

ROOT = Path(__file__).resolve().parents[2]
CONTRIB = ROOT / "contrib"
RULES = CONTRIB / "prometheus" / "lanectl-rules.yml"
DASHBOARD = CONTRIB / "grafana" / "lanectl-dashboard.json"
NAME = re.compile(r"\b(lanectl_[a-z0-9_]+)\b")


def promtool() -> str:
    path = shutil.which("promtool")
    assert path, "promtool is missing: run scripts/setup (it installs Debian's prometheus package)"
    return path


def run_promtool(*args: str, cwd: Path | None = None, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([promtool(), *args], cwd=cwd, input=stdin, capture_output=True, text=True, timeout=120)


def dashboard_exprs() -> list[tuple[str, str]]:
    """(panel title, expr) of every query of every panel, rows included."""
    out = []

    def walk(panels: list[dict[str, Any]]) -> None:
        for p in panels:
            for t in p.get("targets", []):
                out.append((p["title"], t["expr"]))
            walk(p.get("panels", []))

    walk(json.loads(DASHBOARD.read_text())["panels"])
    return out


def rule_exprs() -> list[tuple[str, str]]:
    doc = yaml.safe_load(RULES.read_text())
    return [(r["alert"], r["expr"]) for g in doc["groups"] for r in g["rules"]]


def exported_names() -> set[str]:
    """Every series name lanectl writes: the exposition of a full metrics dict (so that every optional series
    appears) and the supervisor process's own counters."""
    group = {"lane": "a", "class": "interactive", "in_flight": 1, "finished": 1, "succeeded": 1, "failed": 0,
             "dead": 0, "requeued": 0, "dispatched": 1, "throughput_per_min": 1.0, "failure_rate": 0.0,
             "fallback_received_rate": 0.0}
    for key in ("queue_wait_s", "run_time_s", "end_to_end_s"):
        group[key] = {"count": 1, "p50": 1.0, "p95": 1.0, "p99": 1.0}
    lane = {"lane": "a", "restarts": 0, "operator_restarts": 0, "utilization": 0.5, "capacity": 2, "in_flight": 1}
    state = {"lanes": [{"lane": "a", "state": "active", "healthy": True, "enabled": True}],
             "classes": [{"class": "interactive", "queued": 0, "oldest_wait_s": 0.0}]}
    text = evidence.prometheus_text({"window_s": 900.0, "groups": [group], "lanes": [lane], "now_state": state},
                                    generated=0.0)
    refusals = Refusals()
    refusals.add("tcp")
    text += refusal_text(refusals, [("tcp", None), ("socket", None)])
    names = {line.split()[2] for line in text.splitlines() if line.startswith("# TYPE")}
    summaries = {line.split()[2] for line in text.splitlines() if line.startswith("# TYPE") and line.endswith("summary")}
    samples = {re.split(r"[{ ]", line, 1)[0] for line in text.splitlines() if line and not line.startswith("#")}
    assert samples <= names | {f"{n}_count" for n in summaries}
    return names | {f"{n}_count" for n in summaries}


def test_rules_pass_promtool_check_rules() -> None:
    proc = run_promtool("check", "rules", str(RULES))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"SUCCESS: {len(rule_exprs())} rules found" in proc.stdout


def test_rules_pass_their_promtool_unit_tests() -> None:
    """Each alert fires on the conditions of the probe and the rollback triggers, and not short of them."""
    proc = run_promtool("test", "rules", "lanectl-rules.test.yml", cwd=CONTRIB / "prometheus")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    tested = set(re.findall(r"alertname: (\w+)", (CONTRIB / "prometheus" / "lanectl-rules.test.yml").read_text()))
    untested = {name for name, _ in rule_exprs()} - tested
    assert not untested, f"alerts without a promtool test: {sorted(untested)}"


def test_rules_cover_the_probe_and_rollback_conditions() -> None:
    alerts = {name for name, _ in rule_exprs()}
    for name in ("LanectlLaneDown", "LanectlLaneDegraded", "LanectlInteractiveStarvation", "LanectlLaneFailureSpike",
                 "LanectlFallbackSpike", "LanectlMetricsStale", "LanectlSupervisorDown", "LanectlHostLost",
                 "LanectlHostDown"):
        assert name in alerts


def test_dashboard_queries_parse_with_promtool(tmp_path: Path) -> None:
    """promtool parses every panel's query (as a recording rule: promtool has no bare-expression check)."""
    exprs = dashboard_exprs()
    assert len(exprs) >= 20
    rules = {"groups": [{"name": "dashboard", "rules": [{"record": f"lanectl_dashboard:q{i}", "expr": e}
                                                        for i, (_, e) in enumerate(exprs)]}]}
    path = tmp_path / "dashboard-rules.yml"
    path.write_text(yaml.safe_dump(rules))
    proc = run_promtool("check", "rules", str(path))
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_a_bad_query_fails_the_parse_check(tmp_path: Path) -> None:
    """The check above can fail: promtool refuses a broken expression."""
    path = tmp_path / "bad.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "g", "rules": [{"record": "x:y", "expr": "sum by (lane("}]}]}))
    assert run_promtool("check", "rules", str(path)).returncode != 0


def test_rules_and_dashboard_name_only_exported_series() -> None:
    exported = exported_names()
    used = {(where, n) for where, e in rule_exprs() + dashboard_exprs() for n in NAME.findall(e)}
    unknown = sorted((w, n) for w, n in used if n not in exported)
    assert not unknown, f"not exported by lanectl: {unknown}"
    # the panels: lanes, queue depth and waits per class, quantiles, failure/fallback rates, restarts
    names = {n for _, n in used}
    for needed in ("lanectl_lane_healthy", "lanectl_lane_state", "lanectl_queued", "lanectl_queue_oldest_wait_seconds",
                   "lanectl_queue_wait_seconds", "lanectl_failed", "lanectl_fallback_received_rate", "lanectl_lane_restarts",
                   "lanectl_lane_in_flight", "lanectl_lane_capacity"):
        assert needed in names, needed


def test_dashboard_is_importable_grafana_json() -> None:
    dash = json.loads(DASHBOARD.read_text())
    assert dash["uid"] and dash["title"] and isinstance(dash["schemaVersion"], int)
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    assert [v["name"] for v in dash["templating"]["list"]] == ["datasource"]
    for p in dash["panels"]:
        g = p["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24, p["title"]
        if p["type"] == "row":
            continue
        assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, p["title"]
        assert p["targets"], p["title"]
        assert len({t["refId"] for t in p["targets"]}) == len(p["targets"]), p["title"]
    # no two panels overlap on the grid
    cells: set[tuple[int, int]] = set()
    for p in dash["panels"]:
        g = p["gridPos"]
        mine = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
        assert not cells & mine, f"{p['title']} overlaps another panel"
        cells |= mine


def test_textfile_units_are_valid(tmp_path: Path) -> None:
    """systemd-analyze verify on the textfile service and timer (paths in them rewritten to ones that exist)."""
    analyze = shutil.which("systemd-analyze")
    assert analyze, "systemd-analyze is missing: run scripts/setup"
    for name in ("lanectl-metrics-textfile.service", "lanectl-metrics-textfile.timer"):
        text = (CONTRIB / "node_exporter" / name).read_text()
        (tmp_path / name).write_text(text.replace("/opt/lanectl/venv/bin/lanectl", "/bin/true"))
    proc = subprocess.run([analyze, "verify", "--man=no", str(tmp_path / "lanectl-metrics-textfile.timer")],
                          capture_output=True, text=True, timeout=60)
    bad = [line for line in (proc.stdout + proc.stderr).splitlines() if "lanectl-metrics-textfile" in line]
    assert proc.returncode == 0 and not bad, proc.stdout + proc.stderr


def test_metrics_of_a_ledger_pass_promtool_check_metrics(tmp_path: Path) -> None:
    """The exposition of a ledger with traffic, odd label values and lane states passes promtool's linter."""
    from lanectl.ledger import Ledger
    from lanectl.ledger import missions as ms
    from tests.unit.test_evidence import T0, add, make_fleet

    led = Ledger.open(tmp_path / "ledger.db")
    try:
        with led.transaction() as conn:
            for i in range(1, 41):
                add(conn, i, lane='we"ird\\lane' if i > 30 else "alpha", created=T0 + i, wait=i / 100,
                    outcome="failed" if i % 7 == 0 else "succeeded", fallback_from="beta" if i % 5 == 0 else None)
        ms.set_lane(led, "alpha", now=T0, healthy=True)
        ms.set_lane(led, "beta", now=T0, state="degraded", healthy=False)
        m = evidence.metrics(led, 3600, T0 + 600, fleet=make_fleet(tmp_path))
    finally:
        led.close()
    proc = run_promtool("check", "metrics", stdin=evidence.prometheus_text(m, generated=T0 + 600))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.strip() == "" and proc.stderr.strip() == "", proc.stdout + proc.stderr  # no lint findings

"""contrib/ against the real thing: the supervisor's /metrics under a real systemd passes `promtool check metrics`
and carries every series the rules and the dashboard use; a real Prometheus (Debian's /usr/bin/prometheus, on the
sandbox's loopback, started and stopped here as a transient unit) scrapes it, answers every dashboard query, and
fires LanectlLaneDown when a lane is stopped, and only that; the node_exporter textfile unit writes the same series.
"""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import uuid
from pathlib import Path
from typing import Any

import pytest

from lanectl.states import CLASSES
from tests.systemd.lanehelpers import LANECTL, Fleet, copy_example, submit_many, wait_for, wait_terminal
from tests.unit.test_contrib import CONTRIB, NAME, dashboard_exprs, promtool, rule_exprs

pytestmark = pytest.mark.systemd
PROM_PORT = 9090
LANES = ("alpha", "beta", "gamma")


@pytest.fixture(scope="module")
def fleet(sandbox, tmp_path_factory):  # type: ignore[no-untyped-def]
    cfg = copy_example(tmp_path_factory.mktemp("mon"))
    f = Fleet(sandbox, cfg)
    assert f.json("install")[0] == 0
    code, doc = f.json("up")
    assert code == 0, doc
    wait_for(lambda: all_healthy(f), 60, interval=0.5, what="every lane healthy in the supervisor's view")
    # some traffic, so that the window's series (quantiles, rates, outcomes) exist
    ids = submit_many(f, [{"cls": c, "argv": ["/bin/true"]} for c in CLASSES * 3])
    assert set(wait_terminal(f, ids, 60).values()) == {"succeeded"}
    yield f
    f.lanectl("down")


def curl(fleet: Fleet, url: str, *args: str) -> str:
    """The body of a 2xx answer, else '' (-f: Prometheus answers 503 "Service Unavailable" while it starts)."""
    proc = fleet.sb.exec(["curl", "-fsS", "--max-time", "10", *args, url], check=False)
    return proc.stdout if proc.returncode == 0 else ""


def health(fleet: Fleet) -> dict[str, Any]:
    body = curl(fleet, "http://127.0.0.1:8700/healthz")
    return json.loads(body) if body else {}


def all_healthy(fleet: Fleet) -> bool:
    lanes = health(fleet).get("lanes", {})
    return set(lanes) == set(LANES) and all(ln["healthy"] and ln["state"] == "active" for ln in lanes.values())


def supervisor_metrics(fleet: Fleet) -> str:
    return curl(fleet, "http://127.0.0.1:8700/metrics")


def exported(text: str) -> set[str]:
    names = {line.split()[2] for line in text.splitlines() if line.startswith("# TYPE")}
    summaries = {line.split()[2] for line in text.splitlines()
                 if line.startswith("# TYPE") and line.split()[3] == "summary"}
    return names | {n + "_count" for n in summaries}


def test_supervisor_metrics_pass_promtool_and_carry_every_series_contrib_uses(fleet: Fleet) -> None:
    # a refused callback (POSTed to the read-only TCP port) so that the refusal counter has a series too
    curl(fleet, "http://127.0.0.1:8700/callbacks", "-X", "POST", "-d", "{}")
    text = wait_for(lambda: (lambda t: t if re.search(r'^lanectl_lane_healthy\{lane="gamma",host="[^"]+"\} 1$', t, re.M)
                             and 'reason="tcp"' in t else None)(supervisor_metrics(fleet)), 30, interval=0.5,
                    what="/metrics with every lane's health and the refused callback")
    proc = subprocess.run([promtool(), "check", "metrics"], input=text, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and not (proc.stdout + proc.stderr).strip(), proc.stdout + proc.stderr
    names = exported(text)
    used = {n for _, e in rule_exprs() + dashboard_exprs() for n in NAME.findall(e)}
    assert used - names == set(), f"used by contrib/ but not on the supervisor's /metrics: {sorted(used - names)}"
    # one host (SQLite): its gauges, and its name as the host label of every lane's series
    [host] = re.findall(r'^lanectl_host_up\{host="([^"]+)"\} 1$', text, re.M)
    assert f'lanectl_host_expired{{host="{host}"}} 0' in text and f'lanectl_host_fenced{{host="{host}"}} 0' in text
    for lane in LANES:
        assert f'lanectl_lane_state{{lane="{lane}",host="{host}",state="active"}} 1' in text
        assert f'lanectl_lane_enabled{{lane="{lane}",host="{host}"}} 1' in text
    assert re.search(r'^lanectl_queued\{class="interactive"\} 0$', text, re.M)


# ------------------------------------------------------------------------------------------------ Prometheus


@pytest.fixture
def prometheus(fleet: Fleet, tmp_path: Path):  # type: ignore[no-untyped-def]
    """/usr/bin/prometheus as a transient unit in the sandbox (its own network namespace: loopback only),
    scraping the supervisor every second and evaluating contrib's rules every second. The rules are the shipped
    file with every `for:` cut to 3 s, so that the test does not wait a minute per alert."""
    binary = shutil.which("prometheus") or "/usr/bin/prometheus"
    assert Path(binary).is_file(), "prometheus is missing: run scripts/setup (it installs Debian's prometheus)"
    rules = tmp_path / "lanectl-rules.yml"
    rules.write_text(re.sub(r"(?m)^(\s+)for: \S+$", r"\1for: 3s", (CONTRIB / "prometheus" / "lanectl-rules.yml")
                            .read_text()))
    config = tmp_path / "prometheus.yml"
    config.write_text(json.dumps({  # JSON is YAML
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s", "scrape_timeout": "1s"},
        "rule_files": [str(rules)],
        "scrape_configs": [{"job_name": "lanectl", "static_configs": [{"targets": ["127.0.0.1:8700"]}]}],
    }))
    check = subprocess.run([promtool(), "check", "config", str(config)], capture_output=True, text=True, timeout=60)
    assert check.returncode == 0, check.stdout + check.stderr
    unit = f"lanectl-test-prometheus-{uuid.uuid4().hex[:8]}.service"
    (tmp_path / "tsdb").mkdir()
    fleet.sb.exec(["systemd-run", "--unit", unit, "--property", "KillMode=mixed", binary,
                   f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                   f"--web.listen-address=127.0.0.1:{PROM_PORT}", "--log.level=warn"], check=True)
    try:
        yield lambda: fleet.sb.exec(["journalctl", "-u", unit, "--no-pager", "-n", "50"], check=False).stdout
    finally:
        fleet.sb.exec(["systemctl", "stop", unit], check=False)
        fleet.sb.exec(["systemctl", "reset-failed", unit], check=False)
        assert fleet.sb.exec(["systemctl", "is-active", unit], check=False).stdout.strip() != "active"


def query(fleet: Fleet, expr: str) -> dict[str, Any]:
    body = curl(fleet, f"http://127.0.0.1:{PROM_PORT}/api/v1/query", "-G", "--data-urlencode", f"query={expr}")
    return json.loads(body) if body else {}


def alerts(fleet: Fleet) -> list[dict[str, Any]]:
    body = curl(fleet, f"http://127.0.0.1:{PROM_PORT}/api/v1/alerts")
    return json.loads(body)["data"]["alerts"] if body else []


def firing(fleet: Fleet) -> set[tuple[str, str]]:
    return {(a["labels"]["alertname"], a["labels"].get("lane", "")) for a in alerts(fleet) if a["state"] == "firing"}


def test_prometheus_scrapes_the_supervisor_and_fires_lane_down_when_a_lane_stops(fleet: Fleet, prometheus) -> None:
    wait_for(lambda: query(fleet, 'up{job="lanectl"} == 1').get("data", {}).get("result"), 60, interval=0.5,
             what="Prometheus scraping the supervisor")
    # every rule loaded, none broken
    rules = json.loads(curl(fleet, f"http://127.0.0.1:{PROM_PORT}/api/v1/rules"))["data"]["groups"][0]["rules"]
    assert {r["name"] for r in rules} == {name for name, _ in rule_exprs()}
    assert all(r["health"] == "ok" for r in wait_for(
        lambda: (lambda rs: rs if all(r.get("lastEvaluation", "").startswith("20") for r in rs) else None)(
            json.loads(curl(fleet, f"http://127.0.0.1:{PROM_PORT}/api/v1/rules"))["data"]["groups"][0]["rules"]),
        30, interval=0.5, what="every rule evaluated")), rules

    # every dashboard query runs, and each has data (increase() needs two scrapes: waited for)
    curl(fleet, "http://127.0.0.1:8700/callbacks", "-X", "POST", "-d", "{}")
    for title, expr in dashboard_exprs():
        wait_for(lambda: query(fleet, expr).get("data", {}).get("result"), 30, interval=0.5,
                 what=f"data for the dashboard panel {title!r}: {expr}")
    assert query(fleet, "sum(lanectl_lane_healthy)")["data"]["result"][0]["value"][1] == "3"

    # nothing fires while every lane runs
    assert firing(fleet) == set(), alerts(fleet)

    # a lane stopped behind lanectl's back: LanectlLaneDown for it, and nothing else
    fleet.sb.exec(["systemctl", "stop", "lanectl-lane@beta.service"], check=True)
    try:
        wait_for(lambda: ("LanectlLaneDown", "beta") in firing(fleet), 90, interval=0.5,
                 what=f"LanectlLaneDown firing for beta (Prometheus log: {prometheus()})")
        assert firing(fleet) == {("LanectlLaneDown", "beta")}, alerts(fleet)
        down = [a for a in alerts(fleet) if a["labels"]["alertname"] == "LanectlLaneDown"][0]
        assert down["labels"]["severity"] == "critical"
        assert down["annotations"]["summary"] == "lanectl lane beta is down"
    finally:
        fleet.sb.exec(["systemctl", "start", "lanectl-lane@beta.service"], check=True)
    wait_for(lambda: not firing(fleet), 90, interval=0.5, what="the alert resolved once beta runs again")

    # the supervisor itself gone: LanectlSupervisorDown
    fleet.sb.exec(["systemctl", "stop", "lanectl-supervisor.service"], check=True)
    try:
        wait_for(lambda: ("LanectlSupervisorDown", "") in firing(fleet), 60, interval=0.5,
                 what="LanectlSupervisorDown firing")
    finally:
        fleet.sb.exec(["systemctl", "start", "lanectl-supervisor.service"], check=True)
    wait_for(lambda: all_healthy(fleet), 60, interval=0.5, what="the supervisor back")


# ------------------------------------------------------------------------------------------------ textfile


def test_textfile_timer_writes_metrics_node_exporter_can_read(fleet: Fleet) -> None:
    """contrib's textfile service, as shipped but for the paths of this checkout, run by the sandbox's systemd:
    PrivateTmp hides the test's config dir, so the config is copied into the sandbox's /etc."""
    conf = "/etc/lanectl-textfile-test"
    for src in [fleet.config_dir / "lanectl.toml", *sorted((fleet.config_dir / "lanes.d").glob("*.toml"))]:
        fleet.write_file(f"{conf}/{src.relative_to(fleet.config_dir)}", src.read_text())
    fleet.sb.exec(["mkdir", "-p", "/var/lib/prometheus/node-exporter"], check=True)
    out = "/var/lib/prometheus/node-exporter/lanectl.prom"
    fleet.sb.exec(["rm", "-f", out], check=True)
    for name in ("lanectl-metrics-textfile.service", "lanectl-metrics-textfile.timer"):
        text = (CONTRIB / "node_exporter" / name).read_text()
        text = text.replace("/opt/lanectl/venv/bin/lanectl", LANECTL).replace("=/etc/lanectl\n", f"={conf}\n")
        fleet.sb.write_unit(name, text)
    fleet.sb.daemon_reload()
    try:
        fleet.sb.exec(["systemctl", "start", "lanectl-metrics-textfile.timer"], check=True)
        # the timer's first run is 30 s after boot; start the service now rather than wait for it
        fleet.sb.exec(["systemctl", "start", "lanectl-metrics-textfile.service"], check=True, timeout=120)
        result = fleet.show("lanectl-metrics-textfile.service", "Result", "ExecMainStatus")
        assert result == {"Result": "success", "ExecMainStatus": "0"}, fleet.sb.exec(
            ["journalctl", "-u", "lanectl-metrics-textfile.service", "--no-pager"], check=False).stdout
        text = fleet.read_file(out)
        assert fleet.sb.exec(["stat", "-c", "%a", out], check=True).stdout.strip() == "644"
        proc = subprocess.run([promtool(), "check", "metrics"], input=text, capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0 and not (proc.stdout + proc.stderr).strip(), proc.stdout + proc.stderr
        for lane in LANES:
            assert re.search(rf'^lanectl_lane_healthy\{{lane="{lane}",host="[^"]+"\}} 1$', text, re.M), text
        assert "lanectl_metrics_generated_timestamp_seconds " in text
        assert fleet.show("lanectl-metrics-textfile.timer", "ActiveState")["ActiveState"] == "active"
    finally:
        fleet.sb.exec(["systemctl", "stop", "lanectl-metrics-textfile.timer"], check=False)
        fleet.sb.exec(["rm", "-rf", conf, out], check=False)

"""What runs: systemd's view of every lane, its processes (psutil), its port and its health endpoint."""
from __future__ import annotations

import http.client
import json
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from lanectl import systemd
from lanectl.errors import NotFound

HEALTH_TIMEOUT_S = 1.0


@dataclass
class Health:
    ok: bool = False
    listening: bool = False
    http_status: int | None = None
    latency_ms: float | None = None
    body: dict[str, Any] | None = None
    error: str | None = None


@dataclass
class LaneStatus:
    name: str
    unit: str
    enabled: bool
    port: int
    load_state: str = "unknown"
    active_state: str = "unknown"
    sub_state: str = "unknown"
    result: str = ""
    main_pid: int | None = None
    invocation_id: str = ""
    uptime_s: float | None = None
    restarts: int = 0
    status_text: str = ""
    watchdog_sec: float | None = None
    watchdog_ping_age_s: float | None = None
    memory_bytes: int | None = None
    cpu_seconds: float | None = None
    cpu_percent_avg: float | None = None
    processes: int = 0
    health: Health = field(default_factory=Health)

    @property
    def running(self) -> bool:
        return self.active_state == "active" and self.sub_state == "running"

    @property
    def ok(self) -> bool:
        if not self.enabled:
            return True
        return self.running and self.health.ok

    @property
    def state(self) -> str:
        """One word for people: up, degraded (running but unhealthy), down, failed, starting, disabled."""
        if self.running:
            return "up" if self.health.ok else "degraded"
        if self.active_state in ("activating", "reloading"):
            return "starting"
        if self.active_state == "failed":
            return "failed"
        return "down" if self.enabled else "disabled"

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["ok"] = self.ok
        d["state"] = self.state
        return d


def check_health(port: int, path: str, timeout: float = HEALTH_TIMEOUT_S) -> Health:
    t0 = time.monotonic()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path, headers={"Connection": "close"})
        resp = conn.getresponse()
        raw = resp.read(65536)
    except ConnectionRefusedError:
        return Health(error="connection refused")
    except (OSError, http.client.HTTPException) as exc:
        return Health(listening=True, error=f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__)
    finally:
        conn.close()
    h = Health(listening=True, http_status=resp.status, latency_ms=round((time.monotonic() - t0) * 1000, 2))
    try:
        body = json.loads(raw or b"null")
        h.body = body if isinstance(body, dict) else None
    except ValueError:
        h.error = "health answer is not JSON"
    h.ok = resp.status == 200 and h.error is None
    if resp.status != 200:
        h.error = f"HTTP {resp.status}"
    return h


def _processes(pid: int | None) -> tuple[int | None, float | None, float | None, int]:
    if not pid:
        return None, None, None, 0
    import psutil  # imported here: only status needs it, and it costs start-up time

    try:
        main = psutil.Process(pid)
        procs = [main, *main.children(recursive=True)]
        mem = 0
        cpu = 0.0
        for p in procs:
            try:
                mem += p.memory_info().rss
                t = p.cpu_times()
                cpu += t.user + t.system
            except psutil.Error:
                continue
        age = max(time.time() - main.create_time(), 1e-3)
        return mem, round(cpu, 3), round(100.0 * cpu / age, 2), len(procs)
    except psutil.Error:
        return None, None, None, 0


def _num(value: str | None) -> int:
    try:
        return int(value or 0)
    except ValueError:
        return 0


def collect(lanes: dict[str, dict[str, Any]], names: list[str] | None = None) -> list[LaneStatus]:
    """Status of the named lanes (default: all), from one systemctl call and parallel health checks."""
    wanted = names or sorted(lanes)
    for n in wanted:
        if n not in lanes:
            raise NotFound(f"no lane named {n!r} is installed", f"known lanes: {', '.join(sorted(lanes)) or 'none'}",
                           "lane_not_found")
    out = [LaneStatus(n, lanes[n]["unit"], bool(lanes[n].get("enabled", True)), int(lanes[n]["port"]))
           for n in wanted]
    shown = systemd.show([s.unit for s in out])
    now_us = systemd.monotonic_now_us()
    for s in out:
        props = shown.get(s.unit, {})
        s.load_state = props.get("LoadState", "unknown")
        s.active_state = props.get("ActiveState", "unknown")
        s.sub_state = props.get("SubState", "unknown")
        s.result = props.get("Result", "")
        s.main_pid = _num(props.get("MainPID")) or None
        s.invocation_id = props.get("InvocationID", "")
        s.restarts = _num(props.get("NRestarts"))
        s.status_text = props.get("StatusText", "")
        since = _num(props.get("ExecMainStartTimestampMonotonic"))
        if s.running and since:
            s.uptime_s = round((now_us - since) / 1e6, 3)
        wd = systemd.parse_timespan_us(props.get("WatchdogUSec", "")) or 0
        s.watchdog_sec = wd / 1e6 if wd else None
        ping = _num(props.get("WatchdogTimestampMonotonic"))
        if s.running and ping:
            s.watchdog_ping_age_s = round((now_us - ping) / 1e6, 3)
        s.memory_bytes, s.cpu_seconds, s.cpu_percent_avg, s.processes = _processes(s.main_pid)
    with ThreadPoolExecutor(max_workers=max(1, min(16, len(out)))) as pool:
        healths = pool.map(lambda s: check_health(s.port, lanes[s.name].get("health_path", "/healthz")), out)
        for s, h in zip(out, healths):
            s.health = h
    return out


def installed_lanes(unit_dir: Path, config_path: str | None = None) -> dict[str, dict[str, Any]]:
    """The installed fleet (manifest beside the units); falls back to the lane files when nothing is installed."""
    from lanectl import manifest as installed

    data = installed.read(unit_dir)
    if data is not None:
        return data["lanes"]
    from lanectl import config
    from lanectl.install import manifest

    return manifest(config.load(config_path))["lanes"]

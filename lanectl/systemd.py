"""systemctl wrapper: the few calls lanectl needs, with errors that say what to do.

The CLI forks ``systemctl`` (one ``show`` call covers every lane). The supervisor, which polls every tick, keeps
its own connection instead.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

from lanectl.errors import LanectlError, Unavailable

SHOW_PROPS = (
    "Id", "LoadState", "ActiveState", "SubState", "Result", "MainPID", "NRestarts", "StatusText",
    "InvocationID", "ActiveEnterTimestampMonotonic", "ExecMainStartTimestampMonotonic", "WatchdogUSec",
    "WatchdogTimestampMonotonic", "ExecMainCode", "ExecMainStatus", "ControlGroup", "UnitFileState",
    "MemoryCurrent", "CPUUsageNSec", "TasksCurrent",
)
UNSET = 2**64 - 1  # what systemd prints for a counter it does not have (accounting off)


def available() -> bool:
    """True when a systemd is running that systemctl can talk to."""
    return Path("/run/systemd/system").is_dir() and shutil.which("systemctl") is not None


def run(*args: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    run_check()
    proc = subprocess.run(["systemctl", *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "SYSTEMD_COLORS": "0", "SYSTEMD_PAGER": ""})
    if proc.returncode != 0:
        refuse_denied(args, proc.stderr or proc.stdout)
    if check and proc.returncode != 0:
        msg = (proc.stderr or proc.stdout).strip().splitlines()
        raise LanectlError(
            f"systemctl {' '.join(args)} failed: {msg[-1] if msg else f'exit {proc.returncode}'}",
            "see 'journalctl -u UNIT' and 'lanectl status'",
            "systemctl_failed",
        )
    return proc


_DENIED = ("Access denied", "Interactive authentication required", "Permission denied", "not privileged")


def refuse_denied(args: tuple[str, ...], text: str) -> None:
    """systemd refused this user (polkit, D-Bus): never a lane's failure, so exit 6 naming the access needed."""
    if any(d in text for d in _DENIED):
        verb = args[0] if args else "manage"
        raise Unavailable(
            f"this user ({_user()}) may not {verb} systemd units: 'systemctl {' '.join(args)}' was refused "
            f"({text.strip().splitlines()[-1] if text.strip() else 'access denied'})",
            "starting, stopping and installing lanes needs root: run it with sudo (read-only commands such as "
            "'lanectl status' and 'lanectl probe' need no root)",
            "permission_denied",
        )


def _user() -> str:
    import pwd

    try:
        return pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:
        return f"uid {os.geteuid()}"


def parse_show(text: str) -> list[dict[str, str]]:
    """Blocks of KEY=VALUE lines separated by blank lines, one per unit, in the order asked."""
    out: list[dict[str, str]] = []
    cur: dict[str, str] = {}
    for line in text.split("\n"):
        if not line:
            if cur:
                out.append(cur)
                cur = {}
            continue
        key, _, value = line.partition("=")
        cur[key] = value
    if cur:
        out.append(cur)
    return out


def show(units: list[str], props: tuple[str, ...] = SHOW_PROPS) -> dict[str, dict[str, str]]:
    return show_finish(show_start(units, props), units)


def show_start(units: list[str], props: tuple[str, ...] = SHOW_PROPS) -> subprocess.Popen[str] | None:
    """Start one `systemctl show` for all units; the caller may do other work before show_finish()."""
    if not units:
        return None
    run_check()
    return subprocess.Popen(["systemctl", "show", "-p", ",".join(props), "--", *units], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "SYSTEMD_COLORS": "0"})


def show_finish(proc: subprocess.Popen[str] | None, units: list[str]) -> dict[str, dict[str, str]]:
    if proc is None:
        return {}
    out, err = proc.communicate(timeout=60)
    if proc.returncode != 0:
        raise LanectlError(f"systemctl show failed: {err.strip() or proc.returncode}",
                           "see 'systemctl status'", "systemctl_failed")
    return {b.get("Id", u): b for u, b in zip(units, parse_show(out))}


def run_check() -> None:
    if not available():
        raise Unavailable(
            "systemd is not running here (no /run/systemd/system)",
            "run lanectl on a host booted with systemd, or inside the private systemd that scripts/demo boots "
            "(scripts/sdbox exec lanectl ...)",
            "systemd_unavailable",
        )


_SPAN_UNITS = {"us": 1, "ms": 1_000, "s": 1_000_000, "min": 60_000_000, "h": 3_600_000_000,
               "d": 86_400_000_000, "w": 604_800_000_000}


def parse_timespan_us(text: str) -> int | None:
    """'1min 30s', '500ms', '5s' or a plain number of microseconds -> microseconds; None for infinity/empty."""
    text = text.strip()
    if not text or text == "infinity":
        return None
    if text.isdigit():
        return int(text)
    total = 0.0
    for num, unit in re.findall(r"([0-9.]+)\s*([a-z]+)", text):
        if unit not in _SPAN_UNITS:
            return None
        total += float(num) * _SPAN_UNITS[unit]
    return int(total) or None


def daemon_reload() -> None:
    run("daemon-reload")


def monotonic_now_us() -> int:
    return int(float(Path("/proc/uptime").read_text().split()[0]) * 1e6)

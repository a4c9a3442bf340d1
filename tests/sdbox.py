"""Test-side handle on a private systemd booted by scripts/sdbox (see docs/harness.md).

    sb = Sandbox("/tmp/sdbox/mytest")
    sb.up()
    try:
        sb.write_unit("hello.service", "[Service]\\nExecStart=/bin/sleep infinity\\n")
        sb.daemon_reload()
        sb.systemctl("start", "hello.service")
        sb.wait_for(lambda: sb.show("hello.service", "ActiveState")["ActiveState"] == "active")
    finally:
        sb.down()

Every command goes through scripts/sdbox, which checks the sandbox's PID 1 by PID and start
time before it enters its namespaces. PIDs that systemd reports (MainPID=) are PIDs in the
sandbox's pid namespace: use them with `sb.exec(["kill", ...])`, not with os.kill().
"""
from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

SDBOX = Path(__file__).resolve().parent.parent / "scripts" / "sdbox"
T = TypeVar("T")


class SandboxError(subprocess.CalledProcessError):
    """A command in (or about) the sandbox failed; str() includes its stderr."""

    def __str__(self) -> str:
        out = (self.stderr or "").strip() or (self.stdout or "").strip()
        return f"{super().__str__()}\n{out}" if out else super().__str__()


class Sandbox:
    """One private systemd, identified by its state dir (created by scripts/sdbox)."""

    def __init__(self, state_dir: str | Path, *, env: dict[str, str] | None = None):
        self.state_dir = Path(state_dir)
        self.env = env  # extra environment for scripts/sdbox (e.g. SDBOX_STOP_TIMEOUT)
        self._pid: int | None = None

    def __repr__(self) -> str:
        return f"Sandbox({str(self.state_dir)!r}, pid={self._pid})"

    # ---------------------------------------------------------------- lifecycle
    def _sdbox(self, *args: str, timeout: float = 120, input: str | None = None,
               check: bool = True) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, **self.env} if self.env else None
        argv = [str(SDBOX), "-d", str(self.state_dir), *args]
        p = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, input=input, env=env)
        if check and p.returncode != 0:
            raise SandboxError(p.returncode, argv, p.stdout, p.stderr)
        return p

    def up(self, timeout: float = 120) -> int:
        """Boot (or find running) and return the host PID of the sandbox's systemd."""
        p = self._sdbox("up", timeout=timeout)
        self._pid = int(p.stdout.split()[-1])
        return self._pid

    def down(self, timeout: float = 180) -> subprocess.CompletedProcess[str]:
        """Stop the sandbox (no-op if stopped); raises SandboxError if anything of it is left behind."""
        p = self._sdbox("down", timeout=timeout)
        self._pid = None
        return p

    @property
    def pid(self) -> int:
        """Host PID of the sandbox's systemd (PID 1 inside)."""
        if self._pid is None:
            p = self._sdbox("pid", check=False)
            if p.returncode != 0:
                raise RuntimeError(f"sandbox {self.state_dir} is not running: {p.stderr.strip()}")
            self._pid = int(p.stdout)
        return self._pid

    def running(self) -> bool:
        return self._sdbox("status", check=False).returncode == 0

    def state(self) -> dict[str, Any]:
        """What `up` recorded: id, boot_id, pid1, pidns, cgroups, ... (empty after `down`)."""
        try:
            return json.loads((self.state_dir / "state.json").read_text())
        except FileNotFoundError:
            return {}

    # ---------------------------------------------------------------- commands
    def exec(self, argv: Sequence[str], check: bool = True, timeout: float = 60,
             input: str | None = None) -> subprocess.CompletedProcess[str]:
        """Run argv inside all of the sandbox's namespaces (text mode, output captured)."""
        p = self._sdbox("exec", *argv, timeout=timeout, input=input, check=False)
        p.args = list(argv)
        if check and p.returncode != 0:
            raise SandboxError(p.returncode, list(argv), p.stdout, p.stderr)
        return p

    def systemctl(self, *args: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """`systemctl ARGS` inside; pass check=False for queries whose exit code is the answer
        (is-active, is-system-running, ...)."""
        return self.exec(["systemctl", *args], check=check, timeout=timeout)

    def show(self, unit: str, *props: str) -> dict[str, str]:
        """`systemctl show -p PROPS UNIT` as a dict."""
        out = self.systemctl("show", "-p", ",".join(props), "--", unit).stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def daemon_reload(self) -> None:
        self.systemctl("daemon-reload")

    # ---------------------------------------------------------------- files
    @property
    def units_dir(self) -> Path:
        """STATE/units on the host: /etc/systemd/system inside (emptied by `up`)."""
        return self.state_dir / "units"

    def write_unit(self, name: str, text: str) -> Path:
        """Write a unit (or drop-in, e.g. "foo.service.d/x.conf") into units_dir; then daemon_reload()."""
        path = self.units_dir / name
        if self.units_dir.resolve() not in path.resolve().parents:
            raise ValueError(f"unit name {name!r} leaves the unit directory")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        return path

    def root_path(self, path: str | Path) -> Path:
        """`path` as the sandbox sees it, through /proc/PID/root (valid while it runs).

        Note that absolute symlinks inside are resolved against the host's root."""
        rel = str(path).lstrip("/")
        return Path(f"/proc/{self.pid}/root") / rel

    def console(self) -> str:
        """PID 1's console log (all of it, boot and shutdown messages included)."""
        return self._sdbox("console", check=False).stdout

    # ---------------------------------------------------------------- waiting
    @staticmethod
    def wait_for(predicate: Callable[[], T], timeout: float = 10, interval: float = 0.05,
                 message: str | Callable[[], str] | None = None) -> T:
        """Poll predicate() until it returns something truthy, and return that; raise TimeoutError
        after `timeout` seconds (monotonic deadline). The predicate is always tried once more at
        the deadline, so a slow poll cannot cause a spurious timeout."""
        deadline = time.monotonic() + timeout
        last: T | None = None
        while True:
            last = predicate()
            if last:
                return last
            now = time.monotonic()
            if now >= deadline:
                break
            time.sleep(min(interval, deadline - now))
        detail = message() if callable(message) else message
        raise TimeoutError(f"not true after {timeout}s: {detail or getattr(predicate, '__name__', predicate)}"
                           f" (last value {last!r})")

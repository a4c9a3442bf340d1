"""Helpers for the real-systemd tests: run lanectl inside the sandbox and wait on real unit state."""
from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from lanectl.poll import until
from lanectl.states import FINISHED
from tests.conftest import LANECTL_BIN as LANECTL
from tests.conftest import RUNTIME_PY as PYTHON

ROOT = Path(__file__).resolve().parents[2]
T = TypeVar("T")


def wait_for(pred: Callable[[], T], timeout: float, interval: float = 0.05, what: str = "condition") -> T:
    """Poll until pred() is truthy (returns it); fail with `what` after `timeout` seconds (monotonic). The loop is
    the library's own (lanectl.poll.until): one poll-until-true helper for lanectl and its tests."""
    value = until(pred, timeout, interval=interval)
    if not value:
        raise AssertionError(f"timed out after {timeout}s waiting for {what}")
    return value


class Fleet:
    """lanectl driven inside one sandbox, against one config dir."""

    def __init__(self, sandbox: Any, config_dir: Path) -> None:
        import tomllib

        self.sb = sandbox
        self.config_dir = config_dir
        settings = tomllib.loads((config_dir / "lanectl.toml").read_text()) if (config_dir / "lanectl.toml").exists() else {}
        self.ledger = settings.get("ledger", "/var/lib/lanectl/ledger.db")

    def lanectl(self, *args: str, check: bool = False) -> Any:
        return self.sb.exec([LANECTL, *args, "-c", str(self.config_dir)], check=check)

    def json(self, *args: str) -> tuple[int, dict[str, Any]]:
        proc = self.lanectl(*args, "--json")
        return proc.returncode, json.loads(proc.stdout)

    def status(self, *lanes: str) -> dict[str, dict[str, Any]]:
        proc = self.sb.exec([LANECTL, "status", *lanes, "--json"], check=False)
        return {l["name"]: l for l in json.loads(proc.stdout)["data"]["lanes"]}

    def show(self, unit: str, *props: str) -> dict[str, str]:
        out = self.sb.exec(["systemctl", "show", "-p", ",".join(props), unit], check=True).stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def main_pid(self, lane: str) -> int:
        return int(self.show(f"lanectl-lane@{lane}.service", "MainPID")["MainPID"])

    def write_file(self, path: str, text: str, mode: str = "0644") -> None:
        """Write a file inside the sandbox (its /var and /etc are private overlays)."""
        self.sb.exec(["install", "-D", "-m", mode, "/dev/stdin", path], input=text, check=True)

    def read_file(self, path: str) -> str:
        return self.sb.exec(["cat", path], check=True).stdout


def copy_example(dest: Path, ledger: str | None = None) -> Path:
    """The example fleet, with a ledger of its own: the tests of one sandbox session must not see each other's
    evidence (rollback triggers read the last minutes of events). ``ledger``: another one (a ``postgresql://``
    URL of a database of the test's own server, tests/pgserver.py)."""
    dest.mkdir(parents=True, exist_ok=True)
    name = "".join(c if c.isalnum() else "-" for c in dest.name)
    text = (ROOT / "lanectl.toml").read_text()
    (dest / "lanectl.toml").write_text(f'ledger = "{ledger or f"/var/lib/lanectl/test-{name}.db"}"\n' + text)
    shutil.copytree(ROOT / "lanes.d", dest / "lanes.d", dirs_exist_ok=True)
    return dest


def up_example(sandbox: Any, dest: Path, extra_toml: str = "", ledger: str | None = None) -> Fleet:
    """The example fleet (``copy_example``, ``ledger``) with ``extra_toml`` appended to its lanectl.toml, installed
    and up, its supervisor active: what most module fixtures start from (they ``lanectl down`` it at the end)."""
    cfg = copy_example(dest, ledger)
    with open(cfg / "lanectl.toml", "a") as fh:
        fh.write(extra_toml)
    f = Fleet(sandbox, cfg)
    code, doc = f.json("install")
    assert code == 0, doc
    code, doc = f.json("up")
    assert code == 0, doc
    wait_for(lambda: sandbox.exec(["systemctl", "is-active", "lanectl-supervisor.service"], check=False).stdout.strip()
             == "active", 20, what="the supervisor")
    return f


SUBMIT = r'''
import json, sys, time
from lanectl.client import Client
spec = json.load(sys.stdin)
ids = []
with Client(config_dir=spec["config"]) as c:
    for m in spec["missions"]:
        deadline = time.time() + m.get("deadline_in", 600) if m["cls"] == "deadline" else None
        ids.append(c.submit(m["cls"], {"argv": m["argv"]}, lane=m.get("lane"), session=m.get("session"),
                            deadline=deadline).id)
print(json.dumps(ids))
'''

LEDGER_QUERY = r'''
import json, sqlite3, sys
q = json.load(sys.stdin)
if q["ledger"].startswith("postgresql://"):  # the ledger's own read-only handle speaks the same SQL there
    from lanectl.ledger import Ledger
    c = Ledger.open_readonly(q["ledger"]).conn
else:
    c = sqlite3.connect("file:" + q["ledger"] + "?mode=ro", uri=True, timeout=10)
print(json.dumps([list(r) for r in c.execute(q["sql"], q.get("args", []))]))
'''


def submit_many(fleet: Fleet, missions: list[dict[str, Any]]) -> list[int]:
    """Submit through the Python client inside the sandbox (one process for all of them)."""
    proc = fleet.sb.exec([PYTHON, "-c", SUBMIT], input=json.dumps({"config": str(fleet.config_dir),
                                                                  "missions": missions}), check=True)
    return json.loads(proc.stdout)


def sql(fleet: Fleet, query: str, *args: Any) -> list[list[Any]]:
    proc = fleet.sb.exec([PYTHON, "-c", LEDGER_QUERY], input=json.dumps({"sql": query, "args": list(args),
                                                                          "ledger": fleet.ledger}),
                         check=True)
    return json.loads(proc.stdout)


def states(fleet: Fleet, ids: list[int]) -> dict[int, str]:
    rows = sql(fleet, f"SELECT id, state FROM missions WHERE id BETWEEN ? AND ?", min(ids), max(ids))
    return {r[0]: r[1] for r in rows if r[0] in set(ids)}


TERMINAL = set(FINISHED)


def wait_terminal(fleet: Fleet, ids: list[int], timeout: float) -> dict[int, str]:
    def done():  # type: ignore[no-untyped-def]
        st = states(fleet, ids)
        return st if len(st) == len(ids) and all(v in TERMINAL for v in st.values()) else None

    return wait_for(done, timeout, interval=0.5, what=f"{len(ids)} missions to finish")


def executions(fleet: Fleet, lanes: list[str], root: str = "/var/lib/lanes") -> list[dict[str, Any]]:
    """Every execution the lanes logged in their workspaces (what actually ran)."""
    out = []
    for lane in lanes:
        proc = fleet.sb.exec(["cat", f"{root}/{lane}/.lanectl/executions.log"], check=False)
        out += [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]
    return out


def history(fleet: Fleet, ids: list[int], unless: str = "succeeded") -> str:
    """The event log of every mission among ``ids`` whose state is not ``unless``: for assertion messages."""
    bad = [m for m, s in states(fleet, ids).items() if s != unless]
    if not bad:
        return ""
    rows = sql(fleet, f"SELECT mission, at, kind, lane, attempt, data FROM events WHERE mission IN "
                      f"({','.join('?' * len(bad))}) ORDER BY id", *bad)
    return "\n" + "\n".join(f"  mission {m} {at:.3f} {kind} lane={lane} attempt={n} {data}"
                            for m, at, kind, lane, n, data in rows)


# ------------------------------------------------------------------------------------------ several hosts (issue 13)
def lane_toml(port: int, classes: list[str], capacity: int = 4, tags: list[str] | tuple[str, ...] = ()) -> str:
    """A small lane definition (the lane's name is its file's name)."""
    return (f'description = "multi-host test lane"\nport = {port}\nclasses = {json.dumps(classes)}\n'
            f"capacity = {capacity}\ntags = {json.dumps(list(tags))}\nwatchdog_sec = 5\n[restart]\nrestart_sec = 0.5\n")


def host_config(dest: Path, host: str, lanes: dict[str, str], ledger: str, extra_toml: str = "", *,
                watchdog_sec: float = 10) -> Path:
    """The configuration of one host of a fleet sharing ``ledger``: ``host = NAME``, its own ``lanes.d/`` (``lanes``:
    name -> lane_toml text; names unique across the hosts; each lane's workspace /var/lib/lanes/NAME, private to
    the sandbox), the example's classes, the supervisor's
    ``watchdog_sec``, ``extra_toml`` appended."""
    dest.mkdir(parents=True, exist_ok=True)
    text = (f'host = "{host}"\nledger = "{ledger}"\nworkspace_root = "/var/lib/lanes"\n'
            '[supervisor]\nhost = "127.0.0.1"\nport = 8700\ntick_sec = 1.0\n'
            f"watchdog_sec = {watchdog_sec:g}\n[classes.interactive]\nmax_wait_sec = 30\n[classes.deadline]\nmax_wait_sec = 120\n"
            "[classes.background]\nmax_wait_sec = 600\n" + extra_toml)
    (dest / "lanectl.toml").write_text(text)
    (dest / "lanes.d").mkdir(exist_ok=True)
    for name, body in lanes.items():
        (dest / "lanes.d" / f"{name}.toml").write_text(f'workspace = "/var/lib/lanes/{name}"\n' + body)
    return dest


def up_fleet(sandbox: Any, cfg: Path) -> Fleet:
    """``lanectl install`` and ``up`` of the configuration ``cfg`` in ``sandbox``, its supervisor active."""
    f = Fleet(sandbox, cfg)
    code, doc = f.json("install")
    assert code == 0, doc
    code, doc = f.json("up")
    assert code == 0, doc
    wait_for(lambda: sandbox.exec(["systemctl", "is-active", "lanectl-supervisor.service"], check=False).stdout.strip()
             == "active", 30, what="the supervisor")
    return f


def kill_sandbox(sandbox: Any) -> None:
    """The whole host dies at once: SIGKILL to the sandbox's PID 1 (through a pidfd, after its start time was checked
    against what ``up`` recorded), which ends its pid namespace, every process in it. ``down`` cleans up after."""
    import os
    import signal

    st = sandbox.state()
    pid = st["pid1"]
    fd = os.pidfd_open(pid)  # pinned: the check below and the signal are about the same process
    try:
        with open(f"/proc/{pid}/stat") as fh:
            assert int(fh.read().rsplit(")", 1)[1].split()[19]) == st["pid1_start"], "not the sandbox's PID 1"
        signal.pidfd_send_signal(fd, signal.SIGKILL)
    finally:
        os.close(fd)
    wait_for(lambda: not sandbox.running(), 30, interval=0.05, what="the sandbox to be gone")
    # the kernel kills the rest of the pid namespace with its init, in its own time: until the last of them is
    # gone, ``down`` would find them there and fail
    wait_for(lambda: not pidns_members(st["pidns"]), 60, interval=0.05, what="every process of the sandbox gone")


def pidns_members(ns: str) -> list[int]:
    """The processes (host pids) in the pid namespace ``ns`` (``pid:[...]`` as ``/proc/PID/ns/pid`` names it)."""
    import os

    out = []
    for n in os.listdir("/proc"):
        if n.isdigit():
            try:
                if os.readlink(f"/proc/{n}/ns/pid") == ns:
                    out.append(int(n))
            except OSError:
                pass
    return out

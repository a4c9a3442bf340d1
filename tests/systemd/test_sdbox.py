"""The harness itself, for real: scripts/sdbox boots a private systemd, units run and restart in
it, sandboxes stay apart, and `down` leaves nothing behind on the host."""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import tempfile
import textwrap
import threading
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.sdbox import SDBOX, Sandbox, SandboxError

pytestmark = pytest.mark.systemd

# A Type=notify service by hand: the sd_notify protocol is one datagram per message to the
# AF_UNIX socket in $NOTIFY_SOCKET ('@' = abstract namespace). Pings at half of WatchdogSec.
NOTIFY_PROGRAM = textwrap.dedent("""\
    import os, socket, time

    def notify(msg):
        addr = os.environ["NOTIFY_SOCKET"]
        if addr.startswith("@"):
            addr = "\\0" + addr[1:]
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.connect(addr)
            s.sendall(msg.encode())

    usec = int(os.environ.get("WATCHDOG_USEC", "0"))
    if os.environ.get("WATCHDOG_PID", str(os.getpid())) != str(os.getpid()):
        usec = 0
    interval = usec / 2e6 if usec else 1.0
    notify("READY=1\\nSTATUS=serving as pid %d" % os.getpid())
    print("ready, watchdog interval %.3fs" % interval, flush=True)
    while True:
        time.sleep(interval)
        notify("WATCHDOG=1")
""")


def notify_unit(program: Path, watchdog_sec: str) -> str:
    return textwrap.dedent(f"""\
        [Unit]
        Description=sdbox harness test: Type=notify with a watchdog

        [Service]
        Type=notify
        ExecStart=/usr/bin/python3 -u {program}
        WatchdogSec={watchdog_sec}
        Restart=on-failure
        RestartSec=100ms
        TimeoutStartSec=20
        """)


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def install_notify_unit(sb: Sandbox, tmp_path: Path, watchdog_sec: str) -> str:
    program = tmp_path / "notify_lane.py"  # /tmp is shared with the sandbox
    program.write_text(NOTIFY_PROGRAM)
    unit = unique("sdbox-notify") + ".service"
    sb.write_unit(unit, notify_unit(program, watchdog_sec))
    sb.daemon_reload()
    sb.systemctl("start", unit)  # Type=notify: returns once READY=1 arrived
    return unit


def remove_unit(sb: Sandbox, unit: str) -> None:
    sb.systemctl("stop", unit, check=False)
    (sb.units_dir / unit).unlink(missing_ok=True)
    sb.daemon_reload()


def main_state(sb: Sandbox, unit: str) -> dict[str, str]:
    return sb.show(unit, "ActiveState", "SubState", "MainPID", "NRestarts", "StatusText", "Result")


def running_again(sb: Sandbox, unit: str, old_pid: str, restarts: int) -> Callable[[], dict | None]:
    def check() -> dict | None:
        st = main_state(sb, unit)
        ok = (st["ActiveState"] == "active" and st["SubState"] == "running" and st["MainPID"] not in ("0", old_pid)
              and int(st["NRestarts"]) == restarts and st["StatusText"].startswith("serving as pid"))
        return st if ok else None
    check.__name__ = f"{unit} restarted {restarts}x with a new MainPID"
    return check


def host_pidns_members(ns: str) -> list[int]:
    out = []
    for n in os.listdir("/proc"):
        if n.isdigit():
            try:
                if os.readlink(f"/proc/{n}/ns/pid") == ns:
                    out.append(int(n))
            except OSError:
                pass
    return out


def sdbox_cli(*args: str, cwd: str | None = None, user: int | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(SDBOX), *args], capture_output=True, text=True, timeout=120, cwd=cwd, user=user)


# ------------------------------------------------------------------------------------ boot

def test_boot_reaches_running(sandbox: Sandbox) -> None:
    st = sandbox.systemctl("is-system-running", check=False).stdout.strip()
    assert st in ("running", "degraded"), sandbox.console()
    assert os.readlink(f"/proc/{sandbox.pid}/exe").endswith("/systemd")
    assert sandbox.exec(["cat", "/proc/1/comm"]).stdout.strip() == "systemd"
    # the curated unit set: no host boot services such as tmpfiles or sysctl
    units = sandbox.systemctl("list-unit-files", "--no-legend", "--plain").stdout
    assert "sdbox.target" in units
    assert "systemd-tmpfiles-setup.service" not in units and "systemd-sysctl.service" not in units
    assert "systemd-journald.service" in units and "dbus.socket" in units


def test_sandbox_sees_private_etc_run_and_shared_opt(sandbox: Sandbox) -> None:
    name = unique("sdbox-etc-probe")
    sandbox.exec(["sh", "-c", f"echo inside > /etc/{name}"])
    assert sandbox.root_path(f"/etc/{name}").read_text() == "inside\n"
    assert not Path(f"/etc/{name}").exists(), "a write to /etc in the sandbox reached the host"
    assert sandbox.exec(["cat", "/proc/sys/kernel/random/boot_id"]).stdout.strip() == sandbox.state()["boot_id"]
    assert sandbox.exec(["hostname"]).stdout.strip().startswith("sdbox-")
    r = sandbox.exec(["sh", "-c", "echo 1 > /proc/sys/kernel/sysrq"], check=False)
    assert r.returncode != 0, "/proc/sys must be read-only inside"
    if Path("/opt/lanectl").is_dir():
        sandbox.exec(["test", "-d", "/opt/lanectl"])


def test_exec_keeps_exit_code_and_visible_cwd(sandbox: Sandbox, tmp_path: Path) -> None:
    assert sandbox.exec(["sh", "-c", "exit 42"], check=False).returncode == 42
    with pytest.raises(SandboxError, match="exit status 3"):
        sandbox.exec(["sh", "-c", "echo oops >&2; exit 3"])
    assert sandbox.exec(["cat"], input="hello").stdout == "hello"
    d = sandbox.state_dir
    assert sdbox_cli("-d", str(d), "exec", "pwd", cwd=str(tmp_path)).stdout.strip() == str(tmp_path)
    # not visible inside (a host PID's /proc dir): falls back to /
    assert sdbox_cli("-d", str(d), "exec", "pwd", cwd=f"/proc/{os.getpid()}").stdout.strip() == "/"
    # a cwd under an overlaid directory is the sandbox's view of it: writes stay in the overlay
    name = unique("sdbox-cwd-probe")
    r = sdbox_cli("-d", str(d), "exec", "sh", "-c", f"pwd; echo x > {name}", cwd="/var/tmp")
    assert r.returncode == 0 and r.stdout.strip() == "/var/tmp", r.stderr
    assert sandbox.root_path(f"/var/tmp/{name}").exists()
    assert not Path(f"/var/tmp/{name}").exists(), "exec from /var/tmp wrote through to the host"


# ------------------------------------------------------------------------------------ units

def test_notify_unit_restarts_after_kill9(sandbox: Sandbox, tmp_path: Path) -> None:
    unit = install_notify_unit(sandbox, tmp_path, watchdog_sec="2")
    try:
        first = main_state(sandbox, unit)
        assert first["ActiveState"] == "active" and first["SubState"] == "running", first
        assert first["NRestarts"] == "0" and first["StatusText"].startswith("serving as pid"), first
        sandbox.exec(["kill", "-9", first["MainPID"]])  # MainPID is a PID in the sandbox's pid ns
        st = sandbox.wait_for(running_again(sandbox, unit, first["MainPID"], 1), timeout=15)
        assert st["StatusText"] == f"serving as pid {st['MainPID']}"
        journal = sandbox.wait_for(lambda: (out := sandbox.exec(["journalctl", "-u", unit, "--no-pager"]).stdout)
                                   and "restart counter is at 1" in out and out, timeout=10)
        assert "ready, watchdog interval 1.000s" in journal
    finally:
        remove_unit(sandbox, unit)


def test_watchdog_timeout_restarts_a_hung_unit(sandbox: Sandbox, tmp_path: Path) -> None:
    unit = install_notify_unit(sandbox, tmp_path, watchdog_sec="1")
    try:
        first = main_state(sandbox, unit)
        sandbox.exec(["kill", "-STOP", first["MainPID"]])  # hung: no more WATCHDOG=1
        sandbox.wait_for(running_again(sandbox, unit, first["MainPID"], 1), timeout=15)
        sandbox.wait_for(lambda: "Watchdog timeout" in sandbox.exec(["journalctl", "-u", unit, "--no-pager"]).stdout,
                         timeout=10)
    finally:
        remove_unit(sandbox, unit)


# ------------------------------------------------------------------------------------ isolation

def test_two_sandboxes_are_independent(sandbox: Sandbox, fresh_sandbox: Sandbox) -> None:
    a, b = sandbox, fresh_sandbox
    assert a.pid != b.pid
    assert os.readlink(f"/proc/{a.pid}/ns/pid") != os.readlink(f"/proc/{b.pid}/ns/pid")
    assert os.readlink(f"/proc/{a.pid}/ns/cgroup") != os.readlink(f"/proc/{b.pid}/ns/cgroup")
    assert a.state()["boot_id"] != b.state()["boot_id"]
    assert a.exec(["hostname"]).stdout != b.exec(["hostname"]).stdout
    assert set(a.state()["cgroups"]).isdisjoint(b.state()["cgroups"])

    unit = unique("sdbox-only-in-b") + ".service"
    b.write_unit(unit, "[Service]\nExecStart=/bin/sleep infinity\n")
    b.daemon_reload()
    b.systemctl("start", unit)
    assert b.systemctl("is-active", unit, check=False).stdout.strip() == "active"
    assert a.systemctl("is-active", unit, check=False).stdout.strip() == "inactive"
    assert a.systemctl("cat", unit, check=False).returncode != 0
    name = unique("sdbox-etc-b")
    b.exec(["touch", f"/etc/{name}"])
    assert a.exec(["test", "-e", f"/etc/{name}"], check=False).returncode == 1

    b.down()
    assert a.systemctl("is-system-running", check=False).stdout.strip() in ("running", "degraded")
    assert not b.running()


def test_parallel_boots() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root")
    boxes = [Sandbox(f"/tmp/sdbox/pytest-{os.getpid()}-par-{uuid.uuid4().hex[:6]}") for _ in range(2)]
    errors: list[BaseException] = []

    def boot(sb: Sandbox) -> None:
        try:
            sb.up()
        except BaseException as e:  # re-raised below, after all are down
            errors.append(e)

    try:
        threads = [threading.Thread(target=boot, args=(sb,)) for sb in boxes]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, errors
        assert len({sb.pid for sb in boxes}) == 2
        for sb in boxes:
            assert sb.systemctl("is-system-running", check=False).stdout.strip() in ("running", "degraded")
    finally:
        for sb in boxes:
            sb.down()
            subprocess.run(["rm", "-rf", "--one-file-system", str(sb.state_dir)], check=True)


# ------------------------------------------------------------------------------------ down

def test_down_leaves_nothing_and_host_tmp_survives(sandbox_factory: Callable[[], Sandbox]) -> None:
    marker = Path(f"/tmp/{unique('sdbox-host-marker')}")
    marker.write_text("the host's /tmp must survive a sandbox\n")
    try:
        sb = sandbox_factory()
        st = sb.state()
        # a unit with default dependencies (pulls in sysinit.target: on the host unit set that
        # would run systemd-tmpfiles-setup on the host) and a PrivateTmp= dir in the shared /tmp
        unit = unique("sdbox-ptmp") + ".service"
        sb.write_unit(unit, "[Service]\nExecStart=/bin/sleep infinity\nPrivateTmp=yes\n")
        sb.daemon_reload()
        sb.systemctl("start", unit)
        bid = st["boot_id"].replace("-", "")
        assert list(Path("/tmp").glob(f"systemd-private-{bid}-*")), "PrivateTmp= dir expected in /tmp"
        pidns = os.readlink(f"/proc/{sb.pid}/ns/pid")
        assert len(host_pidns_members(pidns)) >= 3  # systemd, journald, sleep at least

        sb.down()

        assert host_pidns_members(pidns) == []
        assert not any(Path(d).exists() for d in st["cgroups"])
        parents = {str(Path(d).parent) for d in st["cgroups"]}
        assert not [p for p in parents if list(Path(p).glob(f"sdbox-{st['id']}"))]
        assert not list(Path("/tmp").glob(f"systemd-private-{bid}-*"))
        assert not (sb.state_dir / "run").exists() and sb.state() == {}
        assert marker.read_text() == "the host's /tmp must survive a sandbox\n"
    finally:
        marker.unlink(missing_ok=True)


def test_up_and_down_are_idempotent(fresh_sandbox: Sandbox) -> None:
    pid = fresh_sandbox.pid
    assert fresh_sandbox.up() == pid
    fresh_sandbox.down()
    fresh_sandbox.down()
    r = sdbox_cli("-d", str(fresh_sandbox.state_dir), "status")
    assert r.returncode == 3 and "state: stopped" in r.stdout


def test_down_after_pid1_died_on_its_own(fresh_sandbox: Sandbox) -> None:
    st = fresh_sandbox.state()
    pid = st["pid1"]
    unit = unique("sdbox-ptmp") + ".service"
    fresh_sandbox.write_unit(unit, "[Service]\nExecStart=/bin/sleep infinity\nPrivateTmp=yes\n")
    fresh_sandbox.daemon_reload()
    fresh_sandbox.systemctl("start", unit)
    bid = st["boot_id"].replace("-", "")
    assert list(Path("/tmp").glob(f"systemd-private-{bid}-*"))
    fd = os.pidfd_open(pid)  # pin the process, then check it is still the one we booted
    try:
        with open(f"/proc/{pid}/stat") as f:
            assert int(f.read().rsplit(")", 1)[1].split()[19]) == st["pid1_start"]
        signal.pidfd_send_signal(fd, signal.SIGKILL)
    finally:
        os.close(fd)
    fresh_sandbox.wait_for(lambda: not fresh_sandbox.running(), timeout=10)
    r = sdbox_cli("-d", str(fresh_sandbox.state_dir), "status")
    assert r.returncode == 3 and r.stdout.startswith("state: dead"), r.stdout
    assert list(Path("/tmp").glob(f"systemd-private-{bid}-*")), "systemd had no chance to clean up"
    fresh_sandbox.down()
    assert host_pidns_members(st["pidns"]) == []
    assert not any(Path(d).exists() for d in st["cgroups"])
    assert not list(Path("/tmp").glob(f"systemd-private-{bid}-*"))


def test_down_forces_a_sandbox_that_will_not_stop(fresh_sandbox: Sandbox) -> None:
    sb, st = fresh_sandbox, fresh_sandbox.state()
    unit = unique("sdbox-stubborn") + ".service"
    sb.write_unit(unit, textwrap.dedent("""\
        [Service]
        ExecStart=/bin/sh -c 'trap "" TERM; while :; do sleep 1; done'
        KillMode=process
        TimeoutStopSec=infinity
        PrivateTmp=yes
        """))
    sb.daemon_reload()
    sb.systemctl("start", unit)
    bid = st["boot_id"].replace("-", "")
    assert list(Path("/tmp").glob(f"systemd-private-{bid}-*"))
    # a host process of ours moved into the sandbox's cgroup: down must kill it through the cgroup
    stray = subprocess.Popen(["sleep", "600"])
    try:
        unified = [d for d in st["cgroups"] if "/unified/" in d]
        Path(unified[0] if unified else st["cgroups"][0], "cgroup.procs").write_text(str(stray.pid))
        sb.env = {"SDBOX_STOP_TIMEOUT": "1"}
        assert "did not exit within 1s; SIGKILL" in sb.down().stderr
        assert stray.wait(timeout=10) == -signal.SIGKILL
    finally:
        if stray.poll() is None:
            stray.kill()
            stray.wait()
    assert host_pidns_members(st["pidns"]) == []
    assert not any(Path(d).exists() for d in st["cgroups"])
    assert not list(Path("/tmp").glob(f"systemd-private-{bid}-*"))


def test_interrupted_up_leaves_nothing() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root")
    sb = Sandbox(f"/tmp/sdbox/pytest-{os.getpid()}-int-{uuid.uuid4().hex[:6]}")
    up = subprocess.Popen([str(SDBOX), "-d", str(sb.state_dir), "up"], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
    try:
        # interrupt while it waits for the boot: its wrappers run, PID 1 may not be recorded yet
        st = sb.wait_for(lambda: (s := sb.state()).get("unshare_pid") and s, timeout=30, interval=0.001)
        up.send_signal(signal.SIGTERM)
        _out, err = up.communicate(timeout=15)  # well below SDBOX_STOP_TIMEOUT: no waiting for a
        # systemd that was never asked to exit
        if up.returncode == 0:  # the boot won the race; the invariant below must hold anyway
            sb.down()
        else:
            assert up.returncode == 130 and "boot interrupted" in err, err
        assert sb.state() == {}
        assert not any(Path(d).exists() for d in st["cgroups"])
        for key in ("script", "unshare", "pid1"):
            pid, start = st.get(f"{key}_pid" if key != "pid1" else "pid1"), st.get(f"{key}_start")
            if pid:
                sb.wait_for(lambda: not _alive(pid, start), timeout=10, message=f"{key} {pid} still runs")
    finally:
        if up.poll() is None:
            up.kill()
            up.wait()
        sb.down()
        subprocess.run(["rm", "-rf", "--one-file-system", str(sb.state_dir)], check=True)


def _alive(pid: int, start: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return False
    return int(fields[19]) == start and fields[0] not in "ZX"


# ------------------------------------------------------------------------------------ refusals

@pytest.mark.parametrize("bad", ["/etc/sdbox-test", "/var/tmp/sdbox-test", "/usr/sdbox-test", "/run/sdbox-test",
                                 "/tmp/sdbox/../../etc/sdbox-test", "/tmp/sdbox/with space", "/tmp/sdbox/a,b",
                                 "/tmp/sdbox/a:b", "/tmp/sdbox/newline\n", "/"])
def test_refuses_unsafe_state_dirs(bad: str) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root")
    existed = os.path.lexists(bad)
    r = sdbox_cli("-d", bad, "up")
    assert r.returncode == 1 and "state dir" in r.stderr, r.stderr
    assert os.path.lexists(bad) == existed


def test_refuses_a_dir_it_did_not_create(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root")
    (tmp_path / "precious").write_text("keep me")
    for verb in ("up", "down", "status"):
        r = sdbox_cli("-d", str(tmp_path), verb)
        assert r.returncode != 0 and "not created by sdbox" in r.stderr, (verb, r.stderr)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["precious"]


def test_refuses_up_when_not_root() -> None:
    if os.geteuid() != 0:
        r = sdbox_cli("-d", f"/tmp/sdbox/{unique('nonroot')}", "up")
    else:
        # the checkout may sit where nobody cannot enter (a clone in /root): run a copy of the script (it is
        # self-contained) from a directory every user can traverse
        d = Path(tempfile.mkdtemp(prefix="sdbox-nonroot-", dir="/tmp"))
        try:
            os.chmod(d, 0o755)
            script = d / "sdbox"
            shutil.copy(SDBOX, script)
            os.chmod(script, 0o755)
            r = subprocess.run([str(script), "-d", f"/tmp/sdbox/{unique('nonroot')}", "up"], capture_output=True,
                               text=True, timeout=120, user=65534, cwd="/")
        finally:
            shutil.rmtree(d)
    assert r.returncode == 1 and re.search(r"must run as root", r.stderr), r.stderr

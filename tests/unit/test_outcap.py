"""Mission output with bounds (lanectl.outcap) and reading it back safely (lanectl.missionlogs), with real processes
and real files; the 100 MB mission under real systemd is tests/systemd/test_output_bounds.py."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lanectl import missionlogs, outcap
from lanectl.protocol import LogRefused

WRITER = ("import sys, hashlib\n"
          "n = int(sys.argv[1]); out = sys.stdout.buffer; i = 0\n"
          "while i < n:\n"
          "    b = hashlib.sha256(str(i).encode()).hexdigest().encode()[: min(64, n - i)]\n"
          "    out.write(b); i += len(b)\n"
          "sys.stderr.write('')\n")


def expected(n: int) -> bytes:
    import hashlib

    out, i = [], 0
    while i < n:
        b = hashlib.sha256(str(i).encode()).hexdigest().encode()[: min(64, n - i)]
        out.append(b)
        i += len(b)
    return b"".join(out)


def capture_in(out_dir: Path, name: str, max_bytes: int) -> outcap.Capture:
    """A capture of out_dir/name (out_dir is STATE/out)."""
    sd = os.open(out_dir.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        return outcap.open_capture(sd, name, max_bytes)
    finally:
        os.close(sd)


def run_captured(out_dir: Path, name: str, max_bytes: int, argv: list[str]) -> tuple[outcap.Capture, int]:
    cap = capture_in(out_dir, name, max_bytes)
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=cap.write_fd, stderr=subprocess.STDOUT,
                            start_new_session=True)
    cap.start()
    code = proc.wait(timeout=300)
    deadline = time.monotonic() + 60
    while not cap.settle():
        assert time.monotonic() < deadline, "the output never settled"
        time.sleep(0.02)
    return cap, code


@pytest.mark.parametrize("n", [0, 100, 65536, 65537, 3 << 20])
def test_head_and_tail_are_kept_and_the_cut_is_said(tmp_path: Path, n: int) -> None:
    tmp_path = tmp_path / "out"
    cap, code = run_captured(tmp_path, "7-1.log", 65536, [sys.executable, "-c", WRITER, str(n)])
    assert code == 0
    got = (tmp_path / "7-1.log").read_bytes()
    data = expected(n)
    if n <= 65536:
        assert got == data
    else:
        line = f"\n[lanectl: {n} bytes of output; {n - 65536} bytes cut here; the first 32768 and the last 32768 are kept]\n"
        assert got == data[:32768] + line.encode() + data[-32768:]
    assert (tmp_path / "7-1.log").stat().st_mode & 0o777 == 0o600
    assert sorted(os.listdir(tmp_path)) == ["7-1.log"]  # the ring buffer leaves nothing behind


def test_a_child_holding_the_pipe_does_not_hold_the_mission(tmp_path: Path) -> None:
    tmp_path = tmp_path / "out"
    # the mission exits at once, its background child keeps stdout open for a long time
    cap, code = run_captured(tmp_path, "8-1.log", 65536, ["sh", "-c", "echo before; sleep 600 & echo pid=$!"])
    text = (tmp_path / "8-1.log").read_text()
    pid = int(text.split("pid=")[1])
    try:
        assert code == 0 and cap.done.is_set()
        assert text == f"before\npid={pid}\n"
    finally:
        os.kill(pid, signal.SIGKILL)  # the sleep this test started


def test_a_planted_out_link_is_moved_aside_not_followed(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.mkdir()
    state = tmp_path / "state"
    state.mkdir()
    os.symlink(victim, state / "out")  # a mission planted it, hoping the lane writes through it
    cap, code = run_captured(state / "out", "9-1.log", 65536, ["echo", "hi"])
    assert code == 0 and os.listdir(victim) == []
    assert (state / "out").is_dir() and not (state / "out").is_symlink()
    assert (state / "out" / "9-1.log").read_text() == "hi\n"
    assert [n for n in os.listdir(state) if n.startswith("out.refused-")]


def test_out_dir_is_pruned_oldest_first_within_bytes_and_files(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    for i in range(1, 11):
        p = out / f"{i}-1.log"
        p.write_bytes(b"x" * 8192)
        os.utime(p, (1_700_000_000 + i, 1_700_000_000 + i))
    (out / "notes.txt").write_bytes(b"y" * 100_000)  # not a mission log: never touched
    os.symlink("/etc/passwd", out / "11-1.log")  # a link with a log's name: never followed nor counted
    limits = outcap.Limits(max_bytes=8192, keep_bytes=5 * 8192, keep_files=100)
    deleted, freed = outcap.prune(out, limits, active={"1-1.log"})
    left = sorted(os.listdir(out))
    assert "1-1.log" in left and "notes.txt" in left and "11-1.log" in left  # active, foreign, link
    # a running mission's file is neither deleted nor counted (out/ holds at most keep_bytes + capacity x max_bytes)
    assert [f"{i}-1.log" for i in range(2, 6)] == [f for f in [f"{i}-1.log" for i in range(2, 11)] if f not in left]
    assert deleted == 4 and freed >= 4 * 8192
    deleted, _ = outcap.prune(out, outcap.Limits(max_bytes=8192, keep_bytes=1 << 30, keep_files=2), active=set())
    assert deleted == 4 and sorted(f for f in os.listdir(out) if f.endswith("-1.log") and not
                                   os.path.islink(out / f)) == ["10-1.log", "9-1.log"]
    assert Path("/etc/passwd").exists()


def test_reading_stored_output_refuses_traps(tmp_path: Path) -> None:
    ws = tmp_path / "ws"
    (ws / ".lanectl" / "out").mkdir(parents=True)
    me = os.getuid()
    (ws / ".lanectl" / "out" / "1-1.log").write_bytes(b"hello\n" * 10)
    assert missionlogs.read_output(str(ws), "1-1.log", me, 1 << 20) == (b"hello\n" * 10, 60)
    assert missionlogs.read_output(str(ws), "1-1.log", me, 12) == (b"hello\nhello\n", 60)  # bounded
    os.symlink("/etc/passwd", ws / ".lanectl" / "out" / "2-1.log")
    with pytest.raises(LogRefused):
        missionlogs.read_output(str(ws), "2-1.log", me, 1 << 20)
    os.mkfifo(ws / ".lanectl" / "out" / "3-1.log")
    with pytest.raises(LogRefused):  # never blocks on a FIFO
        missionlogs.read_output(str(ws), "3-1.log", me, 1 << 20)
    with pytest.raises(LogRefused):  # owned by someone else than the lane
        missionlogs.read_output(str(ws), "1-1.log", me + 1, 1 << 20)
    with pytest.raises(FileNotFoundError):
        missionlogs.read_output(str(ws), "4-1.log", me, 1 << 20)
    # a linked out/ directory
    os.rename(ws / ".lanectl" / "out", ws / ".lanectl" / "real")
    os.symlink(ws / ".lanectl" / "real", ws / ".lanectl" / "out")
    with pytest.raises(LogRefused):
        missionlogs.read_output(str(ws), "1-1.log", me, 1 << 20)


class _Null:
    def send(self, msg: str) -> None:
        pass


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(pred, what: str, timeout: float = 120.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def test_the_runtime_caps_output_and_keeps_the_tail_of_a_stopped_mission(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """The reference runtime end to end (no supervisor: callbacks go nowhere): a mission's output is capped to
    LANECTL_OUTPUT_MAX_BYTES, out/ is pruned to LANECTL_OUTPUT_KEEP_FILES, and a mission stopped with its lane keeps
    the tail of what it wrote."""
    import threading

    from lanectl.protocol import DispatchMsg
    from lanectl.runtime import LaneInfo, LaneRuntime

    monkeypatch.setenv("LANECTL_OUTPUT_MAX_BYTES", "65536")
    monkeypatch.setenv("LANECTL_OUTPUT_KEEP_FILES", "2")
    ws = tmp_path / "ws"
    ws.mkdir()
    rt = LaneRuntime(LaneInfo(lane="alpha", port=_free_port(), workspace=str(ws), session_prefix="alpha",
                              capacity=4, dispatch_key="k" * 32), notifier=_Null())  # type: ignore[arg-type]
    th = threading.Thread(target=rt.run, daemon=True)
    th.start()
    out = ws / ".lanectl" / "out"

    def dispatch(mission: int, script: str) -> None:
        code, _ = rt.accept(DispatchMsg(mission, 1, "alpha", "t" * 32, "background", None, None,
                                        {"argv": ["sh", "-c", script]}))
        assert code == 202

    try:
        for m in (1, 2, 3):
            dispatch(m, f"echo first-{m}; yes abc | head -c 1000000; echo last-{m}")
            _wait(lambda: rt.done >= m, f"mission {m} to end")
        _wait(lambda: sorted(os.listdir(out)) == ["2-1.log", "3-1.log"], "out/ pruned to two files")
        text = (out / "3-1.log").read_text()
        assert text.startswith("first-3\n") and text.endswith("abc\nlast-3\n") and "bytes cut here" in text
        assert len(text) < 65536 + 200
        # stopped with its lane: the tail of what it wrote is kept
        dispatch(4, "echo first-4; yes abc | head -c 300000; echo last-4; exec sleep 600")
        _wait(lambda: 4 in rt.held and rt.held[4].capture is not None and rt.held[4].capture.total >= 300013,
              "mission 4 to write its output")
    finally:
        rt.stop.set()
        rt.inbox.put(0)
        th.join(60)
    assert not th.is_alive()
    text = (out / "4-1.log").read_text()
    assert text.startswith("first-4\n") and text.endswith("last-4\n") and "bytes cut here" in text


def test_a_full_disk_does_not_kill_the_mission(tmp_path: Path) -> None:
    """When the log cannot be written (here: RLIMIT_FSIZE standing in for a full disk) the pump keeps draining the
    pipe: the mission runs to its end (no SIGPIPE, exit 0), and what could not be kept is counted."""
    import resource

    old_sig = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    old_lim = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (32768, old_lim[1]))
    try:
        cap, code = run_captured(tmp_path / "out", "10-1.log", 1 << 20, [sys.executable, "-c", WRITER, "400000"])
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, old_lim)
        signal.signal(signal.SIGXFSZ, old_sig)
    assert code == 0, "the mission was killed by the full disk"
    assert cap.error is not None and "not kept" in cap.error and cap.lost > 0
    assert (tmp_path / "out" / "10-1.log").read_bytes().startswith(expected(32768)[:1000])


def test_the_runtime_reads_no_tail_through_a_planted_link(tmp_path: Path) -> None:
    """The callback's output_tail: a mission that swapped .lanectl/out (or .lanectl) for a link to a file it
    wrote cannot make the runtime report that file as its output."""
    from types import SimpleNamespace

    from lanectl.runtime import LaneRuntime

    state = tmp_path / ".lanectl"
    (state / "out").mkdir(parents=True)
    (state / "out" / "12-1.log").write_text("REAL-OUTPUT\n")
    r = SimpleNamespace(out_path=state / "out" / "12-1.log")
    assert LaneRuntime.tail(None, r) == "REAL-OUTPUT\n"  # type: ignore[arg-type]
    fake = tmp_path / "fake"
    fake.mkdir()
    (fake / "12-1.log").write_text("FORGED-TAIL\n")
    os.rename(state / "out", state / "out.real")
    os.symlink(fake, state / "out")
    assert LaneRuntime.tail(None, r) == ""  # type: ignore[arg-type]
    os.unlink(state / "out")
    os.rename(state / "out.real", state / "out")
    os.rename(state, tmp_path / "real-state")
    (tmp_path / "evil").mkdir()
    (tmp_path / "evil" / "out").symlink_to(fake)
    os.symlink(tmp_path / "evil", state)
    assert LaneRuntime.tail(None, r) == ""  # type: ignore[arg-type]


def test_whatever_a_mission_planted_at_a_log_path_is_moved_aside(tmp_path: Path) -> None:
    """Issue 17 F5: a mission plants a directory, a link, a FIFO or a hard link to another file of the lane at the
    next missions' log paths. Each of those missions still gets its log (nothing blocks, nothing is followed or
    truncated through a link), and what was planted is moved aside, not deleted."""
    out = tmp_path / "state" / "out"
    out.mkdir(parents=True)
    precious = tmp_path / "state" / "executions.log"
    precious.write_text("KEEP ME\n")
    (out / "2-1.log").mkdir()
    (out / "2-1.log" / "inside").write_text("x")
    os.symlink(precious, out / "3-1.log")
    os.mkfifo(out / "4-1.log")
    os.link(precious, out / "5-1.log")
    (out / "6-1.log").write_text("an old log of the same attempt\n")
    for n in range(2, 7):
        cap, code = run_captured(out, f"{n}-1.log", 1 << 20, ["sh", "-c", f"echo mission-{n}"])
        assert code == 0 and cap.error is None
        assert (out / f"{n}-1.log").read_text() == f"mission-{n}\n"
        assert (out / f"{n}-1.log").stat().st_nlink == 1
    assert precious.read_text() == "KEEP ME\n"
    aside = sorted(p.name.split(".refused-")[0] for p in out.iterdir() if ".refused-" in p.name)
    assert aside == ["2-1.log", "3-1.log", "4-1.log", "5-1.log"], aside
    assert [p for p in out.iterdir() if p.name.startswith("2-1.log.refused-")][0].joinpath("inside").exists()


CHMODDED = r'''
import os, stat, sys
from lanectl import outcap
from lanectl.runtime import own_state_dir
ws = sys.argv[1]
os.chmod(os.path.join(ws, ".lanectl", "out"), 0)
os.chmod(os.path.join(ws, ".lanectl"), 0)
sd = own_state_dir(ws)  # refused for its mode: given back
cap = outcap.open_capture(sd, "9-1.log", 65536)  # out/ too
cap.abandon()
os.close(sd)
os.chmod(os.path.join(ws, ".lanectl"), 0o500)  # readable, not writable
os.chmod(os.path.join(ws, ".lanectl", "out"), 0o100)
sd = own_state_dir(ws)
outcap.open_capture(sd, "10-1.log", 65536).abandon()
os.close(sd)
for p in (".lanectl", ".lanectl/out"):
    print(p, oct(stat.S_IMODE(os.stat(os.path.join(ws, p)).st_mode)))
print(sorted(os.listdir(os.path.join(ws, ".lanectl", "out"))))
'''


def test_a_state_dir_a_mission_chmodded_gets_its_mode_back() -> None:
    """Issue 17 F4: ``chmod 000 .lanectl .lanectl/out`` by a mission (the lane's uid) would fail every later mission
    and the runtime's restart; the runtime gives both their mode back. Run as a user other than root (root is not
    refused by modes)."""
    import shutil
    import tempfile

    top = Path(tempfile.mkdtemp(prefix="lanectl-chmod-"))  # under /tmp: the other user can reach it
    ws = top / "ws"
    (ws / ".lanectl" / "out").mkdir(parents=True)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    kw = {}
    if os.geteuid() == 0:
        os.chmod(top, 0o755)
        for p in (ws, ws / ".lanectl", ws / ".lanectl" / "out"):
            os.chown(p, 65534, 65534)

        def drop() -> None:
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
        kw["preexec_fn"] = drop
    try:
        proc = subprocess.run([sys.executable, "-c", CHMODDED, str(ws)], capture_output=True, text=True, env=env,
                              cwd="/", timeout=120, **kw)
    finally:
        for d, _, _ in os.walk(top):  # whatever modes it was left with
            os.chmod(d, 0o700)
        shutil.rmtree(top)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [".lanectl 0o700", ".lanectl/out 0o700", "['10-1.log', '9-1.log']"], proc.stdout

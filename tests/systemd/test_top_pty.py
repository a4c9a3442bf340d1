"""`lanectl top` in a real pseudo-terminal: tmux inside the sandbox runs it against a fleet under systemd; the
screen is captured and must show the lanes, then a state change (a lane drained, a lane stopped), fit a narrow
window, and leave cleanly on `q` (exit 0, the terminal given back)."""
from __future__ import annotations

import json
import re
import uuid

import pytest

from tests.systemd.lanehelpers import LANECTL, Fleet, submit_many, up_example, wait_for, wait_terminal

pytestmark = pytest.mark.systemd
LANES = ("alpha", "beta", "gamma")


@pytest.fixture(scope="module")
def fleet(sandbox, tmp_path_factory):  # type: ignore[no-untyped-def]
    # a lane stopped on purpose must not trigger a rollback here
    f = up_example(sandbox, tmp_path_factory.mktemp("top"), "\n[rollback]\nenabled = false\n")
    wait_for(lambda: all(r["state"] == "up" for r in f.status().values()), 60, interval=0.5, what="lanes up")
    yield f
    f.lanectl("down")


class Tmux:
    """A tmux server of its own (-L) inside the sandbox; killed at the end."""

    def __init__(self, fleet: Fleet) -> None:
        self.fleet = fleet
        self.sock = f"lanectl-top-{uuid.uuid4().hex[:8]}"

    def __call__(self, *args: str, check: bool = True) -> str:
        return self.fleet.sb.exec(["tmux", "-L", self.sock, *args], check=check).stdout

    def screen(self) -> str:
        return self("capture-pane", "-p", "-t", "top", check=False)

    def kill(self) -> None:
        self("kill-server", check=False)


def row(screen: str, lane: str) -> str:
    return next((line for line in screen.splitlines() if re.match(rf"\s*{lane}\s", line)), "")


def test_top_live_in_a_pty(fleet: Fleet) -> None:
    ids = submit_many(fleet, [{"cls": "interactive", "argv": ["/bin/true"]} for _ in range(3)])
    assert set(wait_terminal(fleet, ids, 60).values()) == {"succeeded"}
    tmux = Tmux(fleet)
    cmd = f"TERM=xterm-256color {LANECTL} top -c {fleet.config_dir}; echo TOP-EXIT=$?; sleep 600"
    try:
        tmux("new-session", "-d", "-s", "top", "-x", "132", "-y", "40", cmd)
        screen = wait_for(lambda: (lambda s: s if all(row(s, ln) for ln in LANES) and "interactive" in s else None)(
            tmux.screen()), 30, interval=0.3, what="the lanes on top's screen")
        assert "lanectl top" in screen and "3/3 lanes up" in screen
        for lane in LANES:
            assert "active" in row(screen, lane) and "active/running" in row(screen, lane), screen
        assert re.search(r"0/4\b", row(screen, "alpha")), screen  # in flight / capacity
        assert "(supervisor)" in screen
        assert "last events" in screen and f"succeeded lane=" in screen and f"mission={ids[-1]}" in screen

        # state changes show up within a refresh or two: a drained lane, a stopped lane
        assert fleet.lanectl("drain", "gamma").returncode == 0
        wait_for(lambda: "drain" in row(tmux.screen(), "gamma"), 15, interval=0.3, what="gamma drained on screen")
        fleet.sb.exec(["systemctl", "stop", "lanectl-lane@beta.service"], check=True)
        screen = wait_for(lambda: (lambda s: s if "down" in row(s, "beta") else None)(tmux.screen()), 15,
                          interval=0.3, what="beta down on screen")
        assert "inactive/dead" in row(screen, "beta"), screen
        assert "1/3 lanes up" in screen or "2/3 lanes up" in screen, screen

        # a narrow terminal: columns go, nothing wraps, every lane still has its row
        tmux("resize-window", "-t", "top", "-x", "46", "-y", "20")
        narrow = wait_for(lambda: (lambda s: s if "unit" not in s and all(row(s, ln) for ln in LANES) else None)(
            tmux.screen()), 15, interval=0.3, what="the narrow layout")
        assert all(len(line) <= 46 for line in narrow.splitlines()), narrow
        assert "down" in row(narrow, "beta")

        # q leaves: exit 0, the alternate screen is gone (the shell's echo is on the normal screen)
        tmux("send-keys", "-t", "top", "q")
        done = wait_for(lambda: (lambda s: s if "TOP-EXIT=" in s else None)(tmux.screen()), 15, interval=0.3,
                        what="top to exit on q")
        assert "TOP-EXIT=0" in done and "lanectl top" not in done, done
        mode = tmux("display-message", "-p", "-t", "top", "#{alternate_on}").strip()
        assert mode == "0"
    finally:
        tmux.kill()
        fleet.sb.exec(["systemctl", "start", "lanectl-lane@beta.service"], check=False)
        fleet.lanectl("undrain", "gamma")


def test_top_ctrl_c_and_once(fleet: Fleet) -> None:
    tmux = Tmux(fleet)
    cmd = f"{LANECTL} top -c {fleet.config_dir}; echo TOP-EXIT=$?; stty -a | tr ';' '\\n' | grep -w icanon; sleep 600"
    try:
        tmux("new-session", "-d", "-s", "top", "-x", "100", "-y", "30", cmd)
        wait_for(lambda: row(tmux.screen(), "alpha"), 30, interval=0.3, what="top drawn")
        tmux("send-keys", "-t", "top", "C-c")
        done = wait_for(lambda: (lambda s: s if "TOP-EXIT=" in s else None)(tmux.screen()), 15, interval=0.3,
                        what="top to exit on Ctrl-C")
        assert "TOP-EXIT=0" in done, done
        assert "-icanon" not in done, done  # the terminal is back in canonical mode (cbreak undone)
        # SIGTERM (and SIGHUP, a dropped SSH connection) leave the same way
        for sig in ("TERM", "HUP"):
            tmux("kill-session", "-t", "top")
            tmux("new-session", "-d", "-s", "top", "-x", "100", "-y", "30", cmd)
            wait_for(lambda: row(tmux.screen(), "alpha"), 30, interval=0.3, what="top drawn")
            shell = tmux("display-message", "-p", "-t", "top", "#{pane_pid}").strip()
            child = fleet.sb.exec(["cat", f"/proc/{shell}/task/{shell}/children"], check=True).stdout.split()[0]
            fleet.sb.exec(["kill", f"-{sig}", child], check=True)
            done = wait_for(lambda: (lambda s: s if "TOP-EXIT=" in s else None)(tmux.screen()), 15, interval=0.3,
                            what=f"top to exit on SIG{sig}")
            assert "TOP-EXIT=0" in done and "-icanon" not in done, done
    finally:
        tmux.kill()
    # no terminal: one frame on stdout, like top -b -n 1
    proc = fleet.sb.exec([LANECTL, "top", "-c", str(fleet.config_dir)], check=False)
    assert proc.returncode == 0, proc.stderr
    assert all(row(proc.stdout, ln) for ln in LANES) and "\x1b[?1049h" not in proc.stdout
    assert json.dumps(proc.stdout)  # plain text

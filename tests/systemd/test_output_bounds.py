"""Issue 17 item 3 under a real systemd: a mission that writes 100 MB succeeds, its stored output is capped at the
lane's [output] max_bytes (its head and tail kept, one line saying what was cut), the lane stays fine (same main
PID, no restart, the next mission runs), ``lanectl mission logs`` prints it with its path, and out/ is pruned to
keep_files."""
from __future__ import annotations

import pytest

from tests.systemd.lanehelpers import Fleet, copy_example, submit_many, wait_for, wait_terminal

pytestmark = pytest.mark.systemd
MAX = 1 << 20
TOTAL = 100 * (1 << 20)
OUT = "/var/lib/lanes/alpha/.lanectl/out"


def stream(a: int, b: int) -> str:
    """Bytes a..b of what ``yes 0123456789abcdef`` writes."""
    unit = "0123456789abcdef\n"
    return (unit * ((b - a) // len(unit) + 2))[a % len(unit):][: b - a]


@pytest.fixture(scope="module")
def fleet(sandbox, tmp_path_factory):  # type: ignore[no-untyped-def]
    cfg = copy_example(tmp_path_factory.mktemp("outbounds"))
    with open(cfg / "lanes.d" / "alpha.toml", "a") as fh:
        fh.write('\n[output]\nmax_bytes = "1M"\nkeep_bytes = "64M"\nkeep_files = 5\n')
    f = Fleet(sandbox, cfg)
    assert f.json("install")[0] == 0
    code, doc = f.json("up")
    assert code == 0, doc
    yield f
    f.lanectl("down")
    sandbox.exec(["rm", "-rf", OUT], check=False)


def test_a_100_mb_mission_is_capped_and_the_lane_is_fine(fleet: Fleet) -> None:
    before = fleet.show("lanectl-lane@alpha.service", "MainPID", "NRestarts")
    script = f"echo START; yes 0123456789abcdef | head -c {TOTAL}; echo END"
    (mid,) = submit_many(fleet, [{"cls": "interactive", "lane": "alpha", "argv": ["sh", "-c", script]}])
    assert wait_terminal(fleet, [mid], timeout=600) == {mid: "succeeded"}
    path = f"{OUT}/{mid}-1.log"
    size = int(fleet.sb.exec(["stat", "-c", "%s", path], check=True).stdout)
    total = len("START\n") + TOTAL + len("END\n")
    line = (f"\n[lanectl: {total} bytes of output; {total - MAX} bytes cut here; the first {MAX // 2} and the last "
            f"{MAX // 2} are kept]\n")
    assert size == MAX + len(line)
    # lanectl mission logs: the whole stored output on stdout, its path on stderr
    proc = fleet.lanectl("mission", "logs", str(mid))
    assert proc.returncode == 0, proc.stderr
    assert path in proc.stderr and f"({size} bytes)" in proc.stderr
    data_head = ("START\n" + stream(0, MAX // 2 - 6))
    data_tail = stream(TOTAL - (MAX // 2 - 4), TOTAL) + "END\n"
    assert proc.stdout == data_head + line + data_tail  # head and tail exactly, the cut said where it was
    code, doc = fleet.json("mission", "show", str(mid))
    assert code == 0 and data_tail.endswith(doc["data"]["result"]["output_tail"])
    # the lane is fine: same process, no restart, and it runs the next mission
    after = fleet.show("lanectl-lane@alpha.service", "MainPID", "NRestarts")
    assert after == before
    (nxt,) = submit_many(fleet, [{"cls": "interactive", "lane": "alpha", "argv": ["echo", "next"]}])
    assert wait_terminal(fleet, [nxt], timeout=120) == {nxt: "succeeded"}
    assert fleet.lanectl("mission", "logs", str(nxt)).stdout == "next\n"


def test_out_is_pruned_to_keep_files(fleet: Fleet) -> None:
    # out/ is pruned oldest (by modification time) first, and missions of one wave may end in any order, so the
    # newest five are the second wave's: their files are written after every mission of the first wave ended
    first = submit_many(fleet, [{"cls": "interactive", "lane": "alpha", "argv": ["echo", str(i)]} for i in range(7)])
    assert set(wait_terminal(fleet, first, timeout=300).values()) == {"succeeded"}
    second = submit_many(fleet, [{"cls": "interactive", "lane": "alpha", "argv": ["echo", str(i)]} for i in range(5)])
    assert set(wait_terminal(fleet, second, timeout=300).values()) == {"succeeded"}
    ids = first + second
    # the runtime prunes at most once a second after a mission ends
    def names() -> list[str]:
        return fleet.sb.exec(["ls", OUT], check=True).stdout.split()

    wait_for(lambda: len([n for n in names() if n.endswith(".log")]) <= 5, timeout=60, interval=0.5,
             what="out/ pruned to keep_files")
    kept = sorted(int(n.split("-")[0]) for n in names() if n.endswith(".log"))
    assert kept == sorted(second)  # the newest are kept
    gone = fleet.lanectl("mission", "logs", str(min(ids)))
    assert gone.returncode == 4 and "keep_files" in gone.stderr


@pytest.mark.parametrize("trap", ["ln -sf /etc/shadow {f}", "rm -f {f} && mkfifo {f}"])
def test_a_mission_that_replaces_its_log_cannot_make_root_read_it(fleet: Fleet, trap: str) -> None:
    """The mission swaps its stored output for a link to /etc/shadow or a FIFO: its lane neither follows nor blocks
    on it (the mission ends, the lane stays up), and `lanectl mission logs` (root) refuses it, without reading
    /etc/shadow and without hanging."""
    before = fleet.show("lanectl-lane@alpha.service", "MainPID", "NRestarts")
    f = ".lanectl/out/$LANECTL_MISSION-$LANECTL_ATTEMPT.log"
    (mid,) = submit_many(fleet, [{"cls": "interactive", "lane": "alpha",
                                  "argv": ["sh", "-c", f"echo secret-free; {trap.format(f=f)}"]}])
    assert wait_terminal(fleet, [mid], timeout=120) == {mid: "succeeded"}
    proc = fleet.lanectl("mission", "logs", str(mid))
    assert proc.returncode == 5 and "output_refused" not in proc.stdout and "refused" in proc.stderr
    assert "root:" not in proc.stdout + proc.stderr
    assert fleet.show("lanectl-lane@alpha.service", "MainPID", "NRestarts") == before
    (nxt,) = submit_many(fleet, [{"cls": "interactive", "lane": "alpha", "argv": ["echo", "after"]}])
    assert wait_terminal(fleet, [nxt], timeout=120) == {nxt: "succeeded"}
    fleet.sb.exec(["sh", "-c", f"rm -f {OUT}/{mid}-1.log"], check=False)


def test_a_planted_out_link_is_moved_aside(fleet: Fleet) -> None:
    """A mission replaces out/ with a link to another directory of its user's: the next mission's output goes to a
    fresh out/, nothing is written through the link."""
    (mid,) = submit_many(fleet, [{"cls": "interactive", "lane": "alpha", "argv": [
        "sh", "-c", "mkdir -p trap && mv .lanectl/out .lanectl/out.old && ln -s ../trap .lanectl/out"]}])
    assert wait_terminal(fleet, [mid], timeout=120) == {mid: "succeeded"}
    (nxt,) = submit_many(fleet, [{"cls": "interactive", "lane": "alpha", "argv": ["echo", "fresh"]}])
    assert wait_terminal(fleet, [nxt], timeout=120) == {nxt: "succeeded"}
    assert fleet.sb.exec(["ls", "/var/lib/lanes/alpha/trap"], check=True).stdout == ""
    assert fleet.lanectl("mission", "logs", str(nxt)).stdout == "fresh\n"
    fleet.sb.exec(["sh", "-c", "cd /var/lib/lanes/alpha && rm -rf trap .lanectl/out.old .lanectl/out.refused-*"],
                  check=False)

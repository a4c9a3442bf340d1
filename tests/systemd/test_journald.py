"""journald conventions under the sandbox's real journald (Storage=volatile): the supervisor and the reference
lane runtime log with sd-daemon priority prefixes, so `journalctl -u UNIT -p warning` shows warnings and errors
only, and mission and lane identifiers are `key=value` words that grep finds."""
from __future__ import annotations

import json
import re
import time
from typing import Any

import pytest

from tests.systemd.lanehelpers import Fleet, copy_example, submit_many, wait_for, wait_terminal

pytestmark = pytest.mark.systemd
SUPERVISOR = "lanectl-supervisor.service"
LANES = ("alpha", "beta", "gamma")


@pytest.fixture(scope="module")
def fleet(sandbox, tmp_path_factory):  # type: ignore[no-untyped-def]
    cfg = copy_example(tmp_path_factory.mktemp("journal"))
    with open(cfg / "lanectl.toml", "a") as fh:  # a stopped lane and a failing mission are on purpose here
        fh.write("\n[rollback]\nenabled = false\n")
    f = Fleet(sandbox, cfg)
    # the sandbox is shared: read only what was written from now on (journalctl's --after-cursor combined with
    # -u skips entries on systemd 252, so a time bound it is: --since, then the exact time per entry)
    f.t0 = time.time()  # type: ignore[attr-defined]
    assert f.json("install")[0] == 0
    code, doc = f.json("up")
    assert code == 0, doc
    yield f
    f.lanectl("down")


def entries(fleet: Fleet, *args: str) -> list[dict[str, Any]]:
    """Journal entries since the module began (JSON export), filtered by journalctl's own options."""
    t0 = fleet.t0  # type: ignore[attr-defined]
    out = fleet.sb.exec(["journalctl", "--no-pager", "-o", "json", "--since", f"@{int(t0)}", *args],
                        check=False).stdout
    found = [json.loads(line) for line in out.splitlines() if line.strip()]
    return [e for e in found if int(e["__REALTIME_TIMESTAMP"]) >= int(t0 * 1e6)]


def messages(fleet: Fleet, *args: str) -> list[str]:
    return [e["MESSAGE"] if isinstance(e["MESSAGE"], str) else bytes(e["MESSAGE"]).decode("utf-8", "replace")
            for e in entries(fleet, *args)]


def lines_with(fleet: Fleet, needle: str, *args: str) -> list[str]:
    return [m for m in messages(fleet, *args) if needle in m]


def test_warning_priority_filters_and_identifiers_grep(fleet: Fleet) -> None:
    # the supervisor's start and every lane's health at info: in -p info, not in -p warning
    wait_for(lambda: all(lines_with(fleet, f"lane={ln} healthy", "-u", SUPERVISOR) for ln in LANES), 60,
             interval=0.5, what="every lane healthy in the supervisor's log")
    assert lines_with(fleet, "supervising 3 lanes", "-u", SUPERVISOR, "-p", "info")
    for ln in LANES:
        assert lines_with(fleet, f"lane={ln} listening on", "-u", f"lanectl-lane@{ln}.service", "-p", "info")

    # a mission that fails on alpha: a warning of alpha's runtime, naming mission, attempt and lane
    ids = submit_many(fleet, [{"cls": "interactive", "argv": ["/bin/sh", "-c", "exit 3"], "lane": "alpha"},
                              {"cls": "interactive", "argv": ["/bin/true"], "lane": "alpha"}])
    assert wait_terminal(fleet, ids, 60) == {ids[0]: "failed", ids[1]: "succeeded"}
    failed = wait_for(lambda: lines_with(fleet, f"mission={ids[0]} attempt=1 failed (exit status 3)",
                                         "-u", "lanectl-lane@alpha.service", "-p", "warning"), 30, interval=0.3,
                      what="the runtime's warning about the failed mission")
    assert "lane=alpha" in failed[0]
    # success is routine (debug, below the default level): the ledger has it, the journal does not
    assert not lines_with(fleet, f"mission={ids[1]} ", "-u", "lanectl-lane@alpha.service")

    # a lane stopped behind lanectl's back: the supervisor warns, naming it
    fleet.sb.exec(["systemctl", "stop", "lanectl-lane@beta.service"], check=True)
    try:
        down = wait_for(lambda: lines_with(fleet, "lane=beta down", "-u", SUPERVISOR, "-p", "warning"), 30,
                        interval=0.3, what="the supervisor's warning about beta")
        assert re.search(r"lane=beta down: (its process exited|unit inactive|unit deactivating|health endpoint)",
                         down[0]), down
    finally:
        fleet.sb.exec(["systemctl", "start", "lanectl-lane@beta.service"], check=True)
    wait_for(lambda: len(lines_with(fleet, "lane=beta healthy", "-u", SUPERVISOR)) >= 2, 60, interval=0.5,
             what="beta healthy again")

    # -p warning: warnings and errors only, from both processes; the info lines stay out
    warn = entries(fleet, "-u", SUPERVISOR, "-u", "lanectl-lane@alpha.service", "-p", "warning")
    assert warn and all(int(e["PRIORITY"]) <= 4 for e in warn)
    texts = [e["MESSAGE"] for e in warn]
    assert not [t for t in texts if "healthy" in t or "supervising" in t or "listening" in t], texts
    # the prefix is parsed, never left in the text; nothing of lanectl's lands at the default priority by accident
    everything = entries(fleet, "-u", SUPERVISOR, "-u", "lanectl-lane@alpha.service",
                         "-u", "lanectl-lane@beta.service")
    assert not [e["MESSAGE"] for e in everything if str(e["MESSAGE"]).startswith("<")]
    ours = [e for e in everything if str(e.get("MESSAGE", "")).startswith("lanectl.")]
    assert {e["PRIORITY"] for e in ours} <= {"2", "3", "4", "6", "7"} and {"4", "6"} <= {e["PRIORITY"] for e in ours}

    # grep by identifier across every lanectl unit
    unit_glob = fleet.sb.exec(["sh", "-c", f"journalctl --no-pager -o cat --since @{int(fleet.t0)} "  # type: ignore
                                           f"-u 'lanectl-*' | grep -F 'mission={ids[0]} '"], check=False).stdout
    assert "failed (exit status 3)" in unit_glob

"""Every runbook in docs/runbooks.md, run as written under a real systemd (issue 15 item 5).

The test reads the document: each ``console`` block's ``# COMMAND   # comment`` lines are run in order, in one
sandbox holding the example fleet installed the default way (/etc/lanectl, /var/lib/lanectl/ledger.db, lanectl on
PATH). A command must exit 0 unless its comment says ``expect exit N``. Before a section's commands run, the
situation the section is about is brought about (SITUATIONS: a lane systemd gave up on, an automatic rollback,
evidence for a promotion); after it the fleet is put back in service. A section the test does not know fails it
(add its situation), and so does a substitution for a command the runbook no longer has: a changed runbook is
re-tested as changed, and cannot drift from the software again.
"""
from __future__ import annotations

import json
import re
import shlex
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import LANECTL_BIN
from tests.systemd.lanehelpers import ROOT, Fleet, sql, submit_many, wait_for, wait_terminal

pytestmark = pytest.mark.systemd

RUNBOOKS = ROOT / "docs" / "runbooks.md"
VENV_BIN = str(Path(LANECTL_BIN).parent)
CONFIG = "/etc/lanectl"
LANES = ("alpha", "beta", "gamma")

# the example fleet, with rollback and promotion windows short enough for one test run
POLICY = """
[rollback]
window_sec = 60
min_samples = 5
failure_rate = 0.5
cooldown_sec = 0

[health]
recover_sec = 3

[promotion]
window_sec = 20
min_samples = 5
drill_max_age_sec = 600
"""

# Commands the sandbox cannot run as written, and what runs instead (each key must still be in the runbook).
SUBSTITUTES = {
    # an editor: the edit the runbook is about (a changed lane file)
    "$EDITOR /etc/lanectl/lanes.d/alpha.toml": "sed -i 's/^capacity = 4$/capacity = 5/' /etc/lanectl/lanes.d/alpha.toml",
    # no network in the sandbox, and the code under test is installed already: check that it is importable
    "/opt/lanectl/venv/bin/pip install --upgrade lanectl":
        f"{VENV_BIN}/python -c 'import lanectl.supervisor'",
}


def parse(text: str) -> list[tuple[str, list[tuple[str, str]]]]:
    """[(section title, [(command, comment), ...])] for every ``## `` section, in document order."""
    sections: list[tuple[str, list[tuple[str, str]]]] = []
    in_block = False
    for line in text.splitlines():
        if line.startswith("## "):
            sections.append((line[3:].strip(), []))
        elif line.strip() == "```console":
            in_block = True
        elif line.strip() == "```":
            in_block = False
        elif in_block and line.startswith("# "):
            body = line[2:]
            m = re.search(r"\s{2,}#\s?(.*)$", body)  # a trailing comment: two spaces or more, then '#'
            sections[-1][1].append(((body[:m.start()] if m else body).strip(), m.group(1) if m else ""))
    return sections


def expected_exit(comment: str) -> int:
    m = re.search(r"expect exit (\d+)", comment)
    return int(m.group(1)) if m else 0


# ------------------------------------------------------------------------------------------------ situations
def lanes_status(f: Fleet) -> dict[str, dict[str, Any]]:
    proc = f.sb.exec([LANECTL_BIN, "status", "--json"], check=False)
    return {r["name"]: r for r in json.loads(proc.stdout)["data"]["lanes"]}


def in_service(f: Fleet) -> None:
    """Every lane up, healthy and taking work (what each section starts from)."""
    for name, r in lanes_status(f).items():
        if r["dispatch"] in ("draining", "drained"):
            f.sb.exec([LANECTL_BIN, "undrain", name, "--reason", "runbook test: next section"], check=True)
        if r["state"] in ("failed", "down"):
            f.sb.exec([LANECTL_BIN, "up", name], check=True)
    wait_for(lambda: all(r["state"] == "up" and r["dispatch"] == "active" for r in lanes_status(f).values()), 60,
             interval=0.5, what="every lane up and active")


def unit(f: Fleet, lane: str) -> dict[str, str]:
    return f.show(f"lanectl-lane@{lane}.service", "ActiveState", "MainPID")


def systemd_gives_up(f: Fleet, lane: str = "alpha") -> None:
    """Crash the lane until systemd's start limit stops restarting it."""
    for _ in range(20):
        props = unit(f, lane)
        if props["ActiveState"] == "failed":
            return
        pid = int(props["MainPID"])
        if pid:
            f.sb.exec(["kill", "-9", str(pid)], check=False)
        wait_for(lambda: unit(f, lane)["ActiveState"] == "failed" or int(unit(f, lane)["MainPID"]) not in (0, pid),
                 20, what=f"{lane} restarted or given up")
    assert unit(f, lane)["ActiveState"] == "failed"


def automatic_rollback(f: Fleet, lane: str = "alpha") -> None:
    """A failure spike on the lane: the supervisor drains it (a rollback event, a snapshot)."""
    ids = submit_many(f, [{"cls": "interactive", "lane": lane, "argv": ["/bin/false"]} for _ in range(6)])
    wait_for(lambda: sql(f, "SELECT 1 FROM events WHERE kind = 'rollback' AND lane = ?", lane), 60, interval=0.3,
             what=f"a rollback of {lane}")
    wait_terminal(f, ids, 60)
    wait_for(lambda: lanes_status(f)[lane]["dispatch"] == "drained", 30, interval=0.3, what=f"{lane} drained")


def promotion_evidence(f: Fleet, lane: str = "alpha") -> None:
    """Enough successes on the lane within [promotion] window_sec, and nothing older in the window."""
    last_bad = sql(f, "SELECT max(at) FROM events WHERE lane = ? AND kind IN ('failed', 'dead', 'rollback', 'drain')",
                   lane)[0][0]
    if last_bad is not None:
        wait_for(lambda: time.time() > last_bad + 21, 30, interval=0.5, what="old evidence out of the window")
    ids = submit_many(f, [{"cls": "interactive", "lane": lane, "argv": ["/bin/true"]} for _ in range(6)])
    assert set(wait_terminal(f, ids, 60).values()) == {"succeeded"}


SITUATIONS: dict[str, Callable[[Fleet], None] | None] = {
    "Drain a lane (maintenance, suspicion)": None,
    "Reroute a lane's work": None,
    "Recover a failed lane": systemd_gives_up,
    "Roll back a lane (manually, or after an automatic rollback)": automatic_rollback,
    "Promote a lane": promotion_evidence,
    "Run a drill": None,
    "Change lanes without dropping work": None,
    "Upgrade the supervisor (zero loss)": None,
    "The ledger cannot be used": None,
    "Status for the team document": None,
    "Add, remove or rename a lane": None,
}


def run(f: Fleet, cmd: str) -> Any:
    script = f"export PATH={shlex.quote(VENV_BIN)}:$PATH; cd /var/tmp && {SUBSTITUTES.get(cmd, cmd)}"
    return f.sb.exec(["bash", "-c", script], check=False, timeout=600)


def test_the_runbooks_parse_and_every_section_is_known() -> None:
    sections = parse(RUNBOOKS.read_text())
    titles = [t for t, _ in sections]
    assert titles == list(SITUATIONS), "a runbook was added, renamed or removed: update SITUATIONS"
    commands = {c for _, cmds in sections for c, _ in cmds}
    assert set(SUBSTITUTES) <= commands, f"stale substitutions: {set(SUBSTITUTES) - commands}"
    assert all(cmds for _, cmds in sections), "every runbook holds at least one console block the test can run"


def test_every_runbook_runs_as_written(fresh_sandbox) -> None:  # type: ignore[no-untyped-def]
    sb = fresh_sandbox
    f = Fleet(sb, Path(CONFIG))
    f.write_file(f"{CONFIG}/lanectl.toml", (ROOT / "lanectl.toml").read_text() + POLICY)
    for p in sorted((ROOT / "lanes.d").glob("*.toml")):
        f.write_file(f"{CONFIG}/lanes.d/{p.name}", p.read_text())
    for cmd in ("lanectl install", "lanectl up"):
        proc = run(f, cmd)
        assert proc.returncode == 0, (cmd, proc.stdout, proc.stderr)
    in_service(f)

    ran: list[str] = []
    for title, commands in parse(RUNBOOKS.read_text()):
        situation = SITUATIONS[title]
        if situation is not None:
            situation(f)
        for cmd, comment in commands:
            proc = run(f, cmd)
            want = expected_exit(comment)
            assert proc.returncode == want, (
                f"runbook '{title}': `{cmd}` exited {proc.returncode}, the runbook expects {want}\n"
                f"stdout: {proc.stdout[-3000:]}\nstderr: {proc.stderr[-3000:]}")
            ran.append(cmd)
        in_service(f)
    assert len(ran) >= 40  # every block ran (a parse that finds nothing must not pass)

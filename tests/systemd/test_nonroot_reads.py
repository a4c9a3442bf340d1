"""Found by an attack (issue 15 follow-up F7): the read commands as a user who may not read the ledger (``nobody``,
with setpriv, under a real systemd) said nothing was wrong. Now `status` and `lane show` mark the dispatch state
unknown with why and exit 6 (a lane lanectl drained cannot be told apart from an active one), `top --once` says
the ledger cannot be read (not "does not exist") and exits 6, also for a mistyped --ledger, and `validate` no
longer claims a running lane's own port is held by "another process" when this user cannot see who holds it."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.systemd.lanehelpers import LANECTL, Fleet
from tests.systemd.test_governance import boot

pytestmark = pytest.mark.systemd
NOBODY = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups"]
NR_CONFIG = "/etc/lanectl-nonroot"


def as_nobody(f: Fleet, *args: str):  # type: ignore[no-untyped-def]
    return f.sb.exec([*NOBODY, LANECTL, *args], check=False)


def readable_config(f: Fleet) -> None:
    """The test's configuration where nobody may read it (pytest's tmp_path is 0700): the same files."""
    f.write_file(f"{NR_CONFIG}/lanectl.toml", (f.config_dir / "lanectl.toml").read_text())
    for p in sorted((f.config_dir / "lanes.d").glob("*.toml")):
        f.write_file(f"{NR_CONFIG}/lanes.d/{p.name}", p.read_text())


def test_read_commands_as_a_user_who_may_not_read_the_ledger_say_so(fresh_sandbox, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    f = boot(fresh_sandbox, tmp_path)
    readable_config(f)
    assert f.sb.exec([*NOBODY, "test", "-r", f.ledger], check=False).returncode != 0  # the premise
    code, doc = f.json("status")
    assert code == 0 and not doc["errors"], doc  # root sees everything: ok

    proc = as_nobody(f, "status", "--json")
    doc = json.loads(proc.stdout)
    assert proc.returncode == 6 and doc["status"] == "partial" and doc["data"]["ok"] is False, doc
    (warn,) = doc["errors"]
    assert warn["code"] == "ledger_unreadable" and warn["severity"] == "warning" and "root" in warn["hint"], warn
    assert all(ln["dispatch"] == "unknown" and ln["dispatch_error"] for ln in doc["data"]["lanes"]), doc
    assert all("permission denied" in ln["dispatch_error"] and "does not exist" not in ln["dispatch_error"]
               for ln in doc["data"]["lanes"]), doc  # not reported as missing (attack on issue 11, F2)
    proc = as_nobody(f, "status")
    assert proc.returncode == 6 and "ledger unreadable" in proc.stdout and "dispatch state unknown" in proc.stderr, \
        proc.stdout + proc.stderr
    assert "does not exist" not in proc.stdout + proc.stderr, proc.stdout + proc.stderr
    proc = as_nobody(f, "probe")
    assert proc.returncode == 3 and "does not exist" not in proc.stdout and "permission denied" in proc.stdout, \
        proc.stdout + proc.stderr

    proc = as_nobody(f, "lane", "show", "alpha", "-c", NR_CONFIG, "--json")
    doc = json.loads(proc.stdout)
    assert proc.returncode == 6 and doc["data"]["dispatch"] == "unknown" and doc["data"]["dispatch_error"], doc
    assert [e["code"] for e in doc["errors"]] == ["ledger_unreadable"], doc

    proc = as_nobody(f, "top", "--once")
    assert proc.returncode == 6, proc.stdout + proc.stderr
    assert "cannot be read by this user" in proc.stderr and "does not exist" not in proc.stdout + proc.stderr, \
        proc.stdout + proc.stderr
    proc = f.sb.exec([LANECTL, "top", "--once", "--ledger", "/var/lib/lanectl/ledgr.db"], check=False)
    assert proc.returncode == 6 and "ledgr.db does not exist" in proc.stderr, proc.stdout + proc.stderr
    proc = f.sb.exec([LANECTL, "top", "--once"], check=False)
    assert proc.returncode == 0 and "alpha" in proc.stdout, proc.stdout + proc.stderr

    # every lane runs and holds its own port: as root, no warning; as nobody, no claim of "another process"
    code, doc = f.json("validate")
    assert code == 0 and not [e for e in doc["errors"] if e["code"] == "port_taken"], doc
    proc = as_nobody(f, "validate", "-c", NR_CONFIG, "--json")
    doc = json.loads(proc.stdout)
    taken = [e for e in doc["errors"] if e["code"] == "port_taken"]
    assert proc.returncode == 0 and taken, doc  # nobody cannot see who holds them: it says they are taken ...
    assert all("another process" not in e["hint"] and "cannot see which process" in e["hint"] for e in taken), taken

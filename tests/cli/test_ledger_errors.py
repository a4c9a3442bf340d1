"""Issue 10, finding 9: a ledger that cannot be used says why, with its own code, the file and the fix, and a
documented exit code; never "busy, retry" and never a traceback.

Each condition is real: a user without access (the CLI run as ``nobody`` with setpriv), a read-only bind mount
and a full tmpfs (each in a private mount namespace, ``unshare -m``, gone when the command exits) and a file with
garbage in it. The CLI is the installed one (scripts/setup), run as a process.
"""
from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from lanectl.errors import ExitCode
from tests.conftest import LANECTL_BIN

pytestmark = pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("setpriv") or not shutil.which("unshare"),
                                reason="needs root, setpriv and unshare")
SUBMIT = ["submit", "--class", "interactive", "--payload", '{"argv": ["true"]}']


@pytest.fixture
def box() -> Iterator[Path]:
    """A fleet and a ledger under a directory other users may traverse (pytest's tmp_path is 0700)."""
    base = Path(tempfile.mkdtemp(prefix="lanectl-ledger-errors-"))
    try:
        base.chmod(0o755)
        etc = base / "etc"
        (etc / "lanes.d").mkdir(parents=True)
        (etc / "lanes.d" / "alpha.toml").write_text('port = 9001\nworkspace = "/var/lib/lanes/alpha"\n')
        (etc / "lanectl.toml").write_text("")
        for p in (etc, etc / "lanes.d"):
            p.chmod(0o755)
        (etc / "lanes.d" / "alpha.toml").chmod(0o644)
        (etc / "lanectl.toml").chmod(0o644)
        assert lanectl(base, "ledger", "init")[0] == 0  # creates state/ (0750) and ledger.db (0640), owned by root
        assert lanectl(base, *SUBMIT)[0] == 0
        yield base
    finally:
        shutil.rmtree(base)


def lanectl(base: Path, *args: str, user: str | None = None, wrap: str | None = None,
            json_out: bool = True) -> tuple[int, dict | None, str]:
    """Run the CLI (as ``user``; or inside ``unshare -m sh -c WRAP`` where "$@" is the command)."""
    cmd = [LANECTL_BIN, *args, "--config", str(base / "etc"), "--ledger", str(base / "state" / "ledger.db")]
    if json_out:
        cmd.append("--json")
    if user:
        cmd = ["setpriv", f"--reuid={user}", f"--regid={user if user != 'nobody' else 'nogroup'}",
               "--clear-groups", *cmd]
    if wrap:
        cmd = ["unshare", "-m", "--propagation", "private", "sh", "-ec", wrap, "sh", *cmd]
    env = {k: v for k, v in os.environ.items() if k not in ("LANECTL_LEDGER", "LANECTL_CONFIG_DIR")}
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=env, cwd="/")
    assert "Traceback" not in res.stderr, res.stderr
    doc = json.loads(res.stdout) if json_out and res.stdout.strip() else None
    return res.returncode, doc, res.stderr


def missions(base: Path) -> int:
    conn = sqlite3.connect(f"file:{base / 'state' / 'ledger.db'}?mode=ro", uri=True)
    try:
        return conn.execute("SELECT count(*) FROM missions").fetchone()[0]
    finally:
        conn.close()


def error_of(doc: dict | None) -> dict:
    assert doc is not None and doc["errors"], doc
    return doc["errors"][0]


@pytest.mark.parametrize("verb", [SUBMIT, ["drain", "alpha"]])
def test_a_user_who_cannot_read_the_ledger_is_told_to_run_as_root_or_its_owner(box: Path, verb: list[str]) -> None:
    code, doc, _ = lanectl(box, *verb, user="nobody")
    err = error_of(doc)
    assert code == ExitCode.UNAVAILABLE == doc["exit_code"]  # the access the command needs: root (issue 15)
    assert err["code"] == "ledger_permission"
    assert str(box / "state" / "ledger.db") in err["message"]
    assert "as root or as the ledger's owner (root)" in err["hint"]
    code, _, stderr = lanectl(box, *verb, user="nobody", json_out=False)  # the human form: no traceback either
    assert code == ExitCode.UNAVAILABLE and "error:" in stderr and "ledger's owner" in stderr
    assert missions(box) == 1


def test_a_ledger_this_user_cannot_write_is_read_only_not_busy(box: Path) -> None:
    (box / "state").chmod(0o755)
    (box / "state" / "ledger.db").chmod(0o644)
    code, doc, _ = lanectl(box, *SUBMIT, user="nobody")
    err = error_of(doc)
    assert code == ExitCode.UNAVAILABLE
    assert err["code"] == "ledger_readonly" and "not writable by this user" in err["message"]
    assert "ledger's owner" in err["hint"]
    assert missions(box) == 1


def test_a_read_only_mount_is_named(box: Path) -> None:
    state = box / "state"
    code, doc, _ = lanectl(box, *SUBMIT, wrap=f'mount --bind {state} {state}; '
                                              f'mount -o remount,bind,ro {state}; exec "$@"')
    err = error_of(doc)
    assert code == ExitCode.CONFIG
    assert err["code"] == "ledger_readonly" and "read-only file system" in err["message"]
    assert "remount it read-write" in err["hint"]
    assert missions(box) == 1


def test_a_full_disk_is_full_not_busy(box: Path) -> None:
    """The ledger on a 4 MiB tmpfs filled to the last block: the next submit fails as ledger_full (exit 6) and
    writes nothing; after space is freed the same command works."""
    state = box / "state"
    script = (f'mount -t tmpfs -o size=4m,mode=0750 tmpfs {state}.full\n'
              f'cp -a {state}/. {state}.full/\n'
              f'mount --bind {state}.full {state}\n'
              f'dd if=/dev/zero of={state}/filler bs=4k 2>/dev/null || true\n'
              '"$@" > {out}/full.json || echo $? > {out}/full.rc\n'
              f'rm {state}/filler\n'
              '"$@" > {out}/after.json\n')
    out = box / "out"
    out.mkdir()
    (Path(str(state) + ".full")).mkdir()
    payload = json.dumps({"argv": ["true"], "pad": "x" * 100_000})
    lanectl(box, "submit", "--payload", payload, wrap=script.replace("{out}", str(out)))
    full = json.loads((out / "full.json").read_text())
    assert int((out / "full.rc").read_text()) == ExitCode.UNAVAILABLE == full["exit_code"]
    err = error_of(full)
    assert err["code"] == "ledger_full" and str(state / "ledger.db") in err["message"]
    assert "free space" in err["hint"]
    after = json.loads((out / "after.json").read_text())
    assert after["exit_code"] == 0 and after["data"]["id"] == 2  # the refused submit left nothing, not even its id
    assert missions(box) == 1  # the tmpfs (and what was written to it) is gone with the namespace


def test_a_corrupt_ledger_is_corrupt_not_busy(box: Path) -> None:
    for i in range(30):
        assert lanectl(box, "submit", "--payload", json.dumps({"argv": ["true", str(i)]}))[0] == 0
    path = box / "state" / "ledger.db"
    page = 4096
    with path.open("r+b") as fh:  # keep page 1 (header and schema), scribble over the rest
        size = fh.seek(0, os.SEEK_END)
        fh.seek(page)
        fh.write(os.urandom(size - page))
    code, doc, _ = lanectl(box, "missions")
    err = error_of(doc)
    assert code == ExitCode.CONFIG
    assert err["code"] == "ledger_corrupt" and str(path) in err["message"]
    code, doc, _ = lanectl(box, *SUBMIT)
    assert code == ExitCode.CONFIG and error_of(doc)["code"] == "ledger_corrupt"


def test_a_command_that_writes_files_this_user_may_not_says_so_without_a_traceback(box: Path) -> None:
    """Found by attacking issue 10's fixes: `lane add` (and `snapshot`, `install`) as another user died in a
    PermissionError traceback. Now: permission_denied, exit 6, naming the path and the fix."""
    cmd = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", LANECTL_BIN, "lane", "add", "zeta",
           "--config", str(box / "etc"), "--json"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=60, cwd="/")
    assert "Traceback" not in res.stderr, res.stderr
    err = error_of(json.loads(res.stdout))
    assert res.returncode == ExitCode.UNAVAILABLE and err["code"] == "permission_denied", res.stdout
    assert str(box / "etc" / "lanes.d") in err["message"] and "root" in err["hint"]
    assert not (box / "etc" / "lanes.d" / "zeta.toml").exists()

"""One supervisor per ledger and per callback socket (issue 15 follow-up F1), and no ledger created by ``supervise
--ledger TYPO`` (F2): real :class:`Supervisor` objects and the real CLI in a subprocess, on temporary ledgers.

A second supervisor used to unlink the running one's socket, bind its own and unlink that on exit; now it is refused
before it reads or writes anything (``supervisor_running``, exit 5), a live socket is never removed, and ``close()``
removes only the socket it bound itself. The systemd side is in tests/systemd/test_fixop.py.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from lanectl import config, exclusive
from lanectl.errors import ExitCode, LanectlError
from lanectl.supervisor import Supervisor


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def etc(tmp_path: Path) -> Path:
    etc, state, ws = tmp_path / "etc", tmp_path / "state", tmp_path / "alpha"
    (etc / "lanes.d").mkdir(parents=True)
    state.mkdir()
    ws.mkdir()
    (etc / "lanectl.toml").write_text(f'state_dir = "{state}"\nledger = "{state}/ledger.db"\n'
                                      f'[supervisor]\nport = {free_port()}\n')
    (etc / "lanes.d" / "alpha.toml").write_text(f'port = 9001\nworkspace = "{ws}"\n')
    return etc


def make(etc: Path, ledger: Path, sock: Path, create: bool = True) -> Supervisor:
    return Supervisor(config.load(etc), ledger, use_systemd=False, notifier=None, callback_socket=str(sock),
                      lane_uids={"alpha": os.getuid()}, create=create)


@pytest.fixture
def first(etc: Path, tmp_path: Path) -> Iterator[Supervisor]:
    sup = make(etc, tmp_path / "state" / "ledger.db", tmp_path / "cb.sock")
    sup.open()
    yield sup
    sup.close()


def accepts(path: Path) -> bool:
    return exclusive.listening(path)


def refused(sup: Supervisor) -> LanectlError:
    with pytest.raises(LanectlError) as info:
        sup.open()
    assert sup.ledger is None and sup.unix_server is None and sup.locks == []  # read nothing, bound nothing
    return info.value


def test_a_second_supervisor_on_the_same_ledger_and_socket_is_refused(first: Supervisor, etc: Path,
                                                                        tmp_path: Path) -> None:
    ino = os.lstat(first.socket_path).st_ino
    err = refused(make(etc, first.ledger_path, first.socket_path))
    assert err.code == "supervisor_running" and err.exit_code == ExitCode.CONFLICT
    assert f"pid {os.getpid()}" in err.message and str(first.ledger_path) in err.message
    assert "systemctl status lanectl-supervisor" in (err.hint or "")
    # the running one keeps its socket, and it still answers
    assert os.lstat(first.socket_path).st_ino == ino and accepts(first.socket_path)


def test_another_ledger_on_the_same_socket_is_refused(first: Supervisor, etc: Path, tmp_path: Path) -> None:
    other = tmp_path / "other" / "ledger.db"
    err = refused(make(etc, other, first.socket_path))
    assert err.code == "supervisor_running" and str(first.socket_path) in err.message
    assert accepts(first.socket_path)


def test_the_same_ledger_on_another_socket_is_refused(first: Supervisor, etc: Path, tmp_path: Path) -> None:
    err = refused(make(etc, first.ledger_path, tmp_path / "cb2.sock"))
    assert err.code == "supervisor_running"
    assert not (tmp_path / "cb2.sock").exists()


def test_a_live_socket_is_never_unlinked_even_without_a_lock(etc: Path, tmp_path: Path) -> None:
    """A process listening on the path (say an older lanectl that takes no lock) keeps it."""
    sock = tmp_path / "cb.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as live:
        live.bind(str(sock))
        live.listen(1)
        err = refused(make(etc, tmp_path / "state" / "ledger.db", sock))
        assert err.code == "supervisor_running" and "listens" in err.message
        assert accepts(sock)


def test_a_stale_socket_is_replaced_and_the_lock_dies_with_close(etc: Path, tmp_path: Path) -> None:
    sock = tmp_path / "cb.sock"
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(str(sock))
    dead.close()  # left behind by a crashed run: nobody listens
    sup = make(etc, tmp_path / "state" / "ledger.db", sock)
    sup.open()
    assert accepts(sock)
    sup.close()
    assert not sock.exists() and sup.locks == []
    again = make(etc, tmp_path / "state" / "ledger.db", sock)  # the locks went with close()
    again.open()
    again.close()


def test_close_removes_only_the_socket_it_bound(etc: Path, tmp_path: Path) -> None:
    """A supervisor stopping must not take away a socket another process put at the path since."""
    sup = make(etc, tmp_path / "state" / "ledger.db", tmp_path / "cb.sock")
    sup.open()
    os.unlink(sup.socket_path)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as newer:
        newer.bind(str(sup.socket_path))
        newer.listen(1)
        sup.close()
        assert accepts(sup.socket_path)


def lanectl(*args: str) -> tuple[int, dict]:
    res = subprocess.run([sys.executable, "-m", "lanectl", *args, "--json"], capture_output=True, text=True,
                         timeout=120, env={k: v for k, v in os.environ.items() if k != "LANECTL_LEDGER"})
    return res.returncode, json.loads(res.stdout)


def test_cli_supervise_refused_while_one_runs(first: Supervisor, etc: Path) -> None:
    assert first.ledger is not None
    events = first.ledger.conn.execute("SELECT count(*), max(id) FROM events").fetchone()
    code, doc = lanectl("supervise", "--config", str(etc))
    assert code == ExitCode.CONFLICT
    err = doc["errors"][0]
    assert err["code"] == "supervisor_running" and f"pid {os.getpid()}" in err["message"]
    assert first.ledger.conn.execute("SELECT count(*), max(id) FROM events").fetchone() == events  # wrote nothing
    lock = exclusive.ledger_lock_path(first.ledger_path)
    assert lock.read_text().strip() == str(os.getpid())  # still ours
    assert accepts(first.socket_path)


def test_cli_supervise_with_a_ledger_that_does_not_exist_creates_nothing(etc: Path, tmp_path: Path) -> None:
    typo = tmp_path / "state" / "ledgr.db"
    code, doc = lanectl("supervise", "--config", str(etc), "--ledger", str(typo))
    assert code == ExitCode.UNAVAILABLE and doc["errors"][0]["code"] == "ledger_missing"
    assert str(typo) in doc["errors"][0]["message"]
    assert sorted(p.name for p in (tmp_path / "state").iterdir()) == []  # no ledger, no lock file


def test_supervisor_create_false_refuses_a_missing_ledger(etc: Path, tmp_path: Path) -> None:
    sup = make(etc, tmp_path / "nowhere" / "ledger.db", tmp_path / "cb.sock", create=False)
    err = refused(sup)
    assert err.code == "ledger_missing" and not (tmp_path / "nowhere").exists()

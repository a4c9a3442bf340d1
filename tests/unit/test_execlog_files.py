"""A lane's execution log (issue 10, findings 2 and 3): its missions can put anything in the workspace, so the
reader never follows a link, never blocks, reads a bounded tail, wants a regular file of the lane's uid and keeps only
lines whose MAC verifies; the runtime writes its own log the same way. Real files, FIFOs and links; no mocks."""
from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lanectl.config import Lane, LaneSet, Settings
from lanectl.dispatch import Assignment
from lanectl.ledger import Ledger
from lanectl.ledger import missions as ms
from lanectl.protocol import (MAX_LOG_TAIL, LogScan, log_entry_authentic, log_key, scan_execution_log,
                              sign_log_entry)
from lanectl.notify import Notifier
from lanectl.runtime import LaneInfo, LaneRuntime, append_own_log
from lanectl.supervisor import LaneWatch, Supervisor

KEY = "k" * 64
LKEY = log_key(KEY, "alpha")
ME = os.geteuid()
OTHER_UID = 54321


def entry(mission: int = 1, attempt: int = 1, **over: Any) -> dict[str, Any]:
    e = {"event": "end", "mission": mission, "attempt": attempt, "lane": "alpha", "invocation": "inv1",
         "outcome": "succeeded", "exit_code": 0, "error": None, "at": 1.5}
    e.update(over)
    return e


def workspace(tmp_path: Path) -> Path:
    ws = tmp_path / "ws"
    (ws / ".lanectl").mkdir(parents=True)
    return ws


def write_log(ws: Path, *lines: bytes) -> None:
    with open(ws / ".lanectl" / "executions.log", "ab") as fh:
        for line in lines:
            fh.write(line)


def scan_bounded(ws: Path, **kw: Any) -> LogScan:
    """The scan in a thread, waited on with a bound: a reader that blocks fails the test instead of hanging it."""
    out: list[LogScan] = []
    th = threading.Thread(target=lambda: out.append(scan_execution_log(ws, owner=kw.pop("owner", ME), **kw)),
                          daemon=True)
    th.start()
    th.join(20)
    assert not th.is_alive(), "the reader blocked"
    return out[0]


# ---------------------------------------------------------------------------------------------------- reader
def test_signed_lines_round_trip_and_forged_ones_are_ignored(tmp_path: Path) -> None:
    ws = workspace(tmp_path)
    good = entry(1, error="exit code 3 \u2603 \U0001f600", outcome="failed", exit_code=3)
    forged_no_mac = json.dumps(entry(2)).encode() + b"\n"
    forged_bad_mac = json.dumps({**entry(3), "mac": "0" * 64}).encode() + b"\n"
    other_lane_key = sign_log_entry(entry(4), log_key(KEY, "beta"))
    other_dispatch_key = sign_log_entry(entry(5), log_key("x" * 64, "alpha"))
    # a genuine MAC moved onto another mission's line, or the genuine line with its outcome changed
    genuine = json.loads(sign_log_entry(entry(6, outcome="failed", exit_code=1), LKEY))
    transplanted = json.dumps({**entry(7), "mac": genuine["mac"]}).encode() + b"\n"
    flipped = json.dumps({**genuine, "outcome": "succeeded", "exit_code": 0}).encode() + b"\n"
    write_log(ws, sign_log_entry(good, LKEY), forged_no_mac, forged_bad_mac, other_lane_key, other_dispatch_key,
              transplanted, flipped, sign_log_entry(entry(8), LKEY))
    scan = scan_bounded(ws, key=LKEY)
    assert [e["mission"] for e in scan.entries] == [1, 8]
    assert scan.entries[0]["error"] == good["error"]
    assert scan.unauthentic == 6 and scan.refused is None
    # without a key (tools that trust the workspace) every well-formed line is returned
    assert len(scan_bounded(ws).entries) == 8


def test_a_fifo_is_refused_without_blocking(tmp_path: Path) -> None:
    ws = workspace(tmp_path)
    os.mkfifo(ws / ".lanectl" / "executions.log")
    scan = scan_bounded(ws, key=LKEY)
    assert scan.entries == [] and "not a regular file" in (scan.refused or "")


def test_a_link_to_dev_zero_is_not_followed(tmp_path: Path) -> None:
    ws = workspace(tmp_path)
    os.symlink("/dev/zero", ws / ".lanectl" / "executions.log")
    scan = scan_bounded(ws, key=LKEY)
    assert scan.entries == [] and "symbolic link" in (scan.refused or "")


def test_a_link_to_a_real_log_is_not_followed(tmp_path: Path) -> None:
    ws = workspace(tmp_path)
    elsewhere = tmp_path / "elsewhere.log"
    elsewhere.write_bytes(sign_log_entry(entry(1), LKEY))
    os.symlink(elsewhere, ws / ".lanectl" / "executions.log")
    scan = scan_bounded(ws, key=LKEY)
    assert scan.entries == [] and "symbolic link" in (scan.refused or "")


def test_a_linked_state_directory_is_not_followed(tmp_path: Path) -> None:
    ws = tmp_path / "ws"
    ws.mkdir()
    real = tmp_path / "real"
    real.mkdir()
    (real / "executions.log").write_bytes(sign_log_entry(entry(1), LKEY))
    os.symlink(real, ws / ".lanectl")
    scan = scan_bounded(ws, key=LKEY)
    assert scan.entries == [] and scan.refused == ".lanectl is a symbolic link"


@pytest.mark.parametrize("what", ["file", "dir"])
def test_files_of_another_owner_are_refused(tmp_path: Path, what: str) -> None:
    if ME != 0:
        pytest.skip("needs root to chown")
    ws = workspace(tmp_path)
    write_log(ws, sign_log_entry(entry(1), LKEY))
    os.chown(ws / ".lanectl" / ("executions.log" if what == "file" else ""), OTHER_UID, OTHER_UID)
    scan = scan_bounded(ws, key=LKEY)
    assert scan.entries == [] and f"uid {OTHER_UID}" in (scan.refused or "")


def test_a_directory_or_nothing_at_the_log(tmp_path: Path) -> None:
    ws = workspace(tmp_path)
    assert scan_bounded(ws, key=LKEY) == LogScan([])
    (ws / ".lanectl" / "executions.log").mkdir()
    assert scan_bounded(ws, key=LKEY).refused
    assert scan_bounded(tmp_path / "nowhere", key=LKEY) == LogScan([])  # no workspace: nothing read or raised


def test_only_a_bounded_tail_is_read(tmp_path: Path) -> None:
    ws = workspace(tmp_path)
    line = sign_log_entry(entry(1), LKEY)
    n = (3 * MAX_LOG_TAIL) // len(line)
    write_log(ws, line * n, sign_log_entry(entry(2), LKEY))
    # a sparse file of 64 GiB: only its tail is touched
    with open(ws / ".lanectl" / "executions.log", "r+b") as fh:
        fh.seek(64 << 30)
        fh.write(b"\n" + sign_log_entry(entry(3), LKEY))
    scan = scan_bounded(ws, key=LKEY)
    assert [e["mission"] for e in scan.entries] == [3]
    os.truncate(ws / ".lanectl" / "executions.log", len(line) * n + len(sign_log_entry(entry(2), LKEY)))
    scan = scan_bounded(ws, key=LKEY)
    assert scan.entries[-1]["mission"] == 2
    assert len(scan.entries) <= MAX_LOG_TAIL // len(line) + 1 and scan.malformed == 0  # the cut line is dropped


def test_hostile_lines_never_raise(tmp_path: Path) -> None:
    ws = workspace(tmp_path)
    write_log(ws, b"[" * 100_000 + b"\n", b'{"mission": true, "attempt": 1}\n', b'{"mission": 1, "attempt": 1.0}\n',
              b'{"mission": 1, "attempt": 1, "mac": ["x"]}\n', b'{"mission": 1, "attempt": 1, "at": NaN, "mac": "'
              + b"0" * 64 + b'"}\n', b"\xff\xfe\n", b'{"mission": 1, "attempt": 1, "mac": "\\u00e9' + b"0" * 63
              + b'"}\n', sign_log_entry(entry(9), LKEY))
    scan = scan_bounded(ws, key=LKEY)
    assert [e["mission"] for e in scan.entries] == [9]


json_scalars = st.one_of(st.none(), st.booleans(), st.integers(-(2**63), 2**63), st.text(max_size=30),
                         st.floats(allow_nan=False, allow_infinity=False))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(parts=st.lists(st.one_of(
    st.builds(lambda m, a, extra: ("good", {**entry(m, a), **extra}), st.integers(1, 2**40), st.integers(1, 50),
              st.dictionaries(st.text(min_size=1, max_size=8).filter(lambda k: k != "mac"), json_scalars, max_size=3)),
    st.binary(max_size=200).filter(lambda b: b"\n" not in b).map(lambda b: ("junk", b)),
    st.builds(lambda m, a: ("forged", {**entry(m, a), "mac": "ab" * 32}), st.integers(1, 50), st.integers(1, 50)),
), max_size=12))
def test_fuzz_reader_keeps_exactly_the_authentic_lines(tmp_path: Path, parts: list[tuple[str, Any]]) -> None:
    ws = tmp_path / f"ws{time.monotonic_ns()}"
    (ws / ".lanectl").mkdir(parents=True)
    raw = b""
    want = []
    for kind, value in parts:
        if kind == "good":
            raw += sign_log_entry(value, LKEY)
            want.append(value)
        elif kind == "forged":
            raw += json.dumps(value).encode() + b"\n"
        else:
            raw += value + b"\n"
    (ws / ".lanectl" / "executions.log").write_bytes(raw)
    scan = scan_execution_log(ws, owner=ME, key=LKEY)
    assert [{k: v for k, v in e.items() if k != "mac"} for e in scan.entries] == want
    assert all(log_entry_authentic(e, LKEY) for e in scan.entries)


# ---------------------------------------------------------------------------------------------------- writer
def appended(ws: Path, line: bytes) -> None:
    th = threading.Thread(target=append_own_log, args=(ws, line), daemon=True)
    th.start()
    th.join(20)
    assert not th.is_alive(), "the runtime's log write blocked"


def moved_aside(ws: Path, name: str) -> list[Path]:
    return sorted(p for p in (ws if name == ".lanectl" else ws / ".lanectl").iterdir()
                  if p.name.startswith(name + ".refused-"))


def test_runtime_moves_a_fifo_aside_and_keeps_logging(tmp_path: Path) -> None:
    ws = workspace(tmp_path)
    os.mkfifo(ws / ".lanectl" / "executions.log")
    appended(ws, sign_log_entry(entry(1), LKEY))
    assert len(moved_aside(ws, "executions.log")) == 1
    assert [e["mission"] for e in scan_bounded(ws, key=LKEY).entries] == [1]


def test_runtime_does_not_write_through_links(tmp_path: Path) -> None:
    ws = workspace(tmp_path)
    target = tmp_path / "victim"
    target.write_text("untouched\n")
    os.symlink(target, ws / ".lanectl" / "executions.log")
    appended(ws, sign_log_entry(entry(1), LKEY))
    assert target.read_text() == "untouched\n" and len(moved_aside(ws, "executions.log")) == 1
    # a linked state directory is moved aside as well, and a real one made
    other = tmp_path / "other"
    other.mkdir()
    os.rename(ws / ".lanectl", tmp_path / "old-state")
    os.symlink(other, ws / ".lanectl")
    appended(ws, sign_log_entry(entry(2), LKEY))
    assert list(other.iterdir()) == [] and len(moved_aside(ws, ".lanectl")) == 1
    assert not (ws / ".lanectl").is_symlink() and [e["mission"] for e in scan_bounded(ws, key=LKEY).entries] == [2]


def test_runtime_refuses_a_log_of_another_owner(tmp_path: Path) -> None:
    if ME != 0:
        pytest.skip("needs root to chown")
    ws = workspace(tmp_path)
    write_log(ws, b"planted\n")
    os.chown(ws / ".lanectl" / "executions.log", OTHER_UID, OTHER_UID)
    appended(ws, sign_log_entry(entry(1), LKEY))
    assert len(moved_aside(ws, "executions.log")) == 1
    assert os.stat(ws / ".lanectl" / "executions.log").st_uid == ME


# ---------------------------------------------------------------------------------------------------- supervisor
def test_supervisor_settles_authentic_ends_only(tmp_path: Path) -> None:
    ws = tmp_path / "lanes" / "alpha"
    ws.mkdir(parents=True)
    fleet = LaneSet({"alpha": Lane(port=9001, workspace=str(ws), capacity=4)}, Settings(), tmp_path,
                    tmp_path / "lanes.d")
    led = Ledger.open(tmp_path / "state" / "ledger.db")
    sup = Supervisor(fleet, led.path, use_systemd=False, notifier=None)
    try:
        sup.ledger = led
        w = sup.lanes["alpha"] = LaneWatch("alpha", "lanectl-lane@alpha.service", 9001, KEY, "/healthz", 5, True)
        sup.users.uids["alpha"] = ME
        now = time.time()
        ids = [ms.submit(led, fleet, cls="background", payload={}, now=now, lane="alpha").mission.id
               for _ in range(4)]
        ms.assign(led, [Assignment(m, "alpha", "background") for m in ids], now=now, lease_sec=600)
        rt = LaneRuntime(LaneInfo("alpha", 9001, str(ws), "alpha", 4, dispatch_key=KEY, invocation="inv1"),
                         Notifier())
        rt.journal(event="end", mission=ids[0], attempt=1, outcome="succeeded", exit_code=0, error=None)
        rt.journal(event="end", mission=ids[1], attempt=1, outcome="failed", exit_code=2, error="exit code 2")
        # what a mission of the lane can write: unsigned lines, or a genuine line's MAC on another mission
        genuine = json.loads((ws / ".lanectl" / "executions.log").read_text().splitlines()[0])
        write_log(ws, json.dumps({**genuine, "mission": ids[2]}).encode() + b"\n",
                  json.dumps({**entry(ids[3], invocation="inv1"), "outcome": "failed"}).encode() + b"\n")
        assert sorted(sup.watch.settle_from_log(w, "inv1", now)) == ids[:2]
        got = dict(led.conn.execute(f"SELECT id, state FROM missions WHERE id IN ({','.join('?' * 4)})", ids))
        assert got == {ids[0]: "succeeded", ids[1]: "failed", ids[2]: "dispatched", ids[3]: "dispatched"}
    finally:
        sup.dispatcher.pool.shutdown()
        led.close()

"""``lanectl mission logs ID``: a mission's stored output, read from its lane's workspace (issue 15 item 8, part).

The CLI runs as root and the workspace is the lane's: anything in it may be a trap (a link to /etc/shadow or
/dev/zero, a FIFO, a file of another owner, a file grown far beyond the cap). So the file is reached the way the
supervisor reads execution logs (``protocol.open_state_dir``): every component opened relative to the one before,
``O_NOFOLLOW`` and ``O_NONBLOCK``, each a directory (or, last, a regular file) owned by the lane's uid, and at most
``limit`` bytes are read (the lane's ``[output] max_bytes`` plus room for lanectl's notes, unless asked).
"""
from __future__ import annotations

import errno
import os
import pwd
import stat
from typing import Any

from lanectl.config import LaneSet, size_bytes
from lanectl.errors import LanectlError, NotFound, Unavailable
from lanectl.ledger import Ledger
from lanectl.ledger import missions as ms
from lanectl.protocol import STATE_DIR_NAME, LogRefused, open_state_dir

OUT_DIR = "out"
NOTES = 4096
"""Room above ``max_bytes`` for lanectl's lines in a stored output (what was cut, an error)."""
_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
_FILE = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC


def _owned(fd: int, kind: int, what: str, owner: int) -> os.stat_result:
    st = os.fstat(fd)
    if stat.S_IFMT(st.st_mode) != kind:
        raise LogRefused(f"{what} is not a {'directory' if kind == stat.S_IFDIR else 'regular file'}")
    if st.st_uid != owner:
        raise LogRefused(f"{what} is owned by uid {st.st_uid}, not the lane's uid {owner}")
    return st


def read_output(workspace: str, name: str, owner: int, limit: int) -> tuple[bytes, int]:
    """(the first ``limit`` bytes of ``WORKSPACE/.lanectl/out/NAME``, its size); LogRefused for anything that is
    not the lane's own directory or regular file at each step, FileNotFoundError when it is not there."""
    sd = open_state_dir(workspace, owner)
    try:
        try:
            od = os.open(OUT_DIR, _DIR, dir_fd=sd)
        except OSError as exc:
            if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                raise LogRefused(f"{STATE_DIR_NAME}/{OUT_DIR} is not a directory (a link?)") from None
            raise
    finally:
        os.close(sd)
    try:
        _owned(od, stat.S_IFDIR, f"{STATE_DIR_NAME}/{OUT_DIR}", owner)
        try:
            fd = os.open(name, _FILE, dir_fd=od)
        except OSError as exc:
            if exc.errno in (errno.ELOOP, errno.ENXIO, errno.EISDIR, errno.EWOULDBLOCK, errno.ENODEV):
                raise LogRefused(f"{name} cannot be read safely ({os.strerror(exc.errno)}: a link, a FIFO "
                                 "or a device?)") from None
            raise
    finally:
        os.close(od)
    try:
        st = _owned(fd, stat.S_IFREG, name, owner)
        chunks, got = [], 0
        while got < limit:
            b = os.pread(fd, min(1 << 20, limit - got), got)
            if not b:
                break
            chunks.append(b)
            got += len(b)
        return b"".join(chunks), st.st_size
    finally:
        os.close(fd)


def mission_output(fleet: LaneSet, led: Ledger, mission_id: int, *, attempt: int | None = None,
                   limit: int | None = None) -> dict[str, Any]:
    """The stored output of a mission's attempt (default: its latest), with where it is. Errors: no such mission or
    attempt, lane or user gone (not_found, 4); the file is not the lane's own (output_refused, 5); cannot read
    (output_unavailable, 6)."""
    m = ms.get(led, mission_id)
    rows = ms.attempts_of(led, mission_id)
    if not rows:
        raise NotFound(f"mission {mission_id} has not run yet (state {m.state}): it has no output",
                       f"wait for it: lanectl mission show {mission_id} --wait", "no_output")
    row = rows[-1] if attempt is None else next((r for r in rows if r["n"] == attempt), None)
    if row is None:
        raise NotFound(f"mission {mission_id} has no attempt {attempt} (it has {len(rows)})",
                       f"pick one of 1..{len(rows)}", "attempt_not_found")
    lane_name = row["lane"]
    lane = fleet.lanes.get(lane_name)
    if lane is None:
        raise NotFound(f"attempt {row['n']} of mission {mission_id} ran on lane {lane_name!r}, which is no longer "
                       "configured", "its workspace is where its lane file said", "lane_not_found")
    user = lane.resolved_user(lane_name)
    try:
        owner = pwd.getpwnam(user).pw_uid
    except KeyError:
        raise NotFound(f"lane {lane_name}'s user {user} does not exist", "run lanectl install",
                       "user_not_found") from None
    name = f"{mission_id}-{row['n']}.log"
    path = os.path.join(lane.workspace, STATE_DIR_NAME, OUT_DIR, name)
    cap = size_bytes(lane.output.max_bytes) + NOTES if limit is None else limit
    where = {"mission": mission_id, "attempt": row["n"], "lane": lane_name, "path": path, "state": m.state}
    try:
        data, size = read_output(lane.workspace, name, owner, cap)
    except FileNotFoundError:
        raise NotFound(f"{path}: no stored output for attempt {row['n']} of mission {mission_id}",
                       "it was deleted to keep out/ within [output] keep_bytes/keep_files, or the attempt never "
                       "started", "output_not_found") from None
    except LogRefused as exc:
        raise LanectlError(f"{path}: refused to read it: {exc}", "something in the lane's workspace replaced its "
                           "output; look at it as the lane's user", "output_refused", exit_code=5) from None
    except OSError as exc:
        raise Unavailable(f"{path}: cannot read it: {exc.strerror or exc}", "check the lane's workspace",
                          "output_unavailable") from None
    return {**where, "bytes": size, "shown": len(data), "truncated": size > len(data), "output": data}


_SHOWN = {9, 10}  # tab and newline pass; every other control character is shown as an escape


def visible(raw: bytes) -> bytes:
    """Output fit for a terminal: C0/C1 control characters and DEL as ``\\xNN`` / ``\\u00NN``, so an escape
    sequence a mission printed is displayed, never interpreted (invalid UTF-8 as ``\\xNN`` too)."""
    text = raw.decode("utf-8", errors="backslashreplace")
    out = []
    for ch in text:
        o = ord(ch)
        if (o < 32 and o not in _SHOWN) or o == 127:
            out.append(f"\\x{o:02x}")
        elif 0x80 <= o < 0xA0:
            out.append(f"\\u{o:04x}")
        else:
            out.append(ch)
    return "".join(out).encode()

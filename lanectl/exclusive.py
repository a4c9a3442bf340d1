"""One supervisor per ledger and per callback socket (issue 15 follow-up F1).

A second ``lanectl supervise`` used to unlink the running supervisor's callback socket, bind its own, and remove it
on exit: every lane then delivered to the intruder or to nothing, missions stayed dispatched for ever, and a restart
ran a succeeded mission again. Now the supervisor holds, for its whole life, an exclusive ``flock`` on two lock
files of their own -- ``LEDGER.supervisor.lock`` next to the ledger and ``SOCKET.lock`` next to the callback socket
-- and a second one is refused (``supervisor_running``, exit 5) naming the pid and unit of the one that runs.

The lock is never taken on the ledger file itself: closing *any* descriptor of a file drops every POSIX lock the
process holds on it, SQLite's included (docs/decisions.md). ``flock`` locks belong to the open file description, so
they die with the process (a SIGKILLed supervisor leaves no stale lock) and are not inherited across exec
(O_CLOEXEC).
"""
from __future__ import annotations

import errno
import fcntl
import os
import socket
from pathlib import Path

from lanectl.errors import Conflict, LanectlError

LOCK_SUFFIX = ".supervisor.lock"


def ledger_lock_path(ledger: Path) -> Path:
    return ledger.with_name(ledger.name + LOCK_SUFFIX)


def url_lock_path(directory: Path, url: str) -> Path:
    """The lock file of a PostgreSQL ledger (no file of its own to lock beside): named after a digest of its URL,
    in ``directory`` (the callback socket's, /run/lanectl), so two supervisors of this host on one database
    collide and the URL itself is never written anywhere."""
    import hashlib

    return directory / f"ledger-{hashlib.sha256(url.encode()).hexdigest()[:16]}{LOCK_SUFFIX}"


def socket_lock_path(sock: Path) -> Path:
    return sock.with_name(sock.name + ".lock")


def holder(pid: int | None) -> str:
    """'pid 123 (lanectl-supervisor.service)', from the pid in the lock file and its cgroup."""
    if not pid:
        return "another process"
    unit = None
    try:
        with open(f"/proc/{pid}/cgroup", encoding="utf-8") as f:
            for line in f:
                path = line.rstrip("\n").split(":", 2)[-1]
                for part in reversed(path.split("/")):
                    if part.endswith((".service", ".scope")):
                        unit = part
                        break
                if unit:
                    break
    except OSError:
        pass
    return f"pid {pid}" + (f" ({unit})" if unit else "")


def _read_pid(fd: int) -> int | None:
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
        return int(text) if text.isdigit() else None
    except OSError:
        return None


def take(path: Path, what: str) -> int:
    """Take the exclusive lock at ``path`` (created 0600, no symlink followed) and write our pid into it; returns
    the descriptor to keep open for as long as the lock is held. Held by another process: ``supervisor_running``."""
    path.parent.mkdir(mode=0o750, parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise LanectlError(f"{path}: cannot open the supervisor's lock file ({exc.strerror or exc})",
                           "check the directory's permissions (the supervisor runs as root)",
                           "supervisor_lock") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        pid = _read_pid(fd)
        os.close(fd)
        if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
            raise LanectlError(f"{path}: cannot lock ({exc.strerror or exc})", None, "supervisor_lock") from None
        raise running(f"a supervisor already runs on {what}: {holder(pid)} holds {path}") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def running(message: str) -> LanectlError:
    return Conflict(message, "one supervisor per ledger and per callback socket: lanectl-supervisor.service runs "
                    "it ('systemctl status lanectl-supervisor'); stop that one first to supervise in the "
                    "foreground", "supervisor_running")


def release(fd: int | None) -> None:
    if fd is not None:
        try:
            os.close(fd)  # drops the flock
        except OSError:
            pass


def listening(path: Path) -> bool:
    """Whether a process accepts connections on the unix socket at ``path`` (a socket left by a dead process
    refuses them)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(2.0)
        try:
            s.connect(str(path))
        except (ConnectionRefusedError, FileNotFoundError):
            return False
        except OSError as exc:
            # EAGAIN: its backlog is full -- somebody listens; anything else: do not remove what we cannot judge
            if exc.errno in (errno.EAGAIN, errno.EACCES, errno.EPERM) or isinstance(exc, TimeoutError):
                return True
            raise
        return True

"""Wake the supervisor the moment another process commits to the ledger, without polling.

In WAL mode every commit writes the ``-wal`` file, so an inotify watch on it (and on its directory, in case it is
recreated) gives a readable file descriptor per commit; the supervisor's selector waits on it. Linux only;
where inotify is unavailable the supervisor falls back to polling ``PRAGMA data_version``.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
from pathlib import Path

IN_MODIFY = 0x00000002
IN_CREATE = 0x00000100
IN_MOVED_TO = 0x00000080
IN_NONBLOCK = 0o4000
IN_CLOEXEC = 0o2000000


class CommitWatch:
    """A non-blocking fd that becomes readable when the ledger's WAL (or its directory) changes."""

    def __init__(self, ledger: Path) -> None:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        self._add = libc.inotify_add_watch
        self._add.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]
        fd = libc.inotify_init1(IN_NONBLOCK | IN_CLOEXEC)
        if fd < 0:
            raise OSError(ctypes.get_errno(), "inotify_init1 failed")
        self.fd = fd
        self.wal = Path(str(ledger) + "-wal")
        self._watch(self.wal.parent, IN_CREATE | IN_MOVED_TO)
        self._watch(self.wal, IN_MODIFY)

    def _watch(self, path: Path, mask: int) -> None:
        if self._add(self.fd, os.fsencode(path), mask) < 0:
            err = ctypes.get_errno()
            if path != self.wal.parent and err == 2:  # no WAL yet: the directory watch sees it appear
                return
            raise OSError(err, f"inotify_add_watch {path} failed")

    def drain(self) -> None:
        """Consume the pending events; re-arm the WAL watch (it may have been created since)."""
        try:
            while os.read(self.fd, 65536):
                pass
        except BlockingIOError:
            pass
        self._watch(self.wal, IN_MODIFY)

    def close(self) -> None:
        os.close(self.fd)


def commit_watch(ledger: Path) -> CommitWatch | None:
    try:
        return CommitWatch(ledger)
    except (OSError, AttributeError):
        return None

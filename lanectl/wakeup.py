"""Wake the supervisor the moment another process commits to the ledger, without polling.

SQLite: in WAL mode every commit writes the ``-wal`` file, so an inotify watch on it (and on its directory, in case
it is recreated) gives a readable file descriptor per commit; the supervisor's selector waits on it. Linux only;
where inotify is unavailable the supervisor falls back to polling ``PRAGMA data_version``.

PostgreSQL: every write transaction NOTIFYs the channel ``lanectl_ledger`` once; ``PgListener`` LISTENs on it in a
thread and wakes the supervisor's loop; polling stays the fallback.
"""
from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

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


LISTEN_ENV = "LANECTL_PG_LISTEN"
"""``LANECTL_PG_LISTEN=0``: the supervisor does not LISTEN on a PostgreSQL ledger, it polls (a pooler in
transaction mode, where LISTEN does not work; the latency benchmark's polling-only run)."""
BACKOFF_S = (0.1, 0.2, 0.5, 1.0, 2.0, 5.0)
"""Waits between attempts to (re)connect the LISTEN connection; the last one repeats."""


def listen_enabled(listen_setting: bool) -> bool:
    """``[ledger] listen`` (lanectl.toml, default true) unless ``LANECTL_PG_LISTEN`` says 0/false/no/off."""
    env = os.environ.get(LISTEN_ENV, "").strip().lower()
    if env in ("0", "false", "no", "off"):
        return False
    return listen_setting


class PgListener:
    """Wake the supervisor when another process commits to a PostgreSQL ledger: a thread with a connection of its
    own that LISTENs on ``lanectl_ledger`` (every write transaction NOTIFYs it once, at COMMIT:
    ``lanectl.ledger.pg.NOTIFY_COMMIT``) and calls ``wake`` for each notification whose sender is not
    ``own_pid()`` (the supervisor's own ledger connection: its commits need no wake-up).

    Notifications are a shortcut, never the only way: the loop still looks (``data_version``) at least every
    ``IDLE_MAX_S`` while ``connected`` and every ``POLL_S`` while not, so a notification lost (a pooler in
    transaction mode, a dropped connection) costs latency, not correctness. A lost LISTEN connection is
    reconnected with backoff (``BACKOFF_S``); each (re)connect wakes the loop once, since notifications sent
    meanwhile are gone."""

    def __init__(self, url: str, wake: Callable[[], None], own_pid: Callable[[], int | None], *,
                 role: str = "lanectl-supervisor-listen", poll_s: float = 0.5) -> None:
        import threading

        self.url = url
        self.wake = wake
        self.own_pid = own_pid
        self.role = role
        self.poll_s = poll_s
        self.connected = threading.Event()
        self.accepted = 0
        """Notifications that woke the loop."""
        self.ignored = 0
        """Notifications of the supervisor's own connection."""
        self.connects = 0
        self.errors = 0
        self.last_error: str | None = None
        self._stop = threading.Event()
        self._conn: Any = None
        self._thread = threading.Thread(target=self._run, name="ledger-listen", daemon=True)

    def start(self) -> PgListener:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10)

    def _connect(self) -> Any:
        from lanectl.ledger import pg

        return pg.listen_connect(self.url, role=self.role)

    def _run(self) -> None:
        failures = 0
        while not self._stop.is_set():
            try:
                self._conn = self._connect()
            except Exception as exc:  # noqa: BLE001 - psycopg's errors, a LanectlError (no driver): retried
                self._failed(exc)
                self._stop.wait(BACKOFF_S[min(failures, len(BACKOFF_S) - 1)])
                failures += 1
                continue
            failures = 0
            self.connects += 1
            self.connected.set()
            self.wake()  # whatever was committed while this connection was not listening
            try:
                while not self._stop.is_set():
                    for note in self._conn.notifies(timeout=self.poll_s):
                        if note.pid == self.own_pid():
                            self.ignored += 1
                        else:
                            self.accepted += 1
                            self.wake()
            except Exception as exc:  # noqa: BLE001 - a dead thread would leave the loop polling for good
                self._failed(exc)
                self.wake()  # the loop polls until this connection is back
                self._stop.wait(BACKOFF_S[0])
            finally:
                self.connected.clear()
                with contextlib.suppress(Exception):
                    self._conn.close()
                self._conn = None

    def _failed(self, exc: Exception) -> None:
        import logging

        self.errors += 1
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if text != self.last_error:
            logging.getLogger("lanectl.supervisor").warning(
                "ledger LISTEN connection failed (polling meanwhile, reconnecting): %s", text)
        self.last_error = text

"""sd_notify for lanectl's own long-running processes (the supervisor and the reference lane runtime, both
Type=notify units): READY, STATUS, WATCHDOG and STOPPING through the sdnotify library, and the watchdog interval
systemd asks for."""
from __future__ import annotations

import os


class Notifier:
    """sd_notify through the sdnotify library; a no-op outside systemd (no NOTIFY_SOCKET)."""

    def __init__(self) -> None:
        self._n = None
        if os.environ.get("NOTIFY_SOCKET"):
            import sdnotify

            self._n = sdnotify.SystemdNotifier()

    def send(self, msg: str) -> None:
        if self._n is not None:
            self._n.notify(msg)

    @staticmethod
    def watchdog_interval() -> float | None:
        """Half of WATCHDOG_USEC (when it is meant for this process), as systemd recommends."""
        usec = os.environ.get("WATCHDOG_USEC")
        pid = os.environ.get("WATCHDOG_PID")
        if not usec or (pid and pid != str(os.getpid())):
            return None
        return int(usec) / 2e6

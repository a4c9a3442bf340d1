"""A small Python API for producers: submit, get, wait, cancel.

    from lanectl.client import Client, SubmitRequest
    c = Client()                      # LANECTL_LEDGER / $STATE_DIRECTORY/ledger.db, LANECTL_CONFIG_DIR
    m = c.submit("interactive", {"argv": ["echo", "hi"]}, idempotency_key="job-42")
    c.submit_many([SubmitRequest("background", {"argv": ["true"]}) for _ in range(100)])  # one commit
    done = c.wait(m.id, timeout=60)   # raises lanectl.errors.Timeout (exit 7) when it does not finish in time

The ledger must exist (``lanectl install`` or ``lanectl ledger init`` creates it): a missing one is
``ledger_missing`` (exit 6), so a mistyped path never starts a ledger nothing reads.

Errors are ``lanectl.errors.LanectlError`` subclasses with a stable ``code`` (``queue_full`` is backpressure:
retry later) and the documented ``exit_code``.
"""
from __future__ import annotations

from collections.abc import Iterable
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lanectl import config
from lanectl.errors import Timeout
from lanectl.ledger import Ledger
from lanectl.ledger import missions as ms
from lanectl.ledger.missions import SubmitRequest
from lanectl.poll import until
from lanectl.states import FINISHED

__all__ = ["Client", "SubmitRequest"]

POLL_S = 0.2


class Client:
    def __init__(self, ledger: str | Path | None = None, config_dir: str | Path | None = None,
                 fleet: config.LaneSet | None = None) -> None:
        self._ledger_path = config.ledger_path(fleet or config_dir, ledger)
        self._where = fleet or config_dir
        self._config_dir = config_dir
        self._fleet = fleet
        self._ledger: Ledger | None = None

    @property
    def ledger(self) -> Ledger:
        if self._ledger is not None and self._ledger.broken():
            # PostgreSQL: the server restarted or cut this connection (the call that saw it raised
            # ledger_unavailable): connect again rather than fail every later call
            self.close()
        if self._ledger is None:
            self._ledger = config.open_ledger(self._where, self._ledger_path,  # [ledger] synchronous
                                              role="lanectl-client")
        return self._ledger

    @property
    def fleet(self) -> config.LaneSet:
        if self._fleet is None:
            self._fleet = config.load(self._config_dir)
        return self._fleet

    def close(self) -> None:
        if self._ledger is not None:
            led, self._ledger = self._ledger, None
            try:
                led.close()
            except Exception:  # noqa: BLE001 - a broken PostgreSQL connection; it is dropped either way
                if not led.broken():
                    raise

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def submit(self, cls: str, payload: Any, *, deadline: float | str | None = None, lane: str | None = None,
               tags: Iterable[str] = (), session: str | None = None, idempotency_key: str | None = None,
               max_attempts: int | None = None, now: float | None = None,
               session_stays: bool | None = None) -> ms.Mission:
        """Queue a mission (or return the one already submitted with this idempotency key). ``deadline`` is seconds
        since the epoch or a relative text such as ``"+30m"``, which a retry with the same key may repeat as is.
        ``session_stays``: the session waits for its lane when the lane's host is dead or drained (True) or moves
        (False; a new session's default)."""
        return ms.submit(self.ledger, self.fleet, cls=cls, payload=payload, deadline=deadline, lane=lane,
                         tags=tags, session=session, idempotency_key=idempotency_key, max_attempts=max_attempts,
                         now=self.ledger.clock() if now is None else now, session_stays=session_stays).mission

    def submit_many(self, requests: list[ms.SubmitRequest], now: float | None = None) -> list[ms.SubmitResult]:
        """Queue up to ``missions.MAX_BATCH`` missions in one transaction, all or nothing (one commit: the way to
        enqueue many at once); ``created`` is False for an idempotency key that was already used."""
        return ms.submit_many(self.ledger, self.fleet, requests, now=self.ledger.clock() if now is None else now)

    def get(self, mission_id: int) -> ms.Mission:
        return ms.get(self.ledger, mission_id)

    def wait(self, mission_id: int, timeout: float = 60.0, poll: float = POLL_S,
             progress: Callable[[str], None] | None = None) -> ms.Mission:
        """Poll until the mission is finished; ``Timeout`` (exit 7) when ``timeout`` seconds pass first.
        ``progress`` is told what the mission is doing each time it looks."""
        def told(m: ms.Mission, left: float) -> None:
            if progress is not None:
                where = f" on {m.current_lane}" if m.current_lane else ""
                progress(f"mission {mission_id}: {m.state}{where}, attempt {m.attempts}; {left:.0f}s left of the "
                         "timeout")

        m = until(lambda: self.get(mission_id), timeout, done=lambda m: m.state in FINISHED, interval=poll,
                  progress=told)
        if m.state not in FINISHED:
            raise Timeout(f"mission {mission_id} is still {m.state} after {timeout:g}s",
                          "wait longer (--timeout) or look at 'lanectl mission explain'", "wait_timeout")
        return m

    def cancel(self, mission_id: int, now: float | None = None) -> ms.Mission:
        return ms.cancel(self.ledger, mission_id, now=self.ledger.clock() if now is None else now,
                         reason="cancelled by producer").mission

"""The supervisor itself: its life (open, reload, close) and its main loop, which owns the ledger and decides.

Each turn (:meth:`Supervisor.turn`) is driven by one reading of the supervisor's :class:`Clock`, ``now``, passed
in: every cadence (observations, roll-ups, the policy pass, cancels' backoff, the watchdog ping) is measured on
it, so a test can drive turns with chosen ``now`` values without sleeping. Between turns the loop waits on one
selector (:meth:`Supervisor.wait`): a wake-up pipe (callbacks, POST results, SIGHUP), an inotify watch of the
ledger's WAL (another process committed) and a pidfd per lane process.
"""
from __future__ import annotations

import contextlib
import gc
import logging
import os
import selectors
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Callable
from typing import Any, TypeVar

from lanectl import __version__, config, keys
from lanectl.config import LaneSet, Settings
from lanectl.errors import ExitCode, LanectlError
from lanectl.ledger import Checkpointer, Ledger, reads
from lanectl.ledger import Error as LedgerError
from lanectl.ledger import lanes as lane_ops
from lanectl.ledger import missions as ms
from lanectl.ledger.events import EventKind, append
from lanectl.supervisor.callbacks import Callbacks, Refusals
from lanectl.supervisor.dispatcher import Dispatcher
from lanectl.supervisor.health import Health
from lanectl.supervisor.history import History
from lanectl.supervisor.hostlease import HostLease
from lanectl.supervisor.metrics import MetricsCache
from lanectl.supervisor.rollback import Governor
from lanectl.supervisor.server import Endpoints
from lanectl.supervisor.shared import Clock, LaneWatch, Shared
from lanectl.supervisor.users import LaneUsers
from lanectl.supervisor.watch import LaneWatcher
from lanectl.units import unit_name

log = logging.getLogger("lanectl.supervisor")
POLL_S = 0.01
"""Without inotify: how often the main loop looks for commits of other processes (PRAGMA data_version)."""
IDLE_S = 0.1
"""With inotify: the longest the main loop sleeps while a part asked for a policy pass (``dirty``)."""
IDLE_MAX_S = 1.0
"""With inotify (a wake-up per commit, per callback, per POST result, per lane exit, per signal): the longest the
main loop sleeps; otherwise it sleeps until the next turn has something due by the clock (:meth:`next_due`)."""
RECHECK_S = (0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.5)
"""After a commit wake-up that showed nothing new: the waits before looking again. inotify fires when another
process writes the WAL, which is before its commit is visible (with synchronous=FULL the fsync and the wal-index
update come after): a turn that reads ``PRAGMA data_version`` in between sees nothing, and no second wake-up
follows for that commit. So the loop looks again, sooner first, for about 1.1 s (a slow fsync), before it sleeps
until the next thing due; a commit is seen at most about twice its delay late. Commits of the supervisor's own
connection (the WAL is its too) cost the same few looks."""
SUMMARY_EVERY_S = 1.0
"""How often /healthz's summary and systemd's STATUS= are refreshed."""
LEDGER_RETRY_S = 0.2
"""SQLite: after a turn the ledger failed (disk full, I/O error, locked past the timeout), the next try comes this
long later (a local file: nothing to reconnect to, and a try costs nothing remote)."""
LEDGER_BACKOFF_S = (0.1, 5.0)
"""PostgreSQL: after a failed turn, the wait before the next try starts at the first and doubles up to the second
(the server restarting, down, or this connection's backend terminated); every try reconnects."""
LEDGER_REMIND_S = 60.0
"""An outage is logged when it starts, when it ends, and every this long while it lasts (never once per try)."""
APPLICATION_NAME = "lanectl-supervisor"
"""PostgreSQL: the supervisor's connection in ``pg_stat_activity`` (the CLI's is ``lanectl-cli``)."""
T = TypeVar("T")


def _now(step: Callable[[], T]) -> T:
    """``step()`` at once (SQLite: its writes wait for the lock with the busy timeout, nothing to reconnect)."""
    return step()


PG_LOCK_WAIT_S = 2.0
"""PostgreSQL: the supervisor's ``lock_timeout`` (and connect timeout). Short beside the watchdog (WatchdogSec=10
by default) so that a turn whose transactions wait for the ledger's lock held elsewhere (a CLI frozen inside a
transaction, until the server ends it; any login taking the lock) fails over into the outage state, which keeps
sending WATCHDOG=1, rather than waiting 5 s a statement until systemd kills the supervisor."""


@dataclass
class Outage:
    """The ledger is unreachable: since when (the loop's clock), the last error, and when to try again."""

    since: float
    error: str
    delay: float
    next_try: float
    reminded: float
    tries: int = 1


def bound_settings(old: Any, new: Any) -> list[tuple[str, Any, Any]]:
    """The settings the supervisor takes once, at start, that differ between ``old`` and ``new``: a reload cannot
    change them (``lanectl install`` restarts it when the port or the ledger changed)."""
    keys_ = (("[supervisor] host", lambda s: s.supervisor.host), ("[supervisor] port", lambda s: s.supervisor.port),
             ("[supervisor] socket", lambda s: s.supervisor.socket), ("[ledger] path", lambda s: s.ledger.path),
             ("[ledger] synchronous", lambda s: s.ledger.synchronous), ("[ledger] listen", lambda s: s.ledger.listen),
             ("host", lambda s: s.host),
             ("state_dir", lambda s: s.state_dir))
    return [(name, get(old), get(new)) for name, get in keys_ if get(old) != get(new)]


def lane_watch(name: str, lane: Any, key: str) -> LaneWatch:
    return LaneWatch(name, unit_name(name), lane.port, key, lane.health_path, lane.restart.max_restarts,
                     lane.enabled)


class Supervisor:
    """The parts, each with its own state (module docstrings say what each does):

    ``callbacks`` (group commit of lanes' callbacks), ``dispatcher`` (policy pass, dispatch and cancel POSTs),
    ``watch`` (pidfds, systemd, health endpoints, reconciliation), ``lane_health`` (healthy flag, degradation,
    recovery), ``governor`` (rollback triggers), ``history`` (roll-ups, retention), ``endpoints`` (the callback
    socket and the TCP listener), ``metrics`` (the /metrics cache), ``users`` (lane uids); ``shared`` holds what
    they all read (clock, fleet, ledger, lanes, full lanes, counters, the dirty flag)."""

    def __init__(self, fleet: LaneSet, ledger_path: Path | None = None, *, notifier: Any = None,
                 use_systemd: bool = True, callback_socket: Path | str | None = None,
                 lane_uids: dict[str, int] | None = None, clock: Clock | None = None,
                 config_source: str | Path | None = None, create: bool = True) -> None:
        """``create=False`` refuses a ledger that does not exist (``ledger_missing``): ``lanectl supervise
        --ledger PATH`` names one explicitly, and a typo must not start an empty ledger nothing reads.
        ``callback_socket`` and ``lane_uids`` (lane -> the uid its callbacks must come from) replace the
        configured socket path and the lane users' uids, ``clock`` the real clocks: for in-process tests only.
        ``config_source`` is what a reload loads (default: the fleet's config dir)."""
        self.config_source = str(config_source or fleet.config_dir)
        self.reload_requested = False
        self.generation = 0
        """Configurations loaded since start: 0 the first, +1 per successful reload (in /healthz)."""
        self.reload_error: str | None = None
        self.reloads = 0
        """Reloads attempted since start (in /healthz, with ``generation`` and ``reload_error``)."""
        self.create = create
        self.locks: list[int] = []
        """Exclusive flocks held for the supervisor's life: one per ledger, one per socket (lanectl.exclusive)."""
        self.notifier = notifier
        self.stop = threading.Event()
        self.sel = selectors.DefaultSelector()
        self.wake_r, self.wake_w = os.pipe()
        os.set_blocking(self.wake_r, False)
        os.set_blocking(self.wake_w, False)
        self.sel.register(self.wake_r, selectors.EVENT_READ, None)
        self.shared = Shared(clock or Clock(), fleet, ledger_path or config.ledger_path(fleet),
                             self.wake, use_systemd)
        self.refusals = Refusals()
        self.users = LaneUsers(self.shared, lane_uids)
        self.callbacks = Callbacks(self.shared, self.refusals)
        self.governor = Governor(self.shared)
        self.lane_health = Health(self.shared, self.governor)
        self.dispatcher = Dispatcher(self.shared, self.lane_health)
        self.watch = LaneWatcher(self.shared, self.sel, self.lane_health, self.dispatcher, self.users)
        self.history = History(self.shared)
        self.endpoints = Endpoints(self.shared, Path(callback_socket or fleet.settings.supervisor.socket),
                                   self.callbacks, self.refusals, self.users, self.health, self.metrics_text)
        self.metrics = MetricsCache(self.shared, self.refusals, self.endpoints.servers)
        self.host = HostLease(self.shared)
        """This host's record in the ledger: incarnation, lease, self-fencing (issue 13)."""
        self.commits: Any = None
        self.listener: Any = None
        """PostgreSQL: the ``lanectl.wakeup.PgListener`` (None: SQLite, or LISTEN turned off)."""
        self.own_clock = clock is None
        self.checkpointer: Checkpointer | None = None
        self.data_version = -1
        self.recheck: int | None = None  # index into RECHECK_S while a commit woke the loop but is not visible yet
        self.summary: dict[str, Any] = {}
        self.outage: Outage | None = None
        """Set while the ledger is unreachable (docs/supervisor.md, "the ledger's database fails")."""
        self.ping_every = 1.0
        self.last_ping = self.last_summary = float("-inf")
        self.exit_code = 0
        """What :meth:`run` returns: 5 (``host_reaped``) when another host declared this one dead meanwhile."""
        self.waited_for_ledger = False
        """PostgreSQL: the start had to wait for the ledger (the database was down or busy)."""

    # ------------------------------------------------------------------------------------------ shared state
    @property
    def clock(self) -> Clock:
        return self.shared.clock

    @property
    def fleet(self) -> LaneSet:
        return self.shared.fleet

    @property
    def settings(self) -> Settings:
        return self.shared.settings

    @property
    def ledger_path(self) -> Path:
        return self.shared.ledger_path

    @property
    def on_pg(self) -> bool:
        """The ledger is a PostgreSQL database (a ``postgresql://`` URL), not an SQLite file."""
        return isinstance(self.ledger_path, str)

    @property
    def ledger(self) -> Ledger | None:
        return self.shared.ledger

    @ledger.setter
    def ledger(self, led: Ledger | None) -> None:
        self.shared.ledger = led

    @property
    def lanes(self) -> dict[str, LaneWatch]:
        return self.shared.lanes

    @property
    def counters(self) -> dict[str, int]:
        return self.shared.counters

    @property
    def dirty(self) -> bool:
        return self.shared.dirty

    @dirty.setter
    def dirty(self, value: bool) -> None:
        self.shared.dirty = value

    @property
    def socket_path(self) -> Path:
        return self.endpoints.socket_path

    @property
    def server(self) -> Any:
        return self.endpoints.server

    @property
    def unix_server(self) -> Any:
        return self.endpoints.unix_server

    @property
    def last_tick(self) -> float:
        return self.dispatcher.last_tick

    # ------------------------------------------------------------------------------------------ setup
    def open(self) -> None:
        """Migrate the ledger, load lane keys, bind the callback endpoint (READY=1 comes after this)."""
        try:
            self.take_locks()
            self._open()
        except BaseException:
            self.release_locks()
            raise

    def take_locks(self) -> None:
        """One supervisor per ledger and per callback socket, before anything is read or written: a second one is
        refused (``supervisor_running``, exit 5) naming the one that runs, instead of stealing its socket."""
        from lanectl import exclusive
        from lanectl.ledger import require_ledger_file

        if self.on_pg:
            from lanectl.ledgerurl import redact

            # no file to lock beside: the lock file is named after the URL, next to the callback socket (one
            # supervisor per ledger on this host; docs/decisions.md)
            self.locks.append(exclusive.take(exclusive.url_lock_path(self.socket_path.parent, str(self.ledger_path)),
                                             f"the ledger {redact(str(self.ledger_path))}"))
        else:
            if not self.create:
                require_ledger_file(self.ledger_path)
            self.locks.append(exclusive.take(exclusive.ledger_lock_path(self.ledger_path),
                                             f"the ledger {self.ledger_path}"))
        self.socket_path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
        self.locks.append(exclusive.take(exclusive.socket_lock_path(self.socket_path),
                                         f"the callback socket {self.socket_path}"))
        if self.socket_path.is_socket() and exclusive.listening(self.socket_path):  # one that takes no lock
            raise exclusive.running(f"a process listens on the callback socket {self.socket_path}: another "
                                    "supervisor runs")

    def release_locks(self) -> None:
        from lanectl import exclusive

        while self.locks:
            exclusive.release(self.locks.pop())

    def open_ledger(self) -> Ledger:
        """The supervisor's connection to the ledger. A PostgreSQL server that cannot be reached yet (the host
        boots, the database restarts) is waited for, backing off as in an outage, with WATCHDOG=1 and
        EXTEND_TIMEOUT_USEC sent meanwhile, instead of exiting into systemd's start limit; every other error
        (no such database, no permission, a newer schema) ends the start as before. A ledger whose lock is held
        elsewhere (``ledger_busy``) is waited for the same way."""
        sync = self.settings.ledger.synchronous  # FULL: a callback is answered only once its commit is on disk
        if not self.on_pg:
            return Ledger.open(self.ledger_path, autocheckpoint=False, synchronous=sync, create=self.create,
                               role=APPLICATION_NAME)
        return self.waiting_for_ledger(lambda: Ledger.open(self.ledger_path, create=self.create,
                                                           role=APPLICATION_NAME, busy_timeout_s=PG_LOCK_WAIT_S))

    def waiting_for_ledger(self, step: Callable[[], T]) -> T:
        """``step()``, repeated while it fails because the PostgreSQL ledger cannot be used yet (unreachable, or
        its lock held elsewhere: ``ledger_unavailable``, ``ledger_busy``), backing off as in an outage with
        WATCHDOG=1 and EXTEND_TIMEOUT_USEC sent meanwhile, on a new connection each time (once one exists). Before
        the main loop runs (open, start) this is the outage state. Other errors, and a stop, end the wait."""
        from lanectl.ledgerurl import redact

        delay, since = LEDGER_BACKOFF_S[0], time.monotonic()
        reminded = float("-inf")
        while True:
            try:
                return step()
            except LanectlError as exc:
                if exc.code not in ("ledger_unavailable", "ledger_busy") or self.stop.is_set():
                    raise
                self.waited_for_ledger = True
                waited = time.monotonic() - since
                if time.monotonic() - reminded >= LEDGER_REMIND_S:
                    log.error("ledger unusable%s: %s; waiting for it (retrying up to every %gs)",
                              f" for {waited:.0f}s" if waited >= 1 else "", exc.message, LEDGER_BACKOFF_S[1])
                    reminded = time.monotonic()
                self.notify(f"WATCHDOG=1\nEXTEND_TIMEOUT_USEC={int((delay + 30) * 1e6)}\nSTATUS=waiting for the "
                            f"ledger {redact(str(self.ledger_path))} ({exc.code} for {waited:.0f}s)")
                if self.stop.wait(delay):
                    raise
                delay = min(delay * 2, LEDGER_BACKOFF_S[1])
                if self.shared.ledger is not None:
                    with contextlib.suppress(LanectlError):
                        self.shared.ledger.reconnect()

    def _open(self) -> None:
        sync = self.settings.ledger.synchronous
        led = self.shared.ledger = self.open_ledger()
        if self.on_pg:
            self.open_pg(led)
        else:  # SQLite only: WAL checkpoints off the dispatch path, and a wake-up per commit
            self.checkpointer = Checkpointer(self.ledger_path, synchronous=sync).start()
            from lanectl.wakeup import commit_watch

            self.commits = commit_watch(self.ledger_path)
            if self.commits is not None:
                self.sel.register(self.commits.fd, selectors.EVENT_READ, "commit")
        # lanes another host owns end the start here (exit 3); PostgreSQL: a ledger whose lock is held elsewhere, or
        # that went away since it was opened, is waited for like the open itself
        (self.waiting_for_ledger if self.on_pg else _now)(lambda: self.host.register(self.clock.now()))
        self.dispatcher.holder = (self.host.name, self.host.incarnation)
        self.dispatcher.cancel_cursor = reads.last_event_id(led)
        lane_keys = keys.read_lane_keys(Path(self.settings.state_dir), sorted(self.fleet.lanes))
        recorded = lane_ops.recorded_invocations(led)
        for name, lane in sorted(self.fleet.lanes.items()):
            self.watch.add(lane_watch(name, lane, lane_keys[name]), recorded.get(name, ""))
        self.users.resolve()
        self.endpoints.bind(self.clock.now())

    def open_pg(self, led: Ledger) -> None:
        """PostgreSQL: the loop's clock follows the database server's (``Ledger.clock``), the LISTEN thread wakes
        the loop on other processes' commits (unless ``[ledger] listen = false`` / ``LANECTL_PG_LISTEN=0``), and
        GET /metrics reads through a small pool of read-only connections (``metrics.MetricsCache``)."""
        from lanectl.ledger import pg
        from lanectl.wakeup import PgListener, listen_enabled

        if self.own_clock:
            self.clock.follow(led.clock)
        if listen_enabled(self.settings.ledger.listen):
            self.listener = PgListener(str(self.ledger_path), self.wake, self.own_backend_pid).start()
        self.metrics.pool = pg.ReadPool(str(self.ledger_path), role="lanectl-supervisor").open()

    def own_backend_pid(self) -> int | None:
        """The server process of the supervisor's own ledger connection (its NOTIFYs wake nothing)."""
        led = self.shared.ledger
        try:
            return getattr(led.conn, "backend_pid", None) if led is not None else None
        except Exception:  # noqa: BLE001 - a connection being replaced: no pid to ignore
            return None

    # ------------------------------------------------------------------------------------------ reload
    def request_reload(self) -> None:
        """From the SIGHUP handler: reload between two turns of the main loop (never inside one)."""
        self.reload_requested = True
        self.wake()

    def reload(self, now: float) -> bool:
        """Re-read the configuration and adopt its lanes; in-flight work of the lanes that stay is untouched.

        A configuration that does not load (or whose lane keys cannot be read) changes nothing: the previous one
        goes on, the error is logged and shown in /healthz as ``reload_error``."""
        from lanectl import config

        self.reloads += 1
        self.notify("RELOADING=1\nSTATUS=reloading the configuration")
        try:
            fleet = config.load(self.config_source)
            lane_keys = keys.read_lane_keys(Path(fleet.settings.state_dir), sorted(fleet.lanes))
            self.host.claim(sorted(fleet.lanes), now, fleet.lanes)  # a lane another host owns: the reload fails
        except (LanectlError, OSError) as exc:
            msg = exc.message if isinstance(exc, LanectlError) else str(exc)
            if isinstance(exc, LanectlError) and exc.problems:
                msg += ": " + "; ".join(p.render() for p in exc.problems[:5])
            self.reload_error = msg
            log.error("reload failed, the previous configuration stays in force: %s", msg)
            self.notify("READY=1\nSTATUS=reload failed (previous configuration in force): " + msg[:200])
            return False
        self.adopt(fleet, lane_keys, now)
        self.generation += 1
        self.reload_error = None
        self.refresh_summary()
        self.notify("READY=1\nSTATUS=" + self.status_line())
        return True

    def adopt(self, fleet: LaneSet, lane_keys: dict[str, str], now: float) -> None:
        """Switch to ``fleet``: watch lanes that are new, forget lanes that are gone, update the others."""
        s = self.shared
        old, new = set(s.lanes), set(fleet.lanes)
        for name in sorted(old - new):
            self.watch.remove(name)
            lost = ms.requeue_lane(s.db, name, "lane removed from the fleet", now=now)
            log.warning("lane %s removed from the fleet%s", name, f"; re-queued missions {lost}" if lost else "")
        recorded = lane_ops.recorded_invocations(s.db)
        for name in sorted(new):
            lane = fleet.lanes[name]
            w = s.lanes.get(name)
            if w is None:
                self.watch.add(lane_watch(name, lane, lane_keys[name]), recorded.get(name, ""))
                log.info("lane %s added to the fleet (port %d)", name, lane.port)
            else:
                w.port, w.key, w.health_path = lane.port, lane_keys[name], lane.health_path
                w.max_restarts, w.enabled = lane.restart.max_restarts, lane.enabled
        for name, was, now_ in bound_settings(s.settings, fleet.settings):
            log.warning("%s changed (%r -> %r): it takes effect when the supervisor restarts", name, was, now_)
        s.fleet = fleet
        if self.users.fixed is None:
            self.users.resolve()
        self.metrics.invalidate()
        s.dirty = True
        self.watch.look_again()  # systemd (and so the new lanes) at this observation
        self.watch.observe(now)

    # ------------------------------------------------------------------------------------------ reports
    def wake(self) -> None:
        try:
            os.write(self.wake_w, b"x")
        except BlockingIOError:
            pass  # a wake-up is pending already

    def metrics_text(self) -> str:
        return self.metrics.text()

    def health(self) -> dict[str, Any]:
        """The /healthz document. ``ledger_ok`` is false while the ledger is unreachable, with
        ``ledger_unreachable_since`` (epoch seconds) and ``ledger_error``; the rest of the summary is then the last
        one read."""
        from lanectl.ledgerurl import redact

        o = self.outage
        return {"pid": os.getpid(), "version": __version__, "ledger": redact(str(self.ledger_path)),
                "ledger_ok": o is None, "ledger_unreachable_since": None if o is None else round(o.since, 3),
                "ledger_error": None if o is None else o.error,
                "generation": self.generation, "reloads": self.reloads, "reload_error": self.reload_error,
                "host": self.host.name, "incarnation": self.host.incarnation,
                "fenced": self.host.fenced_since is not None, "fence_reason": self.host.fence_reason,
                **self.summary}

    def refresh_summary(self) -> None:
        counts = ms.state_counts(self.shared.db.conn)  # every second: must not count a million-row queue
        lanes = self.lanes.values()
        self.summary = {
            "lanes": {w.name: {"state": w.state, "healthy": w.healthy, "unit": f"{w.active}/{w.sub}",
                               "invocation": w.invocation, "restarts": w.restarts} for w in lanes},
            "lanes_up": sum(1 for w in lanes if w.healthy), "queued": counts.get("queued", 0),
            "in_flight": counts.get("dispatched", 0) + counts.get("running", 0),
            "counters": dict(self.counters), "refused": self.refusals.counts(), "last_tick": self.last_tick,
            "clock_skew_s": round(self.clock.skew(), 3),
        }

    def status_line(self) -> str:
        s = self.summary
        o = self.outage
        down = "" if o is None else (f"ledger unreachable since {time.strftime('%H:%M:%SZ', time.gmtime(o.since))} "
                                     f"({self.clock.now() - o.since:.0f}s, retrying; callbacks answered 503); ")
        return down + (f"{s.get('lanes_up', 0)}/{len(self.lanes)} lanes up; {s.get('queued', 0)} queued, "
                f"{s.get('in_flight', 0)} in flight; {self.counters['dispatched']} dispatched, "
                f"{self.counters['failovers']} failovers")

    def notify(self, msg: str) -> None:
        if self.notifier is not None:
            self.notifier.send(msg)

    # ------------------------------------------------------------------------------------------ loop
    def start(self, now: float) -> None:
        """Before the first turn: what every lane holds, the outage forgiven, reconciliation, READY=1."""
        self.watch.started_at = now
        self.host.started(now)

        def take_over() -> int:
            self.watch.observe(now)  # what every lane holds, before anything is reaped
            self.watch.last_observe = now
            # the outage is forgiven: every lease runs from the supervisor's return; what a lane holds is kept alive
            # by its heartbeats and health reports, what it does not hold is reconciled below
            moved = ms.extend_leases(self.shared.db, until=now + self.settings.leases.lease_sec,
                                     lanes=self.own_lanes())
            self.watch.reconcile(now)
            return moved

        # PostgreSQL: a ledger that cannot be used yet (its lock held elsewhere, the server gone) is waited for here
        moved = (self.waiting_for_ledger if self.on_pg else _now)(take_over)
        if moved:
            log.info("%d leases restarted from now (the supervisor was away)", moved)
        if self.on_pg and self.waited_for_ledger:  # the database was down: so it was for the other hosts
            self.host.ledger_back(now, LEDGER_BACKOFF_S[1])
        self.refresh_summary()
        self.history.start(now)
        self.last_ping = self.last_summary = now
        self.notify("READY=1\nSTATUS=" + self.status_line())

    def run(self) -> int:
        self.open()
        self.start(self.clock.now())
        # Everything imported and built so far lives as long as the process: keep it out of the collector's
        # full passes, which otherwise walk it inside a tick now and then (docs/benchmarks.md, dispatch latency).
        gc.freeze()
        log.info("supervising %d lanes; callbacks on %s, /healthz and /metrics on %s:%d", len(self.lanes),
                 self.socket_path, self.settings.supervisor.host, self.settings.supervisor.port)
        from lanectl.notify import Notifier

        self.ping_every = Notifier.watchdog_interval() or 1.0
        while not self.stop.is_set():
            self.turn(self.clock.now())
            if not self.stop.is_set():
                self.wait(self.idle_timeout(self.clock.now()))
        self.notify("STOPPING=1\nSTATUS=" + ("stopping: this host was declared dead; restarting as a new incarnation"
                                             if self.exit_code else "stopping"))
        self.close()
        return self.exit_code

    def turn(self, now: float) -> bool:
        """One turn of the main loop at ``now`` (the supervisor's clock); False when the ledger failed it.

        1. lane processes whose pidfd turned readable since the last turn: what they logged as done is settled,
           the rest re-queued (``watch.reap``);
        2. a reload requested by SIGHUP (between two turns, never inside one);
        3. callbacks that arrived are applied in one transaction (group commit), fenced by mission, lane, attempt,
           token;
        4. results of dispatch POSTs (429/503: back uncharged, the lane full until its next report; other
           refusals and unreachable lanes: the attempt is lost);
        5. every ``health.observe_sec``: systemd's view and every lane's health endpoint, then degradation and
           recovery (``watch.maybe_observe``); cancels a lane did not take are sent again;
        6. when the ledger changed (another process committed), a part asked (``dirty``) or ``supervisor.tick_sec``
           passed: one policy pass and its POSTs, cancels forwarded, draining lanes with nothing in flight
           drained, and the rollback triggers (every ``tick_sec``);
        7. roll-ups when due;
        then, ledger or not: the TCP listener retried, WATCHDOG=1, a retention pass when due, the /healthz summary
        and STATUS= every SUMMARY_EVERY_S.

        Side effects (POSTs) happen only after the assignment committed; a supervisor killed between the two
        leaves attempts that the lane never got, which its restart reconciles against each lane's ``/healthz``.
        """
        ok = True
        self.host.check(now)  # the fence holds whether the ledger answers or not
        if self.outage is not None and now < self.outage.next_try:
            self.callbacks.refuse_pending(self.outage.error)  # 503 at once: the lanes keep them and retry
            ok = False
        else:
            try:
                if self.outage is not None:
                    self.resume_ledger(now)
                self.ledger_turn(now)
                if self.outage is not None:
                    self.ledger_back(now)
            except Exception as exc:  # noqa: BLE001 - anything else is a bug: raised on
                if not self.ledger_fault(exc):
                    raise
                self.ledger_failed(exc, now)
                ok = False
        if self.host.reaped and not self.stop.is_set():
            self.reaped_exit()
        self.endpoints.maybe_bind_tcp(now)
        if now - self.last_ping >= self.ping_every:
            self.notify("WATCHDOG=1")
            self.last_ping = now
        if self.outage is None:
            self.history.maybe_prune(now)
        if now - self.last_summary >= SUMMARY_EVERY_S:
            self.publish_summary(now)
        return ok

    def reaped_exit(self) -> None:
        """Another host declared this one dead while it could not renew its lease (frozen, cut off from the
        database): its lanes' attempts were lost and re-run elsewhere, and this incarnation may never claim again.
        The supervisor ends with exit 5 (``host_reaped``); systemd (``Restart=on-failure``) starts it again at
        once, as a new incarnation that registers the host ``up``, takes its lanes back unless another host took
        them, and whose lanes are told to stop what the ledger no longer gives them (their reports are fenced).
        docs/decisions.md, "A reaped host restarts itself"."""
        log.error("host %s was declared dead by another host (it could not renew its lease in time); exiting so "
                  "that the supervisor starts again as a new incarnation", self.host.name)
        self.exit_code = int(ExitCode.CONFLICT)
        self.stop.set()

    def publish_summary(self, now: float) -> None:
        """The /healthz summary read again (not while the ledger is unreachable: the last one stands) and
        ``STATUS=`` sent to systemd."""
        if self.outage is None:
            try:
                self.refresh_summary()
            except (LedgerError, LanectlError):
                pass
        self.notify("STATUS=" + self.status_line())
        self.last_summary = now

    # ------------------------------------------------------------------------------------------ ledger outages
    def ledger_fault(self, exc: BaseException) -> bool:
        """Whether ``exc`` is the ledger failing (what a turn survives): an error of the ledger (SQLite's or, on
        PostgreSQL, the driver's), a LanectlError, an OSError."""
        if isinstance(exc, (LedgerError, LanectlError, OSError)):
            return True
        if self.on_pg:
            from lanectl.ledger import pg

            return isinstance(exc, pg.Error())
        return False

    def ledger_failed(self, exc: BaseException, now: float) -> None:
        """A turn failed on the ledger (PostgreSQL: the server restarted, is down, or terminated this connection;
        SQLite: disk full, I/O error, locked past the timeout). Nothing is lost: a transaction either committed or
        did not, callbacks not applied are answered 503 (the lanes keep them and retry), what the policy pass did
        not commit is done by a later one. The loop keeps feeding the watchdog and tries again after a backoff
        (PostgreSQL: LEDGER_BACKOFF_S, reconnecting; SQLite: LEDGER_RETRY_S)."""
        if self.on_pg and not isinstance(exc, LanectlError):  # a read outside a transaction: as a transaction says
            from lanectl.ledger import pg

            exc = pg.ledger_error(str(self.ledger_path), exc.__cause__ or exc) or exc
        msg = exc.message if isinstance(exc, LanectlError) else f"{type(exc).__name__}: {exc}"
        o = self.outage
        if o is None:
            first = LEDGER_BACKOFF_S[0] if self.on_pg else LEDGER_RETRY_S
            self.outage = Outage(since=now, error=msg, delay=first, next_try=now + first, reminded=now)
            log.error("ledger unreachable: %s; retrying %s, lane callbacks are answered 503 meanwhile", msg,
                      f"with backoff up to every {LEDGER_BACKOFF_S[1]:g}s" if self.on_pg else
                      f"every {LEDGER_RETRY_S:g}s")
            self.notify("STATUS=" + self.status_line())
        else:
            o.error, o.tries = msg, o.tries + 1
            if self.on_pg:
                o.delay = min(o.delay * 2, LEDGER_BACKOFF_S[1])
            o.next_try = now + o.delay
            if now - o.reminded >= LEDGER_REMIND_S:
                log.error("ledger still unreachable after %.0fs (%d tries): %s", now - o.since, o.tries, msg)
                o.reminded = now
        self.callbacks.refuse_pending(msg)
        self.dirty = True

    def own_lanes(self) -> list[str] | None:
        """Whose leases this supervisor forgives at its start and after its ledger outage: on a shared ledger its
        own lanes only (another host's lanes are that host's to vouch for: a hung one must still expire); on SQLite
        (one host) every lease, as before (None)."""
        return sorted(self.fleet.lanes) if self.on_pg else None

    def resume_ledger(self, now: float) -> None:
        """Before the first turn after a failure: a new connection (PostgreSQL), and the outage forgiven as a
        supervisor restart forgives its own: lanes' heartbeats were refused meanwhile, so every lease runs from
        now (a lane that died meanwhile is found by its pidfd and systemd, not by a lease)."""
        self.shared.db.reconnect()
        if self.on_pg:  # every host may have been cut off: none is declared dead before it could renew (this turn on)
            self.host.ledger_back(now, LEDGER_BACKOFF_S[1])
        moved = ms.extend_leases(self.shared.db, until=now + self.settings.leases.lease_sec, lanes=self.own_lanes())
        if moved:
            log.info("%d leases restarted from now (the ledger was unreachable)", moved)
        self.data_version = -1  # a policy pass at once: whatever others committed meanwhile
        self.dirty = True

    def ledger_back(self, now: float) -> None:
        o = self.outage
        assert o is not None
        log.warning("ledger reachable again after %.1fs (%d failed tries)", now - o.since, o.tries)
        self.outage = None
        self.publish_summary(now)

    def next_due(self) -> float:
        """When (on the loop's clock) the next turn has something to do without being woken: an observation, a
        policy pass (every ``supervisor.tick_sec`` at least), a roll-up, a cancel to send again, the TCP listener
        to retry, WATCHDOG=1, a retention pass, the summary. Everything else wakes the loop itself."""
        s = self.settings
        due = [self.watch.next_observe(), self.last_tick + s.supervisor.tick_sec, self.history.next_rollup,
               self.host.next_due(),
               self.last_ping + self.ping_every, self.last_summary + SUMMARY_EVERY_S,
               self.dispatcher.next_cancel_due(), self.endpoints.next_tcp_try()]
        if s.ledger.retention is not None:
            due.append(self.history.next_prune)
        return min(due)

    def idle_timeout(self, now: float) -> float:
        """How long :meth:`wait` may sleep after a turn at ``now``: POLL_S without inotify (commits of other
        processes are polled), IDLE_S while a policy pass is wanted, else until :meth:`next_due`, at most
        IDLE_MAX_S."""
        if self.outage is not None:  # nothing to poll: the next try, the watchdog or the summary, or a wake-up
            due = min(self.outage.next_try, self.last_ping + self.ping_every, self.last_summary + SUMMARY_EVERY_S)
            return max(0.0, min(IDLE_MAX_S, due - now))
        if self.commits is None and not (self.listener is not None and self.listener.connected.is_set()):
            return POLL_S  # nothing wakes the loop on other processes' commits: it looks every POLL_S
        if self.dirty:
            return IDLE_S
        wait = max(0.0, min(IDLE_MAX_S, self.next_due() - now))
        if self.recheck is not None:
            wait = min(wait, RECHECK_S[max(0, self.recheck)])
        return wait

    def ledger_turn(self, now: float) -> None:
        """Steps 1-7 of :meth:`turn`: everything that reads or writes the ledger."""
        s = self.shared
        self.host.turn(now)  # before anything else: a fence lifts as soon as the lease is back; lost hosts reaped
        self.watch.reap(now)
        if self.reload_requested:
            self.reload_requested = False
            self.reload(now)
        self.callbacks.apply(now)
        self.dispatcher.apply_results(now)
        self.watch.maybe_observe(now)
        if self.dispatcher.cancels_pending():
            self.dispatcher.apply_cancel_results(now)
        version = s.db.data_version()
        if version != self.data_version:
            self.recheck = None  # the commit that woke the loop (if one did) is visible: this pass sees it
        elif self.recheck is not None:
            self.recheck = self.recheck + 1 if self.recheck + 1 < len(RECHECK_S) else None
        if version != self.data_version or s.dirty or now - self.last_tick >= self.settings.supervisor.tick_sec:
            self.data_version = version
            s.dirty = False
            self.tick(now)
        self.history.maybe_roll_up(now)

    def tick(self, now: float) -> None:
        """One policy pass and its POSTs (none while the host is fenced), cancels forwarded, drains settled,
        rollback triggers when due."""
        if self.host.fenced(now):
            self.dispatcher.last_tick = now  # the pass's cadence goes on; it claims nothing
        else:
            self.dispatcher.dispatch(now)
            if self.dispatcher.lost_hold:  # the record changed hands after this turn's renewal
                self.dispatcher.lost_hold = False
                if self.host.superseded is None:
                    self.host.lost(now)
        self.dispatcher.forward_cancels(now)
        self.settle_drains(now)
        self.governor.maybe_govern(now)

    def settle_drains(self, now: float) -> None:
        """Draining lanes with nothing in flight become drained."""
        led = self.shared.db
        for name in reads.draining_idle(led):
            with led.transaction() as conn:
                if lane_ops.mark_drained(conn, name, now=now):
                    append(conn, EventKind.LANE_STATE, now, lane=name, to="drained", previous="draining",
                           reason="nothing in flight")

    def wait(self, timeout: float) -> None:
        """Until something happens or ``timeout``: wake-ups are drained, commits of other processes noted, lanes
        whose process exited handed to the next turn."""
        ready = self.sel.select(timeout)
        for key, _ in ready:
            if key.data is None:
                try:
                    while os.read(self.wake_r, 4096):
                        pass
                except BlockingIOError:
                    pass
            elif key.data == "commit":
                self.commits.drain()
                self.recheck = -1  # the next turn looks; if the commit is not visible yet, RECHECK_S[0] later
            else:
                self.watch.pid_exited(key.data)

    def close(self) -> None:
        if self.shared.ledger is not None and self.outage is None:
            try:
                self.host.stop(self.clock.now())
            except (LedgerError, LanectlError, OSError) as exc:
                log.warning("host %s: could not record the stop: %s", self.host.name, exc)
        self.endpoints.close()
        self.dispatcher.close()
        self.watch.close()
        if self.commits is not None:
            self.commits.close()
        if self.listener is not None:
            self.listener.stop()
        if self.metrics.pool is not None:
            self.metrics.pool.close()
        if self.checkpointer is not None:
            self.checkpointer.stop()
        if self.shared.ledger is not None:
            self.shared.ledger.close()
        self.release_locks()

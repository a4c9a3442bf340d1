"""The supervisor: dispatches missions to lanes, takes their callbacks, watches them, and fails over.

One thread owns the ledger and decides (the main loop); HTTP handler threads only parse and hand callbacks to it;
a small pool sends dispatches. Each turn of the main loop:

1. callbacks that arrived are applied in one transaction (group commit), fenced by mission, lane, attempt, token;
2. results of dispatch POSTs are applied (a lane that answered 429 full / 503 stopping, or reported it could not
   start a mission for want of tasks or memory, gets the attempt back uncharged and no work until one of its
   missions ends or its next health report; one that refused otherwise or could not be reached loses
   the attempt); cancels a lane did not take are sent again;
3. a lane process that exited (seen at once through a pidfd, kept until the process is gone) has its missions
   re-queued at once;
4. every ``health.observe_sec``: systemd's view of every lane (active state, InvocationID, restarts) and its
   health endpoint; a new invocation re-queues what the old one held; failed units and restart storms make a lane
   degraded (its sessions move to its fallback) and a stable one recovers;
5. when the ledger changed (another process committed: a submit, an operator verb) or a callback freed capacity,
   one policy pass (``ledger.tick.run_once``) and the POSTs of what it assigned;
6. draining lanes with nothing in flight become drained; ``WATCHDOG=1`` and ``STATUS=``;
7. with ``[ledger] retention`` set, every ``prune_every`` (first RETENTION_FIRST_S after start) a thread with its
   own connection archives and deletes finished history older than the retention (``retention_pass``), in short
   transactions the loop's own interleave with.

SIGHUP (``systemctl reload``, which ``lanectl install`` and ``apply`` send after a change) re-reads the
configuration between two turns: lanes added start being watched and get work, lanes removed stop (what was in
flight on one is re-queued), every other lane's missions run on untouched. ``RELOADING=1`` ... ``READY=1`` bracket
it; a configuration that does not load leaves the previous one running (logged, ``reload_error`` in /healthz).

Side effects (POSTs) happen only after the assignment committed; a supervisor killed between the two leaves
attempts that the lane never got, which its restart reconciles against each lane's ``/healthz`` (repeatedly, for
RECONCILE_FOR_S). A restart forgives the outage: every lease runs from the supervisor's return. Durations and
deadlines are measured on one :class:`Clock` (wall time at start + monotonic since): wall-clock steps change nothing.
"""
from __future__ import annotations

import gc
import json
import logging
import os
import pwd
import queue
import selectors
import socketserver
import stat
import threading
import time
import urllib.error
import urllib.request
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from http.server import ThreadingHTTPServer
from pathlib import Path
from typing import Any

from lanectl import __version__, keys, paths, systemd
from lanectl.config import LaneSet
from lanectl.errors import Conflict, LanectlError, NotFound
from lanectl.ledger import Checkpointer, Ledger
from lanectl.ledger import Error as LedgerError
from lanectl.ledger import missions as ms
from lanectl.ledger import reads
from lanectl.ledger import lanes as lane_ops
from lanectl.ledger import rollups
from lanectl.ledger import tick as ticks
from lanectl.ledger.events import EventKind, append
from lanectl.protocol import (BadMessage, BoundedServer, CallbackMsg, DeadlineHandler, DispatchMsg, LogScan, log_key,
                              parse_callbacks, peer_cred, read_body, scan_execution_log, send_json,
                              tcp_listener_uids)
from lanectl.status import check_health_many
from lanectl.units import unit_name

log = logging.getLogger("lanectl.supervisor")
POLL_S = 0.01
"""Without inotify: how often the main loop looks for commits of other processes (PRAGMA data_version)."""
SETTLE_S = 30.0
ROLLUP_EVERY_S = 10.0
"""How often the supervisor rolls closed 5-minute buckets up (sooner while it is catching up)."""
"""After a lane process exits, systemd is read every 0.25 s for this long (or until the lane is back)."""
IDLE_S = 0.1
"""With inotify (a wake-up per commit): the longest the main loop sleeps when nothing happens."""
DISPATCH_TIMEOUT_S = 2.0
CALLBACK_WAIT_S = 10.0
METRICS_WINDOW_S = 900.0
"""GET /metrics covers the last 15 minutes."""
METRICS_CACHE_S = 5.0
RECONCILE_GRACE_S = 5.0
"""An attempt dispatched this recently may still be on its way to the lane; reconciliation leaves it alone."""
RECONCILE_FOR_S = 2 * RECONCILE_GRACE_S
"""After a start, reconciliation runs after every observation for this long (not once): an attempt recorded just
before the previous process died and never sent is re-queued as soon as it is RECONCILE_GRACE_S old."""
CANCEL_RETRY_S = 0.5
CANCEL_RETRY_MAX_S = 10.0
"""A cancel that did not reach its lane is sent again, backing off from CANCEL_RETRY_S to CANCEL_RETRY_MAX_S, until
the lane acknowledges it (202) or says it does not hold the mission (404), or its process is gone."""
LOG_READ_TIMEOUT_S = 1.0
"""The longest the main loop waits for a lane's execution log to be read (in a thread); at most a quarter of the
supervisor's watchdog."""
REJECTED_PER_S = 1.0
REJECTED_BURST = 20
"""``callback_rejected`` events per lane: a token bucket of REJECTED_BURST refilled at REJECTED_PER_S; rejections
beyond it are counted (``lanectl_callbacks_refused_total{reason="unrecorded"}``), not written."""
SOCKET_PER_PEER = 8
"""Connections one uid may hold on the callback socket at once: one lane cannot starve the others' callbacks."""
UID_RESOLVE_S = 5.0
TCP_RETRY_S = 1.0
RETENTION_FIRST_S = 60.0
"""The first retention pass runs this long after start (not in the middle of a restart's reconciliation)."""


class Clock:
    """The supervisor's one clock: wall time as of its start plus the monotonic time since.

    Every duration and deadline the supervisor keeps (leases, retry backoff, aging, rollback windows, rate
    windows, budgets' days, settle and observe intervals) is measured on it, so a step of the wall clock (an NTP
    correction) changes nothing until the supervisor restarts; the timestamps it writes still read as wall time
    to people. ``wall`` and ``mono`` are injectable for tests."""

    def __init__(self, wall: Any = time.time, mono: Any = time.monotonic) -> None:
        self.wall = wall
        self.mono = mono
        self.base_wall = wall()
        self.base_mono = mono()

    def now(self) -> float:
        return self.base_wall + (self.mono() - self.base_mono)

    def skew(self) -> float:
        """How far the wall clock has moved away from this clock since the supervisor started (seconds)."""
        return self.wall() - self.now()


@dataclass
class LaneWatch:
    """What the supervisor knows of one lane from systemd, its pidfd and its health endpoint."""

    name: str
    unit: str
    port: int
    key: str
    health_path: str
    max_restarts: int
    enabled: bool
    active: str = "unknown"
    sub: str = ""
    main_pid: int = 0
    pidfd: int | None = None
    invocation: str = ""
    restarts: int = -1
    restart_times: deque[float] = field(default_factory=deque)
    unrecorded_restarts: int = 0
    """Restarts systemd counted (NRestarts) that no lane_invocation event carries yet."""
    healthy: bool = False
    health_recorded: bool = False
    """Whether this process has written the lane's health to the ledger yet (the ledger may hold an earlier
    process's verdict: the first observation always writes)."""
    recorded_invocation: str = ""
    """The invocation the ledger bound the lane's attempts to before this process started: the execution log to
    settle from when that invocation turns out to be gone."""
    healthy_since: float | None = None
    held: set[int] = field(default_factory=set)
    state: str = "active"  # the ledger's dispatch state (active, draining, drained, degraded, disabled)

    @property
    def running(self) -> bool:
        return self.active == "active" and self.sub == "running"


def bound_settings(old: Any, new: Any) -> list[tuple[str, Any, Any]]:
    """The settings the supervisor takes once, at start, that differ between ``old`` and ``new``: a reload cannot
    change them (``lanectl install`` restarts it when the port or the ledger changed)."""
    keys_ = (("[supervisor] host", lambda s: s.supervisor.host), ("[supervisor] port", lambda s: s.supervisor.port),
             ("[supervisor] socket", lambda s: s.supervisor.socket), ("[ledger] path", lambda s: s.ledger.path),
             ("[ledger] synchronous", lambda s: s.ledger.synchronous), ("state_dir", lambda s: s.state_dir))
    return [(name, get(old), get(new)) for name, get in keys_ if get(old) != get(new)]


@dataclass
class Pending:
    msg: CallbackMsg
    future: Future[tuple[int, dict[str, Any]]]


class Supervisor:
    def __init__(self, fleet: LaneSet, ledger_path: Path | None = None, *, notifier: Any = None,
                 use_systemd: bool = True, callback_socket: Path | str | None = None,
                 lane_uids: dict[str, int] | None = None, clock: Clock | None = None,
                 config_source: str | Path | None = None, create: bool = True) -> None:
        """``create=False`` refuses a ledger that does not exist (``ledger_missing``): ``lanectl supervise
        --ledger PATH`` names one explicitly, and a typo must not start an empty ledger nothing reads.
        ``callback_socket`` and ``lane_uids`` (lane -> the uid its callbacks must come from) replace the
        configured socket path and the lane users' uids, ``clock`` the real clocks: for in-process tests only.
        ``config_source`` is what a reload loads (default: the fleet's config dir)."""
        self.fleet = fleet
        self.config_source = str(config_source or fleet.config_dir)
        self.reload_requested = False
        self.generation = 0
        """Configurations loaded since start: 0 the first, +1 per successful reload (in /healthz)."""
        self.reload_error: str | None = None
        self.reloads = 0
        """Reloads attempted since start (in /healthz, with ``generation`` and ``reload_error``)."""
        self.clock = clock or Clock()
        self.settings = fleet.settings
        self.ledger_path = ledger_path or paths.ledger_path(fleet.settings.ledger.path)
        self.create = create
        self.locks: list[int] = []
        """Exclusive flocks held for the supervisor's life: one per ledger, one per socket (lanectl.exclusive)."""
        self.bound: tuple[int, int] | None = None
        """(st_dev, st_ino) of the callback socket this supervisor bound: close() removes only that one."""
        self.notifier = notifier
        self.use_systemd = use_systemd
        self.stop = threading.Event()
        self.inbox: queue.Queue[Pending] = queue.Queue()
        self.results: queue.Queue[tuple[ms.Dispatch, int | None, str]] = queue.Queue()
        self.pool = ThreadPoolExecutor(max_workers=8, thread_name_prefix="dispatch")
        self.sel = selectors.DefaultSelector()
        self.wake_r, self.wake_w = os.pipe()
        os.set_blocking(self.wake_r, False)
        os.set_blocking(self.wake_w, False)
        self.sel.register(self.wake_r, selectors.EVENT_READ, None)
        self.lanes: dict[str, LaneWatch] = {}
        self.ledger: Ledger | None = None
        self.commits: Any = None
        self.server: ThreadingHTTPServer | None = None
        self.counters = {"dispatched": 0, "callbacks": 0, "rejected": 0, "dispatch_failed": 0, "failovers": 0}
        self.socket_path = Path(callback_socket or self.settings.supervisor.socket)
        self.fixed_uids = lane_uids
        self.lane_uids: dict[str, int] = dict(lane_uids or {})
        self.uids_at = 0.0
        self.unix_server: socketserver.ThreadingUnixStreamServer | None = None
        self.tcp_factory: Any = None
        self.tcp_tried = 0.0
        # callbacks refused before the ledger (no write): reason -> count; and rejections left unrecorded
        self.refused: dict[str, int] = {"unauthenticated": 0, "foreign_lane": 0, "tcp": 0, "unrecorded": 0}
        self.refused_lock = threading.Lock()
        self.buckets: dict[str, tuple[float, float]] = {}  # lane -> (tokens, monotonic time)
        self.rejected_per_s, self.rejected_burst = REJECTED_PER_S, float(REJECTED_BURST)
        self.last_tick = 0.0
        self.dirty = True
        self.data_version = -1
        self.summary: dict[str, Any] = {}
        self.metrics_lock = threading.Lock()
        self.metrics_cache: tuple[float, str] | None = None
        self.cancel_cursor = 0
        self.last_govern = 0.0
        self.settling = False
        self.last_systemd = 0.0
        self.settle_until = 0.0
        self.ledger_error: float | None = None
        self.alerted: dict[tuple[str, str], float] = {}
        self.checkpointer: Checkpointer | None = None
        self.log_read: Future[LogScan] | None = None
        self.started_at = 0.0  # the clock's reading when this process started supervising
        self.started_mono = 0.0
        self.next_rollup = 0.0  # monotonic time of the next roll-up (lanectl/ledger/rollups.py)
        self.full: set[str] = set()
        """Lanes that refused a dispatch as full (429) or stopping (503), or reported no room, since their last
        health report: the policy gives them nothing until the next one says otherwise (no hot loop of 429s)."""
        self.cancels: dict[tuple[int, str], list[float]] = {}
        """Cancels to forward: (mission, lane) -> [when next due (mono), backoff, 1 while a POST is out]."""
        self.cancel_results: queue.Queue[tuple[int, str, int | None]] = queue.Queue()
        self.pruning: threading.Thread | None = None
        self.next_prune = 0.0  # monotonic; set by run()
        self.last_prune: dict[str, Any] | None = None

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

    def _open(self) -> None:
        sync = self.settings.ledger.synchronous  # FULL: a callback is answered only once its commit is on disk
        self.ledger = Ledger.open(self.ledger_path, autocheckpoint=False, synchronous=sync, create=self.create)
        # WAL checkpoints off the dispatch path
        self.checkpointer = Checkpointer(self.ledger_path, synchronous=sync).start()
        from lanectl.watch import commit_watch

        self.commits = commit_watch(self.ledger_path)
        if self.commits is not None:
            self.sel.register(self.commits.fd, selectors.EVENT_READ, "commit")
        self.cancel_cursor = reads.last_event_id(self.ledger)
        state_dir = Path(self.settings.state_dir)
        lane_keys = keys.read_lane_keys(state_dir, sorted(self.fleet.lanes))
        for name, lane in sorted(self.fleet.lanes.items()):
            self.lanes[name] = LaneWatch(name, unit_name(name), lane.port, lane_keys[name], lane.health_path,
                                         lane.restart.max_restarts, lane.enabled)
        for name, inv in lane_ops.recorded_invocations(self.ledger).items():
            if name in self.lanes:
                self.lanes[name].recorded_invocation = inv
        self.resolve_uids()
        self.bind()

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

        assert self.ledger is not None
        self.reloads += 1
        self.notify("RELOADING=1\nSTATUS=reloading the configuration")
        try:
            fleet = config.load(self.config_source)
            lane_keys = keys.read_lane_keys(Path(fleet.settings.state_dir), sorted(fleet.lanes))
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
        assert self.ledger is not None
        old, new = set(self.lanes), set(fleet.lanes)
        for name in sorted(old - new):
            w = self.lanes.pop(name)
            self.unwatch_pid(w)
            self.drop_cancels(name)
            self.full.discard(name)
            self.lane_uids.pop(name, None)
            lost = ms.requeue_lane(self.ledger, name, "lane removed from the fleet", now=now)
            log.warning("lane %s removed from the fleet%s", name, f"; re-queued missions {lost}" if lost else "")
        recorded = lane_ops.recorded_invocations(self.ledger)
        for name in sorted(new):
            lane = fleet.lanes[name]
            w = self.lanes.get(name)
            if w is None:
                w = self.lanes[name] = LaneWatch(name, unit_name(name), lane.port, lane_keys[name], lane.health_path,
                                                 lane.restart.max_restarts, lane.enabled)
                w.recorded_invocation = recorded.get(name, "")
                log.info("lane %s added to the fleet (port %d)", name, lane.port)
            else:
                w.port, w.key, w.health_path = lane.port, lane_keys[name], lane.health_path
                w.max_restarts, w.enabled = lane.restart.max_restarts, lane.enabled
        for name, was, now_ in bound_settings(self.settings, fleet.settings):
            log.warning("%s changed (%r -> %r): it takes effect when the supervisor restarts", name, was, now_)
        self.fleet = fleet
        self.settings = fleet.settings
        if self.fixed_uids is None:
            self.resolve_uids()
        self.metrics_cache = None
        self.dirty = True
        self.last_systemd = 0.0  # look at systemd (and so the new lanes) at the next observation
        self.observe(now)

    # ------------------------------------------------------------------------------------------ who is calling
    def resolve_uids(self) -> None:
        """Each lane's uid (its unit's User=; config.py keeps them unique per lane). A lane whose user does not
        exist (yet) has none, and no callback is accepted for it."""
        self.uids_at = time.monotonic()
        if self.fixed_uids is not None:
            return
        out = {}
        for name, lane in self.fleet.lanes.items():
            try:
                out[name] = pwd.getpwnam(lane.resolved_user(name)).pw_uid
            except KeyError:
                pass
        self.lane_uids = out

    def lanes_of(self, uid: int) -> set[str]:
        """The lanes whose callbacks a peer running as ``uid`` may send (none: refused before reading the body)."""
        found = {name for name, u in self.lane_uids.items() if u == uid}
        if not found and time.monotonic() - self.uids_at >= UID_RESOLVE_S:  # a lane user created since
            self.resolve_uids()
            found = {name for name, u in self.lane_uids.items() if u == uid}
        return found

    def refuse(self, reason: str, n: int = 1) -> None:
        with self.refused_lock:
            self.refused[reason] += n

    def refused_counts(self) -> dict[str, int]:
        with self.refused_lock:
            return dict(self.refused)

    def record_rejection(self, cb: ms.Callback) -> bool:
        """Token bucket per lane (main thread only): may this rejection be written as a callback_rejected event?"""
        mono = time.monotonic()
        tokens, at = self.buckets.get(cb.lane, (self.rejected_burst, mono))
        tokens = min(self.rejected_burst, tokens + (mono - at) * self.rejected_per_s)
        ok = tokens >= 1.0
        self.buckets[cb.lane] = (tokens - 1.0 if ok else tokens, mono)
        if not ok:
            self.refuse("unrecorded")
        return ok

    def bind(self) -> None:
        sup = self

        class Handler(DeadlineHandler):  # a whole-request deadline: a slow client cannot hold a thread
            server_version = f"lanectl-supervisor/{__version__}"

            def log_message(self, fmt: str, *args: Any) -> None:
                log.debug("%s " + fmt, self.address_string(), *args)

            def _send(self, code: int, doc: dict[str, Any]) -> None:
                send_json(self, code, doc)

            def do_GET(self) -> None:  # noqa: N802
                path = self.path.split("?", 1)[0]
                if path == "/healthz":
                    self._send(200, sup.health())
                elif path == "/metrics":
                    body = sup.metrics_text().encode()
                    self.send_response(200)
                    self.send_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                else:
                    self._send(404, {"error": "not_found", "message": "GET /healthz or /metrics"})

            def do_POST(self) -> None:  # noqa: N802
                # read-only over TCP: anyone on the box can reach it, and nothing says who is calling
                try:
                    read_body(self)  # read (bounded) before answering: an unread body can turn the answer into a reset
                except BadMessage as exc:
                    self._send(exc.status, {"error": "bad_request", "message": str(exc)})
                    return
                if self.path.split("?", 1)[0].lstrip("/") == "callbacks":
                    sup.refuse("tcp")
                    self._send(403, {"error": "use_socket", "message": f"callbacks are taken only on the unix "
                                     f"socket {sup.socket_path} (LANECTL_CALLBACK_URL)"})
                else:
                    self._send(404, {"error": "not_found", "message": "GET /healthz or /metrics"})

        class CallbackHandler(DeadlineHandler):
            """POST /callbacks on the unix socket; the kernel says which uid is calling (SO_PEERCRED)."""

            server_version = f"lanectl-supervisor/{__version__}"

            def setup(self) -> None:
                super().setup()
                self.peer_pid, self.peer_uid, _ = peer_cred(self.connection)

            def address_string(self) -> str:
                return f"pid {self.peer_pid} uid {self.peer_uid}"

            def log_message(self, fmt: str, *args: Any) -> None:
                log.debug("%s " + fmt, self.address_string(), *args)

            def _send(self, code: int, doc: dict[str, Any]) -> None:
                send_json(self, code, doc)

            def do_GET(self) -> None:  # noqa: N802
                self._send(404, {"error": "not_found", "message": "POST /callbacks only"})

            def do_POST(self) -> None:  # noqa: N802
                try:
                    # the body is read (bounded: MAX_BODY, READ_TIMEOUT_S) before any answer: an unread body
                    # turns the answer into a connection reset on a unix socket
                    raw = read_body(self)
                    if self.path.split("?", 1)[0].lstrip("/") != "callbacks":
                        self._send(404, {"error": "not_found", "message": "POST /callbacks only"})
                        return
                    allowed = sup.lanes_of(self.peer_uid)
                    if not allowed:  # no lane runs as this uid: refused unparsed, no ledger write
                        sup.refuse("unauthenticated")
                        self._send(403, {"error": "not_a_lane", "message": f"uid {self.peer_uid} is no lane's user"})
                        return
                    msgs, batch = parse_callbacks(raw)
                    foreign = next((m.lane for m in msgs if m.lane not in allowed), None)
                    if foreign is not None:  # a lane speaking for another: all refused, no ledger write
                        sup.refuse("foreign_lane", len(msgs))  # every callback of the request
                        self._send(403, {"error": "not_your_lane", "message": f"uid {self.peer_uid} cannot send "
                                         f"callbacks of lane {foreign!r}"})
                        return
                    if not batch:
                        self._send(*sup.submit_callback(msgs[0]))
                        return
                    results = sup.submit_callbacks(msgs)  # one answer per callback, in order
                    self._send(200, {"results": [{"status": code, **doc} for code, doc in results]})
                except BadMessage as exc:
                    self._send(exc.status, {"error": "bad_request", "message": str(exc)})

        class Server(BoundedServer, ThreadingHTTPServer):
            daemon_threads = True
            allow_reuse_address = True
            request_queue_size = 256

        class UnixServer(BoundedServer, socketserver.ThreadingUnixStreamServer):
            daemon_threads = True
            request_queue_size = 256
            max_per_peer = SOCKET_PER_PEER

            def peer_key(self, request: Any) -> Any:
                try:
                    return peer_cred(request)[1]
                except OSError:
                    return None

        host = self.settings.supervisor.host
        if host not in ("127.0.0.1", "::1", "localhost"):  # the config model allows nothing else; belt and braces
            raise LanectlError(f"supervisor host {host!r} is not loopback", "use 127.0.0.1", "not_loopback")
        self.unix_server = UnixServer(str(self.bind_socket()), CallbackHandler, bind_and_activate=False)
        try:
            self.unix_server.server_bind()
            st = os.lstat(self.socket_path)
            self.bound = (st.st_dev, st.st_ino)
            os.chmod(self.socket_path, 0o666)  # any lane user may connect; SO_PEERCRED says who it is
            self.unix_server.server_activate()
        except OSError:
            self.unix_server.server_close()
            raise
        threading.Thread(target=self.unix_server.serve_forever, name="callbacks", kwargs={"poll_interval": 0.2},
                         daemon=True).start()
        self.tcp_factory = lambda: Server((host if host != "localhost" else "127.0.0.1", self.settings.supervisor.port),
                                          Handler)
        self.bind_tcp()

    def bind_tcp(self) -> None:
        """The read-only TCP listener (/healthz, /metrics). Callbacks do not need it: when its port is taken (by
        a process squatting it while the supervisor restarted) the supervisor runs on and tries again every
        TCP_RETRY_S, rather than fail and leave every lane's callbacks unanswered."""
        self.tcp_tried = time.monotonic()
        try:
            server = self.tcp_factory()
        except OSError as exc:
            log.error("cannot listen on %s:%d (%s); callbacks go on over %s, retrying every %gs",
                      self.settings.supervisor.host, self.settings.supervisor.port, exc.strerror or exc,
                      self.socket_path, TCP_RETRY_S)
            return
        self.server = server
        threading.Thread(target=server.serve_forever, name="http", kwargs={"poll_interval": 0.2},
                         daemon=True).start()

    def bind_socket(self) -> Path:
        """Make room for the callback socket: its directory exists (systemd's RuntimeDirectory=, else 0755 here),
        and a socket left by an earlier run is removed -- only when nobody accepts connections on it (a live one
        belongs to another supervisor, whatever its lock says: refused, ``supervisor_running``); anything else at
        the path is an error."""
        path = self.socket_path
        path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
        try:
            st = path.lstat()
        except FileNotFoundError:
            return path
        if not stat.S_ISSOCK(st.st_mode):
            raise LanectlError(f"{path} exists and is not a socket", "remove it, or set [supervisor] socket",
                               "socket_path")
        from lanectl import exclusive

        if exclusive.listening(path):
            raise exclusive.running(f"a process listens on the callback socket {path}: another supervisor runs")
        path.unlink()
        return path

    # ------------------------------------------------------------------------------------------ callbacks
    def submit_callback(self, msg: CallbackMsg) -> tuple[int, dict[str, Any]]:
        """Called from an HTTP thread: hand the callback to the main loop and wait for its verdict."""
        return self.submit_callbacks([msg])[0]

    def submit_callbacks(self, msgs: list[CallbackMsg]) -> list[tuple[int, dict[str, Any]]]:
        """Several callbacks of one request, handed over together (so they land in one group commit, in order);
        one verdict each."""
        futures: list[Future[tuple[int, dict[str, Any]]] | tuple[int, dict[str, Any]]] = []
        for msg in msgs:
            if msg.lane not in self.lanes:
                futures.append((409, {"error": "unknown_lane", "message": f"no lane {msg.lane!r}"}))
                continue
            fut: Future[tuple[int, dict[str, Any]]] = Future()
            futures.append(fut)
            self.inbox.put(Pending(msg, fut))
        self.wake()
        deadline = time.monotonic() + CALLBACK_WAIT_S
        out = []
        for f in futures:
            if not isinstance(f, Future):
                out.append(f)
                continue
            try:
                out.append(f.result(timeout=max(0.0, deadline - time.monotonic())))
            except TimeoutError:
                out.append((503, {"error": "busy", "message": "the supervisor did not answer in time; retry"}))
        return out

    def apply_callbacks(self, now: float) -> int:
        """Apply every callback that arrived since the last turn in one transaction (group commit).

        The batch is fenced and written by ``missions.apply_callbacks_in`` (one read, grouped writes). Should the
        batch fail for an unexpected reason, each callback is retried alone in its own savepoint, so a bug on one
        cannot fail the others; a broken ledger answers 500 and the lanes retry."""
        batch: list[Pending] = []
        while True:
            try:
                batch.append(self.inbox.get_nowait())
            except queue.Empty:
                break
        if not batch:
            return 0
        assert self.ledger is not None
        cbs = [self.as_callback(p.msg) for p in batch]
        lease = self.settings.leases.lease_sec
        answers: list[tuple[int, dict[str, Any]]] = []
        try:
            with self.ledger.transaction() as conn:
                outcomes = ms.apply_callbacks_in(conn, cbs, now=now, lease_sec=lease,
                                                 record_rejected=self.record_rejection)
            answers = [self.answer(cb, o) for cb, o in zip(cbs, outcomes)]
        except Exception:
            log.exception("applying a batch of %d callbacks failed; applying them one by one", len(batch))
            try:
                with self.ledger.transaction():
                    answers = [self.apply_one(cb, now) for cb in cbs]
            except Exception:
                log.exception("applying %d callbacks failed", len(batch))
                answers = [(500, {"error": "internal", "message": "the supervisor could not apply it; retry"})] \
                    * len(batch)
        for p, answer in zip(batch, answers):
            p.future.set_result(answer)
        if self.full:  # a lane that reports an outcome has a slot free again: no need to wait for its health report
            self.full.difference_update(cb.lane for cb in cbs if cb.kind in ("succeeded", "failed", "cancelled")
                                        and not cb.uncharged)
        # a lane that could not start a mission (no task or memory left) gets no work until one of its missions
        # ends or its next health report: the attempt went back uncharged, never a tight loop of refusals
        self.full.update(cb.lane for cb, (status, _) in zip(cbs, answers) if cb.uncharged and status == 200)
        self.dirty = True
        return len(batch)

    @staticmethod
    def as_callback(m: CallbackMsg) -> ms.Callback:
        if m.event == "succeeded":
            return ms.Callback("succeeded", m.mission, m.lane, m.attempt, m.token,
                               result={"exit_code": m.exit_code, "output_tail": m.output_tail})
        if m.event == "failed":
            err = m.error or (f"exit code {m.exit_code}" if m.exit_code is not None else "failed")
            # retry: the mission could not even start (EAGAIN, ENOMEM): the lane ran nothing, so the attempt goes
            # back uncharged and is no failure of the lane (as a 429), and the lane is full for now
            return ms.Callback("failed", m.mission, m.lane, m.attempt, m.token, error=err, uncharged=m.retry)
        return ms.Callback(m.event, m.mission, m.lane, m.attempt, m.token)

    def answer(self, cb: ms.Callback, o: ms.CallbackOutcome) -> tuple[int, dict[str, Any]]:
        self.counters["callbacks"] += 1
        if o.rejected is not None:
            self.counters["rejected"] += 1
            err = o.refusal(cb)
            return 409, {"error": err.code, "message": err.message}
        return 200, {"ok": True, "changed": o.changed, "state": o.state}

    def apply_one(self, cb: ms.Callback, now: float) -> tuple[int, dict[str, Any]]:
        """One callback in its own savepoint (the fallback when its batch failed)."""
        assert self.ledger is not None
        try:
            with self.ledger.transaction() as conn:
                out = ms.apply_callbacks_in(conn, [cb], now=now, lease_sec=self.settings.leases.lease_sec,
                                            record_rejected=self.record_rejection)
            return self.answer(cb, out[0])
        except Exception:
            log.exception("callback %s for mission=%d attempt=%d lane=%s failed", cb.kind, cb.mission, cb.attempt,
                          cb.lane)
            return 500, {"error": "internal", "message": "the supervisor could not apply it; retry"}

    # ------------------------------------------------------------------------------------------ dispatch
    def send(self, d: ms.Dispatch) -> None:
        lane = self.lanes[d.lane]
        body = json.dumps(DispatchMsg(d.mission, d.attempt, d.lane, d.token, d.cls, d.session, d.deadline,
                                      d.payload).as_json()).encode()

        def post() -> None:
            req = urllib.request.Request(f"http://127.0.0.1:{lane.port}/missions", data=body, method="POST",
                                         headers={"Content-Type": "application/json",
                                                  "Authorization": f"Bearer {lane.key}"})
            try:
                with urllib.request.urlopen(req, timeout=DISPATCH_TIMEOUT_S) as resp:
                    resp.read()
                    self.results.put((d, resp.status, ""))
            except urllib.error.HTTPError as exc:
                self.results.put((d, exc.code, exc.read(500).decode(errors="replace")))
            except (OSError, ValueError) as exc:
                self.results.put((d, None, str(exc)))
            self.wake()

        self.pool.submit(post)

    def apply_results(self, now: float) -> None:
        assert self.ledger is not None
        while True:
            try:
                d, status, text = self.results.get_nowait()
            except queue.Empty:
                return
            if status is not None and 200 <= status < 300:
                continue
            self.counters["dispatch_failed"] += 1
            if status in (429, 503):
                # the lane ran nothing (full, or stopping): the mission goes back uncharged, and the lane gets no
                # more work until its next health report
                why = "lane full" if status == 429 else "lane stopping"
                log.info("mission=%d attempt=%d lane=%s: %s (HTTP %d), re-queued, not charged", d.mission, d.attempt,
                         d.lane, why, status)
                ms.return_attempt(self.ledger, d.mission, d.attempt, d.lane, d.token,
                                  f"{why} (HTTP {status}): not charged", now=now)
                self.full.add(d.lane)
                if status == 503:
                    self.set_health(self.lanes[d.lane], False, now, "it is stopping (HTTP 503 to a dispatch)")
                self.dirty = True
                continue
            reason = f"lane refused the dispatch (HTTP {status}): {text[:200]}" if status else f"lane unreachable: {text}"
            log.warning("mission=%d attempt=%d lane=%s: dispatch failed: %s", d.mission, d.attempt, d.lane, reason)
            try:
                ms.fail(self.ledger, d.mission, lane=d.lane, attempt=d.attempt, token=d.token, now=now,
                        error=reason, retry=True)
            except (Conflict, NotFound):
                pass  # already over (cancelled, or re-queued by a failover)
            if status is None or status >= 500:
                self.set_health(self.lanes[d.lane], False, now, f"dispatch failed: {reason}")
            self.dirty = True

    def tick(self, now: float) -> None:
        assert self.ledger is not None
        res = ticks.run_once(self.ledger, self.fleet, now=now, full=frozenset(self.full))
        self.last_tick = now
        for d in res.dispatches:
            self.counters["dispatched"] += 1
            self.send(d)
        self.forward_cancels()
        self.settle_drains(now)
        if now - self.last_govern >= self.settings.supervisor.tick_sec:
            self.last_govern = now
            self.govern(now)

    def govern(self, now: float) -> None:
        """Rollback triggers: drain a tripped lane, move its work to the fallback, snapshot, record; or alert
        instead when the trip is fleet-wide (the work's fault), when acting would take out the last healthy lane
        of a class, or when this pass already drained a lane for the same trigger (rollbacks are bounded)."""
        from lanectl import governance

        assert self.ledger is not None
        states = reads.lane_states(self.ledger)
        acted: dict[str, str] = {}  # trigger -> the lane this pass drained for it
        for trip in governance.rollback_trips(self.ledger, self.fleet, now=now, states=states):
            if trip.fleet_wide:
                self.alert(trip, now, lane=None, lanes=trip.lanes,
                           reason="not acted on: every lane with evidence shows it alike (the work, not a lane)")
                continue
            if trip.trigger == "fallback_spike":  # the policy already routes around a lane that cannot take work
                self.alert(trip, now, lane=trip.lane, reason="its pinned work goes to its fallback; not drained: "
                           "draining a lane that is away anyway would only keep it away once it is back")
                continue
            if trip.trigger in acted:
                self.alert(trip, now, lane=trip.lane, reason=f"not acted on: this pass already rolled back "
                                                             f"{acted[trip.trigger]} for {trip.trigger}")
                continue
            healthy = {n: w.healthy for n, w in self.lanes.items()}
            guard = governance.last_healthy_for(self.fleet, trip.lane, states, healthy)
            if guard:
                self.alert(trip, now, lane=trip.lane, classes=guard,
                           reason="not acted on: it is the last healthy lane for " + ", ".join(guard))
                continue
            self.rollback(trip, now)
            acted[trip.trigger] = trip.lane
            states[trip.lane] = "draining"

    def alert(self, trip: Any, now: float, *, lane: str | None, reason: str, **data: Any) -> None:
        """An ``alert`` event instead of an action, at most once per ``rollback.cooldown_sec`` per lane (or the
        fleet) and trigger."""
        assert self.ledger is not None
        key = (trip.lane, trip.trigger)
        if now - self.alerted.get(key, float("-inf")) < self.settings.rollback.cooldown_sec:
            return
        self.alerted[key] = now
        log.warning("rollback trigger %s on lane=%s: %s", trip.trigger, lane or "*", reason)
        lane_ops.record(self.ledger, EventKind.ALERT, now=now, lane=lane, trigger=trip.trigger, detail=trip.detail,
                        evidence=trip.evidence, actor="lanectl-supervisor", reason=reason, **data)

    def rollback(self, trip: Any, now: float) -> None:
        assert self.ledger is not None
        who = "lanectl-supervisor"
        why = f"rollback: {trip.trigger}"
        fallback = self.fleet.lanes[trip.lane].fallback
        lane_ops.drain(self.ledger, self.fleet, trip.lane, now=now, reason=why, who=who)
        moved: dict[str, Any] = {}
        if fallback:
            res = lane_ops.reroute(self.ledger, self.fleet, trip.lane, fallback, now=now, sessions=True, reason=why,
                                   who=who)
            moved = {"missions": len(res.missions), "sessions": res.sessions}
        snap_dir = Path(self.settings.state_dir) / "snapshots"
        path = self.snapshot_async(trip.lane, snap_dir, why, now) if self.settings.rollback.snapshots else None
        lane_ops.record(self.ledger, EventKind.ROLLBACK, now=now, lane=trip.lane, trigger=trip.trigger,
                        detail=trip.detail, evidence=trip.evidence, fallback=fallback, moved=moved, snapshot=path,
                        actor=who, reason=trip.detail)
        self.lanes[trip.lane].state = "draining"
        log.warning("lane=%s rolled back (%s): drained, work moved to %s, snapshot %s", trip.lane, trip.detail,
                    fallback or "nowhere (no fallback)", path)
        self.dirty = True

    def snapshot_async(self, lane: str, out: Path, reason: str, now: float) -> str:
        """Capture in a thread (systemctl, journalctl and an integrity check may take seconds; the main loop must
        keep pinging the watchdog); returns where it will be."""
        from lanectl import snapshot

        def run() -> None:
            try:
                snapshot.capture(self.fleet, self.ledger_path, out, lane=lane, reason=reason,
                                 actor="lanectl-supervisor", now=now)
            except Exception:
                log.exception("lane=%s: snapshot failed", lane)

        threading.Thread(target=run, name="snapshot", daemon=True).start()
        return str(snapshot.final_path(out, lane, now))

    def forward_cancels(self) -> None:
        """A mission cancelled while a lane ran it: tell that lane to stop it (after the cancel committed)."""
        assert self.ledger is not None
        top = reads.last_event_id(self.ledger)
        if top == self.cancel_cursor:
            return
        rows = reads.cancels_between(self.ledger, self.cancel_cursor, top)
        self.cancel_cursor = top
        mono = self.clock.mono()
        for mission, lane in rows:
            if lane in self.lanes:
                self.cancels.setdefault((mission, lane), [mono, CANCEL_RETRY_S, 0])
        self.send_cancels(mono)

    def send_cancels(self, mono: float) -> None:
        """POST the cancels that are due; each is sent again (backing off) until its lane answers 202 or 404."""
        for (mission, lane), entry in self.cancels.items():
            if entry[2] or entry[0] > mono:
                continue
            entry[2] = 1
            w = self.lanes[lane]
            req = urllib.request.Request(f"http://127.0.0.1:{w.port}/missions/{mission}/cancel", data=b"{}",
                                         method="POST", headers={"Content-Type": "application/json",
                                                                 "Authorization": f"Bearer {w.key}"})

            def post(req: urllib.request.Request = req, mission: int = mission, lane: str = lane) -> None:
                status: int | None = None
                try:
                    with urllib.request.urlopen(req, timeout=DISPATCH_TIMEOUT_S) as resp:
                        resp.read()
                        status = resp.status
                except urllib.error.HTTPError as exc:
                    status = exc.code
                except (OSError, ValueError):
                    pass
                self.cancel_results.put((mission, lane, status))
                self.wake()

            self.pool.submit(post)

    def apply_cancel_results(self, mono: float) -> None:
        while True:
            try:
                mission, lane, status = self.cancel_results.get_nowait()
            except queue.Empty:
                break
            entry = self.cancels.get((mission, lane))
            if entry is None:
                continue  # the lane's process is gone meanwhile: nothing left to stop
            if status is not None and (200 <= status < 300 or status == 404):
                del self.cancels[(mission, lane)]  # stopping, or not held (never got it, or over)
                continue
            log.warning("mission=%d lane=%s: the cancel did not reach the lane (%s); retrying in %gs", mission, lane,
                        f"HTTP {status}" if status else "unreachable", entry[1])
            entry[:] = [mono + entry[1], min(entry[1] * 2, CANCEL_RETRY_MAX_S), 0]
        if self.cancels:
            self.send_cancels(mono)

    def drop_cancels(self, lane: str) -> None:
        """The lane's process is gone: what it ran is stopped with it."""
        for key in [k for k in self.cancels if k[1] == lane]:
            del self.cancels[key]

    # ------------------------------------------------------------------------------------------ lanes
    def set_health(self, lane: LaneWatch, healthy: bool, now: float, why: str = "") -> None:
        if lane.healthy == healthy and lane.health_recorded:
            return
        # a lane that should take work and stops answering is a warning; one drained, disabled or not up yet (this
        # process's first look) is not
        should_run = lane.enabled and lane.state in ("active", "degraded")
        if healthy:
            log.info("lane=%s healthy", lane.name)
        else:
            log.log(logging.WARNING if should_run and lane.health_recorded else logging.INFO,
                    "lane=%s down: %s%s", lane.name, why or "not healthy",
                    "" if should_run else f" ({lane.state if lane.enabled else 'disabled'}: not expected to run)")
        lane.health_recorded = True
        lane.healthy = healthy
        lane.healthy_since = now if healthy else None
        assert self.ledger is not None
        ms.set_lane(self.ledger, lane.name, now=now, healthy=healthy)
        self.dirty = True

    def watch_pid(self, lane: LaneWatch, pid: int) -> None:
        if pid == lane.main_pid and lane.pidfd is not None:
            return
        if pid <= 0 and lane.pidfd is not None:
            # systemd names no main process (the unit is stopping) but ours may still run: keep watching it until
            # it is gone, or its exit would go unseen (its pidfd turns readable then, and lane_exited re-queues)
            return
        self.unwatch_pid(lane)
        lane.main_pid = pid
        if pid <= 0:
            return
        try:
            lane.pidfd = os.pidfd_open(pid)
        except OSError:  # gone already, or no pidfd support: the next observation notices
            lane.pidfd = None
            return
        self.sel.register(lane.pidfd, selectors.EVENT_READ, lane.name)

    def unwatch_pid(self, lane: LaneWatch) -> None:
        if lane.pidfd is not None:
            self.sel.unregister(lane.pidfd)
            os.close(lane.pidfd)
            lane.pidfd = None

    def lane_uid(self, name: str) -> int | None:
        """The uid of the lane's user, who owns its workspace and everything its runtime writes there."""
        if name not in self.lane_uids and self.fixed_uids is None:
            self.resolve_uids()  # a lane user created since
        return self.lane_uids.get(name)

    def read_lane_log(self, lane: LaneWatch) -> list[dict[str, Any]]:
        """The authentic entries of a lane's execution log. The read runs in a thread with a deadline: whatever sits
        in the workspace, the main loop waits at most LOG_READ_TIMEOUT_S, and never again while a read hangs."""
        if self.log_read is not None and not self.log_read.done():
            log.warning("lane=%s: execution log not read: an earlier read has not returned", lane.name)
            return []
        uid = self.lane_uid(lane.name)
        if uid is None:
            log.warning("lane=%s: execution log not read: its user %s does not exist", lane.name,
                        self.fleet.lanes[lane.name].resolved_user(lane.name))
            return []
        workspace = Path(self.fleet.lanes[lane.name].workspace)
        fut: Future[LogScan] = Future()
        key = log_key(lane.key, lane.name)

        def read() -> None:  # a daemon thread: one that never returned would not hold up the supervisor's exit
            try:
                fut.set_result(scan_execution_log(workspace, owner=uid, key=key))
            except BaseException as exc:
                fut.set_exception(exc)

        self.log_read = fut
        threading.Thread(target=read, name="execlog", daemon=True).start()
        wait = min(LOG_READ_TIMEOUT_S, self.settings.supervisor.watchdog_sec / 4)
        try:
            scan = fut.result(timeout=wait)
        except TimeoutError:
            log.warning("lane=%s: execution log not read within %gs", lane.name, wait)
            return []
        except Exception:
            log.exception("lane=%s: reading the execution log failed", lane.name)
            return []
        if scan.refused:
            log.warning("lane=%s: execution log not read: %s", lane.name, scan.refused)
        if scan.unauthentic:
            log.warning("lane=%s: %d line(s) of its execution log failed authentication and were ignored",
                        lane.name, scan.unauthentic)
        return scan.entries

    def settle_from_log(self, lane: LaneWatch, invocation: str, now: float) -> list[int]:
        """Before re-queuing a dead lane's missions: the outcomes it logged but could not report yet.

        The runtime appends the end of every execution to ``WORKSPACE/.lanectl/executions.log`` before it sends
        the callback; a lane killed between the two would otherwise have its finished work run a second time.
        Missions run as the lane's user and can write that file too: only lines whose MAC verifies under the
        lane's log key (which only its runtime holds) count, and only for that lane, invocation and current
        attempt; anything else there costs at most a re-run.
        """
        assert self.ledger is not None
        active = reads.active_attempts(self.ledger, lane.name)
        if not active or not invocation:
            return []
        settled = []
        for entry in self.read_lane_log(lane):
            key = (entry.get("mission"), entry.get("attempt"))
            if (entry.get("event") != "end" or key not in active or entry.get("lane") != lane.name
                    or entry.get("invocation") != invocation or entry.get("outcome") not in ("succeeded", "failed")):
                continue
            code = entry.get("exit_code")
            error = entry.get("error")
            result = {"exit_code": code if type(code) is int else None, "output_tail": None}
            if ms.settle_from_lane(self.ledger, key[0], key[1], lane.name, entry["outcome"], now=now, result=result,
                                   error=error if isinstance(error, str) else None):
                settled.append(key[0])
                active.discard(key)
        if settled:
            log.info("lane=%s: settled %s from its execution log", lane.name,
                     " ".join(f"mission={m}" for m in settled))
        return settled

    def lane_exited(self, lane: LaneWatch, now: float) -> None:
        """The lane's main process is gone (crash, watchdog kill, stop): what it held cannot complete."""
        assert self.ledger is not None
        self.unwatch_pid(lane)
        lane.main_pid = 0
        self.drop_cancels(lane.name)
        self.full.discard(lane.name)
        self.settle_from_log(lane, lane.invocation or lane.recorded_invocation, now)
        lost = ms.requeue_lane(self.ledger, lane.name, "lane process exited", now=now)
        if lost:
            self.counters["failovers"] += 1
            log.warning("lane=%s exited; re-queued %s", lane.name, " ".join(f"mission={m}" for m in lost))
        self.set_health(lane, False, now, "its process exited")
        self.settling = True
        self.settle_until = self.clock.mono() + SETTLE_S
        self.dirty = True

    def observe(self, now: float) -> None:
        """systemd's view and the health endpoint of every lane; invocation changes, degradation, recovery."""
        assert self.ledger is not None
        watches = list(self.lanes.values())
        mono = self.clock.mono()
        # process exits come through pidfds at once; systemd itself is asked less often unless a lane is settling
        ask = self.use_systemd and (self.settling or mono - self.last_systemd >= self.settings.health.systemd_sec)
        if ask:
            self.last_systemd = mono
            props = systemd.show([w.unit for w in watches], ("Id", "ActiveState", "SubState", "MainPID",
                                                             "InvocationID", "NRestarts"))
        else:
            props = {}
        healths = check_health_many([(w.port, w.health_path) for w in watches], self.settings.health.health_timeout_sec)
        # who holds each lane's port: only the lane's own user may (with systemd: real lane users)
        holders = tcp_listener_uids({w.port for w in watches}) if self.use_systemd else {}
        states = reads.lane_states(self.ledger)
        for w, h in zip(watches, healths):
            p = props.get(w.unit, {})
            w.state = states.get(w.name, "active")
            w.active, w.sub = p.get("ActiveState", w.active), p.get("SubState", w.sub)
            delta = 0
            if "NRestarts" in p:  # only when systemd was asked this turn (an empty answer is not zero restarts)
                restarts = int(p["NRestarts"] or 0)
                delta = restarts - w.restarts if w.restarts >= 0 and restarts > w.restarts else 0
                w.restart_times.extend([now] * delta)
                w.unrecorded_restarts += delta
                w.restarts = restarts
            window = self.settings.health.restart_window_sec
            while w.restart_times and w.restart_times[0] < now - window:
                w.restart_times.popleft()
            inv = p.get("InvocationID", "")
            if w.running and inv and inv != w.invocation:
                prev = w.invocation or w.recorded_invocation  # at start: the invocation of before the outage
                if prev and prev != inv:  # that one is gone: what it logged as done but could not report
                    self.settle_from_log(w, prev, now)
                # only restarts systemd did on its own (NRestarts) count: an operator's `lanectl restart` or
                # `apply` starts a new invocation with restarts 0; None: the supervisor cannot tell (it was down)
                lost = ms.set_lane(self.ledger, w.name, now=now, invocation=inv,
                                   restarts=w.unrecorded_restarts if w.invocation else None)
                w.unrecorded_restarts = 0
                if lost:
                    self.counters["failovers"] += 1
                self.drop_cancels(w.name)
                w.invocation = inv
                self.dirty = True
            if ask:
                self.watch_pid(w, int(p.get("MainPID") or 0) if w.running else 0)
                if (w.active in ("failed", "inactive") and w.pidfd is None
                        and lane_ops.in_flight(self.ledger, w.name)):
                    self.lane_exited(w, now)  # its process is gone and the pidfd missed it: re-queue at once
            body = h.body or {}
            ok = h.ok and (not self.use_systemd or w.running) and body.get("lane", w.name) == w.name
            why = ("" if ok else f"unit {w.active}/{w.sub}" if self.use_systemd and not w.running
                   else f"health endpoint: {h.error or f'HTTP {h.http_status}'}" if not h.ok
                   else f"its health endpoint answers as lane {body.get('lane')!r}")
            uid = self.lane_uid(w.name) if holders else None
            if ok and uid is not None and holders.get(w.port) != {uid}:
                ok = False  # another process holds the lane's port: it would get the lane's dispatches and key
                why = f"port {w.port} held by another user"
                if self.alerted.get((w.name, "port_taken"), 0.0) < now - 60:
                    self.alerted[(w.name, "port_taken")] = now
                    log.error("lane=%s: port %d is held by uid(s) %s, not by the lane's user (uid %d): no work is "
                              "sent there", w.name, w.port, sorted(holders.get(w.port) or ()), uid)
            self.set_health(w, ok, now, why)
            self.full.discard(w.name)
            if ok:
                w.held = {int(x) for x in body.get("missions", []) if isinstance(x, int)}
                w.held |= {int(x) for x in body.get("reporting", []) if isinstance(x, int)}
                cap = body.get("capacity")
                if isinstance(cap, int) and isinstance(body.get("in_flight"), int) and body["in_flight"] >= cap:
                    self.full.add(w.name)
                if w.held and (not self.use_systemd or body.get("invocation") in (None, w.invocation)):
                    # what the lane says it holds is alive: its lease runs on, even when its heartbeats are late
                    lease = self.settings.leases.lease_sec
                    ms.extend_leases(self.ledger, until=now + lease, below=now + lease / 2, lane=w.name,
                                     missions=sorted(w.held))
            self.judge(w, now)
        # for a while after a lane went down, look again soon: its new invocation should be seen at once (a lane
        # stopped on purpose must not keep systemd busy forever, hence the time limit)
        self.settling = mono < self.settle_until and any(w.enabled and not (w.running and w.healthy)
                                                          for w in watches)

    def judge(self, w: LaneWatch, now: float) -> None:
        """Degrade a lane whose unit failed or that restarts too often; let a stable one recover.

        A restart storm is ``restart.max_restarts`` restarts systemd did on its own (NRestarts) within
        ``health.restart_window_sec``; the lane's start limit is above it (config), so systemd is still restarting
        it when it is degraded. A degraded lane that has been up and healthy for ``health.recover_sec`` with no
        restart in that time becomes active again, with its restart count and its evidence window started afresh.
        """
        assert self.ledger is not None
        storm = len(w.restart_times) >= w.max_restarts
        recover = self.settings.health.recover_sec
        if w.state == "active" and w.enabled and (w.active == "failed" or storm):
            why = ("unit failed" if w.active == "failed" else
                   f"restart_instability: {len(w.restart_times)} restarts in "
                   f"{self.settings.health.restart_window_sec:g}s >= {w.max_restarts}")
            guard = self.last_healthy_classes(w.name) if w.active != "failed" else []
            if guard:  # a restarting lane that is still the only one for a class keeps serving it
                from lanectl.governance import Trip

                self.alert(Trip(w.name, "restart_instability", why), now, lane=w.name, classes=guard,
                           reason="not degraded: it is the last healthy lane for " + ", ".join(guard))
                return
            self.degrade(w, why, now)
        elif (w.state == "degraded" and w.healthy and w.healthy_since is not None
              and now - w.healthy_since >= recover
              and (not w.restart_times or now - w.restart_times[-1] >= recover)):
            with self.ledger.transaction() as conn:
                lane_ops.mark_recovered(conn, w.name, now=now)
                append(conn, EventKind.LANE_STATE, now, lane=w.name, to="active", previous="degraded",
                       reason=f"healthy for {recover:g}s")
            w.state = "active"
            log.info("lane=%s active again: healthy for %gs", w.name, recover)
            w.restart_times.clear()  # the storm that degraded it is over: count afresh
            self.dirty = True

    def last_healthy_classes(self, lane: str) -> list[str]:
        from lanectl import governance

        assert self.ledger is not None
        states = reads.lane_states(self.ledger)
        return governance.last_healthy_for(self.fleet, lane, states, {n: w.healthy for n, w in self.lanes.items()})

    def degrade(self, w: LaneWatch, why: str, now: float) -> None:
        assert self.ledger is not None
        fallback = self.fleet.lanes[w.name].fallback
        with self.ledger.transaction() as conn:
            lane_ops.mark_degraded(conn, w.name, now=now)
            append(conn, EventKind.LANE_STATE, now, lane=w.name, to="degraded", previous=w.state, reason=why,
                   fallback=fallback)
        w.state = "degraded"
        log.warning("lane=%s degraded (%s); fallback %s", w.name, why, fallback or "none")
        if fallback:
            sessions = reads.session_ids(self.ledger, w.name)
            for s in sessions:
                try:
                    ms.move_session(self.ledger, s, fallback, now=now, reason=f"failover: {w.name} degraded")
                except LanectlError as exc:
                    log.info("session=%s stays on lane=%s for now: %s", s, w.name, exc.message)
        self.dirty = True

    def reconcile(self, now: float) -> None:
        """After a supervisor restart: attempts an earlier process gave to a lane that the lane does not hold (by
        its last health report), and that are at least RECONCILE_GRACE_S old, are lost. Runs at the start and after
        every observation for RECONCILE_FOR_S, so an attempt recorded just before a crash is re-queued within
        seconds rather than when its lease runs out."""
        assert self.ledger is not None
        before = min(now - RECONCILE_GRACE_S, self.started_at or now)
        for w in self.lanes.values():
            if not w.healthy:
                continue
            for mission, attempt in ms.active_on(self.ledger, w.name, dispatched_before=before):
                if mission in w.held:
                    continue
                ms.lose_attempt(self.ledger, mission, attempt, w.name, "lane does not hold it (supervisor restart)",
                                now=now)
                self.dirty = True

    def settle_drains(self, now: float) -> None:
        assert self.ledger is not None
        for name in reads.draining_idle(self.ledger):
            with self.ledger.transaction() as conn:
                if lane_ops.mark_drained(conn, name, now=now):
                    append(conn, EventKind.LANE_STATE, now, lane=name, to="drained", previous="draining",
                           reason="nothing in flight")

    # ------------------------------------------------------------------------------------------ loop
    def wake(self) -> None:
        try:
            os.write(self.wake_w, b"x")
        except BlockingIOError:
            pass  # a wake-up is pending already

    def metrics_text(self) -> str:
        """Prometheus exposition of the metrics over METRICS_WINDOW_S, from a read-only connection of the calling
        (HTTP) thread, cached for METRICS_CACHE_S so that scrapes cannot load the ledger; then this process's
        refusal counters."""
        from lanectl import evidence

        with self.metrics_lock:
            now = self.clock.now()
            if self.metrics_cache is None or now - self.metrics_cache[0] >= METRICS_CACHE_S:
                ro = Ledger.open_readonly(self.ledger_path, timeout_s=5)
                try:
                    m = evidence.metrics_conn(ro, window_s=METRICS_WINDOW_S, now=now, fleet=self.fleet)
                finally:
                    ro.close()
                self.metrics_cache = (now, evidence.prometheus_text(m, generated=now))
            text = self.metrics_cache[1]
        return text + self.refusal_text()

    def refusal_text(self) -> str:
        """Counters of this process (since it started): callbacks refused without a ledger write, and connections
        turned away because a server was full."""
        with self.refused_lock:
            refused = dict(self.refused)
        out = ["# HELP lanectl_callbacks_refused_total Callbacks refused without a ledger write since the supervisor "
               "started (foreign_lane: every callback of a request that spoke for another lane; tcp, "
               "unauthenticated: requests, refused unread) or rejected without a callback_rejected event "
               "(unrecorded: over the per-lane rate).",
               "# TYPE lanectl_callbacks_refused_total counter"]
        out += [f'lanectl_callbacks_refused_total{{reason="{k}"}} {v}' for k, v in sorted(refused.items())]
        out += ["# HELP lanectl_connections_refused_total Connections answered 503 because the server was full.",
                "# TYPE lanectl_connections_refused_total counter"]
        for name, srv in (("tcp", self.server), ("socket", self.unix_server)):
            out.append(f'lanectl_connections_refused_total{{server="{name}"}} {getattr(srv, "refused", 0)}')
        return "\n".join(out) + "\n"

    def health(self) -> dict[str, Any]:
        return {"pid": os.getpid(), "version": __version__, "ledger": str(self.ledger_path),
                "generation": self.generation, "reloads": self.reloads, "reload_error": self.reload_error,
                **self.summary}

    def refresh_summary(self) -> None:
        assert self.ledger is not None
        counts = ms.state_counts(self.ledger.conn)  # every second: must not count a million-row queue
        up = sum(1 for w in self.lanes.values() if w.healthy)
        self.summary = {
            "lanes": {w.name: {"state": w.state, "healthy": w.healthy, "unit": f"{w.active}/{w.sub}",
                               "invocation": w.invocation, "restarts": w.restarts} for w in self.lanes.values()},
            "lanes_up": up, "queued": counts.get("queued", 0),
            "in_flight": counts.get("dispatched", 0) + counts.get("running", 0),
            "counters": dict(self.counters), "refused": self.refused_counts(), "last_tick": self.last_tick,
            "clock_skew_s": round(self.clock.skew(), 3),
        }

    def status_line(self) -> str:
        s = self.summary
        return (f"{s.get('lanes_up', 0)}/{len(self.lanes)} lanes up; {s.get('queued', 0)} queued, "
                f"{s.get('in_flight', 0)} in flight; {self.counters['dispatched']} dispatched, "
                f"{self.counters['failovers']} failovers")

    def notify(self, msg: str) -> None:
        if self.notifier is not None:
            self.notifier.send(msg)

    def run(self) -> int:
        self.open()
        assert self.ledger is not None
        now = self.clock.now()
        self.started_at, self.started_mono = now, self.clock.mono()
        self.observe(now)  # what every lane holds, before anything is reaped
        # the outage is forgiven: every lease runs from the supervisor's return; what a lane holds is kept alive by
        # its heartbeats and health reports, what it does not hold is reconciled below
        moved = ms.extend_leases(self.ledger, until=now + self.settings.leases.lease_sec)
        if moved:
            log.info("%d leases restarted from now (the supervisor was away)", moved)
        self.reconcile(now)
        self.refresh_summary()
        # Everything imported and built so far lives as long as the process: keep it out of the collector's
        # full passes, which otherwise walk it inside a tick now and then (docs/benchmarks.md, dispatch latency).
        gc.freeze()
        self.notify("READY=1\nSTATUS=" + self.status_line())
        log.info("supervising %d lanes; callbacks on %s, /healthz and /metrics on %s:%d", len(self.lanes),
                 self.socket_path, self.settings.supervisor.host, self.settings.supervisor.port)
        from lanectl.runtime import Notifier

        ping = Notifier.watchdog_interval() or 1.0
        last_ping = last_observe = last_summary = self.clock.mono()
        self.next_prune = last_ping + RETENTION_FIRST_S
        while not self.stop.is_set():
            mono = self.clock.mono()
            try:
                if self.reload_requested:
                    self.reload_requested = False
                    self.reload(self.clock.now())
                last_observe = self.turn(mono, last_observe)
                self.ledger_error = None
            except (LedgerError, LanectlError, OSError) as exc:
                # the ledger cannot be written (disk full, I/O error, locked past the timeout): keep the watchdog
                # fed and the callbacks answered (500: the lanes retry), and try again shortly
                if self.ledger_error is None or mono - self.ledger_error >= 5.0:
                    log.error("ledger unavailable, retrying: %s", exc)
                    self.ledger_error = mono
                self.dirty = True
                self.stop.wait(0.2)
            if self.server is None and self.tcp_factory is not None and mono - self.tcp_tried >= TCP_RETRY_S:
                self.bind_tcp()
            if mono - last_ping >= ping:
                self.notify("WATCHDOG=1")
                last_ping = mono
            self.maybe_prune(mono)
            if mono - last_summary >= 1.0:
                try:
                    self.refresh_summary()
                except (LedgerError, LanectlError):
                    pass
                self.notify("STATUS=" + self.status_line())
                last_summary = mono
            self.wait(POLL_S if self.commits is None else IDLE_S)
        self.notify("STOPPING=1\nSTATUS=stopping")
        self.close()
        return 0

    def turn(self, mono: float, last_observe: float) -> float:
        """One turn of the main loop (the module docstring lists the steps); returns when it last observed."""
        assert self.ledger is not None
        now = self.clock.now()
        self.apply_callbacks(now)
        self.apply_results(now)
        every = min(0.25, self.settings.health.observe_sec) if self.settling else self.settings.health.observe_sec
        if mono - last_observe >= every:
            self.observe(now)
            last_observe = mono
            if mono - self.started_mono <= RECONCILE_FOR_S + every:
                self.reconcile(now)
        if self.cancels or not self.cancel_results.empty():
            self.apply_cancel_results(mono)
        version = self.ledger.data_version()
        if version != self.data_version or self.dirty or now - self.last_tick >= self.settings.supervisor.tick_sec:
            self.data_version = version
            self.dirty = False
            self.tick(self.clock.now())
        if mono >= self.next_rollup:
            self.roll_up(mono)
        return last_observe

    def roll_up(self, mono: float) -> None:
        """Roll closed buckets of traffic up for report and long metrics windows: a couple per turn, each turn
        a short write transaction, so a ledger with a long history catches up without holding callbacks."""
        assert self.ledger is not None
        try:
            with self.ledger.transaction() as conn:
                rolled = rollups.roll_up(conn, self.clock.now())
        except (LedgerError, LanectlError) as exc:
            log.warning("rolling metrics up failed (report reads raw events meanwhile): %s", exc)
            rolled = 0
        self.next_rollup = mono + (0.5 if rolled else ROLLUP_EVERY_S)

    # ------------------------------------------------------------------------------------------ retention
    def maybe_prune(self, mono: float) -> threading.Thread | None:
        """Start a retention pass in a thread when ``[ledger] retention`` is set, one is due and none is running."""
        led = self.settings.ledger
        if led.retention is None or mono < self.next_prune or (self.pruning and self.pruning.is_alive()):
            return None
        from lanectl.config import duration_s

        self.next_prune = mono + duration_s(led.prune_every)
        now = self.clock.now()

        def run() -> None:
            try:
                self.retention_pass(now)
            except Exception:  # a failed pass is logged and tried again at the next one; nothing was lost
                log.exception("retention pass failed")

        self.pruning = threading.Thread(target=run, name="retention", daemon=True)
        self.pruning.start()
        return self.pruning

    def retention_pass(self, now: float) -> Any:
        """Archive and delete finished history older than ``[ledger] retention`` (lanectl.ledger.retention.prune)
        into ``[ledger] archive_dir`` (default STATE_DIR/archive, created 0700), through a connection of its own.
        Returns the PruneResult, None when retention is off."""
        from lanectl.ledger import retention

        keep = self.settings.ledger.retention_s()
        if keep is None:
            return None
        where = Path(self.settings.ledger.archive_dir or Path(self.settings.state_dir) / "archive")
        where.mkdir(mode=0o700, parents=True, exist_ok=True)
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(now))
        with Ledger.open(self.ledger_path, synchronous=self.settings.ledger.synchronous, migrate=False) as led:
            res = retention.prune(led, cutoff=now - keep, archive=where / f"ledger-{stamp}.jsonl.gz", now=now,
                                  actor="supervisor")
        self.last_prune = res.as_dict()
        if res.archive is not None:
            log.info("retention: archived %d missions, %d attempts, %d events older than %s to %s; ledger %d -> %d "
                     "bytes", res.missions, res.attempts, res.events, self.settings.ledger.retention, res.archive,
                     res.file_bytes_before, res.file_bytes_after)
        return res

    def wait(self, timeout: float) -> None:
        ready = self.sel.select(timeout)
        now = self.clock.now()  # after the wait: events are stamped with when they were seen
        for key, _ in ready:
            if key.data is None:
                try:
                    while os.read(self.wake_r, 4096):
                        pass
                except BlockingIOError:
                    pass
            elif key.data == "commit":
                self.commits.drain()
            else:
                lane = self.lanes[key.data]
                try:
                    self.lane_exited(lane, now)
                except (LedgerError, LanectlError) as exc:
                    # not recorded: the next look at systemd sees the new invocation and re-queues then
                    log.error("lane=%s exited but the ledger is unavailable: %s", lane.name, exc)
                    self.settling = True
                    self.settle_until = self.clock.mono() + SETTLE_S

    def close(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
        if self.unix_server is not None:
            self.unix_server.shutdown()
            self.unix_server.server_close()
            try:  # only the socket this supervisor bound: never one another process put there since
                st = os.lstat(self.socket_path)
                if (st.st_dev, st.st_ino) == self.bound:
                    self.socket_path.unlink()
            except OSError:
                pass
        self.pool.shutdown(wait=False, cancel_futures=True)
        for w in self.lanes.values():
            self.unwatch_pid(w)
        if self.commits is not None:
            self.commits.close()
        if self.checkpointer is not None:
            self.checkpointer.stop()
        if self.ledger is not None:
            self.ledger.close()
        self.release_locks()

"""The lane side of the lane protocol: a Python SDK, and the reference lane runtime (``python -m lanectl.runtime``).

A lane listens on 127.0.0.1:$LANECTL_PORT and answers ``GET /healthz``; it accepts missions on ``POST /missions``
(authenticated with the lane's dispatch key, which systemd hands it in ``LANECTL_DISPATCH_KEY``) and
cancels on ``POST /missions/ID/cancel``; it reports ``started``, ``heartbeat``, ``succeeded``, ``failed`` and
``cancelled`` to ``$LANECTL_CALLBACK_URL`` (``unix:/run/lanectl/callbacks.sock``: HTTP over the supervisor's unix
socket) with the attempt's token, retrying until the supervisor answers; an answer counts only from a socket whose
listening process runs as the supervisor's uid (SO_PEERCRED, ``$LANECTL_SUPERVISOR_UID``, default 0). At start it
makes itself non-dumpable (``PR_SET_DUMPABLE`` 0) and wipes the dispatch key from its initial environment block, so
its missions (same uid) can read neither the key nor any token from ``/proc``. It
sends ``READY=1`` once it listens, ``WATCHDOG=1`` from the loop that does the work (a hung lane stops pinging and
systemd restarts it), and a one-line ``STATUS=``.

Threads: HTTP handlers (one per connection) only validate and enqueue; the main thread runs the work loop
(start, poll and reap mission processes, heartbeats, watchdog); one reporter thread delivers callbacks, so a
supervisor that is down never stalls the work loop.

The reference runtime runs ``payload.argv`` in the lane's workspace (``payload.timeout_sec``, default
``$LANECTL_MISSION_TIMEOUT`` or 3600 s) and keeps an execution log (``.lanectl/executions.log``, one authenticated
JSON line per start and end) in the workspace. It keeps each mission's stdout and stderr in
``.lanectl/out/MISSION-ATTEMPT.log``, at most ``[output] max_bytes`` of it (head and tail; ``lanectl.outcap``), and
keeps ``out/`` within ``keep_bytes`` and ``keep_files``. Other runtimes subclass :class:`LaneRuntime` and override
:meth:`start_mission` and :meth:`poll_mission`, or implement the same HTTP contract in any language.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import errno
import http.client
import json
import logging
import os
import queue
import signal
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import ThreadingHTTPServer
from pathlib import Path
from typing import Any

from lanectl import __version__, cgroups, landlock, outcap
from lanectl.notify import Notifier
from lanectl.protocol import (LOG_NAME, MAX_BODY, MAX_CALLBACK_BATCH, MAX_TAIL, STATE_DIR_NAME, BadMessage, BoundedServer, CallbackMsg,
                              DeadlineHandler, DispatchMsg, LogRefused, PeerMismatch, UnixHTTPConnection, bearer_ok,
                              callback_socket, log_key, open_state_dir, parse_dispatch, read_body,
                              sign_log_entry)

log = logging.getLogger("lanectl.runtime")
DEFAULT_WATCHDOG_PING_S = 1.0
DEFAULT_TIMEOUT_S = 3600.0
KILL_GRACE_S = 5.0
CALLBACK_TIMEOUT_S = 5.0
MAX_CONNECTIONS = 32
"""Connections the lane's HTTP server handles at once (the supervisor needs a few; one more is answered 503)."""
PR_SET_DUMPABLE = 4


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def make_undumpable() -> None:
    """PR_SET_DUMPABLE 0: /proc/PID/environ, mem, maps and friends become root's, and ptrace needs
    CAP_SYS_PTRACE, so the lane's missions (same uid) cannot read the dispatch key or the tokens this process
    holds. Mission processes are dumpable again (execve resets it)."""
    if _libc().prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_DUMPABLE, 0) failed")


def wipe_initial_env(name: str) -> None:
    """Overwrite the value of ``name`` in the process's initial environment block (what /proc/PID/environ shows,
    libc's getenv points into it) with zeros, then unset it."""
    value = os.environ.get(name)
    if value is not None:
        libc = _libc()
        libc.getenv.restype = ctypes.c_void_p
        ptr = libc.getenv(name.encode())
        if ptr:
            n = len(ctypes.string_at(ptr))  # the value as libc holds it
            ctypes.memset(ptr, 0, n)
    os.environ.pop(name, None)


@dataclass
class LaneInfo:
    lane: str
    port: int
    workspace: str
    session_prefix: str
    capacity: int
    callback_url: str = ""
    dispatch_key: str = ""
    supervisor_uid: int = 0
    heartbeat_sec: float = 5.0
    health_path: str = "/healthz"
    invocation: str = ""
    started_at: float = field(default_factory=time.time)

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> LaneInfo:
        e = os.environ if env is None else env
        missing = [k for k in ("LANECTL_LANE", "LANECTL_PORT") if not e.get(k)]
        if missing:
            raise SystemExit(f"lanectl.runtime: {', '.join(missing)} not set; the lane unit sets them "
                             "(run it through 'lanectl up', or export them for a local test)")
        url = e.get("LANECTL_CALLBACK_URL", "")
        if url:
            try:
                callback_socket(url)
            except ValueError as exc:
                raise SystemExit(f"lanectl.runtime: LANECTL_CALLBACK_URL: {exc}; 'lanectl install' writes "
                                 "unix:/run/lanectl/callbacks.sock") from None
        key = e.get("LANECTL_DISPATCH_KEY", "")
        if env is None:  # the process's own environment: it is a lane process (any runtime built on this SDK)
            make_undumpable()  # before anything secret is in memory: missions (same uid) cannot read /proc of it
            wipe_initial_env("LANECTL_DISPATCH_KEY")  # mission processes must not inherit it, nor read it
        return cls(
            lane=e["LANECTL_LANE"],
            port=int(e["LANECTL_PORT"]),
            workspace=e.get("LANECTL_WORKSPACE", os.getcwd()),
            session_prefix=e.get("LANECTL_SESSION_PREFIX", e["LANECTL_LANE"]),
            capacity=int(e.get("LANECTL_CAPACITY", "4")),
            callback_url=url,
            dispatch_key=key,
            supervisor_uid=int(e.get("LANECTL_SUPERVISOR_UID", "0")),
            heartbeat_sec=float(e.get("LANECTL_HEARTBEAT_SEC", "5")),
            health_path=e.get("LANECTL_HEALTH_PATH", "/healthz"),
            invocation=e.get("INVOCATION_ID", ""),
        )


@dataclass
class Running:
    """A mission this lane holds: accepted, then started, until it ends."""

    msg: DispatchMsg
    accepted_at: float
    proc: subprocess.Popen[bytes] | None = None
    started_at: float | None = None
    deadline_at: float | None = None
    last_heartbeat: float = 0.0
    cancel_requested: bool = False
    killed_at: float | None = None
    outcome: str | None = None  # timeout | cancelled | fenced
    out_path: Path | None = None
    capture: outcap.Capture | None = None  # the pump keeping its output within [output] max_bytes
    cg: cgroups.MissionCgroup | None = None
    exited_at: float | None = None  # its main process ended; what else ran in its cgroup is being killed
    exit_code: int | None = None


MISSION_OOM_SCORE_ADJ = b"500"


def prefer_as_oom_victim() -> None:
    """Should the lane as a whole run out of memory, the kernel kills a mission before its runtime (raising one's
    own oom_score_adj needs no privilege)."""
    try:
        fd = os.open("/proc/self/oom_score_adj", os.O_WRONLY | os.O_CLOEXEC)
        try:
            os.write(fd, MISSION_OOM_SCORE_ADJ)
        finally:
            os.close(fd)
    except OSError:
        pass


class CouldNotStart(Exception):
    """The mission's command never ran: the lane had no task or memory for it (EAGAIN, ENOMEM). Reported ``failed``
    with ``retry``: the supervisor returns the attempt uncharged, instead of failing a mission whose command did not
    run (and counting it against the lane)."""


START_ERRNOS = (errno.EAGAIN, errno.ENOMEM)
UNSHARE = "/usr/bin/unshare"


class Reporter(threading.Thread):
    """Delivers callbacks in order over the supervisor's unix socket, retrying with backoff until the supervisor
    answers (2xx, or a 4xx that says the attempt is no longer ours); never blocks the work loop. An answer counts
    only from a listener running as ``supervisor_uid`` (SO_PEERCRED): anything else keeps the callback.
    ``on_fenced`` is called with a ``started`` or ``heartbeat`` the supervisor fenced (409 ``lease_fenced``): the
    ledger no longer counts that attempt as running here, so the runtime stops it."""

    def __init__(self, url: str, supervisor_uid: int = 0,
                 on_fenced: Callable[[CallbackMsg], None] | None = None) -> None:
        super().__init__(name="reporter", daemon=True)
        self.on_fenced = on_fenced
        self.url = url
        self.path = callback_socket(url) if url else ""
        self.supervisor_uid = supervisor_uid
        self.q: queue.Queue[CallbackMsg | None] = queue.Queue()
        self.delivered = 0
        self.dropped = 0
        self.tries = 0  # delivery attempts, answered or not
        self.lock = threading.Lock()
        self.outcomes: set[int] = set()  # missions whose final callback is not delivered yet

    def send(self, msg: CallbackMsg) -> None:
        if msg.event in ("succeeded", "failed", "cancelled"):
            with self.lock:
                self.outcomes.add(msg.mission)
        self.q.put(msg)

    def reporting(self) -> list[int]:
        with self.lock:
            return sorted(self.outcomes)

    def pending(self) -> int:
        return self.q.qsize()

    def run(self) -> None:
        """Deliver what is queued, up to MAX_CALLBACK_BATCH callbacks per request: one round trip (and one group
        commit in the supervisor) for everything that happened since the last, in order."""
        stop = False
        while not stop:
            msg = self.q.get()
            if msg is None:
                return
            batch = [msg]
            while len(batch) < MAX_CALLBACK_BATCH:
                try:
                    nxt = self.q.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    stop = True
                    break
                batch.append(nxt)
            if self.q.qsize() > 100:  # under a backlog heartbeats are the first to go; outcomes never are
                kept = [m for m in batch if m.event != "heartbeat"] or batch[-1:]
                self.dropped += len(batch) - len(kept)
                batch = kept
            self._deliver_all(batch)

    def _done(self, msg: CallbackMsg) -> None:
        if msg.event in ("succeeded", "failed", "cancelled"):
            with self.lock:
                self.outcomes.discard(msg.mission)

    def _deliver_all(self, batch: list[CallbackMsg]) -> None:
        """Retry with backoff until every callback of the batch is answered for good (2xx, or a 4xx that says
        the attempt is no longer ours); those the supervisor could not take yet (429, 503) go again, in order."""
        if not self.url:
            return
        while batch:  # in requests that fit the supervisor's MAX_BODY, in order
            n = _fitting(batch)
            self._deliver_some(batch[:n])
            batch = batch[n:]

    def _deliver_some(self, batch: list[CallbackMsg]) -> None:
        backoff = 0.05
        while batch:
            if len(batch) == 1:
                verdicts = self._post_one(batch[0])
            else:
                verdicts = self._post_many(batch)
            if verdicts is not None:
                left = []
                for msg, (status, code) in zip(batch, verdicts):
                    if 200 <= status < 300:
                        self.delivered += 1
                        self._done(msg)
                    elif 400 <= status < 500 and status != 429:
                        log.warning("callback %s for mission=%d attempt=%d refused: HTTP %d", msg.event, msg.mission,
                                    msg.attempt, status)
                        self.dropped += 1
                        self._done(msg)
                        if (status == 409 and msg.event in ("started", "heartbeat") and self.on_fenced is not None
                                and code == "lease_fenced"):
                            self.on_fenced(msg)
                    else:
                        left.append(msg)
                if not left:
                    return
                batch = left
            time.sleep(backoff)
            backoff = min(backoff * 2, 2.0)

    def _post(self, body: bytes) -> tuple[int, bytes] | None:
        """One request; (status, body), or None when no answer came (or it came from the wrong listener)."""
        conn = UnixHTTPConnection(self.path, CALLBACK_TIMEOUT_S, expect_uid=self.supervisor_uid)
        self.tries += 1
        try:
            conn.request("POST", "/callbacks", body=body, headers={"Content-Type": "application/json",
                                                               "Connection": "close"})  # frees its slot at once
            resp = conn.getresponse()
            return resp.status, resp.read()
        except PeerMismatch as exc:
            log.warning("callback not sent: %s; retrying", exc)
        except (OSError, ValueError, http.client.HTTPException) as exc:
            log.debug("callback delivery failed (%s); retrying", exc)
        finally:
            conn.close()
        return None

    def _post_one(self, msg: CallbackMsg) -> list[tuple[int, str | None]] | None:
        got = self._post(json.dumps(msg.as_json()).encode())
        return None if got is None else [(got[0], _error_code(got[1]))]

    def _post_many(self, batch: list[CallbackMsg]) -> list[tuple[int, str | None]] | None:
        got = self._post(json.dumps({"callbacks": [m.as_json() for m in batch]}).encode())
        if got is None:
            return None
        status, body = got
        if status == 200:
            try:
                results = json.loads(body)["results"]
                if isinstance(results, list) and len(results) == len(batch):
                    return [(int(r["status"]), r.get("error")) for r in results]
            except (ValueError, KeyError, TypeError):
                pass
            log.warning("the supervisor's answer to %d callbacks was not understood; sending them one by one",
                        len(batch))
        elif not (status == 400 or status == 429 or status >= 500):
            return [(status, _error_code(body))] * len(batch)  # refused as a whole (403): each is refused
        elif status != 400:
            return [(status, None)] * len(batch)  # busy: all go again
        # 400 from a supervisor that takes one callback per request (or an answer not understood): one by one
        out: list[tuple[int, str | None]] = []
        for msg in batch:
            one = self._post_one(msg)
            out.append(one[0] if one is not None else (503, None))
        return out


BATCH_BYTES = MAX_BODY - 4096
"""What one request's callbacks may take encoded (the rest of MAX_BODY is the envelope's)."""


def _fitting(batch: list[CallbackMsg]) -> int:
    """How many callbacks from the front of ``batch`` fit one request (at least one): a full output tail of
    non-ASCII text encodes to ~25 KB, so 64 of them would not fit MAX_BODY."""
    size = 0
    for i, msg in enumerate(batch):
        size += len(json.dumps(msg.as_json()).encode()) + 2
        if size > BATCH_BYTES and i > 0:
            return i
    return len(batch)


def _error_code(body: bytes) -> str | None:
    try:
        doc = json.loads(body)
    except ValueError:
        return None
    return doc.get("error") if isinstance(doc, dict) else None


_APPEND = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC


def _move_aside(dir_fd: int, name: str, why: str) -> None:
    dest = f"{name}.refused-{time.time_ns()}"
    os.rename(name, dest, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    log.warning("%s: %s; moved it aside to %s", name, why, dest)


def own_state_dir(workspace: Path | str) -> int:
    """A descriptor of this lane's ``WORKSPACE/.lanectl``, created (0700) when missing. Whatever else sits there (a
    link, a file, a directory of another owner) is moved aside, never followed; its mode is given back (0700) when a
    mission (same uid) changed it (``chmod 000 .lanectl`` would otherwise wedge the lane)."""
    for _ in range(3):
        try:
            fd = open_state_dir(workspace, os.geteuid())
        except FileNotFoundError:
            pass
        except PermissionError:
            ws = os.open(workspace, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:  # a directory of ours we may not read: its mode back, then opened as usual
                os.close(outcap.open_own_dir(ws, STATE_DIR_NAME, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW
                                             | os.O_NONBLOCK | os.O_CLOEXEC))
            finally:
                os.close(ws)
            continue
        except LogRefused as exc:
            ws = os.open(workspace, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                _move_aside(ws, STATE_DIR_NAME, str(exc))
            finally:
                os.close(ws)
        else:
            try:
                outcap.restore_mode(fd)  # readable but not writable (chmod 500): its mode back as well
            except BaseException:
                os.close(fd)
                raise
            return fd
        ws = os.open(workspace, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.mkdir(STATE_DIR_NAME, 0o700, dir_fd=ws)
        except FileExistsError:
            pass
        finally:
            os.close(ws)
    raise LogRefused(f"{STATE_DIR_NAME} keeps being replaced")


def append_own_log(workspace: Path | str, line: bytes) -> None:
    """Append one line to this lane's execution log, opened the way the supervisor reads it: no link followed, never
    blocking (a FIFO there is refused, not waited on), a regular file of this process's uid. Anything else at its
    place is moved aside and a fresh log started."""
    sd = own_state_dir(workspace)
    try:
        for _ in range(3):
            try:
                fd = os.open(LOG_NAME, _APPEND, 0o600, dir_fd=sd)
            except OSError as exc:
                if exc.errno not in (errno.ELOOP, errno.ENXIO, errno.EISDIR, errno.EWOULDBLOCK, errno.ENODEV,
                                     errno.ENOTDIR, errno.EACCES):
                    raise
                _move_aside(sd, LOG_NAME, f"not a log ({os.strerror(exc.errno)})")
                continue
            try:
                st = os.fstat(fd)
                if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid():
                    _move_aside(sd, LOG_NAME, f"not a regular file of uid {os.geteuid()}")
                    continue
                view = memoryview(line)
                while view:
                    view = view[os.write(fd, view):]
                return
            finally:
                os.close(fd)
    finally:
        os.close(sd)
    raise LogRefused(f"{LOG_NAME} keeps being replaced")


class LaneRuntime:
    """A lane: HTTP endpoints in threads, the work loop in the calling thread."""

    def __init__(self, info: LaneInfo, notifier: Notifier | None = None) -> None:
        self.info = info
        self.notifier = notifier or Notifier()
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.held: dict[int, Running] = {}  # mission id -> what this lane holds
        self.retired: list[Running] = []  # superseded attempts still to stop and reap
        self.inbox: queue.Queue[int] = queue.Queue()
        self.reporter = Reporter(info.callback_url, info.supervisor_uid, on_fenced=self.fenced)
        self.loops = 0
        self.done = 0
        self.server: ThreadingHTTPServer | None = None
        self.state_dir = Path(info.workspace) / STATE_DIR_NAME
        self.log_key = log_key(info.dispatch_key, info.lane)
        self.out_limits = outcap.Limits.from_env()
        self.out_pruned_at = 0.0
        self.out_dirty = True
        self.contain: cgroups.Containment | None = None
        # what /healthz says: "cgroup" when every mission gets its own cgroup, "+landlock" when it cannot write
        # outside its workspace (lanectl/landlock.py), "+ns" when it runs in PID and user namespaces of its own;
        # "off" uncontained
        self.containment = "off"
        # LANECTL_CONTAIN=1 (the lane unit sets it): a cgroup per mission, and PID + user namespaces per mission
        # unless LANECTL_MISSION_NAMESPACES=0. A runtime started by hand (development, tests) leaves both off.
        contain = os.environ.get("LANECTL_CONTAIN") == "1"
        self.contain_wanted = contain
        self.isolate = (contain and os.environ.get("LANECTL_MISSION_NAMESPACES", "1") != "0"
                        and os.access(UNSHARE, os.X_OK))
        self.cleanup: list[cgroups.MissionCgroup] = []  # mission cgroups still to remove
        self.ruleset: landlock.Ruleset | None = None

    # ------------------------------------------------------------------------------------------ endpoints
    def health(self) -> dict[str, Any]:
        with self.lock:
            flight = len(self.held) + len(self.retired)
            missions = sorted(self.held)
        return {"lane": self.info.lane, "pid": os.getpid(), "invocation": self.info.invocation,
                "in_flight": flight, "capacity": self.info.capacity, "version": __version__,
                "containment": self.containment,
                "uptime_s": round(time.time() - self.info.started_at, 3), "loops": self.loops,
                "missions": missions, "reporting": self.reporter.reporting(), "completed": self.done,
                "callbacks_pending": self.reporter.pending()}

    def accept(self, msg: DispatchMsg) -> tuple[int, dict[str, Any]]:
        if msg.lane != self.info.lane:
            return 409, {"error": "wrong_lane", "message": f"this is lane {self.info.lane!r}, not {msg.lane!r}"}
        if self.stop.is_set():
            return 503, {"error": "stopping", "message": "the lane is stopping"}
        with self.lock:
            cur = self.held.get(msg.mission)
            if cur is not None:
                if cur.msg.attempt == msg.attempt and cur.msg.token == msg.token:
                    return 200, {"accepted": True, "duplicate": True}
                if cur.msg.attempt > msg.attempt:
                    return 409, {"error": "stale_attempt", "message": f"attempt {cur.msg.attempt} is running"}
                cur.cancel_requested = True  # a newer attempt supersedes ours: stop and reap the old process
                self.retired.append(cur)
            elif len(self.held) >= self.info.capacity:
                return 429, {"error": "full", "message": f"{len(self.held)}/{self.info.capacity} in flight"}
            self.held[msg.mission] = Running(msg, time.monotonic())
        self.inbox.put(msg.mission)
        return 202, {"accepted": True}

    def cancel(self, mission: int) -> tuple[int, dict[str, Any]]:
        with self.lock:
            cur = self.held.get(mission)
            if cur is None:
                return 404, {"error": "not_held", "message": f"mission {mission} is not on this lane"}
            cur.cancel_requested = True
        self.inbox.put(mission)
        return 202, {"cancelling": True}

    def fenced(self, msg: CallbackMsg) -> None:
        """The supervisor fenced this attempt (its lease ran out, or it went to another lane): stop its process, so
        that a mission never goes on running here while the ledger has given it to another attempt."""
        with self.lock:
            cur = self.held.get(msg.mission)
            if cur is None or cur.msg.attempt != msg.attempt or cur.msg.token != msg.token:
                return
            cur.cancel_requested = True
            cur.outcome = cur.outcome or "fenced"
        log.warning("mission=%d attempt=%d: the supervisor fenced it; stopping it", msg.mission, msg.attempt)
        self.inbox.put(msg.mission)

    def bind(self) -> None:
        runtime = self

        class Handler(DeadlineHandler):  # a whole-request deadline: a slow client cannot hold a thread
            server_version = f"lanectl-runtime/{__version__}"
            logger = log

            def do_GET(self) -> None:  # noqa: N802 (http.server naming)
                if self.path.split("?", 1)[0] in (runtime.info.health_path, "/healthz"):
                    # while it stops (missions being ended, the port still held) the lane is not up
                    self._send(503 if runtime.stop.is_set() else 200, runtime.health())
                else:
                    self._send(404, {"error": "not_found", "message": f"no endpoint {self.path[:100]}"})

            def do_POST(self) -> None:  # noqa: N802
                try:
                    raw = read_body(self)
                    if not bearer_ok(self.headers.get("Authorization"), runtime.info.dispatch_key):
                        self._send(401, {"error": "unauthorized", "message": "missing or wrong dispatch key"})
                        return
                    parts = self.path.split("?", 1)[0].strip("/").split("/")
                    if parts == ["missions"]:
                        self._send(*runtime.accept(parse_dispatch(raw)))
                    elif len(parts) == 3 and parts[0] == "missions" and parts[2] == "cancel" and parts[1].isascii() \
                            and parts[1].isdigit() and len(parts[1]) < 19:
                        self._send(*runtime.cancel(int(parts[1])))
                    else:
                        self._send(404, {"error": "not_found", "message": f"no endpoint {self.path[:100]}"})
                except BadMessage as exc:
                    self._send(exc.status, {"error": "bad_request", "message": str(exc)})

        class Server(BoundedServer, ThreadingHTTPServer):
            daemon_threads = True
            allow_reuse_address = True
            request_queue_size = 128
            max_connections = MAX_CONNECTIONS

        self.server = Server(("127.0.0.1", self.info.port), Handler)

    # ------------------------------------------------------------------------------------------ work
    def report(self, r: Running, event: str, **extra: Any) -> None:
        m = r.msg
        self.reporter.send(CallbackMsg(m.mission, m.attempt, self.info.lane, m.token, event, self.info.invocation,
                                       **extra))

    def journal(self, **entry: Any) -> None:
        """One JSON line per execution start and end in the workspace: what this lane actually ran. Each line
        carries a MAC (``protocol.sign_log_entry``) under a key derived from the dispatch key, which missions cannot
        read: the supervisor trusts only lines this runtime wrote. An entry that cannot be written is lost, which
        costs at most a re-run."""
        entry.update(lane=self.info.lane, invocation=self.info.invocation, at=time.time())
        try:
            append_own_log(self.info.workspace, sign_log_entry(entry, self.log_key))
        except OSError as exc:
            log.error("cannot append to the execution log: %s", exc)

    def start_mission(self, r: Running) -> str | None:
        """Start the mission; return an error text to fail it at once. The reference runs payload.argv."""
        payload = r.msg.payload
        argv = payload.get("argv") if isinstance(payload, dict) else None
        if not (isinstance(argv, list) and argv and all(isinstance(a, str) for a in argv)):
            return "the reference runtime runs payload.argv, a non-empty list of strings"
        if any("\0" in a for a in argv):
            return "payload.argv may not contain NUL characters (no program can receive them)"
        timeout = payload.get("timeout_sec", float(os.environ.get("LANECTL_MISSION_TIMEOUT", DEFAULT_TIMEOUT_S)))
        if not isinstance(timeout, (int, float)) or isinstance(timeout, bool) or timeout <= 0:
            return "payload.timeout_sec must be a positive number"
        out_dir = self.state_dir / "out"
        r.out_path = out_dir / f"{r.msg.mission}-{r.msg.attempt}.log"
        env = {**os.environ, "LANECTL_MISSION": str(r.msg.mission), "LANECTL_ATTEMPT": str(r.msg.attempt),
               "LANECTL_SESSION": r.msg.session or "", "LANECTL_CLASS": r.msg.cls}
        env.pop("NOTIFY_SOCKET", None)
        if self.contain is not None:
            free = self.contain.tasks_free()
            if free is not None and free < 3:  # the wrapper, the command, one child: or it cannot even start
                raise CouldNotStart(f"the lane has no task left for it ({free} of {self.contain.tasks_max} free to "
                                    "missions): not started")
            r.cg = self.contain.create(r.msg.mission, r.msg.attempt)
        preexec = None
        if r.cg is not None:
            fds = r.cg.join_fds()
            ruleset = self.ruleset

            def preexec() -> None:  # in the child, before exec: nothing of the mission runs outside its cgroup
                cgroups.join(fds)
                prefer_as_oom_victim()
                if ruleset is not None:
                    ruleset.restrict()
        full = argv
        if self.isolate:
            # its own user and PID namespaces: the runtime and other missions are not in its PID namespace, so it
            # can signal none of them (kill -9 $PPID reaches only its own wrapper); it dies with its wrapper
            full = [UNSHARE, "--user", "--map-current-user", "--pid", "--fork", "--kill-child", "--", *argv]
        try:
            sd = own_state_dir(self.info.workspace)  # a link or a file planted at .lanectl is moved aside
            try:
                r.capture = outcap.open_capture(sd, r.out_path.name, self.out_limits.max_bytes)
            finally:
                os.close(sd)
        except OSError as exc:
            if r.cg is not None:
                r.cg.close_fds()
            self.drop_cgroup(r)
            return f"cannot keep its output in {r.out_path}: {exc.strerror or exc}"
        try:
            r.proc = subprocess.Popen(full, cwd=self.info.workspace, stdin=subprocess.DEVNULL,
                                      stdout=r.capture.write_fd, stderr=subprocess.STDOUT, env=env,
                                      start_new_session=True, preexec_fn=preexec)
        except (OSError, ValueError, subprocess.SubprocessError) as exc:
            r.capture.abandon()
            if r.cg is not None:
                r.cg.close_fds()
            self.drop_cgroup(r)
            if isinstance(exc, OSError) and exc.errno in START_ERRNOS:
                raise CouldNotStart(f"cannot start {argv[0]!r}: {exc.strerror}: not started") from None
            return f"cannot start {argv[0]!r}: {getattr(exc, 'strerror', None) or exc}"
        if r.cg is not None:
            r.cg.close_fds()
        r.capture.start()
        r.deadline_at = time.monotonic() + float(timeout)
        return None

    def drop_cgroup(self, r: Running) -> None:
        """Kill what is left in the mission's cgroup and remove it (now, or in a later turn)."""
        if r.cg is None:
            return
        r.cg.kill()
        if not r.cg.remove():
            self.cleanup.append(r.cg)
        r.cg = None

    def poll_mission(self, r: Running) -> int | None:
        """The exit code once the mission's process ended, nothing of it is left and its output is kept, else None.
        Whatever it started (background children, setsid daemons) is killed when its main process ends."""
        assert r.proc is not None
        code = r.proc.poll()
        if code is None:
            return None
        if r.cg is not None:
            if r.exited_at is None:
                r.exited_at = time.monotonic()
            r.cg.kill()
            if not r.cg.empty() and time.monotonic() - r.exited_at < KILL_GRACE_S:
                return None  # SIGKILLed: gone within a turn or two (a D-state process may take longer: then we go on)
        if r.capture is None:
            return code
        return code if r.capture.settle() else None

    def kill_mission(self, r: Running, now: float) -> None:
        """SIGTERM to the mission (its process group, and everything in its cgroup), SIGKILL to all of it after
        KILL_GRACE_S."""
        if r.proc is None or (r.proc.poll() is not None and r.cg is None):
            return
        if r.killed_at is not None and now - r.killed_at <= KILL_GRACE_S:
            return
        sig = signal.SIGTERM if r.killed_at is None else signal.SIGKILL
        try:
            os.killpg(r.proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass
        if r.cg is not None:
            if sig == signal.SIGKILL:
                r.cg.kill()
            else:
                r.cg.signal_all(sig)
                if self.isolate:
                    self.kill_deaf_init(r)
        r.killed_at = r.killed_at or now

    def kill_deaf_init(self, r: Running) -> None:
        """The mission's command is the init of its PID namespace, and an init gets no signal it has no handler
        for: one that does not handle SIGTERM gets SIGKILL at once (its namespace goes with it) instead of
        waiting out a grace that cannot help."""
        assert r.proc is not None and r.cg is not None
        for pid in r.cg.pids():
            try:
                fields = dict(line.split(":\t", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                              if ":\t" in line)
            except OSError:
                continue
            if fields.get("PPid", "").strip() != str(r.proc.pid):
                continue
            caught = int(fields.get("SigCgt", "0").strip() or "0", 16)
            if not caught & (1 << (signal.SIGTERM - 1)):
                try:
                    os.kill(pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass

    def tail(self, r: Running) -> str:
        if r.out_path is None:
            return ""
        # the mission may have put a link or a FIFO in place of its log, of out/ or of .lanectl: each step is
        # opened relative to the one before, following no link and blocking on nothing
        flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC
        fds: list[int] = []
        try:
            fds.append(os.open(r.out_path.parent.parent, flags | os.O_DIRECTORY))
            fds.append(os.open(r.out_path.parent.name, flags | os.O_DIRECTORY, dir_fd=fds[-1]))
            fd = os.open(r.out_path.name, flags | os.O_NONBLOCK | os.O_NOCTTY, dir_fd=fds[-1])
        except OSError:
            return ""
        finally:
            for d in fds:
                os.close(d)
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                return ""
            return os.pread(fd, MAX_TAIL, max(0, st.st_size - MAX_TAIL)).decode(errors="replace")
        except OSError:
            return ""
        finally:
            os.close(fd)

    def finish(self, r: Running, event: str, *, exit_code: int | None = None, error: str | None = None,
               retry: bool = False) -> None:
        if r.cg is not None and event == "failed" and r.cg.oom_kills() > 0:
            error = ("out of memory: the kernel killed " + ("its process" if exit_code == -9 else "a process of it")
                     + self.oom_where(r.cg)
                     + ("" if error in (None, f"exit code {exit_code}") else f"; {error}"))
        self.drop_cgroup(r)
        with self.lock:
            if self.held.get(r.msg.mission) is r:
                del self.held[r.msg.mission]
        self.done += 1
        self.out_dirty = True
        # a failure is the lane operator's business (warning); success is routine (debug: the ledger has it)
        log.log(logging.DEBUG if event == "succeeded" else logging.WARNING if event == "failed" else logging.INFO,
                "mission=%d attempt=%d %s%s%s", r.msg.mission, r.msg.attempt, event,
                "" if exit_code is None else f" (exit status {exit_code})", f": {error[:300]}" if error else "")
        if r.started_at is not None:  # logged before the callback is queued: the supervisor reads it if we die
            self.journal(event="end", mission=r.msg.mission, attempt=r.msg.attempt, outcome=event,
                         exit_code=exit_code, error=None if error is None else error[:2000])
        self.report(r, event, exit_code=exit_code, output_tail=self.tail(r) or None, error=error, retry=retry)

    def oom_where(self, cg: cgroups.MissionCgroup) -> str:
        """Whose limit the kernel enforced: the mission's own (it is the one that took too much), or the one all of
        the lane's missions share (they took too much together; this one was the largest)."""
        if self.contain is None:
            return ""
        own, shared = self.contain.mission_memory_max, self.contain.memory_max
        if own is not None and (cg.hit_own_memory_limit() or own == shared):
            return f" at its own memory limit ({own} bytes)"
        if shared is not None:
            return (f" when the lane's missions together reached their memory limit ({shared} bytes; each mission "
                    f"may use {own} bytes)")
        return ""

    def work_once(self) -> None:
        """One turn of the work loop: start what was accepted, reap what ended, heartbeat what runs."""
        self.loops += 1
        now = time.monotonic()
        while True:
            try:
                self.inbox.get_nowait()
            except queue.Empty:
                break
        with self.lock:
            held = list(self.held.values())
            retired = list(self.retired)
        for r in retired:
            self.reap_retired(r, now)
        if self.out_dirty and now - self.out_pruned_at >= 1.0:
            self.prune_output(now)
        if self.cleanup:
            for cg in list(self.cleanup):
                cg.kill()
                if cg.remove():
                    self.cleanup.remove(cg)
        for r in held:
            if r.proc is None and r.started_at is None:
                if r.cancel_requested:
                    self.finish(r, "cancelled", error="cancelled before it started")
                    continue
                try:
                    err = self.start_mission(r)
                except CouldNotStart as exc:
                    log.warning("mission %d attempt %d not started: %s", r.msg.mission, r.msg.attempt, exc)
                    self.drop_cgroup(r)
                    self.finish(r, "failed", error=f"could not start: {exc}", retry=True)
                    continue
                except Exception as exc:  # a mission must never take its lane down with it
                    log.exception("mission=%d attempt=%d could not be started", r.msg.mission, r.msg.attempt)
                    err = f"the runtime could not start it: {type(exc).__name__}: {exc}"[:2000]
                r.started_at = now
                if err is not None:
                    r.started_at = None
                    self.drop_cgroup(r)
                    self.finish(r, "failed", error=err)
                    continue
                self.journal(event="start", mission=r.msg.mission, attempt=r.msg.attempt,
                             pid=r.proc.pid if r.proc else None)
                self.report(r, "started")
                r.last_heartbeat = now
                continue
            code = self.poll_mission(r)
            if code is not None:
                if r.outcome == "fenced":
                    self.finish(r, "cancelled", exit_code=code, error="stopped: the supervisor fenced this attempt")
                elif r.outcome == "cancelled" or (r.cancel_requested and r.outcome is None):
                    self.finish(r, "cancelled", exit_code=code, error="cancelled")
                elif r.outcome == "timeout":
                    self.finish(r, "failed", exit_code=code, error="timed out")
                elif code == 0:
                    self.finish(r, "succeeded", exit_code=0)
                elif self.isolate and code == 1 and self.wrapper_failed(r):
                    # the lane had no task for it: returned to the queue uncharged, when the runtime sees the lane
                    # short of tasks itself (a mission that only prints the wrapper's message fails as usual)
                    self.finish(r, "failed", exit_code=code, error="could not start: " + self.tail(r).strip()[-300:],
                                retry=self.short_of_tasks())
                else:
                    self.finish(r, "failed", exit_code=code, error=f"exit code {code}")
                continue
            if r.cancel_requested:
                r.outcome = r.outcome or "cancelled"
                self.kill_mission(r, now)
            elif r.deadline_at is not None and now > r.deadline_at:
                r.outcome = "timeout"
                self.kill_mission(r, now)
            if now - r.last_heartbeat >= self.info.heartbeat_sec:
                r.last_heartbeat = now
                self.report(r, "heartbeat")

    def wrapper_failed(self, r: Running) -> bool:
        """The namespace wrapper could not fork or map the mission (its own message is all the output): the
        command never ran."""
        text = self.tail(r).strip()
        return (text.startswith("unshare: ") and "\n" not in text
                and any(os.strerror(e) in text for e in START_ERRNOS))

    def short_of_tasks(self) -> bool:
        """Whether the lane's missions together have (nearly) no task left: what makes a start fail for want of
        tasks through no fault of the mission (its own limit always leaves the others MIN_TASKS_PER_MISSION)."""
        free = self.contain.tasks_free() if self.contain is not None else None
        return free is not None and free < cgroups.MIN_TASKS_PER_MISSION

    def reap_retired(self, r: Running, now: float) -> None:
        """A superseded attempt: kill its process (TERM, then KILL), log its end, report it cancelled."""
        if r.proc is not None and self.poll_mission(r) is None:
            self.kill_mission(r, now)
            return
        self.drop_cgroup(r)
        with self.lock:
            self.retired.remove(r)
        if r.started_at is not None:
            self.journal(event="end", mission=r.msg.mission, attempt=r.msg.attempt, outcome="superseded",
                         exit_code=r.proc.returncode if r.proc else None, error="superseded by a newer attempt")
        self.report(r, "cancelled", error="superseded by a newer attempt")

    def prune_output(self, now: float) -> None:
        """Keep out/ within [output] keep_bytes and keep_files (outcap.prune), never a running mission's file."""
        self.out_pruned_at, self.out_dirty = now, False
        with self.lock:
            active = {r.out_path.name for r in [*self.held.values(), *self.retired] if r.out_path is not None}
        deleted, freed = outcap.prune(self.state_dir / "out", self.out_limits, active)
        if deleted:
            log.info("out/: deleted the %d oldest mission logs (%d bytes) to stay within %d bytes and %d files",
                     deleted, freed, self.out_limits.keep_bytes, self.out_limits.keep_files)

    def status_line(self) -> str:
        return (f"lane {self.info.lane}: {len(self.held)}/{self.info.capacity} in flight, "
                f"{self.done} done, port {self.info.port}")

    def contain_missions(self) -> None:
        """Move the runtime into its own leaf and make the cgroup every mission gets one of (lanectl/cgroups.py);
        kill what an earlier runtime of this lane left there. Without a writable cgroup (a lane outside lanectl's
        unit, no Delegate=), missions run uncontained and /healthz says so."""
        if not self.contain_wanted:
            return
        try:
            self.contain = cgroups.Containment.setup(capacity=self.info.capacity)
        except OSError as exc:
            log.warning("missions are not contained (no cgroup of their own): %s", exc)
            self.contain = None
            self.containment = "ns" if self.isolate else "off"  # namespaces need no cgroup
            return
        self.containment = "cgroup"
        try:
            self.ruleset = landlock.Ruleset.create([self.info.workspace, *landlock.WRITABLE],
                                                   scope_signals=self.isolate)
            self.containment = "cgroup+landlock"
        except OSError as exc:
            log.warning("missions are not kept out of the lane's cgroups (no Landlock): %s", exc)
        if self.isolate:
            self.containment += "+ns"
        for cg in self.contain.leftovers():
            log.warning("killing what an earlier runtime left in cgroup %s", cg.name)
            cg.kill()
            if not cg.remove():
                self.cleanup.append(cg)
        log.info("missions run in cgroups of their own under %s (all missions: tasks %s, memory %s; each mission: "
                 "tasks %s, memory %s)", ", ".join(str(p) for p in self.contain.missions.values()),
                 self.contain.tasks_max, self.contain.memory_max, self.contain.mission_tasks_max,
                 self.contain.mission_memory_max)

    def run(self) -> int:
        self.contain_missions()  # before any thread starts: the runtime moves itself into its leaf
        Path(self.info.workspace).mkdir(parents=True, exist_ok=True)
        sd = own_state_dir(self.info.workspace)  # a link or a file left at .lanectl is moved aside, its mode restored
        try:
            os.close(outcap.open_out_dir(sd))  # the same for out/
        finally:
            os.close(sd)
        self.bind()
        assert self.server is not None
        threading.Thread(target=self.server.serve_forever, name="http", kwargs={"poll_interval": 0.2},
                         daemon=True).start()
        self.reporter.start()
        self.notifier.send("READY=1\nSTATUS=" + self.status_line())
        log.info("lane=%s listening on 127.0.0.1:%d", self.info.lane, self.info.port)
        ping = Notifier.watchdog_interval() or DEFAULT_WATCHDOG_PING_S
        last_ping, last_status = 0.0, ""
        while not self.stop.is_set():
            self.work_once()
            now = time.monotonic()
            if now - last_ping >= ping:
                self.notifier.send("WATCHDOG=1")
                last_ping = now
            line = self.status_line()
            if line != last_status:
                self.notifier.send("STATUS=" + line)
                last_status = line
            try:  # wake at once for a new mission, else poll running ones every 20 ms
                self.inbox.put(self.inbox.get(timeout=0.02 if self.held else min(ping, 0.5)))
            except queue.Empty:
                pass
        return self.shutdown()

    def shutdown(self) -> int:
        """SIGTERM: stop taking work, end running missions; the supervisor re-queues them (new invocation)."""
        self.notifier.send("STOPPING=1\nSTATUS=stopping")
        assert self.server is not None
        end = time.monotonic() + KILL_GRACE_S
        with self.lock:
            held = list(self.held.values())
        for r in held:
            self.kill_mission(r, time.monotonic())
        while any(r.proc is not None and r.proc.poll() is None for r in held) and time.monotonic() < end:
            time.sleep(0.05)
        for r in held:
            self.drop_cgroup(r)  # nothing a mission started outlives the runtime (and its output pipe closes)
        for r in held:  # what they wrote last is kept (the tail of a stopped mission says most)
            if r.capture is not None and r.proc is not None and r.proc.poll() is not None:
                r.capture.settle()
                r.capture.done.wait(max(0.0, end - time.monotonic()) + outcap.OUTPUT_GRACE_S)
        # The listening socket stays open (new dispatches get 503 "stopping") until the process exits: a port
        # freed while the runtime still lives would let another local process take it while the supervisor
        # still counts this lane as up (issue 10); at exit the supervisor's pidfd sees it go at once.
        self.server.shutdown()
        return 0


def main(argv: list[str] | None = None) -> int:
    from lanectl.journal import setup as setup_logging

    setup_logging(f"lane={os.environ.get('LANECTL_LANE') or '-'}")  # under journald: <N> priority prefixes
    info = LaneInfo.from_env()
    rt = LaneRuntime(info)
    signal.signal(signal.SIGTERM, lambda *_: rt.stop.set())
    signal.signal(signal.SIGINT, lambda *_: rt.stop.set())
    try:
        return rt.run()
    except OSError as exc:
        log.error("cannot listen on 127.0.0.1:%d: %s", info.port, exc)
        return 1


if __name__ == "__main__":
    sys.exit(main())

"""The supervisor's two listeners.

- The callback socket (unix, ``[supervisor] socket``): ``POST /callbacks`` from lanes; the kernel says which uid
  is calling (SO_PEERCRED), a uid that is no lane's user is refused unread, a lane speaking for another is refused
  whole; the rest is handed to :class:`lanectl.supervisor.callbacks.Callbacks` and answered with its verdicts.
- The read-only TCP listener on loopback (``[supervisor] host``/``port``): ``GET /healthz`` and ``GET /metrics``.
  Callbacks never go there (403). When its port is taken the supervisor runs on and tries again every TCP_RETRY_S.

Handler threads only parse and hand over; they never touch the ledger.
"""
from __future__ import annotations

import logging
import os
import socketserver
import stat
import threading
from collections.abc import Callable
from http.server import ThreadingHTTPServer
from pathlib import Path
from typing import Any

from lanectl import __version__
from lanectl.errors import LanectlError
from lanectl.ledger import Error as LedgerError
from lanectl.protocol import (
    BadMessage,
    BoundedServer,
    DeadlineHandler,
    parse_callbacks,
    peer_cred,
    read_body,
)
from lanectl.supervisor.callbacks import Callbacks, Refusals
from lanectl.supervisor.shared import Shared
from lanectl.supervisor.users import LaneUsers

log = logging.getLogger("lanectl.supervisor")
SOCKET_PER_PEER = 8
"""Connections one uid may hold on the callback socket at once: one lane cannot starve the others' callbacks."""
TCP_RETRY_S = 1.0


class Endpoints:
    def __init__(self, shared: Shared, socket_path: Path, callbacks: Callbacks, refusals: Refusals,
                 users: LaneUsers, healthz: Callable[[], dict[str, Any]], metrics: Callable[[], str]) -> None:
        self.shared = shared
        self.socket_path = socket_path
        self.callbacks = callbacks
        self.refusals = refusals
        self.users = users
        self.healthz = healthz
        self.metrics = metrics
        self.server: ThreadingHTTPServer | None = None
        self.unix_server: socketserver.ThreadingUnixStreamServer | None = None
        self.bound: tuple[int, int] | None = None
        """(st_dev, st_ino) of the callback socket this supervisor bound: close() removes only that one."""
        self.tcp_factory: Callable[[], ThreadingHTTPServer] | None = None
        self.tcp_tried = float("-inf")

    def servers(self) -> list[tuple[str, Any]]:
        return [("tcp", self.server), ("socket", self.unix_server)]

    def bind(self, now: float) -> None:
        ep = self

        class Handler(DeadlineHandler):  # a whole-request deadline: a slow client cannot hold a thread
            server_version = f"lanectl-supervisor/{__version__}"
            logger = log

            def do_GET(self) -> None:  # noqa: N802
                path = self.path.split("?", 1)[0]
                if path == "/healthz":
                    self._send(200, ep.healthz())
                elif path == "/metrics":
                    try:
                        body = ep.metrics().encode()
                    except (LanectlError, LedgerError) as exc:  # the ledger is unreachable: no figures to give
                        self._send(503, {"error": "ledger_unavailable", "message": "metrics read the ledger, "
                                         f"which cannot be read now: {getattr(exc, 'message', None) or exc}"})
                        return
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
                    ep.refusals.add("tcp")
                    self._send(403, {"error": "use_socket", "message": f"callbacks are taken only on the unix "
                                     f"socket {ep.socket_path} (LANECTL_CALLBACK_URL)"})
                else:
                    self._send(404, {"error": "not_found", "message": "GET /healthz or /metrics"})

        class CallbackHandler(DeadlineHandler):
            """POST /callbacks on the unix socket; the kernel says which uid is calling (SO_PEERCRED)."""

            server_version = f"lanectl-supervisor/{__version__}"

            logger = log

            def setup(self) -> None:
                super().setup()
                self.peer_pid, self.peer_uid, _ = peer_cred(self.connection)

            def address_string(self) -> str:
                return f"pid {self.peer_pid} uid {self.peer_uid}"

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
                    allowed = ep.users.lanes_of(self.peer_uid)
                    if not allowed:  # no lane runs as this uid: refused unparsed, no ledger write
                        ep.refusals.add("unauthenticated")
                        self._send(403, {"error": "not_a_lane", "message": f"uid {self.peer_uid} is no lane's user"})
                        return
                    msgs, batch = parse_callbacks(raw)
                    foreign = next((m.lane for m in msgs if m.lane not in allowed), None)
                    if foreign is not None:  # a lane speaking for another: all refused, no ledger write
                        ep.refusals.add("foreign_lane", len(msgs))  # every callback of the request
                        self._send(403, {"error": "not_your_lane", "message": f"uid {self.peer_uid} cannot send "
                                         f"callbacks of lane {foreign!r}"})
                        return
                    results = ep.callbacks.submit(msgs)  # one answer per callback, in order
                    if not batch:
                        self._send(*results[0])
                        return
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

        settings = self.shared.settings
        host = settings.supervisor.host
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
        self.tcp_factory = lambda: Server((host if host != "localhost" else "127.0.0.1",
                                           self.shared.settings.supervisor.port), Handler)
        self.bind_tcp(now)

    def next_tcp_try(self) -> float:
        if self.server is None and self.tcp_factory is not None:
            return self.tcp_tried + TCP_RETRY_S
        return float("inf")

    def maybe_bind_tcp(self, now: float) -> None:
        if self.server is None and self.tcp_factory is not None and now - self.tcp_tried >= TCP_RETRY_S:
            self.bind_tcp(now)

    def bind_tcp(self, now: float) -> None:
        """The read-only TCP listener (/healthz, /metrics). Callbacks do not need it: when its port is taken (by
        a process squatting it while the supervisor restarted) the supervisor runs on and tries again every
        TCP_RETRY_S, rather than fail and leave every lane's callbacks unanswered."""
        assert self.tcp_factory is not None
        self.tcp_tried = now
        try:
            server = self.tcp_factory()
        except OSError as exc:
            s = self.shared.settings.supervisor
            log.error("cannot listen on %s:%d (%s); callbacks go on over %s, retrying every %gs", s.host, s.port,
                      exc.strerror or exc, self.socket_path, TCP_RETRY_S)
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


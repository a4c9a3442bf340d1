"""The lane side of the lane protocol: an SDK, and the reference lane runtime (``python -m lanectl.runtime``).

The runtime listens on 127.0.0.1:$LANECTL_PORT, answers ``GET /healthz``, sends ``READY=1`` once it listens,
``WATCHDOG=1`` from its main loop (the loop that does the work, so that a hung lane stops pinging and systemd
restarts it) and a one-line ``STATUS=``. HTTP is served from a thread; the main thread owns the work loop.
"""
from __future__ import annotations

import json
import logging
import os
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from lanectl import __version__

log = logging.getLogger("lanectl.runtime")
MAX_BODY = 1 << 20
DEFAULT_WATCHDOG_PING_S = 1.0


class Notifier:
    """sd_notify through the sdnotify library; a no-op outside systemd (no NOTIFY_SOCKET)."""

    def __init__(self) -> None:
        self.enabled = bool(os.environ.get("NOTIFY_SOCKET"))
        self._n = None
        if self.enabled:
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


@dataclass
class LaneInfo:
    lane: str
    port: int
    workspace: str
    session_prefix: str
    capacity: int
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
        return cls(
            lane=e["LANECTL_LANE"],
            port=int(e["LANECTL_PORT"]),
            workspace=e.get("LANECTL_WORKSPACE", os.getcwd()),
            session_prefix=e.get("LANECTL_SESSION_PREFIX", e["LANECTL_LANE"]),
            capacity=int(e.get("LANECTL_CAPACITY", "4")),
            health_path=e.get("LANECTL_HEALTH_PATH", "/healthz"),
            invocation=e.get("INVOCATION_ID", ""),
        )


class LaneRuntime:
    """A lane: HTTP endpoints in a thread, the work loop in the calling thread."""

    def __init__(self, info: LaneInfo, notifier: Notifier | None = None) -> None:
        self.info = info
        self.notifier = notifier or Notifier()
        self.stop = threading.Event()
        self.in_flight = 0
        self.loops = 0
        self.server: ThreadingHTTPServer | None = None

    # ---- what /healthz answers
    def health(self) -> dict[str, Any]:
        return {
            "lane": self.info.lane,
            "pid": os.getpid(),
            "invocation": self.info.invocation,
            "in_flight": self.in_flight,
            "capacity": self.info.capacity,
            "version": __version__,
            "uptime_s": round(time.time() - self.info.started_at, 3),
            "loops": self.loops,
        }

    def status_line(self) -> str:
        return f"lane {self.info.lane}: {self.in_flight}/{self.info.capacity} in flight, port {self.info.port}"

    def bind(self) -> None:
        runtime = self

        class Handler(BaseHTTPRequestHandler):
            server_version = f"lanectl-runtime/{__version__}"
            protocol_version = "HTTP/1.1"
            timeout = 10  # a slow client cannot hold a handler thread forever

            def log_message(self, fmt: str, *args: Any) -> None:
                log.debug("%s " + fmt, self.address_string(), *args)

            def _send(self, code: int, doc: dict[str, Any]) -> None:
                body = json.dumps(doc, sort_keys=True).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self) -> None:  # noqa: N802 (http.server naming)
                if self.path.split("?", 1)[0] in (runtime.info.health_path, "/healthz"):
                    self._send(200, runtime.health())
                else:
                    self._send(404, {"error": "not_found", "message": f"no endpoint {self.path}"})

            def do_POST(self) -> None:  # noqa: N802
                length = self.headers.get("Content-Length")
                if length is None or not length.isdigit() or int(length) > MAX_BODY:
                    self._send(413 if length and length.isdigit() else 411,
                               {"error": "bad_length", "message": f"send a Content-Length of at most {MAX_BODY}"})
                    return
                self.rfile.read(int(length))
                self._send(404, {"error": "not_found", "message": f"no endpoint {self.path}"})

        class Server(ThreadingHTTPServer):
            daemon_threads = True
            allow_reuse_address = True

        self.server = Server(("127.0.0.1", self.info.port), Handler)

    def serve_in_thread(self) -> threading.Thread:
        assert self.server is not None
        t = threading.Thread(target=self.server.serve_forever, name="http", kwargs={"poll_interval": 0.2},
                             daemon=True)
        t.start()
        return t

    def work_once(self) -> None:
        """One turn of the work loop (missions are run from here)."""
        self.loops += 1

    def run(self) -> int:
        self.bind()
        self.serve_in_thread()
        self.notifier.send("READY=1\nSTATUS=" + self.status_line())
        log.info("lane %s listening on 127.0.0.1:%d", self.info.lane, self.info.port)
        ping = Notifier.watchdog_interval() or DEFAULT_WATCHDOG_PING_S
        tick = min(ping, 0.5)
        last_ping = 0.0
        last_status = ""
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
            self.stop.wait(tick)
        self.notifier.send("STOPPING=1\nSTATUS=stopping")
        assert self.server is not None
        self.server.shutdown()
        self.server.server_close()
        return 0


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=os.environ.get("LANECTL_LOG_LEVEL", "INFO"), stream=sys.stderr,
                        format="%(levelname)s %(name)s: %(message)s")
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

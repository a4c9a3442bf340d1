"""Health checks of lanes' HTTP endpoints: one ``GET`` per lane, all in flight at once on non-blocking sockets,
answers read against one deadline; ``latency_ms`` is the lane's own (the kernel's arrival time of the answer).
``lanectl status`` and the supervisor's lane watching both use it."""
from __future__ import annotations

import errno
import json
import os
import struct
import time
from dataclasses import dataclass
from typing import Any

HEALTH_TIMEOUT_S = 1.0
MAX_HEALTH_BYTES = 65536


@dataclass(slots=True)
class Health:
    """The answer of one health endpoint; its fields, in this order, are the ``health`` object of ``status
    --json``."""

    ok: bool = False
    listening: bool = False
    http_status: int | None = None
    latency_ms: float | None = None
    body: dict[str, Any] | None = None
    error: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "listening": self.listening, "http_status": self.http_status,
                "latency_ms": self.latency_ms, "body": self.body, "error": self.error}


def _parse_response(raw: bytes, latency_ms: float) -> Health:
    head, sep, body = raw.partition(b"\r\n\r\n")
    status_line = head.split(b"\r\n", 1)[0].split()
    if not sep or len(status_line) < 2 or not status_line[0].startswith(b"HTTP/") or not status_line[1].isdigit():
        return Health(listening=True, error="not an HTTP answer")
    h = Health(listening=True, http_status=int(status_line[1]), latency_ms=round(latency_ms, 2))
    try:
        doc = json.loads(body or b"null")
        h.body = doc if isinstance(doc, dict) else None
        if body.strip() and not isinstance(doc, dict):  # the lane protocol answers an object (DESIGN.md)
            h.error = "health answer is not a JSON object"
    except ValueError:
        h.error = "health answer is not JSON"
    if h.http_status != 200:
        h.error = f"HTTP {h.http_status}"
    h.ok = h.error is None
    return h


class HealthRound:
    """Health checks in flight: every lane's ``GET`` sent at once on non-blocking sockets (``start``), answers read
    by ``finish`` in one thread against one deadline. Between the two the caller does other work (status reads
    systemd and the ledger meanwhile) while the lanes answer; ``latency_ms`` is still the lane's own: from the
    request to the kernel's arrival time of the answer's first bytes (SO_TIMESTAMPNS), not to when it was read."""

    __slots__ = ("sel", "results", "bufs", "arrived", "started", "deadline", "timeout")

    def __init__(self, targets: list[tuple[int, str]], timeout: float = HEALTH_TIMEOUT_S) -> None:
        import selectors
        import socket

        self.results: list[Health | None] = [None] * len(targets)
        self.bufs: dict[int, bytearray] = {}
        self.arrived: dict[int, float] = {}
        self.timeout = timeout
        self.started = time.time()  # the clock of SO_TIMESTAMPNS
        self.deadline = time.monotonic() + timeout
        self.sel = selectors.DefaultSelector()
        for i, (port, path) in enumerate(targets):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setblocking(False)
            try:
                sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
            except OSError:
                pass  # then latency_ms counts until the answer was read
            req = f"GET {path} HTTP/1.0\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n".encode()
            err = sock.connect_ex(("127.0.0.1", port))
            if err == 0:  # loopback usually connects at once: the request goes now
                try:
                    sock.send(req)
                except OSError:
                    pass
                else:
                    self.bufs[i] = bytearray()
                    self.sel.register(sock, selectors.EVENT_READ, (i, req))
                    continue
            elif err not in (errno.EINPROGRESS, errno.EAGAIN):
                self.results[i] = Health(error="connection refused" if err == errno.ECONNREFUSED else os.strerror(err))
                sock.close()
                continue
            self.sel.register(sock, selectors.EVENT_WRITE, (i, req))
        self.pump()  # the connections made meanwhile

    def pump(self) -> None:
        """Without waiting: send the requests whose connection is up by now, read what has arrived."""
        self._run(0.0)

    def finish(self) -> list[Health]:
        """Wait for the remaining answers until the deadline: one Health per target, in order."""
        try:
            self._run(None)
        finally:
            for key in list(self.sel.get_map().values()):
                i = key.data[0]
                if self.results[i] is None:
                    self.results[i] = Health(listening=i in self.bufs, error=f"no answer within {self.timeout:g}s")
                key.fileobj.close()  # type: ignore[union-attr]
            self.sel.close()
        return [r if r is not None else Health(error="no answer") for r in self.results]

    def _run(self, wait: float | None) -> None:
        """Handle events until none is left (``wait`` None: until the deadline; 0: only those ready now)."""
        import selectors
        import socket

        sel, results, bufs = self.sel, self.results, self.bufs
        while len(sel.get_map()):
            left = self.deadline - time.monotonic()
            if left <= 0:
                return
            ready = sel.select(left if wait is None else wait)
            if not ready and wait is not None:
                return
            for key, events in ready:
                sock, (i, req) = key.fileobj, key.data  # type: ignore[misc]
                if events & selectors.EVENT_WRITE:
                    err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                    if err:
                        results[i] = Health(error="connection refused" if err == errno.ECONNREFUSED
                                            else os.strerror(err))
                        sel.unregister(sock)
                        sock.close()
                        continue
                    sock.send(req)
                    bufs[i] = bytearray()
                    sel.modify(sock, selectors.EVENT_READ, (i, req))
                    continue
                try:
                    chunk, anc, _flags, _addr = sock.recvmsg(65536, 64)
                except OSError as exc:
                    results[i] = Health(listening=True, error=str(exc))
                    chunk, anc = b"", []
                if chunk and i not in self.arrived:
                    self.arrived[i] = _arrival(anc)
                if chunk and len(bufs[i]) < MAX_HEALTH_BYTES:
                    bufs[i] += chunk
                    continue
                if results[i] is None:
                    at = self.arrived.get(i) or time.time()
                    results[i] = _parse_response(bytes(bufs[i]), max(at - self.started, 0.0) * 1000)
                sel.unregister(sock)
                sock.close()

    def close(self) -> None:
        """Give up on the answers (the caller failed meanwhile)."""
        for key in list(self.sel.get_map().values()):
            key.fileobj.close()  # type: ignore[union-attr]
        self.sel.close()


def _arrival(ancillary: list[tuple[int, int, bytes]]) -> float:
    """The kernel's receive time (SCM_TIMESTAMPNS: a timespec of the real-time clock); now when it is missing."""
    import socket

    for level, kind, data in ancillary:
        if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS and len(data) >= struct.calcsize("@ll"):
            sec, nsec = struct.unpack_from("@ll", data)  # struct timespec (SO_TIMESTAMPNS_OLD: native longs)
            return sec + nsec / 1e9
    return time.time()


SO_TIMESTAMPNS = 35
"""Linux's SO_TIMESTAMPNS (= SCM_TIMESTAMPNS; asm-generic, x86 and arm): Python 3.11's socket module lacks it."""


def check_health_many(targets: list[tuple[int, str]], timeout: float = HEALTH_TIMEOUT_S) -> list[Health]:
    """GET every lane's health endpoint at once (non-blocking sockets, one thread, one deadline)."""
    return HealthRound(targets, timeout).finish()


def check_health(port: int, path: str, timeout: float = HEALTH_TIMEOUT_S) -> Health:
    return check_health_many([(port, path)], timeout)[0]

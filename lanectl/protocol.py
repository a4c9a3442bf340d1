"""The lane protocol's messages (DESIGN.md "Lane protocol"), validated the same way on both ends.

Dispatch (supervisor -> lane, ``POST /missions``, ``Authorization: Bearer <lane key>``)::

    {"mission": 7, "attempt": 1, "lane": "alpha", "token": "...", "class": "interactive",
     "session": "alpha:s1" | null, "deadline": 1767000000.0 | null, "payload": {...}}

Callback (lane -> supervisor, ``POST /callbacks``)::

    {"mission": 7, "attempt": 1, "lane": "alpha", "token": "...", "invocation": "...",
     "event": "started" | "heartbeat" | "succeeded" | "failed" | "cancelled",
     "exit_code": 0 | null, "output_tail": "...", "error": "..."}

Every field is type-checked; anything else is a 400 with a message that names the field.
"""
from __future__ import annotations

import hmac
import http.client
import io
import json
import math
import os
import socket
import struct
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

MAX_BODY = 1 << 20
"""Largest request body either side accepts (413 beyond)."""
READ_TIMEOUT_S = 5.0
"""A client that sends its body slower than this is cut off (408)."""
REQUEST_DEADLINE_S = 10.0
"""Each request, from its first byte (or the end of the previous one on a kept-alive connection) to the end of its
body, must arrive within this long; a client that drips header bytes is cut off when it passes."""
MAX_CONNECTIONS = 64
"""Connections a server handles at once; one more is answered 503 and closed at once (no thread for it)."""
UNIX_SCHEME = "unix:"
EVENTS = ("started", "heartbeat", "succeeded", "failed", "cancelled")
CLASSES = ("interactive", "deadline", "background")
MAX_TAIL = 4096


class BadMessage(ValueError):
    """A request that is not a valid protocol message; the text names the field."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


def _field(doc: dict[str, Any], name: str, kinds: type | tuple[type, ...], *, optional: bool = False) -> Any:
    if name not in doc or doc[name] is None:
        if optional:
            return None
        raise BadMessage(f"field {name!r} is missing")
    value = doc[name]
    if isinstance(value, bool) and bool not in (kinds if isinstance(kinds, tuple) else (kinds,)):
        raise BadMessage(f"field {name!r} has the wrong type")
    if not isinstance(value, kinds):
        raise BadMessage(f"field {name!r} has the wrong type")
    return value


def _positive(doc: dict[str, Any], name: str) -> int:
    v = _field(doc, name, int)
    if not 0 < v < 2**62:
        raise BadMessage(f"field {name!r} is out of range")
    return v


def _text(value: str | None, name: str) -> str | None:
    """JSON allows lone surrogates (\\ud800); UTF-8, hashing and SQLite do not: refuse them here."""
    if value is not None:
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise BadMessage(f"field {name!r} is not valid Unicode text") from None
    return value


def _short(doc: dict[str, Any], name: str, limit: int = 200, optional: bool = False) -> str | None:
    v = _field(doc, name, str, optional=optional)
    if v is not None and len(v) > limit:
        raise BadMessage(f"field {name!r} is longer than {limit}")
    return _text(v, name)


def _deadline(doc: dict[str, Any]) -> float | None:
    value = _field(doc, "deadline", (int, float), optional=True)
    if value is None:
        return None
    try:
        out = float(value)
    except OverflowError:
        raise BadMessage("field 'deadline' is out of range") from None
    if not math.isfinite(out) or out < 0:
        raise BadMessage("field 'deadline' must be a time in seconds since the epoch")
    return out


def loads_object(raw: bytes) -> dict[str, Any]:
    try:
        doc = json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise BadMessage(f"body is not JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise BadMessage("body must be a JSON object")
    return doc


@dataclass(frozen=True)
class DispatchMsg:
    mission: int
    attempt: int
    lane: str
    token: str
    cls: str
    session: str | None
    deadline: float | None
    payload: Any

    def as_json(self) -> dict[str, Any]:
        return {"mission": self.mission, "attempt": self.attempt, "lane": self.lane, "token": self.token,
                "class": self.cls, "session": self.session, "deadline": self.deadline, "payload": self.payload}


def parse_dispatch(raw: bytes) -> DispatchMsg:
    doc = loads_object(raw)
    cls = _short(doc, "class")
    if cls not in CLASSES:
        raise BadMessage("field 'class' must be interactive, deadline or background")
    deadline = _deadline(doc)
    if "payload" not in doc:
        raise BadMessage("field 'payload' is missing")
    return DispatchMsg(_positive(doc, "mission"), _positive(doc, "attempt"), _short(doc, "lane") or "",
                       _short(doc, "token") or "", cls, _short(doc, "session", optional=True), deadline,
                       doc["payload"])


@dataclass(frozen=True)
class CallbackMsg:
    mission: int
    attempt: int
    lane: str
    token: str
    event: str
    invocation: str | None = None
    exit_code: int | None = None
    output_tail: str | None = None
    error: str | None = None

    def as_json(self) -> dict[str, Any]:
        return {"mission": self.mission, "attempt": self.attempt, "lane": self.lane, "token": self.token,
                "event": self.event, "invocation": self.invocation, "exit_code": self.exit_code,
                "output_tail": self.output_tail, "error": self.error}


def parse_callback(raw: bytes) -> CallbackMsg:
    doc = loads_object(raw)
    event = _short(doc, "event")
    if event not in EVENTS:
        raise BadMessage(f"field 'event' must be one of {', '.join(EVENTS)}")
    code = _field(doc, "exit_code", int, optional=True)
    tail = _text(_field(doc, "output_tail", str, optional=True), "output_tail")
    err = _text(_field(doc, "error", str, optional=True), "error")
    return CallbackMsg(_positive(doc, "mission"), _positive(doc, "attempt"), _short(doc, "lane") or "",
                       _short(doc, "token") or "", event, _short(doc, "invocation", optional=True), code,
                       None if tail is None else tail[-MAX_TAIL:], None if err is None else err[:2000])


def bearer_ok(header: str | None, key: str) -> bool:
    """Constant-time check of an ``Authorization: Bearer KEY`` header."""
    if not header or not header.startswith("Bearer ") or not key:
        return False
    return hmac.compare_digest(header[7:].strip().encode(), key.encode())


def read_body(handler: Any) -> bytes:
    """The request body of a BaseHTTPRequestHandler, within MAX_BODY and READ_TIMEOUT_S, or BadMessage."""
    length = handler.headers.get("Content-Length")
    if handler.headers.get("Transfer-Encoding"):
        raise BadMessage("chunked bodies are not accepted; send Content-Length", 411)
    if length is None:
        raise BadMessage("send a Content-Length", 411)
    if not (length.isascii() and length.isdigit()):
        raise BadMessage("Content-Length is not a number", 400)
    n = int(length)
    if n > MAX_BODY:
        raise BadMessage(f"body larger than {MAX_BODY} bytes", 413)
    # one deadline for the whole body: a client dripping a byte at a time cannot hold a thread for long
    deadline = time.monotonic() + READ_TIMEOUT_S
    if isinstance(handler, DeadlineHandler):
        handler.limit_deadline(deadline)
    chunks: list[bytes] = []
    got = 0
    try:
        while got < n:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError
            handler.connection.settimeout(left)
            chunk = handler.rfile.read1(min(n - got, 65536))
            if not chunk:
                raise BadMessage("body shorter than its Content-Length", 400)
            chunks.append(chunk)
            got += len(chunk)
    except TimeoutError:
        raise BadMessage(f"body not sent within {READ_TIMEOUT_S:g}s", 408) from None
    return b"".join(chunks)


def send_json(handler: Any, code: int, doc: dict[str, Any]) -> None:
    """Answer with one JSON document; an error closes the connection (its body may not have been read)."""
    body = json.dumps(doc, sort_keys=True, default=str).encode()
    handler.send_response(code)
    handler.send_header("Content-Type", "application/json")
    handler.send_header("Content-Length", str(len(body)))
    if code >= 400:
        handler.send_header("Connection", "close")
        handler.close_connection = True
    handler.end_headers()
    handler.wfile.write(body)


# ---------------------------------------------------------------------------------------------------- servers
class _DeadlineReader(io.RawIOBase):
    """A socket's reading side that gives up when ``deadline`` (monotonic) passes, however the bytes trickle in:
    every recv gets only the time left (a per-recv timeout alone lets one byte every few seconds go on forever)."""

    def __init__(self, sock: socket.socket) -> None:
        super().__init__()
        self.sock = sock
        self.deadline = math.inf

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("request deadline passed")
        self.sock.settimeout(min(left, 3600.0))
        return self.sock.recv_into(b)


class DeadlineHandler(BaseHTTPRequestHandler):
    """A request handler whose every request (request line, headers and body) must arrive within
    ``request_deadline`` seconds; past it the connection is closed (a body cut off answers 408, see read_body)."""

    request_deadline = REQUEST_DEADLINE_S
    protocol_version = "HTTP/1.1"
    timeout = REQUEST_DEADLINE_S  # writes: a client that does not read its answer is cut off too

    def setup(self) -> None:
        super().setup()
        self._reader = _DeadlineReader(self.connection)
        self.rfile.close()  # the makefile() reader of StreamRequestHandler; ours replaces it
        self.rfile = io.BufferedReader(self._reader, 65536)

    def limit_deadline(self, deadline: float) -> None:
        self._reader.deadline = min(self._reader.deadline, deadline)

    def send_response(self, code: int, message: str | None = None) -> None:
        self.connection.settimeout(self.timeout)  # reads shortened it to what was left of the deadline
        super().send_response(code, message)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            # what the client sent and nobody read (a refused request's body) is dropped before the close: on a
            # unix socket unread data turns the close into a reset, and the client would lose the answer
            try:
                self.connection.setblocking(False)
                for _ in range(16):
                    if not self.connection.recv(65536):
                        break
            except OSError:
                pass

    def handle_one_request(self) -> None:
        self._reader.deadline = time.monotonic() + self.request_deadline
        try:
            super().handle_one_request()
        except TimeoutError:  # headers not complete in time (a body that is late answers 408 in read_body)
            self.close_connection = True


_BUSY_BODY = b'{"error": "busy", "message": "too many connections; retry shortly"}'
BUSY = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nConnection: close\r\n"
        b"Content-Length: " + str(len(_BUSY_BODY)).encode() + b"\r\n\r\n" + _BUSY_BODY)


class BoundedServer:
    """Mixin for a ThreadingMixIn server: at most ``max_connections`` connections (and ``max_per_peer`` per peer,
    as ``peer_key`` tells them apart) are handled at once; one more is answered 503 from the accepting thread
    and closed, without a thread. ``refused`` counts them."""

    max_connections = MAX_CONNECTIONS
    max_per_peer: int | None = None
    daemon_threads = True

    def peer_key(self, request: Any) -> Any:
        return None

    def process_request(self, request: Any, client_address: Any) -> None:
        if not hasattr(self, "_slots"):
            self._slots = threading.Lock()
            self._active: dict[Any, int] = {}
            self._total = 0
            self.refused = 0
        key = self.peer_key(request)
        with self._slots:
            full = self._total >= self.max_connections or (
                self.max_per_peer is not None and self._active.get(key, 0) >= self.max_per_peer)
            if full:
                self.refused += 1
            else:
                self._total += 1
                self._active[key] = self._active.get(key, 0) + 1
        if full:
            try:
                request.setblocking(False)
                request.send(BUSY)
            except OSError:
                pass
            self.shutdown_request(request)  # type: ignore[attr-defined]
            return
        t = threading.Thread(target=self._bounded_thread, args=(request, client_address, key), daemon=True)
        t.start()

    def _bounded_thread(self, request: Any, client_address: Any, key: Any) -> None:
        try:
            self.process_request_thread(request, client_address)  # type: ignore[attr-defined]
        finally:
            with self._slots:
                self._total -= 1
                self._active[key] -= 1
                if not self._active[key]:
                    del self._active[key]


def peer_cred(sock: socket.socket) -> tuple[int, int, int]:
    """(pid, uid, gid) of the process at the other end of a unix stream socket, from the kernel (SO_PEERCRED)."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", raw)
    return pid, uid, gid


class PeerMismatch(OSError):
    """The process listening on the callback socket is not the one the lane expects (SO_PEERCRED)."""


class UnixHTTPConnection(http.client.HTTPConnection):
    """HTTP over a unix stream socket; with ``expect_uid``, the listening process must run as that uid (checked
    with SO_PEERCRED before a byte is sent), else PeerMismatch."""

    def __init__(self, path: str, timeout: float, expect_uid: int | None = None) -> None:
        super().__init__("localhost", timeout=timeout)
        self.socket_path = path
        self.expect_uid = expect_uid

    def connect(self) -> None:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.settimeout(self.timeout)
            s.connect(self.socket_path)
            if self.expect_uid is not None:
                _, uid, _ = peer_cred(s)
                if uid != self.expect_uid:
                    raise PeerMismatch(f"{self.socket_path} is served by uid {uid}, not the supervisor's uid "
                                       f"{self.expect_uid}")
        except BaseException:
            s.close()
            raise
        self.sock = s


def callback_socket(url: str) -> str:
    """The socket path of a callback URL ``unix:/PATH``; ValueError for anything else."""
    if not url.startswith(UNIX_SCHEME + "/"):
        raise ValueError(f"callback URL {url!r} is not unix:/PATH (callbacks go over the supervisor's unix socket)")
    return url[len(UNIX_SCHEME):]


# ---------------------------------------------------------------------------------------------------- execution log

EXECUTION_LOG = Path(".lanectl") / "executions.log"
"""Where a lane appends one JSON line per execution start and end, relative to its workspace."""
MAX_LOG_TAIL = 1 << 20


def read_execution_log(workspace: Path, tail: int | None = MAX_LOG_TAIL) -> list[dict[str, Any]]:
    """The entries of a lane's execution log (only its last ``tail`` bytes unless None). The lane writes it, so
    trust nothing: lines that are not JSON objects with an integer mission and attempt are skipped."""
    try:
        with open(workspace / EXECUTION_LOG, "rb") as fh:
            if tail is not None:
                fh.seek(0, os.SEEK_END)
                fh.seek(max(0, fh.tell() - tail))
            raw = fh.read()
    except OSError:
        return []
    out = []
    for line in raw.split(b"\n"):
        try:
            doc = json.loads(line)
        except ValueError:
            continue
        if isinstance(doc, dict) and isinstance(doc.get("mission"), int) and isinstance(doc.get("attempt"), int):
            out.append(doc)
    return out

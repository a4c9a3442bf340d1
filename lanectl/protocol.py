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

import errno
import hashlib
import hmac
import http.client
import io
import json
import logging
import math
import os
import socket
import stat
import struct
import sys
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any, Final

from lanectl.states import CLASS_NAMES, CLASSES

_log = logging.getLogger("lanectl.protocol")

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
        raise BadMessage(f"field 'class' must be {CLASS_NAMES}")
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
    retry: bool = False
    """On ``failed``: the lane could not even start the mission (no task or memory left: EAGAIN, ENOMEM); its command
    never ran, so the supervisor returns the attempt uncharged (no failure of the mission or the lane) and sends the
    lane nothing until one of its missions ends or its next health report."""

    def as_json(self) -> dict[str, Any]:
        doc = {"mission": self.mission, "attempt": self.attempt, "lane": self.lane, "token": self.token,
               "event": self.event, "invocation": self.invocation, "exit_code": self.exit_code,
               "output_tail": self.output_tail, "error": self.error}
        if self.retry:
            doc["retry"] = True
        return doc


MAX_CALLBACK_BATCH = 64
"""Most callbacks one ``POST /callbacks`` carries (``{"callbacks": [...]}``; 64 full ones stay under MAX_BODY)."""


def parse_callback(raw: bytes) -> CallbackMsg:
    return _callback(loads_object(raw))


def parse_callbacks(raw: bytes) -> tuple[list[CallbackMsg], bool]:
    """The callbacks of one request and whether it was a batch: ``{"callbacks": [CALLBACK, ...]}`` (1 to
    MAX_CALLBACK_BATCH, in the order they happened) or a single CALLBACK object."""
    doc = loads_object(raw)
    if "callbacks" not in doc:
        return [_callback(doc)], False
    items = doc["callbacks"]
    if not isinstance(items, list) or not 1 <= len(items) <= MAX_CALLBACK_BATCH:
        raise BadMessage(f"field 'callbacks' must be a list of 1 to {MAX_CALLBACK_BATCH} callbacks")
    out = []
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            raise BadMessage(f"callbacks[{i}] must be a JSON object")
        try:
            out.append(_callback(item))
        except BadMessage as exc:
            raise BadMessage(f"callbacks[{i}]: {exc}", exc.status) from None
    return out, True


def _callback(doc: dict[str, Any]) -> CallbackMsg:
    event = _short(doc, "event")
    if event not in EVENTS:
        raise BadMessage(f"field 'event' must be one of {', '.join(EVENTS)}")
    code = _field(doc, "exit_code", int, optional=True)
    tail = _text(_field(doc, "output_tail", str, optional=True), "output_tail")
    err = _text(_field(doc, "error", str, optional=True), "error")
    retry = _field(doc, "retry", bool, optional=True)
    return CallbackMsg(_positive(doc, "mission"), _positive(doc, "attempt"), _short(doc, "lane") or "",
                       _short(doc, "token") or "", event, _short(doc, "invocation", optional=True), code,
                       None if tail is None else tail[-MAX_TAIL:], None if err is None else err[:2000],
                       bool(retry) and event == "failed")


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
    logger = logging.getLogger("lanectl.http")
    """Where each request's line goes, at debug level (a server sets its own: the supervisor's, the runtime's)."""

    def log_message(self, fmt: str, *args: Any) -> None:
        self.logger.debug("%s " + fmt, self.address_string(), *args)

    def _send(self, code: int, doc: dict[str, Any]) -> None:
        send_json(self, code, doc)

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

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client that hung up (reset, broken pipe) is routine: one debug line, not socketserver's traceback on
        stderr, which any local user could otherwise repeat into the journal. Anything else is logged once per
        error as a warning through logging (with its priority), traceback included."""
        exc = sys.exc_info()[1]
        if isinstance(exc, (BrokenPipeError, ConnectionResetError, ConnectionAbortedError, TimeoutError)):
            _log.debug("client %s went away: %s", client_address or "(unix socket)", exc)
            return
        _log.warning("request from %s failed", client_address or "(unix socket)", exc_info=True)

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


_ANY_OR_LOOPBACK: Final = frozenset({"0100007F", "00000000", "00000000000000000000000000000000",
                                      "0000000000000000FFFF00000100007F"})
"""The listening addresses that can answer a connection to 127.0.0.1 (what lanectl dispatches to), as
/proc/net/tcp{,6} write them: 127.0.0.1, 0.0.0.0, ::, ::ffff:127.0.0.1. Not ::1: a listener there (another lane's
user's, say) answers nothing lanectl sends, so it must not take the lane out of dispatch. /proc cannot tell a
v6-only :: from a dual-stack one; sock_diag can (below)."""

_LISTEN_ADDRS: Final = frozenset({bytes(4), bytes([127, 0, 0, 1]), bytes(16),
                                   bytes(10) + b"\xff\xff" + bytes([127, 0, 0, 1])})
"""The same addresses as _ANY_OR_LOOPBACK, as sock_diag gives them (network order)."""
_INET_DIAG_SKV6ONLY = 11  # attribute the kernel adds to every AF_INET6 socket of a dump: IPV6_V6ONLY
_NETLINK_SOCK_DIAG = 4
_SOCK_DIAG_BY_FAMILY = 20
_NLM_F_REQUEST_DUMP = 0x1 | 0x300
_NLMSG_ERROR, _NLMSG_DONE = 2, 3
_TCP_LISTEN = 10


def tcp_listener_uids(ports: set[int], proc_net: str = "/proc/net") -> dict[int, set[int]]:
    """For each port, the uids owning the sockets that listen on it on loopback or any address, from the kernel's
    socket tables of this network namespace (the lanes'). What answers a dispatch to 127.0.0.1:PORT is one of
    them; a lane's port held by any other uid is not the lane.

    Asked over netlink (``sock_diag``, listening sockets only: the kernel filters, so the many ``TIME_WAIT``
    sockets of health checks cost nothing); where that fails, read from ``/proc/net/tcp`` and ``tcp6``."""
    if proc_net == "/proc/net":
        try:
            return _listeners_by_netlink(ports)
        except (OSError, ValueError, struct.error):
            pass
    return _listeners_by_proc(ports, proc_net)


def _listeners_by_netlink(ports: set[int]) -> dict[int, set[int]]:
    out: dict[int, set[int]] = {p: set() for p in ports}
    with socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, _NETLINK_SOCK_DIAG) as nl:
        nl.settimeout(2.0)
        for seq, family in enumerate((socket.AF_INET, socket.AF_INET6), start=1):
            # inet_diag_req_v2: family, protocol, ext, pad, states; then a zeroed inet_diag_sockid (48 bytes)
            req = struct.pack("=BBBBI", family, socket.IPPROTO_TCP, 0, 0, 1 << _TCP_LISTEN) + bytes(48)
            nl.send(struct.pack("=IHHII", 16 + len(req), _SOCK_DIAG_BY_FAMILY, _NLM_F_REQUEST_DUMP, seq, 0) + req)
            done = False
            while not done:
                data = nl.recv(1 << 16)
                if not data:
                    raise OSError("sock_diag: the kernel closed the netlink socket")
                off = 0
                while off + 16 <= len(data):
                    length, kind, _flags, got_seq, _pid = struct.unpack_from("=IHHII", data, off)
                    if length < 16:
                        raise ValueError("sock_diag: a netlink message shorter than its header")
                    if got_seq == seq:
                        if kind == _NLMSG_DONE:
                            done = True
                        elif kind == _NLMSG_ERROR:
                            raise OSError(-struct.unpack_from("=i", data, off + 16)[0], "sock_diag refused")
                        elif kind == _SOCK_DIAG_BY_FAMILY:
                            # inet_diag_msg: family, state, timer, retrans, sockid (sport, dport: big-endian;
                            # src, dst: 16 bytes each; if; cookie), expires, rqueue, wqueue, uid, inode
                            body = off + 16
                            fam, state = data[body], data[body + 1]
                            port = struct.unpack_from(">H", data, body + 4)[0]
                            src = bytes(data[body + 8:body + 8 + (4 if fam == socket.AF_INET else 16)])
                            uid = struct.unpack_from("=I", data, body + 64)[0]
                            if (state == _TCP_LISTEN and port in out and src in _LISTEN_ADDRS
                                    and not (src == bytes(16) and _v6only(data, body + 72, off + length))):
                                out[port].add(uid)
                    off += (length + 3) & ~3
    return out


def _v6only(data: bytes, start: int, end: int) -> bool:
    """Whether the rtattrs in ``data[start:end]`` (after an inet_diag_msg) say IPV6_V6ONLY: such a :: listener
    takes no connection to 127.0.0.1."""
    while start + 4 <= end:
        alen, kind = struct.unpack_from("=HH", data, start)
        if alen < 4:
            return False
        if kind == _INET_DIAG_SKV6ONLY and alen >= 5:
            return bool(data[start + 4])
        start += (alen + 3) & ~3
    return False


def _listeners_by_proc(ports: set[int], proc_net: str) -> dict[int, set[int]]:
    out: dict[int, set[int]] = {p: set() for p in ports}
    for name in ("tcp", "tcp6"):
        try:
            with open(os.path.join(proc_net, name), encoding="ascii", errors="replace") as fh:
                next(fh, None)
                for line in fh:
                    f = line.split()
                    if len(f) < 8 or f[3] != "0A":  # 0A: LISTEN
                        continue
                    addr, _, port = f[1].rpartition(":")
                    p = int(port, 16)
                    if p in out and addr in _ANY_OR_LOOPBACK:
                        out[p].add(int(f[7]))
        except (OSError, ValueError):
            continue
    return out


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
STATE_DIR_NAME = ".lanectl"
LOG_NAME = "executions.log"
MAX_LOG_TAIL = 1 << 20
"""The supervisor reads at most this many bytes from the end of a lane's execution log."""
MAX_LOG_LINE = 16 << 10
"""Longer lines are skipped unparsed (the runtime's own lines are far shorter)."""
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
_LOG_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC


class LogRefused(OSError):
    """Something other than the lane's own regular file (or directory) sits where its execution log belongs."""


def log_key(dispatch_key: str, lane: str) -> bytes:
    """The key that authenticates a lane's execution log lines: derived from the lane's dispatch key (which the
    runtime holds and its missions cannot read) for this purpose only, so a MAC is never a usable dispatch key."""
    return hmac.new(dispatch_key.encode(), b"lanectl-execution-log\0" + lane.encode(), hashlib.sha256).digest()


def _canonical(doc: dict[str, Any]) -> bytes:
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode()


def _entry_mac(key: bytes, doc: dict[str, Any]) -> str:
    return hmac.new(key, _canonical({k: v for k, v in doc.items() if k != "mac"}), hashlib.sha256).hexdigest()


def sign_log_entry(entry: dict[str, Any], key: bytes) -> bytes:
    """One execution log line: the entry's canonical JSON (sorted keys, no blanks, ASCII) with ``mac``, the
    HMAC-SHA256 under ``key`` of that JSON without ``mac``. The entry carries lane, invocation, mission and attempt,
    so the MAC binds the outcome to exactly that execution."""
    body = {k: v for k, v in entry.items() if k != "mac"}
    return _canonical({**body, "mac": _entry_mac(key, body)}) + b"\n"


def log_entry_authentic(doc: dict[str, Any], key: bytes) -> bool:
    mac = doc.get("mac")
    if not isinstance(mac, str) or len(mac) != 64:
        return False
    try:
        want = _entry_mac(key, doc)
    except (ValueError, TypeError, RecursionError):
        return False
    return hmac.compare_digest(mac.encode("ascii", "replace"), want.encode())


def _require(fd: int, kind: int, what: str, owner: int | None) -> None:
    st = os.fstat(fd)
    if stat.S_IFMT(st.st_mode) != kind:
        raise LogRefused(f"{what} is not a {'directory' if kind == stat.S_IFDIR else 'regular file'}")
    if owner is not None and st.st_uid != owner:
        raise LogRefused(f"{what} is owned by uid {st.st_uid}, not the lane's uid {owner}")


def _openat(name: str, flags: int, dir_fd: int, what: str, mode: int = 0o600) -> int:
    try:
        return os.open(name, flags, mode, dir_fd=dir_fd)
    except OSError as exc:
        if exc.errno not in (errno.ELOOP, errno.ENOTDIR, errno.ENXIO, errno.EISDIR, errno.EWOULDBLOCK, errno.ENODEV):
            raise
        try:
            link = stat.S_ISLNK(os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode)
        except OSError:
            link = False
        if link:
            raise LogRefused(f"{what} is a symbolic link") from None
        raise LogRefused(f"{what} cannot be opened ({os.strerror(exc.errno)})") from None


def open_state_dir(workspace: Path | str, owner: int | None) -> int:
    """A descriptor of ``WORKSPACE/.lanectl``, opened relative to the workspace without following a link and
    without blocking; a directory owned by ``owner`` (when given) or LogRefused."""
    ws = os.open(workspace, os.O_RDONLY | os.O_DIRECTORY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        fd = _openat(STATE_DIR_NAME, _DIR_FLAGS, ws, STATE_DIR_NAME)
    finally:
        os.close(ws)
    try:
        _require(fd, stat.S_IFDIR, STATE_DIR_NAME, owner)
    except BaseException:
        os.close(fd)
        raise
    return fd


def open_execution_log(workspace: Path | str, owner: int | None) -> int:
    """A read-only descriptor of a lane's execution log, safe whatever the lane put there: every component opened
    relative to the workspace without following links, ``O_NONBLOCK`` (a FIFO or a leased file cannot hold the
    caller), and it must be a regular file owned by ``owner`` (the lane's uid; None: not checked). LogRefused
    otherwise, FileNotFoundError when there is none."""
    sd = open_state_dir(workspace, owner)
    try:
        fd = _openat(LOG_NAME, _LOG_FLAGS, sd, str(EXECUTION_LOG))
    finally:
        os.close(sd)
    try:
        _require(fd, stat.S_IFREG, str(EXECUTION_LOG), owner)
    except BaseException:
        os.close(fd)
        raise
    return fd


@dataclass
class LogScan:
    """What a read of an execution log found: the entries kept, and why anything was not."""

    entries: list[dict[str, Any]]
    refused: str | None = None
    unauthentic: int = 0
    malformed: int = 0


def _read_tail(fd: int, tail: int | None) -> bytes:
    size = os.fstat(fd).st_size
    start = 0 if tail is None else max(0, size - tail)
    limit = None if tail is None else tail
    chunks: list[bytes] = []
    got = 0
    while limit is None or got < limit:
        chunk = os.pread(fd, 65536 if limit is None else min(65536, limit - got), start + got)
        if not chunk:
            break
        chunks.append(chunk)
        got += len(chunk)
    raw = b"".join(chunks)
    if start > 0:  # the first line is cut: drop it
        cut = raw.find(b"\n")
        raw = raw[cut + 1:] if cut >= 0 else b""
    return raw


def scan_execution_log(workspace: Path | str, tail: int | None = MAX_LOG_TAIL, *, owner: int | None = None,
                       key: bytes | None = None) -> LogScan:
    """The entries of a lane's execution log, read safely (``open_execution_log``) and only its last ``tail`` bytes
    (None: all of it; only for tools that trust the workspace). The lane's missions can write there, so trust
    nothing: lines that are not JSON objects with an integer mission and attempt are skipped, and with ``key``
    (``log_key`` of the lane) so is every line whose MAC does not verify. Never raises for what is in the file."""
    try:
        fd = open_execution_log(workspace, owner)
    except FileNotFoundError:
        return LogScan([])
    except LogRefused as exc:
        return LogScan([], refused=str(exc))
    except OSError as exc:
        return LogScan([], refused=f"{EXECUTION_LOG}: {exc.strerror or exc}")
    try:
        raw = _read_tail(fd, tail)
    except OSError as exc:
        return LogScan([], refused=f"{EXECUTION_LOG}: {exc.strerror or exc}")
    finally:
        os.close(fd)
    out = LogScan([])
    for line in raw.split(b"\n"):
        if not line.strip():
            continue
        doc: Any = None
        if len(line) <= MAX_LOG_LINE:
            try:
                doc = json.loads(line)
            except (ValueError, RecursionError):
                doc = None
        if not (isinstance(doc, dict) and type(doc.get("mission")) is int and type(doc.get("attempt")) is int):
            out.malformed += 1
            continue
        if key is not None and not log_entry_authentic(doc, key):
            out.unauthentic += 1
            continue
        out.entries.append(doc)
    return out


def read_execution_log(workspace: Path | str, tail: int | None = MAX_LOG_TAIL, *, owner: int | None = None,
                       key: bytes | None = None) -> list[dict[str, Any]]:
    """``scan_execution_log``'s entries."""
    return scan_execution_log(workspace, tail, owner=owner, key=key).entries

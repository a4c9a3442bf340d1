"""systemd access: the few calls lanectl needs, with errors that say what to do.

Unit state (``show``) is read over D-Bus on one connection held for the life of the process (``UnitBus``): every
property of every unit is asked for in one pipelined burst, so the CLI's ``status`` and the supervisor's poll cost
no fork. As root that is systemd's own socket (``/run/systemd/private``, no bus daemon in between, which is also
how ``systemctl`` talks); as another user the system bus. Where neither answers, one ``systemctl show`` does.
Verbs a person would type (start, stop, restart, enable, daemon-reload) still go through ``systemctl``, so they
behave, fail and log exactly as the operator's own command would.
"""
from __future__ import annotations

import os
import re
import socket
import struct
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from lanectl.errors import LanectlError, Unavailable

if TYPE_CHECKING:  # subprocess and shutil (4-11 ms of imports here) only where systemctl runs: not on the status path
    import subprocess

SHOW_PROPS = (
    "Id", "LoadState", "ActiveState", "SubState", "Result", "MainPID", "NRestarts", "StatusText",
    "InvocationID", "ExecMainStartTimestampMonotonic", "WatchdogUSec", "WatchdogTimestampMonotonic",
    "MemoryCurrent", "CPUUsageNSec", "TasksCurrent",
)  # what `status` shows; each property asked costs about 25 us per unit
UNSET = 2**64 - 1  # what systemd prints for a counter it does not have (accounting off)


def available() -> bool:
    """True when a systemd is running that systemctl can talk to."""
    return Path("/run/systemd/system").is_dir() and _on_path("systemctl")


def _on_path(name: str) -> bool:
    """``shutil.which(name) is not None``, without importing shutil."""
    for d in os.environ.get("PATH", os.defpath).split(os.pathsep):
        exe = os.path.join(d or ".", name)
        if os.path.isfile(exe) and os.access(exe, os.X_OK):
            return True
    return False


def run(*args: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    import subprocess

    run_check()
    proc = subprocess.run(["systemctl", *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "SYSTEMD_COLORS": "0", "SYSTEMD_PAGER": ""})
    if proc.returncode != 0:
        refuse_denied(args, proc.stderr or proc.stdout)
    if check and proc.returncode != 0:
        msg = (proc.stderr or proc.stdout).strip().splitlines()
        raise LanectlError(
            f"systemctl {' '.join(args)} failed: {msg[-1] if msg else f'exit {proc.returncode}'}",
            "see 'journalctl -u UNIT' and 'lanectl status'",
            "systemctl_failed",
        )
    return proc


_DENIED = ("Access denied", "Interactive authentication required", "Permission denied", "not privileged")


def refuse_denied(args: tuple[str, ...], text: str) -> None:
    """systemd refused this user (polkit, D-Bus): never a lane's failure, so exit 6 naming the access needed."""
    if any(d in text for d in _DENIED):
        verb = args[0] if args else "manage"
        raise Unavailable(
            f"this user ({_user()}) may not {verb} systemd units: 'systemctl {' '.join(args)}' was refused "
            f"({text.strip().splitlines()[-1] if text.strip() else 'access denied'})",
            "starting, stopping and installing lanes needs root: run it with sudo (read-only commands such as "
            "'lanectl status' and 'lanectl probe' need no root)",
            "permission_denied",
        )


def _user() -> str:
    import pwd

    try:
        return pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:
        return f"uid {os.geteuid()}"


def parse_show(text: str) -> list[dict[str, str]]:
    """Blocks of KEY=VALUE lines separated by blank lines, one per unit, in the order asked."""
    out: list[dict[str, str]] = []
    cur: dict[str, str] = {}
    for line in text.split("\n"):
        if not line:
            if cur:
                out.append(cur)
                cur = {}
            continue
        key, _, value = line.partition("=")
        cur[key] = value
    if cur:
        out.append(cur)
    return out


def show(units: list[str], props: tuple[str, ...] = SHOW_PROPS) -> dict[str, dict[str, str]]:
    """``{unit: {property: value}}`` with values as ``systemctl show`` prints them (numbers in decimal, the
    invocation ID in hex); a property the unit does not have is left out."""
    return show_finish(show_start(units, props), units)


@dataclass
class _Pending:
    """Requests sent over the bus whose answers ``show_finish`` collects (serial -> unit, property)."""
    bus: UnitBus
    asked: dict[int, tuple[str, str]]
    units: list[str]
    props: tuple[str, ...]


def show_start(units: list[str], props: tuple[str, ...] = SHOW_PROPS) -> subprocess.Popen[str] | _Pending | None:
    """Ask for the properties of all units at once; the caller may do other work before show_finish()."""
    if not units:
        return None
    run_check()
    bus = UnitBus.shared()
    if bus is not None:
        try:
            return _Pending(bus, bus.send_gets(units, props), units, props)
        except OSError:
            bus.close()
    return _systemctl_show(units, props)


def _systemctl_show(units: list[str], props: tuple[str, ...]) -> subprocess.Popen[str]:
    import subprocess

    return subprocess.Popen(["systemctl", "show", "-p", ",".join(props), "--", *units], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "SYSTEMD_COLORS": "0"})


def show_by_systemctl(units: list[str], props: tuple[str, ...] = SHOW_PROPS) -> dict[str, dict[str, str]]:
    """``show`` through one ``systemctl show`` (the fallback; the tests compare the two)."""
    run_check()
    return show_finish(_systemctl_show(units, props) if units else None, units)


def show_finish(proc: subprocess.Popen[str] | _Pending | None, units: list[str]) -> dict[str, dict[str, str]]:
    if proc is None:
        return {}
    if isinstance(proc, _Pending):
        try:
            return proc.bus.collect(proc.asked, proc.units)
        except OSError:  # the connection broke (systemd re-executed): once more the slow way
            proc.bus.close()
            return show_finish(_systemctl_show(proc.units, proc.props), units)
    out, err = proc.communicate(timeout=60)
    if proc.returncode != 0:
        if "Failed to connect to bus" in err or "has not been booted with systemd" in err:
            raise Unavailable(f"systemd cannot be asked: {err.strip()}",  # its bus is down: exit 6, not a failure
                              "is the system D-Bus (dbus.service) running? root reads systemd's private socket",
                              "systemd_unavailable")
        raise LanectlError(f"systemctl show failed: {err.strip() or proc.returncode}",
                           "see 'systemctl status'", "systemctl_failed")
    return {b.get("Id", u): b for u, b in zip(units, parse_show(out))}


# Which D-Bus interface holds each property lanectl reads (org.freedesktop.systemd1.*).
_UNIT_PROPS = {"Id", "LoadState", "ActiveState", "SubState", "InvocationID", "ActiveEnterTimestampMonotonic",
               "UnitFileState", "Description", "FragmentPath"}
_SERVICE_PROPS = {"Result", "MainPID", "NRestarts", "StatusText", "ExecMainStartTimestampMonotonic", "WatchdogUSec",
                  "WatchdogTimestampMonotonic", "ExecMainCode", "ExecMainStatus", "ControlGroup", "MemoryCurrent",
                  "CPUUsageNSec", "TasksCurrent", "ExecMainPID"}
_PRIVATE = "/run/systemd/private"
_SYSTEM_BUS = "/run/dbus/system_bus_socket"
BUS_TIMEOUT_S = 30.0


def unit_object_path(unit: str) -> str:
    """systemd's object path for a unit: every byte outside [A-Za-z0-9] becomes _XX (sd_bus_path_encode)."""
    label = "".join(c if c.isascii() and c.isalnum() else "".join(f"_{b:02x}" for b in c.encode())
                    for c in unit)
    return "/org/freedesktop/systemd1/unit/" + (label or "_")


def _as_text(value: Any) -> str:
    """A property's D-Bus value printed the way ``systemctl show`` prints it for lanectl's purposes."""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, bytes):  # InvocationID (ay)
        return value.hex()
    return str(value)


@dataclass
class UnitBus:
    """One connection to systemd, held for the process's life, that reads unit properties in pipelined bursts.

    Authentication (SASL EXTERNAL), the Properties.Get calls and their answers are done here (``_authenticated``,
    ``_get_call``, ``_messages``: the D-Bus wire format, little-endian, the few types unit properties have);
    jeepney only greets a message bus (non-root) and decodes a message of any other shape. A one-shot ``lanectl
    status`` builds and reads every message once: with jeepney's import, marshalling and parser that cost ~50 ms
    at 48 lanes (576 calls), this ~7 ms (docs/benchmarks.md). The class keeps the socket, numbers the requests and
    matches the answers to them, so that N units x M properties cost
    one round trip, not N x M.
    """

    sock: socket.socket
    serial: int = 0
    buf: bytearray = field(default_factory=bytearray)  # bytes received, not yet a whole message
    lock: threading.Lock = field(default_factory=threading.Lock)
    outstanding: set[int] = field(default_factory=set)  # serials sent whose answers someone still wants
    inbox: dict[int, Any] = field(default_factory=dict)  # answers read but not yet taken by their asker
    templates: dict[tuple[str, str], bytes] = field(default_factory=dict)

    _shared: ClassVar["UnitBus | None"] = None  # the process's connection: see shared()
    _unavailable_until: ClassVar[float] = 0.0

    @classmethod
    def shared(cls) -> "UnitBus | None":
        """The process's connection, opened on first use; None (for a while) where no bus answers."""
        if UnitBus._shared is not None:
            return UnitBus._shared
        if time.monotonic() < UnitBus._unavailable_until:
            return None
        try:
            UnitBus._shared = cls.connect()
        except (OSError, ValueError, ImportError):
            UnitBus._unavailable_until = time.monotonic() + 30.0
        return UnitBus._shared

    @classmethod
    def connect(cls) -> "UnitBus":
        private = os.geteuid() == 0 and os.path.exists(_PRIVATE)
        sock = _authenticated(_PRIVATE if private else _SYSTEM_BUS, timeout=2.0)
        sock.settimeout(BUS_TIMEOUT_S)
        bus = cls(sock)
        if not private:  # a message bus wants to be greeted before it routes anything
            from jeepney.bus_messages import message_bus

            serial = bus._send(message_bus.Hello())
            bus._replies({serial}, time.monotonic() + BUS_TIMEOUT_S)
        return bus

    def close(self) -> None:
        try:
            self.sock.close()
        finally:
            if UnitBus._shared is self:
                UnitBus._shared = None

    def _send(self, msg: Any) -> int:
        self.serial += 1
        self.sock.sendall(msg.serialise(serial=self.serial))
        return self.serial

    def send_gets(self, units: list[str], props: tuple[str, ...]) -> dict[int, tuple[str, str]]:
        asked: dict[int, tuple[str, str]] = {}
        out = bytearray()
        with self.lock:
            for unit in units:
                for prop in props:
                    if prop == "Id":  # lanectl names units by their ids (no aliases): nothing to ask
                        continue
                    self.serial += 1
                    start = len(out)
                    out += self._get_message(unit, prop)
                    struct.pack_into("<I", out, start + 8, self.serial)  # the serial: bytes 8-11 of the header
                    asked[self.serial] = (unit, prop)
            self.outstanding |= asked.keys()
            try:
                self.sock.sendall(out)
            except OSError:
                self.outstanding -= asked.keys()
                raise
        return asked

    def _get_message(self, unit: str, prop: str) -> bytes:
        """The serialised Properties.Get of one unit's property, made once (only the serial differs later)."""
        key = (unit, prop)
        msg = self.templates.get(key)
        if msg is None:
            iface = ("org.freedesktop.systemd1.Unit" if prop in _UNIT_PROPS else
                     "org.freedesktop.systemd1.Service" if prop in _SERVICE_PROPS else None)
            if iface is None:
                raise ValueError(f"lanectl does not know the D-Bus interface of property {prop}")
            msg = _get_call(unit_object_path(unit), iface, prop)
            if len(self.templates) < 4096:
                self.templates[key] = msg
        return msg

    def collect(self, asked: dict[int, tuple[str, str]], units: list[str]) -> dict[str, dict[str, str]]:
        with self.lock:
            got = self._replies(set(asked), time.monotonic() + BUS_TIMEOUT_S)
        shown: dict[str, dict[str, str]] = {u: {} for u in units}
        for serial, (unit, prop) in asked.items():
            reply = got.get(serial)
            if reply is not None:  # an error answer (no such interface: not a service) leaves the property out
                shown[unit][prop] = _as_text(reply)
        for unit, props in shown.items():
            props.setdefault("Id", unit)
        return shown

    def _replies(self, wanted: set[int], deadline: float) -> dict[int, Any]:
        """Read until every wanted serial is answered: {serial: value} (None for an error reply). Answers to
        another thread's burst wait in the inbox for that thread; the caller holds the lock."""
        self.outstanding |= wanted
        try:
            while not wanted <= self.inbox.keys():
                for serial, value in self._read(deadline):
                    if serial in self.outstanding:  # not a signal, nor an answer to a burst given up on
                        self.inbox[serial] = value
            return {s: self.inbox.pop(s) for s in wanted}
        finally:
            self.outstanding -= wanted
            for s in wanted:
                self.inbox.pop(s, None)

    def _read(self, deadline: float) -> list[Any]:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("systemd did not answer over D-Bus in time")
        self.sock.settimeout(left)
        data = self.sock.recv(1 << 16)
        if not data:
            raise ConnectionResetError("systemd closed the D-Bus connection")
        self.buf += data
        out, used = _messages(self.buf)
        del self.buf[:used]
        return out


def _authenticated(path: str, timeout: float) -> socket.socket:
    """A connection to the D-Bus socket ``path``, authenticated as this process's user (SASL EXTERNAL: the
    server checks the socket's peer credentials), ready for messages."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        sock.connect(path)
        sock.sendall(b"\0AUTH EXTERNAL " + str(os.geteuid()).encode().hex().encode() + b"\r\n")
        answer = b""
        while not answer.endswith(b"\r\n"):
            chunk = sock.recv(256)
            if not chunk or len(answer) > 4096:
                raise ConnectionResetError(f"D-Bus at {path} hung up during authentication")
            answer += chunk
        if not answer.startswith(b"OK "):
            raise ConnectionRefusedError(f"D-Bus at {path} refused authentication: {answer.strip()!r}")
        sock.sendall(b"BEGIN\r\n")
    except BaseException:
        sock.close()
        raise
    return sock


_METHOD_RETURN = 2
_REPLY_SERIAL, _SIGNATURE = 5, 8  # header field codes


def _pad(buf: bytearray, n: int) -> None:
    buf += bytes(-len(buf) % n)


def _get_call(path: str, iface: str, prop: str) -> bytes:
    """``org.freedesktop.DBus.Properties.Get(iface, prop)`` on systemd's object ``path``, as D-Bus wire bytes
    (little-endian, serial 0: the sender writes each request's serial at bytes 8-11)."""
    def field_(code: int, sig: bytes, value: str) -> None:
        _pad(msg, 8)
        raw = value.encode()
        msg.extend((code, 1, *sig, 0))
        if sig == b"g":
            msg.extend((len(raw), *raw, 0))
        else:
            _pad(msg, 4)
            msg.extend(struct.pack("<I", len(raw)) + raw + b"\0")

    msg = bytearray(16)
    field_(1, b"o", path)
    field_(2, b"s", "org.freedesktop.DBus.Properties")
    field_(3, b"s", "Get")
    field_(6, b"s", "org.freedesktop.systemd1")
    field_(8, b"g", "ss")
    fields_len = len(msg) - 16
    _pad(msg, 8)
    body = bytearray()
    for text in (iface, prop):
        _pad(body, 4)
        raw = text.encode()
        body += struct.pack("<I", len(raw)) + raw + b"\0"
    struct.pack_into("<4sIII", msg, 0, b"l\x01\x00\x01", len(body), 0, fields_len)
    return bytes(msg + body)


_BASIC = {b"u": "<I", b"i": "<i", b"t": "<Q", b"x": "<q", b"b": "<I", b"d": "<d", b"q": "<H", b"n": "<h"}


def _messages(buf: bytearray) -> tuple[list[tuple[int | None, Any]], int]:
    """The whole messages at the start of ``buf``: ``(reply serial or None, value)`` each -- a method return's
    only value (a Get's variant unwrapped), None for an error -- and how many bytes they took."""
    out: list[tuple[int | None, Any]] = []
    off = 0
    while len(buf) - off >= 16:
        body_len, _serial, fields_len = struct.unpack_from("<III", buf, off + 4)
        start = off + 16 + fields_len + (-(16 + fields_len) % 8)
        end = start + body_len
        if buf[off] != 0x6C:  # "l": systemd answers in its own (little-endian) byte order; anything else: jeepney
            end = off + _big_endian_length(buf, off)
            if end > len(buf):
                break
            out.append(_by_jeepney(bytes(buf[off:end])))
        elif end > len(buf):
            break
        else:
            try:
                out.append(_decode(buf, off, start))
            except (ValueError, IndexError, struct.error):
                out.append(_by_jeepney(bytes(buf[off:end])))
        off = end
    return out, off


def _decode(buf: bytearray, off: int, start: int) -> tuple[int | None, Any]:
    """One little-endian message; ValueError for a shape only jeepney decodes."""
    kind = buf[off + 1]
    reply_serial, sig = None, b""
    pos = off + 16
    fields_end = off + 16 + struct.unpack_from("<I", buf, off + 12)[0]
    while pos < fields_end:
        pos += -(pos - off) % 8
        code, n = buf[pos], buf[pos + 1]
        vsig = bytes(buf[pos + 2:pos + 2 + n])
        pos += 3 + n
        if vsig == b"g":
            glen = buf[pos]
            if code == _SIGNATURE:
                sig = bytes(buf[pos + 1:pos + 1 + glen])
            pos += glen + 2
        elif vsig in (b"s", b"o"):
            pos += -(pos - off) % 4
            pos += 4 + struct.unpack_from("<I", buf, pos)[0] + 1
        elif vsig == b"u":
            pos += -(pos - off) % 4
            if code == _REPLY_SERIAL:
                reply_serial = struct.unpack_from("<I", buf, pos)[0]
            pos += 4
        else:
            raise ValueError(f"header field of type {vsig!r}")
    if kind != _METHOD_RETURN or not sig:  # an error (None), a signal (no reply serial), an empty return
        return reply_serial, None
    pos = start
    if sig == b"v":  # a Get: the variant's own signature, then its value
        n = buf[pos]
        sig = bytes(buf[pos + 1:pos + 1 + n])
        pos += n + 2
    value, _ = _value(buf, off, pos, sig)
    return reply_serial, value


def _value(buf: bytearray, off: int, pos: int, sig: bytes) -> tuple[Any, int]:
    """One value of signature ``sig`` at ``pos`` (alignment counts from the message's start ``off``)."""
    if sig in (b"s", b"o"):
        pos += -(pos - off) % 4
        n = struct.unpack_from("<I", buf, pos)[0]
        return bytes(buf[pos + 4:pos + 4 + n]).decode(), pos + 5 + n
    if sig == b"g":
        n = buf[pos]
        return bytes(buf[pos + 1:pos + 1 + n]).decode(), pos + n + 2
    if sig == b"y":
        return buf[pos], pos + 1
    if sig == b"ay":
        pos += -(pos - off) % 4
        n = struct.unpack_from("<I", buf, pos)[0]
        return bytes(buf[pos + 4:pos + 4 + n]), pos + 4 + n
    fmt = _BASIC.get(sig)
    if fmt is None:
        raise ValueError(f"value of type {sig!r}")
    size = struct.calcsize(fmt)
    pos += -(pos - off) % size
    value = struct.unpack_from(fmt, buf, pos)[0]
    return (bool(value) if sig == b"b" else value), pos + size


def _big_endian_length(buf: bytearray, off: int) -> int:
    body_len, _serial, fields_len = struct.unpack_from(">III", buf, off + 4)
    return 16 + fields_len + (-(16 + fields_len) % 8) + body_len


def _by_jeepney(raw: bytes) -> tuple[int | None, Any]:
    from jeepney.low_level import HeaderFields, MessageType, Parser

    msg = Parser().feed(raw)[0]
    serial = msg.header.fields.get(HeaderFields.reply_serial)
    ok = msg.header.message_type is MessageType.method_return
    body = msg.body[0] if ok and msg.body else None
    return serial, body[1] if isinstance(body, tuple) and len(body) == 2 else body


def run_check() -> None:
    if not available():
        raise Unavailable(
            "systemd is not running here (no /run/systemd/system)",
            "run lanectl on a host booted with systemd, or inside the private systemd that scripts/demo boots "
            "(scripts/sdbox exec lanectl ...)",
            "systemd_unavailable",
        )


_SPAN_UNITS = {"us": 1, "ms": 1_000, "s": 1_000_000, "min": 60_000_000, "h": 3_600_000_000,
               "d": 86_400_000_000, "w": 604_800_000_000}


def parse_timespan_us(text: str) -> int | None:
    """'1min 30s', '500ms', '5s' or a plain number of microseconds -> microseconds; None for infinity/empty."""
    text = text.strip()
    if not text or text == "infinity":
        return None
    if text.isdigit():  # microseconds, as D-Bus gives them; 2^64-1 is systemd's infinity
        return int(text) if int(text) != UNSET else None
    total = 0.0
    for num, unit in re.findall(r"([0-9.]+)\s*([a-z]+)", text):
        if unit not in _SPAN_UNITS:
            return None
        total += float(num) * _SPAN_UNITS[unit]
    return int(total) or None


def daemon_reload() -> None:
    run("daemon-reload")


def monotonic_now_us() -> int:
    return int(float(Path("/proc/uptime").read_text().split()[0]) * 1e6)

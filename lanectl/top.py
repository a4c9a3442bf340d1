"""`lanectl top`: a live view of the fleet, refreshed about once a second.

It reads what the other commands read, through their code: each lane's unit, restarts, watchdog, memory, CPU and
health come from ``status.collect`` (one systemd query and parallel health checks, as ``lanectl status``); the
dispatch state, in flight, capacity, queue depth, oldest and p95 queue wait come from ``evidence.metrics`` over a
short window (as ``lanectl metrics``, with ``now_state``); the last events from ``evidence.events`` (as ``lanectl
events``). The ledger is opened read-only once. CPU is the share of one CPU used between two refreshes (the lane
cgroup's CPU time, what systemd reports as ``CPUUsageNSec``: ``status.cgroup_usage``), not the average since start
that ``status`` shows.

The screen is drawn by rich ``Live`` on the alternate screen and replaced in place each refresh (no clearing, so
no flicker over SSH). ``q`` or Ctrl-C leaves and restores the terminal; so do SIGTERM and SIGHUP. On a narrow
terminal columns are dropped from the right, least useful first; the events fill whatever height is left.
"""
from __future__ import annotations

import os
import select
import signal
import stat
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from typing import Any

from lanectl import evidence
from lanectl.errors import ExitCode, LanectlError
from lanectl.ledger import Error as LedgerError
from lanectl.ledger import Ledger
from lanectl.output import escape, human_bytes, human_duration
from lanectl.status import LaneStatus, collect

DEFAULT_INTERVAL_S = 1.0
DEFAULT_WINDOW_S = 300.0
STATE_STYLE = {"active": "green", "draining": "yellow", "drained": "dim", "degraded": "bold yellow",
               "disabled": "dim", "up": "green", "down": "red", "failed": "bold red", "starting": "yellow"}


class Frame:
    """One refresh: what the screen shows (plain data, rendered by ``render``)."""

    def __init__(self, at: float) -> None:
        self.at = at
        self.rows: list[LaneStatus] = []
        self.cpu_now: dict[str, float | None] = {}
        self.metrics: dict[str, Any] | None = None
        self.events: list[dict[str, Any]] = []
        self.errors: list[str] = []


class Source:
    """Gathers frames: the installed fleet (manifest), a read-only ledger connection kept open between frames, and
    the previous frame's CPU counters (for the CPU used since then)."""

    def __init__(self, fleet: dict[str, Any], ledger_path: str, *, window_s: float = DEFAULT_WINDOW_S,
                 events: int = 50) -> None:
        self.fleet = fleet
        self.ledger_path = ledger_path
        self.window_s = window_s
        self.events = events
        self.capacity = {name: int(lane.get("capacity") or 0) for name, lane in fleet["lanes"].items()}
        self.conn: Ledger | None = None
        self.cpu: dict[str, tuple[float, float]] = {}  # lane -> (cpu seconds, monotonic time)

    def ledger(self) -> Ledger:
        if self.conn is None and not str(self.ledger_path).startswith(("postgresql://", "postgres://")):
            try:  # a file this user may not see (a 0700 state directory) is not a file that does not exist
                st = os.stat(self.ledger_path)
            except FileNotFoundError:
                raise FileNotFoundError(f"ledger {self.ledger_path} does not exist") from None
            except PermissionError:
                raise PermissionError(f"ledger {self.ledger_path} cannot be read by this user (permission "
                                      f"denied): run as root or as its owner") from None
            if not stat.S_ISREG(st.st_mode):
                raise FileNotFoundError(f"ledger {self.ledger_path} is not a file")
            if not os.access(self.ledger_path, os.R_OK):
                raise PermissionError(f"ledger {self.ledger_path} cannot be read by this user (permission "
                                      f"denied): run as root or as its owner")
        if self.conn is None:  # a file checked above, or a PostgreSQL URL (its errors are LanectlErrors)
            self.conn = Ledger.open_readonly(self.ledger_path, timeout_s=2.0, must_exist=True, any_thread=True)
        return self.conn

    def frame(self) -> Frame:
        now = time.time()
        f = Frame(now)
        try:
            f.rows = collect(self.fleet["lanes"], None, self.fleet.get("supervisor"))
        except LanectlError as exc:
            f.errors.append(f"systemd: {exc.message}")
        mono = time.monotonic()
        for r in f.rows:
            prev = self.cpu.get(r.name)
            if r.cpu_seconds is not None:
                self.cpu[r.name] = (r.cpu_seconds, mono)
                if prev is not None and mono > prev[1] and r.cpu_seconds >= prev[0]:
                    f.cpu_now[r.name] = 100.0 * (r.cpu_seconds - prev[0]) / (mono - prev[1])
        try:
            conn = self.ledger()
            f.metrics = evidence.metrics(conn, self.window_s, now, capacity=self.capacity)
            f.events = evidence.events(conn, limit=self.events, latest=True)
        except (OSError, LedgerError, LanectlError) as exc:
            f.errors.append(f"ledger: {exc}")
            self.close()  # opened afresh next time (the file may come back)
        return f

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None


# ------------------------------------------------------------------------------------------------ rendering


def _secs(v: float | None) -> str:
    if v is None:
        return "-"
    return f"{v * 1000:.0f}ms" if v < 1 else f"{v:.1f}s" if v < 60 else human_duration(v)


def _styled(word: str) -> str:
    style = STATE_STYLE.get(word)
    return f"[{style}]{escape(word)}[/]" if style else escape(word)


LANE_COLUMNS = ("lane", "state", "flight", "unit", "cpu", "mem", "restarts", "watchdog", "health", "up")
"""In the order they are given up on a narrow terminal, from the right; the first three always stay."""


def _lane_cells(r: LaneStatus, f: Frame, lanes: dict[str, dict[str, Any]],
                states: dict[str, dict[str, Any]]) -> dict[str, str]:
    m = lanes.get(r.name, {})
    st = states.get(r.name, {})
    dispatch = st.get("state") or "-"
    if r.kind == "supervisor":
        state = _styled(r.state)
    elif r.state in ("up", "disabled"):
        state = _styled(dispatch if r.state == "up" else "disabled")
    else:  # the unit or its health is the news: "active" would hide it
        state = _styled(r.state) + ("" if dispatch in ("-", "active") else f" {_styled(dispatch)}")
    cap = m.get("capacity")
    flight = "" if r.kind == "supervisor" else f"{m.get('in_flight', 0)}/{cap if cap else '-'}"
    wd = "-" if r.watchdog_sec is None else (
        f"{r.watchdog_ping_age_s:.1f}/{r.watchdog_sec:g}s" if r.watchdog_ping_age_s is not None
        else f"-/{r.watchdog_sec:g}s")
    cpu = f.cpu_now.get(r.name)
    return {
        "lane": escape(r.name) if r.kind == "lane" else "[bold](supervisor)[/]",
        "state": state,
        "flight": flight,
        "unit": escape(f"{r.active_state}/{r.sub_state}"),
        "cpu": "-" if cpu is None else f"{cpu:.1f}%",
        "mem": human_bytes(r.memory_bytes),
        "restarts": str(r.restarts),
        "watchdog": wd,
        "health": "ok" if r.health.ok else escape(r.health.error or "-"),
        "up": human_duration(r.uptime_s),
    }


def render(f: Frame, width: int, height: int, *, interval_s: float = DEFAULT_INTERVAL_S,
           window_s: float = DEFAULT_WINDOW_S) -> Any:
    """The screen for one frame at this terminal size (a rich renderable)."""
    from rich import box
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    m = f.metrics or {"lanes": [], "classes": [], "now_state": {"lanes": [], "classes": []}}
    lanes = {r["lane"]: r for r in m["lanes"]}
    states = {r["lane"]: r for r in m["now_state"]["lanes"]}
    lane_rows = [r for r in f.rows if r.kind == "lane"]
    up = sum(1 for r in lane_rows if r.ok and r.enabled)
    queued = sum(c["queued"] for c in m["now_state"]["classes"])
    in_flight = sum(r.get("in_flight", 0) for r in m["lanes"])
    head = Text.from_markup(
        f"[bold]lanectl top[/]  {datetime.fromtimestamp(f.at).strftime('%H:%M:%S')}  "
        f"{up}/{sum(1 for r in lane_rows if r.enabled)} lanes up  {queued} queued  {in_flight} in flight"
        + (f"  every {interval_s:g}s  q quits" if width >= 72 else "  q quits"), overflow="ellipsis")
    head.no_wrap = True
    parts: list[Any] = [head]
    for err in f.errors:
        parts.append(Text(err, style="bold red", overflow="ellipsis", no_wrap=True))

    cells = [_lane_cells(r, f, lanes, states) for r in f.rows]
    shown: list[str] = []
    used_w = 0
    for i, h in enumerate(LANE_COLUMNS):  # as many columns as fit whole, at their widest cell
        need = max([len(h)] + [Text.from_markup(c[h]).cell_len for c in cells]) + 3  # padding, divider
        if i >= 3 and used_w + need > width:
            break
        shown.append(h)
        used_w += need
    t = Table(*shown, box=box.SIMPLE_HEAD, padding=(0, 1), expand=False, pad_edge=False)
    for c in cells:
        t.add_row(*[c[h] for h in shown])
    for col in t.columns:
        col.no_wrap = True
        col.overflow = "ellipsis"
    parts.append(t)

    window = f"{window_s / 60:g}m" if window_s >= 60 else f"{window_s:g}s"
    c = Table("class", "queued", "oldest", *(["p95 wait " + window] if width >= 40 else []),
              box=box.SIMPLE_HEAD, padding=(0, 1), pad_edge=False)
    p95 = {r["class"]: r["queue_wait_s"]["p95"] for r in m["classes"]}
    for row in m["now_state"]["classes"]:
        cells = [escape(row["class"]), str(row["queued"]), _secs(row["oldest_wait_s"] if row["queued"] else None)]
        if width >= 40:
            cells.append(_secs(p95.get(row["class"])))
        c.add_row(*cells)
    parts.append(c)

    used = 1 + len(f.errors) + (len(f.rows) + 4) + (len(m["now_state"]["classes"]) + 4)  # SIMPLE_HEAD: 4 lines
    room = max(0, height - used)
    if room >= 2:
        parts.append(Text("last events", style="bold"))
        for ev in f.events[-(room - 1):]:
            when = datetime.fromtimestamp(ev["ts"]).strftime("%H:%M:%S")
            what = [ev["kind"]]
            if ev.get("lane"):
                what.append(f"lane={ev['lane']}")
            if ev.get("mission") is not None:
                what.append(f"mission={ev['mission']}")
            data = ev.get("data") or {}
            for key in ("to", "reason", "trigger", "actor"):
                if data.get(key):
                    what.append(f"{key}={data[key]}")
            parts.append(Text(f"{when} " + " ".join(str(w) for w in what), overflow="ellipsis", no_wrap=True))
    return Group(*parts)


# ------------------------------------------------------------------------------------------------ the loop


@contextmanager
def _keys(stream: Any) -> Iterator[int | None]:
    """stdin in cbreak mode (keys one by one, no echo; Ctrl-C still a signal), restored on the way out."""
    try:
        fd = stream.fileno()
    except (AttributeError, ValueError, OSError):
        yield None
        return
    if not os.isatty(fd):
        yield None
        return
    import termios
    import tty

    saved = termios.tcgetattr(fd)
    try:
        tty.setcbreak(fd)
        yield fd
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


def _wait_key(fd: int | None, timeout: float) -> str:
    """A key pressed within ``timeout`` seconds ('' if none)."""
    if fd is None:
        time.sleep(max(0.0, timeout))
        return ""
    ready, _, _ = select.select([fd], [], [], max(0.0, timeout))
    if not ready:
        return ""
    try:
        return os.read(fd, 32).decode("utf-8", "replace")
    except OSError:
        return ""


class _Stop(Exception):
    pass


def run(source: Source, *, interval_s: float = DEFAULT_INTERVAL_S, once: bool = False, console: Any = None,
        stdin: Any = None) -> int:
    """Draw frames until q, Ctrl-C, SIGTERM or SIGHUP (or one frame with ``once``, or when stdout is no terminal).

    Returns the exit code: 0; with one frame (``once`` or no terminal), 6 when the ledger or systemd could not be
    read (the frame shows why, and so does stderr), so that a script never takes an empty view for an idle fleet.
    The live view goes on instead, showing the error. The terminal is restored in every case."""
    from rich.live import Live

    from lanectl.output import stdout_console

    console = console or stdout_console()  # 200 columns when stdout is no terminal, as every table of lanectl
    stdin = sys.stdin if stdin is None else stdin
    try:
        if once or not console.is_terminal:
            f = source.frame()
            size = console.size
            console.print(render(f, size.width, 10_000, interval_s=interval_s, window_s=source.window_s))
            if f.errors:
                for e in f.errors:
                    sys.stderr.write(f"lanectl top: {e}\n")
                return int(ExitCode.UNAVAILABLE)
            return 0

        def stop(signum: int, _frame: Any) -> None:
            raise _Stop()

        old = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGHUP)}
        try:
            with _keys(stdin) as fd, Live(console=console, screen=True, auto_refresh=False,
                                          redirect_stdout=False, redirect_stderr=False) as live:
                while True:
                    started = time.monotonic()
                    f = source.frame()
                    size = console.size
                    live.update(render(f, size.width, size.height, interval_s=interval_s,
                                       window_s=source.window_s), refresh=True)
                    deadline = started + interval_s
                    while (left := deadline - time.monotonic()) > 0:
                        key = _wait_key(fd, left)
                        if "q" in key.lower():
                            return 0
        except (KeyboardInterrupt, _Stop):
            return 0
        finally:
            for s, h in old.items():
                signal.signal(s, h)
    finally:
        source.close()

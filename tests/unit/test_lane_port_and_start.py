"""Fixes from the issue-10 attack: who holds a lane's port (read from the kernel), and a mission that cannot even
be started fails alone instead of taking its lane's runtime down."""
from __future__ import annotations

import os
import socket
import time
from pathlib import Path

from lanectl.protocol import DispatchMsg, _listeners_by_netlink, _listeners_by_proc, tcp_listener_uids
from lanectl.runtime import LaneInfo, LaneRuntime, Running


def test_the_listener_of_a_port_and_its_uid_come_from_the_kernel() -> None:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    try:
        assert tcp_listener_uids({port}) == {port: set()}  # bound, not listening: nobody answers there
        s.listen(1)
        assert tcp_listener_uids({port}) == {port: {os.getuid()}}
    finally:
        s.close()
    assert tcp_listener_uids({port}) == {port: set()}


def test_netlink_and_proc_name_the_same_listeners() -> None:
    """The supervisor asks sock_diag (listening sockets only); /proc/net/tcp{,6} is the fallback: both must name
    the same uids for listeners that can answer a connection to 127.0.0.1 (127.0.0.1, 0.0.0.0, a dual-stack ::),
    and none for a socket bound but not listening, nor for ::1 (it answers nothing lanectl sends)."""
    socks = []
    for family, addr in ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET, "0.0.0.0"), (socket.AF_INET6, "::")):
        s = socket.socket(family)
        if family == socket.AF_INET6:
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        s.bind((addr, 0))
        s.listen(1)
        socks.append(s)
    bound = socket.socket()
    bound.bind(("127.0.0.1", 0))
    v6loop = socket.socket(socket.AF_INET6)
    v6loop.bind(("::1", 0))
    v6loop.listen(1)
    try:
        listening = {s.getsockname()[1] for s in socks}
        ports = listening | {bound.getsockname()[1], v6loop.getsockname()[1]}
        by_netlink = _listeners_by_netlink(ports)
        assert by_netlink == _listeners_by_proc(ports, "/proc/net")
        assert by_netlink == {p: ({os.getuid()} if p in listening else set()) for p in ports}
    finally:
        for s in [*socks, bound, v6loop]:
            s.close()


def test_a_listener_on_another_address_of_a_lanes_port_does_not_take_the_lane_out() -> None:
    """Found by an attack on issue 11 (F4, older): another lane's user listening on [::1]:PORT or on a v6-only
    [::]:PORT (neither can answer lanectl's connections to 127.0.0.1:PORT) made the supervisor call the lane's
    port held by a stranger and stop dispatching to it. Only listeners that can answer 127.0.0.1 count: each
    squatter alone on a port is nobody; a dual-stack [::] (which does answer 127.0.0.1) is its uid."""
    for addr, v6only, counted in (("::1", 0, False), ("::", 1, False), ("::", 0, True)):
        s = socket.socket(socket.AF_INET6)
        try:
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, v6only)
            s.bind((addr, 0))
            s.listen(1)
            port = s.getsockname()[1]
            assert tcp_listener_uids({port}) == {port: {os.getuid()} if counted else set()}, (addr, v6only)
        finally:
            s.close()


def _runtime(tmp_path: Path) -> LaneRuntime:
    return LaneRuntime(LaneInfo("alpha", 0, str(tmp_path), "alpha", 2, dispatch_key="k" * 64))


def test_a_nul_in_argv_fails_the_mission_and_not_the_runtime(tmp_path: Path) -> None:
    rt = _runtime(tmp_path)
    (tmp_path / ".lanectl" / "out").mkdir(parents=True)
    msg = DispatchMsg(1, 1, "alpha", "t", "background", None, None, {"argv": ["/bin/echo", "a\0b"]})
    err = rt.start_mission(Running(msg, time.monotonic()))
    assert err is not None and "NUL" in err


def test_a_runtime_whose_start_raises_fails_that_mission_only(tmp_path: Path) -> None:
    class Broken(LaneRuntime):
        def start_mission(self, r: Running) -> str | None:
            raise ValueError("embedded null byte")

    rt = Broken(LaneInfo("alpha", 0, str(tmp_path), "alpha", 2, dispatch_key="k" * 64))
    (tmp_path / ".lanectl" / "out").mkdir(parents=True)
    msg = DispatchMsg(7, 1, "alpha", "t", "background", None, None, {"argv": ["/bin/true"]})
    rt.held[7] = Running(msg, time.monotonic())
    rt.work_once()  # must not raise
    assert 7 not in rt.held
    cb = rt.reporter.q.get_nowait()  # the callback the lane will deliver (its reporter thread is not started)
    assert (cb.mission, cb.event) == (7, "failed") and "embedded null byte" in (cb.error or "")

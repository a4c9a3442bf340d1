"""Landlock for missions: what a mission may write, and whom it may signal, however it runs.

A mission runs as the lane's user, like its runtime, and the lane's delegated cgroups (lanectl/cgroups.py) belong
to that user: without more, a mission could raise its own task limit, lower the runtime's, or move itself out of
its cgroup and outlive its end. The runtime builds one Landlock ruleset at start; each mission's process enters it
between fork and exec (``restrict``), so the mission and everything it starts can create, remove or write files only
beneath the lane's workspace, /tmp, /var/tmp, /dev and /proc (its namespace setup writes /proc/self/uid_map) —
never in /sys/fs/cgroup. Where the kernel has Landlock ABI 6, signals are scoped too: a mission cannot signal a
process outside its own Landlock domain (the runtime, other missions).

Landlock needs no privilege (``no_new_privs``, which the lane unit sets) and its syscalls are allowed in the lane
unit's SystemCallFilter=. Where the kernel lacks it, ``Ruleset.create`` raises OSError and the runtime says so.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import struct

SYS_CREATE_RULESET, SYS_ADD_RULE, SYS_RESTRICT_SELF = 444, 445, 446  # the same on every architecture
CREATE_RULESET_VERSION = 1
RULE_PATH_BENEATH = 1
PR_SET_NO_NEW_PRIVS = 38

WRITE_FILE = 1 << 1
REMOVE_DIR = 1 << 4
REMOVE_FILE = 1 << 5
MAKE = sum(1 << b for b in range(6, 13))  # char, dir, reg, sock, fifo, block, sym
REFER = 1 << 13  # ABI 2
TRUNCATE = 1 << 14  # ABI 3
SCOPE_SIGNAL = 1 << 1  # ABI 6

WRITABLE = ("/tmp", "/var/tmp", "/dev", "/proc")
"""Besides the workspace: where a mission may write (the rest of a lane's view is read-only anyway)."""


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def abi() -> int:
    """The kernel's Landlock ABI version, 0 when it has none (or a seccomp filter hides it)."""
    libc = _libc()
    libc.syscall.restype = ctypes.c_long
    v = libc.syscall(SYS_CREATE_RULESET, None, ctypes.c_size_t(0), ctypes.c_uint32(CREATE_RULESET_VERSION))
    return max(0, int(v))


class Ruleset:
    """A ruleset fd (close-on-exec) that a mission's process enters before exec."""

    def __init__(self, fd: int, version: int, scoped: bool) -> None:
        self.fd = fd
        self.version = version
        self.scoped = scoped
        self._libc = _libc()
        self._libc.syscall.restype = ctypes.c_long
        self._libc.prctl.restype = ctypes.c_int

    @classmethod
    def create(cls, writable: list[str], scope_signals: bool) -> Ruleset:
        version = abi()
        if version < 1:
            raise OSError(ctypes.get_errno() or 38, "the kernel has no Landlock (or it is not allowed here)")
        handled = WRITE_FILE | REMOVE_DIR | REMOVE_FILE | MAKE
        if version >= 2:
            handled |= REFER
        if version >= 3:
            handled |= TRUNCATE
        scoped = scope_signals and version >= 6
        if scoped:
            attr = struct.pack("=QQQ", handled, 0, SCOPE_SIGNAL)
        else:
            attr = struct.pack("=Q", handled)
        libc = _libc()
        libc.syscall.restype = ctypes.c_long
        buf = ctypes.create_string_buffer(attr, len(attr))
        fd = int(libc.syscall(SYS_CREATE_RULESET, buf, ctypes.c_size_t(len(attr)), ctypes.c_uint32(0)))
        if fd < 0:
            e = ctypes.get_errno()
            raise OSError(e, f"landlock_create_ruleset: {os.strerror(e)}")
        try:
            for path in writable:
                try:
                    pfd = os.open(path, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
                except OSError:
                    continue  # not in this lane's view: nothing to allow there
                try:
                    rule = ctypes.create_string_buffer(struct.pack("=Qi", handled, pfd), 12)
                    if libc.syscall(SYS_ADD_RULE, ctypes.c_int(fd), ctypes.c_int(RULE_PATH_BENEATH), rule,
                                    ctypes.c_uint32(0)) != 0:
                        e = ctypes.get_errno()
                        raise OSError(e, f"landlock_add_rule {path}: {os.strerror(e)}")
                finally:
                    os.close(pfd)
        except BaseException:
            os.close(fd)
            raise
        return cls(fd, version, scoped)

    def restrict(self) -> None:
        """In the child between fork and exec: enter the ruleset (for good: exec and children keep it)."""
        if self._libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS)")
        if self._libc.syscall(SYS_RESTRICT_SELF, ctypes.c_int(self.fd), ctypes.c_uint32(0)) != 0:
            e = ctypes.get_errno()
            raise OSError(e, f"landlock_restrict_self: {os.strerror(e)}")

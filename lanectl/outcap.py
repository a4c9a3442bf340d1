"""Mission output with bounds (issue 17 item 3): what the reference runtime keeps of a mission's stdout and stderr.

A mission writes into a pipe; a pump thread reads it and keeps the first half of ``max_bytes`` in
``WORKSPACE/.lanectl/out/MISSION-ATTEMPT.log`` as it comes and the last half in a ring buffer on disk (an unnamed
file in the same directory, so memory stays small whatever the mission writes). When the mission's output ends, the
tail is appended to the log; if anything was cut in between, one line says how much, where, and what is kept::

    [lanectl: 104857600 bytes of output; 96468992 bytes cut here; the first 4194304 and the last 4194304 are kept]

A mission's stored output is therefore at most ``max_bytes`` plus that line. The output ends at the pipe's end of
file, or ``OUTPUT_GRACE_S`` after the mission's process exited (a background child that still holds the pipe then
gets EPIPE). ``prune()`` keeps ``out/`` as a whole within ``keep_bytes`` and ``keep_files``, oldest first.

Limits come from the lane unit's environment (``[output]`` in the lane file, docs/lanes.md):
``LANECTL_OUTPUT_MAX_BYTES``, ``LANECTL_OUTPUT_KEEP_BYTES``, ``LANECTL_OUTPUT_KEEP_FILES``.
"""
from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import select
import stat
import threading
import time
from dataclasses import dataclass
from typing import Final

log = logging.getLogger("lanectl.runtime")
DEFAULT_MAX_BYTES: Final = 8 << 20
DEFAULT_KEEP_BYTES: Final = 1 << 30
DEFAULT_KEEP_FILES: Final = 10_000
MIN_MAX_BYTES: Final = 8192
OUTPUT_GRACE_S: Final = 2.0
"""How long output is still read after the mission's process exited, for children that hold the pipe."""
CHUNK: Final = 1 << 16
OUT_DIR: Final = "out"
LOG_RE: Final = re.compile(r"^[0-9]{1,19}-[0-9]{1,9}\.log$")
"""The only names ``prune()`` ever deletes."""


@dataclass(frozen=True)
class Limits:
    max_bytes: int = DEFAULT_MAX_BYTES
    keep_bytes: int = DEFAULT_KEEP_BYTES
    keep_files: int = DEFAULT_KEEP_FILES

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> Limits:
        e = os.environ if env is None else env

        def num(key: str, default: int, least: int) -> int:
            try:
                return max(least, int(e.get(key, default)))
            except ValueError:
                log.warning("%s=%r is not a number of bytes; using %d", key, e.get(key), default)
                return default

        return cls(num("LANECTL_OUTPUT_MAX_BYTES", DEFAULT_MAX_BYTES, MIN_MAX_BYTES),
                   num("LANECTL_OUTPUT_KEEP_BYTES", DEFAULT_KEEP_BYTES, MIN_MAX_BYTES),
                   num("LANECTL_OUTPUT_KEEP_FILES", DEFAULT_KEEP_FILES, 1))


def cut_line(total: int, cut: int, head: int, tail: int) -> bytes:
    return (f"\n[lanectl: {total} bytes of output; {cut} bytes cut here; the first {head} and the last {tail} "
            f"are kept]\n").encode()


def _write_all(fd: int, data: bytes | memoryview, offset: int | None = None) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view) if offset is None else os.pwrite(fd, view, offset)
        view = view[n:]
        if offset is not None:
            offset += n


class Capture:
    """One mission's output: ``write_fd`` goes to the mission as stdout and stderr (close it in the parent once the
    process started); a thread pumps the read end into the log. ``settle()`` says whether it has all been kept."""

    def __init__(self, dir_fd: int, name: str, max_bytes: int) -> None:
        self.name = name
        self.head = max_bytes // 2
        self.tail = max_bytes - self.head
        self.total = 0
        self.exited_at: float | None = None
        self.done = threading.Event()
        self.error: str | None = None
        self.lost = 0  # bytes read but not kept once writing failed
        self.fd = open_log(dir_fd, name)
        try:
            self.ring = self._ring(dir_fd)
            self.read_fd, self.write_fd = os.pipe2(os.O_CLOEXEC)
        except BaseException:
            os.close(self.fd)
            raise
        self.thread = threading.Thread(target=self._pump, name=f"output-{name}", daemon=True)

    @staticmethod
    def _ring(dir_fd: int) -> int:
        try:
            return os.open(".", os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, 0o600, dir_fd=dir_fd)
        except OSError:  # a file system without O_TMPFILE: a named file, unlinked at once
            name = f".ring-{os.getpid()}-{threading.get_ident()}-{time.monotonic_ns()}"
            fd = os.open(name, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600,
                         dir_fd=dir_fd)
            os.unlink(name, dir_fd=dir_fd)
            return fd

    def start(self) -> None:
        """After the process started: the parent's copy of the write end is closed, the pump runs."""
        os.close(self.write_fd)
        self.write_fd = -1
        self.thread.start()

    def abandon(self) -> None:
        """The process never started: close everything, keep what there is."""
        if self.write_fd >= 0:
            os.close(self.write_fd)
            self.write_fd = -1
        self._finish()

    def settle(self, now: float | None = None) -> bool:
        """Called once the process exited: True once its output is all kept (end of file, or the grace ran out)."""
        if self.exited_at is None:
            self.exited_at = time.monotonic() if now is None else now
        return self.done.is_set()

    def feed(self, data: bytes) -> None:
        if self.error is not None:  # could not write (disk full): keep draining, so the mission is not SIGPIPEd
            self.lost += len(data)
            return
        try:
            self._keep(data)
        except OSError as exc:
            self.error = f"output not kept past {self.total} bytes: {exc.strerror or exc}"
            self.lost += len(data)
            log.error("%s: %s", self.name, self.error)

    def _keep(self, data: bytes) -> None:
        if self.total < self.head:
            take = data[:self.head - self.total]
            _write_all(self.fd, take)
            self.total += len(take)
            data = data[len(take):]
        if not data:
            return
        past = self.total - self.head  # bytes already past the head
        if len(data) > self.tail:  # only its last `tail` bytes can survive
            skip = len(data) - self.tail
            past += skip
            self.total += skip
            data = data[skip:]
        at = past % self.tail
        first = data[:self.tail - at]
        _write_all(self.ring, first, at)
        if len(first) < len(data):
            _write_all(self.ring, data[len(first):], 0)
        self.total += len(data)

    def _pump(self) -> None:
        poller = select.poll()
        poller.register(self.read_fd, select.POLLIN | select.POLLHUP | select.POLLERR)
        try:
            while True:
                if self.exited_at is not None and time.monotonic() - self.exited_at > OUTPUT_GRACE_S:
                    break  # a child still holds the pipe: what it writes from now on is not kept
                if not poller.poll(200):
                    continue
                chunk = os.read(self.read_fd, CHUNK)
                if not chunk:
                    break
                self.feed(chunk)
        except OSError as exc:  # reading the pipe failed: nothing more can be kept
            self.error = self.error or f"output not kept past {self.total} bytes: {exc.strerror or exc}"
            log.error("%s: %s", self.name, self.error)
        finally:
            self._finish()

    def _finish(self) -> None:
        try:
            past = self.total - self.head
            if past > 0:
                if past <= self.tail:  # nothing cut: the ring holds the rest in order
                    segments = [(0, past)]
                else:  # the ring wrapped: its oldest byte is where the next would have gone
                    _write_all(self.fd, cut_line(self.total, past - self.tail, self.head, self.tail))
                    start = past % self.tail
                    segments = [(start, self.tail - start), (0, start)]
                for off, n in segments:
                    done = 0
                    while done < n:
                        b = os.pread(self.ring, min(CHUNK, n - done), off + done)
                        if not b:
                            break
                        _write_all(self.fd, b)
                        done += len(b)
            if self.error:
                lost = f" ({self.lost} more bytes were discarded)" if self.lost else ""
                _write_all(self.fd, f"\n[lanectl: {self.error}{lost}]\n".encode())
        except OSError as exc:
            log.error("%s: cannot write the output's tail: %s", self.name, exc)
        finally:
            for fd in (self.fd, self.ring, self.read_fd):
                with contextlib.suppress(OSError):
                    os.close(fd)
            self.done.set()


_LOG_FLAGS: Final = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
_PLANTED: Final = (errno.ELOOP, errno.EISDIR, errno.ENXIO, errno.EWOULDBLOCK, errno.ENODEV, errno.ENOTDIR,
                   errno.EACCES, errno.EPERM, errno.ETXTBSY)


def open_log(dir_fd: int, name: str) -> int:
    """``name`` in ``dir_fd`` for writing, empty: a regular file of this uid with no other link. Whatever a mission
    planted there (a directory, a link, a FIFO, a file of mode 000, a hard link to another file of the lane) is
    moved aside (``NAME.refused-NS``, never deleted nor followed, nothing blocks) and a fresh file made: what was
    planted at a log's path never fails the mission that log belongs to."""
    for _ in range(3):
        try:
            fd = os.open(name, _LOG_FLAGS, 0o600, dir_fd=dir_fd)
        except FileNotFoundError:
            raise
        except OSError as exc:
            if exc.errno not in _PLANTED:
                raise
            move_aside(dir_fd, name, f"cannot be written ({os.strerror(exc.errno)})")
            continue
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid() or st.st_nlink != 1:
                why = ("not a regular file" if not stat.S_ISREG(st.st_mode) else f"owned by uid {st.st_uid}"
                       if st.st_uid != os.geteuid() else f"has {st.st_nlink} links")
                os.close(fd)
                move_aside(dir_fd, name, why)
                continue
            os.ftruncate(fd, 0)  # only now: a hard link to another file is never truncated
            os.set_blocking(fd, True)
            return fd
        except BaseException:
            with contextlib.suppress(OSError):
                os.close(fd)
            raise
    raise OSError(errno.EAGAIN, f"{name} keeps being replaced")


def move_aside(dir_fd: int, name: str, why: str) -> None:
    dest = f"{name}.refused-{time.time_ns()}"
    os.rename(name, dest, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    log.warning("%s: %s; moved it aside to %s", name, why, dest)


def restore_mode(fd: int, mode: int = 0o700) -> None:
    """A directory of this uid (``fd``) that a mission (same uid) chmodded: give it back ``mode`` (its owner may)."""
    st = os.fstat(fd)
    if st.st_uid == os.geteuid() and stat.S_IMODE(st.st_mode) != mode:
        os.chmod(f"/proc/self/fd/{fd}" if _is_path_fd(fd) else fd, mode)
        log.warning("restored mode %o of a directory of this lane (it was %o)", mode, stat.S_IMODE(st.st_mode))


def _is_path_fd(fd: int) -> bool:
    import fcntl

    return bool(fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_PATH)


def open_own_dir(parent_fd: int, name: str, flags: int) -> int:
    """``os.open(name, flags, dir_fd=parent_fd)`` for a directory of this lane; when that is refused for its mode
    (EACCES: a mission did ``chmod 000``), the directory, if it is one of this uid (opened without following a link),
    gets its mode 0700 back and is opened again. Any other error is the caller's."""
    try:
        fd = os.open(name, flags, dir_fd=parent_fd)
    except PermissionError:
        try:
            p = os.open(name, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=parent_fd)
        except OSError:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), name) from None
        try:
            if os.fstat(p).st_uid != os.geteuid():
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), name)
            restore_mode(p)
        finally:
            os.close(p)
        fd = os.open(name, flags, dir_fd=parent_fd)
    try:
        restore_mode(fd)  # readable but not writable or searchable (chmod 500): ours again as well
    except OSError:
        os.close(fd)
        raise
    return fd


def open_out_dir(state_fd: int) -> int:
    """A descriptor of ``out/`` under the lane's state directory (``state_fd``, opened by the runtime), made when
    missing. It is opened without following a link and must be a directory of this process's uid; anything else
    there (a link a mission planted, a file) is moved aside and a fresh directory made; its mode is restored when a
    mission changed it."""
    for _ in range(3):
        try:
            dfd = open_own_dir(state_fd, OUT_DIR, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            with contextlib.suppress(FileExistsError):
                os.mkdir(OUT_DIR, 0o700, dir_fd=state_fd)
            continue
        except OSError as exc:
            if exc.errno not in (errno.ELOOP, errno.ENOTDIR):
                raise
            _aside(state_fd, f"not a directory ({os.strerror(exc.errno)})")
            continue
        if os.fstat(dfd).st_uid != os.geteuid():
            _aside(state_fd, f"owned by uid {os.fstat(dfd).st_uid}")
            os.close(dfd)
            continue
        return dfd
    raise OSError(errno.EAGAIN, f"{OUT_DIR} keeps being replaced")


def open_capture(state_fd: int, name: str, max_bytes: int) -> Capture:
    """A capture of ``out/NAME`` under the lane's state directory (``state_fd``): ``out/`` as ``open_out_dir``
    gives it, the log as ``open_log`` makes it."""
    dfd = open_out_dir(state_fd)
    try:
        return Capture(dfd, name, max_bytes)
    finally:
        os.close(dfd)


def _aside(state_fd: int, why: str) -> None:
    dest = f"{OUT_DIR}.refused-{time.time_ns()}"
    os.rename(OUT_DIR, dest, src_dir_fd=state_fd, dst_dir_fd=state_fd)
    log.warning("%s: %s; moved it aside to %s", OUT_DIR, why, dest)


def prune(out_dir: str | os.PathLike[str], limits: Limits, active: set[str]) -> tuple[int, int]:
    """Delete the oldest finished mission logs in ``out_dir`` until the rest is within ``keep_bytes`` and
    ``keep_files``. Only ``MISSION-ATTEMPT.log`` regular files are considered (nothing else there is touched, no
    link followed), never one in ``active``. Returns (files deleted, bytes freed)."""
    try:
        dfd = os.open(out_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return 0, 0
    try:
        files: list[tuple[int, str, int]] = []
        with os.scandir(dfd) as it:
            for entry in it:
                if not LOG_RE.match(entry.name) or entry.name in active:
                    continue
                try:
                    st = entry.stat(follow_symlinks=False)
                except OSError:
                    continue
                if stat.S_ISREG(st.st_mode):
                    files.append((st.st_mtime_ns, entry.name, st.st_blocks * 512))
        files.sort()
        total = sum(f[2] for f in files)
        count = len(files)
        deleted = freed = 0
        for _, name, size in files:
            if total <= limits.keep_bytes and count <= limits.keep_files:
                break
            try:
                os.unlink(name, dir_fd=dfd)
            except OSError:
                continue
            total -= size
            count -= 1
            deleted += 1
            freed += size
        return deleted, freed
    finally:
        os.close(dfd)

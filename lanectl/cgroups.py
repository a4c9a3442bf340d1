"""One cgroup per mission, under the lane's own (delegated) cgroup: limits, a reserve for the runtime, kill-all.

Layout, in every cgroup hierarchy the lane can write (cgroup v2: the unified one; cgroup v1 hybrid: the unified one,
which has ``cgroup.kill``, plus the v1 ``pids`` and ``memory`` hierarchies)::

    lanectl-lane@NAME.service/      the unit's cgroup (systemd: TasksMax=, MemoryMax=)
        runtime/                    the lane runtime itself (moved there at start)
        missions/                   pids.max and memory limit = the unit's minus the runtime's reserve
            m<ID>-<ATTEMPT>/        one mission: every process it starts, however it forks or setsids; its own
                                    pids.max and memory limit = missions/'s minus a minimum share for each other
                                    slot of the lane (MIN_TASKS_PER_MISSION, MIN_MEMORY_PER_MISSION)

One mission can therefore never take every task or all the memory of ``missions/``: forking until EAGAIN or
allocating until the kernel says no hits its own limit first (the kernel kills within its own cgroup), and each other
slot of the lane keeps at least the minimum share. Several such missions on one lane together can still fill
``missions/``; a mission that then cannot start is returned to the queue uncharged (lanectl/runtime.py).

A mission's processes join its cgroup before they exec (``Popen(preexec_fn=...)`` writes ``0`` to the
``cgroup.procs`` descriptors opened beforehand), so nothing of it runs outside. When the mission ends for any reason
everything in its cgroup is killed (``cgroup.kill`` where the kernel has it, else SIGKILL to each pid until the cgroup
is empty) and the cgroup removed. Its out-of-memory kills are read from ``memory.events`` (v2) or
``memory.oom_control`` (v1), ``oom_kill``.

On cgroup v1, systemd's ``Delegate=yes`` hands over only the unified (and named) hierarchy; ``python -m
lanectl.cgroups delegate`` (the lane unit's ``ExecStartPre=+``, as root) gives the lane's user the v1 ``pids``
and ``memory`` directories of the unit the way systemd delegates on v2: the directory and ``cgroup.procs`` (and
``tasks``), never the unit's own limits. Without a writable cgroup the runtime runs missions as before and says
so in its log and ``/healthz`` (``containment``).
"""
from __future__ import annotations

import errno
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path("/sys/fs/cgroup")
V1 = ("pids", "memory")
RUNTIME_LEAF = "runtime"
MISSIONS = "missions"
MIN_TASKS_RESERVE = 16
MAX_MEMORY_RESERVE = 64 << 20
MIN_TASKS_PER_MISSION = 8
"""Tasks one mission's own limit leaves to each other slot of its lane."""
MIN_MEMORY_PER_MISSION = 32 << 20
"""Memory one mission's own limit leaves to each other slot of its lane."""
UNLIMITED = ("max", "")
V1_NO_LIMIT = 1 << 60  # memory.limit_in_bytes reads 9223372036854771712 (page-rounded LONG_MAX) when unlimited


def parse_proc_cgroup(text: str) -> dict[str, str]:
    """``/proc/PID/cgroup`` as {hierarchy: path}: "unified" for the v2 line (``0::``), else each v1 controller or
    ``name=`` hierarchy."""
    out: dict[str, str] = {}
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        hid, ctrls, path = parts
        if hid == "0" and ctrls == "":
            out["unified"] = path
        else:
            for c in ctrls.split(","):
                out[c] = path
    return out


def mounts(root: Path = ROOT) -> dict[str, Path]:
    """Where each hierarchy we use is mounted: {"unified": ..., "pids": ..., "memory": ...} (those present)."""
    out: dict[str, Path] = {}
    if (root / "cgroup.controllers").exists():  # pure v2: the unified hierarchy is /sys/fs/cgroup itself
        out["unified"] = root
        return out
    if (root / "unified" / "cgroup.controllers").exists():
        out["unified"] = root / "unified"
    for c in V1:
        if (root / c / "cgroup.procs").exists():
            out[c] = root / c
    return out


def own_dirs(pid: int | str = "self", root: Path = ROOT) -> dict[str, Path]:
    """The cgroup directory of process ``pid`` in each hierarchy we use."""
    paths = parse_proc_cgroup(Path(f"/proc/{pid}/cgroup").read_text())
    out = {}
    for h, mnt in mounts(root).items():
        if h in paths:
            out[h] = mnt / paths[h].lstrip("/")
    return out


def _read(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError:
        return ""


def _write(path: Path, value: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, value.encode())
    finally:
        os.close(fd)


def _limit(text: str, v1_unlimited: int | None = None) -> int | None:
    if text in UNLIMITED or not text.isdigit():
        return None
    n = int(text)
    return None if v1_unlimited is not None and n >= v1_unlimited else n


def tasks_reserve(limit: int, asked: int | None = None) -> int:
    """Tasks kept for the runtime: ``asked`` or a quarter of the lane's, at least 16; never more than half (missions
    must be able to run)."""
    want = asked if asked is not None else max(MIN_TASKS_RESERVE, limit // 4)
    return max(1, min(want, limit // 2))


def memory_reserve(limit: int) -> int:
    """Memory kept for the runtime: a quarter of the lane's, at most 64 MiB."""
    return min(MAX_MEMORY_RESERVE, limit // 4)


def mission_share(total: int, capacity: int, minimum: int) -> int:
    """One mission's own limit out of ``total`` (what all missions of the lane may use together): everything but a
    ``minimum`` for each of the lane's other ``capacity - 1`` slots, never below ``minimum`` itself (a lane whose
    total cannot give every slot its minimum splits it evenly instead), at least 1."""
    others = max(0, capacity - 1) * minimum
    if total - others >= minimum:
        return total - others
    return max(1, total // max(1, capacity))


@dataclass
class MissionCgroup:
    name: str
    dirs: dict[str, Path]
    fds: list[int] = field(default_factory=list)
    killed: bool = False

    def join_fds(self) -> list[int]:
        """Descriptors of each hierarchy's ``cgroup.procs`` (close-on-exec), for the child to write ``0`` to."""
        if not self.fds:
            self.fds = [os.open(d / "cgroup.procs", os.O_WRONLY | os.O_CLOEXEC) for d in self.dirs.values()]
        return self.fds

    def close_fds(self) -> None:
        for fd in self.fds:
            os.close(fd)
        self.fds = []

    def pids(self) -> set[int]:
        out: set[int] = set()
        for d in self.dirs.values():
            for line in _read(d / "cgroup.procs").split():
                if line.isdigit():
                    out.add(int(line))
        return out

    def empty(self) -> bool:
        unified = self.dirs.get("unified")
        if unified is not None:
            events = _read(unified / "cgroup.events")
            if "populated 1" in events:
                return False
        return not self.pids()

    def kill(self) -> None:
        """SIGKILL to everything in the mission's cgroup (``cgroup.kill`` where there is one, and each listed pid:
        a fork that raced the kill is caught by the next call)."""
        self.killed = True
        unified = self.dirs.get("unified")
        if unified is not None and (unified / "cgroup.kill").exists():
            try:
                _write(unified / "cgroup.kill", "1")
            except OSError:
                pass
        for pid in self.pids():
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass

    def signal_all(self, sig: int) -> None:
        for pid in self.pids():
            try:
                os.kill(pid, sig)
            except (ProcessLookupError, PermissionError):
                pass

    def oom_kills(self) -> int:
        """How many of its processes the kernel killed for want of memory (``oom_kill``)."""
        n = 0
        unified = self.dirs.get("unified")
        if unified is not None:
            n = max(n, _counter(_read(unified / "memory.events"), "oom_kill"))
        memory = self.dirs.get("memory")
        if memory is not None:
            n = max(n, _counter(_read(memory / "memory.oom_control"), "oom_kill"))
        return n

    def hit_own_memory_limit(self) -> bool:
        """Whether its own memory limit (not the one of ``missions/`` above it) was reached: v1 ``memory.failcnt``
        counts the charges that failed at this cgroup's own limit, v2 ``memory.events.local`` ``max`` likewise."""
        unified = self.dirs.get("unified")
        if unified is not None and _counter(_read(unified / "memory.events.local"), "max") > 0:
            return True
        memory = self.dirs.get("memory")
        return memory is not None and _read(memory / "memory.failcnt").isdigit() and \
            int(_read(memory / "memory.failcnt")) > 0

    def remove(self) -> bool:
        """rmdir in every hierarchy; False while a process is still there (call again later)."""
        self.close_fds()
        done = True
        for h, d in list(self.dirs.items()):
            try:
                os.rmdir(d)
                del self.dirs[h]
            except FileNotFoundError:
                del self.dirs[h]
            except OSError:
                done = False
        return done


def _counter(text: str, key: str) -> int:
    for line in text.splitlines():
        k, _, v = line.partition(" ")
        if k == key and v.strip().isdigit():
            return int(v)
    return 0


class Containment:
    """The runtime's side: set up runtime/ and missions/, then one cgroup per mission."""

    def __init__(self, base: dict[str, Path], capacity: int = 1) -> None:
        self.base = base
        self.missions = {h: d / MISSIONS for h, d in base.items()}
        self.capacity = max(1, capacity)
        self.tasks_max: int | None = None  # what all missions together may use
        self.memory_max: int | None = None
        self.mission_tasks_max: int | None = None  # what one mission may use (mission_share)
        self.mission_memory_max: int | None = None
        self.serial = 0

    @classmethod
    def setup(cls, tasks_reserve_asked: int | None = None, root: Path = ROOT, capacity: int = 1) -> Containment:
        """Move this process into runtime/ and create missions/ with the reserve left out; OSError when the lane's
        cgroup is not writable (no delegation)."""
        base = own_dirs(root=root)
        if not base:
            raise OSError(errno.ENOENT, "no cgroup hierarchy found under " + str(root))
        if any(p.name == RUNTIME_LEAF for p in base.values()):  # already in runtime/ (set up once before)
            base = {h: p.parent for h, p in base.items()}
        for h, d in base.items():
            if not os.access(d, os.W_OK):
                raise OSError(errno.EACCES, f"cgroup {d} is not writable by uid {os.geteuid()} (no Delegate=)")
        c = cls(base, capacity)
        for h, d in base.items():
            os.makedirs(d / RUNTIME_LEAF, exist_ok=True)
            _write(d / RUNTIME_LEAF / "cgroup.procs", "0")  # the whole thread group, before its threads start
        unified = base.get("unified")
        if unified is not None and _read(unified / "cgroup.controllers"):
            ctrls = [x for x in _read(unified / "cgroup.controllers").split() if x in V1]
            if ctrls:  # v2 with controllers: missions/ and each mission get pids and memory
                _write(unified / "cgroup.subtree_control", " ".join("+" + x for x in ctrls))
        for h, d in c.missions.items():
            os.makedirs(d, exist_ok=True)
        enabled = _read(unified / "cgroup.subtree_control").split() if unified is not None else []
        if enabled:  # each mission gets what missions/ got
            _write(c.missions["unified"] / "cgroup.subtree_control", " ".join("+" + x for x in enabled))
        c.apply_reserve(tasks_reserve_asked)
        return c

    def apply_reserve(self, asked: int | None) -> None:
        pids_dir = self.base.get("pids") or (self.base.get("unified") if (self.base.get("unified", ROOT) /
                                                                          "pids.max").exists() else None)
        if pids_dir is not None:
            limit = _limit(_read(pids_dir / "pids.max"))
            if limit is not None:
                self.tasks_max = limit - tasks_reserve(limit, asked)
                _write(pids_dir / MISSIONS / "pids.max", str(self.tasks_max))
        memory = self.base.get("memory")
        if memory is not None:
            limit = _limit(_read(memory / "memory.limit_in_bytes"), V1_NO_LIMIT)
            if limit is not None:
                self.memory_max = limit - memory_reserve(limit)
                _write(memory / MISSIONS / "memory.limit_in_bytes", str(self.memory_max))
        else:
            unified = self.base.get("unified")
            if unified is not None and (unified / "memory.max").exists():
                limit = _limit(_read(unified / "memory.max"))
                if limit is not None:
                    self.memory_max = limit - memory_reserve(limit)
                    _write(unified / MISSIONS / "memory.max", str(self.memory_max))
        if self.tasks_max is not None:
            self.mission_tasks_max = mission_share(self.tasks_max, self.capacity, MIN_TASKS_PER_MISSION)
        if self.memory_max is not None:
            self.mission_memory_max = mission_share(self.memory_max, self.capacity, MIN_MEMORY_PER_MISSION)

    def limit_files(self, name: str) -> list[tuple[Path, int]]:
        """The limit files of mission cgroup ``name`` and what goes in them (its share of ``missions/``)."""
        out: list[tuple[Path, int]] = []
        if self.mission_tasks_max is not None:
            d = self.missions.get("pids") or self.missions.get("unified")
            if d is not None:
                out.append((d / name / "pids.max", self.mission_tasks_max))
        if self.mission_memory_max is not None:
            if "memory" in self.missions:
                out.append((self.missions["memory"] / name / "memory.limit_in_bytes", self.mission_memory_max))
            elif "unified" in self.missions:
                out.append((self.missions["unified"] / name / "memory.max", self.mission_memory_max))
        return out

    def tasks_free(self) -> int | None:
        """Tasks missions may still start (None: no limit known)."""
        if self.tasks_max is None:
            return None
        pids_dir = self.missions.get("pids") or self.missions.get("unified")
        cur = _limit(_read(pids_dir / "pids.current")) if pids_dir is not None else None
        return None if cur is None else self.tasks_max - cur

    def create(self, mission: int, attempt: int) -> MissionCgroup:
        self.serial += 1
        name = f"m{mission}-{attempt}-{self.serial}"
        dirs = {}
        try:
            for h, d in self.missions.items():
                os.mkdir(d / name, 0o755)
                dirs[h] = d / name
            for path, value in self.limit_files(name):  # before any process of the mission is in it
                _write(path, str(value))
        except OSError:
            MissionCgroup(name, dirs).remove()
            raise
        return MissionCgroup(name, dirs)

    def leftovers(self) -> list[MissionCgroup]:
        """Mission cgroups an earlier runtime of this lane left (it was killed): killed and removed at start."""
        names: set[str] = set()
        for d in self.missions.values():
            try:
                names |= {p.name for p in d.iterdir() if p.is_dir()}
            except OSError:
                pass
        return [MissionCgroup(n, {h: d / n for h, d in self.missions.items() if (d / n).is_dir()})
                for n in sorted(names)]


def wait_empty(cg: MissionCgroup, timeout: float) -> bool:
    end = time.monotonic() + timeout
    while not cg.empty():
        cg.kill()
        if time.monotonic() > end:
            return False
        time.sleep(0.01)
    return True


def join(fds: list[int]) -> None:
    """In the child between fork and exec: enter the mission's cgroup in every hierarchy."""
    for fd in fds:
        os.write(fd, b"0")


# ------------------------------------------------------------------------------------ ExecStartPre=+ (root)
def delegate(pid: str = "self", root: Path = ROOT) -> list[str]:
    """Give the lane's user the unit's v1 pids and memory cgroups as systemd's Delegate= does on v2: the directory
    (to create sub-cgroups) and cgroup.procs/tasks (to move its own processes between them). The unit's limit files
    stay root's. Runs as root in the unit's cgroup, before the runtime; the user is the one systemd delegated the
    unit's unified cgroup to (its owner). Nothing to do on a pure v2 host."""
    paths = parse_proc_cgroup(Path(f"/proc/{pid}/cgroup").read_text())
    unified = mounts(root).get("unified")
    if unified is None or "unified" not in paths or unified == root:
        return []
    own = unified / paths["unified"].lstrip("/")
    if own == unified:
        return []
    st = os.stat(own)
    if st.st_uid == 0:
        raise OSError(errno.EPERM, f"{own} is root's: the unit has no Delegate=yes and User=")
    done = []
    for c in V1:
        mnt = root / c
        if c not in paths or not (mnt / "cgroup.procs").exists():
            continue
        d = mnt / paths[c].lstrip("/")
        if d == mnt or not d.is_dir():
            continue  # never the root of a hierarchy
        for p in (d, d / "cgroup.procs", d / "tasks"):
            if p.exists():
                os.chown(p, st.st_uid, st.st_gid)
        done.append(str(d))
    return done


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args != ["delegate"]:
        print("usage: python -m lanectl.cgroups delegate", file=sys.stderr)
        return 2
    try:
        for d in delegate():
            print(f"lanectl.cgroups: delegated {d}", file=sys.stderr)
    except OSError as exc:
        # a lane whose cgroups cannot be handed over still runs (missions uncontained; its /healthz says so)
        print(f"lanectl.cgroups: cannot delegate the lane's v1 cgroups: {exc}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())


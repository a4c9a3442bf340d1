"""Lane definitions (``lanes.d/NAME.toml``) and global settings (``lanectl.toml``).

Every model is frozen and forbids unknown keys, so a typo is an error that names the field. ``load()`` reports
every problem of every file at once, each with file, field and fix.
"""
from __future__ import annotations

import os
import pwd
import re
import socket
import stat
import tomllib
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from lanectl import paths
from lanectl.errors import LanectlError, Problem, config_error
from lanectl.states import CLASSES
from lanectl.timeparse import UNIT_S

MissionClass = Literal[CLASSES]  # type: ignore[valid-type]  # the classes of lanectl.states, one definition
NAME_RE = re.compile(r"^[a-z][a-z0-9-]{0,30}$")
USER_RE = re.compile(r"^[a-z_][a-z0-9_-]{0,31}$")
ENV_KEY_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# Paths go into ReadWritePaths=, WorkingDirectory= and friends unquoted: allow only characters that no unit
# syntax (quoting, specifiers, whitespace separation, '-'/'+' prefixes) gives a meaning to.
SAFE_PATH_RE = re.compile(r"^/[A-Za-z0-9._@+/-]*$")
SIZE_RE = re.compile(r"^(\d+)([KMGT]?)$|^(100|[1-9]?\d)%$|^infinity$")
CPU_RE = re.compile(r"^[1-9]\d{0,4}%$")
TAG_RE = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,31}$")
DURATION_RE = re.compile(r"^(\d+(?:\.\d+)?)([smhdw])$")
BYTES_RE = re.compile(r"^(\d+)([KMGT]?)$")
BYTES_UNIT = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
HOST_RE = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?$")
"""A host's name (``host = ...``): one DNS label, lower case."""


def duration_s(text: str) -> float:
    """``90s``, ``15m``, ``6h``, ``30d``, ``2w`` -> seconds; ValueError naming the form otherwise."""
    m = DURATION_RE.match(text.strip()) if isinstance(text, str) else None
    if not m:
        raise ValueError(f"{text!r} is not a duration; use a number and one of s m h d w, e.g. 30d or 12h")
    return float(m.group(1)) * UNIT_S[m.group(2)]


def size_bytes(text: str) -> int:
    """``65536``, ``512K``, ``8M``, ``1G`` -> bytes (powers of 1024); ValueError naming the form otherwise."""
    m = BYTES_RE.match(text.strip()) if isinstance(text, str) else None
    if not m:
        raise ValueError(f"{text!r} is not a size; use bytes or a number with K, M, G or T, e.g. 8M or 1G")
    return int(m.group(1)) * BYTES_UNIT[m.group(2)]
FORBIDDEN_PATH_ROOTS = ("/proc", "/sys", "/dev", "/run", "/etc", "/usr", "/boot", "/bin", "/sbin", "/lib")
# Directories a workspace must never be (install would hand them to the lane user): the trees of the system
# themselves. A workspace below one of them (/srv/lanes/x, /var/lib/lanes-x/y) is fine, except under /root.
SYSTEM_TREES = ("/", "/bin", "/boot", "/dev", "/etc", "/home", "/lib", "/lib32", "/lib64", "/libx32", "/media", "/mnt",
                "/opt", "/proc", "/root", "/run", "/sbin", "/srv", "/sys", "/tmp", "/usr", "/var", "/var/backups",
                "/var/cache", "/var/lib", "/var/local", "/var/log", "/var/mail", "/var/opt", "/var/spool", "/var/tmp")
# The GECOS comment `lanectl install` gives the users it creates: the mark of an account lanectl owns.
USER_MARKER = "lanectl lane"
RESERVED_ENV = ("LANECTL_", "NOTIFY_SOCKET", "WATCHDOG_", "INVOCATION_ID")
RUNTIME_MODULE = "lanectl.runtime"


def is_noncharacter(c: str) -> bool:
    """U+FDD0..U+FDEF and U+xFFFE/U+xFFFF: valid in Python strings, refused by systemd's UTF-8 check
    (unichar_is_valid), so a unit file cannot carry them."""
    o = ord(c)
    return 0xFDD0 <= o <= 0xFDEF or (o & 0xFFFE) == 0xFFFE


def check_text(value: str) -> str:
    """Text that may go into a unit file: any printable character, no control characters or noncharacters."""
    bad = [c for c in value if ord(c) < 0x20 or ord(c) == 0x7F]
    if bad:
        raise ValueError(
            f"contains the control character {bad[0]!r}; unit files cannot carry it faithfully, remove it"
        )
    odd = [c for c in value if is_noncharacter(c)]
    if odd:
        raise ValueError(f"contains the Unicode noncharacter U+{ord(odd[0]):04X}; systemd refuses it in unit files, "
                         "remove it")
    return value


def check_path(value: str) -> str:
    if not value.startswith("/"):
        raise ValueError(f"{value!r} is not an absolute path; write it from the root, e.g. /var/lib/lanes/NAME")
    if not SAFE_PATH_RE.match(value):
        raise ValueError(f"{value!r} has characters outside A-Z a-z 0-9 . _ @ + - /; rename the directory")
    parts = PurePosixPath(value).parts
    if ".." in parts or "." in value.split("/"):
        raise ValueError(f"{value!r} contains '.' or '..'; write the normalised path")
    if value.rstrip("/") in ("", "/") or any(value == r or value.startswith(r + "/") for r in FORBIDDEN_PATH_ROOTS):
        raise ValueError(f"{value!r} is a system location; use a directory of its own, e.g. /var/lib/lanes/NAME")
    return value.rstrip("/") or "/"


def check_workspace(value: str) -> str:
    value = check_path(value)
    if value in SYSTEM_TREES or value.startswith("/root/"):
        raise ValueError(f"{value!r} is a system directory that install would hand to the lane user; use a directory "
                         "of its own below one, e.g. /var/lib/lanes/NAME")
    return value


def check_file_path(value: str) -> str:
    """An absolute, normalised path of plain characters (it goes into a unit file unquoted)."""
    if not value.startswith("/") or not SAFE_PATH_RE.match(value):
        raise ValueError(f"{value!r} is not an absolute path of A-Z a-z 0-9 . _ @ + - /; write e.g. "
                         "/etc/lanectl/secrets/NAME.env")
    if ".." in value.split("/") or "." in value.split("/") or value.endswith("/"):
        raise ValueError(f"{value!r} is not a normalised file path; write it without '.', '..' or a trailing /")
    return value


def check_env_key(key: str) -> str:
    if not ENV_KEY_RE.match(key):
        raise ValueError(f"key {key!r} is not a variable name; use letters, digits and _")
    if key.startswith(RESERVED_ENV):
        raise ValueError(f"key {key!r} is set by lanectl or systemd; pick another name")
    return key


UnitText = Annotated[str, AfterValidator(check_text)]
EnvKey = Annotated[str, AfterValidator(check_env_key)]


class Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Resources(Model):
    """Per-lane (or, in lanectl.toml, box-wide) resource limits, in systemd.resource-control(5) syntax."""

    memory_max: str | None = "512M"
    cpu_quota: str | None = "100%"
    tasks_max: Annotated[int, Field(ge=1, le=1_000_000)] | None = 256

    @field_validator("memory_max")
    @classmethod
    def _mem(cls, v: str | None) -> str | None:
        if v is not None and not SIZE_RE.match(v):
            raise ValueError(f"{v!r} is not a size; use e.g. 512M, 2G, 40% or infinity")
        return v

    @field_validator("cpu_quota")
    @classmethod
    def _cpu(cls, v: str | None) -> str | None:
        if v is not None and not CPU_RE.match(v):
            raise ValueError(f"{v!r} is not a CPU quota; use a percentage of one core, e.g. 50% or 200%")
        return v


class SliceResources(Resources):
    """Box-wide limits for lanectl.slice (no CPU cap unless asked)."""

    memory_max: str | None = "80%"
    cpu_quota: str | None = None
    tasks_max: Annotated[int, Field(ge=1, le=1_000_000)] | None = 4096


class RestartPolicy(Model):
    policy: Literal["on-failure", "on-abnormal", "always"] = "on-failure"
    restart_sec: Annotated[float, Field(ge=0, le=3600)] = 1.0
    start_limit_burst: Annotated[int, Field(ge=1, le=1000)] = 5
    start_limit_interval_sec: Annotated[float, Field(ge=1, le=86400)] = 120.0
    max_restarts: Annotated[int, Field(ge=1, le=10_000)] = 3
    """Restarts systemd did on its own within ``health.restart_window_sec`` that make the lane degraded."""

    @model_validator(mode="after")
    def _degrade_before_the_start_limit(self) -> RestartPolicy:
        # the start limit counts starts (the first one too): systemd must still be restarting the lane when the
        # supervisor counts max_restarts restarts, or the lane ends `failed` instead of degraded-then-recovered
        if self.start_limit_burst <= self.max_restarts:
            raise ValueError(
                f"start_limit_burst ({self.start_limit_burst}) must be greater than max_restarts "
                f"({self.max_restarts}), or systemd stops the lane before the supervisor degrades it; "
                f"raise start_limit_burst to at least {self.max_restarts + 1} or lower max_restarts")
        return self


class Quota(Model):
    rate_per_minute: Annotated[int, Field(ge=1, le=1_000_000)] | None = None
    daily_budget: Annotated[int, Field(ge=1, le=100_000_000)] | None = None


class OutputSettings(Model):
    """``[output]`` in a lane file: how much of each mission's stdout and stderr the lane keeps, and how much of
    ``WORKSPACE/.lanectl/out/`` it keeps (docs/lanes.md, "Mission output")."""

    max_bytes: str = "8M"
    """Stored output of one mission (attempt) at most: its first and last halves are kept, what was cut between
    them is replaced by one line that says how many bytes were cut."""
    keep_bytes: str = "1G"
    """out/ as a whole: once finished missions' files pass this, the oldest are deleted."""
    keep_files: Annotated[int, Field(ge=1, le=10_000_000)] = 10_000
    """out/ as a whole: at most this many finished missions' files; the oldest are deleted first."""

    @field_validator("max_bytes", "keep_bytes")
    @classmethod
    def _size(cls, v: str) -> str:
        n = size_bytes(v)
        if n < 8192:
            raise ValueError(f"{v!r} is below 8K; a mission's head and tail need at least that, e.g. 8M")
        if n > 1 << 40:
            raise ValueError(f"{v!r} is above 1T; use a smaller size, e.g. 8M")
        return v

    @model_validator(mode="after")
    def _keep_holds_one(self) -> OutputSettings:
        if size_bytes(self.keep_bytes) < size_bytes(self.max_bytes):
            raise ValueError(f"keep_bytes ({self.keep_bytes}) is smaller than max_bytes ({self.max_bytes}): out/ "
                             "could not hold one mission's output; raise keep_bytes or lower max_bytes")
        return self


class Lane(Model):
    """One runtime lane: ``lanes.d/NAME.toml``."""

    name: str | None = None
    description: str = ""
    exec: list[UnitText] | None = None
    port: Annotated[int, Field(ge=1024, le=65535)]
    workspace: str
    session_prefix: str | None = None
    user: str | None = None
    existing_user: bool = False
    """Opt-in: run as ``user``, an account that exists and that lanectl did not create (refused otherwise)."""
    env: dict[EnvKey, UnitText] = Field(default_factory=dict)
    secret_env_file: str | None = None
    """KEY=VALUE file (root, mode 0600) systemd reads at start: secrets for the runtime, unlike ``env``."""
    classes: list[MissionClass] = Field(default_factory=lambda: list(CLASSES))
    capacity: Annotated[int, Field(ge=1, le=1024)] = 4
    weight: Annotated[int, Field(ge=0, le=10_000)] = 100
    fallback: str | None = None
    tags: list[str] = Field(default_factory=list)
    watchdog_sec: Annotated[float, Field(ge=1, le=3600)] = 10.0
    health_path: str = "/healthz"
    enabled: bool = True
    protect_home: Literal["yes", "read-only", "tmpfs"] = "yes"
    resources: Resources = Resources()
    restart: RestartPolicy = RestartPolicy()
    quotas: dict[MissionClass, Quota] = Field(default_factory=dict)
    output: OutputSettings = OutputSettings()

    @field_validator("name", "session_prefix", "fallback")
    @classmethod
    def _name(cls, v: str | None) -> str | None:
        if v is not None and not NAME_RE.match(v):
            raise ValueError(f"{v!r} is not a lane name; use 1-31 of a-z 0-9 -, starting with a letter")
        return v

    @field_validator("description")
    @classmethod
    def _desc(cls, v: str) -> str:
        check_text(v)
        if v.rstrip().endswith("\\"):
            raise ValueError("ends with a backslash, which would continue the line in the unit file; remove it")
        return v

    @field_validator("exec")
    @classmethod
    def _exec(cls, v: list[str] | None) -> list[str] | None:
        if v is None:
            return v
        if not v:
            raise ValueError("is empty; give the program and its arguments, e.g. ['/usr/bin/mylane', '--x']")
        if not v[0].startswith("/"):
            raise ValueError(f"program {v[0]!r} is not an absolute path; write e.g. /usr/local/bin/{v[0]}")
        if not SAFE_PATH_RE.match(v[0]):
            raise ValueError(f"program {v[0]!r} has unusual characters; use a plain path to the executable")
        return v

    @field_validator("workspace")
    @classmethod
    def _ws(cls, v: str) -> str:
        return check_workspace(v)

    @field_validator("secret_env_file")
    @classmethod
    def _secret(cls, v: str | None) -> str | None:
        return None if v is None else check_file_path(v)

    @field_validator("user")
    @classmethod
    def _user(cls, v: str | None) -> str | None:
        if v is not None and (not USER_RE.match(v) or v == "root"):
            raise ValueError(f"{v!r} is not a usable lane user; use a system user name like lane-NAME (not root)")
        return v

    @field_validator("env")
    @classmethod
    def _env(cls, v: dict[str, str]) -> dict[str, str]:
        return v

    @field_validator("classes")
    @classmethod
    def _classes(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError("is empty; a lane serves at least one of interactive, deadline, background")
        if len(set(v)) != len(v):
            raise ValueError("lists a class twice; list each class once")
        return v

    @field_validator("tags")
    @classmethod
    def _tags(cls, v: list[str]) -> list[str]:
        for t in v:
            if not TAG_RE.match(t):
                raise ValueError(f"tag {t!r} is not valid; use 1-32 of a-z 0-9 _ . -")
        return v

    @field_validator("health_path")
    @classmethod
    def _health(cls, v: str) -> str:
        if not re.match(r"^/[A-Za-z0-9._~/-]*$", v):
            raise ValueError(f"{v!r} is not a URL path; use e.g. /healthz")
        return v

    # Resolved views (the file stem is authoritative for the name; see load()).
    def resolved_user(self, name: str) -> str:
        return self.user or f"lane-{name}"

    def resolved_prefix(self, name: str) -> str:
        return self.session_prefix or name


class ClassPolicy(Model):
    max_wait_sec: Annotated[float, Field(gt=0)] = 300.0
    """A queued mission waiting longer than this is aged up one class (bounded starvation)."""
    queue_limit: Annotated[int, Field(ge=1)] = 100_000
    """Admission control: submits beyond this many queued missions of the class are refused."""
    max_attempts: Annotated[int, Field(ge=1, le=100)] = 3


def _default_classes() -> dict[str, ClassPolicy]:
    return {
        "interactive": ClassPolicy(max_wait_sec=30, queue_limit=10_000),
        "deadline": ClassPolicy(max_wait_sec=120, queue_limit=100_000),
        "background": ClassPolicy(max_wait_sec=600, queue_limit=1_000_000),
    }


CALLBACK_SOCKET_RE = re.compile(r"^/run/lanectl/[A-Za-z0-9_][A-Za-z0-9._-]{0,63}$")


class SupervisorSettings(Model):
    host: Literal["127.0.0.1", "::1", "localhost"] = "127.0.0.1"
    port: Annotated[int, Field(ge=1024, le=65535)] = 8700
    """The TCP listener: GET /healthz and /metrics only (read-only)."""
    socket: str = "/run/lanectl/callbacks.sock"
    """The unix socket lanes send their callbacks to (docs/decisions.md, "Callbacks over a unix socket")."""
    tick_sec: Annotated[float, Field(gt=0, le=60)] = 1.0
    watchdog_sec: Annotated[float, Field(ge=1, le=3600)] = 10.0

    @field_validator("socket")
    @classmethod
    def _socket(cls, v: str) -> str:
        # /run/lanectl is the supervisor's RuntimeDirectory=: only root can create a file there, so no lane can
        # put a socket of its own at this path
        if not CALLBACK_SOCKET_RE.match(v):
            raise ValueError(f"{v!r} is not a file name directly under /run/lanectl/ (letters, digits, . _ -); "
                             "use e.g. /run/lanectl/callbacks.sock")
        return v


class HealthSettings(Model):
    """How the supervisor watches lanes."""

    observe_sec: Annotated[float, Field(gt=0, le=60)] = 2.0
    """How often it checks every lane's health endpoint (process exits are seen at once, through pidfds)."""
    systemd_sec: Annotated[float, Field(gt=0, le=300)] = 10.0
    """How often it reads systemd's view of every lane when all is well (every 0.25 s while a lane settles)."""
    health_timeout_sec: Annotated[float, Field(gt=0, le=10)] = 0.5
    restart_window_sec: Annotated[float, Field(gt=0)] = 300.0
    """Restarts counted against a lane's ``restart.max_restarts`` within this window make it degraded."""
    recover_sec: Annotated[float, Field(gt=0)] = 30.0
    """A degraded lane that has been up and healthy this long, with no new restart, becomes active again."""


class ProbeSettings(Model):
    """Thresholds of `lanectl probe` (monitoring-plugins convention: WARNING / CRITICAL)."""

    window_sec: Annotated[float, Field(gt=0)] = 900.0
    """The window over which the probe computes failure rates."""
    interactive_wait_warn_sec: Annotated[float, Field(gt=0)] = 30.0
    interactive_wait_crit_sec: Annotated[float, Field(gt=0)] = 120.0
    """Age of the oldest queued interactive mission."""
    failure_rate_warn: Annotated[float, Field(ge=0, le=1)] = 0.10
    failure_rate_crit: Annotated[float, Field(ge=0, le=1)] = 0.25
    min_finished: Annotated[int, Field(ge=1)] = 10
    """Fewer finished missions than this in the window: no failure-rate verdict (too little evidence)."""


def renamed_keys(data: Any, renames: dict[str, str]) -> Any:
    """A setting read under its former name as well (a lanectl.toml written before the rename keeps working);
    both names at once is an error."""
    if not isinstance(data, dict) or not any(old in data for old in renames):
        return data
    data = dict(data)
    for old, new in renames.items():
        if old in data:
            if new in data:
                raise ValueError(f"{old} is the former name of {new}: keep {new} only")
            data[new] = data.pop(old)
    return data


class RollbackSettings(Model):
    """Rollback triggers the supervisor evaluates every tick (docs/governance.md)."""

    enabled: bool = True
    window_sec: Annotated[float, Field(gt=0)] = 300.0
    min_samples: Annotated[int, Field(ge=1)] = 10
    """Fewer finished (or dispatched) missions than this in the window: no rate verdict."""
    failure_rate: Annotated[float, Field(gt=0, le=1)] = 0.5
    fallback_lost_rate: Annotated[float, Field(gt=0, le=1)] = 0.5
    """fallback_spike: work meant for the lane that went to its fallback / work meant for it (was fallback_rate)."""
    interactive_starvation_sec: Annotated[float, Field(gt=0)] = 120.0
    max_lease_expiries: Annotated[int, Field(ge=1)] = 5
    cooldown_sec: Annotated[float, Field(ge=0)] = 600.0
    """After an alert (no action taken), the same lane and trigger alert again only after this long."""
    snapshots: bool = True

    @model_validator(mode="before")
    @classmethod
    def _no_restart_trigger(cls, data: Any) -> Any:
        data = renamed_keys(data, {"fallback_rate": "fallback_lost_rate"})
        if isinstance(data, dict) and "max_restarts" in data:
            raise ValueError(
                "max_restarts is no longer a rollback trigger: a lane that restarts too often becomes degraded "
                "and recovers by itself (docs/supervisor.md); delete this line and set [restart] max_restarts "
                "in the lane file instead")
        return data


class PromotionSettings(Model):
    """What `lanectl promote` requires of a lane's evidence."""

    window_sec: Annotated[float, Field(gt=0)] = 3600.0
    min_samples: Annotated[int, Field(ge=1)] = 20
    max_failure_rate: Annotated[float, Field(ge=0, le=1)] = 0.05
    max_fallback_lost_rate: Annotated[float, Field(ge=0, le=1)] = 0.10
    """Work meant for the lane that went to its fallback / work meant for it (was max_fallback_rate)."""

    @model_validator(mode="before")
    @classmethod
    def _renamed(cls, data: Any) -> Any:
        return renamed_keys(data, {"max_fallback_rate": "max_fallback_lost_rate"})
    max_p95_queue_wait_sec: Annotated[float, Field(gt=0)] = 5.0
    interactive_starvation_sec: Annotated[float, Field(gt=0)] = 30.0
    drill_max_age_sec: Annotated[float, Field(gt=0)] = 86400.0


class LeaseSettings(Model):
    lease_sec: Annotated[float, Field(gt=0)] = 30.0
    heartbeat_sec: Annotated[float, Field(gt=0)] = 5.0
    retry_backoff_sec: Annotated[float, Field(ge=0)] = 1.0


class HostSettings(Model):
    """``[hosts]``: the leases of hosts sharing one ledger (docs/multihost.md)."""

    lease_sec: Annotated[float, Field(ge=3, le=300)] = 10.0
    """A host's lease in the ledger: its supervisor renews it every third of this; it stops claiming new work
    (fences itself) ``fence_margin_s`` before the lease would run out unrenewed."""

    def fence_margin_s(self) -> float:
        """How long before its lease runs out a host that could not renew it stops claiming work: a tenth of the
        lease, at least 1 s (the margin for a turn in progress and for clock rate differences)."""
        return max(1.0, self.lease_sec / 10)

    def renew_every_s(self) -> float:
        return self.lease_sec / 3


def default_host() -> str:
    """This machine's host name, short form (up to the first dot), lower case."""
    return socket.gethostname().split(".", 1)[0].lower()


class LedgerSettings(Model):
    """``[ledger]``: where the ledger lives and how hard each commit is pushed to disk (docs/ledger.md)."""

    path: str | None = None
    """The ledger file, or a ``postgresql://`` URL (no password in it: libpq's ~/.pgpass, PGPASSFILE or a
    service file); default: STATE_DIR/ledger.db. ``ledger = "PATH"`` at the top level is the same."""
    synchronous: Literal["FULL", "NORMAL"] = "FULL"
    """FULL: a commit (a submit's exit 0, an outcome acknowledged to a lane) is on disk when it returns.
    NORMAL: faster, but an OS crash or power cut can lose the last commits (never corrupts the file, loses
    nothing on a process crash)."""

    retention: str | None = None
    """Finished missions (with their attempts and events) last changed longer ago than this, and events of no
    mission as old, are archived to ``archive_dir`` and deleted by the supervisor (docs/ledger.md, "Retention");
    unset: kept for ever. E.g. ``"30d"``; at least ``1h``."""
    archive_dir: str | None = None
    """Where the supervisor writes its retention archives; default: STATE_DIR/archive."""
    prune_every: str = "1h"
    """How often the supervisor looks for history past ``retention`` (at least 1m)."""
    listen: bool = True
    """PostgreSQL: the supervisor learns of new work by LISTEN/NOTIFY (polling stays the fallback). false: it
    polls only, as it must behind a pooler in transaction mode (docs/ledger.md); ``LANECTL_PG_LISTEN=0`` too."""

    @field_validator("path", "archive_dir")
    @classmethod
    def _path(cls, v: str | None, info: Any) -> str | None:
        from lanectl.ledgerurl import PREFIXES, check_url

        if v is not None and info.field_name == "path" and v.startswith(PREFIXES):
            try:
                return check_url(v)
            except LanectlError as exc:
                raise ValueError(f"{exc.message}; {exc.hint}") from None
        return None if v is None else check_path(v)

    @field_validator("retention")
    @classmethod
    def _retention(cls, v: str | None) -> str | None:
        if v is not None and duration_s(v) < 3600:
            raise ValueError(f"{v!r} is shorter than 1h; producers may still be reading missions that young; "
                             "use e.g. 30d")
        return v

    @field_validator("prune_every")
    @classmethod
    def _every(cls, v: str) -> str:
        if duration_s(v) < 60:
            raise ValueError(f"{v!r} is shorter than 1m; use e.g. 1h")
        return v

    def retention_s(self) -> float | None:
        return None if self.retention is None else duration_s(self.retention)


class Settings(Model):
    """Global settings: ``lanectl.toml``."""

    ledger: LedgerSettings = LedgerSettings()
    host: str = Field(default_factory=default_host, validate_default=True)
    """This host's name among the hosts sharing the ledger (docs/multihost.md); default: the machine's host name,
    short form."""
    hosts: HostSettings = HostSettings()
    state_dir: str = str(paths.DEFAULT_STATE_DIR)
    """The control plane's own state: ledger (by default), box secret, lane keys. Lanes cannot see it."""
    python: str | None = None
    """Interpreter that runs the reference lane runtime; default: the one running lanectl."""
    workspace_root: str = str(paths.DEFAULT_WORKSPACE_ROOT)
    slice: SliceResources = SliceResources()
    supervisor: SupervisorSettings = SupervisorSettings()
    leases: LeaseSettings = LeaseSettings()
    health: HealthSettings = HealthSettings()
    probe: ProbeSettings = ProbeSettings()
    rollback: RollbackSettings = RollbackSettings()
    promotion: PromotionSettings = PromotionSettings()
    classes: dict[MissionClass, ClassPolicy] = Field(default_factory=_default_classes)

    @field_validator("ledger", mode="before")
    @classmethod
    def _ledger_path(cls, v: Any) -> Any:
        return {"path": v} if isinstance(v, str) else v  # the short form: ledger = "PATH"

    @field_validator("host")
    @classmethod
    def _host(cls, v: str) -> str:
        if not HOST_RE.match(v):
            raise ValueError(f"{v!r} is not a host name: one DNS label, 1-63 of a-z 0-9 and '-' (not first or "
                             "last); set host = \"NAME\" in lanectl.toml (the default is the machine's host name, "
                             "short form)")
        return v

    @field_validator("workspace_root", "python", "state_dir")
    @classmethod
    def _paths(cls, v: str | None) -> str | None:
        return None if v is None else check_path(v)

    @field_validator("state_dir")
    @classmethod
    def _state(cls, v: str) -> str:
        if v in SYSTEM_TREES or v.startswith("/root/"):
            raise ValueError(f"{v!r} is a system directory; lanectl keeps secrets there, give it one of its own, "
                             "e.g. /var/lib/lanectl")
        return v

    @model_validator(mode="after")
    def _all_classes(self) -> Settings:
        missing = [c for c in CLASSES if c not in self.classes]
        if missing:
            merged = {**_default_classes(), **self.classes}
            object.__setattr__(self, "classes", merged)
        return self


@dataclass(frozen=True)
class LaneSet:
    """The validated fleet: lanes by name, the settings, and the warnings found on the way."""

    lanes: dict[str, Lane]
    settings: Settings
    config_dir: Path
    lanes_dir: Path
    warnings: list[Problem] = field(default_factory=list)

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(self.lanes.items())

    def get(self, name: str) -> Lane:
        from lanectl.errors import NotFound

        if name not in self.lanes:
            known = ", ".join(sorted(self.lanes)) or "none"
            raise NotFound(f"no lane named {name!r} in {self.lanes_dir}", f"known lanes: {known}", "lane_not_found")
        return self.lanes[name]


def _hint_for(err: dict[str, Any], model: type[BaseModel], loc: tuple[Any, ...]) -> str | None:
    kind = err.get("type", "")
    if kind == "extra_forbidden":
        target: Any = model
        for part in loc[:-1]:
            fld = getattr(target, "model_fields", {}).get(part)
            ann = getattr(fld, "annotation", None) if fld else None
            target = ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None
            if target is None:
                break
        known = sorted(getattr(target, "model_fields", {})) if target else []
        return "remove it or fix the spelling" + (f" (known: {', '.join(known)})" if known else "")
    if kind == "missing":
        return "add it"
    if kind.startswith(("int_", "float_", "bool_", "string_", "list_", "dict_")) or kind == "literal_error":
        return "see docs/lanes.md for the expected type"
    if kind in ("greater_than_equal", "less_than_equal", "greater_than", "less_than"):
        return "pick a value in the allowed range"
    return None


def problems_from(exc: ValidationError, file: str, model: type[BaseModel], lane: str | None) -> list[Problem]:
    out = []
    for err in exc.errors():
        loc = tuple(err.get("loc", ()))
        msg = err.get("msg", "invalid")
        hint = _hint_for(err, model, loc)
        if msg.startswith("Value error, "):
            msg = msg[len("Value error, ") :]
            if "; " in msg:
                msg, hint = msg.split("; ", 1)
        out.append(
            Problem(
                msg,
                file=file,
                field=".".join(str(p) for p in loc) or None,
                hint=hint or "see docs/lanes.md for what the field takes",
                code="config_invalid",
                lane=lane,
            )
        )
    return out


def _read_toml(path: Path, problems: list[Problem]) -> dict[str, Any] | None:
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except tomllib.TOMLDecodeError as exc:
        problems.append(Problem(f"is not valid TOML: {exc}", file=str(path), hint="fix the syntax", code="toml_invalid"))
    except OSError as exc:
        problems.append(Problem(f"cannot be read: {exc.strerror}", file=str(path), code="unreadable"))
    return None


def resolve_dirs(path: str | Path | None) -> tuple[Path, Path]:
    """(config dir, lanes dir) from a config dir, a lanes.d dir, or the default."""
    base = paths.config_dir(path)
    if (base / "lanes.d").is_dir() or (base / "lanectl.toml").is_file():
        return base, base / "lanes.d"
    if base.name == "lanes.d" or any(base.glob("*.toml")):
        return base.parent, base
    return base, base / "lanes.d"


def check_config_dir(path: str | Path | None) -> None:
    """A configuration directory named with ``--config``/``-c`` must exist: a typo is refused (``config_dir_missing``,
    exit 3) by every command alike, never read as an empty configuration that falls back to the default ledger.
    ``None`` (the default or ``$LANECTL_CONFIG_DIR``) is not checked here: the fast read paths never see ``-c``."""
    if path is None or isinstance(path, LaneSet) or Path(path).is_dir():
        return
    raise config_error([Problem("configuration directory does not exist", file=str(path),
                                hint="check --config/-c (the directory holding lanectl.toml and lanes.d/; default "
                                     "/etc/lanectl), or create it first", code="config_dir_missing")])


def load_settings(config_dir: Path, problems: list[Problem]) -> Settings:
    path = config_dir / "lanectl.toml"
    if not path.exists():
        return Settings()
    data = _read_toml(path, problems)
    if data is None:
        return Settings()
    try:
        return Settings.model_validate(data)
    except ValidationError as exc:
        problems.extend(problems_from(exc, str(path), Settings, None))
        return Settings()


def load(path: str | Path | None = None, *, check_host_ports: bool = False, require_lanes: bool = True,
         check_host: bool = False) -> LaneSet:
    """Load and validate the whole configuration; raise one ConfigError carrying every problem found.

    ``check_host`` adds the checks against this host's accounts and files (``validate`` and ``install``): lane
    users lanectl did not create, workspaces that are someone's home, secret env files' owner and mode."""
    check_config_dir(path)
    config_dir, lanes_dir = resolve_dirs(path)
    problems: list[Problem] = []
    settings = load_settings(config_dir, problems)
    lanes: dict[str, Lane] = {}
    if not lanes_dir.is_dir():
        if require_lanes:
            problems.append(
                Problem(
                    "no lanes directory",
                    file=str(lanes_dir),
                    hint="create it with 'lanectl lane add NAME' or point --config at the directory holding lanes.d",
                    code="no_lanes",
                )
            )
    else:
        raw: dict[str, dict[str, Any]] = {}
        for file in sorted(lanes_dir.glob("*.toml")):
            lane = load_lane_file(file, problems, raw)
            if lane is not None:
                lanes[file.stem] = lane
        # a file with an error of its own still takes part in the cross-file checks, in the same run
        problems.extend(cross_check_invalid(lanes, {n: d for n, d in raw.items() if n not in lanes}, lanes_dir))
    problems.extend(cross_check(lanes, lanes_dir, check_host_ports=check_host_ports,
                                shared_ledger=shared_ledger(settings)))
    problems.extend(check_control_dirs(lanes, lanes_dir, settings, config_dir))
    problems.extend(check_restart_windows(lanes, lanes_dir, settings))
    if check_host:
        problems.extend(host_checks(lanes, lanes_dir))
    if any(p.severity == "error" for p in problems):
        raise config_error(problems)
    return LaneSet(lanes, settings, config_dir, lanes_dir, [p for p in problems if p.severity == "warning"])


def load_lane_file(file: Path, problems: list[Problem], raw: dict[str, dict[str, Any]] | None = None) -> Lane | None:
    """The lane of one file, or None with its problems added; ``raw`` receives the file's table as read."""
    stem = file.stem
    if not NAME_RE.match(stem):
        problems.append(
            Problem(
                f"file name {file.name!r} is not a lane name",
                file=str(file),
                hint="rename it to NAME.toml with NAME of 1-31 of a-z 0-9 -, starting with a letter",
                code="bad_name",
            )
        )
        return None
    data = _read_toml(file, problems)
    if data is None:
        return None
    if raw is not None:
        raw[stem] = data
    try:
        lane = Lane.model_validate(data)
    except ValidationError as exc:
        problems.extend(problems_from(exc, str(file), Lane, stem))
        return None
    if lane.name is not None and lane.name != stem:
        problems.append(
            Problem(
                f"name {lane.name!r} differs from the file stem {stem!r}",
                file=str(file),
                field="name",
                hint=f"remove the name field or rename the file to {lane.name}.toml",
                code="name_mismatch",
                lane=stem,
            )
        )
        return None
    return lane


def _nested(a: str, b: str) -> bool:
    return a == b or a.startswith(b.rstrip("/") + "/") or b.startswith(a.rstrip("/") + "/")


def check_restart_windows(lanes: dict[str, Lane], lanes_dir: Path, settings: Settings) -> list[Problem]:
    """The supervisor must call a crash-looping lane degraded before systemd gives up on it: every run of
    ``start_limit_burst`` starts within ``start_limit_interval_sec`` must hold ``max_restarts`` restarts within
    ``health.restart_window_sec``, so that window may not be the shorter one (``start_limit_burst`` >
    ``max_restarts`` is checked per lane)."""
    window = settings.health.restart_window_sec
    return [Problem(f"restart.start_limit_interval_sec ({lane.restart.start_limit_interval_sec:g}) is longer than "
                    f"health.restart_window_sec ({window:g}) in lanectl.toml: systemd could stop the lane for good "
                    "before the supervisor counts enough restarts to call it degraded",
                    str(lanes_dir / f"{name}.toml"), "restart.start_limit_interval_sec",
                    f"set it to at most {window:g}, or raise health.restart_window_sec", "restart_window_short", name)
            for name, lane in sorted(lanes.items()) if lane.restart.start_limit_interval_sec > window]


def cross_check_invalid(lanes: dict[str, Lane], invalid: dict[str, dict[str, Any]], lanes_dir: Path) -> list[Problem]:
    """Port and workspace clashes of lane files that have errors of their own (their valid lanes are checked by
    ``cross_check``): a port or workspace that is well-formed in such a file is compared with every other lane's, so
    that fixing one file does not reveal a clash only on the next run."""
    out: list[Problem] = []
    ports: dict[str, int] = {n: ln.port for n, ln in lanes.items()}
    spaces: dict[str, str] = {n: ln.workspace for n, ln in lanes.items()}
    for name, data in invalid.items():
        port, ws = data.get("port"), data.get("workspace")
        if isinstance(port, int) and not isinstance(port, bool):
            ports[name] = port
        if isinstance(ws, str) and ws.startswith("/"):
            spaces[name] = os.path.normpath(ws)
    for name in sorted(invalid):
        where = str(lanes_dir / f"{name}.toml")
        if name in ports:
            clash = sorted(n for n, p in ports.items() if n != name and p == ports[name])
            if clash:
                out.append(Problem(f"port {ports[name]} is also used by lane {clash[0]!r}", where, "port",
                                   "give each lane its own port ('lanectl lane add' picks a free one)",
                                   "duplicate_port", name))
        if name in spaces:
            for other in sorted(n for n in spaces if n != name and _nested(spaces[name], spaces[n])):
                if other in invalid and other < name:
                    continue  # reported once, on the pair's first file
                rel = "equals" if spaces[name] == spaces[other] else "is nested with"
                out.append(Problem(f"workspace {spaces[name]} {rel} lane {other!r}'s {spaces[other]}", where,
                                   "workspace", f"give each lane a separate directory, e.g. /var/lib/lanes/{name}",
                                   "workspace_overlap", name))
    return out


def shared_ledger(settings: Settings) -> bool:
    """The ledger is PostgreSQL (``ledger`` in lanectl.toml, or ``$LANECTL_LEDGER``): other hosts may share it."""
    from lanectl import ledgerurl

    return any(ledgerurl.is_url(v) for v in (settings.ledger.path, os.environ.get("LANECTL_LEDGER")) if v)


def cross_check(lanes: dict[str, Lane], lanes_dir: Path, *, check_host_ports: bool = False,
                shared_ledger: bool = False) -> list[Problem]:
    """Checks across lane files. ``shared_ledger`` (PostgreSQL): a ``fallback`` that is not a lane of this
    ``lanes.d/`` may be another host's lane; the supervisor checks it against the ledger when it starts or reloads
    (``fallback_unknown`` there when no host runs it: ``lanectl.ledger.hosts.check_fallbacks``)."""
    out: list[Problem] = []

    def where(name: str) -> str:
        return str(lanes_dir / f"{name}.toml")

    seen_ports: dict[int, str] = {}
    seen_prefix: dict[str, str] = {}
    seen_users: dict[str, str] = {}
    for name, lane in lanes.items():
        if lane.port in seen_ports:
            out.append(Problem(f"port {lane.port} is also used by lane {seen_ports[lane.port]!r}", where(name),
                               "port", "give each lane its own port ('lanectl lane add' picks a free one)",
                               "duplicate_port", name))
        seen_ports.setdefault(lane.port, name)
        prefix = lane.resolved_prefix(name)
        if prefix in seen_prefix:
            out.append(Problem(f"session prefix {prefix!r} is also used by lane {seen_prefix[prefix]!r}",
                               where(name), "session_prefix", "give each lane its own session namespace",
                               "duplicate_prefix", name))
        seen_prefix.setdefault(prefix, name)
        user = lane.resolved_user(name)
        if user in seen_users:
            out.append(Problem(f"user {user!r} is also used by lane {seen_users[user]!r}", where(name), "user",
                               "lanes with one user can touch each other's workspaces; give each its own user",
                               "duplicate_user", name))
        seen_users.setdefault(user, name)
        for other, olane in lanes.items():
            if other < name and _nested(lane.workspace, olane.workspace):
                rel = "equals" if lane.workspace == olane.workspace else "is nested with"
                out.append(Problem(f"workspace {lane.workspace} {rel} lane {other!r}'s {olane.workspace}",
                                   where(name), "workspace", "give each lane a separate directory, e.g. "
                                   f"/var/lib/lanes/{name}", "workspace_overlap", name))
        if lane.fallback is not None:
            if lane.fallback == name:
                out.append(Problem("lane falls back to itself", where(name), "fallback",
                                   "name another lane or remove the field", "fallback_self", name))
            elif lane.fallback not in lanes and not shared_ledger:
                out.append(Problem(f"fallback {lane.fallback!r} is not a lane", where(name), "fallback",
                                   f"use one of: {', '.join(sorted(set(lanes) - {name})) or 'none'}",
                                   "fallback_unknown", name))
        own = f"lanectl-lane@{name}.service"
        holder = port_holder_unit(lane.port) if check_host_ports and port_taken(lane.port) else own
        if holder == UNSEEN:
            out.append(Problem(f"port {lane.port} is already taken on this host", where(name), "port",
                               f"this user cannot see which process holds it (run validate as root to tell); if it "
                               f"is not {own}, stop it or pick a free port", "port_taken", name, "warning"))
        elif holder != own:
            out.append(Problem(f"port {lane.port} is already taken on this host", where(name), "port",
                               f"another process holds it ({holder or 'in no service'}, not this lane's unit): "
                               f"stop it or pick a free port", "port_taken", name, "warning"))
    out.extend(_fallback_cycles(lanes, where))
    return out


def control_dirs(settings: Settings, config_dir: Path) -> dict[str, str]:
    """The control plane's own directories, which no workspace may equal, contain or sit in."""
    dirs = {"state_dir": settings.state_dir,
            "ledger directory": (str(PurePosixPath(settings.ledger.path).parent)
                                 if settings.ledger.path and not settings.ledger.path.startswith("postgres")
                                 else settings.state_dir),  # a PostgreSQL URL: no directory of this host
            "configuration directory": os.path.realpath(config_dir),
            "unit directory": os.path.realpath(paths.unit_dir())}
    return dirs


def check_control_dirs(lanes: dict[str, Lane], lanes_dir: Path, settings: Settings, config_dir: Path) -> list[Problem]:
    out = []
    dirs = control_dirs(settings, config_dir)
    for name, lane in sorted(lanes.items()):
        for what, d in dirs.items():
            if _nested(lane.workspace, d):
                rel = ("is" if lane.workspace == d else "contains" if d.startswith(lane.workspace.rstrip("/") + "/")
                       else "is inside")
                out.append(Problem(f"workspace {lane.workspace} {rel} lanectl's {what} {d}, which install would hand "
                                   "to the lane user", str(lanes_dir / f"{name}.toml"), "workspace",
                                   f"give the lane a directory of its own, e.g. /var/lib/lanes/{name}",
                                   "workspace_unsafe", name))
                break
        if lane.secret_env_file and _nested(lane.secret_env_file, lane.workspace):
            out.append(Problem(f"secret_env_file {lane.secret_env_file} is inside the lane's workspace, which the "
                               "lane user controls", str(lanes_dir / f"{name}.toml"), "secret_env_file",
                               f"keep it with the configuration, e.g. /etc/lanectl/secrets/{name}.env",
                               "secret_env_unsafe", name))
    return out


def host_checks(lanes: dict[str, Lane], lanes_dir: Path) -> list[Problem]:
    """What only this host can tell: the accounts lanes run as, and the secret env files (validate, install)."""
    out: list[Problem] = []
    homes: dict[str, str] = {}
    try:
        for pw in pwd.getpwall():
            if pw.pw_gecos != USER_MARKER:
                homes.setdefault(pw.pw_dir.rstrip("/") or "/", pw.pw_name)
    except OSError:  # pragma: no cover - no passwd database
        pass
    for name, lane in sorted(lanes.items()):
        file = str(lanes_dir / f"{name}.toml")
        user = lane.resolved_user(name)
        try:
            pw = pwd.getpwnam(user)
        except KeyError:
            pw = None
        if pw is not None and pw.pw_uid == 0:
            out.append(Problem(f"user {user!r} has uid 0 (root)", file, "user",
                               f"use a user of its own, e.g. lane-{name} (install creates it)", "user_root", name))
        elif pw is not None and pw.pw_gecos != USER_MARKER and not lane.existing_user:
            out.append(Problem(f"user {user!r} exists (uid {pw.pw_uid}) and lanectl did not create it: the lane "
                               "would share its files and processes", file, "user",
                               f"remove user= to let install create lane-{name}, or set existing_user = true if "
                               f"{user!r} is meant only for this lane", "user_not_lanectl", name))
        owner = homes.get(lane.workspace)
        if owner is not None and owner != user:
            out.append(Problem(f"workspace {lane.workspace} is the home directory of user {owner!r}", file,
                               "workspace", f"give the lane a directory of its own, e.g. /var/lib/lanes/{name}",
                               "workspace_unsafe", name))
        if lane.secret_env_file:
            out += check_secret_file(lane.secret_env_file, file, name)
    return out


def check_secret_file(path: str, file: str, lane: str) -> list[Problem]:
    """A secret env file must be a regular file of root's that nobody else can read or write."""
    fix = f"create it as root: install -D -o root -g root -m 0600 /dev/null {path}, then add KEY=VALUE lines"
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return [Problem(f"secret_env_file {path} does not exist", file, "secret_env_file", fix, "secret_env_missing",
                        lane)]
    except OSError as exc:
        return [Problem(f"secret_env_file {path} cannot be checked: {exc.strerror}", file, "secret_env_file",
                        "run validate/install as root", "secret_env_unreadable", lane)]
    if not stat.S_ISREG(st.st_mode):
        return [Problem(f"secret_env_file {path} is not a regular file (a symlink or a directory)", file,
                        "secret_env_file", fix, "secret_env_unsafe", lane)]
    if st.st_uid != 0 or st.st_mode & 0o077:
        return [Problem(f"secret_env_file {path} is owned by uid {st.st_uid} with mode {stat.S_IMODE(st.st_mode):04o}"
                        "; other users could read or change it", file, "secret_env_file",
                        f"chown root:root {path} && chmod 0600 {path}", "secret_env_unsafe", lane)]
    # whoever can write a directory on its path can put another file in its place (a lane's workspace holding
    # another lane's secret file would hand that lane's environment, and its key, to the first lane's missions)
    for parent in PurePosixPath(path).parents:
        try:
            pst = os.stat(parent)
        except OSError as exc:
            return [Problem(f"secret_env_file {path}: {parent} cannot be checked: {exc.strerror}", file,
                            "secret_env_file", "run validate/install as root", "secret_env_unreadable", lane)]
        if pst.st_uid != 0 or (pst.st_mode & 0o022 and not pst.st_mode & stat.S_ISVTX):  # sticky: only root may
            # rename or remove root's file there
            return [Problem(f"secret_env_file {path} is inside {parent}, which uid {pst.st_uid} owns with mode "
                            f"{stat.S_IMODE(pst.st_mode):04o}: someone other than root could replace the file",
                            file, "secret_env_file", "keep secret files in a directory only root can write, e.g. "
                            f"/etc/lanectl/secrets/{lane}.env", "secret_env_unsafe", lane)]
    try:  # as root (install): its names must not override what lanectl or systemd set (values never shown)
        with open(path, encoding="utf-8", errors="replace") as fh:
            names = [ln.split("=", 1)[0].strip().removeprefix("export ").strip() for ln in fh
                     if "=" in ln and not ln.lstrip().startswith(("#", ";"))]
    except OSError:
        return []  # not readable by this user: systemd, as root, will read it
    bad = sorted({n for n in names if n.startswith(RESERVED_ENV)})
    if bad:
        return [Problem(f"secret_env_file {path} sets {', '.join(bad)}, which lanectl or systemd set", file,
                        "secret_env_file", "rename those variables in the file", "secret_env_reserved", lane)]
    return []


def _fallback_cycles(lanes: dict[str, Lane], where: Any) -> list[Problem]:
    out: list[Problem] = []
    reported: set[frozenset[str]] = set()
    for start in sorted(lanes):
        chain = [start]
        cur = lanes[start].fallback
        while cur is not None and cur in lanes and cur != chain[-1]:
            if cur in chain:
                cycle = chain[chain.index(cur):]
                key = frozenset(cycle)
                if len(cycle) > 1 and key not in reported:
                    reported.add(key)
                    out.append(Problem("fallback chain is a cycle: " + " -> ".join(cycle + [cur]), where(start),
                                       "fallback", "break the cycle: one lane of it must fall back to none",
                                       "fallback_cycle", start))
                break
            chain.append(cur)
            cur = lanes[cur].fallback
    return out


def _settings_of(where: LaneSet | str | Path | None) -> Settings:
    if isinstance(where, LaneSet):
        return where.settings
    check_config_dir(where)
    problems: list[Problem] = []
    settings = load_settings(resolve_dirs(where)[0], problems)
    if any(p.severity == "error" for p in problems):
        raise config_error(problems)
    return settings


def open_ledger(where: LaneSet | str | Path | None = None, override: str | Path | None = None,
                create: bool = False, **kwargs: Any) -> Any:
    """``Ledger.open`` of ``ledger_path(where, override)`` with the ``[ledger]`` settings of lanectl.toml.

    A ledger that does not exist is an error (``ledger_missing``, exit 6) unless ``create``: only ``install``
    and ``ledger init`` create one, so a typo in a path never starts an empty ledger that nothing reads."""
    from lanectl.errors import LanectlError
    from lanectl.ledger import Ledger

    check_config_dir(where)  # a mistyped --config is refused even when the ledger is named explicitly
    try:
        settings = _settings_of(where)
    except LanectlError:
        if not (override or os.environ.get("LANECTL_LEDGER")):
            raise
        settings = Settings()  # the ledger is named explicitly: a broken lanectl.toml leaves the default (FULL)
    return Ledger.open(ledger_path(settings, override), synchronous=settings.ledger.synchronous, create=create,
                       **kwargs)


def ledger_path(where: LaneSet | Settings | str | Path | None = None,
                override: str | Path | None = None) -> Path | str:
    """The ledger of a configuration: a file, or a checked ``postgresql://`` URL (``paths.ledger_path`` resolves
    it; lanectl.toml is read only when neither --ledger nor $LANECTL_LEDGER names the ledger)."""
    if not isinstance(where, Settings):
        check_config_dir(where)
    if override or os.environ.get("LANECTL_LEDGER"):
        return paths.ledger_path(override)
    settings = where if isinstance(where, Settings) else _settings_of(where)
    return paths.ledger_path(None, settings.ledger.path, settings.state_dir)


def port_taken(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return True
    return False


UNSEEN = "?"
"""``port_holder_unit``: a listener this user cannot attribute to a process (another user's, seen as non-root)."""


def port_holder_unit(port: int) -> str | None:
    """The systemd unit whose process listens on 127.0.0.1:``port`` (or any address), from its cgroup; None when
    the listener is in no service; ``UNSEEN`` when this user cannot tell whose it is (as non-root the owner of
    another user's socket is hidden): validate then says the port is taken without claiming by whom."""
    import psutil

    try:
        conns = psutil.net_connections(kind="tcp")
    except (psutil.Error, OSError):
        return UNSEEN
    for c in conns:
        if c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port:
            if not c.pid:
                return UNSEEN
            try:
                text = Path(f"/proc/{c.pid}/cgroup").read_text()
            except OSError:
                return UNSEEN
            for line in text.splitlines():
                for part in reversed(line.rpartition(":")[2].split("/")):
                    if part.endswith(".service"):
                        return part
            return None
    return UNSEEN  # bound but not listed (e.g. bound and not listening, or hidden from this user)


def free_port(taken: set[int], start: int = 8701, end: int = 8999) -> int:
    for port in range(start, end + 1):
        if port not in taken and not port_taken(port):
            return port
    raise RuntimeError(f"no free port between {start} and {end}")

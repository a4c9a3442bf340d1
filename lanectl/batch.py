"""``lanectl submit`` and ``lanectl submit --batch FILE``: a request (or a batch file, JSON lines, read into
requests) checked against the fleet and queued, a batch all or nothing. The CLI parses its options, calls
``submit_one`` or ``submit_batch`` and renders what they return.

The file is read line by line: a file beyond ``BATCH_MAX_BYTES``, a line beyond ``BATCH_MAX_LINE_BYTES`` and a
mission beyond ``ledger.missions.MAX_BATCH`` are refused as soon as they are met, so a huge input is never read
whole. Every error names the file, the line and the field (exit 2, ``bad_batch``); a request the ledger refuses
names its line, not its index.
"""
from __future__ import annotations

import io
import json
import os
import re
import stat
import sys
import time
from dataclasses import dataclass
from typing import Any, BinaryIO, List, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from lanectl import config
from lanectl.errors import ExitCode, LanectlError, Problem
from lanectl.ledger import missions as ms
from lanectl.timeparse import deadline_request

BATCH_MAX_BYTES = 32 * 1024 * 1024
"""The largest batch file `submit --batch` reads; a larger one is refused before it is read."""
BATCH_MAX_LINE_BYTES = ms.MAX_PAYLOAD_BYTES + 64 * 1024
"""The longest line of a batch file: a payload at its limit plus room for the other keys."""
STDIN = "-"
"""The batch file name that means standard input (named ``<stdin>`` in errors)."""


class BatchLine(BaseModel):
    """One line of ``lanectl submit --batch``: the flags of ``lanectl submit`` as JSON keys."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    cls: str = Field("background", alias="class")
    payload: Any = None
    argv: Optional[List[str]] = None
    deadline: Optional[Union[float, str]] = None
    lane: Optional[str] = None
    tags: List[str] = []
    session: Optional[str] = None
    session_stays: Optional[bool] = None
    idempotency_key: Optional[str] = None
    max_attempts: Optional[int] = None


@dataclass
class Batch:
    """A batch file read: its requests and the line number of each."""

    source: str
    requests: list[ms.SubmitRequest]
    lines: list[int]


@dataclass
class BatchResult:
    """The missions of a batch, in the order of its lines: ``created`` false for one an idempotency key found."""

    results: list[ms.SubmitResult]

    @property
    def created(self) -> int:
        return sum(r.created for r in self.results)

    @property
    def existing(self) -> int:
        return sum(not r.created for r in self.results)

    @property
    def ids(self) -> list[int]:
        return [r.mission.id for r in self.results]

    def as_dict(self) -> dict[str, Any]:
        return {"missions": [{"id": r.mission.id, "created": r.created, "class": r.mission.cls}
                             for r in self.results],
                "created": self.created, "existing": self.existing}


def read_batch(text: str | bytes, source: str, now: float) -> tuple[list[ms.SubmitRequest], list[int]]:
    """Parse a batch held in memory (see ``read_batch_stream``)."""
    data = text.encode() if isinstance(text, str) else text
    return read_batch_stream(io.BytesIO(data), source, now)


def read_batch_stream(fh: BinaryIO, source: str, now: float) -> tuple[list[ms.SubmitRequest], list[int]]:
    """Parse a batch file (JSON lines; blank lines and lines starting with # are skipped) into requests and their
    line numbers, reading it line by line: the first bad line is an error naming the file, the line and the field,
    exit 2. A file beyond ``BATCH_MAX_BYTES``, a line beyond ``BATCH_MAX_LINE_BYTES`` and a mission beyond
    ``MAX_BATCH`` are refused as soon as they are met, so a huge input is never read whole."""
    out: list[ms.SubmitRequest] = []
    numbers: list[int] = []
    total = 0
    n = 0
    while True:
        raw_bytes = fh.readline(BATCH_MAX_LINE_BYTES + 1)
        if not raw_bytes:
            break
        n += 1
        total += len(raw_bytes)
        if total > BATCH_MAX_BYTES:
            raise batch_error(source, "", f"is larger than {BATCH_MAX_BYTES} bytes",
                              f"split it into batches of at most {ms.MAX_BATCH} lines, e.g. split -l {ms.MAX_BATCH}")
        where = f"line {n}"
        if len(raw_bytes) > BATCH_MAX_LINE_BYTES:
            raise batch_error(source, where, f"is longer than {BATCH_MAX_LINE_BYTES} bytes",
                              "store large inputs in the lane's workspace and pass their path")
        try:
            line = raw_bytes.decode().strip()
        except UnicodeDecodeError as exc:
            raise batch_error(source, where, "is not UTF-8", "write the batch file in UTF-8") from exc
        if not line or line.startswith("#"):
            continue
        if len(out) >= ms.MAX_BATCH:
            raise batch_error(source, where, f"is mission {len(out) + 1}, more than {ms.MAX_BATCH} in one batch",
                              f"split it, e.g. split -l {ms.MAX_BATCH}")
        try:
            doc = json.loads(line)
        except ValueError as exc:
            raise batch_error(source, where, f"is not JSON ({exc})", "write one JSON object per line") from exc
        except RecursionError as exc:
            raise batch_error(source, where, "is nested too deeply to read", "flatten the payload") from exc
        try:
            item = BatchLine.model_validate(doc)
        except ValidationError as exc:
            err = exc.errors()[0]
            loc = ".".join(str(p) for p in err["loc"])
            raise batch_error(source, f"{where}.{loc}" if loc else where, err["msg"],
                              "keys: class, payload or argv, deadline, lane, tags, session, session_stays, "
                              "idempotency_key, max_attempts") from exc
        if (item.payload is None) == (item.argv is None):
            raise batch_error(source, where, "needs exactly one of payload and argv", "give one of them")
        deadline = item.deadline if isinstance(item.deadline, float) or item.deadline is None \
            else _line_deadline(source, where, item.deadline, now)
        out.append(ms.SubmitRequest(item.cls, item.payload if item.argv is None else {"argv": item.argv}, deadline,
                                    item.lane, tuple(item.tags), item.session, item.idempotency_key,
                                    item.max_attempts, item.session_stays))
        numbers.append(n)
    if not out:
        raise batch_error(source, "", "holds no missions", "write one JSON object per line")
    return out, numbers


def _line_deadline(source: str, where: str, text: str, now: float) -> float | str | None:
    try:
        return deadline_request(text, now)
    except LanectlError as exc:
        raise batch_error(source, f"{where}.deadline", exc.message.removeprefix("deadline: "),
                          exc.hint or "") from exc


def batch_error(source: str, where: str, message: str, hint: str) -> LanectlError:
    """A bad batch file (exit 2, ``bad_batch``): ``FILE: line N.FIELD: what``, the problem naming file and field."""
    text = f"{source}: {where}: {message}" if where else f"{source}: {message}"
    return LanectlError(text, hint, "bad_batch", ExitCode.USAGE,
                        [Problem(message, file=source, field=where or None, hint=hint, code="bad_batch")])


def read_file(batch: str, now: float, stdin: BinaryIO | None = None) -> Batch:
    """The batch file ``batch`` (``-``: ``stdin``, by default this process's) read into requests. A regular file
    larger than ``BATCH_MAX_BYTES`` is refused before it is read; an unreadable one is ``bad_batch``, exit 2."""
    if batch == STDIN:
        requests, numbers = read_batch_stream(stdin if stdin is not None else sys.stdin.buffer, "<stdin>", now)
        return Batch("<stdin>", requests, numbers)
    try:
        with open(batch, "rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            if stat.S_ISREG(os.fstat(fh.fileno()).st_mode) and size > BATCH_MAX_BYTES:
                raise batch_error(batch, "", f"is {size} bytes, larger than {BATCH_MAX_BYTES}",
                                  f"split it into batches of at most {ms.MAX_BATCH} lines, e.g. "
                                  f"split -l {ms.MAX_BATCH}")
            requests, numbers = read_batch_stream(fh, batch, now)
    except OSError as exc:
        raise LanectlError(f"{batch}: cannot read the batch file ({exc})", "check the path",
                           "bad_batch", ExitCode.USAGE) from exc
    return Batch(batch, requests, numbers)


def submit_batch(batch: str, *, now: float | None = None, config_dir: str | None = None,
                 ledger: str | None = None, stdin: BinaryIO | None = None) -> BatchResult:
    """``lanectl submit --batch FILE``: read the file, check every request against the fleet before the ledger is
    opened (a refused batch creates no ledger file), then queue them all in one transaction or none. A request
    the ledger refuses is an error naming the file and its line. ``now`` None: the ledger's clock
    (``Ledger.clock``: on PostgreSQL the server's) times the missions; this host's checks the file first."""
    given = now
    now = time.time() if now is None else now
    read = read_file(batch, now, stdin)
    fleet = config.load(config_dir)
    try:
        # every refusal before the ledger is opened (or created)
        ms.check_requests(fleet, read.requests, now, shared=config.shared_ledger(fleet.settings))
        with config.open_ledger(config_dir, ledger) as led:
            results = ms.submit_many(led, fleet, read.requests, now=led.clock() if given is None else now)
    except LanectlError as exc:
        m = re.match(r"request (\d+): ", exc.message)
        if m:  # name the file and line, not the index of the request
            where = f"line {read.lines[int(m.group(1))]}"
            exc.message = f"{read.source}: {where}: {exc.message[m.end():]}"
            for p in exc.problems:
                p.file = read.source
                p.field = (p.field or "").replace(f"requests[{m.group(1)}]", where)
        raise
    return BatchResult(results)


def submit_one(request: ms.SubmitRequest, *, now: float | None = None, config_dir: str | None = None,
               ledger: str | None = None) -> ms.SubmitResult:
    """``lanectl submit``: check the request against the fleet (a refused one creates no ledger file), then queue
    it; ``created`` is false when its idempotency key found the mission it made before. ``now`` None: timed by
    the ledger's clock (``Ledger.clock``), checked first against this host's."""
    fleet = config.load(config_dir)
    ms.check_requests(fleet, [request], time.time() if now is None else now,
                      shared=config.shared_ledger(fleet.settings))
    with config.open_ledger(config_dir, ledger) as led:
        return ms.submit_many(led, fleet, [request], now=led.clock() if now is None else now)[0]

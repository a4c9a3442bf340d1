"""Logging for lanectl's long-running processes (the supervisor, the reference lane runtime), journald-aware.

Under systemd, stderr is a journald stream (``$JOURNAL_STREAM`` names its device and inode). There every line
starts with an sd-daemon priority prefix (``<3>`` error ... ``<7>`` debug), which journald strips and stores as
``PRIORITY`` (``SyslogLevelPrefix=yes``, systemd's default), so ``journalctl -u lanectl-supervisor -p warning``
shows warnings and errors only. Each line of a multi-line record (a traceback) gets the prefix: journald reads
every line as an entry of its own, and an unprefixed line would land at the unit's default priority (info).
Without journald (a terminal, a pipe, a file) lines carry a timestamp and the level name instead.

Identifiers are written as ``key=value`` (``mission=123 attempt=1 lane=alpha``) so ``journalctl ... | grep
mission=123`` finds one mission across the supervisor and its lane. Stdlib only: the lane runtime imports it.
"""
from __future__ import annotations

import logging
import os
import sys
from typing import Final, TextIO

PREFIX: Final = {logging.DEBUG: "<7>", logging.INFO: "<6>", logging.WARNING: "<4>", logging.ERROR: "<3>",
                 logging.CRITICAL: "<2>"}
"""sd-daemon(3) prefixes: syslog priorities 7 debug, 6 info, 4 warning, 3 err, 2 crit."""


def priority_prefix(levelno: int) -> str:
    """The prefix of the nearest standard level at or below ``levelno`` (a custom level 25 is info)."""
    for level in (logging.CRITICAL, logging.ERROR, logging.WARNING, logging.INFO):
        if levelno >= level:
            return PREFIX[level]
    return PREFIX[logging.DEBUG]


def under_journald(stream: TextIO | None = None) -> bool:
    """Whether ``stream`` (default stderr) is the journald stream systemd connected ($JOURNAL_STREAM "dev:ino")."""
    expected = os.environ.get("JOURNAL_STREAM", "")
    if not expected:
        return False
    try:
        st = os.fstat((stream or sys.stderr).fileno())
    except (OSError, ValueError, AttributeError):
        return False
    return expected == f"{st.st_dev}:{st.st_ino}"


class JournalFormatter(logging.Formatter):
    """Prefixes every line of a formatted record with its sd-daemon priority."""

    def format(self, record: logging.LogRecord) -> str:
        prefix = priority_prefix(record.levelno)
        return "\n".join(prefix + line for line in super().format(record).split("\n"))


def setup(context: str = "", *, stream: TextIO | None = None, journald: bool | None = None) -> logging.Handler:
    """Configure the root logger (level ``$LANECTL_LOG_LEVEL``, default INFO) for one long-running process.

    ``context`` (``lane=alpha``) goes into every line, before the message. Returns the handler installed.
    """
    stream = stream or sys.stderr
    journald = under_journald(stream) if journald is None else journald
    ctx = f" {context}" if context else ""
    handler = logging.StreamHandler(stream)
    if journald:  # journald stamps time, unit and pid itself
        handler.setFormatter(JournalFormatter(f"%(name)s{ctx}: %(message)s"))
    else:
        handler.setFormatter(logging.Formatter(f"%(asctime)s %(levelname)s %(name)s{ctx}: %(message)s"))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    level = os.environ.get("LANECTL_LOG_LEVEL", "INFO").strip().upper()
    try:
        root.setLevel(level)
    except ValueError:
        root.setLevel(logging.INFO)
        logging.getLogger("lanectl").warning("LANECTL_LOG_LEVEL=%s is not a level (DEBUG, INFO, WARNING, ERROR); "
                                             "logging at INFO", level)
    return handler

"""lanectl.journal: sd-daemon priority prefixes on every line under journald, plain lines elsewhere."""
from __future__ import annotations

import io
import logging
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from lanectl import journal


@pytest.fixture
def root_logger() -> Iterator[logging.Logger]:
    """The root logger's handlers and level, restored after the test (setup() replaces them)."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield root
    for h in list(root.handlers):
        root.removeHandler(h)
    for h in handlers:
        root.addHandler(h)
    root.setLevel(level)


def record(level: int, msg: str, exc: bool = False) -> logging.LogRecord:
    exc_info = None
    if exc:
        try:
            raise RuntimeError("boom\nsecond line of the message")
        except RuntimeError:
            import sys

            exc_info = sys.exc_info()
    return logging.LogRecord("lanectl.supervisor", level, __file__, 1, msg, None, exc_info)


@pytest.mark.parametrize("level,prefix", [(logging.DEBUG, "<7>"), (logging.INFO, "<6>"), (logging.WARNING, "<4>"),
                                          (logging.ERROR, "<3>"), (logging.CRITICAL, "<2>"), (25, "<6>"),
                                          (35, "<4>"), (5, "<7>")])
def test_each_level_gets_its_syslog_priority(level: int, prefix: str) -> None:
    fmt = journal.JournalFormatter("%(name)s: %(message)s")
    assert fmt.format(record(level, "lane=alpha down")) == f"{prefix}lanectl.supervisor: lane=alpha down"


def test_every_line_of_a_traceback_carries_the_prefix() -> None:
    """journald reads each line as an entry: an unprefixed traceback line would land at info, out of -p warning."""
    text = journal.JournalFormatter("%(name)s: %(message)s").format(
        record(logging.ERROR, "mission=7 attempt=1 lane=alpha: applying failed\ndetail", exc=True))
    lines = text.split("\n")
    assert len(lines) > 4 and any("Traceback" in line for line in lines)
    assert all(line.startswith("<3>") for line in lines), lines


def test_under_journald_compares_device_and_inode(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with open(tmp_path / "stream", "w") as fh, open(tmp_path / "other", "w") as other:
        st = os.fstat(fh.fileno())
        monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino}")
        assert journal.under_journald(fh)
        assert not journal.under_journald(other)  # stderr redirected elsewhere: the variable was inherited
        monkeypatch.delenv("JOURNAL_STREAM")
        assert not journal.under_journald(fh)
    assert not journal.under_journald(io.StringIO())  # no file descriptor


def test_setup_under_journald_prefixes_and_names_the_context(root_logger: logging.Logger,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LANECTL_LOG_LEVEL", raising=False)
    out = io.StringIO()
    journal.setup("lane=alpha", stream=out, journald=True)
    log = logging.getLogger("lanectl.runtime")
    log.debug("mission=1 attempt=1 succeeded")  # below the default level INFO
    log.info("lane=alpha listening on 127.0.0.1:8701")
    log.warning("mission=2 attempt=1 failed (exit status 3)")
    assert out.getvalue().splitlines() == [
        "<6>lanectl.runtime lane=alpha: lane=alpha listening on 127.0.0.1:8701",
        "<4>lanectl.runtime lane=alpha: mission=2 attempt=1 failed (exit status 3)",
    ]
    assert len(root_logger.handlers) == 1


def test_setup_elsewhere_writes_time_and_level(root_logger: logging.Logger, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LANECTL_LOG_LEVEL", "debug")
    out = io.StringIO()
    journal.setup(stream=out, journald=False)
    logging.getLogger("lanectl.supervisor").debug("lane=beta healthy")
    line = out.getvalue().strip()
    assert " DEBUG lanectl.supervisor: lane=beta healthy" in line and not line.startswith("<")
    assert line[:4].isdigit()  # asctime first


def test_a_bad_log_level_falls_back_to_info_and_says_so(root_logger: logging.Logger,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LANECTL_LOG_LEVEL", "loud")
    out = io.StringIO()
    journal.setup(stream=out, journald=True)
    assert root_logger.level == logging.INFO
    assert out.getvalue() == ("<4>lanectl: LANECTL_LOG_LEVEL=LOUD is not a level (DEBUG, INFO, WARNING, ERROR); "
                              "logging at INFO\n")

"""A second ``Ledger.open`` in a process that holds a connection must not drop that process's SQLite locks.

Closing any descriptor of a file drops all of the process's POSIX (fcntl) locks on it. ``Ledger.open`` used to read
the file's header with ``open()``/``close()`` every time: in a producer holding several clients (the chaos driver),
that dropped the locks of the clients already open; the supervisor, stopping, then closed its own connection as if
it were the last one, checkpointed and deleted the WAL, and the producers' next commits went into the deleted file:
lost (issue 16: found by the supervisor_outage chaos fault). Real processes, real SQLite; no mocks.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.backends("sqlite")  # SQLite's POSIX locks and header check


def _in_other_process(db: Path, code: str) -> str:
    head = f"import sys\nsys.path.insert(0, {str(ROOT)!r})\nfrom tests.ledger.conftest import sqlite_connect\n"
    return subprocess.run([sys.executable, "-c", f"{head}c = sqlite_connect({str(db)!r})\n{code}\nc.close()"],
                          check=True, capture_output=True, text=True, timeout=60).stdout.strip()


def test_commits_survive_another_process_closing_after_a_second_open(backend) -> None:  # type: ignore[no-untyped-def]
    db = backend.path()
    first = backend.open()
    first.conn.execute("CREATE TABLE t (x)")
    first.conn.execute("INSERT INTO t VALUES (1)")
    second = backend.open()  # another client in the same process
    try:
        # another process (the supervisor stopping) opens and closes its connection
        _in_other_process(db, "c.execute('SELECT count(*) FROM t').fetchone()")
        assert Path(str(db) + "-wal").exists(), "the WAL was deleted under this process's open connections"
        first.conn.execute("INSERT INTO t VALUES (2)")
        assert _in_other_process(db, "print(c.execute('SELECT count(*) FROM t').fetchone()[0])") == "2"
    finally:
        second.close()
        first.close()



def test_a_file_that_is_not_sqlite_is_still_refused(backend) -> None:  # type: ignore[no-untyped-def]
    """SQLite checks the header itself now (lanectl never opens the file): a text file is ledger_not_sqlite."""
    from lanectl.errors import LanectlError

    db = backend.path()
    db.parent.mkdir(parents=True)
    db.write_text("not a ledger, just some text long enough to be read as a header\n" * 4)
    with pytest.raises(LanectlError) as err:
        backend.open()
    assert err.value.code == "ledger_not_sqlite"

"""Opening the ledger again in a process never releases the locks its open connections hold.

POSIX record locks belong to the process and go away when it closes *any* descriptor of the file. The ledger
used to read the file's header with a plain open()/close() before each connect: in a process that already had a
connection (the supervisor opening its Checkpointer, a producer opening a ledger per call) that dropped the
connection's SHARED lock, so another process could take the ledger for unused and delete the WAL under it —
acknowledged submits lost, later "database disk image is malformed" (issue 16's supervisor_outage chaos fault)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

PROBE = r"""
import fcntl, os, struct, sys
fd = os.open(sys.argv[1], os.O_RDWR)
# SQLite's SHARED range on the database file (unix VFS): PENDING_BYTE + 2, 510 bytes
lock = struct.pack("hhqqi", fcntl.F_WRLCK, os.SEEK_SET, 0x40000000 + 2, 510, 0)
got = struct.unpack("hhqqi", fcntl.fcntl(fd, fcntl.F_GETLK, lock))
print("held" if got[0] != fcntl.F_UNLCK else "free")
"""


def shared_lock_held(path: Path) -> bool:
    out = subprocess.run([sys.executable, "-c", PROBE, str(path)], capture_output=True, text=True, check=True)
    return out.stdout.strip() == "held"


@pytest.mark.backends("sqlite")  # SQLite's POSIX locks on its file
def test_opening_the_ledger_again_keeps_the_first_connections_lock(backend) -> None:  # type: ignore[no-untyped-def]
    path = backend.path()
    first = backend.open()
    try:
        assert shared_lock_held(path)  # what tells other processes this ledger is in use
        second = backend.open(autocheckpoint=False)  # as the supervisor opens its Checkpointer's
        try:
            assert shared_lock_held(path)
        finally:
            second.close()
        assert shared_lock_held(path)
    finally:
        first.close()
    assert not shared_lock_held(path)

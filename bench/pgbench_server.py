"""A private, durable PostgreSQL server for the issue 12 benchmarks (bench/pg_ledger_bench.py, bench/pg_latency_bench.py).

The tests' server (tests/pgserver.PgServer: initdb and pg_ctl as ``postgres``, data and socket in a private 0700
directory under /tmp, ``listen_addresses = ''``, torn down always) with the settings a production server keeps:
``fsync = on``, ``full_page_writes = on``, ``synchronous_commit = on`` (PostgreSQL's defaults: a COMMIT returns
once its WAL record is flushed to disk). The tests turn all three off because they measure no durability; a
benchmark of a durable queue must not. ``synchronous_commit`` can be turned off per database
(``create_db(..., synchronous_commit="off")``) for a second line: then a COMMIT returns before the WAL flush (a
crash of the server can lose the last ~3 x wal_writer_delay of commits, never corrupt anything).
Everything else is the Debian package's default configuration (shared_buffers 128MB, wal_level replica, ...).
"""
from __future__ import annotations

import os
import pwd
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.pgserver import PG_USER, PgServer  # noqa: E402

SETTINGS = {"fsync": "on", "full_page_writes": "on", "synchronous_commit": "on", "max_connections": "100"}


class DurableServer(PgServer):
    def start(self) -> DurableServer:
        if self.bindir is None or not (self.bindir / "initdb").exists():
            raise RuntimeError("no PostgreSQL server binaries (/usr/lib/postgresql/N/bin): run scripts/setup")
        pw = pwd.getpwnam(PG_USER)
        self.dir = Path(tempfile.mkdtemp(prefix="lanectl-pgbench-", dir="/tmp"))
        try:
            os.chown(self.dir, pw.pw_uid, pw.pw_gid)
            os.chmod(self.dir, 0o700)
            data = self.dir / "data"
            r = self._as_postgres(str(self.bindir / "initdb"), "-D", str(data), "-U", PG_USER, "-A", "trust",
                                  "-E", "UTF8", "--locale=C")
            if r.returncode:
                raise RuntimeError(f"initdb failed ({r.returncode}): {r.stderr.strip()}")
            opts = f"-c listen_addresses='' -c unix_socket_directories='{self.dir}' " + " ".join(
                f"-c {k}={v}" for k, v in SETTINGS.items())
            r = self._as_postgres(str(self.bindir / "pg_ctl"), "-D", str(data), "-l", str(self.dir / "server.log"),
                                  "-w", "-t", "120", "-o", opts, "start")
            if r.returncode:
                log = (self.dir / "server.log").read_text() if (self.dir / "server.log").exists() else ""
                raise RuntimeError(f"pg_ctl start failed ({r.returncode}): {r.stderr.strip()} {log[-2000:]}")
            self.running = True
        except BaseException:
            self.stop()
            raise
        return self

    def create_db(self, prefix: str = "t", *, empty: bool = False, template: str | None = None,
                  synchronous_commit: str = "on") -> str:
        """A fresh database: a clone of ``template`` (default: the ledger's template; ``empty``: template0), with
        ``synchronous_commit`` set for every connection to it."""
        if template is None:
            template = "template0" if empty else self.template()
        name = f"{prefix}_{os.getpid()}_{next(self._names)}"
        with self.admin() as conn:
            conn.execute(f"CREATE DATABASE {name} TEMPLATE {template}")
        with self.admin() as conn:
            conn.execute(f"ALTER DATABASE {name} SET synchronous_commit = {synchronous_commit}")
        return name

    def show(self, setting: str) -> str:
        with self.admin() as conn:
            return str(conn.execute(f"SHOW {setting}").fetchone()[0])

    def version(self) -> str:
        with self.admin() as conn:
            return str(conn.execute("SELECT version()").fetchone()[0])

    def test_fsync(self, seconds: int = 2) -> str:
        """pg_test_fsync's one-8kB-write-then-fdatasync rate in the server's directory (the WAL flush bound)."""
        assert self.bindir is not None and self.dir is not None
        tool = self.bindir / "pg_test_fsync"
        if not tool.exists():
            return "pg_test_fsync not found"
        r = subprocess.run(["runuser", "-u", PG_USER, "--", str(tool), "-s", str(seconds), "-f",
                            str(self.dir / "fsync.test")], capture_output=True, text=True, timeout=120, check=False)
        for line in r.stdout.splitlines():
            if "fdatasync" in line and "ops/sec" in line:
                return " ".join(line.split())
        return r.stdout.strip()[-300:]

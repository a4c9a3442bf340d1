"""A real PostgreSQL server for the test session, from Debian's ``postgresql`` package (issue 12, item 6).

``PgServer().start()`` runs ``initdb`` and ``pg_ctl`` as the ``postgres`` user (``runuser``) on a data directory
and a Unix socket inside a private temporary directory (mode 0700, owned by ``postgres``, under ``/tmp``: never
in the checkout, so a checkout under ``/root`` needs no permission the ``postgres`` user lacks). The server
listens on no TCP port (``listen_addresses = ''``); local connections are trusted, which only processes that can
enter the private directory (``postgres`` and root) can use. ``fsync``/``full_page_writes`` are off: a crash of
the test server loses nothing the tests need, and the contract tests do not measure durability (the SQLite
durability tests do; PostgreSQL's own is PostgreSQL's).

``template()`` builds the ledger schema once in a template database (``lanectl_template``); ``create_db()``
clones it with ``CREATE DATABASE ... TEMPLATE``, a file copy, so each test's fresh ledger costs a few
milliseconds rather than a migration. ``stop()`` runs ``pg_ctl stop -m fast`` and removes the directory, also
after a failed start.
"""
from __future__ import annotations

import glob
import itertools
import os
import pwd
import shutil
import subprocess
import tempfile
from pathlib import Path

PG_USER = "postgres"
TEMPLATE = "lanectl_template"


def find_bindir() -> Path | None:
    """``LANECTL_PG_BINDIR``, else the newest ``/usr/lib/postgresql/N/bin`` that has initdb and pg_ctl."""
    env = os.environ.get("LANECTL_PG_BINDIR")
    if env:
        return Path(env)
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"),
                   key=lambda p: int(Path(p).parts[-3]) if Path(p).parts[-3].isdigit() else 0)
    return Path(found[-1]).parent if found else None


def psycopg_connect(url: str):  # type: ignore[no-untyped-def]
    import psycopg

    return psycopg.connect(url, autocommit=True)


class PgServer:
    def __init__(self, bindir: Path | None = None) -> None:
        self.bindir = bindir or find_bindir()
        self.dir: Path | None = None
        self.running = False
        self._names = itertools.count(1)

    @property
    def socket_dir(self) -> Path:
        assert self.dir is not None
        return self.dir

    def url(self, dbname: str) -> str:
        """The libpq URL of a database of this server (Unix socket, user ``postgres``, no password)."""
        return f"postgresql:///{dbname}?host={self.socket_dir}&user={PG_USER}"

    def _as_postgres(self, *argv: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        assert self.dir is not None
        return subprocess.run(["runuser", "-u", PG_USER, "--", *argv], cwd=self.dir, capture_output=True,
                              text=True, timeout=timeout, check=False)

    def start(self) -> PgServer:
        if self.bindir is None or not (self.bindir / "initdb").exists():
            raise RuntimeError("no PostgreSQL server binaries (/usr/lib/postgresql/N/bin): run scripts/setup, "
                               "which installs Debian's postgresql package")
        pw = pwd.getpwnam(PG_USER)
        self.dir = Path(tempfile.mkdtemp(prefix="lanectl-pg-", dir="/tmp"))
        try:
            os.chown(self.dir, pw.pw_uid, pw.pw_gid)
            os.chmod(self.dir, 0o700)
            data = self.dir / "data"
            r = self._as_postgres(str(self.bindir / "initdb"), "-D", str(data), "-U", PG_USER, "-A", "trust",
                                  "-E", "UTF8", "--locale=C", "--no-sync")
            if r.returncode:
                raise RuntimeError(f"initdb failed ({r.returncode}): {r.stderr.strip()}")
            self._pg_ctl_start()
        except BaseException:
            self.stop()
            raise
        return self

    def _pg_ctl_start(self) -> None:
        assert self.dir is not None and self.bindir is not None
        opts = (f"-c listen_addresses='' -c unix_socket_directories='{self.dir}' -c fsync=off "
                "-c full_page_writes=off -c synchronous_commit=off -c max_connections=200")
        r = self._as_postgres(str(self.bindir / "pg_ctl"), "-D", str(self.dir / "data"), "-l",
                              str(self.dir / "server.log"), "-w", "-t", "120", "-o", opts, "start")
        if r.returncode:
            log = (self.dir / "server.log").read_text() if (self.dir / "server.log").exists() else ""
            raise RuntimeError(f"pg_ctl start failed ({r.returncode}): {r.stderr.strip()} {log[-2000:]}")
        self.running = True

    def halt(self, mode: str = "fast") -> None:
        """Stop the server and keep its data (``resume()`` starts it again): a database outage for fault tests.
        ``fast`` and ``smart`` shut down cleanly, so every commit acknowledged before survives."""
        assert self.dir is not None and self.bindir is not None and mode in ("fast", "smart")
        r = self._as_postgres(str(self.bindir / "pg_ctl"), "-D", str(self.dir / "data"), "-m", mode, "-w", "-t",
                              "120", "stop")
        if r.returncode:
            raise RuntimeError(f"pg_ctl stop failed ({r.returncode}): {r.stderr.strip()}")
        self.running = False

    def resume(self) -> None:
        self._pg_ctl_start()

    def restart(self, mode: str = "fast") -> None:
        """``pg_ctl restart -m MODE``: every connection is cut, the data stays (fault tests)."""
        self.halt(mode)
        self.resume()

    def stop(self) -> None:
        if self.dir is None:
            return
        try:
            if self.running and self.bindir is not None:
                self._as_postgres(str(self.bindir / "pg_ctl"), "-D", str(self.dir / "data"), "-m", "fast", "-w",
                                  "-t", "120", "stop")
        finally:
            self.running = False
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = None

    def admin(self):  # type: ignore[no-untyped-def]
        """An autocommit connection to the ``postgres`` database (CREATE/DROP DATABASE)."""
        import psycopg

        return psycopg.connect(self.url("postgres"), autocommit=True)

    def template(self) -> str:
        """Create (once) the template database with the ledger's schema applied by ``Ledger.open``; its name."""
        from lanectl.ledger import Ledger

        with self.admin() as conn:
            if conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (TEMPLATE,)).fetchone():
                return TEMPLATE
            conn.execute(f"CREATE DATABASE {TEMPLATE}")
        Ledger.open(self.url(TEMPLATE)).close()
        with self.admin() as conn:
            conn.execute(f"ALTER DATABASE {TEMPLATE} WITH is_template = true ALLOW_CONNECTIONS = false")
        return TEMPLATE

    def create_db(self, prefix: str = "t", *, empty: bool = False) -> str:
        """A new database cloned from the template (``empty``: with no schema at all); its name."""
        name = f"{prefix}_{os.getpid()}_{next(self._names)}"
        with self.admin() as conn:
            conn.execute(f"CREATE DATABASE {name} TEMPLATE {'template0' if empty else self.template()}")
        return name

    def add_password_role(self, role: str, password: str, *, dbname: str | None = None) -> str:
        """A login role that must give ``password`` (SCRAM) on the Unix socket: the role with a scram-sha-256
        password, an ``hba`` line requiring it put before the trust lines, the server reloaded. With ``dbname`` a
        database from the template owned by the role (its tables too) is made; its name is returned."""
        from psycopg import sql

        assert self.dir is not None
        with self.admin() as conn:
            conn.execute("SET password_encryption = 'scram-sha-256'")
            conn.execute(sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(sql.Identifier(role),
                                                                          sql.Literal(password)))
        hba = self.dir / "data" / "pg_hba.conf"
        hba.write_text(f"local all {role} scram-sha-256\n" + hba.read_text())
        with self.admin() as conn:
            conn.execute("SELECT pg_reload_conf()")
        self._wait_password_required(role)
        name = ""
        if dbname is not None:
            name = self.create_db(dbname)
            with psycopg_connect(self.url(name)) as conn:
                who = sql.Identifier(role)
                for grant in ("GRANT ALL ON SCHEMA public TO {}", "GRANT ALL ON ALL TABLES IN SCHEMA public TO {}",
                              "GRANT ALL ON ALL SEQUENCES IN SCHEMA public TO {}"):
                    conn.execute(sql.SQL(grant).format(who))
        return name

    def _wait_password_required(self, role: str) -> None:
        """The postmaster rereads pg_hba.conf on SIGHUP, in its own time: wait until a login of ``role`` without
        a password is refused (until then the trust line lets it in)."""
        import psycopg

        import time

        for _ in range(1200):  # 60 s at most
            try:
                psycopg.connect(self.url_as(role, "postgres"), passfile="/dev/null", connect_timeout=5).close()
            except psycopg.OperationalError as exc:
                if "password" in str(exc):
                    return
                raise
            time.sleep(0.05)
        raise RuntimeError(f"the server did not start requiring a password of {role} after pg_reload_conf()")

    def url_as(self, role: str, dbname: str) -> str:
        """The URL of ``dbname`` as ``role`` (no password in it: libpq finds it in PGPASSFILE)."""
        return f"postgresql:///{dbname}?host={self.socket_dir}&user={role}"

    def drop_db(self, name: str) -> None:
        with self.admin() as conn:
            conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")

    def exists(self, name: str) -> bool:
        with self.admin() as conn:
            return conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone() is not None

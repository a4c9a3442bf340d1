"""tests/pgserver.py: a real PostgreSQL server for the tests, private and cleaned up (issue 12, item 6)."""
from __future__ import annotations

import os
import pwd
import stat

import pytest

from tests.pgserver import PgServer


def test_a_private_server_on_a_socket_only_that_leaves_nothing_behind() -> None:
    import psycopg

    server = PgServer().start()
    where = server.dir
    try:
        assert where is not None and str(where).startswith("/tmp/")  # never in the checkout (which may be in /root)
        st = os.stat(where)
        assert stat.S_IMODE(st.st_mode) == 0o700 and st.st_uid == pwd.getpwnam("postgres").pw_uid
        with psycopg.connect(server.url("postgres")) as c:
            assert c.execute("SHOW listen_addresses").fetchone()[0] == ""  # no TCP port at all
            assert c.execute("SHOW unix_socket_directories").fetchone()[0] == str(where)
        a, b = server.create_db(), server.create_db()  # from the template: the ledger's schema, each its own
        for name in (a, b):
            with psycopg.connect(server.url(name)) as c:
                assert c.execute("SELECT count(*) FROM schema_migrations").fetchone()[0] > 0
        server.drop_db(a)
        assert not server.exists(a) and server.exists(b)
    finally:
        server.stop()
    assert not where.exists()
    server.stop()  # twice is harmless


def test_a_failed_start_removes_its_directory(tmp_path) -> None:  # type: ignore[no-untyped-def]
    server = PgServer(bindir=tmp_path)  # no initdb there
    with pytest.raises(RuntimeError, match="scripts/setup"):
        server.start()
    assert server.dir is None

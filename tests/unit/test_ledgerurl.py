"""Where the ledger is (issue 12, item 1): a path keeps meaning an SQLite file, a postgresql:// URL is kept as the
URL (never squeezed through Path, which would turn '///' into '/'), a password in a URL is refused, and the
three ways of naming it (--ledger, LANECTL_LEDGER, ledger = in lanectl.toml) go through the one parser."""
from __future__ import annotations

from pathlib import Path

import pytest

from lanectl import config
from lanectl.errors import ExitCode, LanectlError
from lanectl import ledgerurl as location
from lanectl.ledger.pg import translate

URL = "postgresql:///lanectl?host=/run/postgresql"


@pytest.mark.parametrize("value", ["/var/lib/lanectl/ledger.db", "ledger.db", Path("/x/y.db")])
def test_a_path_is_an_sqlite_file(value) -> None:  # type: ignore[no-untyped-def]
    got = location.resolve(value)
    assert isinstance(got, Path) and got == Path(value)


@pytest.mark.parametrize("url", [URL, "postgresql://db.example/lanectl", "postgres://u@h:5433/l",
                                 "postgresql:///?service=lanectl"])
def test_a_url_stays_the_url(url: str) -> None:
    assert location.resolve(url) == url and location.is_url(url)


@pytest.mark.parametrize("url, code", [
    ("postgresql://lanectl:s3cret@db/lanectl", "ledger_url_password"),
    ("postgresql:///lanectl?password=s3cret", "ledger_url_password"),
    ("postgresql://db/", "bad_ledger_url"),
    ("postgresql://db:port/x", "bad_ledger_url"),
])
def test_bad_urls_are_refused_without_showing_a_password(url: str, code: str) -> None:
    with pytest.raises(LanectlError) as err:
        location.resolve(url)
    assert err.value.code == code and err.value.exit_code == ExitCode.USAGE
    assert "s3cret" not in str(err.value) and "s3cret" not in (err.value.hint or "")


def test_redact() -> None:
    assert location.redact("postgresql://u:pw@h/db") == "postgresql://u:***@h/db"
    assert location.redact("postgresql:///db?host=/s&password=pw") == "postgresql:///db?host=/s&password=***"
    assert location.redact(URL) == URL


def _etc(tmp_path: Path, body: str) -> Path:
    d = tmp_path / "etc"
    (d / "lanes.d").mkdir(parents=True)
    (d / "lanectl.toml").write_text(f'state_dir = "{tmp_path / "state"}"\n' + body)
    return d


def test_the_three_ways_to_name_a_postgresql_ledger(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LANECTL_LEDGER", raising=False)
    etc = _etc(tmp_path, f'ledger = "{URL}"\n')
    assert config.ledger_path(etc) == URL
    assert config.ledger_path(etc, "postgresql://h/other") == "postgresql://h/other"  # --ledger wins
    monkeypatch.setenv("LANECTL_LEDGER", "postgresql:///fromenv?host=/s")
    assert config.ledger_path(etc) == "postgresql:///fromenv?host=/s"
    monkeypatch.setenv("LANECTL_LEDGER", str(tmp_path / "l.db"))
    assert config.ledger_path(etc) == tmp_path / "l.db"  # a path keeps meaning SQLite


def test_a_password_in_lanectl_toml_is_a_config_error_naming_the_field(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LANECTL_LEDGER", raising=False)
    etc = _etc(tmp_path, '[ledger]\npath = "postgresql://u:s3cret@db/lanectl"\n')
    with pytest.raises(LanectlError) as err:
        config.ledger_path(etc)
    text = str(err.value) + str(getattr(err.value, "problems", ""))
    assert "ledger.path" in text and "pgpass" in text and "s3cret" not in text


@pytest.mark.parametrize("sql, want", [
    ("SELECT a FROM t WHERE b = ? AND c IS ?", "SELECT a FROM t WHERE b = %s AND c IS NOT DISTINCT FROM %s"),
    ("SELECT a FROM t WHERE b IS NOT ? AND c IS NULL AND d IS NOT NULL",
     "SELECT a FROM t WHERE b IS DISTINCT FROM %s AND c IS NULL AND d IS NOT NULL"),
    ("SELECT id FROM events INDEXED BY events_kind WHERE kind = 'x' AND data LIKE '%y%'",
     "SELECT id FROM events WHERE kind = 'x' AND data::text LIKE '%%y%%'"),
    ("UPDATE a SET l = max(l, ?), m = (SELECT max(x) FROM b)", "UPDATE a SET l = greatest(l, %s), m = (SELECT max(x) FROM b)"),
    ("INSERT INTO u (k, n) VALUES (?, ?) ON CONFLICT (k) DO UPDATE SET n = n + excluded.n",
     "INSERT INTO u (k, n) VALUES (%s, %s) ON CONFLICT (k) DO UPDATE SET n = u.n + excluded.n"),
    ("SELECT a.x FROM attempts a CROSS JOIN missions m ON m.id = a.mission", 
     "SELECT a.x FROM attempts a JOIN missions m ON m.id = a.mission"),
])
def test_the_postgresql_translation_of_the_common_dialect(sql: str, want: str) -> None:
    assert translate(sql) == (want, None)


def test_numbered_parameters_are_reordered() -> None:
    assert translate("SELECT 1 WHERE a <= ?1 AND b >= ?1 AND c = ?2") == (
        "SELECT 1 WHERE a <= %s AND b >= %s AND c = %s", (0, 0, 1))


@pytest.mark.parametrize("url, names", [
    ("postgresql:", "postgresql: must be followed by //"),
    ("postgresql:lanectl", "postgresql: must be followed by //"),
    ("postgres:/x/y", "postgresql: must be followed by //"),
    ("postgresql:///l?sslmode=bogus", "sslmode='bogus'"),
    ("postgresql:///l?target_session_attrs=primaryy", "target_session_attrs='primaryy'"),
    ("postgresql:///l?host=/s&sslmod=require", "sslmod"),
    ("postgresql:///l?passfile=pgpass", "passfile='pgpass'"),
    ("postgresql:///l?passfile=", "passfile=''"),
    ("postgresql:///l?host=/s&&", "cannot be read"),
])
def test_urls_libpq_would_not_take_are_refused_naming_the_parameter(url: str, names: str) -> None:
    with pytest.raises(LanectlError) as err:
        location.resolve(url)
    assert err.value.code == "bad_ledger_url" and err.value.exit_code == ExitCode.USAGE
    assert names in err.value.message, err.value.message


@pytest.mark.parametrize("url", [
    "postgresql:///l?sslmode=verify-full&target_session_attrs=read-write&application_name=lanectl-a",
    "postgresql:///l?passfile=/etc/lanectl/pgpass&host=/run/postgresql",
    "postgresql://h1:5432,h2:5433/l?target_session_attrs=primary&connect_timeout=5",
])
def test_urls_with_libpqs_parameters_pass(url: str) -> None:
    assert location.resolve(url) == url


@pytest.mark.parametrize("param", ["password", "sslpassword", "oauth_client_secret"])
def test_a_secret_in_the_query_is_refused_like_a_password(param: str) -> None:
    with pytest.raises(LanectlError) as err:
        location.resolve(f"postgresql:///l?host=/s&{param}=s3cret")
    assert err.value.code == "ledger_url_password" and "s3cret" not in str(err.value)
    assert "s3cret" not in location.redact(f"postgresql:///l?{param}=s3cret")


def test_a_malformed_url_in_lanectl_toml_is_a_config_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LANECTL_LEDGER", raising=False)
    etc = _etc(tmp_path, 'ledger = "postgresql:lanectl"\n')
    with pytest.raises(LanectlError) as err:
        config.ledger_path(etc)
    assert err.value.exit_code == ExitCode.CONFIG and "//" in str(err.value) + str(err.value.problems)


def test_a_postgresql_ledger_is_no_directory_of_this_host(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The supervisor's unit gets no ReadWritePaths= for a URL (Path(URL).parent is "postgresql:"), and no
    workspace is checked against such a "directory"."""
    from lanectl import units

    monkeypatch.delenv("LANECTL_LEDGER", raising=False)
    etc = _etc(tmp_path, f'ledger = "{URL}"\n')
    (etc / "lanes.d" / "alpha.toml").write_text('port = 9001\nworkspace = "/var/lib/lanes/alpha"\n')
    fleet = config.load(etc)
    text = units.render_supervisor(fleet, "/usr/bin/python3")
    rw = [line for line in text.splitlines() if line.startswith("ReadWritePaths=")]
    assert rw and all("postgresql:" not in line for line in rw), rw
    assert "postgresql:" not in " ".join(config.control_dirs(fleet.settings, etc).values())


@pytest.mark.parametrize("url, secret", [
    ("postgresql:///db?host=/tmp&pass%77ord=S3cretPW", "S3cretPW"),  # libpq decodes the key: it is a password
    ("postgresql:///db?host=/tmp&%70assword=S3cretPW", "S3cretPW"),
    ("postgresql:///db?PassWord=S3cretPW&host=/tmp", "S3cretPW"),  # not libpq's (refused as unknown), still hidden
])
def test_a_disguised_password_is_refused_and_never_shown(url: str, secret: str) -> None:
    """Attack finding F4: the refusal printed the URL with a percent-encoded password in it."""
    with pytest.raises(LanectlError) as err:
        location.check_url(url)
    assert err.value.exit_code == ExitCode.USAGE and secret not in str(err.value)
    assert secret not in location.redact(url) and "host=/tmp" in location.redact(url)


@pytest.mark.parametrize("argv", [["missions"], ["mission", "show", "1"]])
def test_the_fast_path_refuses_a_bad_url_with_exit_2_and_no_traceback(argv: list[str]) -> None:
    """Attack finding F5: `missions --ledger URL-with-password` printed a traceback (exit 1)."""
    import json
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "lanectl", *argv, "--json", "--ledger", "postgresql://u:pw@/db"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stdout + proc.stderr
    assert json.loads(proc.stdout)["errors"][0]["code"] == "ledger_url_password" and ":pw@" not in proc.stdout


def test_the_installed_url_ledger_stays_a_url_on_the_fast_path(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """Attack finding F3: `missions` without -c read the installed ledger's URL through Path(), which folds '//'
    and took it for a file name."""
    from lanectl import manifest
    from lanectl.cli import missionview

    monkeypatch.delenv("LANECTL_LEDGER", raising=False)
    monkeypatch.delenv("LANECTL_CONFIG_DIR", raising=False)
    monkeypatch.setattr(manifest, "read", lambda _unit_dir: {"ledger": URL})  # what install recorded
    assert missionview._ledger(None) == URL

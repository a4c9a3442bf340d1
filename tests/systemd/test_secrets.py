"""Issue 10 under a real systemd: a lane's secret env file reaches its runtime (and, by design, its missions) and
nobody else: not another lane, not a mission on it, not `systemctl show`. And install leaves a directory it did
not create as it found it."""
from __future__ import annotations

import json
import secrets
from pathlib import Path

import pytest

from tests.systemd.lanehelpers import Fleet, submit_many, wait_for, wait_terminal

pytestmark = pytest.mark.systemd

SECRET_FILE = "/etc/lanes-secrets/sec-a.env"  # outside /etc/lanectl: only its owner and mode protect it


def sh(script: str) -> list[str]:
    return ["/bin/sh", "-c", script]


def test_a_lanes_secret_reaches_only_that_lane(sandbox, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    value = "s3cret-" + secrets.token_hex(8)
    cfg = tmp_path / "sec"
    (cfg / "lanes.d").mkdir(parents=True)
    (cfg / "lanectl.toml").write_text('ledger = "/var/lib/lanectl/test-secrets.db"\n')
    (cfg / "lanes.d" / "sec-a.toml").write_text(
        f'port = 8771\nworkspace = "/var/lib/lanes-sec/sec-a"\nsecret_env_file = "{SECRET_FILE}"\n'
        '[env]\nPLAIN = "not-secret"\n')
    (cfg / "lanes.d" / "sec-b.toml").write_text('port = 8772\nworkspace = "/var/lib/lanes-sec/sec-b"\n')
    f = Fleet(sandbox, cfg)
    # a world-readable secret file is refused before anything is written
    f.write_file(SECRET_FILE, f"SECRET_TOKEN={value}\n", mode="0644")
    code, doc = f.json("install")
    assert code == 3 and doc["errors"][0]["field"] == "secret_env_file", doc
    assert f.sb.exec(["test", "-e", "/etc/systemd/system/lanectl-lane@sec-a.service.d"], check=False).returncode != 0
    f.write_file(SECRET_FILE, f"SECRET_TOKEN={value}\n", mode="0600")
    code, doc = f.json("install")
    assert code == 0, doc
    try:
        code, doc = f.json("up")
        assert code == 0, doc
        pid_a = f.main_pid("sec-a")
        ids = submit_many(f, [
            # the lane's own missions inherit the runtime's environment, secret included (docs/lanes.md)
            {"cls": "background", "lane": "sec-a", "argv": sh('printf %s "$SECRET_TOKEN" > seen.txt')},
            # another lane's mission tries the file and the runtime's environment
            {"cls": "background", "lane": "sec-b", "argv": sh(
                f"cat {SECRET_FILE} > file.txt 2> file.err; echo $? > file.rc; "
                f"cat /proc/{pid_a}/environ > environ.txt 2> environ.err; echo $? > environ.rc; "
                "env > env.txt; exit 0")},
        ])
        wait_terminal(f, ids, 60)
        assert f.read_file("/var/lib/lanes-sec/sec-a/seen.txt") == value
        b = "/var/lib/lanes-sec/sec-b/"
        assert f.read_file(b + "file.rc").strip() != "0", f.read_file(b + "file.err")
        assert "Permission denied" in f.read_file(b + "file.err")
        assert f.read_file(b + "environ.rc").strip() != "0"
        for name in ("file.txt", "environ.txt", "env.txt"):
            assert value not in f.read_file(b + name), name
        # systemd does not print EnvironmentFile= contents; [env] is shown (it is not secret)
        show = f.sb.exec(["systemctl", "show", "lanectl-lane@sec-a.service"], check=True).stdout
        assert value not in show
        assert "PLAIN=not-secret" in show and SECRET_FILE in show
        cat = f.sb.exec(["systemctl", "cat", "lanectl-lane@sec-a.service"], check=True).stdout
        assert value not in cat
        # nor does the control plane's state (ledger, its WAL, keys) hold it
        assert f.sb.exec(["grep", "-rqF", value, "/var/lib/lanectl"], check=False).returncode == 1
    finally:
        f.lanectl("down")
        f.sb.exec(["rm", "-f", SECRET_FILE], check=False)


def test_install_leaves_a_directory_it_did_not_create_alone(sandbox, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    cfg = tmp_path / "pre"
    (cfg / "lanes.d").mkdir(parents=True)
    (cfg / "lanectl.toml").write_text('ledger = "/var/lib/lanectl/test-pre.db"\n')
    (cfg / "lanes.d" / "pre-a.toml").write_text('port = 8773\nworkspace = "/var/lib/lanes-pre/shared"\n')
    (cfg / "lanes.d" / "pre-b.toml").write_text('port = 8774\nworkspace = "/var/lib/lanes-pre/pre-b"\n')
    f = Fleet(sandbox, cfg)
    f.sb.exec(["install", "-d", "-o", "nobody", "-g", "nogroup", "-m", "0755", "/var/lib/lanes-pre/shared"],
              check=True)
    try:
        code, doc = f.json("install")
        assert code == 0, doc
        stat = lambda p: f.sb.exec(["stat", "-c", "%a %U", p], check=True).stdout.split()  # noqa: E731
        assert stat("/var/lib/lanes-pre/shared") == ["755", "nobody"]
        assert stat("/var/lib/lanes-pre/pre-b") == ["700", "lane-pre-b"]  # one it created is the lane's
        notices = [n for n in doc["data"]["notices"] if "/var/lib/lanes-pre/" in n]
        assert len(notices) == 1 and "/var/lib/lanes-pre/shared" in notices[0]
        assert "chown lane-pre-a:lane-pre-a /var/lib/lanes-pre/shared" in notices[0]
        # and again: still alone, still said
        code, doc = f.json("install")
        assert code == 0 and stat("/var/lib/lanes-pre/shared") == ["755", "nobody"]
        assert [n for n in doc["data"]["notices"] if "/var/lib/lanes-pre/" in n] == notices
    finally:
        f.sb.exec(["rm", "-rf", "/var/lib/lanes-pre"], check=False)

"""Escaping, checked against systemd's own parsing: any string in exec/env reaches the process unchanged, or is
refused with exit 3 before a unit file changes."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import tomli_w
from hypothesis import HealthCheck, given, settings, strategies as st

from lanectl.config import is_noncharacter
from tests.systemd.lanehelpers import PYTHON, Fleet

pytestmark = pytest.mark.systemd

ECHO = r'''
import json, os, sys, time
import sdnotify
with open(os.environ["LANECTL_WORKSPACE"] + "/echo.json", "w") as f:
    json.dump({"argv": sys.argv[1:], "env": {k: v for k, v in os.environ.items() if k.startswith("V_")}}, f)
n = sdnotify.SystemdNotifier()
n.notify("READY=1")
while True:
    n.notify("WATCHDOG=1")
    time.sleep(0.5)
'''
DROPIN = "/etc/systemd/system/lanectl-lane@echo.service.d/50-lanectl.conf"
NASTY = ["a b", 'q"uote', "it's", "back\\slash", "trail\\", "100%", "%i %n %%", "$HOME", "${X}", "$$", ";", "\\;",
         "-x", "@x", "~", "é ü 漢字 🙂", "=", "a=b", " lead", "trail ", "", "\u0085", "\u2028", "\U0010fffd"]


@pytest.fixture(scope="module")
def echo(sandbox, tmp_path_factory):  # type: ignore[no-untyped-def]
    cfg = tmp_path_factory.mktemp("echo")
    (cfg / "lanes.d").mkdir()
    f = Fleet(sandbox, cfg)
    f.write_file("/var/lib/lanes-probe/echo.py", ECHO)
    yield f
    f.lanectl("down")


def put_lane(f: Fleet, args: list[str], env: list[str]) -> None:
    doc = {"port": 8761, "workspace": "/var/lib/lanes-echo/echo",
           "exec": [PYTHON, "/var/lib/lanes-probe/echo.py", *args],
           "env": {f"V_{i}": v for i, v in enumerate(env)}}
    (f.config_dir / "lanes.d" / "echo.toml").write_text(tomli_w.dumps(doc))


def is_refused(s: str) -> bool:
    return any(ord(c) < 0x20 or ord(c) == 0x7F or is_noncharacter(c) for c in s)


def roundtrip(f: Fleet, args: list[str], env: list[str]) -> None:
    before = f.sb.exec(["cat", DROPIN], check=False).stdout
    put_lane(f, args, env)
    code, doc = f.json("install")
    if any(is_refused(s) for s in args + env):
        assert code == 3, doc
        assert f.sb.exec(["cat", DROPIN], check=False).stdout == before  # never a changed unit
        return
    assert code == 0, doc
    f.sb.exec(["rm", "-f", "/var/lib/lanes-echo/echo/echo.json"], check=True)
    f.sb.exec(["systemctl", "restart", "lanectl-lane@echo.service"], check=True)
    got = json.loads(f.read_file("/var/lib/lanes-echo/echo/echo.json"))
    assert got["argv"] == args
    assert got["env"] == {f"V_{i}": v for i, v in enumerate(env)}


def test_nasty_values_reach_the_process_unchanged(echo: Fleet) -> None:
    roundtrip(echo, NASTY, NASTY)


def test_control_characters_are_refused(echo: Fleet) -> None:
    roundtrip(echo, ["ok"], ["ok"])
    for bad in ("a\nExecStartPre=/bin/false", "x\ry", "tab\there", "\x7f", "\ufffe", "\uffff", "\ufdd0", "\U0001fffe"):
        roundtrip(echo, [bad], ["ok"])
        roundtrip(echo, ["ok"], [bad])


text = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=12)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(args=st.lists(text, max_size=4), env=st.lists(text, max_size=3))
def test_any_string_roundtrips_or_is_refused(echo: Fleet, args: list[str], env: list[str]) -> None:
    roundtrip(echo, args, env)

"""Unit state over D-Bus (lanectl.systemd.UnitBus) says what `systemctl show` says, as root (systemd's private
socket) and as another user (the system bus), for services, a target, a template instance with characters that
need escaping, a unit that does not exist, and a failed unit."""
from __future__ import annotations

import json

import pytest

from lanectl.systemd import parse_timespan_us
from tests.systemd.lanehelpers import PYTHON

pytestmark = pytest.mark.systemd

SERVICE = """[Unit]
Description=unitbus probe
[Service]
Type=notify
NotifyAccess=all
WatchdogSec=30
ExecStart=/bin/sh -c 'systemd-notify --ready --status="working: 1 of 2"; exec sleep 600'
"""
FAILING = """[Service]
Type=oneshot
ExecStart=/bin/sh -c 'exit 7'
"""
COMPARE = r'''
import json, sys
from lanectl import systemd
units = json.loads(sys.argv[1])
props = ("Id", "LoadState", "ActiveState", "SubState", "Result", "MainPID", "NRestarts", "StatusText",
         "InvocationID", "ExecMainStartTimestampMonotonic", "WatchdogUSec", "ExecMainCode", "ExecMainStatus",
         "ControlGroup", "UnitFileState", "TasksCurrent")
by_bus = systemd.show(units, props)
used_bus = systemd.UnitBus._shared is not None
by_ctl = systemd.show_by_systemctl(units, props)
print(json.dumps({"bus": by_bus, "ctl": by_ctl, "used_bus": used_bus}))
'''
UNITS = ["unitbus-ok.service", "unitbus-fail.service", "unitbus-tmpl@a-b:c\\x2dd_e.service", "multi-user.target",
         "unitbus-missing.service"]


@pytest.fixture(scope="module")
def units(sandbox):  # type: ignore[no-untyped-def]
    sandbox.write_unit("unitbus-ok.service", SERVICE)
    sandbox.write_unit("unitbus-fail.service", FAILING)
    sandbox.write_unit("unitbus-tmpl@.service", SERVICE)
    sandbox.daemon_reload()
    sandbox.systemctl("start", "unitbus-ok.service", UNITS[2])
    sandbox.systemctl("start", "unitbus-fail.service", check=False)
    yield UNITS
    sandbox.systemctl("stop", "unitbus-ok.service", UNITS[2], check=False)
    sandbox.systemctl("reset-failed", "unitbus-fail.service", check=False)


def _compare(sandbox, units: list[str], user: str | None) -> None:  # type: ignore[no-untyped-def]
    argv = [PYTHON, "-c", COMPARE, json.dumps(units)]
    if user:
        argv = ["setpriv", f"--reuid={user}", "--regid=nogroup", "--clear-groups", *argv]
    got = json.loads(sandbox.exec(argv, check=True).stdout)
    assert got["used_bus"], "the D-Bus path was not taken"
    for unit in units:
        ctl, bus = got["ctl"][unit], got["bus"][unit]
        for prop, value in ctl.items():
            if prop == "WatchdogUSec":  # systemctl prints a timespan, the bus microseconds
                assert parse_timespan_us(bus[prop]) == parse_timespan_us(value), (unit, bus[prop], value)
            elif value == "[not set]":  # accounting off: systemctl's words for 2^64-1
                assert bus[prop] == str(2**64 - 1), (unit, prop, bus[prop])
            else:
                assert bus.get(prop) == value, (unit, prop, bus.get(prop), value)
    assert got["bus"]["unitbus-ok.service"]["StatusText"] == "working: 1 of 2"
    assert got["bus"]["unitbus-ok.service"]["WatchdogUSec"] == "30000000"
    assert got["bus"]["unitbus-fail.service"]["Result"] == "exit-code"
    assert got["bus"]["unitbus-missing.service"]["LoadState"] == "not-found"
    assert "MainPID" not in got["bus"]["multi-user.target"]  # not a service: the property is left out


def test_bus_and_systemctl_agree_as_root(sandbox, units) -> None:  # type: ignore[no-untyped-def]
    _compare(sandbox, units, None)


def test_bus_and_systemctl_agree_as_another_user(sandbox, units) -> None:  # type: ignore[no-untyped-def]
    _compare(sandbox, units, "nobody")


THREADS = r'''
import json, sys, threading
from lanectl import systemd
units = json.loads(sys.argv[1])
starts = [systemd.show_start(units, ("Id", "ActiveState")) for _ in range(4)]  # four bursts in flight at once
results = [None] * 4
def finish(i):
    results[i] = systemd.show_finish(starts[3 - i], units)  # collected in the other order, from four threads
ts = [threading.Thread(target=finish, args=(i,)) for i in range(4)]
[t.start() for t in ts]
[t.join(60) for t in ts]
print(json.dumps(results))
'''


def test_bursts_from_several_threads_each_get_their_answers(sandbox, units) -> None:  # type: ignore[no-untyped-def]
    got = json.loads(sandbox.exec([PYTHON, "-c", THREADS, json.dumps(units)], check=True).stdout)
    assert all(r is not None for r in got)
    assert all(r["unitbus-ok.service"]["ActiveState"] == "active" for r in got)
    assert all(r["unitbus-fail.service"]["ActiveState"] == "failed" for r in got)

"""How lanectl.systemd names a systemctl that could not ask systemd (found by an attack on issue 11: non-root
`lanectl status` with the system D-Bus stopped exited 1, "systemctl show failed", where the documented exit for
systemd that cannot be read is 6). The process here is a real one that fails as systemctl does."""
from __future__ import annotations

import subprocess

import pytest

from lanectl import systemd
from lanectl.errors import ExitCode, LanectlError


def failing(stderr: str) -> subprocess.Popen[str]:
    return subprocess.Popen(["sh", "-c", 'printf "%s\\n" "$1" >&2; exit 1', "sh", stderr], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


@pytest.mark.parametrize("stderr", ["Failed to connect to bus: No such file or directory",
                                    "System has not been booted with systemd as init system (PID 1). Can't operate."])
def test_systemd_that_cannot_be_asked_is_unavailable(stderr: str) -> None:
    with pytest.raises(LanectlError) as exc:
        systemd.show_finish(failing(stderr), ["lanectl-lane@alpha.service"])
    assert exc.value.exit_code == ExitCode.UNAVAILABLE and exc.value.code == "systemd_unavailable"
    assert stderr.split(":")[0] in exc.value.message


def test_any_other_systemctl_failure_stays_a_failure() -> None:
    with pytest.raises(LanectlError) as exc:
        systemd.show_finish(failing("Unknown property Foo"), ["lanectl-lane@alpha.service"])
    assert exc.value.exit_code == ExitCode.ERROR and exc.value.code == "systemctl_failed"

"""Fixtures for tests that need a real systemd: each sandbox is booted by scripts/sdbox under its
own state dir /tmp/sdbox/pytest-<pid>-<n> and always torn down in a finalizer.

- `sandbox`: one per session; tests share it, so give units unique names and stop what you start.
- `fresh_sandbox`: a sandbox of the test's own.
- `sandbox_factory`: call it for as many sandboxes of the test's own as you need.

Every test in this directory is marked `systemd` (deselect with -m 'not systemd').
"""
from __future__ import annotations

import itertools
import os
import shutil
import signal
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.sdbox import SDBOX, Sandbox

HERE = Path(__file__).resolve().parent
SYSTEMD = "/lib/systemd/systemd"
_serial = itertools.count()


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # test modules also set pytestmark; this catches a module that forgets to
    for item in items:
        if HERE in item.path.resolve().parents:
            item.add_marker(pytest.mark.systemd)


def _skip_reason() -> str | None:
    if os.geteuid() != 0:
        return "needs root: boots a private systemd with scripts/sdbox"
    if not os.access(SYSTEMD, os.X_OK):
        return f"{SYSTEMD} is missing (install systemd)"
    if not os.access(SDBOX, os.X_OK):
        return f"{SDBOX} is missing or not executable"
    return None


def _sigterm_as_interrupt() -> None:
    """A SIGTERM (CI timeout) would end pytest without running finalizers and leave sandboxes
    up; turn it into KeyboardInterrupt, which pytest handles by tearing fixtures down."""
    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        def _raise(signum: int, _frame: object) -> None:
            raise KeyboardInterrupt(f"signal {signum}")

        signal.signal(signal.SIGTERM, _raise)


def _boot(request: pytest.FixtureRequest) -> Sandbox:
    reason = _skip_reason()
    if reason:
        pytest.skip(reason)
    _sigterm_as_interrupt()
    # a state dir no other sandbox of this run uses: a module that imports this one as tests.systemd.conftest has
    # a counter of its own (two sandboxes named alike: the first one's teardown would take the other down with it)
    while True:
        sb = Sandbox(f"/tmp/sdbox/pytest-{os.getpid()}-{next(_serial)}")
        if not sb.state_dir.exists():
            break

    def finish() -> None:
        sb.down()  # raises if anything of the sandbox is left: the state dir stays for inspection
        if (sb.state_dir / ".sdbox").is_file():
            shutil.rmtree(sb.state_dir)

    # registered before `up`, so that a boot that fails half way is cleaned up as well
    request.addfinalizer(finish)
    sb.up()
    return sb


@pytest.fixture(scope="session")
def sandbox(request: pytest.FixtureRequest) -> Sandbox:
    """A private systemd shared by the whole session."""
    return _boot(request)


@pytest.fixture
def sandbox_factory(request: pytest.FixtureRequest) -> Callable[[], Sandbox]:
    """Boots a new private systemd on each call; all of them are torn down after the test."""
    return lambda: _boot(request)


@pytest.fixture
def fresh_sandbox(sandbox_factory: Callable[[], Sandbox]) -> Iterator[Sandbox]:
    """A private systemd of this test's own."""
    yield sandbox_factory()

"""Issue 15 item 9: scripts/setup puts `lanectl` on PATH (scripts/link-lanectl), for the default prefix only.

Runs the real script against a bin directory of the test's own (LANECTL_BIN_DIR), never /usr/local/bin.
"""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from tests.conftest import ROOT

LINK = ROOT / "scripts" / "link-lanectl"


def fake_venv(where: Path) -> Path:
    venv = where / "venv"
    (venv / "bin").mkdir(parents=True)
    exe = venv / "bin" / "lanectl"
    exe.write_text("#!/bin/sh\necho fake lanectl \"$@\"\n")
    exe.chmod(0o755)
    return venv


def link(venv: Path | str, bin_dir: Path, **env: str) -> subprocess.CompletedProcess[str]:
    full = {k: v for k, v in os.environ.items() if k not in ("LANECTL_LINK", "LANECTL_BIN_DIR")}
    full.update(LANECTL_BIN_DIR=str(bin_dir), **env)
    return subprocess.run([str(LINK), str(venv)], capture_output=True, text=True, env=full, timeout=30)


def test_another_prefix_is_not_linked_unless_asked(tmp_path: Path) -> None:
    venv, bin_dir = fake_venv(tmp_path / "opt-lanectl-x"), tmp_path / "bin"
    res = link(venv, bin_dir)
    assert res.returncode == 0 and not (bin_dir / "lanectl").exists()
    assert "LANECTL_LINK=1" in res.stderr
    res = link(venv, bin_dir, LANECTL_LINK="1")
    assert res.returncode == 0, res.stderr
    assert os.readlink(bin_dir / "lanectl") == str(venv / "bin" / "lanectl")
    out = subprocess.run(["lanectl", "validate"], capture_output=True, text=True, timeout=30,
                         env={**os.environ, "PATH": f"{bin_dir}:/usr/bin:/bin"})
    assert out.stdout.strip() == "fake lanectl validate"


def test_a_second_run_replaces_its_own_link_but_never_a_file(tmp_path: Path) -> None:
    old, new, bin_dir = fake_venv(tmp_path / "a"), fake_venv(tmp_path / "b"), tmp_path / "bin"
    assert link(old, bin_dir, LANECTL_LINK="1").returncode == 0
    assert link(new, bin_dir, LANECTL_LINK="1").returncode == 0
    assert os.readlink(bin_dir / "lanectl") == str(new / "bin" / "lanectl")
    (bin_dir / "lanectl").unlink()
    (bin_dir / "lanectl").write_text("someone else's\n")
    res = link(new, bin_dir, LANECTL_LINK="1")
    assert res.returncode == 1 and "left alone" in res.stderr
    assert (bin_dir / "lanectl").read_text() == "someone else's\n"


def test_link_zero_never_links(tmp_path: Path) -> None:
    venv, bin_dir = fake_venv(tmp_path / "v"), tmp_path / "bin"
    assert link(venv, bin_dir, LANECTL_LINK="0").returncode == 0
    assert not (bin_dir / "lanectl").exists()


@pytest.mark.skipif(not os.access("/opt/lanectl/venv/bin/lanectl", os.X_OK), reason="no default venv here")
@pytest.mark.parametrize("venv", ["/opt/lanectl/venv", "/opt/lanectl//venv", "/opt/lanectl/venv/"])
def test_the_default_prefix_is_linked(tmp_path: Path, venv: str) -> None:
    """Also spelled as scripts/setup spells it for LANECTL_PREFIX=/opt/lanectl/ (a trailing slash)."""
    bin_dir = tmp_path / "bin"
    res = link(venv, bin_dir)
    assert res.returncode == 0, res.stderr
    assert os.readlink(bin_dir / "lanectl") == "/opt/lanectl/venv/bin/lanectl"


def test_a_link_to_something_else_is_left_alone(tmp_path: Path) -> None:
    """Found by an attack (issue 15 follow-up F10): any symlink at the target was replaced, though the docs say only
    lanectl's own earlier link is. A link to anything but a lanectl venv's bin/lanectl stays, and so does a dangling
    one."""
    venv, bin_dir = fake_venv(tmp_path / "v"), tmp_path / "bin"
    bin_dir.mkdir()
    other = tmp_path / "other-tool"
    other.write_text("#!/bin/sh\necho other\n")
    for dest in (str(other), "/usr/bin/true", str(tmp_path / "gone" / "lanectl"), "lanectl-wrapper"):
        (bin_dir / "lanectl").unlink(missing_ok=True)
        (bin_dir / "lanectl").symlink_to(dest)
        res = link(venv, bin_dir, LANECTL_LINK="1")
        assert res.returncode == 1 and "left alone" in res.stderr and dest in res.stderr, (dest, res.stderr)
        assert os.readlink(bin_dir / "lanectl") == dest
    # its own earlier link, to another lanectl venv (even one that is gone), is replaced
    (bin_dir / "lanectl").unlink()
    (bin_dir / "lanectl").symlink_to("/opt/lanectl-old/venv/bin/lanectl")
    assert link(venv, bin_dir, LANECTL_LINK="1").returncode == 0
    assert os.readlink(bin_dir / "lanectl") == str(venv / "bin" / "lanectl")


@pytest.mark.parametrize("spelling", ["{v}/", "{v}//", "{p}//venv", "{p}/venv/"])
def test_the_venv_may_be_spelled_with_a_trailing_or_doubled_slash(tmp_path: Path, spelling: str) -> None:
    venv, bin_dir = fake_venv(tmp_path / "p"), tmp_path / "bin"
    spelled = spelling.format(v=venv, p=tmp_path / "p")
    res = link(spelled, bin_dir, LANECTL_LINK="1")
    assert res.returncode == 0, res.stderr
    assert os.readlink(bin_dir / "lanectl") == str(venv / "bin" / "lanectl")
    res = link(spelled, bin_dir, LANECTL_LINK="1")  # and again
    assert res.returncode == 0 and os.readlink(bin_dir / "lanectl") == str(venv / "bin" / "lanectl")

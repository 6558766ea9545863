"""`make install` / `make uninstall` into a temporary PREFIX, and a wheel in a fresh venv.

Both install flatfs's dependencies from the package index, as a real install does.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import flatfs

from ..helpers.nbd import have_nbd_tools, serve_runs
from ..helpers.needs import require

ROOT = Path(__file__).resolve().parents[2]
PAGES = ("flatfs.1", "flatfs-mount.1", "flatfs-convert.1", "flatfs-measure.1")

pytestmark = pytest.mark.slow


def _make(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["make", "-C", str(ROOT), *args], capture_output=True, text=True, timeout=600)


def _left(prefix: Path) -> list[str]:
    return sorted(str(p.relative_to(prefix)) for p in prefix.rglob("*") if not p.is_dir())


def test_install_then_uninstall_leaves_nothing(tmp_path: Path) -> None:
    require(shutil.which("make") is not None, "make is not installed")
    spaced = _make("install", f"PREFIX={tmp_path / 'a b'}")
    assert spaced.returncode != 0 and "white space" in spaced.stderr and not (tmp_path / "a b").exists()
    prefix = tmp_path / "prefix"
    res = _make("install", f"PREFIX={prefix}")
    assert res.returncode == 0, res.stdout + res.stderr
    flatfs_bin = prefix / "bin" / "flatfs"
    ver = subprocess.run([str(flatfs_bin), "--version"], capture_output=True, text=True, cwd="/")
    assert ver.returncode == 0 and ver.stdout.split()[-1] == flatfs.__version__, ver
    # its own venv, not the system Python and not this checkout
    where = subprocess.run(
        [str(prefix / "lib/flatfs/bin/python"), "-c", "import flatfs; print(flatfs.__file__)"],
        capture_output=True,
        text=True,
        cwd="/",
    )
    assert where.stdout.startswith(str(prefix / "lib" / "flatfs")), where
    for page in PAGES:
        assert (prefix / "share/man/man1" / page).read_bytes() == (ROOT / "docs/man" / page).read_bytes()
    unit = prefix / "lib/systemd/system/flatfs@.service"
    text = unit.read_text()
    assert f"ExecStart={flatfs_bin} mount" in text and "/usr/local/bin" not in text
    assert "DeviceAllow=block-device-mapper r" in text and "DeviceAllow=block-loop r" in text
    require(shutil.which("systemd-analyze") is not None, "systemd-analyze is not installed")
    verify = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", str(unit)], capture_output=True, text=True
    )
    assert verify.returncode == 0 and "flatfs" not in verify.stdout + verify.stderr, verify
    _installed_serve(prefix, tmp_path)

    res = _make("uninstall", f"PREFIX={prefix}")
    assert res.returncode == 0, res.stdout + res.stderr
    assert _left(prefix) == []


def test_uninstall_keeps_what_it_did_not_install(tmp_path: Path) -> None:
    prefix = tmp_path / "usr"
    (prefix / "bin").mkdir(parents=True)
    (prefix / "bin" / "other").write_text("keep me")
    res = _make("uninstall", f"PREFIX={prefix}")
    assert res.returncode == 0, res.stderr
    assert _left(prefix) == ["bin/other"]


def test_wheel_installs_and_runs_in_a_fresh_venv(tmp_path: Path) -> None:
    wheels = tmp_path / "wheels"
    res = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(wheels), str(ROOT)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert res.returncode == 0, res.stderr
    (wheel,) = wheels.glob("flatfs-*.whl")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    res = subprocess.run(
        [str(venv / "bin/python"), "-m", "pip", "install", "-q", str(wheel)],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert res.returncode == 0, res.stderr
    ver = subprocess.run([str(venv / "bin/flatfs"), "--version"], capture_output=True, text=True, cwd="/")
    assert ver.returncode == 0 and ver.stdout.split()[-1] == flatfs.__version__, ver.stderr
    why = have_nbd_tools()
    require(why is None, why or "")
    assert serve_runs(venv / "bin/flatfs", tmp_path) == "65536"  # nbdkit found the wheel's plugin


def _installed_serve(prefix: Path, tmp_path: Path) -> None:
    """flatfs serve from the PREFIX (nbdkit finds its plugin there), and its installed units."""
    units = [prefix / "lib/systemd/system" / f"flatfs-serve@.{k}" for k in ("service", "socket")]
    assert f"ExecStart={prefix}/bin/flatfs serve" in units[0].read_text()
    assert units[1].read_bytes() == (ROOT / "systemd/flatfs-serve@.socket").read_bytes()
    assert (prefix / "share/man/man1/flatfs-serve.1").exists()
    why = have_nbd_tools()
    require(why is None, why or "")
    assert serve_runs(prefix / "bin/flatfs", tmp_path) == "65536"

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


# What a build writes into its source tree (setuptools' build/ and egg-info), and what is not source
_NOT_SOURCE = shutil.ignore_patterns(
    ".git", ".venv", "build", "*.egg-info", "__pycache__", ".*_cache", ".hypothesis", "dist"
)


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the source tree to build from: a build writes into its tree, never into ours."""
    src = tmp_path_factory.mktemp("src") / "flatfs"
    shutil.copytree(ROOT, src, ignore=_NOT_SOURCE, symlinks=True)
    return src


@pytest.fixture
def make(source: Path):
    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["make", "-C", str(source), *args], capture_output=True, text=True, timeout=600)

    return run


def _left(prefix: Path) -> list[str]:
    return sorted(str(p.relative_to(prefix)) for p in prefix.rglob("*") if not p.is_dir())


def test_install_then_uninstall_leaves_nothing(tmp_path: Path, make) -> None:
    require(shutil.which("make") is not None, "make is not installed")
    spaced = make("install", f"PREFIX={tmp_path / 'a b'}")
    assert spaced.returncode != 0 and "white space" in spaced.stderr and not (tmp_path / "a b").exists()
    prefix = tmp_path / "prefix"
    res = make("install", f"PREFIX={prefix}")
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

    res = make("uninstall", f"PREFIX={prefix}")
    assert res.returncode == 0, res.stdout + res.stderr
    assert _left(prefix) == []


def test_uninstall_keeps_what_it_did_not_install(tmp_path: Path, make) -> None:
    prefix = tmp_path / "usr"
    (prefix / "bin").mkdir(parents=True)
    (prefix / "bin" / "other").write_text("keep me")
    res = make("uninstall", f"PREFIX={prefix}")
    assert res.returncode == 0, res.stderr
    assert _left(prefix) == ["bin/other"]


def test_wheel_installs_and_runs_in_a_fresh_venv(tmp_path: Path, source: Path) -> None:
    wheels = tmp_path / "wheels"
    res = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(wheels), str(source)],
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


def test_staged_install_runs_once_moved_into_prefix(qemu, tmp_path: Path, make) -> None:
    """DESTDIR staging, as a package build does: nothing in the tree names the staging folder."""
    require(shutil.which("make") is not None, "make is not installed")
    stage, prefix = tmp_path / "stage", tmp_path / "final" / "opt"
    res = make("install", f"DESTDIR={stage}", f"PREFIX={prefix}")
    assert res.returncode == 0, res.stdout + res.stderr
    staged = Path(str(stage) + str(prefix))
    named = subprocess.run(["grep", "-rlF", str(stage), str(staged)], capture_output=True, text=True)
    assert named.stdout == "", named.stdout  # no script, config or compiled file names the stage
    cfg = (staged / "lib/flatfs/pyvenv.cfg").read_text()
    assert "home = /usr/bin\n" in cfg, cfg  # the system interpreter, not the first python3 on PATH
    shutil.move(staged, prefix)
    shutil.rmtree(stage)
    ver = subprocess.run([str(prefix / "bin/flatfs"), "--version"], capture_output=True, text=True, cwd="/")
    assert ver.returncode == 0 and ver.stdout.split()[-1] == flatfs.__version__, ver
    img = qemu.create(tmp_path / "img.qcow2", "1M")
    info = subprocess.run([str(prefix / "bin/flatfs"), "info", str(img)], capture_output=True, text=True)
    assert info.returncode == 0 and "format:        qcow2" in info.stdout, info
    res = make("uninstall", f"PREFIX={prefix}")
    assert res.returncode == 0 and _left(prefix) == [], res.stdout + res.stderr


def test_uninstall_removes_the_folders_install_made_and_nothing_else(tmp_path: Path, make) -> None:
    require(shutil.which("make") is not None, "make is not installed")
    made = tmp_path / "new" / "prefix"  # install creates both folders: uninstall removes both
    assert make("install", f"PREFIX={made}").returncode == 0
    assert make("uninstall", f"PREFIX={made}").returncode == 0
    assert not (tmp_path / "new").exists()
    kept = tmp_path / "usr"  # existing, with an unrelated file in a folder install also writes to
    (kept / "share" / "man" / "man1").mkdir(parents=True)
    (kept / "share" / "man" / "man1" / "other.1").write_text("keep me")
    (kept / "lib").mkdir()
    assert make("install", f"PREFIX={kept}").returncode == 0
    assert make("uninstall", f"PREFIX={kept}").returncode == 0
    left = sorted(str(p.relative_to(kept)) for p in kept.rglob("*"))
    assert left == ["lib", "share", "share/man", "share/man/man1", "share/man/man1/other.1"], left

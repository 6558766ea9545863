"""QEMU's image locking, both ways, against real QEMU processes."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from flatfs import open_chain

from ..helpers.cli import flatfs, one_line_error
from ..helpers.needs import require

pytestmark = pytest.mark.qemu


def _locked(path: Path, byte: int) -> bool:
    ino = os.stat(path).st_ino
    for line in Path("/proc/locks").read_text().splitlines():
        parts = line.split()
        if "OFDLCK" in parts and parts[-3].endswith(f":{ino}") and int(parts[-2]) <= byte <= int(parts[-1]):
            return True
    return False


def _start(cmd: list[str], img: Path) -> subprocess.Popen:
    p = subprocess.Popen(
        cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=img.parent
    )
    deadline = time.monotonic() + 30
    while not _locked(img, 101):
        assert p.poll() is None, f"{cmd[0]} exited early"
        assert time.monotonic() < deadline, f"{cmd[0]} never took the write lock"
        time.sleep(0.05)
    return p


@pytest.fixture
def img(qemu, tmp_path) -> Path:
    path = qemu.create(tmp_path / "vm.qcow2", "4M")
    qemu.io(path, "write -P 1 0 64k")
    return path


def _stop(p: subprocess.Popen) -> None:
    p.terminate()
    try:
        p.wait(10)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait()


@pytest.mark.parametrize("cmd", ["info", "map"])
def test_image_open_for_writing_by_qemu_io_is_refused(img, cmd):
    p = _start(["qemu-io", "-c", "sleep 600000", str(img)], img)
    try:
        one_line_error([cmd, img], "vm.qcow2", "in use by another process", "-U/--force-share")
        assert flatfs(cmd, "-U", img).returncode == 0
        assert flatfs(cmd, "--force-share", img).returncode == 0
    finally:
        _stop(p)
    assert flatfs(cmd, img).returncode == 0


def test_image_open_by_qemu_storage_daemon_is_refused(img):
    require(shutil.which("qemu-storage-daemon") is not None, "qemu-storage-daemon is not installed")
    p = _start(
        [
            "qemu-storage-daemon",
            "--blockdev",
            f"driver=file,node-name=f0,filename={img}",
            "--blockdev",
            "driver=qcow2,node-name=d0,file=f0",
        ],
        img,
    )
    try:
        one_line_error(["map", img], "in use by another process")
    finally:
        _stop(p)


def test_backing_file_in_use_is_refused_too(qemu, img, tmp_path):
    top = qemu.create(tmp_path / "top.qcow2", "4M", backing=img.name)
    p = _start(["qemu-io", "-c", "sleep 600000", str(img)], img)
    try:
        one_line_error(["map", top], "vm.qcow2", "in use")
    finally:
        _stop(p)


def test_qemu_cannot_write_an_image_flatfs_holds(img):
    with open_chain(img):
        r = subprocess.run(["qemu-io", "-c", "write 0 512", str(img)], capture_output=True, text=True)
        assert r.returncode != 0 and 'Failed to get "write" lock' in (r.stdout + r.stderr)
        # readers are fine
        r = subprocess.run(["qemu-img", "info", str(img)], capture_output=True, text=True)
        assert r.returncode == 0
    r = subprocess.run(["qemu-io", "-c", "write 0 512", str(img)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr

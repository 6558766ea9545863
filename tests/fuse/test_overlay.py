"""`flatfs mount --overlay FILE`: the view's writes kept as a new qcow2 over IMAGE, judged by QEMU:
`qemu-img check` clean after every fsync and after unmount, `qemu-img compare` identical to what
the view showed; kill -9 loses at most what came after the last fsync, never the image."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
from pathlib import Path

import pytest

from ..helpers.cli import error_line, flatfs
from ..helpers.images import M
from ..helpers.mounts import daemon_pid, unmount, wait_gone
from ..helpers.needs import have_qemu, require
from ..helpers.qemu import Qemu

pytestmark = pytest.mark.fuse
PUNCH = 0x03  # FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE


@pytest.fixture
def chain(tmp_path: Path) -> Path:
    require(have_qemu(), "qemu-img/qemu-io are not installed")
    q = Qemu()
    base = q.create(tmp_path / "base.qcow2", "6M")
    q.io(base, "write -P 0x11 0 2M", "write -P 0x12 5M 100k")
    top = q.create(tmp_path / "vm.qcow2", None, backing=base)
    q.io(top, "write -P 0x21 1M 1M")
    return top


def _check(q: Qemu, overlay: Path) -> None:
    res = q.img("check", "-U", overlay, check=False)
    assert res.returncode == 0, res.stdout + res.stderr


def _same(q: Qemu, view: Path | bytes, overlay: Path, tmp: Path) -> None:
    if isinstance(view, bytes):
        raw = tmp / "view.raw"
        raw.write_bytes(view)
        view = raw
    res = q.img("compare", "-U", "-f", "raw", "-F", "qcow2", view, overlay, check=False)
    assert res.returncode == 0, res.stdout + res.stderr


def test_overlay_is_valid_after_each_fsync_and_unmount(mounter, chain: Path, tmp_path: Path) -> None:
    q = Qemu()
    before = {p.name: p.read_bytes() for p in chain.parent.glob("*.qcow2")}
    overlay = tmp_path / "keep.qcow2"
    view = mounter.mount(chain, None, "--overlay", str(overlay))
    _check(q, overlay)  # the empty overlay, before any write
    rnd = random.Random(7)
    fd = os.open(view, os.O_RDWR)
    try:
        for round_ in range(3):
            for _ in range(20):
                off = rnd.randrange(0, 6 * M - 70000)
                n = rnd.choice([512, 4096, 5000, 65536, 70000])
                os.pwrite(fd, bytes([rnd.randrange(1, 256)]) * n, off)
            os.pwrite(fd, bytes(65536 * 2), 64 * 1024 * (round_ + 1))  # zeros: whole clusters
            os.pwrite(fd, bytes(3000), 3 * M + 100)  # zeros: part of a cluster
            os.fsync(fd)
            _check(q, overlay)
            _same(q, view, overlay, tmp_path)
    finally:
        os.close(fd)
    shown = view.read_bytes()
    unmount(view.parent)
    _check(q, overlay)
    _same(q, shown, overlay, tmp_path)
    info = json.loads(q.img("info", "--output=json", overlay).stdout)
    assert info["backing-filename"] == str(chain) and info["backing-filename-format"] == "qcow2"
    assert {p.name: p.read_bytes() for p in chain.parent.glob("*.qcow2") if p != overlay} == before
    flatfs("convert", "-O", "raw", overlay, tmp_path / "kept.raw")  # flatfs reads it back too
    assert (tmp_path / "kept.raw").read_bytes() == shown


def test_kill_9_keeps_the_last_fsync(mounter, chain: Path, tmp_path: Path) -> None:
    q = Qemu()
    overlay = tmp_path / "keep.qcow2"
    view = mounter.mount(chain, None, "--overlay", str(overlay))
    fd = os.open(view, os.O_RDWR)
    try:
        os.pwrite(fd, b"\x5a" * 200000, 300000)
        os.fsync(fd)
        synced = os.pread(fd, 6 * M, 0)
        os.pwrite(fd, b"\x6b" * 100000, 4 * M)  # new clusters after the fsync: lost, not harmful
    finally:
        os.close(fd)
    pid = daemon_pid(view.parent)
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    assert wait_gone(pid)
    flatfs("umount", view.parent)
    _check(q, overlay)
    _same(q, synced, overlay, tmp_path)


def test_overlay_refusals(chain: Path, tmp_path: Path) -> None:
    require(os.path.exists("/dev/fuse"), "/dev/fuse is missing")
    mp = tmp_path / "mp"
    mp.mkdir()
    there = tmp_path / "there.qcow2"
    there.write_bytes(b"keep me")
    assert "already exists" in error_line("mount", "--overlay", there, chain, mp)
    assert there.read_bytes() == b"keep me"
    assert "-l" in error_line("mount", "--overlay", tmp_path / "new.qcow2", "-l", "1", chain, mp)
    assert not (tmp_path / "new.qcow2").exists()


def test_failed_mount_leaves_no_overlay(chain: Path, tmp_path: Path) -> None:
    require(os.path.exists("/dev/fuse"), "/dev/fuse is missing")
    mp = tmp_path / "mp"
    mp.mkdir()
    new = tmp_path / "new.qcow2"
    assert "unknown option" in error_line("mount", "--overlay", new, "-o", "no_such_option", chain, mp)
    assert not new.exists()


def test_enospc_in_the_overlay_folder(mounter, chain: Path, tmp_path: Path) -> None:
    """The overlay's file system fills up: the write fails with ENOSPC, and the overlay still
    reads exactly as the view (which shows what was acknowledged) and checks clean."""
    require(os.geteuid() == 0, "mounting a tmpfs needs root")
    q = Qemu()
    small = tmp_path / "small"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(small)], check=True)
    try:
        overlay = small / "keep.qcow2"
        view = mounter.mount(chain, None, "--overlay", str(overlay), "--scratch-dir", str(tmp_path))
        fd = os.open(view, os.O_RDWR)
        try:
            os.pwrite(fd, b"\x31" * 65536, 2 * M)
            before = os.pread(fd, 2 * M, 3 * M)
            with pytest.raises(OSError) as ei:
                os.pwrite(fd, b"\x32" * (2 * M), 3 * M)
            assert ei.value.errno == 28  # ENOSPC
            assert os.pread(fd, 2 * M, 3 * M) == before  # nothing of the failed write
            os.fsync(fd)
        finally:
            os.close(fd)
        _check(q, overlay)
        _same(q, view, overlay, tmp_path)
        pid = daemon_pid(view.parent)
        unmount(view.parent)
        assert pid is None or wait_gone(pid)
        _check(q, overlay)
    finally:
        if subprocess.run(["umount", str(small)], capture_output=True).returncode:
            subprocess.run(["umount", "-l", str(small)], check=True)

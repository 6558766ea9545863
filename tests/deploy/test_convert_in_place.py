"""convert -n onto block devices (loop devices): an LV reused with an old qcow2 gets a valid new
image; too small, busy (opened O_EXCL, or mounted) and device-without-n are refused; an interrupted
run leaves nothing that looks like an image; BLKZEROOUT and the written-zeros fallback both zero.
Every loop device attached here is detached."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from ..helpers.cli import background_convert
from ..helpers.needs import require
from ..helpers.qemu import Qemu

M = 1 << 20
K = 1024


def _flatfs(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "flatfs", *args], capture_output=True, text=True, env=env)


def _device_with_old_qcow2(qemu: Qemu, tmp_path: Path, size: int, fill: int = 0x5A) -> Path:
    """A backing file as a reused LV: old bytes everywhere, an old valid qcow2 at the start."""
    old = qemu.create(tmp_path / "old.qcow2", "16M")
    qemu.io(old, "write -P 0x77 0 8M")
    back = tmp_path / "lv.img"
    with open(back, "wb") as f:
        f.write(bytes([fill]) * size)
        f.seek(0)
        f.write(old.read_bytes())
    return back


def _source(qemu: Qemu, tmp_path: Path) -> Path:
    src = qemu.create(tmp_path / "src.qcow2", "32M")
    qemu.io(src, "write -P 0x11 0 2M", "write -z 4M 1M", "write -P 0x22 10M 64k", "write -P 0x33 31M 1M")
    return src


def _read(dev: str, n: int, offset: int = 0) -> bytes:
    with open(dev, "rb") as f:
        f.seek(offset)
        return f.read(n)


@pytest.mark.qemu
@pytest.mark.parametrize("fmt", ["qcow2", "raw"])
def test_a_device_with_an_old_qcow2_gets_a_valid_new_image(
    qemu: Qemu, tmp_path: Path, loop_rw: Callable[[Path], str], fmt: str
) -> None:
    src = _source(qemu, tmp_path)
    dev = loop_rw(_device_with_old_qcow2(qemu, tmp_path, 48 * M))
    res = _flatfs("convert", "-n", "-O", fmt, str(src), dev)
    assert res.returncode == 0 and res.stderr == "", res.stderr  # loop devices zero cheaply: no warning
    if fmt == "qcow2":
        chk = qemu.img("check", "-f", "qcow2", dev, check=False)
        assert chk.returncode == 0 and "No errors" in chk.stdout, chk.stdout + chk.stderr
        cmp = qemu.img("compare", "-f", "qcow2", "-F", "qcow2", dev, src, check=False)
    else:
        cmp = qemu.img(
            "compare",
            "--image-opts",
            f"driver=raw,size={32 * M},file.filename={dev}",
            f"driver=qcow2,file.filename={src}",
            check=False,
        )
    assert cmp.returncode == 0 and "identical" in cmp.stdout, cmp.stdout + cmp.stderr
    assert _read(dev, M, 47 * M) == bytes(M)  # the old tail is erased too


@pytest.mark.qemu
def test_zeroing_by_writing_zeros_where_the_device_cannot(
    qemu: Qemu, tmp_path: Path, loop_rw: Callable[[Path], str]
) -> None:
    src = _source(qemu, tmp_path)
    dev = loop_rw(_device_with_old_qcow2(qemu, tmp_path, 40 * M))
    env = dict(os.environ, FLATFS_CONVERT_TEST_NO_CHEAP_ZERO="1")
    res = _flatfs("convert", "-n", "-O", "raw", str(src), dev, env=env)
    assert res.returncode == 0, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "the cost now grows with the target's size" in lines[0]
    ref = qemu.to_raw(src, tmp_path / "ref.raw").read_bytes()
    assert _read(dev, 32 * M) == ref


@pytest.mark.qemu
def test_target_is_zero_leaves_the_holes_alone(
    qemu: Qemu, tmp_path: Path, loop_rw: Callable[[Path], str]
) -> None:
    src = _source(qemu, tmp_path)
    dev = loop_rw(_device_with_old_qcow2(qemu, tmp_path, 40 * M))
    res = _flatfs("convert", "-n", "--target-is-zero", "-O", "raw", str(src), dev)
    assert res.returncode == 0, res.stderr
    assert _read(dev, 4096, 20 * M) == bytes([0x5A]) * 4096  # a hole of the source: untouched
    assert _read(dev, 4096, 10 * M) == bytes([0x22]) * 4096


@pytest.mark.qemu
def test_a_device_too_small_is_refused_naming_the_size(
    qemu: Qemu, tmp_path: Path, loop_rw: Callable[[Path], str]
) -> None:
    src = _source(qemu, tmp_path)
    dev = loop_rw(_device_with_old_qcow2(qemu, tmp_path, 16 * M))
    before = _read(dev, 16 * M)
    res = _flatfs("convert", "-n", "-O", "raw", str(src), dev)
    assert res.returncode == 1 and len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert f"needs {32 * M} bytes" in res.stderr and "too small" in res.stderr
    assert _read(dev, 16 * M) == before


@pytest.mark.qemu
def test_without_n_a_device_is_refused_naming_n(
    qemu: Qemu, tmp_path: Path, loop_rw: Callable[[Path], str]
) -> None:
    src = _source(qemu, tmp_path)
    dev = loop_rw(_device_with_old_qcow2(qemu, tmp_path, 40 * M))
    for args in ([], ["--force"]):
        res = _flatfs("convert", *args, str(src), dev)
        assert res.returncode == 1 and "-n" in res.stderr and len(res.stderr.strip().splitlines()) == 1


@pytest.mark.qemu
@pytest.mark.parametrize("how", ["opened O_EXCL", "mounted"])
def test_a_busy_device_is_refused(
    qemu: Qemu, tmp_path: Path, loop_rw: Callable[[Path], str], how: str
) -> None:
    src = _source(qemu, tmp_path)
    dev = loop_rw(_device_with_old_qcow2(qemu, tmp_path, 40 * M))
    mnt = tmp_path / "mnt"
    holder = None
    if how == "mounted":
        require(shutil.which("mkfs.ext2") is not None, "mkfs.ext2 is missing")
        subprocess.run(["mkfs.ext2", "-q", "-F", dev], check=True, capture_output=True)
        mnt.mkdir()
        subprocess.run(["mount", dev, str(mnt)], check=True, capture_output=True)
    else:
        code = (
            "import os, sys\n"
            "fd = os.open(sys.argv[1], os.O_RDONLY | os.O_EXCL)\n"
            "print('held', flush=True)\n"
            "sys.stdin.read()\n"
        )
        holder = subprocess.Popen(
            [sys.executable, "-c", code, dev], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
    try:
        before = _read(dev, M)
        res = _flatfs("convert", "-n", str(src), dev)
        assert res.returncode == 1 and "in use" in res.stderr and len(res.stderr.strip().splitlines()) == 1
        assert _read(dev, M) == before
    finally:
        if holder is not None:
            holder.communicate("")
        if how == "mounted":
            subprocess.run(["umount", str(mnt)], capture_output=True)


@pytest.mark.qemu
@pytest.mark.parametrize("fmt", ["qcow2", "raw"])
def test_an_interrupted_run_leaves_nothing_that_looks_like_an_image(
    qemu: Qemu, tmp_path: Path, loop_rw: Callable[[Path], str], fmt: str
) -> None:
    src = qemu.create(tmp_path / "src.qcow2", "64M")
    qemu.io(src, *(f"write -P {i + 1} {i * 2}M 64k" for i in range(32)))
    dev = loop_rw(_device_with_old_qcow2(qemu, tmp_path, 72 * M))
    assert '"format": "qcow2"' in qemu.img("info", "--output=json", dev).stdout
    proc = background_convert("-n", "-O", fmt, src, dev, delay=0.1)
    deadline = time.monotonic() + 60
    while _read(dev, 4) != bytes(4):  # the old header is erased first
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.01)
    time.sleep(0.3)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "no valid image" in err and len(err.strip().splitlines()) == 1
    # the image's first MiB (a qcow2 header and its first clusters, a raw guest's) is written last
    assert _read(dev, M) == bytes(M), "the start of the device is not all zeros"
    assert _read(dev, M, 71 * M) == bytes(M), "the end of the device is not all zeros"
    assert '"format": "raw"' in qemu.img("info", "--output=json", dev).stdout
    res = _flatfs("info", dev)
    assert "qcow2" not in res.stdout

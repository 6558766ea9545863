"""Images on block devices (LVM volumes in oVirt and Proxmox keep qcow2 inside LVs), on loop devices:
the top image, a backing file (with --allow-special) and an external data file, through info, map,
convert and a mounted view. Every loop device attached here is detached."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from ..helpers.needs import have_fuse, require
from ..helpers.qemu import Qemu


def _flatfs(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "flatfs", *args], capture_output=True, text=True)


def _map(*args: str) -> list[dict[str, object]]:
    res = _flatfs("map", "--output=json", *args)
    assert res.returncode == 0, res.stderr
    return list(json.loads(res.stdout))


def _raw(q: Qemu, img: Path, out: Path) -> bytes:
    return q.to_raw(img, out).read_bytes()


def test_qcow2_on_a_device_reads_like_the_file(
    qemu: Qemu, tmp_path: Path, loop: Callable[[Path], str]
) -> None:
    img = qemu.create(tmp_path / "vm.qcow2", "64M")
    qemu.io(img, "write -P 0x51 1M 2M", "write -z 8M 1M", "write -P 0x52 63M 64k")
    dev = loop(img)
    res = _flatfs("info", "--output=json", dev)
    assert res.returncode == 0, res.stderr
    (row,) = json.loads(res.stdout)
    assert row["format"] == "qcow2" and row["virtual-size"] == 64 << 20
    assert _map(dev) == _map("-U", str(img))
    out = tmp_path / "out.raw"
    res = _flatfs("convert", "-O", "raw", dev, str(out))
    assert res.returncode == 0, res.stderr
    assert out.read_bytes() == _raw(qemu, img, tmp_path / "ref.raw")


def test_a_backing_file_on_a_device_needs_allow_special(
    qemu: Qemu, tmp_path: Path, loop: Callable[[Path], str]
) -> None:
    base = qemu.create(tmp_path / "base.qcow2", "32M")
    qemu.io(base, "write -P 0x61 0 4M")
    dev = loop(base)
    top = tmp_path / "top.qcow2"
    qemu.img("create", "-q", "-f", "qcow2", "-u", "-b", dev, "-F", "qcow2", top, "32M")
    qemu.io(top, "write -P 0x62 1M 1M")
    res = _flatfs("map", str(top))
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 1 and len(lines) == 1 and "--allow-special" in lines[0], res.stderr
    out = tmp_path / "out.raw"
    res = _flatfs("convert", "--allow-special", "-O", "raw", str(top), str(out))
    assert res.returncode == 0, res.stderr
    assert out.read_bytes() == _raw(qemu, top, tmp_path / "ref.raw")


def test_an_external_data_file_on_a_device(qemu: Qemu, tmp_path: Path, loop: Callable[[Path], str]) -> None:
    img = qemu.create(tmp_path / "d.qcow2", "16M", opts="data_file=d.data,data_file_raw=on")
    qemu.io(img, "write -P 0x71 2M 1M")
    dev = loop(tmp_path / "d.data")
    qemu.img("amend", "-o", f"data_file={dev}", img, cwd=tmp_path)
    assert _flatfs("map", str(img)).returncode == 1
    # QEMU's map of a raw data file on a device: every byte is data, as a device has no holes
    assert _map("--allow-special", str(img)) == [
        {"start": 0, "length": 16 << 20, "depth": 0, "present": True, "zero": False, "data": True}
    ]
    out = tmp_path / "out.raw"
    res = _flatfs("convert", "--allow-special", "-O", "raw", str(img), str(out))
    assert res.returncode == 0, res.stderr
    assert out.read_bytes() == _raw(qemu, img, tmp_path / "ref.raw")


@pytest.mark.fuse
def test_a_view_of_a_chain_on_a_device_tells_the_truth(
    qemu: Qemu, tmp_path: Path, loop: Callable[[Path], str]
) -> None:
    require(have_fuse(), "/dev/fuse or fusermount3 is missing")
    img = qemu.create(tmp_path / "vm.qcow2", "64M")
    qemu.io(img, "write -P 0x51 1M 2M", "write -P 0x52 40M 64k")
    dev = loop(img)
    mp = tmp_path / "mnt"
    mp.mkdir()
    res = _flatfs("mount", dev, str(mp))
    assert res.returncode == 0, res.stderr
    try:
        view = mp / (Path(dev).name + ".raw")  # /dev/loop3 -> loop3.raw
        assert view.read_bytes() == _raw(qemu, img, tmp_path / "ref.raw")
        assert os.stat(view).st_blocks * 512 == (2 << 20) + (64 << 10)
        fd = os.open(view, os.O_RDONLY)
        try:
            runs = []
            pos = 0
            while True:
                try:
                    d = os.lseek(fd, pos, os.SEEK_DATA)
                except OSError:
                    break
                h = os.lseek(fd, d, os.SEEK_HOLE)
                runs.append((d, h))
                pos = h
        finally:
            os.close(fd)
        assert runs == [(1 << 20, 3 << 20), (40 << 20, (40 << 20) + (64 << 10))]
    finally:
        subprocess.run([sys.executable, "-m", "flatfs", "umount", str(mp)], capture_output=True)
        subprocess.run(["fusermount3", "-u", "-z", str(mp)], capture_output=True)


@pytest.mark.parametrize(
    "fmt,opts",
    [
        ("vmdk", "subformat=monolithicSparse"),
        ("vdi", None),
        ("vpc", "subformat=dynamic"),
        ("vpc", "subformat=fixed"),
    ],
)
def test_every_format_on_a_device_reads_like_the_file(
    qemu: Qemu, tmp_path: Path, loop: Callable[[Path], str], fmt: str, opts: str | None
) -> None:
    img = qemu.create(tmp_path / f"disk.{fmt}", "16M", fmt=fmt, opts=opts)
    qemu.io(img, "write -P 0x33 1M 1M", "write -P 0x34 9M 64k", fmt=fmt)
    dev = loop(img)
    out = tmp_path / "out.raw"
    res = _flatfs("convert", "-f", fmt, "-O", "raw", dev, str(out))
    assert res.returncode == 0, res.stderr
    ref = qemu.img("convert", "-f", fmt, "-O", "raw", img, tmp_path / "ref.raw")
    assert ref.returncode == 0
    assert out.read_bytes() == (tmp_path / "ref.raw").read_bytes()
    if opts == "subformat=fixed":
        # a fixed disk is a range of its host file, and a device has no holes: all of it is data
        (only,) = _map("-f", fmt, dev)
        assert only["data"] and not only["zero"] and only["length"] == out.stat().st_size
    else:
        assert _map("-f", fmt, dev) == _map("-U", "-f", fmt, str(img))

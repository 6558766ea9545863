"""`flatfs mount -P`: each partition of an MBR or GPT disk as NAME-pN.raw, judged by Linux's own
view of the same disk (``losetup -r -P`` on the view: /sys/block sizes, the partition devices'
bytes), with truthful holes, and a loop-mounted file system inside a partition."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from ..helpers.cli import error_line
from ..helpers.images import M
from ..helpers.loopfs import loop_devices
from ..helpers.mounts import seek_walk
from ..helpers.needs import have_qemu, require
from ..helpers.parttables import SECTOR, linux_partitions, mbr, mbr_entry, write_at
from ..helpers.qemu import Qemu

pytestmark = pytest.mark.fuse
DISK = 64 * M


def _sprinkle(path: Path, at: int, seed: int) -> None:
    """A few scattered data runs from ``at``: holes between them, so SEEK walks mean something."""
    with open(path, "r+b") as f:
        for i in range(4):
            f.seek(at + i * 1536 * 1024 + 4096 * seed)
            f.write(bytes([seed + i + 1]) * (8192 + 512 * i))


def _ext4(folder: Path, size: int) -> Path:
    src = folder / "src"
    src.mkdir()
    (src / "hello.txt").write_text("hello from a partition\n")
    fs = folder / "fs.img"
    subprocess.run(["mkfs.ext4", "-q", "-F", "-d", str(src), str(fs), str(size // 1024)], check=True)
    return fs


def _chain(q: Qemu, raw: Path, folder: Path) -> Path:
    """raw -> base.qcow2 -> top.qcow2 (an overlay whose writes cross a partition boundary)."""
    base = folder / "base.qcow2"
    q.img("convert", "-O", "qcow2", raw, base)
    top = q.create(folder / "vm.qcow2", None, backing=base)
    q.io(top, f"write -P 0x7e {30 * M - 4096} 8k")
    return top


@pytest.fixture(scope="module")
def disks(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    require(have_qemu(), "qemu-img/qemu-io are not installed")
    require(all(shutil.which(t) for t in ("parted", "sgdisk", "mkfs.ext4")), "parted, sgdisk, e2fsprogs")
    q = Qemu()
    out = {}
    d = tmp_path_factory.mktemp("msdos")
    raw = d / "disk.img"
    raw.write_bytes(b"")
    os.truncate(raw, DISK)
    subprocess.run(
        ["parted", "-s", raw, "mklabel", "msdos", "mkpart", "primary", "1MiB", "10MiB"]
        + ["mkpart", "extended", "10MiB", "60MiB", "mkpart", "logical", "11MiB", "20MiB"]
        + ["mkpart", "logical", "21MiB", "30MiB"],
        check=True,
    )
    fs = _ext4(d, 9 * M)
    write_at(raw, {11 * M: fs.read_bytes()}, DISK)
    _sprinkle(raw, 1 * M, 1)
    _sprinkle(raw, 21 * M, 2)
    out["msdos"] = _chain(q, raw, d)
    d = tmp_path_factory.mktemp("gpt")
    raw = d / "disk.img"
    raw.write_bytes(b"")
    os.truncate(raw, DISK)
    subprocess.run(
        ["sgdisk", "-o", "-n", "1:2048:+8M", "-n", "2:0:+20M", "-n", "3:0:0", str(raw)],
        check=True,
        capture_output=True,
    )
    _sprinkle(raw, 9 * M, 3)
    _sprinkle(raw, 40 * M, 4)
    out["gpt"] = _chain(q, raw, d)
    return out


@pytest.fixture
def loops() -> Iterator:
    yield from loop_devices(readonly=True, partscan=True)


@pytest.mark.parametrize("label", ["msdos", "gpt"])
def test_partitions_as_linux_sees_them(disks, mounter, loops, label: str) -> None:
    view = mounter.mount(disks[label], None, "-P")
    names = sorted(os.listdir(view.parent))
    dev = loops(view)
    linux = linux_partitions(dev)
    assert linux, "the kernel found no partitions"
    assert names == sorted(["vm.raw", *(f"vm-p{n}.raw" for n in linux)])
    disk_runs = seek_walk(view)
    whole = view.read_bytes()
    for n, (start, length) in linux.items():
        part = view.parent / f"vm-p{n}.raw"
        st = part.stat()
        assert st.st_size == length, n
        with open(f"{dev}p{n}", "rb") as f:
            assert part.read_bytes() == f.read() == whole[start : start + length], n
        # truthful holes: the disk's data runs, clipped to the partition
        want = [
            (max(s, start) - start, min(s + ln, start + length) - max(s, start))
            for s, ln in disk_runs
            if s < start + length and s + ln > start
        ]
        assert seek_walk(part) == want, n
        assert st.st_blocks == (sum(ln for _, ln in want) + 511) // 512, n
    if label == "gpt":
        assert set(linux) == {1, 2, 3}
    else:
        assert set(linux) == {1, 2, 5, 6} and linux[2][1] == 2 * SECTOR


def test_loop_mount_a_partition_file(disks, mounter, tmp_path: Path) -> None:
    """``mount -o loop MNT/vm-p5.raw`` (root): no losetup -P needed."""
    require(os.geteuid() == 0, "mount -o loop needs root")
    view = mounter.mount(disks["msdos"], None, "-P")
    target = tmp_path / "fs"
    target.mkdir()
    subprocess.run(["mount", "-o", "loop,ro", str(view.parent / "vm-p5.raw"), str(target)], check=True)
    try:
        assert (target / "hello.txt").read_text() == "hello from a partition\n"
    finally:
        subprocess.run(["umount", str(target)], check=True)


def test_hostile_table_warns_and_keeps_the_disk(mounter, tmp_path: Path) -> None:
    raw = write_at(
        tmp_path / "bad.img", {0: mbr(mbr_entry(0x83, 2048, 8192), mbr_entry(0x83, 4096, 8192))}, 16 * M
    )
    mp = mounter.mountpoint()
    res = mounter.run(raw, mp, "-P")
    assert res.returncode == 0, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("flatfs: warning: ") and "overlap" in lines[0], res.stderr
    assert "no partition files" in lines[0]
    assert os.listdir(mp) == ["bad.raw"]


def test_partitions_need_a_folder(tmp_path: Path) -> None:
    require(os.path.exists("/dev/fuse"), "/dev/fuse is missing")
    img = write_at(tmp_path / "d.img", {}, M)
    over = tmp_path / "over"
    over.write_bytes(b"")
    line = error_line("mount", "-P", img, over)
    assert "-P needs a directory mountpoint" in line


def test_edited_table_through_a_writable_view(mounter, tmp_path: Path) -> None:
    """Decided: the partition files keep the layout the table had at mount (the disk file shows the
    edit at once); with --overlay the edit is kept, and a new mount of the overlay has the new
    partition files."""
    raw = write_at(tmp_path / "d.img", {0: mbr(mbr_entry(0x83, 2048, 4096))}, 16 * M)
    kept = tmp_path / "kept" / "d2.qcow2"
    kept.parent.mkdir()
    view = mounter.mount(raw, None, "-P", "--overlay", str(kept))
    assert sorted(os.listdir(view.parent)) == ["d-p1.raw", "d.raw"]
    new_table = mbr(mbr_entry(0x83, 2048, 2048), mbr_entry(0x83, 8192, 8192))
    fd = os.open(view, os.O_RDWR)
    try:
        os.pwrite(fd, new_table, 0)
        os.fsync(fd)
    finally:
        os.close(fd)
    assert sorted(os.listdir(view.parent)) == ["d-p1.raw", "d.raw"]
    assert (view.parent / "d-p1.raw").stat().st_size == 4096 * SECTOR  # as at mount
    assert view.read_bytes()[:SECTOR] == new_table
    again = mounter.mount(kept, None, "-P")
    names = sorted(os.listdir(again.parent))
    assert names == ["d2-p1.raw", "d2-p2.raw", "d2.raw"]
    assert (again.parent / "d2-p2.raw").stat().st_size == 8192 * SECTOR

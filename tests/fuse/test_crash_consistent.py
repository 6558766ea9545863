"""A disk a running VM left behind, made for real: ext4 and XFS in a partitioned qcow2 chain are
mounted read-write through qemu-storage-daemon's writable FUSE export, files are written and
synced, and the chain is copied while both are still mounted (their journals need replaying);
QEMU also writes the copy as VHDX and VMDK.
Then ``flatfs mount --writable -P`` and ``mount -o loop`` of each partition file replay the
journals: the synced files are there, ``fsck -n`` is clean, the chain's files are unchanged."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from ..helpers.loopfs import LoopDevices, loops_missing
from ..helpers.mounts import mount_table
from ..helpers.needs import have_qemu, require
from ..helpers.parttables import linux_partitions
from ..helpers.qemu import Qemu

pytestmark = pytest.mark.fuse
M = 1 << 20
XFS_SMALL = {"TEST_DIR": "1", "TEST_DEV": "1", "QA_CHECK_FS": "1"}  # mkfs.xfs below 300 MB (fstests)
FILES = {"ext4": {"a.txt": b"synced before the copy\n", "big.bin": os.urandom(3 * M)}, "xfs": {}}
FILES["xfs"] = {"b.txt": b"xfs, synced\n", "big.bin": os.urandom(2 * M + 12345)}


def _wait(cond, what: str, seconds: float = 30.0) -> None:
    deadline = time.monotonic() + seconds
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def _mounted(path: Path) -> bool:
    return os.path.realpath(path) in mount_table()


def _umount(path: Path) -> None:
    if _mounted(path) and subprocess.run(["umount", str(path)], capture_output=True).returncode:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def fingerprint(folder: Path) -> dict[str, tuple[bytes, int]]:
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.fixture(scope="module")
def left_behind(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The copy (base.qcow2 + vm.qcow2) of a chain whose two file systems were mounted."""
    require(have_qemu(), "qemu-img/qemu-io are not installed")
    why = loops_missing()
    require(why is None, why or "")
    tools = ("qemu-storage-daemon", "parted", "mkfs.ext4", "mkfs.xfs", "fsck.ext4", "xfs_repair")
    require(all(shutil.which(t) for t in tools), f"one of {tools} is missing")
    q = Qemu()
    d = tmp_path_factory.mktemp("live")
    raw = d / "disk.raw"
    with open(raw, "wb") as f:
        f.truncate(128 * M)
    subprocess.run(
        ["parted", "-s", raw, "mklabel", "msdos", "mkpart", "primary", "1MiB", "48MiB"]
        + ["mkpart", "primary", "48MiB", "127MiB"],
        check=True,
    )
    q.img("convert", "-O", "qcow2", raw, d / "base.qcow2")
    raw.unlink()
    q.create(d / "vm.qcow2", None, backing="base.qcow2")
    export = d / "export.raw"
    export.touch()
    qsd = subprocess.Popen(
        ["qemu-storage-daemon", "--blockdev", f"driver=file,node-name=f,filename={d / 'vm.qcow2'}"]
        + ["--blockdev", "driver=qcow2,node-name=q,file=f"]
        + ["--export", f"type=fuse,id=e,node-name=q,mountpoint={export},writable=on"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    loops = LoopDevices(readonly=False, partscan=True)
    mnts = [d / "m1", d / "m2"]
    copy = tmp_path_factory.mktemp("copy")
    try:
        _wait(lambda: _mounted(export), "qemu-storage-daemon's export")
        dev = loops.attach(export)
        parts = linux_partitions(dev)
        assert set(parts) == {1, 2}, parts
        subprocess.run(["mkfs.ext4", "-q", "-F", f"{dev}p1"], check=True)
        subprocess.run(["mkfs.xfs", "-q", "-f", f"{dev}p2"], check=True, env={**os.environ, **XFS_SMALL})
        for n, (mnt, fs) in enumerate(zip(mnts, ("ext4", "xfs")), 1):
            mnt.mkdir()
            subprocess.run(["mount", "-t", fs, f"{dev}p{n}", str(mnt)], check=True)
            for name, data in FILES[fs].items():
                (mnt / name).write_bytes(data)
        subprocess.run(["sync"], check=True)
        for p in ("base.qcow2", "vm.qcow2"):  # copied while both file systems are mounted
            shutil.copy(d / p, copy / p)
        (mnts[0] / "late.txt").write_bytes(b"written after the copy")
    finally:
        for mnt in mnts:
            _umount(mnt)
        loops.close()
        qsd.terminate()
        qsd.wait(timeout=60)
    yield copy / "vm.qcow2"


def test_journals_replay_in_a_writable_view(left_behind: Path, mounter, tmp_path: Path) -> None:
    before = fingerprint(left_behind.parent)
    view = mounter.mount(left_behind, None, "--writable", "-P")
    ext4, xfs = view.parent / "vm-p1.raw", view.parent / "vm-p2.raw"
    features = subprocess.run(["dumpe2fs", "-h", str(ext4)], capture_output=True, text=True).stdout
    assert "needs_recovery" in features  # crash-consistent indeed: the journal must be replayed
    for part, fs in ((ext4, "ext4"), (xfs, "xfs")):
        target = tmp_path / fs
        target.mkdir()
        subprocess.run(["mount", "-t", fs, "-o", "loop", str(part), str(target)], check=True)
        try:
            for name, data in FILES[fs].items():
                assert (target / name).read_bytes() == data, (fs, name)
            assert not (target / "late.txt").exists()
        finally:
            subprocess.run(["umount", str(target)], check=True)
    ext4_check = subprocess.run(["fsck.ext4", "-n", "-f", str(ext4)], capture_output=True, text=True)
    assert ext4_check.returncode == 0, ext4_check.stdout + ext4_check.stderr
    xfs_check = subprocess.run(["xfs_repair", "-n", "-f", str(xfs)], capture_output=True, text=True)
    assert xfs_check.returncode == 0, xfs_check.stdout + xfs_check.stderr
    mounter.close()
    assert fingerprint(left_behind.parent) == before


def test_read_only_view_cannot_replay(left_behind: Path, mounter, tmp_path: Path) -> None:
    """Why --writable: through the read-only view, ext4 refuses a plain read-only mount."""
    view = mounter.mount(left_behind, None, "-P")
    target = tmp_path / "ro"
    target.mkdir()
    res = subprocess.run(
        ["mount", "-t", "ext4", "-o", "ro,loop", str(view.parent / "vm-p1.raw"), str(target)],
        capture_output=True,
        text=True,
    )
    if res.returncode == 0:
        subprocess.run(["umount", str(target)], check=True)
    assert res.returncode != 0


def test_recovered_journals_kept_as_an_overlay(left_behind: Path, mounter, tmp_path: Path) -> None:
    """--overlay: the replayed journals are kept in a new qcow2 over the copy; QEMU reads it as
    exactly what the view showed, and finds nothing wrong with it."""
    q = Qemu()
    before = fingerprint(left_behind.parent)
    kept = tmp_path / "kept" / "recovered.qcow2"
    kept.parent.mkdir()
    view = mounter.mount(left_behind, None, "--overlay", str(kept), "-P")
    for part, fs in ((view.parent / "vm-p1.raw", "ext4"), (view.parent / "vm-p2.raw", "xfs")):
        target = tmp_path / fs
        target.mkdir()
        subprocess.run(["mount", "-t", fs, "-o", "loop", str(part), str(target)], check=True)
        try:
            assert all((target / n).read_bytes() == data for n, data in FILES[fs].items())
        finally:
            subprocess.run(["umount", str(target)], check=True)
    shown = tmp_path / "shown.raw"
    shutil.copyfile(view, shown)
    mounter.close()
    assert q.img("check", kept, check=False).returncode == 0
    assert q.img("compare", "-f", "raw", "-F", "qcow2", shown, kept, check=False).returncode == 0
    assert fingerprint(left_behind.parent) == before


@pytest.mark.parametrize("fmt", ["vhdx", "vmdk"])
def test_other_formats_of_the_same_disk(left_behind: Path, mounter, tmp_path: Path, fmt: str) -> None:
    """The same crash-consistent disk as QEMU writes it in VHDX and VMDK: the ext4 journal replays
    through a writable view of each, the XFS one too."""
    q = Qemu()
    image = tmp_path / f"vm.{fmt}"
    q.img("convert", "-O", fmt, left_behind, image)
    before = image.read_bytes()
    view = mounter.mount(image, None, "--writable", "-P")
    for part, fs in ((view.parent / "vm-p1.raw", "ext4"), (view.parent / "vm-p2.raw", "xfs")):
        target = tmp_path / fs
        target.mkdir()
        subprocess.run(["mount", "-t", fs, "-o", "loop", str(part), str(target)], check=True)
        try:
            assert all((target / n).read_bytes() == data for n, data in FILES[fs].items()), fs
        finally:
            subprocess.run(["umount", str(target)], check=True)
    mounter.close()
    assert image.read_bytes() == before

"""A VMDK chain mounted for real: bytes, SEEK_DATA/SEEK_HOLE and st_blocks as QEMU sees the chain;
a mismatched parent CID refused at mount; damage answered with EIO for that request only."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from ..helpers.images import peek, poke
from ..helpers.mounts import Mounter, seek_walk
from ..helpers.qemu import Qemu, data_extents, qemu_map
from ..helpers.vmdk_oracle import create, gt_entry_at

M = 1 << 20

pytestmark = [pytest.mark.qemu, pytest.mark.fuse]


def _chain(q: Qemu, d: Path) -> Path:
    base = create(q, d / "base.vmdk", 40 * M + 1536, "twoGbMaxExtentSparse")
    q.io(base, "write -P 0x10 0 3M", "write -P 0x11 20M 1M", fmt="vmdk")
    top = create(
        q, d / "base-000001.vmdk", 40 * M + 1536, "monolithicSparse", backing=base, opts="zeroed_grain=on"
    )
    q.io(top, "write -P 0x20 1M 64k", "write -z 2M 128k", "write -P 0x21 30M 4k", fmt="vmdk")
    return top


def test_mounted_vmdk_chain_reads_and_seeks_like_qemu(qemu: Qemu, tmp_path: Path, mounter: Mounter) -> None:
    top = _chain(qemu, tmp_path)
    ref = qemu.to_raw(top, tmp_path / "ref.raw").read_bytes()
    view = mounter.mount(top)
    assert view.read_bytes() == ref
    assert seek_walk(view) == data_extents(qemu_map(qemu, top))
    st = os.stat(view)
    assert st.st_size == len(ref)
    assert st.st_blocks * 512 == sum(n for _, n in data_extents(qemu_map(qemu, top)))


def test_mount_refuses_a_changed_parent(qemu: Qemu, tmp_path: Path, mounter: Mounter) -> None:
    top = _chain(qemu, tmp_path)
    qemu.io(tmp_path / "base.vmdk", "write -P 0x12 39M 64k", fmt="vmdk")  # a new CID for the base
    res = mounter.run(top, mounter.mountpoint())
    assert res.returncode == 1
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "vmdk-cid" in lines[0] and "--ignore-parent-id" in lines[0], res.stderr
    mp = mounter.mountpoint()
    res = mounter.run(top, mp, "--ignore-parent-id")
    assert res.returncode == 0 and res.stderr.startswith("flatfs: warning: --ignore-parent-id"), res.stderr
    assert (mp / (top.stem + ".raw")).stat().st_size == 40 * M + 1536


def test_a_grain_table_pointing_past_the_file_is_refused_at_mount(
    qemu: Qemu, tmp_path: Path, mounter: Mounter
) -> None:
    img = create(qemu, tmp_path / "disk.vmdk", 8 * M, "monolithicSparse")
    qemu.io(img, "write -P 0x11 0 1M", "write -P 0x22 4M 64k", fmt="vmdk")
    poke(img, gt_entry_at(img, 64), "<I", 0x7FFFFFF)  # the grain at 4 MiB points past the end of the file
    res = mounter.run(img, mounter.mountpoint())
    assert res.returncode == 1 and len(res.stderr.strip().splitlines()) == 1
    assert "grain table entry points past the end of the file" in res.stderr


def test_a_damaged_grain_is_eio_for_that_request_only(qemu: Qemu, tmp_path: Path, mounter: Mounter) -> None:
    raw = tmp_path / "src.raw"
    qemu.create(raw, 8 * M, fmt="raw")
    qemu.io(raw, "write -P 0x11 0 1M", "write -P 0x22 4M 64k", fmt="raw")
    img = tmp_path / "disk.vmdk"
    qemu.img("convert", "-O", "vmdk", "-o", "subformat=streamOptimized", raw, img)
    host = peek(img, gt_entry_at(img, 64), "<I") * 512
    poke(img, host + 12, "<8s", b"garbage!")  # the compressed grain at 4 MiB
    view = mounter.mount(img)
    fd = os.open(view, os.O_RDONLY)
    try:
        assert os.pread(fd, 4096, 0) == b"\x11" * 4096
        with pytest.raises(OSError) as exc:
            os.pread(fd, 4096, 4 * M)
        assert exc.value.errno == errno.EIO
        assert os.pread(fd, 4096, 8192) == b"\x11" * 4096
    finally:
        os.close(fd)

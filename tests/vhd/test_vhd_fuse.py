"""A differencing VHD chain mounted for real: the view reads the composition and its holes are true."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from ..helpers.mounts import Mounter, seek_walk
from ..helpers.qemu import Qemu
from ..helpers.vhd_images import SIZE, M, base_bytes, child, qemu_base
from ..helpers.vhd_writer import compose

pytestmark = [pytest.mark.qemu, pytest.mark.fuse]


def test_mount_a_differencing_chain(qemu: Qemu, tmp_path: Path, mounter: Mounter):
    base = qemu_base(qemu, tmp_path)
    mid = child(base, [(0, b"\x21" * 4096), (5 * M, b"\x22" * (4 * 4096))])
    mid.write(tmp_path / "mid.vhd")
    top = child(tmp_path / "mid.vhd", [(4096, b"\x31" * 4096), (4 * M + 8192, b"\x32" * 4096)])
    top.write(tmp_path / "top.vhd")
    view = mounter.mount(tmp_path / "top.vhd")
    assert view.read_bytes() == compose(SIZE, base_bytes(), mid, top)
    # the base's unallocated block 4M..6M is a hole except what the children wrote
    walk = seek_walk(view)
    assert (4 * M + 8192, 4096) in walk and (5 * M, 4 * 4096) in walk
    assert not any(s < 4 * M + 8192 and s + n > 4 * M for s, n in walk)
    assert os.stat(view).st_blocks * 512 < SIZE

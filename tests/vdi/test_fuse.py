"""A VirtualBox snapshot chain mounted for real through the CLI: bytes, SEEK_DATA/SEEK_HOLE, st_blocks."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from flatfs import open_chain

from ..helpers.mounts import seek_walk
from ..helpers.vdi_writer import BLOCK, ZERO, Vdi, pattern, write_registry

M = BLOCK


def build(vm: Path) -> tuple[Path, bytes]:
    (vm / "Snapshots").mkdir(parents=True)
    size = 12 * M
    base = Vdi(size, blocks={0: pattern(0x10), 3: pattern(0x13, 7000), 6: pattern(0x16), 9: ZERO})
    mid = Vdi(size, blocks={1: pattern(0x21), 3: ZERO, 10: pattern(0x2A, 512)}).over(base)
    top = Vdi(size, blocks={6: ZERO, 7: pattern(0x37), 11: pattern(0x3B)}).over(mid)
    imgs = [(base, "disk.vdi")]
    base.write(vm / "disk.vdi")
    for img in (mid, top):
        loc = f"Snapshots/{{{img.create}}}.vdi"
        img.write(vm / loc)
        imgs.append((img, loc))
    write_registry(vm / "VM.vbox", imgs)
    return vm / imgs[-1][1], top.content(mid.content(base.content()))


@pytest.mark.fuse
def test_mounted_snapshot_chain(mounter, tmp_path):
    top, want = build(tmp_path / "VM")
    with open_chain(top) as chain:
        data = [(e.start, e.length) for e in chain.extents() if e.kind.is_data]
    # merge neighbours (extents of different depths touch)
    merged: list[list[int]] = []
    for s, n in data:
        if merged and merged[-1][0] + merged[-1][1] == s:
            merged[-1][1] += n
        else:
            merged.append([s, n])
    assert merged == [[0, 2 * M], [7 * M, M], [10 * M, 2 * M]]
    view = mounter.mount(top)
    assert view.name == top.stem + ".raw"
    assert view.read_bytes() == want
    assert seek_walk(view) == [tuple(x) for x in merged]
    st = os.stat(view)
    assert st.st_size == len(want)
    assert st.st_blocks == sum(n for _, n in merged) // 512

"""An ESXi chain (thin flat base, vmfsSparse delta, seSparse delta) mounted for real: the bytes the
writer intended, and a SEEK_DATA/SEEK_HOLE walk equal to the chain's map (and, for the twin QEMU
opens, to qemu-img map)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from ..helpers.cli import flatfs
from ..helpers.esxi_writer import esxi_chain
from ..helpers.mounts import Mounter, seek_walk
from ..helpers.qemu import Qemu, data_extents, qemu_map

M = 1 << 20

pytestmark = [pytest.mark.qemu, pytest.mark.fuse]


def test_a_mounted_esxi_chain_reads_and_seeks_as_its_map(
    qemu: Qemu, tmp_path: Path, mounter: Mounter
) -> None:
    top, want, twin = esxi_chain(tmp_path, 48 * M, ("vmfsSparse", "seSparse"))
    assert twin is not None
    view = mounter.mount(top)
    assert view.read_bytes() == want
    runs = data_extents(json.loads(flatfs("map", "--output=json", top).stdout))
    assert seek_walk(view) == runs
    assert os.stat(view).st_blocks * 512 == sum(n for _, n in runs)
    # the thin base's holes are holes: only the written places are data
    assert sum(n for _, n in runs) < 4 * M
    qview = mounter.mount(twin)
    assert qview.read_bytes() == want
    assert seek_walk(qview) == data_extents(qemu_map(qemu, twin))

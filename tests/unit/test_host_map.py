"""Where a chain's data lives on the host (Chain.host_map / host_data, Layer.host_map).

For copy offload: every run with a file descriptor must hold exactly the
bytes the chain reads there, the runs must cover exactly the DATA of the
flattened view, and what cannot be copied as it lies (compressed clusters,
a format that does not say) must be marked for reading instead.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from flatfs import open_chain
from flatfs.chain import Chain
from flatfs.extents import Kind
from flatfs.formats.api import LayerBase

from ..helpers.chains import qemu_chain
from ..helpers.images import M, write_sparse_raw

pytestmark = pytest.mark.qemu


def check_host_map(chain: Chain) -> tuple[int, int]:
    """The runs cover the DATA exactly and hold its bytes; -> (bytes mapped, bytes to read)."""
    runs = list(chain.host_map())
    data = [(e.start, e.length) for e in chain.extents() if e.kind is Kind.DATA]
    covered: list[tuple[int, int]] = []
    for g, n, _fd, _h in runs:
        if covered and covered[-1][0] + covered[-1][1] == g:
            covered[-1] = (covered[-1][0], covered[-1][1] + n)
        else:
            covered.append((g, n))
    merged: list[tuple[int, int]] = []
    for s, n in data:
        if merged and merged[-1][0] + merged[-1][1] == s:
            merged[-1] = (merged[-1][0], merged[-1][1] + n)
        else:
            merged.append((s, n))
    assert covered == merged
    mapped = unmapped = 0
    for g, n, fd, h in runs:
        assert n > 0
        if fd < 0:
            unmapped += n
            continue
        assert os.pread(fd, n, h) == chain.pread(g, n), (g, n, h)
        mapped += n
    return mapped, unmapped


def test_raw_maps_onto_itself(tmp_path: Path) -> None:
    img = write_sparse_raw(tmp_path / "a.raw", 8 * M, [(0, b"\x11" * 4096), (3 * M, b"\x22" * 70000)])
    with open_chain(img) as chain:
        runs = list(chain.host_map())
        assert [(g, h) for g, _n, _fd, h in runs] == [(g, g) for g, _n, _fd, _h in runs]
        mapped, unmapped = check_host_map(chain)
        assert mapped >= 4096 + 70000 and unmapped == 0


def test_qcow2_plain_and_compressed_clusters(qemu, tmp_path: Path) -> None:
    img = tmp_path / "a.qcow2"
    qemu.create(img, 16 * M)
    qemu.io(img, "write -P 0x31 0 1M", "write -c -P 0x32 2M 128k", "write -P 0x33 5M 64k", "write -z 6M 1M")
    with open_chain(img) as chain:
        mapped, unmapped = check_host_map(chain)
        assert mapped == 1 * M + 64 * 1024
        assert unmapped == 128 * 1024  # the compressed clusters are read, not copied


def test_qcow2_external_data_file(qemu, tmp_path: Path) -> None:
    img = tmp_path / "a.qcow2"
    qemu.create(img, 16 * M, opts="data_file=a.data")
    qemu.io(img, "write -P 0x41 64k 1M", "write -P 0x42 9M 192k")
    with open_chain(img) as chain:
        fds = {fd for _g, _n, fd, _h in chain.host_map()}
        assert fds == {chain.host_files()[1].fd}  # the data file, not the image
        assert check_host_map(chain) == (1 * M + 192 * 1024, 0)


def test_chain_maps_each_piece_in_its_own_layer(qemu, tmp_path: Path) -> None:
    top = qemu_chain(qemu, tmp_path)
    with open_chain(top) as chain:
        mapped, _ = check_host_map(chain)
        assert mapped
        layers_used = {fd for _g, _n, fd, _h in chain.host_map() if fd >= 0}
        assert len(layers_used) > 1


def test_data_past_the_end_of_the_file_is_read_not_mapped(qemu, tmp_path: Path) -> None:
    """A data cluster past the end of a truncated data file reads as zeros: not copyable."""
    img = tmp_path / "a.qcow2"
    qemu.create(img, 4 * M, opts="data_file=a.data")
    qemu.io(img, "write -P 0x51 0 1M")
    os.truncate(tmp_path / "a.data", 512 * 1024 + 100)
    with open_chain(img) as chain:
        runs = list(chain.host_map())
        assert runs[0][1] == 512 * 1024 + 100 and runs[0][2] >= 0
        assert runs[-1][2] < 0 and runs[-1][0] + runs[-1][1] == 1 * M


def test_layer_base_default_is_not_mappable() -> None:
    assert LayerBase().host_map(4096, 12288) == [(4096, 8192, -1, 0)]
    assert LayerBase().host_map(5, 5) == []

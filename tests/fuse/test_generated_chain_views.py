"""Views of chain kinds a random chain generator made, each checked against QEMU.

The view's bytes = qemu-img convert -O raw; qemu-img compare -f raw VIEW IMAGE; the
SEEK_DATA/SEEK_HOLE walk and ``qemu-img map -f raw VIEW`` equal the data
extents of ``qemu-img map IMAGE``; st_blocks is the data; ``flatfs convert``
and ``qemu-img convert`` of the view compare equal to the image.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from ..helpers.chains import build_recipe
from ..helpers.cli import flatfs
from ..helpers.mounts import Mounter, seek_walk
from ..helpers.needs import have_fuse, have_qemu, require
from ..helpers.qemu import Qemu, data_extents, qemu_map

pytestmark = [pytest.mark.qemu, pytest.mark.fuse]

K = 1024
M = 1 << 20

# (layers, qemu-io commands per layer); each overlay is created on the layer before it.
# No "write -z" on raw layers: on ext4 that can leave an unwritten extent, which
# SEEK_DATA reports as a hole or as data depending on the page cache.
RECIPES = {
    # an odd-sized raw base longer than its 1 KiB-cluster overlay, which is not a
    # multiple of the cluster size and has a snapshot taken before later writes
    "odd-raw-base": (
        [("base.raw", "raw", 5 * M + 1234, None), ("top.qcow2", "qcow2", 3 * M + 300, "cluster_size=1024")],
        [
            ["write -P 0x3c 1M 64k", "write -P 0x0a 2M 1k", "write -P 0x44 5M 1024"],
            [
                "write -P 0xdd 512k 64k",
                "discard 1M 2k",
                "write -c -P 0xa9 3M 512",
                "write -P 0 2M 1k",
                "snapshot",
                "write -P 0xee 8k 4k",
                "write -z 520k 4k",
            ],
        ],
    ),
    # extended L2 subclusters (partial, zeroed, unmapped) over a 2 MiB-cluster zstd base
    "extl2-over-2M": (
        [
            ("base.qcow2", "qcow2", 6 * M, "cluster_size=2M,compression_type=zstd"),
            ("top.qcow2", "qcow2", 6 * M + 512, "cluster_size=64k,extended_l2=on"),
        ],
        [
            ["write -P 0x11 0 3M", "write -c -P 0x12 4M 2M"],
            [
                "write -P 0x21 2k 1k",
                "write -z 8k 2k",
                "write -z -u 64k 64k",
                "write -P 0x22 130k 3k",
                "discard 4M 64k",
                "write -P 0 5M 8k",
                "write -P 0x23 6M 512",
            ],
        ],
    ),
    # four layers: compat 0.10 base, 1-bit and 64-bit refcount layers, a lazy-refcounts top
    "four-mixed": (
        [
            ("base.qcow2", "qcow2", 4 * M, "compat=0.10,cluster_size=4096"),
            ("mid.qcow2", "qcow2", 2 * M, "refcount_bits=1,cluster_size=512"),
            ("up.qcow2", "qcow2", 4 * M, "refcount_bits=64,cluster_size=2M"),
            ("top.qcow2", "qcow2", 4 * M, "lazy_refcounts=on,cluster_size=16k"),
        ],
        [
            ["write -P 0x31 0 2M", "write -P 0 2M 64k", "write -P 0x35 3M 1M"],
            ["write -z 64k 4k", "write -P 0x32 1M 1536", "discard 1536k 64k"],
            ["write -P 0x33 3M 4k"],
            ["write -z 0 512", "write -c -P 0x34 128k 16k", "write -P 0x36 3900k 20k"],
        ],
    ),
}


def _build(q: Qemu, d: Path, name: str) -> Path:
    return build_recipe(q, d, *RECIPES[name])


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, tuple[Path, Path, Path]]]:
    """name -> (top image, qemu-img's raw of it, the mounted view); all unmounted at the end."""
    require(have_qemu(), "qemu-img/qemu-io are not installed")
    require(have_fuse(), "/dev/fuse or fusermount3 is missing")
    q = Qemu()
    m = Mounter(tmp_path_factory.mktemp("generated-mnt"))
    try:
        out = {}
        for name in RECIPES:
            d = tmp_path_factory.mktemp(name)
            top = _build(q, d, name)
            ref = d / "ref.raw"
            q.to_raw(top, ref)
            out[name] = (top, ref, m.mount(top))
        yield out
    finally:
        m.close()


@pytest.mark.parametrize("name", list(RECIPES))
def test_view_matches_qemu(name: str, generated) -> None:
    q = Qemu()
    top, ref, view = generated[name]
    assert view.read_bytes() == ref.read_bytes()
    q.img("compare", "-f", "raw", view, top)
    data = data_extents(qemu_map(q, top))
    assert seek_walk(view) == data
    assert data_extents(qemu_map(q, view, "raw")) == data
    assert os.stat(view).st_blocks == -(-sum(n for _, n in data) // 512)


@pytest.mark.parametrize("name", list(RECIPES))
def test_view_as_source(name: str, generated, tmp_path: Path) -> None:
    q = Qemu()
    top, _, view = generated[name]
    out = tmp_path / "flat.qcow2"
    flatfs("convert", "-c", "--compression-type", "zstd", view, out)
    q.img("check", out)
    q.img("compare", "-F", "qcow2", top, out)
    theirs = tmp_path / "theirs.qcow2"
    q.img("convert", "-f", "raw", "-O", "qcow2", view, theirs)
    q.img("compare", "-F", "qcow2", top, theirs)

"""Regressions found by converting randomly generated chains, of kinds the other tests did not cover.

Each case is a small chain made with qemu-img/qemu-io, converted with the
options that once failed, and checked three ways: qemu-img check, qemu-img
compare against the source, and disk usage against qemu-img convert with the
equivalent options.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from ..helpers.chains import build_recipe
from ..helpers.cli import flatfs
from ..helpers.images import K, M, disk_usage, pattern, write_sparse_raw
from ..helpers.needs import have_qemu, require
from ..helpers.qemu import Qemu, assert_valid_copy

pytestmark = pytest.mark.qemu


def _qemu_convert(qemu: Qemu, src: Path, out: Path, *args: str) -> Path:
    qemu.img("convert", *args, src, out, cwd=src.parent)
    return out


# -- raw targets with -S larger than a file system block -------------------------------
#
# qemu-img skips a zero run that is at least -S long, and also any zero run at the
# start or end of the data, whatever its length. flatfs used to write every -S-aligned
# granule holding a single byte of data, so a raw target with -S 64k took up to
# 16 times the space of qemu-img's.


def _sparse_data_source(path: Path) -> Path:
    writes = []
    for i in range(24):  # 4 KiB of data in each of 24 separate 64 KiB granules
        writes.append((i * 192 * K + (i % 7) * 8 * K, pattern(4 * K, i)))
    writes.append((6 * M, pattern(4 * K, 100) + bytes(20 * K) + pattern(4 * K, 101)))  # short zero run
    writes.append((7 * M, pattern(4 * K, 102) + bytes(128 * K) + pattern(4 * K, 103)))  # long zero run
    return write_sparse_raw(path, 8 * M + 512, writes)


@pytest.fixture
def sparse_sources(qemu: Qemu, tmp_path: Path) -> dict[str, Path]:
    raw = _sparse_data_source(tmp_path / "sparse.raw")
    q = tmp_path / "sparse.qcow2"
    qemu.create(q, 8 * M + 512, opts="cluster_size=65536")
    # a qcow2 source with 64 KiB clusters holding 4 KiB of data each (the rest zeros)
    qemu.io(q, *(f"write -P {1 + i} {i * 256 * K + 12 * K} 4k" for i in range(20)))
    return {"raw": raw, "qcow2": q}


@pytest.mark.parametrize("sparse", ["512", "4k", "8k", "64k", "1M"])
@pytest.mark.parametrize("kind", ["raw", "qcow2"])
def test_raw_target_sparse_size_no_bigger_than_qemu(qemu, tmp_path, sparse_sources, kind, sparse):
    src = sparse_sources[kind]
    out = tmp_path / "out.raw"
    flatfs("convert", "-O", "raw", "-S", sparse, src, out)
    assert_valid_copy(qemu, src, out, "raw")
    ref = _qemu_convert(qemu, src, tmp_path / "ref.raw", "-O", "raw", "-S", sparse)
    assert disk_usage(out) <= disk_usage(ref) * 1.1, (disk_usage(out), disk_usage(ref))


def test_raw_target_keeps_short_zero_runs_between_data(tmp_path):
    """-S 64k still writes a zero run shorter than 64k between data (no fragmenting)."""
    src = write_sparse_raw(
        tmp_path / "s.raw", 2 * M, [(0, pattern(8 * K, 1) + bytes(16 * K) + pattern(8 * K, 2))]
    )
    a = tmp_path / "a.raw"
    b = tmp_path / "b.raw"
    flatfs("convert", "-O", "raw", "-S", "64k", src, a)
    flatfs("convert", "-O", "raw", "-S", "4k", src, b)
    assert a.read_bytes() == b.read_bytes() == src.read_bytes()
    assert disk_usage(a) > disk_usage(b)  # the 16 KiB run is written only with -S 64k


# -- chain kinds the random chain generator made, with the option sets it ran ---------
#
# Each recipe: (layers, qemu-io commands per layer). A layer is (name, format, size,
# qemu-img create -o options); each overlay is created on the layer before it.

RECIPES = {
    # an odd-sized sparse raw base (not a multiple of 512) under a 1 KiB-cluster overlay
    # that is shorter than its base, with a compressed write and an internal snapshot
    "odd-raw-base-1k-overlay": (
        [("base.raw", "raw", 5 * M + 1234, None), ("top.qcow2", "qcow2", 3 * M + 300, "cluster_size=1024")],
        [
            ["write -P 0x3c 1M 64k", "write -z 1200k 512", "write -P 0x0a 2M 1k", "write -P 0x44 5M 1024"],
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
    # extended L2 with partial subcluster writes and zeroed subclusters over a 2 MiB-cluster base
    "extl2-subclusters-over-2M": (
        [
            ("base.qcow2", "qcow2", 6 * M, "cluster_size=2M"),
            ("top.qcow2", "qcow2", 6 * M, "cluster_size=64k,extended_l2=on,compression_type=zstd"),
        ],
        [
            ["write -P 0x11 0 4M", "write -c -P 0x12 4M 2M"],
            [
                "write -P 0x21 2k 1k",
                "write -z 8k 2k",
                "write -z -u 64k 64k",
                "write -P 0x22 130k 3k",
                "write -c -P 0x23 1M 64k",
                "discard 4M 64k",
                "write -P 0 5M 8k",
            ],
        ],
    ),
    # compat 0.10 (no zero clusters) with 1-bit and 64-bit refcount layers above it
    "compat010-refcount-1-64": (
        [
            ("base.qcow2", "qcow2", 4 * M, "compat=0.10,cluster_size=4096"),
            ("mid.qcow2", "qcow2", 4 * M, "refcount_bits=1,cluster_size=512"),
            ("top.qcow2", "qcow2", 4 * M + 4096, "refcount_bits=64,lazy_refcounts=on"),
        ],
        [
            ["write -P 0x31 0 2M", "write -P 0 2M 64k", "write -z 3M 8k"],
            ["write -z 64k 4k", "write -P 0x32 1M 1536", "discard 1536k 64k"],
            ["write -P 0x33 4M 4k", "write -z 0 512", "write -c -P 0x34 128k 64k"],
        ],
    ),
}

CONVERT_OPTS = {
    "default": ([], ["-O", "qcow2"]),
    "raw-S64k": (["-O", "raw", "-S", "64k"], ["-O", "raw", "-S", "64k"]),
    "zstd-extl2-2M": (
        ["-c", "--compression-type", "zstd", "--extended-l2", "--cluster-size", "2M"],
        ["-O", "qcow2", "-c", "-o", "compression_type=zstd,extended_l2=on,cluster_size=2M"],
    ),
    "compat010-512-S512": (
        ["--compat", "0.10", "--cluster-size", "512", "-S", "512"],
        ["-O", "qcow2", "-S", "512", "-o", "compat=0.10,cluster_size=512"],
    ),
}


@pytest.fixture(scope="module")
def recipes(tmp_path_factory) -> dict[str, Path]:
    require(have_qemu(), "qemu-img/qemu-io are not installed")
    q = Qemu()
    out = {}
    for name, (layers, cmds) in RECIPES.items():
        d = tmp_path_factory.mktemp(name)
        out[name] = build_recipe(q, d, layers, cmds)
    return out


@pytest.mark.parametrize("opts", list(CONVERT_OPTS))
@pytest.mark.parametrize("recipe", list(RECIPES))
def test_recipe_convert(qemu, tmp_path, recipes, recipe, opts):
    src = recipes[recipe]
    ours, theirs = CONVERT_OPTS[opts]
    fmt = "raw" if "raw" in ours else "qcow2"
    out = tmp_path / f"out.{fmt}"
    flatfs("convert", *ours, src, out)
    assert_valid_copy(qemu, src, out, fmt)
    ref = _qemu_convert(qemu, src, tmp_path / f"ref.{fmt}", *theirs)
    assert disk_usage(out) <= disk_usage(ref) * 1.1, (disk_usage(out), disk_usage(ref))


@pytest.mark.parametrize("recipe", list(RECIPES))
def test_recipe_delta_onto_own_backing(qemu, tmp_path, recipes, recipe):
    src = recipes[recipe]
    layers = RECIPES[recipe][0]
    bname, bfmt = layers[-2][0], layers[-2][1]
    out = src.parent / f"delta-{tmp_path.name}.qcow2"
    try:
        flatfs("convert", "-B", bname, "-F", bfmt, src, out)
        assert_valid_copy(qemu, src, out, backing=True)
        ref = src.parent / f"ref-{tmp_path.name}.qcow2"
        _qemu_convert(qemu, src, ref, "-O", "qcow2", "-B", bname, "-F", bfmt)
        assert disk_usage(out) <= disk_usage(ref) * 1.1, (disk_usage(out), disk_usage(ref))
    finally:
        for p in (out, src.parent / f"ref-{tmp_path.name}.qcow2"):
            if p.exists():
                p.unlink()

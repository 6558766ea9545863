"""Only DATA extents are ever read, from the source and from a -B backing."""

from __future__ import annotations

import pytest

from flatfs import OpenOptions, open_chain
from flatfs.convert import ConvertOptions, convert_chain
from flatfs.extents import Kind

from ..helpers.chains import qemu_chain
from ..helpers.images import M, scattered_raw, write_sparse_raw


class CountingLayer:
    """Delegates to a layer and records every readinto (offset, length)."""

    def __init__(self, layer, log, depth):
        self._layer = layer
        self._log = log
        self._depth = depth

    def __getattr__(self, name):
        return getattr(self._layer, name)

    def readinto(self, offset, buf):
        self._log.append((self._depth, offset, len(buf)))
        return self._layer.readinto(offset, buf)


def instrument(chain):
    log = []
    chain.layers = tuple(CountingLayer(lay, log, d) for d, lay in enumerate(chain.layers))
    return log


def data_ranges(chain):
    return [(e.depth, e.start, e.end) for e in chain.extents() if e.kind is Kind.DATA]


def assert_reads_only_data(log, ranges):
    for depth, off, n in log:
        assert any(d == depth and s <= off and off + n <= e for d, s, e in ranges), (
            f"read of {n} bytes at {off:#x} (depth {depth}) is outside every DATA extent"
        )
    # and every DATA byte exactly once
    assert sum(n for *_, n in log) == sum(e - s for _, s, e in ranges)


@pytest.mark.parametrize(
    "opts",
    [
        ConvertOptions(),
        ConvertOptions(target_format="raw"),
        ConvertOptions(compress=True),
        ConvertOptions(extended_l2=True),
        ConvertOptions(sparse_size=0, cluster_size=512),
    ],
    ids=["qcow2", "raw", "zlib", "extended-l2", "S0-512"],
)
def test_raw_source_reads_only_data(tmp_path, opts):
    src = scattered_raw(tmp_path / "src.raw", 256 * M)
    with open_chain(src, OpenOptions(format="raw")) as chain:
        ranges = data_ranges(chain)
        log = instrument(chain)
        summary = convert_chain(chain, tmp_path / "out", opts)
    assert_reads_only_data(log, ranges)
    assert summary.data_read == sum(e - s for _, s, e in ranges)
    assert summary.data_read < 8 * M  # of a 256 MiB disk


@pytest.mark.qemu
def test_chain_and_backing_read_only_data(qemu, tmp_path):
    top = qemu_chain(qemu, tmp_path)
    newbase = write_sparse_raw(tmp_path / "newbase.raw", 48 * M, [(7 * M, b"\x01" * (3 * M))])
    with open_chain(top) as chain, open_chain(newbase, OpenOptions(format="raw")) as bchain:
        ranges = data_ranges(chain)
        branges = data_ranges(bchain)
        assert {d for d, *_ in ranges} == {0, 1}
        log = instrument(chain)
        blog = instrument(bchain)
        convert_chain(chain, tmp_path / "plain.qcow2", ConvertOptions())
        assert_reads_only_data(log, ranges)
        log.clear()
        convert_chain(
            chain,
            tmp_path / "delta.qcow2",
            ConvertOptions(backing="newbase.raw", backing_format="raw"),
            backing=bchain,
        )
        assert_reads_only_data(log, ranges)
        assert_reads_only_data(blog, branges)


def test_huge_sparse_source_is_cheap(tmp_path):
    """A 15 TiB sparse raw file with a little data converts in proportion to the data."""
    size = 15 << 40  # ext4's limit is 16 TiB
    src = write_sparse_raw(
        tmp_path / "huge.raw", size, [(0, b"a" * 4096), (9 << 40, b"b" * 70000), (size - 512, b"c" * 512)]
    )
    with open_chain(src, OpenOptions(format="raw")) as chain:
        data = sum(e - s for _, s, e in data_ranges(chain))
        summary = convert_chain(chain, tmp_path / "huge.qcow2", ConvertOptions())
    assert summary.data_read == data < 100_000  # file system blocks around the writes
    assert (tmp_path / "huge.qcow2").stat().st_blocks * 512 < 4 * M
    with open_chain(tmp_path / "huge.qcow2") as out:
        assert out.size == size
        assert out.pread(9 << 40, 70001) == b"b" * 70000 + b"\0"
        assert out.pread(size - 512, 512) == b"c" * 512


@pytest.mark.qemu
def test_64tib_overlay(qemu, tmp_path):
    """A 64 TiB overlay over a small base: flattening reads only the data."""
    base = tmp_path / "base.qcow2"
    qemu.create(base, 64 * M)
    qemu.io(base, "write -P 1 0 1M")
    top = tmp_path / "top.qcow2"
    qemu.create(top, "64T", backing=base.name, backing_fmt="qcow2")
    qemu.io(top, "write -P 2 32T 64k", "write -P 3 63T 1M")
    out = tmp_path / "flat.qcow2"
    with open_chain(top) as chain:
        summary = convert_chain(chain, out, ConvertOptions())
    assert summary.data_read == M + 64 * 1024 + M
    assert out.stat().st_blocks * 512 < 8 * M
    res = qemu.img("check", out, check=False)
    assert res.returncode == 0, res.stdout + res.stderr
    with open_chain(out) as flat:
        assert flat.pread(32 << 40, 65537) == b"\2" * 65536 + b"\0"
        assert flat.pread(0, 2) == b"\1\1"

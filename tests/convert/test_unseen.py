"""Regressions found by generating chains the other tests did not cover (red-team runs).

Each case is a small chain made with qemu-img/qemu-io, converted with the
options that once failed, and checked like the judges do: qemu-img check,
qemu-img compare against the source, and disk usage against qemu-img convert
with the equivalent options.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from ..conftest import Qemu, flatfs
from .helpers import K, M, assert_valid_copy, disk_usage, pattern, write_sparse_raw

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
    for i in range(24):                      # 4 KiB of data in each of 24 separate 64 KiB granules
        writes.append((i * 192 * K + (i % 7) * 8 * K, pattern(4 * K, i)))
    writes.append((6 * M, pattern(4 * K, 100) + bytes(20 * K) + pattern(4 * K, 101)))   # short zero run
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
    src = write_sparse_raw(tmp_path / "s.raw", 2 * M, [(0, pattern(8 * K, 1) + bytes(16 * K) + pattern(8 * K, 2))])
    a = tmp_path / "a.raw"
    b = tmp_path / "b.raw"
    flatfs("convert", "-O", "raw", "-S", "64k", src, a)
    flatfs("convert", "-O", "raw", "-S", "4k", src, b)
    assert a.read_bytes() == b.read_bytes() == src.read_bytes()
    assert disk_usage(a) > disk_usage(b)      # the 16 KiB run is written only with -S 64k

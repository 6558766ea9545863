"""VMDK disks and chains made by QEMU, read by flatfs exactly as QEMU reads them.

Every case compares flatfs's map with `qemu-img map --output=json` (projected
as for qcow2), converts with flatfs to raw and to qcow2, and has qemu-img
compare both with the source and check the qcow2.
"""

from __future__ import annotations

import pytest

from flatfs import OpenOptions, open_chain
from flatfs.extents import Kind

from ..helpers.vmdk_oracle import SUBFORMATS, checks_out, create, libvmdk_reads, write_stream_vmdk

K = 1024
M = 1 << 20
G = 1 << 30
BIG = 2 * G + 5 * M + 1536  # more than one 2 GiB extent, and not a multiple of the grain

pytestmark = pytest.mark.qemu


@pytest.mark.parametrize("subformat", [s for s in SUBFORMATS if s != "streamOptimized"])
def test_each_subformat(qemu, tmp_path, subformat):
    img = create(qemu, tmp_path / "disk.vmdk", BIG, subformat)
    qemu.io(
        img,
        "write -P 0x11 0 100k",
        "write -P 0x22 1M 3M",
        "write -z 1536k 128k",
        f"write -P 0x33 {2 * G - 64 * K} 192k",  # straddles the first 2 GiB extent's end
        f"write -P 0x44 {BIG - 1536} 1536",  # the last, partial grain
        fmt="vmdk",
    )
    checks_out(qemu, img, tmp_path)


def test_stream_optimized_from_qemu(qemu, tmp_path):
    raw = tmp_path / "src.raw"
    qemu.create(raw, 3 * M + 512, fmt="raw")
    qemu.io(raw, "write -P 0x61 0 200k", "write -P 0x62 2M 4k", f"write -P 0x63 {3 * M} 512", fmt="raw")
    img = tmp_path / "stream.vmdk"
    qemu.img("convert", "-O", "vmdk", "-o", "subformat=streamOptimized", raw, img)
    checks_out(qemu, img, tmp_path)
    with open_chain(img) as chain:
        assert chain.layers[0].info()["create-type"] == "streamOptimized"


def test_stream_optimized_with_the_grain_directory_at_the_end(qemu, tmp_path):
    img = tmp_path / "export.vmdk"
    size = 70 * M + 1024  # three grain tables, the last one partial
    write_stream_vmdk(
        img, size, {0: b"\x01" * 65536, 5: b"\x02" * 1000, 700: b"\x03" * 65536, 1120: b"\x04" * 1024}
    )
    checks_out(qemu, img, tmp_path)
    with open_chain(img) as chain:
        assert chain.pread(5 * 65536, 1001) == b"\x02" * 1000 + b"\0"
        assert chain.pread(1120 * 65536, 1024) == b"\x04" * 1024


def test_a_delta_chain_three_deep(qemu, tmp_path):
    base = create(qemu, tmp_path / "base.vmdk", 64 * M, "monolithicSparse")
    qemu.io(base, "write -P 0x10 0 8M", "write -P 0x11 32M 1M", fmt="vmdk")
    d1 = create(qemu, tmp_path / "base-000001.vmdk", 64 * M, "monolithicSparse", backing=base)
    qemu.io(d1, "write -P 0x20 1M 100k", "write -P 0x21 40M 64k", fmt="vmdk")
    d2 = create(qemu, tmp_path / "base-000002.vmdk", 64 * M, "twoGbMaxExtentSparse", backing=d1)
    qemu.io(d2, "write -P 0x30 4M 4k", fmt="vmdk")
    checks_out(qemu, d2, tmp_path)
    with open_chain(d2) as chain:
        assert [lay.path for lay in chain.layers] == [str(d2), str(d1), str(base)]


def test_a_zeroed_grain_reads_zeros_and_does_not_fall_through(qemu, tmp_path):
    base = create(qemu, tmp_path / "base.vmdk", 8 * M, "monolithicSparse")
    qemu.io(base, "write -P 0x55 0 8M", fmt="vmdk")
    top = create(qemu, tmp_path / "top.vmdk", 8 * M, "monolithicSparse", backing=base, opts="zeroed_grain=on")
    qemu.io(top, "write -z 1M 128k", "write -P 0x66 4M 4k", fmt="vmdk")
    checks_out(qemu, top, tmp_path)
    with open_chain(top) as chain:
        kinds = {(e.start, e.length): (e.kind, e.depth) for e in chain.extents()}
        assert kinds[(M, 128 * K)] == (Kind.ZERO, 0)
        assert chain.pread(M, 128 * K) == bytes(128 * K)
        assert chain.pread(M - 4, 8) == b"\x55" * 4 + bytes(4)


def test_libvmdk_misreads_a_zeroed_grain_flatfs_follows_qemu(qemu, tmp_path):
    """libvmdk agrees with QEMU on data grains; on a zeroed grain (GTE 1) it does not:
    it reads sector 1 of the file (the descriptor) instead of zeros. flatfs follows QEMU
    and the specification. If libvmdk is fixed, this test says so."""
    img = create(qemu, tmp_path / "zg.vmdk", 4 * M, "monolithicSparse", opts="zeroed_grain=on")
    qemu.io(img, "write -P 0x77 0 128k", "write -z 1M 64k", fmt="vmdk")
    with open_chain(img) as chain:
        assert chain.pread(0, 128 * K) == libvmdk_reads(img, 0, 128 * K) == b"\x77" * 128 * K
        ours = chain.pread(M, 64 * K)
    assert ours == bytes(64 * K)
    assert libvmdk_reads(img, M, 64 * K) != ours, "libvmdk now reads zeroed grains as zeros"


@pytest.mark.parametrize("subformat", ["monolithicSparse", "twoGbMaxExtentSparse", "monolithicFlat"])
def test_libvmdk_agrees_on_data(qemu, tmp_path, subformat):
    img = create(qemu, tmp_path / "d.vmdk", BIG if subformat == "twoGbMaxExtentSparse" else 16 * M, subformat)
    last = BIG - 64 * K if subformat == "twoGbMaxExtentSparse" else 15 * M
    qemu.io(img, "write -P 0x31 1M 100k", f"write -P 0x32 {last} 64k", fmt="vmdk")
    with open_chain(img) as chain:
        for off, n in ((0, 2 * M), (last - 4 * K, 68 * K)):
            assert chain.pread(off, n) == libvmdk_reads(img, off, n)


def test_a_qcow2_overlay_on_a_vmdk_base(qemu, tmp_path):
    base = create(qemu, tmp_path / "base.vmdk", 16 * M, "monolithicSparse")
    qemu.io(base, "write -P 0x10 0 4M", fmt="vmdk")
    top = qemu.create(tmp_path / "top.qcow2", 16 * M, backing="base.vmdk", backing_fmt="vmdk")
    qemu.io(top, "write -P 0x20 1M 64k", "write -z 2M 64k")
    with open_chain(top) as chain:
        assert [lay.format for lay in chain.layers] == ["qcow2", "vmdk"]
    from ..helpers.qemu import assert_matches_qemu, project_map

    assert project_map  # the same projection as every qcow2 chain
    assert_matches_qemu(qemu, top, tmp_path)


def test_ignore_parent_id_reads_a_changed_parent(qemu, tmp_path):
    base = create(qemu, tmp_path / "base.vmdk", 8 * M, "monolithicSparse")
    qemu.io(base, "write -P 0x10 0 4M", fmt="vmdk")
    top = create(qemu, tmp_path / "top.vmdk", 8 * M, "monolithicSparse", backing=base)
    qemu.io(top, "write -P 0x20 1M 64k", fmt="vmdk")
    qemu.io(base, "write -P 0x11 6M 64k", fmt="vmdk")  # QEMU gives the base a new CID
    with open_chain(top, OpenOptions(ignore_parent_id=True)) as chain:
        assert chain.pread(6 * M, 4) == b"\x11" * 4
        assert chain.pread(M, 4) == b"\x20" * 4

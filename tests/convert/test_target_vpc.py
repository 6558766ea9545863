"""`convert -O vpc`: dynamic and fixed VHDs, read back by qemu-img and libvhdi, spec rules from the bytes."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from ..helpers.cli import flatfs, one_line_error
from ..helpers.images import M, pattern, write_sparse_raw
from ..helpers.qemu import Qemu
from ..helpers.targets import assert_cost_follows_data, check_output, convert_checked
from ..helpers.vhd_images import SIZE, base_bytes, child, qemu_base
from ..helpers.vhd_writer import checksum, compose
from ..helpers.vhdx_images import pyvhdi

BLOCK = 2 * M


def libvhdi(path: Path) -> bytes:
    assert pyvhdi is not None
    f = pyvhdi.file()
    f.open(str(path))
    try:
        return f.read_buffer_at_offset(f.get_media_size(), 0)
    finally:
        f.close()


def spec_geometry(size: int) -> tuple[int, int, int]:
    """The VHD specification's CHS algorithm (its Appendix), written out again for the test."""
    total = min(size // 512, 65535 * 16 * 255)
    if total >= 65535 * 16 * 63:
        return total // 255 // 16, 16, 255
    spt = 17
    cth = total // spt
    heads = max(4, (cth + 1023) // 1024)
    if cth >= heads * 1024 or heads > 16:
        spt, heads, cth = 31, 16, total // 31
    if cth >= heads * 1024:
        spt, heads, cth = 63, 16, total // 63
    return cth // heads, heads, spt


def check_footer(raw: bytes, size: int, disk_type: int) -> bytes:
    """The footer's fields by the spec; returns its unique id."""
    assert raw[:8] == b"conectix"
    assert struct.unpack_from(">I", raw, 64)[0] == checksum(raw[:64] + bytes(4) + raw[68:])
    orig, cur = struct.unpack_from(">QQ", raw, 40)
    assert orig == cur == size  # force_size: exactly the source's size
    assert struct.unpack_from(">HBB", raw, 56) == spec_geometry(size)
    assert struct.unpack_from(">I", raw, 60)[0] == disk_type
    assert raw[28:32] == b"win "  # a creator sized by current_size, not by the geometry
    assert struct.unpack_from(">Q", raw, 16)[0] == (512 if disk_type == 3 else 0xFFFFFFFFFFFFFFFF)
    return raw[68:84]


@pytest.mark.parametrize("sub", ["dynamic", "fixed"])
def test_qcow2_chain_to_vpc(tmp_path, qemu: Qemu, qcow2_chain, sub):
    top = qcow2_chain[0]
    out = tmp_path / "out.vhd"
    flat, want = convert_checked(qemu, qcow2_chain, out, "vpc", "-o", f"subformat={sub}")
    assert libvhdi(out) == want
    size = flat.stat().st_size
    raw = out.read_bytes()
    uid = check_footer(raw[-512:], size, 3 if sub == "dynamic" else 2)
    if sub == "fixed":
        assert len(raw) == size + 512
        return
    assert raw[:512] == raw[-512:]
    hdr = raw[512:1536]
    assert hdr[:8] == b"cxsparse" and struct.unpack_from(">I", hdr, 36)[0] == checksum(
        hdr[:36] + bytes(4) + hdr[40:]
    )
    table, entries, block = struct.unpack_from(">QII", hdr, 16)[0], *struct.unpack_from(">II", hdr, 28)
    assert block == BLOCK and entries == -(-size // BLOCK)
    bat = struct.unpack_from(f">{entries}I", raw, table)
    flat_bytes = flat.read_bytes()
    for b, sector in enumerate(bat):
        guest = flat_bytes[b * BLOCK : (b + 1) * BLOCK]
        if sector == 0xFFFFFFFF:
            assert guest.count(0) == len(guest)  # only blocks without data are left out
            continue
        bitmap = raw[sector * 512 : sector * 512 + 512]
        for s in range(len(guest) // 512):
            if bitmap[s // 8] & (0x80 >> (s % 8)) == 0:
                assert guest[s * 512 : (s + 1) * 512].count(0) == 512, (b, s)
    # a second conversion gets a fresh unique id
    out2 = tmp_path / "out2.vhd"
    flatfs("convert", "-O", "vpc", top, out2)
    assert out2.read_bytes()[-512 + 68 : -512 + 84] != uid


def test_size_is_never_rounded_to_a_geometry(tmp_path, qemu: Qemu):
    # 10 MiB + 3 sectors is no CHS geometry: QEMU and libvhdi must still read exactly that size
    size = 10 * M + 3 * 512
    src = write_sparse_raw(tmp_path / "src.raw", size, [(size - 1024, pattern(1024, 3))])
    out = tmp_path / "out.vhd"
    flatfs("convert", "-O", "vpc", src, out)
    info = json.loads(qemu.img("info", "--output=json", "-f", "vpc", out).stdout)
    assert info["virtual-size"] == size
    check_output(qemu, src, src, out, "vpc")
    assert libvhdi(out) == src.read_bytes()


def test_cost_grows_with_data_not_size(tmp_path, qemu: Qemu):
    assert_cost_follows_data(qemu, tmp_path, "vpc")


@pytest.mark.parametrize(
    "args, words",
    [
        (["-o", "nope=1"], "-o nope"),
        (["-o", "subformat=streamOptimized"], "-o subformat"),
        (["-B", "base.raw"], "-B/--backing"),
        (["-c"], "-c/--compress"),
        (["-n"], "-n/--no-create"),
        (["--cluster-size", "64k"], "--cluster-size"),
    ],
)
def test_what_vpc_cannot_do_is_a_usage_error(tmp_path, args, words):
    src = write_sparse_raw(tmp_path / "src.raw", M, [(0, pattern(4096, 1))])
    one_line_error(["convert", "-O", "vpc", *args, src, tmp_path / "out.vhd"], words, status=2)
    assert not (tmp_path / "out.vhd").exists()


def test_options_help_lists_the_keys():
    res = flatfs("convert", "-O", "vpc", "-o", "help", "x", "y")
    assert "subformat=dynamic|fixed" in res.stdout
    res = flatfs("measure", "-O", "qcow2", "-o", "help", "x")
    assert "cluster_size" in res.stdout


def test_differencing_vhd_chain_to_vpc(tmp_path, qemu: Qemu):
    # a chain QEMU silently misreads (it ignores the parent); flattened, one VHD everyone reads
    base = qemu_base(qemu, tmp_path)
    mid = child(base, [(0, b"\x21" * 8192), (5 * M, b"\x23" * (2 * M))])
    mid.write(tmp_path / "mid.vhd")
    top = child(tmp_path / "mid.vhd", [(4096, b"\x31" * 4096), (SIZE - 4096, b"\x33" * 4096)])
    top.write(tmp_path / "top.vhd")
    want = compose(SIZE, base_bytes(), mid, top)
    expected = tmp_path / "expected.raw"
    expected.write_bytes(want)
    out = tmp_path / "flat.vhd"
    flatfs("convert", "-O", "vpc", tmp_path / "top.vhd", out)
    check_output(qemu, expected, tmp_path / "top.vhd", out, "vpc")
    assert libvhdi(out) == want

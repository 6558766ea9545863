"""`convert -O vmdk`: monolithicSparse and streamOptimized, read back by qemu-img and libvmdk; the
stream's markers, grain directory at the end, footer and end-of-stream asserted from the bytes."""

from __future__ import annotations

import re
import struct
import zlib
from pathlib import Path

import pytest

from ..helpers.cli import flatfs, one_line_error
from ..helpers.images import M, pattern, write_sparse_raw
from ..helpers.qemu import Qemu
from ..helpers.targets import assert_cost_follows_data, check_output, convert_checked

HEADER = struct.Struct("<4sIIQQQQIQQQB4sH")
GD_AT_END = 0xFFFFFFFFFFFFFFFF
GRAIN = 64 * 1024  # flatfs maps a VMDK grain as a whole


def libvmdk(path: Path) -> bytes:
    import pyvmdk

    h = pyvmdk.handle()
    h.open(str(path))
    h.open_extent_data_files()
    try:
        return h.read_buffer_at_offset(h.get_media_size(), 0)
    finally:
        h.close()


def descriptor(raw: bytes) -> dict[str, str]:
    h = HEADER.unpack_from(raw)
    text = raw[h[5] * 512 : (h[5] + h[6]) * 512].rstrip(b"\0").decode()
    keys = dict(re.findall(r'^([\w.]+)\s*=\s*"?([^"\n]*)"?$', text, re.M))
    keys["extent"] = re.search(r"^RW \d+ SPARSE .*$", text, re.M).group(0)
    return keys


def walk_stream(raw: bytes, want: bytes) -> dict[str, int]:
    """Every marker of a stream-optimized extent, in order, checked against the guest's bytes."""
    magic, version, flags, capacity, grain, _d, _ds, gtes, _rgd, gd, overhead, _u, nl, algo = (
        HEADER.unpack_from(raw)
    )
    assert (magic, version, flags, algo, nl) == (b"KDMV", 3, 0x30001, 1, b"\n \r\n")
    assert gd == GD_AT_END and capacity * 512 == len(want) and grain == 128 and gtes == 512
    pos, grains, tables, seen_gd = overhead * 512, {}, {}, None
    while True:
        lba, size = struct.unpack_from("<QI", raw, pos)
        if size:  # a grain: its LBA, its deflated bytes
            assert seen_gd is None, "a grain after the grain directory"
            g = want[lba * 512 : lba * 512 + grain * 512]
            assert zlib.decompress(raw[pos + 12 : pos + 12 + size])[: len(g)] == g
            grains[lba // grain] = pos // 512
            pos += -(-(12 + size) // 512) * 512
            continue
        kind = struct.unpack_from("<I", raw, pos + 12)[0]
        if kind == 0:  # end of stream: the last sector of the file
            assert pos + 512 == len(raw) and raw[pos:] == bytes(512)
            break
        body = raw[pos + 512 : pos + 512 + lba * 512]
        if kind == 1:
            tables[pos // 512 + 1] = struct.unpack(f"<{gtes}I", body)
        elif kind == 2:
            seen_gd = pos // 512 + 1
            directory = struct.unpack_from(f"<{-(-capacity // (grain * gtes))}I", body)
        else:  # the footer: the header again, with the directory's offset, just before the EOS
            assert kind == 3 and pos == len(raw) - 1536
            footer = HEADER.unpack_from(body)
            assert footer[9] == seen_gd and footer[:9] == HEADER.unpack_from(raw)[:9]
        pos += 512 + lba * 512
    assert seen_gd is not None
    # the directory names the tables, the tables the grain markers: and nothing else
    for t, at in enumerate(directory):
        if at:
            for i, g in enumerate(tables[at]):
                if g:
                    assert grains[t * gtes + i] == g
    assert sum(1 for t in tables.values() for g in t if g) == len(grains)
    for g in range(-(-len(want) // (grain * 512))):
        if g not in grains:
            chunk = want[g * grain * 512 : (g + 1) * grain * 512]
            assert chunk.count(0) == len(chunk), g
    return {"grains": len(grains), "tables": len(tables)}


@pytest.mark.parametrize("sub", ["monolithicSparse", "streamOptimized"])
def test_qcow2_chain_to_vmdk(tmp_path, qemu: Qemu, qcow2_chain, sub):
    out = tmp_path / "out.vmdk"
    _, want = convert_checked(qemu, qcow2_chain, out, "vmdk", "-o", f"subformat={sub}", granule=GRAIN)
    assert "No errors" in qemu.img("check", "-f", "vmdk", out).stdout
    assert libvmdk(out) == want
    raw = out.read_bytes()
    d = descriptor(raw)
    assert d["createType"] == sub and d["parentCID"] == "ffffffff" and re.fullmatch(r"[0-9a-f]{8}", d["CID"])
    assert d["ddb.adapterType"] == "lsilogic" and d["ddb.virtualHWVersion"] == "4"
    assert d["ddb.geometry.heads"] == "255" and d["ddb.geometry.sectors"] == "63"
    assert d["extent"].endswith('"out.vmdk"')  # TARGET's own name, never the temporary file's
    if sub == "streamOptimized":
        walk_stream(raw, want)
    again = tmp_path / "again.vmdk"
    flatfs("convert", "-O", "vmdk", "-o", f"subformat={sub}", qcow2_chain[0], again)
    assert descriptor(again.read_bytes())["CID"] != d["CID"]  # a fresh CID


def test_vmdk_delta_chain_to_stream_optimized(tmp_path, qemu: Qemu):
    base = tmp_path / "base.vmdk"
    qemu.create(base, 24 * M, fmt="vmdk")
    qemu.io(base, "write -P 0x41 0 3M", "write -P 0x42 10M 1M", fmt="vmdk")
    top = tmp_path / "delta.vmdk"
    qemu.create(top, 24 * M, fmt="vmdk", backing=base.name, backing_fmt="vmdk")
    qemu.io(top, "write -P 0x51 1M 64k", "write -z 10M 512k", "write -P 0x53 20M 4k", fmt="vmdk")
    flat = qemu.to_raw(top, tmp_path / "flat.raw")
    out = tmp_path / "flat.vmdk"
    flatfs("convert", "-O", "vmdk", "-o", "subformat=streamOptimized,adapter_type=ide,hwversion=21", top, out)
    want = check_output(qemu, flat, top, out, "vmdk", GRAIN)
    assert libvmdk(out) == want
    raw = out.read_bytes()
    d = descriptor(raw)
    assert (d["ddb.adapterType"], d["ddb.virtualHWVersion"], d["ddb.geometry.heads"]) == ("ide", "21", "16")
    assert walk_stream(raw, want)["grains"] == (3 * M - 64 * 1024) // (64 * 1024) + 1 + 8 + 1


@pytest.mark.parametrize("sub", ["monolithicSparse", "streamOptimized"])
def test_cost_grows_with_data_not_size(tmp_path, qemu: Qemu, sub):
    assert_cost_follows_data(qemu, tmp_path, "vmdk", "-o", f"subformat={sub}")


@pytest.mark.parametrize(
    "args, words",
    [
        (["-c"], "-c/--compress"),
        (["-o", "adapter_type=scsi"], "-o adapter_type"),
        (["-o", "hwversion=new"], "-o hwversion"),
        (["-o", "subformat=monolithicFlat"], "-o subformat"),
    ],
)
def test_bad_options_are_usage_errors(tmp_path, args, words):
    src = write_sparse_raw(tmp_path / "src.raw", M, [(0, pattern(4096, 1))])
    one_line_error(["convert", "-O", "vmdk", *args, src, tmp_path / "o.vmdk"], words, status=2)

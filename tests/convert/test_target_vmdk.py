"""`convert -O vmdk`: monolithicSparse and streamOptimized, read back by qemu-img and libvmdk; the
stream's markers, grain directory at the end, footer and end-of-stream asserted from the bytes."""

from __future__ import annotations

import re

import pytest

from ..helpers.cli import flatfs, one_line_error
from ..helpers.images import M, pattern, write_sparse_raw
from ..helpers.qemu import Qemu
from ..helpers.targets import assert_cost_follows_data, check_output, convert_checked
from ..helpers.vmdk_target import GRAIN, descriptor, libvmdk, walk_stream


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
        (["-o", "subformat=twoGbMaxExtentSparse"], "-o subformat"),
    ],
)
def test_bad_options_are_usage_errors(tmp_path, args, words):
    src = write_sparse_raw(tmp_path / "src.raw", M, [(0, pattern(4096, 1))])
    one_line_error(["convert", "-O", "vmdk", *args, src, tmp_path / "o.vmdk"], words, status=2)


@pytest.mark.parametrize("fmt", ["vmdk", "vhdx"])
def test_an_empty_source_is_refused_in_one_line(tmp_path, fmt):
    src = tmp_path / "empty.raw"
    src.write_bytes(b"")
    one_line_error(["convert", "-O", fmt, src, tmp_path / "out"], "the source is empty")
    assert not (tmp_path / "out").exists()


def test_a_name_the_descriptor_cannot_hold_is_refused(tmp_path):
    src = write_sparse_raw(tmp_path / "src.raw", M, [(0, pattern(4096, 1))])
    one_line_error(["convert", "-O", "vmdk", src, tmp_path / 'a"b.vmdk'], "quotes or line breaks")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src.raw"]


def test_qcow2_chain_to_monolithic_flat(tmp_path, qemu: Qemu, qcow2_chain):
    top, flat = qcow2_chain
    out = tmp_path / "disk.vmdk"
    flatfs("convert", "-O", "vmdk", "-o", "subformat=monolithicFlat,adapter_type=ide", top, out)
    extent = tmp_path / "disk-flat.vmdk"
    want = flat.read_bytes()
    assert qemu.img("compare", "-F", "vmdk", flat, out, check=False).returncode == 0
    assert libvmdk(out) == want
    text = out.read_text()
    assert 'createType="monolithicFlat"' in text and "parentCID=ffffffff" in text
    assert f'RW {len(want) // 512} FLAT "disk-flat.vmdk" 0' in text and 'ddb.adapterType = "ide"' in text
    assert extent.read_bytes() == want and extent.stat().st_blocks * 512 < len(want)  # sparse
    assert sorted(p.name for p in tmp_path.iterdir()) == ["disk-flat.vmdk", "disk.vmdk"]


def test_monolithic_flat_extent_is_never_replaced_without_force(tmp_path, qcow2_chain):
    top = qcow2_chain[0]
    (tmp_path / "disk-flat.vmdk").write_bytes(b"keep")
    args = ["convert", "-O", "vmdk", "-o", "subformat=monolithicFlat", top, tmp_path / "disk.vmdk"]
    one_line_error(args, "disk-flat.vmdk: already exists")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["disk-flat.vmdk"]
    assert (tmp_path / "disk-flat.vmdk").read_bytes() == b"keep"
    flatfs(*args[:-2], "--force", *args[-2:])
    assert (tmp_path / "disk-flat.vmdk").stat().st_size == qcow2_chain[1].stat().st_size
    # a flat extent the source reads is refused even with --force
    one_line_error(
        [
            "convert",
            "-O",
            "vmdk",
            "-o",
            "subformat=monolithicFlat",
            "--force",
            tmp_path / "disk.vmdk",
            tmp_path / "disk.vmdk",
        ],
        "part of the chain",
    )

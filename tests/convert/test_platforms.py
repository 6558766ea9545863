"""`convert --for PLATFORM` and `measure --for`: each platform's rules, checked from the bytes and
by readers that are not flatfs (qemu-img, libvhdi, libvmdk, dissect, GNU tar)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from flatfs.cli.convert import PLATFORMS
from flatfs.convert.profiles import names

from ..helpers.cli import flatfs, one_line_error
from ..helpers.images import K, M, pattern, write_sparse_raw
from ..helpers.qemu import Qemu
from ..helpers.targets import check_output, data_ranges
from ..helpers.vhd_writer import checksum
from ..helpers.vhdx_images import libvhdi_read, three_layers
from ..helpers.vmdk_target import GRAIN, libvmdk, walk_stream

GiB = 1 << 30


def padded(path: Path, data: bytes, size: int) -> Path:
    """``data`` followed by zeros up to ``size``, as a sparse raw file (what a rounded-up image reads)."""
    with open(path, "wb") as f:
        f.write(data)
        f.truncate(size)
    return path


def test_the_cli_lists_every_profile_in_order():
    assert PLATFORMS == names()


def test_azure_from_a_hyperv_checkpoint_chain(tmp_path, qemu: Qemu):
    top, _paths, model = three_layers(tmp_path)  # 12 MiB: already whole MiB; add a sector to round
    src = tmp_path / "odd.raw"
    padded(src, bytes(model.data) + pattern(0x77, 512), len(model.data) + 512)
    for source, data in ((top, bytes(model.data)), (src, src.read_bytes())):
        out = tmp_path / f"{source.stem}.vhd"
        res = flatfs("convert", "--for", "azure", source, out)
        size = -(-len(data) // M) * M
        assert ("rounded up" in res.stderr) == (size != len(data)), res.stderr
        raw = out.read_bytes()
        # Azure's rule, from the bytes: file = virtual size + 512, virtual a whole number of MiB
        assert len(raw) == size + 512 and size % M == 0
        foot = raw[-512:]
        assert foot[:8] == b"conectix" and int.from_bytes(foot[60:64], "big") == 2  # fixed
        assert int.from_bytes(foot[48:56], "big") == size  # current size, never a CHS rounding
        assert int.from_bytes(foot[64:68], "big") == checksum(foot[:64] + bytes(4) + foot[68:])
        expected = padded(tmp_path / f"{source.stem}.expected", data, size)
        want = check_output(qemu, expected, source, out, "vpc")
        assert libvhdi_read([out]) == want


def test_gcp_archive_is_a_gnu_sparse_tar_of_disk_raw(tmp_path):
    size = 40 * M + 4 * K  # rounded up to 1 GiB
    src = write_sparse_raw(
        tmp_path / "src.raw",
        size,
        [(0, pattern(300 * K, 1)), (3 * M + 512, pattern(5000, 2)), (33 * M, bytes(64 * K) + pattern(K, 3))]
        + [(20 * M + i * 64 * K, pattern(512, 10 + i)) for i in range(30)],  # > 4 + 21 map entries
    )
    out = tmp_path / "disk.tar.gz"
    flatfs("convert", "--for", "gcp", src, out)
    listing = subprocess.run(["tar", "-tvzf", out], capture_output=True, text=True, check=True).stdout
    assert listing.split()[2] == str(GiB) and listing.split()[-1] == "disk.raw", listing
    raw = subprocess.run(["gzip", "-dc", out], capture_output=True, check=True).stdout
    assert raw[156:157] == b"S" and raw[257:265] == b"ustar  \0"  # oldgnu, a sparse member
    assert len(raw) < 2 * M  # only the data is in the archive
    x = tmp_path / "x"
    x.mkdir()
    subprocess.run(["tar", "--sparse", "-xzf", out, "-C", x], check=True)
    disk = x / "disk.raw"
    assert disk.stat().st_size == GiB and disk.stat().st_blocks * 512 < 4 * M  # with holes
    with open(disk, "rb") as f:
        assert f.read(size) == src.read_bytes() and f.read(4 * M) == bytes(4 * M)
    m = json.loads(flatfs("measure", "--output=json", "--for", "gcp", src).stdout)
    assert m["required"] >= out.stat().st_size


def test_vsphere_from_a_vmdk_delta_chain(tmp_path, qemu: Qemu):
    base = tmp_path / "base.vmdk"
    qemu.create(base, 8 * M, fmt="vmdk")
    qemu.io(base, "write -P 0x41 0 2M", fmt="vmdk")
    top = tmp_path / "delta.vmdk"
    qemu.create(top, 8 * M, fmt="vmdk", backing=base.name, backing_fmt="vmdk")
    qemu.io(top, "write -P 0x51 1M 64k", "write -P 0x52 6M 4k", fmt="vmdk")
    flat = qemu.to_raw(top, tmp_path / "flat.raw")
    out = tmp_path / "vsphere.vmdk"
    flatfs("convert", "--for", "vsphere", "-o", "adapter_type=pvscsi", top, out)
    want = check_output(qemu, flat, top, out, "vmdk", GRAIN)
    assert libvmdk(out) == want
    walk_stream(out.read_bytes(), want)  # version 3, markers, GD at the end, footer, EOS
    assert b'ddb.adapterType = "pvscsi"' in out.read_bytes()[512 : 21 * 512]


@pytest.mark.parametrize(
    "platform, fmt", [("aws", "vmdk"), ("hyperv", "vhdx"), ("virtualbox", "vdi"), ("azure", "vpc")]
)
def test_qcow2_chain_for_every_other_platform(tmp_path, qemu: Qemu, qcow2_chain, platform, fmt):
    top, flat = qcow2_chain
    out = tmp_path / f"out.{fmt}"
    flatfs("convert", "--for", platform, top, out)
    check_output(qemu, flat, top, out, fmt, GRAIN)
    info = json.loads(qemu.img("info", "--output=json", "-f", fmt, out).stdout)
    sub = {"aws": "streamOptimized"}.get(platform)
    if sub:
        assert info["format-specific"]["data"]["create-type"] == sub
    m = json.loads(flatfs("measure", "--output=json", "--for", platform, top).stdout)
    assert m["required"] >= os.stat(out).st_size
    assert data_ranges(out, fmt)


@pytest.mark.parametrize(
    "args, words",
    [
        (["--for", "azure", "-O", "vhdx"], "contradicts -O vhdx"),
        (["--for", "azure", "-O", "qcow2"], "contradicts -O qcow2"),
        (["--for", "azure", "-o", "subformat=dynamic"], "contradicts -o subformat=dynamic"),
        (["--for", "vsphere", "-o", "subformat=monolithicSparse"], "-o subformat"),
        (["--for", "gcp", "-n"], "-n/--no-create"),
        (["--for", "aws", "-c"], "-c/--compress"),
    ],
)
def test_a_contradicting_option_is_refused(tmp_path, args, words):
    src = write_sparse_raw(tmp_path / "src.raw", M, [(0, pattern(4096, 1))])
    one_line_error(["convert", *args, src, tmp_path / "out"], words, status=2)
    assert not (tmp_path / "out").exists()


def test_progress_and_json_summary_of_a_writer_format(tmp_path):
    src = write_sparse_raw(
        tmp_path / "src.raw", 9 * M + 512, [(0, pattern(3 * M, 1)), (8 * M, pattern(K, 2))]
    )
    out = tmp_path / "out.vhdx"
    res = flatfs("convert", "-p", "--output=json", "--for", "hyperv", src, out)
    s = json.loads(res.stdout)
    assert s["format"] == "vhdx" and s["virtual-size"] == 9 * M + 512 and s["data-read"] == 3 * M + 4 * K
    assert s["file-size"] == out.stat().st_size and s["bytes-written"] >= 3 * M + K
    assert "data-clusters" not in s  # qcow2's figures only for qcow2
    assert "100.0%" in res.stderr.splitlines()[-1] and "\r" not in res.stderr


def test_qcow2_chain_for_gcp(tmp_path, qcow2_chain):
    top, flat = qcow2_chain
    out = tmp_path / "disk.tar.gz"
    flatfs("convert", "--for", "gcp", top, out)
    subprocess.run(["tar", "--sparse", "-xzf", out, "-C", tmp_path], check=True)
    disk = tmp_path / "disk.raw"
    want = flat.read_bytes()
    assert disk.stat().st_size == GiB and disk.stat().st_blocks * 512 < len(want) + 4 * M
    with open(disk, "rb") as f:
        assert f.read(len(want)) == want

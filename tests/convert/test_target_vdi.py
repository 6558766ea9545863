"""`convert -O vdi`: dynamic and static VirtualBox images, read back by qemu-img and dissect; the
header fields asserted from the bytes."""

from __future__ import annotations

import struct

import pytest

from ..helpers.cli import flatfs, one_line_error
from ..helpers.images import M, pattern, write_sparse_raw
from ..helpers.qemu import Qemu
from ..helpers.targets import assert_cost_follows_data, check_output, convert_checked
from ..helpers.vdi_chains import dissect_read, snapshot_chain


def header_facts(raw: bytes, data: bytes) -> dict[str, object]:
    """VDICore.h's fields, from the bytes; the block map checked against the guest's data."""
    assert raw[:40] == b"<<< Oracle VM VirtualBox Disk Image >>>\n"
    sig, version, hsize, kind, flags = struct.unpack_from("<IIIII", raw, 64)
    assert (sig, version, hsize, flags) == (0xBEDA107F, 0x00010001, 0x190, 0)
    bmap, start = struct.unpack_from("<II", raw, 340)
    sector = struct.unpack_from("<I", raw, 360)[0]
    size, block, extra, blocks, allocated = struct.unpack_from("<QIIII", raw, 368)
    create, modify, linkage, pmodify = (raw[392 + 16 * i : 408 + 16 * i] for i in range(4))
    assert bmap % M == 0 and start % M == 0 and sector == 512 and extra == 0
    assert size == len(data) and block == M and blocks == -(-size // M)
    assert create != bytes(16) and linkage == pmodify == bytes(16) and modify != bytes(16)
    entries = struct.unpack_from(f"<{blocks}I", raw, bmap)
    used = [e for e in entries if e != 0xFFFFFFFF]
    assert len(used) == allocated and sorted(used) == list(range(allocated))
    for b, e in enumerate(entries):
        if e == 0xFFFFFFFF:
            assert data[b * M : (b + 1) * M].count(0) == len(data[b * M : (b + 1) * M]), b
    return {"type": kind, "allocated": allocated, "create": create}


@pytest.mark.parametrize("sub, kind", [("dynamic", 1), ("static", 2)])
def test_qcow2_chain_to_vdi(tmp_path, qemu: Qemu, qcow2_chain, sub, kind):
    out = tmp_path / "out.vdi"
    _, want = convert_checked(qemu, qcow2_chain, out, "vdi", "-o", f"subformat={sub}")
    assert "No errors" in qemu.img("check", "-f", "vdi", out).stdout
    assert dissect_read([out], len(want)) == want
    facts = header_facts(out.read_bytes(), want)
    assert facts["type"] == kind
    if sub == "dynamic":
        again = tmp_path / "again.vdi"
        flatfs("convert", "-O", "vdi", qcow2_chain[0], again)
        assert header_facts(again.read_bytes(), want)["create"] != facts["create"]  # a fresh UUID


def test_virtualbox_snapshot_chain_to_vdi(tmp_path, qemu: Qemu):
    paths, _imgs, want = snapshot_chain(tmp_path / "VM", 3, registry=True)
    expected = tmp_path / "expected.raw"
    expected.write_bytes(want)
    out = tmp_path / "flat.vdi"
    flatfs("convert", "-O", "vdi", paths[-1], out)
    check_output(qemu, expected, paths[-1], out, "vdi")
    assert dissect_read([out], len(want)) == want
    header_facts(out.read_bytes(), want)


def test_cost_grows_with_data_not_size(tmp_path, qemu: Qemu):
    assert_cost_follows_data(qemu, tmp_path, "vdi")


def test_bad_subformat_is_a_usage_error(tmp_path):
    src = write_sparse_raw(tmp_path / "src.raw", M, [(0, pattern(4096, 1))])
    one_line_error(
        ["convert", "-O", "vdi", "-o", "subformat=fixed", src, tmp_path / "o.vdi"], "-o subformat", status=2
    )

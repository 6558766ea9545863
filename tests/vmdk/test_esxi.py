"""ESXi's disks: vmfsSparse (COWD) and seSparse deltas, the VMFS createTypes, the chain as ESXi lays it out.

QEMU reads both delta kinds but cannot make them: tests/helpers/esxi_writer.py
writes them by hand, and every image is checked against qemu-img (map, both
converts, compare) and against the composition the writer intended.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from flatfs import OpenOptions, open_chain

from ..helpers.cli import error_line, flatfs
from ..helpers.esxi_writer import (
    UNMAPPED,
    ZERO,
    compose,
    esxi_chain,
    write_cowd,
    write_descriptor,
    write_sesparse,
    write_thin_flat,
)
from ..helpers.qemu import Qemu, assert_matches_qemu
from ..helpers.vmdk_oracle import checks_out

M = 1 << 20
pytestmark = pytest.mark.qemu


def _reads(img: Path, **kw: bool) -> bytes:
    with open_chain(img, OpenOptions(**kw)) as chain:
        return chain.pread(0, chain.size)


def test_a_vmfssparse_extent_with_grains_and_tables_out_of_order(qemu: Qemu, tmp_path: Path) -> None:
    size = 40 * M + 1536  # the last grain table partial, the last grain too
    grains = {
        0: b"\x11" * 4096,
        1: b"\x12" * 4096,
        9: b"\x13" * 10,
        4096: b"\x14" * 4096,
        10240: b"\x15" * 1536,
    }
    want = compose(size, [(4096, write_cowd(tmp_path / "d-delta.vmdk", size, grains, shuffle=5))])
    img = write_descriptor(tmp_path / "d.vmdk", "vmfsSparse", [(size // 512, "VMFSSPARSE", "d-delta.vmdk")])
    checks_out(qemu, img, tmp_path)
    assert _reads(img) == want
    # the extent alone reads the same (QEMU cannot open one alone: it looks for a CID at 0x200)
    assert _reads(tmp_path / "d-delta.vmdk") == want


def test_a_vmfssparse_extent_of_one_sector_grains(qemu: Qemu, tmp_path: Path) -> None:
    size = 4 * M
    grains = {0: b"\x21" * 512, 3: b"\x22" * 512, 4097: b"\x23" * 512}
    want = compose(size, [(512, write_cowd(tmp_path / "d-delta.vmdk", size, grains, grain_sectors=1))])
    img = write_descriptor(tmp_path / "d.vmdk", "vmfsSparse", [(size // 512, "VMFSSPARSE", "d-delta.vmdk")])
    checks_out(qemu, img, tmp_path)
    assert _reads(img) == want


def test_a_sesparse_extent_with_zero_and_unmapped_grains(qemu: Qemu, tmp_path: Path) -> None:
    size = 48 * M
    grains = {
        0: b"\x31" * 4096,
        1: ZERO,
        2: UNMAPPED,
        3: b"\x32" * 4096,
        4096 * 2: b"\x33" * 4096,
        4096 * 2 + 4095: b"\x34" * 4096,
        4096 + 5: b"\x35" * 7,
    }
    want = compose(size, [(4096, write_sesparse(tmp_path / "d-sesparse.vmdk", size, grains, first=4093))])
    img = write_descriptor(tmp_path / "d.vmdk", "seSparse", [(size // 512, "SESPARSE", "d-sesparse.vmdk")])
    checks_out(qemu, img, tmp_path)
    assert _reads(img) == want
    with open_chain(img) as chain:
        kinds = {(e.start, e.kind.value) for e in chain.layers[0].extents(0, 4 * 4096)}
    assert kinds == {(0, "data"), (4096, "zero"), (12288, "data")}  # zero and unmapped: zeros here
    # the extent alone reads the same (QEMU does not recognise one alone)
    assert _reads(tmp_path / "d-sesparse.vmdk") == want
    assert "create type:   seSparse" in flatfs("info", tmp_path / "d-sesparse.vmdk").stdout


def test_the_esxi_chain_as_copied_off_a_datastore(qemu: Qemu, tmp_path: Path) -> None:
    top, want, twin = esxi_chain(tmp_path, 48 * M, ("vmfsSparse", "vmfsSparse", "seSparse"))
    assert twin is not None
    checks_out(qemu, twin, tmp_path)  # QEMU reads the twin (createType vmfs, relative hints)
    assert _reads(twin) == want
    assert _reads(top) == want
    info = json.loads(flatfs("info", "--output=json", top).stdout)
    text = json.dumps(info)
    assert "the bare file name, in the image's folder" in text, text
    assert "/vmfs/volumes/datastore1/vm/vm-000002.vmdk" in text
    for t in ("SESPARSE", "VMFSSPARSE", "vmfsThin", "VMFS"):
        assert t in text
    # measure as qemu-img measures the twin
    ours = flatfs("measure", "-O", "qcow2", top).stdout
    assert ours == qemu.img("measure", "-O", "qcow2", twin, cwd=tmp_path).stdout


def test_a_qcow2_overlay_on_an_esxi_chain(qemu: Qemu, tmp_path: Path) -> None:
    _top, want, twin = esxi_chain(tmp_path, 32 * M, ("seSparse", "vmfsSparse"))
    assert twin is not None
    ov = qemu.create(tmp_path / "over.qcow2", 32 * M, backing=twin.name, backing_fmt="vmdk")
    qemu.io(ov, "write -P 0x77 1M 64k", fmt="qcow2")
    assert_matches_qemu(qemu, ov, tmp_path, qemu_fmt="qcow2")
    got = _reads(ov)
    assert got[M : M + 65536] == b"\x77" * 65536
    assert got[:M] == want[:M] and got[M + 65536 :] == want[M + 65536 :]


def test_a_wrong_parent_cid_is_refused_unless_ignored(tmp_path: Path) -> None:
    top, want, _ = esxi_chain(tmp_path, 16 * M, ("vmfsSparse",), twin=False)
    top.write_text(top.read_text().replace("parentCID=b0000001", "parentCID=0badc1d0"))
    line = error_line("map", top)
    assert "0badc1d0" in line and "b0000001" in line and "--ignore-parent-id" in line, line
    assert "MISMATCH" in flatfs("info", top).stdout
    assert _reads(top, ignore_parent_id=True) == want


def test_a_thin_flat_base_keeps_its_holes(qemu: Qemu, tmp_path: Path) -> None:
    size = 1 << 40  # 1 TiB, a few MiB of it data
    write_thin_flat(tmp_path / "big-flat.vmdk", size, {0: b"\x01" * M, size - M: b"\x02" * M}, image=False)
    img = write_descriptor(tmp_path / "big.vmdk", "vmfsThin", [(size // 512, "VMFS", "big-flat.vmdk")])
    out = json.loads(flatfs("map", "--output=json", img).stdout)
    data = [(e["start"], e["length"]) for e in out if e["data"]]
    assert data == [(0, M), (size - M, M)], data
    dst = tmp_path / "out.raw"
    flatfs("convert", "-O", "raw", img, dst)
    assert dst.stat().st_size == size and dst.stat().st_blocks * 512 <= 8 * M
    with open(dst, "rb") as f:
        assert f.read(M) == b"\x01" * M
        f.seek(size - M)
        assert f.read() == b"\x02" * M
    os.unlink(dst)


@pytest.mark.parametrize("ct", ["vmfsPreallocated", "vmfsEagerZeroedThick", "vmfs"])
def test_the_vmfs_flat_create_types_read_as_flat(qemu: Qemu, tmp_path: Path, ct: str) -> None:
    want = write_thin_flat(tmp_path / "f-flat.vmdk", 4 * M, {4096: b"\x09" * 8192})
    img = write_descriptor(tmp_path / "f.vmdk", ct, [(4 * M // 512, "VMFS", "f-flat.vmdk")])
    assert _reads(img) == want


@pytest.mark.parametrize(
    ("ct", "etype"),
    [
        ("vmfsRawDeviceMap", "VMFS"),
        ("vmfsPassthroughRawDeviceMap", "VMFS"),
        ("vmfsRaw", "VMFS"),
        ("vmfs", "VMFSRDM"),
    ],
)
def test_raw_device_mappings_are_refused_by_name(tmp_path: Path, ct: str, etype: str) -> None:
    (tmp_path / "rdm-rdmp.vmdk").write_bytes(bytes(4096))
    img = write_descriptor(tmp_path / "rdm.vmdk", ct, [(8, etype, "rdm-rdmp.vmdk")])
    line = error_line("info", img)
    assert (ct if etype == "VMFS" else etype) in line and "LUN" in line, line


def test_a_sesparse_disk_needing_its_journal_replayed_is_refused(tmp_path: Path) -> None:
    write_sesparse(tmp_path / "d-sesparse.vmdk", 16 * M, {0: b"\x01" * 4096}, replay=True)
    img = write_descriptor(tmp_path / "d.vmdk", "seSparse", [(16 * M // 512, "SESPARSE", "d-sesparse.vmdk")])
    line = error_line("convert", "-O", "raw", img, tmp_path / "out.raw")
    assert "journal must be replayed" in line and "(at 0x218)" in line, line
    assert not (tmp_path / "out.raw").exists()


def test_a_sesparse_version_other_than_2_1_is_refused_by_name(tmp_path: Path) -> None:
    ext = tmp_path / "d-sesparse.vmdk"
    write_sesparse(ext, 16 * M, {0: b"\x01" * 4096})
    with open(ext, "r+b") as f:
        f.seek(8)
        f.write((0x0000000300000001).to_bytes(8, "little"))
    img = write_descriptor(tmp_path / "d.vmdk", "seSparse", [(16 * M // 512, "SESPARSE", ext.name)])
    line = error_line("info", img)
    assert "seSparse version 3.1 is not supported" in line and "(at 0x8)" in line, line

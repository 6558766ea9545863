"""Hand-written descriptors and chains qemu-img does not write in one step: RDONLY, ZERO and
VMFS extent lines, Windows-style parent names, and split (2 GB) bases under a delta.

Where QEMU reads the same files, flatfs is checked against it (map, converts compared and
checked by qemu-img). Where QEMU departs from the specification (it skips extent lines that
are not RW, and ZERO lines, so its disk is shorter than the descriptor says: docs/qemu-compat.md),
the test pins what each tool reads.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from flatfs import open_chain
from flatfs.extents import Kind

from ..helpers.cli import error_line
from ..helpers.mounts import Mounter, seek_walk
from ..helpers.qemu import Qemu, data_extents, qemu_map
from ..helpers.vmdk_oracle import checks_out, create, set_parent_hint

K = 1024
M = 1 << 20
G = 1 << 30
BIG = 2 * G + 5 * M + 1536  # two 2 GiB extents, the last grain partial

pytestmark = pytest.mark.qemu


def _raw(path: Path, size: int, *writes: tuple[int, bytes]) -> Path:
    """A sparse raw file of ``size`` bytes holding ``writes`` (offset, bytes)."""
    with open(path, "wb") as f:
        f.truncate(size)
        for at, b in writes:
            f.seek(at)
            f.write(b)
    return path


def _descriptor(path: Path, create_type: str, *extent_lines: str) -> Path:
    path.write_text(
        "# Disk DescriptorFile\nversion=1\nCID=0badc0de\nparentCID=ffffffff\n"
        f'createType="{create_type}"\n\n# Extent description\n'
        + "".join(f"{ln}\n" for ln in extent_lines)
        + '\nddb.virtualHWVersion = "4"\nddb.geometry.cylinders = "4"\n'
    )
    return path


def test_flat_and_vmfs_extents_read_like_qemu(qemu: Qemu, tmp_path: Path) -> None:
    _raw(tmp_path / "a.raw", 2 * M, (0, b"\x11" * 5000), (M + 512, b"\x12" * 512))
    _raw(tmp_path / "b.raw", 3 * M, (M, b"\x21" * 64 * K), (3 * M - 512, b"\x22" * 512))
    flat = _descriptor(
        tmp_path / "flat.vmdk",
        "monolithicFlat",
        'RW 2048 FLAT "a.raw" 2048',  # the second MiB of a.raw (offset in sectors)
        'RW 4096 FLAT "b.raw" 0',  # 2 MiB of b.raw, then 1 MiB past its end (zeros)
    )
    checks_out(qemu, flat, tmp_path)
    vmfs = _descriptor(tmp_path / "vmfs.vmdk", "vmfs", 'RW 8192 VMFS "b.raw"')
    checks_out(qemu, vmfs, tmp_path)
    with open_chain(flat) as chain:
        assert chain.size == 3 * M
        assert chain.pread(512, 512) == b"\x12" * 512
        assert chain.pread(M + M, 64 * K) == b"\x21" * 64 * K
    with open_chain(vmfs) as chain:
        assert chain.pread(3 * M - 512, 1024) == b"\x22" * 512 + bytes(512)
        assert chain.layers[0].info()["extents"][0]["type"] == "VMFS"


def test_rdonly_and_zero_extents_read_as_the_specification_says(qemu: Qemu, tmp_path: Path) -> None:
    a = b"\x31" * M
    b = b"\x32" * M
    c = b"\x33" * M
    _raw(tmp_path / "a.raw", M, (0, a))
    _raw(tmp_path / "b.raw", M, (0, b))
    _raw(tmp_path / "c.raw", M, (0, c))
    img = _descriptor(
        tmp_path / "mixed.vmdk",
        "monolithicFlat",
        'RW 2048 FLAT "a.raw" 0',
        'RDONLY 2048 FLAT "b.raw" 0',
        "RW 2048 ZERO",
        'RW 2048 FLAT "c.raw" 0',
    )
    # flatfs: every extent, in order; the ZERO extent reads zeros and is mapped as zeros
    with open_chain(img) as chain:
        assert chain.size == 4 * M
        assert chain.pread(0, 4 * M) == a + b + bytes(M) + c
        kinds = [(e.start, e.length, e.kind) for e in chain.extents()]
        assert (2 * M, M, Kind.ZERO) in kinds
        assert [x["access"] for x in chain.layers[0].info()["extents"]] == ["RW", "RDONLY", "RW", "RW"]
    # QEMU skips the RDONLY and the ZERO line: its disk is a + c (documented in docs/qemu-compat.md)
    ref = qemu.to_raw(img, tmp_path / "qemu.raw").read_bytes()
    assert ref == a + c, "QEMU now reads RDONLY/ZERO extent lines: update docs/qemu-compat.md"
    # the same disk with every line RW and no ZERO line: flatfs and QEMU agree exactly
    same = _descriptor(
        tmp_path / "rw.vmdk", "monolithicFlat", 'RW 2048 FLAT "a.raw" 0', 'RW 2048 FLAT "c.raw" 0'
    )
    checks_out(qemu, same, tmp_path)


def _chain_in(qemu: Qemu, folder: Path, name: str = "base.vmdk", fill: int = 0x41) -> tuple[Path, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    base = create(qemu, folder / name, 16 * M, "monolithicSparse")
    qemu.io(base, f"write -P {fill} 0 4M", f"write -P {fill + 1} 8M 1M", fmt="vmdk")
    return base, folder


def test_windows_parent_names_resolve_through_the_chain_lookup(qemu: Qemu, tmp_path: Path) -> None:
    vms = tmp_path / "vms"
    base, _ = _chain_in(qemu, vms)
    top = create(qemu, vms / "top.vmdk", 16 * M, "monolithicSparse", backing=base)
    qemu.io(top, "write -P 0x50 1M 64k", "write -P 0x51 10M 4k", fmt="vmdk")
    ref = qemu.to_raw(top, tmp_path / "ref.raw").read_bytes()
    for hint in ("C:\\VMs\\base.vmdk", ".\\base.vmdk"):
        set_parent_hint(top, hint)
        with open_chain(top) as chain:
            assert [lay.path for lay in chain.layers] == [str(top), str(base)], hint
            assert chain.pread(0, chain.size) == ref, hint


def test_a_relative_windows_parent_name_wins_over_the_bare_name(qemu: Qemu, tmp_path: Path) -> None:
    """``..\\other\\base.vmdk`` is tried as ../other/base.vmdk first; the bare name (a
    base.vmdk next to the child) only last."""
    other, _ = _chain_in(qemu, tmp_path / "other")
    top = create(qemu, tmp_path / "other" / "top.vmdk", 16 * M, "monolithicSparse", backing=other)
    qemu.io(top, "write -P 0x50 1M 64k", fmt="vmdk")
    ref = qemu.to_raw(top, tmp_path / "ref.raw").read_bytes()
    vms = tmp_path / "vms"
    vms.mkdir()
    moved = vms / "top.vmdk"
    os.rename(top, moved)
    set_parent_hint(moved, "..\\other\\base.vmdk")
    # a decoy next to the child, with other content (and another CID)
    _chain_in(qemu, vms, fill=0x61)
    with open_chain(moved) as chain:
        assert os.path.realpath(chain.layers[1].path) == str(other)
        assert chain.pread(0, chain.size) == ref
    # without ../other/base.vmdk, the bare name is what is left: the decoy, refused by its CID
    os.rename(other, tmp_path / "other" / "gone.vmdk")
    line = error_line("map", moved)
    assert "vmdk-cid" in line and "--ignore-parent-id" in line, line
    # nothing resolves: every tried path is named
    os.unlink(vms / "base.vmdk")
    line = error_line("map", moved)
    assert "not found" in line, line
    for tried in (str(vms / ".." / "other" / "base.vmdk"), str(vms / "base.vmdk")):
        assert tried in line, line


@pytest.mark.parametrize("base_format", ["twoGbMaxExtentFlat", "twoGbMaxExtentSparse"])
def test_a_split_base_under_a_sparse_delta(qemu: Qemu, tmp_path: Path, base_format: str) -> None:
    base = create(qemu, tmp_path / "base.vmdk", BIG, base_format)
    qemu.io(
        base,
        "write -P 0x10 0 1M",
        f"write -P 0x11 {2 * G - 64 * K} 128k",  # straddles the first extent's end
        f"write -P 0x12 {BIG - 1536} 1536",
        fmt="vmdk",
    )
    top = create(qemu, tmp_path / "base-000001.vmdk", BIG, "monolithicSparse", backing=base)
    qemu.io(top, "write -P 0x20 512k 64k", f"write -P 0x21 {2 * G} 4k", "write -P 0x22 5M 64k", fmt="vmdk")
    checks_out(qemu, top, tmp_path)
    with open_chain(top) as chain:
        assert len(chain.layers) == 2
        assert len(chain.layers[1].info()["extents"]) == 2


@pytest.mark.fuse
def test_mounted_flat_split_base_under_a_delta(qemu: Qemu, tmp_path: Path, mounter: Mounter) -> None:
    base = create(qemu, tmp_path / "base.vmdk", 40 * M + 1536, "twoGbMaxExtentFlat")
    qemu.io(base, "write -P 0x10 0 3M", "write -P 0x11 20M 1M", fmt="vmdk")
    top = create(qemu, tmp_path / "top.vmdk", 40 * M + 1536, "monolithicSparse", backing=base)
    qemu.io(top, "write -P 0x20 1M 64k", "write -P 0x21 30M 4k", fmt="vmdk")
    ref = qemu.to_raw(top, tmp_path / "ref.raw").read_bytes()
    qdata = data_extents(qemu_map(qemu, top))
    set_parent_hint(top, ".\\base.vmdk")  # QEMU does not read this name; flatfs does
    view = mounter.mount(top)
    assert view.read_bytes() == ref
    # the flat base is data all through (its holes read as zeros), for QEMU and flatfs alike
    assert seek_walk(view) == qdata == [(0, len(ref))]
    st = os.stat(view)
    assert st.st_size == len(ref)
    assert st.st_blocks == -(-len(ref) // 512)  # as the walk says: allocated all through

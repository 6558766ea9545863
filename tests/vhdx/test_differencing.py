"""Differencing VHDX chains (QEMU refuses them), written by the test writer.

Oracles: the composition the test wrote (a Model of each layer's content) and
libyal's libvhdi, an independent reader.
"""

from __future__ import annotations

import random
import shutil
import uuid
from pathlib import Path

import pytest

from flatfs import OpenOptions, open_chain
from flatfs.errors import ChainError, CorruptImage, ParentMismatch
from flatfs.extents import Kind
from flatfs.formats.vhdx.layer import VhdxLayer

from ..helpers.cli import flatfs
from ..helpers.qemu import Qemu
from ..helpers.vhdx_images import Model, first_difference, libvhdi_read, pattern, read_all, three_layers
from ..helpers.vhdx_writer import (
    FULLY_PRESENT,
    NOT_PRESENT,
    UNDEFINED,
    UNMAPPED,
    ZERO,
    MiB,
    Parent,
    VhdxImage,
)


@pytest.mark.parametrize("logical", [512, 4096])
def test_three_layers_read_as_written(tmp_path: Path, logical: int) -> None:
    top, _, m = three_layers(tmp_path, logical=logical)
    assert first_difference(read_all(top), bytes(m.data)) is None


@pytest.mark.parametrize("logical", [512, 4096])
def test_three_layers_match_libvhdi(tmp_path: Path, libvhdi, logical: int) -> None:
    top, paths, m = three_layers(tmp_path, logical=logical)
    # libvhdi reads a ZERO or UNMAPPED block of a child from its parent (the deviation
    # pinned below): compare every other block.
    got = read_all(top)
    theirs = libvhdi_read(paths)
    block = MiB
    zero_blocks = {5, 9}  # mid's ZERO block and top's UNMAPPED block, both over base data
    for b in range(len(got) // block):
        s = slice(b * block, (b + 1) * block)
        if b in zero_blocks:
            assert theirs[s] != got[s]  # the deviation is still there: keep the comparison honest
            continue
        assert first_difference(got[s], theirs[s]) is None, f"block {b}"
    assert first_difference(got, bytes(m.data)) is None


def test_libvhdi_reads_a_zero_block_from_the_parent(tmp_path: Path, libvhdi) -> None:
    """Pinned deviation: MS-VHDX says a ZERO block reads zeros; libvhdi reads the parent."""
    base = VhdxImage(4 * MiB)
    base.write(0, pattern(0x44, MiB))
    base.save(tmp_path / "b.vhdx")
    child = VhdxImage(4 * MiB, parent=Parent(base.data_write_guid, relative_path="b.vhdx"))
    child.set_state(0, ZERO)
    child.save(tmp_path / "c.avhdx")
    theirs = libvhdi_read([tmp_path / "c.avhdx", tmp_path / "b.vhdx"])
    assert theirs[:512] == pattern(0x44, 512)  # libvhdi: the parent's bytes
    assert theirs[:MiB].count(0) != MiB
    assert read_all(tmp_path / "c.avhdx")[:MiB].count(0) == MiB  # flatfs: the spec's zeros


def test_map_kinds_and_depths(tmp_path: Path) -> None:
    top, _, m = three_layers(tmp_path)
    with open_chain(top) as chain:
        ext = list(chain.extents())
    assert sum(e.length for e in ext) == 12 * MiB
    at = {e.start: e for e in ext}
    # top's one sector at sector 4, over mid's partial run (sectors 3..7)
    assert at[0].kind is Kind.DATA and at[0].depth == 2 and at[0].length == 3 * 512
    assert at[3 * 512].depth == 1 and at[3 * 512].length == 512
    assert at[4 * 512].depth == 0 and at[4 * 512].length == 512
    assert at[5 * 512].depth == 1
    # mid's ZERO block, under top's straddling write
    z = [e for e in ext if e.start == 5 * MiB][0]
    assert z.kind is Kind.ZERO and z.depth == 1 and z.length == MiB - 512
    # top's UNMAPPED block hides base data
    u = [e for e in ext if e.start == 9 * MiB][0]
    assert u.kind is Kind.ZERO and u.depth == 0 and u.length == MiB
    # never read: blocks nobody holds
    assert any(e.kind is Kind.ABSENT for e in ext)


def test_qemu_refuses_differencing_vhdx(tmp_path: Path, qemu: Qemu) -> None:
    """Recorded for the README: QEMU 7.2 cannot open a differencing VHDX at all."""
    top, _, _ = three_layers(tmp_path)
    r = qemu.img("convert", "-O", "raw", top, tmp_path / "out.raw", check=False)
    assert r.returncode != 0
    assert "not supported" in r.stderr.lower() or "unsupported" in r.stderr.lower(), r.stderr


def test_windows_locators_resolve_and_are_listed(tmp_path: Path) -> None:
    """relative_path is tried first; a relative name with a drive-less .\\ maps onto the child's
    folder; when only absolute Windows paths remain, the bare name in the child's folder is used."""
    base = VhdxImage(2 * MiB)
    base.write(0, pattern(1, MiB))
    base.save(tmp_path / "base.vhdx")
    child = VhdxImage(
        2 * MiB, parent=Parent(base.data_write_guid, absolute_win32_path=r"E:\Somewhere\Else\base.vhdx")
    )
    child.save(tmp_path / "c.avhdx")
    assert read_all(tmp_path / "c.avhdx")[:MiB] == pattern(1, MiB)
    r = flatfs("info", tmp_path / "c.avhdx")
    assert "parent locator" in r.stdout and "absolute_win32_path" in r.stdout
    assert "resolved" in r.stdout
    (tmp_path / "base.vhdx").rename(tmp_path / "moved.vhdx")
    r = flatfs("info", tmp_path / "c.avhdx", check=False)
    assert r.returncode == 1 and len(r.stderr.splitlines()) == 1
    assert str(tmp_path / "base.vhdx") in r.stderr, r.stderr


def test_parent_locator_order_prefers_relative_path(tmp_path: Path) -> None:
    for name, tag in (("a.vhdx", 0xA), ("b.vhdx", 0xB)):
        img = VhdxImage(2 * MiB, data_write_guid=__import__("uuid").UUID(int=7))
        img.write(0, pattern(tag, MiB))
        img.save(tmp_path / name)
    (tmp_path / "sub").mkdir()
    child = VhdxImage(
        2 * MiB,
        parent=Parent(
            __import__("uuid").UUID(int=7), relative_path=r"..\b.vhdx", absolute_win32_path=r"C:\a.vhdx"
        ),
    )
    child.save(tmp_path / "sub" / "c.avhdx")
    # ..\b.vhdx is relative to the child's folder
    assert read_all(tmp_path / "sub" / "c.avhdx")[:MiB] == pattern(0xB, MiB)


def test_parent_identity_mismatch_is_refused_unless_ignored(tmp_path: Path) -> None:
    base = VhdxImage(2 * MiB)
    base.write(0, pattern(1, MiB))
    base.save(tmp_path / "base.vhdx")
    other = VhdxImage(2 * MiB)
    child = VhdxImage(2 * MiB, parent=Parent(other.data_write_guid, relative_path="base.vhdx"))
    child.save(tmp_path / "c.avhdx")
    with pytest.raises(ParentMismatch) as exc:
        read_all(tmp_path / "c.avhdx")
    assert str(other.data_write_guid).upper() in str(exc.value)
    assert str(base.data_write_guid).upper() in str(exc.value)
    r = flatfs("map", tmp_path / "c.avhdx", check=False)
    assert r.returncode == 1 and len(r.stderr.splitlines()) == 1
    assert read_all(tmp_path / "c.avhdx", ignore_parent_id=True)[:MiB] == pattern(1, MiB)


def test_partially_present_without_parent_is_corrupt(tmp_path: Path) -> None:
    img = VhdxImage(2 * MiB, parent=Parent(VhdxImage(1).data_write_guid, relative_path="x.vhdx"))
    img.write(0, pattern(1, 512))
    img.save(tmp_path / "c.avhdx")
    data = bytearray((tmp_path / "c.avhdx").read_bytes())
    # clear HasParent in File Parameters (metadata item 0 at region offset + 64 KiB)
    fp = 2 * MiB + 64 * 1024
    assert data[fp + 4] == 2
    data[fp + 4] = 0
    (tmp_path / "p.vhdx").write_bytes(bytes(data))
    with pytest.raises(CorruptImage, match="partially present in a disk without a parent"):
        read_all(tmp_path / "p.vhdx")


def test_qcow2_overlay_over_a_vhdx_base(tmp_path: Path, qemu: Qemu) -> None:
    qemu.create(tmp_path / "base.vhdx", "16M", fmt="vhdx", opts="subformat=dynamic,block_size=1M")
    qemu.io(tmp_path / "base.vhdx", "write -P 0x61 0 3M", "write -P 0x62 8M 64k", fmt="vhdx")
    qemu.create(tmp_path / "top.qcow2", "16M", backing="base.vhdx", backing_fmt="vhdx")
    qemu.io(tmp_path / "top.qcow2", "write -P 0x71 1M 64k", "write -z 8M 4k")
    ref = qemu.to_raw(tmp_path / "top.qcow2", tmp_path / "ref.raw")
    assert first_difference(read_all(tmp_path / "top.qcow2"), ref.read_bytes()) is None
    with open_chain(tmp_path / "top.qcow2") as chain:
        assert [lay.format for lay in chain.layers] == ["qcow2", "vhdx"]


def test_convert_a_differencing_chain(tmp_path: Path, qemu: Qemu) -> None:
    top, _, m = three_layers(tmp_path)
    r = flatfs("convert", top, tmp_path / "out.qcow2")
    assert r.returncode == 0, r.stderr
    qemu.img("check", tmp_path / "out.qcow2")
    out = qemu.to_raw(tmp_path / "out.qcow2", tmp_path / "out.raw").read_bytes()
    assert first_difference(out, bytes(m.data)) is None


def test_chain_through_a_copy_in_another_folder_by_bare_name(tmp_path: Path) -> None:
    top, paths, m = three_layers(tmp_path)
    d2 = tmp_path / "copy"
    d2.mkdir()
    for p in paths:
        shutil.copy(p, d2 / p.name)
    assert first_difference(read_all(d2 / top.name), bytes(m.data)) is None


def test_a_short_disk_whose_last_block_is_partial(tmp_path: Path) -> None:
    m = Model(3 * MiB + 4096)
    base = VhdxImage(3 * MiB + 4096)
    m.write(base, 3 * MiB, pattern(9, 4096))
    base.save(tmp_path / "b.vhdx")
    child = VhdxImage(3 * MiB + 4096, parent=Parent(base.data_write_guid, relative_path="b.vhdx"))
    m.write(child, 3 * MiB + 512, pattern(8, 512))
    child.save(tmp_path / "c.avhdx")
    assert first_difference(read_all(tmp_path / "c.avhdx"), bytes(m.data)) is None


def test_missing_parent_lists_every_path_tried(tmp_path: Path) -> None:
    child = VhdxImage(
        2 * MiB,
        parent=Parent(
            VhdxImage(1).data_write_guid, relative_path=r".\gone\p.vhdx", absolute_win32_path=r"C:\x\q.vhdx"
        ),
    )
    child.save(tmp_path / "c.avhdx")
    with pytest.raises(ChainError) as exc:
        read_all(tmp_path / "c.avhdx")
    for p in ("gone/p.vhdx", "q.vhdx", str(tmp_path / "p.vhdx")):
        assert p in str(exc.value)
    assert isinstance(OpenOptions(), OpenOptions)


@pytest.mark.parametrize("seed", range(6))
def test_runs_of_equal_entries_end_where_the_states_change(tmp_path: Path, seed: int) -> None:
    """The BAT's bulk path (a whole chunk compared at once, runs of equal no-data entries)
    against the states the writer put in, block by block: runs that stop inside a chunk,
    cross sector-bitmap entries, and sit between blocks with data."""
    bs = 32 * MiB  # chunk ratio 128: 512 blocks are four chunks
    img = VhdxImage(512 * bs, block_size=bs, parent=Parent(uuid.uuid4(), relative_path="p.vhdx"))
    rnd = random.Random(seed)
    want = [Kind.ABSENT] * 512
    block = 0
    while block < 512:
        state = rnd.choice([NOT_PRESENT, ZERO, UNMAPPED, UNDEFINED, FULLY_PRESENT])
        n = 1 if state == FULLY_PRESENT else rnd.choice([1, 2, 5, 60, 127, 128, 129, 300])
        for b in range(block, min(512, block + n)):
            if state == FULLY_PRESENT:
                img.write(b * bs, b"\x01" * 512)
                want[b] = Kind.DATA
            elif state != NOT_PRESENT:
                img.set_state(b, state)
                want[b] = Kind.ZERO
        block += n
    img.save(tmp_path / "c.avhdx")
    with open(tmp_path / "c.avhdx", "rb") as f:
        layer = VhdxLayer(str(tmp_path / "c.avhdx"), f.fileno())
        got: list[set[Kind]] = [set() for _ in range(512)]
        pos = 0
        while pos < layer.size:
            runs = layer.runs(pos, layer.size)
            for e in runs.extents():
                for b in range(e.start // bs, -(-(e.start + e.length) // bs)):
                    got[b].add(e.kind)
            pos = runs.ends[-1]
    assert [Kind.DATA if Kind.DATA in k else k.pop() if len(k) == 1 else k for k in got] == want

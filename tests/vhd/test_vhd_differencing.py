"""Differencing VHD chains (no Linux tool makes them: tests/helpers/vhd_writer.py writes them).

Oracles: the composition the test wrote, and libyal's libvhdi (an independent
reader) where it follows the specification. Also pinned: where libvhdi and
QEMU 7.2 deviate, so that the README's comparison stays true.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from flatfs import OpenOptions, open_chain
from flatfs.errors import ChainError, ParentMismatch
from flatfs.extents import Kind

from ..helpers.cli import flatfs
from ..helpers.qemu import Qemu
from ..helpers.vhd_images import SIZE, M, base_bytes, child, qemu_base
from ..helpers.vhd_writer import DIFFERENCING, Vhd, compose, unique_id_of

pytestmark = pytest.mark.qemu

K = 1 << 10


def chain_bytes(top: Path, **kw) -> bytes:
    with open_chain(top, OpenOptions(**kw)) as chain:
        return chain.pread(0, chain.size)


def libvhdi_bytes(*files: Path) -> bytes:
    """Read a chain with libvhdi, files top first."""
    pyvhdi = pytest.importorskip("pyvhdi")
    opened = []
    for f in files:
        h = pyvhdi.file()
        h.open(str(f))
        opened.append(h)
    for child_h, parent_h in zip(opened, opened[1:]):
        child_h.set_parent(parent_h)
    top = opened[0]
    try:
        return top.read_buffer_at_offset(top.get_media_size(), 0)
    finally:
        for h in opened:
            h.close()


def three_layers(q: Qemu, d: Path) -> tuple[list[Path], list[Vhd]]:
    """base (qemu) <- mid <- top, with whole and partial blocks; writes are 4 KiB aligned
    (whole bitmap bytes) except where a test says otherwise."""
    base = qemu_base(q, d)
    mid = child(base, [(0, b"\x21" * (8 * K)), (3 * M, b"\x22" * (64 * K)), (5 * M, b"\x23" * (2 * M + 0))])
    mid.block_size = 512 * K
    mid.write(d / "mid.vhd")
    top = child(
        d / "mid.vhd",
        [(4 * K, b"\x31" * (4 * K)), (5 * M + 12 * K, b"\x32" * (20 * K)), (SIZE - 4 * K, b"\x33" * (4 * K))],
    )
    top.write(d / "top.vhd")
    return [d / "top.vhd", d / "mid.vhd", base], [mid, top]


def test_three_layers_read_the_composition_and_libvhdi(qemu: Qemu, tmp_path: Path):
    files, layers = three_layers(qemu, tmp_path)
    want = compose(SIZE, base_bytes(), *layers)
    assert chain_bytes(files[0]) == want
    assert libvhdi_bytes(*files) == want
    with open_chain(files[0]) as chain:
        assert [lay.format for lay in chain.layers] == ["vpc"] * 3
        ext = list(chain.extents())

        def at(off: int) -> tuple[Kind, int]:
            e = next(e for e in ext if e.start <= off < e.end)
            return e.kind, e.depth

        assert at(4 * K) == at(8 * K - 1) == (Kind.DATA, 0)
        assert at(0) == (Kind.DATA, 1)  # mid's first 8 KiB, under top's write
        assert at(8 * K) == (Kind.DATA, 2)
        assert at(4 * M) == at(5 * M - 1) == (Kind.ZERO, 2)  # the base's unallocated block
        assert at(5 * M + 12 * K) == (Kind.DATA, 0) and at(5 * M + 32 * K) == (Kind.DATA, 1)
    out = tmp_path / "flat.raw"
    flatfs("convert", "-O", "raw", files[0], out)
    assert out.read_bytes() == want


def test_partial_sectors_follow_the_spec_and_libvhdi_deviates(qemu: Qemu, tmp_path: Path):
    """Sector 0 set, sector 1 clear (bitmap byte 0x80): the spec reads sector 1 from the parent.
    libvhdi tests ``byte >> (7 - bit)`` without masking and reads the child's unused sector."""
    base = qemu_base(qemu, tmp_path)
    top = child(base, [(0, b"\x44" * 512)])
    top.write(tmp_path / "top.vhd")
    want = compose(SIZE, base_bytes(), top)
    got = chain_bytes(tmp_path / "top.vhd")
    assert got == want and got[512:1024] == b"\x11" * 512
    deviant = libvhdi_bytes(tmp_path / "top.vhd", base)
    assert deviant[512:1024] == top.fill * 512  # the deviation, pinned
    assert deviant[:512] == want[:512] and deviant[4 * K :] == want[4 * K :]


def test_qemu_silently_misreads_a_differencing_vhd(qemu: Qemu, tmp_path: Path):
    """QEMU 7.2 shows no backing file and reads zeros (or the child's unused sectors)
    where the parent holds data; it exits 0. flatfs reads the parent."""
    base = qemu_base(qemu, tmp_path)
    top = child(base, [(0, b"\x44" * 512)])
    top.write(tmp_path / "top.vhd")
    info = qemu.img("info", "--output=json", tmp_path / "top.vhd").stdout
    assert "backing-filename" not in info
    out = tmp_path / "q.raw"
    r = qemu.img("convert", "-O", "raw", tmp_path / "top.vhd", out, check=False)
    assert r.returncode == 0
    q = out.read_bytes()
    assert q[2 * M : 2 * M + 512] == bytes(512)  # an unallocated block: zeros, the parent has 0x11
    assert chain_bytes(tmp_path / "top.vhd")[2 * M : 2 * M + 512] == b"\x11" * 512


@pytest.mark.parametrize(
    "locators,layout",
    [
        ([(b"W2ru", ".\\disks\\base.vhd")], "disks"),  # relative, in a subfolder
        ([(b"W2ku", "C:\\Hyper-V\\Virtual Hard Disks\\base.vhd")], "."),  # absolute: the bare name
        ([(b"W2ru", "..\\base.vhd"), (b"W2ku", "E:\\x\\base.vhd")], "."),  # W2ru fails, W2ku's bare name
        ([], "."),  # only the parent's Unicode name
    ],
)
def test_parent_locators(qemu: Qemu, tmp_path: Path, locators, layout: str):
    folder = tmp_path / layout
    folder.mkdir(exist_ok=True)
    base = qemu_base(qemu, folder)
    top = child(
        base, [(8 * K, b"\x55" * (8 * K))], locators=locators, parent_name="base.vhd" if not locators else ""
    )
    top.write(tmp_path / "top.vhd")
    assert chain_bytes(tmp_path / "top.vhd") == compose(SIZE, base_bytes(), top)
    info = flatfs("info", tmp_path / "top.vhd").stdout
    assert "locators:" in info or not locators
    assert str(base) in flatfs("info", "--output=json", tmp_path / "top.vhd").stdout


def test_missing_parent_lists_every_path_tried(qemu: Qemu, tmp_path: Path):
    base = qemu_base(qemu, tmp_path / "elsewhere" if (tmp_path / "elsewhere").mkdir() is None else tmp_path)
    top = child(
        base, [(0, b"\x55" * 4096)], locators=[(b"W2ru", ".\\a\\base.vhd"), (b"W2ku", "C:\\b\\base.vhd")]
    )
    top.write(tmp_path / "top.vhd")
    r = flatfs("info", tmp_path / "top.vhd", check=False)
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1
    assert str(tmp_path / "a" / "base.vhd") in r.stderr and str(tmp_path / "base.vhd") in r.stderr


def test_parent_unique_id_must_match(qemu: Qemu, tmp_path: Path):
    base = qemu_base(qemu, tmp_path)
    top = child(base, [(0, b"\x55" * 4096)], parent_id=b"\x01" * 16)
    top.write(tmp_path / "top.vhd")
    with pytest.raises(ParentMismatch) as exc:
        chain_bytes(tmp_path / "top.vhd")
    assert "01010101-0101-0101-0101-010101010101" in str(exc.value)
    assert chain_bytes(tmp_path / "top.vhd", ignore_parent_id=True) == compose(SIZE, base_bytes(), top)
    r = flatfs("map", tmp_path / "top.vhd", check=False)
    assert r.returncode == 1 and "--ignore-parent-id" in r.stderr


def test_a_differencing_vhd_over_a_dynamic_one_written_here(tmp_path: Path):
    """No QEMU in the chain: a writer-made dynamic base with 4 KiB blocks, a child with 2 MiB blocks."""
    base = Vhd(3 * M, block_size=4 * K, writes=[(0, b"\x61" * (12 * K)), (2 * M, b"\x62" * 512)])
    base.write(tmp_path / "b.vhd")
    top = Vhd(
        3 * M,
        disk_type=DIFFERENCING,
        writes=[(8 * K, b"\x71" * (8 * K))],
        parent_id=unique_id_of(tmp_path / "b.vhd"),
        parent_name="b.vhd",
    )
    top.write(tmp_path / "t.vhd")
    want = compose(3 * M, b"", base, top)
    assert chain_bytes(tmp_path / "t.vhd") == want
    # in a dynamic disk a clear bit reads zeros, not the block's unused bytes (fill 0xee)
    assert want[2 * M + 512 : 2 * M + 4 * K] == bytes(4 * K - 512)


def test_chain_moved_whole_still_opens(qemu: Qemu, tmp_path: Path):
    files, layers = three_layers(qemu, tmp_path / "a" if (tmp_path / "a").mkdir() is None else tmp_path)
    shutil.move(tmp_path / "a", tmp_path / "b")
    with pytest.raises(ChainError):
        chain_bytes(tmp_path / "b" / "top.vhd", backing_dir=str(tmp_path / "a"))
    assert chain_bytes(tmp_path / "b" / "top.vhd") == compose(SIZE, base_bytes(), *layers)

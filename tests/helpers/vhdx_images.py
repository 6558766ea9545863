"""VHDX test images: chains written by tests/helpers/vhdx_writer.py, and libvhdi as a second reader."""

from __future__ import annotations

import os
from pathlib import Path

from .vhdx_writer import MiB, Parent, VhdxImage

try:
    import pyvhdi
except ImportError:  # pragma: no cover - the test extra installs it
    pyvhdi = None


def libvhdi_read(paths: list[Path]) -> bytes:
    """The top image of ``paths`` (top first) read by libyal's libvhdi, its parents set by hand."""
    assert pyvhdi is not None
    files = []
    for p in paths:
        f = pyvhdi.file()
        f.open(str(p))
        files.append(f)
    try:
        for child, parent in zip(files, files[1:]):
            child.set_parent(parent)
        top = files[0]
        return top.read_buffer_at_offset(top.get_media_size(), 0)
    finally:
        for f in files:
            f.close()


def pattern(tag: int, n: int) -> bytes:
    """``n`` bytes that differ from sector to sector (a tag and the sector number)."""
    out = bytearray()
    k = 0
    while len(out) < n:
        out += (bytes([tag]) + k.to_bytes(4, "little")) * 102 + b"\xa5\x5a"
        k += 1
    return bytes(out[:n])


class Model:
    """The guest content a chain must read, built alongside the images."""

    def __init__(self, size: int) -> None:
        self.data = bytearray(size)

    def write(self, img: VhdxImage, offset: int, data: bytes) -> None:
        img.write(offset, data)
        self.data[offset : offset + len(data)] = data

    def zero_block(self, img: VhdxImage, block: int, state: int) -> None:
        img.set_state(block, state)
        a = block * img.block_size
        self.data[a : a + img.block_size] = bytes(min(img.block_size, len(self.data) - a))


def three_layers(d: Path, *, logical: int = 512, block: int = 1 * MiB, size: int = 12 * MiB):
    """base.vhdx <- mid.avhdx <- top.avhdx, with partial blocks, ZERO blocks and locators
    of every kind. Returns (top path, [paths top first], Model)."""
    from ..helpers.vhdx_writer import UNMAPPED, ZERO

    m = Model(size)
    ss = logical
    base = VhdxImage(size, block_size=block, logical_sector=logical)
    m.write(base, 0, pattern(0x11, 3 * MiB))
    m.write(base, 5 * MiB, pattern(0x12, 2 * MiB))
    m.write(base, 9 * MiB, pattern(0x13, MiB))
    base.save(d / "base.vhdx")

    mid = VhdxImage(
        size,
        block_size=block,
        logical_sector=logical,
        parent=Parent(
            base.data_write_guid, relative_path=r".\base.vhdx", absolute_win32_path=r"C:\VMs\base.vhdx"
        ),
    )
    m.write(mid, ss * 3, pattern(0x21, ss * 5))  # partial: sectors 3..7 of block 0
    m.write(mid, MiB + 64 * 1024, pattern(0x22, 4096))  # partial inside block 1
    m.write(mid, 2 * MiB, pattern(0x23, MiB))  # a whole block
    m.zero_block(mid, 5, ZERO)  # hides base data
    m.write(mid, 10 * MiB + ss, pattern(0x24, ss))  # over a block the base does not hold
    mid.save(d / "mid.avhdx")

    top = VhdxImage(
        size,
        block_size=block,
        logical_sector=logical,
        parent=Parent(
            mid.data_write_guid,
            relative_path="mid.avhdx",
            volume_path=r"\\?\Volume{26A21BDA-A627-11D7-9931-806E6F6E6963}\VMs\mid.avhdx",
            absolute_win32_path=r"D:\Hyper-V\mid.avhdx",
        ),
    )
    m.write(top, ss * 4, pattern(0x31, ss))  # one sector inside mid's partial run
    m.write(top, 6 * MiB - ss, pattern(0x32, 2 * ss))  # straddles blocks 5 and 6
    m.zero_block(top, 9, UNMAPPED)
    top.save(d / "top.avhdx")
    paths = [d / "top.avhdx", d / "mid.avhdx", d / "base.vhdx"]
    return paths[0], paths, m


def read_all(path: Path, **kw) -> bytes:
    from flatfs import OpenOptions, open_chain

    with open_chain(path, OpenOptions(**kw)) as chain:
        return chain.pread(0, chain.size)


def sparse(path: Path) -> bool:
    return os.stat(path).st_blocks * 512 < os.stat(path).st_size


def first_difference(a: bytes, b: bytes) -> int | None:
    """The first offset where ``a`` and ``b`` differ (None if equal): a cheap assertion message
    (pytest's own diff of megabytes of bytes takes minutes)."""
    if a == b:
        return None
    n = min(len(a), len(b))
    lo = 0
    step = 1 << 16
    while lo < n and a[lo : lo + step] == b[lo : lo + step]:
        lo += step
    while lo < n and a[lo] == b[lo]:
        lo += 1
    return lo

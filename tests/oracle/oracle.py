"""Compare flatfs with QEMU on one image: map, and every byte."""

from __future__ import annotations

from pathlib import Path

from flatfs import OpenOptions, open_chain
from flatfs.extents import Kind

from ..conftest import Qemu, project_map

CHUNK = 1 << 20


def flatfs_map(chain) -> list[dict]:
    return [
        {
            "start": e.start,
            "length": e.length,
            "depth": e.depth,
            "present": e.kind.present,
            "zero": e.kind is not Kind.DATA,
            "data": e.kind.is_data,
        }
        for e in chain.extents()
    ]


def assert_matches_qemu(
    qemu: Qemu, image: Path, scratch: Path, *, options: OpenOptions | None = None, qemu_fmt: str | None = None
) -> None:
    """flatfs's map and bytes equal qemu-img map / qemu-img convert -O raw."""
    ref = scratch / (image.name + ".ref.raw")
    args = ["convert", "-O", "raw"]
    if qemu_fmt:
        args += ["-f", qemu_fmt]
    qemu.img(*args, image, ref, cwd=image.parent)
    with open_chain(image, options) as chain:
        assert project_map(flatfs_map(chain)) == project_map(qemu.map(image, qemu_fmt)), image
        assert chain.size == ref.stat().st_size
        with open(ref, "rb") as f:
            pos = 0
            while pos < chain.size:
                want = f.read(CHUNK)
                got = chain.pread(pos, CHUNK)
                assert got == want, f"{image}: bytes differ in [{pos:#x}, {pos + CHUNK:#x})"
                pos += len(want)
            # unaligned reads that straddle extents
            for off, n in ((1, 4095), (chain.size // 3 + 7, 200_003), (max(0, chain.size - 777), 777)):
                f.seek(off)
                assert chain.pread(off, n) == f.read(n), f"{image}: unaligned read at {off:#x}"
    ref.unlink()

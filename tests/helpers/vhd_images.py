"""VHD test images: qemu-made fixed and dynamic disks, and differencing chains written by
tests/helpers/vhd_writer.py over a qemu-made base."""

from __future__ import annotations

from pathlib import Path

from .qemu import Qemu
from .vhd_writer import DIFFERENCING, Vhd, unique_id_of

M = 1 << 20
SIZE = 8 * M


def qemu_base(q: Qemu, d: Path, name: str = "base.vhd") -> Path:
    """A dynamic VHD of exactly SIZE bytes (force_size: creator qem2), every block but one written."""
    img = q.create(d / name, SIZE, fmt="vpc", opts="subformat=dynamic,force_size=on")
    q.io(img, "write -P 0x11 0 4M", "write -P 0x12 6M 2M", fmt="vpc")
    return img


def base_bytes() -> bytes:
    return (b"\x11" * (4 * M) + bytes(2 * M) + b"\x12" * (2 * M))[:SIZE]


def child(parent: Path, writes: list[tuple[int, bytes]], **kw) -> Vhd:
    kw.setdefault("parent_name", parent.name)
    kw.setdefault("locators", [(b"W2ru", ".\\" + parent.name), (b"W2ku", "D:\\VMs\\" + parent.name)])
    kw.setdefault("parent_id", unique_id_of(parent))
    return Vhd(SIZE, disk_type=DIFFERENCING, writes=writes, **kw)

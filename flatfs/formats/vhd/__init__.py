"""VHD (Microsoft Virtual Hard Disk 1.0): fixed, dynamic and differencing disks.

The format is called ``vpc``, QEMU's name, so that ``-f vpc`` and a qcow2
``backing_fmt=vpc`` mean the same to flatfs as to qemu-img; ``vhd`` is an
alias because that is what users and the file names call it.
"""

from __future__ import annotations

from ..api import Format, Layer, OpenContext, TargetWriter

COOKIE = b"conectix"  # a footer copy at offset 0: a dynamic or differencing disk, as QEMU probes


def _fixed_footer(tail: bytes, file_size: int) -> bool:
    from .spec import is_fixed_footer

    return is_fixed_footer(tail, file_size)


def _open(path: str, fd: int, ctx: OpenContext) -> Layer:
    from .layer import VhdLayer

    return VhdLayer(path, fd, ctx)


def _writer() -> TargetWriter:
    from . import writer

    return TargetWriter(writer.OPTIONS, writer.open_writer, writer.measure)


FORMAT = Format(
    "vpc",
    probe=lambda head: head[:8] == COOKIE,
    open=_open,
    aliases=("vhd",),
    suffixes=(".vhd",),
    info_rows=(
        ("disk-type", "disk type"),
        ("block-size", "block size"),
        ("creator", "creator"),
        ("unique-id", "unique id"),
        ("saved-state", "saved state"),
        ("parent-id", "parent id"),
        ("parent-name", "parent name"),
        ("locators", "locators"),
    ),
    writer=_writer,
    probe_tail=_fixed_footer,
)

"""Hyper-V VHDX (MS-VHDX): headers, log replayed in memory, regions, metadata (spec, log), the layer."""

from __future__ import annotations

from ..api import Format, Layer, OpenContext, TargetWriter

FILE_ID_SIGNATURE = b"vhdxfile"


def _open(path: str, fd: int, ctx: OpenContext) -> Layer:
    from .layer import VhdxLayer

    return VhdxLayer(path, fd, ctx)


def _writer() -> TargetWriter:
    from . import writer

    return TargetWriter(writer.OPTIONS, writer.open_writer, writer.measure, check=writer.check)


FORMAT = Format(
    "vhdx",
    probe=lambda head: head.startswith(FILE_ID_SIGNATURE),
    open=_open,
    suffixes=(".vhdx", ".avhdx"),
    info_rows=(
        ("disk-type", "disk type"),
        ("block-size", "block size"),
        ("logical-sector-size", "logical sector size"),
        ("physical-sector-size", "physical sector size"),
        ("data-write-guid", "data write guid"),
        ("log", "log"),
        ("parent-locator", "parent locator"),
    ),
    writer=_writer,
)

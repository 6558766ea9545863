"""VMware VMDK: hosted sparse (KDMV) and flat extents, descriptors, delta disks, ESXi's deltas."""

from __future__ import annotations

from ..api import Format, Layer, OpenContext, TargetWriter

MAGICS = (b"KDMV", b"COWD")  # a hosted sparse extent; an ESXi vmfsSparse extent
SESPARSE_MAGIC = (0xCAFEBABE).to_bytes(8, "little")  # an ESXi seSparse extent (read alone too)


def _open(path: str, fd: int, ctx: OpenContext) -> Layer:
    from .layer import VmdkLayer

    return VmdkLayer(path, fd, ctx)


def _probe(head: bytes) -> bool:
    if head[:4] in MAGICS or head[:8] == SESPARSE_MAGIC:
        return True
    if head[:1] not in (b"#", b" ", b"v"):  # a text descriptor starts with a comment or version=
        return False
    from .descriptor import looks_like_descriptor

    return looks_like_descriptor(head)


def _writer() -> TargetWriter:
    from . import writer

    return TargetWriter(writer.OPTIONS, writer.open_writer, writer.measure, check=writer.check)


FORMAT = Format(
    "vmdk",
    probe=_probe,
    open=_open,
    suffixes=(".vmdk",),
    info_rows=(
        ("cluster-size", "grain size"),
        ("create-type", "create type"),
        ("cid", "CID"),
        ("parent-cid", "parent CID"),
        ("extents", "extents"),
    ),
    writer=_writer,
)

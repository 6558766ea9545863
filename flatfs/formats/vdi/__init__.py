"""VirtualBox VDI 1.1 (dynamic, static and differencing images): header (spec), the layer, the registry."""

from __future__ import annotations

from ..api import Format, Layer, OpenContext, TargetWriter

SIGNATURE = (64, b"\x7f\x10\xda\xbe")  # offset and bytes of the VDI signature


def _open(path: str, fd: int, ctx: OpenContext) -> Layer:
    from .layer import VdiLayer

    return VdiLayer(path, fd, ctx)


def _identify(head: bytes) -> dict[str, str]:
    from .spec import identify

    return identify(head)


def _probe(head: bytes) -> bool:
    at, magic = SIGNATURE
    return head[at : at + len(magic)] == magic


def _writer() -> TargetWriter:
    from . import writer

    return TargetWriter(writer.OPTIONS, writer.open_writer, writer.measure)


FORMAT = Format(
    "vdi",
    probe=_probe,
    open=_open,
    identify=_identify,
    suffixes=(".vdi",),
    info_rows=(
        ("vdi-type", "type"),
        ("block-size", "block size"),
        ("vdi-uuid-create", "uuid"),
        ("vdi-uuid-modify", "modify uuid"),
        ("vdi-uuid-linkage", "parent uuid"),
        ("vdi-uuid-parent-modify", "parent modify uuid"),
        ("vdi-registry", "registry"),
        ("vdi-flags", "flags"),
    ),
    writer=_writer,
)

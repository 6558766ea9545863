"""qcow2 (QEMU copy-on-write v2 and v3): header and tables (spec, clusters), the layer, the writer.

Only this table entry loads at start-up; the layer and the writer are
imported when an image is opened or written.
"""

from __future__ import annotations

from typing import Any

from ..api import ClusterWriterClass, Format, Layer, OpenContext

MAGIC = b"QFI\xfb"


def _open(path: str, fd: int, ctx: OpenContext) -> Layer:
    from .layer import Qcow2Layer

    return Qcow2Layer(path, fd, ctx)


def _overlay() -> Any:
    from .overlay import Overlay

    return Overlay


def _writer() -> ClusterWriterClass:
    from .writer import Qcow2Writer

    return Qcow2Writer


FORMAT = Format(
    "qcow2",
    probe=lambda head: head[:4] == MAGIC,
    open=_open,
    target=_writer,
    overlay=_overlay,
    info_rows=(("cluster-size", "cluster size"), ("compat", "compat"), ("data-file-name", "data file")),
)

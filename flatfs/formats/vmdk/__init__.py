"""VMware VMDK: hosted sparse (KDMV) and flat extents, descriptors, delta disks."""

from __future__ import annotations

from ..api import Format, Layer, OpenContext
from .descriptor import looks_like_descriptor
from .sparse import COWD_MAGIC, looks_like_sparse


def _open(path: str, fd: int, ctx: OpenContext) -> Layer:
    from .layer import VmdkLayer

    return VmdkLayer(path, fd, ctx)


def _probe(head: bytes) -> bool:
    # COWD (ESXi vmfsSparse) is ours to refuse by name
    return looks_like_sparse(head) or looks_like_descriptor(head) or head[:4] == COWD_MAGIC


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
)

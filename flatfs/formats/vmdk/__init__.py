"""VMware VMDK: hosted sparse (KDMV) and flat extents, descriptors, delta disks."""

from __future__ import annotations

from ..api import Format
from .descriptor import looks_like_descriptor
from .layer import VmdkLayer
from .sparse import looks_like_sparse


def _probe(head: bytes) -> bool:
    return looks_like_sparse(head) or looks_like_descriptor(head)


FORMAT = Format("vmdk", probe=_probe, open=VmdkLayer, suffixes=(".vmdk",))

"""VirtualBox VDI 1.1 (dynamic, static and differencing images): header (spec), the layer, the registry."""

from __future__ import annotations

from ..api import Format
from .layer import VdiLayer
from .spec import identify, looks_like_vdi

FORMAT = Format(
    "vdi",
    probe=looks_like_vdi,
    open=VdiLayer,
    identify=identify,
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
)

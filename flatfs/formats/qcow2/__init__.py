"""qcow2 (QEMU copy-on-write v2 and v3): header and tables (spec, clusters), the layer, the writer."""

from __future__ import annotations

from ..api import Format
from .layer import Qcow2Layer
from .spec import looks_like_qcow2
from .writer import Qcow2Writer

FORMAT = Format(
    "qcow2",
    probe=looks_like_qcow2,
    open=Qcow2Layer,
    target=Qcow2Writer,
    info_rows=(("cluster-size", "cluster size"), ("compat", "compat")),
)

"""Facts about each image of a chain, top first (the rows of `flatfs info`)."""

from __future__ import annotations

import os
from typing import Any

from ..chain import Chain, Opener, OpenOptions
from ..formats.api import ParentRef


def _disk_usage(fd: int) -> int:
    try:
        return os.fstat(fd).st_blocks * 512
    except OSError:
        return 0


def _resolved_from(child: str, ref: ParentRef, parent: str) -> str:
    """Which of the names a layer records for its parent found it (several, or Windows paths)."""
    want = os.path.realpath(parent)
    names = Opener(OpenOptions())
    for name in ref.candidates:
        mapped = names.candidates(child, ParentRef((name,), loose=ref.loose), "backing file")
        if mapped and os.path.realpath(mapped[0]) == want:
            return name
    return f"{os.path.basename(parent)} (the bare file name, in the image's folder)"


def chain_info(chain: Chain) -> list[dict[str, Any]]:
    rows = []
    for depth, lay in enumerate(chain.layers):
        row: dict[str, Any] = {
            "depth": depth,
            "filename": lay.path,
            "format": lay.format,
            "virtual-size": lay.size,
            "actual-size": sum(_disk_usage(f.fd) for f in lay.host_files()),
        }
        if lay.parent is not None:
            row["backing-filename"] = lay.parent.name
            row["backing-filename-format"] = lay.parent.format
            if depth + 1 < len(chain.layers):
                row["full-backing-filename"] = chain.layers[depth + 1].path
                if len(lay.parent.candidates) > 1 or lay.parent.loose:
                    row["backing-resolved-from"] = _resolved_from(
                        lay.path, lay.parent, row["full-backing-filename"]
                    )
        row.update(lay.info())
        rows.append(row)
    return rows

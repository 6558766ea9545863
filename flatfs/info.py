"""Facts about each image of a chain, top first (for `flatfs info`)."""

from __future__ import annotations

import os
from typing import Any

from .chain import Chain


def _disk_usage(fd: int) -> int:
    try:
        return os.fstat(fd).st_blocks * 512
    except OSError:
        return 0


def chain_info(chain: Chain) -> list[dict[str, Any]]:
    rows = []
    for depth, lay in enumerate(chain.layers):
        extra = lay.info()
        used = _disk_usage(lay.fd)
        data_fd = getattr(lay, "data_fd", lay.fd)
        if data_fd != lay.fd:
            used += _disk_usage(data_fd)
        row: dict[str, Any] = {
            "depth": depth,
            "filename": lay.path,
            "format": lay.format,
            "virtual-size": lay.size,
            "actual-size": used,
        }
        if lay.backing is not None:
            row["backing-filename"] = lay.backing.name
            row["backing-filename-format"] = lay.backing.format
            if depth + 1 < len(chain.layers):
                row["full-backing-filename"] = chain.layers[depth + 1].path
        row.update(extra)
        rows.append(row)
    return rows

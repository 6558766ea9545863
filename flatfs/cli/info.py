"""Facts about each image of a chain, top first (the rows of `flatfs info`)."""

from __future__ import annotations

import os
from typing import Any

from ..chain import Chain


def _disk_usage(fd: int) -> int:
    try:
        return os.fstat(fd).st_blocks * 512
    except OSError:
        return 0


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
        if chain.probe_note(depth):
            row["probed"] = chain.probe_note(depth)
        if lay.parent is not None:
            row["backing-filename"] = lay.parent.name
            row["backing-filename-format"] = lay.parent.format
            if depth + 1 < len(chain.layers):
                row["full-backing-filename"] = chain.layers[depth + 1].path
                if lay.parent.by_id is not None:
                    row["backing-found-by"] = chain.found_by(depth)
                if lay.parent.identity is not None:
                    # `info` opens with --ignore-parent-id: it shows a mismatch
                    # that map, mount and convert refuse
                    kind, want = lay.parent.identity
                    got = chain.layers[depth + 1].identity(kind)
                    row["parent-identity"] = {
                        "kind": kind,
                        "recorded": want,
                        "found": got,
                        "match": got == want,
                    }
                if len(lay.parent.candidates) > 1 or lay.parent.loose:
                    row["backing-resolved-from"] = chain.resolved_from(depth)
        row.update(lay.info())
        rows.append(row)
    return rows

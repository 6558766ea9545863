"""Hyper-V VHDX (MS-VHDX): headers, log replayed in memory, regions, metadata (spec, log), the layer."""

from __future__ import annotations

from ..api import Format
from .layer import IDENTITY, VhdxLayer
from .spec import FILE_ID_SIGNATURE

__all__ = ["FORMAT", "IDENTITY", "VhdxLayer"]

FORMAT = Format(
    "vhdx",
    probe=lambda head: head.startswith(FILE_ID_SIGNATURE),
    open=VhdxLayer,
    suffixes=(".vhdx", ".avhdx"),
)

"""VirtualBox VDI 1.1 (dynamic, static and differencing images): header (spec), the layer, the registry."""

from __future__ import annotations

from ..api import Format
from .layer import VdiLayer
from .spec import identify, looks_like_vdi

FORMAT = Format("vdi", probe=looks_like_vdi, open=VdiLayer, identify=identify, suffixes=(".vdi",))

"""Opening a chain under one policy (open.py) and composing its layers into one view (compose.py)."""

from __future__ import annotations

from .compose import SEEK_DATA, SEEK_HOLE, Chain
from .open import MAX_CHAIN_DEPTH, Opener, OpenOptions, open_chain, open_partial_chain

__all__ = [
    "SEEK_DATA",
    "SEEK_HOLE",
    "MAX_CHAIN_DEPTH",
    "Chain",
    "Opener",
    "OpenOptions",
    "open_chain",
    "open_partial_chain",
]

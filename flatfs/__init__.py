"""flatfs: flatten VM disk image chains.

Public API::

    from flatfs import open_chain, OpenOptions, Chain, Kind, Extent, FlatfsError
    from flatfs.convert import convert, ConvertOptions   # the convert package is its own API
"""

from __future__ import annotations

from .chain import Chain, OpenOptions, open_chain, open_partial_chain
from .errors import (
    ChainError,
    ConvertError,
    CorruptImage,
    FlatfsError,
    ImageError,
    ImageIOError,
    MissingParent,
    MountError,
    ParentMismatch,
    UnsupportedImage,
)
from .extents import Extent, Kind

__version__ = "0.1.0"

__all__ = [
    "Chain",
    "OpenOptions",
    "open_chain",
    "open_partial_chain",
    "Extent",
    "Kind",
    "FlatfsError",
    "ImageError",
    "CorruptImage",
    "UnsupportedImage",
    "ParentMismatch",
    "ImageIOError",
    "ChainError",
    "MissingParent",
    "MountError",
    "ConvertError",
    "__version__",
]

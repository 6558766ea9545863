"""flatfs: flatten qcow2/raw backing chains.

Public API::

    from flatfs import open_chain, OpenOptions, Kind, Extent, FlatfsError
"""

from .chain import Chain, OpenOptions, open_chain
from .errors import (
    ChainError,
    ConvertError,
    CorruptImage,
    FlatfsError,
    ImageError,
    ImageIOError,
    MountError,
    UnsupportedImage,
)
from .extents import Extent, Kind

__all__ = [
    "Chain",
    "OpenOptions",
    "open_chain",
    "Extent",
    "Kind",
    "FlatfsError",
    "ImageError",
    "CorruptImage",
    "UnsupportedImage",
    "ImageIOError",
    "ChainError",
    "MountError",
    "ConvertError",
]
__version__ = "0.1.0"
